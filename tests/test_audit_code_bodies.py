# Red team, round 19 (helper 99): the audit normalizer replaced every literal with $n,
# code bodies included: `DO $$BEGIN INSERT INTO t73 ...; END$$` (and DO '...', E'...',
# U&'...', a function's AS $$ ... $$, EXECUTE '...' inside them) was recorded as `DO $1`,
# whatever it ran, and every DO block shared one fingerprint. A literal that is code (after
# DO, AS, EXECUTE, DO LANGUAGE x) is kept now, its own literals normalized. Judged by the
# rows the bodies wrote upstream and the records an auditor reads (the values stay out).
from __future__ import annotations

import asyncio
import itertools

import asyncpg
import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, Proxy, run_psql
from exactlib import audit_rows

DB = "appdb"
_n = itertools.count(1)


def _bodies(tag: str) -> list[str]:
    ins = f"INSERT INTO cb_marks VALUES ('{tag}', 'secret-{tag}')"
    q = ins.replace("'", "''")
    return [
        f"DO $$BEGIN {ins}; END$$",
        f"DO 'BEGIN {q}; END'",
        "DO E'BEGIN " + ins.replace("'", "\\'") + "; END'",
        f"DO LANGUAGE plpgsql $x$BEGIN {ins}; END$x$",
        f"DO $$BEGIN EXECUTE '{q}'; END$$",
        f"CREATE OR REPLACE FUNCTION cb_f_{tag}() RETURNS void LANGUAGE sql AS $$ {ins} $$",
    ]


@pytest.fixture(scope="module")
def cproxy(pg, tmp_path_factory):
    pg.execute("CREATE TABLE IF NOT EXISTS cb_marks (tag text, secret text)", dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("code-bodies")).start()
    yield p
    p.stop()


def _send(client: str, proxy, psql_bin: str, who: tuple, sqls: list[str]) -> None:
    dsn = proxy.dsn(*who, dbname=DB)
    if client == "psql":
        args = [a for sql in sqls for a in ("-c", sql)]
        r = run_psql(psql_bin, dsn, *args)
        assert r.returncode == 0, r.stderr
    elif client == "psycopg":
        with psycopg.connect(dsn, autocommit=True) as c:
            for sql in sqls:
                c.execute(sql)
    elif client == "asyncpg":
        async def go():
            c = await asyncpg.connect(dsn)
            try:
                for sql in sqls:
                    await c.execute(sql)
            finally:
                await c.close()
        asyncio.run(go())
    else:
        c = rawpg.RawClient.connect(proxy.port, *who, database=DB)
        try:
            for sql in sqls:
                assert not rawpg.errors(c.run(sql)), sql
        finally:
            c.close()


@pytest.mark.parametrize("who", ["human", "agent"])
@pytest.mark.parametrize("client", ["psql", "psycopg", "asyncpg", "raw"])
def test_code_in_a_literal_is_in_the_record(cproxy, pg, psql_bin, client, who):
    ident = (HUMAN, HUMAN_PASSWORD) if who == "human" else (AGENT, AGENT_PASSWORD)
    tag = f"cb{next(_n)}"
    sqls = _bodies(tag)
    _send(client, cproxy, psql_bin, ident, sqls + [f"SELECT cb_f_{tag}()"])
    ran = pg.execute("SELECT count(*) FROM cb_marks WHERE tag = %s", (tag,), dbname=DB)[0][0]
    assert ran == len(sqls)               # every body ran, the function by its call
    cproxy.stop()
    try:
        got = audit_rows(cproxy, "SELECT statement, fingerprint FROM audit WHERE event = "
                                 "'statement' AND (statement LIKE 'DO %' OR statement LIKE "
                                 f"'CREATE OR REPLACE FUNCTION cb_f_{tag}%') "
                                 "ORDER BY event_id DESC LIMIT 6")
        texts = [r[0] for r in got]
        assert len(texts) == len(sqls), texts
        # each record shows the INSERT its body ran; no value of it, no bare `DO $1`
        assert all("INSERT INTO cb_marks VALUES ($" in t for t in texts), texts
        assert not any("secret" in t or tag in t.replace(f"cb_f_{tag}", "") for t in texts)
        assert not any(t.strip() == "DO $1" for t in texts)
    finally:
        cproxy.start()
