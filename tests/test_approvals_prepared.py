# An approval covers one execution. A prepared statement a human approved once must not
# run again, with any parameters, without asking: psycopg prepares a statement by itself
# after a few runs, asyncpg caches every statement, and a raw client may Bind a named
# statement as often as it likes. Judged by the rows upstream.
import asyncio
import threading
import time

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD
from rawpg import SYNC, RawClient, bind, close, errors, execute, parse, query, tags
from test_approvals_wire import RULES, api, cli, pending_ids

DB = "appdb"


@pytest.fixture
def aproxy(make_proxy):
    return make_proxy(extra=RULES)


@pytest.fixture(autouse=True)
def orders(pg):
    pg.execute("DROP TABLE IF EXISTS orders CASCADE; CREATE TABLE orders (id int, status text);"
               "INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 10) g", dbname=DB)


class Approver(threading.Thread):
    """Decides every pending request as it appears (approve; deny once ``deny_after``
    were decided; or what ``decide(statement text)`` says), counting them."""

    def __init__(self, proxy, deny_after: int | None = None, decide=None):
        super().__init__(daemon=True)
        self.proxy = proxy
        self.deny_after = deny_after
        self.decide = decide
        self.decided: list[tuple[int, str]] = []
        self.seen: list[tuple[str, str]] = []
        self.stop = False

    def run(self):
        while not self.stop:
            try:
                items = api(self.proxy, "GET", "/api/approvals?state=pending")
            except Exception:       # noqa: BLE001 - the admin server is starting
                time.sleep(0.05)
                continue
            items = items.get("approvals", items) if isinstance(items, dict) else items
            for it in items:
                verb = "approve"
                if self.deny_after is not None and len(self.decided) >= self.deny_after:
                    verb = "deny"
                if self.decide is not None:
                    verb = self.decide(it.get("statement", ""))
                api(self.proxy, "POST", f"/api/approvals/{it['id']}/{verb}", {"approver": "alice"})
                self.decided.append((it["id"], verb))
                self.seen.append((verb, it.get("statement", "")))
            time.sleep(0.05)


def statuses(pg):
    return [r[0] for r in pg.execute("SELECT status FROM orders ORDER BY id", dbname=DB)]


def test_psycopg_auto_prepared_statement_asks_every_time(pg, aproxy):
    ap = Approver(aproxy)
    ap.start()
    try:
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            for i in range(1, 9):       # psycopg prepares it after the 5th run
                c.execute("UPDATE orders SET status = %s WHERE id = %s", (f"s{i}", i))
    finally:
        ap.stop = True
        ap.join(5)
    assert len(ap.decided) == 8, ap.decided
    assert statuses(pg)[:8] == [f"s{i}" for i in range(1, 9)]


def test_psycopg_prepared_denied_execution_changes_nothing(pg, aproxy):
    ap = Approver(aproxy, deny_after=7)
    ap.start()
    try:
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            for i in range(1, 8):
                c.execute("UPDATE orders SET status = %s WHERE id = %s", ("ok", i),
                          prepare=True)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("UPDATE orders SET status = %s WHERE id = %s", ("hacked", 8),
                          prepare=True)
            # the session goes on; the statement still asks
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("UPDATE orders SET status = %s WHERE id = %s", ("hacked", 9),
                          prepare=True)
    finally:
        ap.stop = True
        ap.join(5)
    assert statuses(pg)[7:] == ["new", "new", "new"]
    assert statuses(pg)[:7] == ["ok"] * 7


def test_asyncpg_prepared_statement_asks_every_time(pg, aproxy):
    ap = Approver(aproxy, deny_after=3)
    ap.start()

    async def main():
        conn = await asyncpg.connect(aproxy.dsn(dbname=DB))
        try:
            stmt = await conn.prepare("UPDATE orders SET status = $1 WHERE id = $2")
            for i in (1, 2, 3):
                await stmt.fetch(f"a{i}", i)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await stmt.fetch("hacked", 4)
            for _ in range(3):          # the statement cache of conn.execute
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("UPDATE orders SET status = $1 WHERE id = $2", "x", 5)
        finally:
            await conn.close()
    try:
        asyncio.run(main())
    finally:
        ap.stop = True
        ap.join(5)
    assert statuses(pg)[:5] == ["a1", "a2", "a3", "new", "new"]


