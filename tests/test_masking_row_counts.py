# Red team, round 15 (helper 66): masked values carried by how many rows there are.
#  L1 - count(<expression over a masked column>) was taken for clean ("a count cannot
#       carry a value"): count(CASE WHEN g <= ascii(substr(ssn, 1, 1)) THEN 1 END) over
#       generate_series(1, 255), one column per character, gave back every SSN, email,
#       card number and phone in one SELECT. count(*) over generate_series(1, <digits
#       of ssn>) gave six digits at once. A count is an aggregate like any other now, and
#       when the number of rows is decided by masked values (a function scan over them, a
#       derived relation carrying them, a recursive CTE stopping on them, a LIMIT or
#       OFFSET computed when the statement runs) every computed column is masked.
#  L2 - a view the agent created over nextval() / an advisory lock / pg_notify, read
#       under a LIMIT of a masked value's size: each row called the function once more,
#       and currval / pg_locks / the channel names said how many. Such views are refused
#       to a masked identity.
# Judged by the bytes each client got against the true values read directly.
import psycopg
import pytest
from mask_corpus import (CUSTOMERS, DB, MASKS, REFUSED, cell_texts, flatten, leaks, run_mode,
                         seed)

MODES = ["psql", "psycopg-text", "psycopg-binary", "psycopg-prepared", "asyncpg-fetch",
         "raw-later"]

CHARS = ", ".join(f"count(CASE WHEN g <= ascii(substr(ssn, {i}, 1)) THEN 1 END)"
                  for i in range(1, 12))
# (statement, the same computed directly: its clear answer must not arrive)
SHAPES = {
    "count-case": f"SELECT id, {CHARS} FROM customers c, generate_series(1, 255) g "
                  "GROUP BY id ORDER BY id",
    "count-star-srf": "SELECT count(*) FROM customers c, generate_series(1, "
                      "substr(replace(ssn, '-', ''), 1, 6)::int) WHERE id = 1",
    "sum-one-lateral": "SELECT c.id, sum(1) FROM customers c, LATERAL generate_series(1, "
                       "ascii(c.email)) g GROUP BY c.id ORDER BY c.id",
    "srf-in-target": "SELECT count(*) FROM (SELECT generate_series(1, ascii(email)) "
                     "FROM customers WHERE id = 2) s",
    "recursive": "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < "
                 "(SELECT ascii(substr(ssn, 2, 1)) * 1000 + ascii(substr(ssn, 3, 1)) "
                 "FROM customers WHERE id = 1)) SELECT count(*) FROM r",
    "limit-lateral": "SELECT count(*) FROM customers c, LATERAL (SELECT 1 FROM "
                     "generate_series(1, 100000) LIMIT substr(replace(c.ssn, '-', ''), 1, 4)"
                     "::int) v WHERE c.id = 3",
    "offset": "SELECT count(*) FROM (SELECT 1 FROM generate_series(1, 100000) OFFSET "
              "(SELECT 100000 - substr(replace(ssn, '-', ''), 5, 4)::int FROM customers "
              "WHERE id = 2)) v",
}


@pytest.fixture(scope="module")
def rcproxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-rowcounts"), extra=MASKS).start()
    yield p
    p.stop()


def _truth(pg, sql):
    with psycopg.connect(pg.dsn(dbname=DB)) as c:
        return c.execute(sql).fetchall()


def _numbers(rows) -> set[str]:
    # the values computed from masked data (every cell but a leading id)
    return {str(v) for r in rows for v in r[(1 if len(r) > 1 else 0):] if v is not None}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_counted_rows_do_not_carry_masked_values(rcproxy, pg, psql_bin, mode, shape):
    sql = SHAPES[shape]
    truth = _truth(pg, sql)
    secret = {n for n in _numbers(truth) if len(n) >= 2}
    assert secret, truth
    got, blob = run_mode(mode, rcproxy, sql, psql_bin)
    assert leaks(blob) == [], (shape, mode)
    if got is REFUSED:
        return                  # (round 16: rows counted by masked values are refused)
    cells = cell_texts(got, blob)
    shown = sorted(secret & cells)
    assert shown == [], (shape, mode, shown, sorted(cells)[:40])



