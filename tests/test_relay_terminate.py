# Red team, round 16 (helper 71): a Terminate sent right behind statements (in the same
# write, or while one runs) made the proxy close at once: the statements ran upstream
# (the rows were inserted) but the client got none of their answers. Postgres answers
# every message before the Terminate, then closes; so does the proxy now. Judged by the
# bytes the client gets before the close, against a direct connection, and by the rows
# upstream.
import socket
import struct
import time

import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD

DB = "postgres"
X = b"X\0\0\0\x04"

CASES = {
    "query-query-x": [rawpg.query("INSERT INTO term_t VALUES (1)"),
                      rawpg.query("SELECT 'reply-before-X'"), X],
    "extended-x": [rawpg.parse("INSERT INTO term_t VALUES (2)"), rawpg.bind(),
                   rawpg.execute(), rawpg.SYNC, X],
    "sleep-then-x": [rawpg.query("SELECT pg_sleep(0.3), 'slept'"), None, X],
    "pipeline-x": [rawpg.parse("SELECT 'one'"), rawpg.bind(), rawpg.execute(),
                   rawpg.parse("SELECT 'two'"), rawpg.bind(), rawpg.execute(), rawpg.SYNC,
                   X],
    "error-then-x": [rawpg.query("SELECT 1/0"), rawpg.query("SELECT 'after'"), X],
}


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    from guarded import guarded_proxy
    with guarded_proxy(pg, tmp_path_factory.mktemp("terminate")) as p:
        yield p


@pytest.fixture()
def term_table(pg):
    from conftest import UPSTREAM_USER
    pg.execute("DROP TABLE IF EXISTS term_t; CREATE TABLE term_t (v int)")
    pg.execute(f"ALTER TABLE term_t OWNER TO {UPSTREAM_USER}")
    yield
    pg.execute("DROP TABLE IF EXISTS term_t")


def _everything(c: rawpg.RawClient, parts: list) -> list[bytes]:
    for p in parts:
        if p is None:
            time.sleep(0.05)            # the Terminate while the statement runs
        else:
            c.sock.sendall(p)
    c.sock.settimeout(10)
    data = b""
    while True:
        try:
            got = c.sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not got:
            break
        data += got
    out, pos = [], 0
    while pos + 5 <= len(data):
        n = struct.unpack_from("!I", data, pos + 1)[0]
        out.append(data[pos:pos + 1 + n])
        pos += 1 + n
    # what each message says, without the parts that differ between connections
    return [m[:1] + (m[5:] if m[:1] in (b"C", b"D", b"T") else b"") for m in out
            if m[:1] not in (b"S", b"N")]


@pytest.mark.parametrize("who", ["agent", "human"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_answers_before_a_terminate_reach_the_client(guarded, pg, term_table, case, who):
    from conftest import UPSTREAM_USER, UPSTREAM_PASSWORD
    user, pw = (AGENT, AGENT_PASSWORD) if who == "agent" else (HUMAN, HUMAN_PASSWORD)
    direct = rawpg.RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
    want = _everything(direct, CASES[case])
    through = rawpg.RawClient.connect(guarded.port, user, pw, database=DB)
    got = _everything(through, CASES[case])
    assert got == want, (case, who)
    assert b"Z" in [m[:1] for m in got]
    if case in ("query-query-x", "extended-x"):
        assert pg.execute("SELECT count(*) FROM term_t")[0][0] == 2
