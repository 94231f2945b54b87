# Failed-authentication throttling per source address: growing delays, bounded memory.
"""Slow down password and token guessing from one source address.

After ``after`` failures within ``window`` seconds, each further attempt from that
address waits: ``delay`` seconds, doubling with every further failure, at most
``max_delay``. Attempts from the same address are also spaced out from each other, so
opening many connections at once does not multiply the guessing rate. IPv6 addresses
count per /64 (one host usually owns a whole /64). A success clears the address.
At most ``max_entries`` addresses are remembered (least recently seen go first).

Pure bookkeeping, no I/O, no sleeping: the session awaits the delay itself.

Example::

    t = Throttle.from_config(cfg)
    await asyncio.sleep(t.delay_for(addr))   # before checking the password
    ok = check(password)
    t.record_success(addr) if ok else t.record_failure(addr)
"""
from __future__ import annotations

import ipaddress
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


class Throttle:
    """Failure counts and delays per source address; see the module docstring.

    Example::

        t = Throttle(after=5, window=600, delay=1.0, max_delay=30.0)
        t.record_failure("10.0.0.7"); t.delay_for("10.0.0.7")   # 0.0 until 5 failures
    """

    def __init__(self, *, after: int = 5, window: float = 600.0, delay: float = 1.0,
                 max_delay: float = 30.0, max_entries: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.after = after
        self.window = window
        self.delay = delay
        self.max_delay = max_delay
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: Config, **kw: object) -> Throttle:
        """From ``[auth] throttle_*``: ``Throttle.from_config(cfg)``."""
        a = cfg.auth
        return cls(after=a.throttle_after, window=parse_duration(a.throttle_window),
                   delay=parse_duration(a.throttle_delay),
                   max_delay=parse_duration(a.throttle_max_delay), **kw)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._entries)

    def _penalty(self, failures: int) -> float:
        extra = failures - self.after
        if extra < 0:
            return 0.0
        return min(self.delay * (2.0 ** min(extra, 60)), self.max_delay)

    def _get(self, key: str, now: float) -> _Entry | None:
        e = self._entries.get(key)
        if e is not None and now - e.last > self.window and now >= e.not_before:
            del self._entries[key]      # window over: forget the address
            return None
        return e

    def delay_for(self, addr: object, *, now: float | None = None) -> float:
        """Seconds to wait before handling this address's next authentication attempt.

        Reserves the slot: concurrent attempts from one throttled address get
        increasing delays (each capped at ``max_delay``). 0.0 when not throttled.

        Example: ``await asyncio.sleep(t.delay_for(peer))``.
        """
        now = self._clock() if now is None else now
        key = address_key(addr)
        e = self._get(key, now)
        if e is None:
            return 0.0
        penalty = self._penalty(e.failures)
        if penalty == 0.0:
            return 0.0
        start = min(max(now, e.not_before), now + self.max_delay)
        e.not_before = start + penalty
        e.last = now
        self._entries.move_to_end(key)
        return start - now

    def record_failure(self, addr: object, *, now: float | None = None) -> None:
        """Count a failed authentication from ``addr``: ``t.record_failure(peer)``."""
        now = self._clock() if now is None else now
        key = address_key(addr)
        e = self._get(key, now)
        if e is None:
            e = self._entries[key] = _Entry(now)
            self._evict()
        elif now - e.first > self.window and e.failures < self.after:
            e.failures, e.first = 0, now    # old failures below the threshold expire
        e.failures += 1
        e.last = now
        self._entries.move_to_end(key)
        e.not_before = max(e.not_before, now + self._penalty(e.failures))

    def record_success(self, addr: object) -> None:
        """Forget the failures of ``addr`` after it authenticated: ``t.record_success(peer)``."""
        self._entries.pop(address_key(addr), None)

    def failures(self, addr: object) -> int:
        """Failures counted for ``addr`` (tests, metrics): ``t.failures("10.0.0.7") -> 3``."""
        e = self._entries.get(address_key(addr))
        return 0 if e is None else e.failures

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
