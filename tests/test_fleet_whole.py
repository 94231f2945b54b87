# The whole fleet at once: three `pgguard serve` instances sharing one control database
# and one object store. A statement held on one instance is approved on another and
# runs; traffic on all three lands in the bucket as one audit trail that verifies and
# counts every statement exactly once, with the approval recorded where it happened.
import threading
import time

import psycopg

from conftest import Proxy
from test_audit_store import PREFIX, bucket, cli, moto, s3, setup_table, sql  # noqa: F401
from test_fleet_control import (control_pg, fleet_env, fleet_extra, pending,  # noqa: F401
                                RULES)


def _agent_inserts(proxy, table, tag, n):
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        for _ in range(n):
            c.execute(f"INSERT INTO {table} (tag) VALUES ('{tag}')")
    return n


def test_three_instances_control_and_store_together(pg, control_pg, moto, bucket, s3,  # noqa: F811
                                                    tmp_path):
    table = "whole_fleet"
    setup_table(pg, table)
    pg.execute("DROP TABLE IF EXISTS fleet_orders CASCADE;"
               "CREATE TABLE fleet_orders (id int PRIMARY KEY, status text);"
               "INSERT INTO fleet_orders VALUES (1, 'new')", dbname="appdb")
    env = {**fleet_env(control_pg), **moto.env()}
    procs = []
    for i in (1, 2, 3):
        d = tmp_path / f"w{i}"
        d.mkdir()
        procs.append(Proxy(pg, d, extra=fleet_extra(f"whole-{i}"), env=env,
                           listen_extra='cancel_key_env = "TEST_CANCEL_KEY"',
                           audit_extra=f'store = "s3://{bucket}/{PREFIX}"\n'
                                       'seal_interval = "0.3s"\ndurability = "strict"\n'))
    threads = [threading.Thread(target=p.start) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    acked = {}
    try:
        box = {}

        def held_update():
            with psycopg.connect(procs[0].dsn(dbname="appdb"), autocommit=True) as c:
                box["tag"] = c.execute(
                    "UPDATE fleet_orders SET status = 'approved' WHERE id = 1").statusmessage
        t = threading.Thread(target=held_update)
        t.start()
        (rid,) = pending(procs[1])
        assert procs[1].api("POST", f"/api/approvals/{rid}/approve",
                            {"approver": "alice"})
        t.join(15)
        assert box.get("tag") == "UPDATE 1", box
        assert pg.execute("SELECT status FROM fleet_orders", dbname="appdb") == [("approved",)]
        for i, p in enumerate(procs, 1):
            acked[f"whole-{i}"] = _agent_inserts(p, table, f"whole-{i}", 20 + 5 * i)
    finally:
        for p in procs:
            p.stop()
    time.sleep(0.5)
    r = cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in acked:
        assert f"chain {name}/w0:" in r.stdout
    by = sql(moto, bucket, "SELECT instance, count(*) AS n, count(DISTINCT event_id) AS d "
                           f"FROM audit WHERE event = 'statement' AND statement LIKE "
                           f"'INSERT INTO {table} %' GROUP BY ALL ORDER BY 1")
    assert [(x["instance"], x["n"], x["d"]) for x in by] == \
        [(n, acked[n], acked[n]) for n in sorted(acked)]
    assert pg.execute(f"SELECT count(*) FROM {table}")[0][0] == sum(acked.values())
    approved = sql(moto, bucket, "SELECT instance, decision, approver FROM audit WHERE "
                                 "event = 'statement' AND statement LIKE 'UPDATE fleet_orders%'")
    assert [(x["instance"], x["decision"], x["approver"]) for x in approved] == \
        [("whole-1", "approved", "alice")], approved
