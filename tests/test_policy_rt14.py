# Red team, round 14 (policy), judged by the rows and the catalog upstream:
#  F1 - rows a command tag does not count: a one-row DELETE or UPDATE of a table that a
#       foreign key ON DELETE/UPDATE CASCADE, SET NULL or SET DEFAULT references (or one
#       with a row trigger) changed thousands of rows past the row limit, counted as 1.
#       The guard now measures statements writing such tables (read from the catalog
#       with the view map) by the transaction's tuple counters; and an agent's CREATE
#       TABLE declaring such a foreign key is opaque, as ALTER TABLE ... ADD was (which
#       also closes ATTACH PARTITION planting the parent's cascade on a DBA's table).
#  F2 - a TEMP view created by a function body shadowed a table name in the calling
#       session, unseen (writes through it were judged as writes of the table, with no
#       approval); and a view created in the session's temporary schema named as
#       pg_temp_N was not known as the session's. The first is opaque now, the second
#       is learned as a TEMP view.
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD, run_psql
from each_client import MODES, said
from guarded import guarded_proxy

DB = "appdb"
CHILD_ROWS = 1500          # past the agents' default row limit (1,000)
RULES = """
[[rules]]
name = "agent-writes-to-rt14-orders-need-approval"
when = { kind = "agent", statements = ["insert", "update", "delete", "merge"], relations = ["public.rt14_orders"] }
action = "approve"
timeout = "1s"
"""


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("rt14"), RULES) as p:
        yield p


def _dsn(proxy):
    return proxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB)


def _run(mode, proxy, psql_bin, sqls: list[str]) -> str:
    return said(mode, proxy, sqls, db=DB, psql_bin=psql_bin)



# -- F1: an agent's CREATE TABLE declaring a cascading foreign key ------------------------

DECLARED = [
    "CREATE TABLE rt14_c{n} (id int, pid int REFERENCES rt14_p ON DELETE CASCADE)",
    "CREATE TABLE rt14_c{n} (id int, pid int, FOREIGN KEY (pid) REFERENCES rt14_p (id) "
    "ON UPDATE CASCADE)",
    "CREATE TABLE rt14_c{n} (id int, pid int REFERENCES rt14_p ON DELETE SET NULL)",
    "CREATE TABLE rt14_c{n} (id int, pid int DEFAULT 0 REFERENCES rt14_p ON DELETE SET DEFAULT)",
    "CREATE TABLE rt14_c{n} (id int PRIMARY KEY, up int REFERENCES rt14_c{n} ON DELETE CASCADE)",
    "CREATE TABLE rt14_c{n} (id int NOT NULL, pid int, CONSTRAINT k FOREIGN KEY (pid) "
    "REFERENCES rt14_p ON DELETE CASCADE) PARTITION BY RANGE (id)",
]
_n = iter(range(100_000))


@pytest.fixture()
def parent(pg):
    pg.execute("DROP TABLE IF EXISTS rt14_p CASCADE; CREATE TABLE rt14_p (id int PRIMARY KEY); "
               "INSERT INTO rt14_p VALUES (0), (1), (2)", dbname=DB)
    yield
    pg.execute("DROP TABLE IF EXISTS rt14_p CASCADE", dbname=DB)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(DECLARED)))
def test_create_table_with_a_cascading_foreign_key_is_refused(gproxy, pg, psql_bin, parent,
                                                              mode, case):
    n = next(_n)
    said = _run(mode, gproxy, psql_bin, [DECLARED[case].format(n=n)])
    made = pg.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND "
                      "conrelid = to_regclass(%s)", (f"rt14_c{n}",), dbname=DB)
    pg.execute(f"DROP TABLE IF EXISTS rt14_c{n}", dbname=DB)
    assert made == [(0,)], (mode, DECLARED[case])
    assert "foreign key" in said and "42501" in said or "opaque" in said, said


