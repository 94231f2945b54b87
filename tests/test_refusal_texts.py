# Every refusal, hold and denial an agent can meet, against one standard: SQLSTATE 42501,
# the message names the rule, DETAIL says what was seen, HINT says what to do next.
# The README's "For agent authors" section quotes these texts.
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from conftest import ADMIN_TOKEN, AGENT, AGENT_PASSWORD, HUMAN_PASSWORD, Proxy
from rawpg import RawClient, errors, function_call, query
from test_approvals_wire import api, pending_ids

SECRET = "refusal-texts-token-secret-0123456789abcdef"
DB = "appdb"


@pytest.fixture(scope="module")
def rproxy(pg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refusals")
    pg.execute("DO $$BEGIN CREATE ROLE rt_reader; EXCEPTION WHEN duplicate_object THEN "
               "NULL; END$$")
    p = Proxy(pg, tmp, env={"PGGUARD_TOKEN_SECRET": SECRET}, extra=f'''
[auth]
state_dir = "{tmp}/auth"

[identities.bot]
kind = "agent"
groups = ["agents"]

[identities.pinned]
kind = "human"
password_env = "TEST_HUMAN_PASSWORD"
role = "rt_reader"

[[rules]]
name = "no-drop-for-agents"
when = {{ kind = "agent", statements = ["drop"] }}
action = "block"

[[rules]]
name = "held-inserts-time-out"
when = {{ kind = "agent", statements = ["insert"], relations = ["public.rt_held"] }}
action = "approve"
timeout = "2s"

[[rules]]
name = "held-deletes-need-approval"
when = {{ kind = "agent", statements = ["delete"], relations = ["public.rt_held"] }}
action = "approve"
timeout = "60s"

[[masks]]
column = "public.rt_people.email"
strategy = "email"
''')
    p.config.write_text(p.config.read_text().replace(
        'agents = "allow"', 'agents = "guarded"\nagents_max_rows = 2\n'
                            'max_statement_size = 4000'))
    p.start()
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def tables(pg):
    pg.execute("DROP TABLE IF EXISTS rt_big, rt_held, rt_people; "
               "CREATE TABLE rt_big (id int PRIMARY KEY, v int); "
               "INSERT INTO rt_big SELECT g, 0 FROM generate_series(1, 5) g; "
               "CREATE TABLE rt_held (id int); INSERT INTO rt_held VALUES (1); "
               "CREATE TABLE rt_people (id int, email text); "
               "INSERT INTO rt_people VALUES (1, 'ann@example.com')", dbname=DB)


def agent(p) -> RawClient:
    return RawClient.connect(p.port, AGENT, AGENT_PASSWORD, database=DB)


def run(c: RawClient, sql: str):
    c.send(query(sql))
    return c.until_ready()


def the_error(msgs) -> dict[str, str]:
    errs = errors(msgs)
    assert len(errs) == 1, msgs
    return errs[0]


def meets_standard(f: dict[str, str], rule: str, seen: list[str], where: str = "D",
                   code: str = "42501") -> None:
    """The one standard: 42501 (a syntax error: 42601, as Postgres says it); the message
    names the rule; DETAIL (or, for approvals, ``where``) names what was seen; HINT is a
    next step, not a repeat of the message."""
    assert f.get("C") == code, f
    assert f'rule "{rule}"' in f["M"] or f"rule {rule}" in f["M"], f
    assert f.get("D"), f"no DETAIL: {f}"
    for s in seen:
        assert s in f[where] or s in f["M"], (s, f)
    hint = f.get("H", "")
    assert len(hint.split()) >= 4 and hint not in f["M"], f"no next step: {f}"


def upstream(pg, sql):
    return pg.execute(sql, dbname=DB)


# -- policy rules: a config rule and the guarded default --------------------------------------

POLICY = [
    ("DROP TABLE rt_big", "no-drop-for-agents", ["drop", "public.rt_big"]),
    ("DROP INDEX IF EXISTS rt_big_pkey", "no-drop-for-agents", ["drop"]),
    ("DELETE FROM rt_big", "guarded-default", ["delete", "public.rt_big", "destructive"]),
    ("UPDATE rt_big SET v = 1", "guarded-default", ["update", "destructive"]),
    ("TRUNCATE rt_big", "guarded-default", ["truncate", "destructive"]),
    ("GRANT ALL ON rt_big TO PUBLIC", "guarded-default", ["grant", "privilege"]),
    ("SELECT pg_read_file('/etc/passwd')", "guarded-default", ["escape"]),
]


@pytest.mark.parametrize("sql,rule,seen", POLICY)
def test_policy_refusals(pg, rproxy, sql, rule, seen):
    c = agent(rproxy)
    meets_standard(the_error(run(c, sql)), rule, seen)
    assert upstream(pg, "SELECT count(*), sum(v) FROM rt_big") == [(5, 0)]
    assert run(c, "SELECT 1")[-1][0] == b"Z"          # the session goes on


SETTINGS = ["SET session_replication_role = replica", "SET search_path = pg_temp",
            "SELECT set_config('row_security', 'off', false)", "SET jit_provider = x",
            "SET LOCAL transform_null_equals = on"]


@pytest.mark.parametrize("sql", SETTINGS)
def test_settings_refusals(rproxy, sql):
    f = the_error(run(agent(rproxy), sql))
    meets_standard(f, "settings", [])


@pytest.mark.parametrize("options", ["-c session_replication_role=replica",
                                     "-c row_security=off", "-c app.x=1",
                                     "--transform_null_equals=on", "-c jit_provider=x"])
def test_startup_settings_refusals(rproxy, options):
    with pytest.raises(Exception) as e:
        RawClient.connect(rproxy.port, AGENT, AGENT_PASSWORD, database=DB, options=options)
    f = e.value.fields
    meets_standard(f, "startup-settings", [options.split()[-1].split("=")[0].lstrip("-")])


def test_blast_radius_names_the_limit_and_the_count(pg, rproxy):
    f = the_error(run(agent(rproxy), "UPDATE rt_big SET v = v + 1 WHERE id > 0"))
    meets_standard(f, "blast-radius", ["rows changed: 5", "limit: 2"])
    assert "5 rows" in f["M"] and "limit of 2" in f["M"]
    assert upstream(pg, "SELECT sum(v) FROM rt_big") == [(0,)]     # rolled back


def test_readonly_scope(pg, rproxy):
    r = subprocess.run([sys.executable, "-m", "pgguard", "token", "issue", "-c",
                        str(rproxy.config), "--identity", "bot", "--scope", "readonly",
                        "--database", DB, "--json"], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PGGUARD_TOKEN_SECRET=SECRET))
    assert r.returncode == 0, r.stderr
    tok = __import__("json").loads(r.stdout)["token"]
    c = RawClient.connect(rproxy.port, "bot", tok, database=DB)
    for sql in ("INSERT INTO rt_big VALUES (9, 9)", "UPDATE rt_big SET v = 2 WHERE id = 1"):
        meets_standard(the_error(run(c, sql)), "readonly-scope", ["statement kind"])
    assert upstream(pg, "SELECT count(*), sum(v) FROM rt_big") == [(5, 0)]


