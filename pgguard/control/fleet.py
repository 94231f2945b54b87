# Fleet health: each worker's heartbeat row, the live instances, the throttle's fleet size.
"""Heartbeats in ``<schema>.instances``: one row per (instance, worker), written every
``[control] heartbeat_interval`` with the listen address, admin URL, version, open
sessions and statements held for approval here. An instance whose newest row is older
than ``[control] instance_ttl`` is dead: ``pgguard control status`` leaves it out, and
so does the fleet size the login throttle divides its limits by.

Example::

    hb = Heartbeat(link, cfg, worker=0, stats=lambda: (len(sessions), held))
    n_live = hb.beat()                 # -> 3 (instances alive, this one included)
    for row in live_instances(link, ttl_s=15): print(row["instance"], row["sessions"])
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..approvals.store import StoreUnavailable
from ..config import instance_name, parse_duration
from .link import ControlLink

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("pgguard.control")


class Heartbeat:
    """This worker's heartbeat row; ``run()`` beats until cancelled and passes the live
    instance count to ``on_fleet`` (the login throttle)."""

    def __init__(self, link: ControlLink, cfg: Config, *, worker: int,
                 stats: Callable[[], tuple[int, int]],
                 on_fleet: Callable[[int], None] | None = None,
                 admin_url: Callable[[], str | None] = lambda: None) -> None:
        assert cfg.control is not None
        self.link = link
        self.instance = instance_name(cfg)
        self.worker = worker
        self.address = f"{cfg.listen.address}:{cfg.listen.port}"
        self.interval = parse_duration(cfg.control.heartbeat_interval)
        self.ttl = parse_duration(cfg.control.instance_ttl)
        self.stats = stats
        self.on_fleet = on_fleet
        self.admin_url = admin_url
        self.started = time.time()
        self._warned = False

    def beat(self) -> int:
        """Write the row; returns how many instances are alive (StoreUnavailable)."""
        sessions, pending = self.stats()
        with self.link.tx() as c:
            c.execute(
                "INSERT INTO instances (instance, worker, address, admin_url, version, pid, "
                "sessions, pending, started_at, last_seen) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, extract(epoch FROM clock_timestamp())) "
                "ON CONFLICT (instance, worker) DO UPDATE SET address = excluded.address, "
                "admin_url = excluded.admin_url, version = excluded.version, "
                "pid = excluded.pid, sessions = excluded.sessions, "
                "pending = excluded.pending, started_at = excluded.started_at, "
                "last_seen = excluded.last_seen",
                (self.instance, self.worker, self.address, self.admin_url(), __version__,
                 os.getpid(), sessions, pending, self.started))
            n = c.execute(
                "SELECT count(DISTINCT instance) FROM instances "
                "WHERE last_seen > extract(epoch FROM clock_timestamp()) - ?",
                (self.ttl,)).fetchone()[0]
        return max(1, int(n))

    def leave(self) -> None:
        """Remove this worker's row (clean shutdown)."""
        try:
            with self.link.tx() as c:
                c.execute("DELETE FROM instances WHERE instance = ? AND worker = ?",
                          (self.instance, self.worker))
        except StoreUnavailable:
            pass

    async def run(self) -> None:
        while True:
            if not self.link.up:
                # the listener reconnects (and says so in the log): nothing to add
                await asyncio.sleep(self.interval)
                continue
            try:
                n = await asyncio.to_thread(self.beat)
            except StoreUnavailable as e:
                if not self._warned:
                    log.warning("control: heartbeat failed: %s", e.message)
                self._warned = True
            else:
                self._warned = False
                if self.on_fleet is not None:
                    self.on_fleet(n)
            await asyncio.sleep(self.interval)


def live_instances(link: ControlLink, ttl_s: float) -> list[dict[str, Any]]:
    """The instances heard from within ``ttl_s`` seconds, by name, workers summed.

    Example: ``[r["instance"] for r in live_instances(link, 15)]``.
    """
    rows = link.conn().execute(
        "SELECT instance, min(address), min(admin_url), max(version), count(*), "
        "sum(sessions), sum(pending), min(started_at), max(last_seen), "
        "extract(epoch FROM clock_timestamp()) - max(last_seen) "
        "FROM instances WHERE last_seen > extract(epoch FROM clock_timestamp()) - ? "
        "GROUP BY instance ORDER BY instance", (ttl_s,)).fetchall()
    keys = ("instance", "address", "admin_url", "version", "workers", "sessions",
            "pending_approvals", "started_at", "last_seen", "age_seconds")
    out = []
    for r in rows:
        d = dict(zip(keys, r))
        for k in ("workers", "sessions", "pending_approvals"):
            d[k] = int(d[k])
        d["age_seconds"] = round(float(d["age_seconds"]), 3)
        out.append(d)
    return out
