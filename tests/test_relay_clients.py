# Real clients get identical results through pgguard and directly from Postgres.
import asyncio
import datetime as dt
import decimal

import asyncpg
import psycopg
import pytest

from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER, run_psql

SETUP = """
DROP TABLE IF EXISTS kinds;
CREATE TABLE kinds (
    id int PRIMARY KEY, n numeric, ts timestamptz, j jsonb, arr int[], b bytea,
    t text, f float8, ok bool, tarr text[]);
INSERT INTO kinds VALUES
 (1, 12345.6789, '2024-02-29 12:34:56.789+02', '{"a": [1, 2, {"b": null}]}', '{1,2,3}',
  '\\x00ff10', 'héllo wörld ✓ 日本語', 1.5e300, true, '{"x y", NULL, "z"}'),
 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (3, -0.000001, '1999-12-31 23:59:59+00', '[]', '{}', '', '', 'Infinity', false, '{}');
"""
QUERY = "SELECT * FROM kinds ORDER BY id"


@pytest.fixture(scope="module", autouse=True)
def kinds(pg):
    pg.execute(SETUP, dbname="appdb")


def direct_dsn(pg):
    return pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, "appdb")


def test_psql_output_identical(pg, proxy, psql_bin):
    script = QUERY + ";\n\\x on\n" + QUERY + ";\nSELECT 1/0;\nSELECT 'still usable' AS s;\n"
    via = run_psql(psql_bin, proxy.dsn(dbname="appdb"), "-v", "ON_ERROR_STOP=0", input=script)
    direct = run_psql(psql_bin, direct_dsn(pg), "-v", "ON_ERROR_STOP=0", input=script)
    assert via.stdout == direct.stdout
    assert "division by zero" in via.stderr
    assert "still usable" in via.stdout


@pytest.mark.parametrize("mode", ["simple", "extended", "extended-binary", "pipeline"])
def test_psycopg_identical(pg, proxy, mode):
    def fetch(dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            if mode == "simple":
                cur = psycopg.ClientCursor(conn)
                cur.execute("SELECT * FROM kinds WHERE id <= %s ORDER BY id", [3])
                return cur.fetchall(), [d.type_code for d in cur.description]
            if mode == "pipeline":
                with conn.pipeline():
                    curs = [conn.execute("SELECT * FROM kinds WHERE id = %s", [i])
                            for i in (1, 2, 3)]
                    conn.execute("INSERT INTO kinds(id) VALUES (%s) ON CONFLICT DO NOTHING",
                                 [99])
                rows = [c.fetchone() for c in curs]
                conn.execute("DELETE FROM kinds WHERE id = 99")
                return rows, None
            cur = conn.cursor(binary=(mode == "extended-binary"))
            cur.execute("SELECT * FROM kinds WHERE id <= %s ORDER BY id", [3])
            return cur.fetchall(), [d.type_code for d in cur.description]

    via = fetch(proxy.dsn(dbname="appdb"))
    direct = fetch(direct_dsn(pg))
    assert via == direct
    assert via[0][0][6] == "héllo wörld ✓ 日本語"


def test_asyncpg_binary_types_identical(pg, proxy):
    async def fetch(dsn):
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(QUERY)
            one = await conn.fetchrow("SELECT $1::int + 1 AS i, $2::numeric AS n, "
                                      "$3::timestamptz AS ts, $4::bytea AS b, $5::text[] AS a",
                                      41, decimal.Decimal("1.25"),
                                      dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
                                      b"\x00\x01", ["a", None])
            # the statement cache: the same query again uses the prepared statement
            again = await conn.fetch(QUERY)
            return [tuple(r) for r in rows], tuple(one), [tuple(r) for r in again]
        finally:
            await conn.close()

    via = asyncio.run(fetch(proxy.dsn(dbname="appdb")))
    direct = asyncio.run(fetch(direct_dsn(pg)))
    assert via == direct
    assert via[1][0] == 42 and via[1][3] == b"\x00\x01"
    assert via[0][0][5] == b"\x00\xff\x10"


def test_transactions_and_errors_keep_session_exact(proxy):
    with psycopg.connect(proxy.dsn(dbname="appdb")) as conn:
        conn.execute("CREATE TEMP TABLE tx (v int)")
        conn.execute("INSERT INTO tx VALUES (1)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("SELECT 1; DO $$BEGIN RAISE unique_violation; END$$")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename='tx'").fetchone() \
            == (0,)


def test_parameter_status_and_backend_key_reach_client(proxy):
    with psycopg.connect(proxy.dsn(dbname="appdb", application_name="probe")) as conn:
        assert conn.info.parameter_status("server_version")
        assert conn.info.parameter_status("application_name") == "probe"
        assert conn.info.backend_pid > 0
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        # the client never learns the upstream password
        assert UPSTREAM_PASSWORD not in repr(conn.info.get_parameters())
