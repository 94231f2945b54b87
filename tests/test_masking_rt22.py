# Red team, round 22 (masking), judged against the seeded clear values and a direct
# connection's answers:
# 1. a masked value joined to a UNION [ALL] of constants: above the set operation the
#    plan prints its column as the first member's expression ('0'::text), which read as
#    a constant (the oracle); one statement gave every digit of every SSN;
# 2. a LATERAL set operation whose members a condition on masked values chooses
#    (SELECT '0' WHERE substr(c.ssn, 1, 1) = '0' UNION ALL ...): the constant that came
#    back was the digit;
# 3. EXISTS (SELECT 1 WHERE substr(c.ssn, 1, 1) = '5') in a select list: the planner makes
#    it "= ANY (hashed SubPlan n)" and EXPLAIN (before Postgres 17) prints no comparison.
# Each is refused or masked now, through every client, COPY and a SQL cursor; joins to
# constant unions on clean columns, EXISTS over clean columns and OR-ed oracles stay as
# Postgres answers them.
import pytest
from mask_corpus import MASKS, MODES, REFUSED, copy_mode, direct_mode, leaks, \
    raw_connect, run_mode, seed

# the digits of '732-19-4856' and the other seeded SSNs sit at these places
PLACES = (1, 2, 3, 5, 6, 8, 9, 10, 11)


def _digits(first: str = "", distinct: bool = False) -> str:
    glue = " UNION " if distinct else " UNION ALL "
    members = ([f"SELECT '{first}'::text AS e"] if first else []) + [
        f"SELECT '{d}'::text AS e" for d in "0123456789"]
    return "(" + glue.join(members) + ")"


def _joined(on: str, *, first: str = "", distinct: bool = False, wrap: bool = False,
            left: bool = False) -> str:
    src = _digits(first, distinct)
    if wrap:
        src = f"(SELECT e FROM {src} u ORDER BY e LIMIT 20)"
    kind = "LEFT JOIN" if left else "JOIN"
    joins = " ".join(f"{kind} {src} d{i} ON {on.format(i=i)}" for i in PLACES)
    cols = "||".join(f"coalesce(d{i}.e, '')" for i in PLACES)
    return f"SELECT c.id, {cols} AS v FROM customers c {joins} ORDER BY c.id"


UNION_JOINS = [
    _joined("substr(c.ssn, {i}, 1) = d{i}.e"),
    _joined("substr(c.ssn, {i}, 1) = d{i}.e", distinct=True),
    _joined("substr(c.ssn, {i}, 1) = d{i}.e", first="zz"),
    _joined("substr(c.ssn, {i}, 1) LIKE d{i}.e"),
    _joined("position(d{i}.e in substr(c.ssn, {i}, 1)) = 1", left=True),
    _joined("d{i}.e = substr(c.ssn, {i}, 1)", wrap=True),
]


def _lateral(first: str = "", distinct: bool = False, left: bool = False) -> str:
    glue = " UNION " if distinct else " UNION ALL "
    parts = []
    for i in PLACES:
        members = ([f"SELECT '{first}'::text AS e WHERE false"] if first else []) + [
            f"SELECT '{d}'::text AS e WHERE substr(c.ssn, {i}, 1) = '{d}'"
            for d in "0123456789"]
        kind = "LEFT JOIN LATERAL" if left else "CROSS JOIN LATERAL"
        parts.append(f"{kind} ({glue.join(members)}) x{i}" + (" ON true" if left else ""))
    cols = "||".join(f"x{i}.e" for i in PLACES)
    return f"SELECT c.id, {cols} AS v FROM customers c {' '.join(parts)} ORDER BY c.id"


def _exists_case(negate: bool = False, from_orders: bool = False) -> str:
    def one(i):
        inner = "SELECT 1 FROM orders o WHERE o.id = 10 AND " if from_orders \
            else "SELECT 1 WHERE "
        test = "NOT EXISTS" if negate else "EXISTS"
        whens = " ".join(
            f"WHEN {test} ({inner}substr(c.ssn, {i}, 1) {'<>' if negate else '='} '{d}') "
            f"THEN '{d}'" for d in "0123456789")
        return f"CASE {whens} ELSE '?' END"
    return "SELECT c.id, " + "||".join(one(i) for i in PLACES) + \
        " AS v FROM customers c ORDER BY c.id"


