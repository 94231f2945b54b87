# The first hour of a new user: the README's quick start and walkthrough, the commands the
# demo prints and `--help`, each run as printed in a fresh shell with a fresh PATH against
# a demo started the README's way (`./dev demo`).
"""How the fresh shell is made: ``env -i PATH=/usr/bin:/bin HOME=<tmp> bash -c '...'`` from
the repository root. Two variables stand in for the clone's own ``.venv`` (which a test
must not build): ``PGGUARD_VENV`` names a directory whose ``bin/python`` runs the Python
running the tests, with ``./dev``'s up-to-date stamp, and ``PYTHONPATH`` makes it import
this checkout (the editable install's job). Nothing else is inherited.

The README's commands use the demo's defaults (``pgguard-demo/``, port 6432); the test
runs them with the demo's directory and port of this run put in their place, and nothing
else changed. Lines of its code blocks that start with ``$ `` or ``./dev`` are shell
commands, lines that start with ``shop=> `` are the agent's psql input, the rest is output
the test expects to see.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import psycopg
import pytest

from pgguard import demo_data
from pgguard.policy.classify import classify
from pgguard.proxy.tracking import statement_columns

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
START_TIMEOUT = 180.0


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return port if port + 48 <= 65535 else _free_port()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def _blocks(text: str) -> list[list[str]]:
    return [b.split("\n")[1:] for b in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
            for b in ["\n" + b.rstrip("\n")]]


class Shell:
    """Runs command lines as a new user's terminal would: env -i, PATH=/usr/bin:/bin."""

    def __init__(self, tmp: Path) -> None:
        self.home = tmp / "home"
        self.home.mkdir()
        self.venv = tmp / "venv"
        (self.venv / "bin").mkdir(parents=True)
        py = self.venv / "bin" / "python"
        py.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
        pg = self.venv / "bin" / "pgguard"
        pg.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m pgguard \"$@\"\n")
        for f in (py, pg):
            f.chmod(0o755)
        inputs = subprocess.run(
            ["bash", "-c", "cat pyproject.toml setup.py pgguard/_core/*.pyx "
             "pgguard/_core/*.pxd | cksum"], cwd=REPO, capture_output=True, text=True,
            check=True).stdout
        for extras in ("demo", "test,bench,demo"):
            (self.venv / f".pgguard-{extras}").write_text(inputs)
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home),
                    "PGGUARD_VENV": str(self.venv), "PYTHONPATH": str(REPO)}

    def argv(self, line: str) -> list[str]:
        return ["env", "-i", *(f"{k}={v}" for k, v in self.env.items()), "bash", "-c", line]

    def run(self, line: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(line), cwd=kw.pop("cwd", REPO), capture_output=True,
                              text=True, timeout=timeout, **kw)

    def popen(self, line: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(line), cwd=REPO, text=True, **kw)


class Demo:
    def __init__(self, shell: Shell, directory: Path, port: int) -> None:
        self.dir, self.port = directory, port
        self.proc = shell.popen(f"./dev demo --port {port} --dir {directory}",
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.lines: list[str] = []
        self.banner = ""
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("Ctrl-C stops"):
                    self.banner = "".join(self.lines)
                    ready.set()
            ready.set()
        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(START_TIMEOUT) or not self.banner:
            self.stop()
            pytest.fail("the demo printed no banner:\n" + "".join(self.lines))

    def sub(self, line: str) -> str:
        """A README line with this run's directory and port for the defaults."""
        return (line.replace("pgguard-demo/", f"{self.dir}/")
                .replace("127.0.0.1:6432", f"127.0.0.1:{self.port}"))

    def dsn(self, user: str) -> str:
        m = re.search(rf"'(postgresql://{user}:[^']+)'", self.banner)
        assert m, self.banner
        return m.group(1)

    def api(self, path: str):
        token = (self.dir / "secrets" / "admin-token.password").read_text().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port + 48}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return orjson.loads(r.read())

    def wait_pending(self, n: int = 1) -> list[int]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ids = [a["id"] for a in self.api("/api/approvals?state=pending")]
            except urllib.error.URLError:       # the admin server is still starting
                time.sleep(0.1)
                continue
            if len(ids) >= n:
                return ids
            time.sleep(0.1)
        pytest.fail("no approval request appeared")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def shell(tmp_path_factory) -> Shell:
    return Shell(tmp_path_factory.mktemp("first-hour"))


