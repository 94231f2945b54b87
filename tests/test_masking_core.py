# The compiled DataRow/CopyData rewriter against its Python reference, strategies, detectors.
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pgguard._core.framing import FrameError
from pgguard._core.rowmask import MaskPlan, RowRewriter, hmac_sha256
from pgguard.config import Detectors, Mask
from pgguard.errors import ConfigError
from pgguard.masking.detectors import BUILTIN, DetectorSet, luhn_ok
from pgguard.masking.reference import ReferenceRewriter
from pgguard.masking.strategies import (ACTION_DETECT, ACTION_NONE, ACTION_NULL,
                                        ACTION_STRATEGY, KIND_JSON, KIND_JSONB_BINARY,
                                        KIND_FLOAT8_BINARY, KIND_FLOAT8_TEXT,
                                        KIND_INT8_BINARY, KIND_NUMERIC_BINARY,
                                        KIND_UINT8_BINARY,
                                        KIND_OTHER, KIND_TEXT, KIND_WHOLE, ColumnMask, build_plan,
                                        cell_kind, column_mask, copy_format, counts_by_rule)

DETECTORS = DetectorSet.from_config(list(BUILTIN), [{"name": "employee_id",
                                                     "pattern": r"EMP-\d{6}"}])

JWT = (b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
       b"dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")

# fragments that make detectors fire (or nearly fire) and exercise escapes and UTF-8
FRAGMENTS = [
    b"bob@example.com", b"jane.doe+x@mail.co.uk", b"a@b", b"@", b".", b"-", b" ", b"0",
    b"123-45-6789", b"666-12-3456", b"4111 1111 1111 1111", b"4111111111111111",
    b"4111111111111112", b"3782 822463 10005", b"555-123-4567", b"(555) 123-4567",
    b"+44 20", b"10.0.0.1", b"256.1.1.1", b"AKIAIOSFODNN7EXAMPLE", JWT,
    b"-----BEGIN RSA PRIVATE KEY-----", b"-----END RSA PRIVATE KEY-----",
    b"Bearer abcdefghijklmnopqrstuvwxyz", b"sk_live_abcdefghijklmnop1234",
    b"ghp_abcdefghijklmnopqrstuvwxyz0123456789", b"EMP-123456", b"\\n", b"\\", b'"',
    b"\\\\", b"\xc3\xa9", "漢字".encode(), b"\t", b"\n", b"\r", b",", b"\x00", b"\\N",
    b"1234", b"9",
]

fragment = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.sampled_from(FRAGMENTS),
    st.binary(max_size=4),
    st.text(max_size=4).map(str.encode),
)
cell_value = st.lists(fragment, max_size=8).map(b"".join)
cell = st.one_of(st.none(), cell_value)

replacements = st.sampled_from([b"****", b"", b"[x]", "é".encode(), b'a"b\\c\t,', b"NULL",
                                b"\\N"])

column = st.builds(
    ColumnMask,
    action=st.sampled_from([0, 1, 1, 2, 3, 3, 3]),
    strategy=st.integers(0, 3),
    kind=st.sampled_from([1, 1, 1, 2, 3, 0]),
    keep=st.integers(0, 6),
    replacement=replacements,
    key=st.sampled_from([b"k1", b"key-two", b"long" * 30]),
)

# messages other than rows: NoticeResponse, ParameterStatus, NotificationResponse,
# BindComplete, NoData, CopyDone; and the ones that end a result
OTHER_TYPES = b"NSA2nc"
END_TYPES = b"CEIsZ"

