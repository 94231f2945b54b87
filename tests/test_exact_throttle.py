# Login throttling per source address holds across parallel attempts and across
# workers, and a throttled login's bytes are not buffered.
import socket
import threading
import time

import psycopg
import pytest
from conftest import AGENT
from exactlib import rss_kb
from rawpg import LoginError, RawClient

THROTTLE = """
[auth]
throttle_after = 2
throttle_window = "10m"
throttle_delay = "1s"
throttle_max_delay = "4s"
"""


def _attempt(port: int, out: list) -> None:
    t0 = time.monotonic()
    try:
        RawClient.connect(port, AGENT, "wrong-password", timeout=30).close()
        out.append(("ok", time.monotonic() - t0))
    except LoginError as e:
        out.append((e.fields.get("C"), time.monotonic() - t0))
    except OSError as e:
        out.append((f"os:{e}", time.monotonic() - t0))


def _burst(port: int, n: int) -> list:
    out: list = []
    ts = [threading.Thread(target=_attempt, args=(port, out)) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return out


@pytest.mark.parametrize("workers,parallel", [(1, 10), (1, 25), (2, 10), (2, 25), (3, 20)])
def test_parallel_guesses_are_one_per_delay(make_proxy, workers, parallel):
    proxy = make_proxy(extra=THROTTLE, workers=workers)
    # two failures start the throttle (counted whichever worker saw them)
    for _ in range(2):
        assert _burst(proxy.port, 1)[0][0] == "28P01"
    t0 = time.monotonic()
    got = _burst(proxy.port, parallel)
    elapsed = time.monotonic() - t0
    guesses = [r for r in got if r[0] == "28P01"]
    refused = [r for r in got if r[0] == "28000"]
    assert len(guesses) + len(refused) == parallel, got
    # one guess per delay at most, within max_delay (4s), whatever the worker count
    assert len(guesses) <= 1 + elapsed / 1.0, (len(guesses), elapsed)
    assert len(guesses) <= 5           # max_delay / delay + 1
    assert refused


def test_right_password_after_the_throttle_still_works(make_proxy):
    proxy = make_proxy(extra=THROTTLE, workers=2)
    for _ in range(3):
        _burst(proxy.port, 1)
    deadline = time.monotonic() + 20
    while True:
        try:
            with psycopg.connect(proxy.dsn()) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.5)




def test_bytes_sent_while_throttled_are_not_buffered(make_proxy):
    proxy = make_proxy(extra=THROTTLE.replace('"4s"', '"8s"').replace('"1s"', '"4s"'))
    for _ in range(2):
        _burst(proxy.port, 1)
    base = rss_kb(proxy.proc.pid)
    from rawpg import startup_packet
    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(startup_packet({"user": AGENT, "database": "postgres"}))
    s.settimeout(0.5)
    sent = 0
    chunk = b"p" + b"\x00\x00\x00\x08" + b"abcd"
    chunk = chunk * (1 << 16)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.5:
        try:
            sent += s.send(chunk)
        except (TimeoutError, BlockingIOError):
            pass
        except OSError:
            break
    grown = rss_kb(proxy.proc.pid) - base
    s.close()
    # the kernel's socket buffers take a few MB; the proxy takes nothing more
    assert sent < 64 << 20, sent
    assert grown < 32 * 1024, grown


def test_logging_in_as_another_name_does_not_reset_the_guesses(make_proxy):
    # red team 20 (helper 110): one success (the agent's own password or token) after
    # every few wrong guesses at another name reset the throttle: 400 guesses in 1.6 s
    from conftest import AGENT_PASSWORD, HUMAN
    proxy = make_proxy(extra=THROTTLE)
    t0 = time.monotonic()
    codes = []
    for _ in range(4):
        try:
            RawClient.connect(proxy.port, HUMAN, "guess", timeout=30).close()
            codes.append("ok")
        except LoginError as e:
            codes.append(e.fields.get("C"))
        try:
            RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, timeout=30).close()
        except LoginError:
            pass        # (refused while throttled: fine)
    # after two failures every attempt waits (1 s, 2 s, ...) or is refused outright
    assert time.monotonic() - t0 > 2.5 or "28000" in codes, (codes, time.monotonic() - t0)
    assert "ok" not in codes


def test_refused_logins_are_in_the_audit(make_proxy):
    # (red team 23) a login refused by the throttle left no record: 30 guesses showed as
    # 12 auth_failed. Each address's refusals are recorded, at most one record a second,
    # saying how many more were refused since the last one.
    from exactlib import audit_rows
    proxy = make_proxy(extra=THROTTLE)
    for _ in range(2):
        assert _burst(proxy.port, 1)[0][0] == "28P01"
    got = _burst(proxy.port, 20)
    refused = [r for r in got if r[0] == "28000"]
    assert refused
    time.sleep(1.1)
    got += _burst(proxy.port, 5)
    refused = [r for r in got if r[0] == "28000"]
    proxy.stop()
    rows = audit_rows(proxy, "SELECT error, sqlstate, identity FROM audit WHERE "
                             "event = 'auth_failed' AND error LIKE 'too many failed%'")
    assert rows and all(r[1] == "28000" and r[2] == AGENT for r in rows), rows
    told = sum(1 + int(r[0].rsplit("(", 1)[1].split()[0]) if "more refused" in r[0] else 1
               for r in rows)
    assert 2 <= len(rows) <= len(refused) and told <= len(refused), (rows, len(refused))
