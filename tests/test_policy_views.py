# Rules see through views: a rule on public.orders holds for every write that reaches
# orders through a view (made before, in the session, TEMP, of a view, in another
# schema, with INSTEAD rules), whatever the client; the truth is checked upstream.
import asyncio
import time

import asyncpg
import duckdb
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, run_psql
from guarded import guarded_proxy
from pgguard.policy.classify import classify
from pgguard.policy.views import ViewMap, learned
from rawpg import RawClient, errors, rows
from test_approvals_wire import api, pending_ids, run_in_thread

DB = "appdb"

RULES = """
[[rules]]
name = "orders-writes-blocked"
when = { kind = "agent", statements = ["insert", "update", "delete", "merge"], relations = ["public.orders"] }
action = "block"

[[rules]]
name = "ledger-writes-need-approval"
when = { kind = "agent", statements = ["insert", "update", "delete"], relations = ["public.ledger"] }
action = "approve"
timeout = "1s"
"""

SCHEMA = """
DROP SCHEMA IF EXISTS s2 CASCADE;
DROP TABLE IF EXISTS orders, ledger, notes, swap CASCADE;
DROP VIEW IF EXISTS orders_trg CASCADE;
DROP VIEW IF EXISTS swap CASCADE;
CREATE TABLE orders (id int PRIMARY KEY, status text);
INSERT INTO orders VALUES (1, 'new'), (2, 'new'), (3, 'shipped');
CREATE TABLE ledger (id int PRIMARY KEY, amount int);
INSERT INTO ledger VALUES (1, 100), (2, 200);
CREATE TABLE notes (id int PRIMARY KEY, body text);
INSERT INTO notes VALUES (1, 'a'), (2, 'b');
CREATE VIEW orders_v AS SELECT * FROM orders;
CREATE VIEW orders_vv AS SELECT * FROM orders_v WHERE id > 0;
CREATE SCHEMA s2;
CREATE VIEW s2.o AS SELECT id, status FROM public.orders;
CREATE VIEW orders_ro AS SELECT 1 AS id, 'x'::text AS status;
CREATE RULE orders_ro_upd AS ON UPDATE TO orders_ro
    DO INSTEAD UPDATE orders SET status = NEW.status WHERE id = OLD.id;
CREATE VIEW orders_trg AS SELECT 1 AS id, 'x'::text AS status;
CREATE OR REPLACE FUNCTION orders_trg_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE orders SET status = NEW.status WHERE id = OLD.id;
    RETURN NEW;
END$$;
CREATE TRIGGER orders_trg_t INSTEAD OF UPDATE ON orders_trg
    FOR EACH ROW EXECUTE FUNCTION orders_trg_fn();
CREATE VIEW orders_sql_trg AS SELECT DISTINCT id, status FROM s2.o;
CREATE OR REPLACE FUNCTION orders_sql_trg_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM orders WHERE id = OLD.id;
    RETURN OLD;
END$$;
CREATE TRIGGER orders_sql_trg_t INSTEAD OF DELETE ON orders_sql_trg
    FOR EACH ROW EXECUTE FUNCTION orders_sql_trg_fn();
CREATE VIEW notes_v AS SELECT * FROM notes;
CREATE VIEW ledger_v AS SELECT * FROM ledger;
"""


@pytest.fixture(scope="module", autouse=True)
def schema(pg):
    pg.execute(SCHEMA, dbname=DB)
    yield
    pg.execute("DROP SCHEMA IF EXISTS s2 CASCADE; DROP TABLE IF EXISTS ledger, notes, swap "
               "CASCADE; DROP VIEW IF EXISTS orders_v, orders_ro, orders_trg CASCADE; "
               "DROP FUNCTION IF EXISTS orders_trg_fn, orders_sql_trg_fn", dbname=DB)


@pytest.fixture(scope="module")
def guarded(pg, schema, tmp_path_factory):
    """Started after the views exist: they come from the upstream catalog."""
    with guarded_proxy(pg, tmp_path_factory.mktemp("views"), RULES) as p:
        yield p


ORDERS = [(1, "new"), (2, "new"), (3, "shipped")]


def orders(pg):
    return pg.execute("SELECT id, status FROM orders ORDER BY id", dbname=DB)


