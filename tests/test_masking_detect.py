# Detectors inside arrays, composites, records, json/jsonb and xml, in text and binary
# result formats and every client mode; exempt identities get clear values in the
# columns they are exempt from (the detectors do not rescan them) and the detectors
# everywhere else.
import asyncio
import subprocess

import asyncpg
import psycopg
import pytest

import rawpg
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, UPSTREAM_PASSWORD, \
    UPSTREAM_USER
from masking_tap import DB, EMAILS, SSNS, env_fixture, leaks, psql_messages

VIEW = "CREATE OR REPLACE VIEW cust_v AS SELECT id, email, city FROM customers"


env = env_fixture("mask2det", VIEW)


def upstream_raw(pg, sql, fmt=0):
    c = rawpg.RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
    try:
        c.send(rawpg.parse(sql), rawpg.bind(result_formats=[fmt]), rawpg.execute(),
               rawpg.SYNC)
        return rawpg.rows(c.until_ready())
    finally:
        c.close()


def raw(port, sql, fmt=0, user=AGENT, password=AGENT_PASSWORD):
    c = rawpg.RawClient.connect(port, user, password, database=DB)
    try:
        c.send(rawpg.parse(sql), rawpg.bind(result_formats=[fmt]), rawpg.describe(),
               rawpg.execute(), rawpg.SYNC)
        return c.until_ready()
    finally:
        c.close()


# every statement: row 1 holds detector matches, row 2 none (ORDER BY id)
SHAPES = [
    "SELECT tags FROM docs ORDER BY id",
    "SELECT meta FROM docs ORDER BY id",
    "SELECT metas FROM docs ORDER BY id",
    "SELECT who FROM docs ORDER BY id",
    "SELECT whos FROM docs ORDER BY id",
    "SELECT x FROM docs ORDER BY id",
    "SELECT grid FROM docs ORDER BY id",
    "SELECT ROW(id, tags, who) FROM docs ORDER BY id",
    "SELECT d FROM docs d ORDER BY id",
    "SELECT ARRAY[body] FROM plain_notes WHERE id IN (1, 3) ORDER BY id",
    "SELECT json_build_object('b', body) FROM plain_notes WHERE id IN (2, 3) ORDER BY id",
    "SELECT xmlelement(name b, body) FROM plain_notes WHERE id IN (1, 3) ORDER BY id",
    "SELECT ARRAY[ROW(body, n)] FROM plain_notes WHERE id IN (2, 3) ORDER BY id",
    "SELECT jsonb_build_array(ARRAY[body]) FROM plain_notes WHERE id IN (1, 3) ORDER BY id",
    # bytea: its bytes in binary format, "\x" and their hex digits in text format
    "SELECT body::bytea FROM plain_notes WHERE id IN (1, 3) ORDER BY id",
    "SELECT convert_to(body, 'UTF8') FROM plain_notes WHERE id IN (2, 3) ORDER BY id",
    "SELECT decode(encode(convert_to(body, 'UTF8'), 'base64'), 'base64') FROM plain_notes "
    "WHERE id IN (1, 3) ORDER BY id",
    "SELECT convert_to(upper(body), 'LATIN1') FROM plain_notes WHERE id IN (2, 3) ORDER BY id",
    "SELECT substring(body::bytea FROM 3) FROM plain_notes WHERE id IN (1, 3) ORDER BY id",
    # a bytea's hex spelling inside text, arrays, records and JSON
    "SELECT body::bytea::text FROM plain_notes WHERE id IN (1, 3) ORDER BY id",
    "SELECT ARRAY[body::bytea] FROM plain_notes WHERE id IN (2, 3) ORDER BY id",
    "SELECT ROW(n, convert_to(body, 'UTF8')) FROM plain_notes WHERE id IN (1, 3) ORDER BY id",
    "SELECT to_json(body::bytea) FROM plain_notes WHERE id IN (2, 3) ORDER BY id",
    "SELECT jsonb_build_object('k', ARRAY[body::bytea]) FROM plain_notes WHERE id IN (1, 3) "
    "ORDER BY id",
    "SELECT 'see ' || substring(body::bytea FROM 2)::text || ' end' FROM plain_notes "
    "WHERE id IN (2, 3) ORDER BY id",
    # PII next to a hex run: found in the text itself too
    "SELECT coalesce(substring(body FROM 'zq[^ ]*'), body) || '\\x303030303030' "
    "FROM plain_notes WHERE id IN (1, 3) ORDER BY id",
]


@pytest.mark.parametrize("fmt", [0, 1])
@pytest.mark.parametrize("sql", SHAPES)
def test_raw_text_and_binary(env, pg, sql, fmt):
    proxy, _ = env
    msgs = raw(proxy.port, sql, fmt)
    assert not rawpg.errors(msgs), rawpg.errors(msgs)
    got = rawpg.rows(msgs)
    want = upstream_raw(pg, sql, fmt)
    assert leaks([(b"D", b"".join(c for r in want for c in r if c))]), "no PII upstream?"
    assert leaks(msgs) == [], (sql, got)
    assert len(got) == len(want) == 2
    assert got[1] == want[1]                    # nothing found: byte-identical
    assert got[0] != want[0]


