# A fleet's shared state in a Postgres control database ([control]); embedded stores otherwise.
"""Shared state for several pgguard instances.

- :mod:`.link` — :class:`ControlLink`: connections per thread, the LISTEN thread,
  outage detection and reconnection;
- :mod:`.schema` — the versioned tables, ``migrate(link)`` (advisory-locked);
- :mod:`.approvals` — :class:`PgApprovalStore` (the ApprovalStore interface);
- :mod:`.revocations` — :class:`PgRevocationWatcher` and ``revoke``;
- :mod:`.fleet` — heartbeats and ``live_instances``;
- :mod:`.cli` — ``pgguard control init|status``.

The two functions below choose the implementation from the config: with a
``[control]`` section the control database, without it the embedded stores of one
machine (SQLite approvals, the revocations file), exactly as before.

Example::

    link = open_link(cfg)                       # None without [control]
    store = approval_store(cfg, link)
    watcher = revocation_watcher(cfg, link)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..approvals.store import ApprovalStore
from ..auth.revocations import RevocationWatcher
from .approvals import PgApprovalStore
from .link import ControlLink
from .revocations import PgRevocationWatcher

if TYPE_CHECKING:
    from ..config import Config


def open_link(cfg: Config, role: str = "serve") -> ControlLink | None:
    """The control database link of ``[control]``, or None when there is none."""
    if cfg.control is None:
        return None
    return ControlLink.from_config(cfg, role=role)


def approval_store(cfg: Config, link: ControlLink | None) -> ApprovalStore:
    """The approval store: on the control database with a link, else SQLite."""
    if link is None:
        return ApprovalStore.from_config(cfg)
    return PgApprovalStore.from_config(cfg, link)


def revocation_watcher(cfg: Config, link: ControlLink | None) -> RevocationWatcher:
    """The revocation list: pushed by the control database with a link, else the file."""
    if link is None:
        return RevocationWatcher.from_config(cfg)
    return PgRevocationWatcher.from_config(cfg, link)
