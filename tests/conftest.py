# Fixtures: one real Postgres for the run, and real pgguard processes in front of it.
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pgcluster import PgCluster, find_tool, free_port  # noqa: E402

UPSTREAM_USER = "app"
UPSTREAM_PASSWORD = "app-secret-Zq9"
AGENT = "ci-agent"
AGENT_PASSWORD = "agent-pw-7f3"
HUMAN = "alice"
HUMAN_PASSWORD = "alice-pw-1c8"
ADMIN_TOKEN = "admin-token-for-tests-5d1"


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pgguard exited with {proc.returncode}:\n{proc_output(proc)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"pgguard did not listen on {port} within {timeout}s")


def proc_output(proc: subprocess.Popen) -> str:
    try:
        return Path(proc.args_log).read_text()[-4000:]      # type: ignore[attr-defined]
    except Exception:
        return ""


class Proxy:
    """A real `pgguard serve` process with a config written for the test."""

    def __init__(self, pg: PgCluster, tmp: Path, *, upstream_user: str = UPSTREAM_USER,
                 upstream_password: str | None = UPSTREAM_PASSWORD, sslmode: str = "disable",
                 extra: str = "", listen_extra: str = "", upstream_extra: str = "",
                 audit_extra: str = "",
                 workers: int = 1, port: int | None = None, env: dict | None = None) -> None:
        self.pg = pg
        self.port = port or free_port()
        self.admin_port = free_port()
        self.dir = tmp
        self.config = tmp / f"pgguard-{self.port}.toml"
        self.log = tmp / f"pgguard-{self.port}.log"
        self.audit_dir = tmp / f"audit-{self.port}"
        self.workers = workers
        self.config.write_text(f"""
[listen]
address = "127.0.0.1"
port = {self.port}
{listen_extra}

[admin]
address = "127.0.0.1"
port = {self.admin_port}
token_env = "TEST_ADMIN_TOKEN"

[approvals]
state_dir = "{tmp}/state-{self.port}"

[upstream]
host = "127.0.0.1"
port = {pg.port}
user = "{upstream_user}"
{'password_env = "TEST_UPSTREAM_PASSWORD"' if upstream_password is not None else ''}
sslmode = "{sslmode}"
{upstream_extra}

[limits]
shutdown_timeout = "5s"
startup_timeout = "5s"

[identities.{AGENT}]
kind = "agent"
groups = ["agents"]
password_env = "TEST_AGENT_PASSWORD"

[identities.{HUMAN}]
kind = "human"
groups = ["dba"]
password_env = "TEST_HUMAN_PASSWORD"

[policy]
agents = "allow"
humans = "allow"

[audit]
dir = "{self.audit_dir}"
{audit_extra}

{extra}
""")
        self.env = dict(os.environ, TEST_AGENT_PASSWORD=AGENT_PASSWORD,
                        TEST_ADMIN_TOKEN=ADMIN_TOKEN,
                        TEST_HUMAN_PASSWORD=HUMAN_PASSWORD, PGGUARD_LOG_LEVEL="INFO")
        if upstream_password is not None:
            self.env["TEST_UPSTREAM_PASSWORD"] = upstream_password
        if env:
            self.env.update(env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proxy:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgguard", "serve", "-c", str(self.config),
             "--workers", str(self.workers)],
            stdout=logf, stderr=subprocess.STDOUT, env=self.env)
        self.proc.args_log = str(self.log)    # type: ignore[attr-defined]
        _wait_port(self.port, self.proc)
        return self

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def dsn(self, user: str = AGENT, password: str | None = AGENT_PASSWORD,
            dbname: str = "postgres", **params) -> str:
        auth = urllib.parse.quote(user, safe="")
        if password is not None:
            auth += ":" + urllib.parse.quote(password, safe="")
        uri = f"postgresql://{auth}@127.0.0.1:{self.port}/{urllib.parse.quote(dbname)}"
        return uri + ("?" + urllib.parse.urlencode(params, quote_via=urllib.parse.quote) if params else "")

    def api(self, method: str, path: str, body: dict | None = None):
        """Call the admin HTTP API with the test admin token; the decoded JSON answer."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    cluster = PgCluster().start()
    cluster.create_role(UPSTREAM_USER, UPSTREAM_PASSWORD, "scram-sha-256")
    cluster.execute(f"ALTER ROLE {UPSTREAM_USER} SUPERUSER")
    cluster.execute(f"CREATE DATABASE appdb OWNER {UPSTREAM_USER}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def proxy(pg, tmp_path_factory):
    """A pgguard with permissive policy in front of `pg`, shared by the session."""
    p = Proxy(pg, tmp_path_factory.mktemp("proxy")).start()
    yield p
    p.stop()


@pytest.fixture
def make_proxy(pg, tmp_path):
    """Factory for a dedicated pgguard with its own config; stopped after the test."""
    started: list[Proxy] = []

    def make(**kw) -> Proxy:
        p = Proxy(pg, tmp_path, **kw).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def psql_bin() -> str:
    return str(find_tool("psql"))


@pytest.fixture(scope="session")
def pgbench_bin() -> str:
    return str(find_tool("pgbench"))


def run_psql(psql_bin: str, dsn: str, *args: str, input: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([psql_bin, "-X", "-v", "ON_ERROR_STOP=1", *args, dsn],
                          capture_output=True, text=True, input=input, timeout=timeout)
