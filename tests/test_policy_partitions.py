# A rule on a partitioned (or inheritance parent) table covers its partitions and
# children: they hold the parent's rows, so writing one directly is writing the parent.
# Moving a whole table's rows out of the parent (DETACH PARTITION, NO INHERIT) is
# destructive; moving them in (ATTACH PARTITION, INHERIT) is an insert into the parent.
# Judged by the rows and the catalog upstream.
import asyncio

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD
from guarded import guarded_proxy
from rawpg import SYNC, RawClient, bind, errors, execute, parse
from test_approvals_wire import api, pending_ids, run_in_thread

DB = "appdb"
RULES = """
[[rules]]
name = "events-are-append-only"
when = { kind = "agent", statements = ["update", "delete"], relations = ["public.pt_events"] }
action = "block"

[[rules]]
name = "ledger-writes-need-approval"
when = { kind = "agent", statements = ["insert", "update", "delete"], relations = ["public.pt_ledger"] }
action = "approve"
timeout = "30s"
"""


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    setup(pg)
    with guarded_proxy(pg, tmp_path_factory.mktemp("partitions"), RULES) as p:
        yield p


def setup(pg):
    pg.execute("""
        DROP TABLE IF EXISTS pt_events CASCADE; DROP TABLE IF EXISTS pt_ledger CASCADE;
        DROP TABLE IF EXISTS pt_loose CASCADE;
        CREATE TABLE pt_events (id int, kind text) PARTITION BY RANGE (id);
        CREATE TABLE pt_events_p1 PARTITION OF pt_events FOR VALUES FROM (0) TO (100);
        CREATE TABLE pt_events_p2 PARTITION OF pt_events FOR VALUES FROM (100) TO (200)
            PARTITION BY RANGE (id);
        CREATE TABLE pt_events_p2a PARTITION OF pt_events_p2 FOR VALUES FROM (100) TO (150);
        CREATE TABLE pt_ledger (id int, amount int);
        CREATE TABLE pt_ledger_2024 () INHERITS (pt_ledger);
        CREATE TABLE pt_loose (id int, kind text);
        CREATE TABLE pt_loose_kid () INHERITS (pt_loose);
    """, dbname=DB)


@pytest.fixture(autouse=True)
def rows(pg):
    pg.execute("""
        TRUNCATE pt_events, pt_ledger, pt_loose;
        INSERT INTO pt_events SELECT g, 'k' FROM generate_series(1, 120) g;
        INSERT INTO pt_ledger_2024 VALUES (1, 10), (2, 20);
    """, dbname=DB)


def state(pg):
    return (pg.execute("SELECT id, kind FROM pt_events ORDER BY id", dbname=DB),
            pg.execute("SELECT id, amount FROM pt_ledger ORDER BY id", dbname=DB),
            pg.execute("SELECT c.relname, i.inhparent::regclass::text FROM pg_inherits i "
                       "JOIN pg_class c ON c.oid = i.inhrelid WHERE c.relname LIKE 'pt\\_%' "
                       "ORDER BY 1", dbname=DB))


THROUGH_A_PARTITION = [
    "UPDATE pt_events_p1 SET kind = 'changed' WHERE id = 5",
    "DELETE FROM pt_events_p1 WHERE id < 50",
    "DELETE FROM public.pt_events_p2a WHERE id = 101",
    "UPDATE pt_events_p2 SET kind = 'x' WHERE id > 100",
    "WITH d AS (DELETE FROM pt_events_p1 WHERE id = 1 RETURNING *) SELECT count(*) FROM d",
    "MERGE INTO pt_events_p1 t USING (VALUES (3)) s(id) ON t.id = s.id "
    "WHEN MATCHED THEN UPDATE SET kind = 'merged'",
    "DELETE FROM ONLY pt_events_p1 WHERE id = 7",
]


@pytest.mark.parametrize("sql", THROUGH_A_PARTITION)
def test_writes_to_a_partition_match_the_parents_rule(pg, guarded, sql):
    before = state(pg)
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        for prepare in (False, True):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute(sql, prepare=prepare)
            assert 'rule "events-are-append-only"' in e.value.diag.message_primary

    async def via_asyncpg():
        conn = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(via_asyncpg())
    r = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        r.send(parse(sql) + bind() + execute() + SYNC)
        assert [e["C"] for e in errors(r.until_ready())] == ["42501"]
    finally:
        r.close()
    assert state(pg) == before


