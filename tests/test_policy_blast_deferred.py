# Red team, round 22 (helper 117): a DBA's CREATE CONSTRAINT TRIGGER ... DEFERRABLE
# INITIALLY DEFERRED runs at COMMIT, after the blast-radius guard counted the agent's
# statement: a one-row UPDATE answered "UPDATE 1" while its trigger deleted 4,999 rows
# of another table (autocommit, in a block, psycopg with parameters, asyncpg prepared,
# SET CONSTRAINTS ALL IMMEDIATE after it). A write an agent sends to a table with a
# deferrable trigger of a user's (or through a cascade, a trigger or a function, in a
# database that has one) is refused now, saying why. Judged by the rows upstream,
# through psql, psycopg (simple and extended), asyncpg and a raw client.
from __future__ import annotations

import psycopg
import pytest
from conftest import UPSTREAM_USER
from guarded import guarded_proxy
from test_policy_blast_many_tables import CLIENTS, _run

DB = "appdb"
LOG_ROWS = 3000

SETUP = [
    "DROP TABLE IF EXISTS bd_src, bd_log, bd_imm, bd_parent, bd_plain CASCADE",
    "DROP FUNCTION IF EXISTS bd_fn() CASCADE",
    "DROP FUNCTION IF EXISTS bd_touch() CASCADE",
    "DROP FUNCTION IF EXISTS bd_chain_fn() CASCADE",
    # a cascade from bd_parent into the table with the deferred trigger
    "CREATE TABLE bd_parent (id int PRIMARY KEY)",
    "INSERT INTO bd_parent SELECT g FROM generate_series(1, 10) g",
    "CREATE TABLE bd_src (id int PRIMARY KEY, v int, "
    "p int REFERENCES bd_parent ON DELETE CASCADE)",
    "INSERT INTO bd_src SELECT g, 0, g FROM generate_series(1, 10) g",
    "CREATE TABLE bd_log (id int, v int)",
    f"INSERT INTO bd_log SELECT g, 0 FROM generate_series(1, {LOG_ROWS}) g",
    "CREATE FUNCTION bd_fn() RETURNS trigger LANGUAGE plpgsql AS "
    "$$BEGIN DELETE FROM bd_log WHERE id > 1; RETURN NULL; END$$",
    "CREATE CONSTRAINT TRIGGER bd_t AFTER UPDATE OR INSERT OR DELETE ON bd_src "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bd_fn()",
    # initially immediate, deferrable: SET CONSTRAINTS ALL DEFERRED moves it to COMMIT
    "CREATE TABLE bd_imm (id int PRIMARY KEY, v int)",
    "INSERT INTO bd_imm SELECT g, 0 FROM generate_series(1, 10) g",
    "CREATE CONSTRAINT TRIGGER bd_t2 AFTER UPDATE ON bd_imm DEFERRABLE INITIALLY IMMEDIATE "
    "FOR EACH ROW EXECUTE FUNCTION bd_fn()",
    # a function the agent may call that writes the table
    "CREATE FUNCTION bd_touch() RETURNS int LANGUAGE sql AS "
    "$$UPDATE bd_src SET v = v + 1 WHERE id = 2 RETURNING 1$$",
    "CREATE TABLE bd_plain (id int PRIMARY KEY, v int)",
    "INSERT INTO bd_plain SELECT g, 0 FROM generate_series(1, 10) g",
    # a table whose own (immediate) trigger writes the table with the deferred one
    "DROP TABLE IF EXISTS bd_chain",
    "CREATE TABLE bd_chain (id int PRIMARY KEY, v int)",
    "INSERT INTO bd_chain SELECT g, 0 FROM generate_series(1, 10) g",
    "CREATE FUNCTION bd_chain_fn() RETURNS trigger LANGUAGE plpgsql AS "
    "$$BEGIN UPDATE bd_src SET v = v + 1 WHERE id = 6; RETURN NULL; END$$",
    "CREATE TRIGGER bd_chain_t AFTER UPDATE ON bd_chain FOR EACH ROW "
    "EXECUTE FUNCTION bd_chain_fn()",
    f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {UPSTREAM_USER}",
]

