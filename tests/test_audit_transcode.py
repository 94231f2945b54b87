# The compiled writer path (auditline.Transcoder) against the canonical form record.py
# defines: the same line bytes and chain for any record, and None (the msgspec path)
# for anything it must not decide itself.
from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import msgspec
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgguard._core import auditline
from pgguard.audit import ipc, storage
from pgguard.audit.record import (FIELDS, GENESIS, AuditRecord, chain_hash, content_bytes,
                                  prepare_statement)
from pgguard.audit.writerproc import WIRE_SPEC

UTC = timezone.utc
PREFIX = b"01JD0000000ABCDEFGH"[:18]
NOW_US = 1_763_700_000_123_456
_enc = msgspec.msgpack.Encoder()


def payload(rows: list[tuple]) -> bytes:
    # what the worker sends: ARRAY32 + count + each row encoded on its own
    return ipc.ARRAY32 + len(rows).to_bytes(4, "big") + b"".join(map(_enc.encode, rows))


def prepare(sql: str) -> str:
    return prepare_statement(sql, False)


def reference(records: list[AuditRecord], ctr: int, prev: str = GENESIS):
    # the canonical lines and chain, from record.py's definitions (the wire carries
    # instants: a ts in another zone arrives in UTC)
    lines, hashes = [], []
    for i, r in enumerate(records):
        r = msgspec.structs.replace(
            r, event_id=auditline.event_id(PREFIX, ctr + i + 1),
            ts=r.ts.astimezone(UTC) if r.ts else datetime.fromtimestamp(NOW_US / 1e6, UTC).replace(
                microsecond=NOW_US % 1_000_000),
            statement=None if r.statement is None else prepare(r.statement))
        line = content_bytes(r)
        prev = chain_hash(prev, line)
        lines.append(line)
        hashes.append(prev)
    return lines, hashes


def run(records: list[AuditRecord], ctr: int = 0, per_frame: int = 4096, rows=None,
        tx=None):
    tx = tx or auditline.Transcoder(WIRE_SPEC, FIELDS, prepare)
    rows = rows if rows is not None else [msgspec.structs.astuple(r) for r in records]
    return tx.lines(payload(rows), len(rows), PREFIX, ctr, NOW_US, bytes(32), per_frame)


def columns(tx) -> pa.Table:
    t = storage.columns_table(*tx.take())
    t.validate(full=True)
    return t


def flat(chunks):
    lines, hashes = [], []
    for blob, digests, n in chunks:
        got = blob.split(b"\n")
        assert got.pop() == b"" and len(got) == n == len(digests) // 32
        lines += got
        hashes += [digests[i:i + 32].hex() for i in range(0, len(digests), 32)]
    return lines, hashes


text = st.text(st.characters(codec="utf-8"), max_size=40)
i64 = st.integers(-(1 << 63), (1 << 63) - 1)
opt = st.none() | text
stamps = st.none() | st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]))
records = st.builds(
    AuditRecord, session_id=text, event=text, event_id=text, ts=stamps, identity=opt,
    identity_kind=opt, client_addr=opt, application_name=opt, database=opt,
    upstream_user=opt,
    statement=st.none() | st.sampled_from([
        "SELECT * FROM t WHERE id = 42", "select 'x''y', $1, 1.5e3", "ALTER ROLE a PASSWORD 'pw'",
        "", "UPDATE t SET a = E'\\n' WHERE b = 'é€😀'"]) | text,
    fingerprint=opt, statement_kind=opt,
    relations=st.none() | st.lists(text, max_size=3),
    flags=st.none() | st.lists(text, max_size=3) | st.just(()),
    decision=opt, rule=opt, approver=opt, rows=st.none() | i64, bytes_out=st.none() | i64,
    masked_cells=st.none() | i64, duration_us=st.none() | i64, sqlstate=opt, error=opt,
    prev_hash=text, hash=text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, min_size=1, max_size=12), st.integers(0, (1 << 40) - 100),
       st.integers(1, 5))
def test_lines_chain_and_columns_are_the_canonical_ones(recs, ctr, per_frame):
    tx = auditline.Transcoder(WIRE_SPEC, FIELDS, prepare)
    chunks = run(recs, ctr, per_frame, tx=tx)
    assert chunks is not None
    assert [c[2] for c in chunks] == [min(per_frame, len(recs) - i)
                                      for i in range(0, len(recs), per_frame)]
    assert flat(chunks) == reference(recs, ctr)
    # the Arrow columns hold exactly what the lines say
    blob = b"".join(c[0] for c in chunks)
    assert columns(tx).equals(storage.content_table(blob))


def test_hashlib_fallback_gives_the_same_chain():
    recs = [AuditRecord(session_id=f"s{i}", event="statement", statement="SELECT 1",
                        rows=i) for i in range(50)]
    fast = run(recs)
    auditline.use_hashlib(True)
    try:
        slow = run(recs)
    finally:
        auditline.use_hashlib(False)
    assert fast == slow and flat(slow) == reference(recs, 0)
    assert auditline.OPENSSL is None or "libcrypto" in auditline.OPENSSL


