# The compiled pipe takes a guarded prepared statement's Bind, and its Execute + Sync in
# a transaction block, without the Python hooks (issue 17: the guard must not cost the
# common path). Attacks on that lane, judged by the rows upstream: a write past the row
# limit never commits, whatever the client pipelines behind it, however it rebinds the
# portal, whichever client sends it.
from __future__ import annotations

import asyncio
import time

import asyncpg
import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD
import test_policy_blast_fastlane

ROWS = 1500
BIG = "UPDATE cl_t SET v = v + 1 WHERE id > $1"       # every row: past the limit
SMALL = "UPDATE cl_t SET v = v + 1 WHERE id = $1"     # one row: kept
SEL = "SELECT count(*) FROM cl_t WHERE id > $1"

# the guarded proxy (agents = "guarded"), with and without the audit
gproxy = test_policy_blast_fastlane.gproxy


@pytest.fixture()
def table(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS cl_t")
        c.execute("CREATE TABLE cl_t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        c.execute(f"INSERT INTO cl_t SELECT g, 0 FROM generate_series(1, {ROWS}) g")
        c.execute("GRANT ALL ON cl_t TO PUBLIC")
    yield
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS cl_t")


def changed(pg) -> int:
    """Rows of cl_t changed and committed, read directly upstream."""
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return c.execute("SELECT count(*) FROM cl_t WHERE v <> 0").fetchone()[0]


def client(gproxy) -> rawpg.RawClient:
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    c.send(rawpg.parse(BIG, "big"), rawpg.parse(SMALL, "small"), rawpg.parse(SEL, "sel"),
           rawpg.SYNC)
    assert not rawpg.errors(c.until_ready())
    return c


def refused(msgs) -> bool:
    return any(e["C"] == "42501" and "blast-radius" in e["M"] for e in rawpg.errors(msgs))


def lane_frames(stmt: str, param: bytes, portal: str = "") -> bytes:
    return (rawpg.bind(stmt, [param], portal=portal) + rawpg.describe("P", portal)
            + rawpg.execute(portal) + rawpg.SYNC)


def _go(c, frames: bytes):
    """Send ``frames`` in one write and read up to the next ReadyForQuery."""
    c.send(frames)
    return c.until_ready()


# -- class 1: what the client sends behind the lane's Sync waits for the count --------

def _commit_query_right_behind(c):
    c.send(lane_frames("big", b"0"))
    c.send(rawpg.query("COMMIT"))                   # a second write, no wait
    return c.until_ready(2)


def _commit_extended_right_behind(c):
    c.send(lane_frames("big", b"0"))
    c.send(rawpg.parse("COMMIT", "cm") + rawpg.bind("cm") + rawpg.execute() + rawpg.SYNC)
    return c.until_ready(2)


def _commit_in_the_same_write(c):
    c.send(lane_frames("big", b"0") + rawpg.query("COMMIT"))
    return c.until_ready(2)


def _commit_split_across_writes(c):
    frames = lane_frames("big", b"0") + rawpg.query("COMMIT")
    cut = len(frames) - 3                           # the COMMIT's frame cut in two
    c.send(frames[:cut])
    time.sleep(0.01)
    c.send(frames[cut:])
    return c.until_ready(2)


def _small_then_big_then_commit(c):
    c.send(lane_frames("small", b"7"))
    c.send(lane_frames("big", b"0"))
    c.send(rawpg.query("COMMIT"))
    return c.until_ready(3)


@pytest.mark.parametrize("attack", [
    _commit_query_right_behind, _commit_extended_right_behind, _commit_in_the_same_write,
    _commit_split_across_writes, _small_then_big_then_commit])
def test_nothing_behind_the_lane_commits_a_refused_write(gproxy, pg, table, attack):
    c = client(gproxy)
    try:
        c.send(rawpg.query("BEGIN"))
        c.until_ready()
        msgs = attack(c)
        assert refused(msgs), msgs
        assert c.status in (b"I", b"E")
    finally:
        c.close()
    assert changed(pg) == 0


# -- class 2: the portal's guard follows its Bind, whichever statement it names -------

def _guarded_rebound_over_unguarded(c):
    _go(c, rawpg.bind("sel", [b"0"], portal="p") + rawpg.SYNC)
    c.send(rawpg.close("P", "p") + rawpg.bind("big", [b"0"], portal="p")
           + rawpg.execute("p") + rawpg.SYNC)
    return c.until_ready()


def _closed_and_rebound_on_the_lane(c):
    _go(c, rawpg.bind("sel", [b"0"], portal="p") + rawpg.SYNC)
    c.send(rawpg.close("P", "p") + lane_frames("big", b"0", portal="p"))
    return c.until_ready()


def _unnamed_portal_after_unguarded_in_same_write(c):
    c.send(rawpg.bind("sel", [b"0"]) + rawpg.execute() + rawpg.bind("big", [b"0"])
           + rawpg.execute() + rawpg.SYNC)
    return c.until_ready()


def _guarded_portal_executed_later(c):
    _go(c, rawpg.bind("big", [b"0"], portal="later") + rawpg.SYNC)
    for _ in range(3):
        c.send(lane_frames("sel", b"0"))
        c.until_ready()
    c.send(rawpg.execute("later") + rawpg.SYNC)
    return c.until_ready()


def _guarded_after_small_on_same_portal(c):
    _go(c, lane_frames("small", b"3", portal="q"))
    c.send(rawpg.close("P", "q") + lane_frames("big", b"0", portal="q"))
    return c.until_ready()


def _reparsed_name_after_ddl(c):
    _go(c, rawpg.query("CREATE TEMP TABLE cl_other (x int)"))
    c.send(lane_frames("big", b"0"))
    return c.until_ready()


@pytest.mark.parametrize("attack", [
    _guarded_rebound_over_unguarded, _unnamed_portal_after_unguarded_in_same_write,
    _closed_and_rebound_on_the_lane,
    _guarded_portal_executed_later, _guarded_after_small_on_same_portal,
    _reparsed_name_after_ddl])
def test_a_rebound_portal_keeps_its_statements_guard(gproxy, pg, table, attack):
    c = client(gproxy)
    try:
        c.send(rawpg.query("BEGIN"))
        c.until_ready()
        msgs = attack(c)
        assert refused(msgs), msgs
        c.send(rawpg.query("COMMIT"))
        c.until_ready()
    finally:
        c.close()
    assert changed(pg) <= 1                   # at most the one row SMALL changed


def test_a_guarded_portal_rebound_to_a_read_runs_the_read(gproxy, pg, table):
    c = client(gproxy)
    try:
        c.send(rawpg.query("BEGIN"))
        c.until_ready()
        c.send(rawpg.bind("big", [b"0"], portal="r") + rawpg.SYNC)
        c.until_ready()
        c.send(rawpg.close("P", "r") + rawpg.bind("sel", [b"0"], portal="r")
               + rawpg.execute("r") + rawpg.SYNC)
        msgs = c.until_ready()
        assert rawpg.rows(msgs) == [[str(ROWS).encode()]] and not rawpg.errors(msgs)
        c.send(lane_frames("small", b"9"))
        assert rawpg.tags(c.until_ready()) == ["UPDATE 1"]
        c.send(rawpg.query("COMMIT"))
        c.until_ready()
    finally:
        c.close()
    assert changed(pg) == 1


# -- class 3: real clients' prepared statements in a transaction ----------------------

def test_psycopg_prepared_in_transaction(gproxy, pg, table):
    with psycopg.connect(gproxy.dsn(AGENT, AGENT_PASSWORD)) as c:
        for i in range(1, 6):               # prepared after the first runs, then reused
            c.execute(SMALL.replace("$1", "%s"), (i,), prepare=True)
        with pytest.raises(psycopg.Error) as e:
            c.execute(BIG.replace("$1", "%s"), (0,), prepare=True)
        assert e.value.sqlstate == "42501"
        c.rollback()
        for i in range(1, 6):
            c.execute(SMALL.replace("$1", "%s"), (i,), prepare=True)
        c.commit()
    assert changed(pg) == 5


def test_psycopg_pipeline_commit_behind_a_refused_write(gproxy, pg, table):
    with psycopg.connect(gproxy.dsn(AGENT, AGENT_PASSWORD), autocommit=True) as c:
        with pytest.raises(psycopg.Error):
            with c.pipeline():
                c.execute("BEGIN")
                c.execute(SMALL.replace("$1", "%s"), (1,), prepare=True)
                c.execute(BIG.replace("$1", "%s"), (0,), prepare=True)
                c.execute("COMMIT")
    assert changed(pg) == 0


def test_asyncpg_prepared_in_transaction(gproxy, pg, table):
    async def go():
        c = await asyncpg.connect(gproxy.dsn(AGENT, AGENT_PASSWORD))
        try:
            small = await c.prepare(SMALL)
            big = await c.prepare(BIG)
            tr = c.transaction()
            await tr.start()
            for i in range(1, 4):
                await small.fetch(i)
            with pytest.raises(asyncpg.PostgresError) as e:
                await big.fetch(0)
            assert e.value.sqlstate == "42501"
            await tr.rollback()
            async with c.transaction():
                for i in range(1, 4):
                    await small.fetch(i)
        finally:
            await c.close()
    asyncio.run(go())
    assert changed(pg) == 3


def test_pgbench_style_statements_many_times(gproxy, pg, table):
    """The lane taken again and again: every small write kept, each big one refused."""
    c = client(gproxy)
    try:
        for round_ in range(20):
            c.send(rawpg.query("BEGIN"))
            c.until_ready()
            c.send(lane_frames("small", str(round_ + 1).encode()))
            assert rawpg.tags(c.until_ready()) == ["UPDATE 1"]
            c.send(lane_frames("sel", b"0"))
            c.until_ready()
            if round_ % 5 == 4:
                c.send(lane_frames("big", b"0"))
                assert refused(c.until_ready())
                c.send(rawpg.query("ROLLBACK"))
            else:
                c.send(rawpg.query("COMMIT"))
            c.until_ready()
    finally:
        c.close()
    assert changed(pg) == 16


# -- class 4: a simple Query the cached decision guards, in a block -------------------
# (the compiled pipe hands it to Enforcement.query_lane: no client_items, no decide)

BIG_Q = "UPDATE cl_t SET v = v + 1 WHERE id > {}"
SMALL_Q = "UPDATE cl_t SET v = v + 1 WHERE id = {}"


def _warm(c):
    # the decisions cached: the same texts and shapes again take the compiled path
    for i in (1, 2):
        c.send(rawpg.query(SMALL_Q.format(i)))
        assert rawpg.tags(c.until_ready()) == ["UPDATE 1"]


def _q_commit_right_behind(c):
    c.send(rawpg.query(BIG_Q.format(0)))
    c.send(rawpg.query("COMMIT"))
    return c.until_ready(2)


def _q_commit_split(c):
    frames = rawpg.query(BIG_Q.format(0)) + rawpg.query("COMMIT")
    c.send(frames[:len(frames) - 4])
    time.sleep(0.01)
    c.send(frames[len(frames) - 4:])
    return c.until_ready(2)


def _q_other_literal_same_shape(c):
    c.send(rawpg.query(BIG_Q.format(5)))        # a shape hit, another literal
    c.send(rawpg.parse("COMMIT", "cm2") + rawpg.bind("cm2") + rawpg.execute() + rawpg.SYNC)
    return c.until_ready(2)


def _q_after_small_ones(c):
    for i in range(3, 8):
        c.send(rawpg.query(SMALL_Q.format(i)))
        assert rawpg.tags(c.until_ready()) == ["UPDATE 1"]
    c.send(rawpg.query(BIG_Q.format(0)))
    c.send(rawpg.query("COMMIT"))
    return c.until_ready(2)


def _q_after_agent_ddl(c):
    c.send(rawpg.query("CREATE TEMP TABLE cl_scratch (x int)"))   # decisions judged anew
    c.until_ready()
    c.send(rawpg.query(BIG_Q.format(0)))
    c.send(rawpg.query("COMMIT"))
    return c.until_ready(2)


@pytest.mark.parametrize("attack", [
    _q_commit_right_behind, _q_commit_split, _q_other_literal_same_shape,
    _q_after_small_ones, _q_after_agent_ddl])
def test_a_guarded_query_in_a_block_never_commits_past_the_limit(gproxy, pg, table, attack):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        c.send(rawpg.query("BEGIN"))
        c.until_ready()
        _warm(c)
        msgs = attack(c)
        assert refused(msgs), msgs
    finally:
        c.close()
    assert changed(pg) == 0


def test_psql_script_of_guarded_queries(gproxy, pg, table, psql_bin, tmp_path):
    from conftest import run_psql
    script = tmp_path / "s.sql"
    script.write_text("BEGIN;\n" + "".join(SMALL_Q.format(i) + ";\n" for i in range(1, 6))
                      + "COMMIT;\nBEGIN;\n" + SMALL_Q.format(9) + ";\n" + BIG_Q.format(0)
                      + ";\nCOMMIT;\n")
    r = run_psql(psql_bin, gproxy.dsn(AGENT, AGENT_PASSWORD), "-v", "ON_ERROR_STOP=0",
                 "-f", str(script))
    assert "blast-radius" in r.stderr
    assert changed(pg) == 5             # the first block; the second rolled back whole


def test_psycopg_simple_protocol_block(gproxy, pg, table):
    with psycopg.connect(gproxy.dsn(AGENT, AGENT_PASSWORD)) as c:
        cur = psycopg.ClientCursor(c)
        for round_ in range(3):
            for i in range(1, 4):
                cur.execute(SMALL_Q.format(10 * round_ + i))
                assert cur.rowcount == 1
            if round_ == 1:
                with pytest.raises(psycopg.Error) as e:
                    cur.execute(BIG_Q.format(0))
                assert e.value.sqlstate == "42501"
                c.rollback()
            else:
                c.commit()
    assert changed(pg) == 6


# -- class 5: the guard follows the names Postgres keeps ------------------------------
# A Parse, Bind or Close that Postgres refuses or skips (after an earlier error of its
# segment) leaves the old statement or portal in place: its guard must stay too.

ALL = "UPDATE cl_t SET v = v + 1 WHERE id > $1"
ERR = rawpg.parse("SELECT 1/0", "z0") + rawpg.bind("z0") + rawpg.execute()


def _named_parse_refused(c):
    _go(c, rawpg.parse(ALL, "u") + rawpg.SYNC)
    c.send(rawpg.parse("SELECT 1", "u") + rawpg.SYNC)       # 42P05: u stays
    c.until_ready()
    _go(c, rawpg.bind("u", [b"0"]) + rawpg.execute() + rawpg.SYNC)


def _named_parse_refused_in_block(c):
    _go(c, rawpg.parse(ALL, "u") + rawpg.SYNC)
    _go(c, rawpg.query("BEGIN"))
    _go(c, rawpg.parse("SELECT 1", "u") + rawpg.SYNC)
    _go(c, rawpg.query("ROLLBACK"))
    _go(c, rawpg.query("BEGIN"))
    _go(c, lane_frames("u", b"0"))
    _go(c, rawpg.query("COMMIT"))


def _close_skipped_after_error(c):
    _go(c, rawpg.parse(ALL, "u") + rawpg.SYNC)
    c.send(ERR + rawpg.close("S", "u") + rawpg.SYNC)        # skipped: u stays
    c.until_ready()
    _go(c, rawpg.bind("u", [b"0"]) + rawpg.execute() + rawpg.SYNC)


def _unnamed_close_skipped_after_error(c):
    _go(c, rawpg.parse(ALL) + rawpg.SYNC)
    _go(c, ERR + rawpg.close("S", "") + rawpg.SYNC)
    _go(c, rawpg.bind("", [b"0"]) + rawpg.execute() + rawpg.SYNC)


def _unnamed_parse_skipped_after_error(c):
    _go(c, rawpg.parse(ALL) + rawpg.SYNC)
    c.send(ERR + rawpg.parse("SELECT 1") + rawpg.SYNC)       # skipped: "" stays
    c.until_ready()
    _go(c, rawpg.bind("", [b"0"]) + rawpg.execute() + rawpg.SYNC)


def _query_skipped_after_error(c):
    _go(c, rawpg.parse(ALL) + rawpg.SYNC)
    c.send(ERR + rawpg.query("SELECT 1"))                    # skipped until the Sync
    time.sleep(0.2)
    _go(c, rawpg.SYNC)
    _go(c, rawpg.bind("", [b"0"]) + rawpg.execute() + rawpg.SYNC)


def _portal_rebind_failed_then_rollback_to(c):
    _go(c, rawpg.parse(ALL, "u") + rawpg.parse("SELECT 1", "q") + rawpg.SYNC)
    _go(c, rawpg.query("BEGIN"))
    _go(c, rawpg.bind("u", [b"0"], portal="p") + rawpg.SYNC)
    _go(c, rawpg.query("SAVEPOINT a"))
    c.send(rawpg.bind("q", portal="p") + rawpg.SYNC)          # 42P03: p stays
    c.until_ready()
    _go(c, rawpg.query("ROLLBACK TO SAVEPOINT a"))
    _go(c, rawpg.execute("p") + rawpg.SYNC)
    _go(c, rawpg.query("COMMIT"))


def _unnamed_portal_bind_skipped_then_rollback_to(c):
    _go(c, rawpg.parse(ALL, "u") + rawpg.parse("SELECT 1", "q") + rawpg.SYNC)
    _go(c, rawpg.query("BEGIN"))
    _go(c, rawpg.bind("u", [b"0"]) + rawpg.SYNC)
    _go(c, rawpg.query("SAVEPOINT a"))
    c.send(ERR + rawpg.bind("q") + rawpg.SYNC)                # skipped: "" stays
    c.until_ready()
    c.send(rawpg.parse("ROLLBACK TO SAVEPOINT a", "rb") + rawpg.bind("rb", portal="r")
           + rawpg.execute("r") + rawpg.SYNC)
    c.until_ready()
    _go(c, rawpg.execute("") + rawpg.SYNC)
    _go(c, rawpg.query("COMMIT"))


@pytest.mark.parametrize("attack", [
    _named_parse_refused, _named_parse_refused_in_block, _close_skipped_after_error,
    _unnamed_close_skipped_after_error, _unnamed_parse_skipped_after_error,
    _query_skipped_after_error, _portal_rebind_failed_then_rollback_to,
    _unnamed_portal_bind_skipped_then_rollback_to])
def test_a_kept_statement_or_portal_keeps_its_guard(gproxy, pg, table, attack):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        attack(c)
        c.send(rawpg.query("SELECT 1"))         # the session still works
        assert rawpg.rows(c.until_ready()) == [[b"1"]]
    finally:
        c.close()
    assert changed(pg) == 0


def test_a_closed_name_parsed_again_runs_its_new_statement(gproxy, pg, table):
    """The kept guard measures by the counters: a read under a reused name still runs."""
    c = client(gproxy)
    try:
        c.send(rawpg.close("S", "big") + rawpg.SYNC)
        c.until_ready()
        c.send(rawpg.parse(SEL, "big") + rawpg.SYNC)
        assert not rawpg.errors(c.until_ready())
        c.send(rawpg.bind("big", [b"0"]) + rawpg.execute() + rawpg.SYNC)
        msgs = c.until_ready()
        assert rawpg.rows(msgs) == [[str(ROWS).encode()]] and not rawpg.errors(msgs)
        c.send(rawpg.close("S", "small") + rawpg.SYNC)
        c.until_ready()
        c.send(rawpg.parse(SMALL, "small") + rawpg.SYNC)
        c.until_ready()
        c.send(rawpg.bind("small", [b"4"]) + rawpg.execute() + rawpg.SYNC)
        assert rawpg.tags(c.until_ready()) == ["UPDATE 1"]
    finally:
        c.close()
    assert changed(pg) == 1


# -- class 6: a guarded simple Query behind extended messages with no Sync ------------
# What they run (a COMMIT, a BEGIN) comes first; the guard cannot know where the Query
# would run: it is refused, and nothing of it commits.

def _behind(c, ext: bytes, sql: str = BIG_Q.format(0), split: bool = False):
    _go(c, rawpg.query("BEGIN"))
    _warm(c)
    if split:
        c.send(ext)
        time.sleep(0.05)
        c.send(rawpg.query(sql))
    else:
        c.send(ext + rawpg.query(sql))
    msgs = c.until_ready()
    _go(c, rawpg.query("COMMIT"))
    return msgs


@pytest.mark.parametrize("ext,sql,split", [
    (rawpg.parse("COMMIT") + rawpg.bind() + rawpg.execute(), BIG_Q.format(0), False),
    (rawpg.parse("COMMIT") + rawpg.bind() + rawpg.execute(), BIG_Q.format(0), True),
    (rawpg.parse("SELECT 1") + rawpg.bind() + rawpg.execute(), BIG_Q.format(0), False),
    (rawpg.parse("") + rawpg.bind() + rawpg.execute(), BIG_Q.format(0), False),
    (rawpg.parse("SHOW search_path") + rawpg.bind() + rawpg.execute(), BIG_Q.format(0), True),
    (rawpg.parse("SELECT 1") + rawpg.bind() + rawpg.execute(),
     "DELETE FROM cl_t WHERE id > 5", False),
])
def test_guarded_query_behind_unsynced_extended_messages(gproxy, pg, table, ext, sql, split):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        msgs = _behind(c, ext, sql, split)
        assert refused(msgs) or any(e["C"] == "42501" for e in rawpg.errors(msgs)), msgs
    finally:
        c.close()
    assert changed(pg) <= 2             # _warm's two rows (the extended COMMIT commits them)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM cl_t").fetchone()[0] == ROWS


# -- class 7: second pass: rollbacks by prepared statement, FunctionCalls Postgres
# skips, SQL PREPARE bound by the protocol, SQL FETCH of a protocol portal ------------

def _rollback_to_by_prepared_statement(c, rb: str = "ROLLBACK TO SAVEPOINT s"):
    _go(c, rawpg.query("BEGIN"))
    c.send(rawpg.parse(rb, "rb") + rawpg.SYNC)                  # parsed before any ghost
    c.until_ready()
    _go(c, rawpg.parse(ALL, "u") + rawpg.bind("u", [b"0"], portal="p") + rawpg.SYNC)
    _go(c, rawpg.query("SAVEPOINT s"))
    c.send(rawpg.parse("SELECT 1", "x") + rawpg.bind("x", portal="p") + rawpg.SYNC)  # 42P03
    c.until_ready()
    _go(c, rawpg.bind("rb") + rawpg.execute() + rawpg.SYNC)
    _go(c, rawpg.execute("p") + rawpg.SYNC)
    _go(c, rawpg.query("COMMIT"))


def _rollback_to_short_form(c):
    _rollback_to_by_prepared_statement(c, "ROLLBACK TO s")


def _rollback_bound_early_executed_late(c):
    _go(c, rawpg.query("BEGIN"))
    _go(c, rawpg.parse("rollback transaction to savepoint s", "rb") + rawpg.SYNC)
    _go(c, rawpg.parse(ALL, "u") + rawpg.bind("u", [b"0"], portal="p") + rawpg.SYNC)
    _go(c, rawpg.query("SAVEPOINT s"))
    c.send(rawpg.bind("rb", portal="r") + rawpg.SYNC)             # bound before the ghost
    c.until_ready()
    _go(c, rawpg.parse("SELECT 1", "x") + rawpg.bind("x", portal="p") + rawpg.SYNC)
    c.send(rawpg.query("ROLLBACK TO SAVEPOINT s"))                 # p's rebind undone
    c.until_ready()
    _go(c, rawpg.parse("SELECT 1", "y") + rawpg.bind("y", portal="p") + rawpg.SYNC)  # 42P03
    c.send(rawpg.execute("r") + rawpg.SYNC)                        # r: ROLLBACK TO (fails:
    c.until_ready()                                                # the portal r died)
    _go(c, rawpg.query("ROLLBACK TO SAVEPOINT s"))
    _go(c, rawpg.execute("p") + rawpg.SYNC)
    _go(c, rawpg.query("COMMIT"))


def _function_call_skipped_then_query(c):
    _go(c, rawpg.parse(ALL) + rawpg.SYNC)
    c.send(rawpg.bind("missing") + rawpg.function_call(2026) + rawpg.query("SELECT 1")
           + rawpg.SYNC)
    c.until_ready()
    _go(c, rawpg.bind("", [b"0"]) + rawpg.execute() + rawpg.SYNC)


def _function_call_skipped_then_parse(c):
    _go(c, rawpg.parse(ALL) + rawpg.SYNC)
    _go(c, ERR + rawpg.function_call(2026) + rawpg.parse("SELECT 1") + rawpg.SYNC)
    _go(c, rawpg.bind("", [b"0"]) + rawpg.execute() + rawpg.SYNC)


def _sql_prepare_bound_by_protocol(c):
    _go(c, rawpg.query("PREPARE sq AS UPDATE cl_t SET v = v + 1 WHERE id > $1"))
    _go(c, rawpg.bind("sq", [b"0"]) + rawpg.execute() + rawpg.SYNC)


def _sql_prepare_bound_in_block(c):
    _go(c, rawpg.query("BEGIN"))
    _go(c, rawpg.query("PREPARE sq2 AS UPDATE cl_t SET v = v + 1 WHERE id > $1"))
    _go(c, lane_frames("sq2", b"0"))
    _go(c, rawpg.query("COMMIT"))


def _sql_prepare_by_parse_bound_by_protocol(c):
    c.send(rawpg.parse("PREPARE sq3 AS UPDATE cl_t SET v = v + 1 WHERE id > $1")
           + rawpg.bind() + rawpg.execute() + rawpg.SYNC)
    c.until_ready()
    _go(c, rawpg.bind("sq3", [b"0"]) + rawpg.execute() + rawpg.SYNC)


def _sql_fetch_of_guarded_portal(c, sql: str = "FETCH 1 FROM p"):
    _go(c, rawpg.query("BEGIN"))
    c.send(rawpg.parse(ALL + " RETURNING id", "ur") + rawpg.bind("ur", [b"0"], portal="p")
           + rawpg.SYNC)
    c.until_ready()
    _go(c, rawpg.query(sql))
    _go(c, rawpg.query("COMMIT"))


def _sql_move_of_guarded_portal(c):
    _sql_fetch_of_guarded_portal(c, "MOVE ALL IN p")


def _sql_fetch_zero_of_guarded_portal(c):
    _sql_fetch_of_guarded_portal(c, "FETCH FORWARD 0 FROM p")


def _sql_fetch_extended_of_guarded_portal(c):
    _go(c, rawpg.query("BEGIN"))
    c.send(rawpg.parse(ALL + " RETURNING id", "ur") + rawpg.bind("ur", [b"0"], portal="p")
           + rawpg.SYNC)
    c.until_ready()
    _go(c, rawpg.parse("FETCH 1 FROM p") + rawpg.bind() + rawpg.execute() + rawpg.SYNC)
    _go(c, rawpg.query("COMMIT"))


@pytest.mark.parametrize("attack", [
    _rollback_to_by_prepared_statement, _rollback_to_short_form,
    _rollback_bound_early_executed_late, _function_call_skipped_then_query,
    _function_call_skipped_then_parse, _sql_prepare_bound_by_protocol,
    _sql_prepare_bound_in_block, _sql_prepare_by_parse_bound_by_protocol,
    _sql_fetch_of_guarded_portal, _sql_move_of_guarded_portal,
    _sql_fetch_zero_of_guarded_portal, _sql_fetch_extended_of_guarded_portal])
def test_second_pass_routes_keep_the_guard(gproxy, pg, table, attack):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        attack(c)
    finally:
        c.close()
    assert changed(pg) == 0


@pytest.mark.parametrize("in_block", [False, True])
def test_many_guarded_portals_over_many_transactions(gproxy, pg, table, in_block):
    """Portals die with their transaction: a long session that binds, runs and closes
    a guarded named portal per transaction is never cut off (its ghosts expire)."""
    c = client(gproxy)
    try:
        for i in range(1, 1101):
            if in_block:
                c.send(rawpg.query("BEGIN"))
                c.until_ready()
            c.send(rawpg.bind("small", [str(i).encode()], portal=f"C_{i}")
                   + rawpg.execute(f"C_{i}") + rawpg.close("P", f"C_{i}") + rawpg.SYNC)
            msgs = c.until_ready()
            assert rawpg.tags(msgs) == ["UPDATE 1"], msgs
            if in_block:
                c.send(rawpg.query("COMMIT"))
                c.until_ready()
    finally:
        c.close()
    assert changed(pg) == 1100


# -- class 8: third pass: code that FETCHes or PREPAREs, decisions already cached ----

def _do_move_refcursor(c, body: str = "DECLARE c refcursor := 'p'; BEGIN MOVE FORWARD ALL "
                                      "IN c; END"):
    _go(c, rawpg.query("BEGIN"))
    _go(c, rawpg.parse(ALL + " RETURNING id", "ur") + rawpg.bind("ur", [b"0"], portal="p")
        + rawpg.SYNC)
    _go(c, rawpg.query(f"DO $$ {body} $$"))
    _go(c, rawpg.query("COMMIT"))


def _do_fetch_loop(c):
    _do_move_refcursor(c, "DECLARE c refcursor := 'p'; r record; BEGIN LOOP FETCH c INTO r; "
                          "EXIT WHEN NOT FOUND; END LOOP; END")


def _do_move_computed_name(c):
    _do_move_refcursor(c, "DECLARE c refcursor := chr(112); BEGIN MOVE ALL IN c; END")


def _do_move_by_parse(c):
    _go(c, rawpg.query("BEGIN"))
    _go(c, rawpg.parse(ALL + " RETURNING id", "ur") + rawpg.bind("ur", [b"0"], portal="p")
        + rawpg.SYNC)
    _go(c, rawpg.parse("DO $$ DECLARE c refcursor := 'p'; BEGIN MOVE ALL IN c; END $$")
        + rawpg.bind() + rawpg.execute() + rawpg.SYNC)
    _go(c, rawpg.query("COMMIT"))


def _do_move_unnamed_portal(c):
    _go(c, rawpg.query("BEGIN"))
    _go(c, rawpg.parse(ALL + " RETURNING id", "ur") + rawpg.bind("ur", [b"0"]) + rawpg.SYNC)
    _go(c, rawpg.query("DO $$ DECLARE c refcursor := ''; BEGIN MOVE ALL IN c; END $$"))
    _go(c, rawpg.query("COMMIT"))


def _do_prepare_then_bind(c, in_block: bool = False):
    if in_block:
        _go(c, rawpg.query("BEGIN"))
    _go(c, rawpg.query("DO $$ BEGIN PREPARE dp AS UPDATE cl_t SET v = v + 1 WHERE id > 0; "
                       "END $$"))
    _go(c, rawpg.bind("dp") + rawpg.execute() + rawpg.SYNC)
    if in_block:
        _go(c, rawpg.query("COMMIT"))


def _do_prepare_then_bind_in_block(c):
    _do_prepare_then_bind(c, True)


def _do_prepare_by_parse_then_bind(c):
    _go(c, rawpg.parse("DO $$ BEGIN PREPARE dp2 AS DELETE FROM cl_t WHERE id > 0; END $$")
        + rawpg.bind() + rawpg.execute() + rawpg.SYNC)
    _go(c, rawpg.bind("dp2") + rawpg.execute() + rawpg.SYNC)


def _rollback_prepared_three_times(c):
    # the same texts again: their decisions are cached by now
    for _ in range(3):
        _rollback_to_by_prepared_statement(c)
        _go(c, rawpg.close("S", "rb") + rawpg.close("S", "u") + rawpg.close("S", "x")
            + rawpg.SYNC)


@pytest.mark.parametrize("attack", [
    _do_move_refcursor, _do_fetch_loop, _do_move_computed_name, _do_move_by_parse,
    _do_move_unnamed_portal, _do_prepare_then_bind, _do_prepare_then_bind_in_block,
    _do_prepare_by_parse_then_bind, _rollback_prepared_three_times])
def test_third_pass_routes_keep_the_guard(gproxy, pg, table, attack):
    for _ in range(2):                      # the second time from the decision cache
        c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
        try:
            attack(c)
        finally:
            c.close()
        assert changed(pg) == 0
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM cl_t").fetchone()[0] == ROWS


# -- class 9: a rollback in a failed block reaches Postgres, whatever ghost shares its
# portal's name (pgjdbc: BEGIN, a guarded write, an error, ROLLBACK by Parse/Bind/Execute)

def _failed_block_with_ghost(c, portal: str = "") -> None:
    _go(c, rawpg.query("BEGIN"))
    msgs = _go(c, rawpg.bind("small", [b"1"], portal=portal) + rawpg.execute(portal)
               + rawpg.SYNC)                                    # a guarded portal
    assert not rawpg.errors(msgs)
    close = rawpg.close("P", portal) if portal else b""      # (a named one is closed)
    msgs = _go(c, close + rawpg.bind("sel", [b"0"], portal=portal) + rawpg.execute(portal)
               + rawpg.SYNC)                                    # replaced: a ghost
    assert not rawpg.errors(msgs)
    assert rawpg.errors(_go(c, rawpg.query("SELECT 1/0")))[0]["C"] == "22012"


@pytest.mark.parametrize("portal,rollback", [
    ("", rawpg.parse("ROLLBACK") + rawpg.bind() + rawpg.execute()),
    ("", rawpg.parse("ROLLBACK", "rbn") + rawpg.bind("rbn") + rawpg.execute()),
    ("", rawpg.parse("ABORT") + rawpg.bind() + rawpg.describe("P") + rawpg.execute()),
    ("q", rawpg.close("P", "q") + rawpg.parse("ROLLBACK") + rawpg.bind(portal="q")
     + rawpg.execute("q")),
    ("q", rawpg.parse("rollback work", "rbq") + rawpg.close("P", "q")
     + rawpg.bind("rbq", portal="q") + rawpg.execute("q") + rawpg.close("P", "q")),
], ids=["unnamed", "named-statement", "abort", "named-portal", "named-both"])
def test_a_rollback_in_a_failed_block_runs(gproxy, pg, table, portal, rollback):
    for _ in range(3):                          # again from the decision cache
        c = client(gproxy)
        try:
            _failed_block_with_ghost(c, portal)
            msgs = _go(c, rollback + rawpg.SYNC)
            assert not rawpg.errors(msgs), rawpg.errors(msgs)
            assert msgs[-1] == (b"Z", b"I")     # the block is over, upstream
            assert rawpg.rows(_go(c, rawpg.query("SELECT count(*) FROM cl_t")))[0] == \
                [str(ROWS).encode()]
        finally:
            c.close()
        assert changed(pg) == 0                 # the one-row write rolled back
