# Pure-Python reference of the compiled DataRow/CopyData rewriter: the test oracle.
"""Same interface and output as :class:`pgguard._core.rowmask.RowRewriter`, written for
clarity, not speed: messages are collected whole and rewritten one by one, strategies
use :mod:`hmac`, and detectors run their ``re`` locators on every scanned cell (no
Hyperscan). Only the concatenated output is comparable: this one holds back every
partial message, the compiled one streams what it can.

Example::

    ref = ReferenceRewriter()
    ref.set_plan(plan)                 # a MaskPlan; its .columns/.copy/.detectors are read
    out = ref.feed(chunk)
"""
from __future__ import annotations

import hashlib
import hmac
import re
import struct

from .strategies import (
    ACTION_DETECT,
    ACTION_NONE,
    ACTION_NULL,
    ACTION_STRATEGY,
    KIND_JSONB_BINARY,
    KIND_FLOAT8_BINARY,
    KIND_FLOAT8_TEXT,
    KIND_HEX,
    KIND_INT8_BINARY,
    KIND_LITERAL,
    KIND_NUMERIC_BINARY,
    KIND_OTHER,
    KIND_TEXT,
    KIND_UINT8_BINARY,
    KIND_WHOLE,
)

__all__ = ["ReferenceRewriter", "apply_strategy"]

_ENDS_RESULT = frozenset(b"CEIsZ")
_NULL = b"\xffNULL"   # _masked: the cell becomes NULL (a literal no label fits in)


def _is_cont(b: int) -> bool:
    return (b & 0xC0) == 0x80


def apply_strategy(strategy: int, value: bytes, keep: int, repl: bytes, key: bytes) -> bytes:
    """A strategy on a text value (0 redact, 1 partial, 2 email, 3 hash)."""
    if strategy == 0:
        return repl
    if strategy == 1:
        starts = [i for i, b in enumerate(value) if not _is_cont(b)]
        if len(starts) > keep:
            return repl + (value[starts[-keep]:] if keep else b"")
        return repl
    if strategy == 2:
        at = value.rfind(b"@")
        if at <= 0 or at == len(value) - 1:
            return repl
        j = 1
        while j < at and _is_cont(value[j]):
            j += 1
        return value[:j] + b"***@" + value[at + 1:]
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    return b"h_" + hmac.new(key, value, hashlib.sha256).digest()[:8].hex().encode()


def _json_quote(v: bytes) -> bytes:
    out = bytearray(b'"')
    for c in v:
        if c in (34, 92):
            out += bytes((92, c))
        elif c < 0x20:
            out += b"\\u%04x" % c
        else:
            out.append(c)
    out += b'"'
    return bytes(out)


def _hex_bytes(value: bytes) -> bytes | None:
    """The bytes a bytea's hex text spells (``\\x`` then pairs of hex digits), or None."""
    digits = value[2:]
    if not value.startswith(b"\\x") or len(digits) % 2 or \
            digits.strip(b"0123456789abcdefABCDEF"):
        return None
    return bytes.fromhex(digits.decode("ascii"))


_HEX_RUN = re.compile(rb"\\x((?:[0-9a-fA-F]{2}){6,})")


