# The audit writer: the event loop only enqueues; a writer thread hashes records into a
# group-committed WAL; a sealer thread turns closed WAL segments into Parquet files.
"""Write audit records durably without stalling the event loop.

Threads and costs:

- ``log()`` / ``log_strict()`` run on the event loop: a ``deque.append`` (plus a future
  in strict mode). Nothing else happens there.
- The *writer* thread drains the queue in groups: assigns ``event_id``, stamps ``ts``,
  normalizes statements, encodes canonical JSON lines (msgspec), validates them, chains
  the hashes, appends one frame per 256 records to the WAL segment, ``fdatasync``s once
  per group (group commit), then resolves the strict futures of that group.
- The *sealer* thread converts the hashed lines to Arrow (GIL released), writes the
  Parquet file of the segment under a temporary name, and when the segment closes
  (``roll_records`` records, ``roll_seconds`` old, or a new UTC day) renames it into
  ``dt=YYYY-MM-DD/``, updates the chain head and deletes the WAL segment.

Durability:

- ``batched`` (default): the writer wakes every ``flush_interval`` (or once
  ``wake_records`` records are queued) and commits what is queued: a crash loses at most
  the records logged during the last flush interval plus the commit time. When the queue
  holds ``queue_max`` records (the disk stopped keeping up), ``log()`` drops the record,
  counts it (``stats().dropped``), logs a warning, and the writer writes an
  ``audit_dropped`` record with the count into the chain: drops are never silent, and
  the event loop never blocks on the disk.
- ``strict``: ``await log_strict(record)`` returns once the record is fsynced. Records
  of concurrent sessions share one fsync (group commit). Nothing is dropped; a slow
  disk slows the sessions that wait (backpressure).

After a crash, ``start()`` turns the leftover WAL into Parquet before accepting records.
"""
from __future__ import annotations

import asyncio
from binascii import hexlify
import concurrent.futures
import fcntl
import logging
import os
import queue
import secrets
import sys
import threading
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa

from ..config import AuditConfig, parse_duration
from . import storage
from .record import (EVENT_AUDIT_DROPPED, GENESIS, UTC, AuditRecord, _as_text,
                     prepare_statement, sanitize, to_content)
from .storage import AuditError

log = logging.getLogger("pgguard.audit")

CHUNK = 256                 # records per WAL frame; bounds each GIL-holding C call
SEALER_NICE = 10            # CPU niceness of the sealer thread
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_T2 = [_CROCKFORD[i >> 5] + _CROCKFORD[i & 31] for i in range(1024)]
_STMT_CACHE_MAX = 20_000


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_CROCKFORD[n & 31])
        n >>= 5
    return "".join(reversed(out))


class AuditStats(msgspec.Struct):
    """Counters for /metrics. ``dropped`` > 0 means batched mode lost records."""

    dropped: int
    written: int
    queue_depth: int
    sealed_files: int
    fsyncs: int
    last_fsync_us: int
    max_fsync_us: int
    coerced: int
    errors: int
    last_error: str | None
    stream: str
    segment_seq: int


class _ClosedQueue:
    # stands in for the deque after close(): records logged late are counted, not kept
    def __init__(self) -> None:
        self.dropped = 0

    def append(self, item: object) -> None:
        if isinstance(item, (asyncio.Future, concurrent.futures.Future)):
            return
        if not self.dropped:
            log.warning("audit: record logged after close(); dropped (counted in stats)")
        self.dropped += 1

    def __len__(self) -> int:
        return 0


class _Roll:
    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future) -> None:
        self.future = future


def _resolve(items: list[tuple[Any, Any]]) -> None:
    # runs on the waiters' event loop
    for fut, value in items:
        if not fut.done():
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)


def _lock_stream(root: Path, stream: str, wait: bool) -> int | None:
    d = storage.wal_dir(root, stream)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class _Tip(msgspec.Struct):
    seq: int            # last sealed (or recovered) segment
    hash: str           # chain hash after it
    records: int        # records in the chain so far


