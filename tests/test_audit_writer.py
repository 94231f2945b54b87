# Audit writer: records written through AuditLog read back exactly with DuckDB, strict and
# batched durability, backpressure and drops, restart and chain continuity, concurrent
# readers never seeing a partial file, no literals or passwords in the files.
from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from pgguard.audit import AuditError, AuditLog, AuditRecord
from pgguard.audit import storage
from pgguard.audit.verify import verify
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
                client_addr="10.0.0.7:5555", application_name="psql", database="app",
                upstream_user="app", event="statement",
                statement=f"SELECT * FROM orders WHERE id = {i}", fingerprint="ab12",
                statement_kind="select", relations=["public.orders"], flags=[],
                decision="allowed", rows=i, bytes_out=10 * i, masked_cells=0,
                duration_us=100 + i)
    base.update(kw)
    return AuditRecord(**base)


def query(root: Path, sql: str) -> list[tuple]:
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        glob = f"{root}/**/*.parquet"
        return con.execute(sql.replace("AUDIT",
                                       f"read_parquet('{glob}', hive_partitioning = true)")
                           ).fetchall()


def test_records_read_back_exactly(tmp_path):
    root = tmp_path / "audit"
    with make_log(root) as log:
        for i in range(1000):
            log.log(rec(i))
        log.log(AuditRecord(session_id="s9", event="connect", identity="alice",
                            identity_kind="human", ts=datetime(2024, 5, 1, tzinfo=UTC)))
    rows = query(root, "SELECT count(*), count(DISTINCT event_id), sum(rows), "
                       "min(event), max(event) FROM AUDIT")
    assert rows == [(1001, 1001, sum(range(1000)), "connect", "statement")]
    # types (DuckDB view of the Parquet schema)
    with duckdb.connect() as con:
        desc = {r[0]: r[1] for r in con.execute(
            f"DESCRIBE SELECT * FROM read_parquet('{root}/**/*.parquet', "
            f"hive_partitioning = true)").fetchall()}
    assert desc["ts"] == "TIMESTAMP WITH TIME ZONE"
    assert desc["relations"] == "VARCHAR[]" and desc["flags"] == "VARCHAR[]"
    assert desc["rows"] == desc["bytes_out"] == desc["masked_cells"] == "BIGINT"
    assert desc["duration_us"] == "BIGINT" and desc["event_id"] == "VARCHAR"
    assert desc["dt"] == "DATE"
    # values of one record, unchanged except the normalized statement
    t = pq.read_table(next(root.rglob("*.parquet")))
    by_rows = {r["rows"]: r for r in t.to_pylist() if r["event"] == "statement"}
    r = by_rows[7]
    assert r["session_id"] == "s1" and r["identity"] == "ci-agent"
    assert r["client_addr"] == "10.0.0.7:5555" and r["relations"] == ["public.orders"]
    assert r["flags"] == [] and r["bytes_out"] == 70 and r["duration_us"] == 107
    assert r["statement"] == "SELECT * FROM orders WHERE id = $1"
    assert r["ts"] == datetime(2024, 5, 1, 12, 0, 0, 7, tzinfo=UTC)
    conn = [x for x in t.to_pylist() if x["event"] == "connect"][0]
    assert conn["rows"] is None and conn["relations"] is None and conn["statement"] is None
    # event ids: unique, time-sortable, in chain order; prev_hash links
    ids = t.column("event_id").to_pylist()
    assert ids == sorted(ids) and len(ids[0]) == 26
    hashes, prevs = t.column("hash").to_pylist(), t.column("prev_hash").to_pylist()
    assert prevs[0] == "0" * 64 and prevs[1:] == hashes[:-1]
    assert verify(root).ok


def test_partition_and_temp_names(tmp_path):
    root = tmp_path / "audit"
    with make_log(root) as log:
        log.log(rec(1))
    files = list(root.rglob("*.parquet"))
    assert len(files) == 1
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert files[0].parent.name == f"dt={today}" and files[0].name == "w0-000000000001.parquet"
    assert not list(root.rglob("*.tmp")) and not list(root.rglob("*.wal"))
    head = storage.read_head(root, "w0")
    assert head.seq == 1 and head.records == 1


def test_strict_futures(tmp_path):
    root = tmp_path / "audit"
    log = make_log(root, durability="strict", flush_interval="1s")
    log.start()

    async def main():
        ids = await asyncio.gather(*(log.log_strict(rec(i)) for i in range(200)))
        return ids

    ids = asyncio.run(main())
    assert len(set(ids)) == 200 and all(len(i) == 26 for i in ids)
    # acknowledged means fsynced in the WAL: visible to a reader of the WAL right now
    seg = storage.read_wal(storage.list_wal(root, "w0")[0][1])
    assert seg.records == 200
    # from a plain thread: a concurrent.futures.Future
    fut = log.log_strict(rec(1000))
    assert len(fut.result(5)) == 26
    assert log.stats().fsyncs < 201        # group commit
    log.close()
    assert query(root, "SELECT count(*) FROM AUDIT") == [(201,)]


