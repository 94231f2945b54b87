# Listeners, worker processes, signals and graceful shutdown.
from __future__ import annotations

import asyncio
import ctypes
import gc
import hashlib
import hmac
import itertools
import logging
import mmap
import os
import secrets
import signal
import socket
import ssl
import struct
import sys
import time
import zlib
from pathlib import Path

from ..approvals.metrics import Registry
from ..approvals.store import StoreUnavailable
from ..audit.writer import AuditLog
from ..auth import oidc, throttle, tokens
from ..auth.scram import ScramVerifier
from ..auth.throttle import Throttle
from ..config import (Config, Mask, admin_token, identity_secret, instance_name, parse_duration,
                      read_secret)
from ..control import approval_store, open_link, revocation_watcher
from ..control.fleet import Heartbeat
from ..control.schema import migrate
from ..errors import ConfigError, ShuttingDown, TooManyConnections
from ..masking.detectors import DetectorSet
from ..masking.wire import CATALOG_TTL, hash_key, load_catalog
from ..policy.bodies import MAX_DEPTH, judgement, unreadable
from ..policy.cache import SHAREABLE_KINDS, DecisionCache
from ..policy.rules import PolicyEngine
from ..policy.views import CATALOG_KINDS, ViewMap
from ..protocol import messages as m
from . import sideconn
from .cancel import CancelKeyCipher
from .fncall import function_info
from .services import Front, Services
from .session import ClientProtocol
from .sideconn import SideLink
from .upstream import UpstreamLink, unix_socket_path

log = logging.getLogger("pgguard.server")

# bound of each decision map (by message, by shape) per identity and database: entries,
# and bytes of the keys (statement texts); a text longer than DECISION_TEXT_MAX is
# judged each time rather than kept (likely unique, and each would cost its size)
DECISIONS_PER_IDENTITY = 10_000
DECISION_BYTES = 16 << 20
DECISION_TEXT_MAX = 64 * 1024
# catalog knowledge of the policy, per database: the view map is read again after
# VIEW_MAP_TTL (or DDL), a function found by OID is kept FUNCTION_TTL (or until DDL);
# views a session announced stay in the map LEARNED_TTL whatever the catalog says
FUNCTION_RECENT_TTL = 120.0     # s a created name counts before the catalog shows it
VIEW_MAP_TTL = 30.0
# every function name, whether it is a built-in (pg_catalog) one, and whether it is
# volatile (a built-in that is not may change no state: Postgres' own marking)
FUNCTION_NAMES_SQL = ("SELECT p.proname, p.pronamespace = 'pg_catalog'::regnamespace, "
                      "p.provolatile = 'v' "
                      "FROM pg_catalog.pg_proc p WHERE p.pronamespace <> "
                      "'information_schema'::regnamespace")
# every role: a schema named like one is first on that role's default search_path
ROLE_NAMES_SQL = "SELECT rolname FROM pg_catalog.pg_roles"
# every relation, schema-qualified (temporary ones under pg_temp: an unqualified name
# finds them first), for writes to names the catalog does not know (relation_known)
RELATION_NAMES_SQL = (
    "SELECT CASE WHEN n.nspname LIKE 'pg\\_temp\\_%' THEN 'pg_temp' ELSE n.nspname END "
    "|| '.' || c.relname, c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_temp\\_%' "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
    "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')")
FUNCTION_TTL = 60.0
LEARNED_TTL = 600.0
# after a failed background read of the view map, wait this long before the next try
VIEW_MAP_RETRY = 5.0
# function bodies judged for calls (per database and called name) are read again after
# VIEW_MAP_TTL, and every second for BODIES_SETTLE seconds after DDL went by (a read in
# between may predate the DDL's commit); at most BODIES_PER_DATABASE names are kept
BODIES_SETTLE = 10.0
BODIES_PER_DATABASE = 10_000
# masked columns each worker remembers by table OID (so renames keep their mask)
STICKY_PER_WORKER = 8192


# cancel requests forwarded upstream at once (each opens a connection), and from one
# client address in a second, for keys that are not of this worker's sessions
CANCEL_OPEN_MAX = 16
CANCEL_RATE = 20
# a connection logging in longer than this may be closed to admit a new one while
# limits.max_logging_in are (see Services._crowding)
CROWD_AGE = 1.0
# ... and one that has spoken, when every address holds only one such connection, after
# this long (a login by token or password takes milliseconds; a slow SCRAM over a slow
# link, a second or two)
STALL_AGE = 5.0
# how often masked sessions' catalogs are checked against DDL made directly upstream
CATALOG_WATCH = 1.0
# how often sessions are checked for idling in a transaction (limits.*idle_in_transaction)
IDLE_TICK = 0.5
# what changes when a column, a table, a view's definition or an inheritance link does
# (each DDL writes new catalog rows): their count and the sum of their xmins
CATALOG_FINGERPRINT_SQL = "SELECT pg_catalog.concat_ws('/', " + ", ".join(
    f"(SELECT pg_catalog.count(*) || ':' || coalesce(pg_catalog.sum("
    f"xmin::text::int8), 0) FROM pg_catalog.{t})"
    for t in ("pg_class", "pg_attribute", "pg_rewrite", "pg_inherits", "pg_type")) + ")"


def _same_masks(a, b) -> bool:
    """Whether two reads of a database's mask catalog mask the same columns under the
    same names (OIDs known aside)."""
    return a.columns == b.columns and a.tables == b.tables and a.views == b.views \
        and a.types == b.types and a.typed == b.typed and a.derived == b.derived