def test_a_plain_foreign_key_is_refused_too(gproxy, pg, parent):
    # (since round 16: its triggers on rt14_p refuse the DBA's deletes of referenced
    # rows; test_policy_later_harm.py)
    with psycopg.connect(_dsn(gproxy), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("CREATE TABLE rt14_plain (id int, pid int REFERENCES rt14_p)")
    assert pg.execute("SELECT count(*) FROM pg_class WHERE relname = 'rt14_plain'",
                      dbname=DB) == [(0,)]


# -- F1: a DBA's cascades and triggers, measured ---------------------------------------

CASCADES = {
    "delete-cascade": ("pid int REFERENCES rt14_dp ON DELETE CASCADE",
                       "DELETE FROM rt14_dp WHERE id = 1"),
    "update-cascade": ("pid int REFERENCES rt14_dp ON UPDATE CASCADE",
                       "UPDATE rt14_dp SET id = 5 WHERE id = 1"),
    "set-null": ("pid int REFERENCES rt14_dp ON DELETE SET NULL",
                 "DELETE FROM rt14_dp WHERE id = 1"),
    "set-default": ("pid int DEFAULT 2 REFERENCES rt14_dp ON DELETE SET DEFAULT",
                    "DELETE FROM rt14_dp WHERE id = 1"),
    "trigger": ("pid int", "DELETE FROM rt14_dp WHERE id = 1"),
}


def _dba_schema(pg, kind):
    col, _ = CASCADES[kind]
    pg.execute(f"""
        DROP TABLE IF EXISTS rt14_dc, rt14_dp CASCADE;
        CREATE TABLE rt14_dp (id int PRIMARY KEY);
        INSERT INTO rt14_dp VALUES (1), (2), (3);
        CREATE TABLE rt14_dc (id serial PRIMARY KEY, {col});
        INSERT INTO rt14_dc (pid) SELECT 1 FROM generate_series(1, {CHILD_ROWS});
        CREATE OR REPLACE FUNCTION rt14_purge() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN DELETE FROM rt14_dc WHERE pid = OLD.id; RETURN OLD; END$$;
    """, dbname=DB)
    if kind == "trigger":
        pg.execute("CREATE TRIGGER rt14_t AFTER DELETE ON rt14_dp FOR EACH ROW EXECUTE "
                   "FUNCTION rt14_purge()", dbname=DB)


def _children(pg):
    return pg.execute("SELECT count(*), count(*) FILTER (WHERE pid = 1) FROM rt14_dc",
                      dbname=DB)[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(CASCADES))
def test_rows_a_cascade_changes_count_against_the_row_limit(gproxy, pg, psql_bin, mode, kind):
    _dba_schema(pg, kind)
    try:
        before = _children(pg)
        # the view map (and what it says of cascades) is read again within its TTL; a
        # DDL-free wait is what a session that connects later sees
        _await_map(gproxy)
        said = _run(mode, gproxy, psql_bin, [CASCADES[kind][1]])
        assert _children(pg) == before, (mode, kind, said)
        assert pg.execute("SELECT count(*) FROM rt14_dp", dbname=DB) == [(3,)]
        assert "blast-radius" in said, said
        # within the limit it runs: the cascade's rows are measured, not refused blindly
        # (a trigger's writes are the statement's own now, judged by the rules and the
        # every-row check too: another parent's row keeps the child table from being
        # reached whole)
        pg.execute("DELETE FROM rt14_dc WHERE id > 10", dbname=DB)
        if kind == "trigger":
            pg.execute("INSERT INTO rt14_dc (pid) VALUES (2)", dbname=DB)
        said = _run(mode, gproxy, psql_bin, [CASCADES[kind][1]])
        assert "blast-radius" not in said, said
        assert pg.execute("SELECT count(*) FROM rt14_dp WHERE id = 1", dbname=DB) == [(0,)]
    finally:
        pg.execute("DROP TABLE IF EXISTS rt14_dc, rt14_dp CASCADE; "
                   "DROP FUNCTION IF EXISTS rt14_purge()", dbname=DB)


def _await_map(proxy):
    """A statement through the proxy after the DBA's DDL: the map is read again when
    stale (VIEW_MAP_TTL) or on the next read; a DDL statement through the proxy makes
    it stale at once."""
    with psycopg.connect(_dsn(proxy), autocommit=True) as c:
        c.execute("CREATE TEMP TABLE rt14_poke (x int)")    # DDL: the map is read again
        c.execute("SELECT 1")


def test_a_one_row_delete_without_cascades_is_still_counted_by_its_tag(gproxy, pg):
    pg.execute("DROP TABLE IF EXISTS rt14_solo; CREATE TABLE rt14_solo (id int PRIMARY KEY); "
               "INSERT INTO rt14_solo SELECT generate_series(1, 10)", dbname=DB)
    try:
        with psycopg.connect(_dsn(gproxy), autocommit=True) as c:
            assert c.execute("DELETE FROM rt14_solo WHERE id = 3").rowcount == 1
        assert pg.execute("SELECT count(*) FROM rt14_solo", dbname=DB) == [(9,)]
    finally:
        pg.execute("DROP TABLE rt14_solo", dbname=DB)


# -- F2: temporary views -------------------------------------------------------------------

@pytest.fixture()
def orders(pg):
    pg.execute("DROP TABLE IF EXISTS rt14_orders CASCADE; CREATE TABLE rt14_orders "
               "(id int PRIMARY KEY, status text); INSERT INTO rt14_orders SELECT g, 'new' "
               "FROM generate_series(1, 5) g", dbname=DB)
    yield lambda: pg.execute("SELECT id, status FROM rt14_orders ORDER BY id", dbname=DB)
    pg.execute("DROP TABLE IF EXISTS rt14_orders CASCADE", dbname=DB)


BODIES = [
    "LANGUAGE plpgsql AS $$BEGIN CREATE TEMP VIEW {v} AS SELECT * FROM public.rt14_orders; "
    "RETURN 1; END$$",
    "LANGUAGE sql AS $$CREATE TEMP VIEW {v} AS SELECT * FROM public.rt14_orders; SELECT 1$$",
    "LANGUAGE plpgsql AS $$BEGIN CREATE VIEW pg_temp.{v} AS SELECT * FROM public.rt14_orders; "
    "RETURN 1; END$$",
    "LANGUAGE plpgsql AS $$BEGIN CREATE OR REPLACE TEMPORARY VIEW {v} AS SELECT id, status "
    "FROM rt14_orders; RETURN 1; END$$",
    "LANGUAGE plpgsql AS $$BEGIN EXECUTE 'SELECT 1'; CREATE TEMP RECURSIVE VIEW {v} (id, "
    "status) AS SELECT id, status FROM rt14_orders UNION SELECT id, status FROM {v} "
    "WHERE false; RETURN 1; END$$",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(BODIES)))
