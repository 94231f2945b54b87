# Pure-Python reference of the compiled frame reader and relay scan: a test oracle.
from __future__ import annotations

import struct


class ReferenceFrameReader:
    """Same contract as ``pgguard._core.FrameReader``, written for clarity."""

    def __init__(self, typed: bool = True, max_len: int = 64 * 1024 * 1024) -> None:
        self.typed = typed
        self.max_len = max_len
        self.buf = b""

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next_message(self):
        hdr = 5 if self.typed else 4
        if len(self.buf) < hdr:
            return None
        mtype = self.buf[0] if self.typed else 0
        (length,) = struct.unpack("!I", self.buf[hdr - 4:hdr])
        if length < 4:
            raise ValueError(f"invalid message length {length}")
        if length > self.max_len:
            raise ValueError("message too long")
        total = hdr - 4 + length
        if len(self.buf) < total:
            return None
        payload, self.buf = self.buf[hdr:total], self.buf[total:]
        return (mtype, payload)


def reference_scan(stream: bytes, interest: bytes, withhold: bool, counted: bytes = b""):
    """Scan a stream of whole messages; return (items, count, status).

    items: forwarded bytes merged into runs, interleaved (withhold) with
    ``(type, message)`` tuples; with withhold=False, (forwarded, tuples) separately.
    """
    pos = 0
    items: list = []
    events: list = []
    forwarded = b""
    count = 0
    status = 0
    while pos < len(stream):
        t = stream[pos]
        (length,) = struct.unpack("!I", stream[pos + 1:pos + 5])
        msg = stream[pos:pos + 1 + length]
        pos += 1 + length
        if t in counted:
            count += 1
        if t == ord("Z") and length >= 5:
            status = msg[5]
        if t in interest:
            if withhold:
                items.append((t, msg))
            else:
                events.append((t, msg))
                forwarded += msg
        else:
            if withhold:
                if items and isinstance(items[-1], bytes):
                    items[-1] += msg
                else:
                    items.append(msg)
            else:
                forwarded += msg
    if withhold:
        return items, count, status
    return (forwarded, events), count, status


def merge_runs(items: list) -> list:
    """Normalise a scan's output: adjacent bytes items merged into one run."""
    out: list = []
    for it in items:
        if isinstance(it, bytes):
            if not it:
                continue
            if out and isinstance(out[-1], bytes):
                out[-1] += it
                continue
        out.append(it)
    return out
