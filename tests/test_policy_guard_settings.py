# Issue 11, the in-session settings allow-list through the real proxy: SET, RESET,
# set_config (in SELECT, DO, CTE, PREPARE, EXPLAIN ANALYZE, UPDATE, extended protocol),
# BEGIN / SET TRANSACTION READ WRITE, application_name, judged by SHOW /
# current_setting on the same upstream session and by pg_stat_activity.
import asyncio

import asyncpg
import psycopg
import pytest

import rawpg
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, Proxy, run_psql

HUMAN_RULES = """
[[rules]]
name = "humans-no-truncate"
when = { kind = "human", statements = ["truncate"] }
action = "block"
"""


def guarded_proxy(pg, tmp, *, settings: str = "", extra: str = HUMAN_RULES) -> Proxy:
    """A started pgguard whose agents are under the default "guarded" policy (shared by
    the test_policy_guard_* files); ``settings`` extends [policy] settings."""
    p = Proxy(pg, tmp, extra=extra)
    text = p.config.read_text().replace('agents = "allow"', 'agents = "guarded"')
    if settings:
        text = text.replace('humans = "allow"\n', f'humans = "allow"\nsettings = {settings}\n')
    p.config.write_text(text)
    return p.start()


def refused(proxy, sql: str):
    """Send ``sql`` as a simple Query from the agent; it must be refused with 42501.
    Returns the error's diagnostics."""
    with psycopg.connect(proxy.dsn(dbname="appdb"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            psycopg.ClientCursor(conn).execute(sql)
    diag = e.value.diag
    assert diag.message_primary.startswith("pgguard: statement refused by rule")
    assert diag.message_detail and diag.message_hint
    return diag


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    p = guarded_proxy(pg, tmp_path_factory.mktemp("gsettings"))
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def schema(pg):
    pg.execute("""
        DROP TABLE IF EXISTS gs_items;
        CREATE TABLE gs_items (id int PRIMARY KEY, name text);
        INSERT INTO gs_items VALUES (1, 'one'), (2, 'two');
    """, dbname="appdb")


def agent(proxy, **kw):
    return psycopg.connect(proxy.dsn(dbname="appdb"), autocommit=True, **kw)


def human(proxy):
    return psycopg.connect(proxy.dsn(user=HUMAN, password=HUMAN_PASSWORD, dbname="appdb"),
                           autocommit=True)


def refused_by_settings(conn, sql, params=None):
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        conn.execute(sql, params)
    diag = e.value.diag
    assert diag.sqlstate == "42501"
    assert 'rule "settings"' in diag.message_primary, diag.message_primary
    assert diag.message_detail and diag.message_hint
    return diag


def show(conn, name):
    return conn.execute(f"SELECT current_setting('{name}')").fetchone()[0]


# --------------------------------------------------------------------------- SET / RESET

NOT_ALLOWED_SET = [
    ("search_path", "SET search_path = pg_temp, public"),
    ("search_path", "SET SCHEMA 'information_schema'"),
    ("session_replication_role", "SET session_replication_role = replica"),
    ("row_security", "SET row_security = off"),
    ("standard_conforming_strings", "SET standard_conforming_strings = off"),
    ("client_encoding", "SET client_encoding = 'SJIS'"),
    ("client_encoding", "SET NAMES 'BIG5'"),
    ("transform_null_equals", "SET transform_null_equals = on"),
    ("backslash_quote", "SET backslash_quote = on"),
    ("search_path", "SET LOCAL search_path = pg_temp"),
    ("search_path", "RESET search_path"),
]


@pytest.mark.parametrize("name,sql", NOT_ALLOWED_SET)
@pytest.mark.parametrize("who", ["agent", "human"])
def test_set_outside_the_allow_list_is_refused(guarded, name, sql, who):
    with (agent(guarded) if who == "agent" else human(guarded)) as conn:
        before = show(conn, name)
        diag = refused_by_settings(conn, sql)
        assert name in diag.message_primary
        # the truth: the upstream session still has the value it had
        assert show(conn, name) == before
        assert conn.execute("SELECT count(*) FROM gs_items").fetchone() == (2,)


def test_psql_set_is_refused_and_session_keeps_its_settings(guarded, psql_bin):
    r = run_psql(psql_bin, guarded.dsn(dbname="appdb"), "-v", "ON_ERROR_STOP=0", "-At",
                 input="SET session_replication_role = replica;\n"
                       "SET search_path = pg_temp;\n"
                       "SELECT set_config('row_security', 'off', false);\n"
                       "SELECT current_setting('session_replication_role'), "
                       "current_setting('search_path'), current_setting('row_security');\n")
    assert r.stderr.count('refused by rule "settings"') == 3, r.stderr
    assert r.stdout.strip().splitlines()[-1] == 'origin|public|on'


# --------------------------------------------------------------------------- set_config

SET_CONFIG_VARIANTS = [
    "SELECT set_config('search_path', 'pg_temp', false)",
    "select pg_catalog.set_config('SEARCH_PATH', 'pg_temp', false)",
    "SELECT set_config(n, 'pg_temp', false) FROM (VALUES ('search_path')) v(n)",
    "DO $$ BEGIN PERFORM set_config('search_path', 'pg_temp', false); END $$",
    "WITH s AS (SELECT set_config('search_path', 'pg_temp', false)) SELECT * FROM s",
    "EXPLAIN ANALYZE SELECT set_config('search_path', 'pg_temp', false)",
    "UPDATE gs_items SET name = set_config('search_path', 'pg_temp', false) WHERE id = 1",
    "SELECT 1 WHERE set_config('search_path', 'pg_temp', false) IS NOT NULL",
    "DO $$ BEGIN SET search_path = pg_temp; END $$",
    "DO $$ BEGIN EXECUTE 'SET search_path = pg_temp'; END $$",
]


@pytest.mark.parametrize("sql", SET_CONFIG_VARIANTS)
def test_set_config_anywhere_is_refused(pg, guarded, sql):
    with agent(guarded) as conn:
        before = show(conn, "search_path")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql)
        assert show(conn, "search_path") == before
    assert pg.execute("SELECT name FROM gs_items WHERE id = 1", dbname="appdb") == [("one",)]


def test_set_config_through_prepare_execute_is_refused(guarded):
    with agent(guarded) as conn:
        cur = psycopg.ClientCursor(conn)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("PREPARE sp AS SELECT set_config('row_security', 'off', false)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("EXECUTE sp")          # never prepared: opaque
        assert show(conn, "row_security") == "on"


def test_asyncpg_extended_protocol_set_config(guarded):
    async def main():
        conn = await asyncpg.connect(guarded.dsn(dbname="appdb"))
        try:
            before = await conn.fetchval("SHOW search_path")
            # a parameter as the name: pgguard cannot read it, so it is refused
            for sql, args in (("SELECT set_config($1, $2, false)", ("search_path", "x")),
                              ("SELECT set_config('search_path', $1, false)", ("x",)),
                              ("SELECT set_config($1::text, 'x', false)", ("role",)),
                              ("SELECT set_config('session_replication_role', 'replica', "
                               "false)", ()),
                              ("SELECT set_config('application_name', $1, false)",
                               ("pgguard:alice",))):
                with pytest.raises(asyncpg.InsufficientPrivilegeError) as e:
                    await conn.fetchval(sql, *args)
                assert 'rule "settings"' in str(e.value)
            assert await conn.fetchval("SHOW search_path") == before
            assert await conn.fetchval("SHOW session_replication_role") == "origin"
            # allowed settings pass through the extended protocol too
            assert await conn.fetchval("SELECT set_config('work_mem', '7MB', false)") == "7MB"
            assert await conn.fetchval("SHOW work_mem") == "7MB"
        finally:
            await conn.close()
    asyncio.run(main())


def test_raw_parse_bind_execute_set_config(guarded):
    c = rawpg.RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        for sql in ("SELECT set_config('row_security', 'off', false)",
                    "SELECT set_config('search_path', 'pg_temp', false)",
                    "SELECT set_config('session_authorization', 'app', false)",
                    "SELECT set_config('default_transaction_read_only', 'off', false)",
                    "SELECT set_config('standard_conforming_strings', 'off', false)"):
            c.send(rawpg.parse(sql), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
            msgs = c.until_ready()
            errs = rawpg.errors(msgs)
            assert errs and errs[0]["C"] == "42501" and "settings" in errs[0]["M"], msgs
        msgs = c.run("SELECT current_setting('row_security'), current_setting('search_path'), "
                     "current_setting('standard_conforming_strings')")
        assert rawpg.rows(msgs) == [[b"on", b"public", b"on"]]
    finally:
        c.close()


# --------------------------------------------------------------------------- read-only mode

READ_WRITE = [
    "SET default_transaction_read_only = off",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SET default_transaction_read_only TO DEFAULT",
    "RESET default_transaction_read_only",
]


@pytest.mark.parametrize("sql", READ_WRITE)
def test_default_read_only_cannot_be_turned_off(guarded, sql):
    # a session whose default is read-only (here: set by the client itself) stays so
    with agent(guarded) as conn:
        conn.execute("SET default_transaction_read_only = on")
        refused_by_settings(conn, sql)
        assert show(conn, "default_transaction_read_only") == "on"
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO gs_items VALUES (3, 'three')")


@pytest.mark.parametrize("sql", ["BEGIN READ WRITE", "START TRANSACTION READ WRITE",
                                 "BEGIN ISOLATION LEVEL SERIALIZABLE, READ WRITE",
                                 "begin transaction read write, deferrable",
                                 "START TRANSACTION READ ONLY, READ WRITE"])
def test_begin_read_write_is_refused(pg, guarded, sql):
    with agent(guarded) as conn:
        conn.execute("SET default_transaction_read_only = on")
        refused_by_settings(conn, sql)
        # no transaction was opened upstream: BEGIN was never run
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM gs_items WHERE id = 1")
    assert pg.execute("SELECT count(*) FROM gs_items", dbname="appdb") == [(2,)]


def test_set_transaction_read_write_inside_a_transaction(pg, guarded):
    with agent(guarded) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("SET default_transaction_read_only = on")
        cur.execute("BEGIN")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("SET TRANSACTION READ WRITE")
        # the refusal failed the transaction, as an error on Postgres would
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        cur.execute("ROLLBACK")
        cur.execute("BEGIN")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("SELECT set_config('transaction_read_only', 'off', true)")
        cur.execute("ROLLBACK")
        assert show(conn, "transaction_read_only") == "on"


# --------------------------------------------------------------------------- application_name

PGGUARD_NAMES = [
    "SET application_name = 'pgguard:alice psql'",
    "SET application_name TO 'PGGUARD:alice'",
    "SET application_name = '  pgguard:alice'",
    "SELECT set_config('application_name', 'pgguard:alice', false)",
    "SELECT set_config('application_name', current_user, false)",
    "SET application_name TO DEFAULT",
    "DO $$ BEGIN PERFORM set_config('application_name', 'pgguard:alice', false); END $$",
]


@pytest.mark.parametrize("sql", PGGUARD_NAMES)
def test_application_name_cannot_impersonate_an_identity(pg, guarded, sql):
    with agent(guarded, application_name="bot-app") as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        refused_by_settings(conn, sql)
        app = pg.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                         (pid,))[0][0]
        assert not app.lower().strip().startswith("pgguard:alice"), app
        assert app.startswith(f"pgguard:{AGENT}")


def test_plain_application_name_is_allowed(pg, guarded):
    with agent(guarded) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.execute("SET application_name = 'nightly-report'")
        assert pg.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                          (pid,)) == [("nightly-report",)]


# --------------------------------------------------------------------------- legitimate

ALLOWED = [
    ("SET statement_timeout = '5s'", "statement_timeout", "5s"),
    ("SET TIME ZONE 'Europe/Paris'", "TimeZone", "Europe/Paris"),
    ("SET LOCAL work_mem = '8MB'", "work_mem", "4MB"),       # outside a txn: no effect
    ("SET work_mem = '8MB'", "work_mem", "8MB"),
    ("SET DateStyle = ISO, DMY", "DateStyle", "ISO, DMY"),
    ("SET enable_seqscan = off", "enable_seqscan", "off"),
    ("SET extra_float_digits = 3", "extra_float_digits", "3"),
    ("SELECT set_config('lock_timeout', '2s', false)", "lock_timeout", "2s"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
     "default_transaction_isolation", "repeatable read"),
    ("SET default_transaction_read_only = on", "default_transaction_read_only", "on"),
    ("SET standard_conforming_strings = on", "standard_conforming_strings", "on"),
    ("SET client_encoding = 'UTF8'", "client_encoding", "UTF8"),
]


@pytest.mark.parametrize("sql,name,value", ALLOWED)
def test_harmless_settings_still_change(guarded, sql, name, value):
    with agent(guarded) as conn:
        conn.execute(sql)
        assert show(conn, name) == value


def test_reset_all_and_transaction_modes_pass(guarded):
    with agent(guarded) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("SET work_mem = '9MB'")
        cur.execute("RESET ALL")
        assert show(conn, "work_mem") == "4MB"
        cur.execute("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE")
        assert show(conn, "transaction_isolation") == "serializable"
        assert show(conn, "transaction_read_only") == "on"
        cur.execute("COMMIT")
        cur.execute("BEGIN")
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur.execute("SET TRANSACTION READ ONLY")
        assert show(conn, "transaction_isolation") == "repeatable read"
        cur.execute("COMMIT")


def test_config_extends_the_allow_list(pg, tmp_path):
    p = guarded_proxy(pg, tmp_path, settings='["search_path", "myapp.*"]')
    try:
        with agent(p) as conn:
            conn.execute("SET search_path = public, pg_temp")
            assert show(conn, "search_path") == "public, pg_temp"
            conn.execute("SET myapp.tenant = '42'")
            assert show(conn, "myapp.tenant") == "42"
            # what the config cannot open stays closed
            refused_by_settings(conn, "SET row_security = off")
            refused_by_settings(conn, "SET other.key = '1'")
            assert show(conn, "row_security") == "on"
    finally:
        p.stop()


def test_config_refuses_never_allowed_settings(tmp_path):
    import subprocess
    import sys
    for bad in ('["role"]', '["session_*"]', '["*"]', '["client_encoding"]',
                '["search_path", "shared_preload_libraries"]'):
        cfg = tmp_path / "bad.toml"
        cfg.write_text(f"[policy]\nsettings = {bad}\n")
        r = subprocess.run([sys.executable, "-m", "pgguard", "check", "-c", str(cfg)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        assert "policy.settings[" in r.stderr and "never" in r.stderr, r.stderr


# Red team, round 17 (helper 82): a function's SET clause was not judged by the settings
# rules (only privilege and escape settings were flagged): CREATE FUNCTION ... SET
# application_name = 'pgguard:alice psql' made the agent's backend show as alice's while
# it ran; SET row_security = off, transform_null_equals = on (never allowed) were stored
# in pg_proc. Judged by pg_proc upstream.
FUNCTION_SETS = [
    "CREATE FUNCTION {f}() RETURNS int LANGUAGE sql SET application_name = "
    "'pgguard:alice psql' AS 'SELECT 1'",
    "CREATE FUNCTION {f}() RETURNS int LANGUAGE sql SET row_security = off AS 'SELECT 1'",
    "CREATE FUNCTION {f}() RETURNS bigint LANGUAGE sql SET transform_null_equals = on "
    "AS 'SELECT count(*) FROM gs_items WHERE name = NULL'",
    "CREATE FUNCTION {f}() RETURNS int LANGUAGE sql SET check_function_bodies = off "
    "AS 'SELECT 1'",
    "CREATE PROCEDURE {f}() LANGUAGE sql SET application_name = 'pgguard:alice' "
    "AS 'SELECT 1'",
    "CREATE FUNCTION {f}() RETURNS int LANGUAGE plpgsql SET session_preload_libraries = "
    "'x' AS 'BEGIN RETURN 1; END'",
]


@pytest.mark.parametrize("i", range(len(FUNCTION_SETS)))
def test_a_functions_set_clause_is_judged_as_a_setting(pg, guarded, i):
    name = f"gs_fset{i}"
    pg.execute(f"DROP ROUTINE IF EXISTS {name}", dbname="appdb")
    diag = refused(guarded, FUNCTION_SETS[i].format(f=name))
    assert "setting" in (diag.message_primary + diag.message_detail).lower()
    assert pg.execute(f"SELECT count(*) FROM pg_proc WHERE proname = '{name}'",
                      dbname="appdb")[0][0] == 0


# (helper 82) application_name values that pass for another identity's tag in
# pg_stat_activity, whatever the separator
LOOKALIKE_NAMES = ["pgguard alice psql", "pgguard-alice psql", "pgguard_alice", "PGGUARD:alice",
                   "pgguard\uff1aalice", "pgguard;alice psql"]


@pytest.mark.parametrize("value", LOOKALIKE_NAMES)
def test_an_application_name_like_another_identitys_tag_is_refused(pg, guarded, value):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        for sql in (f"SET application_name = '{value}'",
                    f"SELECT set_config('application_name', '{value}', false)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                psycopg.ClientCursor(conn).execute(sql)
        shown = pg.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                           (pid,))[0][0]
    assert shown.startswith("pgguard:ci-agent"), shown