def ledger(pg):
    return pg.execute("SELECT id, amount FROM ledger ORDER BY id", dbname=DB)


@pytest.fixture(autouse=True)
def unchanged(pg):
    """Every test leaves orders and ledger as they were (the truth upstream)."""
    pg.execute("DELETE FROM orders; INSERT INTO orders VALUES (1, 'new'), (2, 'new'), "
               "(3, 'shipped'); UPDATE ledger SET amount = id * 100", dbname=DB)
    yield
    assert orders(pg) == ORDERS
    assert ledger(pg) == [(1, 100), (2, 200)]


def conn(proxy, **kw):
    return psycopg.connect(proxy.dsn(dbname=DB), autocommit=True, **kw)


def refused(e, rule="orders-writes-blocked"):
    assert e.value.diag.sqlstate == "42501"
    assert f'"{rule}"' in e.value.diag.message_primary
    return e.value.diag


# ---------------------------------------------------------------- the map (no server)

def test_instead_of_trigger_functions_are_read_from_the_catalog():
    body = "BEGIN UPDATE orders SET status = NEW.status WHERE id = OLD.id; RETURN NEW; END"
    vm = ViewMap.from_rows([], [("public", "v", "plpgsql", body),
                                ("public", "w", "sql", "DELETE FROM s.t WHERE id = 1"),
                                ("public", "x", "c", "some_symbol"),
                                ("public", "y", "plpgsql", "not plpgsql at all (")])
    assert vm.bases("public.v") == ("public.orders",)
    assert vm.bases("public.w") == ("s.t",)
    assert "public.x" not in vm and "public.y" not in vm


def test_map_resolves_views_of_views_and_survives_cycles():
    vm = ViewMap.from_rows([("public", "a", "public", "b"), ("public", "b", "public", "a"),
                            ("public", "b", "s", "t"), ("pg_temp_3", "x", "public", "t")])
    assert vm.bases("public.a") == ("public.b", "s.t")
    assert vm.bases("public.t") == ()
    # another session's temporary view does not shadow this session's names
    assert "public.x" not in vm and "pg_temp_3.x" in vm
    (st,) = vm.expand(classify("DELETE FROM a WHERE id = 1"))
    assert st.relations_written == ("public.a", "public.b", "s.t")


@pytest.mark.parametrize("sql, edges", [
    ("CREATE VIEW v AS SELECT * FROM orders o JOIN notes n USING (id)",
     {"public.v": {"public.orders", "public.notes"}}),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT * FROM s2.o",
     {"pg_temp.v": {"s2.o"}, "public.v": {"s2.o"}}),
    ("CREATE RULE r AS ON INSERT TO v DO INSTEAD INSERT INTO orders VALUES (NEW.id)",
     {"public.v": {"public.orders"}}),
    ("CREATE SCHEMA s3 CREATE VIEW v AS SELECT * FROM orders",
     {"s3.v": {"public.v", "public.orders"}}),
    ("CREATE MATERIALIZED VIEW mv AS SELECT * FROM orders", {"public.mv": {"public.orders"}}),
    ("CREATE TABLE t AS SELECT * FROM orders", {}),
    ("CREATE TABLE t (id int)", {}),
    ("UPDATE orders SET status = 'x' WHERE id = 1", {}),
])
def test_learned_from_the_sessions_own_statements(sql, edges):
    (st,) = classify(sql)
    assert learned(st) == {k: frozenset(v) for k, v in edges.items()}


def test_renames_and_moves_of_a_known_view_are_followed():
    known = ViewMap({"public.v": frozenset({"public.orders"})})
    for sql, name in [("ALTER VIEW v RENAME TO w", "public.w"),
                      ("ALTER TABLE v RENAME TO w", "public.w"),
                      ("ALTER VIEW v SET SCHEMA s9", "s9.v")]:
        assert learned(classify(sql)[0], known) == {name: frozenset({"public.orders"})}
    assert learned(classify("ALTER TABLE t RENAME TO u")[0], known) == {}
    assert learned(classify("ALTER VIEW v RENAME COLUMN a TO b")[0], known) == {}


# ---------------------------------------------------------------- views made before