def _digits_text(kind: int, value: bytes) -> bytes | None:
    """The decimal text a client prints of a binary int8 / xid8 / numeric / float8 value
    (None: it prints no digits: NaN, infinity, malformed)."""
    if kind == KIND_FLOAT8_TEXT:
        try:
            value = struct.pack("!d", float(value.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            return None
        kind = KIND_FLOAT8_BINARY
    if kind != KIND_NUMERIC_BINARY:
        if len(value) != 8:
            return None
        if kind == KIND_INT8_BINARY:
            return str(struct.unpack("!q", value)[0]).encode()
        if kind != KIND_FLOAT8_BINARY:
            return str(struct.unpack("!Q", value)[0]).encode()
        (f,) = struct.unpack("!d", value)
        if f != f or f in (float("inf"), float("-inf")):
            return None
        if f == int(f) and abs(f) < 1e19:
            return b"%.0f" % f
        for p in (15, 16, 17):
            t = b"%.*g" % (p, f)
            if float(t) == f:
                break
        return t
    if len(value) < 8:
        return None
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHh", value)
    if ndigits < 0 or dscale < 0 or len(value) != 8 + 2 * ndigits or sign not in (0, 0x4000):
        return None
    digits = struct.unpack_from(f"!{ndigits}H", value, 8)
    if any(d > 9999 for d in digits):
        return None
    out = "-" if sign else ""
    if weight < 0:
        out += "0"
    else:
        out += "".join(str(digits[d] if d < ndigits else 0) if d == 0 else
                       "%04d" % (digits[d] if d < ndigits else 0) for d in range(weight + 1))
    if dscale > 0:
        frac = "".join("%04d" % (digits[d] if 0 <= d < ndigits else 0)
                       for d in range(weight + 1, weight + 1 + (dscale + 3) // 4))
        out += "." + frac[:dscale]
    return out.encode()


_NUM_KINDS = {20: KIND_INT8_BINARY, 5069: KIND_UINT8_BINARY, 1700: KIND_NUMERIC_BINARY,
              701: KIND_FLOAT8_BINARY}


def _bin_numbers(v: bytes, depth: int = 0) -> list[bytes] | None:
    """The digits of the int8 / xid8 / numeric / float8 values inside a binary array or
    record (nested ones too); None when *v* is neither, well formed."""
    if depth > 8 or len(v) < 4:
        return None
    n = len(v)

    def element(oid_kind, x: bytes, out: list) -> None:
        if oid_kind:
            t = _digits_text(oid_kind, x)
            if t is not None:
                out.append(t)
        elif len(x) >= 4 and x[0] == 0:
            got = _bin_numbers(x, depth + 1)
            if got is not None:
                out.extend(got)

    (ndim,) = struct.unpack_from("!i", v)
    if 0 <= ndim <= 6 and n >= 12 + 8 * ndim and struct.unpack_from("!I", v, 4)[0] <= 1:
        (oid,) = struct.unpack_from("!I", v, 8)
        pos, total = 12, (1 if ndim else 0)
        for i in range(ndim):
            (size,) = struct.unpack_from("!i", v, pos)
            if size < 0 or (size and total > n // size):
                total = -1
                break
            total *= size
            pos += 8
        if 0 <= total <= n:
            out: list[bytes] = []
            ok = True
            for _ in range(total):
                if pos + 4 > n:
                    ok = False
                    break
                (ln,) = struct.unpack_from("!i", v, pos)
                pos += 4
                if ln == -1:
                    continue
                if ln < 0 or pos + ln > n:
                    ok = False
                    break
                element(_NUM_KINDS.get(oid, 0), v[pos:pos + ln], out)
                pos += ln
            if ok and pos == n:
                return out
    (nf,) = struct.unpack_from("!i", v)
    if nf < 0 or nf > 1664:
        return None
    pos, out = 4, []
    for _ in range(nf):
        if pos + 8 > n:
            return None
        oid, ln = struct.unpack_from("!Ii", v, pos)
        pos += 8
        if ln == -1:
            continue
        if ln < 0 or pos + ln > n:
            return None
        element(_NUM_KINDS.get(oid, 0), v[pos:pos + ln], out)
        pos += ln
    return out if pos == n else None


def _binnum_view(value: bytes) -> bytes | None:
    """*value*, a newline, then the digits of the numbers in it, each and a newline (a
    binary array or record); None when it holds no such number."""
    got = _bin_numbers(value)
    if not got:
        return None
    return value + b"\n" + b"".join(t + b"\n" for t in got)


_EXP_NUM = re.compile(rb"-?[0-9.]+e\+1[0-9]*")


def _exp_view(value: bytes) -> bytes | None:
    """*value*, a newline, then the digits of each number in exponent form with 13 to
    19 digits once expanded (``4.111111111111111e+15``) and a newline; None if none."""
    out = []
    for m in _EXP_NUM.finditer(value):
        tok = m.group(0)
        mant, _, ex = tok.partition(b"e+")
        if len(ex) > 4 or not 12 <= int(ex) <= 18:
            continue
        try:
            f = float(tok)
        except ValueError:
            continue
        if f != f or abs(f) >= 1e19:
            continue
        out.append(b"%.0f" % f)
    if not out:
        return None
    return value + b"\n" + b"".join(t + b"\n" for t in out)


def _hex_view(value: bytes) -> bytes | None:
    """*value*, a newline, and *value* with every bytea hex run in it (``\\x`` then 12
    or more hex digits, as ``::text``, arrays, records and JSON of a bytea print it)
    replaced by the bytes it spells; None when it has none."""
    if b"\\x" not in value:
        return None
    out, n = _HEX_RUN.subn(lambda m: bytes.fromhex(m.group(1).decode("ascii")), value)
    return value + b"\n" + out if n else None      # both are scanned


class _Col:
    """A plan column with the same resolution the compiled plan applies."""

    def __init__(self, c: object, copy: bool, has_detectors: bool) -> None:
        self.action = int(c.action)
        self.strategy = int(c.strategy)
        self.kind = int(c.kind)
        if copy and self.kind == KIND_JSONB_BINARY:
            self.kind = 2
        if copy and self.kind == KIND_LITERAL:
            self.kind = KIND_TEXT
        if self.action == ACTION_STRATEGY and (self.kind in (KIND_OTHER, KIND_WHOLE,
                                                             KIND_LITERAL)
                                               or self.kind >= KIND_HEX):
            self.action = ACTION_NULL
        if self.action == ACTION_DETECT and (self.kind == KIND_OTHER or not has_detectors):
            self.action = ACTION_NONE
        self.keep = int(c.keep)
        self.repl = bytes(c.replacement)
        self.key = bytes(c.key or b"")


class ReferenceRewriter:
    def __init__(self, max_len: int = 1024 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._plan = None
        self._cols: list[_Col] = []
        self._copy = None
        self._det = None
        self._header = False
        self._counts: list[int] = []
        self._det_counts: list[int] = []
        self.masked_cells = 0
        self.rows_rewritten = 0

    # -- plan ---------------------------------------------------------------------

    def set_plan(self, plan: object | None) -> None:
        if plan is None:
            self._plan = None
            return
        self._plan = plan
        self._copy = plan.copy
        self._det = plan.detectors
        self._cols = [_Col(c, plan.copy is not None, plan.detectors is not None)
                      for c in plan.columns]
        if len(self._counts) < len(self._cols):
            self._counts += [0] * (len(self._cols) - len(self._counts))
        if self._det is not None and len(self._det_counts) < len(self._det.names):
            self._det_counts += [0] * (len(self._det.names) - len(self._det_counts))
        self._header = plan.copy is not None and bool(plan.copy.header)

    def clear_plan(self) -> None:
        self._plan = None

    def take_counts(self) -> tuple[list[int], list[int]]:
        out = (self._counts, self._det_counts)
        self._counts = [0] * (len(self._cols) if self._plan is not None else 0)
        self._det_counts = [0] * (len(self._det.names) if self._plan is not None
                                  and self._det is not None else 0)
        return out

    # -- stream -------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 5:
            t = buf[pos]
            (length,) = struct.unpack_from("!I", buf, pos + 1)
            if len(buf) - pos < length + 1:
                break
            msg = bytes(buf[pos:pos + 1 + length])
            pos += 1 + length
            want = None
            if self._plan is not None:
                want = ord("D") if self._copy is None else ord("d")
            if t == want:
                out += self._rewrite_row(msg) if self._copy is None else self._rewrite_copy(msg)
            else:
                out += msg
                if t in _ENDS_RESULT:
                    self._plan = None
        del buf[:pos]
        return bytes(out)

    # -- values -------------------------------------------------------------------

    def _count(self, hit: int) -> None:
        i = 0
        while hit:
            if hit & 1:
                self._det_counts[i] += 1
            hit >>= 1
            i += 1

    def _masked(self, col: _Col, value: bytes) -> bytes | None:
        """The masked value (wire form for rows, unescaped for COPY), None: unchanged."""
        prefix = b""
        if col.kind == KIND_JSONB_BINARY:
            prefix, value = (value[:1], value[1:]) if value else (b"\x01", b"")
        if col.action == ACTION_DETECT:
            if not value:
                return None
            if col.kind >= KIND_INT8_BINARY:
                # a binary number: the digits a client prints of it; found there: NULL
                text = _digits_text(col.kind, value)
                got = None if text is None else self._det.mask_cell(
                    text, self._det.all_bits, 0)
                if got is None:
                    return None
                self._count(got[1])
                return _NULL
            raw = _hex_bytes(value) if col.kind == KIND_HEX else None
            if raw is None and col.kind == KIND_WHOLE and value[:1] == b"\0":
                raw = _binnum_view(value)   # a binary array or record: its numbers too
            if raw is None:
                raw = _hex_view(value)
            if raw is None and col.kind != KIND_JSONB_BINARY:
                raw = _exp_view(value)      # a number in exponent form: its digits
            if col.kind == KIND_HEX or raw is not None:
                # bytea in text format: the bytes it spells (or its text, when it is not
                # hex), or a text holding a bytea's hex; found there, the cell is NULL
                got = self._det.mask_cell(value if raw is None else raw,
                                          self._det.all_bits, 0)
                if got is None:
                    return None
                self._count(got[1])
                return _NULL
            mode = 2 if col.kind == KIND_LITERAL else int(col.kind not in (KIND_TEXT,
                                                                         KIND_WHOLE))
            got = self._det.mask_cell(value, self._det.all_bits, mode)
            if got is None:
                return None
            new, hit = got
            self._count(hit)
            return _NULL if new is None else prefix + new
        v = apply_strategy(col.strategy, value, col.keep, col.repl, col.key)
        if col.kind != KIND_TEXT:
            v = _json_quote(v)
        return prefix + v

    # -- DataRow ------------------------------------------------------------------

    def _rewrite_row(self, msg: bytes) -> bytes:
        (n,) = struct.unpack_from("!h", msg, 5)
        if n != len(self._cols):
            raise ValueError("column count")
        pos = 7
        cells: list[bytes | None] = []
        for _ in range(n):
            (ln,) = struct.unpack_from("!i", msg, pos)
            pos += 4
            if ln < 0:
                cells.append(None)
            else:
                cells.append(msg[pos:pos + ln])
                pos += ln
        masked: list[int] = []
        new: list[bytes | None] = []
        for i, (col, cell) in enumerate(zip(self._cols, cells)):
            out = cell
            if cell is not None and col.action != ACTION_NONE:
                if col.action == ACTION_NULL:
                    out = None
                    masked.append(i)
                else:
                    m = self._masked(col, cell)
                    if m is not None:
                        out = None if col.kind == KIND_WHOLE or m is _NULL else m
                        masked.append(i)
            new.append(out)
        if not masked:
            return msg
        for i in masked:
            self._counts[i] += 1
            self.masked_cells += 1
        body = bytearray(struct.pack("!h", n))
        for cell in new:
            if cell is None:
                body += b"\xff\xff\xff\xff"
            else:
                body += struct.pack("!i", len(cell)) + cell
        self.rows_rewritten += 1
        return b"D" + struct.pack("!I", len(body) + 4) + bytes(body)

    # -- CopyData -----------------------------------------------------------------

    def _rewrite_copy(self, msg: bytes) -> bytes:
        payload = msg[5:]
        out = bytearray()
        changed = False
        pos = 0
        while pos < len(payload):
            nl = self._line_end(payload, pos)
            end = nl
            term_end = nl + 1 if nl < len(payload) else nl
            if nl < len(payload) and nl > pos and payload[nl - 1] == 13:
                end = nl - 1
            line = payload[pos:end]
            term = payload[end:term_end]
            pos = term_end
            if self._header:
                self._header = False
                out += line + term
                continue
            new = self._rewrite_line(line)
            if new is not None:
                changed = True
                out += new + term
            else:
                out += line + term
        if not changed:
            return msg
        self.rows_rewritten += 1
        return b"d" + struct.pack("!I", len(out) + 4) + bytes(out)

    def _line_end(self, p: bytes, i: int) -> int:
        """Index of the line's "\\n" (or len(p)), honouring escapes and quotes."""
        c = self._copy
        if c.format == "text":
            while i < len(p):
                if p[i] == 92:
                    i += 2
                    continue
                if p[i] == 10:
                    return i
                i += 1
            return len(p)
        q, e = c.quote[0], c.escape[0]
        inq = False
        while i < len(p):
            ch = p[i]
            if inq:
                if ch == e and i + 1 < len(p) and (p[i + 1] == q or (e != q and p[i + 1] == e)):
                    i += 2
                    continue
                if ch == q:
                    inq = False
            elif ch == 10:
                return i
            elif ch == q:
                inq = True
            i += 1
        return len(p)

    def _fields(self, line: bytes, as_client: bool = False) -> list[tuple[bytes, bytes | None]]:
        """(raw, value or None for NULL) of each field of one line."""
        c = self._copy
        d = c.delimiter[0]
        fields: list[tuple[bytes, bytes | None]] = []
        i = 0
        start = 0
        if c.format == "text":
            while True:
                while i < len(line) and line[i] != d:
                    i += 2 if line[i] == 92 else 1
                i = min(i, len(line))
                raw = line[start:i]
                # a NULL string other than \N may also be a value written as it is:
                # every field is then a value (see rowmask.MaskPlan.null_ambiguous)
                fields.append((raw, None if raw == c.null and (as_client or c.null == b"\\N")
                               else _text_unescape(raw)))
                if i >= len(line):
                    return fields
                i += 1
                start = i
        q, e = c.quote[0], c.escape[0]
        while True:
            inq = False
            quoted = False
            val = bytearray()
            while i < len(line):
                ch = line[i]
                if inq:
                    if ch == e and i + 1 < len(line) and (
                            line[i + 1] == q or (e != q and line[i + 1] == e)):
                        val.append(line[i + 1])
                        i += 2
                        continue
                    if ch == q:
                        inq = False
                    else:
                        val.append(ch)
                    i += 1
                    continue
                if ch == d:
                    break
                if ch == q:
                    inq = quoted = True
                else:
                    val.append(ch)
                i += 1
            raw = line[start:i]
            fields.append((raw, None if (not quoted and raw == c.null) else bytes(val)))
            if i >= len(line):
                return fields
            i += 1
            start = i

    def _rewrite_line(self, line: bytes) -> bytes | None:
        c = self._copy
        fields = self._fields(line)
        if len(fields) != len(self._cols):
            raise ValueError("field count")
        out: list[bytes] = []
        changed = False
        for i, (col, (raw, val)) in enumerate(zip(self._cols, fields)):
            new = raw
            hit = False
            if val is not None and col.action != ACTION_NONE:
                if col.action == ACTION_NULL:
                    new = c.null
                    hit = True
                else:
                    m = self._masked(col, val)
                    if m is not None and (col.kind == KIND_WHOLE or m is _NULL):
                        new = c.null
                        hit = True
                    elif m is not None:
                        if c.format == "text":
                            new = _text_escape(m, c.delimiter)
                            if new == c.null and new:
                                # would read back as NULL: write its first byte in octal
                                new = b"\\%03o" % m[0] + _text_escape(m[1:], c.delimiter)
                        else:
                            new = _csv_escape(m, c)
                        hit = True
                if hit:
                    changed = True
                    self._counts[i] += 1
                    self.masked_cells += 1
            out.append(new)
        return c.delimiter.join(out) if changed else None


_TEXT_ESC = {92: b"\\\\", 10: b"\\n", 13: b"\\r", 9: b"\\t", 8: b"\\b", 12: b"\\f", 11: b"\\v"}
_TEXT_UNESC = {ord("b"): 8, ord("f"): 12, ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("v"): 11}
_HEXDIG = b"0123456789abcdefABCDEF"


def _text_unescape(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        ch = raw[i]
        if ch != 92 or i + 1 >= n:
            out.append(ch)
            i += 1
            continue
        i += 1
        ch = raw[i]
        if 48 <= ch <= 55:
            j = i
            while j < n and j < i + 3 and 48 <= raw[j] <= 55:
                j += 1
            out.append(int(raw[i:j], 8) & 0xFF)
            i = j
        elif ch == ord("x") and i + 1 < n and raw[i + 1] in _HEXDIG:
            j = i + 1
            while j < n and j < i + 3 and raw[j] in _HEXDIG:
                j += 1
            out.append(int(raw[i + 1:j], 16))
            i = j
        else:
            out.append(_TEXT_UNESC.get(ch, ch))
            i += 1
    return bytes(out)


def _text_escape(v: bytes, delim: bytes) -> bytes:
    out = bytearray()
    for ch in v:
        if ch in _TEXT_ESC:
            out += _TEXT_ESC[ch]
        elif ch == delim[0]:
            out += bytes((92, ch))
        else:
            out.append(ch)
    return bytes(out)


def _csv_escape(v: bytes, c: object) -> bytes:
    special = {c.delimiter[0], c.quote[0], c.escape[0], 10, 13}
    if not (v == b"" or v == c.null or v == b"\\." or any(ch in special for ch in v)):
        return v
    out = bytearray(c.quote)
    for ch in v:
        if ch == c.quote[0] or ch == c.escape[0]:
            out += c.escape
        out.append(ch)
    out += c.quote
    return bytes(out)
