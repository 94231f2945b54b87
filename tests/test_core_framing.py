# The compiled frame reader and relay scan agree with the pure-Python reference on
# the same bytes, however they are split across reads.
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pgguard._core import FrameError, FrameReader, MessageScan, WriteBuffer
from pgguard.protocol.reference import ReferenceFrameReader, merge_runs, reference_scan

TYPES = b"BCdcfDEHFPQSXZTDN"


@st.composite
def message(draw):
    t = draw(st.sampled_from(list(TYPES)))
    body = draw(st.binary(max_size=300))
    if t == ord("Z"):
        body = draw(st.sampled_from([b"I", b"T", b"E"]))
    return bytes((t,)) + struct.pack("!I", len(body) + 4) + body


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return [c for c in out if c]


@settings(max_examples=400, deadline=None)
@given(st.lists(message(), max_size=25), st.lists(st.integers(0, 10_000), max_size=20),
       st.sampled_from([b"", b"Q", b"QP", b"ZT", b"BCdcfDEHFPQSXZTN"]))
def test_withhold_scan_matches_reference(msgs, cuts, interest):
    stream = b"".join(msgs)
    scan = MessageScan(interest=interest, counted=b"QSF", withhold=True)
    got = []
    for chunk in split(stream, cuts):
        got.extend(scan.feed(chunk))
    want, count, status = reference_scan(stream, interest, True, b"QSF")
    assert merge_runs(got) == merge_runs(want)
    assert scan.count == count
    assert scan.at_boundary


@settings(max_examples=400, deadline=None)
@given(st.lists(message(), max_size=25), st.lists(st.integers(0, 10_000), max_size=20),
       st.sampled_from([b"", b"T", b"CZE"]))
def test_backend_scan_matches_reference(msgs, cuts, interest):
    stream = b"".join(msgs)
    scan = MessageScan(interest=interest, counted=b"Z", withhold=False)
    events = []
    for chunk in split(stream, cuts):
        events.extend(scan.feed(chunk))
    (forwarded, want_events), count, status = reference_scan(stream, interest, False, b"Z")
    assert events == want_events
    assert scan.count == count
    assert scan.status == status


def test_pass_through_chunk_is_the_same_object():
    scan = MessageScan(interest=b"Q", counted=b"S")
    chunk = b"B\x00\x00\x00\x04E\x00\x00\x00\x04S\x00\x00\x00\x04"
    out = scan.feed(chunk)
    assert len(out) == 1 and out[0] is chunk


@pytest.mark.parametrize("bad, reason", [
    (b"Q\x00\x00\x00\x02", "invalid message length 2"),
    (b"!\x00\x00\x00\x04", "invalid message type"),
    (b"Q\x7f\xff\xff\xff", "exceeds the limit"),
])
def test_malformed_frames_are_refused(bad, reason):
    # withholding (client side): what precedes comes back, the error is kept, and
    # nothing after it is read; forwarding (server side): it raises
    scan = MessageScan(valid=b"BCdcfDEHFPQSX", max_len=1 << 20)
    good = b"S\x00\x00\x00\x04"
    assert scan.feed(good + bad + good) == [good]
    assert isinstance(scan.error, FrameError) and reason in scan.error.args[0]
    assert scan.bad == bad[:5]
    assert scan.feed(good) == []
    fwd = MessageScan(valid=b"BCdcfDEHFPQSX", max_len=1 << 20, withhold=False)
    with pytest.raises(FrameError, match=reason):
        fwd.feed(bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(message(), max_size=20), st.lists(st.integers(0, 10_000), max_size=20))
def test_frame_reader_matches_reference(msgs, cuts):
    stream = b"".join(msgs)
    fast, ref = FrameReader(True), ReferenceFrameReader(True)
    got, want = [], []
    for chunk in split(stream, cuts):
        fast.feed(chunk)
        ref.feed(chunk)
        while (m := fast.next_message()) is not None:
            got.append(m)
        while (m := ref.next_message()) is not None:
            want.append(m)
    assert got == want == [(m[0], m[5:]) for m in msgs]


def test_frame_reader_untyped_and_limits():
    r = FrameReader(False, 10000)
    r.feed(struct.pack("!II", 8, 80877103))
    assert r.next_message() == (0, struct.pack("!I", 80877103))
    r.feed(struct.pack("!I", 20000))
    with pytest.raises(FrameError, match="exceeds the limit"):
        r.next_message()


def test_write_buffer_fills_lengths():
    b = WriteBuffer()
    b.new_message(ord("Z"))
    b.write_byte(ord("I"))
    b.end_message()
    b.new_message(ord("S"))
    b.write_str("a")
    b.write_str("b")
    b.end_message()
    assert b.take() == b"Z\x00\x00\x00\x05IS\x00\x00\x00\x08a\x00b\x00"
    with pytest.raises(ValueError):
        b.write_cstr(b"a\x00b")


@settings(max_examples=300, deadline=None)
@given(st.lists(message(), max_size=25), st.lists(st.integers(0, 10_000), max_size=20),
       st.sampled_from([b"Q", b"QP", b"BCdcfDEHFPQSXZTN"]))
def test_stop_after_each_withheld_message_loses_nothing(msgs, cuts, interest):
    stream = b"".join(msgs)
    scan = MessageScan(interest=interest, counted=b"QSF", withhold=True)
    scan.set_stop(TYPES, True)
    got = []
    for chunk in split(stream, cuts):
        items = scan.feed(chunk)
        while True:
            got.extend(items)
            rest = scan.take_rest()
            if rest is None:
                break
            # never more than one withheld message per feed
            assert sum(1 for it in items if isinstance(it, tuple)) == 1
            items = scan.feed(rest)
    want, count, _ = reference_scan(stream, interest, True, b"QSF")
    assert merge_runs(got) == merge_runs(want)


@settings(max_examples=400, deadline=None)
@given(st.lists(message(), max_size=25), st.lists(st.integers(0, 10_000), max_size=20),
       st.lists(st.booleans(), min_size=25, max_size=25))
def test_backend_mode_switches_forward_every_byte_once(msgs, cuts, toggles):
    """The upstream pipe forwards raw chunks, or (diverted) what the withholding scan
    returns; switching between the two anywhere must neither lose nor repeat a byte."""
    stream = b"".join(msgs)
    scan = MessageScan(interest=b"", counted=b"Z", withhold=False)
    out = bytearray()
    for i, chunk in enumerate(split(stream, cuts)):
        if toggles[i % len(toggles)]:
            if scan.withhold:
                if scan.set_withhold(False):
                    scan.set_interest(TYPES, False)
            else:
                scan.set_interest(TYPES, True)
                assert scan.set_withhold(True)
        items = scan.feed(chunk)
        if not scan.withhold:
            out += chunk
        else:
            for it in items:
                out += it if isinstance(it, bytes) else it[1]
    assert bytes(out) == stream
    assert scan.count == sum(1 for m in msgs if m[0] == ord("Z"))