def test_psycopg_update_through_a_view(guarded):
    with conn(guarded) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("UPDATE orders_v SET status = 'hacked' WHERE id = 1")
        diag = refused(e)
        assert "writes public.orders_v, public.orders" in diag.message_detail
        assert c.execute("SELECT count(*) FROM orders_v").fetchone() == (3,)


def test_psql_delete_through_a_view(guarded, psql_bin):
    r = run_psql(psql_bin, guarded.dsn(dbname=DB), "-v", "ON_ERROR_STOP=0",
                 input="DELETE FROM orders_v WHERE id = 2;\nSELECT 'still here';\n")
    assert 'refused by rule "orders-writes-blocked"' in r.stderr
    assert "still here" in r.stdout


def test_asyncpg_prepared_insert_through_a_view(guarded):
    async def go():
        c = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as e:
                await c.execute("INSERT INTO orders_v VALUES ($1, $2)", 9, "injected")
            assert "orders-writes-blocked" in str(e.value)
            stmt = await c.prepare("SELECT status FROM orders_v WHERE id = $1")
            assert await stmt.fetchval(3) == "shipped"
        finally:
            await c.close()
    asyncio.run(go())


def test_raw_update_through_a_view_of_a_view(guarded):
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    msgs = c.run("UPDATE orders_vv SET status = 'hacked' WHERE id = 3")
    e = errors(msgs)[0]
    assert e["C"] == "42501" and "orders-writes-blocked" in e["M"]
    assert "writes public.orders_vv, public.orders_v, public.orders" in e["D"]
    assert rows(c.run("SELECT count(*) FROM orders_vv")) == [[b"3"]]
    c.close()


def test_view_in_another_schema(guarded):
    with conn(guarded) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("UPDATE s2.o SET status = 'hacked' WHERE id = 1")
        refused(e)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM s2.o WHERE id = 1")


def test_cte_writing_through_a_view(guarded):
    with conn(guarded) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("WITH x AS (UPDATE orders_v SET status = 'hacked' WHERE id = 1 "
                      "RETURNING *) SELECT * FROM x")
        refused(e)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("WITH x AS (DELETE FROM s2.o WHERE id = 2 RETURNING id) "
                      "SELECT count(*) FROM x")


def test_view_with_an_instead_rule(guarded):
    """orders_ro reads nothing, but its INSTEAD rule writes orders."""
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    e = errors(c.run("UPDATE orders_ro SET status = 'hacked' WHERE id = 1"))[0]
    assert e["C"] == "42501" and "orders-writes-blocked" in e["M"]
    c.close()


def test_views_with_instead_of_triggers(guarded):
    """orders_trg reads nothing, but its INSTEAD OF trigger's function updates orders;
    orders_sql_trg is not updatable by itself (DISTINCT) and reads orders via s2.o."""
    with conn(guarded) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("UPDATE orders_trg SET status = 'hacked' WHERE id = 1")
        refused(e)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("DELETE FROM orders_sql_trg WHERE id = 1")
        refused(e)


def test_approval_rule_through_a_view_times_out(guarded):
    with conn(guarded) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("UPDATE ledger_v SET amount = 0 WHERE id = 1")
        assert "timed out" in e.value.diag.message_primary


# ---------------------------------------------------------------- views the session makes

def test_view_created_in_the_same_session(guarded, pg):
    with conn(guarded) as c:
        c.execute("CREATE VIEW my_orders AS SELECT * FROM orders")
        try:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute("UPDATE my_orders SET status = 'hacked' WHERE id = 1")
            refused(e)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("DELETE FROM my_orders WHERE id = 1")
            # another session of the same agent sees it at once (not from a stale cache)
            with conn(guarded) as other:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    other.execute("UPDATE my_orders SET status = 'hacked' WHERE id = 1")
        finally:
            pg.execute("DROP VIEW my_orders", dbname=DB)


