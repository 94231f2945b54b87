# Pending approvals, decisions and JIT windows in the control database, shared by a fleet.
"""The approval store of a fleet: :class:`PgApprovalStore`, the same interface and the
same rules as the embedded :class:`~pgguard.approvals.store.ApprovalStore` (it is a
subclass: only the connection, the transaction and the wake-up differ).

Every write transaction ends with ``pg_notify('<schema>_approvals', '')``; each
process's listener thread (see :mod:`.link`) then kicks the waiters' task, which reads
the rows of the requests it waits for (one SELECT) and releases the decided ones. A
decision made on any instance thus reaches the held statement on any other within a
few milliseconds; a one-second fallback read covers a notification lost in a reconnect.

When the control database is lost, every statement waiting here is refused at once
(:class:`StoreUnavailable`, "control database unreachable", 42501 to the client) and
new statements needing an approval are refused until it is back; the requests the
refused statements left pending are withdrawn when it is reached again.

Example::

    link = ControlLink.from_config(cfg)
    store = PgApprovalStore.from_config(cfg, link)
    link.start()
    req = store.request(identity="ci-agent", database="app", statement=sql, ...)
    final = await store.wait_decision(req.id)
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..approvals.store import (_REQ_COLS, ApprovalError, ApprovalStore, Request,
                              StoreUnavailable, _request)
from ..config import parse_duration
from .link import Conn, ControlLink, Tx, unavailable

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("pgguard.control")

# without a notification, waiters re-read their rows this often
FALLBACK_POLL = 1.0


class PgApprovalStore(ApprovalStore):
    """:class:`ApprovalStore` on the control database; see the module docstring."""

    def __init__(self, link: ControlLink, *, admin_groups=("dba",),
                 default_timeout_s: float = 300.0, max_window_s: float = 8 * 3600.0,
                 state_dir: str | os.PathLike[str] | None = None) -> None:
        # the embedded store's constructor opens SQLite: set its fields here instead
        self.link = link
        # not a file: its directory keeps what stays local (the workers' metrics)
        local = Path(state_dir) if state_dir is not None else Path(tempfile.gettempdir())
        local.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = local / f"control-database:{link.schema}"
        self.admin_groups = tuple(admin_groups)
        self.default_timeout_s = default_timeout_s
        self.max_window_s = max_window_s
        self.poll_interval_s = FALLBACK_POLL
        self.listeners = []
        self._pid = os.getpid()
        self._waiters: dict[int, set[asyncio.Future[Request]]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._poll_loop: asyncio.AbstractEventLoop | None = None
        self._kick: asyncio.Event | None = None
        # requests whose waiters were refused while the database was away: withdrawn
        # once it is back (they would otherwise sit pending until their expiry)
        self._abandoned: set[int] = set()
        self._abandoned_lock = threading.Lock()
        self._channel = link.channel("approvals")
        link.subscribe("approvals", self._notified)
        link.on_state(self._state)

    @classmethod
    def from_config(cls, cfg: Config, link: ControlLink | None = None) -> PgApprovalStore:  # type: ignore[override]
        a = cfg.approvals
        state_dir = Path(a.state_dir)
        if not state_dir.is_absolute():
            state_dir = Path(cfg.base_dir) / state_dir
        return cls(link or ControlLink.from_config(cfg), admin_groups=cfg.admin.groups,
                   default_timeout_s=parse_duration(a.default_timeout),
                   max_window_s=parse_duration(a.max_window), state_dir=state_dir)

    # -- the embedded store's hooks

    # concurrent deciders on other instances: the second waits for the first's commit,
    # then reads the row as decided (READ COMMITTED re-checks the locked row)
    _lock_rows = " FOR UPDATE"

    def _conn(self) -> Conn:  # type: ignore[override]
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._waiters = {}
            self._poller = None
            self._poll_loop = None
            self._kick = None
        return self.link.conn()

    def _tx(self, conn: Conn) -> Tx:  # type: ignore[override]
        return Tx(conn, self._channel)

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self.link.close()

    # -- waking the waiters of this process

    def _notified(self, _payload: str) -> None:
        # listener thread: something changed somewhere in the fleet. Read the waited
        # rows right here (this thread has its own connection) and hand the decided
        # ones to the loop: one hop, not loop -> executor -> loop
        loop = self._poll_loop
        if loop is None or loop.is_closed():
            return
        try:
            ids = list(self._waiters.keys())
        except RuntimeError:        # changed while copied: let the loop's reader do it
            ids = None
        if ids:
            try:
                rows = self._decided(ids)
            except ApprovalError:
                rows = None
            if rows is not None:
                done = [r for r in rows if not r.pending]
                if done:
                    loop.call_soon_threadsafe(self._resolve_all, done)
                return
        kick = self._kick
        if kick is not None:
            loop.call_soon_threadsafe(kick.set)

    def _resolve_all(self, reqs: list[Request]) -> None:
        for req in reqs:
            self._resolve(req)

    def _state(self, up: bool) -> None:
        # listener thread: the database was lost (refuse every waiter) or is back
        loop = self._poll_loop
        if not up:
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._fail_all, unavailable(self.link.last_error))
            return
        with self._abandoned_lock:
            ids, self._abandoned = self._abandoned, set()
        for rid in ids:
            try:
                self.withdraw(rid)
            except StoreUnavailable:
                with self._abandoned_lock:
                    self._abandoned.add(rid)
        if ids:
            log.info("control database back: withdrew %d request(s) refused meanwhile",
                     len(ids))
        self._notified("")

    def _fail_all(self, err: StoreUnavailable) -> None:
        with self._abandoned_lock:
            self._abandoned.update(self._waiters)
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(err)

    def _ensure_poller(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._poll_loop is not loop or self._kick is None:
            self._kick = asyncio.Event()
        super()._ensure_poller(loop)

    def _decided(self, ids: list[int]) -> list[Request]:
        now = time.time()
        rows = self._conn().execute(
            f"SELECT {_REQ_COLS} FROM requests WHERE id = ANY(?) "
            "AND (state != 'pending' OR expires_at <= ?)", (ids, now)).fetchall()
        return [_request(r, now) for r in rows]

    async def _poll(self) -> None:
        kick = self._kick
        assert kick is not None
        while self._waiters:
            try:
                await asyncio.wait_for(kick.wait(), FALLBACK_POLL)
            except asyncio.TimeoutError:
                pass
            kick.clear()
            ids = list(self._waiters)
            if not ids:
                break
            try:
                rows = await asyncio.to_thread(self._decided, ids)
            except StoreUnavailable as e:
                self._fail_all(e)
                await asyncio.sleep(0)
                continue
            except ApprovalError as e:
                # answered with an error (rolled back): read again on the next tick
                log.warning("control: reading decisions failed: %s", e.message)
                continue
            for req in rows:
                if not req.pending:
                    self._resolve(req)
        self._poller = None
