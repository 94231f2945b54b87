# Round 20 (helper 106): a session that sent most of a large message and closed kept it
# in memory until Python's cyclic collector happened to run (a closed session's objects
# refer to one another): eight sessions of 60 MB took the proxy from 104 MB to 562 MB
# and it stayed there. A session lets go of a message it was gathering when it ends.
# Judged by the proxy's resident memory.
from __future__ import annotations

import time

import psycopg
import pytest
import rawpg
from conftest import HUMAN, HUMAN_PASSWORD, Proxy
from exactlib import rss_kb

PART = 24 << 20         # of a Query declared 30 MB long


@pytest.fixture
def proxy(pg, tmp_path):
    p = Proxy(pg, tmp_path).start()
    yield p
    p.stop()


def _half_sent(port: int):
    c = rawpg.RawClient.connect(port, HUMAN, HUMAN_PASSWORD)
    c.sock.sendall(b"Q" + (30 << 20).to_bytes(4, "big") + b"SELECT '" + b"x" * PART)
    return c


def test_a_closed_sessions_half_message_is_let_go(proxy):
    with psycopg.connect(proxy.dsn(HUMAN, HUMAN_PASSWORD)) as c:
        c.execute("SELECT 1")
    time.sleep(0.5)
    base = rss_kb(proxy.proc.pid)
    held = [_half_sent(proxy.port) for _ in range(6)]
    time.sleep(1.5)
    live = (rss_kb(proxy.proc.pid) - base) / 1024
    for c in held:
        c.sock.close()
    time.sleep(1.5)
    grown = (rss_kb(proxy.proc.pid) - base) / 1024
    # six 24 MB buffers while the sessions live; let go when they end
    assert live > 100, f"{live:.0f} MB while six sessions hold half a message"
    assert grown < 40, f"{grown:.0f} MB more after six closed sessions ({live:.0f} live)"
    with psycopg.connect(proxy.dsn(HUMAN, HUMAN_PASSWORD)) as c:
        assert c.execute("SELECT 2").fetchone() == (2,)