def test_raw_named_statement_bound_again_later(pg, aproxy):
    """Parse + Sync (approved once), then Bind/Execute of the name three times, in
    separate pipelines and in one: the first Bind is covered, each later one asks."""
    ap = Approver(aproxy, deny_after=3)
    ap.start()
    c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        sql = "UPDATE orders SET status = 'raw' || $1 WHERE id = $1::int"
        c.send(parse(sql, name="st") + SYNC)
        assert not errors(c.until_ready())
        c.send(bind(stmt="st", params=[b"1"]) + execute() + SYNC)
        assert "UPDATE 1" in tags(c.until_ready())
        c.send(bind(stmt="st", params=[b"2"]) + execute() + SYNC)
        assert "UPDATE 1" in tags(c.until_ready())
        # the 4th decision is a denial: this one is refused, the next in the same
        # pipeline is skipped by Postgres' rules (after an error, until Sync)
        c.send(bind(stmt="st", params=[b"3"]) + execute()
               + bind(stmt="st", params=[b"4"]) + execute() + SYNC)
        msgs = c.until_ready()
        assert [e["C"] for e in errors(msgs)] == ["42501"]
        assert c.run("SELECT 1")[-1] == (b"Z", b"I")
    finally:
        c.close()
        ap.stop = True
        ap.join(5)
    assert statuses(pg)[:4] == ["raw1", "raw2", "new", "new"]
    assert [v for _, v in ap.decided] == ["approve", "approve", "approve", "deny"]


def approved_with_window(proxy, run) -> None:
    """``run()`` (a statement that asks for approval) on a thread, approved by alice
    with a 5-minute window; returns once it has run."""
    done = []
    t = threading.Thread(target=lambda: (run(), done.append(1)))
    t.start()
    (rid,) = pending_ids(proxy)
    r = cli(proxy, "approve", str(rid), "--as", "alice", "--window", "5m")
    assert r.returncode == 0, r.stderr
    t.join(10)
    assert done == [1]


def test_a_grant_window_lets_repeats_through_without_asking(pg, aproxy):
    """A time-boxed grant (JIT window) covers repeats of the same statement, with the
    same values, without asking; other values ask again (red team 19: a window on one
    order's UPDATE let any other order's through)."""
    # (psycopg sends each execution's Parse with its Bind: the approver sees the values,
    # and a window covers them; a statement prepared ahead shows none, see above)
    with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(aproxy, lambda: c.execute(
            "UPDATE orders SET status = %s WHERE id = %s", ("g1", 1), prepare=False))
        pg.execute("UPDATE orders SET status = 'new' WHERE id = 1", dbname=DB)
        for _ in range(3):
            c.execute("UPDATE orders SET status = %s WHERE id = %s", ("g1", 1), prepare=False)
        assert statuses(pg)[:2] == ["g1", "new"]
        items = api(aproxy, "GET", "/api/approvals?state=pending")
        assert (items.get("approvals", items) if isinstance(items, dict) else items) == []
    for sql in ("UPDATE orders SET status = 'g1' WHERE id = 2",
                "UPDATE orders SET status = 'g2' WHERE id = 1"):
        assert denied_when_asked(aproxy, sql) == ["42501"], sql
    assert statuses(pg)[:2] == ["g1", "new"]


def test_strict_audit_records_every_approved_execution(pg, make_proxy):
    """Under strict durability an approved statement is recorded (decision approved,
    the approver named) before it runs: simple Query, extended, and a prepared
    statement bound again. (The simple-Query case had no record at all.)"""
    from test_audit_wire import audit_rows
    proxy = make_proxy(extra=RULES, audit_extra='durability = "strict"\n')
    ap = Approver(proxy)
    ap.start()
    try:
        with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
            psycopg.ClientCursor(c).execute("UPDATE orders SET status = 'q' WHERE id = 1")
            c.execute("UPDATE orders SET status = %s WHERE id = %s", ("x", 2))
            for i in (3, 4, 5):
                c.execute("UPDATE orders SET status = %s WHERE id = %s", ("p", i),
                          prepare=True)
    finally:
        ap.stop = True
        ap.join(5)
    assert len(ap.decided) == 5
    proxy.stop()
    got = audit_rows(proxy, "SELECT decision, approver FROM audit WHERE event = 'statement' "
                            "AND statement LIKE 'UPDATE orders%'")
    assert sorted(got) == [("approved", "alice")] * 5, got


