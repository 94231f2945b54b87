# Memory stays bounded while a client floods: bytes sent while a statement of it waits
# for an approval are not buffered past a budget, and caches keyed by statement text
# are bounded by bytes.
import json
import time
import urllib.request

import psycopg
import pytest
from conftest import ADMIN_TOKEN, AGENT, AGENT_PASSWORD
from exactlib import rss_kb
from guarded import guarded_proxy
from rawpg import RawClient, query

RULES = """
[[rules]]
name = "orders-need-approval"
when = { kind = "agent", statements = ["update"], relations = ["public.mem_orders"] }
action = "approve"
timeout = "60s"
"""




def _deny_all(proxy):
    req = urllib.request.Request(f"http://127.0.0.1:{proxy.admin_port}/api/approvals?state=pending",
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        items = json.loads(r.read())
    items = items.get("approvals", items) if isinstance(items, dict) else items
    for it in items:
        body = json.dumps({"approver": "alice", "reason": "test"}).encode()
        r = urllib.request.Request(
            f"http://127.0.0.1:{proxy.admin_port}/api/approvals/{it['id']}/deny",
            method="POST", data=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                               "Content-Type": "application/json"})
        urllib.request.urlopen(r, timeout=10).read()
    return len(items)


@pytest.fixture
def mem_orders(pg):
    pg.execute("DROP TABLE IF EXISTS mem_orders; CREATE TABLE mem_orders (id int, s text);"
               "INSERT INTO mem_orders VALUES (1, 'new')", dbname="appdb")


@pytest.mark.parametrize("payload", ["queries", "copydata", "binds"])
def test_flood_while_held_for_approval_is_not_buffered(pg, make_proxy, mem_orders, payload):
    proxy = make_proxy(extra=RULES)
    pid = proxy.proc.pid
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database="appdb")
    c.send(query("UPDATE mem_orders SET s = 'x' WHERE id = 1"))
    # wait for the NOTICE that it is held
    t, _ = c.read()
    assert t == b"N"
    base = rss_kb(pid)
    unit = {"queries": query("SELECT '" + "q" * 8000 + "'") * 8,
            "copydata": b"d\x00\x04\x00\x04" + b"x" * (256 << 10),
            "binds": b"H\x00\x00\x00\x04"}[payload] * 2048
    if payload == "copydata":
        unit = unit[:(256 << 10) + 5] * 8
    c.sock.settimeout(0.2)
    sent = 0
    # a well-formed stream: a partial send goes on where it stopped (restarting the unit
    # would send a malformed frame, and pgguard stops reading at one for another reason)
    view, off = memoryview(unit), 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4:
        try:
            n = c.sock.send(view[off:])
        except (TimeoutError, BlockingIOError):
            continue
        sent += n
        off = (off + n) % len(unit)
    grown = rss_kb(pid) - base
    print("sent", sent, "grown", grown)
    assert grown < 24 * 1024, f"RSS grew {grown} KiB after {sent} bytes"
    assert sent < 48 << 20, sent
    # the session is still exact: once decided, the statement is refused and the rest
    # of the stream goes on
    assert _deny_all(proxy) == 1
    assert pg.execute("SELECT s FROM mem_orders", dbname="appdb") == [("new",)]
    c.sock.close()


def test_decision_cache_is_bounded_by_bytes(pg, tmp_path):
    with guarded_proxy(pg, tmp_path) as proxy:
        _flood_decisions(proxy)


def _flood_decisions(proxy):
    pid = proxy.proc.pid
    pad = "y" * (60 << 10)          # under DECISION_TEXT_MAX: each one is cacheable
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        base = rss_kb(pid)
        for i in range(600):
            # 600 distinct 60 KiB statements (36 MB of text): a cache bounded by count
            # only (10,000 entries) would keep every one
            # (the alias makes each its own shape: the shape cache does not answer it)
            big = f"SELECT {i} AS n{i}, '{pad}' AS pad"
            assert conn.execute(big).fetchone()[0] == i
    time.sleep(0.5)
    grown = rss_kb(pid) - base
    print("grown", grown)
    assert grown < 48 * 1024, f"RSS grew {grown} KiB"


def test_tracking_caches_bounded_by_bytes():
    from pgguard.proxy import tracking
    tracking._NORMALIZED.clear()
    tracking._FINGERPRINTS.clear()
    for i in range(3000):
        sql = f"SELECT {i} FROM t{i} WHERE {'c' * 6000} = 1".encode()
        tracking.fingerprint(tracking.fast_normalize(sql))
    size = sum(len(k) for k in tracking._NORMALIZED) + \
        sum(len(k) for k in tracking._FINGERPRINTS)
    assert size <= 2 * tracking.CACHE_BYTES
    for i in range(20):
        tracking.fast_normalize(f"SELECT {i} FROM big{'z' * 20000}".encode())
    assert all(len(k) <= tracking.CACHE_TEXT_MAX for k in tracking._NORMALIZED)


def test_server_decision_maps_bounded():
    from pgguard.proxy import server
    d: dict = {}
    for i in range(2000):
        server._bounded_put(d, b"x" * 60000 + str(i).encode(), i, 60000)
    assert sum(len(k) for k in d) <= server.DECISION_BYTES
    assert len(d) >= 1
