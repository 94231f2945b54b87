# The literal-insensitive shape key: literals become NUL, code never does.
import pytest
from hypothesis import given, strategies as st

from pgguard._core.sqlshape import shape


@pytest.mark.parametrize("sql, want", [(a, b if b is None else b.replace(b"?", b"\0"))
                                       for a, b in [
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
     b"SELECT abalance FROM pgbench_accounts WHERE aid = ?;"),
    (b"select 'it''s', E'a\\'b', 1.5e3, .5, 0xFF, 1_000 from t",
     b"select ?, E?, ?, ?, ?, ? from t"),
    (b'select x1, t2.c3, "q\'1", $1, a$b from t', b'select x1, t2.c3, "q\'1", $1, a$b from t'),
    (b"DO $$ BEGIN DROP TABLE t; END $$", b"DO $$ BEGIN DROP TABLE t; END $$"),
    (b"DO $f$ x $$ y $f$", b"DO $f$ x $$ y $f$"),
    (b"select 1 /* '2' /* 3 */ */ -- '4'\n", b"select ? /* '2' /* 3 */ */ -- '4'\n"),
    (b"select 'open", None),
    (b'select * from U&"d!0061ta" UESCAPE \'!\'', None),
    (b"select /* open", None),
    (b"select $q$ open", None),
    (b'select "open', None),
]])
def test_shapes(sql, want):
    assert shape(sql) == want


def test_string_bodies_of_do_keep_their_words_apart():
    # a single-quoted DO body becomes '?': the classifier marks DO as literal-sensitive,
    # so such a shape is never shared; the key itself just has to differ from code
    assert shape(b"DO 'BEGIN NULL; END'") == b"DO \0"
    assert shape(b"DO $$BEGIN NULL; END$$") != shape(b"DO $$BEGIN DROP TABLE t; END$$")


# SQL text never holds a NUL byte (the protocol ends strings with it)
@given(st.lists(st.one_of(st.integers(0, 10**12),
                          st.text(st.characters(blacklist_characters="\x00",
                                                blacklist_categories=("Cs",)), max_size=20)),
                max_size=5))
def test_same_shape_for_different_literals(values):
    def render(vals):
        parts = []
        for v in vals:
            parts.append(str(v) if isinstance(v, int) else "'" + v.replace("'", "''") + "'")
        return ("SELECT * FROM t WHERE " + " AND ".join(f"c = {p}" for p in parts)).encode()
    other = [0 if isinstance(v, int) else "x" for v in values]
    if any("u&" in v.lower() for v in values if isinstance(v, str)):
        # any text holding U& gets no shape at all (UESCAPE may change what follows):
        # decided by exact text only, never shared (hypothesis found 'U&' as a value)
        assert shape(render(values)) is None
        return
    assert shape(render(values)) == shape(render(other))


@given(st.binary(max_size=200))
def test_never_crashes(data):
    out = shape(data)
    assert out is None or isinstance(out, bytes)
