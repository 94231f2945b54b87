# A rule on "insert", "update" or "delete" covers every way of doing it: COPY FROM inserts,
# MERGE inserts/updates/deletes, INSERT ... ON CONFLICT DO UPDATE updates. Before, a DBA's
# "writes to orders need approval" let COPY FROM STDIN and MERGE ... THEN UPDATE straight
# through. Judged by the rows upstream.
import asyncio
import subprocess

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD
from guarded import guarded_proxy
from rawpg import RawClient, errors, query
from test_approvals_wire import api, pending_ids, run_in_thread

DB = "appdb"
RULES = """
[[rules]]
name = "no-inserts-into-rk-ins"
when = { kind = "agent", statements = ["insert"], relations = ["public.rk_ins"] }
action = "block"

[[rules]]
name = "no-updates-to-rk-upd"
when = { kind = "agent", statements = ["update"], relations = ["public.rk_upd"] }
action = "block"

[[rules]]
name = "no-deletes-from-rk-del"
when = { kind = "agent", statements = ["delete"], relations = ["public.rk_del"] }
action = "block"

[[rules]]
name = "rk-app-writes-need-approval"
when = { kind = "agent", statements = ["insert", "update", "delete"], relations = ["public.rk_app"] }
action = "approve"
timeout = "30s"
"""


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("rkinds"), RULES) as p:
        yield p


@pytest.fixture(autouse=True)
def tables(pg):
    pg.execute("".join(
        f"DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (id int PRIMARY KEY, v text);"
        f"INSERT INTO {t} VALUES (1, 'a'), (2, 'b');"
        for t in ("rk_ins", "rk_upd", "rk_del", "rk_app")), dbname=DB)


def contents(pg, table):
    return pg.execute(f"SELECT id, v FROM {table} ORDER BY id", dbname=DB)


BYPASSES = [
    # (table, statement)
    ("rk_ins", "MERGE INTO rk_ins t USING (VALUES (3)) s(id) ON t.id = s.id "
               "WHEN NOT MATCHED THEN INSERT VALUES (s.id, 'new')"),
    ("rk_ins", "WITH m AS (SELECT 3 AS id) MERGE INTO rk_ins t USING m ON t.id = m.id "
               "WHEN NOT MATCHED THEN INSERT VALUES (m.id, 'new')"),
    ("rk_upd", "MERGE INTO rk_upd t USING (VALUES (1)) s(id) ON t.id = s.id "
               "WHEN MATCHED THEN UPDATE SET v = 'hacked'"),
    ("rk_upd", "INSERT INTO rk_upd VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET v = 'hacked'"),
    ("rk_upd", "WITH u AS (INSERT INTO rk_upd VALUES (2, 'x') ON CONFLICT (id) "
               "DO UPDATE SET v = 'hacked' RETURNING 1) SELECT * FROM u"),
    ("rk_upd", "MERGE INTO rk_upd t USING (VALUES (1)) s(id) ON t.id = s.id "
               "WHEN MATCHED AND t.v = 'a' THEN UPDATE SET v = 'hacked' "
               "WHEN NOT MATCHED THEN DO NOTHING"),
    ("rk_del", "MERGE INTO rk_del t USING (VALUES (1)) s(id) ON t.id = s.id "
               "WHEN MATCHED AND t.v = 'a' THEN DELETE"),
    ("rk_del", "EXPLAIN ANALYZE MERGE INTO rk_del t USING (VALUES (2)) s(id) ON t.id = s.id "
               "WHEN MATCHED AND s.id = 2 THEN DELETE"),
]


@pytest.mark.parametrize("table, sql", BYPASSES)
def test_merge_and_upsert_match_the_action_rules(pg, guarded, table, sql):
    before = contents(pg, table)
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        for prepare in (False, True):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute(sql, prepare=prepare)
            assert 'rule "no-' in e.value.diag.message_primary
    assert contents(pg, table) == before

    async def via_asyncpg():
        conn = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(via_asyncpg())
    assert contents(pg, table) == before


COPY_FORMS = [
    "COPY rk_ins FROM STDIN",
    "COPY rk_ins (id, v) FROM STDIN",
    "COPY public.rk_ins FROM STDIN WITH (FORMAT csv)",
    "copy rk_ins from stdin with (format text, delimiter E'\\t')",
    "COPY rk_ins (id) FROM STDIN (FORMAT csv, HEADER false)",
]


