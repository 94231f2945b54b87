# Red team, round 21 (helper 111, psycopg's own suite): a card number (Luhn-valid, found
# by the credit_card detector) stored in an int8, xid8-like, numeric or float8 column came
# back NULL in text format but in clear in binary format, which is asyncpg's default and
# psycopg's binary cursors': the detectors scanned only the text form ("their binary forms
# spell no digits"), yet a client decodes the 8 bytes to the very same number. In binary
# format the detectors now scan the digits a client prints of the value. Judged by what
# each client decodes and by the bytes it received, through psycopg (text, binary,
# prepared three times, a server-side cursor), asyncpg (prepared three times, a cursor), a
# raw client (text and binary) and a pipeline; innocent numbers come back as they are.
import asyncio
import decimal
import struct

import asyncpg
import psycopg
import pytest

import rawpg
from conftest import AGENT, AGENT_PASSWORD
from masking_tap import DB, env_fixture

CARDS = [4111111111111111, 5500005555555559, 378282246310005]      # Luhn-valid
PLAIN = [4111111111111112, 1234, 99999999]                          # not cards
SETUP = """
DROP TABLE IF EXISTS dg_nums;
CREATE TABLE dg_nums (id int PRIMARY KEY, i8 int8, num numeric, f8 float8, fnum numeric);
INSERT INTO dg_nums VALUES
  (1, 4111111111111111, 5500005555555559, 4111111111111111, 4111111111111111.25),
  (2, 5500005555555559, 378282246310005, 5500005555555559, -378282246310005.000),
  (3, 378282246310005, 4111111111111111, 378282246310005, 5500005555555559.5),
  (11, 4111111111111112, 1234, 4111111111111112, 12.5),
  (12, 1234, 99999999, 1234.5, 0.000001),
  (13, 99999999, 4111111111111112, 99999999, -7);
"""
SQL = "SELECT id, i8, num, f8, fnum FROM dg_nums ORDER BY id"
env = env_fixture("digits", SETUP)


def _check(rows_):
    """Rows as the client decoded them: the cards are NULL, the others intact."""
    got = {r[0]: tuple(r[1:]) for r in rows_}
    assert set(got) == {1, 2, 3, 11, 12, 13}, got
    for i in (1, 2, 3):
        assert got[i] == (None, None, None, None), (i, got[i])
    assert got[11][0] == 4111111111111112 and got[11][1] == 1234 and float(got[11][3]) == 12.5
    assert got[12][0] == 1234 and got[12][1] == 99999999 and float(got[12][2]) == 1234.5
    assert got[13][0] == 99999999 and got[13][1] == 4111111111111112


def _no_binary_card(payloads: bytes):
    for c in CARDS:
        assert struct.pack("!q", c) not in payloads
        assert struct.pack("!d", float(c)) not in payloads
        assert str(c).encode() not in payloads


def _dsn(proxy):
    return proxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("prepare", [False, True])
def test_psycopg(env, binary, prepare):
    proxy, tap = env
    with psycopg.connect(_dsn(proxy).replace(str(proxy.port), str(tap.port)),
                         autocommit=True) as c:
        tap.reset()
        for _ in range(3 if prepare else 1):
            _check(c.cursor(binary=binary).execute(SQL, prepare=prepare).fetchall())
        with c.transaction():
            cur = c.cursor("dg_cur", binary=binary)
            cur.execute(SQL)
            _check(cur.fetchmany(2) + cur.fetchall())
            cur.close()
        with c.pipeline():
            a = c.cursor(binary=binary).execute(SQL)
            b = c.cursor(binary=not binary).execute(SQL)
        _check(a.fetchall())
        _check(b.fetchall())
        _no_binary_card(b"".join(p for _, p in tap.messages()))


def test_asyncpg(env):
    proxy, tap = env

    async def main():
        a = await asyncpg.connect(_dsn(proxy).replace(str(proxy.port), str(tap.port)))
        try:
            tap.reset()
            st = await a.prepare(SQL)
            for _ in range(3):
                _check([tuple(r) for r in await st.fetch()])
            _check([tuple(r) for r in await a.fetch(SQL)])
            async with a.transaction():
                _check([tuple(r) async for r in a.cursor(SQL, prefetch=2)])
            got = await a.fetchval("SELECT i8 FROM dg_nums WHERE id = $1", 1)
            assert got is None
        finally:
            await a.close()
    asyncio.run(main())
    _no_binary_card(b"".join(p for _, p in tap.messages()))


@pytest.mark.parametrize("fmt", [0, 1])
def test_raw(env, fmt):
    proxy, _ = env
    c = rawpg.RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        for _ in range(3):
            c.send(rawpg.parse(SQL) + rawpg.bind(result_formats=[fmt]) + rawpg.execute() +
                   rawpg.SYNC)
            msgs = c.until_ready()
            assert not rawpg.errors(msgs), msgs
            rows_ = rawpg.rows(msgs)
            assert len(rows_) == 6
            for r in rows_[:3]:
                assert r[1:] == [None] * 4, r
            _no_binary_card(b"".join(p for _, p in msgs))
    finally:
        c.close()