def recover(root: Path, stream: str) -> _Tip:
    """Turn a stream's leftover WAL into Parquet; return where its chain continues.

    The caller holds the stream lock. A WAL segment is deleted only once the Parquet
    file of the same seq exists.
    """
    root = Path(root)
    streams, _ = storage.list_parquet(root)
    files = {f.seq: f for f in streams.get(stream, [])}
    for f in root.glob(f"dt=*/.{stream}-*.parquet.tmp"):   # a seal interrupted by a crash
        f.unlink(missing_ok=True)
    for f in storage.wal_dir(root, stream).glob(".*.wal.tmp"):   # a segment being created
        f.unlink(missing_ok=True)
    head = storage.read_head(root, stream)
    records = head.records if head else 0
    if head is None and files:
        records = sum(storage.pq.read_metadata(f.path).num_rows for f in files.values())

    def set_head(seq: int, last: str, path: Path, total: int) -> storage.Head:
        h = storage.Head(stream=stream, seq=seq, last_hash=last, records=total,
                         file=str(path.relative_to(root)),
                         updated=datetime.now(UTC).isoformat())
        storage.write_head(root, h)
        return h

    for seq, path in storage.list_wal(root, stream):
        if seq in files:
            path.unlink()
            continue
        seg = storage.read_wal(path)
        if seg.stream != stream or seg.seq != seq:
            raise AuditError(f"{path}: WAL header names {seg.stream}/{seg.seq}")
        if seg.damaged:
            log.error("audit: %s: a frame in the middle fails its hash check; the records "
                      "after it (%d bytes) cannot be trusted and are not converted", path,
                      seg.tail_bytes)
        out = storage.segment_to_parquet(root, seg)
        if out is not None:
            records += seg.records
            head = set_head(seq, seg.last_hash, out, records)
            files[seq] = storage.ParquetFile(stream, seq, out, out.parent.name[3:])
            log.warning("audit: recovered %d records from %s%s", seg.records, path.name,
                        f" ({seg.tail_bytes} bytes of an unacknowledged write dropped)"
                        if seg.tail_bytes and not seg.damaged else "")
        path.unlink()
        storage.fsync_dir(path.parent)

    pmax = max(files) if files else 0
    if head is not None and head.seq >= pmax:
        if head.seq > pmax:
            log.error("audit: stream %s: head names seq %d but the last file is seq %d; "
                      "files are missing (verify will name them)", stream, head.seq, pmax)
        return _Tip(seq=head.seq, hash=head.last_hash, records=head.records)
    if pmax:
        # the head update of the last seal was lost in a crash (or the head was deleted)
        last, _ = storage.last_hash_of(files[pmax].path)
        head = set_head(pmax, last, files[pmax].path, records)
        return _Tip(seq=pmax, hash=last, records=records)
    return _Tip(seq=0, hash=GENESIS, records=0)


