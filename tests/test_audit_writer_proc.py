# Audit writer process: loop/thread mode, surviving a killed worker, restarts, exact bytes.
from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import msgspec
import pyarrow.parquet as pq
import pytest

from pgguard.audit import AuditError, AuditLog, AuditRecord, storage
from pgguard.audit.record import _Content, content_bytes
from pgguard.audit.verify import verify
from pgguard.audit.writerproc import _Converter, _Line
from pgguard.config import AuditConfig

UTC = timezone.utc


def make_log(root: Path, **kw) -> AuditLog:
    cfg_kw = {k: kw.pop(k) for k in ("durability", "capture_literals", "flush_interval",
                                     "queue_max") if k in kw}
    cfg_kw.setdefault("flush_interval", "5ms")
    return AuditLog(AuditConfig(dir=str(root), **cfg_kw), **kw)


def rec(i: int, **kw) -> AuditRecord:
    base = dict(ts=datetime(2024, 5, 1, 12, 0, 0, i % 1_000_000, tzinfo=UTC),
                session_id=f"s{i % 3}", identity="ci-agent", identity_kind="agent",
                event="statement", statement=f"SELECT * FROM t WHERE id = {i}",
                relations=["public.t"], flags=[], decision="allowed", rows=i)
    base.update(kw)
    return AuditRecord(**base)


def count(root: Path, where: str = "true") -> int:
    with duckdb.connect() as con:
        return con.execute(f"SELECT count(*) FROM read_parquet('{root}/**/*.parquet') "
                           f"WHERE {where}").fetchone()[0]


# -- loop mode --------------------------------------------------------------------------

def test_loop_mode_batched_strict_flush_roll(tmp_path):
    root = tmp_path / "audit"

    async def main() -> list[str]:
        log = make_log(root)
        log.start()                         # on a running loop: loop mode
        assert log._loop is asyncio.get_running_loop() and log._sender is None
        for i in range(3000):
            log.log(rec(i))
        ids = await asyncio.gather(*(log.log_strict(rec(10_000 + i)) for i in range(50)))
        # a blocking flush from another thread: the loop serves it
        await asyncio.get_running_loop().run_in_executor(None, log.flush)
        assert storage.read_wal(storage.list_wal(root, "w0")[0][1]).records == 3050
        # ...and on the loop's own thread: done inline
        log.log(rec(20_000))
        log.flush()
        out = log.roll()
        assert out is not None and out.exists()
        log.log(rec(20_001))
        log.close()                         # on the loop thread, as the proxy does
        return ids

    ids = asyncio.run(main())
    assert len(set(ids)) == 50 and all(len(i) == 26 for i in ids)
    assert count(root) == 3052
    with duckdb.connect() as con:
        got = {r[0] for r in con.execute(
            f"SELECT event_id FROM read_parquet('{root}/**/*.parquet')").fetchall()}
    assert set(ids) <= got
    assert verify(root).ok


def test_loop_mode_close_from_another_thread(tmp_path):
    root = tmp_path / "audit"
    log = make_log(root, durability="strict", flush_interval="1s")

    async def main() -> None:
        log.start()
        await asyncio.gather(*(log.log_strict(rec(i)) for i in range(20)))
        log.log(rec(99))
        await asyncio.get_running_loop().run_in_executor(None, log.close)

    asyncio.run(main())
    assert count(root) == 21 and verify(root).ok


def test_thread_mode_when_started_without_a_loop(tmp_path):
    log = make_log(tmp_path / "a")
    log.start()
    try:
        assert log._loop is None and log._sender is not None
    finally:
        log.close()


# -- the writer process -----------------------------------------------------------------

