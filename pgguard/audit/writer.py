# The worker's side of the audit log: log() encodes records; batches go by pipe to a writer process.
"""Write audit records durably without stalling the event loop.

Where the work happens:

- ``log()`` / ``log_strict()`` run on the event loop: they encode the record (msgpack
  of its fields, ~0.5 µs) and append the bytes to a deque (plus a future in strict
  mode). Nothing else happens in the proxy per record.
- The *writer process* (``writerproc``, one per worker, started by ``start()``)
  validates, stamps, normalizes, hash-chains, group-commits to the WAL with fdatasync
  and seals segments into Parquet, then answers on a second pipe with the highest seq
  that is durable and the event ids strict records wait for.
- Moving bytes between the two, in one of two modes chosen at ``start()``:

  *loop mode* (``start()`` called on a running event loop, as the proxy does): the
  loop itself writes frames of up to 1000 records to the non-blocking pipe (a timer
  every ``flush_interval``, at once for strict records, or once ``wake_records`` are
  queued) and reads the answers with ``add_reader``. No thread of ours ever holds the
  GIL, so nothing can keep the loop waiting for it (helper threads did: a thread
  holding the GIL while the scheduler ran the writer on its CPU stalled the loop for
  milliseconds). Blocking calls (``flush``, ``roll``, ``close``) made on the loop's
  thread do their I/O inline, as the in-process writer did.

  *thread mode* (no running loop at ``start()``: tools, tests): a sender thread writes
  (the GIL is released while it blocks) and an ack thread reads the answers and
  resolves futures (on their own loop, with ``call_soon_threadsafe``).

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

After a crash, the writer turns the leftover WAL into Parquet before it accepts
records. If the writer process dies, records in flight are counted as dropped, strict
futures fail, and a new writer is started (at most once a second).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec

from ..config import AuditConfig, parse_duration
from . import ipc, storage
from .record import FIELDS, UTC, AuditRecord, sanitize
from .storage import AuditError
from .writerproc import Tip as _Tip, _fix_ts, recover  # noqa: F401  (re-exported)

log = logging.getLogger("pgguard.audit")

FRAME_RECORDS = 256             # most records per frame (one writev: at most IOV_MAX parts)
PUMP_FRAMES = 1                 # most frames the loop writes per callback (~0.1 ms each)
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
    uploaded: int = 0               # files uploaded to [audit] store
    upload_backlog: int = 0         # sealed files waiting for the store
    upload_error: str | None = None     # the last upload failure, None once one works


class _Flush:
    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future) -> None:
        self.future = future


class _Roll(_Flush):
    __slots__ = ()


class _Conn:
    """One writer process and our ends of its two pipes."""

    __slots__ = ("proc", "data_fd", "ack_fd", "buf", "clean", "exited")

    def __init__(self, proc: subprocess.Popen, data_fd: int, ack_fd: int,
                 buf: bytearray) -> None:
        self.proc = proc
        self.data_fd = data_fd
        self.ack_fd = ack_fd
        self.buf = buf                  # answer bytes not parsed yet
        self.clean = False              # it said goodbye (X) before its pipe closed
        self.exited = threading.Event()


def _resolve(items: list[tuple[Any, Any]]) -> None:
    # runs on the waiters' event loop
    for fut, value in items:
        if not fut.done():
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)


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
      once this many records are queued (at most a frame's worth, 1000: small frames
      keep the writer's bursts of work short);
    - ``switch_interval``: lower ``sys.setswitchinterval`` to this at start (``None``:
      leave it), so the event loop gets the GIL back quickly from the sender and ack
      threads of thread mode.
    """

    def __init__(self, cfg: AuditConfig, base_dir: str | os.PathLike[str] = ".", *,
                 stream: str = "w0", roll_records: int = 1_000_000,
                 roll_seconds: float = 60.0, group_records: int = 65_536,
                 wake_records: int = 8_192,
                 switch_interval: float | None = 0.0002,
                 instance: str | None = None, upload_drain: float = 10.0) -> None:
        d = Path(cfg.dir)
        self.root = d if d.is_absolute() else Path(base_dir) / d
        self.stream = storage.check_stream(stream)
        # [audit] store: the writer uploads sealed files to <store>/<instance>/
        self.store = cfg.store
        self.instance = instance or socket.gethostname()
        self.upload_drain = upload_drain
        self.strict = cfg.durability == "strict"
        self.capture_literals = cfg.capture_literals
        self.flush_interval = max(parse_duration(cfg.flush_interval), 0.001)
        self.queue_max = cfg.queue_max
        self.roll_records = roll_records
        self.roll_seconds = roll_seconds
        self.group_records = max(256, group_records)
        self.wake_records = wake_records
        self.switch_interval = switch_interval

        # hot path state
        self._q: deque = deque()
        # log() refuses (counts) at this queue length: queue_max in batched mode,
        # never in strict mode, always once closed
        self._limit = self.queue_max if not self.strict else sys.maxsize
        self._wake_n = max(1, min(wake_records, FRAME_RECORDS))
        self._enc = msgspec.msgpack.Encoder(decimal_format="number").encode
        self._event = threading.Event()     # thread mode: wakes the sender
        self._kick: Any = self._event.set
        self._dropped = 0               # batched overflow, written as audit_dropped
        self._late = 0                  # logged after close(): counted only
        self._errors = 0                # records that were not AuditRecords
        self._coerced = 0
        self._last_error: str | None = None
        self._started = False
        self._closed = False
        self._stopping = False
        self._abandoned = False
        # the sending side (sender thread, or the loop)
        self._sent = 0                  # seq of the last record sent
        self._dropped_sent = 0          # drops the writer has been told of
        self._drop_base = 0             # drops told to writers that died
        self._lost = 0                  # sent, never durable: the writer died
        self._roll_id = 0
        # sending and answering sides (under _wlock)
        self._wlock = threading.Lock()
        self._waiters: deque = deque()  # (seq, future, strict) in seq order
        self._rolls: dict[int, concurrent.futures.Future] = {}
        self._durable = 0
        self._wstats = ipc.WriterStats()
        self._dead: str | None = None   # why the writer process is gone
        self._conn: _Conn | None = None
        self._respawn_at = 0.0
        self._sender: threading.Thread | None = None
        # loop mode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_tid = 0
        self._out: list = []            # frame parts the pipe did not take yet
        self._out_frames: deque = deque()   # [bytes left, records] of each frame in _out
        self._writing = False           # add_writer is registered
        self._pump_soon = False         # a _pump callback is scheduled
        self._timer: asyncio.TimerHandle | None = None
        self._respawning = False
        self._sq = _StopHook(self)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer process (it recovers leftover WAL of this stream and of any
        unlocked one first), then the sending side: the running event loop if there is
        one (loop mode), else a sender and an ack thread.

        Blocking; call before serving. Raises ``AuditError`` if another process holds
        this stream or the directory is not writable.
        """
        if self._started:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AuditError(f"audit directory {self.root}: {e.strerror or e}") from None
        conn = self._spawn_process()
        if self.switch_interval is not None and sys.getswitchinterval() > self.switch_interval:
            sys.setswitchinterval(self.switch_interval)
        self._started = True
        loop = asyncio._get_running_loop()
        if loop is not None:
            self._loop = loop
            self._loop_tid = threading.get_ident()
            self._kick = self._kick_loop
            self._attach_loop(conn)
            self._timer = loop.call_later(self.flush_interval, self._tick)
        else:
            self._attach_thread(conn)
            self._sender = threading.Thread(
                target=self._run_sender, name=f"pgguard-audit-sender-{self.stream}",
                daemon=True)
            self._sender.start()

    def close(self, timeout: float | None = None) -> None:
        """Commit everything queued, seal the open segment into Parquet, stop the writer
        process and the threads.

        Blocking (seconds for a large backlog). Idempotent. Example: ``audit.close()``.
        """
        if not self._started or self._closed:
            return
        self._shutdown(timeout)

    def _shutdown(self, timeout: float | None) -> None:
        self._closed = True
        self._limit = -1
        self._stopping = True
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._loop is None:
            self._event.set()
            assert self._sender is not None
            self._sender.join(timeout)
            conn = self._conn
            if conn is not None and not conn.exited.wait(_left(deadline)):
                log.error("audit: close timed out; unsealed records stay in the WAL and "
                          "are recovered at the next start")
        else:
            self._detach_loop(deadline)
            self._finish_sync(deadline)
        err = AuditError("the audit log closed before this record was written")
        # what was not sent (logged during close) is counted, never silent
        n, rest = self._empty_queue(err)
        self._late += n
        with self._wlock:
            rest += [(w[1], err) for w in self._waiters]
            self._waiters.clear()
            rest += [(f, err) for f in self._rolls.values()]
            self._rolls.clear()
        self._settle(rest)
        conn = self._conn
        if conn is not None and conn.exited.is_set():
            conn.proc.wait()

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
        if record.__class__ is _rec:
            self.log_row(_astuple(record))
            return
        n = len(self._q)
        if n >= self._limit:
            self._overflow()
            return
        self._append_other(record, None)
        if n == self._wake_n:
            self._kick()

    def log_row(self, row: tuple) -> None:
        """``log`` for a record given as its fields in order (what
        ``msgspec.structs.astuple`` of an ``AuditRecord`` gives): the statement path
        builds rows from cached parts instead of building records."""
        q = self._q
        n = len(q)
        if n >= self._limit:
            self._overflow()
            return
        try:
            q.append(self._enc(row))
        except Exception:
            self._append_slow(AuditRecord(**dict(zip(FIELDS, row))), None)
        if n == self._wake_n:
            self._kick()

    def log_encoded(self, row: bytes) -> None:
        """``log_row`` for a row encoded by the caller: the msgpack array of the
        record's fields in order, exactly what ``log_row`` would encode (the statement
        tracker assembles it from parts encoded once per session and per statement
        shape). The writer validates it like any other row."""
        q = self._q
        n = len(q)
        if n >= self._limit:
            self._overflow()
            return
        q.append(row)
        if n == self._wake_n:
            self._kick()

    def encoded_queue(self) -> tuple[deque, int]:
        """The queue ``log_encoded`` appends to and the length at which it wakes the
        sender: the compiled statement tracker appends its rows itself, taking the same
        steps as ``log_encoded`` (refused and counted by ``_overflow`` at ``_limit``,
        ``_kick`` at ``_wake_n``) without a Python call per statement."""
        return self._q, self._wake_n

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
        if loop is not None and loop is self._loop:
            # every strict record of this loop iteration goes in one write
            if not self._pump_soon:
                self._pump_soon = True
                loop.call_soon(self._pump)
        else:
            self._kick()
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
        self._wait(fut, timeout)

    def roll(self, timeout: float | None = None) -> Path | None:
        """Block until everything logged so far is in a sealed Parquet file; return it
        (``None`` if there was nothing to seal)."""
        if self._closed or not self._started:
            return None
        self.flush(timeout)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.append(_Roll(fut))
        out = self._wait(fut, timeout)
        return Path(out) if out else None

    def _wait(self, fut: concurrent.futures.Future, timeout: float | None) -> Any:
        if self._loop is not None and (threading.get_ident() == self._loop_tid
                                       or not self._loop.is_running()):
            # the loop cannot serve us while we block it (or it is not running): do
            # the I/O here
            deadline = None if timeout is None else time.monotonic() + timeout
            self._send_sync(deadline)
            self._answers_sync(fut.done, deadline)
            if not fut.done():
                raise TimeoutError("audit: the writer did not answer in time")
            return fut.result()
        self._kick()
        return fut.result(timeout)

    def stats(self) -> AuditStats:
        """Counters; cheap, any thread. Example: ``audit.stats().dropped``."""
        w = self._wstats
        return AuditStats(
            dropped=self._dropped + self._late + self._lost, written=w.written,
            queue_depth=len(self._q) + max(0, self._sent - self._durable),
            sealed_files=w.sealed_files, fsyncs=w.fsyncs, last_fsync_us=w.last_fsync_us,
            max_fsync_us=w.max_fsync_us, coerced=self._coerced + w.coerced,
            errors=self._errors + w.errors, last_error=w.last_error or self._last_error,
            stream=self.stream, segment_seq=w.segment_seq, uploaded=w.uploaded,
            upload_backlog=w.upload_backlog, upload_error=w.upload_error)

    def health(self) -> str | None:
        """``None`` when healthy, else the last write error (for /healthz)."""
        if self._dead is not None and not self._closed:
            return f"audit writer process: {self._dead}"
        w = self._wstats
        return w.last_error if w.failing else None

    # -- frames -------------------------------------------------------------------------

    def _take(self) -> list[list[bytes]]:
        # frames for up to FRAME_RECORDS queued items, their waiters registered
        q = self._q
        n = min(len(q), FRAME_RECORDS)
        items = list(islice(iter(q.popleft, None), n))
        self._dropped_sent = self._dropped + self._lost
        dropped = self._dropped_sent - self._drop_base
        try:
            # the usual case: only batched records (bytes.__len__ refuses anything else)
            size = sum(map(bytes.__len__, items))
        except TypeError:
            return self._take_mixed(items, dropped)
        first = self._sent + 1
        self._sent += n
        # no join: writev gathers the records' bytes
        return [_records_frame(first, n, dropped, [], items, size)]

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
                    frames.append(_records_frame(first, len(parts), dropped, strict, parts,
                                                 sum(map(len, parts))))
                    parts, strict, first = [], [], seq + 1
                self._roll_id += 1
                with self._wlock:
                    self._rolls[self._roll_id] = it.future
                frames.append([ipc.frame(ipc.K_ROLL, ipc.U32.pack(self._roll_id))])
        if parts or not frames:
            frames.append(_records_frame(first, len(parts), dropped, strict, parts,
                                         sum(map(len, parts))))
        self._sent = seq
        done = []
        with self._wlock:
            for w in waiters:
                if w[0] <= self._durable and not w[2]:
                    done.append((w[1], None))
                else:
                    self._waiters.append(w)
        if done:
            self._settle(done)
        return frames

    def _more(self) -> bool:
        return bool(self._q) or self._dropped + self._lost != self._dropped_sent

    # -- the writer process -------------------------------------------------------------

    def _spawn_process(self) -> _Conn:
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
            flush_interval=self.flush_interval, data_fd=data_r, ack_fd=ack_w,
            parent_pid=os.getpid(), store=self.store, instance=self.instance,
            upload_drain=self.upload_drain)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable or "python3", "-c", _WRITER_MAIN,
                 msgspec.json.encode(cfg).decode()],
                pass_fds=(data_r, ack_w), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, env=env,
                # its own process group (a terminal's ^C is not for it; it stops when
                # its input ends), but the worker's session: Linux's autogroup
                # scheduling shares the CPU between sessions, and a session of its
                # own would make the writer an equal of the whole proxy, whatever its
                # niceness
                process_group=0)
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
        return _Conn(proc, data_w, ack_r, buf)

    def _reset_for(self, conn: _Conn) -> None:
        # a new writer process: what the dead one was sent is settled (_writer_died)
        self._conn = conn
        self._dead = None
        with self._wlock:
            self._durable = self._sent
        self._drop_base = self._dropped_sent

    def _on_answer(self, conn: _Conn, kind: int, body: bytes) -> None:
        if kind == ipc.A_DURABLE:
            self._acked(msgspec.msgpack.decode(body, type=ipc.Ack))
        elif kind == ipc.A_ROLLED:
            r = msgspec.msgpack.decode(body, type=ipc.Rolled)
            self._wstats = r.stats
            with self._wlock:
                fut = self._rolls.pop(r.request, None)
            if fut is not None:
                self._settle([(fut, AuditError(r.error) if r.error else r.path)])
        elif kind == ipc.A_EXIT:
            self._wstats = msgspec.msgpack.decode(body, type=ipc.WriterStats)
            conn.clean = True

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
            self._settle(done)

    def _conn_ended(self, conn: _Conn) -> None:
        # the answer pipe reached end of file: the writer exited
        try:
            code: int | None = conn.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        try:
            os.close(conn.ack_fd)
        except OSError:
            pass
        if not conn.clean:
            self._writer_died(conn, f"exited with status {code}")
        conn.exited.set()

    def _writer_died(self, conn: _Conn, why: str) -> None:
        err = AuditError(f"the audit writer process {why}")
        with self._wlock:
            lost = self._sent - self._durable
            failed = [(w[1], err) for w in self._waiters]
            self._waiters.clear()
            failed += [(f, err) for f in self._rolls.values()]
            self._rolls.clear()
        self._dead = why
        if self._abandoned or (self._stopping and not lost and not failed):
            return
        self._lost += max(0, lost)
        log.error("audit: the writer process %s; %d records in flight lost", why, lost)
        self._settle(failed)
        self._kick()

    def _settle(self, items: list[tuple[Any, Any]]) -> None:
        # resolve futures: our loop's at once when we are on it, other loops' through
        # call_soon_threadsafe
        here = self._loop if threading.get_ident() == self._loop_tid else None
        by_loop: dict[Any, list] = {}
        for fut, value in items:
            if isinstance(fut, concurrent.futures.Future) or (
                    here is not None and fut.get_loop() is here):
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

    # -- thread mode --------------------------------------------------------------------

    def _attach_thread(self, conn: _Conn) -> None:
        self._reset_for(conn)
        threading.Thread(target=self._run_acks, args=(conn,),
                         name=f"pgguard-audit-acks-{self.stream}", daemon=True).start()

    def _run_sender(self) -> None:
        event = self._event
        interval = self.flush_interval
        while True:
            event.wait(interval)
            event.clear()
            stopping = self._stopping
            while self._more():
                if self._dead is not None and not self._respawn_thread():
                    self._discard()
                    break
                conn = self._conn
                assert conn is not None
                try:
                    for parts in self._take():
                        _writev_all(conn.data_fd, parts)
                except OSError as e:        # EPIPE: the writer process is gone
                    if self._dead is None:
                        self._dead = f"cannot send records: {e.strerror or e}"
            if stopping:
                break
        conn = self._conn
        if conn is not None:
            if self._dead is None and not self._abandoned:
                try:
                    _writev_all(conn.data_fd, [ipc.frame(ipc.K_CLOSE)])
                except OSError:
                    pass
            try:
                os.close(conn.data_fd)
            except OSError:
                pass

    def _run_acks(self, conn: _Conn) -> None:
        try:
            while True:
                kind, body = _read_frame(conn.ack_fd, conn.buf)
                if kind < 0:
                    break
                self._on_answer(conn, kind, body)
        finally:
            self._conn_ended(conn)

    def _respawn_thread(self) -> bool:
        # the writer process died: start a new one (it recovers the WAL the old one
        # left); retried at most once a second
        if self._stopping or time.monotonic() < self._respawn_at:
            return False
        self._respawn_at = time.monotonic() + 1.0
        old = self._conn
        if old is not None:
            old.exited.wait(5)
            try:
                os.close(old.data_fd)
            except OSError:
                pass
        try:
            conn = self._spawn_process()
        except AuditError as e:
            log.error("audit: cannot restart the writer process: %s", e)
            return False
        self._attach_thread(conn)
        log.warning("audit: writer process restarted")
        return True

    def _discard(self) -> None:
        # the writer is gone and cannot be restarted now: what is queued is lost
        # (counted); strict and flush waiters fail
        err = AuditError(f"the audit writer is not running: {self._dead}")
        n, failed = self._empty_queue(err)
        self._lost += n
        self._settle(failed)

    def _empty_queue(self, err: Exception) -> tuple[int, list[tuple[Any, Any]]]:
        # take everything queued: how many records it held, and its waiters (strict
        # records, flushes, rolls) paired with err
        q = self._q
        n = 0
        failed: list[tuple[Any, Any]] = []
        while q:
            it = q.popleft()
            if it.__class__ is bytes:
                n += 1
            elif it.__class__ is tuple:
                n += 1
                failed.append((it[1], err))
            elif isinstance(it, _Flush):
                failed.append((it.future, err))
        return n, failed

    # -- loop mode ----------------------------------------------------------------------

    def _attach_loop(self, conn: _Conn) -> None:
        assert self._loop is not None
        self._reset_for(conn)
        self._out.clear()
        self._out_frames.clear()
        self._writing = False
        os.set_blocking(conn.data_fd, False)
        os.set_blocking(conn.ack_fd, False)
        self._loop.add_reader(conn.ack_fd, self._on_readable, conn)

    def _kick_loop(self) -> None:
        # any thread: have the loop send soon
        if not self._pump_soon:
            self._pump_soon = True
            try:
                self._loop.call_soon_threadsafe(self._pump)  # type: ignore[union-attr]
            except RuntimeError:        # the loop is closed: flush()/close() do the I/O
                self._pump_soon = False

    def _tick(self) -> None:
        if not self._stopping:
            self._timer = self._loop.call_later(self.flush_interval, self._tick)  # type: ignore
            self._pump()

    def _pump(self) -> None:
        # on the loop: write queued records, a few frames per callback
        self._pump_soon = False
        if self._stopping:
            return                      # close() does the rest on its own thread
        if self._dead is not None:
            self._respawn_loop()
            return
        if self._out or self._conn is None:
            return                      # the pipe is full; _on_writable continues
        for _ in range(PUMP_FRAMES):
            if not self._more():
                return
            for parts in self._take():
                self._push(parts)
            if not self._write_out():
                return
        if self._more() and not self._pump_soon:
            self._pump_soon = True
            self._loop.call_soon(self._pump)        # type: ignore[union-attr]

    def _write_out(self) -> bool:
        # non-blocking; True when everything pending was written
        conn = self._conn
        assert conn is not None
        out = self._out
        try:
            self._sent_bytes(_writev_some(conn.data_fd, out))
        except OSError as e:            # EPIPE: the writer process is gone
            out.clear()
            self._out_frames.clear()
            if self._dead is None:
                self._dead = f"cannot send records: {e.strerror or e}"
        if out and not self._writing:
            self._loop.add_writer(conn.data_fd, self._on_writable)  # type: ignore
            self._writing = True
        elif not out and self._writing:
            self._loop.remove_writer(conn.data_fd)          # type: ignore[union-attr]
            self._writing = False
        return not out

    def _push(self, parts: list) -> None:
        # a frame into _out; its records are counted until its last byte is written
        n = 0
        if parts[0][4] == ipc.K_RECORDS:
            n = ipc.RECS.unpack_from(parts[0], ipc.HEAD.size)[1]
        self._out.extend(parts)
        self._out_frames.append([sum(map(len, parts)), n])

    def _sent_bytes(self, done: int) -> None:
        frames = self._out_frames
        while done and frames:
            f = frames[0]
            k = min(done, f[0])
            f[0] -= k
            done -= k
            if not f[0]:
                frames.popleft()

    def _unsent_records(self) -> int:
        # records of frames not (completely) written: the writer never gets them
        n = sum(f[1] for f in self._out_frames)
        self._out.clear()
        self._out_frames.clear()
        return n

    def _on_writable(self) -> None:
        if not self._stopping and self._write_out():
            self._pump()

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = os.read(conn.ack_fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(conn.ack_fd)           # type: ignore[union-attr]
            if self._writing:
                self._loop.remove_writer(conn.data_fd)      # type: ignore[union-attr]
                self._writing = False
            self._unsent_records()      # counted by _writer_died (sent, not durable)
            self._conn_ended(conn)
            return
        conn.buf += data
        for kind, body in _frames(conn.buf):
            self._on_answer(conn, kind, body)

    def _respawn_loop(self) -> None:
        # start a new writer in a helper thread (spawning and recovery take a while);
        # the loop attaches it when it is ready
        if self._respawning or self._stopping:
            return
        self._respawning = True
        delay = max(0.0, self._respawn_at - time.monotonic())
        self._respawn_at = time.monotonic() + delay + 1.0
        old = self._conn

        def run() -> None:
            conn = None
            try:
                if old is not None:
                    old.exited.wait(5)
                    try:
                        os.close(old.data_fd)
                    except OSError:
                        pass
                time.sleep(delay)
                conn = self._spawn_process()
            except AuditError as e:
                log.error("audit: cannot restart the writer process: %s", e)
            try:
                self._loop.call_soon_threadsafe(self._respawned, conn)  # type: ignore
            except RuntimeError:
                if conn is not None:
                    os.close(conn.data_fd)

        threading.Thread(target=run, name=f"pgguard-audit-respawn-{self.stream}",
                         daemon=True).start()

    def _respawned(self, conn: _Conn | None) -> None:
        self._respawning = False
        if conn is None:
            self._discard()
            return
        if self._stopping:
            os.close(conn.data_fd)          # it sees end of file and exits
            return
        self._attach_loop(conn)
        log.warning("audit: writer process restarted")
        self._pump()

    def _detach_loop(self, deadline: float | None) -> None:
        # stop the loop's part (timer, reader, writer), from whichever thread closes
        loop = self._loop
        assert loop is not None

        def detach() -> None:
            if self._timer is not None:
                self._timer.cancel()
            conn = self._conn
            if conn is not None and not conn.exited.is_set():
                loop.remove_reader(conn.ack_fd)
                if self._writing:
                    loop.remove_writer(conn.data_fd)
            self._writing = False

        if loop.is_closed():
            return
        if threading.get_ident() == self._loop_tid or not loop.is_running():
            detach()
            return
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                detach()
            finally:
                done.set_result(None)
        try:
            loop.call_soon_threadsafe(run)
            done.result(_left(deadline))
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass

    # -- blocking I/O on the calling thread (loop mode: close, flush on the loop) ----

    def _send_sync(self, deadline: float | None = None) -> bool:
        # loop mode, on the calling thread: write what is pending and queued, waiting
        # for room in the pipe until deadline at most; False when out of time
        conn = self._conn
        if conn is None or self._dead is not None:
            if self._dead is not None:
                self._discard()
            return True
        fd = conn.data_fd
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        out = self._out
        try:
            while True:
                if not out:
                    if not self._more():
                        break
                    for parts in self._take():
                        self._push(parts)
                self._sent_bytes(_writev_some(fd, out))
                if out:
                    left = _left(deadline)
                    if left is not None and left <= 0:
                        return False
                    poller.poll(None if left is None else int(left * 1000) + 1)
        except OSError as e:
            self._unsent_records()      # counted when the writer is found dead
            if self._dead is None:
                self._dead = f"cannot send records: {e.strerror or e}"
        finally:
            if self._writing and self._loop is not None and not self._loop.is_closed():
                self._loop.remove_writer(fd)
                self._writing = False
        return True

    def _answers_sync(self, until: Any, deadline: float | None) -> None:
        # read and handle answers here until until() is true or the writer exits
        conn = self._conn
        if conn is None or conn.exited.is_set():
            return
        poller = select.poll()
        poller.register(conn.ack_fd, select.POLLIN)
        while not until():
            left = _left(deadline)
            if left is not None and left <= 0:
                return
            if not poller.poll(None if left is None else int(left * 1000) + 1):
                continue
            try:
                data = os.read(conn.ack_fd, 1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self._conn_ended(conn)
                return
            conn.buf += data
            for kind, body in _frames(conn.buf):
                self._on_answer(conn, kind, body)

    def _finish_sync(self, deadline: float | None) -> None:
        # close in loop mode: send the rest and C, then read answers until the writer
        # has sealed and exited
        conn = self._conn
        sent = self._send_sync(deadline)
        if conn is None:
            return
        if sent and self._dead is None and not self._abandoned:
            # without C (out of time, or abandoned) the writer commits what it has and
            # leaves the open segment to the next start
            self._push([ipc.frame(ipc.K_CLOSE)])
            self._send_sync(deadline)
        unsent = self._unsent_records()
        try:
            os.close(conn.data_fd)
        except OSError:
            pass
        self._answers_sync(conn.exited.is_set, deadline)
        if not conn.exited.is_set():
            # still writing: it commits what it received, not what we could not send
            self._lost += unsent
            log.error("audit: close timed out (%d records not handed over); unsealed "
                      "records stay in the WAL and are recovered at the next start", unsent)


class _StopHook:
    """``log._sq.put(("stop",))`` stops the writer without sealing its open segment,
    as if the proxy had died (tests use it to leave a WAL segment behind; the name is
    that of the sealer queue of the in-process writer this replaced)."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    def put(self, item: tuple) -> None:
        a = self._audit
        if item and item[0] == "stop" and a._started and not a._abandoned:
            a._abandoned = True
            a._shutdown(None)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _records_frame(first: int, count: int, dropped: int, strict: list[int],
                   rows: list[bytes], size: int) -> list[bytes]:
    head = ipc.RECS.pack(first, count, dropped, len(strict)) + \
        b"".join(ipc.U32.pack(i) for i in strict) + ipc.ARRAY32 + count.to_bytes(4, "big")
    rows.insert(0, ipc.HEAD.pack(len(head) + size, ipc.K_RECORDS) + head)
    return rows


