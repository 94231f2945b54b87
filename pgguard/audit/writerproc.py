# The audit writer process (one per worker): hash-chains records into the WAL, seals Parquet.
"""The process behind ``AuditLog`` (``AuditLog.start`` runs ``main`` with a JSON
``ipc.WriterConfig``; pass it the read end of the data pipe and the write end of the
ack pipe).

Everything that costs CPU per record happens here, so the proxy's event loop never
waits for it: the worker only encodes each record (msgpack) and writes batches into a
pipe (see ``ipc``). About 3 µs of CPU per record (1.5 in the main thread, the rest in
the sealer), against ~1.5 µs left in the worker.

Threads:

- *main*: reads frames from the data pipe. The compiled transcoder
  (``pgguard._core.auditline``) checks each row's types, stamps ``event_id`` (and
  ``ts`` when missing), normalizes the statement (cached), writes the canonical JSON
  line, chains its hash, and appends the values to Arrow column buffers, in one pass;
  a frame holding anything it will not judge (a type to coerce, invalid text) goes
  through msgspec instead (``_decode``/``_encode``), which coerces and reports. The
  lines go to the open WAL segment, ``fdatasync``ed once per group of frames read
  together (group commit), then the worker is answered with the highest durable seq
  and the event ids its strict records wait for. In batched mode it runs at nice 10
  and looks at the pipe every few milliseconds rather than blocking on it (see
  ``Writer.run``); in strict mode it blocks, at the default priority.
- *sealer*: turns the committed records into Arrow tables (the transcoder's columns as
  they are; the msgspec path's lines through DuckDB's JSON reader, without the GIL,
  or Arrow's as a fallback), writes the segment's Parquet file under a temporary name,
  and when the segment closes (``roll_records``, ``roll_seconds``, a new UTC day, a
  roll request) publishes it in ``dt=YYYY-MM-DD/``, moves the chain head, and deletes
  the WAL segment.

Lifetime: the process holds the stream's lock (``_wal/<stream>/lock``) from before
recovery to exit. When its worker dies, the data pipe reaches end of file: the writer
commits every complete frame it received, leaves the open segment in the WAL (the next
start seals it) and exits. A new writer for the stream waits for such a draining
predecessor instead of refusing the stream. It ignores SIGINT/SIGTERM/SIGHUP: it stops
when its input ends, never in the middle of it.
"""
from __future__ import annotations

import errno
import fcntl
import gc
import json
import logging
import operator
import os
import queue
import secrets
import select
import signal
import sys
import threading
import time
from binascii import hexlify
from datetime import datetime
from itertools import starmap
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa

from .._core.auditline import Transcoder, event_id
from . import ipc, storage, store as objstore
from .record import (CONTENT_FIELDS, CONTENT_SCHEMA, EVENT_AUDIT_DROPPED, FIELDS, GENESIS,
                     UTC, AuditRecord, prepare_statement, sanitize)
from .storage import AuditError

log = logging.getLogger("pgguard.audit")

FRAME_RECORDS = 4096        # records per WAL frame
READ_BYTES = 4 << 20        # most bytes read from the data pipe per group
WRITER_NICE = 10            # CPU niceness of the main thread in batched mode (see run)
SEALER_NICE = 15            # CPU niceness of the sealer thread
POLL_SLEEP = 0.002          # batched mode: pause between looks at an empty pipe
BATCH_PAUSE = 0.005         # batched mode: pause after a read that was not a full one
SEAL_BATCH = 65_536         # records per conversion to Arrow
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_T2 = [_CROCKFORD[i >> 5] + _CROCKFORD[i & 31] for i in range(1024)]
_STMT_CACHE_MAX = 20_000
# the statement caches hold texts of at most 8 KiB; bound them by bytes too: the
# Transcoder's by entries (its texts are as short), ours by the bytes it holds
_TX_CACHE_MAX = 2048
_STMT_CACHE_BYTES = 16 << 20

# a row's canonical content: the first 24 wire fields, positionally; None is omitted,
# so it encodes to exactly the bytes of record._Content
_Line = msgspec.defstruct("_Line", [(n, object, None) for n in CONTENT_FIELDS],
                          omit_defaults=True, gc=False)
_CONTENT_OF = operator.itemgetter(slice(0, len(CONTENT_FIELDS)))
_TS_OF = operator.itemgetter(FIELDS.index("ts"))
_STMT_OF = operator.itemgetter(FIELDS.index("statement"))
_ROWS = msgspec.msgpack.Decoder(list[ipc.WireRow])        # type: ignore[valid-type]
_ANY = msgspec.msgpack.Decoder()
_lines = msgspec.json.Encoder().encode_lines
assert FIELDS[:len(CONTENT_FIELDS)] == CONTENT_FIELDS