def test_denied_rebind_then_a_query_in_the_same_write(pg, aproxy):
    """A Bind refused at its second execution, with the Execute, the Sync and a
    Query behind it in one write: one error and one ReadyForQuery for the segment, as
    Postgres answers a failing Bind, then the Query's own rows and ReadyForQuery."""
    ap = Approver(aproxy, deny_after=1)
    ap.start()
    c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        sql = "UPDATE orders SET status = 'q' || $1 WHERE id = $1::int"
        c.send(parse(sql, name="sq") + SYNC)            # approved
        assert not errors(c.until_ready())
        c.send(bind(stmt="sq", params=[b"1"]) + execute() + SYNC)      # covered
        assert "UPDATE 1" in tags(c.until_ready())
        c.send(bind(stmt="sq", params=[b"2"]) + execute() + SYNC + query("SELECT 'tail'"))
        msgs = c.until_ready(2)
        kinds = [t for t, _ in msgs if t in (b"E", b"Z", b"D")]
        assert kinds == [b"E", b"Z", b"D", b"Z"], msgs
        assert [e["C"] for e in errors(msgs)] == ["42501"]
        assert c.run("SELECT 1")[-1] == (b"Z", b"I")
    finally:
        c.close()
        ap.stop = True
        ap.join(5)
    assert statuses(pg)[:2] == ["q1", "new"]


@pytest.mark.parametrize("client", ["psycopg-simple", "raw-query", "psql"])
def test_a_grant_window_does_not_lift_the_row_limit(pg, aproxy, psql_bin, client):
    """Red team 11: a window granted on a statement that changed no row let it change
    every row of the table later (an approved statement ran without the blast-radius
    guard). What a window lets through runs under the guard: the same text, once the
    rows it reaches are every row of the table, is refused by the every-row check; once
    they are one row again, it runs."""
    from conftest import run_psql
    same = "UPDATE orders SET status = 'w0' WHERE status = 'none'"
    with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(aproxy, lambda: psycopg.ClientCursor(c).execute(same))
    pg.execute("UPDATE orders SET status = 'none'", dbname=DB)
    wide = statuses(pg)
    if client == "psycopg-simple":
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                psycopg.ClientCursor(c).execute(same)
            assert "every row" in str(e.value) or "limit" in str(e.value), e.value
    elif client == "raw-query":
        c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB)
        try:
            c.send(query(same))
            assert [e["C"] for e in errors(c.until_ready())] == ["42501"]
        finally:
            c.close()
    else:
        r = run_psql(psql_bin, aproxy.dsn(dbname=DB), "-c", same)
        assert r.returncode != 0 and "pgguard" in r.stderr, r
    assert statuses(pg) == wide
    pg.execute("UPDATE orders SET status = 'new' WHERE id > 1", dbname=DB)
    with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
        psycopg.ClientCursor(c).execute(same)
    assert statuses(pg) == ["w0"] + ["new"] * 9


@pytest.mark.parametrize("client", ["psycopg", "psycopg-prepared", "asyncpg", "raw"])
def test_an_approved_statement_with_placeholders_keeps_the_row_limit(pg, aproxy, client):
    """Red team 11: the approver sees an extended-protocol statement's text with its
    placeholders, not the values bound; the approved statement ran without the row
    limit, and the values reached every row of the table. Its Executes now run under
    the blast-radius guard: the every-row check refuses them, a narrow one runs."""
    ap = Approver(aproxy)
    ap.start()
    wide = ("UPDATE orders SET status = $1 WHERE id > $2::int", ["every", 0])
    narrow = ("UPDATE orders SET status = $1 WHERE id > $2::int", ["one", 9])
    try:
        if client.startswith("psycopg"):
            prepare = client == "psycopg-prepared"
            sql = wide[0].replace("$1", "%s").replace("$2::int", "%s::int")
            with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                    c.execute(sql, wide[1], prepare=prepare)
                assert "every row" in str(e.value), e.value
                assert statuses(pg) == ["new"] * 10
                c.execute(sql, narrow[1], prepare=prepare)
        elif client == "asyncpg":
            async def go():
                c = await asyncpg.connect(aproxy.dsn(dbname=DB))
                try:
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await c.execute(wide[0], *wide[1])
                    assert statuses(pg) == ["new"] * 10
                    await c.execute(narrow[0], *narrow[1])
                finally:
                    await c.close()
            asyncio.run(go())
        else:
            c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB)
            try:
                c.send(parse(wide[0], name="w") + SYNC)
                assert not errors(c.until_ready())
                c.send(bind(stmt="w", params=[b"every", b"0"]) + execute() + SYNC)
                assert [e["C"] for e in errors(c.until_ready())] == ["42501"]
                assert statuses(pg) == ["new"] * 10
                c.send(bind(stmt="w", params=[b"one", b"9"]) + execute() + SYNC)
                assert "UPDATE 1" in tags(c.until_ready())
                assert c.run("SELECT 1")[-1] == (b"Z", b"I")
            finally:
                c.close()
    finally:
        ap.stop = True
        ap.join(5)
    assert statuses(pg) == ["new"] * 9 + ["one"]