def _same_output(top_level: bool = False) -> str:
    # (helper 119) members that print the same expression (g.g, g_1.g) but are chosen
    # by masked conditions: the value is the member's, as a CASE's would be
    def member(i, k):
        return (f"SELECT g FROM generate_series(0, 9) g WHERE g = {k} AND "
                f"substr(c.ssn, {i}, 1) = '{k}'")
    if top_level:
        return "SELECT id, string_agg(x::text, '' ORDER BY p) AS v FROM (" + " UNION ALL ".join(
            f"SELECT c.id, {i} AS p, g AS x FROM generate_series(0, 9) g, customers c "
            f"WHERE g = {k} AND substr(c.ssn, {i}, 1) = '{k}'"
            for i in PLACES for k in range(10)) + ") s GROUP BY id ORDER BY id"
    joins = " ".join(f"LEFT JOIN LATERAL ({' UNION ALL '.join(member(i, k) for k in range(10))})"
                     f" d{i}(x) ON true" for i in PLACES)
    cols = "||".join(f"coalesce(d{i}.x::text, '')" for i in PLACES)
    return f"SELECT c.id, {cols} AS v FROM customers c {joins} ORDER BY c.id"


LATERALS = [
    _same_output(),
    _same_output(top_level=True),
    _lateral(),
    _lateral(first="x"),
    _lateral(distinct=True),
    _lateral(left=True),
    # a union of oracles, each member a scan of customers with another constant
    "SELECT id, string_agg(d, '' ORDER BY p) AS v FROM (" + " UNION ALL ".join(
        f"SELECT id, {i} AS p, '{d}'::text AS d FROM customers "
        f"WHERE substr(ssn, {i}, 1) = '{d}'" for i in PLACES[:6] for d in "0123456789")
    + ") s GROUP BY id ORDER BY id",
]

EXISTS_TESTS = [
    _exists_case(),
    _exists_case(from_orders=True),
    _exists_case(negate=True),
    "SELECT c.id, EXISTS (SELECT 1 WHERE substr(c.ssn, 1, 1) = '7') AS v FROM customers c "
    "ORDER BY c.id",
    "SELECT c.id, EXISTS (SELECT 1 WHERE c.email = 'zephyr.quill81@example.com') AS v "
    "FROM customers c ORDER BY c.id",
    "SELECT c.id, CASE WHEN c.id > 100 OR EXISTS (SELECT 1 WHERE c.ssn LIKE '7%') "
    "THEN 'seven' END AS v FROM customers c ORDER BY c.id",
]

# (helper 120) a masked value set against an aggregate of a generator's groups: the
# group key spells each digit (count(*) = place * 10 + digit)
_GROUPS = ("SELECT c.id, string_agg(({k} % 10)::text, '' ORDER BY {k}) AS v FROM (SELECT c.id, k "
           "FROM customers c, generate_series(0, 119) g, generate_series(10, 119) k "
           "WHERE g < k GROUP BY c.id, k HAVING substr(c.ssn, ({agg} / 10)::int, 1) = "
           "({agg} % 10)::text) c GROUP BY c.id ORDER BY c.id")
AGGREGATE_TESTS = [
    _GROUPS.format(k="k", agg="count(*)"),
    _GROUPS.format(k="k", agg="sum(1)"),
    _GROUPS.format(k="k", agg="count(g)"),
]


def _renamed(source: str, ref: str) -> str:
    # (helper 120) a masked column renamed by a subquery, CTE or LATERAL pulled up into
    # the query, tested against a sub-select's rows: the plan shows "(SubPlan n)" only
    def place(i):
        return "CASE " + " ".join(
            f"WHEN substr({ref}, {i}, 1) IN (SELECT k::text FROM generate_series({d}, {d}) "
            f"k) THEN '{d}'" for d in range(10)) + " END"
    return "SELECT c.id, " + "||".join(place(i) for i in PLACES) + \
        f" AS v {source} ORDER BY c.id"


RENAMED_TESTS = [
    _renamed("FROM (SELECT id, ssn AS s FROM customers) c", "c.s"),
    _renamed("FROM customers c0, LATERAL (SELECT c0.id, c0.ssn AS s) c", "c.s"),
    "WITH x(i, s) AS (SELECT id, ssn FROM customers) " + _renamed(
        "FROM x c", "c.s").replace("SELECT c.id", "SELECT c.i", 1).replace(
        "ORDER BY c.id", "ORDER BY c.i"),
]

