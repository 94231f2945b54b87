# Red team, round 19 (helper 97): the blast-radius guard measured at most 8 tables a
# statement, the first ones it writes; eight no-op writes (INSERT ... WHERE false into
# throwaway tables) in front of an UPDATE or DELETE of every row of a table left that
# table unmeasured, and it was changed whole (200 customers renamed, 50-row tables
# emptied: CTEs, multi-statement Queries, DO blocks, partitioned and inherited tables).
# A statement that writes more tables than the guard measures is refused now. Judged
# by the rows upstream, through psql, psycopg (simple and extended), asyncpg and a raw
# client.
from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_USER, run_psql
from guarded import guarded_proxy

DB = "appdb"
DUMMIES = [f"bmt_d{i}" for i in range(1, 9)]


def _noop_inserts() -> str:
    return ", ".join(f"i{i} AS (INSERT INTO {d} SELECT 1 WHERE false RETURNING 1)"
                     for i, d in enumerate(DUMMIES))


VARIANTS = {
    "cte-inserts-delete": f"WITH {_noop_inserts()} DELETE FROM bmt_target WHERE id > 0",
    "cte-deletes-update": "WITH " + ", ".join(
        f"x{i} AS (DELETE FROM {d} WHERE false RETURNING 1)" for i, d in enumerate(DUMMIES))
    + " UPDATE bmt_target SET v = v + 1 WHERE id > 0",
    "statements": "; ".join(f"UPDATE {d} SET x = x WHERE false" for d in DUMMIES)
    + "; DELETE FROM bmt_target WHERE id > 0",
    "do-block": "DO $$BEGIN " + " ".join(f"INSERT INTO {d} SELECT 1 WHERE false;"
                                        for d in DUMMIES)
    + " DELETE FROM bmt_target WHERE id > 0; END$$",
    "partitioned": f"WITH {_noop_inserts()} DELETE FROM bmt_parted WHERE id > 0",
}
CLIENTS = ["psql", "psycopg-simple", "psycopg-extended", "asyncpg", "raw"]


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("many-tables")) as p:
        yield p


@pytest.fixture
def tables(pg):
    sql = ["DROP TABLE IF EXISTS bmt_target, bmt_parted, " + ", ".join(DUMMIES),
           "CREATE TABLE bmt_target (id int PRIMARY KEY, v int)",
           "INSERT INTO bmt_target SELECT g, 0 FROM generate_series(1, 50) g",
           "CREATE TABLE bmt_parted (id int, v int) PARTITION BY RANGE (id)",
           "CREATE TABLE bmt_parted_1 PARTITION OF bmt_parted FOR VALUES FROM (0) TO (1000)",
           "INSERT INTO bmt_parted SELECT g, 0 FROM generate_series(1, 50) g"]
    sql += [f"CREATE TABLE {d} (x int)" for d in DUMMIES]
    sql.append(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {UPSTREAM_USER}")
    pg.execute("; ".join(sql), dbname=DB)


def _truth(pg) -> tuple:
    return (pg.execute("SELECT count(*), sum(v) FROM bmt_target", dbname=DB)[0],
            pg.execute("SELECT count(*) FROM bmt_parted", dbname=DB)[0][0])


def _run(client: str, proxy, psql_bin: str, sql: str) -> str | None:
    """The SQLSTATE the client got (None: it ran)."""
    dsn = proxy.dsn(dbname=DB)
    if client == "psql":
        r = run_psql(psql_bin, dsn, "-c", sql)
        return None if r.returncode == 0 else ("42501" if "42501" in r.stderr or
                                               "pgguard" in r.stderr else r.stderr)
    if client.startswith("psycopg"):
        with psycopg.connect(dsn, autocommit=True) as c:
            try:
                if client == "psycopg-simple" or ";" in sql.replace("$$", ""):
                    psycopg.ClientCursor(c).execute(sql)
                else:
                    c.execute(sql)
            except psycopg.Error as e:
                return e.sqlstate
        return None
    if client == "asyncpg":
        async def go():
            c = await asyncpg.connect(dsn)
            try:
                await c.execute(sql)
            except asyncpg.PostgresError as e:
                return e.sqlstate
            finally:
                await c.close()
        return asyncio.run(go())
    c = rawpg.RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        errs = rawpg.errors(c.run(sql))
        return errs[0]["C"] if errs else None
    finally:
        c.close()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_ninth_table_is_not_out_of_measure(gproxy, pg, psql_bin, tables, variant, client):
    before = _truth(pg)
    assert _run(client, gproxy, psql_bin, VARIANTS[variant]) == "42501"
    assert _truth(pg) == before


def test_eight_tables_are_measured_and_a_narrow_write_runs(gproxy, pg, psql_bin, tables):
    # seven dummies and the target: within what the guard measures, so judged by it:
    # every row refused, one row let through
    seven = ", ".join(f"i{i} AS (INSERT INTO {d} SELECT 1 WHERE false RETURNING 1)"
                      for i, d in enumerate(DUMMIES[:7]))
    before = _truth(pg)
    assert _run("psql", gproxy, psql_bin,
                f"WITH {seven} DELETE FROM bmt_target WHERE id > 0") == "42501"
    assert _truth(pg) == before
    assert _run("psql", gproxy, psql_bin,
                f"WITH {seven} DELETE FROM bmt_target WHERE id = 3") is None
    assert _truth(pg)[0] == (49, 0)
    # nine tables, however narrow: refused, saying why
    with psycopg.connect(gproxy.dsn(dbname=DB), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            psycopg.ClientCursor(c).execute(
                f"WITH {_noop_inserts()} DELETE FROM bmt_target WHERE id = 4")
    assert "at most 8 tables" in str(e.value) and "bmt_target" in e.value.diag.message_detail
    assert _truth(pg)[0] == (49, 0)
