# Rule matching, defaults, refusals, the decision caches, prepared statements, `pgguard explain`.
from __future__ import annotations

import argparse
import json

import pytest

import pgguard.policy.classify as classify_mod
from pgguard.config import Identity, loads
from pgguard.errors import PolicyRefusal
from pgguard.policy import DecisionCache, PolicyEngine, PreparedMemory, shape_key
from pgguard.policy.cache import LRU
from pgguard.policy.classify import classify
from pgguard.policy.explain import EXIT_ALLOW, EXIT_APPROVE, EXIT_BLOCK
from pgguard.policy.explain import main as explain_main

AGENT = Identity(kind="agent", groups=["agents"])
HUMAN = Identity(kind="human", groups=["dba"])

CONFIG = """
[identities.ci-agent]
kind = "agent"
groups = ["agents"]

[identities.etl]
kind = "agent"
groups = ["etl"]

[identities.alice]
kind = "human"
groups = ["dba"]

[[rules]]
name = "etl-staging"
when = { identity = ["etl"], relations = ["staging.*"] }
action = "allow"

[[rules]]
name = "no-secrets"
when = { relations = ["secret.*", "salaries"] }
action = "block"

[[rules]]
name = "no-dblink"
when = { functions = ["dblink*"] }
action = "block"

[[rules]]
name = "orders-approval"
when = { kind = "agent", statements = ["insert", "update", "delete"], \
         relations = ["public.orders"] }
action = "approve"
timeout = "5m"
approvers = ["alice"]

[[rules]]
name = "humans-destructive"
when = { kind = "human", flags = ["destructive"], databases = ["prod*"] }
action = "approve"

[[rules]]
name = "analytics-reads"
when = { groups = ["agents"], databases = ["analytics"], statements = ["select"] }
action = "allow"
"""


@pytest.fixture()
def cfg():
    return loads(CONFIG)


@pytest.fixture()
def engine(cfg):
    return PolicyEngine(cfg)


def decide(engine, sql, who="ci-agent", db="app", prepared=None):
    ident = engine.cfg.identities.get(who, AGENT)
    return engine.decide(sql, who, ident, db, prepared)


# --------------------------------------------------------------------------- matching

def test_first_match_wins(engine):
    # etl-staging comes before no-secrets: the identity-scoped allow wins for staging,
    # but a statement that also touches secret.* is not covered by the allow rule
    assert decide(engine, "DROP TABLE staging.x", "etl").rule == "etl-staging"
    d = decide(engine, "INSERT INTO staging.x SELECT * FROM secret.y", "etl")
    assert (d.action, d.rule) == ("block", "no-secrets")


def test_allow_rule_needs_every_item_covered(engine):
    # not every relation is staging.*: falls through to the default (guarded) -> allowed
    # as a plain write, but not by the allow rule
    d = decide(engine, "INSERT INTO staging.x SELECT * FROM public.users", "etl")
    assert (d.action, d.rule) == ("allow", "guarded-default")
    d = decide(engine, "TRUNCATE staging.x, public.users", "etl")
    assert (d.action, d.rule) == ("block", "guarded-default")


def test_block_rule_matches_any_item(engine):
    d = decide(engine, "SELECT * FROM public.t JOIN secret.keys k ON true")
    assert (d.action, d.rule) == ("block", "no-secrets")
    assert "no-secrets" in d.message


def test_bare_relation_pattern_matches_any_schema(engine):
    for sql in ("SELECT * FROM salaries", "SELECT * FROM hr.salaries",
                'SELECT * FROM "hr"."salaries"'):
        assert decide(engine, sql).rule == "no-secrets", sql
    assert decide(engine, "SELECT * FROM salaries_archive").action == "allow"


def test_function_globs(engine):
    assert decide(engine, "SELECT dblink_connect('x')").rule == "no-dblink"
    assert decide(engine, "SELECT public.dblink('x', 'y')").rule == "no-dblink"


