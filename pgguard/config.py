# The TOML configuration: typed msgspec Structs, loading, validation with key paths.
from __future__ import annotations

import difflib
import fnmatch
import os
import re
import socket
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``"250ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"`` or a number of seconds."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"invalid duration {text!r} (use e.g. 250ms, 30s, 5m, 2h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _durations(obj: object, *fields: str) -> None:
    # each named field must read as a duration; a bad one is named by its key
    for f in fields:
        value = getattr(obj, f)
        if value is None:
            continue
        try:
            parse_duration(value)
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from None


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Listen(_Base):
    address: str = "127.0.0.1"
    port: int = 6432
    tls_cert: str | None = None
    tls_key: str | None = None
    # allow a cleartext password (tokens) from loopback clients without TLS
    allow_cleartext_loopback: bool = True
    backlog: int = 1024
    # an environment variable holding the cancel-key secret (at least 16 bytes) that
    # every instance of a fleet shares: a CancelRequest sent to any of them reaches the
    # backend. Unset: a random key per start (cancels only reach this instance).
    cancel_key_env: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")


class Admin(_Base):
    address: str = "127.0.0.1"
    port: int = 6480                 # 0: pick a free port (tests)
    token_env: str = "PGGUARD_ADMIN_TOKEN"
    # a file holding the token (relative to the config's dir), read when the variable
    # named by token_env is not set: how `pgguard approvals` finds it in a new terminal
    token_file: str | None = None
    groups: list[str] = msgspec.field(default_factory=lambda: ["dba"])
    # the console's address as people reach it (links in notices and webhooks);
    # default http://<address>:<port>
    public_url: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")


class Approvals(_Base):
    # SQLite store shared by every worker on this machine; relative to the config's dir
    state_dir: str = "pgguard-state"
    # how long a held statement waits when its rule sets no timeout
    default_timeout: str = "5m"
    # longest just-in-time window an approver may grant
    max_window: str = "8h"
    # how often a waiting session looks for a decision made in another process
    poll_interval: str = "100ms"
    # decided requests and expired grants older than this are pruned
    retention: str = "30d"
    # POSTed JSON (Slack-compatible "text" + fields) on each request and decision
    webhook_url: str | None = None
    webhook_timeout: str = "5s"
    webhook_retries: int = 5

    def __post_init__(self) -> None:
        _durations(self, "default_timeout", "max_window", "poll_interval", "retention",
                   "webhook_timeout")
        if parse_duration(self.poll_interval) <= 0:
            raise ValueError("poll_interval must be positive")
        if self.webhook_retries < 0:
            raise ValueError("webhook_retries cannot be negative")


SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class Upstream(_Base):
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password_env: str | None = None
    password_file: str | None = None
    sslmode: SslMode = "prefer"
    sslrootcert: str | None = None
    databases: list[str] | None = None
    connect_timeout: str = "10s"
    # ephemeral roles: per session, pgguard creates a LOGIN role IN ROLE template_role,
    # VALID UNTIL the credential's expiry, logs in as it and drops it at disconnect
    provision: bool = False
    template_role: str | None = None
    # what the upstream sees as application_name: "tag" = "pgguard:<identity> <client's
    # name>" (who is acting, in pg_stat_activity and the server log); "client" = the
    # client's own name unchanged; "agents" = tagged for agents, the client's own name for
    # humans (whose SHOW application_name then answers exactly what they set, as direct).
    # Either way a client name starting "pgguard:" is refused.
    application_name: Literal["agents", "tag", "client"] = "agents"

    def __post_init__(self) -> None:
        if self.provision and not self.template_role:
            raise ValueError("provision = true needs template_role")
        if not 0 < self.port <= 65535:
            raise ValueError("port must be between 1 and 65535")
        _durations(self, "connect_timeout")
        if self.sslmode in ("verify-ca", "verify-full") and not self.sslrootcert:
            raise ValueError(f"sslmode = {self.sslmode!r} needs sslrootcert")


_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,31}$")
JwtAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"]


