# `pgguard token issue|revoke`: exit codes, one-line reasons, JSON fields, a DSN that parses.
from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from datetime import datetime

import pytest

from pgguard import config
from pgguard.auth import cli, revocations, tokens

SECRET = "cli-test-secret-0123456789abcdefghijkl"

CONFIG = """
[listen]
address = "{address}"
port = 6543
{tls}
[identities.ci-agent]
kind = "agent"
[identities."bob@corp.example"]
kind = "human"
databases = ["reports", "app"]
"""


@pytest.fixture
def cfg_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PGGUARD_TOKEN_SECRET", SECRET)
    f = tmp_path / "pgguard.toml"
    f.write_text(CONFIG.format(address="127.0.0.1", tls=""))
    return f


def run(capsys, action, *argv):
    code = cli.main(action, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_issue_json(cfg_file, capsys):
    code, out, err = run(capsys, "issue", "-c", cfg_file, "--identity", "ci-agent",
                         "--ttl", "10m", "--database", "app", "--scope", "readonly", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert {"token", "token_id", "identity", "expires_at", "dsn"} <= obj.keys()
    assert obj["identity"] == "ci-agent" and obj["scope"] == "readonly"
    assert obj["databases"] == ["app"]
    exp = datetime.strptime(obj["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
    iat = datetime.strptime(obj["issued_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert (exp - iat).total_seconds() == 600
    cfg = config.load(cfg_file)
    claims = tokens.verify(cfg, obj["token"], identity="ci-agent", database="app")
    assert claims.token_id == obj["token_id"]
    u = urllib.parse.urlsplit(obj["dsn"])
    assert u.scheme == "postgresql" and u.hostname == "127.0.0.1" and u.port == 6543
    assert u.username == "ci-agent" and urllib.parse.unquote(u.password) == obj["token"]
    assert u.path == "/app" and u.query == "sslmode=disable"


def test_issue_text(cfg_file, capsys):
    code, out, err = run(capsys, "issue", "-c", cfg_file, "--identity", "ci-agent")
    assert code == 0 and err == ""
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["token"].strip().startswith("pgg_k0.")
    assert lines["dsn"].strip().startswith("postgresql://ci-agent:pgg_k0.")
    assert "(in 15m)" in lines["expires at"]


def test_dsn_quotes_the_user_and_picks_a_database(cfg_file, capsys):
    code, out, _ = run(capsys, "issue", "-c", cfg_file, "--identity", "bob@corp.example",
                       "--json")
    assert code == 0
    u = urllib.parse.urlsplit(json.loads(out)["dsn"])
    assert urllib.parse.unquote(u.username) == "bob@corp.example" and u.path == "/reports"


def test_dsn_tls_and_wildcard_address(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PGGUARD_TOKEN_SECRET", SECRET)
    f = tmp_path / "tls.toml"
    f.write_text(CONFIG.format(address="::", tls='tls_cert = "a.crt"\ntls_key = "a.key"'))
    code, out, _ = run(capsys, "issue", "-c", f, "--identity", "ci-agent", "--json")
    assert code == 0
    dsn = json.loads(out)["dsn"]
    assert "@[::1]:6543/postgres?sslmode=require" in dsn
    code, out, _ = run(capsys, "issue", "-c", f, "--identity", "ci-agent", "--json",
                       "--host", "proxy.internal")
    assert "@proxy.internal:6543/" in json.loads(out)["dsn"]


@pytest.mark.parametrize("argv, needle", [
    (["--identity", "nobody"], "unknown identity 'nobody'"),
    (["--identity", "ci-agent", "--ttl", "soon"], "--ttl: invalid duration 'soon'"),
    (["--identity", "ci-agent", "--ttl", "3d"], "max_ttl"),
    (["--identity", "bob@corp.example", "--database", "secret"], "not allowed"),
])
def test_issue_failures_are_one_line(cfg_file, capsys, argv, needle):
    code, out, err = run(capsys, "issue", "-c", cfg_file, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and needle in err and err.startswith("pgguard token issue: ")


def test_issue_missing_secret(cfg_file, capsys, monkeypatch):
    monkeypatch.delenv("PGGUARD_TOKEN_SECRET")
    code, _, err = run(capsys, "issue", "-c", cfg_file, "--identity", "ci-agent")
    assert code == 1
    assert err == ("pgguard token issue: auth.token_secret_env: environment variable "
                   "PGGUARD_TOKEN_SECRET is not set\n")


def test_missing_config_and_usage(tmp_path, capsys):
    code, _, err = run(capsys, "issue", "-c", tmp_path / "nope.toml", "--identity", "x")
    assert code == 1 and "cannot read config" in err and err.count("\n") == 1
    code, _, err = run(capsys, "issue", "-c", tmp_path / "nope.toml")
    assert code == 2 and "--identity" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "issue or revoke" in err


def test_revoke_by_id_token_and_json(cfg_file, capsys):
    cfg = config.load(cfg_file)
    token, claims = tokens.issue(cfg, "ci-agent", "5m")
    w = revocations.RevocationWatcher.from_config(cfg)
    code, out, err = run(capsys, "revoke", "-c", cfg_file, token)
    assert code == 0 and claims.token_id in out, err
    assert w.is_revoked(claims.token_id)
    rec = revocations.read(revocations.store_path(cfg))[-1]
    assert rec.exp == claims.expires_at            # pruned once the token is dead anyway
    with pytest.raises(tokens.TokenRevoked):
        tokens.verify(cfg, token, revocations=w)
    code, out, _ = run(capsys, "revoke", "-c", cfg_file, "--json", "0123abcd0123abcd0123abcd")
    assert code == 0 and json.loads(out)["token_id"] == "0123abcd0123abcd0123abcd"
    assert w.is_revoked("0123abcd0123abcd0123abcd")


def test_revoke_refuses_nonsense(cfg_file, capsys):
    code, _, err = run(capsys, "revoke", "-c", cfg_file, "not a token!")
    assert code == 1 and "neither a token id nor a token" in err
    code, _, err = run(capsys, "revoke", "-c", cfg_file, "pgg_k0.garbage")
    assert code == 1 and "cannot read that token" in err


def test_through_python_m_pgguard(cfg_file):
    """`python -m pgguard token ...` end to end through the CLI front."""
    r = subprocess.run([sys.executable, "-m", "pgguard", "token", "issue", "-c", str(cfg_file),
                        "--identity", "ci-agent", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    r = subprocess.run([sys.executable, "-m", "pgguard", "token", "revoke", "-c", str(cfg_file),
                        obj["token_id"]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "pgguard", "token", "issue", "-c", str(cfg_file),
                        "--identity", "ghost"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "ghost" in r.stderr