def test_statement_kinds_see_through_cte_and_explain(engine):
    for sql in ("DELETE FROM orders WHERE id = 1",
                "WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d",
                "EXPLAIN ANALYZE UPDATE orders SET x = 1 WHERE id = 2",
                "PREPARE p AS INSERT INTO orders VALUES (1)"):
        d = decide(engine, sql)
        assert (d.action, d.rule) == ("approve", "orders-approval"), sql
        assert d.timeout == 300.0 and d.approvers == ("alice",)
    # a plain EXPLAIN runs nothing: no approval needed
    assert decide(engine, "EXPLAIN UPDATE orders SET x = 1 WHERE id = 2").action == "allow"
    # humans are not concerned by the agent rule
    assert decide(engine, "DELETE FROM orders WHERE id = 1", "alice").action == "allow"


def test_databases_and_kind(engine):
    assert decide(engine, "DROP TABLE t", "alice", "prod-eu").rule == "humans-destructive"
    assert decide(engine, "DROP TABLE t", "alice", "staging").rule == "allow-default"


def test_groups_and_allow_statements(engine):
    # the allow rule covers selects only; a select that runs a delete is not covered
    d = decide(engine, "SELECT * FROM t", "ci-agent", "analytics")
    assert d.rule == "analytics-reads"
    d = decide(engine, "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "ci-agent",
               "analytics")
    assert (d.action, d.rule) == ("block", "guarded-default")
    # etl is not in group agents
    assert decide(engine, "SELECT * FROM t", "etl", "analytics").rule == "guarded-default"


def test_flags_rule_allow_semantics():
    cfg = loads("""
[[rules]]
name = "writes-ok"
when = { flags = ["write"] }
action = "allow"
""")
    e = PolicyEngine(cfg)
    assert e.decide("INSERT INTO t VALUES (1)", "a", AGENT, "d").rule == "writes-ok"
    # write + destructive is not only write
    d = e.decide("DELETE FROM t", "a", AGENT, "d")
    assert (d.action, d.rule) == ("block", "guarded-default")
    # no flags at all: the allow rule has nothing to cover
    assert e.decide("SELECT 1", "a", AGENT, "d").rule == "guarded-default"


def test_rule_without_when_matches_everything():
    e = PolicyEngine(loads('[[rules]]\nname = "lockdown"\naction = "block"\n'))
    d = e.decide("SELECT 1", "a", AGENT, "d")
    assert (d.action, d.rule) == ("block", "lockdown")
    assert "Ask an administrator" in d.hint or "administrator" in d.hint


# --------------------------------------------------------------------------- defaults

@pytest.mark.parametrize("mode,sql,action", [
    ("guarded", "SELECT 1", "allow"),
    ("guarded", "INSERT INTO t VALUES (1)", "allow"),
    ("guarded", "DROP TABLE t", "block"),
    ("guarded", "GRANT ALL ON t TO bob", "block"),
    ("guarded", "COPY t TO PROGRAM 'x'", "block"),
    ("guarded", "CALL p()", "block"),
    ("allow", "DROP TABLE t", "allow"),
    ("block", "SELECT 1", "block"),
    ("block", "BEGIN", "allow"),
    ("block", "ROLLBACK", "allow"),
    ("block", "COMMIT", "allow"),
])
def test_default_modes(mode, sql, action):
    e = PolicyEngine(loads(f'[policy]\nagents = "{mode}"\nhumans = "{mode}"\n'))
    for ident in (AGENT, HUMAN):
        d = e.decide(sql, "x", ident, "d")
        assert d.action == action
        assert d.rule == f"{mode}-default"


def test_humans_default_allow_and_guarded():
    e = PolicyEngine(loads(""))
    assert e.decide("DROP TABLE t", "alice", HUMAN, "d").action == "allow"
    e = PolicyEngine(loads('[policy]\nhumans = "guarded"\n'))
    assert e.decide("DROP TABLE t", "alice", HUMAN, "d").action == "block"


def test_no_identity_means_agent():
    e = PolicyEngine(loads(""))
    assert e.decide("DROP TABLE t", "?", None, "d").action == "block"


# --------------------------------------------------------------------------- refusals

