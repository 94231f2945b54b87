# The blast-radius guard's "every row" check for MERGE and INSERT ... ON CONFLICT DO
# UPDATE (their command tags count inserted rows too, so the table's own counters say
# which rows were reached): below the row limit, a statement that updates or deletes
# every row of its table is refused and nothing commits; one that leaves a row it did not
# touch runs. Judged by the rows upstream, through a raw client (simple and extended),
# psycopg, asyncpg and psql.
from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, run_psql
import test_policy_blast_fastlane

ROWS = 20           # far below the row limit (1,000): only "every row" can refuse

gproxy = test_policy_blast_fastlane.gproxy


@pytest.fixture()
def small(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS er_t")
        c.execute("CREATE TABLE er_t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        c.execute(f"INSERT INTO er_t SELECT g, 0 FROM generate_series(1, {ROWS}) g")
        c.execute("GRANT ALL ON er_t TO PUBLIC")
    yield
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS er_t")


def truth(pg) -> tuple[int, int, int]:
    """(rows, rows with v <> 0, rows with id > ROWS) of er_t, read upstream."""
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return c.execute("SELECT count(*), count(*) FILTER (WHERE v <> 0), "
                         f"count(*) FILTER (WHERE id > {ROWS}) FROM er_t").fetchone()


# every row of er_t reached (with and without inserted rows beside them)
EVERY = {
    "merge-self-source": "MERGE INTO er_t t USING er_t s ON t.id = s.id "
                         "WHEN MATCHED AND t.id > 0 THEN UPDATE SET v = t.v + 1",
    "merge-update-and-insert": "MERGE INTO er_t t USING (SELECT g FROM generate_series(1, 25) g) s "
                               "ON t.id = s.g WHEN MATCHED THEN UPDATE SET v = 5 "
                               "WHEN NOT MATCHED THEN INSERT VALUES (s.g, 0)",
    "merge-delete-matched": "MERGE INTO er_t t USING (SELECT id FROM er_t) s ON t.id = s.id "
                            "WHEN MATCHED AND s.id > 0 THEN DELETE",
    "upsert-self-source": "INSERT INTO er_t SELECT id, v FROM er_t "
                          "ON CONFLICT (id) DO UPDATE SET v = excluded.v + 1",
    "upsert-with-new-rows": "INSERT INTO er_t SELECT g, 0 FROM generate_series(1, 30) g "
                            "ON CONFLICT (id) DO UPDATE SET v = 7",
    "merge-update-and-delete": "MERGE INTO er_t t USING er_t s ON t.id = s.id "
                               "WHEN MATCHED AND t.id <= 10 THEN DELETE "
                               "WHEN MATCHED THEN UPDATE SET v = 1",
}
# a row left that the statement did not touch: runs (old rows, changed ones, new ones)
SOME = {
    "merge-some": ("MERGE INTO er_t t USING (SELECT g FROM generate_series(15, 30) g) s "
                   "ON t.id = s.g WHEN MATCHED THEN UPDATE SET v = 5 "
                   "WHEN NOT MATCHED THEN INSERT VALUES (s.g, 0)", (ROWS + 10, 6, 10)),
    "upsert-some": ("INSERT INTO er_t SELECT g, 0 FROM generate_series(10, 40) g "
                    "ON CONFLICT (id) DO UPDATE SET v = 3", (ROWS + 20, 11, 20)),
    "merge-delete-some": ("MERGE INTO er_t t USING er_t s ON t.id = s.id "
                          "WHEN MATCHED AND t.id > 2 THEN DELETE", (2, 0, 0)),
}


def _raw_simple(gproxy, sql: str, block: bool) -> None:
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        for q in (["BEGIN", sql, "COMMIT"] if block else [sql]):
            c.run(q)
    finally:
        c.close()


def _raw_extended(gproxy, sql: str, block: bool) -> None:
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        if block:
            c.run("BEGIN")
        c.send(rawpg.parse(sql, "s1") + rawpg.bind("s1") + rawpg.execute() + rawpg.SYNC)
        c.until_ready()
        if block:
            c.run("COMMIT")
    finally:
        c.close()


def _psycopg(gproxy, sql: str, block: bool) -> None:
    with psycopg.connect(gproxy.dsn(AGENT, AGENT_PASSWORD), autocommit=not block) as c:
        try:
            c.execute(sql, prepare=True)        # extended protocol, named statement
            if block:
                c.commit()
        except psycopg.Error:
            pass


def _asyncpg(gproxy, sql: str, block: bool) -> None:
    async def go():
        c = await asyncpg.connect(gproxy.dsn(AGENT, AGENT_PASSWORD))
        try:
            if block:
                async with c.transaction():
                    await c.execute("SELECT 1")
                    await (await c.prepare(sql)).fetch()
            else:
                await (await c.prepare(sql)).fetch()
        except asyncpg.PostgresError:
            pass
        finally:
            await c.close()
    asyncio.run(go())


def _psql(gproxy, sql: str, block: bool, psql_bin: str = "") -> None:
    script = f"BEGIN;\n{sql};\nCOMMIT;\n" if block else f"{sql};\n"
    run_psql(psql_bin, gproxy.dsn(AGENT, AGENT_PASSWORD), "-v", "ON_ERROR_STOP=0",
             input=script)


CLIENTS = {"raw-simple": _raw_simple, "raw-extended": _raw_extended, "psycopg": _psycopg,
           "asyncpg": _asyncpg, "psql": _psql}


def _run(client: str, gproxy, sql: str, block: bool, psql_bin: str) -> None:
    if client == "psql":
        _psql(gproxy, sql, block, psql_bin)
    else:
        CLIENTS[client](gproxy, sql, block)


@pytest.mark.parametrize("block", [False, True], ids=["autocommit", "block"])
@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("name", list(EVERY))
def test_reaching_every_row_commits_nothing(gproxy, pg, small, psql_bin, name, client, block):
    for _ in range(2):                      # the second time from the decision cache
        _run(client, gproxy, EVERY[name], block, psql_bin)
        assert truth(pg) == (ROWS, 0, 0)


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("name", list(SOME))
def test_a_row_left_untouched_runs(gproxy, pg, small, psql_bin, name, client):
    sql, expected = SOME[name]
    _run(client, gproxy, sql, False, psql_bin)
    assert truth(pg) == expected


def test_the_refusal_says_every_row(gproxy, pg, small):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        err = rawpg.errors(c.run(EVERY["upsert-self-source"]))
    finally:
        c.close()
    assert err and err[0]["C"] == "42501"
    assert "blast-radius" in err[0]["M"] and "every row of public.er_t" in err[0]["M"]
