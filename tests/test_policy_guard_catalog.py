# Issue 11: writes to the system catalogs are "privilege", lossy DDL and the large-object
# functions that destroy data are "destructive": refused for a guarded agent through the
# real proxy (psycopg simple and extended protocol, asyncpg, psql, raw frames), judged by
# the catalog, the column data and the large objects upstream. The upstream login role is
# a superuser in these tests, so anything let through would really happen.
import asyncio

import asyncpg
import psycopg
import pytest

import rawpg
from conftest import AGENT, AGENT_PASSWORD, run_psql
from test_policy_guard_settings import guarded_proxy, refused


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    p = guarded_proxy(pg, tmp_path_factory.mktemp("gcatalog"))
    yield p
    p.stop()


LOID = 424242


@pytest.fixture(autouse=True)
def schema(pg):
    pg.execute(f"""
        DROP VIEW IF EXISTS gk_view; DROP TABLE IF EXISTS gk_items, gk_other;
        DROP FUNCTION IF EXISTS gk_keep();
        CREATE TABLE gk_items (id int PRIMARY KEY, name text, qty int);
        INSERT INTO gk_items VALUES (1, 'alpha', 10), (2, 'beta', 20);
        CREATE TABLE gk_other (id int);
        CREATE VIEW gk_view AS SELECT id, name FROM gk_items;
        CREATE FUNCTION gk_keep() RETURNS int LANGUAGE sql AS 'SELECT 7';
        SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid = {LOID};
        SELECT lo_from_bytea({LOID}, 'precious');
        DO $$BEGIN
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gk_nobody') THEN
            CREATE ROLE gk_nobody NOLOGIN; END IF;
        END$$;
    """, dbname="appdb")


def fingerprint(pg):
    """What the attacks below would change, read directly upstream."""
    q = lambda sql: pg.execute(sql, dbname="appdb")  # noqa: E731
    return {
        "nobody": q("SELECT rolsuper, rolcanlogin FROM pg_authid WHERE rolname = 'gk_nobody'"),
        "items": q("SELECT id, name, qty FROM gk_items ORDER BY id"),
        "types": q("SELECT attname, atttypid::regtype::text, atttypmod FROM pg_attribute "
                   "WHERE attrelid = 'gk_items'::regclass AND attnum > 0 ORDER BY attnum"),
        "relname": q("SELECT count(*) FROM pg_class WHERE relname = 'gk_items'"),
        "keep": q("SELECT prosrc FROM pg_proc WHERE proname = 'gk_keep'"),
        "view": q("SELECT pg_get_viewdef('gk_view'::regclass)"),
        "lo": q(f"SELECT lo_get({LOID})"),
        "comment": q("SELECT count(*) FROM pg_description WHERE objoid = 'gk_items'::regclass"),
        "triggers": q("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'gk_items'::regclass"),
    }


CATALOG_WRITES = [
    "UPDATE pg_authid SET rolsuper = true WHERE rolname = 'gk_nobody'",
    "update pg_catalog.pg_authid set rolcanlogin = true where rolname = 'gk_nobody'",
    "DELETE FROM pg_proc WHERE proname = 'gk_keep'",
    "UPDATE pg_class SET relname = 'gk_gone' WHERE relname = 'gk_items'",
    "INSERT INTO pg_description (objoid, classoid, objsubid, description) "
    "SELECT 'gk_items'::regclass, 'pg_class'::regclass, 0, 'x'",
    "WITH x AS (UPDATE pg_authid SET rolsuper = true WHERE rolname = 'gk_nobody' "
    "RETURNING 1) SELECT count(*) FROM x",
    "DO $$ BEGIN UPDATE pg_catalog.pg_authid SET rolsuper = true "
    "WHERE rolname = 'gk_nobody'; END $$",
    "DELETE FROM pg_largeobject WHERE loid = 424242",
    "MERGE INTO pg_authid a USING (SELECT 'gk_nobody'::name AS n) s ON a.rolname = s.n "
    "WHEN MATCHED THEN UPDATE SET rolsuper = true",
    "EXPLAIN ANALYZE UPDATE pg_authid SET rolsuper = true WHERE rolname = 'gk_nobody'",
    "UPDATE pg_attribute SET atttypmod = 3 WHERE attrelid = 'gk_items'::regclass "
    "AND attname = 'name'",
]


@pytest.mark.parametrize("sql", CATALOG_WRITES)
def test_catalog_writes_are_refused(pg, guarded, sql):
    before = fingerprint(pg)
    diag = refused(guarded, sql)
    assert 'rule "guarded-default"' in diag.message_primary
    assert "system catalog" in diag.message_detail + diag.message_primary
    assert fingerprint(pg) == before


