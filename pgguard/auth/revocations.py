# Token revocations: a locked append-only file under [auth] state_dir that every worker watches.
"""Persisted token revocations and the watcher each worker process polls.

The store is ``<state_dir>/revocations.jsonl``: one JSON object per line,
``{"jti": "...", "exp": 1700000900, "at": 1700000000}``. Writers take an exclusive
``fcntl`` lock on ``<state_dir>/revocations.lock``, append one whole line and fsync; while
holding the lock they may prune records whose token has expired by writing a new file and
renaming it over the old one. Readers never lock: they stat the file, and read it again
when its inode, size or mtime changed; a line without its newline (a write in progress)
is ignored until it is complete.

``exp`` is the token's own expiry when the token is known, else revocation time plus
``[auth] max_ttl`` (no token lives longer, see tokens.verify), so pruning never forgets a
revocation that could still matter.

Example::

    revoke(cfg, "9f2c51...")                       # pgguard token revoke
    w = RevocationWatcher.from_config(cfg)         # in each worker
    w.start(loop)                                  # stat every 0.25 s
    w.is_revoked("9f2c51...")                      # -> True
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ..config import parse_duration
from .tokens import TokenSessionEnded

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("pgguard.auth")

FILE_NAME = "revocations.jsonl"
LOCK_NAME = "revocations.lock"
POLL_INTERVAL = 0.25
_PRUNE_GRACE = 300.0        # keep a record this long past its expiry (clock skew)


class Revocation(msgspec.Struct, frozen=True):
    """One revoked token id; ``exp``: when the record may be forgotten."""
    jti: str
    exp: int
    at: int


_encode = msgspec.json.Encoder().encode
_decoder = msgspec.json.Decoder(Revocation)


def state_dir(cfg: Config) -> Path:
    """``[auth] state_dir`` resolved against the config file's directory.

    Example: ``state_dir(cfg) -> Path("/etc/pgguard/pgguard-state")``.
    """
    p = Path(cfg.auth.state_dir)
    return p if p.is_absolute() else Path(cfg.base_dir) / p


def store_path(cfg: Config) -> Path:
    """The revocations file: ``store_path(cfg) -> Path(".../pgguard-state/revocations.jsonl")``."""
    return state_dir(cfg) / FILE_NAME


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)        # closing releases the lock


def _parse(data: bytes) -> list[Revocation]:
    out = []
    end = data.rfind(b"\n")
    for line in data[:end + 1].splitlines():
        if not line.strip():
            continue
        try:
            out.append(_decoder.decode(line))
        except msgspec.DecodeError:
            log.warning("revocations: skipping an unreadable line")
    return out


def read(path: str | os.PathLike[str]) -> list[Revocation]:
    """Every record in a revocations file (none if it does not exist).

    Example: ``[r.jti for r in read(store_path(cfg))]``.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return _parse(data)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def revoke(cfg: Config, token_id: str, *, expires_at: int | None = None,
           now: float | None = None) -> Revocation:
    """Persist a revocation; safe with concurrent writers; prunes expired records.

    ``expires_at`` is the token's expiry if known. Revoking twice is harmless.

    Example::

        revoke(cfg, claims.token_id, expires_at=claims.expires_at)
    """
    now = time.time() if now is None else now
    exp = int(expires_at if expires_at is not None
              else now + parse_duration(cfg.auth.max_ttl))
    rec = Revocation(jti=token_id, exp=exp, at=int(now))
    path = store_path(cfg)
    with _locked(path.parent):
        existing = read(path)
        live = [r for r in existing if r.exp + _PRUNE_GRACE > now]
        if len(live) < len(existing):
            # rewrite without the expired records, then swap it in atomically
            tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(b"".join(_encode(r) + b"\n" for r in live))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        # whole line in one write on an O_APPEND descriptor
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, _encode(rec) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
    return rec


