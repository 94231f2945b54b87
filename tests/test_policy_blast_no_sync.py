# A guarded write (extended protocol) followed by a Query or a FunctionCall with no
# Sync between (red team 25, helper 137): Postgres ends the implicit transaction at the
# end of that Query / call and commits the write with it (ReadyForQuery 'I'); pgguard
# left the guard's own block open ('T'): the row stayed locked (another session's
# UPDATE waited) and the write was rolled back when the client left, an approved one
# too. Judged against Postgres itself: the same bytes sent directly and through pgguard
# (an agent under the guarded default) get the same answers, and leave the same rows.
# (Left: pgguard commits the write before that Query runs, so a Query that then fails,
# or that opens a transaction block and rolls it back, does not take the write with it
# as Postgres' implicit transaction would: see the README's Status.)
from __future__ import annotations

import itertools

import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER
from guarded import guarded_proxy
from test_exact_half_close import _shape

DB = "appdb"
_n = itertools.count(1)


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("no-sync")) as p:
        yield p


@pytest.fixture()
def rows(pg):
    pg.execute("DROP TABLE IF EXISTS nosync; CREATE TABLE nosync (id int PRIMARY KEY, "
               "v text); INSERT INTO nosync SELECT g, 'old' FROM generate_series(1, 40) g; "
               f"GRANT ALL ON nosync TO {UPSTREAM_USER}", dbname=DB)


def _upd(tag: str, rid: int) -> bytes:
    return (rawpg.parse("UPDATE nosync SET v = $1 WHERE id = $2", types=[25, 23])
            + rawpg.bind(params=[tag.encode(), str(rid).encode()]) + rawpg.execute())


def _cases(tag: str) -> dict[str, tuple[bytes, bytes]]:
    """name: (what is sent first, what is sent after its answers came)"""
    return {
        "query": (_upd(tag, 1) + rawpg.query("SELECT 1"), b""),
        "flush-query": (_upd(tag, 2) + rawpg.FLUSH + rawpg.query("SELECT 2"), b""),
        "two-writes-query": (_upd(tag, 3) + _upd(tag, 4) + rawpg.query("SELECT 3"), b""),
        "query-commits": (_upd(tag, 5) + rawpg.query("SELECT 4; COMMIT"), b""),
        # an Execute failing before the Query: Postgres skips the Query to the Sync
        "error-between": (_upd(tag, 7) + rawpg.parse("SELECT 1/0") + rawpg.bind()
                          + rawpg.execute() + rawpg.query("SELECT 5") + rawpg.SYNC, b""),
        "error-between-flush": (_upd(tag, 6) + rawpg.parse("SELECT 1/0") + rawpg.bind()
                                + rawpg.execute() + rawpg.FLUSH + rawpg.query("SELECT 5")
                                + rawpg.SYNC, b""),
        "query-then-sync": (_upd(tag, 8) + rawpg.query("SELECT 6") + rawpg.SYNC, b""),
        "function-call": (_upd(tag, 9) + rawpg.function_call(1317, [b"41"]), b""),
    }


def _run(port: int, user: str, password: str, first: bytes, then: bytes) -> list:
    c = rawpg.RawClient.connect(port, user, password, database=DB, timeout=10)
    try:
        c.send(first)
        got = c.until_ready()
        if then:
            c.send(then)
            got += c.until_ready()
        c.send(rawpg.query("SELECT 'after'"))
        got += c.until_ready()
        return got
    finally:
        c.close()


@pytest.mark.parametrize("case", list(_cases("x")))
def test_a_guarded_write_ends_with_the_next_sync_point(gproxy, pg, rows, case):
    d, p = f"d{next(_n)}", f"p{next(_n)}"
    direct = _run(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, *_cases(d)[case])
    direct_rows = pg.execute("SELECT id FROM nosync WHERE v = %s ORDER BY id", (d,),
                             dbname=DB)
    pg.execute("UPDATE nosync SET v = 'old'", dbname=DB)
    proxied = _run(gproxy.port, AGENT, AGENT_PASSWORD, *_cases(p)[case])
    assert _shape(proxied) == _shape(direct), case
    # the statuses of every ReadyForQuery too ('I' where Postgres committed)
    assert [m[1] for m in proxied if m[0] == b"Z"] == [m[1] for m in direct if m[0] == b"Z"]
    assert pg.execute("SELECT id FROM nosync WHERE v = %s ORDER BY id", (p,),
                      dbname=DB) == direct_rows, case


def test_the_row_is_not_left_locked(gproxy, pg, rows):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        c.send(_upd("locked?", 10) + rawpg.query("SELECT 1"))
        assert c.until_ready()[-1][1] == b"I"
        # while the agent's session is still open, someone else writes the row
        with psycopg.connect(pg.dsn(dbname=DB), autocommit=True) as other:
            other.execute("SET lock_timeout = '2s'")
            other.execute("UPDATE nosync SET v = 'dba' WHERE id = 10")
    finally:
        c.close()
    assert pg.execute("SELECT v FROM nosync WHERE id = 10", dbname=DB) == [("dba",)]


_EVERY = (rawpg.parse("UPDATE nosync SET v = v WHERE id > 0") + rawpg.bind()
          + rawpg.execute())                  # refused by the guard: reaches every row


@pytest.mark.parametrize("between", ["query", "flush-query", "function-call", "twice"])
def test_a_guard_refusal_before_the_query_does_not_hang(gproxy, pg, rows, between):
    # (helper 138) the guard refused a later write of the segment (the every-row check):
    # Postgres skips to the Sync, the Query too; pgguard sent its commit before the
    # Query and waited for ever for an answer that could not come, the Sync held behind
    # it, the row locked
    then = {"query": rawpg.query("SELECT 1"),
            "flush-query": rawpg.FLUSH + rawpg.query("SELECT 1"),
            "function-call": rawpg.function_call(1317, [b"41"]),
            # (the first write is committed before the first Query; the block the
            # guard opens again for the second is failed by the refusal)
            "twice": rawpg.query("SELECT 1") + _upd("twice", 12) + _EVERY
            + rawpg.query("SELECT 2")}[between]
    first = _upd("refused", 11) + (b"" if between == "twice" else _EVERY)
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=10)
    try:
        c.send(first + then + rawpg.SYNC)
        got = c.until_ready(2 if between == "twice" else 1)
        assert "42501" in [rawpg.error_fields(p).get("C") for t, p in got if t == b"E"], got
        assert got[-1] == (b"Z", b"I"), got
        assert rawpg.rows(c.run("SELECT 42")) == [[b"42"]]        # the session goes on
        # the failed segment took the writes before the refusal with it, as in Postgres
        assert pg.execute("SELECT count(*) FROM nosync WHERE v IN ('refused', 'twice')",
                          dbname=DB) == [(1 if between == "twice" else 0,)]
        with psycopg.connect(pg.dsn(dbname=DB), autocommit=True) as other:
            other.execute("SET lock_timeout = '2s'")
            other.execute("UPDATE nosync SET v = 'dba' WHERE id IN (11, 12)")
    finally:
        c.close()
