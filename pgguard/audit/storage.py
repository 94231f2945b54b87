# On-disk layout of the audit log: WAL segments, Parquet files, the chain head anchor,
# and the conversion of hashed NDJSON lines into Arrow tables.
"""Where audit records live and in which formats.

Layout under ``[audit] dir``::

    dt=2024-05-01/w0-000000000007.parquet      sealed files (zstd), one per WAL segment
    dt=2024-05-01/.w0-000000000008.parquet.tmp being written; renamed when complete
    _wal/w0/000000000008.wal                   write-ahead log of the open segment
    _wal/w0/lock                               flock held by the writing process
    _chain/w0.json                             head anchor: last sealed seq and hash

``w0`` is the *stream*: one writer (one worker process) appends to one hash chain;
``seq`` numbers its segments 1, 2, 3 ... with no gaps.

A WAL segment is a header then frames of up to 256 records; a group commit writes
several frames and fdatasyncs once::

    header  b"PGGWAL01" u32 len  JSON {"stream", "seq", "prev_hash", "created"}
    frame   u32 body_len  u32 count  32-byte chain hash of the frame's last record
            body: ``count`` records, canonical JSON content, one per line

Reading a segment recomputes the chain from the header's ``prev_hash``; a frame whose
length runs past the end of the file, or whose recomputed last hash differs from the one
stored, ends the valid part. That is a torn write at the tail after a crash (the frame
was never acknowledged: acknowledgement follows fdatasync), or damage if more frames
follow it.
"""
from __future__ import annotations

import array
import binascii
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from ..errors import PgguardError
from .record import CONTENT_FIELDS, CONTENT_SCHEMA, GENESIS, SCHEMA, UTC, _Content

WAL_DIR = "_wal"
CHAIN_DIR = "_chain"
WAL_MAGIC = b"PGGWAL01"
FRAME = struct.Struct("<II32s")
FORMAT_VERSION = "1"
ROW_GROUP_ROWS = 128 * 1024
STREAM_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_PARQUET_RE = re.compile(r"^(?P<stream>[A-Za-z0-9_]{1,64})-(?P<seq>\d{12})\.parquet$")
_WAL_RE = re.compile(r"^(?P<seq>\d{12})\.wal$")
_NL = b"\n"


class AuditError(PgguardError):
    """The audit log cannot be written or read as expected."""


# -- names -----------------------------------------------------------------------------

def check_stream(stream: str) -> str:
    if not STREAM_RE.match(stream):
        raise AuditError(f"invalid audit stream name {stream!r} (letters, digits, _)")
    return stream


def parquet_name(stream: str, seq: int) -> str:
    return f"{stream}-{seq:012d}.parquet"


def parquet_path(root: Path, dt: str, stream: str, seq: int) -> Path:
    return root / f"dt={dt}" / parquet_name(stream, seq)


def tmp_path(final: Path) -> Path:
    # never ends in .parquet, so read_parquet('<dir>/**/*.parquet') cannot see it
    return final.parent / f".{final.name}.tmp"


def wal_dir(root: Path, stream: str) -> Path:
    return root / WAL_DIR / stream


def wal_path(root: Path, stream: str, seq: int) -> Path:
    return wal_dir(root, stream) / f"{seq:012d}.wal"


def head_path(root: Path, stream: str) -> Path:
    return root / CHAIN_DIR / f"{stream}.json"


@dataclass(frozen=True, order=True)
class ParquetFile:
    stream: str
    seq: int
    path: Path = field(compare=False)
    dt: str = field(compare=False)


def list_parquet(root: Path) -> tuple[dict[str, list[ParquetFile]], list[Path]]:
    """Sealed files by stream (sorted by seq), and ``.parquet`` files that are not ours."""
    streams: dict[str, list[ParquetFile]] = {}
    foreign: list[Path] = []
    if not root.is_dir():
        return streams, foreign
    for path in root.rglob("*.parquet"):
        rel = path.relative_to(root).parts
        m = _PARQUET_RE.match(path.name)
        if not m or len(rel) != 2 or not rel[0].startswith("dt="):
            foreign.append(path)
            continue
        pf = ParquetFile(m["stream"], int(m["seq"]), path, rel[0][3:])
        streams.setdefault(pf.stream, []).append(pf)
    for files in streams.values():
        files.sort()
    return streams, sorted(foreign)


def list_wal(root: Path, stream: str) -> list[tuple[int, Path]]:
    d = wal_dir(root, stream)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _WAL_RE.match(p.name)
        if m:
            out.append((int(m["seq"]), p))
    return sorted(out)


