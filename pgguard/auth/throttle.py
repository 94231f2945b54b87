# Failed-authentication throttling per source address: growing delays, bounded memory.
"""Slow down password and token guessing from one source address.

After ``after`` failures within ``window`` seconds, each further attempt from that
address waits: ``delay`` seconds, doubling with every further failure, at most
``max_delay``. Attempts from the same address are spaced out from each other: one
attempt per delay, however many connections it opens at once; an attempt that would
have to wait longer than ``max_delay`` for its turn is refused (``delay_for`` returns
None) without its password being looked at. IPv6 addresses count per /64 (one host
usually owns a whole /64). A success forgives the failures of the name it logged in as
(a mistyped password), not those against other names: one valid token must not buy
unlimited guesses at a DBA's password (red team 20). At most ``max_entries`` addresses
(and address-name pairs) are remembered (least recently seen go first).

Across worker processes: ``share()`` (called by the parent before it forks the
workers) puts the table in a shared memory mapping of fixed size, slots locked with
a POSIX record lock (released by the kernel if a worker dies holding it), so every
worker counts the same failures and spaces the same attempts.

Pure bookkeeping, no sleeping: the session awaits the delay itself.

Example::

    t = Throttle.from_config(cfg)
    await asyncio.sleep(t.delay_for(addr))   # before checking the password
    ok = check(password)
    t.record_success(addr) if ok else t.record_failure(addr)
"""
from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import mmap
import os
import struct
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import parse_duration

if TYPE_CHECKING:
    from ..config import Config


class _Entry:
    __slots__ = ("failures", "first", "last", "not_before")

    def __init__(self, now: float) -> None:
        self.failures = 0           # within the current window
        self.first = now            # first failure of the window
        self.last = now             # last failure or attempt seen
        self.not_before = 0.0       # the next attempt should not start before this


