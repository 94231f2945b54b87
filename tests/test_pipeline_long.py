# A long pipeline with one Sync at its end (asyncpg's executemany sends its Binds and
# Executes so; a raw client may send 100,000 of them): every message is answered, in
# order, and the session's other statements are still audited one by one. The statement
# tracker once walked every answered entry again for each CommandComplete: 100,000
# statements took minutes and stalled every other session (fuzz round 20).
import threading

import psycopg
import rawpg
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD

N = 100_000


def _pipeline(port, user, password, n=N):
    c = rawpg.RawClient.connect(port, user, password)
    c.sock.settimeout(120)      # (a hang, not a speed, is what fails here)
    unit = rawpg.parse("SELECT 1") + rawpg.bind() + rawpg.execute()
    sender = threading.Thread(target=lambda: c.sock.sendall(unit * n + rawpg.SYNC))
    sender.start()
    kinds: dict[bytes, int] = {}
    try:
        while True:
            t, _ = c.read()
            kinds[t] = kinds.get(t, 0) + 1
            if t == b"Z":
                break
        sender.join()
        after = c.run("SELECT 42")
    finally:
        c.close()
    return kinds, rawpg.rows(after)


def test_a_long_pipeline_without_sync_is_answered_whole(proxy):
    for user, password in ((HUMAN, HUMAN_PASSWORD), (AGENT, AGENT_PASSWORD)):
        kinds, after = _pipeline(proxy.port, user, password)
        assert kinds == {b"1": N, b"2": N, b"D": N, b"C": N, b"Z": 1}, (user, kinds)
        assert after == [[b"42"]]


def test_an_error_deep_in_a_long_pipeline_skips_to_the_sync(proxy):
    """The failing Parse is found by its place in the segment (the answered entries
    before it are gone from the tracker by then), and the rest is skipped."""
    c = rawpg.RawClient.connect(proxy.port, HUMAN, HUMAN_PASSWORD)
    c.sock.settimeout(120)
    try:
        unit = rawpg.parse("SELECT 1") + rawpg.bind() + rawpg.execute()
        c.send(unit * 5000 + rawpg.parse("SELEC 1") + rawpg.bind() + rawpg.execute()
               + unit * 10 + rawpg.SYNC)
        msgs = c.until_ready()
        assert sum(1 for t, _ in msgs if t == b"C") == 5000
        assert [e["C"] for e in rawpg.errors(msgs)] == ["42601"]
        assert rawpg.rows(c.run("SELECT 7")) == [[b"7"]]
    finally:
        c.close()
    with psycopg.connect(proxy.dsn(HUMAN, HUMAN_PASSWORD), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