class AuthOidc(_Base):
    """``[auth.oidc]``: a JWT presented as the password (see pgguard.auth.oidc)."""
    issuer: str
    audience: str | list[str]
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_cache: str = "10m"          # how long a fetched jwks_url stays fresh
    jwks_timeout: str = "5s"
    # first claim present wins; dotted names reach into objects (realm_access.roles)
    identity_claim: str | list[str] = "sub"
    groups_claim: str | list[str] = "groups"
    group_map: dict[str, str] = msgspec.field(default_factory=dict)
    kind: Literal["agent", "human"] = "agent"
    scope: Literal["readonly", "readwrite"] = "readwrite"
    algorithms: list[JwtAlgorithm] = msgspec.field(default_factory=lambda: ["RS256", "ES256"])
    leeway: str = "30s"
    require_known_identity: bool = False

    def __post_init__(self) -> None:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of jwks_file and jwks_url")
        if self.jwks_url is not None and not self.jwks_url.startswith("https://"):
            host = re.match(r"^http://([^/:]+|\[[^\]]+\])", self.jwks_url)
            if not host or host.group(1) not in ("127.0.0.1", "localhost", "[::1]"):
                raise ValueError("jwks_url must be https:// (http:// only for loopback)")
        if not self.algorithms:
            raise ValueError("algorithms cannot be empty")
        _durations(self, "jwks_cache", "jwks_timeout", "leeway")


class Auth(_Base):
    # the key with id "k0"; "" disables it (after a rotation, see token_keys)
    token_secret_env: str | None = "PGGUARD_TOKEN_SECRET"
    # more signing keys, key id -> environment variable; every configured key verifies
    token_keys: dict[str, str] = msgspec.field(default_factory=dict)
    token_key_id: str | None = None      # the key that signs new tokens (default "k0")
    default_ttl: str = "15m"
    max_ttl: str = "24h"                 # no token lives longer, whatever it says
    state_dir: str = "pgguard-state"     # revocations; relative to the config file
    throttle_after: int = 5              # failures per source address before delays start
    throttle_window: str = "10m"
    throttle_delay: str = "1s"           # first delay; doubles per further failure
    throttle_max_delay: str = "30s"
    oidc: AuthOidc | None = None

    def key_ids(self) -> list[str]:
        """The configured token key ids: ``["k0", "k2"]``."""
        ids = ["k0"] if self.token_secret_env else []
        return ids + list(self.token_keys)

    def __post_init__(self) -> None:
        for kid in self.token_keys:
            if not _KEY_ID.match(kid):
                raise ValueError(f"token_keys: key id {kid!r} must be 1-32 letters, digits, '-'")
            if kid == "k0" and self.token_secret_env:
                raise ValueError("token_keys: k0 is the key id of token_secret_env")
        if self.token_key_id is not None and self.token_key_id not in self.key_ids():
            raise ValueError(f"token_key_id {self.token_key_id!r} is not a configured key "
                             f"(have: {', '.join(self.key_ids()) or 'none'})")
        if self.throttle_after < 0:
            raise ValueError("throttle_after cannot be negative")
        _durations(self, "throttle_window", "throttle_delay", "throttle_max_delay",
                   "default_ttl", "max_ttl")
        if not 0 < parse_duration(self.default_ttl) <= parse_duration(self.max_ttl):
            raise ValueError("default_ttl must be positive and at most max_ttl")


class Identity(_Base):
    kind: Literal["agent", "human"] = "agent"
    groups: list[str] = msgspec.field(default_factory=list)
    password_env: str | None = None
    password_file: str | None = None
    databases: list[str] | None = None
    # log in upstream as this role instead of [upstream] user (its secret from env/file)
    upstream_user: str | None = None
    upstream_password_env: str | None = None
    upstream_password_file: str | None = None
    # SET ROLE to this role at session start; the client cannot change it afterwards
    role: str | None = None


RowLimit = Annotated[int, msgspec.Meta(ge=0)]