class AuditLog:
    """The audit log of one worker process (one *stream* of the hash chain).

    Example::

        audit = AuditLog(cfg.audit, cfg.base_dir)   # stream="w0"; one per worker
        audit.start()                               # recovers leftover WAL first
        audit.log(AuditRecord(session_id=sid, event="connect", identity="ci-agent",
                              identity_kind="agent", ts=datetime.now(timezone.utc)))
        if audit.strict:
            await audit.log_strict(rec)             # fsynced when this returns
        else:
            audit.log(rec)
        ...
        audit.close()                               # drains, seals the last Parquet file

    Keyword arguments (defaults suit a proxy worker):

    - ``stream``: this writer's chain; one per worker process (``w0``, ``w1`` ...),
      stable across restarts so a restarted worker continues its chain;
    - ``roll_records`` / ``roll_seconds``: seal the open segment into a Parquet file
      after this many records or seconds (and at each new UTC day);
    - ``group_records``: most records per group commit (one fdatasync);
    - ``wake_records``: in batched mode, wake the writer before the flush interval once
      this many records are queued;
    - ``switch_interval``: lower ``sys.setswitchinterval`` to this at start (``None``:
      leave it), so the event loop gets the GIL back quickly from the writer thread.
    """

    def __init__(self, cfg: AuditConfig, base_dir: str | os.PathLike[str] = ".", *,
                 stream: str = "w0", roll_records: int = 1_000_000,
                 roll_seconds: float = 60.0, group_records: int = 65_536,
                 wake_records: int = 8_192,
                 switch_interval: float | None = 0.0002) -> None:
        d = Path(cfg.dir)
        self.root = d if d.is_absolute() else Path(base_dir) / d
        self.stream = storage.check_stream(stream)
        self.strict = cfg.durability == "strict"
        self.capture_literals = cfg.capture_literals
        self.flush_interval = max(parse_duration(cfg.flush_interval), 0.001)
        self.queue_max = cfg.queue_max
        self.roll_records = roll_records
        self.roll_seconds = roll_seconds
        self.group_records = max(CHUNK, group_records)
        self.wake_records = wake_records
        self.switch_interval = switch_interval

        self._q: Any = deque()
        self._wake = threading.Event()
        self._dropped = 0               # written by the enqueuing thread only
        self._dropped_logged = 0        # writer thread only
        self._stopping = False
        self._started = False
        self._closed = False
        self._lock_fd: int | None = None
        self._roll_req: list[concurrent.futures.Future] = []
        # writer-thread state
        self._prev = bytes(32)          # raw chain digest after the last durable record
        self._next_seq = 1
        self._seg_fd: int | None = None
        self._seg_seq = 0
        self._seg_records = 0
        self._seg_opened = 0.0
        self._seg_date = ""
        self._seg_synced = 0
        self._retry: tuple | None = None
        self._ctr = 0
        self._last_ms = 0
        self._rand = _b32(secrets.randbits(40), 8)
        self._stmt_cache: dict[str, str] = {}
        self._written = 0
        self._fsyncs = 0
        self._last_fsync_us = 0
        self._max_fsync_us = 0
        self._coerced = 0
        self._errors = 0
        self._last_error: str | None = None
        # sealer hand-off
        self._sq: queue.SimpleQueue = queue.SimpleQueue()
        self._handed = 0                # writer thread only
        self._sealed_n = 0              # sealer thread only
        self._sealed_files = 0
        self._sealer_cond = threading.Condition()
        self._sealer_pending_max = 262_144
        self._total_records = 0
        self._head_total = 0
        self._writer_thread: threading.Thread | None = None
        self._sealer_thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Recover leftover WAL (this and any unlocked stream), then start the threads.

        Blocking; call before serving. Raises ``AuditError`` if another process holds
        this stream or the directory is not writable.
        """
        if self._started:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock_stream(self.root, self.stream, wait=False)
            if self._lock_fd is None:
                raise AuditError(f"audit stream {self.stream!r} in {self.root} is in use by "
                                 f"another process (give each worker its own stream)")
            tip = recover(self.root, self.stream)
            for other in storage.list_wal_streams(self.root):
                if other != self.stream:
                    fd = _lock_stream(self.root, other, wait=False)
                    if fd is not None:
                        try:
                            recover(self.root, other)
                        finally:
                            os.close(fd)
        except OSError as e:
            raise AuditError(f"audit directory {self.root}: {e.strerror or e}") from None
        self._prev = bytes.fromhex(tip.hash)
        self._next_seq = tip.seq + 1
        self._total_records = tip.records
        self._head_total = tip.records
        if self.switch_interval is not None and sys.getswitchinterval() > self.switch_interval:
            # a busy writer thread holds the GIL up to the switch interval before the event
            # loop gets it back, and uvloop takes the GIL once per libuv callback, so one
            # loop iteration may wait several times: the default 5 ms would stall it for
            # tens of ms. Measured (2 vCPUs): 0.2 ms beats 0.5 ms; 0.1 ms is no better.
            sys.setswitchinterval(self.switch_interval)
        self._writer_thread = threading.Thread(
            target=self._run_writer, name=f"pgguard-audit-writer-{self.stream}", daemon=True)
        self._sealer_thread = threading.Thread(
            target=self._run_sealer, name=f"pgguard-audit-sealer-{self.stream}", daemon=True)
        self._started = True
        self._sealer_thread.start()
        self._writer_thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Commit everything queued, seal the open segment into Parquet, stop the threads.

        Blocking (seconds for a large backlog). Idempotent. Example: ``audit.close()``.
        """
        if not self._started or self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        assert self._writer_thread and self._sealer_thread
        self._writer_thread.join(timeout)
        self._sealer_thread.join(timeout)
        leftover = self._q
        closed = self._q = _ClosedQueue()
        if self._writer_thread.is_alive() or self._sealer_thread.is_alive():
            log.error("audit: close timed out; unsealed records stay in the WAL and are "
                      "recovered at the next start")
        err = AuditError("the audit log closed before this record was written")
        for item in list(leftover):
            if isinstance(item, (asyncio.Future, concurrent.futures.Future)):
                self._settle([(item, err)])
            else:       # logged after the writer's last drain: counted, never silent
                closed.append(item)
        if self._lock_fd is not None and not self._writer_thread.is_alive():
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> AuditLog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- event loop side (hot: keep these tiny) --------------------------------------

    def log(self, record: AuditRecord) -> None:
        """Enqueue *record*. O(1), never blocks, callable from any thread.

        Batched mode with a full queue (``queue_max``): the record is dropped and
        counted. The log owns *record* afterwards: do not modify it.
        """
        q = self._q
        n = len(q)
        if n >= self.queue_max and not self.strict:
            self._dropped += 1
            return
        q.append(record)
        if n >= self.wake_records and not self._wake.is_set():
            self._wake.set()

    def log_strict(self, record: AuditRecord) -> Any:
        """Enqueue *record* and return a future that resolves (to its ``event_id``) once
        the record is fsynced.

        On an event loop thread: an ``asyncio.Future`` (``await audit.log_strict(rec)``);
        elsewhere a ``concurrent.futures.Future`` (``.result(timeout)``). Never dropped,
        whatever the queue length: the waiting caller is the backpressure. Fails with
        ``AuditError`` if the log is closed before the record is written.
        """
        loop = asyncio._get_running_loop()
        fut: Any = loop.create_future() if loop is not None else concurrent.futures.Future()
        if self._closed or not self._started:
            fut.set_exception(AuditError("the audit log is not running"))
            return fut
        q = self._q
        q.append(record)
        q.append(fut)
        if not self._wake.is_set():
            self._wake.set()
        return fut

    # -- blocking helpers (tests, CLI, shutdown) --------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Block until every record logged before this call is fsynced in the WAL."""
        if self._closed or not self._started:
            return
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.append(fut)
        self._wake.set()
        fut.result(timeout)

    def roll(self, timeout: float | None = None) -> Path | None:
        """Block until everything logged so far is in a sealed Parquet file; return it
        (``None`` if there was nothing to seal)."""
        if self._closed or not self._started:
            return None
        self.flush(timeout)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.append(_Roll(fut))
        self._wake.set()
        return fut.result(timeout)

    def stats(self) -> AuditStats:
        """Counters; cheap, any thread. Example: ``audit.stats().dropped``."""
        return AuditStats(
            dropped=self._dropped + getattr(self._q, "dropped", 0), written=self._written,
            queue_depth=len(self._q), sealed_files=self._sealed_files,
            fsyncs=self._fsyncs, last_fsync_us=self._last_fsync_us,
            max_fsync_us=self._max_fsync_us, coerced=self._coerced, errors=self._errors,
            last_error=self._last_error, stream=self.stream, segment_seq=self._seg_seq)

    def health(self) -> str | None:
        """``None`` when healthy, else the last write error (for /healthz)."""
        return self._last_error if self._retry is not None else None

    # -- writer thread --------------------------------------------------------------

    def _run_writer(self) -> None:
        backoff = 0.0
        failures_while_stopping = 0
        while True:
            timeout = self.flush_interval
            if self._seg_fd is not None and self.roll_seconds:
                timeout = min(timeout, max(0.001, self._seg_opened + self.roll_seconds
                                           - time.monotonic()))
            if backoff:
                timeout = backoff
            self._wake.wait(timeout)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._drain()
                self._maybe_roll(force=stopping)
                backoff = 0.0
            except Exception as e:  # keep the thread alive; records stay queued or retried
                self._errors += 1
                self._last_error = f"{type(e).__name__}: {e}"
                log.exception("audit: writer error; retrying")
                backoff = min(max(backoff * 2, 0.05), 1.0)
                if stopping:
                    failures_while_stopping += 1
                    if failures_while_stopping > 10:
                        log.error("audit: giving up at close; the WAL keeps what was "
                                  "committed and is recovered at the next start")
                        break
                continue
            if stopping and not self._q and self._retry is None:
                break
        self._sq.put(("stop",))

    def _drain(self) -> None:
        if self._retry is not None:
            self._commit(*self._retry)
        q = self._q
        popleft = q.popleft
        while True:
            if self._dropped != self._dropped_logged:
                self._note_drops()
            if not q:
                break
            if self._seg_fd is not None and (
                    self._seg_records >= self.roll_records
                    or datetime.now(UTC).strftime("%Y-%m-%d") != self._seg_date):
                self._roll_segment(None)
            n = min(len(q), self.group_records)
            items = [popleft() for _ in range(n)]
            self._group(items)

    def _note_drops(self) -> None:
        n = self._dropped - self._dropped_logged
        self._dropped_logged = self._dropped
        log.warning("audit: queue full (queue_max=%d): %d records dropped", self.queue_max, n)
        self._q.appendleft(AuditRecord(
            session_id="", event=EVENT_AUDIT_DROPPED, rows=n, ts=datetime.now(UTC),
            error=f"audit queue full (queue_max={self.queue_max}): {n} records dropped"))

    def _group(self, items: list[Any]) -> None:
        # one group commit: frames of CHUNK records, one writev + fdatasync, then waiters
        waiters: list[tuple[Any, Any]] = []
        rolls: list[concurrent.futures.Future] = []
        frames: list[bytes] = []
        handoff: list[tuple[bytes, bytes, bytes]] = []
        prev = self._prev
        count = 0
        Rec = AuditRecord
        cache = self._stmt_cache
        raw = self.capture_literals
        T2 = _T2
        eid: str | None = None
        for start in range(0, len(items), CHUNK):
            chunk = items[start:start + CHUNK]
            now = datetime.now(UTC)
            ms = time.time_ns() // 1_000_000
            if ms < self._last_ms:
                ms = self._last_ms          # the clock stepped back: ids stay monotonic
            self._last_ms = ms
            pre = _b32(ms, 10) + self._rand
            c = self._ctr
            pre_hi = pre + T2[(c >> 30) & 1023] + T2[(c >> 20) & 1023] + T2[(c >> 10) & 1023]
            recs = []
            append = recs.append
            for it in chunk:
                if it.__class__ is not Rec:
                    it = self._special(it, waiters, rolls, eid)
                    if it is None:
                        continue
                c += 1
                lo = c & 1023
                if not lo:
                    pre_hi = (pre + T2[(c >> 30) & 1023] + T2[(c >> 20) & 1023]
                              + T2[(c >> 10) & 1023])
                eid = pre_hi + T2[lo]
                it.event_id = eid
                ts = it.ts
                if ts is None:
                    it.ts = now
                elif ts.__class__ is not datetime or ts.tzinfo is not UTC:
                    it.ts = _fix_ts(ts)
                s = it.statement
                if s is not None:
                    if s.__class__ is not str:
                        s = _as_text(s)
                    ns = cache.get(s)
                    if ns is None:
                        ns = prepare_statement(s, raw)
                        if len(cache) >= _STMT_CACHE_MAX:
                            cache.clear()
                        cache[s] = ns
                    it.statement = ns
                append(it)
            self._ctr = c
            if not recs:
                continue
            blob = self._encode(recs, now)
            lines = storage.split_lines(blob)
            ds = storage.chain_lines(prev, lines)
            last = ds[-1]
            frames.append(storage.wal_frame_header(blob, len(lines), last))
            frames.append(blob)
            handoff.append((blob, hexlify(b"".join(ds)), hexlify(prev), len(lines)))
            prev = last
            count += len(lines)
        self._commit(frames, handoff, prev, count, waiters)
        for fut in rolls:
            self._roll_segment(fut)

    def _special(self, it: Any, waiters: list, rolls: list, eid: str | None) -> Any:
        # queue items other than plain records: futures, roll requests, subclasses
        if isinstance(it, (asyncio.Future, concurrent.futures.Future)):
            waiters.append((it, eid))
        elif it.__class__ is _Roll:
            rolls.append(it.future)
        elif isinstance(it, AuditRecord):
            return AuditRecord(**msgspec.structs.asdict(it))
        else:
            self._errors += 1
            self._last_error = f"not an AuditRecord: {type(it).__name__}"
            log.error("audit: ignoring a queued %s (log() takes AuditRecord)",
                      type(it).__name__)
        return None

    def _encode(self, recs: list[AuditRecord], now: datetime) -> bytes:
        # canonical JSON lines of the type-checked content of *recs*
        enc = _encoder
        try:
            return enc.encode_lines(to_content(recs))
        except Exception:
            pass
        out = []
        bad = 0
        for r in recs:
            try:
                out.append(enc.encode(to_content([r])[0]))
            except Exception:
                bad += 1
                fixed = sanitize(r, now)
                if not self.capture_literals and fixed.statement is not None:
                    fixed.statement = prepare_statement(fixed.statement, False)
                out.append(enc.encode(to_content([fixed])[0]))
        self._coerced += bad
        log.warning("audit: %d malformed record(s) coerced (see their error column)", bad)
        return b"\n".join(out) + b"\n"

    def _commit(self, frames: list[bytes], handoff: list, prev: bytes, count: int,
                waiters: list) -> None:
        if count:
            if self._seg_fd is None:
                self._open_segment()
            self._retry = (frames, handoff, prev, count, waiters)
            fd = self._seg_fd
            assert fd is not None
            try:
                _write_all(fd, frames)
                t0 = time.perf_counter_ns()
                os.fdatasync(fd)
                us = (time.perf_counter_ns() - t0) // 1000
            except OSError as e:
                self._errors += 1
                self._last_error = f"WAL write failed: {e}"
                log.error("audit: WAL write to segment %d failed: %s; retrying", self._seg_seq, e)
                try:
                    os.ftruncate(fd, self._seg_synced)
                except OSError:
                    # cannot take back a partial frame: continue in a fresh segment
                    self._abandon_segment()
                raise
            self._retry = None
            self._seg_synced += sum(len(f) for f in frames)
            self._fsyncs += 1
            self._last_fsync_us = us
            if us > self._max_fsync_us:
                self._max_fsync_us = us
            self._prev = prev
            self._seg_records += count
            self._written += count
            self._total_records += count
            self._handed += count
            self._sq.put(("data", self._seg_seq, handoff))
        if waiters:
            self._settle(waiters)
        if count:
            self._sealer_backpressure()

    def _settle(self, waiters: list[tuple[Any, Any]]) -> None:
        by_loop: dict[Any, list] = {}
        for fut, value in waiters:
            if isinstance(fut, concurrent.futures.Future):
                if not fut.done():
                    if isinstance(value, BaseException):
                        fut.set_exception(value)
                    else:
                        fut.set_result(value)
            else:
                by_loop.setdefault(fut.get_loop(), []).append((fut, value))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:    # that loop is closed; nobody is waiting any more
                pass

    def _sealer_backpressure(self) -> None:
        # the sealer converts at its own pace; hold the writer (and so the queue) when
        # it falls far behind, so memory stays bounded
        if self._handed - self._sealed_n <= self._sealer_pending_max:
            return
        with self._sealer_cond:
            while (self._handed - self._sealed_n > self._sealer_pending_max
                   and self._sealer_thread is not None and self._sealer_thread.is_alive()):
                self._sealer_cond.wait(0.05)

    def _open_segment(self) -> None:
        seq = self._next_seq
        path = storage.wal_path(self.root, self.stream, seq)
        now = datetime.now(UTC)
        # header first, under a name no reader lists, then rename: a segment is never
        # seen without its header
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o640)
        try:
            header = storage.wal_header(self.stream, seq, self._prev.hex(), now)
            os.write(fd, header)
            os.fdatasync(fd)
            os.rename(tmp, path)
            storage.fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            raise
        self._seg_fd = fd
        self._seg_seq = seq
        self._seg_records = 0
        self._seg_synced = len(header)
        self._seg_opened = time.monotonic()
        self._seg_date = now.strftime("%Y-%m-%d")
        self._next_seq = seq + 1
        self._sq.put(("open", seq, self._seg_date, self._prev.hex(), path))

    def _abandon_segment(self) -> None:
        if self._seg_fd is not None:
            try:
                os.close(self._seg_fd)
            except OSError:
                pass
            self._sq.put(("seal", self._seg_seq, None))
            self._seg_fd = None

    def _roll_segment(self, fut: concurrent.futures.Future | None) -> None:
        if self._seg_fd is None:
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        os.close(self._seg_fd)
        self._seg_fd = None
        self._sq.put(("seal", self._seg_seq, fut))

    def _maybe_roll(self, force: bool) -> None:
        if self._seg_fd is None:
            return
        if force or self._seg_records >= self.roll_records or (
                self.roll_seconds and time.monotonic() - self._seg_opened >= self.roll_seconds):
            self._roll_segment(None)

    # -- sealer thread --------------------------------------------------------------

    def _run_sealer(self) -> None:
        # background work: lower this thread's CPU priority (Linux: per thread; threads
        # it starts inherit it) so the event loop wins the CPU.
        # Not the writer: it holds the GIL, and a starved GIL holder stalls the loop.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SEALER_NICE)
        except (OSError, AttributeError):
            pass
        conv = _Converter(storage.wal_dir(self.root, self.stream) / ".convert.ndjson")
        sink: storage.ParquetSink | None = None
        wal_path: Path | None = None
        failed = False
        pushback: tuple | None = None
        get = self._sq.get
        while True:
            item = pushback if pushback is not None else get()
            pushback = None
            kind = item[0]
            try:
                if kind == "data":
                    chunks = list(item[2])
                    n = sum(c[3] for c in chunks)
                    # gather hand-offs into one conversion: fewer, larger DuckDB scans
                    while n < 65_536:
                        try:
                            nxt = self._sq.get_nowait()
                        except queue.Empty:
                            break
                        if nxt[0] != "data" or nxt[1] != item[1]:
                            pushback = nxt
                            break
                        chunks.extend(nxt[2])
                        n += sum(c[3] for c in nxt[2])
                    if sink is not None and not failed:
                        sink.add(conv.table(chunks, n))
                    with self._sealer_cond:
                        self._sealed_n += n
                        self._sealer_cond.notify_all()
                elif kind == "open":
                    _, seq, dt, first_prev, wal_path = item
                    sink = storage.ParquetSink(self.root, self.stream, seq, dt, first_prev)
                    failed = False
                elif kind == "seal":
                    _, seq, fut = item
                    out = None
                    if sink is not None and not failed and sink.records:
                        out = sink.seal()
                        self._sealed_files += 1
                        self._head_total += sink.records
                        storage.write_head(self.root, storage.Head(
                            stream=self.stream, seq=seq, last_hash=sink.last_hash,
                            records=self._head_total,
                            file=str(out.relative_to(self.root)),
                            updated=datetime.now(UTC).isoformat()))
                        if wal_path is not None:
                            wal_path.unlink(missing_ok=True)
                    elif sink is not None and not failed and wal_path is not None:
                        wal_path.unlink(missing_ok=True)
                    sink = None
                    wal_path = None
                    if fut is not None and not fut.done():
                        fut.set_result(out)
                elif kind == "stop":
                    if sink is not None:
                        sink.abort()
                    conv.close()
                    return
            except Exception as e:
                # the WAL segment stays on disk and is sealed at the next start
                self._errors += 1
                self._last_error = f"sealing segment failed: {type(e).__name__}: {e}"
                log.exception("audit: sealing a segment failed; its WAL is kept for recovery")
                if sink is not None:
                    sink.abort()
                failed = True
                if kind == "data":
                    with self._sealer_cond:
                        self._sealed_n += sum(c[3] for c in item[2])
                        self._sealer_cond.notify_all()
                if kind == "seal":
                    sink = None
                    wal_path = None
                    fut = item[2]
                    if fut is not None and not fut.done():
                        fut.set_exception(AuditError(self._last_error))


