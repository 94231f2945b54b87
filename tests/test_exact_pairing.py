# Statement pairing by Postgres' rules: after an error in an extended-protocol message,
# Postgres skips every message until Sync, Queries and FunctionCalls too (they get no
# ReadyForQuery). The session's count of answers still owed (Session.in_flight) must skip
# them as well: a session it miscounts never looks idle, so on shutdown it is not closed
# when its statements are done but only when the shutdown timeout cuts it off. Each case
# runs the same bytes directly (the replies must match Postgres'), then through pgguard,
# then stops pgguard: the idle session must be told 57P01 at once.
from __future__ import annotations

import signal
import time

import pytest

from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER
from rawpg import SYNC, RawClient, bind, error_fields, execute, function_call, parse, query

NOW_OID = 1299          # pg_catalog.now()

FAIL = parse("SELECT 1/0") + bind() + execute()          # 22012 at Execute
CASES = {
    "execute-error-query": (FAIL + query("SELECT 'skipped-1'") + SYNC, 1),
    "execute-error-two-queries": (FAIL + query("SELECT 'skipped-1'")
                                  + query("SELECT 'skipped-2'") + SYNC, 1),
    "execute-error-functioncall": (FAIL + function_call(NOW_OID) + SYNC, 1),
    "execute-error-query-then-after-sync": (FAIL + query("SELECT 'skipped-1'") + SYNC
                                            + query("SELECT 'answered'"), 2),
    "bind-error-query": (bind(stmt="no_such_stmt") + execute()
                         + query("SELECT 'skipped-1'") + SYNC, 1),
    "two-batches": (FAIL + query("SELECT 'skipped-1'") + SYNC
                    + FAIL + function_call(NOW_OID) + query("SELECT 'skipped-2'") + SYNC, 2),
}


def _replies(port: int, user: str, password: str, data: bytes, zs: int) -> tuple:
    c = RawClient.connect(port, user, password)
    c.send(data)
    states, rows, seen = [], [], 0
    while seen < zs:
        t, p = c.read()
        if t == b"E":
            states.append(error_fields(p)["C"])
        elif t == b"D":
            rows.append(p)
        elif t == b"V":
            rows.append(b"function result")
        elif t == b"Z":
            seen += 1
    return c, (tuple(states), tuple(rows))


@pytest.mark.parametrize("name", sorted(CASES))
def test_skipped_messages_are_not_owed_an_answer(pg, make_proxy, name):
    data, zs = CASES[name]
    direct, want = _replies(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, data, zs)
    direct.close()
    assert not any(b"skipped" in r for r in want[1]), want
    proxy = make_proxy()
    c, got = _replies(proxy.port, AGENT, AGENT_PASSWORD, data, zs)
    assert got == want
    # everything answered: the session is idle, and a shutdown ends it at once
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    c.sock.settimeout(10)
    t, p = c.read()
    waited = time.monotonic() - t0
    assert (t, error_fields(p).get("C")) == (b"E", "57P01"), (t, p)
    assert waited < 2.5, f"the idle session was closed only after {waited:.1f}s"