@pytest.mark.parametrize("sql", COPY_FORMS)
def test_copy_from_matches_an_insert_rule(pg, guarded, sql):
    before = contents(pg, "rk_ins")
    data = "3\tnew\n" if "csv" not in sql.lower() else "3,new\n"
    if "(id)" in sql:
        data = "3\n"
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            with c.cursor().copy(sql) as cp:
                cp.write(data)
        assert 'rule "no-inserts-into-rk-ins"' in e.value.diag.message_primary
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert contents(pg, "rk_ins") == before


def test_copy_from_raw_client_gets_no_copy_in_response(pg, guarded):
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        c.send(query("COPY rk_ins FROM STDIN"))
        msgs = c.until_ready()
        assert b"G" not in [t for t, _ in msgs]
        assert [e["C"] for e in errors(msgs)] == ["42501"]
    finally:
        c.close()
    assert contents(pg, "rk_ins") == [(1, "a"), (2, "b")]


def test_copy_from_waits_for_approval_and_runs_when_approved(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        def copy_in():
            with c.cursor().copy("COPY rk_app FROM STDIN") as cp:
                cp.write("3\tapproved\n")
        t, box = run_in_thread(copy_in)
        (rid,) = pending_ids(guarded)
        assert "COPY rk_app" in api(guarded, "GET", f"/api/approvals/{rid}")["statement"]
        assert contents(pg, "rk_app") == [(1, "a"), (2, "b")]       # held, not run
        api(guarded, "POST", f"/api/approvals/{rid}/approve", {"approver": "alice"})
        t.join(15)
        assert "error" not in box, box
    assert contents(pg, "rk_app") == [(1, "a"), (2, "b"), (3, "approved")]


def test_merge_waits_for_approval_and_denied_changes_nothing(pg, guarded):
    sql = ("MERGE INTO rk_app t USING (VALUES (1)) s(id) ON t.id = s.id "
           "WHEN MATCHED THEN UPDATE SET v = 'changed'")
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        t, box = run_in_thread(lambda: c.execute(sql))
        (rid,) = pending_ids(guarded)
        api(guarded, "POST", f"/api/approvals/{rid}/deny", {"approver": "alice"})
        t.join(15)
        assert isinstance(box.get("error"), psycopg.errors.InsufficientPrivilege)
    assert contents(pg, "rk_app") == [(1, "a"), (2, "b")]


LEGIT = [
    ("rk_ins", "UPDATE rk_ins SET v = 'ok' WHERE id = 1", [(1, "ok"), (2, "b")]),
    ("rk_upd", "INSERT INTO rk_upd VALUES (3, 'c') ON CONFLICT DO NOTHING",
     [(1, "a"), (2, "b"), (3, "c")]),
    ("rk_del", "MERGE INTO rk_del t USING (VALUES (1)) s(id) ON t.id = s.id "
               "WHEN MATCHED THEN UPDATE SET v = 'ok'", [(1, "ok"), (2, "b")]),
    ("rk_upd", "MERGE INTO rk_upd t USING (VALUES (3)) s(id) ON t.id = s.id "
               "WHEN NOT MATCHED THEN INSERT VALUES (s.id, 'c')", [(1, "a"), (2, "b"), (3, "c")]),
    ("rk_del", "COPY rk_del FROM STDIN", None),
]


@pytest.mark.parametrize("table, sql, want", LEGIT)
def test_other_actions_on_those_tables_still_pass(pg, guarded, table, sql, want):
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        if sql.startswith("COPY"):
            with c.cursor().copy(sql) as cp:
                cp.write("3\tc\n")
            want = [(1, "a"), (2, "b"), (3, "c")]
        else:
            c.execute(sql)
    assert contents(pg, table) == want


def test_psql_merge_upsert_and_copy_from_stdin(pg, guarded, psql_bin):
    """psql: each bypass statement, and COPY FROM STDIN with data inline (\\. ends it)."""
    from conftest import run_psql
    before = {t: contents(pg, t) for t in ("rk_ins", "rk_upd", "rk_del")}
    for _, sql in BYPASSES[:6]:
        r = run_psql(psql_bin, guarded.dsn(dbname=DB), "-c", sql)
        assert r.returncode != 0 and "42501" not in r.stdout and "refused" in r.stderr, r.stderr
    r = subprocess.run([psql_bin, "-X", "-v", "ON_ERROR_STOP=1", guarded.dsn(dbname=DB)],
                       input="COPY rk_ins FROM STDIN;\n3\tnew\n\\.\n", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and 'rule "no-inserts-into-rk-ins"' in r.stderr, r.stderr
    assert {t: contents(pg, t) for t in before} == before
