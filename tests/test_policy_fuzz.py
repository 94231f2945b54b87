# Property tests: no exception escapes decide(), and nothing that fails to classify is allowed.
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgguard.policy.classify as classify_mod
from pgguard.config import Identity, loads
from pgguard.policy import DecisionCache, PolicyEngine, PreparedMemory
from pgguard.policy.classify import classify

from test_policy_corpus import CORPUS, PARSE_ERRORS

AGENT = Identity(kind="agent")
ACTIONS = {"allow", "block", "approve"}
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

CONFIG = loads("""
[[rules]]
name = "orders-approval"
when = { statements = ["update", "delete"], relations = ["public.orders"] }
action = "approve"

[[rules]]
name = "no-secret"
when = { relations = ["secret.*"] }
action = "block"
""")


def _classifies(sql: str) -> bool:
    try:
        classify(sql)
    except Exception:  # noqa: BLE001 - any failure counts
        return False
    return True


def check(engine: PolicyEngine, sql: str, prepared=None) -> None:
    d = engine.decide(sql, "fuzz", AGENT, "app", prepared)
    assert d.action in ACTIONS
    if not _classifies(sql):
        assert d.action == "block", (sql, d)
        assert d.rule in ("parse-error", "statement-too-long", "internal-error")
    # the cache never changes the answer
    u = engine.decide_uncached(sql, "fuzz", AGENT, "app", prepared)
    assert (d.action, d.rule) == (u.action, u.rule), sql


KEYWORDS = ["SELECT", "FROM", "WHERE", "DELETE", "UPDATE", "SET", "INSERT", "INTO", "VALUES",
            "DROP", "TABLE", "INDEX", "TRUNCATE", "WITH", "AS", "RETURNING", "EXPLAIN",
            "ANALYZE", "PREPARE", "EXECUTE", "DO", "BEGIN", "END", "COPY", "TO", "PROGRAM",
            "STDIN", "STDOUT", "GRANT", "ROLE", "MERGE", "USING", "ON", "WHEN", "MATCHED",
            "THEN", "CALL", "AND", "OR", "NOT", "TRUE", "FALSE", "NULL", "IS", "LANGUAGE",
            "plpgsql", "CREATE", "FUNCTION", "RETURNS", "int", "ALTER", "COLUMN", "OWNER"]
IDENTS = ["t", "orders", "public.orders", "secret.keys", '"Odd name"', 'U&"d\\0061t"', "id",
          "pg_read_file", "set_config", "dblink", "x1", "p"]
LITERALS = ["1", "0", "42", "'a'", "'it''s'", "$$drop table t$$", "$x$;$x$", "E'\\''",
            "1.5e3", "'t'::bool", "$1"]
PUNCT = ["(", ")", ",", ";", "=", "<>", "*", ".", "::", " ", "\n", "--", "/*", "*/", "'",
         '"', "$$"]

token = st.one_of(st.sampled_from(KEYWORDS), st.sampled_from(IDENTS),
                  st.sampled_from(LITERALS), st.sampled_from(PUNCT))
sqlish = st.lists(token, max_size=30).map(" ".join)


@pytest.fixture(scope="module")
def engine():
    return PolicyEngine(CONFIG)


@SETTINGS
@given(st.text(max_size=200))
def test_any_text(engine, sql):
    check(engine, sql)


@SETTINGS
@given(sqlish)
def test_sql_like_token_soup(engine, sql):
    check(engine, sql)


def _mutate(sql: str, data) -> str:
    ops = data.draw(st.lists(st.sampled_from(["ins", "del", "dup", "case", "comment",
                                              "semi", "quote", "swap"]), max_size=4))
    for op in ops:
        if not sql:
            break
        i = data.draw(st.integers(0, len(sql) - 1))
        if op == "ins":
            sql = sql[:i] + data.draw(st.sampled_from(PUNCT + ["x", "1", " drop "])) + sql[i:]
        elif op == "del":
            j = data.draw(st.integers(i, min(len(sql), i + 8)))
            sql = sql[:i] + sql[j:]
        elif op == "dup":
            sql = sql[:i] + sql[i:] + sql[:i]
        elif op == "case":
            sql = sql.swapcase()
        elif op == "comment":
            sql = sql[:i] + " /* c */ " + sql[i:]
        elif op == "semi":
            sql = sql[:i] + ";" + sql[i:]
        elif op == "quote":
            sql = sql[:i] + "'" + sql[i:]
        elif op == "swap":
            sql = sql[i:] + " " + sql[:i]
    return sql


