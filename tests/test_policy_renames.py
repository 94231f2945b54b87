# Names out of reach: a guarded agent renaming or moving an object (a table, a view, a
# column, a schema, a function) takes the old name out of every rule's and mask's reach
# (rename `rn_orders`, write to the new name, rename it back); a foreign key with ON
# DELETE/UPDATE actions added to an existing table makes statements on another table
# change its rows without naming it. Each route (psycopg simple and prepared, asyncpg,
# psql, a raw pipeline) is judged by the upstream catalog and rows.
import asyncio
import subprocess

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD
from guarded import guarded_proxy
from rawpg import SYNC, RawClient, bind, errors, execute, parse

DB = "appdb"
RULES = """
[[rules]]
name = "rn-orders-writes-blocked"
when = { kind = "agent", statements = ["insert", "update", "delete"], relations = ["public.rn_orders"] }
action = "block"

[[masks]]
column = "public.rn_customers.ssn"
strategy = "partial"
keep = 4
"""


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("renames"), extra=RULES) as p:
        yield p


@pytest.fixture(autouse=True)
def schema(pg):
    pg.execute("""
        DROP SCHEMA IF EXISTS rn_s2 CASCADE; DROP SCHEMA IF EXISTS rn_arch CASCADE;
        DROP TABLE IF EXISTS rn_orders, rn_o2, rn_customers, rn_cust2 CASCADE;
        DROP VIEW IF EXISTS rn_v, rn_v2; DROP FUNCTION IF EXISTS rn_f(int), rn_g(int);
        CREATE SCHEMA rn_arch;
        CREATE TABLE rn_customers (id int PRIMARY KEY, ssn text);
        INSERT INTO rn_customers VALUES (1, '123-45-6789'), (2, '987-65-4321');
        CREATE TABLE rn_orders (id int PRIMARY KEY, cust int REFERENCES rn_customers(id),
                                status text);
        INSERT INTO rn_orders VALUES (1, 1, 'paid'), (2, 2, 'paid');
        CREATE VIEW rn_v AS SELECT * FROM rn_orders;
        CREATE INDEX rn_orders_status ON rn_orders (status);
        CREATE FUNCTION rn_f(int) RETURNS int LANGUAGE sql AS 'SELECT $1';
    """, dbname=DB)


def upstream(pg):
    """Names, columns, constraints and rows, read directly upstream."""
    rels = pg.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                      "ON n.oid = c.relnamespace WHERE c.relname LIKE 'rn\\_%' "
                      "AND c.relkind IN ('r', 'v') ORDER BY 1, 2", dbname=DB)
    cols = pg.execute("SELECT attrelid::regclass::text, attname FROM pg_attribute "
                      "WHERE attrelid IN ('rn_customers'::regclass, 'rn_orders'::regclass) "
                      "AND attnum > 0 AND NOT attisdropped ORDER BY 1, 2", dbname=DB)
    cons = pg.execute("SELECT conname, confdeltype, confupdtype FROM pg_constraint "
                      "WHERE conrelid = 'rn_orders'::regclass ORDER BY 1", dbname=DB)
    schemas = pg.execute("SELECT nspname FROM pg_namespace WHERE nspname IN "
                         "('public', 'rn_arch', 'rn_s2') ORDER BY 1", dbname=DB)
    funcs = pg.execute("SELECT p.oid::regprocedure::text FROM pg_proc p WHERE proname "
                       "LIKE 'rn\\_%' ORDER BY 1", dbname=DB)
    rows = pg.execute("SELECT id, status FROM rn_orders ORDER BY id", dbname=DB)
    return rels, cols, cons, schemas, funcs, rows


