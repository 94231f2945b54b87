# Red team, round 16 (helper 73): the number of rows a statement returns, or which stored
# rows, decided by masked values. Masking cells hides neither:
#   SELECT 1 FROM customers c, generate_series(1, ascii(substr(c.ssn, 1, 1))) g
#       WHERE c.id = 1                                  53 rows: the SSN's first '5'
#   SELECT o.id FROM orders o ORDER BY o.id OFFSET (SELECT <SSN digits> ...) LIMIT 1
#       the stored id just past the digits (600 for 599), in clear
#   ... CROSS JOIN LATERAL (SELECT o.id ... OFFSET ascii(substr(c.ssn, p, 1)) - 1 LIMIT 1)
#       every character of every SSN as stored ids
# Such statements are refused to a masked identity now (rule "masking"); LIMITs, OFFSETs
# and set-returning functions over constants or clean columns still run. Judged by what
# each client got, and by the same statement run directly (which does spell the value).
import psycopg
import pytest
from each_client import MODES, said
from mask_corpus import CUSTOMERS, DB, MASKS, seed

SHAPED = {
    "srf-lateral": "SELECT 1 FROM customers c CROSS JOIN LATERAL generate_series(1, "
                   "ascii(substr(c.ssn, 1, 1))) g WHERE c.id = 1",
    "srf-target": "SELECT generate_series(1, ascii(substr(ssn, 2, 1))) FROM customers "
                  "WHERE id = 2",
    "srf-unnest": "SELECT unnest(string_to_array(replace(ssn, '-', ''), NULL)) FROM "
                  "customers WHERE id = 1",
    "limit-initplan": "SELECT o.id FROM orders o, generate_series(1, 1000) g LIMIT (SELECT "
                      "substr(ssn, 1, 3)::int FROM customers WHERE id = 1)",
    "offset-initplan": "SELECT g FROM generate_series(1, 1000) g ORDER BY g OFFSET (SELECT "
                       "substr(ssn, 1, 3)::int FROM customers WHERE id = 1) LIMIT 1",
    "offset-lateral": "SELECT c.id, x.g FROM customers c CROSS JOIN LATERAL (SELECT g FROM "
                      "generate_series(1, 1000) g ORDER BY g OFFSET substr(c.ssn, 1, 3)::int "
                      "LIMIT 1) x ORDER BY c.id",
    "recursive-stop": "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE "
                      "n < (SELECT ascii(substr(email, 1, 1)) FROM customers WHERE id = 1)) "
                      "SELECT n FROM r",
    # round 16 (helper 76, review 75)
    "recursive-dedup": "WITH RECURSIVE r(n) AS (SELECT 0 UNION SELECT least(n + 1, (SELECT "
                       "ascii(substr(ssn, 1, 1)) FROM customers WHERE id = 1)) FROM r) "
                       "SELECT 1 AS x FROM r",
    "join-multiplied": "SELECT 1 AS x FROM customers c JOIN generate_series(1, 255) g ON "
                       "g <= ascii(substr(c.ssn, 1, 1)) WHERE c.id = 1",
    "filter-initplan": "SELECT g FROM generate_series(1, 999) g WHERE g <= (SELECT "
                       "substr(ssn, 1, 3)::int FROM customers WHERE id = 1)",
    "tablesample-seed": "SELECT id FROM orders TABLESAMPLE bernoulli(50) REPEATABLE ((SELECT "
                        "ascii(substr(ssn, 1, 1)) FROM customers WHERE id = 1))",
    "tablesample-fraction": "SELECT count(*) FROM orders TABLESAMPLE bernoulli((SELECT "
                            "substr(ssn, 1, 2)::int FROM customers WHERE id = 1))",
    "hash-group-order": "SELECT g FROM generate_series(1, 255) g, customers c WHERE c.id = 1 "
                        "GROUP BY g, ascii(substr(c.ssn, 1, 1))",
}
# several statements in one Query: each one's rows are its own (review 75)
MULTI = {k: "SELECT 1; " + SHAPED[k] for k in ("srf-lateral", "join-multiplied",
                                                "offset-initplan", "recursive-dedup",
                                                "filter-initplan")}
