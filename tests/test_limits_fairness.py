# Red team, round 23 (helper 124): one agent session sending a long pipeline in one
# write (50,000 Bind / Execute / Sync, 100,000 Parse without Sync, a Query of 110,000
# statements) kept the worker's event loop to itself for seconds (12 s at 50,000): every
# other session's login and statements waited. Python now takes a bounded number of a
# session's messages (and of its answers) in one turn of the loop, and nothing it did per
# message cost more as the pipeline grew. Judged by order, not by a clock: another
# session, started after the flood was sent, is answered while the flood's answers are
# still coming, and the flood itself is answered in full, in order.
from __future__ import annotations

import threading

import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD
from guarded import guarded_proxy
from mask_corpus import MASKS, seed

DB = "appdb"
N = 30_000


@pytest.fixture(scope="module")
def fproxy(pg, tmp_path_factory):
    seed(pg)
    with guarded_proxy(pg, tmp_path_factory.mktemp("fairness"), extra=MASKS) as p:
        yield p


def _floods():
    bes = rawpg.bind("s1") + rawpg.execute() + rawpg.frame(b"S", b"")
    return {
        "bind-execute-sync": (rawpg.parse("SELECT 1", "s1") + rawpg.frame(b"S", b"")
                              + bes * N, N + 1),
        "parse-no-sync": (b"".join(rawpg.parse(f"SELECT {i}", f"p{i}") for i in range(N))
                          + rawpg.frame(b"S", b""), 1),
        "queries": (rawpg.query("SELECT 1") * N, N),
    }


@pytest.mark.parametrize("flood", ["bind-execute-sync", "parse-no-sync", "queries"])
def test_a_long_pipeline_does_not_keep_other_sessions_waiting(fproxy, flood):
    data, readies = _floods()[flood]
    c = rawpg.RawClient.connect(fproxy.port, AGENT, AGENT_PASSWORD, database=DB)
    c.sock.settimeout(120)
    seen: list[tuple[str, int]] = []          # (who, flood answers read so far)
    got: dict = {}

    def read_flood():
        msgs = c.until_ready(readies)
        got["msgs"] = msgs
        seen.append(("flood done", len(msgs)))

    try:
        c.send(data)
        reader = threading.Thread(target=read_flood)
        reader.start()
        # another agent session, started after the flood went
        p = rawpg.RawClient.connect(fproxy.port, AGENT, AGENT_PASSWORD, database=DB)
        try:
            assert rawpg.rows(p.run("SELECT 41 + 1")) == [[b"42"]]
            seen.append(("probe answered", 0))
        finally:
            p.close()
        reader.join(120)
        assert not reader.is_alive()
        # the other session was answered before the flood was
        assert [w for w, _ in seen] == ["probe answered", "flood done"], seen
        msgs = got["msgs"]
        assert not rawpg.errors(msgs), rawpg.errors(msgs)[:3]
        assert sum(1 for t, _ in msgs if t == b"Z") == readies
        if flood != "parse-no-sync":
            assert rawpg.tags(msgs).count("SELECT 1") == N
        # the flood's session goes on
        assert rawpg.rows(c.run("SELECT 2")) == [[b"2"]]
    finally:
        c.close()
