# `pgguard policy replay`: a candidate policy over a real proxy's recorded audit log, each
# transition (allowed -> blocked, blocked -> allowed, -> approval) grouped by rule.
from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD
from guarded import guarded_proxy

from pgguard.config import loads
from pgguard.policy.replay import replay

DB = "appdb"
RULES = """
[[rules]]
name = "no-drop"
when = { kind = "agent", statements = ["drop"] }
action = "block"
"""
# the candidate: drops allowed for agents, deletes of rp_t refused, updates held
CANDIDATE_RULES = """
[[rules]]
name = "no-deletes-on-rp-t"
when = { kind = "agent", statements = ["delete"], relations = ["public.rp_t"] }
action = "block"

[[rules]]
name = "updates-need-approval"
when = { kind = "agent", statements = ["update"] }
action = "approve"

[[rules]]
name = "drops-ok"
when = { kind = "agent", statements = ["drop"] }
action = "allow"
"""

AGENT_TRAFFIC = [
    ("SELECT count(*) FROM rp_t", True),
    ("SELECT * FROM rp_t WHERE id = 1", True),
    ("DELETE FROM rp_t WHERE id = 3", True),
    ("DELETE FROM rp_t WHERE id = 4", True),
    ("UPDATE rp_t SET v = 2 WHERE id = 1", True),
    ("DROP TABLE rp_gone", False),
    ("DROP INDEX rp_t_pkey", False),
]


@pytest.fixture(scope="module")
def recorded(pg, tmp_path_factory):
    """A guarded proxy's audit log after the traffic above (and alice's), proxy stopped."""
    pg.execute("DROP TABLE IF EXISTS rp_t, rp_gone; CREATE TABLE rp_t (id int PRIMARY KEY, "
               "v int); INSERT INTO rp_t SELECT g, 0 FROM generate_series(1, 5) g; "
               "CREATE TABLE rp_gone (id int)", dbname=DB)
    tmp = tmp_path_factory.mktemp("replay")
    with guarded_proxy(pg, tmp, RULES) as p:
        with psycopg.connect(p.dsn(AGENT, AGENT_PASSWORD, dbname=DB), autocommit=True) as c:
            for sql, ok in AGENT_TRAFFIC:
                try:
                    c.execute(sql)
                    assert ok, sql
                except psycopg.errors.InsufficientPrivilege:
                    assert not ok, sql
        with psycopg.connect(p.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB), autocommit=True) as c:
            c.execute("UPDATE rp_t SET v = 3 WHERE id = 2")
        config = p.config.read_text()
        audit_dir = p.audit_dir
    # the truth upstream: the refused drops did not happen
    assert pg.execute("SELECT count(*) FROM rp_gone", dbname=DB) == [(0,)]
    cand = tmp / "candidate.toml"
    cand.write_text(config.replace(RULES, "") + CANDIDATE_RULES)
    return cand, audit_dir


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgguard", "policy", "replay", *args],
                          capture_output=True, text=True, timeout=120)


