# Pinned settings: pgguard's parser reads literals with standard_conforming_strings=on and
# client_encoding=UTF8, and a read-only token's session keeps default_transaction_read_only
# on. A red-team pass changed them through an aggregate whose state function is
# set_config (`SELECT agg('off', false)` reads as a plain SELECT), then sent text that
# pgguard and Postgres read differently (a DROP TABLE hidden in a literal).
#
# Two lines of defence, each judged by the upstream (its catalog, its rows, whether the
# backend lives on), never by pgguard's reply alone:
# 1. an agent may not create a function-bearing object (aggregate, operator, type) that
#    names set_config or a writing function: psycopg simple and prepared, asyncpg, psql,
#    a raw pipeline;
# 2. whatever route changes a pinned setting (here: an aggregate a DBA created directly
#    upstream), Postgres reports it in a ParameterStatus, and pgguard ends the session
#    there with a FATAL that names the setting: with the audit on and off, with masks on
#    (the masking path reads the reports itself), and for a read-only token.
import asyncio
import json
import os
import subprocess
import sys

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD
from guarded import guarded_proxy
from rawpg import SYNC, RawClient, bind, errors, execute, parse, query, rows

DB = "appdb"
SECRET = "test-token-secret-pinned-0123456789abcdef"


@pytest.fixture(autouse=True)
def schema(pg):
    pg.execute("""
        DROP AGGREGATE IF EXISTS ps_cfg(text, bool); DROP AGGREGATE IF EXISTS ps_cfg2(text, bool);
        DROP AGGREGATE IF EXISTS ps_next(regclass);
        DROP FUNCTION IF EXISTS ps_cfg_fn, ps_cfg2_fn;
        DROP OPERATOR IF EXISTS ===(text, text);
        DROP TABLE IF EXISTS ps_items; DROP SEQUENCE IF EXISTS ps_seq;
        CREATE TABLE ps_items (id int PRIMARY KEY, name text);
        INSERT INTO ps_items VALUES (1, 'one'), (2, 'two');
        CREATE SEQUENCE ps_seq;
        GRANT SELECT ON ps_items TO PUBLIC;
    """, dbname=DB)


def objects(pg):
    """The aggregates and operators of this test, read upstream."""
    return pg.execute("SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.proname "
                      "LIKE 'ps\\_%' UNION ALL SELECT oprname FROM pg_operator "
                      "WHERE oprname = '===' ORDER BY 1", dbname=DB)


# ----------------------------------------------------------------- 1. the classifier

NAMING = [
    "CREATE AGGREGATE ps_cfg(text, bool) (sfunc = set_config, stype = text, "
    "initcond = 'standard_conforming_strings')",
    "CREATE AGGREGATE ps_cfg(text, bool) (SFUNC = pg_catalog.set_config, STYPE = text, "
    "INITCOND = 'default_transaction_read_only')",
    'CREATE AGGREGATE ps_cfg(text, bool) (sfunc = "set_config", stype = text, '
    "initcond = 'client_encoding')",
    "CREATE OR REPLACE AGGREGATE ps_cfg2(text, bool) (sfunc = set_config, stype = text, "
    "initcond = 'standard_conforming_strings')",
    "CREATE AGGREGATE ps_next(regclass) (sfunc = nextval, stype = int8)",
    "CREATE OPERATOR === (leftarg = text, rightarg = text, function = set_config)",
    "DO $$ BEGIN CREATE AGGREGATE ps_cfg(text, bool) (sfunc = set_config, stype = text, "
    "initcond = 'standard_conforming_strings'); END $$",
]


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("pinned")) as p:
        yield p


def _refused(msg: str) -> None:
    assert msg.startswith("pgguard: statement refused by rule"), msg


@pytest.mark.parametrize("sql", NAMING)
def test_objects_naming_set_config_refused_psycopg(pg, guarded, sql):
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        for prepare in (False, True):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                if prepare:
                    c.execute(sql, prepare=True)
                else:
                    psycopg.ClientCursor(c).execute(sql)
            _refused(e.value.diag.message_primary)
            assert e.value.diag.message_hint
        assert c.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
    assert objects(pg) == []


@pytest.mark.parametrize("sql", NAMING)
def test_objects_naming_set_config_refused_asyncpg(pg, guarded, sql):
    async def main():
        conn = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    asyncio.run(main())
    assert objects(pg) == []