WINDOW_SHAPES = [
    # (approved while it touched nothing, the same shape reaching every row)
    ("UPDATE orders SET status = 'v1' WHERE id > 0 AND id < 0",
     "UPDATE orders SET status = 'v1' WHERE id > 0 AND id < 1000"),
    ("UPDATE orders SET status = 'v2' WHERE status = 'none'",
     "UPDATE orders SET status = 'v2' WHERE status = 'new'"),
    ("DELETE FROM orders WHERE id > 100", "DELETE FROM orders WHERE id > 0"),
    ("UPDATE orders SET status = 'v4' WHERE id BETWEEN 100 AND 200",
     "UPDATE orders SET status = 'v4' WHERE id BETWEEN 0 AND 100"),
    ("UPDATE orders SET status = 'v5' WHERE id = ANY('{100}'::int[])",
     "UPDATE orders SET status = 'v5' WHERE id = ANY('{1,2,3,4,5,6,7,8,9,10}'::int[])"),
]


@pytest.mark.parametrize("narrow, wide", WINDOW_SHAPES)
def test_window_shapes_keep_the_every_row_check(pg, aproxy, psql_bin, narrow, wide):
    """Five shapes of the red team's window attacks (rounds 11 and 19), through psycopg
    (simple and extended), a raw Query and psql: a window covers the statement it was
    approved for, so the wide one asks a human again (denied here) and no row changes."""
    from conftest import run_psql
    with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(aproxy, lambda: psycopg.ClientCursor(c).execute(narrow))
    before = statuses(pg)
    ap = Approver(aproxy, decide=lambda _text: "deny")
    ap.start()
    try:
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                psycopg.ClientCursor(c).execute(wide)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(wide)         # extended: held at its Parse, asked again
        rc = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB)
        try:
            rc.send(query(wide))
            assert [e["C"] for e in errors(rc.until_ready())] == ["42501"]
        finally:
            rc.close()
        r = run_psql(psql_bin, aproxy.dsn(dbname=DB), "-c", wide)
        assert r.returncode != 0 and "pgguard" in r.stderr, r
    finally:
        ap.stop = True
        ap.join(5)
    assert len(ap.decided) == 4 and {v for _, v in ap.decided} == {"deny"}
    assert statuses(pg) == before


DO_BLOCKS = [
    "DO $$BEGIN UPDATE orders SET status = 'other' WHERE id > 0; END$$",
    "DO $$BEGIN DELETE FROM orders; END$$",
    "DO $x$BEGIN UPDATE orders SET status = 'w2' WHERE id = 2; END$x$",
    "DO LANGUAGE plpgsql $$BEGIN UPDATE orders SET status = 'w3' WHERE id = 3; END$$",
    "DO $$BEGIN UPDATE orders SET status = 'w1' WHERE id = 1; "
    "UPDATE orders SET status = 'w4' WHERE id = 4; END$$",
]


def denied_when_asked(aproxy, sql: str) -> list:
    """Run ``sql`` as the agent (simple protocol) on a thread; deny the approval it asks
    for, if it asks. What the client got: ["ran"] or [its SQLSTATE]."""
    done: list = []

    def run():
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c2:
            try:
                psycopg.ClientCursor(c2).execute(sql)
                done.append("ran")
            except psycopg.Error as e:
                done.append(e.sqlstate)
    t = threading.Thread(target=run)
    t.start()
    ids = pending_ids(aproxy, timeout=5)      # it asks a human again (or is refused)
    if ids:
        r = cli(aproxy, "deny", str(ids[0]), "--as", "alice")
        assert r.returncode == 0, r.stderr
    t.join(10)
    return done