@SETTINGS
@given(st.sampled_from([e[0] for e in CORPUS] + PARSE_ERRORS), st.data())
def test_mutated_corpus(engine, sql, data):
    check(engine, _mutate(sql, data))


@SETTINGS
@given(st.sampled_from([e for e in CORPUS if e[1] is not None]),
       st.sampled_from(["", "  ", "\n", "/* lead */ ", "-- lead\n"]),
       st.sampled_from(["", ";", " ; ", "; -- trail", "\n"]))
def test_comments_and_whitespace_do_not_change_the_decision(sql_entry, lead, trail):
    sql, _, _, decision = sql_entry[:4]
    e = PolicyEngine(loads(""))
    d = e.decide(lead + sql + trail, "fuzz", AGENT, "app")
    assert d.action == decision, (lead + sql + trail, d)


@SETTINGS
@given(st.sampled_from([
    "DELETE FROM t WHERE {a} = {b}",
    "UPDATE t SET x = 1 WHERE {a} = {b} OR id = 3",
    "DELETE FROM t WHERE id = {a} AND {a} = {b}",
    "DELETE FROM t WHERE NOT {a} <> {b}",
    "SELECT set_config({s}, 'x', false)",
    "DELETE FROM t WHERE {s} = {s2}",
    "SELECT * FROM t WHERE a = {a}; DELETE FROM t WHERE {a} = {b}",
]), st.integers(-3, 3), st.integers(-3, 3),
    st.sampled_from(["'role'", "'work_mem'", "'a'", "'b'", "'session_authorization'"]),
    st.sampled_from(["'a'", "'b'"]))
def test_shape_cache_never_shares_literal_dependent_decisions(template, a, b, s, s2):
    # one long-lived engine per template family would hide nothing: use one per example
    # but warm it with the other literal first, so a shared entry would be served
    e = PolicyEngine(CONFIG)
    warm = template.format(a=b, b=a, s=s2, s2=s)
    sql = template.format(a=a, b=b, s=s, s2=s2)
    e.decide(warm, "fuzz", AGENT, "app")
    d = e.decide(sql, "fuzz", AGENT, "app")
    u = PolicyEngine(CONFIG, cache=DecisionCache(0)).decide(sql, "fuzz", AGENT, "app")
    assert (d.action, d.rule) == (u.action, u.rule), (warm, sql)


ODD_LITERALS = ["0", "1", "2", "-1", "1e308", "0.1", "'role'", "'search_path'", "'off'",
                "'on'", "'NaN'", "'a '", "''", "'pgguard:alice'", "'DROP TABLE t'",
                "'session_replication_role'", "'default_transaction_read_only'"]


def _literal_free_texts():
    from pgguard.policy.cache import shape_key
    out = []
    for entry in CORPUS:
        sql = entry[0]
        if entry[1] is None or shape_key(sql) is None or shape_key(sql) == sql:
            continue
        if all(s.literal_free for s in classify(sql)):
            out.append(sql)
    return out


LITERAL_FREE = _literal_free_texts()


def _essence(stmts):
    import msgspec
    return [msgspec.structs.replace(s, text="") for s in stmts]


def test_literal_free_texts_exist():
    # the property below must have something to chew on: pgbench-like DML and SELECTs
    assert len(LITERAL_FREE) >= 40
    assert "DELETE FROM t WHERE id = 5" in LITERAL_FREE


