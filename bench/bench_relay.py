# Side-by-side relay benchmark: direct Postgres vs PgBouncer vs pgguard (and pgguard variants).
"""Reproducible relay benchmark: direct Postgres, PgBouncer and pgguard in one run.

The script starts everything it needs in a temporary directory and removes it at exit
(also on Ctrl-C or SIGTERM):

- its own Postgres (initdb, fsync off, max_connections 200, shared_buffers 256MB) with
  pgbench data (scale 10) and ``bench_rows`` (1M rows of ~100 bytes) for streaming;
- PgBouncer in session mode (the Debian package is installed when missing and we are root);
- pgguard (``python -m pgguard serve``) with a config written here, plus one more pgguard
  process per ``--variant`` (the base config merged with a TOML file of yours).

Then it runs, interleaved, ``--reps`` repetitions of: pgbench select-only
(``-n -S -c 8 -j 2 -T DURATION``) with ``-M simple`` and ``-M prepared``, a full
``SELECT * FROM bench_rows`` with psycopg (text), and ``COPY bench_rows TO STDOUT``.
It prints medians, proxy CPU per transaction and the ratios against direct and PgBouncer.

Examples::

    /tmp/venv/bin/python bench/bench_relay.py --quick
    /tmp/venv/bin/python bench/bench_relay.py --reps 3 --duration 10 --json relay.json
    /tmp/venv/bin/python bench/bench_relay.py --targets direct,pgguard \\
        --variant policy=my-policy.toml --variant masking=my-masks.toml
    /tmp/venv/bin/python bench/bench_relay.py --quick --profile   # py-spy flame graphs
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import glob
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
DBNAME = "bench"
PG_USER = "postgres"              # superuser of the bench cluster (trust auth on loopback)
PGGUARD_IDENTITY = "bench"        # identity clients name when connecting through pgguard
BUILTIN_TARGETS = ("direct", "pgbouncer", "pgguard")
TESTS = ("simple", "prepared", "select", "copy", "tpcb")
# what the tables show: metric name -> (test, sample key, column title, decimals)
METRICS = {
    "simple": ("simple", "value", "simple tps", 0),
    "prepared": ("prepared", "value", "prepared tps", 0),
    "select": ("select", "value", "select MB/s", 1),     # execute + fetch all rows (psycopg)
    "xfer": ("select", "xfer", "xfer MB/s", 1),          # execute only: libpq holds the result
    "copy": ("copy", "value", "copy MB/s", 1),
    "tpcb": ("tpcb", "value", "tpcb tps", 0),          # pgbench TPC-B-like, -M prepared
}
MB = 1e6                           # MB/s means 10^6 bytes per second


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# cleanup: every started thing registers how to undo itself; runs once, in reverse order

class Cleanup:
    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []
        self._done = False

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self._actions.append((what, fn))

    def run(self) -> None:
        if self._done:
            return
        self._done = True
        # a second Ctrl-C must not interrupt the teardown half-way
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (OSError, ValueError):
                pass
        while self._actions:
            what, fn = self._actions.pop()
            try:
                fn()
            except Exception as e:  # keep going: the rest must still be cleaned
                log(f"cleanup of {what} failed: {e}")


CLEANUP = Cleanup()


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _die_with_parent(sig: int) -> Callable[[], None]:
    # servers get `sig` if this script dies without running its cleanup (e.g. SIGKILL)
    def preexec() -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
        except OSError:
            pass
    return preexec


# ---------------------------------------------------------------------------------------
# small helpers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def is_root() -> bool:
    return os.geteuid() == 0


def as_pg_user(cmd: list[str]) -> list[str]:
    """Postgres and PgBouncer refuse to run as root: drop to the `postgres` OS user."""
    if not is_root():
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def chown_pg(path: Path) -> None:
    if is_root():
        import pwd
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:]) or "    (empty log)"


def proc_tree_cpu(root_pid: int) -> float:
    """User+system CPU seconds of a process and all its live descendants (from /proc)."""
    return sum(proc_tree_cpu_split(root_pid).values())


def proc_tree_cpu_split(root_pid: int) -> dict[str, float]:
    """The same, split: user and system CPU seconds of the serving processes and of
    pgguard's audit writers (a descendant running ``pgguard.audit.writerproc``)."""
    parents: dict[int, int] = {}
    ticks: dict[int, tuple[int, int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                data = f.read()
        except OSError:
            continue
        pid = int(stat.split("/")[2])
        fields = data[data.rindex(")") + 2:].split()
        parents[pid] = int(fields[1])
        ticks[pid] = (int(fields[11]), int(fields[12]))     # utime, stime
    split = dict.fromkeys(("proxy_user", "proxy_sys", "writer_user", "writer_sys"), 0)
    todo = [root_pid]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in ticks:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                who = "writer" if b"audit.writerproc" in f.read() else "proxy"
        except OSError:
            who = "proxy"
        split[f"{who}_user"] += ticks[pid][0]
        split[f"{who}_sys"] += ticks[pid][1]
        todo.extend(c for c, p in parents.items() if p == pid)
    hz = os.sysconf("SC_CLK_TCK")
    return {k: v / hz for k, v in split.items()}


def stop_process_group(proc: subprocess.Popen, name: str, sig: int = signal.SIGTERM,
                       timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"{name} did not stop within {timeout:.0f}s; killing it")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def spawn(cmd: list[str], logfile: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None, as_postgres: bool = False,
          death_signal: int = signal.SIGTERM) -> subprocess.Popen:
    # as_postgres: become the postgres OS user in the child itself (not via runuser), so the
    # server is our direct child and we reap it
    creds: dict[str, Any] = {}
    if as_postgres and is_root():
        import pwd
        pw = pwd.getpwnam("postgres")
        creds = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        env = dict(env if env is not None else os.environ, HOME=pw.pw_dir, USER="postgres",
                   LOGNAME="postgres")
    out = open(logfile, "ab")
    try:
        # own session: Ctrl-C in the terminal reaches this script, which stops servers in order
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True,
                                preexec_fn=_die_with_parent(death_signal), **creds)
    finally:
        out.close()


# ---------------------------------------------------------------------------------------
# TOML: variants are merged into the base pgguard config (tables merge, arrays of tables
# such as [[rules]] and [[masks]] are appended), then written back as TOML

def merge_toml(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_toml(out[k], v)
        elif (isinstance(v, list) and isinstance(out.get(k), list) and v and out[k]
              and all(isinstance(x, dict) for x in v + out[k])):
            out[k] = out[k] + v
        else:
            out[k] = v
    return out


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if hasattr(v, "isoformat"):
        return v.isoformat()
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dumps_toml(doc: dict) -> str:
    lines: list[str] = []

    def table(path: list[str], d: dict) -> None:
        if not d or any(not isinstance(v, dict) for v in d.values()):
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in d.items():
            if not isinstance(v, dict):
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                table(path + [k], v)

    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    for k, v in doc.items():
        if not isinstance(v, dict) and not is_table_array(v):
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in doc.items():
        if isinstance(v, dict):
            table([k], v)
    for k, v in doc.items():
        if is_table_array(v):
            for item in v:
                lines.append("")
                lines.append(f"[[{_toml_key(k)}]]")
                for kk, vv in item.items():
                    lines.append(f"{_toml_key(kk)} = {_toml_value(vv)}")
    return "\n".join(lines).lstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------
# targets

@dataclass
class Target:
    name: str
    kind: str                      # direct | pgbouncer | pgguard
    port: int
    user: str
    password: str | None = None
    proc: subprocess.Popen | None = None
    cpu_pid: int | None = None     # root of the process tree whose CPU we account
    logfile: Path | None = None
    config: Path | None = None
    error: str | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PGPASSWORD", None)
        env["PGSSLMODE"] = "disable"
        env["PGCONNECT_TIMEOUT"] = "10"
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        return env

    def conninfo(self) -> dict[str, Any]:
        ci: dict[str, Any] = dict(host="127.0.0.1", port=self.port, user=self.user,
                                  dbname=DBNAME, sslmode="disable", connect_timeout=10)
        if self.password is not None:
            ci["password"] = self.password
        return ci

    def cpu(self) -> float | None:
        return proc_tree_cpu(self.cpu_pid) if self.cpu_pid else None

    def cpu_split(self) -> dict[str, float] | None:
        return proc_tree_cpu_split(self.cpu_pid) if self.cpu_pid else None


def find_pg_bindir(explicit: str | None) -> Path:
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                 check=True).stdout.strip()
            candidates.append(Path(out))
        except (subprocess.CalledProcessError, OSError):
            pass

    def version_key(p: str) -> float:
        m = re.search(r"/postgresql/([\d.]+)/", p)
        return float(m.group(1)) if m else 0.0

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                           key=version_key, reverse=True)]

    def usable(c: Path) -> bool:
        return all((c / exe).exists() for exe in ("initdb", "postgres", "pg_isready", "pgbench"))

    for c in candidates:
        if usable(c):
            return c
    try:  # last resort: the pgserver wheel's embedded Postgres (imported only when needed)
        import importlib.util
        spec = importlib.util.find_spec("pgserver")
        if spec and spec.origin:
            c = Path(spec.origin).parent / "pginstall" / "bin"
            if usable(c):
                return c
    except ImportError:
        pass
    raise BenchError("no Postgres binaries found (initdb, postgres, pg_isready, pgbench); "
                     "install postgresql or pass --pg-bindir")


