# Red team, round 13, judged by what the agent receives against the seeded values and by
# the upstream catalog:
#  F1 - pg_stats read under a column-alias list (`pg_stats AS s(a, ..., x)`) or through
#       a join alias: the sample values of masked columns (histogram_bounds,
#       most_common_vals) came back reversed or digit-shifted; the same statement naming
#       the columns was refused. The statistics relations read through a renaming alias
#       count as read whole now.
#  F3 - CREATE INDEX on an expression of a masked column (`(id::text || reverse(ssn))`)
#       was allowed: the index keeps the values, and its own statistics show them keyed
#       by id. An index whose expressions or predicate read a masked column is refused
#       to a masked identity (parking).
import asyncio
import subprocess

import asyncpg
import psycopg
import pytest
import rawpg
from mask_corpus import DB, MASKS, leaks, raw_connect, run_mode, seed


@pytest.fixture(scope="module")
def rt13proxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    pg.execute("ANALYZE customers", dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-rt13"), extra=MASKS).start()
    yield p
    p.stop()


_COLS = ", ".join(f"c{i}" for i in range(1, 15))
STATS = [
    "SELECT reverse(v) FROM pg_stats AS s(a, b, c, d, e, f, g, h, i, x), "
    "unnest(x::text::text[]) v WHERE b = 'customers'",
    "SELECT reverse(x::text) FROM pg_stats AS s(a, b, c, d, e, f, g, x) "
    "WHERE b = 'customers'",
    "SELECT reverse(j.histogram_bounds::text) FROM (pg_stats JOIN pg_namespace n "
    "ON n.nspname = schemaname) AS j WHERE j.tablename = 'customers'",
    f"SELECT reverse(j.c10::text) FROM (pg_stats s JOIN pg_namespace n "
    f"ON n.nspname = s.schemaname) AS j({_COLS}) WHERE j.c2 = 'customers'",
    "SELECT reverse(j::text) FROM (pg_stats JOIN pg_namespace n ON true) AS j "
    "WHERE j.tablename = 'customers'",
    "SELECT translate(m::text, '0123456789', 'abcdefghij') FROM pg_catalog.pg_stats "
    "AS s(a, b, c, d, e, f, g, m) WHERE b = 'customers'",
    # (red team 25) a join alias's column list, its new names read unqualified
    "SELECT c, reverse(hb::text) FROM (pg_stats CROSS JOIN (SELECT 1) z) "
    "AS j(a, b, c, d, e, f, g, h, i, hb) WHERE b = 'customers'",
    "SELECT reverse(hb::text) FROM ((pg_stats CROSS JOIN (SELECT 1) z) AS j0 "
    "CROSS JOIN (SELECT 2) y) AS j(a, b, c, d, e, f, g, h, i, hb) WHERE b = 'customers'",
    "SELECT reverse(m::text) FROM (pg_catalog.pg_stats s JOIN pg_namespace n "
    "ON n.nspname = s.schemaname) AS j(a, b, c, d, e, f, g, m) WHERE b = 'customers'",
]


@pytest.mark.parametrize("mode", ["psql", "psycopg-text", "psycopg-binary",
                                  "psycopg-prepared", "asyncpg-fetch", "raw-later"])
def test_statistics_under_a_renaming_alias_are_not_read(rt13proxy, pg, psql_bin, mode):
    # the truth: the upstream's statistics hold the clear values
    truth = pg.execute("SELECT histogram_bounds::text, most_common_vals::text FROM "
                       "pg_stats WHERE tablename = 'customers'", dbname=DB)
    assert leaks(truth), truth
    for sql in STATS:
        try:
            if mode == "raw-later":     # the Parse alone: refused there
                c = raw_connect(rt13proxy)
                try:
                    c.send(rawpg.parse(sql, name="s1"), rawpg.SYNC)
                    blob = c.until_ready()
                finally:
                    c.close()
            else:
                _, blob = run_mode(mode, rt13proxy, sql, psql_bin)
        except Exception as e:      # noqa: BLE001 - the client's own way of failing
            blob = f"{e!r} {e}"
        text = str(blob)
        assert leaks(text) == [], (sql, leaks(text))
        assert 'rule \\"masking\\"' in text or 'rule "masking"' in text, (mode, sql, text)
    # the statistics' other columns stay readable
    got, blob = run_mode(mode, rt13proxy, "SELECT attname, null_frac FROM pg_stats AS "
                         "s WHERE tablename = 'customers' ORDER BY 1", psql_bin)
    assert "42501" not in str(blob) and "ssn" in str(blob), blob


INDEXES = [
    "CREATE INDEX rt13_ix{n} ON customers ((id::text || ':' || reverse(ssn)))",
    "CREATE INDEX rt13_ix{n} ON customers (lower(email))",
    "CREATE INDEX rt13_ix{n} ON public.customers USING btree ((reverse(ssn)) DESC)",
    "CREATE UNIQUE INDEX rt13_ix{n} ON customers ((id::text || translate(ssn, '0', 'z')))",
    "CREATE INDEX rt13_ix{n} ON customers (id) WHERE ssn LIKE '7%'",
    "CREATE INDEX rt13_ix{n} ON customers ((substr(ssn, 1, 3)), id)",
]
_n = iter(range(10_000))


def _run_ddl(client, proxy, sql, psql_bin):
    if client == "psql":
        r = subprocess.run([psql_bin, proxy.dsn(dbname=DB), "-X", "-c", sql],
                           capture_output=True, text=True, timeout=30)
        return r.stdout + r.stderr
    if client == "psycopg":
        with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
            try:
                c.execute(sql, prepare=True)
                return "ok"
            except psycopg.Error as e:
                return e.diag.message_primary or str(e)
    if client == "asyncpg":
        async def go():
            c = await asyncpg.connect(proxy.dsn(dbname=DB))
            try:
                await c.execute(sql)
                return "ok"
            except asyncpg.PostgresError as e:
                return str(e)
            finally:
                await c.close()
        return asyncio.run(go())
    c = raw_connect(proxy)
    try:
        c.send(rawpg.parse(sql), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
        return str(rawpg.errors(c.until_ready()))
    finally:
        c.close()


@pytest.mark.parametrize("client", ["psql", "psycopg", "asyncpg", "raw"])
@pytest.mark.parametrize("k", range(len(INDEXES)))
def test_index_over_masked_values_is_refused(rt13proxy, pg, psql_bin, client, k):
    n = next(_n)
    sql = INDEXES[k].format(n=n)
    said = _run_ddl(client, rt13proxy, sql, psql_bin)
    made = pg.execute("SELECT count(*) FROM pg_class WHERE relname = %s", [f"rt13_ix{n}"],
                      dbname=DB)[0][0]
    assert made == 0, (sql, said)
    assert "masking" in said, said


def test_index_over_unmasked_columns_still_made(rt13proxy, pg):
    with psycopg.connect(rt13proxy.dsn(dbname=DB), autocommit=True) as c:
        c.execute("CREATE INDEX IF NOT EXISTS rt13_ok ON customers ((lower(name)))")
        c.execute("CREATE INDEX IF NOT EXISTS rt13_ok2 ON customers (ssn)")  # a plain column
    got = pg.execute("SELECT count(*) FROM pg_class WHERE relname IN ('rt13_ok', 'rt13_ok2')",
                     dbname=DB)[0][0]
    assert got == 2
    pg.execute("DROP INDEX rt13_ok; DROP INDEX rt13_ok2", dbname=DB)


#  (red team 14) the same reads inside code: a DO block, a function body the agent
#  creates or one a DBA made, RAISE'd as a NOTICE or parked in a table. Refused now.
_HB = ("translate(histogram_bounds::text, '0123456789-', 'abcdefghijX') FROM pg_stats "
       "WHERE tablename = 'customers'")
CODE_READS = [
    "DO $$DECLARE r text; BEGIN SELECT string_agg(" + _HB.replace(" FROM", ", ',') FROM", 1)
    + " INTO r; RAISE NOTICE '%', r; END$$",
    "DO $$BEGIN CREATE TABLE IF NOT EXISTS rt13_loot(v text); INSERT INTO rt13_loot "
    "SELECT " + _HB + "; END$$",
    "CREATE FUNCTION rt13_st() RETURNS text LANGUAGE sql AS $$SELECT string_agg("
    + _HB.replace(" FROM", ", ',') FROM", 1) + "$$",
    "DO $$DECLARE r record; BEGIN FOR r IN SELECT most_common_vals::text AS m FROM "
    "pg_catalog.pg_stats WHERE tablename = 'customers' LOOP RAISE NOTICE '%', "
    "reverse(r.m); END LOOP; END$$",
    "DO $$BEGIN RAISE NOTICE '%', (SELECT string_agg(reverse(query), ',') FROM "
    "pg_stat_activity); END$$",
    "SELECT rt13_dba_st()",
]


@pytest.fixture(scope="module")
def dba_stats_function(rt13proxy, pg):
    pg.execute("CREATE OR REPLACE FUNCTION rt13_dba_st() RETURNS text LANGUAGE sql AS "
               "$$SELECT string_agg(" + _HB.replace(" FROM", ", ',') FROM", 1) + "$$; "
               "GRANT EXECUTE ON FUNCTION rt13_dba_st() TO PUBLIC", dbname=DB)
    yield
    pg.execute("DROP FUNCTION IF EXISTS rt13_dba_st(); DROP FUNCTION IF EXISTS rt13_st(); "
               "DROP TABLE IF EXISTS rt13_loot", dbname=DB)


def _untranslate(text: str) -> str:
    return text.translate(str.maketrans("abcdefghijX", "0123456789-"))


@pytest.mark.parametrize("client", ["psql", "psycopg", "asyncpg", "raw"])
@pytest.mark.parametrize("k", range(len(CODE_READS)))
def test_statistics_read_inside_code_are_refused(rt13proxy, pg, psql_bin, dba_stats_function,
                                                 client, k):
    sql = CODE_READS[k]
    said = _run_ddl(client, rt13proxy, sql, psql_bin)
    got = said + _untranslate(said) + said[::-1]
    assert leaks(got) == [], (sql, leaks(got))
    assert "masking" in said or 'rule "catalog"' in said, said  # (a write to a table the block creates: round 16)
    # nothing was parked or created upstream
    made = pg.execute("SELECT count(*) FROM pg_class WHERE relname = 'rt13_loot'", dbname=DB)
    assert made[0][0] == 0 or pg.execute("SELECT count(*) FROM rt13_loot",
                                         dbname=DB)[0][0] == 0
    assert pg.execute("SELECT count(*) FROM pg_proc WHERE proname = 'rt13_st'",
                      dbname=DB)[0][0] == 0
