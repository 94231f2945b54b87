# Admin HTTP server and `pgguard approvals` CLI against a real admin server process.
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pgcluster import free_port

from pgguard.approvals import cli
from pgguard.approvals.store import ApprovalStore

TOKEN = "admin-token-Qx7"

CONFIG = """
[admin]
address = "127.0.0.1"
port = 0
token_env = "TEST_ADMIN_TOKEN"
groups = ["dba"]

[approvals]
state_dir = "state"
max_window = "1h"

[identities.ci-agent]
kind = "agent"
groups = ["agents"]

[identities.alice]
kind = "human"
groups = ["dba"]

[identities.carol]
kind = "human"
groups = ["leads"]

[identities.dave]
kind = "human"
groups = ["devs"]
"""


class AdminProcess:
    """`python -m pgguard.approvals.web` on a free port, with its own state dir."""

    def __init__(self, tmp: Path, token: str | None = TOKEN, extra: str = "") -> None:
        self.dir = tmp
        self.config = tmp / "pgguard.toml"
        self.port = free_port()
        self.config.write_text(CONFIG.replace("port = 0", f"port = {self.port}") + extra)
        env = dict(os.environ)
        env.pop("TEST_ADMIN_TOKEN", None)
        if token is not None:
            env["TEST_ADMIN_TOKEN"] = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgguard.approvals.web", "-c", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        seen = ""
        while "listening on" not in (line := self.proc.stdout.readline()):
            seen += line
            if not line:
                self.proc.kill()
                raise RuntimeError(f"admin server did not start: {seen}")
        self.url = line.split("listening on ")[1].split()[0]
        assert self.url == f"http://127.0.0.1:{self.port}/"
        self.store = ApprovalStore(tmp / "state" / "approvals.sqlite3")

    def ask(self, **kw):
        args = dict(identity="ci-agent", database="app",
                    statement="UPDATE orders SET state = 'paid'\n WHERE id = 7",
                    fingerprint="fp-7", classification="update public.orders [write]",
                    rule="orders-need-approval", timeout_s=60, session_id="s-1")
        args.update(kw)
        return self.store.request(**args)

    def stop(self) -> None:
        self.store.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def admin(tmp_path):
    a = AdminProcess(tmp_path)
    yield a
    a.stop()


def http(method: str, url: str, body=None, token: str | None = TOKEN):
    data = None if body is None else (body if isinstance(body, bytes) else
                                      json.dumps(body).encode())
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            ctype = resp.headers.get("Content-Type", "")
            return resp.status, (json.loads(raw) if "json" in ctype else raw.decode()), resp
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw), e
        except ValueError:
            return e.code, raw.decode(), e


# --------------------------------------------------------------------------- HTTP API

