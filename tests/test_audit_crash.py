# Audit crash safety: a writer process is killed with SIGKILL; the next start turns the
# leftover WAL into Parquet and every acknowledged record is there, chain intact.
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from pgguard.audit import AuditLog, storage
from pgguard.audit.verify import verify
from pgguard.config import AuditConfig

WRITER = textwrap.dedent("""
    import asyncio, sys
    from datetime import datetime, timezone
    from pgguard.audit import AuditLog, AuditRecord
    from pgguard.config import AuditConfig

    root, durability, roll = sys.argv[1], sys.argv[2], int(sys.argv[3])
    roll_s = float(sys.argv[4])
    log = AuditLog(AuditConfig(dir=root, durability=durability, flush_interval="2ms"),
                   roll_records=roll, roll_seconds=roll_s)
    log.start()
    out = sys.stdout

    async def session(k):
        i = 0
        while True:
            rec = AuditRecord(ts=datetime.now(timezone.utc), session_id=f"s{k}",
                              identity="pgbench", event="statement",
                              statement=f"UPDATE t SET v = {i} WHERE id = {k}",
                              decision="allowed", rows=1)
            if durability == "strict":
                eid = await log.log_strict(rec)
                out.write(eid + "\\n")       # acknowledged: the client may now see COMMIT
                out.flush()
            else:
                log.log(rec)
                if i % 50 == 0:
                    await asyncio.get_running_loop().run_in_executor(None, log.flush)
                    out.write(f"flushed {k} {i}\\n")
                    out.flush()
            i += 1
            if i % 7 == 0:
                await asyncio.sleep(0)

    async def main():
        await asyncio.gather(*(session(k) for k in range(8)))

    asyncio.run(main())
""")


def run_and_kill(root: Path, durability: str, acks_wanted: int, roll: int,
                 writer_too: bool = True, roll_seconds: float = 0.2) -> list[str]:
    """Log from a child process until acks_wanted records are acknowledged, then SIGKILL
    it, and with writer_too its writer process at the same instant (a machine or
    container crash); otherwise the orphaned writer commits what it received and exits.
    Returns once the WAL is at rest."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), durability, str(roll),
                             str(roll_seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acks: list[str] = []
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout is not None
        while len(acks) < acks_wanted and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acks.append(line.strip())
        if writer_too:
            os.kill(writer_pid(root), signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)
        # lines already written to the pipe were acknowledged too
        rest = proc.stdout.read()
        acks.extend(x for x in rest.splitlines() if x.strip())
    finally:
        proc.kill()
        proc.wait()
    assert len(acks) >= acks_wanted, proc.stderr.read() if proc.stderr else ""
    wait_writer_gone(root)
    return acks


def writer_pid(root: Path) -> int:
    # the stream's lock file names the writer process holding it
    holder = json.loads((storage.wal_dir(root, "w0") / "lock").read_bytes())
    return int(holder["pid"])


def wait_writer_gone(root: Path, timeout: float = 30.0) -> None:
    # the writer is a child process: when its parent is killed it drains what it was
    # handed and exits, releasing the stream's lock; only then is the WAL at rest
    fd = os.open(storage.wal_dir(root, "w0") / "lock", os.O_RDWR)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "audit writer still running"
                time.sleep(0.02)
    finally:
        os.close(fd)


def recover(root: Path) -> None:
    log = AuditLog(AuditConfig(dir=str(root)))
    log.start()         # converts leftover WAL before anything else
    log.close()


def all_ids(root: Path) -> list[str]:
    with duckdb.connect() as con:
        return [r[0] for r in con.execute(
            f"SELECT event_id FROM read_parquet('{root}/**/*.parquet') ORDER BY event_id"
        ).fetchall()]


@pytest.mark.parametrize("roll", [1_000_000, 300])
def test_kill9_strict_loses_nothing_acknowledged(tmp_path, roll):
    root = tmp_path / "audit"
    acks = run_and_kill(root, "strict", 3000, roll)
    recover(root)
    ids = set(all_ids(root))
    missing = [a for a in acks if a not in ids]
    assert not missing, f"{len(missing)} acknowledged records missing, e.g. {missing[:3]}"
    assert not storage.list_wal(root, "w0") and not list(root.rglob("*.tmp"))
    res = verify(root)
    assert res.ok, res.problems[:3]


def test_kill9_repeatedly_chain_survives(tmp_path):
    root = tmp_path / "audit"
    total_acks: list[str] = []
    for k in range(3):         # the second time the orphaned writer drains and exits
        total_acks += run_and_kill(root, "strict", 500, 200, writer_too=k != 1)
    recover(root)
    ids = set(all_ids(root))
    assert all(a in ids for a in total_acks)
    res = verify(root)
    assert res.ok, res.problems[:3]


def test_kill9_batched_keeps_flushed(tmp_path):
    root = tmp_path / "audit"
    acks = run_and_kill(root, "batched", 40, 1_000_000)
    recover(root)
    with duckdb.connect() as con:
        per_session = dict(con.execute(
            f"SELECT session_id, count(*) FROM read_parquet('{root}/**/*.parquet') "
            f"GROUP BY ALL").fetchall())
    for line in acks:           # "flushed k i": records 0..i of session k are durable
        _, k, i = line.split()
        assert per_session.get(f"s{k}", 0) >= int(i) + 1
    assert verify(root).ok


def test_torn_tail_is_dropped_and_rest_recovered(tmp_path):
    root = tmp_path / "audit"
    acks = run_and_kill(root, "strict", 1000, 1_000_000, roll_seconds=600)
    seq, wal = storage.list_wal(root, "w0")[-1]
    good = storage.read_wal(wal).records
    # a crash in the middle of a write: a frame header promising more than was written,
    # then a frame of garbage of the right length
    with open(wal, "ab") as f:
        f.write(storage.FRAME.pack(4096, 3, b"\x00" * 32) + b'{"event_id":"X"}\n' * 10)
    seg = storage.read_wal(wal)
    assert seg.records == good and seg.tail_bytes > 0 and not seg.damaged
    recover(root)
    ids = set(all_ids(root))
    assert all(a in ids for a in acks) and len(ids) >= good
    assert verify(root).ok