def test_temp_view_created_in_the_same_session(guarded):
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    assert errors(c.run("CREATE TEMP VIEW tv AS SELECT id, status FROM orders")) == []
    for sql in ("UPDATE tv SET status = 'hacked' WHERE id = 1",
                "UPDATE pg_temp.tv SET status = 'hacked' WHERE id = 1",
                "DELETE FROM tv WHERE id = 3",
                "INSERT INTO tv VALUES (7, 'injected')"):
        e = errors(c.run(sql))
        assert e and e[0]["C"] == "42501" and "orders-writes-blocked" in e[0]["M"], sql
    assert rows(c.run("SELECT count(*) FROM tv")) == [[b"3"]]
    c.close()


def test_temp_view_and_write_in_one_query(guarded, psql_bin):
    """The view made by the first statement counts for the second of the same text."""
    r = run_psql(psql_bin, guarded.dsn(dbname=DB), "-v", "ON_ERROR_STOP=0", "-c",
                 "CREATE TEMP VIEW tv2 AS SELECT * FROM orders; "
                 "UPDATE tv2 SET status = 'hacked' WHERE id = 1")
    assert 'refused by rule "orders-writes-blocked"' in r.stderr


def test_view_made_in_a_do_block_then_renamed(guarded):
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    assert errors(c.run("DO $$BEGIN CREATE TEMP VIEW dv AS SELECT * FROM orders; END$$")) \
        == []
    e = errors(c.run("UPDATE dv SET status = 'hacked' WHERE id = 2"))
    assert e and "orders-writes-blocked" in e[0]["M"]
    # renaming is destructive for a guarded agent (the old name leaves every rule's reach)
    e = errors(c.run("ALTER VIEW dv RENAME TO dv2"))
    assert e and e[0]["C"] == "42501" and "RENAME of" in e[0].get("D", "") + e[0]["M"]
    e = errors(c.run("UPDATE dv2 SET status = 'hacked' WHERE id = 2"))
    assert e and e[0]["C"] == "42P01"           # no such relation: the rename did not run
    e = errors(c.run("UPDATE dv SET status = 'hacked' WHERE id = 2"))
    assert e and "orders-writes-blocked" in e[0]["M"]
    c.close()


def test_view_and_rule_created_inside_a_transaction(guarded):
    with psycopg.connect(guarded.dsn(dbname=DB)) as c:
        c.execute("CREATE VIEW txn_v AS SELECT 1 AS id, 'x'::text AS status")
        c.execute("CREATE VIEW txn_v2 AS SELECT * FROM txn_v")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("CREATE RULE txn_r AS ON DELETE TO txn_v DO INSTEAD "
                      "DELETE FROM orders WHERE id = OLD.id")
        refused(e)      # the rule's own action deletes from orders
        c.rollback()
        c.execute("CREATE VIEW txn_v3 AS SELECT * FROM orders_vv")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("UPDATE txn_v3 SET status = 'hacked' WHERE id = 1")
        refused(e)
        c.rollback()


APPROVE_LEDGER = """
[[rules]]
name = "ledger-writes-need-approval"
when = { kind = "agent", statements = ["insert", "update", "delete"], relations = ["public.ledger"] }
action = "approve"
timeout = "30s"
"""


def test_agent_may_not_plant_a_trigger_even_with_an_approved_function(pg, tmp_path):
    """A human approved a function that writes ledger; the agent may still not create a
    trigger that runs it: the trigger would run later, inside other sessions'
    statements, where nothing judges it (opaque). (Changed deliberately: the agent
    created an INSTEAD OF trigger itself before, and only its own session's writes
    through the view were held.) Triggers created by a DBA are followed through the
    catalog (orders_trg above)."""
    with guarded_proxy(pg, tmp_path, APPROVE_LEDGER) as p, conn(p) as c:
        t, box = run_in_thread(lambda: c.execute(
            "CREATE FUNCTION lfn() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
            "UPDATE ledger SET amount = NEW.amount WHERE id = OLD.id; RETURN NEW; END$$"))
        (rid,) = pending_ids(p)
        api(p, "POST", f"/api/approvals/{rid}/approve", {"approver": "alice"})
        t.join(10)
        assert "error" not in box, box
        try:
            c.execute("CREATE VIEW lv AS SELECT 1 AS id, 0 AS amount")
            for sql in ("CREATE TRIGGER lt INSTEAD OF UPDATE ON lv FOR EACH ROW "
                        "EXECUTE FUNCTION lfn()",
                        "CREATE TRIGGER lt AFTER INSERT ON ledger FOR EACH ROW "
                        "EXECUTE FUNCTION lfn()",
                        "CREATE OR REPLACE TRIGGER lt BEFORE UPDATE ON orders FOR EACH ROW "
                        "EXECUTE FUNCTION lfn()"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                    c.execute(sql)
                assert "opaque" in str(e.value.diag.message_detail)
            assert pg.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'lt'",
                              dbname=DB) == [(0,)]
        finally:
            pg.execute("DROP VIEW IF EXISTS lv; DROP FUNCTION IF EXISTS lfn()", dbname=DB)


