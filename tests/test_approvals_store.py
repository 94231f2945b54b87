# Approval store: decisions, who may decide, expiry, grants, waiting across processes.
from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from pgguard.approvals.store import (ApprovalStore, InvalidInput, NotAllowed, NotFound,
                                     NotPending)
from pgguard.config import loads

SQL = "UPDATE orders SET state = 'paid' WHERE id = 7"


def _ask(store: ApprovalStore, **kw) -> "object":
    args = dict(identity="ci-agent", database="app", statement=SQL, fingerprint="fp-1",
                classification="update public.orders [write]", rule="orders",
                approvers=(), timeout_s=30, session_id="s-1")
    args.update(kw)
    return store.request(**args)


@pytest.fixture
def store(tmp_path: Path):
    s = ApprovalStore(tmp_path / "approvals.sqlite3", admin_groups=["dba"],
                      poll_interval_s=0.05)
    yield s
    s.close()


def test_request_get_pending_and_json(store):
    r = _ask(store)
    assert r.id == 1 and r.pending and r.approvers == ("dba",)
    assert 29 < r.timeout_s <= 30
    got = store.get(r.id)
    assert got == r
    assert [p.id for p in store.pending()] == [r.id]
    j = got.as_json()
    for key in ("id", "identity", "database", "statement", "rule", "requested_at",
                "expires_at"):
        assert key in j
    assert j["requested_at"].endswith("Z") and j["state"] == "pending"
    with pytest.raises(NotFound):
        store.get(999)


def test_default_timeout_and_rule_approvers(tmp_path):
    cfg = loads('[admin]\ngroups = ["ops"]\n[approvals]\ndefault_timeout = "2m"\n'
                f'state_dir = "{tmp_path / "st"}"\n')
    s = ApprovalStore.from_config(cfg)
    assert s.path == tmp_path / "st" / "approvals.sqlite3"
    r = _ask(s, timeout_s=None)
    assert r.approvers == ("ops",) and round(r.timeout_s) == 120
    r2 = _ask(s, approvers=("leads", "dba"))
    assert r2.approvers == ("leads", "dba")
    s.close()


def test_relative_state_dir_resolves_against_config_dir(tmp_path):
    cfg = loads("")
    cfg.base_dir = str(tmp_path)
    s = ApprovalStore.from_config(cfg)
    assert s.path == tmp_path / "pgguard-state" / "approvals.sqlite3"
    s.close()


def test_approve_and_deny(store):
    a, b = _ask(store), _ask(store)
    done = store.decide(a.id, True, "alice", ["dba"])
    assert done.state == "approved" and done.approver == "alice" and done.wait_s >= 0
    assert store.get(a.id).state == "approved"
    d = store.decide(b.id, False, "alice", ["dba"], reason="not during the freeze")
    assert (d.state, d.reason) == ("denied", "not during the freeze")
    assert store.get(b.id).reason == "not during the freeze"
    assert store.pending() == []
    assert [r.id for r in store.recent(10)] == [b.id, a.id]
    assert [r.id for r in store.recent(10, state="denied")] == [b.id]
    assert store.counts()["approved"] == 1 and store.counts()["denied"] == 1


def test_decide_twice_or_unknown(store):
    r = _ask(store)
    store.decide(r.id, True, "alice", ["dba"])
    with pytest.raises(NotPending, match="already approved by alice"):
        store.decide(r.id, False, "bob", ["dba"])
    with pytest.raises(NotFound):
        store.decide(4242, True, "alice", ["dba"])


def test_self_approval_refused(store):
    r = _ask(store, identity="alice")
    with pytest.raises(NotAllowed, match="own request"):
        store.decide(r.id, True, "alice", ["dba"])
    assert store.get(r.id).pending


def test_approver_groups(store):
    r = _ask(store, approvers=("leads",))
    with pytest.raises(NotAllowed, match="leads"):
        store.decide(r.id, True, "alice", ["dba"])      # admin, but the rule names others
    store.decide(r.id, True, "carol", ["devs", "leads"])
    r2 = _ask(store)                                    # rule names none: [admin] groups
    with pytest.raises(NotAllowed):
        store.decide(r2.id, True, "dave", ["devs"])
    with pytest.raises(NotAllowed):
        store.decide(r2.id, True, "dave", [])
    store.decide(r2.id, False, "alice", ["dba"])


def test_expiry_reads_as_timed_out_and_refuses_decisions(store):
    r = _ask(store, timeout_s=0.2)
    events = []
    store.listeners.append(lambda e, req: events.append((e, req.id)))
    time.sleep(0.3)
    assert store.get(r.id).state == "timed_out"          # before any sweep
    assert store.pending() == []
    assert [x.id for x in store.recent(5, state="timed_out")] == [r.id]
    with pytest.raises(NotPending, match="timed out"):
        store.decide(r.id, True, "alice", ["dba"])
    swept = store.expire()
    assert [x.id for x in swept] == [r.id] and swept[0].decided_at == pytest.approx(
        r.expires_at)
    assert store.expire() == []                          # reported once
    assert events == [("timed_out", r.id)]
    with pytest.raises(InvalidInput):
        _ask(store, timeout_s=0)


