# Red team, round 20 (masking), judged against the seeded clear values: a set operation
# (UNION, UNION ALL, INTERSECT, EXCEPT, a recursive CTE) under a Sort, Unique, Limit or
# aggregate node is printed by EXPLAIN with its first member's expressions, at every
# node above it: a clean first branch hid a second branch computed from a masked column
# (reverse(ssn), replace(email, ...), base64 of it). Such columns are masked now, through
# every client, COPY and a SQL cursor; a set operation over clean columns stays clear.
import pytest
import rawpg
from mask_corpus import DB, MASKS, MODES, copy_mode, direct_mode, leaks, raw_connect, \
    run_mode, seed

SET_OPS = [
    "SELECT name FROM customers WHERE id = 1 UNION SELECT reverse(ssn) FROM customers "
    "WHERE id = 1",
    "SELECT 'x' UNION SELECT replace(email, '@', ' at ') FROM customers",
    "SELECT NULL::text UNION ALL SELECT encode(ssn::bytea, 'base64') FROM customers LIMIT 5",
    "SELECT * FROM (SELECT reverse(name) AS a FROM customers UNION ALL "
    "SELECT reverse(ssn) FROM customers) s ORDER BY 1",
    "SELECT DISTINCT a FROM (SELECT name AS a FROM customers UNION ALL "
    "SELECT reverse(phone) FROM customers) s",
    "SELECT name FROM customers INTERSECT SELECT name FROM customers "
    "UNION SELECT reverse(ssn) FROM customers",
    "SELECT name FROM customers WHERE false UNION SELECT reverse(email) FROM customers "
    "LIMIT 10",
    "WITH RECURSIVE r(v, n) AS (SELECT 'a'::text, 0 UNION ALL SELECT reverse(c.ssn), "
    "r.n + 1 FROM r, customers c WHERE r.n < 1) SELECT v FROM r ORDER BY 1",
    "SELECT x FROM (SELECT name AS x FROM customers EXCEPT SELECT 'zz') s "
    "UNION SELECT reverse(ssn) FROM customers ORDER BY 1",
    "SELECT count(*), a FROM (SELECT 'k' AS a UNION ALL SELECT reverse(ssn) FROM customers) s "
    "GROUP BY a",
]


PARTS = """
DROP TABLE IF EXISTS rt20p CASCADE;
CREATE TABLE rt20p (id int, name text, ssn text) PARTITION BY RANGE (id);
CREATE TABLE rt20p_a PARTITION OF rt20p FOR VALUES FROM (0) TO (2);
CREATE TABLE rt20p_b PARTITION OF rt20p FOR VALUES FROM (2) TO (100);
INSERT INTO rt20p SELECT id, name, ssn FROM customers;
GRANT SELECT ON rt20p, rt20p_a, rt20p_b TO PUBLIC;
"""
PART_MASKS = """
[[masks]]
column = "public.rt20p*.ssn"
strategy = "redact"
except_groups = ["dba"]
"""