def test_a_temp_view_made_by_a_function_body_changes_no_protected_row(gproxy, pg, psql_bin,
                                                                     orders, mode, case):
    n = next(_n)
    v, fn = f"rt14_sh{n}", f"rt14_mk{n}"
    pg.execute(f"DROP TABLE IF EXISTS {v}; CREATE TABLE {v} (id int, status text)", dbname=DB)
    try:
        said = _run(mode, gproxy, psql_bin, [
            f"CREATE FUNCTION {fn}() RETURNS int " + BODIES[case].format(v=v),
            f"SELECT {fn}()",
            f"UPDATE {v} SET status = 'cancelled' WHERE id = 2",
            f"DELETE FROM {v} WHERE id = 3"])
        assert orders() == [(i, "new") for i in range(1, 6)], (mode, case, said)
    finally:
        pg.execute(f"DROP TABLE IF EXISTS {v} CASCADE; DROP FUNCTION IF EXISTS {fn}()",
                   dbname=DB)


@pytest.mark.parametrize("mode", ["psql", "psycopg", "psycopg-prepared"])
def test_a_view_in_the_sessions_temp_schema_by_its_number_is_known(gproxy, pg, psql_bin,
                                                                   orders, mode):
    n = next(_n)
    v = f"rt14_tv{n}"
    pg.execute(f"DROP TABLE IF EXISTS {v}; CREATE TABLE {v} (id int, status text)", dbname=DB)
    try:
        if mode == "psql":      # one session: the temp schema's number is its own
            r = run_psql(psql_bin, _dsn(gproxy), "-v", "ON_ERROR_STOP=0", input=(
                "CREATE TEMP TABLE rt14_x (i int);\n"
                "SELECT nspname AS tmp FROM pg_namespace WHERE oid = pg_my_temp_schema() "
                "\\gset\n"
                f"CREATE VIEW :tmp.{v} AS SELECT * FROM public.rt14_orders;\n"
                f"UPDATE {v} SET status = 'cancelled' WHERE id = 4;\n"))
            said = r.stdout + r.stderr
            assert "pg_temp_" in said or "CREATE VIEW" in said, said
        else:
            with psycopg.connect(_dsn(gproxy), autocommit=True) as c:
                c.execute("CREATE TEMP TABLE rt14_x (i int)")
                tmp = c.execute("SELECT nspname FROM pg_namespace WHERE oid = "
                                "pg_my_temp_schema()").fetchone()[0]
                said = ""
                for s in (f"CREATE VIEW {tmp}.{v} AS SELECT * FROM public.rt14_orders",
                          f"UPDATE {v} SET status = 'cancelled' WHERE id = 4"):
                    try:
                        c.execute(s, prepare=mode == "psycopg-prepared" or None)
                    except psycopg.Error as e:
                        said += f"{e.sqlstate} {e}\n"
        assert orders() == [(i, "new") for i in range(1, 6)], (mode, said)
        assert "approv" in said, said
    finally:
        pg.execute(f"DROP TABLE IF EXISTS {v} CASCADE", dbname=DB)