VARIANTS = {
    "update": "UPDATE bd_src SET v = 1 WHERE id = 1",
    "block": "BEGIN; UPDATE bd_src SET v = 1 WHERE id = 1; COMMIT",
    "immediate-after": "BEGIN; UPDATE bd_src SET v = 1 WHERE id = 1; "
                       "SET CONSTRAINTS ALL IMMEDIATE; COMMIT",
    "deferred-later": "BEGIN; SET CONSTRAINTS ALL DEFERRED; UPDATE bd_imm SET v = 1 "
                      "WHERE id = 1; COMMIT",
    "insert": "INSERT INTO bd_src (id, v, p) VALUES (99, 0, 1)",
    "cte": "WITH x AS (UPDATE bd_src SET v = 2 WHERE id = 3 RETURNING 1) SELECT count(*) "
           "FROM x",
    "cascade": "DELETE FROM bd_parent WHERE id = 4",
    "function": "SELECT bd_touch()",
    "trigger-chain": "UPDATE bd_chain SET v = 1 WHERE id = 1",
}


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("blast-deferred")) as p:
        yield p


@pytest.fixture
def tables(pg, gproxy):
    pg.execute("; ".join(SETUP), dbname=DB)
    # the guard reads the catalog at the next statement (the side link's refresh)
    with psycopg.connect(gproxy.dsn(dbname=DB), autocommit=True) as c:
        c.execute("SELECT 1")
    yield
    # (while a deferrable trigger exists, function calls are refused too: the next
    # tests' database has none)
    pg.execute("; ".join(SETUP[:4]) + "; DROP TABLE IF EXISTS bd_chain", dbname=DB)


def _truth(pg) -> tuple:
    return (pg.execute("SELECT count(*) FROM bd_log", dbname=DB)[0][0],
            pg.execute("SELECT count(*), sum(v) FROM bd_src", dbname=DB)[0],
            pg.execute("SELECT sum(v) FROM bd_imm", dbname=DB)[0][0],
            pg.execute("SELECT count(*) FROM bd_parent", dbname=DB)[0][0])


def test_the_trigger_does_delete_the_log_upstream(pg, tables):
    pg.execute("UPDATE bd_src SET v = 1 WHERE id = 1", dbname=DB)
    assert _truth(pg)[0] == 1


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_write_a_deferred_trigger_follows_is_refused(gproxy, pg, psql_bin, tables,
                                                       variant, client):
    before = _truth(pg)
    assert before[0] == LOG_ROWS
    got = _run(client, gproxy, psql_bin, VARIANTS[variant])
    assert got == "42501", (variant, client, got)
    assert _truth(pg) == before


def test_the_refusal_says_why(gproxy, pg, tables):
    with psycopg.connect(gproxy.dsn(dbname=DB), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("UPDATE bd_src SET v = %s WHERE id = %s", (5, 1))
        assert "deferrable constraint triggers" in str(e.value), str(e.value)
        assert "NOT DEFERRABLE" in (e.value.diag.message_hint or "")
        # the session goes on, and a table without such triggers is written as before
        assert c.execute("UPDATE bd_plain SET v = 7 WHERE id = 2").rowcount == 1
    assert _truth(pg)[0] == LOG_ROWS
    assert pg.execute("SELECT v FROM bd_plain WHERE id = 2", dbname=DB)[0][0] == 7


@pytest.mark.parametrize("steps", [
    ["UPDATE bd_src SET v = 1 WHERE id = 1"],
    ["SET CONSTRAINTS ALL DEFERRED", "UPDATE bd_imm SET v = 1 WHERE id = 1"],
    ["SELECT 1", "DELETE FROM bd_parent WHERE id = 5"],
], ids=["deferred", "set-deferred", "cascade"])
def test_in_a_block_statement_by_statement(gproxy, pg, tables, steps):
    # psycopg's own transaction (BEGIN sent apart), then asyncpg's: the write is refused
    # where it is sent, and nothing of it is left at COMMIT
    import asyncio

    import asyncpg
    before = _truth(pg)
    with psycopg.connect(gproxy.dsn(dbname=DB)) as c:
        for sql in steps[:-1]:
            c.execute(sql)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(steps[-1])
        c.rollback()
    assert _truth(pg) == before

    async def go():
        c = await asyncpg.connect(gproxy.dsn(dbname=DB))
        try:
            tr = c.transaction()
            await tr.start()
            for sql in steps[:-1]:
                await c.execute(sql)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await c.execute(steps[-1])
            await tr.rollback()
        finally:
            await c.close()
    asyncio.run(go())
    assert _truth(pg) == before
