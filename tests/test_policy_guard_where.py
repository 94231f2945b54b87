# Issue 11: "matches every row" is judged by syntax, never by evaluating constants. WHERE
# clauses that reach every row in ways the old constant evaluation missed are refused
# through the real proxy (psycopg, asyncpg prepared statements, psql, raw frames), and
# narrowing WHERE clauses still run. The truth is the table upstream.
import asyncio

import asyncpg
import psycopg
import pytest

import rawpg
from conftest import AGENT, AGENT_PASSWORD, run_psql
from test_policy_guard_settings import guarded_proxy, refused


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    p = guarded_proxy(pg, tmp_path_factory.mktemp("gwhere"))
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def schema(pg):
    pg.execute("""
        DROP TABLE IF EXISTS gw_items, gw_other, gw_src;
        CREATE TABLE gw_items (id int PRIMARY KEY, name text, price float8, code char(2),
                               f4 float4);
        INSERT INTO gw_items SELECT g, 'n' || g, 'NaN', 'a', 0.1 FROM generate_series(1, 6) g;
        CREATE TABLE gw_other (id int, tid int);
        INSERT INTO gw_other VALUES (1, 1);
        CREATE TABLE gw_src (id int, x int);
        INSERT INTO gw_src VALUES (1, 1);
    """, dbname="appdb")


def rows(pg):
    return pg.execute("SELECT id, name FROM gw_items ORDER BY id", dbname="appdb")


EVERY_ROW = [
    # constants Python used to evaluate (and evaluated differently from Postgres)
    "DELETE FROM gw_items WHERE 'NaN'::float8 = 'NaN'::float8",
    "DELETE FROM gw_items WHERE 'a '::char(2) = 'a'",
    "DELETE FROM gw_items WHERE 0.1::float4 = 0.1::float4",
    "DELETE FROM gw_items WHERE price = 'NaN'::float8 OR 1 = 2",
    # the row compared with itself
    "DELETE FROM gw_items WHERE gw_items.id = id",
    "DELETE FROM gw_items t WHERE t.name = t.name",
    "UPDATE gw_items SET name = 'x' WHERE id IS NOT DISTINCT FROM id",
    "UPDATE gw_items SET name = 'x' WHERE NOT (id <> id)",
    "DELETE FROM gw_items WHERE name IS NOT NULL",
    "DELETE FROM gw_items WHERE NOT (name IS NULL)",
    # a branch that does not depend on the row
    "DELETE FROM gw_items WHERE id = 1 OR true",
    "DELETE FROM gw_items WHERE name = name OR id = 1",
    "DELETE FROM gw_items WHERE id = 1 OR EXISTS (SELECT 1 FROM gw_other)",
    # subqueries and other tables only
    "DELETE FROM gw_items WHERE EXISTS (SELECT 1 FROM gw_other)",
    "DELETE FROM gw_items WHERE EXISTS (SELECT 1 FROM gw_items WHERE gw_items.id > 0)",
    "DELETE FROM gw_items USING gw_other WHERE gw_other.id = 1",
    "UPDATE gw_items SET name = 'x' FROM gw_other o WHERE o.tid = 1",
    "DELETE FROM gw_items WHERE (SELECT count(*) FROM gw_other) > 0",
    # DO-block variables and function parameters
    "DO $$ DECLARE v int := 1; BEGIN DELETE FROM gw_items WHERE v = 1; END $$",
    "DO $$ DECLARE r record; BEGIN FOR r IN SELECT 1 AS id LOOP "
    "DELETE FROM gw_items WHERE r.id = 1; END LOOP; END $$",
    "DO $$ BEGIN UPDATE gw_items SET name = 'x' WHERE now() > '2000-01-01'; END $$",
    # MERGE whose join does not narrow the target
    "MERGE INTO gw_items t USING gw_src s ON s.id = 1 WHEN MATCHED THEN DELETE",
    "MERGE INTO gw_items t USING gw_src s ON t.id = t.id WHEN MATCHED AND s.x = 1 "
    "THEN UPDATE SET name = 'x'",
]


@pytest.mark.parametrize("sql", EVERY_ROW)
def test_every_row_where_is_refused(pg, guarded, sql):
    before = rows(pg)
    msg = refused(guarded, sql).message_primary
    assert 'rule "guarded-default"' in msg and ("every row" in msg or "WHERE" in msg), msg
    assert rows(pg) == before


