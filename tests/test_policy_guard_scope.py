# Issue 11: read-only token sessions cannot leave read-only mode, and pinned-role sessions
# cannot drop their role (SET/RESET ROLE, set_config, dynamic SQL in DO, procedures),
# even for humans whose default is allow. The truth is the upstream session itself:
# current_user, SHOW, a write that Postgres refuses, the row counts and sequences.
import asyncio
import json
import os
import subprocess
import sys

import asyncpg
import psycopg
import pytest

import rawpg
from conftest import HUMAN_PASSWORD

SECRET = "test-token-secret-0123456789abcdef-XYZ"
EXTRA = """
[identities.bot]
kind = "agent"
groups = ["agents"]

[identities.pinned]
kind = "human"
password_env = "TEST_HUMAN_PASSWORD"
role = "g_readers"

[auth]
state_dir = "{state}"
"""


@pytest.fixture(scope="module")
def sproxy(pg, tmp_path_factory):
    from conftest import Proxy
    pg.execute("""
        DO $$BEGIN
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'g_readers') THEN
            CREATE ROLE g_readers NOLOGIN; GRANT g_readers TO app; END IF;
        END$$""")
    tmp = tmp_path_factory.mktemp("gscope")
    p = Proxy(pg, tmp, extra=EXTRA.format(state=tmp / "state"),
              env={"PGGUARD_TOKEN_SECRET": SECRET}).start()
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def schema(pg):
    pg.execute("""
        DROP TABLE IF EXISTS gr_items; DROP SEQUENCE IF EXISTS gr_seq;
        DROP PROCEDURE IF EXISTS gr_become(text);
        CREATE TABLE gr_items (id int PRIMARY KEY, name text);
        INSERT INTO gr_items VALUES (1, 'one'), (2, 'two');
        CREATE SEQUENCE gr_seq;
        GRANT SELECT ON gr_items TO g_readers;
        GRANT USAGE ON SEQUENCE gr_seq TO g_readers;
        CREATE PROCEDURE gr_become(r text) LANGUAGE plpgsql
            AS $$ BEGIN EXECUTE 'SET ROLE ' || r; END $$;
    """, dbname="appdb")


def readonly_dsn(proxy):
    r = subprocess.run([sys.executable, "-m", "pgguard", "token", "issue", "-c",
                        str(proxy.config), "--json", "--identity", "bot", "--scope",
                        "readonly", "--database", "appdb"],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PGGUARD_TOKEN_SECRET=SECRET))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["dsn"]


def seq_value(pg):
    return pg.execute("SELECT last_value, is_called FROM gr_seq", dbname="appdb")[0]


# --------------------------------------------------------------------------- read-only

LEAVE_READ_ONLY = [
    "SET default_transaction_read_only = off",
    "SET default_transaction_read_only TO DEFAULT",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT set_config('transaction_read_only', 'off', false)",
    "BEGIN READ WRITE",
    "START TRANSACTION ISOLATION LEVEL READ COMMITTED, READ WRITE",
    "DO $$ BEGIN PERFORM set_config('default_transaction_read_only', 'off', false); END $$",
    "WITH x AS (SELECT set_config('default_transaction_read_only', 'f', false)) "
    "SELECT * FROM x",
    "SELECT set_config(n, 'off', false) FROM (VALUES ('default_transaction_read_only')) v(n)",
]


