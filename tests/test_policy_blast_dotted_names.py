# Red team, round 20 (helper 104): the blast-radius guard's "every row" check named a
# table in a schema whose name holds a dot ("rt.106".a) by splitting the classifier's
# "rt.106.a" at its first dot: "rt"."106.a" names nothing, its counters read 0, and a
# DELETE / UPDATE of every row ran whenever the check, not the command tag, measured it
# (CTEs, multi-statement Queries, DO blocks, INSERT ... ON CONFLICT DO UPDATE). Every
# split of such a name is measured now. Judged by the rows upstream, through psycopg
# (simple and prepared), asyncpg, a raw client and psql.
from __future__ import annotations

import psycopg
import pytest
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_USER
from guarded import fails_everywhere, guarded_proxy

DB = "appdb"
TABLES = {"schema": '"bd.s".t', "table": 'public."bd.t"', "both": '"bd.s"."x.y"'}
VARIANTS = {
    "cte-delete": "WITH d AS (DELETE FROM {t} WHERE id > 0 RETURNING 1) SELECT count(*) FROM d",
    "statements": "DELETE FROM {t} WHERE id > 0; SELECT 1",
    "do-block": "DO $$BEGIN DELETE FROM {t} WHERE id > 0; END$$",
    "on-conflict": "INSERT INTO {t} SELECT g, 0 FROM generate_series(1, 40) g "
                   "ON CONFLICT (id) DO UPDATE SET v = {t}.v + 1",
    "cte-update": "WITH u AS (UPDATE {t} SET v = v + 1 WHERE id > 0 RETURNING 1) "
                  "SELECT count(*) FROM u",
    "plain-delete": "DELETE FROM {t} WHERE id > 0",
}


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("dotted")) as p:
        yield p


@pytest.fixture
def tables(pg):
    sql = ['DROP SCHEMA IF EXISTS "bd.s" CASCADE', 'DROP TABLE IF EXISTS public."bd.t"',
           'CREATE SCHEMA "bd.s"', f'GRANT USAGE ON SCHEMA "bd.s" TO {UPSTREAM_USER}']
    for t in TABLES.values():
        sql += [f"CREATE TABLE {t} (id int PRIMARY KEY, v int)",
                f"INSERT INTO {t} SELECT g, 0 FROM generate_series(1, 40) g",
                f"GRANT ALL ON {t} TO {UPSTREAM_USER}"]
    pg.execute("; ".join(sql), dbname=DB)


def _truth(pg, t: str) -> tuple:
    return tuple(pg.execute(f"SELECT count(*), sum(v) FROM {t}", dbname=DB)[0])


@pytest.mark.parametrize("where", list(TABLES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_row_of_a_dotted_name_is_measured(gproxy, pg, psql_bin, tables, variant, where):
    t = TABLES[where]
    assert _truth(pg, t) == (40, 0)
    # (two statements cannot be prepared: Postgres' own 42601 there)
    fails_everywhere(gproxy, psql_bin, VARIANTS[variant].format(t=t), DB,
                     None if variant == "statements" else "42501")
    assert _truth(pg, t) == (40, 0)


@pytest.mark.parametrize("where", list(TABLES))
def test_a_narrow_write_of_a_dotted_name_runs(gproxy, pg, tables, where):
    t = TABLES[where]
    with psycopg.connect(gproxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB), autocommit=True) as c:
        c.execute(f"WITH d AS (DELETE FROM {t} WHERE id <= 3 RETURNING 1) SELECT count(*) FROM d")
        c.execute(f"DELETE FROM {t} WHERE id IN (4, 5)")
        c.execute(f"UPDATE {t} SET v = 1 WHERE id IN (6, 7)")
    assert _truth(pg, t) == (35, 2)
