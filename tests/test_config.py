# `pgguard check`: a valid config passes; every mistake names its key path.
import os
import subprocess
import sys

import pytest

from pgguard import config
from pgguard.errors import ConfigError


def check(tmp_path, text):
    f = tmp_path / "pgguard.toml"
    f.write_text(text)
    return subprocess.run([sys.executable, "-m", "pgguard", "check", "-c", str(f)],
                          capture_output=True, text=True)


def test_design_sample_config_is_valid(tmp_path):
    r = check(tmp_path, """
[listen]
address = "127.0.0.1"
port = 6432
[admin]
port = 6480
token_env = "PGGUARD_ADMIN_TOKEN"
groups = ["dba"]
[upstream]
host = "127.0.0.1"
port = 5432
user = "app"
password_env = "PGGUARD_UPSTREAM_PASSWORD"
sslmode = "prefer"
[auth]
token_secret_env = "PGGUARD_TOKEN_SECRET"
[identities.ci-agent]
kind = "agent"
groups = ["agents"]
[identities.alice]
kind = "human"
groups = ["dba"]
password_env = "ALICE_PASSWORD"
[policy]
agents = "guarded"
humans = "allow"
[[rules]]
name = "no-destructive"
when = { flags = ["destructive", "privilege"] }
action = "block"
[[rules]]
name = "agent-writes-to-orders-need-approval"
when = { kind = "agent", statements = ["insert", "update", "delete"], relations = ["public.orders"] }
action = "approve"
timeout = "5m"
[[masks]]
column = "public.customers.email"
strategy = "email"
except_groups = ["dba"]
[detectors]
builtin = ["email", "ssn", "credit_card", "aws_access_key", "jwt"]
custom = [{ name = "employee_id", pattern = 'EMP-\\d{6}' }]
[audit]
dir = "audit"
durability = "batched"
""")
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


@pytest.mark.parametrize("text, message", [
    ("[listen]\nport = \"x\"\n", "listen.port: Expected `int`, got `str`"),
    ("[listen]\nprot = 1\n", "listen.prot: unknown key"),
    ("[upstream]\nsslmode = \"sometimes\"\n", "upstream.sslmode: invalid value 'sometimes' "
     "(one of: disable, allow, prefer, require, verify-ca, verify-full)"),
    ("[[rules]]\nname = \"a\"\naction = \"block\"\nwhen = { flags = [\"explosive\"] }\n",
     "rules[0].when.flags[0]: invalid value 'explosive' (one of: "),
    ("[[rules]]\naction = \"block\"\n", "rules[0].name: required key is missing"),
    ("[[rules]]\nname = \"a\"\naction = \"approve\"\ntimeout = \"5 parsecs\"\n",
     "rules[0].timeout: invalid duration '5 parsecs'"),
    ("[identities.bob]\nkind = \"robot\"\n",
     "identities.bob.kind: invalid value 'robot' (one of: agent, human)"),
    ("[[masks]]\ncolumn = \"email\"\n", "masks[0]: column 'email' must be schema.table.column"),
    ("[listen]\nport = 1\n[listen]\nport = 2\n", "invalid TOML"),
    ("[upstream]\nsslmode = \"verify-full\"\n",
     "upstream.sslmode: sslmode = 'verify-full' needs sslrootcert"),
    ("[admin]\nport = 99999\n", "admin.port: port must be between 0 and 65535"),
    ("[limits]\nshutdown_timeout = \"5 s x\"\n", "limits.shutdown_timeout: invalid duration"),
    ("[[masks]]\ncolumn = \"public.t.c\"\nstrategy = \"sha\"\n",
     "masks[0].strategy: invalid value 'sha' (one of: redact, partial, email, hash, null)"),
    ("[[masks]]\ncolumn = \"public.t.c\"\nstrategy = \"partial\"\nkeep = -1\n",
     "masks[0].keep: Expected `int` >= 0"),
    ("[detectors]\nbuiltin = [\"email\", \"passport\"]\n",
     "detectors.builtin[1]: unknown detector 'passport'"),
    ("[detectors]\ncustom = [{ name = \"x\", pattern = 'EMP-(\\d' }]\n",
     "detectors.custom[0].pattern: invalid regular expression"),
])
def test_errors_name_the_key_path(tmp_path, text, message):
    r = check(tmp_path, text)
    assert r.returncode == 1
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pgguard", "check", "-c",
                        str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert r.returncode == 1 and "cannot read config" in r.stderr


def test_secret_env_missing_is_reported_at_serve(tmp_path):
    cfg = config.loads('[upstream]\npassword_env = "PGGUARD_TEST_UNSET_VAR"\n')
    with pytest.raises(ConfigError, match="upstream.password_env: environment variable PGGUARD_TEST_UNSET_VAR"):
        config.read_secret(cfg, cfg.upstream.password_env, None, "upstream")


def test_missing_secret_file_is_an_error(tmp_path):
    r = check(tmp_path, '[identities.bot]\npassword_file = "nope.txt"\n')
    assert r.returncode == 1
    assert "identities.bot.password_file: cannot read secret file" in r.stderr


def _holder():
    """A listener with SO_REUSEPORT, as another pgguard's would be."""
    import socket
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


def test_serve_refuses_a_port_another_process_holds(tmp_path):
    holder, port = _holder()
    f = tmp_path / "p.toml"
    f.write_text(f"[listen]\nport = {port}\n[upstream]\nsslmode = \"disable\"\n")
    r = subprocess.run([sys.executable, "-m", "pgguard", "serve", "-c", str(f)],
                       capture_output=True, text=True, timeout=30)
    holder.close()
    assert r.returncode == 1
    assert f"listen: cannot bind 127.0.0.1:{port}" in r.stderr


def _serve_once(tmp_path, text: str) -> subprocess.CompletedProcess:
    f = tmp_path / "p.toml"
    f.write_text(text)
    env = dict(os.environ, PGGUARD_ADMIN_TOKEN="t0ken")
    return subprocess.run([sys.executable, "-m", "pgguard", "serve", "-c", str(f)],
                          capture_output=True, text=True, timeout=30, env=env)


def _two_free_ports() -> tuple[int, int]:
    import socket
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return a.getsockname()[1], b.getsockname()[1]


def test_serve_refuses_an_admin_port_equal_to_its_listen_port(tmp_path):
    # both were bound with SO_REUSEPORT: the kernel shared the port between the proxy
    # and the admin page, and about half the clients got "invalid response to SSL
    # negotiation: H" (the HTTP server's answer)
    port, _ = _two_free_ports()
    r = _serve_once(tmp_path, f'[listen]\nport = {port}\n[admin]\nport = {port}\n'
                              '[upstream]\nsslmode = "disable"\n')
    assert r.returncode == 1, r.stderr
    assert f"admin.port: {port} is listen.port too" in r.stderr


def test_serve_refuses_an_admin_port_another_process_serves(tmp_path):
    holder, held = _holder()
    port, _ = _two_free_ports()
    try:
        r = _serve_once(tmp_path, f'[listen]\nport = {port}\n[admin]\nport = {held}\n'
                                  '[upstream]\nsslmode = "disable"\n')
    finally:
        holder.close()
    assert r.returncode == 1, r.stderr
    assert f"admin.port: cannot listen on 127.0.0.1:{held}" in r.stderr