# Run-time settings an identity under a policy may change in its session (SET, RESET,
# set_config, BEGIN ... READ WRITE ...): client-side presentation, timeouts, memory and
# planner knobs. None changes how SQL is parsed, who the session is, what is written or
# which code is loaded. Globs allowed. search_path is not here: pgguard reports an
# unqualified name as public.<name>, which a changed search_path would make a lie.
DEFAULT_SETTINGS = (
    "application_name", "datestyle", "timezone", "intervalstyle", "extra_float_digits",
    "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "idle_session_timeout", "transaction_timeout", "bytea_output", "client_min_messages",
    "work_mem", "maintenance_work_mem", "hash_mem_multiplier", "temp_buffers",
    "transaction_isolation", "default_transaction_isolation", "transaction_deferrable",
    "default_transaction_deferrable", "transaction_read_only",
    "default_transaction_read_only", "enable_*", "jit", "jit_above_cost",
    "jit_inline_above_cost", "jit_optimize_above_cost", "random_page_cost",
    "seq_page_cost", "cpu_tuple_cost", "cpu_index_tuple_cost", "cpu_operator_cost",
    "parallel_setup_cost", "parallel_tuple_cost", "effective_cache_size",
    "effective_io_concurrency", "max_parallel_workers_per_gather",
    "min_parallel_table_scan_size", "min_parallel_index_scan_size", "from_collapse_limit",
    "join_collapse_limit", "geqo", "geqo_threshold", "default_statistics_target",
    "cursor_tuple_fraction", "constraint_exclusion", "plan_cache_mode",
    "recursive_worktable_factor", "lc_monetary", "lc_numeric", "lc_time",
)

# Settings no configuration can open: they change how pgguard's parser must read the
# text, who the session is, whether triggers and row security apply, which server code
# is loaded, or whether read-only mode holds. (transaction_read_only and
# default_transaction_read_only may be set "on", never "off", whatever the config says;
# client_encoding and standard_conforming_strings only to the values pgguard pins.)
NEVER_SETTINGS = {
    "standard_conforming_strings": "pgguard's parser reads string literals as the server "
                                   "does only while it is on",
    "client_encoding": "encodings other than UTF8 can hide quotes from pgguard's parser",
    "backslash_quote": "it changes how string literals are read",
    "transform_null_equals": "it changes what `= NULL` means",
    "role": "it changes who the session acts as",
    "session_authorization": "it changes the session's user",
    "session_replication_role": "it disables triggers and foreign-key checks",
    "row_security": "it changes whether row-level security applies",
    "allow_system_table_mods": "it lets the catalogs be rewritten",
    "session_preload_libraries": "it loads server libraries",
    "local_preload_libraries": "it loads server libraries",
    "shared_preload_libraries": "it loads server libraries",
    "dynamic_library_path": "it changes where server libraries are loaded from",
    "*": "pgguard cannot read the setting's name",
}


def never_setting(name: str) -> str | None:
    """Why ``name`` can never be opened to change, or None."""
    why = NEVER_SETTINGS.get(name)
    if why is None and name.endswith("_preload_libraries"):
        why = "it loads server libraries"
    return why


class Policy(_Base):
    agents: Literal["guarded", "allow", "block"] = "guarded"
    humans: Literal["guarded", "allow", "block"] = "allow"
    # longest statement text the parser is asked to read (characters); longer: refused
    max_statement_size: int = 1_048_576
    # more settings (GUC names, globs) sessions may change, beyond DEFAULT_SETTINGS
    settings: list[str] = msgspec.field(default_factory=list)
    # blast-radius limit on rows one statement may update or delete, for what a rule
    # without max_rows allows; 0: no limit
    agents_max_rows: RowLimit = 1000
    humans_max_rows: RowLimit = 0


class When(_Base):
    identity: list[str] | None = None
    kind: Literal["agent", "human"] | None = None
    groups: list[str] | None = None
    databases: list[str] | None = None
    statements: list[str] | None = None
    flags: list[Literal["destructive", "privilege", "escape", "opaque", "write"]] | None = None
    relations: list[str] | None = None
    functions: list[str] | None = None


