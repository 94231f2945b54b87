# Services: what a session needs of its worker process, as one typed object.
# Built once at startup (Server.start); a session and its parts reach the services
# through it (admission and authentication through its ``front``), never through Server.
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
    from .cancel import CancelKeyCipher
    from .sideconn import SideLink
    from .upstream import UpstreamLink


@dataclass(frozen=True, slots=True)
class Front:
    """What a session's startup asks of its worker: admission, TLS, authentication,
    cancel keys, and leaving. Example::

        if not front.admit(session): ...
        verifier = front.verifier_for(name)
    """

    admit: Callable[[object], bool]             # counted in, or refused (too many)
    forget: Callable[[object], None]            # counted out at close
    logged_in: Callable[[object], bool]         # authenticated: counted, or refused
    next_session_id: Callable[[], str]
    startup_timeout: float                      # seconds, startup and login together
    client_ssl: object | None                   # ssl.SSLContext when [listen] has TLS
    cancel_cipher: CancelKeyCipher              # BackendKeyData the client sees
    forward_cancel: Callable[..., Awaitable[None]]
    bearer_enabled: bool                        # tokens or OIDC accepted as passwords
    oidc: object | None
    verifier_for: Callable[[str], object]       # SCRAM verifier (a fake for unknown names)
    has_secret: Callable[[str], bool]
    auth_failed: Callable[..., Awaitable[None]]  # throttle, audit, metrics


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
    catalog_fingerprint: Callable[[str], Awaitable[str]]    # what DDL moves, now
    catalog_changed: Callable[..., None]
    count_statement: Callable[..., None]
    remember_decision: Callable[..., None]              # into a session's decision cache
    user_function_test: Callable[[str], Callable]       # for the blast-radius guard
    cached_function: Callable[..., object]              # FunctionCall: OID -> function
    resolve_function: Callable[..., Awaitable[object]]
    sessions: set                       # the worker's live sessions (read only)
    sessions_info: Callable[[], list[dict]]
    front: Front
    link: UpstreamLink                  # how this worker reaches Postgres
    revocations: object | None          # token revocations watched (bearer tokens on)
    background: Callable[..., None]     # a task the worker keeps until it ends
    count_masked: Callable[[int], None]
    policy_inspects: Callable[..., bool]
    decision_cache: Callable[..., tuple]                # shared by identity, db, mode
    view_map: Callable[[str], object]
    views_published: Callable[[str, dict], None]
    ready_views: Callable[[str], Awaitable[None]]
    ready_function_names: Callable[[str], Awaitable[None]]
    catalog_committed: Callable[[str], None]            # a session's DDL is committed
    # calls of user functions judged by their bodies (pgguard.policy.bodies): the
    # judgement of a called name when read (else None), and reading names' bodies
    function_judgement: Callable[[str, str], object]
    builtin_function_name: Callable[[str, str], bool]
    volatile_builtins: Callable[[str], object]          # masking: functions that may keep
    function_name_taken: Callable[[str, str], bool]     # an overload would shadow it
    reload_function_names: Callable[[str], Awaitable[None]]
    role_name: Callable[[str], bool]                    # a schema of that name shadows
    relation_known: Callable[[str, str], bool]          # a write to it is judged now
    plain_table: Callable[[str, str], bool]             # a committed table, not a view
    decision_generation: Callable[[str], int]
    views_fresh: Callable[[str], bool]
    note_functions: Callable[[str, object], None]
    load_function_bodies: Callable[[str, list], Awaitable[None]]
