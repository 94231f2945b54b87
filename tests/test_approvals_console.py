# psql admin console commands, session helpers (notice, refusal) and the metrics registry.
from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from pgguard.approvals.console import AdminConsole, ConsoleSyntaxError, Result
from pgguard.approvals.hold import admin_url, notice_fields, refusal, summarize
from pgguard.approvals.metrics import Registry, SharedMetrics
from pgguard.approvals.store import ApprovalStore, NotAllowed, NotFound, NotPending
from pgguard.config import loads

ALICE = ("alice", ["dba"])


@pytest.fixture
def store(tmp_path):
    s = ApprovalStore(tmp_path / "a.sqlite3", admin_groups=["dba"])
    yield s
    s.close()


def _ask(store, **kw):
    args = dict(identity="ci-agent", database="app",
                statement="UPDATE orders SET note = 'a;b' WHERE id = 7", fingerprint="fp",
                classification="update public.orders [write]", rule="orders", timeout_s=120,
                session_id="s-1")
    args.update(kw)
    return store.request(**args)


def test_show_approvals(store):
    a, b = _ask(store), _ask(store, identity="etl", database="dw")
    console = AdminConsole(store)
    (res,) = console.execute("SHOW APPROVALS;", ALICE)
    assert res.tag == "SHOW"
    assert res.columns[:4] == ["id", "identity", "database", "rule"]
    assert [r[0] for r in res.rows] == [str(a.id), str(b.id)]
    row = dict(zip(res.columns, res.rows[0]))
    assert row["statement"] == a.statement and row["approvers"] == "dba"
    assert row["expires_in"] in ("2m", "1m59s")
    assert all(isinstance(v, str) or v is None for r in res.rows for v in r)
    assert console.execute("  show   approvals ", ALICE)[0].rows == res.rows   # any case


def test_approve_deny_and_history(store):
    a, b, c = _ask(store), _ask(store), _ask(store)
    console = AdminConsole(store)
    results = console.execute(
        f"APPROVE {a.id}; approve {b.id} for '10m'; DENY {c.id} 'it''s; risky' -- why", ALICE)
    assert [r.tag for r in results] == ["APPROVE", "APPROVE", "DENY"]
    assert all(r.columns == [] for r in results)
    assert "repeats pass for 10m" in results[1].notice
    assert store.get(a.id).state == "approved" and store.get(b.id).window_s == 600
    assert store.get(c.id).reason == "it's; risky"
    (hist,) = console.execute("SHOW HISTORY 2", ALICE)
    assert [r[0] for r in hist.rows] == [str(c.id), str(b.id)]
    assert dict(zip(hist.columns, hist.rows[0]))["state"] == "denied"
    (grants,) = console.execute("SHOW GRANTS", ALICE)
    assert len(grants.rows) == 1
    assert dict(zip(grants.columns, grants.rows[0]))["approver"] == "alice"
    gid = grants.rows[0][0]
    (rev,) = console.execute(f"REVOKE GRANT {gid}", ALICE)
    assert rev.tag == "REVOKE" and store.grants() == []
    d = _ask(store)
    console.execute(f"APPROVE {d.id} FOR 1 h", ALICE)
    assert store.get(d.id).window_s == 3600
    e = _ask(store)
    console.execute(f"DENY {e.id}", ALICE)
    assert store.get(e.id).state == "denied" and store.get(e.id).reason is None