def test_refusal_fields(engine):
    d = decide(engine, "DELETE FROM orders_archive WHERE 1 = 1")
    assert d.action == "block" and not d.allowed
    assert d.rule == "guarded-default"
    assert d.message.startswith('pgguard: statement refused by rule "guarded-default"')
    assert "public.orders_archive" in d.detail and "destructive" in d.detail
    assert "WHERE" in d.hint
    err = d.error()
    assert isinstance(err, PolicyRefusal) and err.sqlstate == "42501"
    assert err.detail == d.detail and err.hint == d.hint


def test_multi_statement_first_refused_decides(engine):
    d = decide(engine, "SELECT 1; DELETE FROM orders WHERE id = 1; DROP TABLE x; DROP TABLE y")
    # a block outranks an approval, and the first blocked statement decides
    assert d.action == "block" and d.index == 2
    assert "statement 3 of 4" in d.detail and "No statement of this query was run" in d.detail
    assert [v.action for v in d.verdicts] == ["allow", "approve", "block", "block"]
    d = decide(engine, "SELECT 1; DELETE FROM orders WHERE id = 1")
    assert d.action == "approve" and d.index == 1


def test_parse_error_and_position(engine):
    d = decide(engine, "SELECT 1 FRM t")
    assert (d.action, d.rule) == ("block", "parse-error")
    assert 'syntax error at or near "t"' in d.message
    assert d.position == 14


def test_too_long():
    e = PolicyEngine(loads(""), max_statement_size=100)
    d = e.decide("SELECT " + "1," * 100 + "1", "a", AGENT, "d")
    assert (d.action, d.rule) == ("block", "statement-too-long")
    assert e.decide("SELECT 1", "a", AGENT, "d").action == "allow"


