# Red team, round 24 (helper 130): an approval window covers a statement's text (and
# values and settings), not the rows it reaches. Approved with a 10-minute window while
# `UPDATE orders ... WHERE id IN (SELECT id FROM pick)` changed one row, the same text
# changed 901 once the agent had put 900 ids in its own table `pick` (from the same
# session or another). A window's later runs now change at most as many rows as the run
# a human approved (one at least), measured from that run's command count; until that
# count is known (or when it cannot be), a human is asked again. Judged by the rows
# upstream.
import sqlite3
import threading
import time

import asyncpg
import psycopg
import pytest
import test_approvals_prepared
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_USER, run_psql
from rawpg import RawClient, errors, query
from test_approvals_prepared import DB, RULES, approved_with_window, statuses
from test_approvals_wire import api, pending_ids

orders = test_approvals_prepared.orders     # (autouse there: here too)

SQL = "UPDATE orders SET status = 'w' WHERE id IN (SELECT id FROM pick)"
INSERTS = """
[[rules]]
name = "orders-inserts-need-approval"
when = { kind = "agent", statements = ["insert"], relations = ["public.orders"] }
action = "approve"
timeout = "30s"
"""


@pytest.fixture(params=["batched", "strict"])
def wproxy(request, make_proxy, pg):
    pg.execute(f"DROP TABLE IF EXISTS pick; CREATE TABLE pick (id int); "
               f"ALTER TABLE pick OWNER TO {UPSTREAM_USER}; INSERT INTO pick VALUES (1)",
               dbname=DB)
    extra = 'durability = "strict"\n' if request.param == "strict" else ""
    return make_proxy(extra=RULES + INSERTS, audit_extra=extra)


def _widen(pg):
    pg.execute("INSERT INTO pick SELECT generate_series(2, 10)", dbname=DB)


def _window(proxy, pg):
    # approved with a window while the statement changes one row
    with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(proxy, lambda: psycopg.ClientCursor(c).execute(SQL))
    assert statuses(pg) == ["w"] + ["new"] * 9
    pg.execute("UPDATE orders SET status = 'new'", dbname=DB)
    grants = api(proxy, "GET", "/api/grants")
    grants = grants.get("grants", grants) if isinstance(grants, dict) else grants
    assert [g["max_rows"] for g in grants] == [1], grants


def _refused_by_window(text: str) -> None:
    assert "window #" in text and "as many as the run approved by alice" in text, text


CLIENTS = ["psycopg-simple", "raw-query", "psql", "asyncpg-simple", "psycopg-extended"]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_window_covers_no_more_rows_than_its_approved_run(pg, wproxy, psql_bin, client):
    _window(wproxy, pg)
    # the same text, the same rows: runs without asking
    with psycopg.connect(wproxy.dsn(dbname=DB), autocommit=True) as c:
        psycopg.ClientCursor(c).execute(SQL)
    assert statuses(pg) == ["w"] + ["new"] * 9
    pg.execute("UPDATE orders SET status = 'new'", dbname=DB)
    _widen(pg)                      # (the agent's own table: ten ids now)
    if client == "psycopg-simple":
        with psycopg.connect(wproxy.dsn(dbname=DB), autocommit=True) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                psycopg.ClientCursor(c).execute(SQL)
            _refused_by_window(e.value.diag.message_detail or "")
    elif client == "raw-query":
        c = RawClient.connect(wproxy.port, AGENT, AGENT_PASSWORD, database=DB)
        try:
            c.send(query(SQL))
            (err,) = errors(c.until_ready())
            assert err["C"] == "42501"
            _refused_by_window(err.get("D", ""))
        finally:
            c.close()
    elif client == "psql":
        r = run_psql(psql_bin, wproxy.dsn(dbname=DB), "-c", SQL)
        assert r.returncode != 0
        _refused_by_window(r.stderr)
    elif client == "asyncpg-simple":
        import asyncio

        async def go():
            c = await asyncpg.connect(wproxy.dsn(dbname=DB))
            try:
                with pytest.raises(asyncpg.InsufficientPrivilegeError) as e:
                    await c.execute(SQL)
                _refused_by_window(e.value.detail or "")
            finally:
                await c.close()
        asyncio.run(go())
    else:
        # the extended protocol: the window of a statement approved that way
        pg.execute("DELETE FROM pick WHERE id > 1", dbname=DB)
        with psycopg.connect(wproxy.dsn(dbname=DB), autocommit=True) as c:
            ext = SQL + " AND status <> %s"
            approved_with_window(wproxy, lambda: c.execute(ext, ("x",), prepare=False))
            pg.execute("UPDATE orders SET status = 'new'", dbname=DB)
            _widen(pg)
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute(ext, ("x",), prepare=False)
            _refused_by_window(e.value.diag.message_detail or "")
    assert statuses(pg) == ["new"] * 10


