# The connection to a fleet's control database: short statements from any thread, and
# one listener thread per process that LISTENs, notices an outage, reconnects and resyncs.
"""Talking to the control database (``[control] dsn_env``).

Every thread gets its own autocommit psycopg connection (:meth:`ControlLink.conn`),
opened on first use and dropped when it breaks, so the next statement reconnects. A
statement that cannot reach the database raises :class:`StoreUnavailable` (the
approval store's error: a console user or the admin API sees it as such), with a
message that names the control database.

One listener thread per process holds a connection that ``LISTEN``s on the channels the
stores subscribed to and probes the server every second. It calls, from that thread:
``on_notify(payload)`` for each notification on a channel, and ``on_state(up)`` when the
database is lost (``up=False``) or reached again (``up=True``: the stores resync what
they keep). Subscribers hop to their event loop themselves (``call_soon_threadsafe``).

Nothing here runs on a session's path: only approval holds, logins checked against
the revocation list, heartbeats and the admin surfaces use it.

Example::

    link = ControlLink.from_config(cfg)
    link.subscribe("approvals", lambda payload: print("changed", payload))
    link.start()
    with link.conn().transaction():
        link.conn().execute("SELECT 1")
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..approvals.store import ApprovalError, StoreUnavailable
from ..config import instance_name, parse_duration
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("pgguard.control")

# the listener's probe period, and the pause between two reconnection attempts
PROBE_INTERVAL = 1.0
RETRY_INTERVAL = 0.5
HINT = ("Check that the control database named by [control] dsn_env is up and reachable "
        "from this pgguard; held statements can be retried once it is back.")


def driver() -> Any:
    # optional dependency: only a fleet (a [control] section) needs a Postgres driver
    try:
        import psycopg
    except ImportError:
        raise ConfigError("control: the control database needs psycopg "
                          "(pip install 'pgguard[control]')") from None
    return psycopg


def unavailable(err: BaseException | str) -> StoreUnavailable:
    """The error every caller sees while the control database cannot be reached."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return StoreUnavailable(f"control database unreachable: {text[:200]}", hint=HINT)


class Conn:
    """One thread's connection, with the approval store's SQL dialect (``?``
    placeholders) turned into psycopg's (``%s``); connection failures become
    :class:`StoreUnavailable` and drop the connection."""

    __slots__ = ("link", "raw", "dirty")

    def __init__(self, link: ControlLink, raw: Any) -> None:
        self.link = link
        self.raw = raw
        self.dirty = False      # a row changed in the open transaction

    def execute(self, sql: str, params: Any = ()) -> Any:
        psycopg = driver()
        try:
            cur = self.raw.execute(sql.replace("?", "%s"), params)
            if cur.rowcount > 0 and sql.lstrip()[:6].upper() in ("INSERT", "UPDATE",
                                                                  "DELETE"):
                self.dirty = True
            return cur
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise self._failed(e) from None

    def _failed(self, e: Exception) -> Exception:
        if self.raw.closed or self.raw.broken:
            self.link.drop(self)
            return unavailable(e)
        # the server answered (a deadlock, a serialization failure...): Tx rolls the
        # transaction back, the connection stays
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return ApprovalError(f"control database error: {first[:200]}")

    def executemany(self, sql: str, rows: Any) -> Any:
        psycopg = driver()
        try:
            cur = self.raw.cursor()
            cur.executemany(sql.replace("?", "%s"), rows)
            self.dirty = True
            return cur
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise self._failed(e) from None


class Tx:
    """``with Tx(conn, channel):`` BEGIN ... (NOTIFY channel) COMMIT, ROLLBACK on error.
    The notification goes out with the commit (only when a row changed), so every
    instance's listener wakes after the change is visible."""

    __slots__ = ("conn", "channel")

    def __init__(self, conn: Conn, channel: str | None) -> None:
        self.conn = conn
        self.channel = channel

    def __enter__(self) -> Conn:
        self.conn.execute("BEGIN")
        self.conn.dirty = False
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            if self.channel is not None and self.conn.dirty:
                self.conn.execute("SELECT pg_notify(?, '')", (self.channel,))
            self.conn.execute("COMMIT")
        elif not isinstance(rest[0], StoreUnavailable):
            try:
                self.conn.execute("ROLLBACK")
            except StoreUnavailable:
                pass