# PGGUARD_FUZZ_EXAMPLES=5000 for a longer run
SETTINGS = settings(max_examples=int(os.environ.get("PGGUARD_FUZZ_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- wire helpers -----------------------------------------------------------------------

def msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def datarow(cells: list[bytes | None]) -> bytes:
    body = struct.pack("!h", len(cells))
    for c in cells:
        body += b"\xff\xff\xff\xff" if c is None else struct.pack("!i", len(c)) + c
    return msg(b"D", body)


def parse(stream: bytes) -> list[tuple[int, bytes]]:
    """Every message of a stream; fails on a bad length or trailing bytes."""
    out = []
    pos = 0
    while pos < len(stream):
        assert len(stream) - pos >= 5, "truncated header"
        (length,) = struct.unpack_from("!I", stream, pos + 1)
        assert length >= 4
        assert pos + 1 + length <= len(stream), "truncated message"
        out.append((stream[pos], stream[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def cells_of(body: bytes) -> list[bytes | None]:
    (n,) = struct.unpack_from("!h", body)
    pos = 2
    out: list[bytes | None] = []
    for _ in range(n):
        (ln,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + ln])
            pos += ln
    assert pos == len(body), "bytes after the last cell"
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    prev = 0
    for p in points + [len(data)]:
        pieces.append(data[prev:p])
        prev = p
    return pieces


def run(rewriter, segments, cuts):
    """Feed each (plan, bytes) segment in random pieces; set_plan between segments."""
    out = []
    for plan, data in segments:
        rewriter.set_plan(plan)
        for piece in split(data, cuts):
            out.append(rewriter.feed(piece))
    return b"".join(out)


# -- DataRow: compiled == reference --------------------------------------------------

@st.composite
def row_streams(draw):
    cols = draw(st.lists(column, min_size=0, max_size=6))
    plan = build_plan(cols, DETECTORS if draw(st.integers(0, 4)) else None)
    segments = []
    for _ in range(draw(st.integers(1, 3))):
        use = plan if draw(st.integers(0, 4)) else None
        parts = []
        for _ in range(draw(st.integers(0, 8))):
            kind = draw(st.integers(0, 9))
            if kind < 7:
                parts.append(datarow([draw(cell) for _ in cols]))
            elif kind < 9:
                parts.append(msg(bytes([draw(st.sampled_from(OTHER_TYPES))]),
                                 draw(st.binary(max_size=12))))
            else:
                parts.append(msg(bytes([draw(st.sampled_from(END_TYPES))]), b"x\x00"))
        segments.append((use, b"".join(parts)))
    cuts = draw(st.lists(st.integers(0, 10_000), max_size=8))
    return plan, segments, cuts


@SETTINGS
@given(row_streams())
def test_datarow_rewrite_matches_reference(case):
    plan, segments, cuts = case
    c, ref = RowRewriter(), ReferenceRewriter()
    got = run(c, segments, cuts)
    want = run(ref, segments, [])
    assert got == want
    counts = c.take_counts()
    assert counts == ref.take_counts()
    assert c.masked_cells == ref.masked_cells
    event(f"masked cells: {min(c.masked_cells, 3)}; detector hits: {min(sum(counts[1]), 2)}")
    assert c.at_boundary
    # valid framing, same message types in the same order, other messages untouched
    src = parse(b"".join(d for _, d in segments))
    out = parse(got)
    assert [t for t, _ in src] == [t for t, _ in out]
    for (t, a), (_, b) in zip(src, out):
        if t != ord("D"):
            assert a == b
        else:
            cells_of(b)


@SETTINGS
@given(row_streams())
def test_rows_with_nothing_to_mask_are_untouched(case):
    plan, segments, cuts = case
    actions = plan.actions
    got = parse(run(RowRewriter(), segments, cuts))
    src = parse(b"".join(d for _, d in segments))
    for (t, a), (_, b) in zip(src, got):
        if t == ord("D"):
            cells = cells_of(a)
            if all(c is None or actions[i] in (ACTION_NONE, ACTION_DETECT)
                   for i, c in enumerate(cells)) and not any(
                       actions[i] == ACTION_DETECT and c for i, c in enumerate(cells)):
                assert a == b


def test_no_plan_returns_the_chunk_itself():
    rw = RowRewriter()
    chunk = datarow([b"a", None]) + msg(b"C", b"SELECT 1\x00")
    assert rw.feed(chunk) is chunk
    rw.set_plan(build_plan([column_mask(None), column_mask(None)]))
    chunk = datarow([b"a", None])
    assert rw.feed(chunk) is chunk          # a plan that masks nothing


def test_mask_cells_and_lengths():
    cols = [column_mask(None, oid=23),
            column_mask(Mask(column="s.t.email", strategy="email")),
            column_mask(Mask(column="s.t.ssn", strategy="partial", keep=4)),
            column_mask(Mask(column="s.t.x", strategy="null")),
            column_mask(Mask(column="s.t.tok", strategy="hash"), hash_key="k"),
            column_mask(Mask(column="s.t.y", strategy="redact", replacement="[hidden]"))]
    rw = RowRewriter()
    plan = build_plan(cols)
    rw.set_plan(plan)
    out = rw.feed(datarow([b"7", b"jane@example.com", b"123-45-6789", b"x", b"v", b"secret"])
                  + datarow([b"8", None, None, None, None, None]))
    (t1, r1), (t2, r2) = parse(out)
    tok = b"h_" + hmac.new(b"k", b"v", hashlib.sha256).hexdigest()[:16].encode()
    assert cells_of(r1) == [b"7", b"j***@example.com", b"****6789", None, tok, b"[hidden]"]
    assert cells_of(r2) == [b"8", None, None, None, None, None]
    cols_counts, _ = rw.take_counts()
    assert cols_counts == [0, 1, 1, 1, 1, 1]
    assert counts_by_rule(plan, cols_counts) == {
        "s.t.email": 1, "s.t.ssn": 1, "s.t.x": 1, "s.t.tok": 1, "s.t.y": 1}


@pytest.mark.parametrize("value,keep,want", [
    ("123-45-6789", 4, "****6789"),
    ("1234", 4, "****"),                    # nothing left to hide: nothing kept
    ("12345", 4, "****2345"),
    ("ab", 0, "****"),
    ("", 4, "****"),
    ("Zürich—straße", 3, "****aße"),        # code points, not bytes
    ("漢字かな交じり", 2, "****じり"),
])
def test_partial_counts_code_points(value, keep, want):
    rw = RowRewriter()
    rw.set_plan(build_plan([column_mask(Mask(column="a.b.c", strategy="partial", keep=keep))]))
    (_, body), = parse(rw.feed(datarow([value.encode()])))
    assert cells_of(body) == [want.encode()]


@pytest.mark.parametrize("value,want", [
    ("jane@example.com", "j***@example.com"),
    ("élodie@exemple.fr", "é***@exemple.fr"),
    ('"a@b"@c.org', '"***@c.org'),
    ("not an email", "****"),
    ("@example.com", "****"),
    ("jane@", "****"),
])
def test_email_strategy(value, want):
    rw = RowRewriter()
    rw.set_plan(build_plan([column_mask(Mask(column="a.b.c", strategy="email"))]))
    (_, body), = parse(rw.feed(datarow([value.encode()])))
    assert cells_of(body) == [want.encode()]


@given(st.binary(max_size=300), st.binary(min_size=1, max_size=200))
@settings(max_examples=100, deadline=None)
def test_hmac_matches_stdlib(msg_, key):
    want = hmac.new(key, msg_, hashlib.sha256).digest()
    assert hmac_sha256(key, msg_) == want                   # SHA extensions if the CPU has them
    assert hmac_sha256(key, msg_, portable=True) == want


def test_hash_is_stable_and_keyed():
    def token(key, value, plan_cols=1):
        rw = RowRewriter()
        rw.set_plan(build_plan([column_mask(Mask(column="a.b.c", strategy="hash"),
                                            hash_key=key)] * plan_cols))
        (_, body), = parse(rw.feed(datarow([value] * plan_cols)))
        return cells_of(body)

    a = token("key-1", b"jane@example.com")
    assert a == token("key-1", b"jane@example.com")       # stable: joins still work
    assert token("key-1", b"jane@example.com", 2) == a * 2
    assert a != token("key-2", b"jane@example.com")       # keyed
    assert a != token("key-1", b"john@example.com")
    assert a[0].startswith(b"h_") and len(a[0]) == 18


def test_types_stay_decodable():
    m = Mask(column="a.b.c", strategy="redact")
    cols = [column_mask(m, oid=23),                        # int4 text -> NULL
            column_mask(m, oid=23, binary=True),           # int4 binary -> NULL
            column_mask(m, oid=25, binary=True),           # text binary: in place
            column_mask(m, oid=1043),                      # varchar
            column_mask(m, oid=114),                       # json -> JSON string
            column_mask(m, oid=3802),                      # jsonb text
            column_mask(m, oid=3802, binary=True),         # jsonb binary: version byte
            column_mask(m, oid=2950)]                      # uuid -> NULL
    assert [c.kind for c in cols] == [KIND_OTHER, KIND_OTHER, KIND_TEXT, KIND_TEXT,
                                      KIND_JSON, KIND_JSON, KIND_JSONB_BINARY, KIND_OTHER]
    rw = RowRewriter()
    rw.set_plan(build_plan(cols))
    (_, body), = parse(rw.feed(datarow([b"1", b"\x00\x00\x00\x01", b"t", b"v", b'{"a":1}',
                                         b'{"a": 1}', b'\x01{"a": 1}', b"x" * 36])))
    got = cells_of(body)
    assert got == [None, None, b"****", b"****", b'"****"', b'"****"', b'\x01"****"', None]
    assert json.loads(got[4]) == "****"


def test_json_strategy_escapes():
    m = Mask(column="a.b.c", strategy="partial", keep=3)
    rw = RowRewriter()
    rw.set_plan(build_plan([column_mask(m, oid=3802)]))
    (_, body), = parse(rw.feed(datarow([b'{"k": "a\\"b"}'])))
    (v,) = cells_of(body)
    assert json.loads(v) == '****b"}'


def test_plan_cleared_at_end_of_result():
    plan = build_plan([column_mask(Mask(column="a.b.c"))])
    for end in END_TYPES:
        rw = RowRewriter()
        rw.set_plan(plan)
        row = datarow([b"x"])
        out = parse(rw.feed(row + msg(bytes([end]), b"") + row))
        assert cells_of(out[0][1]) == [b"****"]
        assert out[2][1] == row[5:]                      # after the end: untouched
        assert rw.plan is None


def test_row_description_does_not_clear_the_plan():
    plan = build_plan([column_mask(Mask(column="a.b.c"))])
    rw = RowRewriter()
    rw.set_plan(plan)
    out = parse(rw.feed(msg(b"T", b"\x00\x00") + msg(b"N", b"note") + datarow([b"x"])))
    assert cells_of(out[2][1]) == [b"****"]


def test_column_count_mismatch_is_an_error():
    rw = RowRewriter()
    rw.set_plan(build_plan([column_mask(Mask(column="a.b.c"))]))
    with pytest.raises(FrameError, match="2 columns; the mask plan has 1"):
        rw.feed(datarow([b"a", b"b"]))


@pytest.mark.parametrize("bad", [
    b"D\x00\x00\x00\x08\x00\x01\xff\xfe",                  # length -2
    b"D\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x09ab",         # cell runs past the message
    b"D\x00\x00\x00\x0d\x00\x01\x00\x00\x00\x01abc",        # bytes after the last cell
    b"D\x00\x00\x00\x02",                                   # length < 4
])
def test_malformed_rows_raise(bad):
    rw = RowRewriter()
    rw.set_plan(build_plan([column_mask(Mask(column="a.b.c"))]))
    with pytest.raises(FrameError):
        rw.feed(bad)


def test_large_row_is_held_once_and_released_whole():
    rw = RowRewriter()
    rw.set_plan(build_plan([column_mask(None), column_mask(Mask(column="a.b.c"))]))
    big = datarow([b"n" * 3_000_000, b"secret"])
    out = []
    for i in range(0, len(big), 65536):
        out.append(rw.feed(big[i:i + 65536]))
        assert rw.pending <= len(big)
    assert all(o == b"" for o in out[:-1])
    (_, body), = parse(b"".join(out))
    assert cells_of(body) == [b"n" * 3_000_000, b"****"]
    assert rw.at_boundary and rw.pending == 0


def test_message_begun_before_the_plan_stays_raw():
    rw = RowRewriter()
    row = datarow([b"secret"])
    first = rw.feed(row[:3])                        # no plan: forwarded as it comes
    rw.set_plan(build_plan([column_mask(Mask(column="a.b.c"))]))
    rest = rw.feed(row[3:] + row)
    out = parse(first + rest)
    assert out[0][1] == row[5:]
    assert cells_of(out[1][1]) == [b"****"]


def test_held_row_finishes_under_its_own_plan():
    rw = RowRewriter()
    plan1 = build_plan([column_mask(Mask(column="a.b.c"))])
    plan2 = build_plan([column_mask(None), column_mask(None)])
    rw.set_plan(plan1)
    row = datarow([b"secret"])
    a = rw.feed(row[:8])
    rw.set_plan(plan2)
    b = rw.feed(row[8:] + datarow([b"1", b"2"]))
    out = parse(a + b)
    assert cells_of(out[0][1]) == [b"****"]
    assert cells_of(out[1][1]) == [b"1", b"2"]


# -- COPY ---------------------------------------------------------------------------

_PG_TEXT_ESC = {92: b"\\\\", 10: b"\\n", 13: b"\\r", 9: b"\\t", 8: b"\\b", 12: b"\\f",
                11: b"\\v"}


def copy_text_encode(v: bytes | None, fmt, odd: bool) -> bytes:
    if v is None:
        return fmt.null
    out = bytearray()
    for ch in v:
        if odd and ch == ord("A"):
            out += b"\\101"                 # octal: legal on input, never from Postgres
        elif odd and ch == ord("B"):
            out += b"\\x42"
        elif ch in _PG_TEXT_ESC:
            out += _PG_TEXT_ESC[ch]
        elif ch == fmt.delimiter[0]:
            out += b"\\" + bytes([ch])
        else:
            out.append(ch)
    return bytes(out)


def copy_csv_encode(v: bytes | None, fmt, force: bool) -> bytes:
    if v is None:
        return fmt.null
    special = {fmt.delimiter[0], fmt.quote[0], fmt.escape[0], 10, 13}
    if force or v == b"" or v == fmt.null or any(ch in special for ch in v):
        body = bytearray()
        for ch in v:
            if ch in (fmt.quote[0], fmt.escape[0]):
                body += fmt.escape
            body.append(ch)
        return fmt.quote + bytes(body) + fmt.quote
    return v


copy_formats = st.one_of(
    st.builds(copy_format, st.just("text"), delimiter=st.sampled_from(["\t", ",", "|"]),
              null=st.sampled_from([None, "NULL", ""]), header=st.booleans()),
    st.builds(copy_format, st.just("csv"), delimiter=st.sampled_from([",", ";", "\t"]),
              quote=st.sampled_from(['"', "'"]), escape=st.sampled_from([None, "\\"]),
              null=st.sampled_from([None, "NULL", "\\N"]), header=st.booleans()),
)


@st.composite
def copy_streams(draw):
    fmt = draw(copy_formats)
    cols = draw(st.lists(column, min_size=1, max_size=5))
    plan = build_plan(cols, DETECTORS if draw(st.integers(0, 4)) else None, fmt)
    rows = draw(st.lists(st.lists(cell, min_size=len(cols), max_size=len(cols)),
                         max_size=8))
    odd = draw(st.booleans())
    lines = []
    if fmt.header:
        lines.append(fmt.delimiter.join(b"col%d" % i for i in range(len(cols))) + b"\n")
    for r in rows:
        if fmt.format == "text":
            enc = [copy_text_encode(v, fmt, odd) for v in r]
            # a value written as the NULL string reads back as NULL (so in Postgres)
            r[:] = [None if e == fmt.null else v for v, e in zip(r, enc)]
        else:
            enc = [copy_csv_encode(v, fmt, draw(st.booleans())) for v in r]
        lines.append(fmt.delimiter.join(enc) + draw(st.sampled_from([b"\n", b"\n", b"\r\n"])))
    # one line per CopyData as Postgres sends it, sometimes several
    msgs = []
    i = 0
    while i < len(lines):
        k = draw(st.integers(1, 3)) if draw(st.integers(0, 3)) == 0 else 1
        msgs.append(msg(b"d", b"".join(lines[i:i + k])))
        i += k
    stream = msg(b"H", b"\x00\x00\x01\x00\x00") + b"".join(msgs) + msg(b"c", b"") \
        + msg(b"C", b"COPY 1\x00")
    cuts = draw(st.lists(st.integers(0, 5_000), max_size=6))
    return plan, fmt, rows, stream, cuts


def _copy_values(ref: ReferenceRewriter, payload: bytes) -> list[list[bytes | None]]:
    out = []
    pos = 0
    while pos < len(payload):
        nl = ref._line_end(payload, pos)
        end = nl - 1 if nl < len(payload) and nl > pos and payload[nl - 1] == 13 else nl
        out.append([v for _, v in ref._fields(payload[pos:end], as_client=True)])
        pos = nl + 1
    return out


@SETTINGS
@given(copy_streams())
def test_copy_rewrite_matches_reference_and_decodes(case):
    plan, fmt, rows, stream, cuts = case
    c, ref = RowRewriter(), ReferenceRewriter()
    got = run(c, [(plan, stream)], cuts)
    want = run(ref, [(plan, stream)], [])
    assert got == want
    counts = c.take_counts()
    assert counts == ref.take_counts()
    event(f"{fmt.format} masked cells: {min(c.masked_cells, 3)}; "
          f"detector hits: {min(sum(counts[1]), 2)}")
    # decode what the client gets: masked by column position, the rest as sent
    dec = ReferenceRewriter()
    dec.set_plan(plan)
    values = []
    for t, body in parse(got):
        if t == ord("d"):
            values += _copy_values(dec, body)
    if fmt.header:
        values = values[1:]
    assert len(values) == len(rows)
    actions = plan.actions
    # text format with a NULL string other than \N: a NULL reads like a value written as
    # that string, so a masked column masks it as one
    ambiguous = fmt.format == "text" and fmt.null != b"\\N"
    for sent, seen in zip(rows, values):
        for i, (a, b) in enumerate(zip(sent, seen)):
            if actions[i] == ACTION_NONE or a is None and not (
                    ambiguous and actions[i] == ACTION_STRATEGY):
                assert b == a
            elif actions[i] == ACTION_NULL:
                assert b is None
            elif actions[i] == ACTION_STRATEGY and plan.columns[i].kind == KIND_TEXT \
                    and plan.columns[i].strategy == 0:
                repl = plan.columns[i].replacement
                # an empty value and an empty NULL string read alike (in Postgres too)
                assert b == repl or (repl == fmt.null == b"" and b is None)


def test_copy_text_fields_with_escapes():
    fmt = copy_format("text")
    cols = [column_mask(None), column_mask(Mask(column="a.b.c", strategy="partial", keep=3)),
            column_mask(Mask(column="a.b.d", strategy="null")), column_mask(None, detect=True)]
    rw = RowRewriter()
    rw.set_plan(build_plan(cols, DETECTORS, fmt))
    line = b"1\tab\\tcd\\\\ef\tx\tmail bob@example.com\\n\n"
    (_, _), (_, body), (_, _) = parse(rw.feed(msg(b"H", b"\x00\x00\x04" + b"\x00\x00" * 4)
                                              + msg(b"d", line) + msg(b"c", b"")))
    assert body == b"1\t****\\\\ef\t\\N\tmail [email]\\n\n"


def test_copy_csv_quoted_fields():
    fmt = copy_format("csv", header=True)
    cols = [column_mask(Mask(column="a.b.c", strategy="redact", replacement="x,y")),
            column_mask(None), column_mask(Mask(column="a.b.d", strategy="email"))]
    rw = RowRewriter()
    rw.set_plan(build_plan(cols, None, fmt))
    data = b'name,note,email\n"Doe, ""Jane""","a,b",jane@example.com\n,,""\n'
    out = rw.feed(msg(b"d", data))
    (_, body), = parse(out)
    assert body == b'name,note,email\n"x,y","a,b",j***@example.com\n,,****\n'


# -- detectors ------------------------------------------------------------------------

def detect(values: list[bytes], kind_oid: int = 25) -> list[bytes | None]:
    rw = RowRewriter()
    rw.set_plan(build_plan([column_mask(None, detect=True, oid=kind_oid)] * len(values),
                           DETECTORS))
    (_, body), = parse(rw.feed(datarow(values)))
    return cells_of(body)


@pytest.mark.parametrize("text,want", [
    (b"write to bob@example.com today", b"write to [email] today"),
    (b"SSN 123-45-6789.", b"SSN [ssn]."),
    (b"SSN 666-45-6789 is not valid", b"SSN 666-45-6789 is not valid"),
    (b"card 4111 1111 1111 1111 exp", b"card [credit_card] exp"),
    (b"card 4111-1111-1111-1112 bad luhn", b"card 4111-1111-1111-1112 bad luhn"),
    (b"amex 378282246310005", b"amex [credit_card]"),
    (b"call (555) 123-4567", b"call [phone]"),
    (b"host 192.168.1.20 up", b"host [ipv4] up"),
    (b"AKIAIOSFODNN7EXAMPLE", b"[aws_access_key]"),
    (b"key akiaiosfodnn7example.", b"key [aws_access_key]."),
    (b"AkIaIOSFODNN7eXaMpLe", b"[aws_access_key]"),
    (b"xakiaiosfodnn7example", b"xakiaiosfodnn7example"),
    (b"token " + JWT, b"token [jwt]"),
    (b"Authorization: Bearer abcdefghijklmnopqrstuvwxyz", b"Authorization: [bearer_token]"),
    (b"key sk_live_4eC39HqLyjWDarjtT1zdp7dc", b"key [api_token]"),
    (b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----", b"[private_key]"),
    (b"badge EMP-004211", b"badge [employee_id]"),
    (b"nothing to see here", b"nothing to see here"),
])
def test_detectors_in_free_text(text, want):
    assert detect([text]) == [want]


def test_detectors_in_json_text():
    doc = {"user": {"email": "bob@example.com", "cards": [4111111111111111],
                    "note": "line\nssn 123-45-6789"}}
    for oid in (114, 3802):
        (out,) = detect([json.dumps(doc).encode()], oid)
        assert json.loads(out) == {"user": {"email": "[email]", "cards": ["[credit_card]"],
                                            "note": "line\nssn [ssn]"}}
    # jsonb binary: the version byte stays
    rw = RowRewriter()
    rw.set_plan(build_plan([column_mask(None, detect=True, oid=3802, binary=True)], DETECTORS))
    (_, body), = parse(rw.feed(datarow([b'\x01{"e": "bob@example.com"}'])))
    assert cells_of(body) == [b'\x01{"e": "[email]"}']


def test_json_escape_before_a_match_is_not_cut():
    (out,) = detect([b'{"a": "x\\nbob@example.com"}'], 114)
    assert json.loads(out) == {"a": "x[email]"}


def test_detectors_never_match_across_cells():
    assert detect([b"bob@exa", b"mple.com"]) == [b"bob@exa", b"mple.com"]
    assert detect([b"4111 1111", b"1111 1111"]) == [b"4111 1111", b"1111 1111"]
    assert detect([b"123-45", b"-6789"]) == [b"123-45", b"-6789"]
    assert detect([b"x bob@example.com", b"y"]) == [b"x [email]", b"y"]


def test_detector_counts_per_detector():
    rw = RowRewriter()
    rw.set_plan(build_plan([column_mask(None, detect=True)] * 2, DETECTORS))
    rw.feed(datarow([b"bob@example.com 123-45-6789", b"x@y.io"]) + datarow([b"z", None]))
    cols, dets = rw.take_counts()
    assert cols == [1, 1]
    names = DETECTORS.names
    assert dets[names.index("email")] == 2 and dets[names.index("ssn")] == 1
    assert sum(dets) == 3


@pytest.mark.parametrize("digits,ok", [(b"4111111111111111", True),
                                       (b"4111111111111112", False),
                                       (b"378282246310005", True),
                                       (b"6011111111111117", True)])
def test_luhn(digits, ok):
    assert luhn_ok(digits) is ok


long_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12).map(str.encode)),
                    min_size=10, max_size=80).map(b"".join)


@SETTINGS
@given(st.lists(long_text, min_size=1, max_size=4), st.sampled_from([25, 114]),
       st.lists(st.integers(0, 10_000), max_size=4))
def test_detectors_on_long_cells_match_reference(values, oid, cuts):
    # long cells: the compiled path searches only windows around Hyperscan's end offsets
    plan = build_plan([column_mask(None, detect=True, oid=oid)] * len(values), DETECTORS)
    stream = datarow(values) + datarow(values[::-1])
    assert run(RowRewriter(), [(plan, stream)], cuts) == \
        run(ReferenceRewriter(), [(plan, stream)], [])


@SETTINGS
@given(st.lists(cell_value, min_size=1, max_size=6))
def test_prefilter_never_misses_what_the_locator_finds(values):
    # the compiled path (Hyperscan flags, re locates) equals re on every cell
    for json_kind in (False, True):
        for v in values:
            want = DETECTORS.mask_cell(v, DETECTORS.all_bits, json_kind)
            hits: list[int] = []
            DETECTORS.db.scan(v, match_event_handler=lambda i, f, t, fl, c: hits.append(i))
            bits = 0
            for i in hits:
                bits |= 1 << i
            assert DETECTORS.mask_cell(v, bits, json_kind) == want


@SETTINGS
@given(st.lists(st.sampled_from([b"@", b"a", b".", b"-", b" ", b"x" * 70, b"b.c", b"co", b"_",
                                 b"\xc3\xa9", b"bob@example.com", b"@@", b"1"]),
                max_size=30).map(b"".join))
def test_email_fast_locator_equals_the_regex(cell):
    regex = re.compile(BUILTIN["email"].locator)
    assert BUILTIN["email"].locate(cell) == [m.span() for m in regex.finditer(cell)]


def test_custom_pattern_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"detectors\.custom\[1\]\.pattern"):
        DetectorSet.from_config([], [{"name": "ok", "pattern": "a+"},
                                     {"name": "bad", "pattern": "(a)\\1"}])
    with pytest.raises(ConfigError, match=r"detectors\.custom\[0\]\.pattern"):
        DetectorSet.from_config([], [{"name": "x", "pattern": "a*"}])   # matches empty
    with pytest.raises(ConfigError, match=r"detectors\.custom\[0\]\.pattern"):
        DetectorSet.from_config([], [{"name": "x", "pattern": "(unclosed"}])
    with pytest.raises(ConfigError, match=r"detectors\.builtin\[0\]"):
        DetectorSet.from_config(["nope"], [])
    cfg = Detectors(builtin=["email"], custom=[])
    assert DetectorSet.from_config(cfg.builtin, cfg.custom).names == ("email",)
    assert DetectorSet.from_config([], []) is None


def test_cell_kind():
    assert cell_kind(25) == cell_kind(1043) == cell_kind(1042) == cell_kind(19) == KIND_TEXT
    assert cell_kind(23) == KIND_OTHER
    assert cell_kind(16385, textlike=True) == KIND_TEXT      # an extension type (citext)
    assert cell_kind(3802, binary=True) == KIND_JSONB_BINARY
    assert column_mask(Mask(column="a.b.c"), oid=1700).action == ACTION_NULL
    # numeric/int8/float8/xid8 can hold a card or phone number: scanned (a match is
    # NULL) as the digits a client prints, in text and binary format; int4 cannot
    for oid in (1700, 20, 701, 5069):
        assert column_mask(None, oid=oid, detect=True).action == ACTION_DETECT
        assert cell_kind(oid) == (KIND_FLOAT8_TEXT if oid == 701 else KIND_WHOLE)
        assert cell_kind(oid, binary=True) in (KIND_INT8_BINARY, KIND_UINT8_BINARY,
                                               KIND_NUMERIC_BINARY, KIND_FLOAT8_BINARY)
        assert column_mask(None, oid=oid, binary=True, detect=True).action == ACTION_DETECT
        assert column_mask(Mask(column="a.b.c"), oid=oid, binary=True).action == ACTION_NULL
    assert column_mask(None, oid=23, detect=True).action == ACTION_NONE
    assert column_mask(None, oid=25, detect=True).action == ACTION_DETECT
    with pytest.raises(ValueError, match="needs a key"):
        column_mask(Mask(column="a.b.c", strategy="hash"))
    assert isinstance(build_plan([]), MaskPlan)


# digit-dense text: the compiled core's own digit prefilter (credit_card, phone) and its
# C locators (credit_card with Luhn and digit groups, ssn with its ranges, email) against
# the reference's re on every cell
DIGITY = [b"0", b"1", b"4", b"5", b"9", b"6", b" ", b"-", b".", b"(", b")", b"+", b"a", b"_",
          b"x", b"\\", b"\xc3\xa9", b"\n", b",", b"{", b'"', b"1111", b"4111", b"666",
          b"000", b"00", b"0000", b"123-45-6789", b"4111 1111 1111 1111", b"378282246310005",
          b"555-123-4567", b"6011111111111117", b"9", b"12", b"34", b"--", b"  ",
          b"@", b"bob", b"@ex", b"ample", b".com", b".c", b"o", b"m", b"%", b"+", b"Z",
          b"a" * 30, b"b" * 40, b"bob@example.com", b"x@y.io", b"@@", b".-", b"q_"]
digit_text = st.lists(st.sampled_from(DIGITY), max_size=40).map(b"".join)


@SETTINGS
@given(st.lists(digit_text, min_size=1, max_size=4),
       st.sampled_from([25, 114, 3802, 1009, 142]), st.booleans(),
       st.sampled_from([["credit_card", "ssn", "phone"], ["credit_card"], ["ssn"],
                        ["phone"], ["email"], ["email", "ssn"], list(BUILTIN)]))
def test_native_digit_detectors_match_reference(values, oid, copy, names):
    dets = DetectorSet.from_config(names, [])
    plan = build_plan([column_mask(None, detect=True, oid=oid)] * len(values), dets,
                      copy_format("text") if copy else None)
    if copy:
        def esc(v: bytes) -> bytes:
            return (v.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")
                    .replace(b"\t", b"\\t").replace(b"\r", b"\\r"))
        stream = msg(b"d", b"\t".join(esc(v) for v in values) + b"\n")
    else:
        stream = datarow(values) + datarow(values[::-1])
    assert run(RowRewriter(), [(plan, stream)], []) == \
        run(ReferenceRewriter(), [(plan, stream)], [])


def test_native_split_covers_every_prefilter():
    # what the core scans with Hyperscan plus what it prefilters in C is every detector
    hs_ids = set()
    for v in FRAGMENTS:
        DETECTORS.hs_db.scan(v, match_event_handler=lambda i, f, t, fl, c: hs_ids.add(i))
    native = {DETECTORS.native[k] for k in ("credit_card", "phone")}
    assert not hs_ids & native
    assert set(DETECTORS.native) == {"credit_card", "phone", "ssn", "email"}
    assert DetectorSet.from_config(["credit_card", "phone"], []).hs_db is None