def test_internal_error_never_allows(engine, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("classifier exploded")
    monkeypatch.setattr("pgguard.policy.rules.classify", boom)
    d = decide(engine, "SELECT 1")
    assert (d.action, d.rule) == ("block", "internal-error")
    assert "RuntimeError" in d.message
    # not cached: once fixed, the same text is decided again
    monkeypatch.undo()
    assert decide(engine, "SELECT 1").action == "allow"


def test_internal_error_inside_walk(engine, monkeypatch):
    def boom(acc, body):
        raise KeyError("weird tree")
    monkeypatch.setitem(classify_mod._STMT, "DeleteStmt", boom)
    d = decide(engine, "DELETE FROM t WHERE id = 1")
    assert (d.action, d.rule) == ("block", "internal-error")


def test_empty_text_is_allowed(engine):
    for sql in ("", "   ", ";", "-- only a comment", "/* nothing */ ;"):
        d = decide(engine, sql)
        assert (d.action, d.rule, d.statements) == ("allow", "empty", ())


# --------------------------------------------------------------------------- caches

def test_shape_key():
    assert shape_key("SELECT * FROM t WHERE a = 1") == shape_key("SELECT * FROM t WHERE a = 22")
    assert (shape_key("SELECT * FROM t WHERE a = 'x'")
            == shape_key("SELECT * FROM t WHERE a = 'it''s'"))
    assert shape_key("SELECT * FROM t1") != shape_key("SELECT * FROM t2")
    assert shape_key('SELECT * FROM "t 1"') != shape_key('SELECT * FROM "t 2"')
    assert shape_key("SELECT * FROM public.t") != shape_key("SELECT * FROM secret.t")
    for sql in ("SELECT 1 -- x", "SELECT /* x */ 1", "SELECT $$x$$", "SELECT $1",
                "SELECT E'\\n'", 'SELECT U&"x"'):
        assert shape_key(sql) is None, sql


def test_shape_cache_hits_for_new_literals(engine):
    d1 = decide(engine, "SELECT abalance FROM pgbench_accounts WHERE aid = 1")
    hits = engine.cache.hits_shape
    d2 = decide(engine, "SELECT abalance FROM pgbench_accounts WHERE aid = 99")
    assert d2 is d1 and engine.cache.hits_shape == hits + 1
    d3 = decide(engine, "UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 7")
    d4 = decide(engine, "UPDATE pgbench_accounts SET abalance = abalance + 3 WHERE aid = 8")
    assert d4 is d3 and d3.action == "allow"


@pytest.mark.parametrize("first,second", [
    ("SELECT set_config('work_mem', '1MB', false)", "SELECT set_config('role', 'x', false)"),
    ("SELECT set_config('application_name', 'bot', false)",
     "SELECT set_config('application_name', 'pgguard:alice', false)"),
    ("SELECT set_config('transaction_read_only', 'on', false)",
     "SELECT set_config('transaction_read_only', 'off', false)"),
    ("UPDATE t SET a = set_config('statement_timeout', '1s', false) WHERE id = 1",
     "UPDATE t SET a = set_config('search_path', '1s', false) WHERE id = 1"),
    ("INSERT INTO t SELECT set_config('timezone', 'UTC', true)",
     "INSERT INTO t SELECT set_config('row_security', 'UTC', true)"),
    ("SELECT set_config('lock_timeout', '1s', false) FROM t WHERE id = 2",
     "SELECT set_config('session_replication_role', 'replica', false) FROM t WHERE id = 2"),
])
def test_literal_dependent_decisions_are_never_shared(engine, first, second):
    assert shape_key(first) == shape_key(second)
    a = decide(engine, first)
    b = decide(engine, second)
    assert a.action == "allow" and b.action == "block"
    # and the other way round, on a fresh engine
    e2 = PolicyEngine(engine.cfg)
    assert decide(e2, second).action == "block"
    assert decide(e2, first).action == "allow"


@pytest.mark.parametrize("first,second", [
    ("DELETE FROM t WHERE 1 = 2", "DELETE FROM t WHERE 1 = 1"),
    ("DELETE FROM t WHERE 'a' = 'b'", "DELETE FROM t WHERE 'a' = 'a'"),
    ("UPDATE t SET a = 1 WHERE id = 3 OR 1 = 2", "UPDATE t SET a = 1 WHERE id = 3 OR 1 = 1"),
    ("DELETE FROM t WHERE 'f'::boolean", "DELETE FROM t WHERE 't'::boolean"),
])
def test_constant_where_is_every_row_whatever_its_value(engine, first, second):
    # issue 11: constants are no longer evaluated, so no literal decides a WHERE clause
    a, b = decide(engine, first), decide(engine, second)
    assert (a.action, a.rule, b.action, b.rule) == ("block", "guarded-default") * 2
    assert "does not depend on the target" in a.message
    assert a.statements[0].literal_free and b.statements[0].literal_free


def test_shape_sharing_needs_proof_of_no_literal_read(engine):
    # a Statement built without a walk (default) is never shareable: fail closed
    from pgguard.policy.cache import shareable
    from pgguard.policy.classify import Statement
    from pgguard.policy.rules import Decision
    assert not Statement(kind="select").literal_free
    assert not shareable(Decision(action="allow", rule="x",
                                  statements=(Statement(kind="select", kinds=("select",)),)))
    d = decide(engine, "SELECT * FROM t WHERE id = 1")
    assert shareable(d)
    for sql in ("SELECT set_config('work_mem', '1MB', false)",
                "DO $$ BEGIN PERFORM 1; END $$", "SET work_mem = '1MB'"):
        assert not shareable(decide(engine, sql)), sql


def test_only_the_literal_accessor_reads_constants():
    # every read of a constant's value in classify.py goes through _lit(), which marks
    # the statement literal-dependent: no other code may look inside an A_Const
    import ast
    import inspect
    src = inspect.getsource(classify_mod)
    tree = ast.parse(src)
    readers = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Constant) and node.value in (
                        "A_Const", "sval", "ival", "fval", "boolval", "bsval"):
                    readers.add(fn.name)
    # _sval reads identifiers ({"String": {"sval"}}), _lit reads literals; _constant only
    # asks whether a node is a constant (the literal-insensitive shape keeps that), never
    # what its value is
    assert readers <= {"_lit", "_sval", "_fast_select", "_constant"}, readers


def test_schema_is_part_of_the_shape(engine):
    assert decide(engine, "SELECT * FROM public.t WHERE id = 1").action == "allow"
    d = decide(engine, "SELECT * FROM secret.t WHERE id = 2")
    assert (d.action, d.rule) == ("block", "no-secrets")