def test_objects_naming_set_config_refused_raw_pipeline(pg, guarded):
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        c.send(*(parse(s) + bind() + execute() + SYNC for s in NAMING))
        errs = errors(c.until_ready(len(NAMING)))
        assert [e["C"] for e in errs] == ["42501"] * len(NAMING), errs
    finally:
        c.close()
    assert objects(pg) == []


def test_the_whole_attack_in_psql(pg, guarded, psql_bin):
    """The red team's script: the aggregate, its call, then a DROP hidden in a literal
    that only a server with standard_conforming_strings=off reads as a statement."""
    script = ("CREATE AGGREGATE ps_cfg(text, bool) (sfunc = set_config, stype = text, "
              "initcond = 'standard_conforming_strings');\n"
              "SELECT ps_cfg('off', false);\n"
              "SELECT 'a\\' , ' ; DROP TABLE ps_items CASCADE; -- ';\n"
              "SHOW standard_conforming_strings;\n")
    r = subprocess.run([psql_bin, "-X", "-v", "ON_ERROR_STOP=0", guarded.dsn(dbname=DB)],
                       input=script, capture_output=True, text=True, timeout=60)
    assert 'refused by rule' in r.stderr, r.stderr
    assert objects(pg) == []
    assert pg.execute("SELECT count(*) FROM ps_items", dbname=DB) == [(2,)]




def test_aggregates_over_harmless_functions_still_pass(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        c.execute("CREATE AGGREGATE ps_cfg(text) (sfunc = textcat, stype = text, "
                  "initcond = '')")
        assert c.execute("SELECT ps_cfg(name ORDER BY id) FROM ps_items").fetchone() == \
            ("onetwo",)
    assert objects(pg) == [("ps_cfg(text)",)]
    pg.execute("DROP AGGREGATE ps_cfg(text)", dbname=DB)


# ----------------------------------------------------------------- 2. the watch

def _dba_aggregate(pg, name="ps_cfg", setting="standard_conforming_strings"):
    # created directly upstream, where pgguard judges nothing: an aggregate over
    # set_config (judged at the call by its support functions: refused) and a function
    # in a language pgguard does not read (C's set_config itself, under another name:
    # the route the watch is for)
    pg.execute(f"CREATE AGGREGATE {name}(text, bool) (sfunc = set_config, stype = text, "
               f"initcond = '{setting}'); "
               f"CREATE FUNCTION {name}_fn(text, text, bool) "
               "RETURNS text LANGUAGE internal AS 'set_config_by_name'", dbname=DB)


def _backends(pg, app):
    return pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                      (app,), dbname=DB)[0][0]


def _wait_gone(pg, app):
    import time
    for _ in range(100):
        if _backends(pg, app) == 0:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module", params=["audit", "noaudit", "masks"])
def watched(request, pg, tmp_path_factory):
    kw = {}
    extra = ""
    if request.param == "noaudit":
        kw["audit_extra"] = "enabled = false"
    if request.param == "masks":
        extra = ('[[masks]]\ncolumn = "public.ps_items.name"\nstrategy = "partial"\n'
                 'keep = 1\n')
    with guarded_proxy(pg, tmp_path_factory.mktemp("watch-" + request.param), extra=extra,
                       **kw) as p:
        yield p


def test_psycopg_session_ends_when_the_setting_moves(pg, watched):
    _dba_aggregate(pg)
    app = "ps-psycopg"
    c = psycopg.connect(watched.dsn(dbname=DB, application_name=app), autocommit=True)
    try:
        with pytest.raises(psycopg.Error) as e:
            c.execute("SELECT ps_cfg_fn('standard_conforming_strings', 'off', false)")
            c.execute("SELECT 'a\\' , ' ; DROP TABLE ps_items CASCADE; -- '")
        assert "standard_conforming_strings" in str(e.value), e.value
        assert 'rule "settings"' in str(e.value)
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
    finally:
        c.close()
    assert _wait_gone(pg, app)
    assert pg.execute("SELECT count(*) FROM ps_items", dbname=DB) == [(2,)]