def _wire_spec() -> bytes:
    # what each wire field is, for the compiled transcoder (see auditline.Transcoder)
    kinds = []
    for name in FIELDS:
        t = ipc.TYPES.get(name)
        if name == "event_id":
            kinds.append("E")
        elif name == "ts":
            kinds.append("T")
        elif name not in CONTENT_FIELDS:
            kinds.append("X")
        elif name == "statement":
            kinds.append("Q")
        elif t is str:
            kinds.append("R")
        elif t is None:
            kinds.append("s")
        elif name in ("relations", "flags"):
            kinds.append("L")
        else:
            kinds.append("I")
    return "".join(kinds).encode()


WIRE_SPEC = _wire_spec()


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_CROCKFORD[n & 31])
        n >>= 5
    return "".join(reversed(out))


# -- the stream lock -------------------------------------------------------------------

def _holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 512, 0) or b"null")
    except (OSError, ValueError):
        return None


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _worth_waiting(holder: dict | None, since: float) -> bool:
    # a writer whose worker died, or that was told to close, drains and exits; a
    # recovery by another worker ends soon; an unknown or live holder means the stream
    # is in use
    if holder is None:
        return time.monotonic() - since < 1.0       # it may not have written its name yet
    if holder.get("role") in ("recover", "draining"):
        return True
    pid, parent = holder.get("pid"), holder.get("parent")
    if not isinstance(pid, int) or not isinstance(parent, int):
        return False
    ppid = _parent_of(pid)
    if ppid is not None:
        return ppid != parent
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def lock_stream(root: Path, stream: str, *, role: str, parent: int,
                wait: float) -> int | None:
    """Take the stream's lock (``None`` if a live process holds it). Waits up to *wait*
    seconds for a holder that is about to let go (see ``_worth_waiting``)."""
    d = storage.wal_dir(root, stream)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    t0 = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() - t0 > wait or not _worth_waiting(_holder(fd), t0):
                os.close(fd)
                return None
            time.sleep(0.02)
    set_role(fd, role, parent)
    return fd


def set_role(fd: int, role: str, parent: int) -> None:
    """Say in the lock file who holds it and why (read by ``_worth_waiting``)."""
    me = json.dumps({"pid": os.getpid(), "parent": parent, "role": role}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, me, 0)


# -- recovery --------------------------------------------------------------------------

class Tip(msgspec.Struct):
    seq: int            # last sealed (or recovered) segment
    hash: str           # chain hash after it
    records: int        # records in the chain so far


def recover(root: Path, stream: str) -> Tip:
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
    # with [audit] store, sealed files leave the local dir once uploaded: up to this
    # seq the store has them
    up = objstore.read_uploaded(root, stream)
    up_seq = up.seq if up else 0
    records = head.records if head else 0
    if head is None and files:
        records = sum(storage.pq.read_metadata(f.path).num_rows for f in files.values())
    if head is None and up is not None:
        records = up.records + sum(storage.pq.read_metadata(f.path).num_rows
                                   for f in files.values() if f.seq > up_seq)

    def set_head(seq: int, last: str, path: Path, total: int) -> storage.Head:
        h = storage.Head(stream=stream, seq=seq, last_hash=last, records=total,
                         file=str(path.relative_to(root)),
                         updated=datetime.now(UTC).isoformat())
        storage.write_head(root, h)
        return h

    for seq, path in storage.list_wal(root, stream):
        if seq in files or seq <= up_seq:
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
    if head is None and up is not None and up_seq >= pmax:
        # the local head was lost, the store's record of the chain was not
        head = set_head(up_seq, up.last_hash, objstore.uploaded_path(root, stream),
                        up.records)
        return Tip(seq=up_seq, hash=up.last_hash, records=up.records)
    if head is not None and head.seq >= max(pmax, up_seq):
        if head.seq > max(pmax, up_seq):
            log.error("audit: stream %s: head names seq %d but the last file is seq %d; "
                      "files are missing (verify will name them)", stream, head.seq, pmax)
        return Tip(seq=head.seq, hash=head.last_hash, records=head.records)
    if pmax:
        # the head update of the last seal was lost in a crash (or the head was deleted)
        last, _ = storage.last_hash_of(files[pmax].path)
        head = set_head(pmax, last, files[pmax].path, records)
        return Tip(seq=pmax, hash=last, records=records)
    return Tip(seq=0, hash=GENESIS, records=0)


# -- answers to the worker -------------------------------------------------------------