def list_wal_streams(root: Path) -> list[str]:
    d = root / WAL_DIR
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and STREAM_RE.match(p.name))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write *data* to *path* so a reader sees the old or the new content, never half."""
    tmp = path.parent / f".{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# -- head anchor -----------------------------------------------------------------------

class Head(msgspec.Struct, kw_only=True):
    """The last sealed file of a stream: lets verify see a deleted last file or a
    truncated tail, which the chain alone cannot show."""

    stream: str
    seq: int
    last_hash: str
    records: int          # records in the chain up to and including seq
    file: str             # relative path of the file seq
    updated: str


def read_json(p: Path, typ: type, what: str) -> Any:
    """*p* decoded as *typ*; None if it does not exist, AuditError naming *what* if it
    cannot be read."""
    try:
        return msgspec.json.decode(p.read_bytes(), type=typ)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as e:
        raise AuditError(f"{p}: unreadable {what}: {e}") from None


def read_head(root: Path, stream: str) -> Head | None:
    return read_json(head_path(root, stream), Head, "chain head")


def list_heads(root: Path) -> dict[str, Head]:
    d = root / CHAIN_DIR
    out: dict[str, Head] = {}
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            if STREAM_RE.match(p.stem):
                h = read_head(root, p.stem)
                if h is not None:
                    out[p.stem] = h
    return out


def write_head(root: Path, head: Head) -> None:
    (root / CHAIN_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(head_path(root, head.stream), msgspec.json.encode(head) + b"\n")


# -- hashing ---------------------------------------------------------------------------

def chain_lines(prev: bytes, lines: list[bytes]) -> list[bytes]:
    """Raw sha256 digests of consecutive content lines chained from *prev* (32 bytes)."""
    sha = hashlib.sha256
    out = []
    append = out.append
    for line in lines:
        prev = sha(prev + line).digest()
        append(prev)
    return out


def split_lines(blob: bytes) -> list[bytes]:
    lines = blob.split(_NL)
    if lines and not lines[-1]:
        lines.pop()
    return lines


# -- WAL -------------------------------------------------------------------------------

def wal_header(stream: str, seq: int, prev_hash: str, created: datetime) -> bytes:
    meta = json.dumps({"stream": stream, "seq": seq, "prev_hash": prev_hash,
                       "created": created.isoformat(), "format": FORMAT_VERSION},
                      separators=(",", ":")).encode()
    return WAL_MAGIC + struct.pack("<I", len(meta)) + meta


def wal_frame_header(body: bytes, count: int, last_digest: bytes) -> bytes:
    return FRAME.pack(len(body), count, last_digest)


@dataclass
class WalSegment:
    path: Path
    stream: str
    seq: int
    prev_hash: str
    created: datetime
    bodies: list[bytes]       # valid frames, in order
    digests: list[bytes]      # raw chain digests of every record of those frames
    tail_bytes: int = 0       # bytes after the valid frames (torn or in progress)
    damaged: bool = False     # a complete frame failed its check and more data follows
    bad_last: bool = False    # the last frame is complete and fails its check
    bad_records: int = 0      # records that frame says it holds
    end_offset: int = 0       # file offset after the last valid frame

    @property
    def records(self) -> int:
        return len(self.digests)

    @property
    def last_hash(self) -> str:
        return self.digests[-1].hex() if self.digests else self.prev_hash


def read_wal(path: Path, resume: WalSegment | None = None) -> WalSegment:
    """Parse a WAL segment up to its last valid frame, recomputing the chain.

    Safe on a segment being written (a frame in progress counts as ``tail_bytes``).
    With *resume* (an earlier result for the same file), only frames after it are read
    and returned (``bodies``/``digests`` hold the new records; ``prev_hash`` is the hash
    before them) — what ``tail -f`` needs on a large, growing segment.
    """
    with open(path, "rb") as f:
        head = f.read(len(WAL_MAGIC) + 4)
        if len(head) < len(WAL_MAGIC) + 4 or not head.startswith(WAL_MAGIC):
            raise AuditError(f"{path}: not a pgguard WAL segment")
        (hlen,) = struct.unpack_from("<I", head, len(WAL_MAGIC))
        try:
            meta = json.loads(f.read(hlen))
            created = datetime.fromisoformat(meta["created"]).astimezone(UTC)
            seg = WalSegment(path, meta["stream"], int(meta["seq"]), meta["prev_hash"],
                             created, [], [])
            prev = bytes.fromhex(seg.prev_hash)
        except (ValueError, KeyError, TypeError) as e:
            raise AuditError(f"{path}: damaged WAL header: {e}") from None
        base = len(WAL_MAGIC) + 4 + hlen
        if resume is not None:
            base = resume.end_offset
            seg.prev_hash = resume.last_hash
            prev = bytes.fromhex(seg.prev_hash)
            f.seek(base)
        data = f.read()
    pos = 0
    n = len(data)
    while pos < n:
        if pos + FRAME.size > n:
            break
        blen, count, digest = FRAME.unpack_from(data, pos)
        start = pos + FRAME.size
        if blen == 0 or start + blen > n:
            break
        body = data[start:start + blen]
        lines = split_lines(body)
        digests = chain_lines(prev, lines)
        if len(lines) != count or not digests or digests[-1] != digest:
            seg.damaged = start + blen < n
            # complete to the last byte yet wrong: changed, or a write a crash cut
            # short (the file grew to its length, the data did not all get there)
            seg.bad_last = start + blen == n
            seg.bad_records = count
            break
        seg.bodies.append(body)
        seg.digests.extend(digests)
        prev = digests[-1]
        pos = start + blen
    seg.tail_bytes = n - pos
    seg.end_offset = base + pos
    return seg


# -- Arrow conversion ------------------------------------------------------------------

_READ_OPTS = pajson.ParseOptions(explicit_schema=CONTENT_SCHEMA,
                                 unexpected_field_behavior="error")
_content_lines = msgspec.json.Decoder(_Content)


_OFFSETS_N = 1 << 16
_OFFSETS = pa.py_buffer(array.array("i", range(0, 64 * (_OFFSETS_N + 1), 64)))

HashParts = list[tuple[bytes, bytes, int]]
"""Chain hashes of consecutive rows, in pieces: (hex hashes concatenated, hex hash of
the row before the piece, rows)."""


def _hex_strings(data: bytes, n: int) -> pa.Array:
    # n fixed-width (64) hex strings straight from one buffer: no Python object per row
    if n <= _OFFSETS_N:
        offsets = _OFFSETS.slice(0, 4 * (n + 1))
    else:
        offsets = pa.py_buffer(array.array("i", range(0, 64 * (n + 1), 64)))
    return pa.StringArray.from_buffers(n, offsets, pa.py_buffer(data))


def hash_parts(digests: bytes, first_prev: bytes) -> HashParts:
    """HashParts from raw 32-byte digests (recovery, WAL reads)."""
    return [(binascii.hexlify(digests), binascii.hexlify(first_prev), len(digests) // 32)]


def _content_table_slow(body: bytes) -> pa.Table:
    # exact (msgspec-validated) values column by column; used only if Arrow's JSON
    # reader refuses input that msgspec accepted
    recs = _content_lines.decode_lines(body)
    cols = list(zip(*(msgspec.structs.astuple(r) for r in recs))) if recs else \
        [[] for _ in CONTENT_FIELDS]
    arrays = [pa.array(list(c), type=f.type) for c, f in zip(cols, CONTENT_SCHEMA)]
    return pa.Table.from_arrays(arrays, schema=CONTENT_SCHEMA)


def content_table(body: bytes) -> pa.Table:
    """Arrow table of canonical content lines (NDJSON). Runs without the GIL."""
    ro = pajson.ReadOptions(use_threads=False, block_size=max(len(body) + 1, 1 << 16))
    try:
        t = pajson.read_json(pa.BufferReader(body), read_options=ro, parse_options=_READ_OPTS)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return _content_table_slow(body)
    if t.schema != CONTENT_SCHEMA:
        t = t.select(list(CONTENT_FIELDS)).cast(CONTENT_SCHEMA)
    return t


def columns_table(n: int, cols: list[tuple]) -> pa.Table:
    """The content table of *n* rows from column buffers in Arrow's layout (what
    ``auditline.Transcoder.take`` returns: per content field, validity, null count,
    offsets, values, child offsets, child values)."""
    arrays = []
    for f, (valid, nulls, offs, data, coffs, cdata) in zip(CONTENT_SCHEMA, cols):
        vb = pa.py_buffer(valid) if valid is not None else None
        t = f.type
        if pa.types.is_list(t):
            child = pa.Array.from_buffers(t.value_type, len(coffs) // 4 - 1,
                                          [None, pa.py_buffer(coffs), pa.py_buffer(cdata)])
            arrays.append(pa.Array.from_buffers(t, n, [vb, pa.py_buffer(offs)], nulls,
                                                children=[child]))
        elif offs is None:
            arrays.append(pa.Array.from_buffers(t, n, [vb, pa.py_buffer(data)], nulls))
        else:
            arrays.append(pa.Array.from_buffers(t, n, [vb, pa.py_buffer(offs),
                                                       pa.py_buffer(data)], nulls))
    return pa.Table.from_arrays(arrays, schema=CONTENT_SCHEMA)


def with_hashes(content: pa.Table, parts: HashParts) -> pa.Table:
    """The full-schema table: *content* rows plus their ``prev_hash``/``hash`` columns."""
    n = content.num_rows
    if sum(p[2] for p in parts) != n:
        raise AuditError(f"{sum(p[2] for p in parts)} hashes for {n} records")
    prev = pa.chunked_array([_hex_strings(fp + hx[:-64], k) for hx, fp, k in parts if k],
                            type=pa.string())
    cur = pa.chunked_array([_hex_strings(hx, k) for hx, _, k in parts if k],
                           type=pa.string())
    return pa.Table.from_arrays(content.columns + [prev, cur], schema=SCHEMA)


def build_table(body: bytes, parts: HashParts) -> pa.Table:
    """The full-schema table for content lines *body* and their chain hashes."""
    return with_hashes(content_table(body), parts)


# Columns with a value per record (ids, times, chain hashes) are written plain: a
# dictionary of them is built only to be dropped when it outgrows its page (measured:
# 15 % of the Parquet write's CPU, and larger files). Min/max statistics are kept for every
# column a query filters or prunes on (time, event id, counts, names), not for the hashes.
_UNIQUE = frozenset({"event_id", "ts", "prev_hash", "hash"})
# (Parquet names a list column's values by their leaf path)
_LEAF = {f.name: f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name
         for f in SCHEMA}
_DICTIONARY = [_LEAF[f.name] for f in SCHEMA if f.name not in _UNIQUE]
_STATISTICS = [_LEAF[f.name] for f in SCHEMA if f.name not in ("prev_hash", "hash")]


class ParquetSink:
    """One Parquet file being written under a temporary name; ``seal()`` publishes it."""

    def __init__(self, root: Path, stream: str, seq: int, dt: str, first_prev: str) -> None:
        self.final = parquet_path(root, dt, stream, seq)
        self.tmp = tmp_path(self.final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.stream, self.seq, self.dt, self.first_prev = stream, seq, dt, first_prev
        self.records = 0
        self.last_hash = first_prev
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.records += table.num_rows
        self.last_hash = table.column("hash")[-1].as_py()
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.tmp, SCHEMA, compression="zstd", use_dictionary=_DICTIONARY,
                write_statistics=_STATISTICS)
        table = pa.concat_tables(self._pending)
        self._pending.clear()
        self._pending_rows = 0
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)

    def seal(self) -> Path:
        """Flush, fsync, rename to the final name, fsync the directory."""
        self._flush()
        if self._writer is None:
            raise AuditError("cannot seal an empty audit file")
        self._writer.add_key_value_metadata({
            "pgguard.format": FORMAT_VERSION, "pgguard.stream": self.stream,
            "pgguard.seq": str(self.seq), "pgguard.records": str(self.records),
            "pgguard.dt": self.dt,
            "pgguard.first_prev_hash": self.first_prev, "pgguard.last_hash": self.last_hash})
        self._writer.close()
        self._writer = None
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


def segment_to_parquet(root: Path, seg: WalSegment) -> Path | None:
    """Convert the valid frames of a (recovered) WAL segment to its Parquet file."""
    if not seg.records:
        return None
    sink = ParquetSink(root, seg.stream, seg.seq, seg.created.strftime("%Y-%m-%d"),
                       seg.prev_hash)
    try:
        prev = bytes.fromhex(seg.prev_hash)
        i = 0
        step = 16       # frames per conversion (≈4096 records)
        for f in range(0, len(seg.bodies), step):
            body = b"".join(seg.bodies[f:f + step])
            n = body.count(_NL)
            digests = b"".join(seg.digests[i:i + n])
            sink.add(build_table(body, hash_parts(digests, prev)))
            prev = seg.digests[i + n - 1]
            i += n
        return sink.seal()
    except BaseException:
        sink.abort()
        raise


def wal_table(seg: WalSegment) -> pa.Table:
    """The records of a WAL segment not yet sealed, as a table (for queries and tail)."""
    if not seg.records:
        return SCHEMA.empty_table()
    return build_table(b"".join(seg.bodies),
                       hash_parts(b"".join(seg.digests), bytes.fromhex(seg.prev_hash)))


def last_hash_of(path: Path) -> tuple[str, int]:
    """(hash of the last record, number of records) of a sealed file."""
    f = pq.ParquetFile(path)
    n = f.metadata.num_rows
    if n == 0:
        return GENESIS, 0
    rg = f.metadata.num_row_groups - 1
    col = f.read_row_group(rg, columns=["hash"]).column("hash")
    return col[-1].as_py(), n


