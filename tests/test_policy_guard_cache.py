# Issue 11: the decision cache is fail-closed. Prime it with an allowed statement, then
# send a statement of the same literal-insensitive shape that must be refused, through the
# real proxy (same session and another session of the same identity; simple Query,
# asyncpg's extended protocol, raw Parse frames). The truth is upstream: SHOW on the same
# session, pg_stat_activity, row counts, pg_proc.
import asyncio

import asyncpg
import psycopg
import pytest

import rawpg
from conftest import AGENT, AGENT_PASSWORD
from test_policy_guard_settings import guarded_proxy


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    p = guarded_proxy(pg, tmp_path_factory.mktemp("gcache"))
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def schema(pg):
    pg.execute("""
        DROP TABLE IF EXISTS gc_items; DROP FUNCTION IF EXISTS gc_f();
        CREATE TABLE gc_items (id int PRIMARY KEY, name text);
        INSERT INTO gc_items SELECT g, 'n' || g FROM generate_series(1, 5) g;
    """, dbname="appdb")


def count(pg):
    return pg.execute("SELECT count(*) FROM gc_items", dbname="appdb")[0][0]


def setting(conn, name):
    return conn.execute(f"SELECT current_setting('{name}')").fetchone()[0]


def app_name(pg, conn):
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    return pg.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                      (pid,))[0][0]


def _read_only_refuses_insert(conn):
    try:
        conn.execute("INSERT INTO gc_items VALUES (99, 'x')")
    except psycopg.errors.ReadOnlySqlTransaction:
        return True
    return False


# (allowed primer, refused statement of the same shape, truth check(pg, conn) -> bool);
# the attacking session first runs the primer's setting too, so that the truth is the same
# whichever session primed the cache
PAIRS = [
    ("SELECT set_config('application_name', 'bot1', false)",
     "SELECT set_config('application_name', 'pgguard:alice', false)",
     lambda pg, c: not app_name(pg, c).startswith("pgguard:alice")),
    ("SELECT set_config('statement_timeout', '5000', false)",
     "SELECT set_config('search_path', '5000', false)",
     lambda pg, c: setting(c, "search_path") == "public"),
    ("SELECT set_config('lock_timeout', '1000', false)",
     "SELECT set_config('row_security', 'off', false)",
     lambda pg, c: setting(c, "row_security") == "on"),
    ("UPDATE gc_items SET name = set_config('work_mem', '64MB', false) WHERE id = 1",
     "UPDATE gc_items SET name = set_config('session_replication_role', 'replica', false) "
     "WHERE id = 1",
     lambda pg, c: setting(c, "session_replication_role") == "origin" and pg.execute(
         "SELECT name FROM gc_items WHERE id = 1", dbname="appdb") == [("64MB",)]),
    ("SELECT set_config('default_transaction_read_only', 'on', false)",
     "SELECT set_config('default_transaction_read_only', 'off', false)",
     lambda pg, c: setting(c, "default_transaction_read_only") == "on" and
     _read_only_refuses_insert(c)),
    ("DO 'BEGIN PERFORM 1; END'", "DO 'BEGIN DELETE FROM gc_items; END'",
     lambda pg, c: count(pg) == 5),
    ("EXPLAIN (ANALYZE 0) DELETE FROM gc_items", "EXPLAIN (ANALYZE 1) DELETE FROM gc_items",
     lambda pg, c: count(pg) == 5),
    ("CREATE FUNCTION gc_f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
     "CREATE FUNCTION gc_f() RETURNS int LANGUAGE sql AS 'DELETE FROM gc_items RETURNING 1'",
     lambda pg, c: count(pg) == 5 and pg.execute(
         "SELECT prosrc FROM pg_proc WHERE proname = 'gc_f'", dbname="appdb") == [
         ("SELECT 1",)]),
]


def _ids(pairs):
    return [p[1][:50] for p in pairs]


@pytest.mark.parametrize("primer,attack,truth", PAIRS, ids=_ids(PAIRS))
@pytest.mark.parametrize("where", ["same-session", "other-session"])
def test_primed_cache_never_allows_a_refused_statement(pg, guarded, primer, attack, truth,
                                                       where):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as a:
        psycopg.ClientCursor(a).execute(primer)          # cached now (exact and shape)
        b = a if where == "same-session" else psycopg.connect(
            guarded.dsn(dbname="appdb"), autocommit=True)
        try:
            if b is not a and "read_only" in primer:
                b.execute("SET default_transaction_read_only = on")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                psycopg.ClientCursor(b).execute(attack)
            assert truth(pg, b)
        finally:
            if b is not a:
                b.close()


def test_where_constants_are_refused_whatever_was_cached(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("DELETE FROM gc_items WHERE id = 1")      # allowed: shape cached
        for sql in ("DELETE FROM gc_items WHERE 1 = 2", "DELETE FROM gc_items WHERE 1 = 1",
                    "DELETE FROM gc_items WHERE 'a' = 'a'",
                    "DELETE FROM gc_items WHERE 2 = 2"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                cur.execute(sql)
    assert count(pg) == 4


def test_asyncpg_extended_protocol_cannot_prime(pg, guarded):
    async def main():
        conn = await asyncpg.connect(guarded.dsn(dbname="appdb"))
        try:
            for primer, attack in (
                    ("SELECT set_config('work_mem', '5MB', false)",
                     "SELECT set_config('search_path', '5MB', false)"),
                    ("SELECT set_config('lock_timeout', '2s', false)",
                     "SELECT set_config('session_replication_role', 'replica', false)"),
                    ("SELECT set_config('application_name', 'bot-a', false)",
                     "SELECT set_config('application_name', 'pgguard:bob', false)"),
                    ("SELECT set_config('timezone', 'UTC', false)",
                     "SELECT set_config('row_security', 'off', false)"),
                    ("SELECT set_config('datestyle', 'ISO', false)",
                     "SELECT set_config('transform_null_equals', 'on', false)")):
                await conn.fetchval(primer)
                await conn.fetchval(primer)
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval(attack)
            assert await conn.fetchval("SHOW search_path") == "public"
            assert await conn.fetchval("SHOW session_replication_role") == "origin"
            assert await conn.fetchval("SHOW row_security") == "on"
            assert await conn.fetchval("SHOW transform_null_equals") == "off"
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            return pid
        finally:
            await conn.close()
    asyncio.run(main())


def test_raw_parse_frames_cannot_prime(pg, guarded):
    c = rawpg.RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        for primer, attack in (
                ("SELECT set_config('extra_float_digits', '2', false)",
                 "SELECT set_config('session_authorization', '2', false)"),
                ("SELECT set_config('work_mem', '6MB', false)",
                 "SELECT set_config('role', 'app', false)"),
                ("DO 'BEGIN PERFORM 2; END'", "DO 'BEGIN TRUNCATE gc_items; END'"),
                ("SELECT set_config('bytea_output', 'hex', false)",
                 "SELECT set_config('search_path', 'pg_temp', false)"),
                ("SELECT set_config('client_min_messages', 'notice', false)",
                 "SELECT set_config('standard_conforming_strings', 'off', false)")):
            for _ in range(2):
                c.send(rawpg.parse(primer), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
                assert not rawpg.errors(c.until_ready())
            c.send(rawpg.parse(attack), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
            errs = rawpg.errors(c.until_ready())
            assert errs and errs[0]["C"] == "42501", (attack, errs)
        msgs = c.run("SELECT current_setting('search_path'), "
                     "current_setting('standard_conforming_strings'), current_user")
        assert rawpg.rows(msgs) == [[b"public", b"on", b"app"]]
    finally:
        c.close()
    assert count(pg) == 5
