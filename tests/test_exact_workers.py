# Under --workers N the parent replaces a worker that dies, and the port is served by
# N workers again.
import os
import signal
import time

import psycopg
from conftest import AGENT, AGENT_PASSWORD


def _children(pid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(d))
    return out


def _workers(proxy) -> set[int]:
    # the workers are the parent's children that listen (audit writers are theirs)
    out = set()
    for p in _children(proxy.proc.pid):
        try:
            if "serve" in open(f"/proc/{p}/cmdline").read().replace("\0", " "):
                out.add(p)
        except OSError:
            pass
    return out


def _sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def _serving_workers(proxy, workers: set[int], tries: int = 24) -> set[int]:
    """Which workers take connections: open many at once, see whose sockets grow."""
    before = {p: _sockets(p) for p in workers}
    conns = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(tries)]
    try:
        for c in conns:
            assert c.execute("SELECT 1").fetchone() == (1,)
        return {p for p in workers if _sockets(p) > before[p]}
    finally:
        for c in conns:
            c.close()


def _wait_workers(proxy, n: int, gone: set[int], timeout: float = 20) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        w = _workers(proxy)
        if len(w) == n and not (w & gone):
            return w
        assert time.monotonic() < deadline, f"workers {w}, wanted {n} without {gone}"
        time.sleep(0.1)


def test_killed_worker_is_replaced_and_serves(make_proxy):
    proxy = make_proxy(workers=2)
    first = _wait_workers(proxy, 2, set())
    killed: set[int] = set()
    for round_ in range(3):
        victim = sorted(_workers(proxy))[round_ % 2]
        os.kill(victim, signal.SIGKILL)
        killed.add(victim)
        now = _wait_workers(proxy, 2, killed)
        time.sleep(1.0)     # the new worker binds its socket
        serving: set[int] = set()
        deadline = time.monotonic() + 20
        while serving != now:
            serving |= _serving_workers(proxy, now)
            assert time.monotonic() < deadline, (serving, now)
    assert first & killed
    assert proxy.proc.poll() is None
    assert proxy.stop() == 0


def test_sigterm_still_stops_all_workers(make_proxy):
    proxy = make_proxy(workers=3)
    ws = _wait_workers(proxy, 3, set())
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("SELECT 1")
    assert proxy.stop() == 0
    for p in ws:
        assert not os.path.exists(f"/proc/{p}") or \
            open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def test_worker_killed_mid_session_others_unaffected(make_proxy):
    proxy = make_proxy(workers=2)
    _wait_workers(proxy, 2, set())
    conns = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(16)]
    victim = sorted(_workers(proxy))[0]
    os.kill(victim, signal.SIGKILL)
    alive = 0
    for c in conns:
        try:
            c.execute("SELECT 1")
            alive += 1
        except psycopg.Error:
            pass
        c.close()
    assert 0 < alive < 16
    _wait_workers(proxy, 2, {victim})
    for _ in range(10):
        with psycopg.connect(proxy.dsn(), user=AGENT, password=AGENT_PASSWORD) as c:
            assert c.execute("SELECT 2").fetchone() == (2,)
