# A real, throwaway PostgreSQL server for the test suite: initdb into a temp dir, free port, teardown at exit.
from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import psycopg
from psycopg import sql as _sql

PG_OS_USER = "postgres"  # the unprivileged OS user the server runs as when we are root
HOST = "127.0.0.1"

_TEST_SETTINGS = {
    "listen_addresses": HOST,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "128MB",
}


# -- locating binaries ------------------------------------------------------------------------

def _has_server(d: Path) -> bool:
    return (d / "initdb").is_file() and (d / "postgres").is_file()


def _candidate_bindirs():
    """Yield (how it was found, directory or None) in search order."""
    env = os.environ.get("PGGUARD_TEST_PGBIN")
    if env:
        yield "$PGGUARD_TEST_PGBIN", Path(env)
        return  # an explicit choice: look nowhere else
    pg_config, bindir = shutil.which("pg_config"), None
    if pg_config:
        r = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = Path(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None
    yield "pg_config --bindir", bindir
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                    key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[-2].split(".")])
    yield "/usr/lib/postgresql/*/bin", Path(debian[-1]) if debian else None
    try:
        import pgserver
    except ImportError:
        yield "pgserver wheel (not installed)", None
    else:
        yield "pgserver wheel", Path(pgserver.__file__).parent / "pginstall" / "bin"


def find_pg_bindir() -> Path:
    """Directory holding initdb and postgres; RuntimeError naming every place tried."""
    tried = []
    for how, d in _candidate_bindirs():
        if d is not None and _has_server(d):
            return d
        tried.append(f"{how} -> {d or 'nothing'}")
    raise RuntimeError("no PostgreSQL server binaries (initdb + postgres) found; tried: "
                       + "; ".join(tried) + ". Set PGGUARD_TEST_PGBIN to a bin directory.")


def find_tool(name: str) -> Path:
    """A client tool (psql, pgbench, ...): the server bindirs first, then $PATH."""
    tried = []
    for how, d in _candidate_bindirs():
        if d is not None and (d / name).is_file():
            return d / name
        tried.append(f"{how} -> {d or 'nothing'}")
    found = shutil.which(name)
    if found:
        return Path(found)
    raise RuntimeError(f"{name} not found; tried: " + "; ".join(tried) + "; $PATH")


def has_ssl_support(bindir: Path | None = None) -> bool:
    """Whether the server binaries in `bindir` were built with OpenSSL."""
    bindir = Path(bindir or find_pg_bindir())
    if (bindir / "pg_config").is_file():
        r = subprocess.run([bindir / "pg_config", "--configure"], capture_output=True, text=True)
        if r.returncode == 0:
            return "--with-openssl" in r.stdout or "--with-ssl" in r.stdout
    # no pg_config next to the server: does the binary reference OpenSSL at all?
    return b"SSL_CTX_new" in (bindir / "postgres").read_bytes()


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never one this process handed out before: two
    bind(0) probes in a row may get the same number (a proxy's port and its admin port
    were once the same, and its clients reached the admin page half of the time)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _quote_conf(value) -> str:
    if isinstance(value, bool):
        value = "on" if value else "off"
    return "'" + str(value).replace("'", "''") + "'"