def test_cache_is_per_identity_and_database(engine):
    assert decide(engine, "DROP TABLE staging.x", "etl").action == "allow"
    assert decide(engine, "DROP TABLE staging.x", "ci-agent").action == "block"
    assert decide(engine, "DROP TABLE t", "alice", "prod").action == "approve"
    assert decide(engine, "DROP TABLE t", "alice", "dev").action == "allow"


def test_cache_disabled():
    e = PolicyEngine(loads(""), cache=DecisionCache(0))
    d1 = e.decide("SELECT 1", "a", AGENT, "d")
    d2 = e.decide("SELECT 1", "a", AGENT, "d")
    assert d1 == d2 and d1 is not d2


def test_lru_bounds():
    c = LRU(maxsize=3, maxchars=10)
    for i in range(5):
        c.put(i, str(i), 1)
    assert list(c.keys()) == [2, 3, 4]
    c.get(2)
    c.put(9, "x", 1)
    assert list(c.keys()) == [4, 2, 9]
    c.put("big", "y", 9)              # 3 + 9 > 10 characters: the oldest go
    assert list(c.keys()) == [9, "big"]
    c.put("huge", "z", 11)            # larger than the budget: not stored
    assert "huge" not in c


# --------------------------------------------------------------------------- PREPARE / EXECUTE

def test_prepared_memory_execute(engine):
    mem = PreparedMemory()
    d = decide(engine, "PREPARE del(int) AS DELETE FROM t WHERE id = $1", prepared=mem)
    assert d.action == "allow"
    mem.observe(d.statements)
    d = decide(engine, "EXECUTE del(5)", prepared=mem)
    assert d.action == "allow" and d.statements[0].kinds == ("execute", "delete")
    assert d.statements[0].relations_written == ("public.t",)
    # DEALLOCATE forgets nothing (it may not have run: an earlier error of its Query
    # skips it), and a PREPARE of the name that Postgres refuses adds to what it means
    mem.observe(classify("DEALLOCATE del"))
    mem.observe(classify("PREPARE del AS SELECT $1::int"))
    d = decide(engine, "EXECUTE del(5)", prepared=mem)
    assert "delete" in d.statements[0].kinds and d.statements[0].relations_written == \
        ("public.t",)
    # a name never prepared is opaque and refused
    d = decide(engine, "EXECUTE other(5)", prepared=mem)
    assert d.action == "block" and "opaque" in d.statements[0].flags


def test_prepared_memory_union_on_reprepare():
    mem = PreparedMemory()
    mem.observe(classify("PREPARE p AS SELECT 1"))
    mem.observe(classify("PREPARE p AS DELETE FROM t"))   # Postgres would refuse this one
    st = classify("EXECUTE p", prepared=mem)[0]
    assert "destructive" in st.flags and "delete" in st.kinds


def test_prepared_memory_protocol_parse_and_discard():
    mem = PreparedMemory()
    mem.record("s1", classify("UPDATE t SET a = 1")[0])      # a named Parse
    assert "destructive" in classify("EXECUTE s1", prepared=mem)[0].flags
    mem.observe(classify("DISCARD ALL"))        # may not have run: s1 keeps its meaning
    assert "destructive" in classify("EXECUTE s1", prepared=mem)[0].flags
    mem.record("s2", classify("SELECT 1")[0])
    mem.forget("s2")
    assert "opaque" in classify("EXECUTE s2", prepared=mem)[0].flags


def test_prepare_then_execute_in_one_text():
    stmts = classify("PREPARE p AS DELETE FROM t WHERE id = $1; EXECUTE p(1)")
    assert stmts[1].kinds == ("execute", "delete") and stmts[1].flags == ("write",)


def test_explain_execute_is_not_cached(engine):
    mem = PreparedMemory()
    assert decide(engine, "EXPLAIN EXECUTE p", prepared=mem).action == "block"
    mem.observe(classify("PREPARE p AS SELECT 1"))
    assert decide(engine, "EXPLAIN EXECUTE p", prepared=mem).action == "allow"