class ControlLink:
    """Connections to the control database for one process; see the module docstring."""

    def __init__(self, dsn: str, schema: str, *, connect_timeout: float = 2.0,
                 application_name: str = "pgguard-control") -> None:
        self.dsn = dsn
        self.schema = schema
        self.connect_timeout = max(2, int(round(connect_timeout)))
        self.application_name = application_name
        self._local = threading.local()
        self._pid = os.getpid()
        self._subs: dict[str, list[Callable[[str], None]]] = {}
        self._state_cbs: list[Callable[[bool], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._listen_conn: Any = None
        self.up = False
        # monotonic time the database was last lost (or this link was made); None while up
        self.down_since: float | None = time.monotonic()
        self.last_error = "not connected yet"
        # the listener finished a first attempt (until then, callers connect themselves:
        # a worker asking right after start() must not be told the database is away)
        self._attempted = False

    @classmethod
    def from_config(cls, cfg: Config, *, role: str = "serve") -> ControlLink:
        """The link named by ``[control]`` (ConfigError when its variable is not set)."""
        c = cfg.control
        if c is None:
            raise ConfigError("control: no [control] section in this config")
        dsn = os.environ.get(c.dsn_env)
        if not dsn:
            raise ConfigError(f"control.dsn_env: environment variable {c.dsn_env} is not set "
                              "(it holds the control database's connection string)")
        return cls(dsn, c.schema, connect_timeout=parse_duration(c.connect_timeout),
                   application_name=f"pgguard-{role} {instance_name(cfg)}"[:63])

    def channel(self, name: str) -> str:
        """The NOTIFY channel of one kind of change: ``pgguard_control_approvals``."""
        return f"{self.schema}_{name}"

    def table(self, name: str) -> str:
        return f"{self.schema}.{name}"

    # -- statements from any thread

    def _raw_connect(self) -> Any:
        # keepalives: a control database that vanishes without closing is noticed too
        return driver().connect(self.dsn, autocommit=True,
                                  connect_timeout=self.connect_timeout,
                                  application_name=self.application_name,
                                  options=f"-c search_path={self.schema}",
                                  keepalives=1, keepalives_idle=5, keepalives_interval=2,
                                  keepalives_count=2)

    def _connect(self) -> Any:
        try:
            return self._raw_connect()
        except driver().Error as e:
            raise unavailable(e) from None

    def conn(self) -> Conn:
        """This thread's connection (opened now if needed; raises StoreUnavailable)."""
        if os.getpid() != self._pid:
            # forked: the parent's sockets are not ours to use (nor to close)
            self._pid = os.getpid()
            self._local = threading.local()
            self._thread = None
            self._listen_conn = None
            self._attempted = False
        c = getattr(self._local, "conn", None)
        if c is None or c.raw.closed or c.raw.broken:
            if self._thread is not None and self._attempted and not self.up:
                # the listener knows the database is away (and retries twice a second):
                # fail now rather than wait out a connect timeout on the caller's thread
                raise unavailable(self.last_error)
            c = self._local.conn = Conn(self, self._connect())
        return c

    def drop(self, c: Conn) -> None:
        """Forget a broken connection (the next statement of its thread reconnects)."""
        if getattr(self._local, "conn", None) is c:
            self._local.conn = None
        try:
            c.raw.close()
        except Exception:       # noqa: BLE001 - already broken
            pass

    def tx(self, channel: str | None = None) -> Tx:
        """A write transaction that notifies ``channel`` (a full channel name) on commit."""
        return Tx(self.conn(), channel)

    def close(self) -> None:
        """Stop the listener and close this thread's connection."""
        self.stop()
        c = getattr(self._local, "conn", None)
        if c is not None and os.getpid() == self._pid:
            self.drop(c)

    # -- the listener thread

    def subscribe(self, name: str, cb: Callable[[str], None]) -> None:
        """Call ``cb(payload)`` (in the listener thread) for each NOTIFY on ``name``."""
        self._subs.setdefault(self.channel(name), []).append(cb)

    def on_state(self, cb: Callable[[bool], None]) -> None:
        """Call ``cb(up)`` (in the listener thread) when the database is lost or back."""
        self._state_cbs.append(cb)

    def start(self) -> None:
        """Start this process's listener thread (once)."""
        if os.getpid() != self._pid:
            self.conn()         # resets what the parent left
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="pgguard-control-listen",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        t = self._thread
        if t is not None and t is not threading.current_thread() and os.getpid() == self._pid:
            t.join(timeout=3)
        self._thread = None

    def _set_state(self, up: bool, err: BaseException | None = None) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            self.down_since = None
            log.info("control database reached (schema %s)", self.schema)
        else:
            self.down_since = time.monotonic()
            self.last_error = str(err) if err is not None else "lost"
            log.error("control database unreachable: %s", self.last_error)
        for cb in list(self._state_cbs):
            try:
                cb(up)
            except Exception:       # noqa: BLE001 - a subscriber never stops the listener
                log.exception("control: state callback failed")

    def _run(self) -> None:
        psycopg = driver()
        while not self._stopping.is_set():
            conn = None
            try:
                conn = self._raw_connect()
                self._listen_conn = conn
                for ch in self._subs:
                    conn.execute(f'LISTEN "{ch}"')
                self._set_state(True)
                self._attempted = True
                probed = time.monotonic()
                while not self._stopping.is_set():
                    for n in conn.notifies(timeout=PROBE_INTERVAL):
                        for cb in self._subs.get(n.channel, ()):
                            try:
                                cb(n.payload)
                            except Exception:       # noqa: BLE001
                                log.exception("control: notification callback failed")
                    if time.monotonic() - probed >= PROBE_INTERVAL:
                        conn.execute("SELECT 1")
                        probed = time.monotonic()
            except psycopg.Error as e:
                self._attempted = True
                self.last_error = str(e)
                self._set_state(False, e)
            finally:
                self._listen_conn = None
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:       # noqa: BLE001 - already broken
                        pass
            self._stopping.wait(RETRY_INTERVAL)
