# Red team, round 15 (helpers 54, 60, 65, 68): constraints an agent adds to a DBA's table
# that hold today and refuse the application's writes later (or hang them):
#   CHECK (statement_timestamp() < '<in a minute>')      a time bomb on every write
#   CHECK (pg_advisory_lock(42)::text = '')              every write waits on a lock
#   FOREIGN KEY (id) REFERENCES <the agent's table>      the agent decides which rows exist
#   CREATE UNIQUE INDEX ON t ((true)) WHERE id > N       one more row, then none
#   SET NOT NULL / ADD COLUMN c int NOT NULL (no default), ALTER DOMAIN ADD CONSTRAINT
# Any constraint added to an existing table (or domain), a gating new column and a
# unique index are refused as destructive to an agent now; a plain column and an
# ordinary index are still allowed. Judged upstream: the catalog, and the DBA's INSERT
# that must still go through afterwards.
from __future__ import annotations

import psycopg
import pytest
from each_client import MODES, said

import test_policy_blast_fastlane

gproxy = test_policy_blast_fastlane.gproxy
DB = "postgres"

GATES = {
    "check-time-bomb": "ALTER TABLE wg_t ADD CONSTRAINT wg_c CHECK (statement_timestamp() < "
                       "now() + interval '1 second' OR id < 100)",
    "check-advisory": "ALTER TABLE wg_t ADD CONSTRAINT wg_c CHECK "
                      "(pg_advisory_lock(4242)::text = '' OR true)",
    "fk-gate": "ALTER TABLE wg_t ADD CONSTRAINT wg_c FOREIGN KEY (id) REFERENCES wg_gate(id)",
    "unique-true": "CREATE UNIQUE INDEX wg_c ON wg_t ((true)) WHERE id > 1000",
    "exclude": "ALTER TABLE wg_t ADD CONSTRAINT wg_c EXCLUDE USING btree ((1) WITH =) "
               "WHERE (id > 1000)",
    "set-not-null": "ALTER TABLE wg_t ALTER COLUMN note SET NOT NULL",
    "new-not-null": "ALTER TABLE wg_t ADD COLUMN wg_c int NOT NULL",
    "generated": "ALTER TABLE wg_t ADD COLUMN wg_c int GENERATED ALWAYS AS (1 / (id - 5000)) "
                 "STORED",
    "domain": "ALTER DOMAIN wg_d ADD CONSTRAINT wg_c CHECK (VALUE < 1000)",
}


@pytest.fixture()
def dba_table(pg):
    from conftest import UPSTREAM_USER
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS wg_t, wg_gate CASCADE; DROP DOMAIN IF EXISTS wg_d")
        c.execute("CREATE DOMAIN wg_d AS int")
        c.execute("CREATE TABLE wg_t (id int, note text, amount wg_d)")
        c.execute("INSERT INTO wg_t SELECT g, 'n', g FROM generate_series(1, 10) g")
        c.execute("CREATE TABLE wg_gate (id int PRIMARY KEY)")
        c.execute("INSERT INTO wg_gate SELECT generate_series(1, 10)")
        for obj in ("TABLE wg_t", "TABLE wg_gate", "DOMAIN wg_d"):
            c.execute(f"ALTER {obj} OWNER TO {UPSTREAM_USER}")
    yield
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS wg_t, wg_gate CASCADE; DROP DOMAIN IF EXISTS wg_d")


def _state(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        cons = c.execute("SELECT conname FROM pg_constraint WHERE conname = 'wg_c'").fetchall()
        idx = c.execute("SELECT 1 FROM pg_class WHERE relname = 'wg_c'").fetchall()
        cols = c.execute("SELECT attname, attnotnull FROM pg_attribute WHERE attrelid = "
                         "'wg_t'::regclass AND attnum > 0 AND NOT attisdropped "
                         "ORDER BY attnum").fetchall()
        return cons, idx, cols


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gate", sorted(GATES))
def test_a_constraint_on_a_dba_table_is_refused(gproxy, pg, dba_table, psql_bin, mode, gate):
    got = said(mode, gproxy, [GATES[gate]], db=DB, psql_bin=psql_bin)
    assert _state(pg) == ([], [], [("id", False), ("note", False), ("amount", False)]), \
        (gate, mode, got)
    assert "42501" in got or 'rule "' in got, got
    # the application's next writes go through
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("SET statement_timeout = '5s'")
        c.execute("INSERT INTO wg_t VALUES (5000, NULL, 2000), (5001, NULL, 2001)")


def test_plain_columns_and_indexes_are_still_allowed(gproxy, pg, dba_table):
    got = said("psycopg", gproxy, ["ALTER TABLE wg_t ADD COLUMN extra text",
                                   "ALTER TABLE wg_t ADD COLUMN flag int NOT NULL DEFAULT 0",
                                   "CREATE INDEX wg_i ON wg_t (note)"], db=DB)
    assert got == "", got
    _, _, cols = _state(pg)
    assert [c[0] for c in cols] == ["id", "note", "amount", "extra", "flag"]
