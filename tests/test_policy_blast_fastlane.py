# The blast-radius guard while the compiled pipe forwards the Bind/Execute/Close/Sync
# that name nothing guarded (issue 17, item 3): guarded statements and portals are still
# measured and refused past the limit, whatever unguarded traffic surrounds them, in
# whichever chunks it arrives; judged by the rows upstream.
from __future__ import annotations

import subprocess
import time

import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD

ROWS = 1500
BIG = "UPDATE fl_t SET v = v + 1 WHERE id > $1"         # guarded, every row: refused
SMALL = "UPDATE fl_t SET v = v + 1 WHERE id = $1"       # guarded, one row: kept
SEL = "SELECT count(*) FROM fl_t WHERE id > $1"          # not guarded
INS = "INSERT INTO fl_log VALUES ($1)"                   # not guarded (no update/delete)


@pytest.fixture(scope="module", params=["audit", "noaudit"])
def gproxy(request, pg, tmp_path_factory):
    from conftest import Proxy
    p = Proxy(pg, tmp_path_factory.mktemp("fastlane"),
              audit_extra="enabled = false" if request.param == "noaudit" else "")
    p.config.write_text(p.config.read_text().replace('agents = "allow"', 'agents = "guarded"'))
    p.start()
    yield p
    p.stop()


