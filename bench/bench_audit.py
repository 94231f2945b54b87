# Audit benchmark: writer throughput, proxy CPU per record, loop stalls, strict, DuckDB.
"""Benchmark the audit log (pgguard.audit) in isolation.

    python bench/bench_audit.py                 # full run (10M records for DuckDB)
    python bench/bench_audit.py --quick         # smaller sizes, ~1 minute
    python bench/bench_audit.py --quick --baseline 97fbefc   # also the in-process writer
    python bench/bench_audit.py --json out.json

``AuditLog`` runs its writer in a child process (``pgguard.audit.writerproc``); the
process that calls ``log()`` (the proxy worker) only encodes records and pipes them.
So CPU is reported twice: *proxy* (this process: ``log()`` calls, the sender and ack
threads) and *writer* (the child, read from ``/proc/<pid>/stat``).

Measures:

1. writer throughput: records/s from a full queue to sealed Parquet (the log started
   without a loop: thread mode), and sustained with a producer coroutine logging on the
   loop that started the log (loop mode, as in the proxy); CPU per record in the proxy
   and in the writer;
2. event-loop stall: an asyncio loop logs at a steady rate while a probe scheduled every
   0.5 ms records its lateness; the same run without auditing is the baseline. Two
   loop states: idle between events (timers, the usual proxy) and spinning (a
   saturated proxy: the loop never sleeps, so helper threads only get the GIL at forced
   switches). Also the longest single stretch the loop spends in the log's own code
   (one ``log()`` call, or one of its callbacks: sending, timer, answers): the stall
   auditing causes itself, as opposed to wake-up lateness, which on a 2-CPU machine
   also includes the OS running the writer process instead of the loop;
3. strict durability: awaited ``log_strict`` from N concurrent tasks (group commit);
4. DuckDB: ``GROUP BY identity, decision`` over the Parquet files (cold and warm);
5. ``[audit] store`` (``--only store``; moto's S3 server, started here, unless
   ``--store URI`` names one, with the AWS_* variables set): writer records/s with a
   store configured against the same run without, the time until the file is in the
   store, and the upload lag: a strict record acknowledged -> its record readable in
   the store, p50/p99, for a seal interval of ``--seal`` seconds (the lag is bounded
   by the seal interval plus one upload: records are uploaded a sealed file at a time).

``--baseline REV`` loads ``pgguard/audit/writer.py`` of that git revision (e.g. the
in-process writer threads, ``97fbefc``) and runs parts 1-3 with it too, interleaved,
so both are measured under the same load. Numbers are noisy on shared machines: run
several times and compare medians. The table shows each measurement, its target, and a
ratio where >= 1.0 means the target is met.
"""
from __future__ import annotations

import argparse
import array
import asyncio
import gc
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgguard.audit import AuditLog, AuditRecord  # noqa: E402
from pgguard.config import AuditConfig  # noqa: E402

UTC = timezone.utc
STATEMENTS = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "SELECT * FROM customers WHERE email = $1",
    "INSERT INTO orders (customer_id, total) VALUES ($1, $2)",
]
DECISIONS = ["allowed"] * 17 + ["blocked", "approved", "error"]


def make_record(i: int, ts: datetime) -> AuditRecord:
    return AuditRecord(
        ts=ts, session_id=f"s{i % 997:04d}", identity=f"agent-{i % 23}",
        identity_kind="agent" if i % 5 else "human", client_addr="10.1.2.3:51234",
        application_name="psql", database="app", upstream_user="app", event="statement",
        statement=STATEMENTS[i % len(STATEMENTS)], fingerprint=f"{i % 4:016x}",
        statement_kind="select", relations=["public.pgbench_accounts"], flags=[],
        decision=DECISIONS[i % len(DECISIONS)], rows=i % 100, bytes_out=120 + i % 512,
        masked_cells=i % 3, duration_us=300 + i % 1000)


def record_pool(n: int) -> list[AuditRecord]:
    # at most 200k distinct records, queued again and again (log() encodes at once)
    now = datetime.now(UTC)
    return [make_record(i, now) for i in range(min(n, 200_000))]