# full values spelled out (leaks() finds the SSN's digits)
SPELLED = UNION_JOINS + LATERALS[:6] + EXISTS_TESTS[:3] + AGGREGATE_TESTS + RENAMED_TESTS
EVERY = UNION_JOINS + LATERALS + EXISTS_TESTS + AGGREGATE_TESTS + RENAMED_TESTS

# as Postgres answers them through the proxy too
CLEAN = [
    "SELECT c.id, EXISTS (SELECT 1 FROM orders o WHERE o.cust_id = c.id) FROM customers c "
    "ORDER BY 1",
    "SELECT id FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.cust_id = c.id)"
    " ORDER BY 1",
    "SELECT id FROM customers WHERE EXISTS (SELECT 1 FROM customers c2 "
    "WHERE c2.email LIKE '%@example.%') ORDER BY 1",
    "SELECT c.id, d.e FROM customers c JOIN (SELECT 1 AS k, 'a'::text AS e UNION ALL "
    "SELECT 2, 'b') d ON d.k = c.id ORDER BY 1",
    "SELECT e FROM (SELECT '0'::text AS e UNION ALL SELECT '1') d ORDER BY 1",
    "SELECT id FROM customers WHERE ssn LIKE '7%' UNION ALL "
    "SELECT id FROM customers WHERE ssn LIKE '6%' ORDER BY 1",
]

DECODING = ["psycopg-text", "psycopg-binary", "psycopg-prepared", "asyncpg-fetch",
            "raw-later"]


@pytest.fixture(scope="module")
def rt22proxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-rt22"), extra=MASKS).start()
    yield p
    p.stop()


def _through(mode, proxy, sql, psql_bin=None):
    try:
        return run_mode(mode, proxy, sql, psql_bin)
    except Exception as e:      # noqa: BLE001 - the client's own way of failing
        return None, f"{e!r} {e}"


def test_the_statements_do_spell_the_values_upstream(rt22proxy, pg):
    for sql in SPELLED:
        assert leaks(direct_mode(pg, "psycopg-text", sql)), sql
    for sql in EVERY:
        vals = {r[-1] for r in direct_mode(pg, "psycopg-text", sql)}
        assert vals - {None, "?", "", False}, (sql, vals)


@pytest.mark.parametrize("mode", MODES)
def test_a_spelled_value_never_comes_back(rt22proxy, psql_bin, mode):
    for sql in SPELLED:
        _, blob = _through(mode, rt22proxy, sql, psql_bin)
        assert leaks(blob) == [], (mode, sql, leaks(blob))


@pytest.mark.parametrize("mode", DECODING)
def test_no_value_a_masked_column_decides_comes_back(rt22proxy, pg, mode):
    # refused, or the computed column holds none of the values Postgres computes
    for sql in EVERY:
        truth = {r[-1] for r in direct_mode(pg, mode, sql)} - {None, b"", ""}
        got, _ = run_mode(mode, rt22proxy, sql)
        if got == REFUSED:
            continue
        for rows in got:
            assert len(rows) == 3, (mode, sql, rows)
            assert not {r[-1] for r in rows} & truth, (mode, sql, rows, truth)


@pytest.mark.parametrize("extended", [False, True], ids=["query", "extended"])
def test_copied_out_they_are_refused_or_masked(rt22proxy, extended):
    for sql in SPELLED:
        _, msgs = copy_mode(rt22proxy, sql, extended)
        assert leaks(msgs) == [], (sql, leaks(msgs))


def test_through_a_sql_cursor_they_are_refused_or_masked(rt22proxy):
    c = raw_connect(rt22proxy)
    try:
        for sql in SPELLED:
            got = c.run("BEGIN")
            got += c.run(f"DECLARE c CURSOR FOR {sql}")
            got += c.run("FETCH ALL c")
            got += c.run("COMMIT")
            assert leaks(got) == [], (sql, leaks(got))
    finally:
        c.close()


@pytest.mark.parametrize("mode", DECODING)
def test_clean_unions_and_exists_stay_as_postgres_answers(rt22proxy, pg, mode):
    for sql in CLEAN:
        got, _ = run_mode(mode, rt22proxy, sql)
        direct = direct_mode(pg, mode, sql)
        assert got != REFUSED and got and all(rows == direct for rows in got), \
            (mode, sql, got, direct)
