# A fleet: three real `pgguard serve` processes sharing one control database (its own
# Postgres, restarted mid-run): approvals, revocations, cancels and heartbeats across them.
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, Proxy, run_psql
from pgcluster import PgCluster
import rawpg

CONTROL_ROLE, CONTROL_PASSWORD = "control", "control-pw-81d"
TOKEN_SECRET = "fleet-token-secret-0123456789abcdef0123"
CANCEL_KEY = "fleet-cancel-key-5e2d8c1a9b"
RULES = """
[[rules]]
name = "fleet-orders-need-approval"
when = { kind = "agent", statements = ["update", "delete"], relations = ["public.fleet_orders"] }
action = "approve"
timeout = "30s"
"""


def fleet_extra(name: str, schema: str = "pgguard_control") -> str:
    return f"""
[instance]
name = "{name}"

[control]
schema = "{schema}"
revocation_grace = "3s"
heartbeat_interval = "500ms"
instance_ttl = "3s"

{RULES}
"""


@pytest.fixture(scope="module")
def control_pg():
    c = PgCluster().start()
    c.create_role(CONTROL_ROLE, CONTROL_PASSWORD)
    c.execute(f"CREATE DATABASE control OWNER {CONTROL_ROLE}")
    yield c
    c.stop()


def control_dsn(c: PgCluster) -> str:
    return c.dsn(CONTROL_ROLE, CONTROL_PASSWORD, dbname="control")


def fleet_env(c: PgCluster) -> dict:
    return {"PGGUARD_CONTROL_DSN": control_dsn(c), "PGGUARD_TOKEN_SECRET": TOKEN_SECRET,
            "TEST_CANCEL_KEY": CANCEL_KEY}