def queue_then_start(log, pool: list, n: int) -> tuple[float, float]:
    """Queue n records from *pool*, start the writer: (its CPU so far, the clock)."""
    for i in range(n):
        log.log(pool[i % len(pool)])
    log.start()
    return _writer_cpu(log), time.perf_counter()


def cfg(d: Path, **kw) -> AuditConfig:
    return AuditConfig(dir=str(d), **kw)


def load_audit_log(rev: str | None) -> type:
    """AuditLog of this checkout, or of git revision *rev* (loaded as a module of the
    pgguard.audit package, so its relative imports resolve to today's record/storage)."""
    if rev is None:
        return AuditLog
    src = subprocess.run(["git", "show", f"{rev}:pgguard/audit/writer.py"],
                         cwd=Path(__file__).resolve().parent.parent, check=True,
                         capture_output=True, text=True).stdout
    name = f"pgguard.audit._bench_writer_{rev}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "pgguard.audit"
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:pgguard/audit/writer.py", "exec"), mod.__dict__)
    return mod.AuditLog


def _writer_cpu(log) -> float:
    # CPU seconds of the log's writer process so far (0 for an in-process writer)
    conn = getattr(log, "_conn", None)
    proc = getattr(conn, "proc", None)
    if proc is None:
        return 0.0
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# -- 1. throughput -----------------------------------------------------------------------

def bench_drain(cls: type, root: Path, n: int) -> dict:
    """Queue n records, then start the writer: records/s until all are in Parquet.

    The proxy's CPU includes the log() calls (made before the clock starts)."""
    log = cls(cfg(root, queue_max=n + 1), roll_records=1_000_000)
    pool = record_pool(n)
    # the same object may be queued again: the current AuditLog encodes it in log(),
    # the in-process writer within its 256-record chunk, so reuse is safe
    c0 = time.process_time()
    w0, t0 = queue_then_start(log, pool, n)
    log.flush()
    t_wal = time.perf_counter() - t0
    log.roll()
    t_all = time.perf_counter() - t0
    cpu = time.process_time() - c0
    wcpu = _writer_cpu(log) - w0
    log.close()
    return {"records": n, "wal_per_s": n / t_wal, "parquet_per_s": n / t_all,
            "proxy_cpu_us_per_record": cpu / n * 1e6,
            "writer_cpu_us_per_record": wcpu / n * 1e6}


def bench_sustained(cls: type, root: Path, n: int) -> dict:
    """The producer logs while the writer writes: end-to-end records/s, CPU per record
    in the producing (proxy) process and in the writer process. The producer is a
    coroutine on a uvloop loop that started the log, as in the proxy."""
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:     # pragma: no cover
        loop = asyncio.new_event_loop()
    log = cls(cfg(root), roll_records=1_000_000)
    now = datetime.now(UTC)
    pool = [make_record(i, now) for i in range(100_000)]
    out: dict = {}

    async def produce() -> None:
        log.start()
        w0 = _writer_cpu(log)
        c0 = time.process_time()
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            for k in range(0, len(pool), 1000):
                for r in pool[k:k + 1000]:
                    log.log(r)
                await asyncio.sleep(0)          # the loop's other work: sending
            sent += len(pool)
            while log.stats().queue_depth > 200_000:      # the writer is behind
                await asyncio.sleep(0.005)
        await loop.run_in_executor(None, log.roll)
        t = time.perf_counter() - t0
        cpu = time.process_time() - c0
        wcpu = _writer_cpu(log) - w0
        st = log.stats()
        log.close()
        out.update({"records": sent, "per_s": sent / t, "dropped": st.dropped,
                    "proxy_cpu_us_per_record": cpu / sent * 1e6,
                    "writer_cpu_us_per_record": wcpu / sent * 1e6})

    try:
        loop.run_until_complete(produce())
    finally:
        loop.close()
    return out


# -- 2. event-loop stall -----------------------------------------------------------------