class RevocationWatcher:
    """The set of revoked token ids, kept current by stat-ing the store.

    ``poll()`` costs one ``os.stat`` when nothing changed; ``start(loop)`` polls every
    0.25 s from the event loop. ``is_revoked`` polls first, so a connect-time check is
    current even without ``start``.
    Listeners (``add_listener``) get the set of newly revoked ids; ``watch(jti, cb)``
    calls ``cb(jti)`` once if that id becomes revoked.

    Example::

        w = RevocationWatcher.from_config(cfg)
        w.start(asyncio.get_running_loop())
        stop = w.watch(claims.token_id, lambda jti: session.terminate(...))
        ...
        stop()        # session over
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 interval: float = POLL_INTERVAL) -> None:
        self.path = Path(path)
        self.interval = interval
        self._revoked: frozenset[str] = frozenset()
        self._sig: tuple[int, int, int] | None = None
        self._listeners: list[Callable[[frozenset[str]], None]] = []
        self._watches: dict[str, list[Callable[[str], None]]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.poll()

    @classmethod
    def from_config(cls, cfg: Config, **kw: object) -> RevocationWatcher:
        """A watcher of ``[auth] state_dir``: ``RevocationWatcher.from_config(cfg)``."""
        return cls(store_path(cfg), **kw)  # type: ignore[arg-type]

    @property
    def revoked(self) -> frozenset[str]:
        """Every revoked id as of the last poll."""
        return self._revoked

    def is_revoked(self, token_id: str, *, fresh: bool = True) -> bool:
        """True if ``token_id`` is revoked: ``w.is_revoked(claims.token_id)``.

        ``fresh`` (the default, for connect time) polls first: one ``os.stat`` when
        nothing changed. ``fresh=False`` answers from the last poll.
        """
        if fresh:
            self.poll()
        return token_id in self._revoked

    def poll(self) -> frozenset[str]:
        """Reload if the file changed; notify listeners; return the newly revoked ids.

        Example: ``new = w.poll()`` (empty when nothing changed).
        """
        try:
            st = os.stat(self.path)
            if (st.st_ino, st.st_size, st.st_mtime_ns) == self._sig:
                return frozenset()          # the common case: one stat, nothing to do
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            sig = None
            data = b""
        else:
            try:
                st = os.fstat(fd)
                sig = (st.st_ino, st.st_size, st.st_mtime_ns)
                if sig == self._sig:
                    return frozenset()
                with os.fdopen(fd, "rb", closefd=False) as f:
                    data = f.read()
            finally:
                os.close(fd)
        if sig == self._sig:
            return frozenset()
        self._sig = sig
        ids = frozenset(r.jti for r in _parse(data))
        new = ids - self._revoked
        self._revoked = ids
        if new:
            self._notify(new)
        return new

    def _notify(self, new: frozenset[str]) -> None:
        for cb in list(self._listeners):
            try:
                cb(new)
            except Exception:
                log.exception("revocation listener failed")
        for jti in new & self._watches.keys():
            for cb in self._watches.pop(jti):
                try:
                    cb(jti)
                except Exception:
                    log.exception("revocation watch callback failed")

    def add_listener(self, cb: Callable[[frozenset[str]], None]) -> Callable[[], None]:
        """Call ``cb(new_ids)`` on each poll that finds new revocations; returns a remover.

        Example: ``remove = w.add_listener(lambda ids: log.info("revoked %s", ids))``.
        """
        self._listeners.append(cb)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(cb)
        return remove

    def watch(self, token_id: str, cb: Callable[[str], None]) -> Callable[[], None]:
        """Call ``cb(token_id)`` once when ``token_id`` gets revoked; returns a remover.

        If it is already revoked, ``cb`` runs at once.

        Example: ``stop = w.watch(p.token_id, lambda jti: session.close())``.
        """
        if token_id in self._revoked:
            cb(token_id)
            return lambda: None
        self._watches.setdefault(token_id, []).append(cb)

        def remove() -> None:
            cbs = self._watches.get(token_id)
            if cbs is not None:
                with contextlib.suppress(ValueError):
                    cbs.remove(cb)
                if not cbs:
                    del self._watches[token_id]
        return remove

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Poll every ``interval`` seconds on ``loop`` (default: the running loop).

        Example: ``w.start(asyncio.get_running_loop())`` once per worker.
        """
        self.stop()
        self._loop = loop or asyncio.get_running_loop()
        self._handle = self._loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        try:
            self.poll()
        except Exception:
            log.exception("revocations: poll failed")
        if self._loop is not None and not self._loop.is_closed():
            self._handle = self._loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        """Stop polling (``start`` again to resume). Example: ``w.stop()`` at shutdown."""
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._loop = None


def guard_session(loop: asyncio.AbstractEventLoop, watcher: RevocationWatcher | None,
                  identity: str, token_id: str, expires_at: float,
                  terminate: Callable[[TokenSessionEnded], None]) -> Callable[[], None]:
    """End a live session when its token expires or is revoked; returns a canceller.

    ``terminate`` is called at most once, from the event loop, with a
    TokenSessionEnded (FATAL 28P01, message says expired or revoked) for the session to
    send before closing. Call the returned function when the session ends first.

    Example::

        cancel = guard_session(loop, watcher, p.identity, p.token_id, p.expires_at,
                               session.fail)
    """
    done = False

    def fire(err: TokenSessionEnded) -> None:
        nonlocal done
        if not done:
            done = True
            cancel()
            terminate(err)

    delay = max(0.0, expires_at - time.time())
    timer = loop.call_later(delay, fire, TokenSessionEnded.expired(identity))
    unwatch = (watcher.watch(token_id, lambda _jti: loop.call_soon(
        fire, TokenSessionEnded.revoked(identity))) if watcher is not None else None)

    def cancel() -> None:
        timer.cancel()
        if unwatch is not None:
            unwatch()
    return cancel