@pytest.fixture()
def table(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS fl_t, fl_log")
        c.execute("CREATE TABLE fl_t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        c.execute(f"INSERT INTO fl_t SELECT g, 0 FROM generate_series(1, {ROWS}) g")
        c.execute("CREATE TABLE fl_log (x int)")
        c.execute("GRANT ALL ON fl_t, fl_log TO PUBLIC")
    yield
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS fl_t, fl_log")


def truth(pg) -> tuple[int, int, int]:
    """(rows of fl_t, sum of v, rows of fl_log), read directly upstream."""
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return c.execute("SELECT (SELECT count(*) FROM fl_t), "
                         "(SELECT coalesce(sum(v), 0) FROM fl_t), "
                         "(SELECT count(*) FROM fl_log)").fetchone()


def send_apart(c: rawpg.RawClient, *frames: bytes) -> None:
    """Each frame in its own write, apart in time: the proxy reads them one by one."""
    for f in frames:
        c.send(f)
        time.sleep(0.02)


def prepared_client(gproxy) -> rawpg.RawClient:
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    c.send(rawpg.parse(BIG, "big"), rawpg.parse(SMALL, "small"), rawpg.parse(SEL, "sel"),
           rawpg.parse(INS, "ins"), rawpg.SYNC)
    msgs = c.until_ready()
    assert not rawpg.errors(msgs), msgs
    return c


def refused(msgs) -> bool:
    errs = rawpg.errors(msgs)
    return len(errs) == 1 and errs[0]["C"] == "42501" and "blast-radius" in errs[0]["M"]


# -- class 1: a guarded statement stays guarded through unguarded traffic -------------

def _unguarded_then_big(c):
    for i in range(5):                  # unguarded statements, message by message
        send_apart(c, rawpg.bind("sel", [b"0"]), rawpg.execute(), rawpg.SYNC)
        assert rawpg.rows(c.until_ready()) == [[str(ROWS).encode()]]
    send_apart(c, rawpg.bind("big", [b"0"]), rawpg.execute(), rawpg.SYNC)
    return c.until_ready()


def _portal_rebound_to_guarded(c):
    send_apart(c, rawpg.bind("sel", [b"0"], portal="p"), rawpg.SYNC)
    c.until_ready()
    c.send(rawpg.query("BEGIN"))
    c.until_ready()
    send_apart(c, rawpg.bind("sel", [b"0"], portal="p"), rawpg.close("P", "p"),
               rawpg.bind("big", [b"0"], portal="p"), rawpg.execute("p"), rawpg.SYNC)
    msgs = c.until_ready()
    c.send(rawpg.query("COMMIT"))
    c.until_ready()
    return msgs


def _close_of_other_names_keeps_guard(c):
    send_apart(c, rawpg.close("S", "sel"), rawpg.close("P", "nope"), rawpg.close("S", "nope"),
               rawpg.SYNC)
    c.until_ready()
    send_apart(c, rawpg.bind("big", [b"0"], portal="q"), rawpg.execute("q"), rawpg.SYNC)
    return c.until_ready()


def _unguarded_execute_before_in_same_segment(c):
    c.send(rawpg.query("BEGIN"))
    c.until_ready()
    send_apart(c, rawpg.bind("sel", [b"0"]), rawpg.execute(),
               rawpg.bind("big", [b"0"], portal="b"), rawpg.execute("b"), rawpg.SYNC)
    msgs = c.until_ready()
    assert c.status == b"E"             # the block failed, as on the statement's error
    c.send(rawpg.query("COMMIT"))
    c.until_ready()
    return msgs


def _one_write_pipeline(c):
    c.send(rawpg.bind("sel", [b"0"]), rawpg.execute(), rawpg.bind("ins", [b"1"]),
           rawpg.execute(), rawpg.bind("big", [b"0"]), rawpg.execute(),
           rawpg.bind("ins", [b"2"]), rawpg.execute(), rawpg.SYNC)
    return c.until_ready()


def _guarded_portal_after_sync(c):
    c.send(rawpg.query("BEGIN"))        # the portal lives as long as the block
    c.until_ready()
    send_apart(c, rawpg.bind("big", [b"0"], portal="kept"), rawpg.SYNC)
    c.until_ready()
    for _ in range(3):
        send_apart(c, rawpg.bind("sel", [b"0"]), rawpg.execute(), rawpg.SYNC)
        c.until_ready()
    send_apart(c, rawpg.execute("kept"), rawpg.SYNC)
    msgs = c.until_ready()
    c.send(rawpg.query("ROLLBACK"))
    c.until_ready()
    return msgs


@pytest.mark.parametrize("scenario", [
    _unguarded_then_big, _portal_rebound_to_guarded, _close_of_other_names_keeps_guard,
    _unguarded_execute_before_in_same_segment, _one_write_pipeline,
    _guarded_portal_after_sync])
def test_guarded_still_refused_amid_unguarded_traffic(gproxy, pg, table, scenario):
    before = truth(pg)
    c = prepared_client(gproxy)
    try:
        msgs = scenario(c)
        assert refused(msgs), msgs
        assert c.status in (b"I", b"T", b"E")
        c.send(rawpg.query("SELECT 1"))     # the session goes on
        assert rawpg.rows(c.until_ready()) == [[b"1"]]
    finally:
        c.close()
    assert truth(pg) == before              # nothing of the refused unit stayed


# -- class 2: legitimate traffic around a guarded statement keeps working -------------

def _small_updates_in_block(c):
    c.send(rawpg.query("BEGIN"))
    c.until_ready()
    for i in range(1, 6):
        send_apart(c, rawpg.bind("small", [str(i).encode()]), rawpg.execute(), rawpg.SYNC)
        assert rawpg.tags(c.until_ready()) == ["UPDATE 1"]
        send_apart(c, rawpg.bind("ins", [str(i).encode()]), rawpg.execute(), rawpg.SYNC)
        assert rawpg.tags(c.until_ready()) == ["INSERT 0 1"]
    c.send(rawpg.query("COMMIT"))
    c.until_ready()
    return (ROWS, 5, 5)


def _small_updates_implicit(c):
    for i in range(1, 4):
        c.send(rawpg.bind("small", [str(i).encode()]), rawpg.execute(),
               rawpg.bind("ins", [str(i).encode()]), rawpg.execute(), rawpg.SYNC)
        msgs = c.until_ready()
        assert rawpg.tags(msgs) == ["UPDATE 1", "INSERT 0 1"] and c.status == b"I"
    return (ROWS, 3, 3)


def _rebind_guarded_portal_to_unguarded(c):
    send_apart(c, rawpg.bind("big", [b"0"], portal="p"), rawpg.close("P", "p"),
               rawpg.bind("ins", [b"7"], portal="p"), rawpg.execute("p"), rawpg.SYNC)
    assert rawpg.tags(c.until_ready()) == ["INSERT 0 1"]
    return (ROWS, 0, 1)


def _close_guarded_then_reuse_name(c):
    send_apart(c, rawpg.close("S", "big"), rawpg.SYNC)
    c.until_ready()
    c.send(rawpg.parse("SELECT count(*) FROM fl_t WHERE id > $1", "big"), rawpg.SYNC)
    c.until_ready()
    for _ in range(3):
        send_apart(c, rawpg.bind("big", [b"0"]), rawpg.execute(), rawpg.SYNC)
        assert rawpg.rows(c.until_ready()) == [[str(ROWS).encode()]]
    return (ROWS, 0, 0)


def _tpcb_like(c):
    for i in range(1, 11):
        c.send(rawpg.query("BEGIN"))
        c.until_ready()
        for frames in ([rawpg.bind("small", [str(i).encode()])],
                       [rawpg.bind("sel", [b"0"])],
                       [rawpg.bind("small", [str(i + 100).encode()])],
                       [rawpg.bind("ins", [str(i).encode()])]):
            c.send(*frames, rawpg.describe("P"), rawpg.execute(), rawpg.SYNC)
            msgs = c.until_ready()
            assert not rawpg.errors(msgs) and c.status == b"T"
        c.send(rawpg.query("END"))
        c.until_ready()
    return (ROWS, 20, 10)


@pytest.mark.parametrize("scenario", [
    _small_updates_in_block, _small_updates_implicit, _rebind_guarded_portal_to_unguarded,
    _close_guarded_then_reuse_name, _tpcb_like])
def test_legitimate_traffic_around_guarded_statements(gproxy, pg, table, scenario):
    c = prepared_client(gproxy)
    try:
        want = scenario(c)
    finally:
        c.close()
    assert truth(pg) == want


def test_pgbench_tpcb_through_the_guard(gproxy, pg, pgbench_bin):
    """pgbench's TPC-B-like script, prepared, as the agent: every transaction counted
    upstream, balances consistent with the history."""
    env = {"PGPASSWORD": "", "PATH": "/usr/bin:/bin"}
    dbname = "fl_bench"
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {dbname}")
        c.execute(f"CREATE DATABASE {dbname}")
    try:
        info = psycopg.conninfo.conninfo_to_dict(pg.dsn())
        r = subprocess.run([pgbench_bin, "-i", "-q", "-s", "1", "-h", info["host"], "-p",
                            str(info["port"]), "-U", info["user"], dbname],
                           capture_output=True, text=True, env={**env, "PGPASSWORD":
                                                                 info.get("password", "")})
        assert r.returncode == 0, r.stderr
        with psycopg.connect(pg.dsn(), autocommit=True, dbname=dbname) as c:
            c.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC")
        r = subprocess.run([pgbench_bin, "-n", "-M", "prepared", "-c", "2", "-t", "40", "-h",
                            "127.0.0.1", "-p", str(gproxy.port), "-U", AGENT, dbname],
                           capture_output=True, text=True,
                           env={**env, "PGPASSWORD": AGENT_PASSWORD}, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "number of failed transactions: 0" in r.stdout
        with psycopg.connect(pg.dsn(), autocommit=True, dbname=dbname) as c:
            n, delta = c.execute("SELECT count(*), coalesce(sum(delta), 0) "
                                 "FROM pgbench_history").fetchone()
            acc = c.execute("SELECT sum(abalance) FROM pgbench_accounts").fetchone()[0]
            tel = c.execute("SELECT sum(tbalance) FROM pgbench_tellers").fetchone()[0]
        assert n == 80 and acc == delta and tel == delta
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


# -- class 3: simple Query inside a block, counted by its tag: no SAVEPOINT / RELEASE --
# (the statement runs as sent; past the limit the block is failed before the client
# can commit it)

def _q(c, sql):
    c.send(rawpg.query(sql))
    return c.until_ready()


def _block_big_update(c):
    _q(c, "BEGIN")
    msgs = _q(c, "UPDATE fl_t SET v = v + 1 WHERE id > 0")
    assert c.status == b"E"
    assert rawpg.tags(_q(c, "COMMIT")) == ["ROLLBACK"]
    return msgs, (ROWS, 0, 0)


def _block_big_delete(c):
    _q(c, "BEGIN")
    _q(c, "INSERT INTO fl_log VALUES (1)")
    msgs = _q(c, "DELETE FROM fl_t WHERE id IN (SELECT id FROM fl_t)")
    assert c.status == b"E"
    assert rawpg.tags(_q(c, "COMMIT")) == ["ROLLBACK"]
    return msgs, (ROWS, 0, 0)


def _client_savepoint_discards(c):
    _q(c, "BEGIN")
    _q(c, "UPDATE fl_t SET v = v + 1 WHERE id = 1")
    _q(c, "SAVEPOINT mine")
    msgs = _q(c, "UPDATE fl_t SET v = v + 100 WHERE id > 0")
    assert c.status == b"E"
    _q(c, "ROLLBACK TO SAVEPOINT mine")
    assert c.status == b"T"
    _q(c, "UPDATE fl_t SET v = v + 1 WHERE id = 2")
    assert rawpg.tags(_q(c, "COMMIT")) == ["COMMIT"]
    return msgs, (ROWS, 2, 0)


def _returning_rows_not_leaked(c):
    _q(c, "BEGIN")
    msgs = _q(c, "UPDATE fl_t SET v = v + 1 WHERE id > 0 RETURNING id, v")
    assert not rawpg.rows(msgs)         # held, then refused: no row reached the client
    _q(c, "ROLLBACK")
    return msgs, (ROWS, 0, 0)


def _pipelined_commit_is_held(c):
    c.send(rawpg.query("BEGIN"), rawpg.query("UPDATE fl_t SET v = 5 WHERE v = 0"),
           rawpg.query("COMMIT"))
    msgs = c.until_ready(3)
    assert rawpg.tags(msgs) == ["BEGIN", "ROLLBACK"] and c.status == b"I"
    return msgs, (ROWS, 0, 0)


@pytest.mark.parametrize("scenario", [_block_big_update, _block_big_delete,
                                      _client_savepoint_discards, _returning_rows_not_leaked,
                                      _pipelined_commit_is_held])
def test_simple_query_in_block_refused_past_limit(gproxy, pg, table, scenario):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        msgs, want = scenario(c)
        assert refused(msgs), msgs
        assert rawpg.rows(_q(c, "SELECT 1")) == [[b"1"]]
    finally:
        c.close()
    assert truth(pg) == want


def test_simple_query_in_block_small_writes_and_errors(gproxy, pg, table):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        _q(c, "BEGIN")
        for i in range(1, 6):
            assert rawpg.tags(_q(c, f"UPDATE fl_t SET v = v + 1 WHERE id = {i}")) == \
                ["UPDATE 1"]
            assert c.status == b"T"
        msgs = _q(c, "UPDATE fl_t SET v = v + 1 WHERE id = 1 RETURNING id, v")
        assert rawpg.rows(msgs) == [[b"1", b"2"]] and rawpg.tags(msgs) == ["UPDATE 1"]
        assert rawpg.tags(_q(c, "COMMIT")) == ["COMMIT"]
        _q(c, "BEGIN")                      # the statement's own error goes through
        msgs = _q(c, "UPDATE fl_t SET v = v / 0 WHERE id = 1")
        assert rawpg.errors(msgs)[0]["C"] == "22012" and c.status == b"E"
        _q(c, "ROLLBACK")
    finally:
        c.close()
    assert truth(pg) == (ROWS, 6, 0)


def test_psql_script_block_refused_whole(gproxy, pg, table, psql_bin, tmp_path):
    from conftest import run_psql
    script = tmp_path / "s.sql"
    script.write_text("BEGIN;\nUPDATE fl_t SET v = v + 1 WHERE id = 1;\n"
                      "UPDATE fl_t SET v = v + 1 WHERE id > 0;\nCOMMIT;\n")
    r = run_psql(psql_bin, gproxy.dsn(), "-f", str(script))
    # ON_ERROR_STOP: psql ends there, the block never commits
    assert r.returncode != 0 and "blast-radius" in r.stderr and "UPDATE 1" in r.stdout
    assert truth(pg) == (ROWS, 0, 0)


# -- class 4: the compiled in-block lane (Execute + Sync inside a block, counted by the
# tag): the upstream pipe holds the answers; within the limit they go on untouched,
# past it (or on an error) Python takes them over and refuses

def _lane(c, sql, params=()):
    c.send(rawpg.parse(sql), rawpg.SYNC)
    assert not rawpg.errors(c.until_ready())
    c.send(rawpg.bind("", list(params)), rawpg.describe("P"), rawpg.execute(), rawpg.SYNC)
    return c.until_ready()


LIMIT = 1000        # [policy] agents_max_rows, the default


@pytest.mark.parametrize("sql,params,kept", [
    ("UPDATE fl_t SET v = v + 1 WHERE id <= $1", [str(LIMIT).encode()], True),
    ("UPDATE fl_t SET v = v + 1 WHERE id <= $1", [str(LIMIT + 1).encode()], False),
    ("UPDATE fl_t SET v = v + 1 WHERE id > $1 RETURNING id, v, repeat('x', 200)", [b"0"],
     False),
    ("UPDATE fl_t SET v = v + 1 WHERE id <= $1 RETURNING id, v, repeat('x', 200)",
     [b"900"], True),
    ("DELETE FROM fl_t WHERE id > $1", [b"0"], False),
    ("INSERT INTO fl_t SELECT g, 0 FROM generate_series(1, 1200) g "
     "ON CONFLICT (id) DO UPDATE SET v = excluded.v + 1", [], False),
    ("INSERT INTO fl_t SELECT g, 0 FROM generate_series(1, 10) g "
     "ON CONFLICT (id) DO UPDATE SET v = excluded.v + 1", [], True),
])
def test_in_block_lane(gproxy, pg, table, sql, params, kept):
    before = truth(pg)
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        _q(c, "BEGIN")
        msgs = _lane(c, sql, params)
        if kept:
            assert not rawpg.errors(msgs) and c.status == b"T"
            n = int(rawpg.tags(msgs)[0].rsplit(" ", 1)[1])
            if "RETURNING" in sql:      # every row, whole, through the lane
                got = rawpg.rows(msgs)
                assert len(got) == n and all(r[2] == b"x" * 200 for r in got)
            assert rawpg.tags(_q(c, "COMMIT")) == ["COMMIT"]
        else:
            assert refused(msgs), msgs
            assert not rawpg.rows(msgs) and c.status == b"E"
            assert rawpg.tags(_q(c, "COMMIT")) == ["ROLLBACK"]
        assert rawpg.rows(_q(c, "SELECT 1")) == [[b"1"]]
    finally:
        c.close()
    after = truth(pg)
    if kept:
        assert after != before and after[0] == before[0]
    else:
        assert after == before


def test_in_block_lane_statement_error_passes(gproxy, pg, table):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        _q(c, "BEGIN")
        msgs = _lane(c, "UPDATE fl_t SET v = v / $1 WHERE id <= 3", [b"0"])
        assert rawpg.errors(msgs)[0]["C"] == "22012" and c.status == b"E"
        _q(c, "ROLLBACK")
        _q(c, "BEGIN")                  # the lane works again after the error
        msgs = _lane(c, "UPDATE fl_t SET v = v + $1 WHERE id <= 3", [b"1"])
        assert rawpg.tags(msgs) == ["UPDATE 3"]
        _q(c, "COMMIT")
    finally:
        c.close()
    assert truth(pg) == (ROWS, 3, 0)


# -- class 5: guarded decisions are cached (not decided again each time), still guarded

@pytest.mark.parametrize("in_block", [False, True])
def test_cached_guarded_decisions_still_measured(gproxy, pg, table, in_block):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        for sql, ok in [("UPDATE fl_t SET v = v + 1 WHERE id <= 900", True),   # decided
                        ("UPDATE fl_t SET v = v + 1 WHERE id <= 900", True),   # exact hit
                        ("UPDATE fl_t SET v = v + 1 WHERE id <= 1200", False),  # shape hit
                        ("UPDATE fl_t SET v = v + 1 WHERE id <= 1200", False),  # exact hit
                        ("UPDATE fl_t SET v = v + 1 WHERE id <= 5", True),
                        ("DELETE FROM fl_t WHERE id > 0", False),
                        ("DELETE FROM fl_t WHERE id > 0", False)]:
            if in_block:
                _q(c, "BEGIN")
            msgs = _q(c, sql)
            assert (not rawpg.errors(msgs)) if ok else refused(msgs), (sql, msgs)
            if in_block:
                _q(c, "COMMIT")
    finally:
        c.close()
    assert truth(pg) == (ROWS, 1805, 0)