class Rule(_Base):
    name: str
    action: Literal["allow", "block", "approve"]
    when: When = msgspec.field(default_factory=When)
    timeout: str | None = None
    approvers: list[str] | None = None
    # rows one statement this rule allows may update or delete (0: no limit; unset: the
    # [policy] default for the identity's kind)
    max_rows: RowLimit | None = None

    def __post_init__(self) -> None:
        _durations(self, "timeout")


class Mask(_Base):
    column: str
    strategy: Literal["redact", "partial", "email", "hash", "null"] = "redact"
    keep: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 4   # partial: trailing characters kept
    replacement: str = "****"
    except_groups: list[str] = msgspec.field(default_factory=list)
    except_identities: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.column.count(".") != 2:
            raise ValueError(f"column {self.column!r} must be schema.table.column")


class CustomDetector(_Base):
    name: str
    pattern: str


class Detectors(_Base):
    builtin: list[str] = msgspec.field(default_factory=list)
    custom: list[CustomDetector] = msgspec.field(default_factory=list)
    # identities in these groups see text cells unscanned
    except_groups: list[str] = msgspec.field(default_factory=list)


class Masking(_Base):
    # key of the hash strategy's keyed HMAC (stable tokens, joins still work)
    hash_key_env: str = "PGGUARD_MASK_KEY"


class AuditConfig(_Base):
    enabled: bool = True
    dir: str = "audit"
    durability: Literal["batched", "strict"] = "batched"
    capture_literals: bool = False
    flush_interval: str = "50ms"
    queue_max: int = 1_000_000
    # optional object store for sealed Parquet (s3://bucket/prefix); the WAL stays in dir
    store: str | None = None
    # the open segment is sealed into Parquet (and uploaded to store) at least this often
    seal_interval: str = "60s"

    def __post_init__(self) -> None:
        _durations(self, "flush_interval", "seal_interval")
        if parse_duration(self.seal_interval) <= 0:
            raise ValueError("seal_interval must be positive")
        if self.store is not None and not re.match(r"^((s3|gs|gcs)://[^/]|file:///)", self.store):
            raise ValueError("store must be s3://bucket/prefix, gs://bucket/prefix or "
                             "file:///path")


class Instance(_Base):
    # this instance's name in a fleet: its audit stream, heartbeat row and metrics label.
    # Default: "<hostname>-<listen port>", stable across restarts of the same instance.
    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.name):
            raise ValueError("name must be 1-64 characters from A-Z a-z 0-9 . _ - "
                             "(it names the audit stream in object storage)")


class Control(_Base):
    # shared state of a fleet (approvals, JIT windows, revocations, throttling) in Postgres
    dsn_env: str = "PGGUARD_CONTROL_DSN"
    schema: str = "pgguard_control"
    # while the control database is unreachable, token logins are still checked against
    # the last revocation list read for this long; after it they are refused
    revocation_grace: str = "60s"
    # each worker writes its heartbeat row this often; a row older than instance_ttl is
    # a dead instance (left out of `control status` and of the throttle's fleet size)
    heartbeat_interval: str = "2s"
    instance_ttl: str = "15s"
    # connecting to the control database gives up after this long (libpq: 2s at least)
    connect_timeout: str = "2s"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.schema):
            raise ValueError("schema must be a lower-case SQL identifier "
                             "(a-z, 0-9, _; at most 63 characters)")
        if not self.dsn_env:
            raise ValueError("dsn_env must name an environment variable")
        _durations(self, "revocation_grace", "heartbeat_interval", "instance_ttl",
                   "connect_timeout")
        if parse_duration(self.instance_ttl) <= parse_duration(self.heartbeat_interval):
            raise ValueError("instance_ttl must be longer than heartbeat_interval")