def test_strict_after_close_fails(tmp_path):
    log = make_log(tmp_path / "a", durability="strict")
    log.start()
    log.close()
    with pytest.raises(AuditError):
        log.log_strict(rec(1)).result(1)
    log.log(rec(2))                     # counted, not raised
    assert log.stats().dropped == 1


def test_batched_flush_interval_commits(tmp_path):
    root = tmp_path / "audit"
    log = make_log(root, flush_interval="10ms")
    log.start()
    log.log(rec(1))
    deadline = time.monotonic() + 2
    n = 0
    while time.monotonic() < deadline:
        wal = storage.list_wal(root, "w0")
        n = storage.read_wal(wal[0][1]).records if wal else 0
        if n:
            break
        time.sleep(0.005)
    assert n == 1           # on disk within the flush interval, without any flush() call
    log.close()


def test_queue_full_drops_are_counted_and_logged(tmp_path):
    root = tmp_path / "audit"
    log = make_log(root, queue_max=100, flush_interval="1s")
    for i in range(150):        # not started: nothing drains the queue
        log.log(rec(i))
    assert log.stats().dropped == 50
    log.start()
    log.close()
    rows = query(root, "SELECT event, rows, error FROM AUDIT WHERE event = 'audit_dropped'")
    assert rows and rows[0][1] == 50 and "queue full" in rows[0][2]
    assert query(root, "SELECT count(*) FROM AUDIT WHERE event = 'statement'") == [(100,)]
    assert verify(root).ok


def test_malformed_records_are_coerced_not_lost(tmp_path):
    root = tmp_path / "audit"
    with make_log(root) as log:
        log.log(rec(1))
        log.log(rec(2, rows=2.5, identity=7, statement=b"SELECT 'secret'"))
        log.log(rec(3, ts=datetime(2024, 5, 1, 14, tzinfo=timezone.utc).astimezone(
            timezone(__import__("datetime").timedelta(hours=2)))))
        log.log({"not": "a record"})        # ignored, counted as an error
        log.log(rec(4))
    t = pq.read_table(next(root.rglob("*.parquet"))).to_pylist()
    assert [r["rows"] for r in t] == [1, 2, 3, 4]
    bad = t[1]
    assert bad["identity"] == "7" and "coerced" in bad["error"]
    assert "rows" in bad["error"] and "identity" in bad["error"]
    assert "secret" not in bad["statement"]
    assert t[2]["ts"].hour == 14 and t[2]["ts"].utcoffset().total_seconds() == 0
    assert log.stats().coerced == 1 and log.stats().errors == 1
    assert verify(root).ok


def test_restart_continues_chain_and_seq(tmp_path):
    root = tmp_path / "audit"
    for run in range(3):
        with make_log(root) as log:
            for i in range(10):
                log.log(rec(i))
    streams, _ = storage.list_parquet(root)
    assert [f.seq for f in streams["w0"]] == [1, 2, 3]
    res = verify(root)
    assert res.ok and res.records == 30
    assert storage.read_head(root, "w0").records == 30


def test_roll_by_records_makes_many_files(tmp_path):
    root = tmp_path / "audit"
    with make_log(root, roll_records=300) as log:
        for i in range(2000):
            log.log(rec(i))
            if i % 250 == 0:
                log.flush()
    streams, _ = storage.list_parquet(root)
    assert len(streams["w0"]) >= 4
    assert query(root, "SELECT count(*) FROM AUDIT") == [(2000,)]
    assert verify(root).ok


def test_stream_is_locked(tmp_path):
    root = tmp_path / "audit"
    a = make_log(root)
    a.start()
    with pytest.raises(AuditError, match="in use"):
        make_log(root).start()
    b = make_log(root, stream="w1")        # another worker: its own chain
    b.start()
    a.log(rec(1))
    b.log(rec(2))
    a.close()
    b.close()
    res = verify(root)
    assert res.ok and {s.stream for s in res.streams} == {"w0", "w1"}


