# A guarded Execute in a segment that already failed: Postgres skips everything up to
# the Sync, the blast-radius guard's own statements too. When the error had gone by
# before the guard started (the client's Flush pushed it out, or the stream was held
# meanwhile), the guard waited for answers that never come and the session hung
# (fuzz round). Such an Execute is now left unguarded: Postgres does not run it.
# Judged against a direct connection (the messages the client gets), by the row
# upstream (unchanged), and by the session going on.
from __future__ import annotations

import time

import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER
import test_policy_blast_fastlane

gproxy = test_policy_blast_fastlane.gproxy
FLUSH = rawpg.frame(b"H", b"")
UPD = "UPDATE fs_t SET v = v + 1 WHERE id = 1"


@pytest.fixture()
def fs_table(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS fs_t")
        c.execute("CREATE TABLE fs_t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        c.execute("INSERT INTO fs_t SELECT g, 0 FROM generate_series(1, 20) g")
        c.execute("GRANT ALL ON fs_t TO PUBLIC")
    yield
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS fs_t")


def _v(pg) -> int:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return c.execute("SELECT v FROM fs_t WHERE id = 1").fetchone()[0]


def _drain(c, wait: float = 0.5) -> list[bytes]:
    # what the Flush pushed out (no ReadyForQuery comes before the Sync)
    got = []
    c.sock.settimeout(wait)
    try:
        while True:
            got.append(c.read()[0])
    except (TimeoutError, OSError):
        pass
    finally:
        c.sock.settimeout(10)
    return got


# (first batch, ended by a Flush: its error reaches the client; second batch, ended by
# a Sync) - the second batch's Execute is of a statement the guard measures
VARIANTS = {
    "execute-error": ([rawpg.parse("SELECT 1/0"), rawpg.bind(), rawpg.execute()],
                      [rawpg.parse(UPD), rawpg.bind(), rawpg.execute()]),
    "bind-error": ([rawpg.parse("SELECT $1::int", types=[23]), rawpg.bind("", [b"x"])],
                   [rawpg.parse(UPD), rawpg.bind(), rawpg.execute()]),
    "parse-error": ([rawpg.parse("SELEC 1")],
                    [rawpg.parse(UPD), rawpg.bind(), rawpg.execute()]),
    "named-returning": ([rawpg.parse("SELECT 1/0", "bad"), rawpg.bind("bad", portal="p1"),
                         rawpg.execute("p1")],
                        [rawpg.parse(UPD + " RETURNING v", "u"), rawpg.bind("u", portal="p2"),
                         rawpg.execute("p2", 1)]),
    "prepared-before": ([rawpg.parse("SELECT 1/0"), rawpg.bind(), rawpg.execute()],
                        [rawpg.bind("u0", portal="p3"), rawpg.execute("p3")]),
}


def _session(port, user, password, name, block):
    c = rawpg.RawClient.connect(port, user, password, timeout=10)
    try:
        if name == "prepared-before":
            c.send(rawpg.parse(UPD, "u0"), rawpg.SYNC)
            c.until_ready()
        if block:
            c.run("BEGIN")
        first, second = VARIANTS[name]
        c.send(*first, FLUSH)
        a = _drain(c)
        time.sleep(0.2)
        c.send(*second, rawpg.SYNC)
        b = [t for t, _ in c.until_ready()]
        if block:
            c.run("ROLLBACK")
        after = rawpg.rows(c.run("SELECT 41 + 1"))
        return a, b, after
    finally:
        c.close()


@pytest.mark.parametrize("block", [False, True], ids=["autocommit", "block"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_guarded_execute_after_a_failed_message_answers_as_postgres(
        gproxy, pg, fs_table, name, block):
    want = _session(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, name, block)
    assert _v(pg) == 0                          # Postgres skipped the UPDATE
    got = _session(gproxy.port, AGENT, AGENT_PASSWORD, name, block)
    assert got == want, (name, got, want)
    assert got[2] == [[b"42"]]
    assert _v(pg) == 0


@pytest.mark.parametrize("shape", ["sync-first", "sync-alone", "two-syncs"])
def test_after_a_sync_the_execute_runs_guarded(gproxy, pg, fs_table, shape):
    """The failed segment ends at the client's Sync: an Execute behind it runs, so the
    guard measures it (an UPDATE reaching every row is refused, nothing changes)."""
    every = "UPDATE fs_t SET v = v + 1 WHERE id > 0"
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, timeout=10)
    try:
        c.send(rawpg.bind("nosuch", portal="x"), FLUSH)
        assert b"E" in _drain(c)
        run = [rawpg.parse(every), rawpg.bind(), rawpg.execute(), rawpg.SYNC]
        if shape == "sync-first":
            c.send(rawpg.SYNC, *run)
            msgs = c.until_ready(2)
        elif shape == "sync-alone":
            c.send(rawpg.SYNC)
            c.until_ready()
            c.send(*run)
            msgs = c.until_ready()
        else:
            c.send(rawpg.SYNC, rawpg.SYNC, *run, rawpg.SYNC)
            msgs = c.until_ready(4)
        errs = rawpg.errors(msgs)
        assert errs and "every row" in errs[-1]["M"], errs
        assert rawpg.rows(c.run("SELECT 41 + 1")) == [[b"42"]]
    finally:
        c.close()
    assert _v(pg) == 0
