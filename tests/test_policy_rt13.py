# Red team, round 13 (policy), judged by the rows upstream:
#  F1 - a FunctionCall message of a function that changes rows ran with no row limit
#       (SELECT f() of the same function was measured and rolled back).
#  F2 - the same function through DECLARE CURSOR + FETCH / MOVE (or WITH HOLD, changed at
#       COMMIT) and through COPY (SELECT f()) TO STDOUT: the guard measured the DECLARE
#       (nothing ran yet) or did not run at all, and 2,500 rows changed past a limit of
#       1,000. Such forms of a statement that may change rows are refused now: the
#       hint says to run it as a plain statement, where the limit applies.
#  F3 - a read-only token created large objects, sent NOTIFY / pg_notify and ran
#       ANALYZE (Postgres' read-only mode lets them through). Refused by the scope now.
import subprocess

import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD
import test_policy_guard_scope
from test_policy_guard_scope import readonly_dsn

sproxy = test_policy_guard_scope.sproxy       # the read-only token's proxy (a fixture)

DB = "appdb"
ROWS = 3000


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    from conftest import Proxy
    p = Proxy(pg, tmp_path_factory.mktemp("policy-rt13"))
    p.config.write_text(p.config.read_text().replace('agents = "allow"', 'agents = "guarded"'))
    p.start()
    yield p
    p.stop()


FUNCS = {
    "plpgsql-update": "CREATE OR REPLACE FUNCTION rt13_f() RETURNS int LANGUAGE plpgsql AS "
                      "$$BEGIN UPDATE rt13_t SET v = 0 WHERE id > 0; RETURN 1; END$$",
    "sql-delete": "CREATE OR REPLACE FUNCTION rt13_f() RETURNS int LANGUAGE sql AS "
                  "$$DELETE FROM rt13_t WHERE id > 10; SELECT 1$$",
    "nested": "CREATE OR REPLACE FUNCTION rt13_g() RETURNS void LANGUAGE plpgsql AS "
              "$$BEGIN UPDATE rt13_t SET v = v + 1; END$$; "
              "CREATE OR REPLACE FUNCTION rt13_f() RETURNS int LANGUAGE plpgsql AS "
              "$$BEGIN PERFORM rt13_g(); RETURN 1; END$$",
    "argument": "CREATE OR REPLACE FUNCTION rt13_f(n int DEFAULT 5) RETURNS int "
                "LANGUAGE plpgsql AS $$BEGIN UPDATE rt13_t SET v = n WHERE id > n; "
                "RETURN 1; END$$",
    "through-view": "CREATE OR REPLACE VIEW rt13_v AS SELECT * FROM rt13_t; "
                    "CREATE OR REPLACE FUNCTION rt13_f() RETURNS int LANGUAGE plpgsql AS "
                    "$$BEGIN UPDATE rt13_v SET v = 7 WHERE id > 1; RETURN 1; END$$",
}


@pytest.fixture(params=list(FUNCS))
def writer(request, pg):
    """The agent's own table of ROWS rows and a function that changes most of them (as
    a DBA would have made it: the agent's own CREATE FUNCTION is judged too)."""
    pg.execute("DROP VIEW IF EXISTS rt13_v; DROP FUNCTION IF EXISTS rt13_f(); "
               "DROP FUNCTION IF EXISTS rt13_f(int); DROP FUNCTION IF EXISTS rt13_g(); "
               "DROP TABLE IF EXISTS rt13_t; "
               f"CREATE TABLE rt13_t AS SELECT g AS id, 1 AS v FROM generate_series(1, {ROWS}) g; "
               "GRANT ALL ON rt13_t TO PUBLIC; " + FUNCS[request.param] +
               "; GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO PUBLIC", dbname=DB)
    yield request.param


def _rows(pg):
    return pg.execute("SELECT count(*), sum(v) FROM rt13_t", dbname=DB)[0]


def _oid(pg):
    return pg.execute("SELECT 'rt13_f'::regproc::oid", dbname=DB)[0][0]


def test_function_call_message_of_a_writing_function_is_refused(gproxy, pg, writer):
    before = _rows(pg)
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        args = [b"3"] if writer == "argument" else []
        c.send(rawpg.function_call(_oid(pg), args))
        msgs = c.until_ready()
        errs = rawpg.errors(msgs)
        # the session goes on
        c.send(rawpg.query("SELECT 1"))
        assert rawpg.rows(c.until_ready()) == [[b"1"]]
    finally:
        c.close()
    assert _rows(pg) == before
    assert errs and "blast-radius" in errs[0]["M"] and "FunctionCall" in errs[0]["M"], errs


