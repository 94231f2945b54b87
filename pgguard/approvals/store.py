# Pending approvals and just-in-time grants in one SQLite file shared by every worker.
"""The approval store: held statements waiting for a human, their decisions, and
just-in-time grants (approve an identity + statement fingerprint for N minutes).

One SQLite database (WAL mode) in ``[approvals] state_dir`` is shared by every worker
process on the machine, the admin HTTP server, the psql admin console and the CLI.
Every state change is one short ``BEGIN IMMEDIATE`` transaction, so two processes
deciding the same request race safely: exactly one wins, the other gets
:class:`NotPending`.

A request is *pending* until it is approved, denied, withdrawn or its ``expires_at``
passes. Expiry needs no writer: a pending row past its expiry reads as ``timed_out``
everywhere (``get``, ``pending``, ``recent``), and a decision only commits while
``expires_at`` is still ahead, so readers and deciders always agree. :meth:`expire`
persists the timeouts (and fires the ``timed_out`` events) for housekeeping.

Waiting sessions learn of a decision by polling from the event loop (see
:meth:`ApprovalStore.wait_decision`): one poller per process checks ``PRAGMA
data_version`` (a few microseconds, no disk I/O) every ``poll_interval`` (default
100 ms) and reads the waited rows only when another connection committed something.
A decision made in another process is seen within one poll interval; a decision made
through the same store object wakes its waiter at once.

Example::

    store = ApprovalStore("/tmp/approvals.sqlite3", admin_groups=["dba"])
    req = store.request(identity="ci-agent", database="app",
                        statement="UPDATE orders SET state = 'paid' WHERE id = 7",
                        fingerprint="a1b2", classification="update public.orders [write]",
                        rule="orders-need-approval", approvers=(), timeout_s=300,
                        session_id="s-42")
    store.decide(req.id, True, "alice", ["dba"], window_s=600)
    assert store.get(req.id).state == "approved"
    assert store.check_grant("ci-agent", "app", "a1b2") is not None
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ..config import parse_duration
from ..errors import PgguardError

if TYPE_CHECKING:
    from ..config import Config

STATES = ("pending", "approved", "denied", "timed_out", "withdrawn")
FILENAME = "approvals.sqlite3"


# --------------------------------------------------------------------------- errors

class ApprovalError(PgguardError):
    """Root of approval failures; ``sqlstate`` is what a psql console user sees."""

    sqlstate = "55000"
    http_status = 400


class NotFound(ApprovalError):
    """No approval request or grant with that id."""

    sqlstate = "42704"
    http_status = 404


class NotPending(ApprovalError):
    """The request was already decided, withdrawn or has timed out."""

    sqlstate = "55000"
    http_status = 409


class NotAllowed(ApprovalError):
    """The approver may not decide this request (own request, or not in an approver group)."""

    sqlstate = "42501"
    http_status = 403


class InvalidInput(ApprovalError):
    """A malformed argument: a window too long, an unknown state..."""

    sqlstate = "22023"
    http_status = 400


class StoreUnavailable(ApprovalError):
    """The shared store cannot be reached (the fleet's control database is down):
    nothing can be requested or decided until it is back."""

    sqlstate = "08006"
    http_status = 503


# --------------------------------------------------------------------------- records

def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds: ``2024-05-01T12:00:00.125Z``."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """One held statement and, once decided, its decision.

    ``state`` is one of ``pending``, ``approved``, ``denied``, ``timed_out`` and
    ``withdrawn``; times are epoch seconds (UTC). ``approvers`` are the groups allowed
    to decide (the rule's, or ``[admin] groups`` when the rule names none).

    Example::

        req = store.get(17)
        if req.state == "approved":
            print(f"approved by {req.approver} after {req.wait_s:.1f}s")
    """

    id: int
    identity: str
    database: str
    statement: str
    fingerprint: str
    classification: str
    rule: str
    approvers: tuple[str, ...]
    session_id: str | None
    requested_at: float
    expires_at: float
    state: str = "pending"
    decided_at: float | None = None
    approver: str | None = None
    reason: str | None = None
    window_s: float | None = None
    grant_id: int | None = None
    cancel_key: int | None = None

    @property
    def pending(self) -> bool:
        return self.state == "pending"

    @property
    def timeout_s(self) -> float:
        """How long the request may wait in all."""
        return self.expires_at - self.requested_at

    @property
    def wait_s(self) -> float | None:
        """Seconds from request to decision (None while pending)."""
        return None if self.decided_at is None else max(0.0, self.decided_at - self.requested_at)

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ISO times); the shape of the HTTP API and ``list --json``."""
        return {
            "id": self.id, "identity": self.identity, "database": self.database,
            "statement": self.statement, "fingerprint": self.fingerprint,
            "classification": self.classification, "rule": self.rule,
            "approvers": list(self.approvers), "session_id": self.session_id,
            "state": self.state, "requested_at": iso(self.requested_at),
            "expires_at": iso(self.expires_at), "decided_at": iso(self.decided_at),
            "approver": self.approver, "reason": self.reason,
            "window_seconds": self.window_s, "grant_id": self.grant_id,
            "wait_seconds": self.wait_s,
        }


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """A just-in-time window: this identity may run statements with this fingerprint on
    this database without asking until ``expires_at``.

    Example::

        g = store.check_grant("ci-agent", "app", fp)
        if g is not None:
            ...  # forward the statement; audit it as approved by g.approver
    """

    id: int
    identity: str
    database: str
    fingerprint: str
    rule: str
    approver: str
    request_id: int | None
    granted_at: float
    expires_at: float
    revoked_at: float | None = None
    # rows the approved run changed (its command's count): the window's later runs may
    # change at most as many (None: not measured yet, or not countable)
    max_rows: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and self.expires_at > time.time()

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "identity": self.identity, "database": self.database,
            "fingerprint": self.fingerprint, "rule": self.rule, "approver": self.approver,
            "request_id": self.request_id, "granted_at": iso(self.granted_at),
            "expires_at": iso(self.expires_at), "revoked_at": iso(self.revoked_at),
            "active": self.active, "max_rows": self.max_rows,
        }


# --------------------------------------------------------------------------- schema

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    identity       TEXT NOT NULL,
    database       TEXT NOT NULL,
    statement      TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    classification TEXT NOT NULL,
    rule           TEXT NOT NULL,
    approvers      TEXT NOT NULL,           -- JSON array of group names
    session_id     TEXT,
    cancel_key     INTEGER,
    requested_at   REAL NOT NULL,
    expires_at     REAL NOT NULL,
    state          TEXT NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending','approved','denied','timed_out','withdrawn')),
    decided_at     REAL,
    approver       TEXT,
    reason         TEXT,
    window_s       REAL,
    grant_id       INTEGER
);
CREATE INDEX IF NOT EXISTS requests_pending ON requests (expires_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS requests_decided ON requests (decided_at);
CREATE TABLE IF NOT EXISTS grants (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    identity    TEXT NOT NULL,
    database    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    rule        TEXT NOT NULL,
    approver    TEXT NOT NULL,
    request_id  INTEGER,
    granted_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    revoked_at  REAL,
    max_rows    INTEGER
);
CREATE INDEX IF NOT EXISTS grants_key ON grants (identity, database, fingerprint, expires_at);
"""

_REQ_COLS = ("id, identity, database, statement, fingerprint, classification, rule, "
             "approvers, session_id, requested_at, expires_at, state, decided_at, "
             "approver, reason, window_s, grant_id, cancel_key")
_GRANT_COLS = ("id, identity, database, fingerprint, rule, approver, request_id, "
               "granted_at, expires_at, revoked_at, max_rows")

Listener = Callable[[str, Request], None]


def _request(row: tuple, now: float) -> Request:
    (rid, identity, database, statement, fp, cls, rule, approvers, sid, req_at, exp_at,
     state, dec_at, approver, reason, window, grant_id, cancel_key) = row
    if state == "pending" and now >= exp_at:
        # expired but not yet swept: it reads as timed out everywhere
        state, dec_at = "timed_out", exp_at
    return Request(id=rid, identity=identity, database=database, statement=statement,
                   fingerprint=fp, classification=cls, rule=rule,
                   approvers=tuple(json.loads(approvers)), session_id=sid,
                   requested_at=req_at, expires_at=exp_at, state=state, decided_at=dec_at,
                   approver=approver, reason=reason, window_s=window, grant_id=grant_id,
                   cancel_key=cancel_key)


def _grant(row: tuple) -> Grant:
    (gid, identity, database, fp, rule, approver, request_id, granted_at, expires_at,
     revoked_at, max_rows) = row
    return Grant(id=gid, identity=identity, database=database, fingerprint=fp, rule=rule,
                 approver=approver, request_id=request_id, granted_at=granted_at,
                 expires_at=expires_at, revoked_at=revoked_at, max_rows=max_rows)


# --------------------------------------------------------------------------- store

class ApprovalStore:
    """Approval requests, decisions and grants in SQLite, safe across threads and processes.

    Each thread (and each forked process) gets its own connection. Synchronous methods
    cost well under a millisecond on an idle store; under write contention they wait up
    to ``busy_timeout`` seconds for SQLite's write lock, so the event loop may prefer
    ``await asyncio.to_thread(store.decide, ...)`` for writes. :meth:`wait_decision` is
    the one coroutine: it polls without blocking the loop.

    ``listeners`` are called as ``listener(event, request)`` after each state change made
    through this object, with event ``requested``, ``approved``, ``denied``,
    ``timed_out`` or ``withdrawn`` (the webhook notifier and metrics subscribe). They run
    in the calling thread and must not block.

    Example::

        store = ApprovalStore.from_config(cfg)      # <state_dir>/approvals.sqlite3
        req = store.request(identity="ci-agent", database="app", statement=sql,
                            fingerprint=fp, classification="update public.orders [write]",
                            rule="orders", approvers=("dba",), timeout_s=None,
                            session_id="s1")
        final = await store.wait_decision(req.id)
    """

    def __init__(self, path: str | os.PathLike[str], *, admin_groups: Iterable[str] = ("dba",),
                 default_timeout_s: float = 300.0, max_window_s: float = 8 * 3600.0,
                 poll_interval_s: float = 0.1, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.admin_groups = tuple(admin_groups)
        self.default_timeout_s = default_timeout_s
        self.max_window_s = max_window_s
        self.poll_interval_s = poll_interval_s
        self.busy_timeout_s = busy_timeout_s
        self.listeners: list[Listener] = []
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._pid = os.getpid()
        # waiters of this process: request id -> futures; one poller task per loop
        self._waiters: dict[int, set[asyncio.Future[Request]]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._poll_loop: asyncio.AbstractEventLoop | None = None
        self._schema_ready = False
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._conn()        # create the schema now: errors surface at startup

    @classmethod
    def from_config(cls, cfg: Config) -> ApprovalStore:
        """The store named by ``[approvals] state_dir`` (relative to the config's dir)."""
        a = cfg.approvals
        state_dir = Path(a.state_dir)
        if not state_dir.is_absolute():
            state_dir = Path(cfg.base_dir) / state_dir
        return cls(state_dir / FILENAME, admin_groups=cfg.admin.groups,
                   default_timeout_s=parse_duration(a.default_timeout),
                   max_window_s=parse_duration(a.max_window),
                   poll_interval_s=parse_duration(a.poll_interval))

    # ------------------------------------------------------------------ connections

    def open(self) -> None:
        """Open this process's (and thread's) connection now rather than at first use."""
        self._conn()

    def _conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            # forked: the parent's connections must not be used (or closed) here
            self._pid = os.getpid()
            self._local = threading.local()
            self._conns = []
            self._conns_lock = threading.Lock()
            self._waiters = {}
            self._poller = None
            self._poll_loop = None
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if not self._schema_ready:
                with self._tx(conn):
                    _create_schema(conn)
                self._schema_ready = True
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection this process opened (the poller stops with them)."""
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except sqlite3.ProgrammingError:
                pass
        self._local = threading.local()

    def __enter__(self) -> ApprovalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # what a read-then-write transaction appends to its read: nothing under SQLite's
    # BEGIN IMMEDIATE (one writer at a time); row locks on a server (see control)
    _lock_rows = ""

    def _tx(self, conn: sqlite3.Connection) -> _write:
        # one write transaction (the Postgres store adds its wake-up notification)
        return _write(conn)

    def _emit(self, event: str, req: Request) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, req)
            except Exception:       # a listener never breaks a decision
                pass
        self._wake(req)

    # ------------------------------------------------------------------ requests

    def request(self, *, identity: str, database: str, statement: str, fingerprint: str,
                classification: str, rule: str, approvers: Iterable[str] = (),
                timeout_s: float | None = None, session_id: str | None = None,
                cancel_key: int | None = None) -> Request:
        """Record a held statement; returns the pending :class:`Request` with its new id.

        ``approvers`` are the rule's approver groups; when empty, ``[admin] groups``
        decide. ``timeout_s`` None uses ``[approvals] default_timeout``. ``cancel_key``
        (optional) lets a worker that receives the client's CancelRequest find it
        (:meth:`withdraw_cancel_key`).

        Example::

            req = store.request(identity="ci-agent", database="app", statement=sql,
                                fingerprint=fp, classification="update public.orders",
                                rule="orders", timeout_s=120, session_id="s1")
            print(req.id, req.expires_at)
        """
        groups = tuple(approvers) or self.admin_groups
        timeout = self.default_timeout_s if timeout_s is None else float(timeout_s)
        if not timeout > 0 or math.isinf(timeout):
            raise InvalidInput(f"approval timeout must be a positive number of seconds, "
                               f"not {timeout_s!r}")
        now = time.time()
        conn = self._conn()
        with self._tx(conn):
            rid = conn.execute(
                "INSERT INTO requests (identity, database, statement, fingerprint, "
                "classification, rule, approvers, session_id, cancel_key, requested_at, "
                "expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                (identity, database, statement, fingerprint, classification, rule,
                 json.dumps(list(groups)), session_id,
                 None if cancel_key is None else _int64(cancel_key), now,
                 now + timeout)).fetchone()[0]
        req = Request(id=int(rid), identity=identity, database=database,  # type: ignore[arg-type]
                      statement=statement, fingerprint=fingerprint,
                      classification=classification, rule=rule, approvers=groups,
                      session_id=session_id, requested_at=now, expires_at=now + timeout,
                      cancel_key=cancel_key)
        self._emit("requested", req)
        return req

    def get(self, request_id: int) -> Request:
        """The request with this id (raises :class:`NotFound`).
        Example: ``store.get(17).state``."""
        row = self._conn().execute(
            f"SELECT {_REQ_COLS} FROM requests WHERE id = ?", (int(request_id),)).fetchone()
        if row is None:
            raise NotFound(f"no approval request #{request_id}")
        return _request(row, time.time())

    def pending(self) -> list[Request]:
        """Requests still waiting, oldest first. Example: ``[r.id for r in store.pending()]``."""
        now = time.time()
        rows = self._conn().execute(
            f"SELECT {_REQ_COLS} FROM requests WHERE state = 'pending' AND expires_at > ? "
            "ORDER BY id", (now,)).fetchall()
        return [_request(r, now) for r in rows]

    def recent(self, n: int = 50, *, state: str | None = None) -> list[Request]:
        """The last ``n`` finished requests (decided, timed out or withdrawn), newest first;
        ``state`` keeps only one kind. Example: ``store.recent(10, state="denied")``."""
        if state is not None and state not in STATES[1:]:
            raise InvalidInput(f"unknown state {state!r} (one of {', '.join(STATES[1:])})")
        now = time.time()
        # a pending row past its expiry is a timed-out one not yet swept
        expired = "(state = 'pending' AND expires_at <= ?)"
        if state is None:
            where, params = f"(state != 'pending' OR {expired})", (now,)
        elif state == "timed_out":
            where, params = f"(state = 'timed_out' OR {expired})", (now,)
        else:
            where, params = "state = ?", (state,)
        rows = self._conn().execute(
            f"SELECT {_REQ_COLS} FROM requests WHERE {where} "
            "ORDER BY coalesce(decided_at, expires_at) DESC, id DESC LIMIT ?",
            params + (int(n),)).fetchall()
        return [_request(r, now) for r in rows]

    def counts(self) -> dict[str, int]:
        """Requests by (effective) state, for metrics. Example: ``store.counts()["pending"]``."""
        now = time.time()
        out = dict.fromkeys(STATES, 0)
        for state, n in self._conn().execute(
                "SELECT CASE WHEN state = 'pending' AND expires_at <= ? THEN 'timed_out' "
                "ELSE state END, count(*) FROM requests GROUP BY 1", (now,)):
            out[state] = n
        return out

    # ------------------------------------------------------------------ decisions

    def may_decide(self, req: Request, approver: str, groups: Iterable[str]) -> None:
        """Raise :class:`NotAllowed` unless ``approver`` (in ``groups``) may decide ``req``."""
        if approver == req.identity:
            raise NotAllowed(f"{approver} cannot decide their own request #{req.id}",
                             hint="ask another approver")
        allowed = req.approvers or self.admin_groups
        if not set(groups) & set(allowed):
            raise NotAllowed(
                f"{approver} may not decide request #{req.id}: approvers are members of "
                f"{', '.join(allowed)}")

    def decide(self, request_id: int, approve: bool, approver: str,
               groups: Iterable[str] = (), reason: str | None = None,
               window_s: float | None = None) -> Request:
        """Approve or deny a pending request as ``approver`` (a member of ``groups``).

        Checks, in one transaction: the request exists (:class:`NotFound`), is still
        pending and not expired (:class:`NotPending`), the approver is not the requester
        and belongs to one of its approver groups (:class:`NotAllowed`). An approval with
        ``window_s`` also grants the requester this statement fingerprint on this
        database for that many seconds (:meth:`check_grant`). Returns the decided request.

        Example::

            store.decide(17, True, "alice", ["dba"], window_s=600)
            store.decide(18, False, "alice", ["dba"], reason="not during the freeze")
        """
        groups = tuple(groups)
        if window_s is not None:
            if not approve:
                raise InvalidInput("a window only goes with an approval")
            if not 0 < window_s <= self.max_window_s:
                raise InvalidInput(f"window must be between 1s and {_human(self.max_window_s)} "
                                   f"([approvals] max_window)")
        state = "approved" if approve else "denied"
        conn = self._conn()
        with self._tx(conn):
            now = time.time()
            row = conn.execute(f"SELECT {_REQ_COLS} FROM requests WHERE id = ?{self._lock_rows}",
                               (int(request_id),)).fetchone()
            if row is None:
                raise NotFound(f"no approval request #{request_id}")
            req = _request(row, now)
            if not req.pending:
                raise NotPending(_not_pending(req))
            self.may_decide(req, approver, groups)
            grant_id = None
            if approve and window_s:
                grant_id = conn.execute(
                    "INSERT INTO grants (identity, database, fingerprint, rule, approver, "
                    "request_id, granted_at, expires_at) VALUES (?,?,?,?,?,?,?,?) "
                    "RETURNING id",
                    (req.identity, req.database, req.fingerprint, req.rule, approver,
                     req.id, now, now + window_s)).fetchone()[0]
            cur = conn.execute(
                "UPDATE requests SET state = ?, decided_at = ?, approver = ?, reason = ?, "
                "window_s = ?, grant_id = ? WHERE id = ? AND state = 'pending' "
                "AND expires_at > ?",
                (state, now, approver, reason, window_s if approve else None, grant_id,
                 req.id, now))
            assert cur.rowcount == 1
        done = msgspec.structs.replace(req, state=state, decided_at=now, approver=approver,
                                       reason=reason, window_s=window_s if approve else None,
                                       grant_id=grant_id)
        self._emit(state, done)
        return done

    def withdraw(self, request_id: int) -> bool:
        """The client gave up (CancelRequest, disconnect): a pending request becomes
        ``withdrawn``. Returns False when it was no longer pending.
        Example: ``store.withdraw(req.id)``."""
        return bool(self._finish("withdrawn", "id = ?", (int(request_id),)))

    def withdraw_session(self, session_id: str) -> int:
        """Withdraw every pending request of a session; returns how many."""
        return len(self._finish("withdrawn", "session_id = ?", (session_id,)))

    def withdraw_cancel_key(self, cancel_key: int) -> int:
        """Withdraw the pending requests recorded with this cancel key (a CancelRequest
        that reached any worker); returns how many."""
        return len(self._finish("withdrawn", "cancel_key = ?", (_int64(cancel_key),)))

    def expire(self, ids: Iterable[int] | None = None) -> list[Request]:
        """Persist ``timed_out`` for pending requests past their expiry (only ``ids`` when
        given); returns them. Safe to run from every worker: each timeout is reported
        once. Example: ``for r in store.expire(): print(r.id, "timed out")``."""
        if ids is None:
            return self._finish("timed_out", "1 = 1", ())
        id_list = [int(i) for i in ids]
        if not id_list:
            return []
        return self._finish("timed_out", f"id IN ({','.join('?' * len(id_list))})",
                            tuple(id_list))

    def _finish(self, state: str, where: str, params: tuple) -> list[Request]:
        # pending -> withdrawn (only while unexpired) or -> timed_out (only once expired)
        conn = self._conn()
        with self._tx(conn):
            now = time.time()
            cmp = ">" if state == "withdrawn" else "<="
            rows = conn.execute(
                f"SELECT {_REQ_COLS} FROM requests WHERE state = 'pending' "
                f"AND expires_at {cmp} ? AND {where} ORDER BY id{self._lock_rows}", (now,) + params).fetchall()
            if not rows:
                return []
            # a timeout happened at the expiry, whenever it is swept
            decided = {r[0]: (r[10] if state == "timed_out" else now) for r in rows}
            conn.executemany("UPDATE requests SET state = ?, decided_at = ? WHERE id = ?",
                             [(state, at, rid) for rid, at in decided.items()])
        out = []
        for row in rows:
            req = msgspec.structs.replace(_request(row, 0.0), state=state,
                                          decided_at=decided[row[0]])
            out.append(req)
            self._emit(state, req)
        return out

    # ------------------------------------------------------------------ grants

    def check_grant(self, identity: str, database: str, fingerprint: str) -> Grant | None:
        """The active just-in-time grant covering this statement, or None.

        Example::

            if (g := store.check_grant("ci-agent", "app", fp)) is not None:
                ...  # forward without asking; audit approver=g.approver
        """
        row = self._conn().execute(
            f"SELECT {_GRANT_COLS} FROM grants WHERE identity = ? AND database = ? "
            "AND fingerprint = ? AND expires_at > ? AND revoked_at IS NULL "
            "ORDER BY expires_at DESC LIMIT 1",
            (identity, database, fingerprint, time.time())).fetchone()
        return None if row is None else _grant(row)

    def grant_rows(self, grant_id: int, rows: int) -> None:
        """The approved run of grant ``grant_id`` changed ``rows`` rows: its window's
        later runs may change at most as many (the first measurement stands)."""
        conn = self._conn()
        with self._tx(conn):
            conn.execute("UPDATE grants SET max_rows = ? WHERE id = ? AND max_rows IS NULL",
                         (int(rows), int(grant_id)))

    def grants(self, *, active_only: bool = True) -> list[Grant]:
        """Grants, newest first (only unexpired, unrevoked ones unless ``active_only=False``)."""
        where = "WHERE expires_at > ? AND revoked_at IS NULL" if active_only else "WHERE ? > 0"
        rows = self._conn().execute(
            f"SELECT {_GRANT_COLS} FROM grants {where} ORDER BY id DESC LIMIT 1000",
            (time.time(),)).fetchall()
        return [_grant(r) for r in rows]

    def revoke_grant(self, grant_id: int) -> Grant:
        """End a grant now (raises :class:`NotFound`). Example: ``store.revoke_grant(3)``."""
        conn = self._conn()
        with self._tx(conn):
            now = time.time()
            row = conn.execute(f"SELECT {_GRANT_COLS} FROM grants WHERE id = ?{self._lock_rows}",
                               (int(grant_id),)).fetchone()
            if row is None:
                raise NotFound(f"no grant #{grant_id}")
            g = _grant(row)
            if not g.active:
                raise NotPending(f"grant #{grant_id} is no longer active")
            conn.execute("UPDATE grants SET revoked_at = ? WHERE id = ?", (now, g.id))
        return msgspec.structs.replace(g, revoked_at=now)

    def prune(self, older_than_s: float) -> int:
        """Delete finished requests and ended grants older than ``older_than_s`` seconds;
        returns how many rows went. Example: ``store.prune(30 * 86400)``."""
        cutoff = time.time() - older_than_s
        conn = self._conn()
        with self._tx(conn):
            n = conn.execute("DELETE FROM requests WHERE state != 'pending' "
                             "AND decided_at < ?", (cutoff,)).rowcount
            n += conn.execute("DELETE FROM grants WHERE expires_at < ? OR revoked_at < ?",
                              (cutoff, cutoff)).rowcount
        return n

    # ------------------------------------------------------------------ waiting

    async def wait_decision(self, request_id: int, timeout: float | None = None) -> Request:
        """Wait until the request is decided, withdrawn or times out; returns it then.

        ``timeout`` (seconds) bounds the wait: when it passes first, the still pending
        request is returned. Never blocks the loop: a decision made in another process
        is seen within ``poll_interval`` (default 100 ms), one made through this store
        at once. Cancelling the wait leaves the request as it is (withdraw it yourself).
        A request whose expiry passes is persisted as ``timed_out`` here.

        Example::

            final = await store.wait_decision(req.id)
            if final.state == "approved":
                ...  # forward the statement
        """
        req = await asyncio.to_thread(self.get, request_id)
        if not req.pending:
            return self._settle(req)
        loop = asyncio.get_running_loop()
        deadline = req.expires_at if timeout is None else min(req.expires_at,
                                                               time.time() + timeout)
        fut: asyncio.Future[Request] = loop.create_future()
        self._waiters.setdefault(req.id, set()).add(fut)
        self._ensure_poller(loop)
        try:
            while (remaining := deadline - time.time()) > 0:
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), remaining)
                except asyncio.TimeoutError:
                    continue        # the loop's clock may run a little ahead of time.time()
            return self._settle(await asyncio.to_thread(self.get, req.id))
        finally:
            futs = self._waiters.get(req.id)
            if futs is not None:
                futs.discard(fut)
                if not futs:
                    del self._waiters[req.id]

    def _settle(self, req: Request) -> Request:
        # an expired request seen by its waiter: persist it (and emit the event) once
        if req.state == "timed_out" and req.approver is None:
            try:
                self.expire([req.id])
            except (sqlite3.Error, StoreUnavailable):
                pass
        return req

    def _wake(self, req: Request) -> None:
        # a change made through this object: resolve this process's waiters directly
        if req.pending or req.id not in self._waiters:
            return
        loop = self._poll_loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._resolve(req)
        else:
            loop.call_soon_threadsafe(self._resolve, req)

    def _resolve(self, req: Request) -> None:
        for fut in list(self._waiters.get(req.id, ())):
            if not fut.done():
                fut.set_result(req)

    def _ensure_poller(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._poller is not None and not self._poller.done() and self._poll_loop is loop:
            return
        self._poll_loop = loop
        self._poller = loop.create_task(self._poll(), name="pgguard-approvals-poll")

    async def _poll(self) -> None:
        conn = self._conn()
        last = None
        while self._waiters:
            try:
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != last:
                    last = version
                    ids = list(self._waiters)
                    now = time.time()
                    for chunk in range(0, len(ids), 500):
                        part = ids[chunk:chunk + 500]
                        rows = conn.execute(
                            f"SELECT {_REQ_COLS} FROM requests WHERE id IN "
                            f"({','.join('?' * len(part))}) AND state != 'pending'",
                            part).fetchall()
                        for row in rows:
                            self._resolve(_request(row, now))
            except sqlite3.Error:
                last = None     # locked or busy: try again next tick
            await asyncio.sleep(self.poll_interval_s)
        self._poller = None


# --------------------------------------------------------------------------- helpers

class _write:
    """``with _write(conn):`` one BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


def _create_schema(conn: sqlite3.Connection) -> None:
    for stmt in _SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    # a file made before windows were bounded by the approved run's row count
    if "max_rows" not in {r[1] for r in conn.execute("PRAGMA table_info(grants)")}:
        conn.execute("ALTER TABLE grants ADD COLUMN max_rows INTEGER")


def _not_pending(req: Request) -> str:
    if req.state == "timed_out":
        return f"approval request #{req.id} has timed out"
    if req.state == "withdrawn":
        return f"approval request #{req.id} was withdrawn by the client"
    return f"approval request #{req.id} was already {req.state} by {req.approver}"


def _human(seconds: float) -> str:
    s = int(round(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def _int64(key: int) -> int:
    """A 64-bit cancel key (process id and secret, any bits a client sent) as the signed
    64-bit INTEGER SQLite stores: the same key always maps to the same value."""
    key = int(key) & 0xFFFFFFFFFFFFFFFF
    return key - (1 << 64) if key >= 1 << 63 else key