@pytest.mark.parametrize("sql", LEAVE_READ_ONLY)
def test_readonly_token_cannot_leave_read_only_mode(pg, sproxy, sql):
    before = seq_value(pg)
    with psycopg.connect(readonly_dsn(sproxy), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            cur.execute(sql)
        assert e.value.diag.message_primary.startswith("pgguard: statement refused by rule")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert cur.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        # the session is still read-only upstream (what the scope does not refuse,
        # Postgres does), and a built-in that moves a sequence is refused by the scope
        assert cur.execute("SHOW transaction_read_only").fetchone() == ("on",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e2:
            cur.execute("SELECT nextval('gr_seq')")
        assert 'rule "readonly-scope"' in e2.value.diag.message_primary
        # setval is refused by the policy first (it moves a sequence: destructive)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("SELECT setval('gr_seq', 100)")
    assert seq_value(pg) == before
    assert pg.execute("SELECT count(*) FROM gr_items", dbname="appdb") == [(2,)]


def test_readonly_token_asyncpg_and_raw(pg, sproxy):
    dsn = readonly_dsn(sproxy)
    before = seq_value(pg)

    async def main():
        conn = await asyncpg.connect(dsn)
        try:
            for sql in ("SELECT set_config('default_transaction_read_only', $1, false)",
                        "SELECT set_config($1, 'off', false)"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval(sql, "off" if "$1, false" in sql
                                        else "default_transaction_read_only")
            assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval("SELECT nextval('gr_seq')")
        finally:
            await conn.close()
    asyncio.run(main())

    user, token = dsn.split("://", 1)[1].split("@", 1)[0].split(":", 1)
    c = rawpg.RawClient.connect(sproxy.port, user, token, database="appdb")
    try:
        # a pipeline: the refused Parse fails the rest until Sync, as Postgres would
        c.send(rawpg.parse("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE"),
               rawpg.bind(), rawpg.execute(), rawpg.parse("SELECT nextval('gr_seq')"),
               rawpg.bind(), rawpg.execute(), rawpg.SYNC)
        msgs = c.until_ready()
        assert [e["C"] for e in rawpg.errors(msgs)] == ["42501"]
        msgs = c.run("SHOW default_transaction_read_only")
        assert rawpg.rows(msgs) == [[b"on"]]
    finally:
        c.close()
    assert seq_value(pg) == before


def test_readonly_token_reads_and_harmless_settings_still_work(sproxy):
    with psycopg.connect(readonly_dsn(sproxy), autocommit=True) as conn:
        conn.execute("SET statement_timeout = '10s'")
        conn.execute("SET default_transaction_read_only = on")
        conn.execute("RESET ALL")
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        assert conn.execute("SELECT count(*) FROM gr_items").fetchone() == (2,)
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            assert conn.execute("SELECT name FROM gr_items WHERE id = 1").fetchone() == ("one",)


# --------------------------------------------------------------------------- pinned role

ROLE_CHANGES = [
    "RESET ROLE",
    "SET ROLE app",
    "SET LOCAL ROLE app",
    "SET ROLE NONE",
    "SET SESSION AUTHORIZATION app",
    "RESET SESSION AUTHORIZATION",
    "SELECT set_config('role', 'app', false)",
    "SELECT set_config('ROLE', 'app', true)",
    "SELECT set_config(r, 'app', false) FROM (VALUES ('role')) v(r)",
    "DO $$ BEGIN EXECUTE 'SET ROLE ' || 'app'; END $$",
    "DO $$ BEGIN EXECUTE format('RESET %s', 'ROLE'); END $$",
    "DO $$ BEGIN PERFORM set_config('role', 'app', false); END $$",
    "DO $$ BEGIN SET ROLE app; END $$",
    "CALL gr_become('app')",
    "DISCARD ALL",
    "WITH x AS (SELECT set_config('role', 'app', false)) SELECT * FROM x",
]


@pytest.mark.parametrize("sql", ROLE_CHANGES)
def test_pinned_role_cannot_be_dropped(pg, sproxy, sql):
    # a human whose policy default is allow: the pin holds all the same
    with psycopg.connect(sproxy.dsn(user="pinned", password=HUMAN_PASSWORD, dbname="appdb"),
                         autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        assert cur.execute("SELECT current_user").fetchone() == ("g_readers",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            cur.execute(sql)
        assert 'rule "pinned-role"' in e.value.diag.message_primary
        assert cur.execute("SELECT current_user, session_user").fetchone() == (
            "g_readers", "app")
        # g_readers may not write: the role is really still in force upstream
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            cur.execute("DELETE FROM gr_items WHERE id = 1")
        assert "permission denied" in e.value.diag.message_primary
    assert pg.execute("SELECT count(*) FROM gr_items", dbname="appdb") == [(2,)]


def test_pinned_role_asyncpg_and_raw(pg, sproxy):
    dsn = sproxy.dsn(user="pinned", password=HUMAN_PASSWORD, dbname="appdb")

    async def main():
        conn = await asyncpg.connect(dsn)
        try:
            for sql, args in (("SELECT set_config($1, 'app', false)", ("role",)),
                              ("SELECT set_config('role', $1, false)", ("app",)),
                              ("SELECT set_config('session_authorization', 'app', false)",
                               ())):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval(sql, *args)
            assert await conn.fetchval("SELECT current_user") == "g_readers"
        finally:
            await conn.close()
    asyncio.run(main())

    c = rawpg.RawClient.connect(sproxy.port, "pinned", HUMAN_PASSWORD, database="appdb")
    try:
        c.send(rawpg.parse("SELECT set_config('role', 'app', false)"), rawpg.bind(),
               rawpg.execute(), rawpg.SYNC)
        assert [e["C"] for e in rawpg.errors(c.until_ready())] == ["42501"]
        msgs = c.run("SELECT current_user")
        assert rawpg.rows(msgs) == [[b"g_readers"]]
    finally:
        c.close()


def test_pinned_role_keeps_ordinary_work(sproxy):
    with psycopg.connect(sproxy.dsn(user="pinned", password=HUMAN_PASSWORD, dbname="appdb"),
                         autocommit=True) as conn:
        conn.execute("SET work_mem = '8MB'")
        conn.execute("RESET ALL")              # role is GUC_NO_RESET_ALL: the pin stays
        assert conn.execute("SELECT current_user").fetchone() == ("g_readers",)
        assert conn.execute("SELECT count(*) FROM gr_items").fetchone() == (2,)
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")


ADVISORY = ["pg_advisory_lock", "pg_advisory_lock_shared", "pg_advisory_xact_lock",
            "pg_advisory_xact_lock_shared", "pg_try_advisory_lock",
            "pg_try_advisory_lock_shared", "pg_try_advisory_xact_lock",
            "pg_try_advisory_xact_lock_shared"]


@pytest.mark.parametrize("fn", ADVISORY)
def test_readonly_token_takes_no_advisory_lock(pg, sproxy, fn):
    # round 22 (helper 118): a read-only transaction may take advisory locks, and six of
    # the eight functions went through: a DBA's session then waited on the agent's lock.
    # Judged by pg_locks while the agent's session (and its transaction) is open.
    dsn = readonly_dsn(sproxy)
    with psycopg.connect(dsn) as conn:                  # a transaction stays open
        for args in ("(7101)", "(71, 2)", "($1)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                if args == "($1)":
                    conn.execute(f"SELECT {fn}(%s::bigint)", (7102,), prepare=True)
                else:
                    conn.execute(f"SELECT {fn}{args}")
            assert 'rule "readonly-scope"' in e.value.diag.message_primary
            conn.rollback()
        held = pg.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                          dbname="appdb")
        assert held == [(0,)], held

    async def main():
        c = await asyncpg.connect(dsn)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await c.fetchval(f"SELECT {fn}($1::bigint)", 7103)
            assert pg.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                              dbname="appdb") == [(0,)]
        finally:
            await c.close()
    asyncio.run(main())


@pytest.mark.parametrize("fn", ["brin_summarize_range('gr_brin', 0)",
                                "brin_summarize_new_values('gr_brin')",
                                "brin_desummarize_range('gr_brin', 0)",
                                "gin_clean_pending_list('gr_brin')"])
def test_readonly_token_runs_no_index_maintenance(pg, sproxy, fn):
    # round 22 (helper 119): a read-only transaction may still run these (and a BRIN
    # index's ranges changed under the DBA); the scope refuses them
    pg.execute("CREATE INDEX IF NOT EXISTS gr_brin ON gr_items USING brin (id)",
               dbname="appdb")
    with psycopg.connect(readonly_dsn(sproxy), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(f"SELECT {fn}")
        assert 'rule "readonly-scope"' in e.value.diag.message_primary
        assert conn.execute("SELECT 1").fetchone() == (1,)