def test_pinned_role(rproxy):
    c = RawClient.connect(rproxy.port, "pinned", HUMAN_PASSWORD, database=DB)
    for sql in ("RESET ROLE", "SET ROLE app", "SELECT set_config('role', 'app', false)"):
        meets_standard(the_error(run(c, sql)), "pinned-role", [])
    assert run(c, "SELECT current_user")[1][1].endswith(b"rt_reader")


def test_function_call(rproxy):
    c = agent(rproxy)
    c.send(function_call(1))            # no such function
    meets_standard(the_error(c.until_ready()), "function-call", ["OID 1"])


def test_masking_refuses_binary_copy_of_masked_data(rproxy):
    f = the_error(run(agent(rproxy), "COPY rt_people TO STDOUT (FORMAT binary)"))
    meets_standard(f, "masking", ["public.rt_people"])


def test_parse_error_and_statement_too_long(rproxy):
    c = agent(rproxy)
    f = the_error(run(c, "SELEC 1"))
    meets_standard(f, "parse-error", ["SELEC"], code="42601")
    assert f["P"] == "1", f             # where, as Postgres points at it
    f = the_error(run(c, "SELECT 1 FROM t WHERE"))
    assert (f["C"], f["P"]) == ("42601", "22"), f
    # (a shape of its own: a shape already decided is served from the cache unparsed)
    meets_standard(the_error(run(c, "SELECT '" + "x" * 5000 + "' AS too_long")),
                   "statement-too-long",
                   ["limit 4000"])