def test_console_errors(store):
    a = _ask(store)
    own = _ask(store, identity="alice")
    console = AdminConsole(store)
    for sql, fragment in (("SELECT 1", "unknown command"), ("SHOW TABLES", "unknown SHOW"),
                          ("APPROVE", "usage: APPROVE"), ("APPROVE x", "usage: APPROVE"),
                          (f"APPROVE {a.id} FOR 'soon'", "invalid duration"),
                          (f"DENY {a.id} reason", "usage: DENY"),
                          (f"DENY {a.id} 'unterminated", "syntax error"),
                          ("SHOW HISTORY x", "unknown SHOW")):
        with pytest.raises(ConsoleSyntaxError, match=fragment) as ei:
            console.execute(sql, ALICE)
        assert ei.value.sqlstate == "42601"
    with pytest.raises(ConsoleSyntaxError) as ei:
        console.execute("DROP TABLE orders", ALICE)
    assert "SHOW HELP" in ei.value.hint
    with pytest.raises(NotFound) as ei:
        console.execute("APPROVE 999", ALICE)
    assert ei.value.sqlstate == "42704"
    with pytest.raises(NotAllowed) as ei:
        console.execute(f"APPROVE {own.id}", ALICE)
    assert ei.value.sqlstate == "42501"
    console.execute(f"APPROVE {a.id}", ALICE)
    with pytest.raises(NotPending) as ei:
        console.execute(f"DENY {a.id} 'late'", ALICE)
    assert ei.value.sqlstate == "55000"
    with pytest.raises(NotAllowed, match="admin group"):
        console.execute("SHOW APPROVALS", ("dave", ["devs"]))
    assert console.execute("", ALICE) == [] and console.execute(" ; ;", ALICE) == []


def test_show_sessions_and_help(store):
    sessions = [{"session_id": "s-1", "identity": "ci-agent", "database": "app",
                 "client_addr": "127.0.0.1:5555", "waiting_approval": 3, "pid": 4242},
                {"session_id": "s-2", "identity": "alice", "state": "idle"}]
    console = AdminConsole(store, sessions=lambda: sessions)
    (res,) = console.execute("SHOW SESSIONS", ALICE)
    assert res.columns[:3] == ["session_id", "identity", "database"]
    assert res.columns[-1] == "pid"
    rows = [dict(zip(res.columns, r)) for r in res.rows]
    assert rows[0]["waiting_approval"] == "3" and rows[0]["pid"] == "4242"
    assert rows[1]["database"] is None and rows[1]["state"] == "idle"
    (empty,) = AdminConsole(store).execute("SHOW SESSIONS", ALICE)
    assert empty.rows == [] and "identity" in empty.columns
    (helptext,) = console.execute("SHOW HELP", ALICE)
    commands = [r[0] for r in helptext.rows]
    assert "SHOW APPROVALS" in commands and any(c.startswith("APPROVE") for c in commands)
    assert isinstance(helptext, Result)


def test_console_async(store):
    import asyncio
    a = _ask(store)
    res = asyncio.run(AdminConsole(store).aexecute(f"APPROVE {a.id}", ALICE))
    assert res[0].tag == "APPROVE"


# --------------------------------------------------------------------------- session helpers

def test_notice_and_refusals(store):
    cfg = loads('[admin]\naddress = "0.0.0.0"\nport = 7000\n')
    assert admin_url(cfg) == "http://127.0.0.1:7000/"
    assert admin_url(loads('[admin]\npublic_url = "https://guard.example/x"')) == \
        "https://guard.example/x/"
    r = _ask(store)
    n = notice_fields(r, admin_url(cfg))
    assert n["message"] == f"waiting for approval #{r.id} (rule orders); times out in 2m"
    assert f"pgguard approvals approve {r.id}" in n["hint"]
    assert f"APPROVE {r.id}" in n["hint"] and "http://127.0.0.1:7000/#1" in n["hint"]
    d = store.decide(r.id, False, "alice", ["dba"], reason="not now")
    err = refusal(d)
    assert err.sqlstate == "42501" and "denied by alice" in err.message
    assert err.message.endswith(": not now")
    t = _ask(store, timeout_s=0.05)
    time.sleep(0.1)
    err = refusal(store.get(t.id))
    assert err.sqlstate == "42501" and "timed out" in err.message
    w = _ask(store)
    store.withdraw(w.id)
    assert refusal(store.get(w.id)).sqlstate == "57014"


