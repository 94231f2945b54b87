# Policy on the wire: refused statements never reach Postgres, clients get 42501 naming
# the rule, and sessions and transactions behave exactly as Postgres would.
import asyncio

import asyncpg
import psycopg
import pytest

from conftest import HUMAN, HUMAN_PASSWORD, run_psql

GUARDED = """
[[rules]]
name = "no-destructive"
when = { flags = ["destructive", "privilege"] }
action = "block"

[[rules]]
name = "orders-need-approval"
when = { kind = "agent", statements = ["update"], relations = ["public.orders"] }
action = "approve"
timeout = "1s"
"""


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    from conftest import Proxy
    p = Proxy(pg, tmp_path_factory.mktemp("guarded"), extra=GUARDED)
    text = p.config.read_text().replace('agents = "allow"', 'agents = "guarded"')
    p.config.write_text(text)
    p.start()
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def schema(pg):
    pg.execute("""
        DROP TABLE IF EXISTS items, orders CASCADE;
        CREATE TABLE items (id int PRIMARY KEY, name text);
        CREATE INDEX items_name_idx ON items (name);
        INSERT INTO items VALUES (1, 'one'), (2, 'two');
        CREATE TABLE orders (id int PRIMARY KEY, status text);
        INSERT INTO orders VALUES (1, 'new');
    """, dbname="appdb")


def upstream_count(pg, sql="SELECT count(*) FROM items"):
    return pg.execute(sql, dbname="appdb")[0][0]


def index_exists(pg):
    return bool(pg.execute("SELECT 1 FROM pg_indexes WHERE indexname = 'items_name_idx'",
                           dbname="appdb"))


def test_psql_drop_index_refused_with_rule_and_session_usable(pg, guarded, psql_bin):
    r = run_psql(psql_bin, guarded.dsn(dbname="appdb"), "-v", "ON_ERROR_STOP=0",
                 input="DROP INDEX items_name_idx;\nSELECT 'still here';\n")
    assert 'ERROR:  pgguard: statement refused by rule "no-destructive"' in r.stderr
    assert "DETAIL:" in r.stderr and "HINT:" in r.stderr
    assert "CONTEXT" not in r.stderr
    assert "still here" in r.stdout
    assert index_exists(pg)


def test_keywords_in_literals_and_comments_are_not_sql(guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("SELECT 'DROP TABLE items' /* DROP TABLE items */ -- DROP TABLE items")
        assert cur.fetchone() == ("DROP TABLE items",)
        assert conn.execute("SELECT $$DELETE FROM items$$").fetchone() == ("DELETE FROM items",)
        conn.execute("DELETE FROM items WHERE id = 2")
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (1,)


def test_refusal_sqlstate_and_fields(guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("DELETE FROM items")
        diag = e.value.diag
        assert diag.sqlstate == "42501"
        assert 'rule "no-destructive"' in diag.message_primary
        assert "DELETE" in (diag.message_detail or "")
        assert "WHERE" in (diag.message_hint or "")


def test_multi_statement_query_runs_none_if_one_is_refused(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("INSERT INTO items VALUES (3, 'three'); DROP TABLE orders")
        assert upstream_count(pg) == 2
        assert upstream_count(pg, "SELECT count(*) FROM orders") == 1


def test_refusal_inside_transaction_fails_it_like_postgres(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb")) as conn:
        conn.execute("INSERT INTO items VALUES (3, 'three')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("TRUNCATE items")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (2,)
    # COMMIT of a failed transaction rolls back, as on Postgres
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("BEGIN")
        cur.execute("INSERT INTO items VALUES (4, 'four')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("DROP INDEX items_name_idx")
        cur.execute("COMMIT")
        assert cur.statusmessage == "ROLLBACK"
    assert upstream_count(pg) == 2
    assert index_exists(pg)


def test_psycopg_prepared_and_pipeline(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        assert conn.execute("SELECT name FROM items WHERE id = %s", [1],
                            prepare=True).fetchone() == ("one",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM items WHERE %s::int IS NOT NULL", [1], prepare=True)
        assert conn.execute("SELECT count(*) FROM items", prepare=True).fetchone() == (2,)
        # a pipeline with a refused statement in the middle: what came before in the
        # same implicit transaction is rolled back, what follows the Sync runs
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.pipeline() as p:
                conn.execute("INSERT INTO items VALUES (%s, 'x')", [10])
                conn.execute("DROP TABLE orders")
                p.sync()
        conn.execute("INSERT INTO items VALUES (%s, 'y')", [11])
    assert upstream_count(pg) == 3
    assert upstream_count(pg, "SELECT count(*) FROM items WHERE id = 11") == 1
    assert upstream_count(pg, "SELECT count(*) FROM orders") == 1


def test_asyncpg_refusals_and_statement_cache(pg, guarded):
    async def go():
        conn = await asyncpg.connect(guarded.dsn(dbname="appdb"))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as e:
                await conn.execute("DROP INDEX items_name_idx")     # simple protocol
            assert "no-destructive" in str(e.value)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("DELETE FROM items WHERE $1::bool", True)   # extended
            for i in range(3):   # cached prepared statement, reused
                assert await conn.fetchval("SELECT name FROM items WHERE id = $1", 1) == "one"
            async with conn.transaction():
                await conn.execute("INSERT INTO items VALUES (5, 'five')")
            return await conn.fetchval("SELECT count(*) FROM items")
        finally:
            await conn.close()
    assert asyncio.run(go()) == 3
    assert index_exists(pg)


def test_unanswered_approval_times_out_and_session_stays_usable(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
        assert "timed out" in str(e.value) and "orders-need-approval" in str(e.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert pg.execute("SELECT status FROM orders", dbname="appdb") == [("new",)]


def test_unparseable_sql_is_refused_with_parser_message(guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        with pytest.raises(psycopg.errors.SyntaxError) as e:
            cur.execute("SELEC 1")
        assert "syntax error" in str(e.value)
        assert cur.execute("SELECT 2").fetchone() == (2,)


def test_privilege_escalation_refused(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        for sql in ("SET ROLE postgres", "SELECT set_config('role', 'postgres', false)",
                    "SET standard_conforming_strings = off", "GRANT ALL ON items TO PUBLIC",
                    "COPY items TO PROGRAM 'cat'", "SELECT pg_read_file('/etc/passwd')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
        assert conn.execute("SELECT current_user").fetchone() == ("app",)


def test_humans_are_allowed_by_default_but_rules_still_apply(pg, guarded):
    with psycopg.connect(guarded.dsn(user=HUMAN, password=HUMAN_PASSWORD, dbname="appdb"),
                         autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP INDEX items_name_idx")       # no-destructive applies to all
        conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")   # rule is agents'
    assert pg.execute("SELECT status FROM orders", dbname="appdb") == [("paid",)]


def test_sql_prepare_execute_judged_by_what_it_runs(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("PREPARE wipe AS DELETE FROM items")
        conn.execute("PREPARE one(int) AS SELECT name FROM items WHERE id = $1")
        assert conn.execute("EXECUTE one(1)").fetchone() == ("one",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("EXECUTE never_prepared_here")
    assert upstream_count(pg) == 2
