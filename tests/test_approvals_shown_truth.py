# Red team, round 19 (helper 103): what an approver was shown differed from what
# Postgres ran. DateStyle chosen at login (or SET in the same write as the held statement)
# was not shown: '01/12/2024' read as 12 January to the approver and as 1 December
# upstream. A carriage return ends a -- comment for Postgres, and the approver saw it as
# an escape inside the comment line: `-- note\rOR status = 'paid'` read as one comment
# and cancelled every paid order. The settings literals read by are always shown now
# (after what was sent before the statement is answered), and a carriage return is shown
# as the line break it is. Judged by what the approver read and by the rows upstream.
import threading

import psycopg
import pytest
import test_approvals_prepared
from conftest import AGENT, AGENT_PASSWORD
from rawpg import SYNC, RawClient, bind, execute, parse, query
from test_approvals_prepared import DB, Approver, statuses

aproxy = test_approvals_prepared.aproxy
orders = test_approvals_prepared.orders     # (autouse there: here too)

UPD = "UPDATE orders SET status = 'dmy' WHERE created_on = '01/12/2024'"


@pytest.fixture(autouse=True)
def dates(pg, orders):
    pg.execute("ALTER TABLE orders ADD COLUMN created_on date; "
               "UPDATE orders SET created_on = '2024-12-01' WHERE id = 2; "
               "UPDATE orders SET created_on = '2024-01-12' WHERE id = 3", dbname=DB)


def _held(aproxy, run) -> list:
    """``run()`` (on a thread) asks for approval; denied. What the approver read."""
    ap = Approver(aproxy, decide=lambda shown: "deny")
    ap.start()
    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    ap.stop = True
    ap.join(5)
    return [text for _, text in ap.seen]


def _quietly(fn):
    def run():
        try:
            fn()
        except psycopg.Error:
            pass
    return run


def _raw(proxy, *frames, count=1):
    def run():
        c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=30)
        try:
            c.send(*frames)
            c.until_ready(count)
        finally:
            c.close()
    return run


DMY_ROUTES = {
    "login-option": lambda p: _quietly(lambda: psycopg.ClientCursor(psycopg.connect(
        p.dsn(dbname=DB, options="-c DateStyle=ISO,DMY"), autocommit=True)).execute(UPD)),
    "same-write-queries": lambda p: _raw(p, query("SET DateStyle = 'ISO, DMY'"),
                                         query(UPD), count=2),
    "same-write-extended": lambda p: _raw(p, query("SET DateStyle = 'ISO, DMY'"),
                                          parse(UPD), bind(), execute(), SYNC, count=2),
    "psycopg-pipeline": lambda p: _quietly(lambda: _pipeline(p)),
    "set-config-first": lambda p: _raw(p, query("SELECT set_config('datestyle', 'ISO, DMY', "
                                             "false)"), query(UPD), count=2),
}


def _pipeline(p):
    with psycopg.connect(p.dsn(dbname=DB), autocommit=True) as c:
        with c.pipeline():
            c.execute("SET DateStyle = 'ISO, DMY'")
            c.execute(UPD)


@pytest.mark.parametrize("route", list(DMY_ROUTES))
def test_the_approver_reads_the_dates_as_postgres_will(pg, aproxy, route):
    seen = _held(aproxy, DMY_ROUTES[route](aproxy))
    assert seen, route
    assert "DateStyle = 'ISO, DMY'" in seen[0] or "not answered yet" in seen[0], seen
    assert statuses(pg) == ["new"] * 10


def test_a_carriage_return_is_shown_as_the_line_break_it_is(pg, aproxy):
    sql = "UPDATE orders SET status = 'cr' WHERE id = 1 -- one row\rOR id > 0"
    seen = _held(aproxy, _quietly(lambda: psycopg.ClientCursor(psycopg.connect(
        aproxy.dsn(dbname=DB), autocommit=True)).execute(sql)))
    assert seen and "-- one row\\x0d\nOR id > 0" in seen[0], seen
    assert statuses(pg) == ["new"] * 10


@pytest.mark.parametrize("kind", ["view", "table"])
def test_a_temporary_name_over_a_public_one_is_said(pg, aproxy, kind):
    # (helper 103) a TEMP view named orders over other rows: the approver read
    # public.orders, and an approved DELETE ... WHERE id = 777777 took 12 real orders
    body = ("AS SELECT cust_id AS id, status FROM public.orders" if kind == "view"
            else "(id int, status text)")

    def run():
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            cur = psycopg.ClientCursor(c)
            cur.execute("ALTER TABLE public.orders ADD COLUMN IF NOT EXISTS cust_id int")
            cur.execute(f"CREATE TEMP {kind.upper()} orders {body}")
            try:
                cur.execute("DELETE FROM orders WHERE id = 777777")
            except psycopg.Error:
                pass
    seen = _held(aproxy, run)
    assert seen and "in this session orders name temporary objects" in seen[0], seen
    assert statuses(pg) == ["new"] * 10