class CatalogSignal:
    """Catalog freshness shared by the worker processes: an anonymous MAP_SHARED
    mapping made before they fork. Offset 0 holds a generation counter that DDL seen by
    any worker bumps (every worker's mask catalog is stale once it moved); then, per
    worker, a count and a region of (database hash, table OID, attnum, mask index)
    records of the masked columns that worker found, so a masked table renamed or moved
    to another schema stays masked in every worker. One writer per region: no lock."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self._counts = 8
        self._records = 8 + 4 * self.workers
        self.mm = mmap.mmap(-1, self._records + self.workers * STICKY_PER_WORKER * 12,
                            flags=mmap.MAP_SHARED)
        self._written: set[tuple[int, int, int]] = set()

    def generation(self) -> int:
        return struct.unpack_from("!Q", self.mm, 0)[0]

    def bump(self) -> None:
        # a lost race between two workers still moves the value: all that matters
        struct.pack_into("!Q", self.mm, 0, self.generation() + 1)

    def remember(self, worker: int, database: str, columns: dict) -> None:
        """Record masked (table OID, attnum) -> mask index for ``database``."""
        slot = worker % self.workers
        db = zlib.crc32(database.encode())
        (n,) = struct.unpack_from("!I", self.mm, self._counts + 4 * slot)
        base = self._records + slot * STICKY_PER_WORKER * 12
        for (oid, attnum), idx in columns.items():
            if (db, oid, attnum) in self._written:
                continue
            if n >= STICKY_PER_WORKER:
                log.warning("masked-column memory full: renamed tables may lose masks")
                break
            struct.pack_into("!IIhH", self.mm, base + 12 * n, db, oid, attnum, idx)
            n += 1
            self._written.add((db, oid, attnum))
        struct.pack_into("!I", self.mm, self._counts + 4 * slot, n)

    def sticky(self, database: str) -> dict[tuple[int, int], int]:
        """(table OID, attnum) -> mask index, as any worker recorded them."""
        db = zlib.crc32(database.encode())
        out: dict[tuple[int, int], int] = {}
        for slot in range(self.workers):
            (n,) = struct.unpack_from("!I", self.mm, self._counts + 4 * slot)
            base = self._records + slot * STICKY_PER_WORKER * 12
            for i in range(min(n, STICKY_PER_WORKER)):
                h, oid, attnum, idx = struct.unpack_from("!IIhH", self.mm, base + 12 * i)
                if h == db:
                    out.setdefault((oid, attnum), idx)
        return out


def _every_function(name: str) -> bool:
    return True


class Server:
    """Everything sessions share inside one worker process."""

    def __init__(self, cfg: Config, *, cancel_key: bytes | None = None,
                 worker: int = 0, catalog_signal: CatalogSignal | None = None) -> None:
        self.cfg = cfg
        self.worker = worker
        # DDL seen by any worker, and masked columns any worker found (shared mapping)
        self.catalog_signal = catalog_signal or CatalogSignal(1)
        self.sessions: set = set()
        self._logging_in: set = set()       # admitted, not yet authenticated
        self._cancels_open = 0              # upstream connections forwarding a cancel
        self._cancel_rate: dict[str, list] = {}     # host -> [second began, count]
        self._cancels_dropped = 0
        self._cancel_said = -1e9            # when a cancel warning was last logged
        self._agent_sessions: set = set()   # authenticated sessions of agent identities
        cap = cfg.limits.agent_sessions
        self._agent_cap: int | None = None if cap == "auto" else cap   # None: not read yet
        self._agent_cap_read = 0.0          # when the upstream's limits were last asked
        self._ids = itertools.count(1)
        self.cancel_cipher = CancelKeyCipher(cancel_key)
        self.startup_timeout = parse_duration(cfg.limits.startup_timeout)
        self.shutdown_timeout = parse_duration(cfg.limits.shutdown_timeout)
        self.upstream_connect_timeout = parse_duration(cfg.upstream.connect_timeout)
        self.upstream_password = read_secret(
            cfg, cfg.upstream.password_env, cfg.upstream.password_file, "upstream")
        up = cfg.upstream
        self.link = UpstreamLink(up, self.upstream_password, self.upstream_connect_timeout,
                                 self.resolve_path(up.sslrootcert) if up.sslrootcert else None)
        self._fake_secret = secrets.token_bytes(32)
        self._verifiers: dict[str, ScramVerifier] = {}
        for name, ident in cfg.identities.items():
            pw = identity_secret(cfg, name)
            if pw is not None:
                self._verifiers[name] = ScramVerifier.from_password(pw)
        self.client_ssl = self._client_ssl()
        # bearer credentials: pgguard tokens (when a signing key is configured) and OIDC
        # a fleet's shared state ([control]): one link per process, no connection yet
        self.control = open_link(cfg)
        self.heartbeat = None
        self._heartbeat_task: asyncio.Task | None = None
        self.tokens_enabled = any(
            os.environ.get(env) for env in
            [cfg.auth.token_secret_env or ""] + list((cfg.auth.token_keys or {}).values()))
        if self.tokens_enabled:
            tokens.check_keys(cfg)
        self.oidc = oidc.from_config(cfg)
        self.bearer_enabled = self.tokens_enabled or self.oidc is not None
        self.throttle = Throttle.from_config(cfg)
        self.revocations = (revocation_watcher(cfg, self.control) if self.bearer_enabled
                            else None)
        # the session keeps its own caches (raw message, shape) in front of the engine
        self.policy = PolicyEngine(cfg, cache=DecisionCache(0))
        self._decisions: dict[tuple[str, str, str], tuple[dict, dict]] = {}
        self.audit = None          # the AuditLog, once start_audit() ran
        # approvals: the shared store, when some rule can hold a statement or an admin
        # token is configured; the admin HTTP server runs on the worker's loop
        self.approvals = None
        self.admin = None
        self.admin_token = admin_token(cfg)
        if self.admin_token or any(r.action == "approve" for r in cfg.rules):
            self.approvals = approval_store(cfg, self.control)
        self.audit_strict = cfg.audit.durability == "strict"
        self.shutting_down = False
        self._servers: list[asyncio.base_events.Server] = []
        self._background: set[asyncio.Task] = set()
        self._setup_metrics()
        # masking: detectors compiled once; catalogs per database, refreshed on a TTL
        self.detectors = DetectorSet.from_config(cfg.detectors.builtin, cfg.detectors.custom)
        self.mask_key = hash_key(cfg)
        self._catalogs: dict[str, object] = {}
        # what masking may ask of the upstream (catalog reads, the lineage planner)
        self.side = SideLink(self.link)
        self._catalog_loads: dict[str, asyncio.Task] = {}
        # policy catalog knowledge per database: views (ViewMap and its refresh state),
        # functions by OID for FunctionCall (oid -> (FunctionInfo, loaded at))
        self._views: dict[str, _ViewState] = {}
        self._functions: dict[str, dict[int, tuple[object, float]]] = {}
        self._no_views = ViewMap()
        # database -> [built-in names, other names, stale, loaded at, test]
        self._fn_names: dict[str, list] = {}
        self._fn_volatile: dict[str, frozenset] = {}
        self._role_names: frozenset | None = None
        self._rel_names: dict[str, frozenset] = {}
        self._rel_tables: dict[str, frozenset] = {}     # ordinary / partitioned tables
        # names of functions sessions created through pgguard, by database (bare name
        # -> when): user functions from that moment, before a catalog read shows them
        self._fn_recent: dict[str, dict[str, float]] = {}
        self._decision_gen: dict[str, int] = {}     # see decision_generation
        # calls of user functions: database -> called name -> [Judgement, read at]; DDL
        # seen per database (a generation, and when); the re-reading task once started
        self._bodies: dict[str, dict[str, list]] = {}
        self._bodies_gen: dict[str, int] = {}
        self._bodies_ddl: dict[str, float] = {}
        self._bodies_ticking = False
        self._idle = asyncio.Event()

    def resolve_path(self, p: str) -> str:
        path = Path(p)
        return str(path if path.is_absolute() else Path(self.cfg.base_dir) / path)

    def _client_ssl(self) -> ssl.SSLContext | None:
        lc = self.cfg.listen
        if not lc.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.resolve_path(lc.tls_cert), self.resolve_path(lc.tls_key))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"listen.tls_cert: cannot load certificate/key: {e}") from None
        return ctx

    # -- identities
    def verifier_for(self, name: str):
        v = self._verifiers.get(name)
        if v is None:
            # same shape and cost as a real one: no user enumeration
            v = ScramVerifier.fake(name, self._fake_secret)
        return v

    def has_secret(self, name: str) -> bool:
        return name in self._verifiers

    async def auth_failed(self, session, reason: str = "") -> None:
        log.info("authentication failed for %r from %s%s", session.identity_name,
                 session.client_addr, f": {reason}" if reason else "")
        self.throttle.record_failure(session.peer, name=session.identity_name)

    async def mask_catalog(self, database: str, need=(), max_age: float = CATALOG_TTL):
        """The masked columns of a database. Read again when DDL went through any
        worker since (the shared generation), after ``max_age`` (CATALOG_TTL), or when
        a table OID in ``need`` is not one it knows; concurrent callers share one read."""
        cat = self._catalogs.get(database)
        if cat is not None and cat.generation == self.catalog_signal.generation() \
                and time.monotonic() - cat.loaded <= max_age \
                and all(o in cat.known for o in need):
            return cat
        task = self._catalog_loads.get(database)
        if task is None:
            task = self._catalog_loads[database] = asyncio.get_running_loop().create_task(
                self._read_mask_catalog(database))
            task.add_done_callback(lambda _t: self._catalog_loads.pop(database, None))
        return await asyncio.shield(task)

    async def _read_mask_catalog(self, database: str):
        sig = self.catalog_signal
        gen = sig.generation()          # a bump while reading makes this read stale
        old = self._catalogs.get(database)
        # taken first: DDL after it moves it (see _masks_tick)
        fingerprint = (await sideconn.run(self.link, database, [CATALOG_FINGERPRINT_SQL])
                       )[0][0][0] if self.cfg.masks else None
        cat = await load_catalog(self.side, self.cfg.masks, database)
        cat.fingerprint = fingerprint
        cat.known, cat.generation = frozenset(), gen
        if not self.cfg.masks:
            self._catalogs[database] = cat
            return cat
        # columns masked before keep their mask wherever their table went (a rename,
        # SET SCHEMA, RENAME COLUMN): by table OID and attribute number, in any worker
        sticky = sig.sticky(database)
        oids = sorted({o for o, _ in sticky})
        stmts = ["SELECT oid FROM pg_catalog.pg_class WHERE relkind NOT IN ('i', 'I')"]
        if oids:
            stmts.append(
                "SELECT c.oid, a.attnum, n.nspname || '.' || c.relname, a.attname "
                "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c "
                "ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n "
                "ON n.oid = c.relnamespace WHERE a.attnum > 0 AND NOT a.attisdropped "
                f"AND c.oid IN ({', '.join(map(str, oids))}) ORDER BY 1, 2")
        res = await sideconn.run(self.link, database, stmts)
        masks = self.cfg.masks
        added: dict[int, tuple[str, list]] = {}
        for oid, attnum, table, attname in (res[1] if oids else ()):
            oid, attnum = int(oid), int(attnum)
            if oid not in cat.tables or oid in added:
                added.setdefault(oid, (table, []))[1].append((attnum, attname))
            idx = sticky.get((oid, attnum))
            if idx is not None and (oid, attnum) not in cat.columns:
                cat.columns[(oid, attnum)] = masks[idx] if idx < len(masks) else Mask(
                    column=f"{table}.{attname}", strategy="redact")
        cat.tables.update(added)
        cat.names = frozenset(name for name, _ in cat.tables.values())
        cat.known = frozenset(int(r[0]) for r in res[0])
        cat.generation = gen
        sig.remember(self.worker, database, {
            k: next((i for i, mk in enumerate(masks) if mk is v), 0xFFFF)
            for k, v in cat.columns.items()})
        if old is not None and _same_masks(old, cat):
            # read again (its TTL, a rename check) and nothing changed: the same object,
            # so sessions keep what they learned with it (the lineage of their prepared
            # statements: dropped, their computed columns would all come back masked)
            old.known, old.generation, old.loaded = cat.known, gen, cat.loaded
            old.fingerprint = fingerprint
            self._catalogs[database] = old
            return old
        self._catalogs[database] = cat
        if old is not None and (old.columns.keys() != cat.columns.keys()
                                or old.names != cat.names or old.tables != cat.tables):
            self.forget_decisions(database)     # parking decisions name masked tables
        return cat

    def catalog_changed(self, database: str) -> None:
        """DDL passed through: every worker reads the mask catalog again before the
        next rows leave (the shared generation), functions are looked up again, the
        view map read again soon. (The session that sent it calls this once more when
        its transaction ends: a catalog read in between saw the old state.)"""
        self.catalog_signal.bump()
        self._decision_gen[database] = self._decision_gen.get(database, 0) + 1
        self._catalogs.pop(database, None)
        self._functions.pop(database, None)
        names = self._fn_names.get(database)
        if names is not None:
            names[2] = True
        st = self._views.get(database)
        if st is not None:
            st.stale = True
        # function bodies may have changed (CREATE OR REPLACE, ALTER, DROP, renames, a
        # view a body's name now means): read again at the next call; decisions made
        # with them are forgotten (the compiled fast path would serve them unasked)
        self._bodies_gen[database] = self._bodies_gen.get(database, 0) + 1
        self._bodies_ddl[database] = time.monotonic()
        if self._bodies.pop(database, None) or self.cfg.masks:
            # with masks: a decision's parking judgement read the mask catalog of then
            # (a table may have become a masked table's parent since)
            self.forget_decisions(database)

    def catalog_committed(self, database: str) -> None:
        """A session's DDL is committed (pgguard saw its CommandComplete, then the
        session idle): read the view map again now, not at the next miss, so decisions
        cached before it (served with no Python, never asking for the map) are
        forgotten as soon as the map differs; a read already in flight may predate the
        commit, so another one follows it."""
        self.catalog_changed(database)
        st = self._views.get(database)
        if st is None or st.map is None:
            return
        if st.task is None:
            self._refresh_views(database, st)
        else:
            st.again = True

    async def _views_tick(self) -> None:
        # decisions served from the compiled caches never ask for the view map: read it
        # again on schedule (DDL made directly upstream shows within VIEW_MAP_TTL)
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for database, st in list(self._views.items()):
                if st.map is None or st.task is not None or \
                        now - st.failed_at < VIEW_MAP_RETRY:
                    continue
                if st.stale or now - st.loaded > VIEW_MAP_TTL:
                    if any(s.database == database for s in self.sessions):
                        self._refresh_views(database, st)

    async def catalog_fingerprint(self, database: str) -> str:
        """The catalog fingerprint of ``database`` now (see CATALOG_FINGERPRINT_SQL)."""
        return (await sideconn.run(self.link, database, [CATALOG_FINGERPRINT_SQL]))[0][0][0]

    async def _masks_tick(self) -> None:
        # masked sessions' catalogs against DDL made directly upstream (a view redefined,
        # a masked column moved to a new attnum, a table made a masked table's child):
        # the sessions that are open never read the catalog again by themselves while
        # every OID they meet is one it knows. A fingerprint of the catalog rows that
        # say what a column holds is read every CATALOG_WATCH seconds; when it moves,
        # the mask catalog is read again, and if that changed, every worker's sessions
        # (and their compiled lanes) read it before their next rows leave.
        while True:
            await asyncio.sleep(CATALOG_WATCH)
            dbs = {s.database for s in self.sessions if getattr(s, "masking", None) is not None}
            for db in dbs:
                old = self._catalogs.get(db)
                if old is None or getattr(old, "fingerprint", None) is None:
                    continue        # (being read: the read takes its own fingerprint)
                try:
                    fp = await self.catalog_fingerprint(db)
                    if fp != old.fingerprint and self._catalogs.get(db) is old:
                        cat = await self.mask_catalog(db, max_age=0.0)
                        if cat is not old:
                            log.info("masks: the catalog of database %s changed upstream; "
                                     "sessions read it again", db)
                            self.catalog_signal.bump()
                except asyncio.CancelledError:
                    raise
                except Exception as e:      # noqa: BLE001 - the next tick tries again
                    log.debug("masks: catalog fingerprint of %s not read: %s", db, e)

    # -- function names: which calls the blast-radius guard must measure
    async def ready_function_names(self, database: str) -> None:
        """Load (or refresh) the names of built-in and other functions of ``database``;
        raises when the catalog cannot be read (the session is then refused)."""
        hit = self._fn_names.get(database)
        if hit is not None and not hit[2] and time.monotonic() - hit[3] < VIEW_MAP_TTL:
            return
        await self._load_function_names(database)

    async def _load_function_names(self, database: str) -> None:
        rows, roles, rels = await sideconn.run(
            self.link, database, [FUNCTION_NAMES_SQL, ROLE_NAMES_SQL, RELATION_NAMES_SQL])
        self._role_names = frozenset(r[0] for r in roles)
        self._rel_names[database] = frozenset(r[0] for r in rels)
        self._rel_tables[database] = frozenset(r[0] for r in rels if r[1] == "t")
        builtin = frozenset(r[0] for r in rows if r[1] == "t")
        other = frozenset(r[0] for r in rows if r[1] != "t")
        self._fn_volatile[database] = frozenset(
            r[0] for r in rows if r[1] == "t" and r[2] == "t")
        self._fn_names[database] = [builtin, other, False, time.monotonic()]
        recent = self._fn_recent.get(database)
        if recent:
            # the catalog shows them now; a name it does not show (a rolled-back
            # CREATE) stops counting after a while, not at once (this read may have
            # started before that CREATE committed)
            now = time.monotonic()
            for name in [n for n, at in recent.items()
                         if n in other or now - at > FUNCTION_RECENT_TTL]:
                del recent[name]

    def builtin_function_name(self, database: str, name: str) -> bool:
        """Whether an unqualified ``name`` is one of pg_catalog's (by the names last
        read): a call of it that finds no other overload runs the built-in."""
        hit = self._fn_names.get(database)
        return hit is not None and "." not in name and name in hit[0]

    def note_functions(self, database: str, names) -> None:
        """Functions a session is creating through pgguard: every session counts
        calls of these names as calls of user functions from now on (a catalog read
        shows them only after the commit, and only when one runs)."""
        recent = self._fn_recent.setdefault(database, {})
        if len(recent) > 10_000:
            recent.clear()
        now = time.monotonic()
        for n in names:
            recent[n] = now
        hit = self._fn_names.get(database)
        if hit is not None:
            hit[2] = True           # read the names again at the next test

    def function_name_taken(self, database: str, name: str) -> bool:
        """Whether a function (any schema, pg_catalog's included) is named ``name`` by
        the names last read (unread: True)."""
        hit = self._fn_names.get(database)
        return hit is None or name in hit[0] or name in hit[1]

    def relation_known(self, database: str, name: str) -> bool:
        """Whether a relation is named ``name`` (schema.relation as the classifier
        qualifies it) by the names last read (unread: True). Temporary relations are
        not (any session's would do: a name qualified by public is not theirs)."""
        names = self._rel_names.get(database)
        if names is None:
            return True
        return name in names

    def plain_table(self, database: str, name: str) -> bool:
        """Whether ``name`` is a committed ordinary or partitioned table (not a view), by
        the names last read (unread: False)."""
        tables = self._rel_tables.get(database)
        return tables is not None and name in tables

    def role_name(self, name: str) -> bool:
        """Whether a role is named ``name`` (by the names last read; unread: True)."""
        return self._role_names is None or name in self._role_names

    async def reload_function_names(self, database: str) -> None:
        """Read the function names of ``database`` again now."""
        await self._load_function_names(database)

    def volatile_builtins(self, database: str) -> frozenset | None:
        """The names of pg_catalog's volatile functions in ``database`` (by the names
        last read; None: not read yet)."""
        return self._fn_volatile.get(database)

    def user_function_test(self, database: str):
        """A test ``name -> bool``: may this call run code pgguard cannot see into (a
        function outside pg_catalog, or one unknown when the names were read)? Fail
        closed: with no names read, every function counts."""
        hit = self._fn_names.get(database)
        if hit is None:
            return _every_function
        test = hit[4] if len(hit) > 4 else None
        if test is None:
            builtin, other = hit[0], hit[1]
            recent = self._fn_recent.setdefault(database, {})

            def test(name: str) -> bool:
                schema, dot, bare = name.rpartition(".")
                if dot:
                    return schema != "pg_catalog"
                return bare not in builtin or bare in other or bare in recent
            hit.append(test)
        if hit[2] or time.monotonic() - hit[3] > VIEW_MAP_TTL:
            hit[2], hit[3] = False, time.monotonic()    # one refresh at a time
            self.background(self._refresh_function_names(database))
        return test

    async def _refresh_function_names(self, database: str) -> None:
        try:
            await self._load_function_names(database)
        except Exception as e:      # noqa: BLE001 - keep the old names, say why
            log.warning("could not re-read function names of %s: %s", database, e)

    # -- calls of user functions: judged by the bodies they run now
    def function_judgement(self, database: str, name: str):
        """The Judgement of the called ``name`` (pgguard.policy.bodies), or None when
        it was not read yet (or DDL went by since)."""
        hit = self._bodies.get(database, {}).get(name)
        return None if hit is None else hit[0]

    async def load_function_bodies(self, database: str, names: list) -> None:
        """Read what calling ``names`` runs, and the user functions their bodies call
        (to MAX_DEPTH levels), from the upstream catalog. A catalog that cannot be read
        leaves a judgement that refuses the call (fail closed); read again later."""
        test = self.user_function_test(database)
        todo = list(dict.fromkeys(names))
        if not self._bodies_ticking:
            self._bodies_ticking = True
            self.background(self._bodies_tick())
        for _ in range(MAX_DEPTH + 1):
            if not todo:
                break
            gen = self._bodies_gen.get(database, 0)
            started = time.monotonic()
            try:
                rows = await sideconn.function_definitions(self.link, database, todo)
            except Exception as e:      # noqa: BLE001 - cannot tell what it runs: refuse
                log.warning("reading function definitions of %s failed: %s", database, e)
                cache = self._bodies_cache(database)
                for n in todo:
                    cache[n] = [unreadable(n, str(e)), 0.0]
                return
            cache = self._bodies_cache(database)
            # DDL went by during the read: keep it for this decision, re-read it soon
            at = started if self._bodies_gen.get(database, 0) == gen else 0.0
            nxt: list[str] = []
            for n in todo:
                try:
                    j = judgement(n, rows.get(n, []))
                except Exception as e:      # noqa: BLE001 - unjudgeable: refused, not retried
                    log.warning("judging the definition of %s() failed: %s", n, e)
                    j = unreadable(n, f"pgguard could not read its definition: {e}")
                cache[n] = [j, at]
                nxt.extend(f for f in j.nested if test(f) and f not in cache)
            todo = list(dict.fromkeys(nxt))

    def _bodies_cache(self, database: str) -> dict:
        cache = self._bodies.setdefault(database, {})
        if len(cache) >= BODIES_PER_DATABASE:
            cache.clear()
            self.forget_decisions(database)
        return cache

    async def _bodies_tick(self) -> None:
        # decisions served from the compiled caches never ask for the bodies: read them
        # again on schedule (a function replaced directly upstream shows within
        # VIEW_MAP_TTL), and soon after DDL went by; a body that changed forgets them
        while True:
            await asyncio.sleep(1.0)
            for database, cache in list(self._bodies.items()):
                if not any(s.database == database for s in self.sessions):
                    # no one to re-read them for: decisions made with them go too
                    self._bodies.pop(database, None)
                    self.forget_decisions(database)
                    continue
                now = time.monotonic()
                settle = self._bodies_ddl.get(database, -BODIES_SETTLE) + BODIES_SETTLE
                names = [n for n, (j, at) in cache.items()
                         if j.error or now - at > VIEW_MAP_TTL or at < settle]
                if names:
                    await self._reread_bodies(database, names)

    async def _reread_bodies(self, database: str, names: list[str]) -> None:
        gen = self._bodies_gen.get(database, 0)
        started = time.monotonic()
        try:
            rows = await sideconn.function_definitions(self.link, database, names)
        except Exception as e:      # noqa: BLE001 - keep what was read, try again later
            log.warning("re-reading function definitions of %s failed: %s", database, e)
            return
        cache = self._bodies.get(database)
        if cache is None or self._bodies_gen.get(database, 0) != gen:
            return                  # dropped meanwhile: the next call reads them anew
        changed = False
        for n in names:
            old = cache.get(n)
            j = judgement(n, rows.get(n, []))
            if old is None or old[0].digest != j.digest:
                changed = True
            cache[n] = [j, started]
        if changed:
            self.forget_decisions(database)

    # -- policy catalog: functions by OID (FunctionCall), views (rules see through them)
    def cached_function(self, database: str, oid: int):
        """The FunctionInfo of ``oid`` when known and fresh, else None."""
        hit = self._functions.get(database, {}).get(oid)
        if hit is None or time.monotonic() - hit[1] > FUNCTION_TTL:
            return None
        return hit[0]

    async def resolve_function(self, database: str, oid: int):
        """The FunctionInfo of ``oid`` read from the upstream catalog (None: no such
        function); raises when the catalog cannot be read."""
        info = function_info(oid, await sideconn.function_rows(self.link, database, oid))
        if info is not None:
            funcs = self._functions.setdefault(database, {})
            if len(funcs) >= 10_000:
                funcs.clear()
            funcs[oid] = (info, time.monotonic())
        return info

    async def ready_views(self, database: str) -> None:
        """Make sure a fresh view map of ``database`` is at hand (a session under a
        policy starts only once it is); raises when the catalog cannot be read."""
        began = time.monotonic()
        st = self._views.setdefault(database, _ViewState())
        while st.map is None or st.stale or st.task is not None or \
                time.monotonic() - st.loaded > VIEW_MAP_TTL:
            # the read in flight may have begun before the DDL that made the map stale
            # (its commit then starts another read as it ends): wait until a read begun
            # after this call is done, or one failed since
            await self._load_views(database)
            if st.map is not None and (st.loaded >= began or st.failed_at >= began):
                return

    def views_fresh(self, database: str) -> bool:
        """Whether the view map of ``database`` is read and no DDL went by since (no
        read pending or in flight)."""
        st = self._views.get(database)
        return st is not None and st.map is not None and not st.stale and st.task is None

    def view_map(self, database: str):
        """The view map decisions expand with (refreshed in the background when stale)."""
        st = self._views.get(database)
        if st is None or st.map is None:
            return self._no_views
        now = time.monotonic()
        if st.task is None and (st.stale or now - st.loaded > VIEW_MAP_TTL) \
                and now - st.failed_at > VIEW_MAP_RETRY:
            self._refresh_views(database, st)
        return st.map

    def views_published(self, database: str, edges: dict) -> None:
        """A session sent statements that create views others may see: they count for
        every session at once, before the catalog shows them."""
        st = self._views.setdefault(database, _ViewState())
        now = time.monotonic()
        for name, behind in edges.items():
            old = st.learned.get(name)
            st.learned[name] = ((old[0] | behind) if old else behind, now)
        st.map = (st.map or ViewMap()).merged(edges)
        st.stale = True
        self.forget_decisions(database)

    def decision_generation(self, database: str) -> int:
        """Moves whenever what a decision of ``database`` rests on may have changed (DDL
        through pgguard, a new view map, function bodies read again): a statement
        prepared under an older generation is judged again at its next Bind."""
        return self._decision_gen.get(database, 0)

    def forget_decisions(self, database: str) -> None:
        """Empty every decision cache of ``database`` (the view map changed under them);
        the compiled pipes hold the same dicts, so they miss from now on."""
        self._decision_gen[database] = self._decision_gen.get(database, 0) + 1
        for (_, db, _), (exact, shapes) in self._decisions.items():
            if db == database:
                exact.clear()
                shapes.clear()
        for s in self.sessions:
            if s.database == database:
                s.enforce.forget_decisions()

    def _refresh_views(self, database: str, st: _ViewState) -> asyncio.Task:
        st.task = asyncio.get_running_loop().create_task(self._read_views(database, st))
        return st.task

    async def _load_views(self, database: str) -> None:
        st = self._views.setdefault(database, _ViewState())
        task = st.task if st.task is not None else self._refresh_views(database, st)
        await asyncio.shield(task)

    async def _read_views(self, database: str, st: _ViewState) -> None:
        started = time.monotonic()
        st.stale = False
        try:
            read = await sideconn.rewrite_rows(self.link, database)
            # (off the loop: the definitions and defaults of a large schema take a while
            # to read the first time; the map is set with no wait after this)
            got = await asyncio.to_thread(ViewMap.from_rows, *read)
        except BaseException as e:
            st.stale = True
            st.failed_at = time.monotonic()
            if not isinstance(e, Exception) or st.map is None:
                raise
            log.warning("reading the views of %s failed: %s", database, e)
            return
        finally:
            st.task = None
            if st.again:
                st.again = False
                st.stale = True
        learned = {k: v for k, (v, at) in st.learned.items()
                   if started - at < LEARNED_TTL}
        st.learned = {k: st.learned[k] for k in learned}
        new = got.merged(learned)
        st.loaded = started
        if st.map is None:
            st.map = new
        elif new != st.map:
            st.map = new
            self.forget_decisions(database)
        if st.stale and st.task is None:        # a commit came during this read
            self._refresh_views(database, st)

    # -- metrics (served on the admin port's /metrics, summed across workers)
    def _setup_metrics(self) -> None:
        m = self.metrics = Registry(instance_name(self.cfg))
        self.m_sessions = m.gauge("pgguard_sessions", "client sessions open")
        self.m_statements = m.counter("pgguard_statements_total",
                                      "statements by decision", labels=("decision",))
        self._stmt_children: dict = {}
        self.m_masked = m.counter("pgguard_masked_cells_total", "cells masked in results")
        self.m_lane = m.counter("pgguard_masking_lane_total",
                                "statements of masking sessions forwarded by the compiled "
                                "lane (their results read no masked column)")
        m.gauge("pgguard_audit_queue_depth", "audit records waiting to be written",
                fn=lambda: self.audit.stats().queue_depth if self.audit is not None else 0)
        m.counter("pgguard_audit_dropped_total", "audit records dropped (batched mode)",
                  fn=lambda: self.audit.stats().dropped if self.audit is not None else 0)
        m.gauge("pgguard_audit_upload_backlog",
                "sealed audit files waiting for [audit] store (0 without a store)",
                fn=lambda: self.audit.stats().upload_backlog if self.audit is not None else 0)
        m.counter("pgguard_audit_uploaded_files_total", "audit files uploaded to [audit] store",
                  fn=lambda: self.audit.stats().uploaded if self.audit is not None else 0)

    def count_statement(self, decision: str, n: int = 1) -> None:
        child = self._stmt_children.get(decision)
        if child is None:
            child = self._stmt_children[decision] = self.m_statements.labels(
                decision=decision)
        child.inc(n)

    def _report_fast(self, session) -> None:
        n, lane = session.take_fast_counts()
        if n:
            self.count_statement("allowed", n)
        if lane:
            self.m_lane.inc(lane)

    async def _metrics_tick(self) -> None:
        # statements the compiled fast path forwarded, folded into the counter; and DDL
        # another worker passed (the shared catalog generation moved): with masks, the
        # decisions cached here judged parking on the mask catalog of before
        seen = self.catalog_signal.generation()
        while True:
            await asyncio.sleep(1.0)
            for s in list(self.sessions):
                self._report_fast(s)
            gen = self.catalog_signal.generation()
            if gen != seen:
                seen = gen
                if self.cfg.masks:
                    for db in {s.database for s in self.sessions}:
                        self.forget_decisions(db)

    # -- background work that must finish before exit (dropping ephemeral roles)
    def background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def check_masks(self) -> None:
        """At start, read each configured database's mask catalog once: a [[masks]]
        entry naming no column is logged then (load_catalog), not at the first
        session. An upstream that cannot be reached yet is only noted."""
        for db in (self.cfg.upstream.databases or [])[:16]:
            if any(ch in db for ch in "*?["):
                continue
            try:
                await self.mask_catalog(db)
            except Exception as e:      # (down, or the database missing): sessions say it
                log.info("masks not checked against database %s yet: %s", db, e)

    async def janitor(self) -> None:
        """Drop ephemeral roles a crash left behind: pgguard_* roles older than a minute
        with no session."""
        if not self.cfg.upstream.provision:
            return
        db = (self.cfg.upstream.databases or ["postgres"])[0]
        try:
            rows = (await sideconn.run(self.link, db, [
                "SELECT rolname, coalesce(rolvaliduntil < now(), false) FROM pg_roles r "
                "WHERE rolname LIKE 'pgguard\\_%' AND NOT EXISTS (SELECT 1 FROM "
                "pg_stat_activity a WHERE a.usename = r.rolname)"]))[0]
        except Exception as e:      # noqa: BLE001 - the janitor must not stop the proxy
            log.warning("janitor: cannot list ephemeral roles: %s", e)
            return
        now = time.time()
        for name, expired in rows:
            parts = name.split("_")
            # a young role may belong to a session another instance is opening right now
            if expired != "t" and len(parts) >= 4 and parts[-2].isdigit() \
                    and now - int(parts[-2]) < 60:
                continue
            log.info("janitor: dropping leftover ephemeral role %s", name)
            await sideconn.drop_role(self.link, db, name, self.cfg.upstream.template_role)

    # -- policy
    def policy_inspects(self, identity_name: str, identity, database: str) -> bool:
        """False when nothing could refuse this identity's statements: the default for
        its kind is allow and no block/approve rule applies to it."""
        return self.policy.inspects(identity_name, identity, database)

    def decision_cache(self, identity_name: str, database: str,
                       scope: str = "readwrite") -> tuple[dict, dict]:
        """(by raw message, by shape) decision maps shared by one identity's sessions
        on one database with one token scope."""
        key = (identity_name, database, scope)
        c = self._decisions.get(key)
        if c is None:
            c = self._decisions[key] = ({}, {})
        return c

    @staticmethod
    def remember_decision(cache: tuple[dict, dict], msg: bytes, key: bytes | None, d) -> None:
        # not cached: anything the session's prepared-statement memory must see or
        # depends on (the compiled fast path forwards cache hits without Python), and
        # DDL (the session learns views from it; functions and views change)
        if d.rule == "internal-error" or any(
                s.session_dependent or s.kind in ("prepare", "deallocate", "discard")
                or not CATALOG_KINDS.isdisjoint(s.kinds) for s in d.statements):
            return
        exact, shapes = cache
        if len(msg) > DECISION_TEXT_MAX:
            return
        # what an entry holds: its key, and the decision's statements with their texts
        _bounded_put(exact, msg, d, len(msg) + _decision_bytes(d))
        if key is not None and d.statements and all(
                s.kind in SHAREABLE_KINDS and not s.literal_dependent
                and all(k in SHAREABLE_KINDS for k in s.kinds) for s in d.statements):
            _bounded_put(shapes, key, d, len(key) + _decision_bytes(d))

    # -- sessions
    def next_session_id(self) -> str:
        return f"{os.getpid():x}-{next(self._ids):x}"

    def admit(self, session) -> bool:
        if self.shutting_down:
            session.refuse(TooManyConnections("the database system is shutting down",
                                              sqlstate="57P03"))
            return False
        if len(self.sessions) >= self.cfg.limits.max_client_connections:
            session.refuse(TooManyConnections("sorry, too many clients already"))
            return False
        if len(self._logging_in) >= self.cfg.limits.max_logging_in:
            victim = self._crowding()
            if victim is not None:
                # the address holding the most of the slots gives up its oldest (red team
                # 23: 256 connections that sent nothing kept every login out, refused for
                # as long as their sender reconnected)
                log.info("session %s from %s: still logging in after %.1f s while %d "
                         "connections are; closed to admit a new one", victim.id,
                         victim.client_addr, time.monotonic() - victim.admitted_at,
                         len(self._logging_in))
                self._logging_in.discard(victim)
                victim.close()
        if len(self._logging_in) >= self.cfg.limits.max_logging_in:
            session.refuse(TooManyConnections(
                "sorry, too many clients already",
                detail=f"{len(self._logging_in)} connections are logging in "
                       f"(limits.max_logging_in = {self.cfg.limits.max_logging_in})"))
            return False
        self._logging_in.add(session)
        self.sessions.add(session)
        self.m_sessions.inc()
        self._idle.clear()
        return True

    def _crowding(self):
        """The connection still logging in to close so that a new one may log in, or
        None. Only one that has waited longer than CROWD_AGE (a login takes far less):
        first one whose startup packet has not come whole (a client sends it as it
        connects; helper 133 sent one byte per connection), of the address holding the
        most such; else the oldest of the
        address holding the most, when it holds two or more; else (every address holds
        one) the oldest, once it has waited STALL_AGE. A client in the middle of its
        login (a slow SCRAM, a TLS handshake) goes after every silent connection, and
        after the crowd of any address that holds more than one."""
        now = time.monotonic()
        due = [s for s in self._logging_in if now - s.admitted_at >= CROWD_AGE]
        if not due:
            return None
        silent = [s for s in due if not s.params]      # no startup packet read yet
        pool = silent or due
        by_host: dict = {}
        for s in pool:
            peer = s.peer
            by_host.setdefault(peer[0] if isinstance(peer, tuple) else peer, []).append(s)
        crowd = max(by_host.values(), key=len)
        if silent or len(crowd) >= 2:
            return min(crowd, key=lambda s: s.admitted_at)
        oldest = min(pool, key=lambda s: s.admitted_at)
        return oldest if now - oldest.admitted_at >= STALL_AGE else None

    def logged_in(self, session) -> bool:
        """``session`` authenticated: no longer counted as logging in; an agent's
        counted among the agents' sessions, or refused past limits.agent_sessions."""
        self._logging_in.discard(session)
        ident = session.identity
        if ident is None or ident.kind != "agent":
            return True
        cap = self._agent_cap
        if cap is None and time.monotonic() - self._agent_cap_read > 60:
            self._agent_cap_read = time.monotonic()
            self.background(self._read_agent_cap(session.database))
        if cap and len(self._agent_sessions) >= cap:
            session.fail(TooManyConnections(
                "too many sessions of agent identities",
                detail=f"{len(self._agent_sessions)} agent sessions are open in this "
                       f"worker (limits.agent_sessions = {self.cfg.limits.agent_sessions}"
                       + (f": {cap} here" if self.cfg.limits.agent_sessions == "auto"
                          else "") + ")",
                hint="Close idle sessions, or raise limits.agent_sessions; humans can "
                     "still log in."))
            return False
        self._agent_sessions.add(session)
        return True

    async def _read_agent_cap(self, database: str) -> None:
        """limits.agent_sessions = "auto": the cap from the upstream's own limits."""
        try:
            rows = await self.side.run(database, [
                "SELECT current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int"])
            self._agent_cap = agent_cap(int(rows[0][0][0]), int(rows[0][0][1]),
                                        self.catalog_signal.workers)
            log.info("agents may hold %d sessions in this worker (limits.agent_sessions = "
                     "auto)", self._agent_cap)
        except Exception as e:      # noqa: BLE001 - asked again a minute later
            log.info("limits.agent_sessions: the upstream's limits not read yet: %s", e)

    def forget(self, session) -> None:
        self._logging_in.discard(session)
        self._agent_sessions.discard(session)
        if session in self.sessions:
            self.m_sessions.dec()
            self._report_fast(session)
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()

    async def forward_cancel(self, pid: int, secret: int, host: str = "") -> None:
        try:
            upid, usecret = self.cancel_cipher.decode(pid, secret)
        except ValueError:
            return
        # a key of one of this worker's sessions always goes; others (a session of
        # another worker, or a forged key: pgguard cannot tell them apart) within
        # bounds: each opens an upstream connection, and a flood of them filled the
        # upstream's accept queue until logins failed (red team 23)
        mine = any(s.upstream_key == (upid, usecret) for s in self.sessions)
        if not mine and not self._cancel_admit(host):
            return
        self._cancels_open += 1
        try:
            await self._forward_cancel(pid, secret, upid, usecret)
        finally:
            self._cancels_open -= 1

    def _cancel_admit(self, host: str) -> bool:
        now = time.monotonic()
        if self._cancels_open >= CANCEL_OPEN_MAX:
            self._cancel_dropped(now, "upstream cancel connections already open")
            return False
        got = self._cancel_rate.get(host)
        if got is None or now - got[0] >= 1.0:
            if len(self._cancel_rate) > 4096:
                self._cancel_rate.clear()
            self._cancel_rate[host] = [now, 1]
            return True
        got[1] += 1
        if got[1] > CANCEL_RATE:
            self._cancel_dropped(now, f"more than {CANCEL_RATE} a second from {host}")
            return False
        return True

    def _cancel_dropped(self, now: float, why: str) -> None:
        self._cancels_dropped += 1
        if now - self._cancel_said >= 10.0:
            self._cancel_said = now
            log.warning("cancel requests dropped (%d so far): %s", self._cancels_dropped, why)

    async def _forward_cancel(self, pid: int, secret: int, upid: int, usecret: int) -> None:
        if self.approvals is not None:
            try:
                withdrawn = await asyncio.to_thread(self.approvals.withdraw_cancel_key,
                                                    (pid << 32) | secret)
            except StoreUnavailable as e:
                # its waiter was refused already (fail closed); still cancel upstream
                log.warning("cancel: %s", e.message)
                withdrawn = 0
            if withdrawn:
                return  # the statement was held for approval: withdrawn, nothing upstream
        up = self.cfg.upstream
        try:
            async with asyncio.timeout(self.upstream_connect_timeout):
                if up.host.startswith("/"):
                    reader, writer = await asyncio.open_unix_connection(
                        unix_socket_path(up.host, up.port))
                else:
                    reader, writer = await asyncio.open_connection(up.host, up.port)
                writer.write(m.cancel_request(upid, usecret))
                await writer.drain()
                # the server closes the connection once it has read the request
                await reader.read()
                writer.close()
        except (OSError, TimeoutError) as e:
            now = time.monotonic()
            if now - self._cancel_said >= 10.0:
                self._cancel_said = now
                log.warning("could not forward a cancel request upstream: %s", e)

    def start_control(self) -> None:
        """Listen to the control database and beat (a fleet member): every worker."""
        if self.control is None:
            return
        self.control.start()

        def stats() -> tuple[int, int]:
            held = sum(1 for s in self.sessions if s.holds.approval and s.holds.approval[1])
            return len(self.sessions), held

        self.metrics.gauge("pgguard_control_up",
                           "1 while the fleet's control database is reachable",
                           fn=lambda: 1 if self.control.up else 0)
        self.heartbeat = Heartbeat(
            self.control, self.cfg, worker=self.worker, stats=stats,
            on_fleet=self.throttle.set_fleet,
            admin_url=lambda: self.admin.url if self.admin is not None else None)
        self.background(self.heartbeat.run())
        self._heartbeat_task = next(t for t in self._background
                                    if t.get_coro().__name__ == "run")

    def start_audit(self) -> None:
        """Open this worker's audit stream (recovering leftover WAL first)."""
        if not self.cfg.audit.enabled:
            return
        self.audit = AuditLog(self.cfg.audit, self.cfg.base_dir, stream=f"w{self.worker}",
                              roll_seconds=parse_duration(self.cfg.audit.seal_interval),
                              instance=instance_name(self.cfg))
        self.audit.start()

    async def stop_services(self) -> None:
        """Background tasks, the admin server, the revocation watcher and the audit
        log, in that order; each bounded."""
        for t in list(self._background):
            if t.get_coro().__name__ in ("_metrics_tick", "_views_tick", "_bodies_tick",
                                         "_masks_tick", "_idle_tick") or \
                    t is self._heartbeat_task:
                t.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=10)
        if self.admin is not None:
            await self.admin.close()
        if self.revocations is not None:
            self.revocations.stop()
        if self.heartbeat is not None:
            await asyncio.to_thread(self.heartbeat.leave)
        if self.control is not None:
            await asyncio.to_thread(self.control.close)
        self.close_audit()

    def close_audit(self) -> None:
        if self.audit is not None:
            # bounded: what is not written by then stays in the WAL for the next start
            self.audit.close(timeout=15)

    # -- listening and shutdown
    def sessions_info(self) -> list[dict]:
        """What SHOW SESSIONS and /api/sessions list, for this worker."""
        out = []
        for s in self.sessions:
            out.append({"session_id": s.id, "identity": s.identity_name,
                        "database": s.database, "client_addr": s.client_addr,
                        "application_name": s.params.get("application_name"),
                        "connected_at": s.started_wall, "state":
                            "relay" if s.bscan is not None else "startup",
                        "waiting_approval": s.holds.approval[1] if s.holds.approval else None})
        return out

    async def start_admin(self) -> None:
        # the watches run whether or not an admin page does (without approvals, masked
        # sessions never saw DDL made directly upstream: the catalog check ran with the
        # admin server only)
        self.background(self._metrics_tick())
        self.background(self._views_tick())
        if self.cfg.masks:
            self.background(self._masks_tick())
        lim = self.cfg.limits
        if parse_duration(lim.agent_idle_in_transaction) or \
                parse_duration(lim.idle_in_transaction):
            self.background(self._idle_tick())
        if self.approvals is None:
            return
        # why: aiohttp loads only when an admin page is configured
        from ..approvals.web import start_admin
        self.admin = await start_admin(self.cfg, self.approvals, self.metrics,
                                       sessions=self.sessions_info, token=self.admin_token)

    async def _idle_tick(self) -> None:
        # sessions idle in a transaction past limits.[agent_]idle_in_transaction end
        # (see Session.idle_check): every IDLE_TICK seconds
        lim = self.cfg.limits
        agent, anyone = (parse_duration(lim.agent_idle_in_transaction),
                         parse_duration(lim.idle_in_transaction))
        while True:
            await asyncio.sleep(IDLE_TICK)
            now = time.monotonic()
            for s in list(self.sessions):
                ident = s.identity
                limit = agent if ident is not None and ident.kind == "agent" else anyone
                if limit:
                    s.idle_check(now, limit)

    def _services(self) -> Services:
        return Services(
            cfg=self.cfg, policy=self.policy, approvals=self.approvals, audit=self.audit,
            audit_strict=self.audit_strict, metrics=self.metrics, throttle=self.throttle,
            detectors=self.detectors, mask_key=self.mask_key, side=self.side,
            catalog_signal=self.catalog_signal, mask_catalog=self.mask_catalog,
            catalog_fingerprint=self.catalog_fingerprint,
            catalog_changed=self.catalog_changed, count_statement=self.count_statement,
            remember_decision=self.remember_decision,
            user_function_test=self.user_function_test,
            builtin_function_name=self.builtin_function_name,
            volatile_builtins=self.volatile_builtins,
            function_name_taken=self.function_name_taken,
            reload_function_names=self.reload_function_names,
            role_name=self.role_name,
            relation_known=self.relation_known,
            plain_table=self.plain_table,
            decision_generation=self.decision_generation,
            views_fresh=self.views_fresh,
            note_functions=self.note_functions,
            cached_function=self.cached_function, resolve_function=self.resolve_function,
            sessions=self.sessions, sessions_info=self.sessions_info,
            front=Front(
                admit=self.admit, forget=self.forget, logged_in=self.logged_in,
                next_session_id=self.next_session_id,
                startup_timeout=self.startup_timeout, client_ssl=self.client_ssl,
                cancel_cipher=self.cancel_cipher, forward_cancel=self.forward_cancel,
                bearer_enabled=self.bearer_enabled, oidc=self.oidc,
                verifier_for=self.verifier_for, has_secret=self.has_secret,
                auth_failed=self.auth_failed),
            link=self.link, revocations=self.revocations, background=self.background,
            count_masked=self.m_masked.inc, policy_inspects=self.policy_inspects,
            decision_cache=self.decision_cache, view_map=self.view_map,
            views_published=self.views_published, ready_views=self.ready_views,
            ready_function_names=self.ready_function_names,
            catalog_committed=self.catalog_committed,
            function_judgement=self.function_judgement,
            load_function_bodies=self.load_function_bodies)

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        # what sessions get: built once, after the audit log and the approval store
        self.services = self._services()
        socks = [sock] if sock is not None else listen_sockets(self.cfg)
        for s in socks:
            srv = await loop.create_server(lambda: ClientProtocol(self.services), sock=s,
                                           backlog=self.cfg.listen.backlog)
            self._servers.append(srv)
        self._idle.set()

    async def shutdown(self) -> None:
        """Stop accepting; let statements in flight finish, then terminate (57P01)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        for srv in self._servers:
            srv.close()
        for s in list(self.sessions):
            s.begin_drain()
        try:
            async with asyncio.timeout(self.shutdown_timeout):
                await self._idle.wait()
        except TimeoutError:
            for s in list(self.sessions):
                s.terminate(ShuttingDown("terminating connection due to administrator command"))
        await asyncio.sleep(0)


# bytes of the keys held by each decision map (by id: the maps are plain dicts, shared
# with the compiled pipes, and live as long as the process)
_map_bytes: dict[int, int] = {}


def _decision_bytes(d) -> int:
    """What a cached decision keeps beyond its key: its statements' texts (UTF-8 size;
    a str of them takes at least that) and a few hundred bytes of fields each."""
    return sum(len(st.text) + 400 for st in d.statements)


def _bounded_put(d: dict, key: bytes, value, size: int) -> None:
    """d[key] = value within DECISIONS_PER_IDENTITY entries and DECISION_BYTES of keys
    (past either, the map starts over)."""
    if len(_map_bytes) > 100_000:
        _map_bytes.clear()          # per-session maps come and go: only accounting lost
    used = _map_bytes.get(id(d), 0) + size + 120
    if len(d) >= DECISIONS_PER_IDENTITY or used > DECISION_BYTES:
        d.clear()
        used = size + 120
    _map_bytes[id(d)] = used
    d[key] = value


class _ViewState:
    """The view map of one database and its refresh state."""

    __slots__ = ("map", "loaded", "stale", "task", "failed_at", "learned", "again")

    def __init__(self) -> None:
        self.map = None             # ViewMap once read (plus views sessions announced)
        self.loaded = 0.0           # monotonic time the last read began
        self.stale = False          # DDL went by since: read again
        self.task: asyncio.Task | None = None     # the read in flight
        self.failed_at = -VIEW_MAP_RETRY
        self.again = False          # a commit came while a read was in flight
        # views sessions announced: name -> (relations behind it, monotonic time)
        self.learned: dict[str, tuple[frozenset, float]] = {}


def listen_sockets(cfg: Config, *, probe: bool = False) -> list[socket.socket]:
    """Bound, listening sockets for [listen] (SO_REUSEPORT so workers share them).
    probe=True: bound only, without SO_REUSEPORT and not listening, so a port another
    process serves (a pgguard included) is refused and no client is accepted by a
    socket about to be closed."""
    lc = cfg.listen
    socks = []
    try:
        infos = socket.getaddrinfo(lc.address, lc.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"listen.address: cannot resolve {lc.address!r}: {e}") from None
    seen = set()
    for family, type_, proto, _, addr in infos:
        if (family, addr) in seen:
            continue
        seen.add((family, addr))
        s = socket.socket(family, type_, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not probe and hasattr(socket, "SO_REUSEPORT"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind(addr)
        except OSError as e:
            s.close()
            for other in socks:
                other.close()
            raise ConfigError(f"listen: cannot bind {lc.address}:{lc.port}: {e.strerror}") \
                from None
        if not probe:
            s.listen(lc.backlog)
            s.setblocking(False)
        socks.append(s)
    return socks


def _addresses(host: str, port: int) -> set[tuple]:
    """(family, address) pairs a passive bind of host:port covers; a wildcard covers its
    whole family."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return set()        # the bind itself reports the name
    return {(i[0], i[4][0]) for i in infos}