def test_asyncpg_session_ends_when_the_setting_moves(pg, watched):
    _dba_aggregate(pg)

    async def main():
        conn = await asyncpg.connect(watched.dsn(dbname=DB, application_name="ps-asyncpg"))
        try:
            with pytest.raises((asyncpg.PostgresError, ConnectionError,
                                asyncpg.InterfaceError)) as e:
                await conn.fetchval("SELECT ps_cfg_fn('standard_conforming_strings', 'off', false)")
                await conn.execute("SELECT 'a\\' , ' ; DROP TABLE ps_items CASCADE; -- '")
            assert "standard_conforming_strings" in str(e.value) or conn.is_closed()
        finally:
            await conn.close()
    asyncio.run(main())
    assert _wait_gone(pg, "ps-asyncpg")
    assert pg.execute("SELECT count(*) FROM ps_items", dbname=DB) == [(2,)]


def test_raw_client_reads_the_fatal_then_end_of_stream(pg, watched):
    _dba_aggregate(pg)
    c = RawClient.connect(watched.port, AGENT, AGENT_PASSWORD, database=DB,
                          application_name="ps-raw")
    try:
        c.send(query("SELECT ps_cfg_fn('standard_conforming_strings', 'off', false)"))
        msgs = c.read_all()
        errs = errors(msgs)
        assert errs and errs[-1]["S"] == "FATAL", msgs
        assert "standard_conforming_strings" in errs[-1]["M"]
        assert 'rule "settings"' in errs[-1]["M"]
    finally:
        c.close()
    assert _wait_gone(pg, "ps-raw")


def test_psql_session_ends(pg, watched, psql_bin):
    _dba_aggregate(pg)
    script = ("SELECT ps_cfg_fn('standard_conforming_strings', 'off', false);\n"
              "SELECT 'a\\' , ' ; DROP TABLE ps_items CASCADE; -- ';\n")
    r = subprocess.run([psql_bin, "-X", watched.dsn(dbname=DB)], input=script,
                       capture_output=True, text=True, timeout=60)
    assert "standard_conforming_strings" in r.stderr, r.stderr
    assert pg.execute("SELECT count(*) FROM ps_items", dbname=DB) == [(2,)]


