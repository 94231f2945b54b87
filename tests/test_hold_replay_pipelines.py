# A statement held on its way upstream (a called function's body read from the catalog
# first, an approval asked for, a blast-radius guard at work) with more of the client's
# stream pipelined behind it in the same write: once the hold ends, what came behind it
# goes on as if it had just arrived. Each shape is judged by the exact sequence of
# replies (against what Postgres itself answers for the same bytes, a refused statement
# standing for one that fails), by a trailing statement answered next (nothing missing,
# nothing extra), and by the rows upstream. A hang fails the test (socket and asyncio
# timeouts), it never blocks the suite.
import asyncio
import itertools
import socket
import time

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER
from guarded import guarded_proxy
from exactlib import messages
from rawpg import SYNC, RawClient, bind, data_row, error_fields, execute, frame, parse, query

DB = "appdb"
WAIT = 15           # seconds any one reply may take (an approval times out in 1s)

RULES = """
[[rules]]
name = "hr-deletes-from-hr-appr-need-approval"
when = { kind = "agent", statements = ["delete"], relations = ["public.hr_appr"] }
action = "approve"
timeout = "1s"

[[rules]]
name = "hr-no-deletes-from-hr-block"
when = { kind = "agent", statements = ["delete"], relations = ["public.hr_block"] }
action = "block"
"""

ROWS = [(i, "new") for i in range(1, 6)]
MISSING = "SELECT * FROM hr_no_such_table"      # fails at parse analysis, like a refusal


@pytest.fixture(scope="module", autouse=True)
def schema(pg):
    pg.execute("""
        DROP TABLE IF EXISTS hr_items, hr_appr, hr_block CASCADE;
        CREATE TABLE hr_items (id int PRIMARY KEY, v text);
        CREATE TABLE hr_appr (id int PRIMARY KEY, v text);
        CREATE TABLE hr_block (id int PRIMARY KEY, v text);
    """, dbname=DB)
    yield
    pg.execute("DROP TABLE IF EXISTS hr_items, hr_appr, hr_block CASCADE", dbname=DB)


@pytest.fixture(autouse=True)
def rows_reset(pg):
    for t in ("hr_items", "hr_appr", "hr_block"):
        pg.execute(f"DELETE FROM {t}; INSERT INTO {t} SELECT i, 'new' FROM "
                   "generate_series(1, 5) i", dbname=DB)


def table(pg, name: str) -> list:
    return pg.execute(f"SELECT id, v FROM {name} ORDER BY id", dbname=DB)


@pytest.fixture(scope="module", params=["audit", "noaudit"])
def guarded(request, pg, schema, tmp_path_factory):
    """Audit on: Bind/Execute/Sync reach Python; off: they go by as raw runs."""
    extra = "enabled = false" if request.param == "noaudit" else ""
    with guarded_proxy(pg, tmp_path_factory.mktemp("holdreplay"), RULES,
                       audit_extra=extra) as p:
        yield p


_serial = itertools.count(1)


def fresh(pg, kind: str) -> str:
    """A new function created directly upstream: pgguard has not read its body.
    read: counts rows; write: changes one row of hr_items (allowed, guarded);
    appr: deletes from hr_appr (an approval that times out); block: from hr_block."""
    n = next(_serial)
    name = f"hr_{kind}_{n}"
    body = {
        "read": "LANGUAGE sql AS 'SELECT count(*) FROM pg_class'",
        "write": "LANGUAGE sql AS $$UPDATE hr_items SET v = 'changed' WHERE id = 1; "
                 "SELECT 1::bigint$$",
        "appr": "LANGUAGE plpgsql AS $$DECLARE n bigint; BEGIN DELETE FROM hr_appr WHERE "
                "id > 0; GET DIAGNOSTICS n = ROW_COUNT; RETURN n; END$$",
        "block": "LANGUAGE plpgsql AS $$DECLARE n bigint; BEGIN DELETE FROM hr_block WHERE "
                 "id > 0; GET DIAGNOSTICS n = ROW_COUNT; RETURN n; END$$",
    }[kind]
    pg.execute(f"CREATE FUNCTION {name}() RETURNS bigint {body}", dbname=DB)
    return name


