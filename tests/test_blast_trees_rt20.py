# Red team, round 20 (blast radius), judged by the rows upstream: the "every row" check
# measured the wrong relation or none at all
#  T  - a temporary table of the same name: `UPDATE public.t ... WHERE id > 0` reached
#       every row of public.t while the check counted the agent's temporary t;
#  P  - a partitioned table written where the command tag does not count (a CTE, MERGE,
#       an upsert, DO, a SQL function, two statements in one Query): its own tuple
#       counters stay 0, so every row of it was never noticed;
#  I  - an inheritance parent written the same way: its counters count only its own
#       rows while its rows (what the check counts) include its children's.
# Each relation is a DBA's, 20 to 56 rows, far below the row limit: only "every row"
# refuses. What leaves a row untouched still runs.
from __future__ import annotations

import psycopg
import pytest
from conftest import AGENT, AGENT_PASSWORD, run_psql
from each_client import said
import test_policy_blast_fastlane

gproxy = test_policy_blast_fastlane.gproxy

SETUP = """
DROP TABLE IF EXISTS tr_plain, tr_part, tr_par, tr_kid CASCADE;
CREATE TABLE tr_plain (id int PRIMARY KEY, v text NOT NULL DEFAULT 'orig');
INSERT INTO tr_plain SELECT g, 'orig' FROM generate_series(1, 20) g;
CREATE TABLE tr_part (id int, v text NOT NULL DEFAULT 'orig') PARTITION BY RANGE (id);
CREATE TABLE tr_part_a PARTITION OF tr_part FOR VALUES FROM (1) TO (11);
CREATE TABLE tr_part_b PARTITION OF tr_part FOR VALUES FROM (11) TO (100);
CREATE UNIQUE INDEX ON tr_part (id);
INSERT INTO tr_part SELECT g, 'orig' FROM generate_series(1, 20) g;
CREATE TABLE tr_par (id int PRIMARY KEY, v text NOT NULL DEFAULT 'orig');
CREATE TABLE tr_kid () INHERITS (tr_par);
INSERT INTO tr_par SELECT g, 'orig' FROM generate_series(1, 5) g;
INSERT INTO tr_kid SELECT g, 'orig' FROM generate_series(6, 56) g;
CREATE OR REPLACE FUNCTION tr_bump_part() RETURNS SETOF int LANGUAGE sql AS
  'UPDATE tr_part SET v = ''x'' WHERE id > 0 RETURNING id';
GRANT ALL ON tr_plain, tr_part, tr_part_a, tr_part_b, tr_par, tr_kid TO PUBLIC;
"""


@pytest.fixture()
def trees(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(SETUP)
    yield
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS tr_plain, tr_part, tr_par, tr_kid CASCADE; "
                  "DROP FUNCTION IF EXISTS tr_bump_part()")


def truth(pg) -> dict[str, tuple[int, int]]:
    """Per table (rows, rows changed from 'orig'), read upstream (tr_par: with tr_kid)."""
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return {t: c.execute(f"SELECT count(*), count(*) FILTER (WHERE v <> 'orig') "
                             f"FROM {t}").fetchone()
                for t in ("tr_plain", "tr_part", "tr_par")}


UNTOUCHED = {"tr_plain": (20, 0), "tr_part": (20, 0), "tr_par": (56, 0)}

TEMP = ["CREATE TEMP TABLE tr_plain (id int, v text)",
        "INSERT INTO tr_plain SELECT g, 'tmp' FROM generate_series(1, 500) g"]