class PostgresServer:
    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.data = root / "pgdata"
        self.sockdir = root / "pgsock"
        self.logfile = root / "postgres.log"
        self.port = free_port()
        self.version = ""
        self.proc: subprocess.Popen | None = None

    def _run(self, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run(as_pg_user(cmd), capture_output=True, text=True, **kw)

    def start(self) -> None:
        for d in (self.data, self.sockdir):
            d.mkdir(mode=0o700)
            chown_pg(d)
        self.logfile.touch()
        chown_pg(self.logfile)
        r = self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", PG_USER,
                       "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        if r.returncode != 0:
            raise BenchError(f"initdb failed:\n{r.stdout}{r.stderr}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockdir}'",
            "max_connections": "200",
            "shared_buffers": "256MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_parallel_workers_per_gather": "0",   # measure the relay, not parallel scans
            "logging_collector": "off",
        }
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# pgguard bench\n")
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")
        # the postmaster runs as our direct child (not daemonized by pg_ctl): we reap it, and
        # it gets SIGINT (fast shutdown) if this script dies without cleaning up
        self.proc = spawn([str(self.bindir / "postgres"), "-D", str(self.data)], self.logfile,
                          as_postgres=True, death_signal=signal.SIGINT)
        CLEANUP.push("postgres", self.stop)
        deadline = time.monotonic() + 60
        pg_isready = self.bindir / "pg_isready"
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"postgres exited with code {self.proc.returncode}:\n"
                                 f"{tail(self.logfile)}")
            r = subprocess.run([str(pg_isready), "-q", "-h", "127.0.0.1", "-p", str(self.port),
                                "-U", PG_USER, "-d", "postgres"], capture_output=True)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"postgres is not ready after 60s:\n{tail(self.logfile)}")
            time.sleep(0.2)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # SIGINT: fast shutdown; SIGQUIT: immediate; then SIGKILL (only the postmaster we started)
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGQUIT, 10), (signal.SIGKILL, 10)):
            try:
                proc.send_signal(sig)
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                log(f"postgres did not stop after {signal.Signals(sig).name}")
            except ProcessLookupError:
                return

    def target(self) -> Target:
        return Target("direct", "direct", self.port, PG_USER, cpu_pid=None)



