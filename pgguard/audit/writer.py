# The audit log as a proxy worker sees it: log() encodes a record into a queue; a sender
# thread pipes batches to this worker's audit writer process, which acknowledges them.
"""Write audit records durably without stalling the event loop.

Where the work happens:

- ``log()`` / ``log_strict()`` run on the event loop: they encode the record (msgpack
  of its fields, ~0.5 µs) and append the bytes to a deque (plus a future in strict
  mode). Nothing else happens in the proxy per record.
- A *sender* thread wakes every ``flush_interval`` (at once for strict records, or once
  ``wake_records`` are queued), joins what is queued into one frame and writes it to a
  pipe: the GIL is held only to join the bytes, never during the write.
- The *writer process* (``writerproc``, one per worker, started by ``start()``)
  validates, stamps, normalizes, hash-chains, group-commits to the WAL with fdatasync
  and seals segments into Parquet, then answers on a second pipe with the highest seq
  that is durable and the event ids strict records wait for.
- An *ack* thread reads those answers and resolves futures (on their own loop, with
  ``call_soon_threadsafe``).

Durability:

- ``batched`` (default): records reach the writer within ``flush_interval`` and are
  committed at once: a crash of the proxy loses at most the records logged during the
  last flush interval (the writer process outlives its worker and commits everything
  already sent; a crash of the machine adds the commit time). When the queue holds
  ``queue_max`` records (the writer stopped keeping up), ``log()`` drops the record,
  counts it (``stats().dropped``), and the writer writes an ``audit_dropped`` record
  with the count into the chain: drops are never silent, and the event loop never
  blocks on the disk.
- ``strict``: ``await log_strict(record)`` returns once the record is fsynced. Records
  of concurrent sessions share one fsync (group commit). Nothing is dropped; a slow
  disk slows the sessions that wait (backpressure).

After a crash, starting the writer turns the leftover WAL into Parquet before it
accepts records. If the writer process dies, records in flight are counted as dropped,
strict futures fail, and ``start`` of a new writer is retried by the sender thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec

from ..config import AuditConfig, parse_duration
from . import ipc, storage
from .record import AuditRecord
from .storage import AuditError
from .writerproc import Tip as _Tip, _fix_ts, recover  # noqa: F401  (re-exported)

log = logging.getLogger("pgguard.audit")

FRAME_RECORDS = 2048            # most records per frame sent to the writer
PIPE_BYTES = 1 << 20            # data pipe capacity asked for (Linux F_SETPIPE_SZ)
_PKG_ROOT = str(Path(__file__).resolve().parents[2])
_astuple = msgspec.structs.astuple
# not "-m pgguard.audit.writerproc": the package imports that module first, and runpy
# would run it a second time as __main__
_WRITER_MAIN = "import sys; from pgguard.audit.writerproc import main; sys.exit(main())"


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


class _Flush:
    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future) -> None:
        self.future = future


class _Roll(_Flush):
    __slots__ = ()


def _resolve(items: list[tuple[Any, Any]]) -> None:
    # runs on the waiters' event loop
    for fut, value in items:
        if not fut.done():
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)


def _settle(items: list[tuple[Any, Any]]) -> None:
    by_loop: dict[Any, list] = {}
    for fut, value in items:
        if isinstance(fut, concurrent.futures.Future):
            if not fut.done():
                if isinstance(value, BaseException):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        else:
            by_loop.setdefault(fut.get_loop(), []).append((fut, value))
    for loop, its in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, its)
        except RuntimeError:        # that loop is closed; nobody is waiting any more
            pass


class AuditLog:
    """The audit log of one worker process (one *stream* of the hash chain).

    Example::

        audit = AuditLog(cfg.audit, cfg.base_dir)   # stream="w0"; one per worker
        audit.start()                               # starts the writer process, which
                                                    # recovers leftover WAL first
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
    - ``wake_records``: in batched mode, send to the writer before the flush interval
      once this many records are queued;
    - ``switch_interval``: lower ``sys.setswitchinterval`` to this at start (``None``:
      leave it), so the event loop gets the GIL back quickly from the sender and ack
      threads (they hold it for microseconds, but a busy loop would make them wait the
      whole interval for it).
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
        self.group_records = max(256, group_records)
        self.wake_records = wake_records
        self.switch_interval = switch_interval

        # hot path state (event loop side)
        self._q: deque = deque()
        # log() refuses (counts) at this queue length: queue_max in batched mode,
        # never in strict mode, always once closed
        self._limit = self.queue_max if not self.strict else sys.maxsize
        self._enc = msgspec.msgpack.Encoder(decimal_format="number").encode
        self._kick = threading.Event()
        self._dropped = 0               # batched overflow, written as audit_dropped
        self._late = 0                  # logged after close(): counted only
        self._errors = 0                # records that were not AuditRecords
        self._coerced = 0
        self._last_error: str | None = None
        self._started = False
        self._closed = False
        self._stopping = False
        # sender thread
        self._sent = 0                  # seq of the last record sent
        self._dropped_sent = 0          # drops the writer has been told of
        self._drop_base = 0             # drops told to writers that died
        self._lost = 0                  # sent, never durable: the writer died
        self._roll_id = 0
        # sender + ack threads (under _wlock)
        self._wlock = threading.Lock()
        self._waiters: deque = deque()  # (seq, future, strict) in seq order
        self._rolls: dict[int, concurrent.futures.Future] = {}
        self._durable = 0
        self._wstats = ipc.WriterStats()
        self._dead: str | None = None   # why the writer process is gone
        self._exited = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._data_fd = -1
        self._ack_fd = -1
        self._sender: threading.Thread | None = None
        self._acker: threading.Thread | None = None
        self._respawn_at = 0.0
        self._abandoned = False
        self._sq = _StopHook(self)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer process (it recovers leftover WAL of this stream and of any
        unlocked one first), then the sender and ack threads.

        Blocking; call before serving. Raises ``AuditError`` if another process holds
        this stream or the directory is not writable.
        """
        if self._started:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AuditError(f"audit directory {self.root}: {e.strerror or e}") from None
        self._spawn()
        if self.switch_interval is not None and sys.getswitchinterval() > self.switch_interval:
            sys.setswitchinterval(self.switch_interval)
        self._started = True
        self._sender = threading.Thread(
            target=self._run_sender, name=f"pgguard-audit-sender-{self.stream}", daemon=True)
        self._sender.start()

    def _spawn(self) -> None:
        # the writer gets the read end of the data pipe and the write end of the ack
        # pipe, nothing else (close_fds): none of the proxy's sockets
        data_r, data_w = os.pipe()
        ack_r, ack_w = os.pipe()
        try:
            fcntl.fcntl(data_w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
        except OSError:
            pass
        cfg = ipc.WriterConfig(
            root=str(self.root), stream=self.stream, strict=self.strict,
            capture_literals=self.capture_literals, roll_records=self.roll_records,
            roll_seconds=self.roll_seconds, group_records=self.group_records,
            data_fd=data_r, ack_fd=ack_w, parent_pid=os.getpid())
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable or "python3", "-c", _WRITER_MAIN,
                 msgspec.json.encode(cfg).decode()],
                pass_fds=(data_r, ack_w), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as e:
            for fd in (data_r, data_w, ack_r, ack_w):
                os.close(fd)
            raise AuditError(f"cannot start the audit writer process: {e}") from None
        os.close(data_r)
        os.close(ack_w)
        # the handshake: recovery runs first; then "started" or why not
        buf = bytearray()
        kind, body = _read_frame(ack_r, buf)
        if kind != ipc.A_STARTED:
            os.close(data_w)
            os.close(ack_r)
            code = proc.wait()
            if kind == ipc.A_ERROR:
                raise AuditError(msgspec.msgpack.decode(body)[0])
            raise AuditError(f"the audit writer process exited ({code}) before it started; "
                             f"see its errors above")
        msgspec.msgpack.decode(body, type=ipc.Started)
        self._proc = proc
        self._data_fd = data_w
        self._ack_fd = ack_r
        self._dead = None
        self._exited.clear()
        self._acker = threading.Thread(
            target=self._run_acks, args=(ack_r, buf, proc),
            name=f"pgguard-audit-acks-{self.stream}", daemon=True)
        self._acker.start()

    def close(self, timeout: float | None = None) -> None:
        """Commit everything queued, seal the open segment into Parquet, stop the writer
        process and the threads.

        Blocking (seconds for a large backlog). Idempotent. Example: ``audit.close()``.
        """
        if not self._started or self._closed:
            return
        self._closed = True
        self._limit = -1
        self._stopping = True
        self._kick.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        assert self._sender is not None
        self._sender.join(timeout)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._exited.wait(left):
            log.error("audit: close timed out; unsealed records stay in the WAL and are "
                      "recovered at the next start")
        err = AuditError("the audit log closed before this record was written")
        # what the sender did not send (logged during close) is counted, never silent
        rest = []
        q = self._q
        while q:
            it = q.popleft()
            if it.__class__ is bytes:
                self._late += 1
            elif it.__class__ is tuple:
                self._late += 1
                rest.append((it[1], err))
            elif isinstance(it, _Flush):
                rest.append((it.future, err))
        with self._wlock:
            rest += [(w[1], err) for w in self._waiters]
            self._waiters.clear()
            rest += [(f, err) for f in self._rolls.values()]
            self._rolls.clear()
        _settle(rest)
        if self._exited.is_set() and self._proc is not None:
            self._proc.wait()

    def __enter__(self) -> AuditLog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- event loop side (hot: keep these tiny) --------------------------------------

    def log(self, record: AuditRecord, _rec: type = AuditRecord,
            _astuple: Any = _astuple) -> None:
        """Enqueue *record*. O(1), never blocks, callable from any thread.

        Batched mode with a full queue (``queue_max``): the record is dropped and
        counted. The record is encoded at once; the caller may reuse it afterwards.
        """
        q = self._q
        n = len(q)
        if n >= self._limit:
            self._overflow()
            return
        if record.__class__ is _rec:
            try:
                q.append(self._enc(_astuple(record)))
            except Exception:
                self._append_slow(record, None)
        else:
            self._append_other(record, None)
        if n == self.wake_records:
            self._kick.set()

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
        if self._dead is not None:
            fut.set_exception(AuditError(f"the audit writer is not running: {self._dead}"))
            return fut
        if record.__class__ is AuditRecord:
            try:
                self._q.append((self._enc(_astuple(record)), fut))
            except Exception:
                self._append_slow(record, fut)
        else:
            self._append_other(record, fut)
        if not self._kick.is_set():
            self._kick.set()
        return fut

    def _overflow(self) -> None:
        if self._closed:
            if not self._late:
                log.warning("audit: record logged after close(); dropped (counted in stats)")
            self._late += 1
        else:
            self._dropped += 1

    def _append_slow(self, record: AuditRecord, fut: Any) -> None:
        # a value msgpack cannot carry (an int beyond 64 bits, a lone surrogate, an
        # unknown type): coerce here, noted in the record's error column
        from .record import sanitize
        from datetime import datetime
        from .record import UTC
        fixed = sanitize(record, datetime.now(UTC))
        self._coerced += 1
        log.warning("audit: 1 malformed record(s) coerced (see their error column)")
        data = self._enc(_astuple(fixed))
        self._q.append(data if fut is None else (data, fut))

    def _append_other(self, record: Any, fut: Any) -> None:
        if isinstance(record, AuditRecord):         # a subclass: keep our fields
            rec = AuditRecord(**{f: getattr(record, f) for f in AuditRecord.__struct_fields__})
            try:
                data = self._enc(_astuple(rec))
            except Exception:
                self._append_slow(rec, fut)
                return
            self._q.append(data if fut is None else (data, fut))
            return
        self._errors += 1
        self._last_error = f"not an AuditRecord: {type(record).__name__}"
        log.error("audit: ignoring a logged %s (log() takes AuditRecord)",
                  type(record).__name__)
        if fut is not None:
            fut.set_exception(AuditError(self._last_error))

    # -- blocking helpers (tests, CLI, shutdown) --------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Block until every record logged before this call is fsynced in the WAL."""
        if self._closed or not self._started:
            return
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.append(_Flush(fut))
        self._kick.set()
        fut.result(timeout)

    def roll(self, timeout: float | None = None) -> Path | None:
        """Block until everything logged so far is in a sealed Parquet file; return it
        (``None`` if there was nothing to seal)."""
        if self._closed or not self._started:
            return None
        self.flush(timeout)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.append(_Roll(fut))
        self._kick.set()
        out = fut.result(timeout)
        return Path(out) if out else None

    def stats(self) -> AuditStats:
        """Counters; cheap, any thread. Example: ``audit.stats().dropped``."""
        w = self._wstats
        return AuditStats(
            dropped=self._dropped + self._late + self._lost, written=w.written,
            queue_depth=len(self._q) + max(0, self._sent - self._durable),
            sealed_files=w.sealed_files, fsyncs=w.fsyncs, last_fsync_us=w.last_fsync_us,
            max_fsync_us=w.max_fsync_us, coerced=self._coerced + w.coerced,
            errors=self._errors + w.errors, last_error=w.last_error or self._last_error,
            stream=self.stream, segment_seq=w.segment_seq)

    def health(self) -> str | None:
        """``None`` when healthy, else the last write error (for /healthz)."""
        if self._dead is not None and not self._closed:
            return f"audit writer process: {self._dead}"
        w = self._wstats
        return w.last_error if w.failing else None

    # -- sender thread ----------------------------------------------------------------

    def _run_sender(self) -> None:
        q = self._q
        kick = self._kick
        interval = self.flush_interval
        while True:
            kick.wait(interval)
            kick.clear()
            stopping = self._stopping
            while q or self._dropped + self._lost != self._dropped_sent:
                if self._dead is not None and not self._respawn():
                    self._discard()
                    break
                self._send(self._take())
            if stopping:
                break
        if self._dead is None and not self._abandoned:
            self._send([[ipc.frame(ipc.K_CLOSE)]])
        try:
            os.close(self._data_fd)
        except OSError:
            pass

    def _take(self) -> list[list[bytes]]:
        # frames for up to FRAME_RECORDS queued items, waiters registered
        q = self._q
        n = min(len(q), FRAME_RECORDS)
        items = list(islice(iter(q.popleft, None), n))
        self._dropped_sent = self._dropped + self._lost
        dropped = self._dropped_sent - self._drop_base
        try:
            body = b"".join(items)          # the usual case: only batched records
        except TypeError:
            return self._take_mixed(items, dropped)
        first = self._sent + 1
        self._sent += n
        return [_records_frame(first, n, dropped, [], body)]

    def _take_mixed(self, items: list, dropped: int) -> list[list[bytes]]:
        frames: list[list[bytes]] = []
        parts: list[bytes] = []
        strict: list[int] = []
        waiters: list[tuple[int, Any, bool]] = []
        first = self._sent + 1
        seq = self._sent
        for it in items:
            cls = it.__class__
            if cls is bytes:
                parts.append(it)
                seq += 1
            elif cls is tuple:
                parts.append(it[0])
                seq += 1
                strict.append(seq - first)
                waiters.append((seq, it[1], True))
            elif cls is _Flush:
                waiters.append((seq, it.future, False))
            elif cls is _Roll:
                if parts:
                    frames.append(_records_frame(first, len(parts), dropped, strict,
                                                 b"".join(parts)))
                    parts, strict, first = [], [], seq + 1
                self._roll_id += 1
                with self._wlock:
                    self._rolls[self._roll_id] = it.future
                frames.append([ipc.frame(ipc.K_ROLL, ipc.U32.pack(self._roll_id))])
        if parts or not frames:
            frames.append(_records_frame(first, len(parts), dropped, strict,
                                         b"".join(parts)))
        self._sent = seq
        done = []
        with self._wlock:
            for w in waiters:
                if w[0] <= self._durable and not w[2]:
                    done.append((w[1], None))
                else:
                    self._waiters.append(w)
        if done:
            _settle(done)
        return frames

    def _send(self, frames: list[list[bytes]]) -> None:
        # the GIL is released while os.writev blocks on a full pipe
        try:
            for parts in frames:
                _writev_all(self._data_fd, parts)
        except OSError as e:            # EPIPE: the writer process is gone
            if self._dead is None:
                self._dead = f"cannot send records: {e.strerror or e}"

    def _discard(self) -> None:
        # the writer is gone and cannot be restarted now: what is queued is lost
        # (counted); strict and flush waiters fail
        q = self._q
        err = AuditError(f"the audit writer is not running: {self._dead}")
        failed = []
        while q:
            it = q.popleft()
            if it.__class__ is bytes:
                self._lost += 1
            elif it.__class__ is tuple:
                self._lost += 1
                failed.append((it[1], err))
            elif isinstance(it, _Flush):
                failed.append((it.future, err))
        _settle(failed)

    def _respawn(self) -> bool:
        # the writer process died: start a new one (it recovers the WAL the old one
        # left); retried at most once a second
        if self._stopping or time.monotonic() < self._respawn_at:
            return False
        self._respawn_at = time.monotonic() + 1.0
        self._exited.wait(5)
        try:
            os.close(self._data_fd)
        except OSError:
            pass
        try:
            self._spawn()
        except AuditError as e:
            log.error("audit: cannot restart the writer process: %s", e)
            return False
        err = AuditError("the audit writer process died before this record was written")
        with self._wlock:
            failed = [(w[1], err) for w in self._waiters]
            self._waiters.clear()
            self._durable = self._sent
        _settle(failed)
        self._drop_base = self._dropped_sent
        log.warning("audit: writer process restarted")
        return True

    # -- ack thread -------------------------------------------------------------------

    def _run_acks(self, fd: int, buf: bytearray, proc: subprocess.Popen) -> None:
        clean = False
        dec_ack = msgspec.msgpack.Decoder(ipc.Ack)
        dec_roll = msgspec.msgpack.Decoder(ipc.Rolled)
        dec_stats = msgspec.msgpack.Decoder(ipc.WriterStats)
        try:
            while True:
                kind, body = _read_frame(fd, buf)
                if kind < 0:
                    break
                if kind == ipc.A_DURABLE:
                    self._acked(dec_ack.decode(body))
                elif kind == ipc.A_ROLLED:
                    r = dec_roll.decode(body)
                    self._wstats = r.stats
                    with self._wlock:
                        fut = self._rolls.pop(r.request, None)
                    if fut is not None:
                        _settle([(fut, AuditError(r.error) if r.error else r.path)])
                elif kind == ipc.A_EXIT:
                    self._wstats = dec_stats.decode(body)
                    clean = True
        finally:
            os.close(fd)
            code = proc.wait()
            if not clean:
                self._writer_died(f"exited with status {code}")
            self._exited.set()

    def _acked(self, ack: ipc.Ack) -> None:
        self._wstats = ack.stats
        if not ack.durable:
            return
        eids = dict(ack.eids) if ack.eids else None
        failed = set(ack.failed) if ack.failed else ()
        done = []
        with self._wlock:
            if ack.durable > self._durable:
                self._durable = ack.durable
            w = self._waiters
            while w and w[0][0] <= ack.durable:
                seq, fut, strict = w.popleft()
                if not strict:
                    done.append((fut, None))
                elif eids is not None and seq in eids and seq not in failed:
                    done.append((fut, eids[seq]))
                else:
                    done.append((fut, AuditError("the audit writer could not write this "
                                                 "record")))
        if done:
            _settle(done)

    def _writer_died(self, why: str) -> None:
        err = AuditError(f"the audit writer process {why}")
        with self._wlock:
            lost = self._sent - self._durable
            failed = [(w[1], err) for w in self._waiters]
            self._waiters.clear()
            failed += [(f, err) for f in self._rolls.values()]
            self._rolls.clear()
        if self._stopping and not lost and not failed:
            return
        self._lost += max(0, lost)
        self._dead = why
        log.error("audit: the writer process %s; %d records in flight lost", why, lost)
        _settle(failed)
        self._kick.set()