def test_summarize_a_policy_decision():
    from pgguard.config import Identity
    from pgguard.policy.rules import PolicyEngine
    cfg = loads('[[rules]]\nname = "orders"\naction = "approve"\n'
                'when = { relations = ["public.orders"] }\n')
    d = PolicyEngine(cfg).decide("UPDATE orders SET x = 1 WHERE id = 2", "bot", Identity(),
                                 "app")
    assert d.action == "approve"
    assert summarize(d) == "update public.orders [write]"


# --------------------------------------------------------------------------- metrics

def test_registry_text_format():
    m = Registry()
    c = m.counter("pgguard_statements_total", "Statements by decision", labels=("decision",))
    c.inc(decision="allowed")
    c.labels(decision="blocked").inc(2)
    assert m.counter("pgguard_statements_total", "again", labels=("decision",)) is c
    with pytest.raises(ValueError):
        c.inc(-1, decision="allowed")
    with pytest.raises(ValueError):
        c.inc(kind="x")
    with pytest.raises(ValueError):
        m.gauge("pgguard_statements_total", "not a gauge")
    g = m.gauge("pgguard_sessions", "Open sessions")
    g.inc(); g.inc(); g.dec()
    m.gauge("pgguard_note", 'a "quoted"\nhelp', labels=("who",)).set(1.5, who='x"y\\z')
    h = m.histogram("pgguard_wait_seconds", "Wait", buckets=(1, 10))
    h.observe(0.5); h.observe(5); h.observe(50)
    m.gauge("pgguard_cb", "callback", fn=lambda: 7)
    text = m.render()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert "# TYPE pgguard_statements_total counter" in lines
    assert 'pgguard_statements_total{decision="allowed"} 1' in lines
    assert 'pgguard_statements_total{decision="blocked"} 2' in lines
    assert "pgguard_sessions 1" in lines
    assert 'pgguard_note{who="x\\"y\\\\z"} 1.5' in lines
    assert "# HELP pgguard_note a \"quoted\"\\nhelp" in lines
    assert 'pgguard_wait_seconds_bucket{le="1"} 1' in lines
    assert 'pgguard_wait_seconds_bucket{le="10"} 2' in lines
    assert 'pgguard_wait_seconds_bucket{le="+Inf"} 3' in lines
    assert "pgguard_wait_seconds_sum 55.5" in lines and "pgguard_wait_seconds_count 3" in lines
    assert "pgguard_cb 7" in lines


def _worker_metrics(state_dir: str, n: int) -> None:
    m = Registry()
    m.counter("pgguard_statements_total", "S", labels=("decision",)).inc(n, decision="allowed")
    m.gauge("pgguard_sessions", "Open").set(n)
    m.histogram("pgguard_wait_seconds", "W", buckets=(1,)).observe(0.5)
    m.gauge("pgguard_global", "G", fn=lambda: 99)
    SharedMetrics(m, state_dir).publish()


def test_metrics_summed_across_workers(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    for n in (2, 3):
        p = ctx.Process(target=_worker_metrics, args=(str(tmp_path), n))
        p.start()
        p.join(30)
        assert p.exitcode == 0
    m = Registry()
    m.counter("pgguard_statements_total", "S", labels=("decision",)).inc(1, decision="allowed")
    m.gauge("pgguard_sessions", "Open").set(1)
    m.gauge("pgguard_global", "G", fn=lambda: 5)
    shared = SharedMetrics(m, tmp_path)
    text = shared.render().splitlines()
    assert 'pgguard_statements_total{decision="allowed"} 6' in text
    assert "pgguard_sessions 6" in text
    assert "pgguard_wait_seconds_count 2" in text          # only the workers observed
    assert "pgguard_global 5" in text                      # callbacks: the scraped worker's
    assert "pgguard_workers 3" in text
    snap = json.loads((tmp_path / "metrics" / next(
        p.name for p in (tmp_path / "metrics").iterdir())).read_text())
    assert "pgguard_global" not in snap