def test_withdraw(store):
    a, b, c = _ask(store), _ask(store, session_id="s-2"), _ask(store, cancel_key=77)
    assert store.withdraw(a.id) is True
    assert store.withdraw(a.id) is False
    assert store.get(a.id).state == "withdrawn"
    with pytest.raises(NotPending, match="withdrawn"):
        store.decide(a.id, True, "alice", ["dba"])
    assert store.withdraw_session("s-2") == 1 and store.get(b.id).state == "withdrawn"
    assert store.withdraw_cancel_key(77) == 1 and store.get(c.id).state == "withdrawn"


def test_grant_window(store):
    r = _ask(store)
    assert store.check_grant("ci-agent", "app", "fp-1") is None
    done = store.decide(r.id, True, "alice", ["dba"], window_s=0.4)
    g = store.check_grant("ci-agent", "app", "fp-1")
    assert g is not None and g.id == done.grant_id and g.approver == "alice"
    assert g.request_id == r.id and g.active
    # only this identity, database and fingerprint
    assert store.check_grant("other-agent", "app", "fp-1") is None
    assert store.check_grant("ci-agent", "app2", "fp-1") is None
    assert store.check_grant("ci-agent", "app", "fp-2") is None
    assert [x.id for x in store.grants()] == [g.id]
    time.sleep(0.5)
    assert store.check_grant("ci-agent", "app", "fp-1") is None
    assert store.grants() == [] and len(store.grants(active_only=False)) == 1


def test_grant_revoke_and_window_limits(store):
    r = _ask(store)
    with pytest.raises(InvalidInput, match="max_window"):
        store.decide(r.id, True, "alice", ["dba"], window_s=9 * 3600)
    with pytest.raises(InvalidInput):
        store.decide(r.id, False, "alice", ["dba"], window_s=60)
    assert store.get(r.id).pending
    store.decide(r.id, True, "alice", ["dba"], window_s=600)
    g = store.check_grant("ci-agent", "app", "fp-1")
    assert store.revoke_grant(g.id).revoked_at is not None
    assert store.check_grant("ci-agent", "app", "fp-1") is None
    with pytest.raises(NotPending):
        store.revoke_grant(g.id)
    with pytest.raises(NotFound):
        store.revoke_grant(999)


def test_prune(store):
    r = _ask(store)
    store.decide(r.id, True, "alice", ["dba"])
    keep = _ask(store)
    assert store.prune(3600) == 0
    assert store.prune(-1) == 1
    with pytest.raises(NotFound):
        store.get(r.id)
    assert store.get(keep.id).pending


def test_listeners_see_every_change(store):
    events = []
    store.listeners.append(lambda e, req: events.append((e, req.id, req.state)))
    store.listeners.append(lambda e, req: 1 / 0)          # a broken listener changes nothing
    a, b = _ask(store), _ask(store)
    store.decide(a.id, True, "alice", ["dba"])
    store.withdraw(b.id)
    assert events == [("requested", 1, "pending"), ("requested", 2, "pending"),
                      ("approved", 1, "approved"), ("withdrawn", 2, "withdrawn")]


def test_concurrent_deciders_one_wins(store, tmp_path):
    r = _ask(store)
    results = []

    def decide(name):
        s = ApprovalStore(store.path)
        try:
            s.decide(r.id, name.startswith("a"), name, ["dba"])
            results.append(name)
        except NotPending:
            results.append("lost")
        finally:
            s.close()

    threads = [threading.Thread(target=decide, args=(n,)) for n in
               ("alice", "bob", "anna", "ben", "amy", "bill")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count("lost") == 5
    winner = next(x for x in results if x != "lost")
    assert store.get(r.id).approver == winner


# --------------------------------------------------------------------------- waiting

def test_wait_decision_same_process_is_immediate(store):
    async def main():
        r = _ask(store)
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, store.decide, r.id, True, "alice", ["dba"])
        t0 = time.monotonic()
        final = await store.wait_decision(r.id)
        return final, time.monotonic() - t0

    final, took = asyncio.run(main())
    assert final.state == "approved" and took < 0.2


def test_wait_decision_timeout_and_expiry(store):
    async def main():
        r = _ask(store, timeout_s=0.3)
        still = await store.wait_decision(r.id, timeout=0.1)
        assert still.pending
        t0 = time.monotonic()
        final = await store.wait_decision(r.id)
        return final, time.monotonic() - t0

    events = []
    store.listeners.append(lambda e, req: events.append(e))
    final, took = asyncio.run(main())
    assert final.state == "timed_out" and 0.1 < took < 0.5
    assert events == ["requested", "timed_out"]        # the waiter persisted it
    with sqlite3.connect(store.path) as c:
        assert c.execute("SELECT state FROM requests").fetchone()[0] == "timed_out"


