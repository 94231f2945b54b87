# The pipe protocol between a worker's AuditLog and its audit writer process.
"""Two pipes connect a proxy worker (``AuditLog``) to its writer process (``writerproc``).

Every message on either pipe is a frame::

    u32 body length   u8 kind   body

Worker -> writer (the *data* pipe, written by the worker's sender thread):

``R`` records
    ``RECS`` header (first seq, count, drops so far, strict count), then ``strict
    count`` u32 indices (which records of the frame a ``log_strict`` waits for), then
    one msgpack array of ``count`` rows. A row is ``msgspec.structs.astuple`` of an
    ``AuditRecord``: the worker encodes, the writer validates (``WireRow``). Records are
    numbered 1, 2, 3 ... in the order sent (*seq*); the writer acknowledges by seq.
``L`` roll
    u32 request id: seal the open segment into Parquet once everything before is in it.
``C`` close
    commit and seal everything, answer ``X``, exit. (End of file without ``C`` means the
    worker died: the writer commits what it received and exits, leaving the open WAL
    segment for recovery.)

Writer -> worker (the *ack* pipe), bodies in msgpack:

``S`` started (``Started``)          after recovery, before anything else
``E`` failed to start: [message]
``A`` durable (``Ack``)              after each group commit (and each seal, for stats)
``L`` rolled (``Rolled``)
``X`` exiting: ``WriterStats``       the last message before a clean exit
"""
from __future__ import annotations

import struct
from datetime import datetime
from typing import Annotated, Optional

import msgspec

from .record import FIELDS

HEAD = struct.Struct("<IB")          # body length, kind
RECS = struct.Struct("<QIQI")        # first seq, count, dropped (cumulative), strict count
U32 = struct.Struct("<I")

# worker -> writer
K_RECORDS = ord("R")
K_ROLL = ord("L")
K_CLOSE = ord("C")
# writer -> worker
A_STARTED = ord("S")
A_ERROR = ord("E")
A_DURABLE = ord("A")
A_ROLLED = ord("L")
A_EXIT = ord("X")

ARRAY32 = b"\xdd"                    # msgpack array with a big-endian u32 length

_I64 = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
_TS = Annotated[datetime, msgspec.Meta(tz=True)]   # naive datetimes take the slow path
TYPES: dict[str, object] = {
    "event_id": str, "ts": Optional[_TS], "session_id": str, "event": str,
    "relations": Optional[list[str]], "flags": Optional[list[str]],
    "rows": Optional[_I64], "bytes_out": Optional[_I64], "masked_cells": Optional[_I64],
    "duration_us": Optional[_I64], "prev_hash": str, "hash": str,
}
"""The type of each wire field (``Optional[str]`` where not listed)."""
WireRow = tuple[tuple(TYPES.get(f, Optional[str]) for f in FIELDS)]  # type: ignore[misc]
"""One record as the writer accepts it without coercion: the exact types of the
canonical content (so what is hashed round-trips through Parquet)."""


class WriterConfig(msgspec.Struct, kw_only=True):
    """What the writer process is told on its command line (JSON)."""

    root: str
    stream: str
    strict: bool
    capture_literals: bool
    roll_records: int
    roll_seconds: float
    group_records: int
    flush_interval: float
    data_fd: int
    ack_fd: int
    parent_pid: int
    orphan_wait: float = 60.0      # how long to wait for a dead worker's writer to drain
    store: Optional[str] = None    # [audit] store: sealed files are uploaded there
    instance: str = ""             # this instance's directory in the store
    upload_drain: float = 10.0     # at a clean exit, wait this long for the last uploads


class WriterStats(msgspec.Struct, array_like=True, gc=False):
    written: int = 0
    sealed_files: int = 0
    fsyncs: int = 0
    last_fsync_us: int = 0
    max_fsync_us: int = 0
    coerced: int = 0
    errors: int = 0
    last_error: Optional[str] = None
    segment_seq: int = 0
    failing: bool = False          # a WAL write is failing and being retried
    uploaded: int = 0              # files uploaded to [audit] store by this writer
    upload_backlog: int = 0        # sealed files of this stream not yet in the store
    upload_error: Optional[str] = None     # the last upload failure (None once one works)


class Started(msgspec.Struct, array_like=True):
    pid: int
    seq: int                       # last sealed segment
    records: int                   # records in the chain so far


class Ack(msgspec.Struct, array_like=True, gc=False):
    durable: int                   # every record up to this seq is fsynced
    eids: list[tuple[int, str]]    # event ids of the strict records among them
    failed: list[int]              # strict records that could not be written
    stats: WriterStats


class Rolled(msgspec.Struct, array_like=True):
    request: int
    path: Optional[str]
    error: Optional[str]
    stats: WriterStats


def frame(kind: int, body: bytes = b"") -> bytes:
    return HEAD.pack(len(body), kind) + body