_encoder = msgspec.json.Encoder()


class _Converter:
    """Hashed content lines -> Arrow, in the sealer thread.

    Arrow's JSON reader parses without holding the GIL, so the event loop keeps running
    while a batch converts. (DuckDB's reader parses ~4x faster, but its Python API holds
    the GIL for the whole call: a 64k-record batch stalled the loop ~90 ms.) The lines
    were validated against the exact schema before they were hashed, so parsing cannot
    change a value.
    """

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch

    def table(self, chunks: list[tuple[bytes, bytes, bytes, int]], n: int) -> pa.Table:
        parts = []
        for i in range(0, len(chunks), 8):
            # ≈1 MB per parse: the join holds the GIL, the parse does not
            parts.append(storage.content_table(b"".join(c[0] for c in chunks[i:i + 8])))
        content = pa.concat_tables(parts)
        return storage.with_hashes(content, [(c[1], c[2], c[3]) for c in chunks])

    def close(self) -> None:
        pass


def _fix_ts(ts: object) -> object:
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            return ts.replace(tzinfo=UTC)
        return ts.astimezone(UTC)
    return ts       # not a datetime: validation fails and sanitize() stamps it


def _write_all(fd: int, bufs: list[bytes]) -> None:
    # writev in slices of at most IOV_MAX buffers, resuming after a short write
    i = 0
    n = len(bufs)
    while i < n:
        part = bufs[i:i + 1024]
        want = sum(len(b) for b in part)
        done = os.writev(fd, part)
        if done == want:
            i += len(part)
            continue
        # short write: finish this slice buffer by buffer
        for b in part:
            if done >= len(b):
                done -= len(b)
                continue
            mv = memoryview(b)[done:]
            done = 0
            while mv:
                k = os.write(fd, mv)
                mv = mv[k:]
        i += len(part)