def test_a_window_for_one_do_block_covers_no_other(pg, aproxy):
    """A DO block's body is code, not a value: a window approved for one covers that
    exact text only (red team 14: every DO block shared the fingerprint `DO $1`)."""
    first = "DO $$BEGIN UPDATE orders SET status = 'w1' WHERE id = 1; END$$"
    with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(aproxy, lambda: psycopg.ClientCursor(c).execute(first))
    assert statuses(pg)[0] == "w1"
    for sql in DO_BLOCKS:
        assert denied_when_asked(aproxy, sql) == ["42501"], sql
    assert statuses(pg) == ["w1"] + ["new"] * 9
    # and the same text again asks too (round 24: a window covers only runs whose reach
    # it can bound; what a block's code changes depends on data, as a function's)
    assert denied_when_asked(aproxy, first) == ["42501"]
    assert statuses(pg) == ["w1"] + ["new"] * 9


def test_an_approval_given_after_ddl_runs_under_the_row_limit(pg, aproxy):
    """The statement a human approved calls f(7); while it waited, the agent tried to
    create an overload f(int) whose body deletes 1,500 rows (red team 14). An agent may
    not create an overload of an existing name (round 15): the approved statement runs
    the function the human saw."""
    pg.execute("DROP TABLE IF EXISTS rt14_ev; CREATE TABLE rt14_ev (id int); "
               "INSERT INTO rt14_ev SELECT generate_series(1, 1500); "
               "DROP FUNCTION IF EXISTS rt14_calc(numeric), rt14_calc(int)", dbname=DB)
    (status,) = pg.execute("SELECT status FROM orders WHERE id = 1", dbname=DB)[0]
    try:
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            c.execute("CREATE FUNCTION rt14_calc(numeric) RETURNS text LANGUAGE sql AS "
                      "$$ SELECT 'calc' $$")
        done = []

        def run():
            with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c2:
                try:
                    psycopg.ClientCursor(c2).execute(
                        "UPDATE orders SET status = rt14_calc(7) WHERE id = 1")
                    done.append("ran")
                except psycopg.Error as e:
                    done.append(e.sqlstate)
        t = threading.Thread(target=run)
        t.start()
        (rid,) = pending_ids(aproxy)
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("CREATE FUNCTION rt14_calc(int) RETURNS text LANGUAGE plpgsql AS "
                          "$$BEGIN DELETE FROM rt14_ev WHERE id > 0; RETURN 'gone'; END$$")
        r = cli(aproxy, "approve", str(rid), "--as", "alice")
        assert r.returncode == 0, r.stderr
        t.join(15)
        assert pg.execute("SELECT count(*) FROM rt14_ev", dbname=DB) == [(1500,)], done
        assert done == ["ran"], done
        assert pg.execute("SELECT status FROM orders WHERE id = 1", dbname=DB) == [("calc",)]
    finally:
        pg.execute("DROP TABLE IF EXISTS rt14_ev; "
                   "DROP FUNCTION IF EXISTS rt14_calc(numeric), rt14_calc(int)", dbname=DB)
        pg.execute("UPDATE orders SET status = %s WHERE id = 1", (status,), dbname=DB)


# -- a SQL PREPARE a human approved: its name is a protocol prepared statement too, and
# every Bind of it (libpq's PQexecPrepared, a raw client) asks again, as EXECUTE does

PREPARES = [
    ("PREPARE d(int) AS DELETE FROM orders WHERE id = $1", "d", [b"1"]),
    ("PREPARE u AS UPDATE orders SET status = 'x' WHERE id = 2", "u", []),
    ("PREPARE u2(int, text) AS UPDATE orders SET status = $2 WHERE id = $1", "u2",
     [b"3", b"y"]),
    ("prepare dd(int) as delete from orders where id > $1", "dd", [b"5"]),
    ("PREPARE m(int) AS MERGE INTO orders o USING (SELECT $1 AS id) s ON o.id = s.id "
     "WHEN MATCHED THEN UPDATE SET status = 'm'", "m", [b"4"]),
]


def _state(pg):
    return pg.execute("SELECT count(*), count(*) FILTER (WHERE status <> 'new') FROM orders",
                      dbname=DB)[0]


