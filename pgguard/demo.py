# `pgguard demo`: an embedded Postgres with sample PII data, a sample policy, and the proxy.
"""Everything needed to see pgguard at work, in one command.

Examples::

    pgguard demo                              # files in ./pgguard-demo, proxy on 127.0.0.1:6432
    pgguard demo --port 7432 --dir /tmp/pgg

What it does:

1. starts a Postgres of its own, on a unix socket only: Debian's server
   (``/usr/lib/postgresql/<major>/bin``) when one of the same major version as the
   ``psql`` on the PATH is installed, in ``<dir>/pgdata-<major>`` (so psql does not warn
   about a version mismatch); otherwise the one in the ``pgserver`` wheel, in
   ``<dir>/pgdata``. Both are reused on the next run. As root the server runs as an
   unprivileged OS user (``postgres`` for Debian's, ``pgserver`` for the wheel's).
2. creates the role ``app`` and the database ``shop`` it owns, then loads the sample shop
   from :mod:`pgguard.demo_data`: ``customers`` with PII, ``orders``, a few indexes.
   If the data has changed since it was loaded (say a ``DELETE`` tried through the
   proxy), the next start loads it again.
3. writes ``<dir>/pgguard.toml``: the identities ``ci-agent`` (an agent) and ``alice``
   (a human in group ``dba``) with generated passwords in ``<dir>/secrets/``, the sample
   rules, masks and detectors (phone numbers included), the admin token file the
   ``pgguard approvals`` command reads, and the audit log in ``<dir>/audit``. The file is
   rewritten on every start unless you have edited it; then your version is kept
   (delete it to get the generated one back).
4. prints ready ``psql`` commands and what to try (``pgguard`` commands with the absolute
   path of this installation's ``pgguard``, so they work in any new terminal), then runs
   the proxy in this process.
   Ctrl-C (or SIGTERM) stops the proxy, then the embedded Postgres, and exits 0.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import config, demo_data
from .approvals.hold import admin_url
from .auth import tokens
from .errors import PgguardError
from .proxy import server

DEFAULT_DIR = "pgguard-demo"
LISTEN_ADDRESS = "127.0.0.1"
DATABASE = "shop"
UPSTREAM_ROLE = "app"
AGENT = "ci-agent"
HUMAN = "alice"
CONFIG_NAME = "pgguard.toml"


class DemoError(PgguardError):
    """The demo cannot start; the message is the one line the user sees."""


# -- what the banner suggests -------------------------------------------------------------

@dataclass(frozen=True)
class Try:
    """One suggestion in the banner. ``effect`` is what pgguard does with it; while
    ``ready`` is False the banner says that this is still to come and what ``today``
    happens instead. ``{config}`` in ``what`` becomes the config file's path."""

    what: str
    effect: str
    ready: bool = False
    today: str = "runs unguarded for now"
    shell: bool = False       # a shell command, not SQL for the psql prompt


