# Token revocations in the control database: pushed to every instance by NOTIFY.
"""Revocations shared by a fleet: ``<schema>.revocations`` (one row per revoked token
id) and :class:`PgRevocationWatcher`, the embedded watcher's interface fed by the
control database instead of a local file.

:func:`revoke` inserts the row and ``NOTIFY``s its id in one transaction; every
process's listener thread hands the id to its event loop, which ends the live sessions
using that token (``guard_session``) within milliseconds. When the listener reaches the
database (at start, and after every outage) the whole list is read again, so nothing
revoked meanwhile is missed.

While the database is unreachable the last list read stays in force: a token login is
checked against it for ``[control] revocation_grace`` (default 60s) after the outage
began; past that, or before any list was ever read, every token login is refused
(28P01; the log and the audit record say "revocation list unavailable"). Static
passwords do not depend on the list and keep working.

Example::

    w = PgRevocationWatcher(link, grace_s=60)
    link.start(); w.start(loop)
    revoke(cfg, "9f2c51...")        # on any instance: sessions end everywhere
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..auth.revocations import _PRUNE_GRACE, Revocation, RevocationWatcher
from ..auth.tokens import TokenInvalid
from ..config import parse_duration
from .link import ControlLink

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("pgguard.control")


class RevocationsUnavailable(TokenInvalid):
    """A token login refused because the revocation list cannot be trusted: the control
    database has been unreachable for longer than ``[control] revocation_grace``."""


class PgRevocationWatcher(RevocationWatcher):
    """The revoked token ids, kept current by the control database; see the module."""

    def __init__(self, link: ControlLink, *, grace_s: float = 60.0) -> None:
        self.link = link
        self.grace_s = grace_s
        self.path = None
        self.interval = 0.0
        self._revoked: frozenset[str] = frozenset()
        self._sig = None
        self._listeners = []
        self._watches = {}
        self._handle = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.synced_at: float | None = None     # monotonic time of the last full read
        link.subscribe("revocations", self._notified)
        link.on_state(self._state)

    @classmethod
    def from_config(cls, cfg: Config, link: ControlLink | None = None,  # type: ignore[override]
                    **kw: object) -> PgRevocationWatcher:
        assert cfg.control is not None
        return cls(link or ControlLink.from_config(cfg),
                   grace_s=parse_duration(cfg.control.revocation_grace))

    # -- checks (event loop)

    def is_revoked(self, token_id: str, *, fresh: bool = True) -> bool:
        """True if revoked; raises RevocationsUnavailable (a TokenInvalid) when the list
        is too old to decide (see the module docstring)."""
        if fresh:
            self.check_current()
        return token_id in self._revoked

    def check_current(self) -> None:
        down = self.link.down_since
        if self.synced_at is None:
            raise RevocationsUnavailable(
                "revocation list unavailable: the control database was never reached "
                f"({self.link.last_error})")
        if down is not None and time.monotonic() - down > self.grace_s:
            raise RevocationsUnavailable(
                f"revocation list unavailable: the control database has been unreachable "
                f"for {time.monotonic() - down:.0f}s, more than [control] revocation_grace "
                f"({self.grace_s:g}s)")

    def poll(self) -> frozenset[str]:
        return frozenset()      # pushed by the listener, nothing to poll

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        if self.link.up:
            # the listener was already up when this watcher started: read now
            self._state(True)

    def stop(self) -> None:
        self._loop = None

    # -- from the listener thread

    def _to_loop(self, fn, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _notified(self, payload: str) -> None:
        if payload:
            self._to_loop(self._apply, frozenset((payload,)), None)

    def _state(self, up: bool) -> None:
        if not up:
            return
        try:
            rows = self.link.conn().execute(
                "SELECT jti FROM revocations WHERE exp + ? > ?",
                (_PRUNE_GRACE, int(time.time()))).fetchall()
        except Exception as e:      # noqa: BLE001 - stays stale; the next reconnect retries
            log.error("control: cannot read the revocation list: %s", e)
            return
        self._to_loop(self._apply, frozenset(r[0] for r in rows), time.monotonic())

    def _apply(self, ids: frozenset[str], synced_at: float | None) -> None:
        # event loop: add ids (a full read also replaces the list)
        new = ids - self._revoked
        self._revoked = ids if synced_at is not None else self._revoked | ids
        if synced_at is not None:
            self.synced_at = synced_at
        if new:
            self._notify(new)


def revoke(cfg: Config, token_id: str, *, expires_at: int | None = None,
           now: float | None = None, link: ControlLink | None = None) -> Revocation:
    """Record a revocation in the control database and wake every instance; prunes
    revocations of tokens long expired. Raises StoreUnavailable when unreachable.

    Example: ``revoke(cfg, claims.token_id, expires_at=claims.expires_at)``.
    """
    now = time.time() if now is None else now
    exp = int(expires_at if expires_at is not None
              else now + parse_duration(cfg.auth.max_ttl))
    rec = Revocation(jti=token_id, exp=exp, at=int(now))
    own = link is None
    link = link or ControlLink.from_config(cfg, role="cli")
    try:
        with link.tx() as c:
            c.execute("DELETE FROM revocations WHERE exp + ? < ?", (_PRUNE_GRACE, int(now)))
            c.execute("INSERT INTO revocations (jti, exp, at) VALUES (?, ?, ?) "
                      "ON CONFLICT (jti) DO UPDATE SET exp = greatest(revocations.exp, "
                      "excluded.exp)", (rec.jti, rec.exp, rec.at))
            c.execute("SELECT pg_notify(?, ?)", (link.channel("revocations"), token_id))
    finally:
        if own:
            link.close()
    return rec
