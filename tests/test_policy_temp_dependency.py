# Red team, round 15 (helper 60): a DBA's table destroyed without DROP or TRUNCATE, and
# the database closed to everyone without ALTER ... SET.
#  R1 - CREATE TYPE pg_temp.t (...) matching a table's columns, then ALTER TABLE tbl OF
#       pg_temp.t: the table now depends on a temporary type, which Postgres drops (with
#       CASCADE) at DISCARD TEMP or when the session ends: the table went with it. ALTER
#       TABLE ... OF (any type) is refused as destructive now; so is ADD COLUMN of a
#       pg_temp type (the column goes at the session's end).
#  R2 - ALTER DATABASE db CONNECTION LIMIT 1 / ALLOW_CONNECTIONS false / IS_TEMPLATE true
#       locked every later login out (lasting); ALTER DATABASE's other options were
#       allowed. They are refused as destructive now.
# Judged upstream: the table and its rows after the agent's session ended, the column
# list, pg_database.
from __future__ import annotations

import psycopg
import pytest
from each_client import MODES, said

import test_policy_blast_fastlane

gproxy = test_policy_blast_fastlane.gproxy
DB = "postgres"
ROWS = 50

TYPE = "CREATE TYPE pg_temp.td_t AS (id int, v text)"
ROUTES = {
    "of-then-discard": [TYPE, "ALTER TABLE td_tbl OF pg_temp.td_t", "DISCARD TEMP"],
    "of-then-hang-up": [TYPE, "ALTER TABLE td_tbl OF pg_temp.td_t"],
    "of-unqualified": [TYPE, "ALTER TABLE td_tbl OF td_t", "DISCARD TEMP"],
    "of-public-type-dropped": [
        "CREATE TYPE td_pub AS (id int, v text)", "ALTER TABLE td_tbl OF td_pub",
        "DROP TYPE td_pub CASCADE"],
    "of-in-a-block": ["BEGIN", TYPE, "ALTER TABLE public.td_tbl OF pg_temp.td_t", "COMMIT",
                      "DISCARD TEMP"],
    "add-column": [TYPE, "ALTER TABLE td_tbl ADD COLUMN extra pg_temp.td_t",
                   "DISCARD TEMP"],
}


@pytest.fixture()
def dba_table(pg):
    from conftest import UPSTREAM_USER
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS td_tbl CASCADE; DROP TYPE IF EXISTS td_pub CASCADE")
        c.execute("CREATE TABLE td_tbl (id int, v text)")
        c.execute(f"INSERT INTO td_tbl SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g")
        c.execute(f"ALTER TABLE td_tbl OWNER TO {UPSTREAM_USER}")
    yield
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS td_tbl CASCADE; DROP TYPE IF EXISTS td_pub CASCADE")


def _table(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        if c.execute("SELECT to_regclass('public.td_tbl')").fetchone()[0] is None:
            return None
        cols = [r[0] for r in c.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'td_tbl'::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum")]
        typed = c.execute("SELECT reloftype <> 0 FROM pg_class WHERE oid = 'td_tbl'::regclass"
                          ).fetchone()[0]
        return c.execute("SELECT count(*) FROM td_tbl").fetchone()[0], cols, typed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_table_tied_to_a_type_that_goes_away(gproxy, pg, dba_table, psql_bin, mode, route):
    got = said(mode, gproxy, ROUTES[route], db=DB, psql_bin=psql_bin)
    # the session has ended (each client closes it): a temporary type is gone by now
    assert _table(pg) == (ROWS, ["id", "v"], False), (route, mode, got)
    assert 'rule "' in got and "destructive" in got.lower() or "42501" in got, got


def test_the_table_really_goes_with_the_type(pg, dba_table):
    """The route, run directly: what the refusal prevents."""
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(TYPE)
        c.execute("ALTER TABLE td_tbl OF pg_temp.td_t")
        c.execute("DISCARD TEMP")
    assert _table(pg) is None


DB_OPTIONS = ["CONNECTION LIMIT 1", "WITH CONNECTION LIMIT 0", "ALLOW_CONNECTIONS false",
              "WITH IS_TEMPLATE true", "IS_TEMPLATE = true CONNECTION LIMIT 2"]


def _db_state(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return c.execute("SELECT datconnlimit, datallowconn, datistemplate FROM pg_database "
                         f"WHERE datname = '{DB}'").fetchone()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", DB_OPTIONS)
def test_alter_database_options_are_refused(gproxy, pg, psql_bin, mode, option):
    from conftest import UPSTREAM_USER
    before = _db_state(pg)
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        # the upstream role may alter the database (it owns it), as in the red team's setup
        c.execute(f"ALTER DATABASE {DB} OWNER TO {UPSTREAM_USER}")
    try:
        got = said(mode, gproxy, [f"ALTER DATABASE {DB} {option}"], db=DB, psql_bin=psql_bin)
        assert _db_state(pg) == before, (mode, option, got)
        assert "42501" in got or 'rule "' in got, got
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            c.execute(f"ALTER DATABASE {DB} CONNECTION LIMIT -1 ALLOW_CONNECTIONS true "
                      "IS_TEMPLATE false")
            c.execute(f"ALTER DATABASE {DB} OWNER TO postgres")
