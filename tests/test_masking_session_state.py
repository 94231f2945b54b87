# Red team, round 15: masked values kept in the session's own state. setseed() of an
# expression over a masked column seeds the session's random generator with it; random()
# afterwards reads no table (nothing to mask) and the generator can be run backwards
# (xoroshiro128** seeded through splitmix64 in Postgres 15), so two random() values gave
# back the seed: whole SSNs, emails, card numbers. A statement reading masked columns
# may now call a volatile built-in only when it is one that keeps nothing of its
# arguments (masking.parking.KEEPS_NOTHING; the volatility is Postgres' own marking,
# read from pg_proc), as it may call no function of the agent's.
#
# Judged upstream: the agent writes the random() it gets next into its own table; the
# test compares it with the random() the same setseed of the clear value gives directly.
import pytest
from each_client import said
from mask_corpus import DB, MASKS, seed

# (setseed statement as the agent sends it, the same over the clear value, run directly)
SHAPES = [
    ("SELECT setseed(replace(ssn, '-', '')::bigint / 1e9) FROM customers WHERE id = 1",
     "SELECT setseed(replace(ssn, '-', '')::bigint / 1e9) FROM customers WHERE id = 1"),
    ("SELECT 1 FROM customers WHERE id = 2 AND setseed(ascii(email) / 256.0) IS NULL",
     "SELECT 1 FROM customers WHERE id = 2 AND setseed(ascii(email) / 256.0) IS NULL"),
    ("WITH s AS (SELECT pg_catalog.setseed(ascii(substr(phone, 4, 1)) / 256.0) AS x "
     "FROM customers WHERE id = 3) SELECT count(*) FROM s",
     "WITH s AS (SELECT pg_catalog.setseed(ascii(substr(phone, 4, 1)) / 256.0) AS x "
     "FROM customers WHERE id = 3) SELECT count(*) FROM s"),
    ("SELECT count(*) FROM customers c, LATERAL (SELECT setseed(length(c.email) / 100.0)) s "
     "WHERE c.id = 1",
     "SELECT count(*) FROM customers c, LATERAL (SELECT setseed(length(c.email) / 100.0)) s "
     "WHERE c.id = 1"),
    ("SELECT CASE WHEN id = 2 THEN setseed(ascii(ssn) / 256.0) END FROM customers "
     "ORDER BY id",
     "SELECT CASE WHEN id = 2 THEN setseed(ascii(ssn) / 256.0) END FROM customers "
     "ORDER BY id"),
]
MODES = ["psql", "psycopg", "psycopg-binary", "asyncpg", "raw"]


@pytest.fixture(scope="module")
def rt15proxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    pg.execute("DROP TABLE IF EXISTS rt15_out; CREATE TABLE rt15_out (v float8);"
               "GRANT ALL ON rt15_out TO PUBLIC", dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-rt15"), extra=MASKS).start()
    yield p
    p.stop()


def _direct_random(pg, sql: str) -> float:
    # one session: the setseed over the clear value, then the next random()
    with pg.connect("postgres", DB) as conn:
        conn.execute(sql)
        return conn.execute("SELECT random()").fetchone()[0]


def _kept(pg) -> list:
    rows = pg.execute("SELECT v FROM rt15_out", dbname=DB)
    pg.execute("TRUNCATE rt15_out", dbname=DB)
    return [r[0] for r in rows]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_setseed_of_a_masked_value_is_refused(rt15proxy, pg, psql_bin, mode, case):
    agent_sql, clear_sql = SHAPES[case]
    truth = _direct_random(pg, clear_sql)
    _kept(pg)
    got = said(mode, rt15proxy, [agent_sql, "INSERT INTO rt15_out SELECT random()"],
               db=DB, psql_bin=psql_bin, extended_at=0)
    kept = _kept(pg)
    assert len(kept) == 1, (mode, got)
    assert kept[0] != truth, (mode, agent_sql, "the random state carries the value")
    assert 'rule "masking"' in got, got


@pytest.mark.parametrize("mode", MODES)
def test_setseed_of_a_constant_and_random_over_masked_rows_still_run(rt15proxy, pg,
                                                                     psql_bin, mode):
    """What keeps nothing stays allowed: random() and clock_timestamp() next to masked
    columns, setseed() of a constant."""
    truth = _direct_random(pg, "SELECT setseed(0.25)")
    _kept(pg)
    got = said(mode, rt15proxy, [
        "SELECT email, random(), clock_timestamp() FROM customers ORDER BY random()",
        "SELECT setseed(0.25)", "INSERT INTO rt15_out SELECT random()"],
        db=DB, psql_bin=psql_bin, extended_at=0)
    assert 'rule "masking"' not in got, got
    assert _kept(pg) == [truth], (mode, got)
