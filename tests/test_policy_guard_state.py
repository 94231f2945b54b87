# State that ROLLBACK does not restore, or that switches off what protects every other
# session: sequences moved back, triggers and rules switched off, a rule that swallows
# writes, a table made unlogged, rows published to subscribers, statistics erased.
# Each route (simple Query, extended protocol, FunctionCall, DO, CTE, asyncpg, psql) is
# judged by the upstream catalog and sequence state, never by the proxy's reply alone.
import asyncio
import subprocess

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD
from guarded import guarded_proxy
from rawpg import SYNC, RawClient, bind, errors, execute, function_call, parse

DB = "appdb"


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("gstate")) as p:
        yield p


@pytest.fixture(autouse=True)
def schema(pg):
    pg.execute("""
        DROP TABLE IF EXISTS gs_orders CASCADE; DROP TABLE IF EXISTS gs_ident CASCADE;
        DROP SEQUENCE IF EXISTS gs_seq; DROP FUNCTION IF EXISTS gs_trg_fn() CASCADE;
        DROP PUBLICATION IF EXISTS gs_pub;
        CREATE SEQUENCE gs_seq;
        SELECT setval('gs_seq', 500);
        CREATE TABLE gs_orders (id int PRIMARY KEY DEFAULT nextval('gs_seq'), status text);
        CREATE TABLE gs_ident (id int GENERATED ALWAYS AS IDENTITY (START 100), v text);
        INSERT INTO gs_ident (v) VALUES ('a');
        CREATE FUNCTION gs_trg_fn() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN NEW.status := coalesce(NEW.status, 'checked'); RETURN NEW; END $$;
        CREATE TRIGGER gs_trg BEFORE INSERT ON gs_orders FOR EACH ROW EXECUTE FUNCTION gs_trg_fn();
        CREATE VIEW gs_view WITH (security_barrier = true) AS SELECT id FROM gs_orders;
    """, dbname=DB)


def upstream_state(pg):
    """Everything the statements under test could change, read directly upstream."""
    seq = pg.execute("SELECT last_value, is_called FROM gs_seq", dbname=DB)[0]
    ident = pg.execute("SELECT last_value, is_called FROM gs_ident_id_seq", dbname=DB)[0]
    trig = pg.execute("SELECT tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal "
                      "AND tgrelid IN ('gs_orders'::regclass, 'gs_ident'::regclass, "
                      "'gs_view'::regclass) ORDER BY 1", dbname=DB)
    rules = pg.execute("SELECT count(*) FROM pg_rules WHERE tablename = 'gs_orders'", dbname=DB)
    persist = pg.execute("SELECT relpersistence FROM pg_class WHERE relname = 'gs_orders'",
                         dbname=DB)
    pubs = pg.execute("SELECT count(*) FROM pg_publication WHERE pubname = 'gs_pub'", dbname=DB)
    opts = pg.execute("SELECT reloptions FROM pg_class WHERE relname = 'gs_view'", dbname=DB)
    return (seq, ident, trig, rules, persist, pubs, opts)


# class 1: a sequence moved back (every route)
SEQUENCE = [
    "SELECT setval('gs_seq', 1)",
    "SELECT pg_catalog.setval('public.gs_seq'::regclass, 1, false)",
    "SELECT id FROM gs_orders WHERE setval('gs_seq', 1) > 0",
    "WITH s AS (SELECT setval('gs_seq', 2) AS v) SELECT v FROM s",
    "DO $$ BEGIN PERFORM setval('gs_seq', 1); END $$",
    "ALTER SEQUENCE gs_seq RESTART",
    "ALTER SEQUENCE gs_seq RESTART WITH 1",
    "ALTER TABLE gs_ident ALTER COLUMN id RESTART WITH 1",
    "PREPARE gs_p AS SELECT setval('gs_seq', 1)",
    "EXPLAIN ANALYZE SELECT setval('gs_seq', 1)",
]
# class 2: triggers and rules switched off, or a rule that swallows every write
SWITCH_OFF = [
    "ALTER TABLE gs_orders DISABLE TRIGGER gs_trg",
    "ALTER TABLE gs_orders DISABLE TRIGGER USER",
    "ALTER TABLE gs_orders DISABLE TRIGGER ALL",
    "ALTER TABLE public.gs_orders DISABLE TRIGGER gs_trg, ADD COLUMN x int",
    "CREATE RULE gs_r AS ON INSERT TO gs_orders DO INSTEAD NOTHING",
    "CREATE RULE gs_r AS ON UPDATE TO gs_orders DO INSTEAD NOTHING",
    "CREATE OR REPLACE RULE gs_r AS ON DELETE TO gs_orders DO INSTEAD NOTHING",
    "ALTER VIEW gs_view SET (security_barrier = false)",
    "ALTER VIEW gs_view RESET (security_barrier)",
    "DO $$ BEGIN ALTER TABLE gs_orders DISABLE TRIGGER USER; END $$",
]
# class 3: data made losable, sent elsewhere, or the DBA's statistics erased
OTHER = [
    "ALTER TABLE gs_orders SET UNLOGGED",
    "ALTER TABLE IF EXISTS gs_orders SET UNLOGGED",
    "CREATE PUBLICATION gs_pub FOR TABLE gs_orders",
    "SELECT pg_stat_reset()",
    "SELECT pg_stat_reset_single_table_counters('gs_orders'::regclass)",
]
# class 4: code planted to run later inside other sessions' statements
PLANTED = [
    "CREATE TRIGGER gs_bomb AFTER INSERT ON gs_orders FOR EACH ROW EXECUTE FUNCTION gs_trg_fn()",
    "CREATE TRIGGER gs_bomb BEFORE UPDATE OR DELETE ON public.gs_orders "
    "FOR EACH STATEMENT EXECUTE PROCEDURE gs_trg_fn()",
    "CREATE CONSTRAINT TRIGGER gs_bomb AFTER INSERT ON gs_orders DEFERRABLE "
    "FOR EACH ROW EXECUTE FUNCTION gs_trg_fn()",
    "CREATE RULE gs_bomb AS ON INSERT TO gs_orders DO ALSO DELETE FROM gs_ident WHERE id > 0",
    "CREATE RULE gs_bomb AS ON UPDATE TO gs_orders DO ALSO NOTIFY gs_changed",
    "DO $$ BEGIN CREATE TRIGGER gs_bomb AFTER INSERT ON gs_orders FOR EACH ROW "
    "EXECUTE FUNCTION gs_trg_fn(); END $$",
]
ALL = SEQUENCE + SWITCH_OFF + OTHER + PLANTED