# The only list the banner's "what to try" comes from. When a feature lands, set
# `ready=True` on its entries (and fix the wording); add new ones here.
TRIES: tuple[Try, ...] = (
    Try("SELECT * FROM customers LIMIT 5;",
        "email, ssn and card_number come back masked for ci-agent; alice (dba) sees them",
        ready=True),
    Try("SELECT id, notes FROM customers WHERE notes LIKE '%AKIA%' OR notes LIKE '%@%';",
        "detectors mask the emails and AWS keys inside free text", ready=True),
    Try("SELECT lower(email), row_to_json(c) FROM customers c LIMIT 2;",
        "values derived from masked columns are masked as a whole", ready=True),
    Try("DROP INDEX orders_created_at_idx;",
        "refused by rule no-destructive (SQLSTATE 42501); the connection stays usable",
        ready=True),
    Try("UPDATE orders SET status = 'refunded' WHERE id = 42;",
        "waits inline until a human decides; from another terminal, as alice: "
        "psql '{console}' -c 'SHOW APPROVALS' then -c 'APPROVE <id>' (or the web console "
        "{admin_url} with the admin token, or {pgguard} approvals -c {config} approve <id> "
        "--as alice)",
        ready=True),
    Try("DELETE FROM orders;",
        "refused: a DELETE without WHERE is destructive", ready=True),
    Try("SELECT id, name, phone, notes FROM customers WHERE notes LIKE '%phone%' LIMIT 3;",
        "phone is masked as a column (last 4 digits kept), and the phone detector masks "
        "the phone numbers inside the notes",
        ready=True),
    Try('{pgguard} audit sql -c {config} "SELECT ts, identity, decision, rule, statement '
        'FROM audit WHERE event = \'statement\' AND NOT coalesce(list_contains(flags, '
        '\'introspection\'), false) ORDER BY ts DESC LIMIT 10"',
        "every statement above in the audit log, with its decision and rule, without "
        "psql's catalog queries (written in batches: give it a second)", ready=True,
        shell=True),
    Try("{pgguard} policy replay -c {config} --since 1d",
        "what a changed policy would have decided differently over the recorded traffic "
        "(edit a copy of the config and pass it with -c)", ready=True, shell=True),
)

# One line on what the proxy does already; later issues extend it.
WORKS_TODAY = ("SCRAM and 15-minute tokens, the full protocol relayed, destructive and "
               "privilege statements refused, approvals held inline, PII masked in results, "
               "every event in the Parquet audit log.")


# -- the embedded Postgres ------------------------------------------------------------------

