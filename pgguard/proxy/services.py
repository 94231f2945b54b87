# Services: what a session needs of its worker process, as one typed object.
# Built once at startup (Server.start); a session and its parts reach the services
# through it, not through Server.
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..approvals.metrics import Registry
    from ..approvals.store import ApprovalStore
    from ..audit.writer import AuditLog
    from ..auth.throttle import Throttle
    from ..config import Config
    from ..masking.detectors import DetectorSet
    from ..masking.wire import Catalog
    from ..policy.rules import PolicyEngine
    from .server import CatalogSignal
    from .sideconn import SideLink


@dataclass(frozen=True, slots=True)
class Services:
    """The worker's services, as a session sees them. Example::

        services.approvals.check_grant(identity, database, fingerprint)
        await services.audit.log_strict(record)
        services.count_statement("approved")
    """

    cfg: Config
    policy: PolicyEngine
    approvals: ApprovalStore | None     # None: approvals off ([admin] token not set)
    audit: AuditLog | None              # None: [audit] enabled = false
    audit_strict: bool                  # a statement runs once its record is on disk
    metrics: Registry
    throttle: Throttle
    detectors: DetectorSet | None
    mask_key: bytes | None              # the hash strategy's key
    side: SideLink                      # catalog reads on the proxy's own credentials
    catalog_signal: CatalogSignal       # DDL seen by any worker: catalogs are stale
    # the worker's per-database knowledge, kept by the server
    mask_catalog: Callable[..., Awaitable[Catalog]]
    catalog_changed: Callable[..., None]
    count_statement: Callable[..., None]
    remember_decision: Callable[..., None]              # into a session's decision cache
    user_function_test: Callable[[str], Callable]       # for the blast-radius guard
    cached_function: Callable[..., object]              # FunctionCall: OID -> function
    resolve_function: Callable[..., Awaitable[object]]
    sessions: set                       # the worker's live sessions (read only)
    sessions_info: Callable[[], list[dict]]