@pytest.fixture(scope="module")
def rt20proxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    pg.execute(PARTS, dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-rt20"), extra=MASKS + PART_MASKS).start()
    yield p
    p.stop()


def _through(mode, proxy, sql, psql_bin):
    try:
        return run_mode(mode, proxy, sql, psql_bin)
    except Exception as e:      # noqa: BLE001 - the client's own way of failing
        return None, f"{e!r} {e}"


@pytest.mark.parametrize("mode", MODES)
def test_a_set_operation_never_shows_a_masked_branch(rt20proxy, pg, psql_bin, mode):
    # the truth: the statements do compute clear values upstream
    direct = direct_mode(pg, "psycopg-text", SET_OPS[0])
    assert leaks(direct), direct
    for sql in SET_OPS:
        _, blob = _through(mode, rt20proxy, sql, psql_bin)
        assert leaks(blob) == [], (mode, sql, leaks(blob))


@pytest.mark.parametrize("extended", [False, True], ids=["query", "extended"])
def test_a_set_operation_copied_out_is_masked(rt20proxy, extended):
    for sql in SET_OPS:
        _, msgs = copy_mode(rt20proxy, sql, extended)
        assert leaks(msgs) == [], (sql, leaks(msgs))


def test_a_set_operation_through_a_sql_cursor_is_masked(rt20proxy):
    c = raw_connect(rt20proxy)
    try:
        for sql in SET_OPS:
            got = c.run("BEGIN")
            got += c.run(f"DECLARE c CURSOR FOR {sql}")
            got += c.run("FETCH ALL c")
            got += c.run("COMMIT")
            assert leaks(got) == [], (sql, leaks(got))
    finally:
        c.close()


CLEAN = [
    "SELECT name FROM customers UNION SELECT note FROM orders ORDER BY 1",
    "SELECT * FROM (SELECT upper(name) AS a FROM customers UNION ALL "
    "SELECT note FROM orders) s ORDER BY 1",
    "SELECT id FROM customers INTERSECT SELECT cust_id FROM orders ORDER BY 1",
]


DECODING = ["psycopg-text", "psycopg-binary", "psycopg-prepared", "asyncpg-fetch",
            "raw-later"]


def _as_direct(proxy, pg, mode, sqls) -> None:
    """Each statement's rows through the proxy equal a direct connection's."""
    for sql in sqls:
        got, _ = run_mode(mode, proxy, sql)
        direct = direct_mode(pg, mode, sql)
        assert got and all(rows == direct for rows in got), (mode, sql, got, direct)


@pytest.mark.parametrize("mode", DECODING)
def test_a_set_operation_over_clean_columns_stays_clear(rt20proxy, pg, mode):
    _as_direct(rt20proxy, pg, mode, CLEAN)


def test_the_raw_rows_of_a_masked_branch_differ_from_the_truth(rt20proxy, pg):
    """The column is masked as a whole (which member a row came from is not known):
    as many rows as upstream, none of them the clear value."""
    sql = SET_OPS[0]
    truth = [r[0] for r in direct_mode(pg, "raw-later", sql)]
    c = raw_connect(rt20proxy)
    try:
        msgs = c.run(sql)
    finally:
        c.close()
    # (refused since round 17: UNION removes a masked value equal to a name, so which
    # rows come back compares them; see test_masking_entangled.UNION_SORTS)
    if rawpg.errors(msgs):
        assert 'rule "masking"' in rawpg.errors(msgs)[0]["M"], msgs
        return
    got = [r[0] for r in rawpg.rows(msgs)]
    assert len(got) == len(truth) == 2
    secret = [v for v in truth if v != b"Ann"]
    assert secret and not set(got) & set(secret), (got, truth)


# a partitioned table is scanned by an Append too (not a set operation): a filter on a
# masked column masks nothing else, its masked column stays masked
PART_CLEAN = [
    "SELECT id, upper(name) FROM rt20p WHERE ssn LIKE '%-%' ORDER BY id",
    "SELECT count(*) FROM rt20p WHERE ssn LIKE '%-%'",
    "SELECT id, name || '!' FROM rt20p WHERE length(ssn) > 3 ORDER BY id LIMIT 2",
]
PART_MASKED = [
    "SELECT reverse(ssn) FROM rt20p ORDER BY 1",
    "SELECT id, reverse(ssn) FROM rt20p ORDER BY id LIMIT 2",
    "SELECT name FROM rt20p UNION SELECT reverse(ssn) FROM rt20p",
]


@pytest.mark.parametrize("mode", DECODING)
def test_a_partitioned_masked_table(rt20proxy, pg, mode):
    _as_direct(rt20proxy, pg, mode, PART_CLEAN)
    for sql in PART_MASKED:
        _, blob = _through(mode, rt20proxy, sql, None)
        assert leaks(blob) == [], (mode, sql, leaks(blob))
    # a computed clean column beside the masked one, under a Sort and a Limit: clear
    sql = "SELECT upper(name), ssn FROM rt20p ORDER BY id LIMIT 3"
    got, blob = run_mode(mode, rt20proxy, sql)
    direct = direct_mode(pg, mode, sql)
    assert leaks(blob) == [], (mode, leaks(blob))
    for rows in got:
        assert [r[0] for r in rows] == [d[0] for d in direct], (mode, rows, direct)
        assert all(r[1] != d[1] for r, d in zip(rows, direct)), (mode, rows)