def ext(sql: str) -> bytes:
    return parse(sql) + bind() + execute() + SYNC


# ------------------------------------------------------------------ the wire, exactly

def replies(port: int, user: str, password: str, data: bytes, zs: int) -> list:
    """The replies to ``data`` (``zs`` ReadyForQuery expected), then to a trailing
    statement: (kind, detail) with row values; notices and parameter reports left out.
    The trailer's answer must come next: nothing of ``data`` is left unanswered or
    answered twice."""
    c = RawClient.connect(port, user, password, database=DB, timeout=WAIT)
    c.sock.settimeout(WAIT)
    try:
        c.send(data)
        seq = read_replies(c, zs)
        c.send(query("SELECT 'tail'"))
        tail = read_replies(c, 1)
        assert tail == [("T", None), ("D", ["tail"]), ("C", "SELECT 1"), ("Z", "I")], \
            (seq, tail)
        return seq
    except socket.timeout:
        raise AssertionError("no reply: the session hangs") from None
    finally:
        c.close()


def read_replies(c: RawClient, zs: int) -> list:
    seq = []
    while zs:
        t, p = c.read()
        if t in (b"N", b"S", b"A"):
            continue
        if t == b"E":
            seq.append(("E", error_fields(p)["C"]))
        elif t == b"C":
            seq.append(("C", p.rstrip(b"\0").decode()))
        elif t == b"D":
            seq.append(("D", [v.decode() if v is not None else None
                              for v in data_row(p)]))
        elif t == b"Z":
            seq.append(("Z", p.decode()))
            zs -= 1
        else:
            seq.append((t.decode(), None))
    return seq


def direct(pg, data: bytes, zs: int) -> list:
    """What Postgres answers for ``data`` (the function's own result values dropped:
    its body ran there)."""
    return replies(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, data, zs)


def through(proxy, data: bytes, zs: int) -> list:
    return replies(proxy.port, AGENT, AGENT_PASSWORD, data, zs)


def as_refused(seq: list) -> list:
    """Postgres' answer with MISSING standing for the refused statement: the same, the
    refusal's SQLSTATE for the table's."""
    return [("E", "42501") if x == ("E", "42P01") else x for x in seq]


