# The audit log written by a real proxy: DuckDB sees exactly what ran, with decisions,
# rows and errors; strict durability survives kill -9 under load; no literals leak.
import os
import signal
import subprocess
import sys

import duckdb
import psycopg
import pytest

from conftest import AGENT_PASSWORD

RULES = """
[[rules]]
name = "no-destructive"
when = { flags = ["destructive", "privilege"] }
action = "block"
"""


def audit_rows(proxy, sql):
    con = duckdb.connect()
    files = f"{proxy.audit_dir}/**/*.parquet"
    con.execute(f"CREATE VIEW audit AS SELECT * FROM read_parquet('{files}', "
                "hive_partitioning = true, union_by_name = true)")
    return con.execute(sql).fetchall()


@pytest.fixture
def table(pg):
    pg.execute("DROP TABLE IF EXISTS aud; CREATE TABLE aud (id int, secret text);"
               "INSERT INTO aud SELECT g, 'hunter' || g FROM generate_series(1, 5) g",
               dbname="appdb")


def test_duckdb_sees_exactly_what_ran(pg, make_proxy, table):
    proxy = make_proxy(extra=RULES)
    with psycopg.connect(proxy.dsn(dbname="appdb", application_name="auditprobe"),
                         autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("SELECT * FROM aud WHERE secret = 'hunter2'")              # simple
        conn.execute("SELECT id FROM aud WHERE id <= %s", [3], prepare=True)    # extended
        conn.execute("SELECT id FROM aud WHERE id <= %s", [4], prepare=True)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM aud")                                     # refused
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")                                          # error
        conn.execute("UPDATE aud SET secret = 'x' WHERE id = %s", [1])
    assert proxy.stop() == 0
    rows = audit_rows(proxy, """
        SELECT event, statement, decision, rule, rows, sqlstate, statement_kind,
               application_name, identity, identity_kind
        FROM audit ORDER BY event_id""")
    events = [r[0] for r in rows]
    assert events[0] == "connect" and events[-1] == "disconnect"
    stmts = [r for r in rows if r[0] == "statement"]
    got = [(r[1], r[2], r[4], r[5]) for r in stmts]
    assert got == [
        ("SELECT * FROM aud WHERE secret = $1", "allowed", 1, None),
        ("SELECT id FROM aud WHERE id <= $1", "allowed", 3, None),
        ("SELECT id FROM aud WHERE id <= $1", "allowed", 4, None),
        ("DELETE FROM aud", "blocked", None, "42501"),
        ("SELECT $1/$2", "error", 0, "22012"),
        ("UPDATE aud SET secret = $2 WHERE id = $1", "allowed", 1, None),  # $1 was a parameter
    ]
    assert {r[3] for r in stmts if r[2] == "blocked"} == {"no-destructive"}
    assert all(r[7] == "auditprobe" and r[8] == "ci-agent" and r[9] == "agent" for r in stmts)


@pytest.mark.parametrize("rules", ["", RULES], ids=["no-policy", "policy"])
def test_pipeline_records_through_the_compiled_path(pg, make_proxy, table, rules):
    # Bind/Execute/Sync (and, without a policy, every Parse) are forwarded and logged by
    # the compiled client pipe; an error mid-pipeline marks the rest as not executed,
    # and a refused Parse (policy) makes the proxy drop what follows until Sync
    proxy = make_proxy(extra=rules)
    with psycopg.connect(proxy.dsn(dbname="appdb"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("SELECT id FROM aud WHERE id <= %s", [2])
                conn.execute("SELECT %s::int / 0", [1])
                conn.execute("SELECT id FROM aud WHERE id <= %s", [5])
        for n in (1, 3):
            assert len(conn.execute("SELECT id FROM aud WHERE id <= %s", [n]).fetchall()) == n
        if rules:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.pipeline():
                    conn.execute("SELECT id FROM aud WHERE id <= %s", [4])
                    conn.execute("DELETE FROM aud")
                    conn.execute("SELECT id FROM aud WHERE id <= %s", [5])
            assert conn.execute("SELECT count(*) FROM aud").fetchone() == (5,)
    assert proxy.stop() == 0
    got = audit_rows(proxy, """
        SELECT statement, decision, rows, sqlstate, error FROM audit
        WHERE event = 'statement' ORDER BY event_id""")
    sel = "SELECT id FROM aud WHERE id <= $1"
    want = [
        (sel, "allowed", 2, None, None),
        ("SELECT $1::int / $2", "error", 0, "22012", "division by zero"),
        (sel, "allowed", 0, None, "not executed: an earlier message of the pipeline failed"),
        (sel, "allowed", 1, None, None),
        (sel, "allowed", 3, None, None),
    ]
    assert got[:5] == want
    # the refusal is logged when it is decided, before the SELECT ahead of it completes
    rest = sorted(got[5:], key=lambda r: r[0])
    if rules:
        assert rest[0][:4] == ("DELETE FROM aud", "blocked", None, "42501")
        assert "no-destructive" in rest[0][4]
        assert rest[1:] == [("SELECT count(*) FROM aud", "allowed", 1, None, None),
                            (sel, "allowed", 4, None, None)]
    else:
        assert rest == []


def test_auth_failures_are_audited_without_the_password(pg, make_proxy):
    proxy = make_proxy()
    proxy.stop()
    proxy.config.write_text(proxy.config.read_text().replace(
        "[upstream]", '[upstream]\ndatabases = ["appdb", "postgres"]', 1))
    proxy.start()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(password="guess-Xy12"))
    # (round 22, helper 118: the SQLSTATE the client got was not in the record, and a
    # database the identity may not use left no record at all)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(dbname="template1"))
    proxy.stop()
    rows = audit_rows(proxy, "SELECT event, identity, sqlstate FROM audit "
                             "WHERE event = 'auth_failed' ORDER BY event_id")
    assert rows == [("auth_failed", "ci-agent", "28P01"),
                    ("auth_failed", "ci-agent", "28000")], rows
    blob = b"".join(p.read_bytes() for p in proxy.audit_dir.rglob("*") if p.is_file())
    assert b"guess-Xy12" not in blob and AGENT_PASSWORD.encode() not in blob


def test_literals_and_passwords_never_reach_the_log(pg, make_proxy, table):
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn(dbname="appdb"), autocommit=True) as conn:
        psycopg.ClientCursor(conn).execute("SELECT * FROM aud WHERE secret = 'hunter3'")
        conn.execute("SELECT * FROM aud WHERE secret = %s", ["hunter4"])
        cur = psycopg.ClientCursor(conn)
        cur.execute("DROP ROLE IF EXISTS aud_pw_probe")
        cur.execute("CREATE ROLE aud_pw_probe PASSWORD 'NewSecret99'")
        cur.execute("ALTER ROLE aud_pw_probe PASSWORD 'NewSecret98'")
        cur.execute("DROP ROLE aud_pw_probe")
    proxy.stop()
    blob = b"".join(p.read_bytes() for p in proxy.audit_dir.rglob("*") if p.is_file())
    for secret in (b"hunter3", b"hunter4", b"NewSecret99", b"NewSecret98"):
        assert secret not in blob


def test_audit_cli_over_proxy_files(pg, make_proxy, table):
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn(dbname="appdb"), autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM aud")
    proxy.stop()
    r = subprocess.run([sys.executable, "-m", "pgguard", "audit", "sql", "-c",
                        str(proxy.config), "--json",
                        "SELECT statement, rows FROM audit WHERE event = 'statement'"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "SELECT count(*) FROM aud" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pgguard", "audit", "verify", "-c",
                        str(proxy.config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_strict_kill_9_under_pgbench_loses_no_committed_transaction(pg, make_proxy,
                                                                    pgbench_bin, tmp_path):
    if not pg.execute("SELECT 1 FROM pg_database WHERE datname = 'strictdb'"):
        pg.execute("CREATE DATABASE strictdb OWNER app")
    pg.execute("CREATE TABLE IF NOT EXISTS marks (n int PRIMARY KEY)", dbname="strictdb")
    pg.execute("TRUNCATE marks", dbname="strictdb")
    proxy = make_proxy(audit_extra='durability = "strict"\ncapture_literals = true\n')
    script = tmp_path / "mark.sql"
    # each transaction inserts a unique number; committed ones are in the table
    script.write_text("\\set n random(1, 2000000000)\n"
                      "INSERT INTO marks VALUES (:n) ON CONFLICT DO NOTHING;\n")
    env = dict(os.environ, PGPASSWORD=AGENT_PASSWORD)
    bench = subprocess.Popen(
        [pgbench_bin, "-n", "-c", "4", "-j", "2", "-T", "30", "-f", str(script),
         "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "ci-agent", "strictdb"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    import time
    time.sleep(3)
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait()
    bench.wait(60)
    committed = {r[0] for r in pg.execute("SELECT n FROM marks", dbname="strictdb")}
    assert len(committed) > 50
    # restart: leftover WAL becomes Parquet
    proxy.start()
    proxy.stop()
    logged = audit_rows(proxy, "SELECT statement FROM audit WHERE event = 'statement' "
                               "AND statement LIKE 'INSERT INTO marks%'")
    logged_n = {int(s[0].split("VALUES (")[1].split(")")[0]) for s in logged}
    missing = committed - logged_n
    assert not missing, f"{len(missing)} committed transactions missing from the audit log"