def test_execute_decisions_are_not_cached(engine):
    mem = PreparedMemory()
    mem.observe(classify("PREPARE p AS SELECT 1"))
    assert decide(engine, "EXECUTE p", prepared=mem).action == "allow"
    mem.forget("p")
    mem.observe(classify("PREPARE p AS DELETE FROM t"))
    assert decide(engine, "EXECUTE p", prepared=mem).action == "block"


# --------------------------------------------------------------------------- explain

def _explain(tmp_path, capsys, sql, identity=None, as_json=False, check=True):
    path = tmp_path / "pgguard.toml"
    path.write_text(CONFIG)
    args = argparse.Namespace(config=str(path), identity=identity, json=as_json, sql=sql,
                              check=check)
    rc = explain_main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_explain_table(tmp_path, capsys):
    rc, out, err = _explain(tmp_path, capsys, "SELECT 1; DROP INDEX orders_pkey", "ci-agent")
    assert rc == EXIT_BLOCK
    assert "statement 2: DROP INDEX orders_pkey" in out
    assert "destructive: DROP INDEX public.orders_pkey" in out
    assert 'decision: BLOCK (rule "guarded-default")' in out
    assert "HINT:" in out
    assert err == ""        # a refusal is the answer, not a failure of the command


def test_explain_exits_0_once_explained_unless_check(tmp_path, capsys):
    for sql, ident in (("DROP INDEX orders_pkey", "ci-agent"), ("SELEC 1", None),
                       ("DELETE FROM orders WHERE id = 1", None), ("SELECT 1", None)):
        rc, out, err = _explain(tmp_path, capsys, sql, ident, check=False)
        assert rc == EXIT_ALLOW and "decision:" in out and err == ""


def test_explain_json(tmp_path, capsys):
    rc, out, _ = _explain(tmp_path, capsys, "SELECT * FROM orders", as_json=True)
    assert rc == EXIT_ALLOW
    report = json.loads(out)
    assert report["decision"] == "allow" and report["identity"] == "(generic agent)"
    assert report["statements"][0]["relations_read"] == ["public.orders"]
    rc, out, _ = _explain(tmp_path, capsys, "DELETE FROM orders WHERE id = 1", as_json=True)
    assert rc == EXIT_APPROVE and json.loads(out)["rule"] == "orders-approval"


def test_explain_shows_settings_rows_and_limit(tmp_path, capsys):
    rc, out, _ = _explain(tmp_path, capsys, "UPDATE t SET a = 1 WHERE id = 1", as_json=True)
    report = json.loads(out)
    assert rc == EXIT_ALLOW and report["max_rows"] == 1000
    st = report["statements"][0]
    assert (st["changes_rows"], st["counted_by_tag"], st["settings"]) == (True, True, [])
    rc, out, err = _explain(tmp_path, capsys, "SET search_path = evil", "ci-agent")
    assert rc == EXIT_BLOCK and 'decision: BLOCK (rule "settings")' in out
    assert "settings   search_path = evil" in out
    rc, out, _ = _explain(tmp_path, capsys, "DELETE FROM t WHERE id = 2", "ci-agent")
    assert "changes rows, counted by the command tag" in out
    assert "row limit: 1000 rows" in out


def test_explain_unknown_identity(tmp_path, capsys):
    from pgguard.errors import PgguardError
    with pytest.raises(PgguardError, match="unknown identity"):
        _explain(tmp_path, capsys, "SELECT 1", "nobody")


def test_explain_parse_error(tmp_path, capsys):
    rc, out, _ = _explain(tmp_path, capsys, "SELEC 1", as_json=True)
    report = json.loads(out)
    assert rc == EXIT_BLOCK and report["rule"] == "parse-error" and report["position"] == 1


# --------------------------------------------------------------------------- docs

@pytest.mark.parametrize("module", ["pgguard.policy", "pgguard.policy.classify",
                                    "pgguard.policy.cache", "pgguard.policy.rules",
                                    "pgguard.policy.explain"])
def test_docstring_examples(module):
    import doctest
    import importlib
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS
                             | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0


# --------------------------------------------------------------------------- settings

