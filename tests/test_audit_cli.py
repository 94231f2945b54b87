# `pgguard audit`: sql, tail (-f), sessions, replay, verify, report; config resolution;
# every failure exits non-zero with one line on stderr.
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pgguard.audit import AuditLog, AuditRecord
from pgguard.audit.cli import main
from pgguard.config import AuditConfig

UTC = timezone.utc


def events(now: datetime) -> list[AuditRecord]:
    t = lambda s: now - timedelta(seconds=s)  # noqa: E731
    a = dict(session_id="sess-aaaa-1", identity="ci-agent", identity_kind="agent",
             client_addr="10.0.0.5:4000", application_name="psql", database="app")
    h = dict(session_id="sess-bbbb-2", identity="alice", identity_kind="human",
             client_addr="10.0.0.9:4001", application_name="psql", database="app")
    return [
        AuditRecord(ts=t(60), event="connect", **a),
        AuditRecord(ts=t(59), event="statement", statement="SELECT * FROM customers",
                    relations=["public.customers"], decision="allowed", rows=12,
                    masked_cells=12, duration_us=900, **a),
        AuditRecord(ts=t(58), event="statement", statement="DROP TABLE orders",
                    decision="blocked", rule="no-destructive", flags=["destructive"],
                    sqlstate="42501", **a),
        AuditRecord(ts=t(57), event="statement", statement="DELETE FROM orders WHERE id = 7",
                    decision="approved", rule="agent-writes-need-approval", approver="alice",
                    rows=1, duration_us=5_000_000, **a),
        AuditRecord(ts=t(56), event="disconnect", **a),
        AuditRecord(ts=t(50), event="auth_failed", session_id="sess-cccc-3",
                    identity="mallory", client_addr="10.6.6.6:1"),
        AuditRecord(ts=t(40), event="connect", **h),
        AuditRecord(ts=t(39), event="statement", statement="SELECT count(*) FROM orders",
                    decision="allowed", rows=1, duration_us=300, **h),
    ]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "audit"
    with AuditLog(AuditConfig(dir=str(d), flush_interval="5ms")) as log:
        for r in events(datetime.now(UTC)):
            log.log(r)
    return d


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_sql_table_and_json(root):
    code, out = run("--dir", str(root), "sql",
                    "SELECT identity, count(*) AS n FROM audit GROUP BY ALL ORDER BY 1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split("|")[0].strip() == "identity"
    assert any(line.startswith("alice") for line in lines) and lines[-1] == "(3 rows)"
    code, out = run("sql", "--dir", str(root), "--json",
                    "SELECT event, ts, relations FROM audit ORDER BY ts LIMIT 2")
    doc = json.loads(out)
    assert code == 0 and [d["event"] for d in doc] == ["connect", "statement"]
    assert doc[1]["relations"] == ["public.customers"] and doc[0]["ts"].endswith("Z")


def test_sql_sees_records_still_in_the_wal(tmp_path):
    d = tmp_path / "audit"
    log = AuditLog(AuditConfig(dir=str(d), flush_interval="5ms"), roll_seconds=3600)
    log.start()
    for r in events(datetime.now(UTC)):
        log.log(r)
    log.flush()
    assert not list(d.rglob("*.parquet"))
    code, out = run("--dir", str(d), "sql", "--json", "SELECT count(*) AS n FROM audit")
    assert json.loads(out) == [{"n": 8}]
    code, out = run("--dir", str(d), "sql", "--json", "--no-wal",
                    "SELECT count(*) AS n FROM audit")
    assert json.loads(out) == [{"n": 0}]
    log.close()


def test_config_resolution(root, tmp_path, monkeypatch):
    cfgdir = tmp_path / "etc"
    cfgdir.mkdir()
    (cfgdir / "pgguard.toml").write_text(f'[audit]\ndir = "{root}"\n')
    code, out = run("-c", str(cfgdir / "pgguard.toml"), "sql", "--json",
                    "SELECT count(*) AS n FROM audit")
    assert code == 0 and json.loads(out) == [{"n": 8}]
    # a relative [audit] dir resolves against the config file's directory
    (root.parent / "rel.toml").write_text(f'[audit]\ndir = "{root.name}"\n')
    monkeypatch.chdir(tmp_path)
    code, out = run("sql", "-c", str(root.parent / "rel.toml"), "--json",
                    "SELECT count(*) AS n FROM audit")
    assert code == 0 and json.loads(out) == [{"n": 8}]


def test_tail(root):
    code, out = run("--dir", str(root), "tail", "-n", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert "alice(human)" in lines[-1] and "SELECT count(*) FROM orders" in lines[-1]
    assert "auth_failed" in lines[0]


def test_tail_follow(tmp_path):
    d = tmp_path / "audit"
    log = AuditLog(AuditConfig(dir=str(d), flush_interval="5ms"), roll_seconds=0.3)
    log.start()
    log.log(AuditRecord(session_id="s0", event="connect", identity="first"))
    log.flush()
    proc = subprocess.Popen([sys.executable, "-m", "pgguard", "audit", "tail", "--dir", str(d),
                             "-n", "5", "-f", "--interval", "0.05", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: list[dict] = []

    def reader():
        assert proc.stdout is not None
        for line in proc.stdout:
            got.append(json.loads(line))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:     # tail is up and following
            time.sleep(0.02)
        assert got and got[0]["identity"] == "first"
        for i in range(30):
            log.log(AuditRecord(session_id="s1", event="statement", identity="agent",
                                statement=f"SELECT {i}", rows=i))
            if i % 10 == 9:
                log.flush()
                time.sleep(0.4)     # some seal into Parquet while tail follows the WAL
        log.close()
        deadline = time.monotonic() + 10
        while len(got) < 31 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(5)
    ids = [g["event_id"] for g in got]
    assert len(ids) == len(set(ids)) == 31, proc.stderr.read() if proc.stderr else ""
    assert [g["rows"] for g in got[1:]] == list(range(30))


def test_sessions(root):
    code, out = run("--dir", str(root), "sessions", "--json")
    rows = {r["session_id"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {"sess-aaaa-1", "sess-bbbb-2", "sess-cccc-3"}
    a = rows["sess-aaaa-1"]
    assert a["identity"] == "ci-agent" and a["statements"] == 3 and a["refused"] == 1
    assert a["approved"] == 1 and a["ended"] is not None and a["masked_cells"] == 12
    assert a["login"] is None
    # a login that failed is a session that ended there, and says so
    c = rows["sess-cccc-3"]
    assert c["login"] == "auth_failed" and c["ended"] == c["started"], c
    code, out = run("--dir", str(root), "sessions", "--identity", "alice")
    assert code == 0 and "sess-bbbb-2" in out and "sess-aaaa-1" not in out


def test_replay(root):
    code, out = run("--dir", str(root), "replay", "sess-aaaa")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("session sess-aaaa-1: identity ci-agent, 5 events")
    body = "\n".join(lines)
    assert "no-destructive" in body and "+3.000s" in body and "alice" in body
    order = [line.split("|")[2].strip() for line in lines[4:-1]]
    assert order == ["connect", "statement", "statement", "statement", "disconnect"]
    code, out = run("--dir", str(root), "replay", "sess-aaaa-1", "--json")
    assert [e["decision"] for e in json.loads(out)][1:4] == ["allowed", "blocked", "approved"]


def test_replay_errors(root, capsys):
    assert run("--dir", str(root), "replay", "nope")[0] == 1
    assert capsys.readouterr().err.strip() == "pgguard audit replay: no events for session 'nope'"
    assert run("--dir", str(root), "replay", "sess-")[0] == 1
    assert "ambiguous" in capsys.readouterr().err


def test_report_markdown_and_html(root, tmp_path):
    html_file = tmp_path / "r.html"
    code, out = run("--dir", str(root), "report", "--since", "1d", "--html", str(html_file),
                    "--verify")
    assert code == 0
    for section in ("# pgguard audit report", "## Per identity", "## Refused statements",
                    "## Approvals", "## Masked reads", "## Authentication failures"):
        assert section in out
    assert "Hash chain: verified: 8 records" in out
    assert "| ci-agent | agent | 1 | 3 | 1 | 1 | 1 |" in out
    assert "| no-destructive | ci-agent | blocked | 1 |" in out
    assert "public.customers" in out and "mallory" in out
    page = html_file.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "<script" not in page
    assert "class=refused" in page and "DROP TABLE orders" in page
    # outside the window: nothing
    code, out = run("--dir", str(root), "report", "--since", "2000-01-01",
                    "--until", "2000-01-02")
    assert code == 0 and "| 0 | 0 | 0 |" in out


@pytest.mark.parametrize("argv, code, msg", [
    (["--dir", "/nonexistent/x", "sql", "SELECT 1"], 1, "no audit log at /nonexistent/x"),
    (["sql", "SELECT 1"], 1, "no audit directory: give -c pgguard.toml or --dir DIR"),
    (["-c", "/nonexistent.toml", "verify"], 1, "cannot read config"),
    (["--dir", "ROOT", "sql", "SELECT nope FROM audit"], 1, "Binder Error"),
    (["--dir", "ROOT", "report", "--since", "soon"], 1, "invalid time 'soon'"),
    (["--dir", "ROOT", "frobnicate"], 2, "invalid choice"),
    (["--dir", "ROOT"], 2, "required"),
])
def test_failures_are_one_line(root, tmp_path, monkeypatch, capsys, argv, code, msg):
    monkeypatch.chdir(tmp_path)
    argv = [str(root) if a == "ROOT" else a for a in argv]
    assert run(*argv)[0] == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pgguard audit") and msg in err[0], err


def test_front_cli_routes_to_audit(root):
    p = subprocess.run([sys.executable, "-m", "pgguard", "audit", "verify", "--dir", str(root)],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "verified: 8 records" in p.stdout
