# A client that half-closes its socket (shutdown(SHUT_WR)) after its last message:
# Postgres reads the end of file after every message before it and answers them all,
# then closes. pgguard closed the session at the end of file and the client lost the
# answers of what it had sent (left open in session 18). Judged against Postgres
# itself: the same bytes sent directly and through pgguard (a human, an agent with no
# policy, an agent under the guarded default) get the same message types and rows, and
# upstream holds the same rows.
from __future__ import annotations

import itertools
import socket
import struct

import pytest
import rawpg
from conftest import (
    AGENT,
    AGENT_PASSWORD,
    HUMAN,
    HUMAN_PASSWORD,
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
)
from exactlib import messages, read_until_closed
from guarded import guarded_proxy

_n = itertools.count(1)


def _cases(tag: str) -> dict[str, bytes]:
    ins = f"INSERT INTO half_close VALUES ('{tag}')"
    return {
        "select": rawpg.query("SELECT 'one' AS a, generate_series(1, 3) AS b"),
        "insert": rawpg.query(ins),
        "two-queries": rawpg.query("SELECT 1") + rawpg.query(ins),
        "extended": rawpg.parse(ins.replace(f"'{tag}'", "$1"), types=[25])
        + rawpg.bind(params=[tag.encode()]) + rawpg.execute() + rawpg.SYNC
        + rawpg.parse("SELECT $1::int + 1", types=[23]) + rawpg.bind(params=[b"41"])
        + rawpg.execute() + rawpg.SYNC,
        "slow": rawpg.query(f"SELECT pg_sleep(0.4); {ins}"),
        "open-block": rawpg.query("BEGIN") + rawpg.query(ins),     # rolled back at EOF
        "error-then-more": rawpg.query("SELECT 1/0") + rawpg.query(ins),
        "partial-message": rawpg.query(ins)[:-3],                  # nothing runs
        # (red team 25) a whole message, then one left unfinished: the first is answered
        # and runs, nothing of the second (pgguard's own Terminate, added behind it,
        # finished it: the session waited for ever, or ran what its bytes then said)
        "then-partial-header": rawpg.query(ins) + rawpg.query(ins)[:5],
        "then-partial-type": rawpg.query(ins) + rawpg.query(ins)[:3],
        "then-spliceable": rawpg.query("SELECT 1") + _unfinished(ins + " --", 2),
        "then-spliceable-long": rawpg.query("SELECT 1") + _unfinished(ins + " --", 1),
        "then-partial-parse": rawpg.query(ins) + rawpg.parse(ins)[:-4],
        "then-partial-bind": rawpg.query(ins) + rawpg.parse(ins) + rawpg.bind()[:-2],
    }


def _unfinished(sql: str, missing: int) -> bytes:
    # a Query whose length counts ``missing`` bytes more than are sent (a Terminate's
    # bytes 'X' and NUL, put behind it, would end it: a comment takes the 'X')
    body = sql.encode()
    return b"Q" + struct.pack("!I", 4 + len(body) + missing) + body


def _send_half_close(port: int, user: str, password: str | None, payload: bytes) -> list:
    c = rawpg.RawClient.connect(port, user, password, database="appdb", timeout=20)
    try:
        c.sock.sendall(payload)
        c.sock.shutdown(socket.SHUT_WR)
        return [(t, p) for t, p in messages(c.buf + read_until_closed(c.sock, 20))]
    finally:
        c.sock.close()


def _shape(msgs: list) -> list:
    # message types, with the rows, tags and SQLSTATEs (the server's pids and times
    # differ; a notice is not part of the answer to compare)
    out = []
    for t, p in msgs:
        if t == b"E":
            out.append(("E", rawpg.error_fields(p).get("C")))
        elif t == b"D":
            out.append(("D", tuple(rawpg.data_row(p))))
        elif t == b"C":
            out.append(("C", p))
        elif t not in (b"N", b"S"):
            out.append((t.decode(), b""))
    return out


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("half-close")) as p:
        yield p


@pytest.fixture(scope="module")
def table(pg):
    pg.execute("CREATE TABLE IF NOT EXISTS half_close (tag text)", dbname="appdb")
    pg.execute(f"GRANT ALL ON half_close TO {UPSTREAM_USER}", dbname="appdb")


@pytest.mark.parametrize("who", ["human", "agent", "guarded-agent"])
@pytest.mark.parametrize("case", list(_cases("x")))
def test_half_closed_client_gets_every_answer(proxy, gproxy, pg, table, case, who):
    user, pw = (HUMAN, HUMAN_PASSWORD) if who == "human" else (AGENT, AGENT_PASSWORD)
    if who == "guarded-agent":
        proxy = gproxy
    direct_tag, proxied_tag = f"d{next(_n)}", f"p{next(_n)}"
    direct = _send_half_close(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD,
                              _cases(direct_tag)[case])
    proxied = _send_half_close(proxy.port, user, pw, _cases(proxied_tag)[case])
    assert _shape(proxied) == _shape(direct), case

    def stored(tag: str) -> int:
        return pg.execute("SELECT count(*) FROM half_close WHERE tag = %s", (tag,),
                          dbname="appdb")[0][0]
    expected = {"select": 0, "open-block": 0, "partial-message": 0, "then-spliceable": 0,
                "then-spliceable-long": 0}.get(case, 1)
    assert (stored(direct_tag), stored(proxied_tag)) == (expected, expected)


APPROVAL = """
[[rules]]
name = "half-close-approval"
when = { kind = "agent", statements = ["insert"], relations = ["public.half_close_held"] }
action = "approve"
timeout = "1s"
"""


@pytest.fixture(scope="module")
def aproxy(pg, tmp_path_factory):
    pg.execute("CREATE TABLE IF NOT EXISTS half_close_held (tag text)", dbname="appdb")
    pg.execute(f"GRANT ALL ON half_close_held TO {UPSTREAM_USER}", dbname="appdb")
    with guarded_proxy(pg, tmp_path_factory.mktemp("half-close-held"), APPROVAL) as p:
        yield p


@pytest.mark.parametrize("tail", ["header", "spliceable"])
def test_an_unfinished_message_behind_a_held_statement_never_runs(aproxy, pg, table, tail):
    # the held statement keeps the client's later bytes raw while a human is asked:
    # the end of file cuts the unfinished message there (nothing of it runs), the held
    # statement is answered (its approval timed out), and the session ends
    tag = f"h{next(_n)}"
    ins = f"INSERT INTO half_close VALUES ('{tag}')"
    later = rawpg.query(ins)[:5] if tail == "header" else _unfinished(ins + " --", 2)
    got = _send_half_close(aproxy.port, AGENT, AGENT_PASSWORD,
                           rawpg.query(f"INSERT INTO half_close_held VALUES ('{tag}')")
                           + later)
    shape = _shape(got)
    assert shape and shape[0] == ("E", "42501") and shape[-1] == ("Z", b""), shape
    assert pg.execute("SELECT (SELECT count(*) FROM half_close WHERE tag = %s), "
                      "(SELECT count(*) FROM half_close_held WHERE tag = %s)", (tag, tag),
                      dbname="appdb")[0] == (0, 0)