def test_the_digits_scanned_are_the_ones_postgres_prints(pg):
    # the core renders a binary numeric / float8 / int8 as a client prints it: checked
    # against Postgres' own text of the same values
    from pgguard.masking.reference import _digits_text
    from pgguard.masking.strategies import (KIND_FLOAT8_BINARY, KIND_INT8_BINARY,
                                            KIND_NUMERIC_BINARY)
    vals = ["0", "-0.001", "0.000001", "1234.5678", "100000000", "12.30", "-7",
            "4111111111111111.25", "12345678901234567890.123456789", "0.10", "1e-20",
            "99999999999999999999999999", "-0.0000000001"]
    for v in vals:
        text = pg.execute(f"SELECT '{v}'::numeric::text", dbname=DB)[0][0]
        raw = pg.execute(f"SELECT numeric_send('{v}'::numeric)", dbname=DB)[0][0]
        assert _digits_text(KIND_NUMERIC_BINARY, bytes(raw)) == text.encode(), v
    for v in (0, -1, 4111111111111111, -(2 ** 63), 2 ** 63 - 1):
        assert _digits_text(KIND_INT8_BINARY, struct.pack("!q", v)) == str(v).encode()
    for f in (0.1, 123567.1234, 4111111111111111.0, -5.5):
        assert float(_digits_text(KIND_FLOAT8_BINARY, struct.pack("!d", f))) == f
    assert decimal.Decimal(_digits_text(KIND_FLOAT8_BINARY,
                                        struct.pack("!d", 4111111111111111.0)).decode()) \
        == 4111111111111111


CONTAINERS = [
    "SELECT ARRAY[i8] FROM dg_nums WHERE id = {i}",
    "SELECT ARRAY[[num, num]] FROM dg_nums WHERE id = {i}",
    "SELECT ARRAY[f8] FROM dg_nums WHERE id = {i}",
    "SELECT ROW(id, i8) FROM dg_nums WHERE id = {i}",
    "SELECT ARRAY[ROW(id, num)] FROM dg_nums WHERE id = {i}",
    "SELECT (SELECT array_agg(fnum) FROM dg_nums d WHERE d.id = n.id) FROM dg_nums n "
    "WHERE id = {i}",
]


@pytest.mark.parametrize("sql", CONTAINERS)
def test_numbers_inside_binary_arrays_and_records(env, sql):
    # (helper 114) the binary forms of arrays and records of these types carried the
    # card numbers as raw element bytes, which the detectors do not read as digits:
    # their numbers are scanned as printed now (rows 1-3 hold cards, 11-13 do not)
    proxy, tap = env

    async def main():
        a = await asyncpg.connect(_dsn(proxy).replace(str(proxy.port), str(tap.port)))
        try:
            tap.reset()
            for i in (1, 2, 3):
                assert await a.fetchval(sql.format(i=i)) is None, i
            for i in (11, 13):
                assert await a.fetchval(sql.format(i=i)) is not None, i
        finally:
            await a.close()
    asyncio.run(main())
    _no_binary_card(b"".join(p for _, p in tap.messages()))
    with psycopg.connect(_dsn(proxy), autocommit=True) as c:
        for binary in (True, False):
            for i in (1, 2, 3):
                got = c.cursor(binary=binary).execute(sql.format(i=i)).fetchone()[0]
                # binary: NULL; text: NULL, or the detector's label in place of the number
                assert got is None or (not binary and "[credit_card]" in str(got)), got
                assert not any(str(card) in str(got) or str(float(card)) in str(got)
                               for card in CARDS), got


@pytest.mark.parametrize("sql", [
    "SELECT f8::text FROM dg_nums WHERE id = {i}", "SELECT format('%s', f8) FROM dg_nums "
    "WHERE id = {i}", "SELECT ARRAY[f8]::text FROM dg_nums WHERE id = {i}",
    "SELECT to_json(f8) FROM dg_nums WHERE id = {i}", "SELECT ROW(f8)::text FROM dg_nums "
    "WHERE id = {i}"])
def test_a_float_in_exponent_form_inside_text(env, sql):
    # (helper 114) Postgres prints a float8 from 1e15 in exponent form, which a client
    # reads back as the card's 16 digits: inside text, JSON and arrays too
    proxy, _ = env
    with psycopg.connect(_dsn(proxy), autocommit=True) as c:
        for binary in (False, True):
            for i in (1, 2, 3):
                got = c.cursor(binary=binary).execute(sql.format(i=i)).fetchone()[0]
                assert got is None or "e+1" not in str(got), (i, got)
            got = c.cursor(binary=binary).execute(sql.format(i=11)).fetchone()[0]
            assert got is not None              # 4111111111111112: not a card


@pytest.mark.parametrize("fmt", ["text", "csv"])
def test_copy_of_the_numbers(env, fmt):
    # (helper 114) COPY has no column types: the float8's exponent form went out in clear
    proxy, _ = env
    with psycopg.connect(_dsn(proxy), autocommit=True) as c:
        with c.cursor().copy(f"COPY dg_nums TO STDOUT (FORMAT {fmt})") as cp:
            out = b"".join(bytes(b) for b in cp)
    lines = out.decode().splitlines()
    assert len(lines) == 6, lines
    for card in CARDS:
        assert str(card).encode() not in out and repr(float(card)).encode() not in out
    for exp in (b"4.111111111111111e+15", b"5.500005555555559e+15", b"3.78282246310005e+14"):
        assert exp not in out, out
    assert "4111111111111112" in lines[3], lines          # an innocent row, intact


def test_psql(env, psql_bin):
    # psql reads text: the same NULLs and labels, judged by every backend message it got
    from masking_tap import psql_messages
    _, tap = env
    for sql in (SQL, CONTAINERS[0].format(i=1), CONTAINERS[3].format(i=2),
                "SELECT f8::text, to_json(f8) FROM dg_nums WHERE id = 3",
                "SELECT i8 FROM dg_nums WHERE id = 11"):
        msgs = psql_messages(psql_bin, tap, sql)
        blob = b"".join(p for _, p in msgs)
        _no_binary_card(blob)
        for exp in (b"4.111111111111111e+15", b"5.500005555555559e+15",
                    b"3.78282246310005e+14"):
            assert exp not in blob, (sql, blob)
    assert b"4111111111111112" in blob          # the innocent number, as it is