@pytest.fixture(scope="module")
def fleet(pg, control_pg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    procs = []
    for i in (1, 2, 3):
        d = tmp / f"i{i}"
        d.mkdir()
        procs.append(Proxy(pg, d, extra=fleet_extra(f"i{i}"), env=fleet_env(control_pg),
                           listen_extra='cancel_key_env = "TEST_CANCEL_KEY"'))
    # started together: the schema migration must not race
    threads = [threading.Thread(target=p.start) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        assert p.proc is not None and p.proc.poll() is None, p.output()
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(autouse=True)
def orders(pg):
    pg.execute("DROP TABLE IF EXISTS fleet_orders CASCADE;"
               "CREATE TABLE fleet_orders (id int PRIMARY KEY, status text);"
               "INSERT INTO fleet_orders SELECT g, 'new' FROM generate_series(1, 10) g",
               dbname="appdb")


def status(pg, oid=1):
    return pg.execute("SELECT status FROM fleet_orders WHERE id = %s", [oid],
                      dbname="appdb")[0][0]


def api(proxy, method, path, body=None):
    return proxy.api(method, path, body)


def pending(proxy, want=1, timeout=10, exclude=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            items = api(proxy, "GET", "/api/approvals?state=pending")
        except urllib.error.URLError:
            time.sleep(0.05)
            continue
        items = items.get("approvals", items) if isinstance(items, dict) else items
        ids = [i["id"] for i in items if i["id"] not in exclude]
        if len(ids) >= want:
            return ids
        time.sleep(0.02)
    raise AssertionError("no pending approval appeared")


def in_thread(fn):
    box = {}

    def target():
        t0 = time.monotonic()
        try:
            box["result"] = fn()
        except Exception as e:      # noqa: BLE001 - handed to the test
            box["error"] = e
        box["done_at"] = time.monotonic()
        box["took"] = box["done_at"] - t0
    t = threading.Thread(target=target)
    t.start()
    return t, box


def agent_update(proxy, sql="UPDATE fleet_orders SET status = 'paid' WHERE id = 1",
                 password=AGENT_PASSWORD):
    def run():
        with psycopg.connect(proxy.dsn(dbname="appdb", password=password),
                             autocommit=True) as conn:
            return conn.execute(sql).statusmessage
    return in_thread(run)


def control_rows(control_pg, sql, params=None):
    return control_pg.execute(sql, params, dbname="control")


# ---------------------------------------------------------------- schema and health

def test_schema_created_once_by_three_instances_starting_together(fleet, control_pg):
    from pgguard.control.schema import latest
    rows = control_rows(control_pg, "SELECT version FROM pgguard_control.schema_version "
                                    "ORDER BY version")
    assert rows == [(v,) for v in range(1, latest() + 1)]
    tables = {r[0] for r in control_rows(
        control_pg, "SELECT tablename FROM pg_tables WHERE schemaname = 'pgguard_control'")}
    assert {"requests", "grants", "revocations", "instances", "schema_version"} <= tables


def cli(proxy, *args, env_extra=None):
    env = dict(proxy.env, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pgguard", *args, "-c", str(proxy.config)],
                          capture_output=True, text=True, timeout=60, env=env)


def with_schema(p, schema):
    """A copy of the proxy's config naming another control schema."""
    alt = p.dir / f"{schema}.toml"
    alt.write_text(p.config.read_text().replace('schema = "pgguard_control"',
                                                f'schema = "{schema}"'))
    return alt


def test_control_init_is_idempotent_and_races_safely(fleet, control_pg):
    # a fresh schema, five concurrent inits: every one succeeds, the version is recorded once
    p = fleet[0]
    alt = with_schema(p, "pgguard_init_race")
    env = dict(p.env)
    procs = [subprocess.Popen([sys.executable, "-m", "pgguard", "control", "init", "-c",
                               str(alt), "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(5)]
    outs = [pr.communicate(timeout=60) for pr in procs]
    assert all(pr.returncode == 0 for pr in procs), outs
    from pgguard.control.schema import latest
    assert all(json.loads(o)["version"] == latest() for o, _ in outs)
    # (each version once: 1, approvals and windows; 2, windows' row bound)
    assert control_rows(control_pg, "SELECT count(*) FROM pgguard_init_race.schema_version"
                        ) == [(latest(),)]
    # and again, on an up-to-date schema
    r = subprocess.run([sys.executable, "-m", "pgguard", "control", "init", "-c", str(alt)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and f"version {latest()}" in r.stdout, r.stderr


def test_control_refuses_a_newer_schema_and_a_missing_dsn(fleet, control_pg):
    p = fleet[0]
    alt = with_schema(p, "pgguard_future")
    control_pg.execute("CREATE SCHEMA IF NOT EXISTS pgguard_future AUTHORIZATION control;"
                       "CREATE TABLE IF NOT EXISTS pgguard_future.schema_version "
                       "(version int PRIMARY KEY, applied_at timestamptz DEFAULT now());"
                       "INSERT INTO pgguard_future.schema_version VALUES (99) "
                       "ON CONFLICT DO NOTHING", dbname="control", user=CONTROL_ROLE)
    r = subprocess.run([sys.executable, "-m", "pgguard", "control", "init", "-c", str(alt)],
                       capture_output=True, text=True, env=dict(p.env), timeout=60)
    assert r.returncode == 1 and "newer than this pgguard" in r.stderr, r.stderr
    env = {k: v for k, v in p.env.items() if k != "PGGUARD_CONTROL_DSN"}
    r = subprocess.run([sys.executable, "-m", "pgguard", "control", "status", "-c",
                        str(p.config)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "control.dsn_env" in r.stderr and "PGGUARD_CONTROL_DSN" \
        in r.stderr, r.stderr


def test_control_status_lists_the_live_instances(fleet, control_pg):
    deadline = time.monotonic() + 10
    while True:
        r = cli(fleet[1], "control", "status", "--json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)["instances"]
        if [x["instance"] for x in rows] == ["i1", "i2", "i3"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [x["instance"] for x in rows] == ["i1", "i2", "i3"], rows
    for x, p in zip(rows, fleet):
        assert x["address"] == f"127.0.0.1:{p.port}"
        assert x["version"] and x["workers"] == 1 and x["age_seconds"] < 3
    r = cli(fleet[1], "control", "status")
    assert r.returncode == 0 and "i1" in r.stdout and "pending_approvals" in r.stdout


def test_heartbeat_counts_sessions_and_held_statements(fleet, control_pg, pg):
    conns = [psycopg.connect(fleet[2].dsn(dbname="appdb"), autocommit=True) for _ in range(3)]
    t, box = agent_update(fleet[2])
    (rid,) = pending(fleet[0])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            row = control_rows(control_pg, "SELECT sessions, pending FROM "
                               "pgguard_control.instances WHERE instance = 'i3'")
            if row and row[0] == (4, 1):
                break
            time.sleep(0.1)
        assert row == [(4, 1)]
    finally:
        api(fleet[0], "POST", f"/api/approvals/{rid}/deny", {"approver": HUMAN})
        t.join(10)
        for c in conns:
            c.close()


def test_metrics_carry_the_instance_label(fleet):
    for p in fleet:
        with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics",
                                    timeout=10) as r:
            text = r.read().decode()
        series = [line for line in text.splitlines() if line and not line.startswith("#")]
        name = f"i{fleet.index(p) + 1}"
        # the gauges read from the control database answer too
        assert f'pgguard_approvals_pending{{instance="{name}"}} 0' in series, text
        assert f'pgguard_control_up{{instance="{name}"}} 1' in series, text
        assert all(f'instance="{name}"' in line for line in series), \
            [line for line in series if f'instance="{name}"' not in line][:3]


# ---------------------------------------------------------------- approvals across instances

def test_held_on_1_approved_on_2_listed_on_3(fleet, pg, psql_bin):
    i1, i2, i3 = fleet
    t, box = agent_update(i1)
    (rid,) = pending(i2)
    time.sleep(0.3)
    assert status(pg) == "new", "the held statement reached Postgres before approval"
    console = i3.dsn(user=HUMAN, password=HUMAN_PASSWORD, dbname="pgguard")
    r = run_psql(psql_bin, console, "-c", "SHOW APPROVALS")
    assert r.returncode == 0, r.stderr
    assert str(rid) in r.stdout and "UPDATE fleet_orders" in r.stdout
    t0 = time.monotonic()
    api(i2, "POST", f"/api/approvals/{rid}/approve", {"approver": HUMAN})
    t.join(10)
    assert box.get("result") == "UPDATE 1", box
    assert box["done_at"] - t0 < 0.5, box["done_at"] - t0   # released promptly on i1
    assert status(pg) == "paid"
    assert api(i3, "GET", f"/api/approvals/{rid}")["state"] == "approved"


def test_decision_releases_within_100ms(fleet, pg):
    # the decision is made on instance 2 while the statement waits on instance 1: the time
    # from the decision's commit to the client's result stays under 100 ms
    i1, i2, _ = fleet
    lags = []
    for n in range(5):
        t, box = agent_update(i1, f"UPDATE fleet_orders SET status = 'r{n}' WHERE id = 2")
        (rid,) = pending(i2)
        t0 = time.monotonic()
        api(i2, "POST", f"/api/approvals/{rid}/approve", {"approver": HUMAN})
        decided = time.monotonic()
        t.join(10)
        assert box.get("result") == "UPDATE 1", box
        lags.append(box["done_at"] - decided)
        assert status(pg, 2) == f"r{n}"
        assert decided - t0 < 1
    assert max(lags) < 0.1, lags


def test_denied_on_3_refused_on_1(fleet, pg):
    i1, _, i3 = fleet
    t, box = agent_update(i1, "DELETE FROM fleet_orders WHERE id = 3")
    (rid,) = pending(i3)
    api(i3, "POST", f"/api/approvals/{rid}/deny",
        {"approver": HUMAN, "reason": "not during the freeze"})
    t.join(10)
    err = box.get("error")
    assert isinstance(err, psycopg.errors.InsufficientPrivilege), box
    assert "not during the freeze" in str(err)
    assert pg.execute("SELECT count(*) FROM fleet_orders WHERE id = 3", dbname="appdb") == [(1,)]


def test_nobody_approves_their_own_on_another_instance(fleet, pg):
    i1, i2, i3 = fleet
    t, box = agent_update(i1)
    (rid,) = pending(i2)
    for p in (i2, i3):
        with pytest.raises(urllib.error.HTTPError) as e:
            api(p, "POST", f"/api/approvals/{rid}/approve", {"approver": AGENT})
        assert e.value.code == 403
    time.sleep(0.2)
    assert status(pg) == "new"
    api(i3, "POST", f"/api/approvals/{rid}/deny", {"approver": HUMAN})
    t.join(10)
    assert isinstance(box.get("error"), psycopg.errors.InsufficientPrivilege)
    assert status(pg) == "new"


def test_two_instances_deciding_at_once_exactly_one_wins(fleet, pg):
    i1, i2, i3 = fleet
    for n in range(5):
        t, box = agent_update(i1, f"UPDATE fleet_orders SET status = 'race{n}' WHERE id = 4")
        (rid,) = pending(i1)
        results = {}

        def decide(p, approve):
            try:
                results[p.port] = api(p, "POST", f"/api/approvals/{rid}/"
                                      f"{'approve' if approve else 'deny'}",
                                      {"approver": HUMAN})["state"]
            except urllib.error.HTTPError as e:
                results[p.port] = e.code
        ts = [threading.Thread(target=decide, args=(i2, True)),
              threading.Thread(target=decide, args=(i3, False))]
        for x in ts:
            x.start()
        for x in ts:
            x.join()
        t.join(10)
        outcomes = sorted(map(str, results.values()))
        assert outcomes in (["409", "approved"], ["409", "denied"]), results
        final = api(i1, "GET", f"/api/approvals/{rid}")["state"]
        if final == "approved":
            assert box.get("result") == "UPDATE 1" and status(pg, 4) == f"race{n}"
        else:
            assert isinstance(box.get("error"), psycopg.errors.InsufficientPrivilege)
            assert status(pg, 4) != f"race{n}"


def test_jit_window_granted_on_2_applies_on_3(fleet, pg):
    i1, i2, i3 = fleet
    sql = "UPDATE fleet_orders SET status = 'jit' WHERE id = 5"
    t, box = agent_update(i1, sql)
    (rid,) = pending(i2)
    api(i2, "POST", f"/api/approvals/{rid}/approve", {"approver": HUMAN, "window": "10m"})
    t.join(10)
    assert box.get("result") == "UPDATE 1", box
    pg.execute("UPDATE fleet_orders SET status = 'new' WHERE id = 5", dbname="appdb")
    # the same statement shape through instance 3 runs without asking
    t, box = agent_update(i3, "UPDATE fleet_orders SET status = 'jit' WHERE id = 5")
    t.join(10)
    assert box.get("result") == "UPDATE 1", box
    assert status(pg, 5) == "jit"
    grants = api(i3, "GET", "/api/grants")
    grants = grants.get("grants", grants) if isinstance(grants, dict) else grants
    (g,) = [g for g in grants if g["request_id"] == rid]
    assert g["max_rows"] == 1       # the approved run's count, for every instance
    api(i1, "POST", f"/api/grants/{g['id']}/revoke", {})
    # revoked on instance 1: instance 2 holds it again
    t, box = agent_update(i2, "UPDATE fleet_orders SET status = 'again' WHERE id = 5")
    (rid2,) = pending(i3, exclude=(rid,))
    api(i3, "POST", f"/api/approvals/{rid2}/deny", {"approver": HUMAN})
    t.join(10)
    assert isinstance(box.get("error"), psycopg.errors.InsufficientPrivilege)
    assert status(pg, 5) == "jit"


def test_client_gone_on_1_withdraws_for_the_fleet(fleet, pg):
    i1, i2, _ = fleet
    c = rawpg.RawClient.connect(i1.port, AGENT, AGENT_PASSWORD, database="appdb")
    c.send(rawpg.query("UPDATE fleet_orders SET status = 'gone' WHERE id = 6"))
    (rid,) = pending(i2)
    c.close()
    deadline = time.monotonic() + 5
    while api(i2, "GET", f"/api/approvals/{rid}")["state"] == "pending":
        assert time.monotonic() < deadline, "the request stayed pending"
        time.sleep(0.05)
    assert api(i2, "GET", f"/api/approvals/{rid}")["state"] == "withdrawn"
    with pytest.raises(urllib.error.HTTPError) as e:
        api(i2, "POST", f"/api/approvals/{rid}/approve", {"approver": HUMAN})
    assert e.value.code == 409
    assert status(pg, 6) == "new"


# ---------------------------------------------------------------- cancel across instances

def _sleep_through(port):
    c = rawpg.RawClient.connect(port, AGENT, AGENT_PASSWORD, database="appdb")
    assert c.key is not None
    c.send(rawpg.query("SELECT pg_sleep(30)"))
    return c


def _send_cancel(port, key):
    import socket
    import struct
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("!IIII", 16, 80877102, *key))
        s.settimeout(5)
        try:
            s.recv(1)
        except OSError:
            pass


def _wait_active(pg, pattern, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE query = %s "
                       "AND state = 'active'", [pattern])[0][0]
        if n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never became active upstream")


@pytest.mark.parametrize("target", [1, 2])
def test_cancel_sent_to_another_instance_stops_pg_sleep(fleet, pg, target):
    i1 = fleet[0]
    c = _sleep_through(i1.port)
    _wait_active(pg, "SELECT pg_sleep(30)")
    t0 = time.monotonic()
    _send_cancel(fleet[target].port, c.key)
    msgs = c.until_ready()
    assert time.monotonic() - t0 < 3
    errs = rawpg.errors(msgs)
    assert errs and errs[0]["C"] == "57014", msgs
    # truth upstream: nothing is sleeping any more; the session still works
    assert pg.execute("SELECT count(*) FROM pg_stat_activity WHERE query = "
                      "'SELECT pg_sleep(30)' AND state = 'active'") == [(0,)]
    assert rawpg.rows(c.run("SELECT 1")) == [[b"1"]]
    c.close()


@pytest.mark.parametrize("tamper", ["secret", "pid", "both", "zero", "swap"])
def test_forged_cancel_keys_stop_nothing(fleet, pg, tamper):
    i1, i2, _ = fleet
    c = _sleep_through(i1.port)
    _wait_active(pg, "SELECT pg_sleep(30)")
    pid, secret = c.key
    forged = {"secret": (pid, secret ^ 1), "pid": (pid + 1, secret),
              "both": (pid ^ 0xFF, secret ^ 0xFFFF), "zero": (0, 0),
              "swap": (secret & 0x7FFFFFFF, pid)}[tamper]
    _send_cancel(i2.port, forged)
    time.sleep(0.5)
    assert pg.execute("SELECT count(*) FROM pg_stat_activity WHERE query = "
                      "'SELECT pg_sleep(30)' AND state = 'active'") == [(1,)]
    _send_cancel(i2.port, c.key)        # the real key still works from anywhere
    assert rawpg.errors(c.until_ready())[0]["C"] == "57014"
    c.close()


def test_cancel_reaches_a_statement_held_on_another_instance(fleet, pg):
    i1, i2, i3 = fleet
    c = rawpg.RawClient.connect(i1.port, AGENT, AGENT_PASSWORD, database="appdb")
    c.send(rawpg.query("UPDATE fleet_orders SET status = 'held' WHERE id = 7"))
    (rid,) = pending(i2)
    _send_cancel(i3.port, c.key)
    msgs = c.until_ready()
    errs = rawpg.errors(msgs)
    assert errs and errs[0]["C"] == "57014", msgs
    assert api(i2, "GET", f"/api/approvals/{rid}")["state"] == "withdrawn"
    assert status(pg, 7) == "new"
    c.close()


def test_instance_with_another_cancel_key_cannot_cancel(fleet, pg, control_pg, tmp_path):
    env = dict(fleet_env(control_pg), TEST_CANCEL_KEY="some-other-key-0123456789")
    other = Proxy(pg, tmp_path, extra=fleet_extra("i4"), env=env,
                  listen_extra='cancel_key_env = "TEST_CANCEL_KEY"').start()
    try:
        c = _sleep_through(fleet[0].port)
        _wait_active(pg, "SELECT pg_sleep(30)")
        _send_cancel(other.port, c.key)
        time.sleep(0.5)
        assert pg.execute("SELECT count(*) FROM pg_stat_activity WHERE query = "
                          "'SELECT pg_sleep(30)' AND state = 'active'") == [(1,)]
        _send_cancel(fleet[1].port, c.key)
        assert rawpg.errors(c.until_ready())[0]["C"] == "57014"
        c.close()
    finally:
        other.stop()


# ---------------------------------------------------------------- revocations across instances

def issue(proxy):
    r = cli(proxy, "token", "issue", "--identity", AGENT, "--ttl", "15m", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_revoked_on_1_ends_live_session_on_3_within_1s(fleet, pg):
    i1, i2, i3 = fleet
    tok, keep = issue(i1), issue(i2)
    victims = [psycopg.connect(i3.dsn(dbname="appdb", password=tok["token"]), autocommit=True),
               psycopg.connect(i2.dsn(dbname="appdb", password=tok["token"]), autocommit=True)]
    other = psycopg.connect(i3.dsn(dbname="appdb", password=keep["token"]), autocommit=True)
    for v in victims:
        assert v.execute("SELECT 1").fetchone() == (1,)
    ended = {}

    def watch(i, conn):
        try:
            conn.execute("SELECT pg_sleep(20)")
        except psycopg.Error as e:
            ended[i] = (time.monotonic(), str(e))
    ts = [threading.Thread(target=watch, args=(i, v)) for i, v in enumerate(victims)]
    for t in ts:
        t.start()
    _wait_active(pg, "SELECT pg_sleep(20)")
    time.sleep(0.2)
    t0 = time.monotonic()
    r = cli(i1, "token", "revoke", tok["token_id"])
    revoked_at = time.monotonic()
    assert r.returncode == 0, r.stderr
    for t in ts:
        t.join(5)
    assert set(ended) == {0, 1}, ended
    for at, msg in ended.values():
        assert at - revoked_at < 1.0, (at - revoked_at, at - t0)
        assert "revoked" in msg
    # new logins with the revoked token fail on every instance; the other token still works
    for p in fleet:
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(p.dsn(dbname="appdb", password=tok["token"]))
        assert "password authentication failed" in str(e.value)
    assert other.execute("SELECT 2").fetchone() == (2,)
    other.close()


def test_revocation_is_recorded_once_in_the_control_database(fleet, control_pg):
    tok = issue(fleet[0])
    for p in fleet:             # revoked through every instance's config: one row
        r = cli(p, "token", "revoke", tok["token"])
        assert r.returncode == 0, r.stderr
    assert control_rows(control_pg, "SELECT count(*) FROM pgguard_control.revocations "
                        "WHERE jti = %s", [tok["token_id"]]) == [(1,)]
    for p in fleet:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(p.dsn(dbname="appdb", password=tok["token"]))


def test_revoke_fails_loudly_when_the_control_database_is_unreachable(fleet, tmp_path):
    tok = issue(fleet[0])
    r = cli(fleet[0], "token", "revoke", tok["token_id"], env_extra={
        "PGGUARD_CONTROL_DSN": "postgresql://control@127.0.0.1:1/control?connect_timeout=2"})
    assert r.returncode == 1 and "control database unreachable" in r.stderr, r.stderr


# ---------------------------------------------------------------- the control database away

def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(what)


def test_control_database_restart_mid_run(fleet, pg, control_pg):
    """Held statements are refused with a clear error when the control database goes
    away; statements that need no approval keep flowing; token logins keep working for
    the grace period and are refused after it; once it is back everything resumes."""
    i1, i2, i3 = fleet
    tok = issue(i1)
    held = [agent_update(p, f"UPDATE fleet_orders SET status = 'lost' WHERE id = {8 + k}")
            for k, p in enumerate((i1, i2))]
    pending(i3, want=2)
    control_pg.stop(mode="immediate", cleanup=False)
    down_at = time.monotonic()
    try:
        for t, box in held:
            t.join(10)
            err = box.get("error")
            assert isinstance(err, psycopg.errors.InsufficientPrivilege), box
            assert "control database is unreachable" in str(err), str(err)
            assert err.diag.message_hint and "control database" in err.diag.message_hint
            assert box["done_at"] - down_at < 3
        assert status(pg, 8) == "new" and status(pg, 9) == "new"
        # new statements needing approval: refused at once, same cause
        for p in fleet:
            t, box = agent_update(p, "UPDATE fleet_orders SET status = 'x' WHERE id = 10")
            t.join(15)
            assert isinstance(box.get("error"), psycopg.errors.InsufficientPrivilege), box
            assert "control database is unreachable" in str(box["error"])
        assert status(pg, 10) == "new"
        # /healthz stays 200 (the instance still relays; a balancer keeps it) and says why
        for p in fleet:
            with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/healthz",
                                        timeout=10) as r:
                h = json.loads(r.read())
            assert r.status == 200 and h["status"] == "degraded" \
                and h["control"] == "unreachable", h
        # the hot path does not need it
        for p in fleet:
            with psycopg.connect(p.dsn(dbname="appdb"), autocommit=True) as conn:
                assert conn.execute("SELECT count(*) FROM fleet_orders").fetchone() == (10,)
                conn.execute("INSERT INTO fleet_orders VALUES (100, 'free')")
            pg.execute("DELETE FROM fleet_orders WHERE id = 100", dbname="appdb")
        # within the grace (3s here) a token login still works, after it it is refused
        if time.monotonic() - down_at < 2.0:
            with psycopg.connect(i2.dsn(dbname="appdb", password=tok["token"])) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        _wait(lambda: time.monotonic() - down_at > 3.5, 10, "")
        for p in fleet:
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(p.dsn(dbname="appdb", password=tok["token"]))
        # static passwords do not depend on the revocation list
        with psycopg.connect(i3.dsn(dbname="appdb"), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert "control database unreachable" in i1.output()
    finally:
        control_pg.start()
    # back: new held statements work, tokens work, the refused requests were withdrawn

    def resumed():
        try:
            with psycopg.connect(i1.dsn(dbname="appdb", password=tok["token"])):
                return True
        except psycopg.OperationalError:
            return False
    _wait(resumed, 15, "token logins did not resume")
    for p, approver_on in ((i1, i2), (i2, i3), (i3, i1)):
        t, box = agent_update(p, "UPDATE fleet_orders SET status = 'back' WHERE id = 10")
        (rid,) = pending(approver_on)
        api(approver_on, "POST", f"/api/approvals/{rid}/approve", {"approver": HUMAN})
        t.join(10)
        assert box.get("result") == "UPDATE 1", box
    assert status(pg, 10) == "back"
    with urllib.request.urlopen(f"http://127.0.0.1:{i2.admin_port}/healthz", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    _wait(lambda: control_rows(
        control_pg, "SELECT count(*) FROM pgguard_control.requests WHERE state = 'pending'"
    ) == [(0,)], 10, "requests refused during the outage stayed pending")


# ---------------------------------------------------------------- other clients, throttling

def test_asyncpg_held_on_3_approved_from_psql_console_on_1(fleet, pg, psql_bin):
    import asyncio

    import asyncpg
    i1, _, i3 = fleet

    async def agent():
        conn = await asyncpg.connect(i3.dsn(dbname="appdb"))
        try:
            return await conn.execute(
                "UPDATE fleet_orders SET status = $1 WHERE id = $2", "async", 1)
        finally:
            await conn.close()
    t, box = in_thread(lambda: asyncio.run(agent()))
    (rid,) = pending(i1)
    console = i1.dsn(user=HUMAN, password=HUMAN_PASSWORD, dbname="pgguard")
    r = run_psql(psql_bin, console, "-c", f"APPROVE {rid}")
    assert r.returncode == 0, r.stderr
    t.join(10)
    assert box.get("result") == "UPDATE 1", box
    assert status(pg, 1) == "async"


def _bad_login(port, source):
    import socket
    s = socket.create_connection(("127.0.0.1", port), timeout=30,
                                 source_address=(source, 0))
    c = rawpg.RawClient(s)
    t0 = time.monotonic()
    with pytest.raises(rawpg.LoginError) as e:
        c.login(AGENT, "wrong-password", {"user": AGENT, "database": "appdb"})
    c.close()
    assert e.value.fields.get("C") == "28P01", e.value.fields
    return time.monotonic() - t0


def test_login_throttle_is_this_instances_share_of_the_limit(fleet):
    # three live instances, [auth] throttle_after = 5, throttle_delay = 1s: each instance
    # delays from ceil(5/3) = 2 failures of a source on, by 3 x 1s
    i1, i2, _ = fleet
    took = [_bad_login(i2.port, "127.0.0.2") for _ in range(3)]
    assert took[0] < 1.5 and took[1] < 1.5, took
    assert took[2] >= 2.5, took
    # another source is not affected; the same source on another instance counts alone
    assert _bad_login(i2.port, "127.0.0.3") < 1.5
    assert _bad_login(i1.port, "127.0.0.2") < 1.5


def test_instance_with_two_workers_joins_the_fleet(fleet, pg, control_pg, tmp_path):
    # the schema is migrated by the parent before it forks; every worker has its own
    # link, listener and heartbeat row
    five = Proxy(pg, tmp_path, extra=fleet_extra("i5"), env=fleet_env(control_pg),
                 listen_extra='cancel_key_env = "TEST_CANCEL_KEY"', workers=2).start()
    try:
        _wait(lambda: any(x["instance"] == "i5" and x["workers"] == 2 for x in json.loads(
            cli(five, "control", "status", "--json").stdout)["instances"]), 15,
            "i5 did not report two workers")
        # held on whichever worker each connection lands on, approved from i1
        for n in range(4):
            t, box = agent_update(five, f"UPDATE fleet_orders SET status = 'w{n}' WHERE id = 1")
            (rid,) = pending(fleet[0])
            api(fleet[0], "POST", f"/api/approvals/{rid}/approve", {"approver": HUMAN})
            t.join(10)
            assert box.get("result") == "UPDATE 1", box
            assert status(pg) == f"w{n}"
    finally:
        five.stop()
    # a clean stop removes its heartbeat rows
    assert control_rows(control_pg, "SELECT count(*) FROM pgguard_control.instances "
                        "WHERE instance = 'i5'") == [(0,)]


@pytest.mark.parametrize("dsn, words", [
    ("postgresql://control@127.0.0.1:1/control?connect_timeout=2",
     "control database unreachable"),
    ("postgresql://nobody:wrong@127.0.0.1:{port}/control", "control database unreachable"),
    ("postgresql://control:control-pw-81d@127.0.0.1:{port}/no_such_db",
     "control database unreachable"),
])
def test_instance_refuses_to_start_without_its_control_database(pg, control_pg, tmp_path,
                                                                 dsn, words):
    env = dict(fleet_env(control_pg), PGGUARD_CONTROL_DSN=dsn.format(port=control_pg.port))
    p = Proxy(pg, tmp_path, extra=fleet_extra("i9"), env=env)
    with pytest.raises(RuntimeError) as e:
        p.start()
    assert "pgguard exited with 1" in str(e.value) and words in p.output(), p.output()


def test_instance_refuses_to_start_without_the_dsn_variable(pg, control_pg, tmp_path):
    env = {k: v for k, v in fleet_env(control_pg).items() if k != "PGGUARD_CONTROL_DSN"}
    p = Proxy(pg, tmp_path, extra=fleet_extra("i9"), env=env)
    p.env.pop("PGGUARD_CONTROL_DSN", None)
    with pytest.raises(RuntimeError):
        p.start()
    assert "control.dsn_env" in p.output() and "PGGUARD_CONTROL_DSN" in p.output()


def test_the_hot_path_never_touches_the_control_database(fleet, control_pg):
    # transactions on the control database over equal windows: idle, then 1000 statements
    # (allowed, cached) through instance 1; heartbeats and probes are the same in both
    def xacts():
        time.sleep(1.2)         # backends flush their counters at most once a second
        return control_pg.execute("SELECT xact_commit + xact_rollback FROM "
                                  "pg_stat_database WHERE datname = 'control'")[0][0]

    window = 4.0
    a = xacts()
    time.sleep(window)
    idle = xacts() - a
    b = xacts()
    t0 = time.monotonic()
    with psycopg.connect(fleet[0].dsn(dbname="appdb"), autocommit=True) as conn:
        for n in range(1000):
            conn.execute("SELECT status FROM fleet_orders WHERE id = 1" if n % 2
                         else "SELECT 1")
    took = time.monotonic() - t0
    assert took < window, f"1000 statements took {took:.1f}s: the windows would differ"
    time.sleep(window - took)
    busy = xacts() - b
    assert idle > 0, "the counters did not move: heartbeats should show"
    assert idle > 0, "the counters did not move: heartbeats should show"
    assert busy - idle < 100, (idle, busy)
