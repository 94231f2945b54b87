# Approvals through the proxy: the agent's statement waits inline, reaches Postgres only
# once a human approves it, and is refused (42501) when denied, withdrawn on cancel.
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from conftest import ADMIN_TOKEN

RULES = """
[[rules]]
name = "orders-need-approval"
when = { kind = "agent", statements = ["update", "delete"], relations = ["public.orders"] }
action = "approve"
timeout = "30s"
"""


@pytest.fixture
def aproxy(make_proxy):
    return make_proxy(extra=RULES)


@pytest.fixture(autouse=True)
def orders(pg):
    pg.execute("DROP TABLE IF EXISTS orders CASCADE; CREATE TABLE orders (id int, status text);"
               "INSERT INTO orders VALUES (1, 'new'), (2, 'new')", dbname="appdb")


def status(pg, oid=1):
    return pg.execute("SELECT status FROM orders WHERE id = %s", [oid], dbname="appdb")[0][0]


def cli(proxy, *args):
    return subprocess.run([sys.executable, "-m", "pgguard", "approvals", *args, "-c",
                           str(proxy.config)], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, TEST_ADMIN_TOKEN=ADMIN_TOKEN))


def api(proxy, method, path, body=None):
    return proxy.api(method, path, body)


def pending_ids(proxy, want=1, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            items = api(proxy, "GET", "/api/approvals?state=pending")
        except urllib.error.URLError:       # the admin server is still starting
            time.sleep(0.05)
            continue
        items = items.get("approvals", items) if isinstance(items, dict) else items
        if len(items) >= want:
            return [i["id"] for i in items]
        time.sleep(0.05)
    raise AssertionError("no pending approval appeared")


def audit_decisions(proxy):
    import duckdb
    return duckdb.sql(
        f"SELECT statement, decision, approver FROM read_parquet('{proxy.audit_dir}/**/"
        "*.parquet', hive_partitioning = true) WHERE event = 'statement' "
        "ORDER BY event_id").fetchall()


def run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except Exception as e:      # noqa: BLE001 - handed to the test
            box["error"] = e
    t = threading.Thread(target=target)
    t.start()
    return t, box


def test_held_until_approved_by_cli_then_real_result(pg, aproxy):
    notices = []

    def agent():
        with psycopg.connect(aproxy.dsn(dbname="appdb"), autocommit=True) as conn:
            conn.add_notice_handler(lambda d: notices.append(d.message_primary))
            cur = conn.execute("UPDATE orders SET status = 'refunded' WHERE id = 1")
            return cur.statusmessage

    t, box = run_in_thread(agent)
    (rid,) = pending_ids(aproxy)
    time.sleep(0.3)
    assert status(pg) == "new", "the held statement reached Postgres before approval"
    r = cli(aproxy, "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert listed[0]["id"] == rid and "UPDATE orders" in listed[0]["statement"]
    assert {"id", "identity", "database", "statement", "rule", "requested_at",
            "expires_at"} <= set(listed[0])
    r = cli(aproxy, "approve", str(rid), "--as", "alice")
    assert r.returncode == 0, r.stderr
    t.join(15)
    assert box.get("result") == "UPDATE 1", box
    assert status(pg) == "refunded"
    assert notices and f"waiting for approval #{rid}" in notices[0]
    aproxy.stop()
    assert audit_decisions(aproxy) == [("UPDATE orders SET status = $1 WHERE id = $2",
                                        "approved", "alice")]


def test_denied_with_reason_and_nobody_approves_their_own(pg, aproxy):
    def agent():
        with psycopg.connect(aproxy.dsn(dbname="appdb"), autocommit=True) as conn:
            conn.execute("DELETE FROM orders WHERE id = %s", [2], prepare=True)  # extended

    t, box = run_in_thread(agent)
    (rid,) = pending_ids(aproxy)
    with pytest.raises(urllib.error.HTTPError) as e:
        api(aproxy, "POST", f"/api/approvals/{rid}/approve", {"approver": "ci-agent"})
    assert e.value.code == 403
    api(aproxy, "POST", f"/api/approvals/{rid}/deny",
        {"approver": "alice", "reason": "not during the freeze"})
    t.join(15)
    err = box.get("error")
    assert isinstance(err, psycopg.errors.InsufficientPrivilege), box
    assert "not during the freeze" in str(err) and "alice" in str(err)
    assert pg.execute("SELECT count(*) FROM orders", dbname="appdb") == [(2,)]
    aproxy.stop()
    assert audit_decisions(aproxy) == [("DELETE FROM orders WHERE id = $1", "denied", "alice")]


def test_cancel_withdraws_the_request(pg, aproxy):
    conn = psycopg.connect(aproxy.dsn(dbname="appdb"), autocommit=True)

    def agent():
        conn.execute("UPDATE orders SET status = 'x' WHERE id = 2")

    t, box = run_in_thread(agent)
    (rid,) = pending_ids(aproxy)
    conn.cancel()
    t.join(15)
    assert isinstance(box.get("error"), psycopg.errors.QueryCanceled), box
    assert api(aproxy, "GET", f"/api/approvals/{rid}")["state"] == "withdrawn"
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert status(pg, 2) == "new"
    conn.close()
    # the audit says what happened (round 20, helper 107: it said "error"), and a replay
    # of the same policy finds nothing decided differently
    aproxy.stop()
    from exactlib import audit_rows
    assert audit_rows(aproxy, "SELECT decision, rule FROM audit WHERE statement LIKE "
                              "'UPDATE orders%'") == [("withdrawn", "orders-need-approval")]
    r = subprocess.run([sys.executable, "-m", "pgguard", "policy", "replay", "-c",
                        str(aproxy.config), "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["changes"] == [], r.stdout


@pytest.mark.parametrize("client", ["raw-query", "raw-extended", "asyncpg"])
def test_a_client_gone_while_held_leaves_a_withdrawn_record(pg, aproxy, client):
    # round 22 (helper 118): the request was withdrawn, but the audit held only the
    # session's connect and disconnect: no record of the statement at all
    import asyncio
    import socket

    import asyncpg
    import rawpg
    from conftest import AGENT, AGENT_PASSWORD
    sql = f"UPDATE orders SET status = 'gone-{client}' WHERE id = 1"
    if client == "asyncpg":
        async def go():
            c = await asyncpg.connect(aproxy.dsn(dbname="appdb"))
            task = asyncio.ensure_future(c.execute(sql))
            await asyncio.to_thread(pending_ids, aproxy)
            c.terminate()                       # the socket closed, no cancel
            with pytest.raises(Exception):      # noqa: B017 - however asyncpg says it
                await task
        asyncio.run(go())
    else:
        c = rawpg.RawClient.connect(aproxy.port, AGENT, AGENT_PASSWORD, database="appdb")
        if client == "raw-query":
            c.send(rawpg.query(sql))
        else:
            c.send(rawpg.parse(sql), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
        pending_ids(aproxy)
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
    deadline = time.monotonic() + 10
    while api(aproxy, "GET", "/api/approvals?state=pending") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status(pg) == "new"
    aproxy.stop()
    from exactlib import audit_rows
    got = audit_rows(aproxy, "SELECT decision, rule, error FROM audit WHERE statement LIKE "
                             "'UPDATE orders%'")
    assert len(got) == 1, got
    assert got[0][:2] == ("withdrawn", "orders-need-approval"), got
    assert "the session ended while the statement waited for approval" in got[0][2]


def test_jit_window_lets_repeats_through(pg, aproxy):
    def agent(oid):
        with psycopg.connect(aproxy.dsn(dbname="appdb"), autocommit=True) as conn:
            return conn.execute(f"UPDATE orders SET status = 'paid' WHERE id = {oid}"
                                ).statusmessage

    t, box = run_in_thread(lambda: agent(1))
    (rid,) = pending_ids(aproxy)
    r = cli(aproxy, "approve", str(rid), "--as", "alice", "--window", "5m")
    assert r.returncode == 0, r.stderr
    t.join(15)
    assert box.get("result") == "UPDATE 1"
    # the same statement again: no new request
    pg.execute("UPDATE orders SET status = 'new' WHERE id = 1", dbname="appdb")
    assert agent(1) == "UPDATE 1"
    assert status(pg, 1) == "paid"
    # a new literal is another statement: asked for again (red team 19)
    t, box = run_in_thread(lambda: agent(2))
    (rid,) = pending_ids(aproxy)
    r = cli(aproxy, "deny", str(rid), "--as", "alice")
    assert r.returncode == 0, r.stderr
    t.join(15)
    assert status(pg, 2) == "new"


def test_many_pending_at_once(pg, aproxy):
    n = 50
    threads = [run_in_thread(lambda i=i: psycopg.connect(
        aproxy.dsn(dbname="appdb"), autocommit=True).execute(
        f"UPDATE orders SET status = 's{i}' WHERE id = 1").statusmessage) for i in range(n)]
    ids = pending_ids(aproxy, want=n, timeout=60)
    for rid in ids:
        api(aproxy, "POST", f"/api/approvals/{rid}/approve", {"approver": "alice"})
    for t, box in threads:
        t.join(20)
        assert box.get("result") == "UPDATE 1", box


def test_psql_admin_console(pg, aproxy, psql_bin):
    from conftest import HUMAN, HUMAN_PASSWORD, run_psql

    t, box = run_in_thread(lambda: psycopg.connect(
        aproxy.dsn(dbname="appdb"), autocommit=True).execute(
        "UPDATE orders SET status = 'console' WHERE id = 1").statusmessage)
    (rid,) = pending_ids(aproxy)
    console = aproxy.dsn(user=HUMAN, password=HUMAN_PASSWORD, dbname="pgguard")
    r = run_psql(psql_bin, console, "-c", "SHOW APPROVALS")
    assert r.returncode == 0, r.stderr
    assert str(rid) in r.stdout and "UPDATE orders" in r.stdout
    r = run_psql(psql_bin, console, "-c", f"APPROVE {rid}")
    assert r.returncode == 0, r.stderr
    t.join(15)
    assert box.get("result") == "UPDATE 1", box
    assert status(pg) == "console"
    r = run_psql(psql_bin, console, "-c", "SHOW SESSIONS")
    assert r.returncode == 0 and "alice" in r.stdout
    r = run_psql(psql_bin, console, "-c", "DROP TABLE orders")
    assert r.returncode != 0 and "SHOW HELP" in r.stderr
    # agents may not use the console
    r = run_psql(psql_bin, aproxy.dsn(dbname="pgguard"), "-c", "SHOW APPROVALS")
    assert r.returncode != 0 and "may not use the admin console" in r.stderr


def test_approval_inside_a_transaction(pg, aproxy):
    def agent(decide):
        with psycopg.connect(aproxy.dsn(dbname="appdb")) as conn:       # BEGIN implicit
            conn.execute("INSERT INTO orders VALUES (3, 'tx')")
            try:
                conn.execute("UPDATE orders SET status = 'in-tx' WHERE id = 1")
            except psycopg.errors.InsufficientPrivilege:
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
                conn.rollback()
                return "refused"
            conn.commit()
            return "committed"

    t, box = run_in_thread(lambda: agent("approve"))
    (rid,) = pending_ids(aproxy)
    api(aproxy, "POST", f"/api/approvals/{rid}/approve", {"approver": "alice"})
    t.join(15)
    assert box.get("result") == "committed", box
    assert status(pg) == "in-tx"
    t, box = run_in_thread(lambda: agent("deny"))
    (rid,) = pending_ids(aproxy)
    api(aproxy, "POST", f"/api/approvals/{rid}/deny", {"approver": "alice"})
    t.join(15)
    assert box.get("result") == "refused", box
    # the refused transaction's INSERT was rolled back with it
    assert pg.execute("SELECT count(*) FROM orders WHERE id = 3", dbname="appdb") == [(1,)]


def test_metrics_and_healthz(pg, aproxy):
    with psycopg.connect(aproxy.dsn(dbname="appdb"), autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT 1")
        time.sleep(1.3)          # the fast path's counts are folded in every second
        with urllib.request.urlopen(f"http://127.0.0.1:{aproxy.admin_port}/metrics",
                                    timeout=10) as r:
            text = r.read().decode()
    # every series names this instance ([instance] name, default "<hostname>-<port>")
    from pgguard.config import instance_name, load
    inst = f'instance="{instance_name(load(aproxy.config))}"'
    assert f"pgguard_sessions{{{inst}}} 1" in text
    allowed = [line for line in text.splitlines()
               if line.startswith(f'pgguard_statements_total{{{inst},decision="allowed"}}')]
    assert allowed and float(allowed[0].split()[-1]) >= 3
    assert "pgguard_audit_queue_depth" in text and "pgguard_approvals" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{aproxy.admin_port}/healthz",
                                timeout=10) as r:
        assert r.status == 200