def _pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (our init may never reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# -- the cluster ------------------------------------------------------------------------------

class PgCluster:
    """One postmaster on 127.0.0.1:<free port>; admin work goes over its unix socket, so
    pg_hba lines added for TCP never lock the harness out."""

    host = HOST

    def __init__(self, datadir=None, *, bindir=None, port: int | None = None):
        self.bindir = Path(bindir) if bindir else find_pg_bindir()
        self.port = port or free_port()
        self._port_pinned = port is not None
        self._keep_datadir = datadir is not None
        self._user_datadir = Path(datadir).resolve() if datadir else None
        self.os_user = PG_OS_USER if os.geteuid() == 0 else None
        self.base: Path = self._make_base()  # temp dir: socket, log, certs (+ datadir unless given)
        self._started_once = False
        self._reload_gen = 0
        atexit.register(self._atexit_stop)

    # paths
    @property
    def datadir(self) -> Path:
        return self._user_datadir or self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    @property
    def logfile(self) -> Path:
        return self.base / "postgres.log"

    def _make_base(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix="pgguard-pg-", dir="/tmp"))  # traversable by anyone
        os.chmod(base, 0o755)
        (base / "sock").mkdir(mode=0o755)
        self._chown(base, base / "sock")
        return base

    # running commands as the server's OS user
    def _ids(self) -> tuple[int, int]:
        try:
            pw = pwd.getpwnam(self.os_user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", self.os_user], check=True)
            pw = pwd.getpwnam(self.os_user)
        return pw.pw_uid, pw.pw_gid

    def _chown(self, *paths: Path) -> None:
        if self.os_user:
            uid, gid = self._ids()
            for p in paths:
                os.chown(p, uid, gid)

    def _run(self, *args, check=True) -> subprocess.CompletedProcess:
        args = [str(a) for a in args]
        kw = {}
        if self.os_user:
            if shutil.which("runuser"):
                args = ["runuser", "-u", self.os_user, "--", *args]
            else:
                kw = {"user": self.os_user, "group": self._ids()[1], "extra_groups": []}
        r = subprocess.run(args, capture_output=True, text=True, cwd=self.base, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}"
                               f"{self._log_tail()}")
        return r

    def _log_tail(self, n=30) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return "\n--- server log ---\n" + "\n".join(lines) if lines else ""

    # lifecycle
    def _initdb(self) -> None:
        d = self.datadir
        if not d.exists():
            d.mkdir(mode=0o700, parents=True)
            self._chown(d)
        try:
            self._run(self.bindir / "initdb", "-D", d, "--auth=trust", "-U", "postgres",
                      "--no-sync", "--encoding=UTF8", "--locale=C")
        except RuntimeError as e:
            if self.os_user:
                e.add_note(f"(as root, the server runs as OS user {self.os_user!r}: the datadir "
                           "and every parent directory must be accessible to it)")
            raise
        with open(d / "postgresql.conf", "a") as f:
            f.write("\n# pgguard test harness\n")
            f.writelines(f"{k} = {_quote_conf(v)}\n" for k, v in _TEST_SETTINGS.items())
            f.write("include_if_exists = 'pgguard_reload.conf'\n")

    @property
    def running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def start(self) -> "PgCluster":
        if self.running:
            return self
        if not self.base.is_dir():  # removed by an earlier stop()
            self.base = self._make_base()
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(5):
            self._set_conf_lines({"port": self.port, "unix_socket_directories": self.socket_dir})
            r = self._run(self.bindir / "pg_ctl", "-w", "-t", "60", "-D", self.datadir,
                          "-l", self.logfile, "start", check=False)
            if r.returncode == 0:
                break
            in_use = "already in use" in self._log_tail(10)
            if in_use and not self._port_pinned and not self._started_once and attempt < 4:
                self.port = free_port()  # lost the free-port race; try another
                continue
            raise RuntimeError(f"postgres failed to start on port {self.port} "
                               f"(datadir {self.datadir}):\n{r.stdout}{r.stderr}{self._log_tail()}")
        self._started_once = True
        return self

    def stop(self, mode: str | None = None, cleanup: bool = True) -> None:
        """Stop the server (immediate for a temp datadir, fast for a given one); with
        `cleanup`, remove the temp dir too."""
        if self.running:
            mode = mode or ("fast" if self._keep_datadir else "immediate")
            self._run(self.bindir / "pg_ctl", "-w", "-D", self.datadir, "-m", mode, "stop")
        if cleanup:
            shutil.rmtree(self.base, ignore_errors=True)

    def _atexit_stop(self) -> None:
        try:
            self.stop()
        except Exception:
            pass

    def restart(self) -> None:
        self.stop(mode="fast", cleanup=False)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children (an upstream crash); datadir and port
        stay, so start() brings the server back after crash recovery."""
        pid = self.postmaster_pid()
        if pid is None or not _pid_alive(pid):
            raise RuntimeError("kill(): the server is not running")
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry))
        for p in [pid, *children]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_pid_alive(p) for p in [pid, *children]):
            if time.monotonic() > deadline:
                raise RuntimeError("kill(): postgres processes still alive 10 s after SIGKILL")
            time.sleep(0.01)
        # a dead postmaster may linger as an unreaped zombie (when init does not reap), which
        # postgres would take for a live one; with every process gone the lock files are stale
        (self.datadir / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket_dir.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)

    def __enter__(self) -> "PgCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PgCluster {self.host}:{self.port} bindir={self.bindir} datadir={self.datadir}>"

    # connecting
    def dsn(self, user: str = "postgres", password: str | None = None,
            dbname: str = "postgres", **params) -> str:
        """libpq URI over TCP; extra keyword params become query parameters (sslmode=...)."""
        auth = urllib.parse.quote(user, safe="")
        if password is not None:
            auth += ":" + urllib.parse.quote(password, safe="")
        uri = f"postgresql://{auth}@{self.host}:{self.port}/{urllib.parse.quote(dbname, safe='')}"
        return uri + ("?" + urllib.parse.urlencode(params) if params else "")

    def _admin_conninfo(self, user="postgres", dbname="postgres") -> str:
        return psycopg.conninfo.make_conninfo(host=str(self.socket_dir), port=self.port,
                                              user=user, dbname=dbname)

    def connect(self, user="postgres", dbname="postgres") -> psycopg.Connection:
        """An autocommit psycopg connection over the unix socket (trust)."""
        return psycopg.connect(self._admin_conninfo(user, dbname), autocommit=True)

    def execute(self, sql, params=None, *, user="postgres", dbname="postgres"):
        """Run one statement (autocommit); return its rows, or None if it returns none."""
        with self.connect(user, dbname) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else None

    def psql(self, sql: str, user: str = "postgres", dbname: str = "postgres") -> str:
        """psql -X -A -t -c `sql` over the unix socket; its stdout without the final newline."""
        psql = self.bindir / "psql" if (self.bindir / "psql").is_file() else find_tool("psql")
        r = subprocess.run([str(psql), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql,
                            "-h", str(self.socket_dir), "-p", str(self.port), "-U", user,
                            "-d", dbname], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.removesuffix("\n")

    # configuration
    def _set_conf_lines(self, settings: dict) -> None:
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.writelines(f"{k} = {_quote_conf(v)}\n" for k, v in settings.items())

    def reload(self) -> None:
        """pg_reload_conf(), then wait until new backends see it (postgresql.conf and
        pg_hba.conf are re-read together by the postmaster)."""
        if not self.running:
            return
        self._reload_gen += 1
        gen = str(self._reload_gen)
        path = self.datadir / "pgguard_reload.conf"
        path.write_text(f"pgguard.reload_generation = '{gen}'\n")
        self._chown(path)
        self.execute("select pg_reload_conf()")
        deadline = time.monotonic() + 10
        while self.execute("select current_setting('pgguard.reload_generation', true)")[0][0] != gen:
            if time.monotonic() > deadline:
                raise RuntimeError("reload not picked up within 10 s" + self._log_tail())
            time.sleep(0.01)

    def set_conf(self, **settings) -> None:
        """Append settings to postgresql.conf; reload, or restart if one needs it."""
        self._set_conf_lines(settings)
        if not self.running:
            return
        rows = self.execute("select name from pg_settings where context = 'postmaster' "
                            "and name = any(%s)", [list(settings)])
        if rows:
            self.restart()
        else:
            self.reload()

    def add_hba(self, lines: list[str]) -> None:
        """Prepend lines to pg_hba.conf (first match wins, so they beat the trust lines)."""
        hba = self.datadir / "pg_hba.conf"
        hba.write_text("".join(line.rstrip("\n") + "\n" for line in lines) + hba.read_text())
        self.reload()

    def create_role(self, name: str, password: str, method: str = "scram-sha-256") -> str:
        """LOGIN role whose stored verifier matches `method` (scram-sha-256, md5, or password
        for cleartext auth), plus `host all <name> 127.0.0.1/32 <method>`; returns its dsn."""
        if method not in ("scram-sha-256", "md5", "password"):
            raise ValueError(f"create_role: method must be scram-sha-256, md5 or password, not {method!r}")
        encryption = "md5" if method == "md5" else "scram-sha-256"
        with self.connect() as conn:
            conn.execute("select set_config('password_encryption', %s, false)", [encryption])
            conn.execute(_sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                _sql.Identifier(name), _sql.Literal(password)))
        quoted = '"' + name.replace('"', '""') + '"'
        self.add_hba([f"host all {quoted} 127.0.0.1/32 {method}"])
        return self.dsn(name, password)

    # TLS
    def has_ssl_support(self) -> bool:
        return has_ssl_support(self.bindir)

    def enable_ssl(self, certdir=None) -> dict[str, str]:
        """Turn on ssl with the test PKI in `certdir` (generated there if missing; a temp dir
        if None) and restart; returns the PKI paths (ca_cert, server_cert, server_key)."""
        if not self.has_ssl_support():
            raise RuntimeError(f"server binaries in {self.bindir} built without SSL")
        try:
            from . import certs
        except ImportError:
            import certs
        certdir = Path(certdir) if certdir else self.base / "certs"
        if (certdir / "server.crt").is_file() and (certdir / "server.key").is_file():
            pki = {k: str(certdir / f) for k, f in [("ca_cert", "ca.crt"), ("server_cert", "server.crt"),
                                                    ("server_key", "server.key")]}
        else:
            pki = certs.make_test_pki(certdir)
        # copies inside the datadir: owned by the server's OS user, key 0600 as postgres demands
        for src, dst in [("server_cert", "server.crt"), ("server_key", "server.key"), ("ca_cert", "root.crt")]:
            if Path(pki[src]).is_file():
                shutil.copyfile(pki[src], self.datadir / dst)
                os.chmod(self.datadir / dst, 0o600)
                self._chown(self.datadir / dst)
        conf = {"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"}
        if (self.datadir / "root.crt").is_file():
            conf["ssl_ca_file"] = "root.crt"
        self._set_conf_lines(conf)
        if self.running:
            self.restart()
        return pki