# (setup statements, the attack): every row of the DBA's table
EVERY = {
    "temp-update": (TEMP, "UPDATE public.tr_plain SET v = 'x' WHERE id > 0"),
    "temp-delete": (TEMP, "DELETE FROM public.tr_plain WHERE id > 0"),
    "temp-cte": (TEMP, "WITH u AS (UPDATE public.tr_plain SET v = 'x' WHERE id > 0 "
                         "RETURNING 1) SELECT count(*) FROM u"),
    "temp-merge": (TEMP, "MERGE INTO public.tr_plain t USING public.tr_plain s "
                           "ON t.id = s.id WHEN MATCHED AND t.id > 0 THEN UPDATE SET v = 'x'"),
    "temp-do": (TEMP, "DO $$BEGIN UPDATE public.tr_plain SET v = 'x' WHERE id > 0; END$$"),
    "part-cte": ([], "WITH u AS (UPDATE tr_part SET v = 'x' WHERE id > 0 RETURNING 1) "
                     "SELECT count(*) FROM u"),
    "part-cte-delete": ([], "WITH d AS (DELETE FROM tr_part WHERE id > 0 RETURNING 1) "
                            "SELECT count(*) FROM d"),
    "part-merge": ([], "MERGE INTO tr_part t USING (SELECT id FROM tr_part) s ON t.id = s.id "
                       "WHEN MATCHED AND s.id > 0 THEN UPDATE SET v = 'x'"),
    "part-upsert": ([], "INSERT INTO tr_part SELECT id, v FROM tr_part "
                        "ON CONFLICT (id) DO UPDATE SET v = 'x'"),
    "part-do": ([], "DO $$BEGIN UPDATE tr_part SET v = 'x' WHERE id > 0; END$$"),
    "part-function": ([], "SELECT count(*) FROM tr_bump_part()"),
    "inherit-cte": ([], "WITH u AS (UPDATE tr_par SET v = 'x' WHERE id > 0 RETURNING 1) "
                        "SELECT count(*) FROM u"),
    "inherit-do": ([], "DO $$BEGIN UPDATE tr_par SET v = 'x' WHERE id > 0; END$$"),
    "inherit-merge": ([], "MERGE INTO tr_par t USING (SELECT id FROM tr_par) s "
                          "ON t.id = s.id WHEN MATCHED AND s.id > 0 THEN UPDATE SET v = 'x'"),
}

CLIENTS = ["psql", "psycopg", "psycopg-prepared", "asyncpg", "raw"]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("name", list(EVERY))
def test_every_row_of_a_tree_or_a_shadowed_table_commits_nothing(gproxy, pg, trees,
                                                                 psql_bin, name, client):
    setup, attack = EVERY[name]
    for _ in range(2):                      # the second time from the decision cache
        out = said(client, gproxy, [*setup, attack], db="postgres", psql_bin=psql_bin)
        assert truth(pg) == UNTOUCHED, (name, client, out)
    assert "blast-radius" in out and "every row" in out, out


def test_two_statements_in_one_query_reaching_every_partition_row(gproxy, pg, trees,
                                                                  psql_bin):
    r = run_psql(psql_bin, gproxy.dsn(AGENT, AGENT_PASSWORD), "-v", "ON_ERROR_STOP=0",
                 "-c", "UPDATE tr_part SET v = 'x' WHERE id <= 10; "
                       "UPDATE tr_part SET v = 'y' WHERE id > 10")
    assert truth(pg) == UNTOUCHED, r.stdout + r.stderr
    assert "every row" in r.stderr


# a row of the DBA's table left as it was: these run
SOME = {
    "temp-own-rows": (TEMP, "UPDATE tr_plain SET v = 'x' WHERE id <= 50",
                      {"tr_plain": (20, 0)}),
    "temp-public-some": (TEMP, "UPDATE public.tr_plain SET v = 'x' WHERE id <= 10",
                         {"tr_plain": (20, 10)}),
    "part-cte-some": ([], "WITH u AS (UPDATE tr_part SET v = 'x' WHERE id <= 15 "
                          "RETURNING 1) SELECT count(*) FROM u", {"tr_part": (20, 15)}),
    "part-upsert-some": ([], "INSERT INTO tr_part SELECT g, 'n' FROM generate_series(15, 30) g "
                             "ON CONFLICT (id) DO UPDATE SET v = 'x'", {"tr_part": (30, 16)}),
    "inherit-cte-some": ([], "WITH u AS (UPDATE tr_par SET v = 'x' WHERE id <= 40 "
                             "RETURNING 1) SELECT count(*) FROM u", {"tr_par": (56, 40)}),
    "inherit-only-parent": ([], "WITH u AS (UPDATE ONLY tr_par SET v = 'x' WHERE id > 0 "
                                "RETURNING 1) SELECT count(*) FROM u", {"tr_par": (56, 5)}),
}


@pytest.mark.parametrize("client", ["psycopg", "raw"])
@pytest.mark.parametrize("name", list(SOME))
def test_a_row_left_as_it_was_runs(gproxy, pg, trees, name, client):
    setup, sql, expected = SOME[name]
    out = said(client, gproxy, [*setup, sql], db="postgres")
    assert {t: truth(pg)[t] for t in expected} == expected, (name, out)
