# Red team, round 23 (helper 123): a statement the blast-radius guard measures by the
# transaction's per-table tuple counters (several statements in one Query, a CTE, an
# upsert, a MERGE) was measured as "total after - total before" over the relations that
# exist; a DISCARD TEMP in the same Query dropped a temporary table whose counters an
# earlier UPDATE in the transaction had run up, so the total fell by them: UPDATE big
# ... WHERE id <= 4000; DISCARD TEMP changed 4,000 rows past a limit of 1,000. Such a
# statement is refused now, saying why (send the DISCARD / DROP / TRUNCATE on its own).
# Judged by the rows upstream, through psql, psycopg, asyncpg and a raw client.
from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_USER, run_psql
from guarded import guarded_proxy

DB = "appdb"
ROWS = 3000

SETUP = [
    "DROP TABLE IF EXISTS bu_big, bu_big2",
    "CREATE TABLE bu_big (id int PRIMARY KEY, v text)",
    f"INSERT INTO bu_big SELECT g, 'orig' FROM generate_series(1, {ROWS}) g",
    "CREATE TABLE bu_big2 (id int PRIMARY KEY, v text)",
    f"INSERT INTO bu_big2 SELECT g, 'orig' FROM generate_series(1, {ROWS}) g",
    f"GRANT ALL ON bu_big, bu_big2 TO {UPSTREAM_USER}",
]

# run up the counters of a temporary table first: 4 x 900 updated rows, each under the
# limit (1,000) and not every row of it
INFLATE = ["CREATE TEMP TABLE bu_t AS SELECT generate_series(1, 10000) x"] + [
    "UPDATE bu_t SET x = x WHERE x <= 900"] * 4

VARIANTS = {
    "update": "UPDATE bu_big SET v = 'pwned' WHERE id <= 2500; DISCARD TEMP",
    "delete": "DELETE FROM bu_big WHERE id > 500; DISCARD TEMP",
    "cte": "WITH u AS (UPDATE bu_big SET v = 'cte' WHERE id <= 2500 RETURNING 1) "
           "SELECT count(*) FROM u; DISCARD TEMP",
    "upsert": "INSERT INTO bu_big2 SELECT g, 'upsert' FROM generate_series(1, 2500) g "
              "ON CONFLICT (id) DO UPDATE SET v = excluded.v; DISCARD TEMP",
    "merge": "MERGE INTO bu_big2 b USING (SELECT generate_series(1, 2500) g) s "
             "ON b.id = s.g WHEN MATCHED THEN UPDATE SET v = 'merge'; DISCARD TEMP",
    "discard-first": "DISCARD TEMP; UPDATE bu_big SET v = 'first' WHERE id <= 2500",
    "drop": "UPDATE bu_big SET v = 'drop' WHERE id <= 2500; DROP TABLE bu_t",
}
CLIENTS = ["psql", "psycopg", "asyncpg", "raw"]


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("blast-uncounting")) as p:
        yield p


@pytest.fixture
def tables(pg):
    pg.execute("; ".join(SETUP), dbname=DB)


def _truth(pg) -> tuple:
    return tuple(pg.execute(f"SELECT v, count(*) FROM {t} GROUP BY v", dbname=DB)
                 for t in ("bu_big", "bu_big2"))


def _steps(client: str, proxy, psql_bin: str, steps: list[str]) -> list[str]:
    """Each step a Query of its own, in one transaction; the SQLSTATEs the client got."""
    dsn = proxy.dsn(dbname=DB)
    states: list[str] = []
    if client == "psql":
        args = [a for s in ["BEGIN", *steps, "COMMIT"] for a in ("-c", s)]
        r = run_psql(psql_bin, dsn, "-v", "ON_ERROR_STOP=0", *args)
        return ["42501"] * r.stderr.count("pgguard: statement refused")
    if client == "psycopg":
        with psycopg.connect(dsn) as c:
            for s in steps:
                try:
                    psycopg.ClientCursor(c).execute(s)
                except psycopg.Error as e:
                    states.append(e.sqlstate)
                    break
            c.commit()
        return states
    if client == "asyncpg":
        async def go():
            c = await asyncpg.connect(dsn)
            try:
                await c.execute("BEGIN")
                for s in steps:
                    try:
                        await c.execute(s)
                    except asyncpg.PostgresError as e:
                        states.append(e.sqlstate)
                        break
                await c.execute("COMMIT")
            finally:
                await c.close()
        asyncio.run(go())
        return states
    c = rawpg.RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        for s in ["BEGIN", *steps, "COMMIT"]:
            states += [e["C"] for e in rawpg.errors(c.run(s))]
    finally:
        c.close()
    return states


def test_the_write_alone_is_refused_and_the_premise_holds(gproxy, pg, tables):
    # the same write without the DISCARD is over the limit: refused by its count
    before = _truth(pg)
    assert _steps("psycopg", gproxy, "psql", INFLATE + [
        "UPDATE bu_big SET v = 'alone' WHERE id <= 2500"]) == ["42501"]
    assert _truth(pg) == before
    # and Postgres' counters do lose a dropped table's updates
    with psycopg.connect(pg.dsn(dbname=DB)) as c:
        c.execute(INFLATE[0])
        c.execute(INFLATE[1])
        total = ("SELECT sum(pg_stat_get_xact_tuples_updated(oid)) FROM pg_class "
                 "WHERE relkind = 'r'")
        assert c.execute(total).fetchone()[0] == 900
        c.execute("DISCARD TEMP")
        assert (c.execute(total).fetchone()[0] or 0) == 0
        c.rollback()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_drop_in_the_measured_statement_does_not_offset_its_rows(
        gproxy, pg, psql_bin, tables, variant, client):
    before = _truth(pg)
    got = _steps(client, gproxy, psql_bin, INFLATE + [VARIANTS[variant]])
    assert got and set(got) <= {"42501", "25P02"}, (variant, client, got)
    assert _truth(pg) == before, (variant, client)


def test_the_refusal_says_why_and_the_statements_run_apart(gproxy, pg, tables):
    with psycopg.connect(gproxy.dsn(dbname=DB)) as c:
        for s in INFLATE:
            c.execute(s)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            psycopg.ClientCursor(c).execute(
                "UPDATE bu_big SET v = 'x' WHERE id <= 20; DISCARD TEMP")
        assert "DISCARD TEMP" in str(e.value) and "counters" in str(e.value), str(e.value)
        assert "on its own" in (e.value.diag.message_hint or "")
        c.rollback()
        # sent apart, each is judged by itself: the write within the limit runs
        for s in INFLATE:
            c.execute(s)
        assert c.execute("UPDATE bu_big SET v = 'x' WHERE id <= 20").rowcount == 20
        c.execute("DISCARD TEMP")
        c.commit()
    assert ("x", 20) in _truth(pg)[0]
