# A human under no policy may turn standard_conforming_strings off (agents are refused
# it; the session ends if a route nobody judged moves it). Postgres then reads a
# backslash in a plain '...' literal as an escape, while the audit's normalizer read
# with the setting on: `SELECT 'a\' , ' ; UPDATE t ...; --'` was recorded as
# `SELECT $1 , $2` and the UPDATE ran out of the log's sight. Once a session has had the
# setting off, a statement the two readings normalize differently is recorded both
# ways. Judged by what ran upstream (the counter, the sequence) and what an auditor
# reads in the Parquet files.
from __future__ import annotations

import asyncio
import itertools

import asyncpg
import psycopg
import pytest
import rawpg
from conftest import HUMAN, HUMAN_PASSWORD, Proxy, run_psql
from exactlib import audit_rows

DB = "appdb"
OFF = "SET standard_conforming_strings = off"
OFF_FN = "SELECT set_config('standard_conforming_strings', 'off', false)"
_tags = itertools.count(1)


def _hidden_update(tag: str, prefix: str = "") -> str:
    # two statements to Postgres with the setting off; one SELECT of two literals on
    return (f"SELECT {prefix}'a\\' , ' ; UPDATE scs_marks SET n = n + 1 WHERE tag = "
            f"$q${tag}$q$; --'")


def _hidden_call(seq: str) -> str:
    # one statement either way (fit for a Parse): the call is code only with it off
    return f"SELECT 'a\\' , ' , nextval($q${seq}$q$) --'"


@pytest.fixture(scope="module", params=["batched", "strict"])
def sproxy(request, pg, tmp_path_factory):
    audit = 'durability = "strict"\n' if request.param == "strict" else ""
    p = Proxy(pg, tmp_path_factory.mktemp(f"scs-{request.param}"),
              audit_extra=audit).start()
    p.strict = request.param == "strict"
    pg.execute("CREATE TABLE IF NOT EXISTS scs_marks (tag text PRIMARY KEY, n int)",
               dbname=DB)
    yield p
    p.stop()


def _mark(pg, tag: str) -> None:
    pg.execute("INSERT INTO scs_marks VALUES (%s, 0)", (tag,), dbname=DB)
    pg.execute(f"CREATE SEQUENCE IF NOT EXISTS scs_seq_{tag}", dbname=DB)


def _ran(pg, tag: str) -> tuple[int, int]:
    n = pg.execute("SELECT n FROM scs_marks WHERE tag = %s", (tag,), dbname=DB)[0][0]
    called = pg.execute(f"SELECT last_value, is_called FROM scs_seq_{tag}", dbname=DB)[0]
    return n, called[0] if called[1] else 0


def _recorded(proxy, needle: str) -> list:
    return audit_rows(proxy, "SELECT statement FROM audit WHERE event = 'statement' AND "
                             f"statement LIKE '%{needle}%'")