class Limits(_Base):
    # largest message a client may send (Postgres itself allows 1 GiB - 1)
    max_message_size: int = 64 * 1024 * 1024
    max_client_connections: int = 1000
    # connections still logging in (startup, TLS, authentication) at once: beyond it a
    # new connection is refused, so clients without credentials cannot take the slots
    # of sessions (each waits at most startup_timeout)
    max_logging_in: Annotated[int, msgspec.Meta(ge=1)] = 256
    # sessions of agent identities at once (0: no limit): agents reach Postgres as the
    # same role as humans, and one agent token opening sessions in a loop would take
    # every upstream connection slot, the DBA's too. "auto": the upstream's
    # max_connections less superuser_reserved_connections, less a tenth (at least 5)
    # kept for everyone else, shared among the workers
    agent_sessions: Annotated[int, msgspec.Meta(ge=0)] | Literal["auto"] = "auto"
    startup_timeout: str = "15s"
    shutdown_timeout: str = "30s"
    # a session idle in a transaction (all it sent answered, nothing more from the
    # client) this long is ended and its transaction rolled back, its locks released:
    # Postgres' idle_in_transaction_session_timeout is the client's to turn off (an
    # agent's `SELECT ... FOR UPDATE` then waiting held every row it locked). Agents'
    # sessions; everyone's ("0": never)
    agent_idle_in_transaction: str = "5m"
    idle_in_transaction: str = "0"

    def __post_init__(self) -> None:
        _durations(self, "startup_timeout", "shutdown_timeout", "agent_idle_in_transaction",
                   "idle_in_transaction")
        if self.max_message_size < 1024:
            raise ValueError("max_message_size must be at least 1024")


class Config(_Base, dict=True):
    listen: Listen = msgspec.field(default_factory=Listen)
    admin: Admin = msgspec.field(default_factory=Admin)
    upstream: Upstream = msgspec.field(default_factory=Upstream)
    auth: Auth = msgspec.field(default_factory=Auth)
    identities: dict[str, Identity] = msgspec.field(default_factory=dict)
    policy: Policy = msgspec.field(default_factory=Policy)
    rules: list[Rule] = msgspec.field(default_factory=list)
    masks: list[Mask] = msgspec.field(default_factory=list)
    detectors: Detectors = msgspec.field(default_factory=Detectors)
    masking: Masking = msgspec.field(default_factory=Masking)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    limits: Limits = msgspec.field(default_factory=Limits)
    approvals: Approvals = msgspec.field(default_factory=Approvals)
    instance: Instance = msgspec.field(default_factory=Instance)
    control: Control | None = None

    # set by load(): where the config file lives; relative paths resolve against it
    base_dir = "."


def _path_of(msg: str) -> str:
    m = re.search(r" - at `\$(.*)`$", msg)
    if not m:
        return ""
    path = m.group(1)
    path = re.sub(r"\[(\d+)\]", r"[\1]", path).lstrip(".")
    return path


def _friendly(err: msgspec.ValidationError) -> str:
    msg = str(err)
    path = _path_of(msg)
    text = re.sub(r" - at `\$.*`$", "", msg)
    m = re.match(r"Object contains unknown field `(.+)`", text)
    if m:
        key = f"{path}.{m.group(1)}" if path else m.group(1)
        return f"{key}: unknown key"
    m = re.match(r"Object missing required field `(.+)`", text)
    if m:
        key = f"{path}.{m.group(1)}" if path else m.group(1)
        return f"{key}: required key is missing"
    # a check of the table at ``path`` that names its key first ("port must be ...",
    # "timeout: invalid duration ...")
    m = re.match(r"([a-z][a-z0-9_]*)(:| must | cannot | needs | = )", text)
    if m:
        key = f"{path}.{m.group(1)}" if path else m.group(1)
        return f"{key}: {text[m.end():].lstrip() if m.group(2) == ':' else text}"
    m = re.match(r"Invalid enum value (.+)", text)
    if m:
        allowed = _choices(path)
        if allowed:
            return f"{path}: invalid value {m.group(1)} (one of: {', '.join(allowed)})"
    return f"{path or '(top level)'}: {text}"


def _choices(path: str) -> list[str]:
    """The values a Literal key at ``path`` (``masks[0].strategy``) takes, if it is one."""
    typ: object = Config
    for part in re.split(r"\.|(?=\[)", path.replace("[...]", "[*]")):
        if not part:
            continue
        if part.startswith("["):
            args = typing.get_args(typ)
            typ = args[-1] if args else None
            continue
        hints = _hints(typ)
        if part not in hints:
            return []
        typ = _unoptional(hints[part])
        while typing.get_origin(typ) is list or typing.get_origin(typ) is Annotated:
            if typing.get_origin(typ) is Annotated:
                typ = typing.get_args(typ)[0]
                continue
            break
    typ = _unoptional(typ)
    if typing.get_origin(typ) is Literal:
        return [str(a) for a in typing.get_args(typ)]
    return []