def test_token_required(admin):
    r = admin.ask()
    for token in (None, "wrong", TOKEN + "x", ""):
        status, body, resp = http("GET", admin.url + "api/approvals", token=token)
        assert status == 401, token
        assert body["code"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = http("POST", admin.url + f"api/approvals/{r.id}/approve",
                           {"approver": "alice"}, token="wrong")
    assert status == 401 and admin.store.get(r.id).pending
    status, body, _ = http("GET", admin.url + "api/approvals")
    assert status == 200 and [x["id"] for x in body] == [r.id]


def test_open_endpoints(admin):
    admin.ask()
    status, body, _ = http("GET", admin.url + "healthz", token=None)
    assert status == 200 and body["status"] == "ok" and body["approvals_pending"] == 1
    status, text, resp = http("GET", admin.url + "metrics", token=None)
    assert status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE pgguard_approvals_pending gauge" in text
    assert "pgguard_approvals_pending 1" in text
    assert 'pgguard_approval_requests{state="pending"} 1' in text
    status, html, resp = http("GET", admin.url, token=None)
    assert status == 200 and "<title>pgguard approvals</title>" in html
    csp = resp.headers["Content-Security-Policy"]
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in html and "http" not in csp
    assert "TEST_ADMIN_TOKEN" in html       # the page names the variable to look in
    assert "src=\"http" not in html and "href=\"http" not in html   # no external assets


def test_list_get_approve_deny(admin):
    a, b, c = admin.ask(), admin.ask(), admin.ask(statement="DELETE FROM orders WHERE id = 1")
    status, body, _ = http("GET", admin.url + "api/approvals?state=pending")
    assert status == 200 and [x["id"] for x in body] == [a.id, b.id, c.id]
    assert body[0]["statement"] == a.statement and body[0]["rule"] == "orders-need-approval"
    status, one, _ = http("GET", admin.url + f"api/approvals/{a.id}")
    assert status == 200 and one["id"] == a.id and one["state"] == "pending"

    status, done, _ = http("POST", admin.url + f"api/approvals/{a.id}/approve",
                           {"approver": "alice", "reason": "looks right"})
    assert status == 200 and done["state"] == "approved" and done["approver"] == "alice"
    assert done["reason"] == "looks right"
    assert admin.store.get(a.id).state == "approved"        # shared with this process

    status, done, _ = http("POST", admin.url + f"api/approvals/{b.id}/deny",
                           {"approver": "alice", "reason": "not during the freeze"})
    assert status == 200 and done["state"] == "denied"
    assert admin.store.get(b.id).reason == "not during the freeze"

    status, body, _ = http("POST", admin.url + f"api/approvals/{a.id}/deny",
                           {"approver": "alice"})
    assert status == 409 and body["code"] == "not_pending" and "already approved" in body["error"]
    status, body, _ = http("GET", admin.url + "api/approvals/999")
    assert status == 404 and body["code"] == "not_found"
    status, body, _ = http("POST", admin.url + "api/approvals/999/approve", {"approver": "alice"})
    assert status == 404

    status, body, _ = http("GET", admin.url + "api/approvals?state=decided")
    assert [x["id"] for x in body] == [b.id, a.id]
    status, body, _ = http("GET", admin.url + "api/approvals?state=denied")
    assert [x["id"] for x in body] == [b.id]
    status, body, _ = http("GET", admin.url + "api/approvals?state=all")
    assert sorted(x["id"] for x in body) == [a.id, b.id, c.id]
    status, body, _ = http("GET", admin.url + "api/approvals?state=bogus")
    assert status == 400 and "unknown state" in body["error"]


def test_who_may_decide(admin):
    r = admin.ask()
    url = admin.url + f"api/approvals/{r.id}/approve"
    status, body, _ = http("POST", url, {"approver": "ci-agent"})
    assert status == 403 and "own request" in body["error"]
    status, body, _ = http("POST", url, {"approver": "dave"})
    assert status == 403 and "dba" in body["error"]
    status, body, _ = http("POST", url, {"approver": "mallory"})
    assert status == 403 and "unknown approver" in body["error"]
    lead = admin.ask(approvers=("leads",))
    status, body, _ = http("POST", admin.url + f"api/approvals/{lead.id}/approve",
                           {"approver": "alice"})
    assert status == 403 and "leads" in body["error"]
    status, body, _ = http("POST", admin.url + f"api/approvals/{lead.id}/approve",
                           {"approver": "carol"})
    assert status == 200
    assert admin.store.get(r.id).pending
    status, names, _ = http("GET", admin.url + "api/approvers")
    assert names == ["alice"]      # rules in this config name no other approver groups


def test_bad_bodies(admin):
    r = admin.ask()
    url = admin.url + f"api/approvals/{r.id}/approve"
    for body, fragment in ((b"{nope", "not JSON"), ([1, 2], "JSON object"),
                           ({}, "approver"), ({"approver": 7}, "approver"),
                           ({"approver": "alice", "window": "soon"}, "invalid duration"),
                           ({"approver": "alice", "window": "2h"}, "max_window"),
                           ({"approver": "alice", "reason": 3}, "reason")):
        status, err, _ = http("POST", url, body)
        assert status == 400 and fragment in err["error"], (body, err)
    status, err, _ = http("POST", admin.url + f"api/approvals/{r.id}/deny",
                          {"approver": "alice", "window": "10m"})
    assert status == 400
    assert admin.store.get(r.id).pending


def test_window_grant_and_revoke(admin):
    r = admin.ask()
    status, done, _ = http("POST", admin.url + f"api/approvals/{r.id}/approve",
                           {"approver": "alice", "window": "10m"})
    assert status == 200 and done["window_seconds"] == 600 and done["grant_id"]
    g = admin.store.check_grant("ci-agent", "app", "fp-7")
    assert g is not None and g.id == done["grant_id"]
    status, grants, _ = http("GET", admin.url + "api/grants")
    assert [x["id"] for x in grants] == [g.id] and grants[0]["active"]
    status, revoked, _ = http("POST", admin.url + f"api/grants/{g.id}/revoke", {})
    assert status == 200 and revoked["revoked_at"]
    assert admin.store.check_grant("ci-agent", "app", "fp-7") is None
    status, grants, _ = http("GET", admin.url + "api/grants")
    assert grants == []


def test_server_sweeps_timeouts(admin):
    r = admin.ask(timeout_s=0.2)
    deadline = time.time() + 5
    import sqlite3
    while time.time() < deadline:
        with sqlite3.connect(admin.store.path) as c:
            if c.execute("SELECT state FROM requests WHERE id = ?",
                         (r.id,)).fetchone()[0] == "timed_out":
                break
        time.sleep(0.1)
    else:
        pytest.fail("the admin server's janitor did not persist the timeout")


def test_no_token_configured(tmp_path):
    a = AdminProcess(tmp_path, token=None)
    try:
        status, body, _ = http("GET", a.url + "api/approvals")
        assert status == 503 and "TEST_ADMIN_TOKEN" in body["error"]
        status, body, _ = http("GET", a.url + "healthz", token=None)
        assert status == 200
    finally:
        a.stop()


def test_two_servers_share_the_port_and_store(admin, tmp_path):
    """Workers each serve the admin port (SO_REUSEPORT) over one store."""
    import asyncio

    from pgguard.approvals.web import start_admin
    from pgguard.config import load

    port = admin.port
    cfg = load(admin.config)

    async def main():
        store = ApprovalStore.from_config(cfg)
        second = await start_admin(cfg, store, token=TOKEN, port=port)
        try:
            r = admin.ask()
            seen = set()
            for _ in range(60):
                status, body, _ = await asyncio.to_thread(http, "GET", admin.url + "healthz",
                                                          None, None)
                seen.add(body["pid"])
                if len(seen) == 2:
                    break
                status, one, _ = await asyncio.to_thread(
                    http, "GET", admin.url + f"api/approvals/{r.id}")
                assert status == 200 and one["id"] == r.id
            return seen
        finally:
            await second.close()
            store.close()

    pids = asyncio.run(main())
    assert pids == {os.getpid(), admin.proc.pid}


# --------------------------------------------------------------------------- CLI

def run_cli(args, capsys, token=TOKEN, monkeypatch=None):
    if monkeypatch is not None:
        if token is None:
            monkeypatch.delenv("TEST_ADMIN_TOKEN", raising=False)
        else:
            monkeypatch.setenv("TEST_ADMIN_TOKEN", token)
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list_json_and_table(admin, capsys, monkeypatch):
    a = admin.ask()
    b = admin.ask(identity="etl-bot", database="warehouse")
    cfg = str(admin.config)
    code, out, err = run_cli(["-c", cfg, "list", "--json"], capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [a.id, b.id]
    for key in ("id", "identity", "database", "statement", "rule", "requested_at",
                "expires_at"):
        assert key in rows[0]
    assert rows[1]["identity"] == "etl-bot" and rows[1]["database"] == "warehouse"
    code, out, err = run_cli(["list", "-c", cfg], capsys, monkeypatch=monkeypatch)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "AGE", "EXPIRES", "IDENTITY"]
    assert "UPDATE orders SET state = 'paid' WHERE id = 7" in lines[1]   # one line
    monkeypatch.setenv("PGGUARD_ADMIN_TOKEN", TOKEN)      # --url alone: the default variable
    code, out, err = run_cli(["--url", admin.url, "show", str(a.id)], capsys,
                             monkeypatch=monkeypatch)
    assert code == 0 and "state:          pending" in out


def test_cli_approve_deny(admin, capsys, monkeypatch):
    a, b, c = admin.ask(), admin.ask(), admin.ask()
    cfg = str(admin.config)
    code, out, err = run_cli(["-c", cfg, "approve", str(a.id), "--as", "alice"], capsys,
                             monkeypatch=monkeypatch)
    assert code == 0, err
    assert out.strip() == f"approval #{a.id} approved by alice"
    assert admin.store.get(a.id).state == "approved"
    code, out, err = run_cli(["-c", cfg, "approve", str(b.id), "--as", "alice",
                              "--window", "10m"], capsys, monkeypatch=monkeypatch)
    assert code == 0 and "may repeat this statement for 10m" in out
    assert admin.store.check_grant("ci-agent", "app", "fp-7") is not None
    monkeypatch.setenv("PGGUARD_APPROVER", "alice")
    code, out, err = run_cli(["-c", cfg, "deny", str(c.id), "--reason", "not today"], capsys,
                             monkeypatch=monkeypatch)
    assert code == 0 and out.strip() == f"approval #{c.id} denied by alice"
    assert admin.store.get(c.id).reason == "not today"
    code, out, err = run_cli(["-c", cfg, "list", "--json", "--state", "decided"], capsys,
                             monkeypatch=monkeypatch)
    assert {r["id"] for r in json.loads(out)} == {a.id, b.id, c.id}
    code, out, err = run_cli(["-c", cfg, "list"], capsys, monkeypatch=monkeypatch)
    assert out.strip() == "no approvals waiting"


def test_cli_errors_are_one_line(admin, capsys, monkeypatch, tmp_path):
    r = admin.ask()
    cfg = str(admin.config)
    cases = [
        (["-c", cfg, "approve", str(r.id), "--as", "ci-agent"], "own request"),
        (["-c", cfg, "approve", "999", "--as", "alice"], "no approval request #999"),
        (["-c", cfg, "approve", str(r.id), "--as", "dave"], "may not decide"),
        (["-c", cfg, "approve", str(r.id), "--as", "alice", "--window", "5h"], "max_window"),
    ]
    for args, fragment in cases:
        code, out, err = run_cli(args, capsys, monkeypatch=monkeypatch)
        assert code == 1 and out == "" and fragment in err, (args, err)
        assert err.count("\n") == 1 and err.startswith("pgguard approvals approve: ")
    code, out, err = run_cli(["-c", cfg, "list"], capsys, token=None, monkeypatch=monkeypatch)
    assert code == 1 and "TEST_ADMIN_TOKEN is not set" in err
    code, out, err = run_cli(["-c", cfg, "list"], capsys, token="bad", monkeypatch=monkeypatch)
    assert code == 1 and "admin token" in err and err.count("\n") == 1
    monkeypatch.setenv("PGGUARD_ADMIN_TOKEN", TOKEN)
    code, out, err = run_cli(["--url", "http://127.0.0.1:9", "list"], capsys,
                             monkeypatch=monkeypatch)
    assert code == 1 and "cannot reach the admin server" in err and err.count("\n") == 1
    code, out, err = run_cli(["-c", str(tmp_path / "missing.toml"), "list"], capsys,
                             monkeypatch=monkeypatch)
    assert code == 1 and "cannot read config" in err
    code, out, err = run_cli(["approve"], capsys, monkeypatch=monkeypatch)
    assert code == 2 and err.count("\n") == 1
    assert admin.store.get(r.id).pending


def test_cli_as_a_subprocess(admin):
    """The real command line: exit status and stdout of `list --json`."""
    r = admin.ask()
    env = dict(os.environ, TEST_ADMIN_TOKEN=TOKEN)
    code = ("import sys; from pgguard.approvals.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "-c", str(admin.config), "list", "--json"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert [x["id"] for x in json.loads(p.stdout)] == [r.id]
    p = subprocess.run([sys.executable, "-c", code, "-c", str(admin.config), "deny",
                        str(r.id), "--as", "ci-agent"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