def test_settings_check_runs_before_the_rules():
    # even an allow-everything rule does not open a setting outside the allow-list
    e = PolicyEngine(loads('[[rules]]\nname = "anything"\naction = "allow"\n'))
    for sql in ("SET search_path = evil", "SELECT set_config('role', 'postgres', false)",
                "BEGIN READ WRITE", "SET application_name = 'pgguard:alice'",
                "SET session_replication_role = replica"):
        for ident in (AGENT, HUMAN):
            d = e.decide(sql, "x", ident, "db")
            assert (d.action, d.rule) == ("block", "settings"), (sql, d)
            assert d.message.startswith('pgguard: statement refused by rule "settings"')
            assert "Settings changed:" in d.detail
            assert "application_name" in d.hint
    assert e.decide("SET work_mem = '64MB'", "x", AGENT, "db").action == "allow"


def test_settings_messages_name_the_setting_and_how_to_allow_it():
    e = PolicyEngine(loads(""))
    d = e.decide("SET myapp.tenant = '7'", "x", AGENT, "db")
    assert "myapp.tenant to '7'" in d.message and "not in the settings allow-list" in d.message
    assert '[policy] settings = ["myapp.tenant"]' in d.hint
    d = e.decide("SET row_security = off", "x", AGENT, "db")
    assert "row-level security" in d.message and "cannot be changed" in d.hint
    d = e.decide("SELECT set_config(current_user, 'x', false)", "x", AGENT, "db")
    assert "name is computed" in d.message
    d = e.decide("RESET search_path", "x", AGENT, "db")
    assert "resets search_path" in d.message


@pytest.mark.parametrize("name,value,ok", [
    ("work_mem", "1GB", True), ("enable_hashjoin", "off", True), ("jit", None, True),
    ("application_name", "bot", True), ("application_name", None, False),
    ("application_name", " PgGuard:x", False), ("transaction_read_only", "on", True),
    ("transaction_read_only", "tru", True), ("transaction_read_only", "off", False),
    ("default_transaction_read_only", None, False), ("default_transaction_read_only", "0",
                                                     False),
    ("client_encoding", "utf8", True), ("client_encoding", "LATIN1", False),
    ("client_encoding", None, False), ("standard_conforming_strings", "on", True),
    ("standard_conforming_strings", "off", False), ("role", "none", False),
    ("session_authorization", None, False), ("shared_preload_libraries", "x", False),
    ("my_preload_libraries", "x", False), ("*", None, False), ("search_path", "a", False),
    ("transaction_snapshot", "x", False), ("myapp.tenant", "1", False),
])
def test_settings_policy_defaults(name, value, ok):
    from pgguard.policy.rules import SettingsPolicy
    assert (SettingsPolicy().refusal(name, value) is None) is ok


def test_settings_policy_config_extension():
    from pgguard.policy.rules import SettingsPolicy
    p = SettingsPolicy(["search_path", "myapp.*", "Geqo_Effort"])
    assert p.refusal("search_path", "x") is None
    assert p.refusal("myapp.tenant", "1") is None
    assert p.refusal("geqo_effort", "3") is None
    assert p.refusal("other.tenant", "1") is not None
    assert p.refusal("role", "x") is not None                 # never, whatever the list
    e = PolicyEngine(loads('[policy]\nsettings = ["search_path"]\n'))
    assert e.decide("SET search_path = app", "x", AGENT, "db").action == "allow"


@pytest.mark.parametrize("toml,path", [
    ('[policy]\nsettings = ["role"]\n', "policy.settings[0]"),
    ('[policy]\nsettings = ["work_mem", "session_*"]\n', "policy.settings[1]"),
    ('[policy]\nsettings = ["*"]\n', "policy.settings[0]"),
    ('[policy]\nsettings = ["*_preload_libraries"]\n', "policy.settings[0]"),
    ('[policy]\nsettings = ["Client_Encoding"]\n', "policy.settings[0]"),
    ('[policy]\nsettings = [" "]\n', "policy.settings[0]"),
    ('[policy]\nagents_max_rows = -1\n', "policy.agents_max_rows"),
    ('[policy]\nhumans_max_rows = "x"\n', "policy.humans_max_rows"),
    ('[[rules]]\nname = "a"\naction = "allow"\n[[rules]]\nname = "b"\naction = "allow"\n'
     'max_rows = -3\n', "rules[1].max_rows"),
    ('[[rules]]\nname = "a"\naction = "allow"\nmax_rows = 1.5\n', "rules[0].max_rows"),
])
def test_policy_config_errors_name_the_key_path(toml, path):
    from pgguard.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        loads(toml)
    assert f": {path}:" in str(e.value), str(e.value)