def test_no_literals_or_passwords_by_default(tmp_path):
    root = tmp_path / "audit"
    secrets = ["4111111111111111", "hunter2", "bob@example.com", "s3cr3t-token"]
    with make_log(root) as log:
        log.log(rec(1, statement="SELECT * FROM cards WHERE pan = '4111111111111111'"))
        log.log(rec(2, statement="ALTER ROLE app PASSWORD 'hunter2'"))
        log.log(rec(3, statement="SELECT * FROM users WHERE email = 'bob@example.com'"))
        log.log(rec(4, statement="SELECT set_config('app.token', 's3cr3t-token', false)"))
        log.flush()
        wal_bytes = b"".join(p.read_bytes() for p in root.rglob("*.wal"))
    blob = wal_bytes + b"".join(
        str(pq.read_table(p).to_pylist()).encode() for p in root.rglob("*.parquet"))
    for s in secrets:
        assert s.encode() not in blob
    # raw capture keeps literals but still never passwords
    root2 = tmp_path / "raw"
    with make_log(root2, capture_literals=True) as log:
        log.log(rec(1, statement="SELECT * FROM cards WHERE pan = '4111111111111111'"))
        log.log(rec(2, statement="ALTER ROLE app PASSWORD 'hunter2'"))
    stmts = [r[0] for r in query(root2, "SELECT statement FROM AUDIT ORDER BY event_id")]
    assert "4111111111111111" in stmts[0] and "hunter2" not in stmts[1]


def test_asyncio_log_and_close_drain(tmp_path):
    root = tmp_path / "audit"
    log = make_log(root, flush_interval="1s")
    log.start()

    async def main():
        for i in range(5000):
            log.log(rec(i))
            if i % 500 == 0:
                await asyncio.sleep(0)

    asyncio.run(main())
    log.close()         # everything queued is committed and sealed
    assert query(root, "SELECT count(*) FROM AUDIT") == [(5000,)]
    assert not list(root.rglob("*.wal"))


def test_duckdb_reads_while_writer_writes(tmp_path):
    root = tmp_path / "audit"
    root.mkdir()
    log = make_log(root, roll_records=500, roll_seconds=0.05)
    log.start()
    errors: list[BaseException] = []
    counts: list[int] = []
    stop = threading.Event()

    def reader():
        con = duckdb.connect()
        while not stop.is_set() and not errors:
            try:
                if any(root.rglob("*.parquet")):
                    counts.append(con.execute(
                        f"SELECT count(*), count(hash) FROM read_parquet("
                        f"'{root}/**/*.parquet', hive_partitioning = true)").fetchone()[0])
            except BaseException as e:      # a partial file would fail here
                errors.append(e)
        con.close()

    th = threading.Thread(target=reader)
    th.start()
    try:
        for i in range(20_000):
            log.log(rec(i))
            if i % 1000 == 0:
                time.sleep(0.01)
        log.close()
    finally:
        stop.set()
        th.join()
    assert not errors, errors[0]
    assert counts and counts == sorted(counts)     # never goes backwards
    assert query(root, "SELECT count(*) FROM AUDIT") == [(20_000,)]
    assert verify(root).ok


def test_recovery_of_an_unlocked_other_stream(tmp_path):
    # a worker (stream w3) is killed and not restarted: the next start seals its WAL
    import signal
    import subprocess
    import sys
    root = tmp_path / "audit"
    code = (
        "import sys\n"
        "from pgguard.audit import AuditLog, AuditRecord\n"
        "from pgguard.config import AuditConfig\n"
        f"log = AuditLog(AuditConfig(dir={str(root)!r}), stream='w3', roll_seconds=3600)\n"
        "log.start()\n"
        "for i in range(20):\n"
        "    log.log(AuditRecord(session_id='s', event='statement', rows=i))\n"
        "log.flush()\n"
        "print('ready', flush=True)\n"
        "import time; time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert storage.list_wal(root, "w3")
    with make_log(root, stream="w0") as log:
        log.log(rec(99))
    assert not storage.list_wal(root, "w3")
    assert query(root, "SELECT count(*) FROM AUDIT") == [(21,)]
    assert verify(root).ok


def test_read_wal_resumes_where_it_stopped(tmp_path):
    root = tmp_path / "audit"
    log = make_log(root, roll_seconds=3600)
    log.start()
    for i in range(300):
        log.log(rec(i))
    log.flush()
    _, path = storage.list_wal(root, "w0")[0]
    first = storage.read_wal(path)
    assert first.records == 300
    for i in range(300, 420):
        log.log(rec(i))
    log.flush()
    more = storage.read_wal(path, resume=first)
    assert more.records == 120 and more.prev_hash == first.last_hash
    whole = storage.read_wal(path)
    assert whole.digests == first.digests + more.digests
    t = storage.wal_table(more)
    assert t.column("rows").to_pylist() == list(range(300, 420))
    assert t.column("prev_hash")[0].as_py() == first.last_hash
    again = storage.read_wal(path, resume=more)
    assert again.records == 0 and again.end_offset == more.end_offset
    log.close()