def _run(mode: str, proxy, psql_bin: str, tag: str) -> None:
    dsn = proxy.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB)
    upd, call = _hidden_update(tag), _hidden_call(f"scs_seq_{tag}")
    if mode == "psql":
        r = run_psql(psql_bin, dsn, "-c", OFF, "-c", upd, "-c", call)
        assert r.returncode == 0, r.stderr
    elif mode == "psycopg":                 # extended protocol: one statement a Parse
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(OFF_FN)
            c.execute(call)
            c.execute(call, prepare=True)
            cur = psycopg.ClientCursor(c)       # simple Query: the two-statement one
            cur.execute(_hidden_update(tag, "N"))
    elif mode == "asyncpg":
        async def go():
            c = await asyncpg.connect(dsn)
            try:
                await c.execute(OFF)
                await c.execute(upd)            # simple Query
                await c.fetch(call)             # Parse / Bind / Execute
            finally:
                await c.close()
        asyncio.run(go())
    elif mode == "raw-extended-pipeline":
        # Postgres reports the change at the next ReadyForQuery: with no Sync between,
        # the hidden statements are answered before the report comes
        c = rawpg.RawClient.connect(proxy.port, HUMAN, HUMAN_PASSWORD, database=DB)
        try:
            c.send(rawpg.parse(OFF), rawpg.bind(), rawpg.execute(),
                   rawpg.parse(call), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
            msgs = c.until_ready()
            assert not rawpg.errors(msgs), rawpg.errors(msgs)
            assert not rawpg.errors(c.run(upd))
        finally:
            c.close()
    elif mode == "raw-pipelined":
        # the SET and what it changes in one write: the hidden statements are sent
        # before the setting's report comes back
        c = rawpg.RawClient.connect(proxy.port, HUMAN, HUMAN_PASSWORD, database=DB)
        try:
            c.send(rawpg.query(OFF), rawpg.query(upd), rawpg.parse(call), rawpg.bind(),
                   rawpg.execute(), rawpg.SYNC)
            msgs = c.until_ready(3)
            assert not rawpg.errors(msgs), rawpg.errors(msgs)
        finally:
            c.close()
    else:                                   # raw, the setting by set_config in a Parse
        c = rawpg.RawClient.connect(proxy.port, HUMAN, HUMAN_PASSWORD, database=DB)
        try:
            c.send(rawpg.parse(OFF_FN), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
            assert not rawpg.errors(c.until_ready())
            assert not rawpg.errors(c.run(upd))
            c.send(rawpg.parse(call, "s1"), rawpg.bind("s1"), rawpg.execute(), rawpg.SYNC)
            assert not rawpg.errors(c.until_ready())
        finally:
            c.close()


MODES = ["psql", "psycopg", "asyncpg", "raw-pipelined", "raw-set_config",
         "raw-extended-pipeline"]


@pytest.mark.parametrize("mode", MODES)
def test_statements_read_with_the_setting_off_are_in_the_log(sproxy, pg, psql_bin, mode):
    tag = f"t{next(_tags)}"
    _mark(pg, tag)
    _run(mode, sproxy, psql_bin, tag)
    n, last = _ran(pg, tag)
    assert n >= 1 and last >= 1                 # upstream ran the hidden code
    sproxy.stop()
    try:
        # the auditor finds what ran: the UPDATE of this tag, the call of its sequence
        assert _recorded(sproxy, "UPDATE scs_marks SET n = n + $% WHERE tag = $%"), mode
        assert _recorded(sproxy, "nextval($%)"), mode
        hidden = _recorded(sproxy, "standard_conforming_strings was off%scs_marks")
        assert hidden, mode
    finally:
        sproxy.start()


def test_texts_the_two_readings_split_are_recorded_both_ways(sproxy, pg):
    # a session under no policy, the setting untouched: a text the two readings
    # normalize alike is recorded once, as usual; one they split is recorded both ways
    # (the report of a change may come after the statement it changed: see above)
    c = rawpg.RawClient.connect(sproxy.port, HUMAN, HUMAN_PASSWORD, database=DB)
    try:
        msgs = c.run("SELECT 'C:\\dir' AS scs_path_one")
        assert rawpg.rows(msgs) == [[b"C:\\dir"]]
        msgs = c.run("SELECT 'keep\\' AS scs_keep_one, 'x' AS scs_keep_two")
        assert rawpg.rows(msgs) == [[b"keep\\", b"x"]]
    finally:
        c.close()
    sproxy.stop()
    try:
        got = [r[0] for r in _recorded(sproxy, "scs_path_one")]
        assert got == ["SELECT $1 AS scs_path_one"]
        got = [r[0] for r in _recorded(sproxy, "scs_keep_one")]
        usual = "SELECT $1 AS scs_keep_one, $2 AS scs_keep_two"
        assert len(got) == 1 and got[0].startswith(usual + "\n/* pgguard:"), got
    finally:
        sproxy.start()
