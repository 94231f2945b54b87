# The blast-radius guard measures "every row" too: an UPDATE or DELETE whose WHERE clause
# turned out to match every row of its table is refused and rolled back however few rows
# the table has (the row limit alone let `DELETE FROM t WHERE id > 0` empty a table of 40
# rows). Judged by the rows upstream, through psycopg (simple, prepared, in a block),
# asyncpg, psql and raw extended-protocol pipelines.
from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD, run_psql
from guarded import guarded_proxy
from rawpg import SYNC, RawClient, bind, errors, execute, parse, tags

ROWS = 40


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("blast-every")) as p:
        yield p


@pytest.fixture()
def table(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute('DROP TABLE IF EXISTS ber_t; DROP TABLE IF EXISTS "Ber ""Quoted"""; '
                  "DROP TABLE IF EXISTS ber_log")
        c.execute("CREATE TABLE ber_log (id int)")
        c.execute("CREATE TABLE ber_t (id int PRIMARY KEY, name text, v int NOT NULL DEFAULT 0)")
        c.execute(f"INSERT INTO ber_t SELECT g, 'n' || g, 0 FROM generate_series(1, {ROWS}) g")
        c.execute('CREATE TABLE "Ber ""Quoted""" (id int)')
        c.execute('INSERT INTO "Ber ""Quoted""" VALUES (1), (2), (3)')
        c.execute('GRANT ALL ON ber_t, ber_log, "Ber ""Quoted""" TO PUBLIC')
    yield
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute('DROP TABLE IF EXISTS ber_t; DROP TABLE IF EXISTS "Ber ""Quoted"""; '
                  "DROP TABLE IF EXISTS ber_log")


def truth(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return (c.execute("SELECT count(*), coalesce(sum(v), 0), min(name) FROM ber_t").fetchone(),
                c.execute('SELECT count(*) FROM "Ber ""Quoted"""').fetchone())


# WHERE clauses true for every row that the classifier cannot prove so
EVERY_ROW = [
    "DELETE FROM ber_t WHERE id > 0",
    "DELETE FROM ber_t WHERE id IN (SELECT id FROM ber_t)",
    "DELETE FROM ber_t WHERE length(name) > 0",
    "DELETE FROM ber_t WHERE id BETWEEN -1000000 AND 1000000",
    "DELETE FROM ber_t WHERE name LIKE '%'",
    "DELETE FROM ber_t WHERE ctid IS NOT NULL AND id < 100000",
    "UPDATE ber_t SET v = v + 1 WHERE id > 0",
    "UPDATE ber_t SET name = 'wiped' WHERE name <> ''",
    "UPDATE ber_t SET v = 9 WHERE id = ANY (ARRAY(SELECT generate_series(1, 1000)))",
    "UPDATE public.ber_t SET v = 1 WHERE v >= 0",
    "DELETE FROM ber_t WHERE id > 0 RETURNING *",
    "UPDATE ber_t SET v = 2 WHERE id > 0 RETURNING id",
    'DELETE FROM "Ber ""Quoted""" WHERE id > 0',
    # measured by the per-table counters: CTEs, functions in the statement
    "WITH d AS (DELETE FROM ber_t WHERE id > 0 RETURNING id) SELECT count(*) FROM d",
    "WITH u AS (UPDATE ber_t SET v = 1 WHERE id > 0 RETURNING id) SELECT count(*) FROM u",
    "WITH d AS (DELETE FROM ber_t WHERE id > 0 RETURNING *) "
    "INSERT INTO ber_log SELECT id FROM d",
    "DELETE FROM ber_t WHERE id > 0 AND random() >= 0",
    "DO $$BEGIN DELETE FROM ber_t WHERE id > 0; END$$",
]


@pytest.mark.parametrize("sql", EVERY_ROW)
def test_psycopg_simple_prepared_and_in_block(gproxy, pg, table, sql):
    before = truth(pg)
    with psycopg.connect(gproxy.dsn(), autocommit=True) as c:
        for prepare in (False, True):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute(sql, prepare=prepare)
            assert "every row" in e.value.diag.message_primary
            assert e.value.diag.message_hint
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert truth(pg) == before
    with psycopg.connect(gproxy.dsn()) as c:          # inside a transaction block
        c.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(sql)
        c.rollback()
        c.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(sql, prepare=True)
        # the block is failed, as after any error: nothing can be committed
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.rollback()
    assert truth(pg) == before


@pytest.mark.parametrize("sql", EVERY_ROW[:6] + EVERY_ROW[6:9])
def test_asyncpg_three_times(gproxy, pg, table, sql):
    before = truth(pg)

    async def main():
        conn = await asyncpg.connect(gproxy.dsn())
        try:
            for _ in range(3):                      # asyncpg's statement cache
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetch(sql)
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    asyncio.run(main())
    assert truth(pg) == before


MULTI = [
    "SELECT 1; DELETE FROM ber_t WHERE id > 0",
    "DELETE FROM ber_t WHERE id > 20; DELETE FROM ber_t WHERE id <= 20",
    "UPDATE ber_t SET v = 1 WHERE id > 0; SELECT 2",
    "SELECT 1; UPDATE ber_t SET name = 'x' WHERE id > 0; SELECT 3",
    "DELETE FROM ber_log WHERE id > 0; DELETE FROM ber_t WHERE id > 0",
]


@pytest.mark.parametrize("sql", MULTI)
def test_several_statements_in_one_query(gproxy, pg, table, sql, psql_bin):
    before = truth(pg)
    with psycopg.connect(gproxy.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            psycopg.ClientCursor(c).execute(sql)
        assert "every row of public.ber_t" in e.value.diag.message_primary
    r = run_psql(psql_bin, gproxy.dsn(), "-c", sql)
    assert r.returncode != 0 and "every row" in r.stderr, r.stderr
    assert truth(pg) == before


def test_psql(gproxy, pg, table, psql_bin):
    before = truth(pg)
    for sql in EVERY_ROW[:5]:
        r = run_psql(psql_bin, gproxy.dsn(), "-c", sql)
        assert r.returncode != 0 and "every row" in r.stderr, r.stderr
    assert truth(pg) == before


def test_raw_pipeline_each_with_sync_and_one_sync(gproxy, pg, table):
    before = truth(pg)
    c = RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        c.send(*(parse(s) + bind() + execute() + SYNC for s in EVERY_ROW[:6]))
        msgs = c.until_ready(6)
        assert [e["C"] for e in errors(msgs)] == ["42501"] * 6
        # one implicit transaction: a narrow delete, then an every-row update; both undone
        c.send(parse("DELETE FROM ber_t WHERE id = 1") + bind() + execute()
               + parse("UPDATE ber_t SET v = 5 WHERE id > 0") + bind() + execute() + SYNC)
        msgs = c.until_ready()
        assert [e["C"] for e in errors(msgs)] == ["42501"]
        assert c.run("SELECT count(*) FROM ber_t")[-1] == (b"Z", b"I")
    finally:
        c.close()
    assert truth(pg) == before


NARROW = [
    ("DELETE FROM ber_t WHERE id = 1", (ROWS - 1, 0)),
    ("DELETE FROM ber_t WHERE id <= 39", (1, 0)),          # all but one: allowed
    ("UPDATE ber_t SET v = 1 WHERE id > 20", (ROWS, 20)),
    ("UPDATE ber_t SET v = 1 WHERE id IN (1, 2)", (ROWS, 2)),
    ("DELETE FROM ber_t WHERE id > 1000", (ROWS, 0)),        # no row at all
]


@pytest.mark.parametrize("sql, want", NARROW)
def test_narrow_writes_still_pass(gproxy, pg, table, sql, want):
    with psycopg.connect(gproxy.dsn(), autocommit=True) as c:
        c.execute(sql)
        c.execute(sql, prepare=True)
    assert truth(pg)[0][:2] == want


def test_one_row_table_may_lose_its_row(gproxy, pg, table):
    """One row changed is never "every row": a narrow WHERE on a one-row table is normal."""
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DELETE FROM ber_t WHERE id > 1")
    with psycopg.connect(gproxy.dsn(), autocommit=True) as c:
        c.execute("UPDATE ber_t SET v = 3 WHERE id = 1")
        c.execute("DELETE FROM ber_t WHERE id = 1")
    assert truth(pg)[0][0] == 0


def test_raw_pipeline_narrow_then_select_sees_its_result(gproxy, pg, table):
    c = RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        c.send(parse("UPDATE ber_t SET v = 4 WHERE id < 3") + bind() + execute() + SYNC)
        msgs = c.until_ready()
        assert tags(msgs) == ["PARSE", "BIND", "UPDATE 2"] or "UPDATE 2" in tags(msgs)
    finally:
        c.close()
    assert truth(pg)[0][1] == 8


def test_temporary_table_named_without_schema(gproxy, pg, table):
    """The classifier calls an unqualified name public.<name>; the measure must reach
    the table the statement did (a TEMP table here), in both protocols (pgjdbc splits a
    multi-statement string into extended-protocol statements)."""
    with psycopg.connect(gproxy.dsn(), autocommit=True) as c:
        c.execute("CREATE TEMP TABLE jt (id int PRIMARY KEY, val int)")
        c.execute("INSERT INTO jt SELECT g, 0 FROM generate_series(1, 5) g")
        c.execute("UPDATE jt SET val = val + 1 WHERE id <= 2", prepare=True)
        psycopg.ClientCursor(c).execute("UPDATE jt SET val = val + 1 WHERE id <= 2")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM jt WHERE id > 0", prepare=True)
        assert c.execute("SELECT sum(val), count(*) FROM jt").fetchone() == (4, 5)
    r = RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        r.run("CREATE TEMP TABLE jt (id int PRIMARY KEY, val int)")
        r.run("INSERT INTO jt SELECT g, 0 FROM generate_series(1, 5) g")
        r.send(parse("UPDATE jt SET val = val + 1 WHERE id <= 2") + bind() + execute()
               + parse("SELECT count(*) FROM jt") + bind() + execute() + SYNC)
        msgs = r.until_ready()
        assert not errors(msgs), errors(msgs)
        assert "UPDATE 2" in tags(msgs)
    finally:
        r.close()