def assert_refused_msg(msg: str):
    assert msg.startswith("pgguard: statement refused by rule"), msg


@pytest.mark.parametrize("sql", ALL)
def test_psycopg_simple_and_extended(pg, guarded, sql):
    before = upstream_state(pg)
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        for prepare in (False, True):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                if prepare:
                    c.execute(sql.replace("%", "%%"), prepare=True)
                else:
                    psycopg.ClientCursor(c).execute(sql.replace("%", "%%"))
            assert_refused_msg(e.value.diag.message_primary)
            assert e.value.diag.message_hint
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert upstream_state(pg) == before


@pytest.mark.parametrize("sql", ALL)
def test_asyncpg(pg, guarded, sql):
    before = upstream_state(pg)

    async def main():
        conn = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(sql)
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    asyncio.run(main())
    assert upstream_state(pg) == before


def test_raw_pipelined_extended_protocol(pg, guarded):
    """All of them pipelined in one write, each with its own Sync."""
    before = upstream_state(pg)
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        c.send(*(parse(s) + bind() + execute() + SYNC for s in ALL))
        msgs = c.until_ready(len(ALL))
        errs = errors(msgs)
        assert len(errs) == len(ALL)
        assert all(e["C"] == "42501" for e in errs), errs
    finally:
        c.close()
    assert upstream_state(pg) == before


def test_function_call_to_setval_is_refused(pg, guarded):
    before = upstream_state(pg)
    oid = pg.execute("SELECT 'setval(regclass,bigint)'::regprocedure::oid", dbname=DB)[0][0]
    regclass = pg.execute("SELECT 'gs_seq'::regclass::oid", dbname=DB)[0][0]
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        c.send(function_call(oid, [str(regclass).encode(), b"1"]))
        errs = errors(c.until_ready())
        assert [e["C"] for e in errs] == ["42501"], errs
    finally:
        c.close()
    assert upstream_state(pg) == before


def test_psql(pg, guarded, psql_bin):
    before = upstream_state(pg)
    script = ";\n".join(ALL) + ";\nSELECT 'still here';\n"
    r = subprocess.run([psql_bin, "-X", "-v", "ON_ERROR_STOP=0", guarded.dsn(dbname=DB)],
                       input=script, capture_output=True, text=True, timeout=60)
    assert r.stderr.count("pgguard: statement refused by rule") == len(ALL), r.stderr
    assert "still here" in r.stdout
    assert upstream_state(pg) == before


LEGITIMATE = [
    ("SELECT nextval('gs_seq')", None),
    ("INSERT INTO gs_orders DEFAULT VALUES", None),
    ("ALTER SEQUENCE gs_seq INCREMENT 1", None),
    ("ALTER TABLE gs_orders SET (fillfactor = 90)", None),
]


@pytest.mark.parametrize("sql, _", LEGITIMATE)
def test_near_neighbours_still_pass(pg, guarded, sql, _):
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        c.execute(sql)
    # the trigger still fires: the row an agent inserts is stamped by it
    if sql.startswith("INSERT"):
        assert pg.execute("SELECT status FROM gs_orders", dbname=DB) == [("checked",)]