def test_wait_cancelled_leaves_request(store):
    async def main():
        r = _ask(store)
        task = asyncio.ensure_future(store.wait_decision(r.id))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store._waiters == {}
        return r

    r = asyncio.run(main())
    assert store.get(r.id).pending


def test_wait_on_decided_returns_at_once(store):
    r = _ask(store)
    store.decide(r.id, False, "alice", ["dba"], reason="no")
    final = asyncio.run(store.wait_decision(r.id))
    assert final.state == "denied" and final.reason == "no"


def _decide_later(path: str, request_id: int, delay: float, approve: bool) -> None:
    time.sleep(delay)
    s = ApprovalStore(path)
    s.decide(request_id, approve, "alice", ["dba"], reason=None if approve else "nope")
    s.close()


def _request_in_child(path: str, q) -> None:
    s = ApprovalStore(path)
    r = _ask(s)
    q.put(r.id)
    s.close()


def test_request_in_one_process_decide_in_another(store):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_request_in_child, args=(str(store.path), q))
    p.start()
    rid = q.get(timeout=30)
    p.join(30)
    assert store.get(rid).pending

    async def main():
        # the decider starts before we wait; measure from the decision on
        child = ctx.Process(target=_decide_later, args=(str(store.path), rid, 1.0, True))
        child.start()
        try:
            final = await store.wait_decision(rid, timeout=20)
            seen = time.time()
        finally:
            await asyncio.to_thread(child.join, 30)
        return final, seen

    final, seen = asyncio.run(main())
    assert final.state == "approved" and final.approver == "alice"
    assert seen - final.decided_at < 0.5, seen - final.decided_at


def test_many_waiters_across_processes(store):
    """50 pending at once, decided in another process; all waiters see their decision."""
    ctx = multiprocessing.get_context("spawn")
    reqs = [_ask(store, session_id=f"s-{i}") for i in range(50)]
    assert len(store.pending()) == 50

    async def main():
        waits = [asyncio.ensure_future(store.wait_decision(r.id, timeout=30)) for r in reqs]
        procs = [ctx.Process(target=_decide_later,
                             args=(str(store.path), r.id, 0.5, r.id % 2 == 0))
                 for r in reqs[:10]]
        for p in procs:
            p.start()
        # the other 40 from a thread of this process (a different connection)
        others = ApprovalStore(store.path)

        def rest():
            for r in reqs[10:]:
                others.decide(r.id, r.id % 2 == 0, "alice", ["dba"],
                              reason=None if r.id % 2 == 0 else "nope")
        await asyncio.to_thread(rest)
        finals = await asyncio.gather(*waits)
        for p in procs:
            await asyncio.to_thread(p.join, 30)
        others.close()
        return finals, time.time()

    finals, now = asyncio.run(main())
    assert [f.state for f in finals] == ["approved" if r.id % 2 == 0 else "denied"
                                         for r in reqs]
    assert store.pending() == []


def _fork_child(store: ApprovalStore, rid: int) -> None:
    # the parent's store object, inherited through fork: must reopen its connection
    store.decide(rid, True, "alice", ["dba"])


def test_store_survives_fork(store):
    r = _ask(store)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_fork_child, args=(store, r.id))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert store.get(r.id).state == "approved"


def test_grant_rows_first_measurement_stands(store):
    r = _ask(store)
    done = store.decide(r.id, True, "alice", ["dba"], window_s=60)
    assert store.check_grant("ci-agent", "app", "fp-1").max_rows is None
    store.grant_rows(done.grant_id, 3)
    store.grant_rows(done.grant_id, 900)        # a later run never raises it
    g = store.check_grant("ci-agent", "app", "fp-1")
    assert g.max_rows == 3 and g.as_json()["max_rows"] == 3


def test_a_store_file_from_before_row_bounds_is_brought_up_to_date(tmp_path):
    # a grants table without max_rows (pgguard before round 24): opened, it gains the
    # column, and its grants read as not measured (a human is asked again)
    import sqlite3
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE grants (id INTEGER PRIMARY KEY AUTOINCREMENT, identity TEXT "
                  "NOT NULL, database TEXT NOT NULL, fingerprint TEXT NOT NULL, rule TEXT "
                  "NOT NULL, approver TEXT NOT NULL, request_id INTEGER, granted_at REAL NOT "
                  "NULL, expires_at REAL NOT NULL, revoked_at REAL)")
        c.execute("INSERT INTO grants (identity, database, fingerprint, rule, approver, "
                  "granted_at, expires_at) VALUES ('ci-agent', 'app', 'fp-old', 'r', "
                  "'alice', 0, 1e12)")
    s = ApprovalStore(path, admin_groups=["dba"])
    try:
        g = s.check_grant("ci-agent", "app", "fp-old")
        assert g is not None and g.max_rows is None
        s.grant_rows(g.id, 2)
        assert s.check_grant("ci-agent", "app", "fp-old").max_rows == 2
    finally:
        s.close()