class _DemoPostgres:
    """What the demo asks of its Postgres: ``start()``, ``stop()`` (a note when it keeps
    running), ``socket_dir``/``port``/``psql_path``, and the helpers below."""

    what = "a Postgres"
    pgdata: Path
    socket_dir: str
    port: int
    psql_path: str

    @property
    def first_start(self) -> bool:
        return not (self.pgdata / "PG_VERSION").exists()

    def psql(self, sql: str, *, database: str = "postgres", user: str = "postgres",
             args: tuple[str, ...] = ()) -> str:
        """Run a psql script over the unix socket (trust auth); stdout, unaligned."""
        cmd = [self.psql_path, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
               "-h", self.socket_dir, "-p", str(self.port), "-U", user, "-d", database, *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        r = subprocess.run(cmd, input=sql, capture_output=True, text=True, env=env,
                           timeout=120)
        if r.returncode != 0:
            raise DemoError(f"psql on the demo's Postgres failed: {_one_line(r.stderr)}")
        return r.stdout.strip()


class Embedded(_DemoPostgres):
    """The pgserver-managed Postgres in ``pgdata``, reached over its unix socket."""

    what = "the embedded Postgres (pgserver wheel)"

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self.srv = None
        self.pgserver = None

    @property
    def psql_path(self) -> str:
        return str(Path(self.pgserver.__file__).parent / "pginstall" / "bin" / "psql")

    def start(self) -> None:
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (root, CI): harmless
                warnings.simplefilter("ignore")
                import pgserver
        except ImportError:
            raise DemoError("the demo needs the pgserver wheel: pip install 'pgguard[demo]'") \
                from None
        self.pgserver = pgserver
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._forget_dead_handles()
        try:
            self.srv = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        except BaseException as e:
            self._stop_orphan()
            if not isinstance(e, Exception):    # Ctrl-C, SIGTERM
                raise
            # pgserver raises whatever initdb / pg_ctl raised
            raise DemoError(f"could not start the embedded Postgres in {self.pgdata}: "
                            f"{_one_line(e)} (see {self.pgdata / 'log'})") from None

    def _stop_orphan(self) -> None:
        # interrupted inside get_server: pg_ctl may have started the server before
        # pgserver recorded our handle, so its cleanup would never stop it
        if not (self.pgdata / "postmaster.pid").exists():
            return
        self._forget_dead_handles()
        try:
            others = json.loads((self.pgdata / ".handle_pids.json").read_text())
        except (OSError, ValueError):
            others = []
        if [p for p in others if p != os.getpid()]:
            return
        user = "pgserver" if os.geteuid() == 0 else None     # as pgserver runs it
        quiet = logging.getLogger("pgserver")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)        # a stale pid file makes pg_ctl complain
        try:
            self.pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user,
                                 timeout=60)
        except Exception:
            pass
        finally:
            quiet.setLevel(level)

    def _forget_dead_handles(self) -> None:
        # pgserver counts the processes using a data dir in .handle_pids.json and stops
        # the server only when the last one exits; a demo killed with SIGKILL leaves its
        # pid there, and the server would then never be stopped again.
        handles = self.pgdata / ".handle_pids.json"
        if not handles.exists():
            return
        import psutil
        with self.pgserver.PostgresServer._lock:
            try:
                pids = json.loads(handles.read_text())
            except (OSError, ValueError):
                pids = []
            alive = [p for p in pids if isinstance(p, int) and self._alive(psutil, p)]
            if alive != pids:
                handles.write_text(json.dumps(alive))

    @staticmethod
    def _alive(psutil, pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @property
    def socket_dir(self) -> str:
        return str(self.srv.get_postmaster_info().socket_dir)

    @property
    def port(self) -> int:
        return self.srv.get_postmaster_info().port or 5432

    def stop(self) -> str | None:
        """Stop the server (pgserver's cleanup); a note when it is left running."""
        if self.srv is None:
            return None
        info = self.srv.get_postmaster_info()
        self.srv.cleanup()
        self.srv = None
        # pgserver stops it (pg_ctl -w stop, else kill) unless another live process
        # holds a handle on the same data dir; then it keeps running for that one
        import psutil
        if self._alive(psutil, info.pid):       # (a zombie nobody reaped yet is stopped)
            return (f"the embedded Postgres (pid {info.pid}) keeps running: another "
                    f"process uses {self.pgdata}")
        return None


class SystemPostgres(_DemoPostgres):
    """Debian's Postgres server (``/usr/lib/postgresql/<major>/bin``) in ``pgdata``, on a
    unix socket only, started and stopped with its ``pg_ctl``; as root it runs as the OS
    user ``postgres`` (the package creates it). Same interface as :class:`Embedded`."""

    what = "Debian's Postgres"
    PORT = 5432         # only names the socket file, in a directory of our own

    def __init__(self, bindir: Path, pgdata: Path) -> None:
        self.bindir = bindir
        self.pgdata = pgdata
        self.srv = None             # True while we run it (the name Embedded uses)
        self.os_user = "postgres" if os.geteuid() == 0 else None
        self._sock = pgdata.parent / "run"
        if len(str(self._sock)) > 80:     # sun_path holds 107 bytes
            tag = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
            self._sock = Path("/tmp") / f"pgguard-demo-{tag}"

    @property
    def psql_path(self) -> str:
        return str(self.bindir / "psql")

    @property
    def socket_dir(self) -> str:
        return str(self._sock)

    @property
    def port(self) -> int:
        return self.PORT

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        kw: dict = {}
        if self.os_user:
            pw = pwd.getpwnam(self.os_user)
            kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd="/", **kw)

    def _give(self, path: Path) -> None:
        # the server's OS user owns what it writes and can traverse every parent
        if not self.os_user:
            return
        pw = pwd.getpwnam(self.os_user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        for parent in path.parents:
            mode = parent.stat().st_mode
            if mode & 0o011 != 0o011:
                parent.chmod(mode | 0o011)

    def start(self) -> None:
        try:
            if self.os_user:
                pwd.getpwnam(self.os_user)
        except KeyError:
            raise DemoError(f"{self.bindir} is installed but the OS user {self.os_user!r} "
                            "is missing") from None
        self._sock.mkdir(mode=0o700, exist_ok=True)
        self._give(self._sock)
        if self.first_start:
            self.pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._give(self.pgdata)
            r = self._run(self.bindir / "initdb", "-D", self.pgdata, "--auth=trust",
                          "-U", "postgres", "--encoding=UTF8", "--locale=C.UTF-8",
                          "--no-instructions")
            if r.returncode != 0:
                raise DemoError(f"initdb in {self.pgdata} failed: {_first_error(r.stderr)}"
                                + (f" (it runs as the OS user {self.os_user!r}: every parent "
                                   "directory must let it through)" if self.os_user else ""))
        if self._running():
            raise DemoError(f"a Postgres already runs on {self.pgdata} (another demo?); "
                            "stop it or pick another --dir")
        log = self.pgdata / "log"
        r = self._run(self.bindir / "pg_ctl", "-w", "-t", "60", "-D", self.pgdata, "-l", log,
                      "-o", f"-c listen_addresses='' -c unix_socket_directories='{self._sock}' "
                      f"-p {self.PORT}", "start")
        if r.returncode != 0:
            raise DemoError(f"could not start {self.what} in {self.pgdata}: "
                            f"{_one_line(r.stderr or r.stdout)} (see {log})")
        self.srv = True

    def _running(self) -> bool:
        return self._run(self.bindir / "pg_ctl", "-D", self.pgdata, "status").returncode == 0

    def stop(self) -> str | None:
        if self.srv is None:
            return None
        self.srv = None
        r = self._run(self.bindir / "pg_ctl", "-w", "-m", "fast", "-D", self.pgdata, "stop")
        if r.returncode != 0 and self._running():
            return f"could not stop {self.what} in {self.pgdata}: {_one_line(r.stderr)}"
        return None


def _first_error(text: str) -> str:
    for ln in text.splitlines():
        if "error" in ln.lower() or "fatal" in ln.lower():
            return ln.strip()
    return _one_line(text)


def _major(version_text: str) -> str | None:
    m = re.search(r"\b(\d+)(?:\.\d+)?", version_text)
    return m.group(1) if m else None


def choose_postgres(home: Path) -> _DemoPostgres:
    """Debian's server when one of the same major as ``psql`` on the PATH is installed
    (``PGGUARD_DEMO_PGBIN`` names a bin directory to use instead, or ``pgserver`` for the
    wheel's), else the wheel's."""
    forced = os.environ.get("PGGUARD_DEMO_PGBIN")
    if forced == "pgserver":
        return Embedded(home / "pgdata")
    if forced:
        bindir = Path(forced)
        if not (bindir / "postgres").is_file():
            raise DemoError(f"PGGUARD_DEMO_PGBIN={forced}: no postgres there")
        return SystemPostgres(bindir, home / f"pgdata-{bindir.parent.name}")
    psql = shutil.which("psql")
    if psql:
        try:
            out = subprocess.run([psql, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        major = _major(out.split(")", 1)[-1]) if out else None
        bindir = Path(f"/usr/lib/postgresql/{major}/bin") if major else None
        if bindir and all((bindir / t).is_file() for t in ("postgres", "initdb", "pg_ctl")):
            return SystemPostgres(bindir, home / f"pgdata-{major}")
    return Embedded(home / "pgdata")


def _one_line(e: object) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# -- sample data and secrets ------------------------------------------------------------------

def prepare_database(pg: _DemoPostgres, home: Path, app_password: str) -> str:
    """Role ``app``, database ``shop`` and the sample rows; says what it did."""
    pg.psql(
        f"SELECT 'CREATE ROLE {UPSTREAM_ROLE}' WHERE NOT EXISTS "
        f"(SELECT FROM pg_roles WHERE rolname = '{UPSTREAM_ROLE}') \\gexec\n"
        f"ALTER ROLE {UPSTREAM_ROLE} LOGIN NOSUPERUSER PASSWORD '{app_password}';\n"
        f"SELECT 'CREATE DATABASE {DATABASE} OWNER {UPSTREAM_ROLE}' WHERE NOT EXISTS "
        f"(SELECT FROM pg_database WHERE datname = '{DATABASE}') \\gexec\n")
    stamp = home / ".sample-data"
    expected = stamp.read_text().strip() if stamp.exists() else None
    try:
        current = f"{demo_data.DATA_VERSION} {_fingerprint(pg)}"
    except DemoError:
        current = None          # no tables yet (or not the ones we made)
    if expected is not None and current == expected:
        return "sample data in place"
    pg.psql(demo_data.load_script(), database=DATABASE, user=UPSTREAM_ROLE, args=("-1",))
    stamp.write_text(f"{demo_data.DATA_VERSION} {_fingerprint(pg)}\n")
    what = (f"{demo_data.N_CUSTOMERS} customers and {demo_data.N_ORDERS} orders")
    if expected is None:
        return f"loaded the sample data: {what}"
    return f"the sample data had changed since it was loaded; loaded it again: {what}"


def _fingerprint(pg: _DemoPostgres) -> str:
    return pg.psql(demo_data.FINGERPRINT_SQL, database=DATABASE, user=UPSTREAM_ROLE)


def ensure_passwords(home: Path) -> dict[str, Path]:
    """A generated password file per name, kept across runs (mode 0600)."""
    d = home / "secrets"
    d.mkdir(mode=0o700, exist_ok=True)
    files = {}
    for name in (HUMAN, UPSTREAM_ROLE, "token-secret", "admin-token"):
        p = d / f"{name}.password"
        if not p.exists() or not p.read_text().strip():
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                long = name in ("token-secret", "admin-token")
                f.write(secrets.token_urlsafe(36 if long else 15) + "\n")
        files[name] = p
    return files


def read_password(p: Path) -> str:
    return p.read_text().strip()


# -- the config -------------------------------------------------------------------------------

def config_text(*, port: int, socket_dir: str, upstream_port: int) -> str:
    """The demo's pgguard.toml (DESIGN §8), paths relative to the file."""
    admin_port = port + 48 if port + 48 <= 65535 else port - 48
    return f'''\
# pgguard demo config, written by `pgguard demo` (rewritten on every start until you edit
# it; then your version is kept and only [listen] port and [upstream] follow the demo).
# Check it with: pgguard check -c {CONFIG_NAME}

[listen]
address = "{LISTEN_ADDRESS}"
port = {port}

[admin]
address = "{LISTEN_ADDRESS}"
port = {admin_port}
groups = ["dba"]
token_env = "PGGUARD_ADMIN_TOKEN"   # when set, wins over token_file
token_file = "secrets/admin-token.password"   # `pgguard approvals -c ...` reads it too

[auth]
token_secret_env = "PGGUARD_TOKEN_SECRET"   # the demo sets it from secrets/token-secret.password
state_dir = "state"

[approvals]
state_dir = "state"

[upstream]
# the embedded Postgres: its unix socket directory (libpq convention), trust auth
host = "{socket_dir}"
port = {upstream_port}
user = "{UPSTREAM_ROLE}"
password_file = "secrets/{UPSTREAM_ROLE}.password"
databases = ["{DATABASE}"]

[identities.{AGENT}]              # no static secret: it logs in with short-lived tokens
kind = "agent"
groups = ["agents"]

[identities.{HUMAN}]
kind = "human"
groups = ["dba"]
password_file = "secrets/{HUMAN}.password"

[policy]
agents = "guarded"       # no rule matched: block destructive, privilege, escape, opaque
humans = "allow"

[[rules]]
name = "no-destructive"
when = {{ kind = "agent", flags = ["destructive", "privilege"] }}
action = "block"

[[rules]]
name = "agent-writes-to-orders-need-approval"
action = "approve"
timeout = "5m"
[rules.when]             # the same as an inline table: when = {{ kind = "agent", ... }}
kind = "agent"
statements = ["insert", "update", "delete"]
relations = ["public.orders"]

[[masks]]
column = "public.customers.email"
strategy = "email"
except_groups = ["dba"]

[[masks]]
column = "public.customers.ssn"
strategy = "partial"
keep = 4
except_groups = ["dba"]

[[masks]]
column = "public.customers.card_number"
strategy = "partial"
keep = 4
except_groups = ["dba"]

[[masks]]
column = "public.customers.phone"
strategy = "partial"
keep = 4
except_groups = ["dba"]

[detectors]
builtin = ["email", "ssn", "credit_card", "phone", "aws_access_key", "jwt"]
except_groups = ["dba"]
custom = [{{ name = "employee_id", pattern = 'EMP-\\d{{6}}' }}]

[audit]
dir = "audit"
durability = "batched"

[limits]
shutdown_timeout = "5s"  # Ctrl-C waits at most this long for statements in flight
'''


def write_config(home: Path, text: str) -> tuple[Path, bool]:
    """Write the generated config unless the user edited the last one we wrote.
    Returns the path and whether the user's own version was kept."""
    path = home / CONFIG_NAME
    stamp = home / f".{CONFIG_NAME}.sha256"
    if path.exists():
        ours = stamp.read_text().strip() if stamp.exists() else None
        if ours != hashlib.sha256(path.read_bytes()).hexdigest():
            return path, True
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    stamp.write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")
    return path, False


# -- banner -----------------------------------------------------------------------------------

def dsn(user: str, password: str, port: int) -> str:
    return f"postgresql://{user}:{password}@{LISTEN_ADDRESS}:{port}/{DATABASE}"


def pgguard_command() -> str:
    """How to run this installation's ``pgguard`` from any terminal: the absolute path
    of the script next to this Python (a virtualenv's bin), else ``python -m pgguard``."""
    script = Path(sys.executable).parent / "pgguard"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script.absolute()))
    return f"{shlex.quote(sys.executable)} -m pgguard"


def banner(*, port: int, passwords: dict[str, str], config_path: Path, pgdata: Path,
           pg_version: str, psql: str, agent_token: str = "", admin_url: str = "",
           pg_what: str = "an embedded Postgres") -> str:
    cfg = shlex.quote(str(config_path))
    pgguard = pgguard_command()
    fmt = {"config": cfg, "admin_url": admin_url, "pgguard": pgguard,
           "console": f"postgresql://{HUMAN}:{passwords[HUMAN]}@{LISTEN_ADDRESS}:{port}/pgguard"}
    out = [
        "",
        f"pgguard demo: the proxy listens on {LISTEN_ADDRESS}:{port}, in front of "
        f"{pg_what} {pg_version} (database {DATABASE!r})",
        f"  config: {cfg}",
        f"  data:   {pgdata}",
        "",
        f"Connect as the AI agent {AGENT} (kind agent, guarded) with a 15-minute token:",
        f"  {psql} '{dsn(AGENT, agent_token, port)}'",
        "  a fresh token, from another terminal:",
        f"  PGGUARD_TOKEN_SECRET=$(cat "
        f"{shlex.quote(str(config_path.parent / 'secrets' / 'token-secret.password'))}) "
        f"{pgguard} token issue -c {cfg} --identity {AGENT}",
        f"Connect as {HUMAN} (kind human, group dba):",
        f"  {psql} '{dsn(HUMAN, passwords[HUMAN], port)}'",
        f"Admin console (web: {admin_url}, token: {passwords.get('admin-token', '')})",
        f"The pgguard command of this installation (not on your PATH unless the virtualenv "
        f"is active): {pgguard}",
        "",
        f"Works today: {WORKS_TODAY}",
    ]
    if not all(t.ready for t in TRIES):
        out.append("Still to come (marked 'later'): until then those statements run as written; "
                   "the demo reloads its sample data at the next start if they changed it.")
    out += ["", f"What to try as {AGENT}:"]
    for t in TRIES:
        what = t.what.format(**fmt)
        out.append(f"  {'$ ' if t.shell else ''}{what}")
        if t.ready:
            out.append(f"      -> {t.effect.format(**fmt)}")
        else:
            out.append(f"      later: {t.effect.format(**fmt)}")
            out.append(f"      today: {t.today}")
    out += ["", "Ctrl-C stops the proxy and the demo's Postgres.", ""]
    return "\n".join(out)


def _psql_command(pg: _DemoPostgres) -> str:
    if isinstance(pg, SystemPostgres) or shutil.which("psql"):
        return "psql"       # the same major as the server (choose_postgres)
    return pg.psql_path


def _announce_when_listening(port: int, text: str, done: threading.Event) -> None:
    # server.run has no "ready" callback: print once the listener accepts connections
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        try:
            socket.create_connection((LISTEN_ADDRESS, port), timeout=0.5).close()
        except OSError:
            done.wait(0.05)
            continue
        print(text, flush=True)
        return


def port_problem(port: int) -> str | None:
    """Why the proxy could not listen on the port, or None when it is free."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # no SO_REUSEPORT here: a pgguard that already listens with it must count as busy
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((LISTEN_ADDRESS, port))
    except OSError as e:
        return e.strerror or str(e)
    finally:
        s.close()
    return None


# -- main -------------------------------------------------------------------------------------

def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(port: int = 6432, directory: str | None = None) -> int:
    """Run the demo until Ctrl-C. Example: ``main(port=6432, directory="pgguard-demo")``."""
    if not 1 <= port <= 65535:
        raise DemoError("--port must be between 1 and 65535")
    problem = port_problem(port)
    if problem:
        raise DemoError(f"cannot listen on {LISTEN_ADDRESS}:{port}: {problem}; "
                        "pick another port with --port")
    home = Path(directory or DEFAULT_DIR).expanduser().resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create {home}: {e.strerror}") from None

    pg = choose_postgres(home)
    old_term = signal.signal(signal.SIGTERM, _interrupt)   # setup: SIGTERM cleans up too
    done = threading.Event()
    code = 0
    try:
        first = pg.first_start
        print(f"Starting {pg.what} in {pg.pgdata}"
              + (" (first start: initdb, then the sample data; about half a minute)"
                 if first else "") + " ...", flush=True)
        pg.start()
        files = ensure_passwords(home)
        passwords = {name: read_password(p) for name, p in files.items()}
        print(prepare_database(pg, home, passwords[UPSTREAM_ROLE]), flush=True)
        version = pg.psql("SHOW server_version")
        text = config_text(port=port, socket_dir=pg.socket_dir, upstream_port=pg.port)
        config_path, kept = write_config(home, text)
        cfg = config.load(config_path)
        if kept:
            print(f"Using your edited {config_path} (delete it to get the generated one)",
                  flush=True)
            cfg.listen.address, cfg.listen.port = LISTEN_ADDRESS, port
            cfg.upstream.host, cfg.upstream.port = pg.socket_dir, pg.port
        # the proxy reads these two secrets from the environment, as in production
        os.environ["PGGUARD_TOKEN_SECRET"] = passwords["token-secret"]
        os.environ["PGGUARD_ADMIN_TOKEN"] = passwords["admin-token"]
        agent_token, _ = tokens.issue(cfg, AGENT, "15m", [DATABASE], "readwrite")
        text = banner(port=port, passwords=passwords, config_path=config_path,
                      pgdata=pg.pgdata, pg_version=version, psql=_psql_command(pg),
                      agent_token=agent_token, admin_url=admin_url(cfg), pg_what=pg.what)
        threading.Thread(target=_announce_when_listening, args=(port, text, done),
                         name="pgguard-demo-banner", daemon=True).start()
        try:
            code = server.run(cfg)
        except KeyboardInterrupt:       # before the proxy's own signal handlers were in
            code = 0
    except KeyboardInterrupt:
        code = 130
    finally:
        done.set()
        # a second Ctrl-C must not cut pg_ctl stop short (children inherit SIG_IGN)
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if pg.srv is not None:
                print(f"Stopping {pg.what} ...", flush=True)
            note = pg.stop()
            if note:
                print(f"pgguard demo: {note}", file=sys.stderr, flush=True)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    return code