def test_plain_call_is_still_measured(gproxy, pg, writer):
    """The hint's way: SELECT f() runs, under the row limit (rolled back past it)."""
    before = _rows(pg)
    with psycopg.connect(gproxy.dsn(dbname=DB), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("SELECT rt13_f()")
    assert "blast-radius" in e.value.diag.message_primary
    assert _rows(pg) == before


CURSORS = [
    ("psql", "BEGIN; DECLARE c CURSOR FOR SELECT rt13_f(); FETCH ALL FROM c; COMMIT;"),
    ("psql", "BEGIN; DECLARE c CURSOR FOR SELECT rt13_f(); MOVE ALL IN c; COMMIT;"),
    ("psql", "DECLARE c CURSOR WITH HOLD FOR SELECT rt13_f(); FETCH ALL FROM c;"),
    ("psql", "BEGIN; DECLARE c SCROLL CURSOR FOR SELECT rt13_f() FROM generate_series(1, 2); "
             "FETCH LAST FROM c; COMMIT;"),
    ("psql", "COPY (SELECT rt13_f()) TO STDOUT"),
    ("psql", "COPY (SELECT x FROM (SELECT rt13_f() AS x) s) TO STDOUT WITH (FORMAT csv)"),
    ("psycopg-named", "SELECT rt13_f()"),
    ("psycopg-copy", "COPY (SELECT rt13_f()) TO STDOUT"),
    ("raw", "BEGIN; DECLARE c CURSOR FOR SELECT rt13_f(); FETCH ALL FROM c; COMMIT"),
    ("raw-extended", "DECLARE c CURSOR WITH HOLD FOR SELECT rt13_f()"),
]


def _run(client, proxy, sql, psql_bin):
    """Everything the client was told (text)."""
    if client == "psql":
        r = subprocess.run([psql_bin, proxy.dsn(dbname=DB), "-X", "-c", sql],
                           capture_output=True, text=True, timeout=60)
        return r.stdout + r.stderr
    if client in ("psycopg-named", "psycopg-copy"):
        with psycopg.connect(proxy.dsn(dbname=DB)) as c:
            try:
                if client == "psycopg-named":
                    with c.cursor(name="rt13") as cur:
                        cur.execute(sql)
                        cur.fetchall()
                else:
                    with c.cursor().copy(sql) as cp:
                        for _ in cp:
                            pass
                c.commit()
                return "ok"
            except psycopg.Error as e:
                return e.diag.message_primary or str(e)
    c = rawpg.RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        if client == "raw":
            c.send(rawpg.query(sql))
        else:
            c.send(rawpg.parse(sql), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
        out = str(rawpg.errors(c.until_ready()))
        c.send(rawpg.query("FETCH ALL FROM c"))
        return out + str(rawpg.errors(c.until_ready()))
    finally:
        c.close()


@pytest.mark.parametrize("client,sql", CURSORS)
def test_cursor_or_copy_of_a_writing_function_is_refused(gproxy, pg, psql_bin, writer,
                                                         client, sql):
    before = _rows(pg)
    said = _run(client, gproxy, sql, psql_bin)
    assert _rows(pg) == before, (client, sql, said)
    # refused: unmeasurable (blast-radius), or, once the body's UPDATE without WHERE is
    # folded into the decision, as destructive (guarded-default) before that
    assert "blast-radius" in said or "has no WHERE clause" in said, said


def test_cursor_and_copy_of_plain_reads_still_work(gproxy, pg, psql_bin, writer):
    said = _run("psql", gproxy, "BEGIN; DECLARE c CURSOR FOR SELECT id FROM rt13_t "
                "ORDER BY id; FETCH 2 FROM c; COMMIT;", psql_bin)
    assert "pgguard" not in said and "(2 rows)" in said, said
    said = _run("psql", gproxy, "COPY (SELECT id FROM rt13_t WHERE id <= 3) TO STDOUT",
                psql_bin)
    assert said.split() == ["1", "2", "3"], said


# --------------------------------------------------------------------------- read-only

READONLY_WRITES = [
    ("SELECT lo_from_bytea(0, 'written by a read-only token')",
     "SELECT count(*) FROM pg_largeobject_metadata"),
    ("SELECT lo_create(0)", "SELECT count(*) FROM pg_largeobject_metadata"),
    ("SELECT pg_catalog.lo_creat(-1)", "SELECT count(*) FROM pg_largeobject_metadata"),
    ("SELECT x FROM (SELECT lo_from_bytea(0, 'x') AS x) s",
     "SELECT count(*) FROM pg_largeobject_metadata"),
    ("ANALYZE gr_items",
     "SELECT count(*) FROM pg_stats WHERE tablename = 'gr_items'"),
    ("ANALYZE", "SELECT count(*) FROM pg_stats WHERE tablename = 'gr_items'"),
]


@pytest.mark.parametrize("sql,truth", READONLY_WRITES)
def test_readonly_token_cannot_write_past_read_only_mode(pg, sproxy, sql, truth):
    before = pg.execute(truth, dbname="appdb")
    with psycopg.connect(readonly_dsn(sproxy), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql)
        assert 'rule "readonly-scope"' in e.value.diag.message_primary
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert pg.execute(truth, dbname="appdb") == before


@pytest.mark.parametrize("sql", ["NOTIFY rt13_ch, 'from a read-only token'",
                                 "SELECT pg_notify('rt13_ch', 'from a read-only token')",
                                 "WITH n AS (SELECT pg_notify('rt13_ch', 'x')) SELECT * FROM n",
                                 "SELECT 1 FROM (SELECT pg_catalog.pg_notify('rt13_ch', 'y')) s",
                                 "DO $$BEGIN PERFORM pg_notify('rt13_ch', 'z'); END$$"])
def test_readonly_token_cannot_notify(pg, sproxy, sql):
    # a listener upstream, directly: what it hears is the truth
    listener = psycopg.connect(pg.dsn(dbname="appdb"), autocommit=True)
    try:
        listener.execute("LISTEN rt13_ch")
        with psycopg.connect(readonly_dsn(sproxy), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
        listener.execute("SELECT 1")
        heard = list(listener.notifies(timeout=0.5, stop_after=1))
    finally:
        listener.close()
    assert heard == []