LOSSY = [
    "ALTER TABLE gk_items ALTER COLUMN name TYPE int USING NULL",
    "ALTER TABLE gk_items ALTER COLUMN name TYPE varchar(1) USING left(name, 1)",
    "ALTER TABLE gk_items ALTER COLUMN qty TYPE numeric(1, 0) USING qty / 100",
    "alter table gk_items alter qty set data type smallint",
    "ALTER TABLE gk_items ADD COLUMN note text, ALTER COLUMN name TYPE char(2)",
    "CREATE OR REPLACE FUNCTION gk_keep() RETURNS int LANGUAGE sql AS 'SELECT 0'",
    "CREATE OR REPLACE VIEW gk_view AS SELECT id, 'gone'::text AS name FROM gk_items",
    "DO $$ BEGIN CREATE OR REPLACE FUNCTION gk_keep() RETURNS int LANGUAGE sql "
    "AS 'SELECT 0'; END $$",
    "SELECT lo_unlink(424242)",
    "SELECT pg_catalog.lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid = 424242",
    "SELECT lo_put(424242, 0, 'XXXX')",
    "SELECT lo_truncate(lo_open(424242, 131072), 0)",
    "SELECT lowrite(lo_open(424242, 131072), 'XX')",
    "DO $$ BEGIN PERFORM lo_unlink(424242); END $$",
]


@pytest.mark.parametrize("sql", LOSSY)
def test_lossy_ddl_and_large_object_destruction_are_refused(pg, guarded, sql):
    before = fingerprint(pg)
    diag = refused(guarded, sql)
    assert "destructive" in diag.message_primary + diag.message_detail
    assert fingerprint(pg) == before


def test_extended_protocol_asyncpg_and_raw(pg, guarded):
    before = fingerprint(pg)

    async def main():
        conn = await asyncpg.connect(guarded.dsn(dbname="appdb"))
        try:
            for sql, args in (
                    ("UPDATE pg_authid SET rolsuper = $1 WHERE rolname = 'gk_nobody'", (True,)),
                    ("DELETE FROM pg_proc WHERE proname = $1", ("gk_keep",)),
                    ("SELECT lo_unlink($1)", (LOID,)),
                    ("SELECT lo_put($1, 0, $2)", (LOID, b"Z")),
                    ("UPDATE pg_catalog.pg_class SET relname = $1 WHERE relname = 'gk_items'",
                     ("gk_gone",))):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql, *args)
        finally:
            await conn.close()
    asyncio.run(main())

    c = rawpg.RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        c.send(rawpg.parse("ALTER TABLE gk_items ALTER COLUMN qty TYPE text USING NULL"),
               rawpg.bind(), rawpg.execute(),
               rawpg.parse("SELECT lo_unlink(424242)"), rawpg.bind(), rawpg.execute(),
               rawpg.SYNC)
        assert [e["C"] for e in rawpg.errors(c.until_ready())] == ["42501"]
    finally:
        c.close()
    assert fingerprint(pg) == before


def test_psql_script(pg, guarded, psql_bin):
    before = fingerprint(pg)
    r = run_psql(psql_bin, guarded.dsn(dbname="appdb"), "-v", "ON_ERROR_STOP=0",
                 input="UPDATE pg_authid SET rolsuper = true WHERE rolname = 'gk_nobody';\n"
                       "ALTER TABLE gk_items ALTER COLUMN name TYPE int USING NULL;\n"
                       "SELECT lo_unlink(424242);\n"
                       "CREATE OR REPLACE VIEW gk_view AS SELECT 1 AS id, 'x' AS name;\n"
                       "TRUNCATE pg_largeobject;\n")
    assert r.stderr.count("pgguard: statement refused by rule") == 5, r.stderr
    assert fingerprint(pg) == before


def test_legitimate_catalog_reads_and_ddl_still_work(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        assert conn.execute("SELECT relname FROM pg_class WHERE relname = 'gk_items'"
                            ).fetchone() == ("gk_items",)
        assert conn.execute("SELECT count(*) FROM information_schema.columns "
                            "WHERE table_name = 'gk_items'").fetchone() == (3,)
        assert conn.execute(f"SELECT lo_get({LOID})").fetchone() == (b"precious",)
        conn.execute("ALTER TABLE gk_items ADD COLUMN note text")
        conn.execute("CREATE FUNCTION gk_new() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        conn.execute("CREATE VIEW gk_view2 AS SELECT id FROM gk_items")
        # a large object of its own: created, written and read back
        oid = conn.execute("SELECT lo_from_bytea(0, 'mine')").fetchone()[0]
        assert conn.execute("SELECT lo_get(%s)", (oid,)).fetchone() == (b"mine",)
    assert pg.execute("SELECT count(*) FROM pg_proc WHERE proname = 'gk_new'",
                      dbname="appdb") == [(1,)]
    pg.execute("DROP VIEW gk_view2; DROP FUNCTION gk_new()", dbname="appdb")


def test_lo_from_bytea_cannot_overwrite(pg, guarded):
    # why lo_from_bytea / lo_create are not destructive: an OID in use is an error
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"SELECT lo_from_bytea({LOID}, 'overwritten')")
    assert pg.execute(f"SELECT lo_get({LOID})", dbname="appdb") == [(b"precious",)]