def _writev_all(fd: int, parts: list) -> None:
    # all of parts (at most IOV_MAX of them) to a blocking fd, resuming after a short
    # write; the GIL is released while it blocks
    want = sum(map(len, parts))
    done = os.writev(fd, parts)
    if done == want:
        return
    for p in parts:
        if done >= len(p):
            done -= len(p)
            continue
        mv = memoryview(p)[done:]
        done = 0
        while mv:
            mv = mv[os.write(fd, mv):]


def _writev_some(fd: int, out: list) -> int:
    # as much of out as a non-blocking fd takes now, removed from out; bytes written
    total = 0
    while out:
        chunk = out[:1024]
        want = sum(map(len, chunk))
        try:
            done = os.writev(fd, chunk)
        except BlockingIOError:
            return total
        total += done
        if done == want:
            del out[:len(chunk)]
            continue
        i = 0
        while done >= len(out[i]):
            done -= len(out[i])
            i += 1
        del out[:i]
        out[0] = memoryview(out[0])[done:]
        return total
    return total


def _frames(buf: bytearray) -> list[tuple[int, bytes]]:
    # the complete frames at the start of buf, removed from it
    head = ipc.HEAD
    out = []
    pos = 0
    while len(buf) - pos >= head.size:
        blen, kind = head.unpack_from(buf, pos)
        end = pos + head.size + blen
        if end > len(buf):
            break
        out.append((kind, bytes(buf[pos + head.size:end])))
        pos = end
    del buf[:pos]
    return out


def _read_frame(fd: int, buf: bytearray) -> tuple[int, bytes]:
    # the next frame from a blocking fd; (-1, b"") at end of file
    while True:
        got = _frames_one(buf)
        if got is not None:
            return got
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno == errno.EBADF:
                return -1, b""
            raise
        if not chunk:
            return -1, b""
        buf += chunk


def _frames_one(buf: bytearray) -> tuple[int, bytes] | None:
    head = ipc.HEAD
    if len(buf) >= head.size:
        blen, kind = head.unpack_from(buf)
        end = head.size + blen
        if len(buf) >= end:
            body = bytes(buf[head.size:end])
            del buf[:end]
            return kind, body
    return None