class _LocalTable:
    """This process's entries, least recently seen first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._d: OrderedDict[str, _Entry] = OrderedDict()

    def lock(self):
        return _NoLock

    def get(self, key: str) -> _Entry | None:
        return self._d.get(key)

    def put(self, key: str, e: _Entry) -> None:
        self._d[key] = e
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    def drop(self, key: str) -> None:
        self._d.pop(key, None)

    def __len__(self) -> int:
        return len(self._d)


class _NoLockType:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


_NoLock = _NoLockType()

# shared slot: key hash (0 = free), failures, pad, first, last, not_before
_SLOT = struct.Struct("<QIIddd")
_PROBE = 16


class _SharedTable:
    """Entries in a shared memory mapping (fixed size: memory bounded by construction),
    open addressing over hashed keys; the least recently seen of a probe run makes
    room. Every access holds a POSIX lock on the backing file."""

    def __init__(self, max_entries: int) -> None:
        self.slots = max(64, min(max_entries, 1 << 20))
        fd, path = tempfile.mkstemp(prefix="pgguard-throttle-")
        os.unlink(path)
        os.ftruncate(fd, self.slots * _SLOT.size)
        self._fd = fd
        self._map = mmap.mmap(fd, self.slots * _SLOT.size, mmap.MAP_SHARED)

    def lock(self):
        return _FileLock(self._fd)

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(),
                              "little") | 1

    def _find(self, h: int) -> tuple[int, bool]:
        base = h % self.slots
        victim, oldest = base, None
        for i in range(_PROBE):
            idx = (base + i) % self.slots
            kh, _, _, _, last, _ = _SLOT.unpack_from(self._map, idx * _SLOT.size)
            if kh == h:
                return idx, True
            if kh == 0:
                return idx, False
            if oldest is None or last < oldest:
                victim, oldest = idx, last
        return victim, False

    def get(self, key: str) -> _Entry | None:
        idx, found = self._find(self._hash(key))
        if not found:
            return None
        _, failures, _, first, last, not_before = _SLOT.unpack_from(
            self._map, idx * _SLOT.size)
        e = _Entry(first)
        e.failures, e.last, e.not_before = failures, last, not_before
        return e

    def put(self, key: str, e: _Entry) -> None:
        h = self._hash(key)
        idx, _ = self._find(h)
        _SLOT.pack_into(self._map, idx * _SLOT.size, h, e.failures, 0, e.first, e.last,
                        e.not_before)

    def drop(self, key: str) -> None:
        # the run after a freed slot must stay reachable: mark it free only when the
        # next slot is free too, else leave an expired entry (failures 0)
        h = self._hash(key)
        idx, found = self._find(h)
        if found:
            _SLOT.pack_into(self._map, idx * _SLOT.size, h, 0, 0, 0.0, 0.0, 0.0)

    def __len__(self) -> int:
        n = 0
        for i in range(self.slots):
            kh, failures = _SLOT.unpack_from(self._map, i * _SLOT.size)[:2]
            n += kh != 0 and failures > 0
        return n


class _FileLock:
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self):
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


_shared: _SharedTable | None = None


def share(max_entries: int = 65536) -> None:
    """Make every Throttle created from now on (in this process and the processes it
    forks) use one table in shared memory: ``share()`` before forking the workers."""
    global _shared
    _shared = _SharedTable(max_entries)


def address_key(addr: object) -> str:
    """The throttling key of a peer address (tuple from get_extra_info, or a string).

    Example: ``address_key(("10.0.0.7", 51515)) -> "10.0.0.7"``,
    ``address_key("2001:db8::1") -> "2001:db8::/64"``.
    """
    if isinstance(addr, tuple):
        addr = addr[0] if addr else ""
    if addr is None:
        return "unix"
    text = str(addr)
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text or "unix"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _pair(key: str, name: str) -> str:
    return f"{key}\0{name}"


class Throttle:
    """Failure counts and delays per source address; see the module docstring.

    Example::

        t = Throttle(after=5, window=600, delay=1.0, max_delay=30.0)
        t.record_failure("10.0.0.7"); t.delay_for("10.0.0.7")   # 0.0 until 5 failures
    """

    def __init__(self, *, after: int = 5, window: float = 600.0, delay: float = 1.0,
                 max_delay: float = 30.0, max_entries: int = 65536,
                 clock: Callable[[], float] = time.monotonic,
                 shared: bool | None = None) -> None:
        self.after = after
        self.window = window
        self.delay = delay
        self.max_delay = max_delay
        self.max_entries = max_entries
        self._clock = clock
        if shared is None:
            shared = _shared is not None
        self._table = (_shared if _shared is not None else _SharedTable(max_entries)) \
            if shared else _LocalTable(max_entries)

    @classmethod
    def from_config(cls, cfg: Config, **kw: object) -> Throttle:
        """From ``[auth] throttle_*``: ``Throttle.from_config(cfg)``."""
        a = cfg.auth
        return cls(after=a.throttle_after, window=parse_duration(a.throttle_window),
                   delay=parse_duration(a.throttle_delay),
                   max_delay=parse_duration(a.throttle_max_delay), **kw)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._table)

    def set_fleet(self, instances: int) -> None:
        """Share the limits with ``instances`` pgguard instances behind one load balancer
        (the live count of the control database's heartbeats): each counts failures
        alone, so each starts delaying after ``ceil(after / instances)`` failures and
        spaces attempts ``instances`` times wider. A source spread over the fleet thus
        gets about the attempts one instance would allow; a source pinned to one
        instance gets fewer (stricter, never looser). Example: ``t.set_fleet(3)``."""
        self.fleet = max(1, int(instances))

    fleet = 1

    def _threshold(self) -> int:
        # failures before delays start, this instance's share of the fleet's limit
        return -(-self.after // self.fleet)

    def _penalty(self, failures: int) -> float:
        n = self.fleet
        extra = failures - self._threshold()
        if extra < 0:
            return 0.0
        return min(self.delay * n * (2.0 ** min(extra, 60)), self.max_delay)

    def _get(self, key: str, now: float) -> _Entry | None:
        e = self._table.get(key)
        if e is not None and (e.failures == 0 or (now - e.last > self.window
                                                  and now >= e.not_before)):
            self._table.drop(key)      # window over: forget the address
            return None
        return e

    def delay_for(self, addr: object, *, now: float | None = None) -> float | None:
        """Seconds to wait before handling this address's next authentication attempt,
        or None: refuse it now (its turn would come later than ``max_delay``).

        Reserves the slot: concurrent attempts from one throttled address are spaced
        one penalty apart, in this process and (after ``share()``) in every worker.
        0.0 when not throttled.

        Example: ``await asyncio.sleep(t.delay_for(peer))``.
        """
        now = self._clock() if now is None else now
        key = address_key(addr)
        with self._table.lock():
            e = self._get(key, now)
            if e is None:
                return 0.0
            penalty = self._penalty(e.failures)
            if penalty == 0.0:
                return 0.0
            start = max(now, e.not_before)
            if start - now > self.max_delay:
                return None
            e.not_before = start + penalty
            e.last = now
            self._table.put(key, e)
            return start - now

    def record_failure(self, addr: object, *, now: float | None = None,
                       name: str | None = None) -> None:
        """Count a failed authentication from ``addr`` (at user ``name``):
        ``t.record_failure(peer, name="alice")``."""
        now = self._clock() if now is None else now
        key = address_key(addr)
        with self._table.lock():
            if name is not None:
                # (how many of the address's failures were at this name)
                k2 = _pair(key, name)
                e2 = self._table.get(k2) or _Entry(now)
                e2.failures += 1
                e2.last = now
                self._table.put(k2, e2)
            e = self._get(key, now)
            if e is None:
                e = _Entry(now)
            elif now - e.first > self.window and e.failures < self._threshold():
                e.failures, e.first = 0, now    # old failures below the threshold expire
            e.failures += 1
            e.last = now
            e.not_before = max(e.not_before, now + self._penalty(e.failures))
            self._table.put(key, e)

    def record_success(self, addr: object, name: str | None = None) -> None:
        """``addr`` authenticated (as ``name``): forget its failures at that name (all of
        them when no name is given): ``t.record_success(peer, "alice")``."""
        key = address_key(addr)
        with self._table.lock():
            if name is None:
                self._table.drop(key)
                return
            k2 = _pair(key, name)
            e2 = self._table.get(k2)
            self._table.drop(k2)
            e = self._table.get(key)
            if e2 is None or e is None:
                return
            e.failures -= e2.failures
            if e.failures <= 0:
                self._table.drop(key)
            else:
                self._table.put(key, e)

    def failures(self, addr: object) -> int:
        """Failures counted for ``addr`` (tests, metrics): ``t.failures("10.0.0.7") -> 3``."""
        with self._table.lock():
            e = self._table.get(address_key(addr))
        return 0 if e is None else e.failures