def test_swapping_a_table_for_a_view_is_not_served_from_the_cache(guarded, pg):
    """An UPDATE allowed (and cached) on a table is judged again once the name is a
    view over orders."""
    pg.execute("DROP VIEW IF EXISTS swap; DROP TABLE IF EXISTS swap; "
               "CREATE TABLE swap (id int PRIMARY KEY, status text); "
               "INSERT INTO swap VALUES (1, 'a')", dbname=DB)
    stmt = "UPDATE swap SET status = 'b' WHERE id = 1"
    try:
        with conn(guarded) as c, conn(guarded) as other:
            c.execute(stmt)
            other.execute(stmt)          # served from the shared decision cache
            # a human moves the table away (an agent may not rename: destructive for
            # it), the agent puts a view over orders in its place
            with psycopg.connect(guarded.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB),
                                 autocommit=True) as human:
                human.execute("ALTER TABLE swap RENAME TO swap_old")
            c.execute("CREATE VIEW swap AS SELECT * FROM orders")
            for cx in (c, other):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    cx.execute(stmt)
    finally:
        pg.execute("DROP VIEW IF EXISTS swap; DROP TABLE IF EXISTS swap_old", dbname=DB)


SWAPS = {
    # the table's name becomes a view over orders
    "view": ["ALTER TABLE swap2 RENAME TO swap2_old",
             "CREATE VIEW swap2 AS SELECT * FROM orders"],
    # the table becomes a child of orders (its rows are orders' rows)
    "inherit": ["ALTER TABLE swap2 INHERIT orders"],
    # an UPDATE of the table is rewritten into one of orders
    "rule": ["CREATE RULE swap2_r AS ON UPDATE TO swap2 DO INSTEAD "
             "UPDATE orders SET status = NEW.status WHERE id = NEW.id"],
}


@pytest.mark.parametrize("how, swap", [
    ("human", "view"), ("human-in-transaction", "view"), ("upstream", "view"),
    ("human", "inherit"), ("human", "rule"), ("upstream", "rule")])
def test_a_view_a_human_swaps_in_ends_cached_decisions(guarded, pg, how, swap):
    """The DDL of an identity nothing judges (a human, or a DBA directly upstream) still
    ends the agents' cached decisions: through pgguard once the catalog read its commit
    starts is done (milliseconds), directly upstream within the view map's refresh
    interval (30 s). The agents probe inside transactions they roll back, so a probe
    that lands before the read changes nothing."""
    _drop_swap2(pg)
    stmt = "UPDATE swap2 SET status = 'b' WHERE id = 1"
    with psycopg.connect(guarded.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB),
                         autocommit=True) as human:
        human.execute("CREATE TABLE swap2 (id int PRIMARY KEY, status text); "
                      "INSERT INTO swap2 VALUES (1, 'a')")
    swap = SWAPS[swap]
    try:
        with psycopg.connect(guarded.dsn(dbname=DB)) as c, \
                psycopg.connect(guarded.dsn(dbname=DB)) as other:
            deadline = time.monotonic() + 5
            while True:                 # the table is known (a swap2 of an earlier case
                try:                    # was a view: the map is read after the DDL)
                    c.execute(stmt)
                    c.commit()
                    break
                except psycopg.errors.InsufficientPrivilege:
                    c.rollback()
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            for _ in range(3):          # cached, and served from the compiled caches
                for cx in (c, other):
                    cx.execute(stmt)
                    cx.commit()
            if how == "upstream":
                pg.execute("; ".join(swap), dbname=DB)
            else:
                with psycopg.connect(guarded.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB),
                                     autocommit=how == "human") as human:
                    for sql in swap:
                        human.execute(sql)
                    human.commit()
            deadline = time.monotonic() + (40 if how == "upstream" else 5)
            for cx in (c, other):
                while True:
                    try:
                        cx.execute(stmt)
                    except psycopg.errors.InsufficientPrivilege as e:
                        assert "orders-writes-blocked" in e.diag.message_primary
                        cx.rollback()
                        break
                    cx.rollback()
                    assert time.monotonic() < deadline, "the cached decision outlived it"
                    time.sleep(0.1)
        # no write ever reached orders
        assert pg.execute("SELECT id, status FROM ONLY orders ORDER BY id", dbname=DB) == \
            ORDERS
    finally:
        _drop_swap2(pg)