def test_client_encoding_route_ends_the_session(pg, watched):
    _dba_aggregate(pg)
    c = RawClient.connect(watched.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        c.send(query("SELECT ps_cfg_fn('client_encoding', 'SJIS', false)"))
        errs = errors(c.read_all())
        assert errs and errs[-1]["S"] == "FATAL" and "client_encoding" in errs[-1]["M"], errs
    finally:
        c.close()


@pytest.mark.parametrize("sql", [
    "SET client_encoding TO 'UNICODE'", "SET NAMES 'UNICODE'",
    "SELECT set_config('client_encoding', 'UNICODE', false)",
    "BEGIN; SET LOCAL client_encoding = 'UNICODE'; COMMIT", "SET client_encoding = 'utf-8'",
    "SET client_encoding TO 'unicode'"])
def test_utf8_under_another_name_keeps_the_session(pg, watched, sql):
    # Postgres reports client_encoding = 'UNICODE' as the client spelled it (for old JDBC
    # drivers), not as UTF8: the same encoding, so the session goes on (psycopg2's
    # test_quote sets it; the watch closed the session)
    c = RawClient.connect(watched.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        got = c.run(sql)
        assert errors(got) == [], got
        assert rows(c.run("SELECT 'é', current_setting('client_encoding')"))[0][0] == \
            "é".encode()
    finally:
        c.close()
    # psycopg, after a startup packet that names it
    with psycopg.connect(watched.dsn(AGENT, AGENT_PASSWORD, dbname=DB),
                         client_encoding="UNICODE", autocommit=True) as conn:
        conn.execute(sql)
        assert conn.execute("SELECT name FROM ps_items WHERE id = 1").fetchone()[0] in \
            ("one", "****e")


def test_an_aggregate_over_set_config_is_refused_at_the_call(pg, watched):
    """The DBA's aggregate is judged by what it runs: its support function set_config."""
    _dba_aggregate(pg)
    with psycopg.connect(watched.dsn(dbname=DB), autocommit=True) as c:
        for sql in ("SELECT ps_cfg('off', false)",
                    "SELECT ps_cfg(v, false) FROM (VALUES ('off')) x(v)",
                    "SELECT 1 WHERE ps_cfg('off', false) IS NOT NULL",
                    "WITH x AS (SELECT ps_cfg('off', false)) SELECT * FROM x"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute(sql)
            assert "set_config" in (e.value.diag.message_detail or "") + \
                e.value.diag.message_primary, e.value
        assert c.execute("SHOW standard_conforming_strings").fetchone() == ("on",)


def test_a_human_without_a_policy_is_not_watched(pg, tmp_path_factory):
    """Humans under "allow" keep what Postgres does (no pins: pgguard judges nothing)."""
    from conftest import Proxy
    _dba_aggregate(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("pinned-human")).start()
    try:
        with psycopg.connect(p.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB), autocommit=True) as c:
            c.execute("SELECT ps_cfg('off', false)")
            assert c.execute("SHOW standard_conforming_strings").fetchone() == ("off",)
    finally:
        p.stop()


# ----------------------------------------------------------------- read-only token

@pytest.fixture(scope="module")
def tproxy(pg, tmp_path_factory):
    from conftest import Proxy
    tmp = tmp_path_factory.mktemp("pinned-ro")
    p = Proxy(pg, tmp, extra=f'[identities.bot]\nkind = "agent"\ngroups = ["agents"]\n'
                             f'[auth]\nstate_dir = "{tmp / "state"}"\n',
              env={"PGGUARD_TOKEN_SECRET": SECRET}).start()
    yield p
    p.stop()


def _readonly_dsn(proxy):
    r = subprocess.run([sys.executable, "-m", "pgguard", "token", "issue", "-c",
                        str(proxy.config), "--json", "--identity", "bot", "--scope",
                        "readonly", "--database", DB],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PGGUARD_TOKEN_SECRET=SECRET))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["dsn"]


def test_readonly_token_session_ends_when_read_only_is_turned_off(pg, tproxy):
    _dba_aggregate(pg, setting="default_transaction_read_only")
    seq = pg.execute("SELECT last_value, is_called FROM ps_seq", dbname=DB)
    c = psycopg.connect(_readonly_dsn(tproxy), autocommit=True)
    try:
        assert c.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        with pytest.raises(psycopg.Error) as e:
            c.execute("SELECT ps_cfg_fn('default_transaction_read_only', 'off', false)")
            c.execute("SELECT nextval('ps_seq')")
        assert "default_transaction_read_only" in str(e.value)
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT nextval('ps_seq')")
    finally:
        c.close()
    assert pg.execute("SELECT last_value, is_called FROM ps_seq", dbname=DB) == seq


# ----------------------------------------------------------------- a pinned role

@pytest.fixture(scope="module")
def rproxy(pg, tmp_path_factory):
    from conftest import Proxy
    pg.execute("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ps_low') "
               "THEN CREATE ROLE ps_low NOLOGIN; GRANT ps_low TO app; END IF; END$$")
    pg.execute("GRANT SELECT ON ps_items TO ps_low", dbname=DB)
    tmp = tmp_path_factory.mktemp("pinned-role")
    p = Proxy(pg, tmp, extra='[identities.lowbot]\nkind = "agent"\ngroups = ["agents"]\n'
                             'password_env = "TEST_AGENT_PASSWORD"\nrole = "ps_low"\n').start()
    yield p
    p.stop()


def test_a_role_escape_through_unseen_code_ends_the_session(pg, rproxy):
    """The upstream user is a superuser; the identity's role is not. Leaving the role
    through a C function pgguard does not read flips is_superuser: the session ends.
    The client was told the role's is_superuser at login (not the login user's)."""
    _dba_aggregate(pg)
    pg.execute("GRANT EXECUTE ON FUNCTION ps_cfg_fn(text, text, bool) TO ps_low", dbname=DB)
    c = RawClient.connect(rproxy.port, "lowbot", AGENT_PASSWORD, database=DB)
    try:
        assert rows(c.run("SELECT current_user"))[0] == [b"ps_low"]
        assert c.params.get("is_superuser") == "off", c.params
        c.send(query("SELECT ps_cfg_fn('role', 'none', false)"))
        errs = errors(c.read_all())
        assert errs and errs[-1]["S"] == "FATAL" and "is_superuser" in errs[-1]["M"], errs
    finally:
        c.close()