def _same_port(cfg: Config) -> bool:
    """Whether [admin] would listen where [listen] does: both bound with SO_REUSEPORT,
    the kernel would share the port between the proxy and the admin page."""
    lc, ac = cfg.listen, cfg.admin
    if not ac.port or ac.port != lc.port:
        return False
    mine, admin = _addresses(lc.address, lc.port), _addresses(ac.address, ac.port)
    wild = {"0.0.0.0", "::"}
    for fam, addr in mine:
        for fam2, addr2 in admin:
            if fam == fam2 and (addr == addr2 or addr in wild or addr2 in wild):
                return True
    return False


def _install_uvloop() -> None:
    try:
        import uvloop  # why: only the serving process runs on it (not the CLI, not tests)
    except ImportError:      # pragma: no cover - uvloop is a hard dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(cfg: Config, cancel_key: bytes | None, worker: int,
                 ready_fd: int | None = None,
                 catalog_signal: CatalogSignal | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # first of all: a signal during startup must still shut everything down in order
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(cfg, cancel_key=cancel_key, worker=worker,
                    catalog_signal=catalog_signal)
    try:
        server.start_audit()
        server.start_control()
        if server.approvals is not None:
            # this process's connection (schema, WAL) before any client: a CancelRequest
            # looks its key up there, and must be answered as soon as Postgres would
            server.approvals.open()
        if server.revocations is not None:
            server.revocations.start(loop)
        await server.start()
        await server.start_admin()
        if worker == 0:
            server.background(server.janitor())
            if cfg.masks and cfg.upstream.databases:
                server.background(server.check_masks())
        log.info("pgguard worker %d (pid %d) listening on %s:%d, upstream %s:%d", worker,
                 os.getpid(), cfg.listen.address, cfg.listen.port, cfg.upstream.host,
                 cfg.upstream.port)
        # what startup built (modules, parsers, the policy) lives as long as the
        # process: out of the collector's sight, full collections stay short
        gc.collect()
        gc.freeze()
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        await stop.wait()
        log.info("pgguard worker %d shutting down", worker)
        await server.shutdown()
    finally:
        await server.stop_services()
    return 0