@pytest.mark.parametrize("sql,name,params", PREPARES)
def test_an_approved_sql_prepare_is_asked_again_at_each_protocol_bind(pg, aproxy, sql, name,
                                                                       params):
    ap = Approver(aproxy, deny_after=1)     # the PREPARE approved, every later one denied
    ap.start()
    try:
        c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB)
        try:
            assert not errors(c.run(sql))
            for _ in range(3):
                c.send(bind(name, params) + execute() + SYNC)
                msgs = c.until_ready()
                assert errors(msgs) and errors(msgs)[0]["C"] == "42501", msgs
        finally:
            c.close()
    finally:
        ap.stop = True
        ap.join(5)
    assert _state(pg) == (10, 0)
    assert [v for _, v in ap.decided] == ["approve", "deny", "deny", "deny"], ap.decided


def test_libpq_exec_prepared_of_an_approved_prepare_runs_once_per_approval(pg, aproxy):
    ap = Approver(aproxy)
    ap.start()
    try:
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            c.execute("PREPARE d(int) AS DELETE FROM orders WHERE id = $1")
            for i in (1, 2, 3):
                r = c.pgconn.exec_prepared(b"d", [str(i).encode()])
                assert r.command_status == b"DELETE 1"
    finally:
        ap.stop = True
        ap.join(5)
    assert _state(pg) == (7, 0)
    assert len(ap.decided) == 4, ap.decided       # the PREPARE, then each execution


PREPARED_WRITES = [
    "PREPARE {n}(int) AS DELETE FROM orders WHERE id = $1",
    "PREPARE {n}(int) AS UPDATE orders SET status = 'gone' WHERE id = $1",
    "PREPARE {n}(int) AS DELETE FROM orders WHERE id >= $1",
    "PREPARE {n}(int) AS UPDATE orders SET status = 'x' WHERE id IN (SELECT $1)",
    "PREPARE {n}(int) AS WITH d AS (DELETE FROM orders WHERE id = $1 RETURNING 1) "
    "SELECT count(*) FROM d",
]


@pytest.mark.parametrize("how", ["raw-bind", "libpq-exec-prepared"])
def test_a_sql_prepare_sent_by_parse_asks_at_each_bind_of_its_name(pg, aproxy, how):
    """A PREPARE sent through Parse/Bind/Execute, approved: the statement it creates is
    a protocol prepared statement too, and each Bind of that name asks a human again."""
    # the PREPARE itself is approved; an execution of it (values bound) is denied
    ap = Approver(aproxy, decide=lambda st: "deny" if "-- $1 = " in st else "approve")
    ap.start()
    try:
        for i, tmpl in enumerate(PREPARED_WRITES):
            name = f"pw{i}"
            c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=30)
            try:
                c.send(parse(tmpl.format(n=name)), bind(), execute(), SYNC)
                assert not errors(c.until_ready())
                if how == "raw-bind":
                    c.send(bind(stmt=name, params=[b"3"]), execute(), SYNC)
                    assert errors(c.until_ready())
                    assert not errors(c.run("SELECT 1"))
            finally:
                c.close()
            if how == "libpq-exec-prepared":
                with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as conn:
                    conn.execute(tmpl.format(n=name))       # a Query: approved
                    res = conn.pgconn.exec_prepared(name.encode(), [b"4"])
                    assert res.status == psycopg.pq.ExecStatus.FATAL_ERROR
                    assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        ap.stop = True
        ap.join(5)
    assert statuses(pg) == ["new"] * 10
    denied = [v for v, _ in ap.seen].count("deny")
    assert denied == len(PREPARED_WRITES), ap.seen


# Red team, round 18 (helper 92): a Parse of the approved statement's name with another
# text fails upstream (42P05: the name is taken), or is skipped after an earlier error,
# and the approved UPDATE stays prepared; pgguard dropped the approval at the Parse, and
# every later Bind ran the UPDATE without asking (a PREPARE's approval, which covers no
# execution, too). Each Bind asks again; judged by the rows upstream.
REPLAYS = {
    "dup-parse": lambda name: [parse("SELECT 1", name=name), SYNC],
    "dup-parse-param": lambda name: [parse("SELECT $1::int", name=name), SYNC],
    "skipped-parse": lambda name: [query("SELECT 1"), parse("SELECT 1/0"), bind(),
                                   execute(), parse("SELECT 1", name=name), SYNC],
    "two-dups": lambda name: [parse("SELECT 1", name=name), parse("SELECT 2", name=name),
                              SYNC],
    "skipped-close-and-dup": lambda name: [parse("SELECT 1/0"), bind(), execute(),
                                           close("S", name), parse("SELECT 1", name=name),
                                           SYNC],
}