# (a ';' inside a literal of the second statement: review 78)
MULTI["semicolon-literal"] = ("SELECT 1; SELECT 1 FROM customers c CROSS JOIN LATERAL "
                              "generate_series(1, ascii(substr(c.ssn, 1, 1))) g WHERE c.id = 1"
                              " AND ';' <> ''")


@pytest.fixture(scope="module")
def shproxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-shaping"), extra=MASKS).start()
    yield p
    p.stop()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", sorted(SHAPED))
def test_rows_decided_by_masked_values_are_refused(shproxy, pg, psql_bin, mode, shape):
    sql = SHAPED[shape]
    with psycopg.connect(pg.dsn(dbname=DB)) as c:
        truth = c.execute(sql).fetchall()
    assert truth            # directly, the statement returns its rows
    got = said(mode, shproxy, [sql], db=DB, psql_bin=psql_bin)
    assert "42501" in got or 'rule "masking"' in got, (shape, mode, got)
    assert 'rule "masking"' in got, got
    if mode == "psql":
        assert "row" not in got.split("ERROR")[0], got


CLEAN = [
    ("SELECT id FROM customers ORDER BY id LIMIT 2 OFFSET 1", [(2,), (3,)]),
    ("SELECT name FROM customers, generate_series(1, 2) g WHERE id = 1",
     [("Ann",), ("Ann",)]),
    ("SELECT c.id, g FROM customers c CROSS JOIN LATERAL generate_series(1, c.score / 10) g"
     " WHERE c.id = 2 ORDER BY g", [(2, 1), (2, 2)]),
    ("SELECT id FROM customers ORDER BY id LIMIT (SELECT count(*) FROM orders) - 1",
     [(1,), (2,)]),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
     "SELECT n, (SELECT name FROM customers WHERE id = n) FROM r",
     [(1, "Ann"), (2, "Bob"), (3, "Cyd")]),
]


@pytest.mark.parametrize("mode", [m for m in MODES if m != "psycopg-prepared"])
@pytest.mark.parametrize("shape", sorted(MULTI))
def test_such_a_statement_behind_another_in_one_query_is_refused(shproxy, psql_bin, mode,
                                                                 shape):
    got = said(mode, shproxy, [MULTI[shape]], db=DB, psql_bin=psql_bin, extended_at=-1)
    assert 'rule "masking"' in got, (shape, mode, got)


@pytest.mark.parametrize("sql,want", CLEAN)
def test_rows_decided_by_clean_values_still_come_back(shproxy, sql, want):
    with psycopg.connect(shproxy.dsn(dbname=DB)) as c:
        assert c.execute(sql).fetchall() == want


def test_the_refused_shapes_do_spell_the_values_directly(pg):
    # what the refusal withholds: the first shape's row count is the SSN's first code
    with psycopg.connect(pg.dsn(dbname=DB)) as c:
        n = len(c.execute(SHAPED["srf-lateral"]).fetchall())
    assert n == ord(CUSTOMERS[0][3][0])


def test_a_set_returning_function_over_clean_values_beside_masked_columns_runs(shproxy):
    # (its row count is the clean values'; review 75: it was refused for the masked
    # column passed through beside it)
    with psycopg.connect(shproxy.dsn(dbname=DB)) as c:
        rows = c.execute("SELECT name, email, generate_series(1, 2) FROM customers "
                         "WHERE id = 3").fetchall()
    assert [r[0] for r in rows] == ["Cyd", "Cyd"]
    assert all(r[1] != CUSTOMERS[2][2] for r in rows)


@pytest.mark.parametrize("mode", ["psql", "raw"])
@pytest.mark.parametrize("shape", ["join-multiplied", "srf-lateral", "offset-initplan"])
def test_a_copy_of_such_a_query_is_refused(shproxy, psql_bin, mode, shape):
    # (its tag, COPY 53, is the count: review 78)
    sql = f"COPY ({SHAPED[shape]}) TO STDOUT"
    got = said(mode, shproxy, [sql], db=DB, psql_bin=psql_bin, extended_at=-1)
    assert 'rule "masking"' in got, (shape, mode, got)
    assert "COPY " not in got.replace("COPY (", ""), got