def setup_logging() -> None:
    level = os.environ.get("PGGUARD_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")


def agent_cap(max_connections: int, reserved: int, workers: int) -> int:
    """Agent sessions one worker admits under limits.agent_sessions = "auto": of the
    upstream's ordinary connection slots, a tenth (at least 5) is kept for everyone
    else, the rest shared among the workers. ``agent_cap(100, 3, 1) -> 88``."""
    slots = max(1, max_connections - reserved)
    agents = max(1, slots - max(5, slots // 10))
    return max(1, -(-agents // max(1, workers)))


def run(cfg: Config, workers: int = 1) -> int:
    """Run the proxy until SIGTERM/SIGINT. Example: ``run(config.load("pgguard.toml"))``."""
    setup_logging()
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    # fail before forking on anything a worker would trip over; the probes bind
    # without SO_REUSEPORT, so a port another pgguard already serves is refused
    server = Server(cfg)
    probes = listen_sockets(cfg, probe=True)
    try:
        if server.approvals is not None:
            # the admin port likewise: the proxy's own port, or one another process
            # serves, would otherwise be shared through SO_REUSEPORT, and some clients
            # would reach the other listener
            if _same_port(cfg):
                raise ConfigError(f"admin.port: {cfg.admin.port} is listen.port too (the "
                                  "proxy and the admin page need a port each)")
            from ..approvals.web import probe_admin   # why: aiohttp loads only with an admin page
            admin = probe_admin(cfg)
            if admin is not None:
                probes.append(admin)
    finally:
        for s in probes:
            s.close()
        del server
    if cfg.control is not None:
        # the schema is there (created or migrated) before any worker serves; the
        # link is closed again so no forked worker inherits its socket
        link = open_link(cfg)
        try:
            version = migrate(link)
        finally:
            link.close()
        log.info("control database ready (schema %s, version %d)", cfg.control.schema,
                 version)
    cancel_key = shared_cancel_key(cfg) or secrets.token_bytes(32)
    # one login-throttling table for every worker (and every worker started later)
    throttle.share()
    _install_uvloop()
    signal_map = CatalogSignal(workers)     # shared by the workers forked below
    if workers == 1:
        return asyncio.run(_serve(cfg, cancel_key, 0, catalog_signal=signal_map))
    return _run_workers(cfg, workers, cancel_key, signal_map)


# a worker that dies is replaced; one dying again sooner than this after its start waits
# this long first (a crash loop must not spin)
RESPAWN_BACKOFF = 1.0


def _run_workers(cfg: Config, workers: int, cancel_key: bytes,
                 catalog_signal: CatalogSignal) -> int:
    """Fork the workers and supervise them: forward SIGTERM/SIGINT, and replace a
    worker that dies (a crash, kill -9) until the proxy is told to stop."""
    children: dict[int, tuple[int, float]] = {}     # pid -> (worker index, started)
    stopping = False

    def spawn(i: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent()
            code = 1
            try:
                code = asyncio.run(_serve(cfg, cancel_key, i,
                                          catalog_signal=catalog_signal))
            finally:
                os._exit(code)
        children[pid] = (i, time.monotonic())

    for i in range(workers):
        spawn(i)

    def forward(sig, _frame):
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        entry = children.pop(pid, None)
        if entry is None:
            continue
        code = os.waitstatus_to_exitcode(st)
        if stopping:
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                log.error("worker pid %d exited with %d", pid, code)
                status = 1
            continue
        i, started = entry
        log.error("worker %d (pid %d) exited with %d; starting a new one", i, pid, code)
        if time.monotonic() - started < RESPAWN_BACKOFF:
            time.sleep(RESPAWN_BACKOFF)
        if not stopping:
            spawn(i)
    return status


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)       # PR_SET_PDEATHSIG
    except OSError:
        pass


def shared_cancel_key(cfg: Config) -> bytes | None:
    """The cancel-key cipher's key from ``[listen] cancel_key_env`` (every instance of a
    fleet derives the same one, so a CancelRequest can land on any of them), or None."""
    env = cfg.listen.cancel_key_env
    if not env:
        return None
    secret = os.environ.get(env, "")
    if len(secret.encode()) < 16:
        raise ConfigError(f"listen.cancel_key_env: environment variable {env} must hold a "
                          "secret of at least 16 bytes, the same on every instance")
    return derive_key(secret.encode(), "pgguard-cancel-key")


def derive_key(secret: bytes, label: str) -> bytes:
    return hmac.new(secret, label.encode(), hashlib.sha256).digest()
