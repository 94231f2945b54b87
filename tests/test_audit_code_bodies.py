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


# (regression hunt, helper 101) where the code hid again: a comment between DO and its
# body, the language's name quoted or a literal, blanks, E'' / U&'' escapes spelling the
# body's own dollar quotes, EXECUTE ('...'), nesting; and a literal behind `-- as` on the
# line before it was kept in clear
HIDING = [
    "DO /* why */ $$BEGIN {ins}; END$$",
    "DO -- why */\n$$BEGIN {ins}; END$$",
    'DO LANGUAGE "plpgsql" $$BEGIN {ins}; END$$',
    "DO LANGUAGE 'plpgsql' $$BEGIN {ins}; END$$",
    "DO" + " " * 300 + "$$BEGIN {ins}; END$$",
    "DO E'BEGIN {ins_e}; END'",
    "DO U&'BEGIN {ins_u}; END' UESCAPE '!'",
    "DO $$BEGIN EXECUTE ('{ins_q}'); END$$",
    "DO $a$BEGIN EXECUTE 'DO $b$BEGIN EXECUTE ''DO $c$BEGIN {ins_qq}; END$c$''; END$b$'; END$a$",
]


def _hiding(tag: str) -> list[str]:
    ins = f"INSERT INTO cb_marks VALUES ($v${tag}$v$, $v$secret-{tag}$v$)"
    quote, twice = "'", "''"
    return [tmpl.format(ins=ins, ins_e=ins.replace("$", "\\x24"),
                        ins_u=ins.replace("$", "!0024"), ins_q=ins.replace(quote, twice),
                        ins_qq=ins.replace(quote, twice * 2)) for tmpl in HIDING]


@pytest.mark.parametrize("client", ["psql", "raw"])
def test_code_stays_in_sight_however_the_body_is_written(cproxy, pg, psql_bin, client):
    tag = f"cb{next(_n)}"
    sqls = _hiding(tag)
    _send(client, cproxy, psql_bin, (HUMAN, HUMAN_PASSWORD), sqls)
    ran = pg.execute("SELECT count(*) FROM cb_marks WHERE tag = %s", (tag,), dbname=DB)[0][0]
    assert ran == len(sqls)
    cproxy.stop()
    try:
        texts = [r[0] for r in audit_rows(
            cproxy, "SELECT statement FROM audit WHERE event = 'statement' AND statement "
                    f"LIKE 'DO%' ORDER BY event_id DESC LIMIT {len(sqls)}")]
        assert len(texts) == len(sqls)
        missing = [t for t in texts if "INSERT INTO cb_marks VALUES ($" not in t]
        assert not missing, missing
        assert not any("secret" in t for t in texts), texts
    finally:
        cproxy.start()


def test_a_literal_after_a_comment_saying_as_is_normalized(cproxy, pg):
    c = rawpg.RawClient.connect(cproxy.port, HUMAN, HUMAN_PASSWORD, database=DB)
    try:
        msgs = c.run("SELECT 1 AS cb_as_probe, -- as\n 'hidden.person@example.com' AS e")
        assert rawpg.rows(msgs) == [[b"1", b"hidden.person@example.com"]]
    finally:
        c.close()
    cproxy.stop()
    try:
        texts = [r[0] for r in audit_rows(cproxy, "SELECT statement FROM audit WHERE "
                                                  "statement LIKE '%cb_as_probe%'")]
        assert texts and not any("example.com" in t for t in texts), texts
    finally:
        cproxy.start()


@pytest.mark.parametrize("cmd", ["sql", "tail"])
def test_the_auditors_terminal_gets_no_control_characters(cproxy, pg, cmd):
    # (helper 103) escape sequences and carriage returns in a statement went to the
    # auditor's terminal as they were: `SELECT 1 /*\x1b[2K\r*/, (SELECT count(ssn) ...)`
    # drew over its own line
    import subprocess
    import sys
    c = rawpg.RawClient.connect(cproxy.port, HUMAN, HUMAN_PASSWORD, database=DB)
    try:
        c.run("SELECT 1 AS cb_term /*\x1b[2K\r*/, (SELECT 2) AS hidden_part \u202e x")
    finally:
        c.close()
    cproxy.stop()
    try:
        args = (["sql", "SELECT statement FROM audit WHERE statement LIKE '%cb_term%'"]
                if cmd == "sql" else ["tail", "-n", "50"])
        r = subprocess.run([sys.executable, "-m", "pgguard", "audit", *args, "--dir",
                            str(cproxy.audit_dir)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "cb_term" in r.stdout and "hidden_part" in r.stdout, r.stdout
        assert "\x1b" not in r.stdout and "\r" not in r.stdout and "\u202e" not in r.stdout
        assert "\\x1b" in r.stdout and "\\u202e" in r.stdout, r.stdout
    finally:
        cproxy.start()
