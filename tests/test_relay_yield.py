# Large client streams through the compiled pipe's yield turn (a chunk of 64 KB or more
# pauses reading the client for one loop turn): everything is answered, in order, with
# holds for durable audit records and a FunctionCall lookup pausing the same socket, and a
# pipeline Postgres stops at an error ends as it does directly. Judged by the answers and
# by the rows upstream.
import socket
import struct

import pytest

from conftest import AGENT, AGENT_PASSWORD, Proxy
from guarded import guarded_proxy
from rawpg import (SYNC, RawClient, bind, errors, execute, function_call, parse, query,
                   rows)

DB = "appdb"
N = 1500
PAD = "x" * 1500            # N statements of ~1.5 KB: about 2.3 MB in one write


@pytest.fixture(autouse=True)
def table(pg):
    pg.execute("DROP TABLE IF EXISTS big_pipe; CREATE TABLE big_pipe "
               "(id int PRIMARY KEY, pad text)", dbname=DB)


@pytest.fixture(scope="module")
def strict(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("yield-strict"),
                       audit_extra='durability = "strict"\n') as p:
        yield p


@pytest.fixture(scope="module")
def batched(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("yield-batched")) as p:
        yield p


def agent(proxy: Proxy) -> RawClient:
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=120)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    return c


def inserts(lo: int, hi: int) -> bytes:
    return b"".join(query(f"INSERT INTO big_pipe VALUES ({i}, '{PAD}')") for i in range(lo, hi))


def send_all(c: RawClient, data: bytes) -> None:
    c.sock.sendall(data)


def count(pg) -> int:
    return pg.execute("SELECT count(*) FROM big_pipe", dbname=DB)[0][0]


def test_a_large_stream_behind_strict_audit_holds_is_answered_whole(strict, pg):
    """Each Query waits for its durable record (a hold, which stops reading the client
    past 1 MB) while the pipe yields after every large chunk: all N are answered, in
    order, and all N rows are upstream."""
    c = agent(strict)
    try:
        send_all(c, inserts(0, N) + query("SELECT count(*) FROM big_pipe"))
        msgs = c.until_ready(N + 1)
        assert [e["M"] for e in errors(msgs)] == []
        tags = [p.rstrip(b"\0") for t, p in msgs if t == b"C"]
        assert tags[:N] == [b"INSERT 0 1"] * N
        assert rows(msgs) == [[str(N).encode()]]
    finally:
        c.close()
    assert count(pg) == N


def test_a_function_lookup_in_a_large_stream_behind_holds(strict, pg):
    """A FunctionCall whose function is looked up (its reader takes the socket, and may
    pause it) in the middle of a large stream held for audit records: the call is
    answered and every statement after it too."""
    oid = pg.execute("SELECT 'int4pl(int4,int4)'::regprocedure::oid", dbname=DB)[0][0]
    c = agent(strict)
    try:
        half = N // 2
        send_all(c, inserts(0, half)
                 + function_call(oid, [struct.pack("!i", 40), struct.pack("!i", 2)], 1, 1)
                 + inserts(half, N))
        msgs = c.until_ready(N + 1)
        assert [e["M"] for e in errors(msgs)] == []
        values = [p for t, p in msgs if t == b"V"]
        assert values == [struct.pack("!i", 4) + struct.pack("!i", 42)]
    finally:
        c.close()
    assert count(pg) == N


def test_a_pipeline_stopped_by_an_error_ends_as_directly(batched, pg):
    """The shape of asyncpg's executemany: 128 Bind/Execute of ~32 KB (about 4 MB) after
    the statement's Parse; row 2 violates the key. Postgres discards the rest up to Sync
    and the implicit transaction rolls back: one error, one ReadyForQuery, no row
    upstream, and the session goes on."""
    c = agent(batched)
    try:
        c.send(parse("INSERT INTO big_pipe VALUES ($1::int, $2::text)", "s1"), SYNC)
        c.until_ready()
        body = bind("s1", [b"1", b"a"]) + execute() + bind("s1", [b"1", b"a"]) + execute()
        body += b"".join(bind("s1", [str(i).encode(), b"a" * 32768]) + execute()
                         for i in range(3, 129))
        send_all(c, body + SYNC)
        msgs = c.until_ready()
        errs = errors(msgs)
        assert [e["C"] for e in errs] == ["23505"], errs
        assert msgs[-1][0] == b"Z"
        assert rows(c.run("SELECT count(*) FROM big_pipe")) == [[b"0"]]
    finally:
        c.close()
    assert count(pg) == 0
