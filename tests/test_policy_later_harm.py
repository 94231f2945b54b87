# Red team, round 16 (helper 70): DDL an agent was allowed that harms a DBA's objects
# later, in other sessions:
#   CREATE INDEX ON orders ((CASE WHEN id > 1000 THEN 1 / (id - id) END))   every later
#       INSERT failed (division by zero); a partial index's predicate and an index over a
#       9000-byte expression did the same; CREATE STATISTICS over such an expression made
#       ANALYZE (and autovacuum's) fail
#   CREATE TABLE x (order_id int REFERENCES orders)    the DBA's DELETE, key UPDATE and
#       TRUNCATE of orders refused while x's rows refer to them
#   ALTER INDEX orders_created_at_idx DEPENDS ON EXTENSION pg_trgm    a later plain DROP
#       EXTENSION dropped the DBA's index with it
#   REFRESH MATERIALIZED VIEW order_stats WITH NO DATA    every later read of it failed
#   ALTER TEXT SEARCH CONFIGURATION shop_fts DROP MAPPING FOR asciiword    searches broke
#   ALTER TABLE orders ENABLE [ALWAYS] TRIGGER t    a trigger the DBA switched off ran again
#   ALTER SEQUENCE s OWNED BY <a temporary table's column>    the session's end drops the
#       sequence and the DEFAULT of the DBA's column drawing from it
# Each is refused to an agent now (destructive, or opaque for the triggers). Judged
# upstream: the catalog unchanged, and the DBA's own statements going through afterwards.
from __future__ import annotations

import psycopg
import pytest
from each_client import MODES, said

import test_policy_blast_fastlane

gproxy = test_policy_blast_fastlane.gproxy
DB = "postgres"

HARMS = {
    "expression-index": "CREATE INDEX lh_c ON lh_t ((CASE WHEN id > 1000 THEN 1 / (id - id) "
                        "ELSE 0 END))",
    "partial-index": "CREATE INDEX lh_c ON lh_t (id) WHERE (CASE WHEN id > 1000 THEN "
                     "1 / (id - id) ELSE 1 END) = 1",
    "wide-index": "CREATE INDEX lh_c ON lh_t ((CASE WHEN id > 1000 THEN repeat('x', 9000) "
                  "ELSE '' END))",
    "statistics": "CREATE STATISTICS lh_c ON (CASE WHEN id > 1000 THEN 1 / (id - id) END), "
                  "note FROM lh_t",
    "foreign-key-column": "CREATE TABLE lh_c (x int REFERENCES lh_gate(id))",
    "foreign-key-table": "CREATE TABLE lh_c (x int, FOREIGN KEY (x) REFERENCES lh_gate)",
    "depends-on-extension": "ALTER INDEX lh_i DEPENDS ON EXTENSION plpgsql",
    "refresh-no-data": "REFRESH MATERIALIZED VIEW lh_mv WITH NO DATA",
    "text-search": "ALTER TEXT SEARCH CONFIGURATION lh_ts DROP MAPPING FOR asciiword",
    "enable-trigger": "ALTER TABLE lh_t ENABLE TRIGGER lh_trg",
    "enable-always-trigger": "ALTER TABLE lh_t ENABLE ALWAYS TRIGGER lh_trg",
    "sequence-owned-by": "CREATE TEMP TABLE lh_tmp (x int); "
                         "ALTER SEQUENCE lh_s OWNED BY lh_tmp.x",
}


@pytest.fixture()
def dba_objects(pg):
    from conftest import UPSTREAM_USER
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        _drop(c)
        c.execute("CREATE SEQUENCE lh_s")
        c.execute("CREATE TABLE lh_t (id int, note text, n bigint DEFAULT nextval('lh_s'))")
        c.execute("INSERT INTO lh_t (id, note) SELECT g, 'n' FROM generate_series(1, 10) g")
        c.execute("CREATE INDEX lh_i ON lh_t (id)")
        c.execute("CREATE TABLE lh_gate (id int PRIMARY KEY)")
        c.execute("INSERT INTO lh_gate SELECT generate_series(1, 10)")
        c.execute("CREATE MATERIALIZED VIEW lh_mv AS SELECT count(*) AS n FROM lh_t")
        c.execute("CREATE TEXT SEARCH CONFIGURATION lh_ts (COPY = english)")
        c.execute("CREATE FUNCTION lh_f() RETURNS trigger LANGUAGE plpgsql AS "
                  "$$BEGIN RAISE EXCEPTION 'lh_trg ran'; END$$")
        c.execute("CREATE TRIGGER lh_trg BEFORE INSERT ON lh_t FOR EACH ROW "
                  "EXECUTE FUNCTION lh_f()")
        c.execute("ALTER TABLE lh_t DISABLE TRIGGER lh_trg")
        for obj in ("TABLE lh_t", "TABLE lh_gate", "SEQUENCE lh_s", "MATERIALIZED VIEW lh_mv",
                    "TEXT SEARCH CONFIGURATION lh_ts", "FUNCTION lh_f()"):
            c.execute(f"ALTER {obj} OWNER TO {UPSTREAM_USER}")
    yield
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        _drop(c)