# class 1: renames and schema moves of what rules, masks and views name
MOVES = [
    "ALTER TABLE rn_orders RENAME TO rn_o2",
    "ALTER TABLE IF EXISTS public.rn_orders RENAME TO rn_o2",
    "ALTER TABLE rn_orders SET SCHEMA rn_arch",
    "ALTER TABLE rn_customers RENAME COLUMN ssn TO not_ssn",
    "ALTER TABLE rn_customers RENAME ssn TO not_ssn",
    "ALTER VIEW rn_v RENAME TO rn_v2",
    "ALTER VIEW rn_v RENAME COLUMN status TO st",
    "ALTER SCHEMA public RENAME TO rn_s2",
    "ALTER FUNCTION rn_f(int) RENAME TO rn_g",
    "ALTER FUNCTION rn_f(int) SET SCHEMA rn_arch",
    "DO $$ BEGIN ALTER TABLE rn_orders RENAME TO rn_o2; END $$",
    # Postgres renames a table through ALTER INDEX ... RENAME too (red-team pass 9):
    # pgguard cannot tell an index's name from a table's, so an index rename is refused
    # as well (a DBA renames indexes)
    "ALTER INDEX rn_orders RENAME TO rn_o2",
    "ALTER INDEX IF EXISTS public.rn_customers RENAME TO rn_cust2",
    "ALTER INDEX rn_orders_status RENAME TO rn_orders_st",
]
# class 2: foreign keys whose actions change rn_orders from statements on rn_customers
CASCADES = [
    "ALTER TABLE rn_orders ADD CONSTRAINT rn_fk FOREIGN KEY (cust) REFERENCES "
    "rn_customers(id) ON DELETE CASCADE",
    "ALTER TABLE rn_orders ADD FOREIGN KEY (cust) REFERENCES rn_customers ON UPDATE CASCADE",
    "ALTER TABLE rn_orders ADD FOREIGN KEY (cust) REFERENCES rn_customers "
    "ON DELETE SET NULL NOT VALID",
    "ALTER TABLE rn_orders ADD COLUMN cust2 int REFERENCES rn_customers ON DELETE SET DEFAULT",
    "ALTER TABLE public.rn_orders ADD COLUMN cust2 int CONSTRAINT rn_fk2 REFERENCES "
    "rn_customers (id) ON UPDATE SET NULL ON DELETE RESTRICT",
]
ALL = MOVES + CASCADES


def refused_msg(msg: str):
    assert msg.startswith("pgguard: statement refused by rule"), msg


@pytest.mark.parametrize("sql", ALL)
def test_psycopg_simple_and_prepared(pg, guarded, sql):
    before = upstream(pg)
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        for prepare in (False, True):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                if prepare:
                    c.execute(sql, prepare=True)
                else:
                    psycopg.ClientCursor(c).execute(sql)
            refused_msg(e.value.diag.message_primary)
            assert e.value.diag.message_hint
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert upstream(pg) == before


@pytest.mark.parametrize("sql", ALL)
def test_asyncpg(pg, guarded, sql):
    before = upstream(pg)

    async def main():
        conn = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
            async with conn.transaction():
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
                raise asyncio.CancelledError       # roll the transaction back
        except asyncio.CancelledError:
            pass
        finally:
            await conn.close()
    asyncio.run(main())
    assert upstream(pg) == before


def test_raw_pipeline_each_behind_its_sync(pg, guarded):
    before = upstream(pg)
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        c.send(*(parse(s) + bind() + execute() + SYNC for s in ALL))
        errs = errors(c.until_ready(len(ALL)))
        assert [e["C"] for e in errs] == ["42501"] * len(ALL), errs
    finally:
        c.close()
    assert upstream(pg) == before


def test_psql_script_and_the_write_after_it(pg, guarded, psql_bin):
    """The attack whole: rename, write under the new name, rename back."""
    before = upstream(pg)
    script = ("ALTER TABLE rn_orders RENAME TO rn_o2;\n"
              "UPDATE rn_o2 SET status = 'refunded' WHERE id = 1;\n"
              "ALTER TABLE rn_o2 RENAME TO rn_orders;\n"
              "ALTER TABLE rn_orders SET SCHEMA rn_arch;\n"
              "UPDATE rn_arch.rn_orders SET status = 'refunded' WHERE id = 2;\n"
              "ALTER TABLE rn_customers RENAME COLUMN ssn TO x;\n"
              "SELECT x FROM rn_customers;\n"
              "SELECT 'still here';\n")
    r = subprocess.run([psql_bin, "-X", "-v", "ON_ERROR_STOP=0", guarded.dsn(dbname=DB)],
                       input=script, capture_output=True, text=True, timeout=60)
    # the three renames and the rename back are refused; the writes find no such relation
    assert r.stderr.count("pgguard: statement refused by rule") == 4, r.stderr
    assert "123-45-6789" not in r.stdout and "still here" in r.stdout
    assert upstream(pg) == before
    assert pg.execute("SELECT status FROM rn_orders ORDER BY id", dbname=DB) == \
        [("paid",), ("paid",)]