CLEAN = [
    ("SELECT count(*) FROM customers", [(len(CUSTOMERS),)]),
    ("SELECT count(*), count(name) FROM customers WHERE score > 20", [(2, 2)]),
    ("SELECT c.name, count(o.id) FROM customers c JOIN orders o ON o.cust_id = c.id "
     "GROUP BY c.name ORDER BY c.name", [("Ann", 1), ("Bob", 1), ("Cyd", 1)]),
    ("SELECT count(*) FROM orders, generate_series(1, 3)", [(9,)]),
    ("SELECT id, name FROM customers ORDER BY id LIMIT 2", [(1, "Ann"), (2, "Bob")]),
]


@pytest.mark.parametrize("sql,want", CLEAN)
def test_counts_not_decided_by_masked_values_stay_clear(rcproxy, sql, want):
    with psycopg.connect(rcproxy.dsn(dbname=DB)) as c:
        assert c.execute(sql).fetchall() == want


VIEWS = [
    ("CREATE SEQUENCE rc_s; CREATE VIEW rc_v1 AS SELECT g, nextval('rc_s') AS x "
     "FROM generate_series(1, 100000) g", "rc_v1"),
    ("CREATE VIEW rc_v2 AS SELECT g, pg_try_advisory_lock(g) AS x "
     "FROM generate_series(1, 1000) g", "rc_v2"),
    ("CREATE VIEW rc_v3 AS SELECT g, pg_notify('rc' || g, 'x')::text AS x "
     "FROM generate_series(1, 1000) g", "rc_v3"),
    ("CREATE MATERIALIZED VIEW rc_v4 AS SELECT g, setseed(g / 1000.0)::text AS x "
     "FROM generate_series(1, 10) g", "rc_v4"),
    ("CREATE VIEW rc_v5 AS SELECT g, (SELECT nextval('rc_s2')) AS x "
     "FROM generate_series(1, 1000) g", "rc_v5"),
]


@pytest.mark.parametrize("mode", ["psql", "psycopg-text", "asyncpg-fetch", "raw-later"])
@pytest.mark.parametrize("case", range(len(VIEWS)))
def test_views_keeping_calls_of_sinks_are_refused(rcproxy, pg, psql_bin, mode, case):
    ddl, name = VIEWS[case]
    with psycopg.connect(pg.dsn(dbname=DB), autocommit=True) as c:
        c.execute(f"DROP VIEW IF EXISTS {name}; DROP MATERIALIZED VIEW IF EXISTS {name}; "
                  "DROP SEQUENCE IF EXISTS rc_s, rc_s2; CREATE SEQUENCE rc_s2")
        c.execute("GRANT ALL ON SEQUENCE rc_s2 TO PUBLIC")
    last = ddl.split("; ")[-1]
    if ";" in ddl:
        with psycopg.connect(rcproxy.dsn(dbname=DB), autocommit=True) as c:
            for part in ddl.split("; ")[:-1]:
                c.execute(part)
    try:
        _, blob = run_mode(mode, rcproxy, last, psql_bin)
    except Exception as e:      # noqa: BLE001 - the client's refusal
        blob = str(e)
    with psycopg.connect(pg.dsn(dbname=DB), autocommit=True) as c:
        made = c.execute("SELECT 1 FROM pg_class WHERE relname = %s", (name,)).fetchall()
        c.execute(f"DROP VIEW IF EXISTS {name}; DROP MATERIALIZED VIEW IF EXISTS {name}; "
                  "DROP SEQUENCE IF EXISTS rc_s, rc_s2")
    assert made == [], (mode, ddl, flatten(blob)[:300])


def test_views_over_functions_that_keep_nothing_are_still_created(rcproxy, pg):
    with psycopg.connect(rcproxy.dsn(dbname=DB), autocommit=True) as c:
        c.execute("CREATE VIEW rc_ok AS SELECT g, random() AS r, clock_timestamp() AS t "
                  "FROM generate_series(1, 3) g")
    with psycopg.connect(pg.dsn(dbname=DB), autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM rc_ok").fetchone() == (3,)
        c.execute("DROP VIEW rc_ok")