def _fds_of(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_writer_is_a_child_process_without_our_sockets(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.set_inheritable(True)               # even an inheritable socket stays with us
    log = make_log(tmp_path / "a")
    log.start()
    try:
        pid = log._conn.proc.pid
        assert pid != os.getpid()
        fds = _fds_of(pid)
        assert not [f for f in fds if f.startswith("socket:")], fds
        assert len([f for f in fds if f.startswith("pipe:")]) == 2
        log.log(rec(1))
        log.flush()
    finally:
        log.close()
        srv.close()
    assert not log._conn.proc.poll() is None


def test_record_is_encoded_when_logged(tmp_path):
    root = tmp_path / "audit"
    with make_log(root) as log:
        r = rec(1)
        log.log(r)
        r.rows = 999                        # the caller may reuse it afterwards
        r.identity = "someone-else"
    t = pq.read_table(next(root.rglob("*.parquet"))).to_pylist()
    assert t[0]["rows"] == 1 and t[0]["identity"] == "ci-agent"


WORKER = textwrap.dedent("""
    import sys, time
    from pgguard.audit import AuditLog, AuditRecord
    from pgguard.config import AuditConfig
    root, n = sys.argv[1], int(sys.argv[2])
    log = AuditLog(AuditConfig(dir=root, flush_interval="1ms"), roll_seconds=3600)
    log.start()
    print(log._conn.proc.pid, flush=True)
    for i in range(n):
        log.log(AuditRecord(session_id="s", event="statement", rows=i))
    while log._sent < n:            # all written into the pipe, not necessarily durable
        time.sleep(0.001)
    print("sent", flush=True)
    time.sleep(60)
""")


def test_writer_outlives_a_killed_worker_and_commits_what_it_was_sent(tmp_path):
    root = tmp_path / "audit"
    n = 50_000
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(n)],
                            stdout=subprocess.PIPE, text=True)
    try:
        writer = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "sent"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the orphaned writer drains the pipe, commits, and exits without sealing; a new
    # log for the stream waits for it, then recovers the WAL it left
    with make_log(root) as log:
        log.log(rec(0))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{writer}"):
        time.sleep(0.05)
    assert count(root, "session_id = 's'") == n
    assert verify(root).ok


def test_a_dead_writer_is_restarted(tmp_path):
    root = tmp_path / "audit"
    log = make_log(root, flush_interval="2ms")
    log.start()
    try:
        for i in range(100):
            log.log(rec(i))
        log.flush()
        old = log._conn.proc
        old.send_signal(signal.SIGKILL)
        old.wait()
        deadline = time.monotonic() + 10
        while log._dead is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.health() is not None
        with pytest.raises(AuditError):
            log.log_strict(rec(1)).result(5)
        # the sender starts a new writer within about a second; it recovers the WAL
        deadline = time.monotonic() + 15
        while (log._dead is not None or log._conn.proc is old) and \
                time.monotonic() < deadline:
            log.log(rec(500))
            time.sleep(0.05)
        assert log._conn.proc is not old and log.health() is None
        for i in range(100, 200):
            log.log(rec(i))
        log.flush()
    finally:
        log.close()
    assert count(root, "rows < 200") == 200          # the first 100 were fsynced
    assert verify(root).ok


def test_a_dead_writer_is_restarted_in_loop_mode(tmp_path):
    root = tmp_path / "audit"

    async def main() -> None:
        log = make_log(root, durability="strict")
        log.start()
        await log.log_strict(rec(1))
        old = log._conn.proc
        old.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if log._dead is None and log._conn.proc is not old:
                break
        assert log._conn.proc is not old
        assert len(await log.log_strict(rec(2))) == 26
        log.close()

    asyncio.run(main())
    assert count(root) == 2 and verify(root).ok


# -- what the writer hashes and stores --------------------------------------------------

