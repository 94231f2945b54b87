# The statement tracker assembles each audit row from parts encoded once (the session's
# columns, the statement shape's columns) and encodes only the time and the outcome
# itself; its timestamp bytes must be exactly msgspec's encoding of the same datetime,
# or the writer would decode another instant (or refuse the row).
from datetime import datetime, timedelta, timezone

import msgspec
import pytest

from pgguard._core.track import row_timestamp

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
enc = msgspec.msgpack.Encoder().encode


@pytest.mark.parametrize("us", [
    0, 1, 999_999, 1_000_000, 1_733_400_000_000_000, 1_733_400_000_123_456,
    (1 << 32) * 1_000_000 - 1, (1 << 32) * 1_000_000, (1 << 32) * 1_000_000 + 7,
    (1 << 34) * 1_000_000 - 1,
])
def test_timestamp_bytes_are_msgspecs(us):
    dt = EPOCH + timedelta(microseconds=us)
    assert row_timestamp(us) == enc(dt)
    assert msgspec.msgpack.decode(row_timestamp(us), type=datetime) == dt


def test_beyond_timestamp64_falls_back():
    # seconds past 2**34 (year 2514) need timestamp96: the tracker leaves those rows
    # to msgspec (returns None here)
    assert row_timestamp((1 << 34) * 1_000_000) is None
    assert row_timestamp(-1) is None


def test_rows_through_the_proxy_read_back_exactly(pg, make_proxy):
    """Statements of every route (simple, prepared three times, an error) through a real
    proxy: each record's columns as the statement made them, its time inside the run,
    and none coerced by the writer (a misencoded row would be)."""
    import psycopg
    from exactlib import audit_rows
    pg.execute("DROP TABLE IF EXISTS ar_t; CREATE TABLE ar_t (id int PRIMARY KEY, v text);"
               "INSERT INTO ar_t VALUES (1, 'a'), (2, 'b'), (3, 'c')", dbname="appdb")
    proxy = make_proxy()
    t0 = datetime.now(timezone.utc)
    with psycopg.connect(proxy.dsn(dbname="appdb", application_name="ar-app"),
                         autocommit=True) as c:
        c.execute("SELECT v FROM ar_t WHERE id = 1")
        for i in (1, 2, 3):
            c.execute("SELECT v FROM ar_t WHERE id = %s", (i,), prepare=True)
        c.execute("UPDATE ar_t SET v = 'z' WHERE id <= 2")
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute("INSERT INTO ar_t VALUES (1, 'dup')")
    proxy.stop()
    t1 = datetime.now(timezone.utc)
    rows = audit_rows(proxy, "SELECT statement, decision, rows, sqlstate, application_name, "
                             "database, identity, ts, error FROM audit WHERE event = "
                             "'statement' AND statement LIKE '%ar_t%' ORDER BY ts")
    got = [(r[0], r[1], r[2], r[3]) for r in rows]
    assert got == [
        ("SELECT v FROM ar_t WHERE id = $1", "allowed", 1, None),
        ("SELECT v FROM ar_t WHERE id = $1", "allowed", 1, None),
        ("SELECT v FROM ar_t WHERE id = $1", "allowed", 1, None),
        ("SELECT v FROM ar_t WHERE id = $1", "allowed", 1, None),
        ("UPDATE ar_t SET v = $1 WHERE id <= $2", "allowed", 2, None),
        ("INSERT INTO ar_t VALUES ($1, $2)", "error", 0, "23505"),
    ], got
    for r in rows:
        assert r[4:7] == ("ar-app", "appdb", "ci-agent"), r
        assert t0 - timedelta(seconds=1) <= r[7] <= t1, (r[7], t0, t1)
        assert r[8] is None or r[3] == "23505", r
    coerced = audit_rows(proxy, "SELECT count(*) FROM audit WHERE error LIKE '%coerced%'")
    assert coerced == [(0,)]


_INTS = [0, 1, 31, 32, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32,
         (1 << 63) - 1, -1, -32, -33, -128, -129, -32768, -32769, -(1 << 31),
         -(1 << 31) - 1, -(1 << 63)]
_STRS = [None, "", "allowed", "x" * 31, "x" * 32, "é" * 100, "y" * 255, "y" * 256,
         "z" * 65535, "z" * 65536, "日本語のエラー"]


@pytest.mark.parametrize("i", range(len(_INTS)))
def test_tail_bytes_are_msgspecs(i):
    # the outcome columns the tracker encodes in C: byte for byte msgspec's encoding of
    # the same values (decision .. error, then the two empty hashes), every int width
    # and sign and every str length class
    from pgguard._core.track import row_tail
    n = _INTS[i]
    s = _STRS[i % len(_STRS)]
    for duration in (None, n, 5):
        fields = ("error", s, _STRS[(i + 3) % len(_STRS)], n, abs(n) // 2, i * 1000,
                  duration, _STRS[(i + 5) % len(_STRS)], s, "", "")
        want = enc(fields)
        want = want[1:] if len(fields) <= 15 else want[3:]
        assert row_tail(*fields[:9]) == want, fields


def test_tail_leaves_what_it_cannot_encode_to_msgspec():
    from pgguard._core.track import row_tail
    assert row_tail("allowed", None, None, 0, 0, 1 << 64, None, None, None) is None
    assert row_tail("allowed", None, None, 0, 0, 0, None, None, "\ud800") is None
    assert row_tail("allowed", 5, None, 0, 0, 0, None, None, None) is None