async def _lag_run(log_fn, seconds: float, rate: int, spin: bool) -> dict:
    """Event-loop responsiveness while *log_fn* is called *rate* times per second.

    spin=False (idle loop, the usual proxy): another *process* writes its clock into a
    pipe every 0.5 ms, like packets arriving; lateness = time until the loop's reader
    callback runs (perf_counter is CLOCK_MONOTONIC, shared by processes). spin=True
    (saturated proxy): the loop never sleeps; a call_soon chain measures the longest gap
    between iterations. The loops' own clocks have 1 ms granularity: not used.
    """
    loop = asyncio.get_running_loop()
    now_ts = datetime.now(UTC)
    pool = [make_record(i, now_ts) for i in range(20_000)]
    # an array, not a list: the garbage collector would walk a list of millions of
    # floats at each full collection, a stall of the benchmark's own making
    samples = array.array("d")
    log_call_max = 0.0
    in_log = 0.0
    stop_at = time.perf_counter() + seconds
    finished = threading.Event()

    if spin:
        last = [time.perf_counter()]

        def chain() -> None:
            now = time.perf_counter()
            samples.append(now - last[0])
            last[0] = now
            if now < stop_at:
                loop.call_soon(chain)
        loop.call_soon(chain)
    else:
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        sender = subprocess.Popen(
            [sys.executable, "-c", _SENDER, str(wfd), str(seconds + 0.2)], pass_fds=(wfd,))
        os.close(wfd)
        pending = b""

        def arrived() -> None:
            nonlocal pending
            now = time.perf_counter()
            try:
                data = pending + os.read(rfd, 65536)
            except BlockingIOError:
                return
            k = len(data) // 8
            for (t_sent,) in struct.iter_unpack("d", data[:8 * k]):
                samples.append(now - t_sent)
            pending = data[8 * k:]
        loop.add_reader(rfd, arrived)

    batch = max(1, rate // 1000)      # one burst per millisecond
    i = 0
    c0 = time.process_time()
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        for _ in range(batch):
            r = pool[i % len(pool)]
            i += 1
            # a fresh record per event, as a session would build it
            log_fn(AuditRecord(ts=r.ts, session_id=r.session_id, event=r.event,
                               identity=r.identity, identity_kind=r.identity_kind,
                               statement=r.statement, statement_kind=r.statement_kind,
                               relations=r.relations, decision=r.decision, rows=r.rows,
                               bytes_out=r.bytes_out, duration_us=r.duration_us))
        dt = time.perf_counter() - t0
        in_log += dt
        log_call_max = max(log_call_max, dt / batch)
        await asyncio.sleep(0.001)
    finished.set()
    await asyncio.sleep(0.01)
    if not spin:
        loop.remove_reader(rfd)
        sender.wait()
        os.close(rfd)
    cpu = time.process_time() - c0
    samples = sorted(samples)
    n = len(samples)
    return {"samples": n, "cpu_s": cpu, "max_ms": samples[-1] * 1e3,
            "p999_ms": samples[int(n * 0.999)] * 1e3,
            "p9999_ms": samples[int(n * 0.9999)] * 1e3,
            "over_1ms": sum(1 for x in samples if x > 0.001),
            "log_call_max_us": log_call_max * 1e6, "records": i,
            "log_call_mean_us": in_log / max(i, 1) * 1e6}


def bench_loop_lag(cls: type, root: Path, seconds: float, rate: int, spin: bool) -> dict:
    """The probe without auditing (baseline), then with AuditLog.log (uvloop).

    As in the proxy, the AuditLog starts and closes on the event loop it serves (the
    current AuditLog then sends from the loop itself; an in-process writer does not
    care). The baseline runs with the log's switch interval."""
    try:
        import uvloop
        new_loop = uvloop.new_event_loop
    except ImportError:     # pragma: no cover
        new_loop = asyncio.new_event_loop

    log = cls(cfg(root), roll_records=200_000, roll_seconds=2.0)

    # the loop's time inside the log's own callbacks (sending, timers, answers): the
    # stall auditing itself causes, apart from the OS scheduling the writer process
    # (wall time, and the loop thread's CPU time: a wall time far above it means the
    # OS ran something else meanwhile)
    spans: list[float] = []
    cpu_spans: list[float] = []

    def timed(fn):
        def run(*a):
            t0 = time.perf_counter()
            c0 = time.thread_time()
            try:
                return fn(*a)
            finally:
                spans.append(time.perf_counter() - t0)
                cpu_spans.append(time.thread_time() - c0)
        return run

    for name in ("_pump", "_tick", "_on_writable", "_on_readable"):
        if hasattr(log, name):
            setattr(log, name, timed(getattr(log, name)))

    async def audited_run() -> dict:
        log.start()
        w0 = _writer_cpu(log)
        c0 = time.process_time()
        out = await _lag_run(log.log, seconds, rate, spin)
        out["proxy_cpu_s"] = time.process_time() - c0
        out["writer_cpu_s"] = _writer_cpu(log) - w0
        log.close()
        spans.sort()
        out["callback_calls"] = len(spans)
        out["callback_max_ms"] = spans[-1] * 1e3 if spans else 0.0
        out["callback_over_1ms"] = sum(1 for x in spans if x > 0.001)
        out["callback_cpu_max_ms"] = max(cpu_spans, default=0.0) * 1e3
        return out

    def run(coro) -> dict:
        loop = new_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    if log.switch_interval is not None:
        sys.setswitchinterval(min(sys.getswitchinterval(), log.switch_interval))
    # as the proxy does after startup: what exists now is never scanned again, so a
    # full collection costs what the run allocates, not the imported modules
    gc.collect()
    gc.freeze()
    base = run(_lag_run(lambda rec: None, seconds, rate, spin))
    audited = run(audited_run())
    audited["base_cpu_s"] = base["cpu_s"]
    return {"baseline": base, "audit": audited, "rate": rate,
            "switch_interval_ms": sys.getswitchinterval() * 1e3}


_SENDER = """
import os, struct, sys, time
fd, secs = int(sys.argv[1]), float(sys.argv[2])
end = time.perf_counter() + secs
while time.perf_counter() < end:
    os.write(fd, struct.pack("d", time.perf_counter()))
    time.sleep(0.0005)
"""


# -- 3. strict -------------------------------------------------------------------------

def bench_strict(cls: type, root: Path, concurrency: int, seconds: float) -> dict:
    log = cls(cfg(root, durability="strict"), roll_records=1_000_000)
    log.start()
    lat: list[float] = []
    now = datetime.now(UTC)

    async def session(k: int) -> int:
        n = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            t0 = time.perf_counter()
            await log.log_strict(make_record(k * 1_000_000 + n, now))
            lat.append(time.perf_counter() - t0)
            n += 1
        return n

    async def main() -> int:
        return sum(await asyncio.gather(*(session(k) for k in range(concurrency))))

    w0 = _writer_cpu(log)
    c0 = time.process_time()
    t0 = time.perf_counter()
    total = asyncio.run(main())
    t = time.perf_counter() - t0
    cpu = time.process_time() - c0
    wcpu = _writer_cpu(log) - w0
    st = log.stats()
    log.close()
    lat.sort()
    return {"concurrency": concurrency, "per_s": total / t, "fsyncs": st.fsyncs,
            "proxy_cpu_us_per_record": cpu / max(total, 1) * 1e6,
            "writer_cpu_us_per_record": wcpu / max(total, 1) * 1e6,
            "records_per_fsync": total / max(st.fsyncs, 1),
            "p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3}


# -- 4. DuckDB -------------------------------------------------------------------------

def write_many(root: Path, n: int) -> dict:
    """Write n records through the AuditLog (also a long sustained-throughput run)."""
    log = AuditLog(cfg(root, queue_max=2_000_000), roll_records=1_000_000)
    log.start()
    now = datetime.now(UTC)
    pool = [make_record(i, now) for i in range(50_000)]
    t0 = time.perf_counter()
    sent = 0
    while sent < n:
        k = min(len(pool), n - sent)
        for r in pool[:k]:
            log.log(AuditRecord(ts=r.ts, session_id=r.session_id, identity=r.identity,
                                identity_kind=r.identity_kind, event=r.event,
                                statement=r.statement, statement_kind=r.statement_kind,
                                relations=r.relations, decision=r.decision, rows=r.rows,
                                bytes_out=r.bytes_out, masked_cells=r.masked_cells,
                                duration_us=r.duration_us))
        sent += k
        while log.stats().queue_depth > 500_000:
            time.sleep(0.001)
    log.roll()
    t = time.perf_counter() - t0
    log.close()
    return {"records": n, "per_s": n / t}


def bench_duckdb(root: Path) -> dict:
    import duckdb

    con = duckdb.connect()
    q = (f"SELECT identity, decision, count(*) AS n, sum(rows) AS rows FROM "
         f"read_parquet('{root}/**/*.parquet', hive_partitioning = true) GROUP BY ALL")
    t0 = time.perf_counter()
    res = con.execute(q).fetchall()
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(5):
        t0 = time.perf_counter()
        con.execute(q).fetchall()
        warm.append(time.perf_counter() - t0)
    total = con.execute(f"SELECT count(*) FROM read_parquet('{root}/**/*.parquet')"
                        ).fetchone()[0]
    files = len(list(root.rglob("*.parquet")))
    size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    return {"records": total, "files": files, "bytes": size, "groups": len(res),
            "cold_s": cold, "warm_s": min(warm), "threads": con.execute(
                "SELECT current_setting('threads')").fetchone()[0]}


# -- report ----------------------------------------------------------------------------

# -- 5. object store ------------------------------------------------------------------

def _store_keys(store, instance: str) -> list[str]:
    streams, _ = store.listing(instance)
    return [f.key for files in streams.values() for f in files]


def bench_store_drain(root: Path, n: int, uri: str) -> dict:
    """bench_drain's run with [audit] store set and without, interleaved: records/s to
    sealed Parquet, and with a store until the file is in it."""
    from pgguard.audit.store import Store
    store = Store.open(uri)
    out: dict = {}
    for label in ("without", "with", "without2", "with2"):
        with_store = label.startswith("with") and not label.startswith("without")
        inst = f"bench-{label}-{os.getpid()}"
        kw = {"store": uri} if with_store else {}
        log = AuditLog(cfg(root / label, queue_max=n + 1, **kw), roll_records=1_000_000,
                       instance=inst)
        w0, t0 = queue_then_start(log, record_pool(n), n)
        log.flush()
        log.roll()
        t_parquet = time.perf_counter() - t0
        t_store = None
        if with_store:
            while not _store_keys(store, inst):
                time.sleep(0.005)
            t_store = time.perf_counter() - t0
        # CPU is steadier than wall time on a shared machine: the writer process's,
        # sealing and (with a store) uploading included
        wcpu = _writer_cpu(log) - w0
        log.close()
        out.setdefault(label.rstrip("2"), []).append(
            {"parquet_per_s": n / t_parquet,
             "in_store_per_s": n / t_store if t_store else None,
             "writer_cpu_us": wcpu / n * 1e6})
    best = {k: max(v, key=lambda d: d["parquet_per_s"]) for k, v in out.items()}
    cpu = {k: min(d["writer_cpu_us"] for d in v) for k, v in out.items()}
    return {"records": n, "without_per_s": best["without"]["parquet_per_s"],
            "with_per_s": best["with"]["parquet_per_s"],
            "in_store_per_s": best["with"]["in_store_per_s"],
            "writer_cpu_us_without": cpu["without"], "writer_cpu_us_with": cpu["with"]}


def bench_upload_lag(root: Path, uri: str, seconds: float, seal: float) -> dict:
    """Strict records, one every 10 ms, each acknowledged (fsynced); a reader polls the
    store and reads every new file: lag = first seen in the store - acknowledged."""
    import pyarrow.parquet as pq

    from pgguard.audit.store import Store
    store = Store.open(uri)
    inst = f"bench-lag-{os.getpid()}"
    acked: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()

    def reader() -> None:
        read: set[str] = set()
        while not done.is_set() or len(seen) < len(acked):
            for key in _store_keys(store, inst):
                if key in read:
                    continue
                read.add(key)
                t = time.perf_counter()
                with store.open_input(key) as f:
                    for s in pq.read_table(f, columns=["session_id"]).column(0).to_pylist():
                        seen.setdefault(s, t)
            time.sleep(0.01)
            if done.is_set() and time.perf_counter() > deadline:
                break

    log = AuditLog(cfg(root, durability="strict", store=uri, flush_interval="2ms"),
                   roll_seconds=seal, instance=inst)
    log.start()
    deadline = float("inf")
    th = threading.Thread(target=reader, daemon=True)
    th.start()

    async def produce() -> None:
        i = 0
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            text = f"lag-{i}"      # statements are normalized; session ids are not
            rec = AuditRecord(ts=datetime.now(UTC), session_id=text, event="statement",
                              statement="SELECT 1", decision="allowed")
            await log.log_strict(rec)
            acked[text] = time.perf_counter()
            i += 1
            await asyncio.sleep(0.01)
    asyncio.run(produce())
    deadline = time.perf_counter() + seal + 30
    done.set()
    th.join()
    log.close()
    lags = sorted((seen[k] - t) * 1e3 for k, t in acked.items() if k in seen)
    if not lags:
        return {"records": len(acked), "visible": 0}
    return {"records": len(acked), "visible": len(lags), "seal_s": seal,
            "p50_ms": lags[len(lags) // 2], "p99_ms": lags[int(len(lags) * 0.99)],
            "max_ms": lags[-1]}


def table(rows: list[tuple[str, str, str, float | None]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    out = [f"{'measurement':<{w0}}  {'value':>{w1}}  {'target':<{w2}}  ratio",
           "-" * (w0 + w1 + w2 + 13)]
    for name, value, target, ratio in rows:
        r = "" if ratio is None else f"{ratio:5.2f}{' ok' if ratio >= 1 else ' MISS'}"
        out.append(f"{name:<{w0}}  {value:>{w1}}  {target:<{w2}}  {r}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--records", type=int, default=None, help="throughput run size")
    ap.add_argument("--duckdb-records", type=int, default=None,
                    help="records written for the DuckDB query (default 10M, quick 1M)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write results")
    ap.add_argument("--only", default="drain,sustained,lag,strict,duckdb",
                    help="comma-separated parts to run (default: all)")
    ap.add_argument("--store", default=None, metavar="URI",
                    help="part 'store': this store (default: a moto S3 server started here)")
    ap.add_argument("--seal", type=float, default=1.0, metavar="S",
                    help="part 'store': seal interval for the upload lag (default 1 s)")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="also run parts 1-3 with the AuditLog of this git revision")
    args = ap.parse_args()
    n = args.records or (300_000 if args.quick else 2_000_000)
    n_duck = args.duckdb_records or (1_000_000 if args.quick else 10_000_000)
    lag_s = 3.0 if args.quick else 8.0
    work = Path(args.dir or tempfile.mkdtemp(prefix="pgguard-bench-audit-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = set(args.only.split(","))
    variants = {"now": AuditLog}
    if args.baseline:
        variants[args.baseline] = load_audit_log(args.baseline)
    res: dict = {"cpus": os.cpu_count(), "load": os.getloadavg(),
                 "variants": list(variants)}
    try:
        print(f"work dir {work}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}; "
              f"variants {', '.join(variants)}", flush=True)
        for part, run in (
                ("drain", lambda c, d: bench_drain(c, d, n)),
                ("sustained", lambda c, d: bench_sustained(c, d, n)),
                ("lag_idle", lambda c, d: bench_loop_lag(c, d, lag_s, 50_000, spin=False)),
                ("lag_spin", lambda c, d: bench_loop_lag(c, d, lag_s, 50_000, spin=True)),
                ("strict", lambda c, d: [bench_strict(c, d / f"s{k}", k,
                                                      2.0 if args.quick else 4.0)
                                         for k in (1, 16, 64)])):
            if part.split("_")[0] not in parts:
                continue
            res[part] = {}
            for name, cls in variants.items():
                res[part][name] = run(cls, work / f"{part}-{name}")
                print(f"{part} [{name}]: {res[part][name]}", flush=True)
        if "store" in parts:
            res.update(_run_store(args, work, n, lag_s))
        if "duckdb" in parts:
            duck_dir = work / "duck"
            res["duck_write"] = write_many(duck_dir, n_duck)
            print(f"write for duckdb: {res['duck_write']}", flush=True)
            res["duckdb"] = bench_duckdb(duck_dir)
            print(f"duckdb: {res['duckdb']}", flush=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    def each(part: str, fmt, key=None) -> str:
        return " / ".join(fmt(res[part][v] if key is None else key(res[part][v]))
                          for v in variants)

    def now(part: str) -> dict:
        return res[part]["now"]

    vs = " / ".join(variants)
    rows: list[tuple[str, str, str, float | None]] = []
    if "drain" in res:
        rows += [
            (f"writer: queue -> Parquet (records/s) [{vs}]",
             each("drain", lambda d: f"{d['parquet_per_s']:,.0f}"), ">= 300,000",
             now("drain")["parquet_per_s"] / 300_000),
            (f"writer: queue -> WAL fsynced (records/s) [{vs}]",
             each("drain", lambda d: f"{d['wal_per_s']:,.0f}"), ">= 300,000",
             now("drain")["wal_per_s"] / 300_000),
            (f"drain: proxy CPU per record (us) [{vs}]",
             each("drain", lambda d: f"{d['proxy_cpu_us_per_record']:.2f}"), "<= 1 us",
             1.0 / max(now("drain")["proxy_cpu_us_per_record"], 1e-3)),
            (f"drain: writer process CPU per record (us) [{vs}]",
             each("drain", lambda d: f"{d['writer_cpu_us_per_record']:.2f}"), "", None)]
    if "sustained" in res:
        rows += [
            (f"sustained, producer + writer (records/s) [{vs}]",
             each("sustained", lambda d: f"{d['per_s']:,.0f}"), ">= 300,000",
             now("sustained")["per_s"] / 300_000),
            (f"sustained: proxy CPU per record (us) [{vs}]",
             each("sustained", lambda d: f"{d['proxy_cpu_us_per_record']:.2f}"), "<= 1 us",
             1.0 / max(now("sustained")["proxy_cpu_us_per_record"], 1e-3)),
            (f"sustained: writer process CPU per record (us) [{vs}]",
             each("sustained", lambda d: f"{d['writer_cpu_us_per_record']:.2f}"), "", None)]
    if "duck_write" in res:
        dw = res["duck_write"]
        rows.append((f"sustained {dw['records'] / 1e6:g}M records (records/s)",
                     f"{dw['per_s']:,.0f}", ">= 300,000", dw["per_s"] / 300_000))
    if "lag_idle" in res:
        li = now("lag_idle")
        rows.append((f"log() + building the record, mean (us) [{vs}; no-op]",
                     each("lag_idle", lambda d: f"{d['audit']['log_call_mean_us']:.2f}")
                     + f"; {li['baseline']['log_call_mean_us']:.2f}", "", None))
        rows.append((f"lag run: proxy CPU for auditing per record (us) [{vs}]",
                     each("lag_idle", lambda d: "{:.2f}".format(
                         (d["audit"]["proxy_cpu_s"] - d["audit"]["base_cpu_s"])
                         / d["audit"]["records"] * 1e6)), "<= 1 us", None))
        for label, part in (("idle loop", "lag_idle"), ("busy loop", "lag_spin")):
            rows.append((f"{label}: longest audit callback or log() (ms) [{vs}]",
                         each(part, lambda d: "{:.2f}".format(max(
                             d["audit"].get("callback_max_ms", 0.0),
                             d["audit"]["log_call_max_us"] / 1e3))),
                         "< 1 ms", 1.0 / max(max(
                             now(part)["audit"].get("callback_max_ms", 0.0),
                             now(part)["audit"]["log_call_max_us"] / 1e3),
                             1e-3)))
            rows.append((f"{label}: longest audit callback, loop thread CPU (ms) [{vs}]",
                         each(part, lambda d: "{:.2f}".format(
                             d["audit"].get("callback_cpu_max_ms", 0.0))), "", None))
        for label, part in (("idle loop, wake-up", "lag_idle"),
                            ("busy loop, iteration gap", "lag_spin")):
            b = now(part)["baseline"]
            for q, key in (("p99.9", "p999_ms"), ("p99.99", "p9999_ms"), ("max", "max_ms")):
                rows.append((f"{label} {q}: audit [{vs}] / no audit (ms)",
                             each(part, lambda d: f"{d['audit'][key]:.2f}")
                             + f" / {b[key]:.2f}", "< 1 ms",
                             1.0 / max(now(part)["audit"][key], 1e-3)))
            rows.append((f"{label} > 1 ms: audit [{vs}] / no audit (count)",
                         each(part, lambda d: f"{d['audit']['over_1ms']}")
                         + f" / {b['over_1ms']}", "", None))
    if "strict" in res:
        for i, k in enumerate((1, 16, 64)):
            st = now("strict")[i]
            rows.append((f"strict, {k} sessions (records/s) [{vs}]",
                         each("strict", lambda d: f"{d[i]['per_s']:,.0f}"),
                         f"p99 {st['p99_ms']:.1f} ms, {st['records_per_fsync']:.1f}/fsync",
                         None))
        rows.append((f"strict, 64 sessions: proxy / writer CPU per record (us) [{vs}]",
                     each("strict", lambda d: f"{d[2]['proxy_cpu_us_per_record']:.1f}+"
                          f"{d[2]['writer_cpu_us_per_record']:.1f}"), "", None))
    if "store_drain" in res:
        sd, lag = res["store_drain"], res["upload_lag"]
        rows += [
            ("writer: queue -> Parquet, [audit] store set / not (records/s)",
             f"{sd['with_per_s']:,.0f} / {sd['without_per_s']:,.0f}", ">= 300,000",
             sd["with_per_s"] / 300_000),
            ("writer: queue -> file in the store (records/s)",
             f"{sd['in_store_per_s']:,.0f}", "", None),
            ("writer process CPU per record, store set / not (us)",
             f"{sd['writer_cpu_us_with']:.2f} / {sd['writer_cpu_us_without']:.2f}", "", None),
            (f"upload lag, ack -> visible in store, seal {lag.get('seal_s')} s: p50 / p99 (ms)",
             f"{lag.get('p50_ms', float('nan')):.0f} / {lag.get('p99_ms', float('nan')):.0f}",
             f"<= seal + 1 s ({lag['visible']}/{lag['records']} seen)",
             (lag["seal_s"] * 1e3 + 1000) / lag["p99_ms"] if lag.get("p99_ms") else None)]
    if "duckdb" in res:
        dk = res["duckdb"]
        rows += [
            (f"DuckDB group-by {dk['records'] / 1e6:g}M records, warm (s)",
             f"{dk['warm_s']:.3f}", "<= 0.1 s", 0.1 / dk["warm_s"]),
            (f"DuckDB group-by {dk['records'] / 1e6:g}M records, cold (s)",
             f"{dk['cold_s']:.3f}", "", None),
            ("Parquet bytes per record", f"{dk['bytes'] / max(dk['records'], 1):.1f}", "",
             None)]
    print()
    print(table(rows))
    print(f"\n{os.cpu_count()} CPUs, load average at start {res['load'][0]:.1f}, at end "
          f"{os.getloadavg()[0]:.1f}; switch interval {sys.getswitchinterval() * 1e3:.2f} ms"
          + ("; ratios are for 'now'" if len(variants) > 1 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


def _run_store(args: argparse.Namespace, work: Path, n: int, lag_s: float) -> dict:
    moto = None
    uri = args.store
    if uri is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from s3lib import Moto
        moto = Moto().start()
        os.environ.update(moto.env())
        moto.client().create_bucket(Bucket="pgguard-bench")
        uri = "s3://pgguard-bench/audit"
    try:
        res = {"store_drain": bench_store_drain(work / "store", n, uri)}
        print(f"store drain: {res['store_drain']}", flush=True)
        res["upload_lag"] = bench_upload_lag(work / "lag", uri, max(lag_s, 5.0), args.seal)
        print(f"upload lag: {res['upload_lag']}", flush=True)
        return res
    finally:
        if moto is not None:
            moto.stop()


if __name__ == "__main__":
    sys.exit(main())
