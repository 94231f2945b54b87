# `pgguard demo` end to end: a real subprocess, a real embedded Postgres, a real client.
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pgserver  # noqa: F401 - the demo's embedded Postgres: a test dependency
import psutil
import psycopg
import pytest

from pgguard import config, demo, demo_data

START_TIMEOUT = 180.0       # the first start runs initdb and loads the sample data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    """`python -m pgguard demo` as a subprocess; stdout read line by line."""

    def __init__(self, directory: Path, port: int, **extra_env: str) -> None:
        self.dir = directory
        self.port = port
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(extra_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgguard", "demo", "--port", str(port),
             "--dir", str(directory)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines),
                         daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    @staticmethod
    def _pump(stream, q) -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    def output(self) -> str:
        return "".join(self.out) + "\n--- stderr ---\n" + "".join(self.err)

    def wait_banner(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(10)
                pytest.fail(f"demo exited with {self.proc.returncode}:\n{self.output()}")
            self.out.append(line)
            if line.startswith("Ctrl-C stops"):
                return "".join(self.out)
        pytest.fail(f"no banner within {START_TIMEOUT}s:\n{self.output()}")

    def dsn(self, user: str) -> str:
        m = re.search(rf"'(postgresql://{re.escape(user)}:[^']+)'", "".join(self.out))
        assert m, self.output()
        return m.group(1)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        time.sleep(0.2)     # let the stdout pump finish
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.out.append(line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _postgres_for(pgdata: Path) -> list:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(pgdata) in arg for arg in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _stop_leftovers(pgdata: Path) -> None:
    for p in _postgres_for(pgdata):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _assert_postgres_stopped(pgdata: Path) -> None:
    deadline = time.monotonic() + 10
    while _postgres_for(pgdata) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _postgres_for(pgdata) == [], "the embedded Postgres is still running"


def _counts(dsn: str) -> tuple[int, int]:
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = psycopg.connect(dsn, connect_timeout=5)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with conn:
        customers = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
        orders = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    return customers, orders


@pytest.fixture
def demo_dir():
    # not under pytest's basetemp: pytest resets its root to mode 0700 whenever a run
    # starts, and as root the demo's Postgres runs as another OS user that must get in
    base = Path(tempfile.mkdtemp(prefix="pgguard-demo-test-", dir="/tmp"))
    base.chmod(0o755)
    d = base / "demo"
    yield d
    _stop_leftovers(d)
    shutil.rmtree(base, ignore_errors=True)


def _psql_major() -> str | None:
    psql = shutil.which("psql")
    if not psql:
        return None
    out = subprocess.run([psql, "--version"], capture_output=True, text=True).stdout
    return demo._major(out.split(")", 1)[-1])


PHONE_READS = ["phone", "regexp_replace(phone, '\\D', '', 'g')", "translate(phone, '() -', '')",
               "split_part(phone, ' ', 1) || split_part(phone, ' ', 2)",
               "replace(phone, '-', '/')"]


def _assert_phone_masked(agent: str, human: str) -> None:
    # phone is a masked column in the demo: however the agent reshapes it, only the
    # last 4 digits (the partial strategy's) come back; alice (dba) sees the numbers
    sql = "SELECT " + ", ".join(PHONE_READS) + " FROM customers WHERE id <= 5 ORDER BY id"
    with psycopg.connect(human) as conn:
        real = conn.execute(sql).fetchall()
    with psycopg.connect(agent) as conn:
        got = conn.execute(sql).fetchall()
    assert len(real) == len(got) == 5
    for want, row in zip(real, got):
        head = re.sub(r"\D", "", want[0])[:6]
        assert len(head) == 6 and head in re.sub(r"\D", "", want[1])
        for cell in row:
            assert head not in re.sub(r"\D", "", cell or ""), (row, want)


def test_demo_runs_and_stops_cleanly(demo_dir):
    port = _free_port()
    d = Demo(demo_dir, port)
    try:
        text = d.wait_banner()
        agent = d.dsn(demo.AGENT)
        assert agent.startswith("postgresql://ci-agent:") and \
            agent.endswith(f"@127.0.0.1:{port}/shop"), text
        assert d.dsn(demo.HUMAN).endswith(f"@127.0.0.1:{port}/shop")
        for t in demo.TRIES:
            assert t.what.split()[0].format(pgguard=demo.pgguard_command()) in text
        assert _counts(agent) == (demo_data.N_CUSTOMERS, demo_data.N_ORDERS)
        _assert_phone_masked(agent, d.dsn(demo.HUMAN))
        # the agent holds a pgguard token, not a password
        assert ":pgg_" in agent
        # the written config validates
        config.load(demo_dir / "pgguard.toml")
        code = d.interrupt()
        assert code == 0, d.output()
        major = _psql_major()
        if major and Path(f"/usr/lib/postgresql/{major}/bin/postgres").is_file():
            # the server psql matches: no major-version warning from psql
            assert f"in front of Debian's Postgres {major}." in text, text
            assert "Stopping Debian's Postgres" in "".join(d.out)
            assert (demo_dir / f"pgdata-{major}" / "PG_VERSION").read_text().strip() == major
        else:
            assert "Stopping the embedded Postgres" in "".join(d.out)
    finally:
        d.kill()
    _assert_postgres_stopped(demo_dir)


def test_demo_restart_reuses_the_dir_and_restores_changed_data(demo_dir):
    # the pgserver wheel's Postgres (the fallback), so both kinds run in this file
    wheel = {"PGGUARD_DEMO_PGBIN": "pgserver"}
    port = _free_port()
    d = Demo(demo_dir, port, **wheel)
    try:
        d.wait_banner()
        alice = d.dsn(demo.HUMAN)
        with psycopg.connect(alice, autocommit=True) as conn:
            conn.execute("DELETE FROM orders WHERE id > 10")
            conn.execute("DROP INDEX orders_created_at_idx")
        assert _counts(alice) == (demo_data.N_CUSTOMERS, 10)
        assert d.interrupt() == 0, d.output()
    finally:
        d.kill()
    _assert_postgres_stopped(demo_dir)
    password = (demo_dir / "secrets" / "alice.password").read_text()

    d = Demo(demo_dir, _free_port(), **wheel)
    try:
        text = d.wait_banner()
        assert "loaded it again" in text, text
        assert (demo_dir / "secrets" / "alice.password").read_text() == password
        assert _counts(d.dsn(demo.HUMAN)) == (demo_data.N_CUSTOMERS, demo_data.N_ORDERS)
        assert d.interrupt() == 0, d.output()
    finally:
        d.kill()
    _assert_postgres_stopped(demo_dir)

    d = Demo(demo_dir, _free_port(), **wheel)
    try:
        assert "sample data in place" in d.wait_banner()
        assert d.interrupt() == 0, d.output()
    finally:
        d.kill()
    _assert_postgres_stopped(demo_dir)


def test_demo_busy_port_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "pgguard", "demo", "--port", str(port),
             "--dir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and str(port) in r.stderr, r.stderr
    assert not (tmp_path / "demo").exists()      # nothing started, nothing written


def test_demo_config_validates(tmp_path):
    text = demo.config_text(port=6432, socket_dir="/tmp/sock", upstream_port=5432)
    cfg = config.loads(text, base_dir=str(tmp_path))
    assert cfg.listen.port == 6432 and cfg.upstream.host == "/tmp/sock"
    assert cfg.identities["ci-agent"].kind == "agent"
    assert cfg.identities["alice"].groups == ["dba"]
    assert [r.name for r in cfg.rules] == ["no-destructive",
                                           "agent-writes-to-orders-need-approval"]
    assert {m.column for m in cfg.masks} == {
        "public.customers.email", "public.customers.ssn", "public.customers.card_number",
        "public.customers.phone"}
    assert "phone" in cfg.detectors.builtin
    # the admin token is found through the config, as the approvals CLI needs it
    assert cfg.admin.token_file == "secrets/admin-token.password"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin-token.password").write_text("tok-from-file\n")
    env = os.environ.pop(cfg.admin.token_env, None)
    try:
        assert config.admin_token(cfg) == "tok-from-file"
        os.environ[cfg.admin.token_env] = "tok-from-env"
        assert config.admin_token(cfg) == "tok-from-env"        # the variable wins
    finally:
        os.environ.pop(cfg.admin.token_env, None)
        if env is not None:
            os.environ[cfg.admin.token_env] = env


def test_phone_detector_masks_every_demo_phone_number():
    from pgguard.masking.detectors import DetectorSet
    cfg = config.loads(demo.config_text(port=6432, socket_dir="/s", upstream_port=5432))
    dets = DetectorSet.from_config(cfg.detectors.builtin, cfg.detectors.custom)
    phones = [c[5] for c in demo_data.customers()]
    notes = [c[6] for c in demo_data.customers() if c[6] and "phone" in c[6]]
    assert len(phones) == demo_data.N_CUSTOMERS and len(notes) >= 5
    for cell in phones + notes:
        masked = dets.mask_cell(cell.encode(), dets.all_bits, False)[0].decode()
        assert re.search(r"555-01\d\d", masked) is None, masked
        assert "[phone]" in masked
    # what is not a phone number stays
    for cell in ("order 12345 shipped", "2024-05-01", "version 1.2.3"):
        assert dets.mask_cell(cell.encode(), dets.all_bits, False) is None      # untouched


def test_postgres_choice(tmp_path, monkeypatch):
    """Debian's server of psql's major; else the wheel's: no psql, another major, none
    installed of that major; PGGUARD_DEMO_PGBIN decides when set."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    monkeypatch.setenv("PATH", str(bin_))
    monkeypatch.delenv("PGGUARD_DEMO_PGBIN", raising=False)
    assert isinstance(demo.choose_postgres(tmp_path), demo.Embedded)      # no psql
    fake = bin_ / "psql"
    for version in ("99.1", "3.0 (Debian 3.0-1)", "garbage"):
        fake.write_text(f"#!/bin/sh\necho 'psql (PostgreSQL) {version}'\n")
        fake.chmod(0o755)
        assert isinstance(demo.choose_postgres(tmp_path), demo.Embedded), version
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    assert installed, "this test needs a Debian Postgres server package"
    major = installed[-1].parent.parent.name
    fake.write_text(f"#!/bin/sh\necho 'psql (PostgreSQL) {major}.3 (Debian {major}.3-1)'\n")
    pg = demo.choose_postgres(tmp_path)
    assert isinstance(pg, demo.SystemPostgres) and pg.pgdata == tmp_path / f"pgdata-{major}"
    assert pg.bindir == installed[-1].parent
    monkeypatch.setenv("PGGUARD_DEMO_PGBIN", "pgserver")
    assert isinstance(demo.choose_postgres(tmp_path), demo.Embedded)
    monkeypatch.setenv("PGGUARD_DEMO_PGBIN", str(tmp_path))
    with pytest.raises(demo.DemoError):
        demo.choose_postgres(tmp_path)



def test_demo_config_kept_when_edited(tmp_path):
    path, kept = demo.write_config(tmp_path, "# one\n")
    assert not kept and path.read_text() == "# one\n"
    path, kept = demo.write_config(tmp_path, "# two\n")
    assert not kept and path.read_text() == "# two\n"
    path.write_text("# mine\n")
    path, kept = demo.write_config(tmp_path, "# three\n")
    assert kept and path.read_text() == "# mine\n"


def test_sample_data_is_deterministic_and_plausible():
    customers = demo_data.customers()
    assert customers == demo_data.customers()
    assert len(customers) == demo_data.N_CUSTOMERS
    assert len({c[2] for c in customers}) == len(customers)          # unique emails
    for _, name, email, ssn, card, phone, _notes in customers:
        assert re.fullmatch(r"[a-z0-9._]+@[a-z.]+\.(com|org|net|example|test)", email)
        assert re.fullmatch(r"\d{3}-\d{2}-\d{4}", ssn) and not ssn.startswith(("000", "666", "9"))
        assert demo_data.luhn_ok(card) and len(card) in (15, 16)
        assert re.fullmatch(r"\(\d{3}\) 555-01\d{2}", phone)
    notes = [c[6] for c in customers if c[6]]
    assert any(re.search(r"AKIA[A-Z2-7]{16}", n) for n in notes)
    assert any("@" in n for n in notes)
    orders = demo_data.orders()
    assert len(orders) == demo_data.N_ORDERS
    assert all(1 <= o[1] <= demo_data.N_CUSTOMERS for o in orders)
    assert demo_data.luhn_ok("4111111111111111") and not demo_data.luhn_ok("4111111111111112")