def test_prepared_statements_and_parameters(pg, guarded):
    before = rows(pg)

    async def main():
        conn = await asyncpg.connect(guarded.dsn(dbname="appdb"))
        try:
            for sql, args in (("DELETE FROM gw_items WHERE $1", (True,)),
                              ("DELETE FROM gw_items WHERE $1 = $2", (1, 1)),
                              ("UPDATE gw_items SET name = $1 WHERE $2::int > 0", ("x", 1)),
                              ("DELETE FROM gw_items WHERE id = id AND $1", (True,)),
                              ("DELETE FROM gw_items WHERE $1::int IS NOT NULL",
                               (5,))):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql, *args)
            # narrowing statements run, with parameters, prepared and reused
            stmt = await conn.prepare("UPDATE gw_items SET name = $1 WHERE id = $2")
            await stmt.fetch("two", 2)
            await stmt.fetch("three", 3)
        finally:
            await conn.close()
    asyncio.run(main())
    after = dict(before)
    after.update({2: "two", 3: "three"})
    assert rows(pg) == sorted(after.items())


def test_raw_pipeline_refuses_every_row_and_runs_nothing_after(pg, guarded):
    c = rawpg.RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database="appdb")
    try:
        c.send(rawpg.parse("DELETE FROM gw_items WHERE id = 1"), rawpg.bind(),
               rawpg.execute(),
               rawpg.parse("DELETE FROM gw_items WHERE name IS NOT NULL"), rawpg.bind(),
               rawpg.execute(),
               rawpg.parse("DELETE FROM gw_items WHERE id = 2"), rawpg.bind(),
               rawpg.execute(), rawpg.SYNC)
        msgs = c.until_ready()
        assert [e["C"] for e in rawpg.errors(msgs)] == ["42501"]
        assert rawpg.tags(msgs) == ["DELETE 1"]
    finally:
        c.close()
    # Postgres' own semantics: the pipeline's implicit transaction rolled back
    assert [r[0] for r in rows(pg)] == [1, 2, 3, 4, 5, 6]


def test_psql(pg, guarded, psql_bin):
    r = run_psql(psql_bin, guarded.dsn(dbname="appdb"), "-v", "ON_ERROR_STOP=0",
                 input="DELETE FROM gw_items WHERE gw_items.id = id;\n"
                       "DELETE FROM gw_items USING gw_other WHERE gw_other.id = 1;\n"
                       "UPDATE gw_items SET name = 'z' WHERE name IS NOT NULL;\n"
                       "DELETE FROM gw_items WHERE 'NaN'::float8 = 'NaN'::float8;\n"
                       "DO $$ DECLARE v int := 3; BEGIN DELETE FROM gw_items WHERE v > 0; "
                       "END $$;\n"
                       "DELETE FROM gw_items WHERE id = 6;\n")
    assert r.stderr.count('refused by rule "guarded-default"') == 5, r.stderr
    assert "DELETE 1" in r.stdout
    assert [x[0] for x in rows(pg)] == [1, 2, 3, 4, 5]


NARROWING = [
    ("DELETE FROM gw_items WHERE id = 1", [2, 3, 4, 5, 6]),
    ("DELETE FROM gw_items t WHERE t.id IN (1, 2)", [3, 4, 5, 6]),
    ("DELETE FROM gw_items USING gw_other WHERE gw_items.id = gw_other.tid", [2, 3, 4, 5, 6]),
    ("DELETE FROM gw_items WHERE EXISTS (SELECT 1 FROM gw_other o WHERE o.tid = gw_items.id)",
     [2, 3, 4, 5, 6]),
    ("DELETE FROM gw_items WHERE id IN (SELECT tid FROM gw_other)", [2, 3, 4, 5, 6]),
    ("DO $$ DECLARE v int := 4; BEGIN DELETE FROM gw_items WHERE id = v; END $$",
     [1, 2, 3, 5, 6]),
    ("MERGE INTO gw_items t USING gw_src s ON t.id = s.id WHEN MATCHED AND s.x = 1 "
     "THEN DELETE", [2, 3, 4, 5, 6]),
    ("DELETE FROM gw_items WHERE name IS NULL OR id = 6", [1, 2, 3, 4, 5]),
]


@pytest.mark.parametrize("sql,left", NARROWING)
def test_narrowing_where_still_runs(pg, guarded, sql, left):
    with psycopg.connect(guarded.dsn(dbname="appdb"), autocommit=True) as conn:
        psycopg.ClientCursor(conn).execute(sql)
    assert [r[0] for r in rows(pg)] == left