@pytest.mark.parametrize("how", ["parse", "sql-prepare"])
@pytest.mark.parametrize("replay", REPLAYS)
def test_a_failed_parse_of_the_name_does_not_lift_the_approval(pg, aproxy, replay, how):
    ap = Approver(aproxy, deny_after=1)
    ap.start()
    c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        sql = "UPDATE orders SET status = 'replayed' WHERE id = $1::int"
        if how == "parse":
            c.send(parse(sql, name="ap"), bind(stmt="ap", params=[b"1"]), execute(), SYNC)
            assert "UPDATE 1" in tags(c.until_ready())          # approved, covered
        else:
            assert not errors(c.run(f"PREPARE ap(int) AS {sql.replace('::int', '')}"))
        frames = REPLAYS[replay]("ap")
        c.send(*frames)
        c.until_ready(sum(1 for f in frames if f in (SYNC,) or f[:1] == b"Q"))
        for i in (2, 3):
            c.send(bind(stmt="ap", params=[str(i).encode()]), execute(), SYNC)
            msgs = c.until_ready()
            assert [e["C"] for e in errors(msgs)] == ["42501"], msgs      # asked, denied
        assert c.run("SELECT 1")[-1] == (b"Z", b"I")
    finally:
        c.close()
        ap.stop = True
        ap.join(5)
    assert statuses(pg)[1:3] == ["new", "new"]
    assert [v for _, v in ap.decided][1:] == ["deny", "deny"], ap.decided


# Regression hunt, round 18 (helper 94): after the change above, an approval outlived the
# statement it covered: the SELECTs of a psycopg pipeline behind an approved UPDATE (each
# an unnamed Parse after unsynced messages) asked for approval of the UPDATE, showing
# the SELECTs' values; a name DEALLOCATEd and prepared again asked at each Bind.
def test_a_pipeline_behind_an_approved_write_asks_once(pg, aproxy):
    ap = Approver(aproxy)
    ap.start()
    try:
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            with c.pipeline():
                c.execute("UPDATE orders SET status = 'piped' WHERE id = %s", (2,))
                a = c.execute("SELECT %s::int + 1", (10,))
                b = c.execute("SELECT count(*) FROM orders WHERE id > %s", (0,))
            assert a.fetchone() == (11,) and b.fetchone() == (10,)
    finally:
        ap.stop = True
        ap.join(5)
    assert len(ap.decided) == 1, ap.seen
    assert statuses(pg)[1] == "piped"


@pytest.mark.parametrize("reset", ["DEALLOCATE st1", "DEALLOCATE ALL",
                                   "DEALLOCATE PREPARE st1"])
def test_a_name_deallocated_and_prepared_again_asks_nothing(pg, aproxy, reset):
    ap = Approver(aproxy)
    ap.start()
    c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        c.send(parse("UPDATE orders SET status = 'd' WHERE id = $1::int", name="st1"),
               bind(stmt="st1", params=[b"1"]), execute(), SYNC)
        assert "UPDATE 1" in tags(c.until_ready())
        assert not errors(c.run(reset))
        c.send(parse("SELECT $1::int AS v", name="st1"), SYNC)
        assert not errors(c.until_ready())
        for i in (5, 6):
            c.send(bind(stmt="st1", params=[str(i).encode()]), execute(), SYNC)
            assert tags(c.until_ready()) == ["SELECT 1"]
    finally:
        c.close()
        ap.stop = True
        ap.join(5)
    assert len(ap.decided) == 1, ap.seen