def test_approval_notice_and_timeout(pg, rproxy):
    c = agent(rproxy)
    msgs = run(c, "INSERT INTO rt_held VALUES (2)")
    notices = [m for t, p in msgs if t == b"N" for m in [__import__("rawpg").error_fields(p)]]
    assert len(notices) == 1
    n = notices[0]
    assert n["M"].startswith("waiting for approval #") and "rule held-inserts-time-out" in n["M"]
    assert "insert" in n["D"] and "public.rt_held" in n["D"]
    assert "approve" in n["H"] and "--as" in n["H"]
    f = the_error(msgs)
    meets_standard(f, "held-inserts-time-out", ["insert", "public.rt_held"])
    assert "timed out after 2s" in f["M"]
    assert upstream(pg, "SELECT count(*) FROM rt_held") == [(1,)]


def test_approval_denial(pg, rproxy):
    c = agent(rproxy)
    out: list = []
    t = threading.Thread(target=lambda: out.append(run(c, "DELETE FROM rt_held WHERE id = 1")))
    t.start()
    (rid,) = pending_ids(rproxy)
    api(rproxy, "POST", f"/api/approvals/{rid}/deny",
        {"approver": "alice", "reason": "not during the freeze"})
    t.join(30)
    f = the_error(out[0])
    meets_standard(f, "held-deletes-need-approval", ["delete", "public.rt_held"])
    assert "denied by alice" in f["M"] and "not during the freeze" in f["M"]
    assert upstream(pg, "SELECT count(*) FROM rt_held") == [(1,)]
    assert ADMIN_TOKEN



@pytest.mark.parametrize("sql, pos", [("SELEC 1", 1), ("SELECT 1 FROM t WHERE", 22),
                                      ("SELECT (1", 10), ("select * form t", 10),
                                      ("UPDATE t SET = 1", 14)])
def test_a_syntax_error_is_one_for_every_client(rproxy, pg, sql, pos):
    # (helpers 111, 112: psycopg2's diagnostics test) an agent's unparseable statement
    # comes back as Postgres answers it, 42601 with the position, so that clients raise
    # their syntax-error class; the message still names pgguard's rule
    import asyncio

    import asyncpg
    import psycopg
    with psycopg.connect(rproxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB), autocommit=True) as c:
        for prepare in (False, True):
            with pytest.raises(psycopg.errors.SyntaxError) as e:
                c.execute(sql, prepare=prepare)
            assert e.value.diag.statement_position == str(pos)
            assert 'rule "parse-error"' in str(e.value)
        # Postgres itself points at the same character
        with psycopg.connect(pg.dsn(dbname=DB)) as direct:
            with pytest.raises(psycopg.errors.SyntaxError) as e2:
                direct.execute(sql)
        assert e2.value.diag.statement_position == str(pos)

    async def main():
        a = await asyncpg.connect(rproxy.dsn(dbname=DB))
        try:
            with pytest.raises(asyncpg.PostgresSyntaxError) as e:
                await a.fetch(sql)
            assert e.value.position == str(pos)
            assert await a.fetchval("SELECT 1") == 1
        finally:
            await a.close()
    asyncio.run(main())