@SETTINGS
@given(st.sampled_from(LITERAL_FREE), st.data())
def test_literal_free_classification_ignores_every_literal(sql, data):
    # what the classifier proved literal-free classifies the same whatever the literals:
    # this is what lets its decision answer for every text of the same shape
    from pgguard.policy.cache import _LITERALS, shape_key
    variant = _LITERALS.sub(
        lambda m: m.group(1) or data.draw(st.sampled_from(ODD_LITERALS)), sql)
    if shape_key(variant) != shape_key(sql):
        return                  # "-1" next to an operator: another shape, another entry
    try:
        got = classify(variant)
    except classify_mod.PolicyParseError:
        return                  # a literal of the wrong kind for its place
    assert _essence(got) == _essence(classify(sql)), (sql, variant)
    e = PolicyEngine(CONFIG, cache=DecisionCache(0))
    a, b = e.decide(sql, "f", AGENT, "app"), e.decide(variant, "f", AGENT, "app")
    assert (a.action, a.rule, a.max_rows) == (b.action, b.rule, b.max_rows), (sql, variant)


@SETTINGS
@given(st.lists(st.sampled_from([
    "PREPARE p AS SELECT 1", "PREPARE p AS DELETE FROM t", "PREPARE q AS SELECT 2",
    "DEALLOCATE p", "DEALLOCATE ALL", "DISCARD ALL", "EXECUTE p", "EXECUTE q",
]), max_size=8))
def test_prepared_memory_never_understates(steps):
    """EXECUTE is at least as flagged as everything that name could be bound to."""
    mem = PreparedMemory()
    bound: dict[str, set[str]] = {}
    for sql in steps:
        st_ = classify(sql, prepared=mem)[0]
        if st_.kind == "execute":
            possible = bound.get(st_.name)
            if possible is None:
                assert "opaque" in st_.flags
            else:
                assert possible <= set(st_.flags) | {"opaque"}
        mem.observe([st_])
        # DEALLOCATE / DISCARD may not run (an earlier error of the same Query skips
        # them): a name keeps everything it was ever bound to
        if st_.kind == "prepare":
            bound.setdefault(st_.name, set()).update(st_.flags)


@SETTINGS
@given(st.sampled_from([e[0] for e in CORPUS]), st.sampled_from(
    [RuntimeError, KeyError, TypeError, RecursionError, IndexError, ValueError]))
def test_exceptions_in_the_walk_are_refusals(sql, exc):
    e = PolicyEngine(loads(""))

    def boom(*args, **kwargs):
        raise exc("injected")

    saved = classify_mod._walk
    saved_fast = classify_mod._fast_select
    classify_mod._walk = boom
    classify_mod._fast_select = boom
    try:
        d = e.decide(sql, "fuzz", AGENT, "app")
    finally:
        classify_mod._walk = saved
        classify_mod._fast_select = saved_fast
    if d.statements:
        # a statement whose handler never walks (BEGIN, SHOW...) may still be decided
        assert all(s.kind in {"begin", "commit", "rollback", "savepoint", "release",
                              "show", "deallocate", "discard", "listen", "unlisten",
                              "notify", "load", "checkpoint", "fetch", "move", "close",
                              "set", "reset"} for s in d.statements), (sql, d)
    else:
        assert d.action == "block", (sql, d)


def test_deep_nesting_is_refused_not_crashed(engine):
    sql = "SELECT " + "(" * 5000 + "1" + ")" * 5000
    d = engine.decide(sql, "fuzz", AGENT, "app")
    assert d.action in ACTIONS
    sql = "DELETE FROM t WHERE " + "NOT " * 3000 + "true"
    d = engine.decide(sql, "fuzz", AGENT, "app")
    assert d.action == "block"


def test_nul_and_huge_texts(engine):
    assert engine.decide("SELECT 1\x00; DROP TABLE t", "f", AGENT, "a").action == "block"
    big = "SELECT " + ", ".join(["1"] * 400_000)
    d = engine.decide(big, "f", AGENT, "a")
    assert (d.action, d.rule) == ("block", "statement-too-long")


def test_surrogates_and_odd_unicode(engine):
    for sql in ["SELECT '\ud800'", "SELECT 'é' ; DROP TABLE \"ü\"", "SELECT '\u2028'",
                "DELETE FROM \"表\" WHERE 1 = 1"]:
        d = engine.decide(sql, "f", AGENT, "a")
        assert d.action in ACTIONS
    assert engine.decide("DELETE FROM \"表\" WHERE 1 = 1", "f", AGENT, "a").action == "block"