def find_or_install_pgbouncer(allow_install: bool) -> str | None:
    def which() -> str | None:
        return shutil.which("pgbouncer") or next(
            (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)),
            None)

    found = which()
    if found or not allow_install:
        return found
    if not (is_root() and shutil.which("apt-get")):
        log("pgbouncer is not installed and cannot be installed here (needs root and apt-get)")
        return None
    log("pgbouncer is not installed: apt-get update && apt-get install -y pgbouncer")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends",
                                          "pgbouncer"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            log(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
            return None
    return which()


class MultiTarget(Target):
    """A target served by several processes (PgBouncer x N): CPU summed over all."""

    def __init__(self, *a: Any, pids: list[int] | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.pids = pids or []

    def cpu(self) -> float | None:
        return sum(proc_tree_cpu(p) for p in self.pids) if self.pids else None

    def cpu_split(self) -> dict[str, float] | None:
        if not self.pids:
            return None
        parts = [proc_tree_cpu_split(p) for p in self.pids]
        return {k: sum(x[k] for x in parts) for k in parts[0]}


def start_pgbouncer(exe: str, root: Path, pg: PostgresServer, name: str = "pgbouncer",
                    upstream_host: str = "127.0.0.1", n: int = 1) -> Target:
    """PgBouncer in session mode reaching Postgres at upstream_host (an address, or
    the Unix socket directory); n processes on one port (so_reuseport) when n > 1."""
    d = root / name
    d.mkdir(mode=0o755)
    chown_pg(d)
    port = free_port()
    (d / "userlist.txt").write_text(f'"{PG_USER}" ""\n')
    chown_pg(d / "userlist.txt")
    procs = []
    for i in range(n):
        ini = d / f"pgbouncer{i}.ini"
        ini.write_text(f"""\
[databases]
* = host={upstream_host} port={pg.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
so_reuseport = {1 if n > 1 else 0}
auth_type = trust
auth_file = {d / 'userlist.txt'}
pool_mode = session
max_client_conn = 500
default_pool_size = 50
ignore_startup_parameters = extra_float_digits
logfile = {d / f'pgbouncer{i}.log'}
pidfile = {d / f'pgbouncer{i}.pid'}
admin_users = {PG_USER}
log_connections = 0
log_disconnections = 0
""")
        chown_pg(ini)
        out = d / f"pgbouncer{i}.out"
        out.touch()
        chown_pg(out)
        proc = spawn([exe, str(ini)], out, cwd=d, as_postgres=True)
        procs.append(proc)
        CLEANUP.push(f"{name}[{i}]", lambda p=proc: stop_process_group(p, name))
    t = MultiTarget(name, "pgbouncer", port, PG_USER, proc=procs[0], cpu_pid=procs[0].pid,
                    logfile=d / "pgbouncer0.log", config=d / "pgbouncer0.ini",
                    pids=[p.pid for p in procs])
    wait_ready(t, extra_log=d / "pgbouncer0.out")
    return t


def pgguard_base_config(port: int, admin_port: int, pg: PostgresServer, workdir: Path) -> dict:
    return {
        "listen": {"address": "127.0.0.1", "port": port},
        "admin": {"address": "127.0.0.1", "port": admin_port, "token_env": "PGGUARD_ADMIN_TOKEN"},
        "upstream": {"host": "127.0.0.1", "port": pg.port, "user": PG_USER, "sslmode": "disable"},
        "auth": {"token_secret_env": "PGGUARD_TOKEN_SECRET"},
        "identities": {PGGUARD_IDENTITY: {"kind": "agent", "groups": ["bench"],
                                          "password_env": "PGGUARD_BENCH_PASSWORD"}},
        "audit": {"dir": str(workdir / "audit")},
        "limits": {"shutdown_timeout": "3s"},
    }


def start_pgguard(name: str, root: Path, pg: PostgresServer, extras: list[Path],
                  python: str, workers: int, password: str) -> Target:
    workdir = root / f"pgguard-{name}"
    workdir.mkdir()
    port, admin_port = free_port(), free_port()
    doc = pgguard_base_config(port, admin_port, pg, workdir)
    for extra in extras:
        try:
            doc = merge_toml(doc, tomllib.loads(extra.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise BenchError(f"{name}: cannot read {extra}: {e}") from None
    # the listen/admin ports are ours: a variant file must not make two processes collide
    doc["listen"]["port"], doc["admin"]["port"] = port, admin_port
    cfg = workdir / "pgguard.toml"
    cfg.write_text(f"# written by bench/bench_relay.py for target {name!r}\n" + dumps_toml(doc))
    env = dict(os.environ, PGGUARD_BENCH_PASSWORD=password,
               PGGUARD_TOKEN_SECRET=secrets.token_hex(32),
               PGGUARD_ADMIN_TOKEN=secrets.token_hex(16))
    t = Target(name, "pgguard", port, PGGUARD_IDENTITY, password=password,
               logfile=workdir / "pgguard.log", config=cfg)
    r = subprocess.run([python, "-m", "pgguard", "check", "-c", str(cfg)], capture_output=True,
                       text=True, env=env, cwd=workdir)
    if r.returncode != 0:
        raise BenchError(f"{name}: `pgguard check` rejected the config "
                         f"(exit {r.returncode}): {(r.stderr or r.stdout).strip()}\n"
                         f"config {cfg}:\n{cfg.read_text()}")
    cmd = [python, "-m", "pgguard", "serve", "-c", str(cfg), "--workers", str(workers)]
    proc = spawn(cmd, t.logfile, env=env, cwd=workdir)
    t.proc, t.cpu_pid = proc, proc.pid
    CLEANUP.push(name, lambda: stop_process_group(proc, name))
    wait_ready(t)
    return t


def wait_ready(t: Target, timeout: float = 30.0, extra_log: Path | None = None) -> None:
    import psycopg
    deadline = time.monotonic() + timeout
    while not port_open(t.port):
        if t.proc is not None and t.proc.poll() is not None:
            raise BenchError(f"{t.name} exited with code {t.proc.returncode} before listening; "
                             f"log {t.logfile}:\n{tail(t.logfile)}"
                             + (f"\n{tail(extra_log)}" if extra_log else ""))
        if time.monotonic() > deadline:
            raise BenchError(f"{t.name} is not listening on port {t.port} after {timeout:.0f}s; "
                             f"log:\n{tail(t.logfile)}")
        time.sleep(0.1)
    try:
        with psycopg.connect(**t.conninfo(), autocommit=True) as conn:
            got = conn.execute("SELECT 1").fetchone()
        if got != (1,):
            raise BenchError(f"{t.name}: SELECT 1 returned {got!r}")
    except psycopg.Error as e:
        raise BenchError(f"{t.name} listens on {t.port} but a psycopg SELECT 1 failed: "
                         f"{type(e).__name__}: {e}\nlog:\n{tail(t.logfile)}") from None


# ---------------------------------------------------------------------------------------
# data

def load_data(pg: PostgresServer, rows: int, scale: int) -> dict[str, Any]:
    import psycopg
    admin = dict(host="127.0.0.1", port=pg.port, user=PG_USER, sslmode="disable")
    with psycopg.connect(**admin, dbname="postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DBNAME}")
        pg.version = conn.execute("SHOW server_version").fetchone()[0]
    log(f"pgbench -i -s {scale}")
    r = subprocess.run([str(pg.bindir / "pgbench"), "-i", "-q", "-s", str(scale), "-h",
                        "127.0.0.1", "-p", str(pg.port), "-U", PG_USER, DBNAME],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"pgbench -i failed:\n{r.stderr[-3000:]}")
    log(f"creating bench_rows with {rows} rows")
    with psycopg.connect(**admin, dbname=DBNAME, autocommit=True) as conn:
        conn.execute("""
            CREATE TABLE bench_rows (id int PRIMARY KEY, name text, email text, ssn text,
                                     note text)""")
        conn.execute("""
            INSERT INTO bench_rows
            SELECT g,
                   'Customer ' || g,
                   'user' || g || '@example.com',
                   lpad(((g::bigint * 7919) %% 899 + 100)::text, 3, '0') || '-' ||
                     lpad((g %% 89 + 10)::text, 2, '0') || '-' ||
                     lpad((g %% 8999 + 1000)::text, 4, '0'),
                   left(md5(g::text) || md5((g + 1)::text), 40)
            FROM generate_series(1, %s) AS g""", (rows,))
        conn.execute("VACUUM ANALYZE")
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
            conn.execute("SELECT pg_prewarm('bench_rows'), pg_prewarm('pgbench_accounts')")
        except psycopg.Error:
            pass
        count, datarow_bytes, cells = conn.execute("""
            SELECT count(*),
                   sum(7 + 5 * 4 + octet_length(id::text) + octet_length(name)
                       + octet_length(email) + octet_length(ssn) + octet_length(note)),
                   sum(octet_length(id::text) + octet_length(name) + octet_length(email)
                       + octet_length(ssn) + octet_length(note))
            FROM bench_rows""").fetchone()
        table_size = conn.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('bench_rows'))").fetchone()[0]
    return {"rows": int(count), "datarow_bytes": int(datarow_bytes),
            "cell_bytes": int(cells), "table_size": table_size}


# ---------------------------------------------------------------------------------------
# measurements

_TPS = re.compile(r"^tps = ([\d.]+) \((?:without|excluding) initial connection", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.M)


def run_pgbench(pgbench: Path, t: Target, mode: str, args: argparse.Namespace,
                duration: int) -> dict[str, Any]:
    # tpcb: the built-in TPC-B-like script (three guarded UPDATEs per transaction)
    workload = ["-M", "prepared"] if mode == "tpcb" else ["-S", "-M", mode]
    cmd = [str(pgbench), "-n", *workload, "-c", str(args.clients), "-j", str(args.threads),
           "-T", str(duration), "-h", "127.0.0.1", "-p", str(t.port), "-U", t.user,
           DBNAME]
    cpu0 = t.cpu()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=t.env(),
                           timeout=duration + 60)
    except subprocess.TimeoutExpired:
        return {"value": None, "error": f"pgbench did not finish within {duration + 60}s"}
    cpu1 = t.cpu()
    out = r.stdout
    m_tps, m_txn = _TPS.search(out), _PROCESSED.search(out)
    m_fail, m_lat = _FAILED.search(out), _LATENCY.search(out)
    res: dict[str, Any] = {
        "value": float(m_tps.group(1)) if m_tps else None,
        "txns": int(m_txn.group(1)) if m_txn else None,
        "failed": int(m_fail.group(1)) if m_fail else None,
        "latency_ms": float(m_lat.group(1)) if m_lat else None,
        "exit": r.returncode,
    }
    if cpu0 is not None and cpu1 is not None:
        res["proxy_cpu_s"] = round(cpu1 - cpu0, 3)
        if res["txns"]:
            res["proxy_cpu_us_per_txn"] = round((cpu1 - cpu0) / res["txns"] * 1e6, 2)
    if r.returncode != 0 or res["value"] is None:
        res["error"] = (f"pgbench exit {r.returncode}: "
                        + " | ".join((r.stderr.strip().splitlines() or ["(no stderr)"])[-4:]))
    return res


def stream_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process: time one full read of bench_rows (SELECT or COPY)."""
    import psycopg
    with psycopg.connect(**spec["conninfo"], autocommit=True) as conn:
        with conn.cursor() as cur:
            if spec["test"] == "select":
                n = 0
                t0 = time.perf_counter()
                # a client-side cursor: execute() returns once libpq holds the whole result
                cur.execute("SELECT * FROM bench_rows")
                xfer = time.perf_counter() - t0
                while batch := cur.fetchmany(20000):
                    n += len(batch)
                elapsed = time.perf_counter() - t0
                return {"rows": n, "bytes": spec["datarow_bytes"], "seconds": elapsed,
                        "xfer_seconds": xfer}
            n = nbytes = 0
            t0 = time.perf_counter()
            with cur.copy("COPY bench_rows TO STDOUT") as copy:
                while data := copy.read():
                    n += 1
                    nbytes += len(data)
            elapsed = time.perf_counter() - t0
            return {"rows": n, "bytes": nbytes + 5 * n, "seconds": elapsed}


def run_stream(t: Target, test: str, data: dict[str, Any]) -> dict[str, Any]:
    spec = {"conninfo": t.conninfo(), "test": test, "datarow_bytes": data["datarow_bytes"]}
    timeout = max(120.0, data["rows"] / 2000)
    cpu0 = t.cpu()
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--stream-worker",
                            json.dumps(spec)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"value": None, "error": f"{test} did not finish within {timeout:.0f}s"}
    cpu1 = t.cpu()
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"value": None, "error": f"{test} client failed: {last}"}
    got = json.loads(r.stdout)
    res: dict[str, Any] = {"value": got["bytes"] / got["seconds"] / MB, "rows": got["rows"],
                           "bytes": got["bytes"], "seconds": round(got["seconds"], 4)}
    if got.get("xfer_seconds"):
        res["xfer"] = got["bytes"] / got["xfer_seconds"] / MB
        res["xfer_seconds"] = round(got["xfer_seconds"], 4)
    if cpu0 is not None and cpu1 is not None:
        res["proxy_cpu_s"] = round(cpu1 - cpu0, 3)
    if got["rows"] != data["rows"]:
        res["error"] = f"expected {data['rows']} rows, got {got['rows']}"
    return res


# ---------------------------------------------------------------------------------------
# reporting

def median(samples: list[dict[str, Any]], key: str = "value") -> float | None:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def spread(samples: list[dict[str, Any]], key: str = "value") -> float | None:
    vals = [s[key] for s in samples if s.get(key) is not None]
    if len(vals) < 2:
        return None
    med = statistics.median(vals)
    return (max(vals) - min(vals)) / 2 / med * 100 if med else None


def fmt_num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def report(meta: dict[str, Any], targets: list[Target], results: dict[str, dict[str, list]],
           variants: list[str]) -> dict[str, Any]:
    names = [t.name for t in targets]
    med = {n: {m: median(results[n][test], key) for m, (test, key, _, _) in METRICS.items()}
           for n in names}
    out = sys.stdout
    print("", file=out)
    print("pgguard relay benchmark", file=out)
    print(f"  command:  {meta['command']}", file=out)
    print(f"  machine:  nproc={meta['nproc']}, {meta['platform']}, "
          f"load avg at start {meta['loadavg_start']}", file=out)
    print(f"  versions: PostgreSQL {meta['postgres']}, {meta['pgbouncer'] or 'PgBouncer: n/a'}, "
          f"pgguard {meta['pgguard_commit']}, psycopg {meta['psycopg']}", file=out)
    print(f"  workload: pgbench -n -S -c {meta['clients']} -j {meta['threads']} "
          f"-T {meta['duration']} (-M simple | -M prepared); bench_rows {meta['rows']:,} rows "
          f"({meta['datarow_bytes'] / MB:.1f} MB as DataRow); {meta['reps']} interleaved rep(s)",
          file=out)
    print("", file=out)

    w = max(12, *(len(n) + 2 for n in names))
    head = (f"{'target':<{w}}" + "".join(f"{title:>16}" for _, _, title, _ in METRICS.values())
            + f"{'failed txns':>13}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for n in names:
        cells = []
        for m, (test, key, _, digits) in METRICS.items():
            v, sp = med[n][m], spread(results[n][test], key)
            cell = fmt_num(v, digits) + (f" ±{sp:.0f}%" if sp is not None else "")
            cells.append(f"{cell:>16}")
        failed = sum((s.get("failed") or 0) for test in ("simple", "prepared")
                     for s in results[n][test])
        errors = sum(1 for test in TESTS for s in results[n][test] if s.get("error"))
        extra = f"{failed}" + (f" ({errors} err)" if errors else "")
        print(f"{n:<{w}}" + "".join(cells) + f"{extra:>13}", file=out)
    print("  median over reps; ±: half the min-max range as % of the median; MB/s: 10^6 bytes/s "
          "of DataRow (select, xfer) or CopyData (copy)\n  messages; select = execute + fetch "
          "every row as Python objects, xfer = until execute() returns (libpq holds the result)",
          file=out)

    proxies = [t for t in targets if t.kind != "direct"]
    cpu: dict[str, dict[str, float | None]] = {}
    if proxies:
        print("", file=out)
        head = (f"{'proxy CPU':<{w}}{'simple us/txn':>16}{'prepared us/txn':>18}"
                f"{'select cpu s':>15}{'copy cpu s':>13}")
        print(head, file=out)
        print("-" * len(head), file=out)
        for t in proxies:
            r = results[t.name]
            cpu[t.name] = {
                "simple_us_per_txn": median(r["simple"], "proxy_cpu_us_per_txn"),
                "prepared_us_per_txn": median(r["prepared"], "proxy_cpu_us_per_txn"),
                "select_cpu_s": median(r["select"], "proxy_cpu_s"),
                "copy_cpu_s": median(r["copy"], "proxy_cpu_s"),
            }
            c = cpu[t.name]
            print(f"{t.name:<{w}}{fmt_num(c['simple_us_per_txn'], 1):>16}"
                  f"{fmt_num(c['prepared_us_per_txn'], 1):>18}{fmt_num(c['select_cpu_s'], 2):>15}"
                  f"{fmt_num(c['copy_cpu_s'], 2):>13}", file=out)
        print("  (user+system CPU of the proxy's process tree during the run, from /proc)",
              file=out)

    pairs: list[tuple[str, str]] = []
    if "pgbouncer" in names and "direct" in names:
        pairs.append(("pgbouncer", "direct"))
    for n in [x for x in names if x == "pgguard"] + variants:
        if n not in names:
            continue
        for base in ("direct", "pgbouncer") + (("pgguard",) if n != "pgguard" else ()):
            if base in names:
                pairs.append((n, base))
    ratios: dict[str, dict[str, float | None]] = {}
    if pairs:
        print("", file=out)
        rw = max(len(f"{a}/{b}") for a, b in pairs) + 2
        head = f"{'ratio':<{rw}}" + "".join(f"{x:>10}" for x in METRICS)
        print(head, file=out)
        print("-" * len(head), file=out)
        for a, b in pairs:
            row = {}
            for m in METRICS:
                va, vb = med[a][m], med[b][m]
                row[m] = va / vb if va is not None and vb else None
            ratios[f"{a}/{b}"] = row
            print(f"{a + '/' + b:<{rw}}" + "".join(f"{fmt_num(row[x], 2):>10}" for x in METRICS),
                  file=out)
        print("  (> 1.00: the first is faster; tps and MB/s ratios of the medians)", file=out)

    goals = []
    if "pgguard" in names:
        rg = ratios
        checks = [("pgguard/pgbouncer", "simple", 1.0), ("pgguard/pgbouncer", "prepared", 1.0),
                  ("pgguard/direct", "select", 0.95), ("pgguard/direct", "xfer", 0.95),
                  ("pgguard/direct", "copy", 0.95)]
        for key, test, goal in checks:
            v = rg.get(key, {}).get(test)
            goals.append({"ratio": key, "test": test, "goal": goal, "value": v,
                          "met": None if v is None else v >= goal})
        print("", file=out)
        print("goals (issue 2: pgguard >= 1.0x PgBouncer in both modes, streaming >= 0.95x "
              "direct)", file=out)
        for g in goals:
            verdict = ("n/a" if g["met"] is None
                       else f"{g['value']:.2f}  {'met' if g['met'] else 'NOT met'}")
            print(f"  {g['ratio'] + ' ' + g['test']:<28} >= {g['goal']:.2f}: {verdict}", file=out)

    errors = [(n, test, i, s["error"]) for n in names for test in TESTS
              for i, s in enumerate(results[n][test]) if s.get("error")]
    if errors:
        print("", file=out)
        print("errors:", file=out)
        for n, test, i, e in errors[:40]:
            print(f"  {n} {test} rep {i + 1}: {e}", file=out)
    return {"medians": med, "proxy_cpu": cpu, "ratios": ratios, "goals": goals}


# ---------------------------------------------------------------------------------------
# profiling

def profile(pgbench: Path, t: Target, args: argparse.Namespace, duration: int) -> None:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(pyspy, os.X_OK):
        log("--profile: py-spy not found; skipping")
        return
    out = Path.cwd() / f"pgguard-profile-{t.name}-{time.strftime('%Y%m%d-%H%M%S')}.svg"
    cmd = [pyspy, "record", "--pid", str(t.cpu_pid), "--subprocesses", "--rate", "200",
           "--duration", str(duration), "--format", "flamegraph", "--output", str(out)]
    # --native (C/Cython frames: the compiled relay) must pause the process to unwind, which
    # costs throughput; Python-only sampling runs without pausing
    cmd.append("--native" if args.profile_native else "--nonblocking")
    log(f"profiling {t.name} during pgbench -M simple: {' '.join(cmd)}")
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    CLEANUP.push("py-spy", lambda: spy.poll() is None and spy.kill())
    time.sleep(1.0)
    res = run_pgbench(pgbench, t, "simple", args, max(1, duration - 2))
    try:
        spy_out, _ = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy_out, _ = spy.communicate()
    if spy.returncode == 0 and out.exists():
        log(f"flame graph: {out} (pgbench under profiling: {fmt_num(res.get('value'))} tps)")
    else:
        log(f"py-spy failed (exit {spy.returncode}): {spy_out.strip()[-1000:]}")


# ---------------------------------------------------------------------------------------
# main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 s pgbench runs, 1 rep, 200k rows (unless given explicitly)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3)")
    p.add_argument("--duration", type=int, default=None,
                   help="seconds per pgbench run (default 10)")
    p.add_argument("--rows", type=int, default=None, help="rows in bench_rows (default 1000000)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    p.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    p.add_argument("--targets", default=",".join(BUILTIN_TARGETS),
                   help="comma-separated built-in targets: direct,pgbouncer,pgguard "
                        "(variants always run)")
    p.add_argument("--tests", default="simple,prepared,select,copy",
                   help="comma-separated subset of simple,prepared,select,copy")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FILE",
                   help="one more pgguard process, its config = the base config merged with "
                        "this TOML file; repeatable")
    p.add_argument("--pgguard-config-extra", action="append", default=[], metavar="FILE",
                   help="TOML merged into every pgguard config (base and variants); repeatable")
    p.add_argument("--pgguard-workers", type=int, default=1, help="pgguard serve --workers")
    p.add_argument("--pgguard-python", default=sys.executable,
                   help="python that runs `-m pgguard` (default: this one)")
    p.add_argument("--pg-bindir", default=None,
                   help="directory with initdb, postgres, pg_isready, pgbench")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install pgbouncer when it is missing")
    p.add_argument("--json", metavar="FILE", help="write all samples, medians and ratios here")
    p.add_argument("--profile", action="store_true",
                   help="after the measurements, py-spy record each pgguard target during a "
                        "pgbench -M simple run; flame graph SVGs land in the current directory")
    p.add_argument("--profile-native", action="store_true",
                   help="with --profile: also sample native (Cython/C) frames")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp directory (configs, logs) for inspection; servers "
                        "are still stopped")
    p.add_argument("--stream-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.rows is None:
        args.rows = 200_000 if args.quick else 1_000_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stream_worker:
        print(json.dumps(stream_worker(json.loads(args.stream_worker))))
        return 0

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    atexit.register(CLEANUP.run)

    wanted = [x.strip() for x in args.targets.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in BUILTIN_TARGETS]
    if unknown:
        raise BenchError(f"--targets: unknown {', '.join(unknown)} "
                         f"(use {','.join(BUILTIN_TARGETS)})")
    tests = [x.strip() for x in args.tests.split(",") if x.strip()]
    if any(x not in TESTS for x in tests):
        raise BenchError(f"--tests: use a subset of {','.join(TESTS)}")
    variants: list[tuple[str, Path]] = []
    for spec in args.variant:
        name, sep, file = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in BUILTIN_TARGETS \
                or name in [v[0] for v in variants]:
            raise BenchError(f"--variant {spec!r}: use NAME=FILE with a new name "
                             "(letters, digits, _ . + -)")
        path = Path(file)
        if not path.is_file():
            raise BenchError(f"--variant {name}: no such file {file}")
        variants.append((name, path.resolve()))
    extras = [Path(x).resolve() for x in args.pgguard_config_extra]
    for e in extras:
        if not e.is_file():
            raise BenchError(f"--pgguard-config-extra: no such file {e}")

    import psycopg
    meta: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "nproc": os.cpu_count(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "reps": args.reps, "duration": args.duration, "clients": args.clients,
        "threads": args.threads, "scale": args.scale, "tests": tests,
        "pgguard_workers": args.pgguard_workers,
        "variants": {n: str(p) for n, p in variants},
        "pgguard_config_extra": [str(e) for e in extras],
    }
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "pgguard"], capture_output=True, text=True).stdout.strip()
        meta["pgguard_commit"] = (sha or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        meta["pgguard_commit"] = "unknown"

    root = Path(tempfile.mkdtemp(prefix="pgguard-bench-"))
    root.chmod(0o755)  # the postgres OS user must reach its data dir inside
    if args.keep:
        CLEANUP.push("tempdir", lambda: log(f"kept {root}"))
    else:
        CLEANUP.push("tempdir", lambda: shutil.rmtree(root, ignore_errors=True))
    log(f"work dir {root}")

    bindir = find_pg_bindir(args.pg_bindir)
    pgbench = bindir / "pgbench"
    pg = PostgresServer(bindir, root)
    log(f"starting Postgres from {bindir} on port {pg.port}")
    pg.start()
    data = load_data(pg, args.rows, args.scale)
    meta.update(postgres=pg.version, rows=data["rows"], datarow_bytes=data["datarow_bytes"],
                cell_bytes=data["cell_bytes"], table_size=data["table_size"])
    log(f"bench_rows: {data['rows']:,} rows, {data['table_size']} on disk, "
        f"{data['datarow_bytes'] / MB:.1f} MB as DataRow messages")

    targets: list[Target] = []
    failed_targets: dict[str, str] = {}
    if "direct" in wanted:
        targets.append(pg.target())
    meta["pgbouncer"] = None
    if "pgbouncer" in wanted:
        exe = find_or_install_pgbouncer(not args.no_install)
        if exe is None:
            msg = "PgBouncer is not available; continuing without it"
            log(msg)
            failed_targets["pgbouncer"] = msg
        else:
            v = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
            meta["pgbouncer"] = (v.splitlines() or ["PgBouncer ?"])[0].strip()
            try:
                log(f"starting {meta['pgbouncer']}")
                targets.append(start_pgbouncer(exe, root, pg))
            except BenchError as e:
                log(f"PgBouncer failed to start; continuing without it:\n{e}")
                failed_targets["pgbouncer"] = str(e)
    password = secrets.token_urlsafe(18)
    pgguard_specs = ([("pgguard", extras)] if "pgguard" in wanted else []) + \
        [(n, extras + [p]) for n, p in variants]
    for name, files in pgguard_specs:
        try:
            log(f"starting pgguard target {name!r}")
            t = start_pgguard(name, root, pg, files, args.pgguard_python,
                              args.pgguard_workers, password)
            targets.append(t)
            log(f"{name} is up on port {t.port} (config {t.config})")
        except BenchError as e:
            log(f"pgguard target {name!r} is not usable; continuing without it:\n{e}")
            failed_targets[name] = str(e)
    meta["failed_targets"] = failed_targets
    if not targets:
        raise BenchError("no target could be started")

    # warm-up: caches of Postgres, pgguard's decision cache, connection paths
    for t in targets:
        res = run_pgbench(pgbench, t, "simple", args, 1)
        if res.get("error"):
            log(f"warm-up on {t.name}: {res['error']}")

    results: dict[str, dict[str, list]] = {t.name: {x: [] for x in TESTS} for t in targets}
    total = args.reps * len(tests) * len(targets)
    done = 0
    for rep in range(args.reps):
        # rotate the order each repetition so no target always runs first (or last)
        order = targets[rep % len(targets):] + targets[:rep % len(targets)]
        for test in tests:
            for t in order:
                done += 1
                if test in ("simple", "prepared", "tpcb"):
                    res = run_pgbench(pgbench, t, test, args, args.duration)
                    shown = f"{fmt_num(res.get('value'))} tps"
                else:
                    res = run_stream(t, test, data)
                    shown = f"{fmt_num(res.get('value'), 1)} MB/s"
                results[t.name][test].append(res)
                log(f"[{done}/{total}] rep {rep + 1} {test:<8} {t.name:<12} {shown}"
                    + (f"  ERROR {res['error']}" if res.get("error") else ""))

    if args.profile:
        for t in targets:
            if t.kind == "pgguard":
                profile(pgbench, t, args, max(args.duration, 5))

    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = report(meta, targets, results, [n for n, _ in variants])
    if failed_targets:
        print("", file=sys.stdout)
        print("targets that could not run:", file=sys.stdout)
        for n, e in failed_targets.items():
            lines = [x.strip() for x in e.strip().splitlines() if x.strip()]
            print(f"  {n}: {lines[0] if lines else e}", file=sys.stdout)
            if len(lines) > 1:
                print(f"  {' ' * len(n)}  ... {lines[-1]}", file=sys.stdout)
        if not args.keep:
            print("  (rerun with --keep to keep the configs and logs)", file=sys.stdout)
    if args.json:
        doc = {"meta": meta, "targets": {t.name: {"kind": t.kind, "port": t.port,
                                                  "config": t.config.read_text()
                                                  if t.config and t.config.exists() else None}
                                         for t in targets},
               "samples": results, **summary}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench_relay: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench_relay: interrupted; cleaning up", file=sys.stderr)
        sys.exit(130)