MOVING_ROWS_OUT = [
    "ALTER TABLE pt_events DETACH PARTITION pt_events_p1",
    "ALTER TABLE public.pt_events DETACH PARTITION public.pt_events_p2",
    "ALTER TABLE pt_events_p2 DETACH PARTITION pt_events_p2a",
    "ALTER TABLE pt_loose_kid NO INHERIT pt_loose",
    "ALTER TABLE pt_events DETACH PARTITION pt_events_p1 FINALIZE",
]


@pytest.mark.parametrize("sql", MOVING_ROWS_OUT)
def test_detaching_rows_from_a_table_is_destructive(pg, guarded, sql):
    before = state(pg)
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute(sql)
        assert "removes every row of" in e.value.diag.message_primary
    assert state(pg) == before


def test_inheritance_child_write_waits_for_the_parents_approval(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        t, box = run_in_thread(
            lambda: c.execute("UPDATE pt_ledger_2024 SET amount = 0 WHERE id = 1"))
        (rid,) = pending_ids(guarded)
        assert state(pg)[1] == [(1, 10), (2, 20)]
        api(guarded, "POST", f"/api/approvals/{rid}/deny", {"approver": "alice"})
        t.join(15)
        assert isinstance(box.get("error"), psycopg.errors.InsufficientPrivilege)
    assert state(pg)[1] == [(1, 10), (2, 20)]


def test_attaching_a_table_inserts_its_rows_into_the_parent(pg, guarded):
    """Rows the agent put in a table of its own become the ledger's on INHERIT: that is
    an insert into the ledger, and it waits for approval like one."""
    pg.execute("DROP TABLE IF EXISTS pt_fake; CREATE TABLE pt_fake (id int, amount int);"
               "INSERT INTO pt_fake VALUES (99, 1000000)", dbname=DB)
    try:
        with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
            t, box = run_in_thread(lambda: c.execute("ALTER TABLE pt_fake INHERIT pt_ledger"))
            (rid,) = pending_ids(guarded)
            api(guarded, "POST", f"/api/approvals/{rid}/deny", {"approver": "alice"})
            t.join(15)
            assert isinstance(box.get("error"), psycopg.errors.InsufficientPrivilege)
        assert state(pg)[1] == [(1, 10), (2, 20)]
    finally:
        pg.execute("DROP TABLE IF EXISTS pt_fake", dbname=DB)


def test_partition_created_through_the_proxy_is_covered_at_once(pg, guarded):
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        c.execute("CREATE TABLE pt_events_p3 PARTITION OF pt_events FOR VALUES FROM (200) TO (300)")
        try:
            c.execute("INSERT INTO pt_events VALUES (250, 'k')")       # inserts are allowed
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("DELETE FROM pt_events_p3 WHERE id = 250")
            with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as other:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    other.execute("UPDATE pt_events_p3 SET kind = 'x' WHERE id = 250")
        finally:
            pg.execute("DROP TABLE IF EXISTS pt_events_p3", dbname=DB)


LEGIT = [
    "INSERT INTO pt_events_p1 VALUES (50, 'new')",
    "UPDATE pt_loose SET kind = 'x' WHERE id = 1",
    "SELECT count(*) FROM pt_events_p1",
    "DELETE FROM pt_loose WHERE id = 1",
    # (an ADD CONSTRAINT is destructive since round 15: test_policy_write_gates.py)
]


@pytest.mark.parametrize("sql", LEGIT)
def test_what_the_rules_allow_still_runs(pg, guarded, sql):
    with psycopg.connect(guarded.dsn(dbname=DB), autocommit=True) as c:
        c.execute(sql)
    pg.execute("ALTER TABLE pt_events_p1 DROP CONSTRAINT IF EXISTS pt_kind_ck", dbname=DB)


def test_psql_through_partitions_and_detach(pg, guarded, psql_bin):
    from conftest import run_psql
    before = state(pg)
    for sql in THROUGH_A_PARTITION[:5] + MOVING_ROWS_OUT[:3]:
        r = run_psql(psql_bin, guarded.dsn(dbname=DB), "-c", sql)
        assert r.returncode != 0 and "refused by rule" in r.stderr, (sql, r.stderr)
    assert state(pg) == before