def _drop(c) -> None:
    # (lh_t first: an index lh_c on it goes with it, a table lh_c is left for the next)
    c.execute("DROP MATERIALIZED VIEW IF EXISTS lh_mv; DROP TABLE IF EXISTS lh_t CASCADE; "
              "DROP TABLE IF EXISTS lh_c, lh_gate CASCADE; DROP SEQUENCE IF EXISTS lh_s; "
              "DROP FUNCTION IF EXISTS lh_f(); DROP TEXT SEARCH CONFIGURATION IF EXISTS lh_ts")


def _state(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        def one(sql):
            return c.execute(sql).fetchall()
        return {
            "objects": one("SELECT relname FROM pg_class WHERE relname = 'lh_c' UNION ALL "
                           "SELECT stxname FROM pg_statistic_ext WHERE stxname = 'lh_c'"),
            "extension-dependency": one("SELECT deptype FROM pg_depend WHERE objid = "
                                        "'lh_i'::regclass AND deptype = 'x'"),
            "populated": one("SELECT relispopulated FROM pg_class WHERE relname = 'lh_mv'"),
            "search": one("SELECT to_tsvector('lh_ts', 'running dogs')::text"),
            "trigger": one("SELECT tgenabled FROM pg_trigger WHERE tgname = 'lh_trg'"),
            "sequence-owner": one("SELECT deptype FROM pg_depend WHERE objid = "
                                  "'lh_s'::regclass AND deptype = 'a'"),
            "triggers-on-gate": one("SELECT count(*) FROM pg_trigger WHERE tgrelid = "
                                    "'lh_gate'::regclass"),
        }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("harm", sorted(HARMS))
def test_ddl_that_harms_a_dba_object_later_is_refused(gproxy, pg, dba_objects, psql_bin,
                                                      mode, harm):
    before = _state(pg)
    got = said(mode, gproxy, [s for s in HARMS[harm].split("; ")], db=DB, psql_bin=psql_bin)
    assert "42501" in got or 'rule "' in got, (harm, mode, got)
    assert _state(pg) == before, (harm, mode, got)
    # the DBA's next statements go through: writes past id 1000, ANALYZE, a delete of a
    # referenced key, the materialized view, a search
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("SET statement_timeout = '5s'")
        c.execute("INSERT INTO lh_t (id, note) VALUES (5000, 'x'), (5001, 'y')")
        c.execute("ANALYZE lh_t")
        c.execute("DELETE FROM lh_gate WHERE id = 10")
        assert c.execute("SELECT n FROM lh_mv").fetchone() == (10,)
        assert c.execute("SELECT to_tsvector('lh_ts', 'running dogs')::text").fetchone() == (
            "'dog':2 'run':1",)


def test_plain_indexes_statistics_and_tables_are_still_allowed(gproxy, pg, dba_objects):
    got = said("psycopg", gproxy, ["CREATE INDEX lh_ci ON lh_t (note, id)",
                                   "CREATE STATISTICS lh_st ON id, note FROM lh_t",
                                   "CREATE TABLE lh_own (id int PRIMARY KEY, v text)",
                                   "REFRESH MATERIALIZED VIEW lh_mv",
                                   "ALTER INDEX lh_i NO DEPENDS ON EXTENSION plpgsql"], db=DB)
    assert got == "", got
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM pg_class WHERE relname IN ('lh_ci', 'lh_own')"
                         ).fetchone() == (2,)
        assert c.execute("SELECT count(*) FROM pg_statistic_ext WHERE stxname = 'lh_st'"
                         ).fetchone() == (1,)
        c.execute("DROP TABLE lh_own")