@pytest.fixture(scope="module")
def demo(shell):
    # not under pytest's basetemp: pytest resets its root to mode 0700 whenever a run
    # starts, and as root the demo's Postgres runs as another OS user that must get in
    base = Path(tempfile.mkdtemp(prefix="pgguard-first-hour-", dir="/tmp"))
    base.chmod(0o755)
    d = Demo(shell, base / "pgguard-demo", _free_port())
    try:
        yield d
        assert d.stop() == 0, "".join(d.lines)
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def _held_update(shell: Shell, demo: Demo):
    """The agent's UPDATE of the walkthrough, held until someone decides."""
    return shell.popen(f"psql {shlex.quote(demo.dsn('ci-agent'))} -c "
                       f"\"UPDATE orders SET status = 'refunded' WHERE id = 42\"",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# -- the walkthrough -------------------------------------------------------------------------

def test_readme_quick_start_and_walkthrough(shell, demo):
    walk = _section("The demo in two minutes")
    blocks = _blocks(walk)
    agent_lines = [ln[len("shop=> "):] for b in blocks for ln in b if ln.startswith("shop=> ")]
    expected_agent = [ln for b in blocks for ln in b
                      if re.match(r"(ERROR|DETAIL|HINT|NOTICE):", ln)]
    commands = [ln[2:] for b in blocks for ln in b if ln.startswith("$ ")]
    assert len(agent_lines) >= 5 and len(expected_agent) >= 4 and len(commands) >= 7

    # the agent's session, as typed at the shop=> prompt (psql: no version warning)
    agent = shell.popen(f"psql {shlex.quote(demo.dsn('ci-agent'))}", stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    agent.stdin.write("\n".join(agent_lines) + "\n")
    agent.stdin.flush()         # stdin stays open: psql waits at the held UPDATE
    (first,) = demo.wait_pending(1)
    assert first == 1

    results = {}
    held = None
    for line in commands:
        cmd = demo.sub(line)
        if " approve 2 " in cmd or " deny 3 " in cmd:      # the next held statements
            held = _held_update(shell, demo)
            demo.wait_pending(1)
        r = shell.run(cmd)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        assert "command not found" not in r.stderr
        results[line] = r
        if held is not None:
            out, err = held.communicate(timeout=30)
            if " approve 2 " in cmd:
                assert "UPDATE 1" in out, err
            else:
                assert "denied by alice" in err and "not during the freeze" in err, err
            held = None
        if "APPROVE 1" in cmd:
            out, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err
            assert "UPDATE 1" in out, (out, err)
            assert "WARNING" not in err, err            # e.g. a psql/server version mismatch
            for exp in expected_agent:
                assert exp in err, (exp, err)
            assert "[phone]" in out and re.search(r"\(\d{3}\) 555-01\d\d", out) is None, out
            assert 'Table "public.customers"' in out

    # what the printed outputs promise
    audit = next(r for c, r in results.items() if " audit sql " in c)
    table = next(b for b in blocks if any(" audit sql " in ln for ln in b))
    rows = [ln for ln in table if ln.startswith("ci-agent")]
    shown = [tuple(c.strip() for c in ln.split("|")) for ln in audit.stdout.splitlines()
             if ln.startswith("ci-agent")]
    assert shown == [tuple(c.strip() for c in row.split("|")) for row in rows], audit.stdout
    assert "pg_catalog" not in audit.stdout          # psql's \d queries left out
    every = shell.run(demo.sub(
        "./dev pgguard audit sql -c pgguard-demo/pgguard.toml \"SELECT count(*) FROM audit "
        "WHERE list_contains(flags, 'introspection')\""))
    counts = re.findall(r"^\s*(\d+)\s*$", every.stdout, re.M)
    assert counts and int(counts[0]) >= 5, every.stdout      # but they are recorded
    replay = next(r for c, r in results.items() if " policy replay " in c)
    assert "no statement would be decided differently" in replay.stdout, replay.stdout
    explain = next(r for c, r in results.items() if " explain " in c)
    assert 'decision: BLOCK (rule "no-destructive")' in explain.stdout and not explain.stderr

    # the truth upstream: alice (dba) sees the phone number the agent saw masked
    with psycopg.connect(demo.dsn("alice"), connect_timeout=10) as conn:
        name, phone, status = conn.execute(
            "SELECT c.name, c.phone, o.status FROM customers c, orders o "
            "WHERE c.id = 28 AND o.id = 42").fetchone()
    customers = {c[0]: c for c in demo_data.customers()}
    assert (name, phone) == (customers[28][1], customers[28][5])
    assert re.fullmatch(r"\(\d{3}\) 555-01\d\d", phone) and status == "refunded"


def test_quick_start_dev_commands(shell, demo):
    lines = [ln.split("#")[0].strip() for b in _blocks(_section("Quick start")) for ln in b
             if ln.startswith("./dev ")]
    assert lines == ["./dev demo", "./dev test"]
    # ./dev demo: the demo this module started with it; ./dev test, narrowed to one file
    r = shell.run("./dev test -q -p no:cacheprovider tests/test_sqlshape.py", timeout=300)
    assert r.returncode == 0 and "[100%]" in r.stdout, r.stdout + r.stderr


def test_policy_replay_on_the_demo_audit_log(shell, demo):
    """A candidate that blocks the agent's order writes instead of holding them: the
    approved UPDATE shows as approval -> blocked."""
    cand = demo.dir / "blocking.toml"
    text = (demo.dir / "pgguard.toml").read_text()
    assert 'action = "approve"' in text
    cand.write_text(text.replace('action = "approve"', 'action = "block"'))
    r = shell.run(f"./dev pgguard policy replay -c {cand} --since 1d --json")
    assert r.returncode == 0, r.stderr
    rep = orjson.loads(r.stdout)
    groups = {(g["transition"], g["rule"]): g for g in rep["changes"]}
    g = groups[("approval -> blocked", "agent-writes-to-orders-need-approval")]
    assert g["count"] >= 1 and g["identities"] == ["ci-agent"]
    assert g["examples"][0]["statement"].rstrip(";") == \
        "UPDATE orders SET status = $1 WHERE id = $2"
    r = shell.run(f"./dev pgguard policy replay -c {cand} --identity ci-agent")
    assert "approval -> blocked  rule agent-writes-to-orders-need-approval" in r.stdout


# -- what the demo prints --------------------------------------------------------------------

def test_every_command_the_demo_prints_works(shell, demo):
    banner = demo.banner
    assert "Debian's Postgres" in banner or "pgserver" in banner
    shell_lines = [ln.strip()[2:] for ln in banner.splitlines() if ln.strip().startswith("$ ")]
    token_line = next(ln.strip() for ln in banner.splitlines()
                      if "token issue" in ln and "PGGUARD_TOKEN_SECRET" in ln)
    psqls = [ln.strip() for ln in banner.splitlines() if ln.strip().startswith("psql '")]
    assert len(shell_lines) >= 2 and len(psqls) == 2
    for line in shell_lines:
        r = shell.run(line)
        assert r.returncode == 0 and r.stdout, (line, r.stderr)
    r = shell.run(token_line)
    assert r.returncode == 0 and "pgg_" in r.stdout, r.stderr
    for line in psqls:
        r = shell.run(line + " -c 'SELECT 1 AS ok'")
        assert r.returncode == 0 and "ok" in r.stdout and "WARNING" not in r.stderr, r.stderr
    # the approvals command inside the UPDATE suggestion
    m = re.search(r"or (\S+ approvals -c \S+ approve) <id> --as alice", banner)
    assert m, banner
    held = _held_update(shell, demo)
    (rid,) = demo.wait_pending(1)
    r = shell.run(f"{m.group(1)} {rid} --as alice")
    assert r.returncode == 0 and f"approval #{rid} approved by alice" in r.stdout, r.stderr
    assert "UPDATE 1" in held.communicate(timeout=30)[0]


def test_help_commands_work_in_a_new_terminal(shell, demo):
    r = shell.run("./dev pgguard --help")
    assert r.returncode == 0 and "./dev pgguard" in r.stdout
    cfg = demo.dir / "pgguard.toml"
    examples = [ln.strip() for ln in r.stdout.splitlines() if re.match(
        r"pgguard (demo|serve|check|explain|policy|token|approvals|audit)\b", ln.strip())]
    assert len(examples) >= 4
    for ex in examples:
        if ex.startswith(("pgguard demo", "pgguard serve")):
            continue        # they run until Ctrl-C; the demo is this module's ./dev demo
        line = "./dev " + ex.replace("pgguard.toml", str(cfg)).replace(
            "candidate.toml", str(cfg))
        r2 = shell.run(line)
        assert r2.returncode == 0, (line, r2.stderr)
    r = shell.run(f"./dev pgguard check -c {cfg}")
    assert r.returncode == 0 and ": ok" in r.stdout
    # from another directory: relative paths are the caller's
    r = shell.run(f"{REPO}/dev pgguard check -c pgguard.toml", cwd=demo.dir)
    assert r.returncode == 0, r.stderr


# -- the fixes of issue 14, each seen from a new terminal ---------------------------------------

def test_explain_exit_status(shell, demo):
    cfg = demo.dir / "pgguard.toml"
    for sql, check_code in (("DROP TABLE orders", 3), ("SELECT 1", 0),
                            ("UPDATE orders SET status = 'x' WHERE id = 1", 4),
                            ("SELEC 1", 3), ("DELETE FROM orders", 3)):
        q = shlex.quote(sql)
        r = shell.run(f"./dev pgguard explain -c {cfg} --identity ci-agent {q}")
        assert r.returncode == 0 and "decision:" in r.stdout and r.stderr == "", r.stderr
        r = shell.run(f"./dev pgguard explain -c {cfg} --identity ci-agent --check {q}")
        assert r.returncode == check_code, (sql, r.stdout)


def test_explain_and_check_refuse_what_serve_refuses(shell, demo):
    """explain of a database the proxy would not open is an error, not an ALLOW; check
    compiles the detectors and bounds a mask's keep as serve does."""
    cfg = demo.dir / "pgguard.toml"
    r = shell.run(f"./dev pgguard explain -c {cfg} --database nope --identity ci-agent "
                  "--check 'SELECT 1'")
    assert r.returncode == 1 and "--database 'nope': not in upstream.databases" in r.stderr
    text = cfg.read_text()
    for broken, said in (
            (text.replace('"jwt"]', '"jwt", "passport"]', 1),
             "detectors.builtin[6]: unknown detector 'passport'"),
            (text.replace("keep = 4", "keep = -1", 1), "masks[1].keep: Expected `int` >= 0"),
            (text.replace('timeout = "5m"', 'timeout = "5 minutes"', 1),
             "rules[1].timeout: invalid duration '5 minutes'")):
        assert broken != text
        bad = demo.dir / "broken.toml"
        bad.write_text(broken)
        r = shell.run(f"./dev pgguard check -c {bad}")
        assert r.returncode == 1 and said in r.stderr, r.stderr
    r = shell.run("./dev pgguard token")
    assert r.returncode == 2 and "issue or revoke" in r.stderr, r.stderr


def test_approvals_without_as_says_how(shell, demo):
    cfg = demo.dir / "pgguard.toml"
    held = _held_update(shell, demo)
    (rid,) = demo.wait_pending(1)
    r = shell.run(f"./dev pgguard approvals -c {cfg} deny {rid}")
    assert r.returncode == 1 and "--as NAME" in r.stderr, r.stderr
    assert "token" not in r.stderr                        # the token came from token_file
    r = shell.run(f"PGGUARD_APPROVER=alice ./dev pgguard approvals -c {cfg} deny {rid} "
                  "--reason 'synopsis test'")
    assert r.returncode == 0 and "denied by alice" in r.stdout, r.stderr
    err = held.communicate(timeout=30)[1]
    assert "synopsis test" in err
    # no token anywhere: said so
    bare = demo.dir / "no-token.toml"
    bare.write_text((demo.dir / "pgguard.toml").read_text().replace(
        'token_file = "secrets/admin-token.password"', ""))
    r = shell.run(f"./dev pgguard approvals -c {bare} list")
    assert r.returncode == 1 and "no admin token" in r.stderr and "token_file" in r.stderr


def test_show_sessions_timestamp_and_own_state(shell, demo):
    console = demo.dsn("alice").rsplit("/", 1)[0] + "/pgguard"
    agent = psycopg.connect(demo.dsn("ci-agent"), connect_timeout=10)
    try:
        r = shell.run(f"psql {shlex.quote(console)} -At -F '|' -c 'SHOW SESSIONS'")
    finally:
        agent.close()
    assert r.returncode == 0, r.stderr
    rows = [ln.split("|") for ln in r.stdout.splitlines()]
    states = {row[1]: row[6] for row in rows}
    assert states["alice"] == "console" and states["ci-agent"] == "relay", rows
    for row in rows:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00", row[5]), row


def test_dev_says_before_building_and_passes_through(tmp_path):
    """A stale install: ./dev says it builds, and how long, before it does (the pip call
    is recorded by a stand-in python instead of run)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    py = venv / "bin" / "python"
    # a build that takes 16 s: ./dev says it is still at it meanwhile
    py.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nsleep 16\n")
    py.chmod(0o755)
    pg = venv / "bin" / "pgguard"
    pg.write_text("#!/bin/sh\necho \"pgguard $* in $PWD\"\n")
    pg.chmod(0o755)
    env = ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={tmp_path}", f"PGGUARD_VENV={venv}"]
    r = subprocess.run([*env, "bash", "-c", f"{REPO}/dev pgguard check -c x.toml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "building the compiled core" in r.stderr and "2 minutes" in r.stderr
    assert "still installing and compiling (15s)" in r.stderr, r.stderr
    assert "-m pip install" in log.read_text()
    assert r.stdout.strip() == f"pgguard check -c x.toml in {tmp_path}"
    # up to date now: no build, no message
    r = subprocess.run([*env, "bash", "-c", f"{REPO}/dev pgguard --version"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.stderr == "" and log.read_text().count("pip install") == 1


# -- the introspection flag -------------------------------------------------------------------

INTROSPECTION = [
    "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c LEFT JOIN "
    "pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE "
    "pg_catalog.pg_table_is_visible(c.oid)",
    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
    "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) "
    "FROM pg_catalog.pg_attribute a WHERE a.attrelid = 16384",
    "SELECT string_agg(attname, ',') FROM pg_attribute",
    "SELECT count(*) FROM pg_class; SELECT * FROM pg_namespace",
    "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_catalog.pg_attrdef d",
]
NOT_INTROSPECTION = [
    "SELECT 1",
    "SELECT * FROM customers",
    "SELECT c.relname, o.id FROM pg_class c, orders o",
    "SELECT public.evil() FROM pg_catalog.pg_class",
    "SELECT evil(oid) FROM pg_class",                       # unqualified: could be anyone's
    "SELECT pg_read_file('/etc/passwd') FROM pg_class",     # escape
    "UPDATE pg_catalog.pg_class SET relname = 'x' WHERE false",
    "SELECT * FROM pg_class; DELETE FROM orders WHERE id = 1",
    "SELECT set_config('search_path', 'x', false) FROM pg_class",
    "SHOW search_path",
]


@pytest.mark.parametrize("sql", INTROSPECTION)
def test_introspection_flag(sql):
    class D:
        statements = tuple(classify(sql))
    assert statement_columns(D)[2] == ["introspection"]


@pytest.mark.parametrize("sql", NOT_INTROSPECTION)
def test_not_introspection(sql):
    class D:
        statements = tuple(classify(sql))
    assert "introspection" not in (statement_columns(D)[2] or [])


def test_audit_report_counts_introspection(shell, demo):
    r = shell.run(demo.sub("./dev pgguard audit report -c pgguard-demo/pgguard.toml "
                           "--since 1d"))
    assert r.returncode == 0 and "only read the system catalogs" in r.stdout, r.stderr


def test_dev_test_says_before_it_installs_debian_packages(tmp_path):
    """As root with a package missing (chromium, here: not on this PATH), ./dev test says
    which Debian packages it is about to install, then runs apt-get; PGGUARD_NO_APT=1 skips
    it. apt-get and the virtualenv's python are stand-ins that record their calls."""
    if os.geteuid() != 0:
        pytest.fail("./dev installs Debian packages only as root: run this suite as root")
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    for tool in ("bash", "dirname", "cat", "cksum", "id", "ls", "sh"):
        (fakebin / tool).symlink_to(shutil.which(tool, path="/usr/bin:/bin"))
    log = tmp_path / "calls"
    for name in ("apt-get",):
        f = fakebin / name
        f.write_text(f"#!/bin/sh\necho \"apt-get $*\" >> {log}\n")
        f.chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f"#!/bin/sh\necho \"python $*\" >> {log}\n")
    py.chmod(0o755)
    inputs = subprocess.run(
        ["bash", "-c", "cat pyproject.toml setup.py pgguard/_core/*.pyx pgguard/_core/*.pxd "
         "| cksum"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    (venv / ".pgguard-test,bench,demo").write_text(inputs)
    env = ["env", "-i", f"PATH={fakebin}", f"HOME={tmp_path}", f"PGGUARD_VENV={venv}"]
    r = subprocess.run([*env, str(fakebin / "bash"), str(REPO / "dev"), "test"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    said = r.stderr.index("about to install Debian packages")
    assert "chromium" in r.stderr[said:].splitlines()[0], r.stderr
    assert calls[0].startswith("apt-get update") and "install" in calls[1], calls
    assert calls[-1] == "python -m pytest -q"     # then the suite
    log.unlink()
    r = subprocess.run([*env, "PGGUARD_NO_APT=1", str(fakebin / "bash"), str(REPO / "dev"),
                        "test"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "PGGUARD_NO_APT" in r.stderr, r.stderr
    assert log.read_text().splitlines() == ["python -m pytest -q"]