def _random_content(rnd: random.Random) -> _Content:
    def s() -> str:
        alphabet = "ab'\"\\/\n\t\x00\x1f\x7f é€😀\u2028\ufeff$1"
        return "".join(rnd.choice(alphabet) for _ in range(rnd.choice([0, 1, 7, 40])))

    def opt(v):
        return rnd.choice([None, v])
    ints = [0, -1, 1, (1 << 63) - 1, -(1 << 63), rnd.randrange(-10**12, 10**12)]
    ts = rnd.choice([datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59,
                     999_999, tzinfo=UTC), datetime(2024, 5, 1, 12, 0, 0,
                     rnd.randrange(10**6), tzinfo=UTC)])
    kw = {f: opt(s()) for f in _Content.__struct_fields__}
    kw.update(event_id=s(), ts=ts, session_id=s(), event=s(),
              relations=opt([s() for _ in range(rnd.randrange(3))]),
              flags=rnd.choice([None, [], [""]]),
              **{f: opt(rnd.choice(ints)) for f in ("rows", "bytes_out", "masked_cells",
                                                    "duration_us")})
    return _Content(**kw)


def test_lines_are_the_canonical_content_and_convert_exactly(tmp_path):
    rnd = random.Random(5)
    recs = [_random_content(rnd) for _ in range(3000)]
    lines = [msgspec.json.encode(_Line(*msgspec.structs.astuple(r))) for r in recs]
    assert lines == [content_bytes(msgspec.structs.asdict(r)) for r in recs]
    body = b"\n".join(lines) + b"\n"
    exact = storage._content_table_slow(body)
    conv = _Converter(tmp_path / "scratch.ndjson")
    conv.prepare()
    got = conv._duck([body[:len(body) // 3 * 0] + body], len(recs))
    conv.close()
    assert got is not None and got.equals(exact)


def test_values_msgpack_cannot_carry_are_coerced(tmp_path):
    root = tmp_path / "audit"
    with make_log(root) as log:
        log.log(rec(1, rows=1 << 70))                   # beyond 64 bits: coerced here
        log.log(rec(2, statement="SELECT '\udcff'"))    # a lone surrogate
        log.log(rec(3, ts=datetime(2024, 1, 1, 12)))    # naive: taken as UTC
        log.log(rec(4, ts=datetime(2024, 1, 1, 14, tzinfo=timezone(timedelta(hours=2)))))
        log.log(rec(5))
    t = sorted(pq.read_table(next(root.rglob("*.parquet"))).to_pylist(),
               key=lambda r: r["event_id"])
    assert t[0]["rows"] is None and "coerced" in t[0]["error"]
    assert "\udcff" not in (t[1]["statement"] or "") and "coerced" in t[1]["error"]
    assert t[2]["ts"] == datetime(2024, 1, 1, 12, tzinfo=UTC) and t[2]["error"] is None
    assert t[3]["ts"] == datetime(2024, 1, 1, 12, tzinfo=UTC) and t[3]["error"] is None
    assert t[4]["rows"] == 5 and t[4]["error"] is None
    assert log.stats().coerced == 2
    assert verify(root).ok


def test_close_is_bounded_when_the_writer_is_stuck(tmp_path):
    root = tmp_path / "audit"
    n = 100_000

    async def main() -> tuple[AuditLog, float]:
        log = make_log(root)
        log.start()
        child = log._conn.proc
        child.send_signal(signal.SIGSTOP)           # a writer that stopped writing
        try:
            for i in range(n):
                log.log(rec(i))
                if i % 1000 == 0:
                    await asyncio.sleep(0)          # the loop fills the pipe, then waits
            t0 = time.monotonic()
            log.close(timeout=1)
            took = time.monotonic() - t0
        finally:
            child.send_signal(signal.SIGCONT)
        return log, took

    log, took = asyncio.run(main())
    assert took < 5
    dropped = log.stats().dropped
    assert 0 < dropped < n                          # what never left us is counted
    # the writer commits what reached the pipe, and the next start seals it
    with make_log(root) as again:
        again.log(rec(n, session_id="later"))
    assert count(root, "session_id <> 'later'") == n - dropped
    assert verify(root).ok