def test_the_bound_holds_in_another_session_and_says_why(pg, wproxy):
    _window(wproxy, pg)
    _widen(pg)
    with psycopg.connect(wproxy.dsn(dbname=DB), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            psycopg.ClientCursor(c).execute(SQL)
    d = e.value.diag
    assert "rows changed: 10; limit: 1" in (d.message_detail or ""), d.message_detail
    assert "asks for approval again" in (d.message_hint or ""), d.message_hint
    assert statuses(pg) == ["new"] * 10
    # back to one row: the window covers it again
    pg.execute("DELETE FROM pick WHERE id > 1", dbname=DB)
    with psycopg.connect(wproxy.dsn(dbname=DB), autocommit=True) as c:
        psycopg.ClientCursor(c).execute(SQL)
    assert statuses(pg) == ["w"] + ["new"] * 9


def test_a_window_whose_run_is_not_measured_yet_asks_a_human(pg, wproxy):
    # a grant whose approved run has no count (yet, or none could be read): a
    # statement matching it is asked for, not let through on an unknown bound
    with psycopg.connect(wproxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(wproxy, lambda: psycopg.ClientCursor(c).execute(SQL))
    (db,) = [f for f in (wproxy.dir / f"state-{wproxy.port}").iterdir()
             if f.suffix in (".sqlite3", ".db", ".sqlite")]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE grants SET max_rows = NULL")
    assert _asked_and_denied(wproxy, SQL) == ["42501"]
    assert statuses(pg) == ["w"] + ["new"] * 9      # (the approved run only)


# (helper 133) the count that bounded a window was the whole Query's (a SELECT's rows
# counted: 1000 for a run that changed none), and an INSERT's or a COPY's run was not
# bounded at all. A window now covers only runs whose reach it can bound: a plain
# UPDATE / DELETE (by its approved run's count), an INSERT of the values its text
# spells, a statement that writes nothing; anything else asks every time.
ASKED_AGAIN = {
    "select-then-update": "SELECT id FROM orders; " + SQL,
    "insert-select": "INSERT INTO orders (id, status) SELECT id + 100, 'ins' FROM pick",
    "update-in-a-cte": "WITH u AS (UPDATE orders SET status = 'c' WHERE id IN "
                       "(SELECT id FROM pick) RETURNING id) SELECT count(*) FROM u",
    "two-updates": SQL + "; UPDATE orders SET status = 'z' WHERE id = 7",
}


@pytest.mark.parametrize("case", list(ASKED_AGAIN))
def test_a_window_does_not_cover_what_it_cannot_bound(pg, wproxy, case):
    sql = ASKED_AGAIN[case]
    with psycopg.connect(wproxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(wproxy, lambda: psycopg.ClientCursor(c).execute(sql))
    before = pg.execute("SELECT id, status FROM orders ORDER BY id", dbname=DB)
    _widen(pg)
    assert _asked_and_denied(wproxy, sql) == ["42501"]      # asked, not covered
    assert pg.execute("SELECT id, status FROM orders ORDER BY id", dbname=DB) == before


def test_a_window_covers_an_insert_of_the_values_its_text_spells(pg, wproxy):
    sql = "INSERT INTO orders (id, status) VALUES (201, 'v'), (202, 'v')"
    with psycopg.connect(wproxy.dsn(dbname=DB), autocommit=True) as c:
        approved_with_window(wproxy, lambda: psycopg.ClientCursor(c).execute(sql))
        psycopg.ClientCursor(c).execute(sql)            # no human asked
    assert pg.execute("SELECT count(*) FROM orders WHERE id > 200", dbname=DB) == [(4,)]


def test_a_window_rebind_after_ddl_is_judged_again_and_answered(pg, wproxy):
    # (helper 133) a Bind of a prepared statement an approval (with a window) had let
    # through, sent again after DDL moved the decision generation, raised TypeError in
    # the Bind's judging again: the session stopped answering
    from rawpg import SYNC, bind, execute, parse, tags
    stop = threading.Event()

    def approve_all():
        while not stop.is_set():
            for rid in _pending(wproxy):
                api(wproxy, "POST", f"/api/approvals/{rid}/approve",
                    {"approver": "alice", "window": "10m"})
            time.sleep(0.05)
    t = threading.Thread(target=approve_all, daemon=True)
    t.start()
    sql = SQL + " AND $1::int = 1"
    c = RawClient.connect(wproxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=30)
    try:
        c.send(parse(sql, name="s1"), bind(stmt="s1", params=[b"1"]), execute(), SYNC)
        assert "UPDATE 1" in tags(c.until_ready())
        pg.execute("UPDATE orders SET status = 'new'", dbname=DB)
        c.run("DROP TABLE IF EXISTS t24; CREATE TABLE t24 (x int)")    # DDL: a new generation
        _widen(pg)
        c.send(bind(stmt="s1", params=[b"1"]), execute(), SYNC)
        got = c.until_ready()                           # answered, not hung
        assert errors(got) and errors(got)[0]["C"] == "42501", got
    finally:
        stop.set()
        c.close()
    assert statuses(pg) == ["new"] * 10


def _asked_and_denied(proxy, sql: str) -> list:
    """``sql`` run by the agent on a thread: it must ask a human (alice denies);
    the SQLSTATEs the agent got."""
    out = []

    def run():
        with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
            try:
                psycopg.ClientCursor(c).execute(sql)
            except psycopg.errors.InsufficientPrivilege as e:
                out.append(e.sqlstate)
    t = threading.Thread(target=run)
    t.start()
    (rid,) = pending_ids(proxy)
    api(proxy, "POST", f"/api/approvals/{rid}/deny", {"approver": "alice"})
    t.join(10)
    return out


def _pending(proxy) -> list:
    items = api(proxy, "GET", "/api/approvals?state=pending")
    items = items.get("approvals", items) if isinstance(items, dict) else items
    return [i["id"] for i in items]