NEIGHBOURS = [
    "ALTER INDEX rn_orders_status SET (fillfactor = 90)",
    # (RENAME CONSTRAINT: destructive since round 18, an ON CONFLICT ON CONSTRAINT of the
    # application fails after it; test_renamed_constraints_are_refused)
    # (ADD CONSTRAINT ... FOREIGN KEY without actions: destructive since round 15, it can
    # refuse later writes; test_policy_write_gates.py)
    # (a CASCADE declared by CREATE TABLE is opaque since round 14, as ADD is: class 2;
    # any foreign key to another table destructive since round 16, it gates that
    # table's deletes: test_policy_later_harm.py)
    "CREATE TABLE rn_cust2 (id int PRIMARY KEY, c int)",
]


@pytest.mark.parametrize("sql", NEIGHBOURS)
def test_near_neighbours_still_pass(pg, guarded, sql):
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        c.execute(sql)
    rels, _cols, cons, *_ = upstream(pg)
    if "fillfactor" in sql:
        assert pg.execute("SELECT reloptions FROM pg_class WHERE relname = "
                          "'rn_orders_status'", dbname=DB) == [(["fillfactor=90"],)]
    elif "CREATE TABLE" in sql:
        assert ("public", "rn_cust2") in rels
    else:
        assert len(cons) == 3       # pkey, the schema's own key, the new one


def test_a_human_may_still_rename(pg, guarded):
    with psycopg.connect(guarded.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB),
                         autocommit=True) as c:
        c.execute("ALTER TABLE rn_orders RENAME TO rn_o2")
    assert pg.execute("SELECT relname FROM pg_class WHERE relname IN ('rn_orders', 'rn_o2')",
                      dbname=DB) == [("rn_o2",)]


# Red team, round 18 (helper 90): a constraint's rename was allowed, and the application's
# INSERT ... ON CONFLICT ON CONSTRAINT <its name> failed in every session after it (a
# primary key's index is renamed with it). Judged by the catalog and the upsert.
RENAMED_CONSTRAINTS = [
    "ALTER TABLE rn_orders RENAME CONSTRAINT rn_orders_pkey TO rn_orders_pk",
    "ALTER TABLE IF EXISTS rn_orders RENAME CONSTRAINT rn_orders_pkey TO x",
    "ALTER TABLE public.rn_orders RENAME CONSTRAINT \"rn_orders_pkey\" TO y",
    "ALTER TABLE ONLY rn_orders RENAME CONSTRAINT rn_orders_pkey TO z",
    "BEGIN; ALTER TABLE rn_orders RENAME CONSTRAINT rn_orders_pkey TO w; COMMIT",
]


@pytest.mark.parametrize("sql", RENAMED_CONSTRAINTS)
def test_renamed_constraints_are_refused(pg, guarded, psql_bin, sql):
    r = subprocess.run([psql_bin, "-X", "-v", "ON_ERROR_STOP=1", guarded.dsn(dbname=DB),
                        "-c", sql], capture_output=True, text=True, timeout=60)
    assert "no-destructive" in r.stderr or "refused by rule" in r.stderr, r.stderr
    rels, _cols, cons, *_ = upstream(pg)
    assert "rn_orders_pkey" in [c[0] for c in cons]
    # the application's upsert names it, and still works
    pg.execute("INSERT INTO rn_orders (id, status) VALUES (1, 'paid') "
               "ON CONFLICT ON CONSTRAINT rn_orders_pkey DO NOTHING", dbname=DB)