def test_replay_groups_each_transition_by_rule(recorded):
    cand, _ = recorded
    r = cli("-c", str(cand), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    groups = {(g["transition"], g["rule"]): g for g in rep["changes"]}
    assert set(groups) == {("allowed -> blocked", "no-deletes-on-rp-t"),
                           ("allowed -> approval", "updates-need-approval"),
                           ("blocked -> allowed", "no-drop")}, groups
    dels = groups[("allowed -> blocked", "no-deletes-on-rp-t")]
    # normalized: both deletes are one text; counted twice, one example
    assert dels["count"] == 2 and dels["identities"] == [AGENT]
    assert [e["statement"] for e in dels["examples"]] == ["DELETE FROM rp_t WHERE id = $1"]
    assert dels["rule_was"] == "guarded-default"
    drops = groups[("blocked -> allowed", "no-drop")]
    assert drops["count"] == 2 and drops["rule_now"] == "drops-ok"
    assert len(drops["examples"]) == 2
    # alice's update: humans are not matched by the agent rules: unchanged
    assert groups[("allowed -> approval", "updates-need-approval")]["identities"] == [AGENT]
    assert rep["changed"] == 5 and rep["unchanged"] >= 3
    assert rep["statements_text"].startswith("normalized")


def test_replay_text_output_and_filters(recorded):
    cand, _ = recorded
    r = cli("-c", str(cand), "--since", "1d")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "would be decided differently" in out and "stored normalized" in out
    assert "allowed -> blocked  rule no-deletes-on-rp-t: 2 statements" in out
    assert "blocked -> allowed  was rule no-drop: 2 statements" in out
    assert "    ci-agent: DELETE FROM rp_t WHERE id = $1" in out
    r = cli("-c", str(cand), "--identity", HUMAN, "--json")
    rep = json.loads(r.stdout)
    assert rep["replayed"] >= 1 and rep["changes"] == []
    r = cli("-c", str(cand), "--since", "2099-01-01", "--until", "2099-01-02", "--json")
    assert json.loads(r.stdout)["records"] == 0
    r = cli("-c", str(cand), "--identity", "nobody")
    assert r.returncode == 1 and "unknown identity 'nobody'" in r.stderr


def test_unchanged_policy_changes_nothing(recorded, tmp_path):
    cand, audit = recorded
    same = tmp_path / "same.toml"
    same.write_text(cand.read_text().replace(CANDIDATE_RULES, RULES))
    r = cli("-c", str(same), "--audit-dir", str(audit), "--json")
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep["changes"] == [] and rep["replayed"] >= 8
    r = cli("-c", str(same), "--audit-dir", str(audit))
    assert "no statement would be decided differently" in r.stdout


BASE = """
[identities.bot]
kind = "agent"
[policy]
agents = "guarded"
"""


def rec(stmt, decision, rule="guarded-default", identity="bot"):
    return {"identity": identity, "database": "app", "statement": stmt,
            "decision": decision, "rule": rule, "approver": None, "ts": None}


def test_literal_dependent_decisions_are_said_so():
    # the proxy saw set_config('statement_timeout', '5s', false) (allowed); the log holds
    # set_config($1, $2, false), whose setting name the replay cannot know
    records = [rec("SELECT set_config($1, $2, false)", "allowed"),
               rec("SELECT set_config($1, $2, false)", "allowed"),
               rec("SELECT * FROM t WHERE id = $1", "allowed")]
    rep = replay(loads(BASE), records)
    assert rep["changed"] == 2 and rep["literal_dependent"] == 2
    (g,) = rep["changes"]
    assert (g["transition"], g["rule"], g["literal_dependent"]) == \
        ("allowed -> blocked", "settings", 2)
    # with the raw text (capture_literals) the proxy's decision comes back
    raw = [rec("SELECT set_config('statement_timeout', '5s', false)", "allowed"),
           rec("SELECT * FROM t WHERE id = 7", "allowed")]
    rep = replay(loads(BASE + "[audit]\ncapture_literals = true\n"), raw)
    assert rep["changed"] == 0 and rep["statements_text"].startswith("raw")


def test_normalized_text_that_does_not_parse_is_not_a_change():
    records = [rec("SELECT $1::interval(3) FROM t LIMIT $2 OFFSET $3 FETCH $4", "allowed"),
               rec("SELEC $1", "blocked", "parse-error")]
    rep = replay(loads(BASE), records)
    assert rep["changes"] == [] and rep["unchanged"] == 1
    assert rep["not_replayed"] == {"normalized text does not parse": 1}


def test_runtime_refusals_and_unknown_identities_are_counted_apart():
    records = [rec("UPDATE t SET a = $1 WHERE id > $2", "blocked", "blast-radius"),
               rec("INSERT INTO t VALUES ($1)", "blocked", "readonly-scope"),
               rec("SET ROLE x", "blocked", "pinned-role"),
               rec("SELECT 1", "allowed", identity="gone"),
               rec("SELECT 2", "allowed", identity="gone"),
               rec("DROP TABLE t", "allowed", "allow-all")]
    rep = replay(loads(BASE), records)
    assert rep["not_replayed"] == {"blast-radius": 1, "readonly-scope": 1, "pinned-role": 1}
    assert rep["unknown_identities"] == {"gone": 2}
    assert rep["replayed"] == 1 and rep["changes"][0]["transition"] == "allowed -> blocked"
    assert rep["changes"][0]["rule_was"] == "allow-all"


@pytest.mark.parametrize("decision,outcome", [("approved", "approval"), ("denied", "approval"),
                                              ("timed_out", "approval"),
                                              ("error", "allowed"), ("allowed", "allowed")])
def test_recorded_outcomes(decision, outcome):
    cfg = loads(BASE + '[[rules]]\nname = "b"\nwhen = { kind = "agent" }\naction = "block"\n')
    rep = replay(cfg, [rec("SELECT 1", decision, "x")])
    assert rep["changes"][0]["transition"] == f"{outcome} -> blocked"
