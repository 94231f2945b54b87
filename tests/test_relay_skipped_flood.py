# Red team, round 16 (helper 71): after an error in an extended-protocol pipeline,
# Postgres reads and drops every message up to Sync, answering nothing. A client that
# kept sending Executes without a Sync grew the proxy by some 165 bytes per 10-byte
# Execute (135 MB sent: +2 GB, never given back): the audit's log of client messages,
# the tracker's entries and the expected-answers ring each kept one per message. Now the
# skipped messages cost nothing past a bound, as in Postgres. Judged by the answer the
# client gets (the error, then ReadyForQuery, as directly), another session served, and
# the proxy's peak memory.
import struct

import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD
from mask_corpus import DB, MASKS, seed
from test_masking_large_values import _peak_kb, _reset_peak, _tree

MB = 1 << 20
FLOOD = 16 * MB


def _msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


PARSE = _msg(b"P", b"\0SELECT 1/0\0\0\0")
BIND = _msg(b"B", b"\0\0\0\0\0\0\0\0")
EXECUTE = _msg(b"E", b"\0\0\0\0\0")
FLOODS = {
    "executes": EXECUTE,
    "bind-execute": BIND + EXECUTE,
    "parse-bind-execute": PARSE + BIND + EXECUTE,
    "describes": _msg(b"D", b"S\0"),
    # (round 17: the audit watches Close, to forget the names Postgres closed)
    "closes": _msg(b"C", b"Sname\0") + _msg(b"C", b"Pportal\0"),
}


@pytest.fixture(scope="module")
def fproxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("skipped-flood"), extra=MASKS).start()
    yield p
    p.stop()


def _flood(kind: str) -> bytes:
    unit = FLOODS[kind]
    return unit * (FLOOD // len(unit))


@pytest.mark.parametrize("who", ["agent", "human"])
@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_messages_skipped_after_an_error_cost_no_memory(fproxy, pg, who, kind):
    user, pw = (AGENT, AGENT_PASSWORD) if who == "agent" else (HUMAN, HUMAN_PASSWORD)
    flood = _flood(kind)
    pids = _tree(fproxy.proc.pid)
    # (a generous read timeout: the flood is read through before the Sync is answered,
    # seconds on a loaded machine; memory is what is judged)
    c = rawpg.RawClient.connect(fproxy.port, user, pw, database=DB, timeout=120)
    try:
        _reset_peak(pids)
        before = _peak_kb(pids)
        c.sock.sendall(PARSE + BIND + EXECUTE)
        for i in range(0, len(flood), MB):
            c.sock.sendall(flood[i:i + MB])
        c.send(rawpg.SYNC)
        msgs = c.until_ready()
        grown = (_peak_kb(pids) - before) * 1024
        # what Postgres answers: ParseComplete, BindComplete, the error, ReadyForQuery
        errs = rawpg.errors(msgs)
        assert [e.get("C") for e in errs] == ["22012"], msgs[:6]
        assert msgs[-1][0] == b"Z", msgs[-1]
        # the session goes on
        c.send(rawpg.query("SELECT 41 + 1"))
        assert [r[0] for r in rawpg.rows(c.until_ready())] == [b"42"]
    finally:
        c.close()
    assert fproxy.proc.poll() is None
    # before: about 16 bytes of memory per byte sent (+220 to +420 MB for 16 MB); what
    # is left is the chunks in flight, which a loaded machine lets pile up (66 MB seen
    # once with another proxy busy beside it)
    assert grown < 8 * FLOOD, (kind, who, grown // MB)
    other = rawpg.RawClient.connect(fproxy.port, HUMAN, HUMAN_PASSWORD, database=DB)
    try:
        other.send(rawpg.query("SELECT 1"))
        assert [r[0] for r in rawpg.rows(other.until_ready())] == [b"1"]
    finally:
        other.close()