def _drop_swap2(pg):
    kinds = dict(pg.execute("SELECT relname, relkind FROM pg_class WHERE relname IN "
                            "('swap2', 'swap2_old')", dbname=DB))
    for name, kind in kinds.items():
        pg.execute(f"DROP {'VIEW' if kind == 'v' else 'TABLE'} IF EXISTS {name} CASCADE",
                   dbname=DB)


def test_temp_view_shadowing_a_table_is_not_served_from_the_cache(guarded, pg):
    """A TEMP view named like a table takes over the unqualified name in this session
    only: the session's decisions are made again, its peers' stay."""
    stmt = "UPDATE notes SET body = 'x' WHERE id = 1"
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        assert errors(c.run("CREATE TEMP VIEW first_one AS SELECT 1 AS one")) == []
        assert errors(c.run(stmt)) == []                 # cached for this session
        assert errors(c.run("CREATE TEMP VIEW notes AS SELECT id, status AS body "
                            "FROM orders")) == []
        e = errors(c.run(stmt))
        assert e and "orders-writes-blocked" in e[0]["M"]
        with conn(guarded) as other:                    # no such view there
            other.execute(stmt)
    finally:
        c.close()
        pg.execute("UPDATE notes SET body = 'a' WHERE id = 1", dbname=DB)


# ---------------------------------------------------------------- legitimate

def test_reads_through_views_are_allowed(guarded):
    with conn(guarded) as c:
        assert c.execute("SELECT count(*) FROM orders_v").fetchone() == (3,)
        assert c.execute("SELECT status FROM orders_vv WHERE id = 3").fetchone() == \
            ("shipped",)
        assert c.execute("SELECT count(*) FROM s2.o").fetchone() == (3,)


def test_writes_through_unrelated_views_are_allowed(guarded, pg):
    try:
        with conn(guarded) as c:
            c.execute("UPDATE notes_v SET body = 'changed' WHERE id = 1")
            c.execute("CREATE TEMP VIEW my_notes AS SELECT * FROM notes")
            c.execute("UPDATE my_notes SET body = 'again' WHERE id = 2")
            # a table made from orders is not a view of it
            c.execute("CREATE TEMP TABLE orders_copy AS SELECT * FROM orders")
            c.execute("UPDATE orders_copy SET status = 'x' WHERE id = 1")
        assert pg.execute("SELECT body FROM notes ORDER BY id", dbname=DB) == [
            ("changed",), ("again",)]
    finally:
        pg.execute("UPDATE notes SET body = CASE id WHEN 1 THEN 'a' ELSE 'b' END",
                   dbname=DB)


def test_audit_names_the_view_and_the_base(pg, tmp_path):
    with guarded_proxy(pg, tmp_path, RULES) as p:
        with conn(p) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("UPDATE orders_vv SET status = 'hacked' WHERE id = 1")
            c.execute("SELECT * FROM orders_v")
        assert p.stop() == 0
    con = duckdb.connect()
    recs = con.execute(
        f"SELECT decision, rule, relations FROM read_parquet('{p.audit_dir}/**/*.parquet', "
        "hive_partitioning = true) WHERE event = 'statement' ORDER BY event_id").fetchall()
    assert recs[0][:2] == ("blocked", "orders-writes-blocked")
    assert {"public.orders_vv", "public.orders_v", "public.orders"} <= set(recs[0][2])
    assert recs[1][0] == "allowed" and {"public.orders_v", "public.orders"} <= set(recs[1][2])