def test_a_window_covers_the_whole_values_not_what_the_approver_saw_of_them(pg, aproxy):
    """Regression hunt (helper 101): a window was keyed by the request's text, where a
    long bound value is cut; a value beginning like the approved one (its first 200
    characters) and reaching 500 more rows ran unasked. The key holds the values whole."""
    sql = "UPDATE orders SET status = 'lw' WHERE id = ANY(%s::int[])"
    more = ",1,2,3,5,6,7,8,9,10"
    approved = "{4" + " " * 400 + "}"
    wider = "{4" + " " * (400 - len(more)) + more + "}"     # the same length
    assert len(wider) == len(approved) and wider[:200] == approved[:200]
    with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(aproxy, lambda: c.execute(sql, (approved,), prepare=False))
    assert statuses(pg) == ["new"] * 3 + ["lw"] + ["new"] * 6
    ap = Approver(aproxy, decide=lambda _text: "deny")
    ap.start()
    try:
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            for value in (wider, "{4" + " " * (399 - len(more)) + more + " }"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    c.execute(sql, (value,), prepare=False)
            c.execute(sql, (approved,), prepare=False)         # the same: covered
    finally:
        ap.stop = True
        ap.join(5)
    assert len(ap.decided) == 2
    assert statuses(pg) == ["new"] * 3 + ["lw"] + ["new"] * 6


def _approved_once(proxy, run) -> None:
    """``run()`` on a thread, its approval request approved by alice (no window)."""
    t = threading.Thread(target=run)
    t.start()
    (rid,) = pending_ids(proxy)
    assert cli(proxy, "approve", str(rid), "--as", "alice").returncode == 0
    t.join(10)


def test_a_window_on_execute_covers_no_other_prepared_statement(pg, aproxy):
    """Regression hunt (helper 101): a window on `EXECUTE p(42)` covered the same text
    after `DEALLOCATE p` and a new `PREPARE p` (398 rows changed unasked). What a SQL
    EXECUTE runs may change while its text stays: no window covers it."""
    with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
        cur = psycopg.ClientCursor(c)
        _approved_once(aproxy, lambda: cur.execute(
            "PREPARE p(int) AS UPDATE orders SET status = 'ex' WHERE id = $1"))
        approved_with_window(aproxy, lambda: cur.execute("EXECUTE p(2)"))
        assert statuses(pg)[1] == "ex"
        cur.execute("DEALLOCATE p")
        _approved_once(aproxy, lambda: cur.execute(
            "PREPARE p(int) AS UPDATE orders SET status = 'ex2' WHERE id <> $1"))
        ap = Approver(aproxy, decide=lambda _text: "deny")
        ap.start()
        try:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                cur.execute("EXECUTE p(2)")
        finally:
            ap.stop = True
            ap.join(5)
    assert [v for _, v in ap.decided] == ["deny"]
    assert statuses(pg) == ["new", "ex"] + ["new"] * 8


INSERT_RULES = RULES.replace('statements = ["update", "delete"]',
                             'statements = ["insert", "update", "delete"]')
_GROW = ("INSERT INTO orders (id, status) SELECT g, 'grown' FROM generate_series(100, "
         "99 + $1::int) g")


def _first_asks_with_values(text: str) -> str:
    # the request of the Parse alone says nothing runs free; the next shows the value
    return "approve" if "parameters not sent yet" in text else "deny"


def test_an_approved_parse_without_a_row_limit_asks_again_at_its_first_bind(pg, make_proxy):
    # (red team 25, helper 139) a Parse sent alone (asyncpg, prepare=True, raw) was
    # approved with "the first execution runs under the row limit": an INSERT ... SELECT
    # has no row limit, and its first Bind ran with any value unasked (2,500 rows)
    aproxy = make_proxy(extra=INSERT_RULES)
    ap = Approver(aproxy, decide=_first_asks_with_values)
    ap.start()

    async def main():
        conn = await asyncpg.connect(aproxy.dsn(dbname=DB))
        try:
            stmt = await conn.prepare(_GROW)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await stmt.fetch(2500)
        finally:
            await conn.close()
    try:
        asyncio.run(main())
        c = RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database=DB)
        try:
            c.send(parse(_GROW, name="grow"), SYNC)
            assert errors(c.until_ready()) == []            # approved, no values
            c.send(bind("grow", [b"3000"]), execute(), SYNC)
            assert [e["C"] for e in errors(c.until_ready())] == ["42501"]   # asked, denied
        finally:
            c.close()
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as pc:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                pc.execute(_GROW.replace("$1", "%s"), (2000,), prepare=True)
    finally:
        ap.stop = True
        ap.join(5)
    assert pg.execute("SELECT count(*) FROM orders WHERE status = 'grown'",
                      dbname=DB) == [(0,)]
    verbs = [v for v, _ in ap.seen]
    assert "deny" in verbs and all("runs under the row limit" not in t for _, t in ap.seen)
    asked = [t for v, t in ap.seen if v == "deny"]
    assert any("3000" in t for t in asked) and any("2500" in t for t in asked), asked