# (round 17, helper 88) a table named like its parent in another schema passed as "a
# reference to itself" (names compared without their schema): CREATE TABLE x.orders
# (oid int REFERENCES public.orders) put triggers on orders refusing the app's DELETEs
SAME_NAME = [
    "CREATE TABLE rt14s{n}.rt14_p (id int, pid int REFERENCES public.rt14_p)",
    "CREATE TABLE rt14s{n}.rt14_p (id int, pid int, FOREIGN KEY (pid) REFERENCES rt14_p (id))",
    "CREATE TABLE rt14s{n}.rt14_p (id int, pid int REFERENCES public.rt14_p (id) "
    "MATCH FULL)",
    "CREATE TABLE rt14s{n}.rt14_p (id int, pid int, CONSTRAINT k FOREIGN KEY (pid) "
    "REFERENCES \"public\".\"rt14_p\")",
    "CREATE TABLE rt14s{n}.rt14_p (id int, pid int REFERENCES public.rt14_p DEFERRABLE)",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(SAME_NAME)))
def test_a_same_named_table_elsewhere_is_no_self_reference(gproxy, pg, psql_bin, parent,
                                                            mode, case):
    n = next(_n)
    pg.execute(f"CREATE SCHEMA IF NOT EXISTS rt14s{n}; GRANT ALL ON SCHEMA rt14s{n} TO "
               "PUBLIC", dbname=DB)
    try:
        said = _run(mode, gproxy, psql_bin, [SAME_NAME[case].format(n=n)])
        made = pg.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND "
                          "confrelid = 'public.rt14_p'::regclass", dbname=DB)
    finally:
        pg.execute(f"DROP SCHEMA rt14s{n} CASCADE", dbname=DB)
    assert made == [(0,)], (mode, SAME_NAME[case], said)
