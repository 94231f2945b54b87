# Approvals: risky statements held for a human; shared store, admin HTTP API, consoles, webhook.
"""Held statements and their decisions.

- :mod:`.store` — :class:`ApprovalStore` (SQLite, shared by every worker), requests,
  decisions, just-in-time grants, ``await store.wait_decision(id)``;
- :mod:`.hold` — what a session sends: :func:`summarize`, :func:`notice_fields`,
  :func:`refusal`;
- :mod:`.web` — the admin HTTP server (:func:`start_admin`): JSON API, web console,
  ``/metrics``, ``/healthz``;
- :mod:`.console` — the psql admin console (:class:`AdminConsole`);
- :mod:`.notify` — webhook notifications; :mod:`.metrics` — Prometheus registry;
- :mod:`.cli` — ``pgguard approvals list | show | approve | deny``.

Example::

    from pgguard.approvals import ApprovalStore
    store = ApprovalStore.from_config(cfg)
    print([r.id for r in store.pending()])
"""
from .store import (ApprovalError, ApprovalStore, Grant, InvalidInput, NotAllowed, NotFound,
                    NotPending, Request)

__all__ = ["ApprovalError", "ApprovalStore", "Grant", "InvalidInput", "NotAllowed",
           "NotFound", "NotPending", "Request"]