# (name, build(fn, fn2) -> bytes, ReadyForQuery count)
SHAPES = [
    ("query+query", lambda f, f2: query(f"SELECT {f}()") + query("SELECT 5"), 2),
    ("query+query+query",
     lambda f, f2: query(f"SELECT {f}()") + query("SELECT 5") + query("SELECT 6"), 3),
    ("ext+query+query",
     lambda f, f2: ext(f"SELECT {f}()") + query(f"SELECT {f2}()") + query("SELECT 7"), 3),
    ("query+ext", lambda f, f2: query(f"SELECT {f}()") + ext("SELECT 8"), 2),
    ("query+ext+query",
     lambda f, f2: query(f"SELECT {f}()") + ext("SELECT 8") + query("SELECT 9"), 3),
    ("ext+ext", lambda f, f2: ext(f"SELECT {f}()") + ext("SELECT 10"), 2),
    ("query+two-ext-one-sync",
     lambda f, f2: query(f"SELECT {f}()") + parse("SELECT 11") + bind() + execute()
     + parse("SELECT 12") + bind() + execute() + SYNC, 2),
]
SHAPE_IDS = [s[0] for s in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_allowed_unread_function_then_more(pg, guarded, shape):
    """The function (a reader; the second one of ext+query+query too) is read first,
    then everything behind it runs and is answered in order."""
    _, build, zs = shape
    f, f2 = fresh(pg, "read"), fresh(pg, "read")
    want = direct(pg, build(f, f2), zs)
    f, f2 = fresh(pg, "read"), fresh(pg, "read")      # unread again for pgguard
    assert through(guarded, build(f, f2), zs) == want


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_allowed_writer_then_more(pg, guarded, shape):
    """A writing function (run under the blast-radius guard once its body is read)."""
    _, build, zs = shape
    f, f2 = fresh(pg, "write"), fresh(pg, "read")
    want = direct(pg, build(f, f2), zs)
    assert table(pg, "hr_items")[0] == (1, "changed")
    pg.execute("UPDATE hr_items SET v = 'new'", dbname=DB)
    f, f2 = fresh(pg, "write"), fresh(pg, "read")
    assert through(guarded, build(f, f2), zs) == want
    assert table(pg, "hr_items") == [(1, "changed")] + ROWS[1:]


@pytest.mark.parametrize("kind", ["block", "appr"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_refused_unread_function_then_more(pg, guarded, shape, kind):
    """The function's body deletes what a rule blocks (or wants approved, and nobody
    approves): refused as Postgres would answer a statement that fails there, and
    everything behind it answered as Postgres answers it; nothing deleted."""
    _, build, zs = shape
    f2 = fresh(pg, "read")
    want = as_refused(direct(pg, build_missing(build, f2), zs))
    f, f2 = fresh(pg, kind), fresh(pg, "read")
    assert through(guarded, build(f, f2), zs) == want
    assert table(pg, "hr_appr") == ROWS and table(pg, "hr_block") == ROWS


def build_missing(build, f2: str) -> bytes:
    """The shape with MISSING where the function's call stands (frames rebuilt)."""
    marker = "hr_marker_fn"
    out = b""
    for t, body in messages(build(marker, f2)):
        if marker.encode() in body:
            out += query(MISSING) if t == b"Q" else parse(MISSING)
        else:
            out += frame(t, body)
    return out


def test_second_refused_behind_a_held_first(pg, guarded):
    """Two unread functions in one write, the second refused: the first's hold ends,
    the second is read and refused, the rest runs."""
    f, b = fresh(pg, "read"), fresh(pg, "block")
    data = (query(f"SELECT {f}()") + query(f"SELECT {b}()") + ext("SELECT 13")
            + query("SELECT 14"))
    g = fresh(pg, "read")
    want = as_refused(direct(pg, query(f"SELECT {g}()") + query(MISSING) + ext("SELECT 13")
                             + query("SELECT 14"), 4))
    assert through(guarded, data, 4) == want
    assert table(pg, "hr_block") == ROWS


def test_refused_parse_with_raw_sync_behind(pg, guarded):
    """A refused Parse in the extended protocol: what follows up to its Sync is
    skipped as Postgres skips it (the Sync ends it, however the scan saw it), and the
    next segment runs."""
    b = fresh(pg, "block")
    data = ext(f"SELECT {b}()") + ext("SELECT 15") + query("SELECT 16")
    want = as_refused(direct(pg, ext(MISSING) + ext("SELECT 15") + query("SELECT 16"), 3))
    assert through(guarded, data, 3) == want


def test_guarded_query_then_extended_pipeline(pg, guarded):
    """No function at all: a guarded DELETE (blast radius) with a Parse/Bind/Execute/
    Sync behind it in one write (its Sync unwatched without the audit)."""
    data = query("DELETE FROM hr_items WHERE id = 2") + ext("SELECT 17") + query("SELECT 18")
    want = direct(pg, data, 3)
    pg.execute("INSERT INTO hr_items VALUES (2, 'new')", dbname=DB)
    assert through(guarded, data, 3) == want
    assert table(pg, "hr_items") == [r for r in ROWS if r[0] != 2]


def test_split_write_behind_a_held_statement(pg, guarded):
    """The hold ends while a message behind it is only partly read: it goes on once
    the message is whole, in order."""
    f = fresh(pg, "read")
    tail = query("SELECT 'x" + "y" * 200 + "'")
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB, timeout=WAIT)
    c.sock.settimeout(WAIT)
    try:
        c.send(query(f"SELECT {f}()") + query("SELECT 19") + tail[:40])
        time.sleep(1.0)         # the body is read, the hold ends meanwhile
        c.send(tail[40:])
        seq = read_replies(c, 3)
        vals = [x[1] for x in seq if x[0] == "D"]
        assert vals[1:] == [["19"], ["x" + "y" * 200]], seq
        assert [x for x in seq if x[0] == "E"] == [], seq
        assert rows_of(c.run("SELECT 20")) == [["20"]]
    except socket.timeout:
        raise AssertionError("no reply: the session hangs") from None
    finally:
        c.close()


def rows_of(msgs):
    return [[v.decode() for v in data_row(p)] for t, p in msgs if t == b"D"]


# ------------------------------------------------------------------ client libraries

def run_async(coro, timeout: float = 40):
    async def main():
        return await asyncio.wait_for(coro, timeout)
    try:
        return asyncio.run(main())
    except TimeoutError:
        raise AssertionError("no reply: the session hangs") from None


def test_psycopg_pipeline(pg, guarded):
    f, w = fresh(pg, "read"), fresh(pg, "write")
    b = fresh(pg, "block")

    async def main():
        async with await psycopg.AsyncConnection.connect(
                guarded.dsn(dbname=DB), autocommit=True) as c:
            async with c.pipeline():
                c1 = await c.execute(f"SELECT {f}() > 0")
                c2 = await c.execute(f"SELECT {w}()")
                c3 = await c.execute("SELECT 21")
                c4 = await c.execute("SELECT %s::int", (22,))
            assert await c1.fetchone() == (True,)
            assert await c2.fetchone() == (1,)
            assert await c3.fetchone() == (21,)
            assert await c4.fetchone() == (22,)
            # refused first: the pipeline's statements after it in the same Sync are
            # skipped, as after any error
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                async with c.pipeline():
                    await c.execute(f"SELECT {b}()")
                    await c.execute("SELECT 23")
            async with c.pipeline():
                c5 = await c.execute("SELECT 24")
                c6 = await c.execute("SELECT 25")
            assert await c5.fetchone() == (24,)
            assert await c6.fetchone() == (25,)
            assert await (await c.execute("SELECT 26")).fetchone() == (26,)
    run_async(main())
    assert table(pg, "hr_items")[0] == (1, "changed")
    assert table(pg, "hr_block") == ROWS


def test_psycopg_pipeline_syncs_between(pg, guarded):
    """Statements each in their own Sync segment behind an unread function."""
    f, a = fresh(pg, "read"), fresh(pg, "appr")

    async def main():
        async with await psycopg.AsyncConnection.connect(
                guarded.dsn(dbname=DB), autocommit=True) as c:
            async with c.pipeline() as p:
                c1 = await c.execute(f"SELECT {f}() > 0")
                await p.sync()
                c2 = await c.execute("SELECT 27")
                await p.sync()
                c3 = await c.execute("SELECT 28")
            assert [await c1.fetchone(), await c2.fetchone(), await c3.fetchone()] == \
                [(True,), (27,), (28,)]
            refused = None
            async with c.pipeline() as p:
                await c.execute(f"SELECT {a}()")
                try:
                    await p.sync()
                except psycopg.errors.InsufficientPrivilege as e:
                    refused = e
                c4 = await c.execute("SELECT 29")
            assert refused is not None and "timed out" in str(refused), refused
            assert await c4.fetchone() == (29,)
            assert await (await c.execute("SELECT 30")).fetchone() == (30,)
    run_async(main())
    assert table(pg, "hr_appr") == ROWS


def test_asyncpg(pg, guarded):
    f, w, b = fresh(pg, "read"), fresh(pg, "write"), fresh(pg, "block")
    n = next(_serial)
    pg.execute(f"CREATE FUNCTION hr_arg_{n}(int) RETURNS int LANGUAGE sql AS "
               "'SELECT $1 + 1'", dbname=DB)

    async def main():
        c = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            assert await c.fetchval(f"SELECT {f}() > 0") is True
            assert await c.fetchval("SELECT 31") == 31
            # several statements in one Query
            await c.execute(f"SELECT {w}(); SELECT 32; SELECT 33")
            # Bind/Execute pipelined behind the Parse of an unread function
            await c.executemany(f"SELECT hr_arg_{n}($1)", [(1,), (2,), (3,)])
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await c.execute(f"SELECT {b}(); SELECT 34")
            assert await c.fetchval("SELECT 35") == 35
        finally:
            await c.close()
    run_async(main())
    assert table(pg, "hr_items")[0] == (1, "changed")
    assert table(pg, "hr_block") == ROWS