# --------------------------------------------------------------------------- max_rows

MAX_ROWS_CONFIG = """
[identities.ci-agent]
kind = "agent"

[identities.etl]
kind = "agent"

[identities.alice]
kind = "human"

[identities.bob]
kind = "human"

[policy]
agents_max_rows = 500
humans_max_rows = 0

[[rules]]
name = "etl-bulk"
when = { identity = ["etl"] }
action = "allow"
max_rows = 100000

[[rules]]
name = "orders-small"
when = { relations = ["public.orders"], statements = ["update", "delete"] }
action = "allow"
max_rows = 10

[[rules]]
name = "audit-unlimited"
when = { relations = ["audit.*"] }
action = "allow"
max_rows = 0

[[rules]]
name = "bob-limited"
when = { identity = ["bob"], statements = ["update", "delete", "merge", "insert"] }
action = "allow"
max_rows = 50

[[rules]]
name = "approve-archive"
when = { relations = ["archive"] }
action = "approve"
max_rows = 7
"""


@pytest.mark.parametrize("who,sql,action,limit", [
    ("ci-agent", "UPDATE t SET a = 1 WHERE id = 1", "allow", 500),       # kind default
    ("ci-agent", "SELECT * FROM t", "allow", None),                      # changes no rows
    ("ci-agent", "INSERT INTO t VALUES (1)", "allow", None),
    ("ci-agent", "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = 2", "allow",
     500),
    ("ci-agent", "DELETE FROM orders WHERE id = 3", "allow", 10),         # per relation
    ("ci-agent", "UPDATE orders SET a = 1 WHERE id = 1; UPDATE t SET a = 1 WHERE id = 1",
     "allow", 10),                                                        # min over stmts
    ("ci-agent", "DELETE FROM audit.log WHERE id = 1", "allow", None),    # 0: no limit
    ("ci-agent", "DELETE FROM audit.log WHERE id = 1; DELETE FROM t WHERE id = 2", "allow",
     500),
    ("etl", "UPDATE orders SET a = 1 WHERE id = 1", "allow", 100000),    # first match wins
    ("alice", "UPDATE t SET a = 1 WHERE id = 1", "allow", None),          # humans default 0
    ("alice", "DELETE FROM orders WHERE id = 1", "allow", 10),
    ("bob", "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING 1) SELECT * FROM d", "allow",
     None),                                                              # kinds select+delete
    ("bob", "DELETE FROM t WHERE id = 1", "allow", 50),
    ("ci-agent", "DO $$ BEGIN UPDATE t SET a = 1 WHERE id = 1; END $$", "allow", 500),
    ("ci-agent", "UPDATE archive SET a = 1 WHERE id = 1", "approve", 7),
    ("ci-agent", "DELETE FROM t", "block", None),
])
def test_decision_max_rows(who, sql, action, limit):
    e = PolicyEngine(loads(MAX_ROWS_CONFIG))
    d = e.decide(sql, who, e.cfg.identities[who], "db")
    assert (d.action, d.max_rows) == (action, limit), d
    # cached decisions carry the same limit
    assert e.decide(sql, who, e.cfg.identities[who], "db").max_rows == limit


def test_max_rows_default_is_1000_for_agents():
    e = PolicyEngine(loads(""))
    assert e.decide("UPDATE t SET a = 1 WHERE id = 1", "x", AGENT, "db").max_rows == 1000
    assert e.decide("UPDATE t SET a = 1 WHERE id = 1", "h", HUMAN, "db").max_rows is None
    e = PolicyEngine(loads("[policy]\nhumans_max_rows = 25\n"))
    assert e.decide("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.x THEN DELETE",
                    "x", HUMAN, "db").max_rows == 25