def _hints(typ) -> dict:
    try:
        return typing.get_type_hints(typ) if isinstance(typ, type) else {}
    except Exception:       # noqa: BLE001 - an unresolvable hint: no choices to list
        return {}


def _unoptional(typ):
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return typ


def _name_identity(text: str, msg: str) -> str:
    """msgspec says identities[...] for a dict key; find which identity it was."""
    raw = msgspec.toml.decode(text.encode())
    for name, value in (raw.get("identities") or {}).items():
        try:
            msgspec.convert(value, type=Identity)
        except msgspec.ValidationError:
            return msg.replace("identities[...]", f"identities.{name}", 1)
    return msg


def loads(text: str, *, base_dir: str = ".", source: str = "<config>") -> Config:
    """Decode and validate TOML text; raise ConfigError naming the key path."""
    try:
        cfg = msgspec.toml.decode(text.encode(), type=Config)
    except msgspec.ValidationError as e:
        msg = _friendly(e)
        if msg.startswith("identities[...]"):
            msg = _name_identity(text, msg)
        raise ConfigError(f"{source}: {msg}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    cfg.base_dir = base_dir
    _check_references(cfg, source)
    return cfg


def load(path: str | os.PathLike[str]) -> Config:
    """Load a config file. Example: ``cfg = load("pgguard.toml")``."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
    return loads(text, base_dir=str(p.resolve().parent), source=str(p))


def _check_policy(cfg: Config, source: str) -> None:
    for i, raw in enumerate(cfg.policy.settings):
        pattern = raw.strip().lower()
        if not pattern:
            raise ConfigError(f"{source}: policy.settings[{i}]: empty setting name")
        # the name itself, or a glob that would cover a setting that must stay closed
        hit = next((n for n in (*NEVER_SETTINGS, "any_preload_libraries")
                    if fnmatch.fnmatchcase(n, pattern)), None)
        if hit is not None:
            raise ConfigError(
                f"{source}: policy.settings[{i}]: {raw!r} would allow "
                f"{'every setting' if hit == '*' else hit}, which pgguard never lets a "
                f"session change: {never_setting(hit)}")


# every statement kind the classifier reports (Statement.kind / kinds): what a rule's
# ``when.statements`` may name (tests/test_config_rule_values.py keeps it in step)
STATEMENT_KINDS = frozenset({
    "alter", "analyze", "assign", "begin", "call", "checkpoint", "close", "cluster",
    "comment", "commit", "commit_prepared", "copy", "create", "deallocate", "declare",
    "delete", "discard", "do", "drop", "execute", "explain", "fetch", "grant", "insert",
    "listen", "load", "lock", "merge", "move", "notify", "prepare", "prepare_transaction",
    "reassign", "refresh", "reindex", "release", "reset", "return", "revoke", "rollback",
    "rollback_prepared", "savepoint", "security_label", "select", "set", "show",
    "transaction", "truncate", "unlisten", "update", "vacuum"})


def _check_rule_values(cfg: Config, i: int, w: When, source: str) -> None:
    """A value a rule can never meet is a typo that switches the rule off: refused."""
    for j, kind in enumerate(w.statements or ()):
        if kind.lower() not in STATEMENT_KINDS:
            close = difflib.get_close_matches(kind.lower(), sorted(STATEMENT_KINDS), 3)
            raise ConfigError(
                f"{source}: rules[{i}].when.statements[{j}]: unknown statement kind "
                f"{kind!r}" + (f" (did you mean {' or '.join(close)}?)" if close else "")
                + f"; kinds: {', '.join(sorted(STATEMENT_KINDS))}")
    if w.groups and cfg.auth.oidc is None:
        # (an OIDC provider may give groups no identity here has: not checked then)
        known = {g for ident in cfg.identities.values() for g in ident.groups}
        for j, g in enumerate(w.groups):
            if g not in known:
                raise ConfigError(
                    f"{source}: rules[{i}].when.groups[{j}]: no identity is in group {g!r}"
                    f" (groups: {', '.join(sorted(known)) or 'none'})")
    allowed = cfg.upstream.databases
    if w.databases and allowed:
        for j, pat in enumerate(w.databases):
            if not any(fnmatch.fnmatchcase(db, pat) for db in allowed):
                raise ConfigError(
                    f"{source}: rules[{i}].when.databases[{j}]: {pat!r} matches none of "
                    f"upstream.databases ({', '.join(allowed)})")


def _check_references(cfg: Config, source: str) -> None:
    _check_policy(cfg, source)
    for i, rule in enumerate(cfg.rules):
        if rule.when.identity:
            for name in rule.when.identity:
                if name not in cfg.identities:
                    raise ConfigError(
                        f"{source}: rules[{i}].when.identity: unknown identity {name!r}")
        _check_rule_values(cfg, i, rule.when, source)
    names = [r.name for r in cfg.rules]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{source}: rules[{i}].name: duplicate rule name {name!r}")
    for name, ident in cfg.identities.items():
        if ident.password_env and ident.password_file:
            raise ConfigError(
                f"{source}: identities.{name}: password_env and password_file exclude each other")
    if cfg.upstream.password_env and cfg.upstream.password_file:
        raise ConfigError(
            f"{source}: upstream: password_env and password_file exclude each other")


def read_secret(cfg: Config, env: str | None, file: str | None, key_path: str,
                prefix: str = "") -> str | None:
    """A secret from an environment variable or a file named in the config; errors name
    the key: ``key_path`` is the key itself (``admin.token_file``) or its table's path
    (``identities.alice``), whose keys are ``<prefix>password_env`` / ``_file``."""
    if env:
        value = os.environ.get(env)
        if value is None:
            where = key_path if key_path.endswith("_env") else f"{key_path}.{prefix}password_env"
            raise ConfigError(f"{where}: environment variable {env} is not set")
        return value
    if file:
        p = Path(file)
        if not p.is_absolute():
            p = Path(cfg.base_dir) / p
        try:
            return p.read_text().rstrip("\r\n")
        except OSError as e:
            where = key_path if key_path.endswith("_file") else f"{key_path}.{prefix}password_file"
            raise ConfigError(f"{where}: cannot read secret file {p}: {e.strerror}") from None
    return None


def identity_secret(cfg: Config, name: str) -> str | None:
    """An identity's static password (None: it has none, tokens only); ConfigError when
    it is empty or blank: an empty password would let anyone log in as it."""
    ident = cfg.identities[name]
    pw = read_secret(cfg, ident.password_env, ident.password_file, f"identities.{name}")
    if pw is not None and not pw.strip():
        key = "password_env" if ident.password_env else "password_file"
        raise ConfigError(
            f"identities.{name}.{key}: the secret is empty: anyone could log in as "
            f"{name}; write a password there, or remove the key (the identity then logs "
            "in with tokens only)")
    return pw


def admin_token(cfg: Config) -> str | None:
    """The admin token: the variable named by ``[admin] token_env`` when it is set, else
    the contents of ``[admin] token_file`` (ConfigError when that file is unreadable),
    else None (no admin API). Example: ``admin_token(load("pgguard.toml"))``."""
    a = cfg.admin
    if a.token_env and os.environ.get(a.token_env):
        return os.environ[a.token_env]
    if a.token_file:
        return read_secret(cfg, None, a.token_file, "admin.token_file") or None
    return None


def duration(cfg_value: str | None, default: float) -> float:
    return default if cfg_value is None else parse_duration(cfg_value)


def instance_name(cfg: Config) -> str:
    """This instance's name in a fleet ([instance] name, else hostname-port)."""
    if cfg.instance.name:
        return cfg.instance.name
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "pgguard"
    return f"{host}-{cfg.listen.port}"
