# A long statement under a policy (up to max_statement_size, 1 MB) was parsed into a
# tree and judged on the event loop: ~1 s for a 150,000-item IN list, during which every
# other session of the worker waited (left open in session 18). Texts over 64 KB are
# judged on a thread now, the loop serving the others meanwhile. Judged by what each
# big statement did (its rows, its refusal, the table upstream) and by another
# session's statements answered while pgguard was still judging one that it refused
# (never sent upstream: the time between its send and its refusal is pgguard's alone).
from __future__ import annotations

import threading
import time

import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, UPSTREAM_USER
from guarded import guarded_proxy

DB = "appdb"
N = 150_000
IN_LIST = ",".join(str(i) for i in range(N))

REFUSED = {
    "in-list-then-drop": f"SELECT 1 WHERE 1 IN ({IN_LIST}); DROP TABLE bs_items",
    "in-list-then-grant": f"SELECT 2 WHERE 2 IN ({IN_LIST}); GRANT ALL ON bs_items TO PUBLIC",
    "array-then-drop": f"SELECT ARRAY[{IN_LIST}]; DROP TABLE bs_items",
    "values-delete-all": f"WITH v(x) AS (VALUES ({'),('.join(str(i) for i in range(N // 2))}))"
                         " DELETE FROM bs_items",
    "or-chain-alter": "SELECT 1 WHERE " + " OR ".join(f"{i} = 0" for i in range(N // 3))
                      + "; ALTER TABLE bs_items DROP COLUMN v",
}


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("big-statement")) as p:
        yield p


@pytest.fixture
def items(pg):
    pg.execute("DROP TABLE IF EXISTS bs_items; CREATE TABLE bs_items (id int, v int);"
               "INSERT INTO bs_items SELECT g, g FROM generate_series(1, 30) g;"
               f"GRANT ALL ON bs_items TO {UPSTREAM_USER}", dbname=DB)


class Other(threading.Thread):
    """Another session of the same worker, asking all the time: when each answer came."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.at: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            while not self.stop.is_set():
                assert c.execute("SELECT 40 + 2").fetchone() == (42,)
                self.at.append(time.monotonic())


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_long_statement_is_judged_off_the_loop(gproxy, pg, items, case):
    other = Other(gproxy.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB))
    other.start()
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=60)
    try:
        while len(other.at) < 5:        # the other session is answered before
            time.sleep(0.01)
        t0 = time.monotonic()
        msgs = c.run(REFUSED[case])
        t1 = time.monotonic()
        assert [e["C"] for e in rawpg.errors(msgs)] == ["42501"], rawpg.errors(msgs)
        assert rawpg.rows(c.run("SELECT 7")) == [[b"7"]]
    finally:
        c.close()
        other.stop.set()
        other.join(10)
    # nothing ran: the refusal came from pgguard (the table is whole, every column there)
    assert pg.execute("SELECT count(*), sum(v) FROM bs_items", dbname=DB) == [(30, 465)]
    # ... and while it judged, the other session was answered again and again (on the
    # loop: at most ~15 answers in these windows, at their edges; off it: hundreds)
    during = [t for t in other.at if t0 < t < t1]
    assert len(during) >= 25, (len(during), round(t1 - t0, 3))


def test_a_long_allowed_statement_runs_as_sent(gproxy, pg, items):
    with psycopg.connect(gproxy.dsn(dbname=DB), autocommit=True) as c:
        got = c.execute(f"SELECT count(*) FROM bs_items WHERE id IN ({IN_LIST})").fetchone()
        assert got == (30,)
        # a long UPDATE is judged (and guarded) as itself: narrow, it runs
        c.execute(f"UPDATE bs_items SET v = 0 WHERE id = 1 AND id IN ({IN_LIST})")
        # every row: refused by the blast-radius guard, rolled back
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"UPDATE bs_items SET v = 0 WHERE id IN ({IN_LIST})")
    assert pg.execute("SELECT count(*), sum(v) FROM bs_items", dbname=DB) == [(30, 464)]


@pytest.mark.parametrize("arg", [b"x" * 100_000, b"'" * 40_000, b"\\" * 70_000])
def test_a_long_function_call_is_answered(gproxy, pg, arg):
    # (regression hunt, helper 101) a FunctionCall whose rendered text passed 64 KB was
    # judged on a thread, then looked for under another key, and judged again forever
    oid = pg.execute("SELECT 'pg_catalog.length(text)'::regprocedure::oid")[0][0]
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=30)
    try:
        c.send(rawpg.function_call(oid, [arg]))
        msgs = c.until_ready()
        assert not rawpg.errors(msgs), rawpg.errors(msgs)
        got = [p for t, p in msgs if t == b"V"]
        assert got and got[0][4:] == str(len(arg)).encode(), got
        assert rawpg.rows(c.run("SELECT 8")) == [[b"8"]]
    finally:
        c.close()