def run_client(mode, tap, sql, human=False):
    tap.reset()
    dsn = tap.dsn(human=human)
    if mode.startswith("psycopg"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(3 if "prepared" in mode else 1):
                conn.cursor(binary="binary" in mode).execute(
                    sql, prepare=True if "prepared" in mode else None).fetchall()
    elif mode == "asyncpg-x3":
        async def go():
            conn = await asyncpg.connect(dsn)
            try:
                for _ in range(3):
                    await conn.fetch(sql)
            finally:
                await conn.close()
        asyncio.run(go())
    else:
        return psql_messages("psql", tap, sql, human=human)
    return tap.messages()


CLIENT_MODES = ["psycopg-text", "psycopg-binary", "psycopg-prepared-x3", "asyncpg-x3",
                "psql"]


@pytest.mark.parametrize("mode", CLIENT_MODES)
@pytest.mark.parametrize("sql", [s for s in SHAPES if "ROW(" not in s and "docs d" not in s])
def test_client_modes(env, sql, mode):
    _, tap = env
    msgs = run_client(mode, tap, sql)
    assert not rawpg.errors(msgs), rawpg.errors(msgs)
    assert leaks(msgs) == [], (mode, sql)
    assert sum(1 for t, _ in msgs if t == b"D") >= 2


# -- exemptions: clear in the exempt columns, detectors everywhere else

@pytest.mark.parametrize("mode", CLIENT_MODES)
def test_exempt_columns_are_clear(env, pg, mode):
    _, tap = env
    msgs = run_client(mode, tap, "SELECT id, email, ssn FROM customers ORDER BY id",
                      human=True)
    data = b"".join(p for t, p in msgs if t == b"D")
    for v in EMAILS + SSNS:
        assert v.encode() in data, (mode, v)
    assert b"[email]" not in data and b"[ssn]" not in data


@pytest.mark.parametrize("sql,clear", [
    ("SELECT email FROM customers ORDER BY id", EMAILS),
    ("SELECT ssn, email FROM customers ORDER BY id", SSNS + EMAILS),
    ("SELECT c.email AS e FROM customers c JOIN customers d ON d.id = c.id", EMAILS),
    ("SELECT * FROM cust_v ORDER BY id", EMAILS),
    ("SELECT email FROM cust_v WHERE id > 0", EMAILS),
])
@pytest.mark.parametrize("fmt", [0, 1])
def test_exempt_identity_raw(env, pg, sql, clear, fmt):
    proxy, _ = env
    msgs = raw(proxy.port, sql, fmt, user=HUMAN, password=HUMAN_PASSWORD)
    got = rawpg.rows(msgs)
    assert got == upstream_raw(pg, sql, fmt)
    data = b"".join(c for r in got for c in r if c)
    assert all(v.encode() in data for v in clear)
    # the agent, not exempt, gets none of them
    msgs = raw(proxy.port, sql, fmt)
    assert leaks(msgs) == []


@pytest.mark.parametrize("sql", [
    "SELECT body FROM plain_notes ORDER BY id",
    "SELECT tags FROM docs ORDER BY id",
    "SELECT meta FROM docs ORDER BY id",
    "SELECT body, email FROM plain_notes JOIN customers USING (id) ORDER BY id",
    "SELECT lower(email) FROM customers ORDER BY id",
])
def test_exempt_identity_still_gets_detectors_elsewhere(env, pg, sql):
    # exempt from the column masks, not from the detectors: columns that are not the
    # exempt ones (and computed values) are scanned as for anyone
    proxy, _ = env
    msgs = raw(proxy.port, sql, 0, user=HUMAN, password=HUMAN_PASSWORD)
    got = rawpg.rows(msgs)
    first = [c for c in got[0]]
    if "JOIN" in sql:
        assert first[1] == EMAILS[0].encode()           # the exempt column: clear
        assert b"[email]" in first[0]                   # the note: scanned
    else:
        assert first[0] is None or b"[email]" in first[0] or b"[ssn]" in first[0], first


@pytest.mark.parametrize("sql,want", [
    ("SELECT tags FROM docs WHERE id = 1", b"{vip,[email]}"),
    ("SELECT who FROM docs WHERE id = 1", b"(home,[email],1)"),
    ("SELECT whos FROM docs WHERE id = 1", b'{"(w,[email],2)"}'),
    ("SELECT x FROM docs WHERE id = 1", b"<p>mail [email]</p>"),
    ("SELECT metas FROM docs WHERE id = 1", b'{"{\\"ssn\\": \\"[ssn]\\"}"}'),
    ("SELECT grid FROM docs WHERE id = 1", b"{{a,[ssn]},{b,c}}"),
])
def test_text_literals_labelled_in_place(env, sql, want):
    # text format: the labels go inside the literal, which stays valid (clients parse it)
    proxy, tap = env
    got = rawpg.rows(raw(proxy.port, sql, 0))
    assert got == [[want]]
    tap.reset()
    with psycopg.connect(tap.dsn(), autocommit=True) as conn:
        (value,) = conn.execute(sql).fetchone()
    assert value is not None and leaks(tap.messages()) == []


def test_literal_spans_that_touch_syntax_make_the_cell_null():
    # the compiled core and the reference agree: labels in place, or NULL when a span
    # covers the literal's syntax (a custom detector that matches across a comma)
    from pgguard._core.rowmask import RowRewriter
    from pgguard.masking.detectors import DetectorSet
    from pgguard.masking.reference import ReferenceRewriter
    from pgguard.masking.strategies import KIND_LITERAL, build_plan, cell_kind, column_mask
    import struct
    ds = DetectorSet.from_config(["email"], [{"name": "pair", "pattern": r"k1,k2"}])
    cols = [column_mask(None, oid=1009, detect=True)]
    assert cols[0].kind == KIND_LITERAL == cell_kind(1009)

    def row(v):
        body = struct.pack("!hi", 1, len(v)) + v
        return b"D" + struct.pack("!I", len(body) + 4) + body
    stream = row(b"{a@b.io,x}") + row(b"{k1,k2}") + row(b"{plain}")
    outs = []
    for rw in (RowRewriter(), ReferenceRewriter()):
        rw.set_plan(build_plan(cols, ds))
        outs.append(rw.feed(stream))
    assert outs[0] == outs[1]
    assert outs[0] == row(b"{[email],x}") + b"D\0\0\0\x0a\0\x01\xff\xff\xff\xff" + \
        row(b"{plain}")


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
@pytest.mark.parametrize("sql", ["SELECT id, body::bytea FROM plain_notes ORDER BY id",
                                 "SELECT convert_to(body, 'UTF8'), n FROM plain_notes"])
def test_bytea_copied_out_is_scanned(env, pg, sql, fmt):
    """COPY of a bytea spelling detected PII: its cell is NULL in text and csv (the
    hex digits spell the bytes) as in binary (the bytes themselves)."""
    proxy, _ = env
    copy = f"COPY ({sql}) TO STDOUT WITH (FORMAT {fmt})"
    c = rawpg.RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
    try:
        assert leaks(c.run(copy)) or fmt == "binary"    # (binary: raw bytes, unscanned)
    finally:
        c.close()
    c = rawpg.RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        msgs = c.run(copy)
    finally:
        c.close()
    if fmt == "binary":             # COPY BINARY of data under detectors is not let out
        assert rawpg.errors(msgs) or leaks(msgs) == [], msgs
        return
    assert not rawpg.errors(msgs), rawpg.errors(msgs)
    assert leaks(msgs) == [], (fmt, sql)
    lines = b"".join(p for t, p in msgs if t == b"d").splitlines()
    assert len(lines) == 3


@pytest.mark.parametrize("sql", [
    "COPY plain_notes TO STDOUT (FORMAT binary)",
    "COPY plain_notes (body) TO STDOUT WITH (FORMAT 'binary')",
    "COPY plain_notes TO STDOUT BINARY",
    "COPY (SELECT body FROM plain_notes) TO STDOUT (FORMAT binary)",
    "COPY (SELECT 'write to zqalpha.7731@example.com' AS x) TO STDOUT (FORMAT binary)"])
def test_binary_copy_under_detectors_is_refused(env, pg, psql_bin, sql):
    """Red team, round 21 (helper 114): a binary COPY of a table without masked columns
    skipped the detectors (they read text and csv fields): the emails and keys an agent
    had copied into its own table came out in clear. Refused for an identity the
    detectors watch, through a raw client (simple and extended) and psycopg; text and
    csv COPY still run, masked."""
    proxy, _ = env
    c = rawpg.RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        for msgs in (c.run(sql), (c.send(rawpg.parse(sql) + rawpg.bind() + rawpg.execute()
                                         + rawpg.SYNC), c.until_ready())[1]):
            assert [e["C"] for e in rawpg.errors(msgs)] == ["42501"], msgs
            assert not [p for t, p in msgs if t == b"d"] and leaks(msgs) == [], msgs
    finally:
        c.close()
    with psycopg.connect(proxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB)) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.cursor().copy(sql) as cp:
                for _ in cp:
                    pass
        conn.rollback()
        text = sql.replace("(FORMAT binary)", "(FORMAT csv)").replace(
            "WITH (FORMAT 'binary')", "(FORMAT csv)").replace(" BINARY", "")
        with conn.cursor().copy(text) as cp:
            out = b"".join(bytes(b) for b in cp)
        assert out and b"zqalpha.7731@example.com" not in out, out

    async def via_asyncpg():
        import io
        a = await asyncpg.connect(proxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB))
        try:
            buf = io.BytesIO()
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await a.execute(sql)            # (asyncpg's copy API names the format itself)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await a.copy_from_table("plain_notes", output=buf, format="binary")
            assert b"zqalpha" not in buf.getvalue()
        finally:
            await a.close()
    asyncio.run(via_asyncpg())
    r = subprocess.run([psql_bin, "-X", "-d", proxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB),
                        "-c", sql], capture_output=True, timeout=60)
    assert r.returncode != 0 and b"zqalpha" not in r.stdout, r