class _StopHook:
    """``log._sq.put(("stop",))`` stops the writer without sealing its open segment,
    as if the proxy had died (tests use it to leave a WAL segment behind; the name is
    that of the sealer queue of the in-process writer this replaced)."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    def put(self, item: tuple) -> None:
        a = self._audit
        if item and item[0] == "stop" and a._started:
            a._abandoned = a._stopping = a._closed = True
            a._limit = -1
            a._kick.set()
            if a._sender is not None:
                a._sender.join()
            a._exited.wait()


def _records_frame(first: int, count: int, dropped: int, strict: list[int],
                   body: bytes) -> list[bytes]:
    head = ipc.RECS.pack(first, count, dropped, len(strict)) + \
        b"".join(ipc.U32.pack(i) for i in strict) + ipc.ARRAY32 + count.to_bytes(4, "big")
    return [ipc.HEAD.pack(len(head) + len(body), ipc.K_RECORDS) + head, body]


def _writev_all(fd: int, parts: list[bytes]) -> None:
    done = os.writev(fd, parts)
    if done == sum(len(p) for p in parts):
        return
    for p in parts:                     # a short write: finish part by part
        if done >= len(p):
            done -= len(p)
            continue
        mv = memoryview(p)[done:]
        done = 0
        while mv:
            mv = mv[os.write(fd, mv):]


def _read_frame(fd: int, buf: bytearray) -> tuple[int, bytes]:
    # the next frame from the ack pipe (blocking); (-1, b"") at end of file
    head = ipc.HEAD
    while True:
        if len(buf) >= head.size:
            blen, kind = head.unpack_from(buf)
            end = head.size + blen
            if len(buf) >= end:
                body = bytes(buf[head.size:end])
                del buf[:end]
                return kind, body
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            return -1, b""
        buf += chunk