def test_timestamps_at_the_edges():
    stamps = [datetime(1, 1, 1, tzinfo=UTC), datetime(1969, 12, 31, 23, 59, 59, 999999, UTC),
              datetime(1970, 1, 1, tzinfo=UTC), datetime(2000, 2, 29, 12, 0, 0, 10, UTC),
              datetime(2106, 2, 7, 6, 28, 16, tzinfo=UTC),     # past 32-bit seconds
              datetime(2514, 5, 30, 1, 53, 4, tzinfo=UTC),     # past 34-bit seconds
              datetime(9999, 12, 31, 23, 59, 59, 999999, UTC)]
    recs = [AuditRecord(session_id="s", event="connect", ts=t) for t in stamps]
    assert flat(run(recs, 7)) == reference(recs, 7)
    lines, _ = flat(run(recs))
    assert [msgspec.json.decode(ln)["ts"] for ln in lines] == [
        msgspec.json.encode(t).decode().strip('"') for t in stamps]


def row_with(**kw) -> tuple:
    r = list(msgspec.structs.astuple(AuditRecord(session_id="s", event="statement")))
    for k, v in kw.items():
        r[FIELDS.index(k)] = v
    return tuple(r)


@pytest.mark.parametrize("bad", [
    dict(ts=datetime(2024, 1, 1)),              # naive: msgspec sends it as text
    dict(rows=True),                            # a bool is not an int64
    dict(rows=1 << 63),                         # out of int64
    dict(rows=1.5),
    dict(session_id=None),                      # required
    dict(event=None),
    dict(identity=b"bytes"),
    dict(relations=["a", 1]),
    dict(flags="not-a-list"),
    dict(statement=7),
    dict(hash=None),
])
def test_values_the_msgspec_path_must_judge_give_none(bad):
    tx = auditline.Transcoder(WIRE_SPEC, FIELDS, prepare)
    good = [row_with(identity=f"ok{i}", relations=["a"] * i, rows=i or None)
            for i in range(11)]
    assert run([], rows=good, tx=tx) is not None
    assert run([], rows=[row_with(), row_with(**bad)], tx=tx) is None
    # the refused frame left no trace in the columns
    t = columns(tx)
    assert t.num_rows == 11 and t.column("identity").to_pylist() == [
        f"ok{i}" for i in range(11)]
    assert t.column("relations").to_pylist() == [["a"] * i for i in range(11)]


def test_invalid_utf8_and_sub_microsecond_timestamps_give_none():
    good = payload([row_with(identity="abc")])
    tx = auditline.Transcoder(WIRE_SPEC, FIELDS, prepare)
    assert tx.lines(good, 1, PREFIX, 0, NOW_US, bytes(32), 10) is not None
    i = good.index(b"abc")
    for bad in (b"\xff", b"\xed\xa0\x80"[:1] + b"\xa0", b"\xc0"):    # bad, surrogate, overlong
        data = good[:i] + bad + good[i + len(bad):]
        assert tx.lines(data, 1, PREFIX, 0, NOW_US, bytes(32), 10) is None
    # a timestamp with nanoseconds (another encoder's): not exactly representable
    ts = row_with(ts=datetime(2024, 1, 1, 0, 0, 1, 5, UTC))
    data = bytearray(payload([ts]))
    j = data.index(b"\xd7\xff")
    v = int.from_bytes(data[j + 2:j + 10], "big") + (1 << 34)      # +1 ns
    data[j + 2:j + 10] = v.to_bytes(8, "big")
    assert tx.lines(bytes(data), 1, PREFIX, 0, NOW_US, bytes(32), 10) is None
    # a count that does not match, trailing bytes, a short payload
    assert tx.lines(good, 2, PREFIX, 0, NOW_US, bytes(32), 10) is None
    assert tx.lines(good + b"\xc0", 1, PREFIX, 0, NOW_US, bytes(32), 10) is None
    assert tx.lines(good[:-3], 1, PREFIX, 0, NOW_US, bytes(32), 10) is None


def test_statements_are_normalized_and_secrets_never_reach_the_line():
    recs = [AuditRecord(session_id="s", event="statement",
                        statement="ALTER ROLE bob PASSWORD 'hunter2-secret'"),
            AuditRecord(session_id="s", event="statement",
                        statement="SELECT * FROM users WHERE email = 'ann@example.com'")] * 3
    chunks = run(recs)
    blob = b"".join(c[0] for c in chunks)
    assert b"hunter2" not in blob and b"ann@example.com" not in blob
    assert flat(chunks) == reference(recs, 0)


def test_event_ids_count_up_from_the_counter():
    recs = [AuditRecord(session_id="s", event="connect")] * 3
    lines, _ = flat(run(recs, ctr=1023))
    ids = [msgspec.json.decode(ln)["event_id"] for ln in lines]
    assert ids == sorted(ids) and len(set(ids)) == 3 and all(len(i) == 26 for i in ids)
    assert ids[0] == auditline.event_id(PREFIX, 1024)
    assert hashlib.sha256(bytes(32) + lines[0]).hexdigest() == flat(run(recs, 1023))[1][0]