class _Answers:
    """The ack pipe; written by the main and the sealer thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.gone = False           # the worker closed its end (it died)
        self._enc = msgspec.msgpack.Encoder()

    def send(self, kind: int, body: object) -> None:
        data = ipc.frame(kind, self._enc.encode(body))
        with self.lock:
            if self.gone:
                return
            try:
                mv = memoryview(data)
                while mv:
                    mv = mv[os.write(self.fd, mv):]
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.EBADF):
                    log.error("audit: cannot answer the worker: %s", e)
                self.gone = True


# -- the writer ------------------------------------------------------------------------

class _Group:
    """Records hashed but not yet committed: one writev + fdatasync."""

    __slots__ = ("frames", "handoff", "prev", "count", "last_seq", "eids", "failed")

    def __init__(self, prev: bytes, last_seq: int) -> None:
        self.frames: list[bytes] = []
        self.handoff: list[tuple] = []      # for the sealer: see _Converter.tables
        self.prev = prev                # chain digest after the group's last record
        self.count = 0
        self.last_seq = last_seq        # highest worker seq covered by the group
        self.eids: list[tuple[int, str]] = []
        self.failed: list[int] = []


class Writer:
    def __init__(self, cfg: ipc.WriterConfig, answers: _Answers, tip: Tip,
                 lock_fd: int = -1) -> None:
        self.cfg = cfg
        self._lock_fd = lock_fd
        self.root = Path(cfg.root)
        self.stream = cfg.stream
        self.raw = cfg.capture_literals
        self.roll_records = cfg.roll_records
        self.roll_seconds = cfg.roll_seconds
        self.group_records = cfg.group_records
        self.answers = answers
        self.stats = ipc.WriterStats()
        # chain and segments
        self._prev = bytes.fromhex(tip.hash)
        self._next_seq = tip.seq + 1
        self._head_total = tip.records
        self._seg_fd: int | None = None
        self._seg_seq = 0
        self._seg_records = 0
        self._seg_opened = 0.0
        self._seg_date = ""
        self._seg_synced = 0
        self._retry: _Group | None = None
        # input
        self._seq = 0                   # highest seq received from the worker
        self._durable = 0               # highest seq acknowledged as durable
        self._dropped_seen = 0
        self._group: _Group | None = None
        self._scratch = memoryview(bytearray(1 << 20))      # read buffer: a pipe's worth
        # event ids
        self._ctr = 0
        self._last_ms = 0
        self._rand = _b32(secrets.randbits(40), 8)
        self._stmt_cache: dict[Any, Any] = {None: None}
        self._stmt_bytes = 0
        self._tx = Transcoder(WIRE_SPEC, FIELDS, self._prepare, _TX_CACHE_MAX)
        self._tx_parts: list[tuple[bytes, bytes, int]] = []    # hashes of its columns
        # sealer hand-off
        self._sq: queue.SimpleQueue = queue.SimpleQueue()
        self._handed = 0
        self._sealed_n = 0
        self._sealer_cond = threading.Condition()
        self._sealer_pending_max = 262_144
        self._sealer = threading.Thread(target=self._run_sealer, name="audit-sealer",
                                        daemon=True)
        # [audit] store: uploads sealed files from its own thread (see store.Uploader)
        self._uploader: objstore.Uploader | None = None
        if cfg.store:
            me = cfg.parent_pid
            self._uploader = objstore.Uploader(
                objstore.Store.open(cfg.store), self.root, cfg.instance, self.stream,
                try_lock=lambda s: lock_stream(self.root, s, role="recover", parent=me,
                                               wait=0),
                on_pass=self._report_uploads)

    # -- main loop --------------------------------------------------------------------

    def run(self) -> int:
        # no reference cycles are made per record: automatic collection would only
        # rescan the decoded rows (~0.4 µs a record); a full pass runs after each seal
        gc.disable()
        # Batched mode: the worker's event loop comes first. This thread runs at a
        # lower priority, and it sleeps between looks at the pipe instead of blocking
        # on it: a blocking reader is woken by each write the loop makes, onto the
        # loop's CPU, and measured to keep the loop off the CPU for milliseconds
        # (perf sched). Strict mode: sessions wait for this thread; it blocks on the
        # pipe and keeps the default priority.
        strict = self.cfg.strict
        if not strict:
            _nice(WRITER_NICE)
        pause = busy_pause = 0.0
        self._sealer.start()
        if self._uploader is not None:
            self._uploader.start()      # first: what recovery sealed, a backlog
        fd = self.cfg.data_fd
        inbuf = bytearray()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        eof = closing = False
        backoff = 0.0
        failures = 0
        while True:
            if self._retry is not None or self._group is not None:
                # one group commit for everything handled since the last one; after a
                # failed write, retry with backoff (the worker's queue holds the rest)
                if backoff:
                    time.sleep(backoff)
                try:
                    self._commit()
                    backoff = 0.0
                    failures = 0
                except OSError:
                    backoff = min(max(backoff * 2, 0.05), 1.0)
                    failures += 1
                    if eof and failures > 10:
                        log.error("audit: giving up: the WAL keeps what was committed and "
                                  "is recovered at the next start")
                        break
                    continue
            self._maybe_roll(force=False)
            pos, ctl = self._handle(inbuf)
            del inbuf[:pos]
            if self._group is not None:
                continue
            if ctl is not None:
                if ctl < 0:
                    closing = True
                    self._draining()
                    break
                self._roll_segment(ctl)
                continue
            if pos:
                continue
            if eof:
                break
            # wait for input, at most until the open segment is due to roll
            timeout = -1
            if self._seg_fd is not None and self.roll_seconds:
                timeout = max(1, int((self._seg_opened + self.roll_seconds
                                      - time.monotonic()) * 1000) + 1)
            if strict:
                if poller.poll(timeout):
                    eof = self._read(fd, inbuf, poller)
                continue
            if busy_pause:
                # let more arrive: one group commit (one fdatasync) then covers several
                # of the worker's writes, not one each
                time.sleep(busy_pause)
                busy_pause = 0.0
            if poller.poll(0):
                eof = self._read(fd, inbuf, poller)
                if len(inbuf) < READ_BYTES // 2:
                    busy_pause = min(BATCH_PAUSE, self.cfg.flush_interval / 4)
                pause = 0.0
                continue
            # nothing there: look again soon, later and later while idle (at most a
            # quarter of the flush interval, the loss window batched mode promises)
            pause = min(max(pause * 2, POLL_SLEEP), self.cfg.flush_interval / 4)
            if timeout >= 0:
                pause = min(pause, timeout / 1000)
            time.sleep(pause)
        self._finish(clean=closing and self._retry is None)
        return 0

    def _draining(self) -> None:
        # no more input will come: a new writer for the stream may wait for us
        if self._lock_fd >= 0:
            try:
                set_role(self._lock_fd, "draining", self.cfg.parent_pid)
            except OSError:
                pass

    def _read(self, fd: int, inbuf: bytearray, poller: select.poll) -> bool:
        # all that is available now, up to READ_BYTES; a frame cut by the pipe's
        # capacity is completed with blocking reads (the worker writes frames whole)
        # (os.readv into one reused buffer: os.read would allocate, and the kernel zero,
        # a fresh buffer of the size asked for at every call)
        scratch = self._scratch
        while len(inbuf) < _read_limit(inbuf):
            try:
                n = os.readv(fd, [scratch])
            except InterruptedError:
                continue
            if not n:
                self._draining()
                return True
            inbuf += scratch[:n]
            if not poller.poll(0) and _complete(inbuf):
                break
        return False

    def _handle(self, inbuf: bytearray) -> tuple[int, int | None]:
        # Handle the complete frames at the start of inbuf, up to a group's worth of
        # records. A control frame ends the batch: it is taken only when no records wait
        # for their commit (a roll or close covers everything sent before it).
        # Returns (bytes consumed, None | roll request id | -1 for close).
        pos = 0
        n = len(inbuf)
        head = ipc.HEAD
        mv = memoryview(inbuf)
        try:
            while pos + head.size <= n:
                blen, kind = head.unpack_from(inbuf, pos)
                end = pos + head.size + blen
                if end > n:
                    break
                if kind == ipc.K_RECORDS:
                    self._records(mv[pos + head.size:end])
                    pos = end
                    if self._group is not None and self._group.count >= self.group_records:
                        break
                    continue
                if self._group is not None:
                    break
                if kind == ipc.K_ROLL:
                    return end, ipc.U32.unpack_from(inbuf, pos + head.size)[0]
                if kind == ipc.K_CLOSE:
                    return end, -1
                raise AuditError(f"unknown frame kind {kind} from the worker")
        finally:
            mv.release()
        return pos, None

    # -- records ------------------------------------------------------------------------

    def _records(self, body: memoryview) -> None:
        first, count, dropped, nstrict = ipc.RECS.unpack_from(body)
        off = ipc.RECS.size
        strict = [ipc.U32.unpack_from(body, off + 4 * i)[0] for i in range(nstrict)]
        off += 4 * nstrict
        if self._seq and first != self._seq + 1 and count:
            log.error("audit: records %d..%d from the worker are missing", self._seq + 1,
                      first - 1)
        if dropped > self._dropped_seen:
            self._note_drops(dropped - self._dropped_seen)
            self._dropped_seen = dropped
        if not count:
            return
        self._seq = first + count - 1
        g = self._group
        if g is None:
            g = self._group = _Group(self._prev, self._durable)
        got = self._encode_wire(body[off:], count, g)
        if got is not None:
            pre, base = got
            g.last_seq = self._seq
            for i in strict:
                g.eids.append((first + i, event_id(pre, base + i + 1)))
            return
        rows = self._decode(body[off:], count)
        if len(rows) != count:          # undecodable frame: nothing to stamp
            g.failed.extend(first + i for i in strict)
            g.last_seq = self._seq
            return
        eids = self._encode(rows, g)
        g.last_seq = self._seq
        for i in strict:
            g.eids.append((first + i, eids[i]))

    def _note_drops(self, n: int) -> None:
        log.warning("audit: queue full: %d records dropped", n)
        rec = AuditRecord(session_id="", event=EVENT_AUDIT_DROPPED, rows=n,
                          ts=datetime.now(UTC),
                          error=f"audit queue full (queue_max reached): {n} records dropped")
        g = self._group
        if g is None:
            g = self._group = _Group(self._prev, self._durable)
        self._encode([msgspec.structs.astuple(rec)], g)

    def _decode(self, payload: memoryview, count: int) -> list:
        try:
            return _ROWS.decode(payload)
        except msgspec.ValidationError:
            pass
        except msgspec.DecodeError as e:
            self._error(f"undecodable records from the worker: {e}")
            return []
        return self._decode_slow(payload)

    def _decode_slow(self, payload: memoryview) -> list:
        # some row has a wrong type: convert row by row, coercing (and noting) the bad ones
        try:
            items = _ANY.decode(payload)
        except msgspec.DecodeError as e:
            self._error(f"undecodable records from the worker: {e}")
            return []
        out = []
        bad = 0
        now = datetime.now(UTC)
        ts_at = FIELDS.index("ts")
        for it in items:
            if isinstance(it, list) and len(it) == len(FIELDS):
                ts = it[ts_at]
                if isinstance(ts, str):         # a naive datetime travels as text
                    try:
                        ts = msgspec.convert(ts, datetime)
                        it[ts_at] = _fix_ts(ts)
                    except msgspec.ValidationError:
                        pass
                try:
                    out.append(msgspec.convert(it, ipc.WireRow))
                    continue
                except msgspec.ValidationError:
                    pass
                rec = AuditRecord(**dict(zip(FIELDS, it)))
            else:
                rec = AuditRecord(session_id="", event="", error=f"unreadable record {it!r:.200}")
            bad += 1
            out.append(msgspec.structs.astuple(sanitize(rec, now)))
        if bad:
            self.stats.coerced += bad
            log.warning("audit: %d malformed record(s) coerced (see their error column)", bad)
        return out

    def _encode_wire(self, payload: memoryview, count: int,
                     g: _Group) -> tuple[bytes, int] | None:
        # the compiled path of _decode + _encode, straight from the worker's msgpack:
        # None when some value needs the checks and coercions of the msgspec path;
        # otherwise (event id prefix, counter before the first row)
        pre = self._eid_prefix().encode()
        chunks = self._tx.lines(payload, count, pre, self._ctr, time.time_ns() // 1000,
                                g.prev, FRAME_RECORDS)
        if chunks is None:
            return None
        prev = g.prev
        parts = self._tx_parts
        for blob, digests, n in chunks:
            last = digests[len(digests) - 32:]
            g.frames.append(storage.wal_frame_header(blob, n, last))
            g.frames.append(blob)
            parts.append((hexlify(digests), hexlify(prev), n))
            prev = last
        g.prev = prev
        g.count += count
        base = self._ctr
        self._ctr += count
        return pre, base

    def _take_columns(self, g: _Group) -> None:
        # what the transcoder built since the last take goes to the sealer as columns
        # (in order with the lines of the msgspec path)
        if self._tx_parts:
            n, cols = self._tx.take()
            g.handoff.append(("cols", n, cols, self._tx_parts))
            self._tx_parts = []

    def _encode(self, rows: list, g: _Group) -> list[str]:
        # stamp, normalize and hash *rows* into group g; return their event ids
        self._take_columns(g)
        n = len(rows)
        lines = list(starmap(_Line, map(_CONTENT_OF, rows)))
        ts = list(map(_TS_OF, rows))
        if None in ts:
            now = datetime.now(UTC)
            for ln, t in zip(lines, ts):
                if t is None:
                    ln.ts = now
        stmts = list(map(_STMT_OF, rows))
        cache = self._stmt_cache
        try:
            norm = list(map(cache.__getitem__, stmts))
        except KeyError:
            norm = [self._prepare(s) for s in stmts]
        if norm != stmts:
            for ln, s in zip(lines, norm):
                ln.statement = s
        eids = self._event_ids(n)
        for ln, e in zip(lines, eids):
            ln.event_id = e
        prev = g.prev
        for i in range(0, n, FRAME_RECORDS):
            blob = _lines(lines[i:i + FRAME_RECORDS])
            parts = blob.split(b"\n")
            parts.pop()
            ds = storage.chain_lines(prev, parts)
            g.frames.append(storage.wal_frame_header(blob, len(parts), ds[-1]))
            g.frames.append(blob)
            g.handoff.append(("lines", len(parts), blob, hexlify(b"".join(ds)),
                              hexlify(prev)))
            prev = ds[-1]
        g.prev = prev
        g.count += n
        return eids

    def _prepare(self, s: Any) -> Any:
        cache = self._stmt_cache
        if s in cache:
            return cache[s]
        ns = prepare_statement(s, self.raw)
        if len(s) <= 8192:          # a long text is likely unique: the cache stays small
            self._stmt_bytes += len(s) + len(ns) + 120
            if len(cache) >= _STMT_CACHE_MAX or self._stmt_bytes > _STMT_CACHE_BYTES:
                cache.clear()
                cache[None] = None
                self._stmt_bytes = len(s) + len(ns) + 120
            cache[s] = ns
        return ns

    def _eid_prefix(self) -> str:
        # event ids are time-sortable and unique: 10 chars of ms, 8 random (this
        # writer), 8 of a counter
        ms = time.time_ns() // 1_000_000
        if ms < self._last_ms:
            ms = self._last_ms          # the clock stepped back: ids stay monotonic
        self._last_ms = ms
        return _b32(ms, 10) + self._rand

    def _event_ids(self, n: int) -> list[str]:
        pre = self._eid_prefix()
        T2 = _T2
        c = self._ctr
        end = c + n
        out: list[str] = []
        while c < end:
            x = c + 1
            hi = pre + T2[(x >> 30) & 1023] + T2[(x >> 20) & 1023] + T2[(x >> 10) & 1023]
            lo = x & 1023
            k = min(end - c, 1024 - lo)
            out += map(hi.__add__, T2[lo:lo + k])
            c += k
        self._ctr = end
        return out

    def _error(self, msg: str) -> None:
        self.stats.errors += 1
        self.stats.last_error = msg
        log.error("audit: %s", msg)

    # -- commit -------------------------------------------------------------------------

    def _commit(self) -> None:
        g = self._retry
        if g is None:
            g = self._group
            self._group = None
            if g is None:
                return
            self._take_columns(g)
            if self._seg_fd is not None and g.count and (
                    self._seg_records >= self.roll_records
                    or datetime.now(UTC).strftime("%Y-%m-%d") != self._seg_date):
                self._roll_segment(None)
        if g.count:
            if self._seg_fd is None:
                self._retry = g
                self._open_segment()
            self._retry = g
            fd = self._seg_fd
            assert fd is not None
            try:
                _write_all(fd, g.frames)
                t0 = time.perf_counter_ns()
                os.fdatasync(fd)
                us = (time.perf_counter_ns() - t0) // 1000
            except OSError as e:
                self.stats.errors += 1
                self.stats.last_error = f"WAL write failed: {e}"
                self.stats.failing = True
                log.error("audit: WAL write to segment %d failed: %s; retrying",
                          self._seg_seq, e)
                try:
                    os.ftruncate(fd, self._seg_synced)
                except OSError:
                    # cannot take back a partial frame: continue in a fresh segment
                    self._abandon_segment()
                self._ack(None)
                raise
            st = self.stats
            st.failing = False
            self._seg_synced += sum(len(f) for f in g.frames)
            st.fsyncs += 1
            st.last_fsync_us = us
            if us > st.max_fsync_us:
                st.max_fsync_us = us
            self._prev = g.prev
            self._seg_records += g.count
            st.written += g.count
            self._handed += g.count
            self._sq.put(("data", self._seg_seq, g.handoff))
        self._retry = None
        self._durable = max(self._durable, g.last_seq)
        self._ack(g)
        if g.count:
            self._sealer_backpressure()

    def _ack(self, g: _Group | None) -> None:
        self.stats.segment_seq = self._seg_seq
        self.answers.send(ipc.A_DURABLE, ipc.Ack(
            self._durable, g.eids if g else [], g.failed if g else [], self.stats))

    def _sealer_backpressure(self) -> None:
        # the sealer converts at its own pace; stop reading (the worker's queue then
        # holds the backlog) while it is far behind
        if self._handed - self._sealed_n <= self._sealer_pending_max:
            return
        with self._sealer_cond:
            while (self._handed - self._sealed_n > self._sealer_pending_max
                   and self._sealer.is_alive()):
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

    def _roll_segment(self, req: int | None) -> None:
        if self._seg_fd is None:
            if req is not None:
                self.answers.send(ipc.A_ROLLED, ipc.Rolled(req, None, None, self.stats))
            return
        os.close(self._seg_fd)
        self._seg_fd = None
        self._sq.put(("seal", self._seg_seq, req))

    def _maybe_roll(self, force: bool) -> None:
        if self._seg_fd is None or self._retry is not None:
            return
        if force or self._seg_records >= self.roll_records or (
                self.roll_seconds and time.monotonic() - self._seg_opened >= self.roll_seconds):
            self._roll_segment(None)

    def _finish(self, clean: bool) -> None:
        if clean:
            self._maybe_roll(force=True)
        elif self._seg_fd is not None:
            # the worker died: the open segment stays in the WAL for the next start
            os.close(self._seg_fd)
            self._seg_fd = None
        self._sq.put(("stop",))
        self._sealer.join()
        self.stats.segment_seq = self._seg_seq
        if self._uploader is not None and clean:
            # best effort within upload_drain; what is left uploads at the next start
            if not self._uploader.drain(self.cfg.upload_drain):
                log.warning("audit: %d sealed file(s) not yet in %s; they upload at the "
                            "next start", self._uploader.backlog or 1,
                            self._uploader.store.uri)
            self._upload_stats()
        if clean:
            self.answers.send(ipc.A_EXIT, self.stats)

    def _report_uploads(self) -> None:
        # from the uploader thread: counters to the worker (/metrics), durable 0
        self._upload_stats()
        self.answers.send(ipc.A_DURABLE, ipc.Ack(0, [], [], self.stats))

    def _upload_stats(self) -> None:
        u = self._uploader
        if u is not None:
            self.stats.uploaded = u.uploaded
            self.stats.upload_backlog = u.backlog
            self.stats.upload_error = u.last_error

    # -- sealer thread --------------------------------------------------------------

    def _run_sealer(self) -> None:
        _nice(SEALER_NICE)
        conv = _Converter(storage.wal_dir(self.root, self.stream) / ".convert.ndjson")
        sink: storage.ParquetSink | None = None
        wal_path: Path | None = None
        failed = False
        # committed records wait here until a batch is worth a conversion (a conversion
        # of lines has a fixed cost of about a millisecond) or the segment is sealed
        pending: list[tuple] = []
        pending_n = 0

        def convert() -> None:
            nonlocal pending, pending_n, failed
            chunks, n = pending, pending_n
            pending, pending_n = [], 0
            try:
                if n and sink is not None and not failed:
                    for table in conv.tables(chunks):
                        sink.add(table)
            except Exception:
                failed = True
                raise
            finally:
                with self._sealer_cond:
                    self._sealed_n += n
                    self._sealer_cond.notify_all()

        while True:
            item = self._sq.get()
            kind = item[0]
            try:
                if kind == "data":
                    pending.extend(item[2])
                    pending_n += sum(c[1] for c in item[2])
                    if pending_n >= SEAL_BATCH:
                        convert()
                elif kind == "open":
                    _, seq, dt, first_prev, wal_path = item
                    sink = storage.ParquetSink(self.root, self.stream, seq, dt, first_prev)
                    failed = False
                elif kind == "seal":
                    _, seq, req = item
                    convert()
                    out = None
                    if sink is not None and not failed and sink.records:
                        out = sink.seal()
                        self.stats.sealed_files += 1
                        self._head_total += sink.records
                        storage.write_head(self.root, storage.Head(
                            stream=self.stream, seq=seq, last_hash=sink.last_hash,
                            records=self._head_total,
                            file=str(out.relative_to(self.root)),
                            updated=datetime.now(UTC).isoformat()))
                        if wal_path is not None:
                            wal_path.unlink(missing_ok=True)
                        if self._uploader is not None:
                            self._uploader.kick()
                    elif sink is not None and not failed and wal_path is not None:
                        wal_path.unlink(missing_ok=True)
                    sink = None
                    wal_path = None
                    gc.collect()
                    self._upload_stats()
                    if req is not None:
                        self.answers.send(ipc.A_ROLLED, ipc.Rolled(
                            req, str(out) if out else None, None, self.stats))
                    else:       # stats only (durable 0: the main thread tells that)
                        self.answers.send(ipc.A_DURABLE, ipc.Ack(0, [], [], self.stats))
                elif kind == "stop":
                    pending, pending_n = [], 0
                    if sink is not None:
                        sink.abort()
                    conv.close()
                    return
            except Exception as e:
                # the WAL segment stays on disk and is sealed at the next start
                self.stats.errors += 1
                self.stats.last_error = f"sealing segment failed: {type(e).__name__}: {e}"
                log.exception("audit: sealing a segment failed; its WAL is kept for recovery")
                if sink is not None:
                    sink.abort()
                failed = True
                if kind == "seal":
                    sink = None
                    wal_path = None
                    if item[2] is not None:
                        self.answers.send(ipc.A_ROLLED, ipc.Rolled(
                            item[2], None, self.stats.last_error, self.stats))


def _read_limit(buf: bytearray) -> int:
    # READ_BYTES, or the end of the first frame not yet whole in buf when that lies
    # beyond: a frame larger than READ_BYTES (one long statement, a burst of them) is
    # read to its end, never left waiting for bytes the reader will not ask for
    pos = 0
    n = len(buf)
    head = ipc.HEAD
    while pos + head.size <= n:
        end = pos + head.size + head.unpack_from(buf, pos)[0]
        if end > n:
            return max(READ_BYTES, end)
        pos = end
    return max(READ_BYTES, pos + head.size) if pos < n else READ_BYTES


def _complete(buf: bytearray) -> bool:
    # does buf end on a frame boundary?
    pos = 0
    n = len(buf)
    head = ipc.HEAD
    while pos + head.size <= n:
        pos += head.size + head.unpack_from(buf, pos)[0]
    return pos == n


_DUCK_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT",
               pa.list_(pa.string()): "VARCHAR[]",
               pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ"}


class _Converter:
    """Hashed content lines -> Arrow, in the sealer thread.

    DuckDB's JSON reader parses with the GIL released and costs about half the CPU of
    Arrow's (both are exact for what msgspec validated and encoded: the lines were
    validated before they were hashed, so parsing cannot change a value). Arrow's reader
    is the fallback when DuckDB is missing or fails.
    """

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._con: Any = None
        self._fd = -1
        self._query = ""
        self._duck_ok = True        # until DuckDB fails once

    def prepare(self) -> None:
        try:
            import duckdb
            self._con = duckdb.connect(config={"threads": 1})
            self._con.execute("SET TimeZone = 'UTC'")
        except Exception as e:
            self._duck_ok = False
            log.warning("audit: DuckDB unavailable (%s); using Arrow's JSON reader", e)
            return
        cols = ", ".join(f"'{f.name}': '{_DUCK_TYPES[f.type]}'" for f in CONTENT_SCHEMA)
        path = str(self.scratch).replace("'", "''")
        self._query = (f"SELECT * FROM read_json('{path}', format = 'newline_delimited', "
                       f"compression = 'none', maximum_object_size = 268435456, "
                       f"columns = {{{cols}}})")

    def tables(self, items: list[tuple]) -> list[pa.Table]:
        """Full-schema tables of the committed *items*, in order. An item is
        ``("cols", n, columns, hash parts)`` (the transcoder's Arrow buffers: nothing to
        parse) or ``("lines", n, lines, hex hashes, hex hash before)`` (the msgspec path's
        lines, parsed here)."""
        out = []
        i = 0
        while i < len(items):
            if items[i][0] == "cols":
                _, n, cols, parts = items[i]
                out.append(storage.with_hashes(storage.columns_table(n, cols), parts))
                i += 1
                continue
            j = i
            while j < len(items) and items[j][0] == "lines":
                j += 1
            run = items[i:j]
            n = sum(c[1] for c in run)
            if self._con is None and self._duck_ok:
                self.prepare()          # DuckDB is imported only when lines need it
            content = self._duck([c[2] for c in run], n) if self._duck_ok else None
            if content is None:
                content = storage.content_table(b"".join(c[2] for c in run))
            out.append(storage.with_hashes(content, [(c[3], c[4], c[1]) for c in run]))
            i = j
        return out

    def _duck(self, blobs: list[bytes], n: int) -> pa.Table | None:
        try:
            # overwritten in place, then cut to size: truncating to zero first frees
            # every page of the file only to allocate it again (measured: 40% more
            # system time)
            if self._fd < 0:
                self._fd = os.open(self.scratch, os.O_WRONLY | os.O_CREAT, 0o600)
            size = 0
            for i in range(0, len(blobs), 1024):
                part = blobs[i:i + 1024]
                want = sum(map(len, part))
                done = os.pwritev(self._fd, part, size)
                if done != want:
                    raise OSError(f"short write to {self.scratch}")
                size += want
            os.ftruncate(self._fd, size)
            t = self._con.sql(self._query).to_arrow_table()
            if t.num_rows != n:
                raise AuditError(f"DuckDB read {t.num_rows} of {n} records")
            if t.schema != CONTENT_SCHEMA:
                t = t.cast(CONTENT_SCHEMA)
            return t
        except Exception as e:
            self._duck_ok = False
            log.warning("audit: DuckDB cannot convert records (%s: %s); using Arrow's "
                        "JSON reader", type(e).__name__, e)
            return None

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self.scratch.unlink()
        except OSError:
            pass


def _nice(n: int) -> None:
    # the calling thread's niceness (Linux: per thread; threads it starts inherit it)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), n)
    except (OSError, AttributeError):
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
        for b in part:
            if done >= len(b):
                done -= len(b)
                continue
            mv = memoryview(b)[done:]
            done = 0
            while mv:
                mv = mv[os.write(fd, mv):]
        i += len(part)


# -- process entry ---------------------------------------------------------------------

def _start(cfg: ipc.WriterConfig, answers: _Answers) -> tuple[Tip, int] | None:
    root = Path(cfg.root)
    me = cfg.parent_pid
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = lock_stream(root, cfg.stream, role="writer", parent=me, wait=cfg.orphan_wait)
        if fd is None:
            raise AuditError(f"audit stream {cfg.stream!r} in {root} is in use by another "
                             f"process (give each worker its own stream)")
        tip = recover(root, cfg.stream)
        for other in storage.list_wal_streams(root):
            if other != cfg.stream:
                ofd = lock_stream(root, other, role="recover", parent=me,
                                  wait=cfg.orphan_wait)
                if ofd is not None:
                    try:
                        recover(root, other)
                    finally:
                        os.close(ofd)
    except AuditError as e:
        answers.send(ipc.A_ERROR, [str(e)])
        return None
    except OSError as e:
        answers.send(ipc.A_ERROR, [f"audit directory {root}: {e.strerror or e}"])
        return None
    except Exception as e:          # a damaged file found by recovery, and the like
        log.exception("audit: the writer cannot start")
        answers.send(ipc.A_ERROR, [f"audit writer cannot start: {type(e).__name__}: {e}"])
        return None
    return tip, fd


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = msgspec.json.decode(argv[0], type=ipc.WriterConfig)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get("PGGUARD_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    answers = _Answers(cfg.ack_fd)
    started = _start(cfg, answers)
    if started is None:
        return 1
    tip, lock_fd = started
    try:
        writer = Writer(cfg, answers, tip, lock_fd)
    except AuditError as e:         # [audit] store names nothing we can open
        answers.send(ipc.A_ERROR, [str(e)])
        return 1
    answers.send(ipc.A_STARTED, ipc.Started(os.getpid(), tip.seq, tip.records))
    return writer.run()


if __name__ == "__main__":
    sys.exit(main())
