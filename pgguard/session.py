# One client connection: startup, authentication, the upstream link, and the relay.
from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
import time
from collections import deque
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ._core import FrameError, FrameReader, MessageScan, Pipe
from ._core.sqlshape import shape
from .errors import (AuthFailed, AuthRejected, PgguardError, ProtocolViolation,
                     ShuttingDown, UpstreamUnavailable)
from .protocol import messages as m
from .upstream import UpstreamProtocol, connect_upstream

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("pgguard.session")

# startup packets are small; Postgres caps them at 10000 bytes
MAX_STARTUP_PACKET = 10000
MAX_AUTH_MESSAGE = 65536
# startup parameters a client may not set: they would change who the session is
FORBIDDEN_PARAMS = frozenset({"role", "session_authorization", "replication"})
# startup settings the policy's parser depends on: only these values pass
PINNED_PARAMS = {"standard_conforming_strings": ("on", "true", "1", "yes"),
                 "client_encoding": ("utf8", "unicode")}

ALL_TYPES = bytes(range(256))
# the virtual database of the psql admin console (PgBouncer style)
CONSOLE_DB = "pgguard"
# a refusal reaches the upstream as a statement that raises this SQLSTATE, so the
# upstream transaction fails exactly where the client is told; the backend path
# turns that error into the client's 42501
REFUSAL_MARKER = "PGG42"

# session phases
PH_STARTUP = 0
PH_RELAY = 1
PH_CLOSED = 2


class ClientProtocol(asyncio.Protocol):
    """The client's socket until the session relays; then a compiled Pipe takes over
    (``transport.set_protocol``)."""

    __slots__ = ("server", "session", "transport", "phase", "reader", "waiter", "_lost")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.session: Session | None = None
        self.transport: asyncio.Transport | None = None
        self.phase = PH_STARTUP
        self.reader = FrameReader(False, MAX_STARTUP_PACKET)
        self.waiter: asyncio.Future | None = None
        self._lost = False

    # -- asyncio callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.session = Session(self.server, self)
        self.session.start()

    def data_received(self, data: bytes) -> None:
        if self.phase == PH_STARTUP:
            self.reader.feed(data)
            w = self.waiter
            if w is not None and not w.done():
                w.set_result(None)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self._lost = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError("client closed the connection"))
        if self.session is not None:
            self.session.client_gone()

    # -- handshake helpers
    async def read_message(self):
        while True:
            try:
                msg = self.reader.next_message()
            except FrameError as e:
                raise ProtocolViolation(f"invalid startup packet: {e.args[0]}") from None
            if msg is not None:
                return msg
            if self._lost:
                raise ConnectionResetError("client closed the connection")
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


class Session:
    """State of one client connection and its upstream link."""

    def __init__(self, server: Server, client: ClientProtocol) -> None:
        self.server = server
        self.client = client
        self.up: UpstreamProtocol | None = None
        self.fscan: MessageScan | None = None
        self.bscan: MessageScan | None = None
        self.client_pipe: Pipe | None = None
        self.up_pipe: Pipe | None = None
        self.task: asyncio.Task | None = None
        self.id = server.next_session_id()
        peer = client.transport.get_extra_info("peername")
        self.peer = peer
        self.client_addr = _fmt_addr(peer)
        self.loopback = _is_loopback(peer)
        self.tls = False
        self.identity_name: str | None = None
        self.identity = None
        self.database: str | None = None
        self.params: dict[str, str] = {}
        self.upstream_key: tuple[int, int] | None = None
        self.draining = False
        self.closed = False
        self.started = time.monotonic()
        self.started_wall = time.time()
        # policy state
        self.policy = None              # the engine, when statements are inspected
        self.prepared = None            # PREPARE / named Parse memory for EXECUTE
        self.discarding = False         # after a refused Parse: drop until Sync
        self.sync_adjust = 0            # upstream sync points minus fscan.count
        self.refusals: deque = deque()  # injected refusals awaiting their answer
        self.drop_next_z = False
        self.z_count = 0
        self.watch = b"X"
        self.tracker = None             # audit: statements in flight
        self.held = None                # strict audit: messages waiting for durability
        self.held_items = None
        self.principal = None           # token / OIDC login: who, scope, expiry
        self.cancel_key = 0
        self.fast_reported = 0          # fast-path statements already counted in metrics
        self.provisioned = None         # ephemeral upstream role to drop at disconnect
        self.pinned_role = False        # the upstream role is chosen by pgguard
        self.approval = None            # (task, request id) while a statement is held
        self.readonly = False
        self._unguard = None            # cancels the token expiry/revocation guard
        self.connected_at = 0.0

    # -- lifecycle
    def start(self) -> None:
        if not self.server.admit(self):
            return
        self.task = asyncio.get_running_loop().create_task(self._startup())

    async def _startup(self) -> None:
        try:
            async with asyncio.timeout(self.server.startup_timeout):
                ok = await self._negotiate()
                if not ok:
                    return
                await self._authenticate()
                if self.database == CONSOLE_DB:
                    self._console_start()
                else:
                    await self._connect_upstream()
            if self.database == CONSOLE_DB:
                await self._console_loop()
                return
            self._enter_relay()
        except PgguardError as e:
            self.fail(e)
        except TimeoutError:
            self.fail(PgguardError("canceling authentication due to timeout",
                                   sqlstate="57014", severity="FATAL"))
        except (ConnectionError, OSError):
            self.close()
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception:
            log.exception("session %s: internal error during startup", self.id)
            self.fail(PgguardError("internal error in pgguard during startup",
                                   severity="FATAL"))

    async def _negotiate(self) -> bool:
        """SSLRequest / GSSENCRequest / CancelRequest / StartupMessage. False: done."""
        c = self.client
        while True:
            _, payload = await c.read_message()
            if len(payload) < 4:
                raise ProtocolViolation("invalid startup packet length")
            (code,) = struct.unpack_from("!I", payload)
            if code == m.SSL_REQUEST:
                if c.reader.buffered:
                    # bytes after SSLRequest before the handshake: injection attempt
                    raise ProtocolViolation("received unencrypted data after SSL request")
                ctx = self.server.client_ssl
                if ctx is None or self.tls:
                    c.transport.write(b"N")
                    continue
                c.transport.write(b"S")
                loop = asyncio.get_running_loop()
                new = await loop.start_tls(c.transport, c, ctx, server_side=True)
                c.transport = new
                self.tls = True
                continue
            if code == m.GSSENC_REQUEST:
                c.transport.write(b"N")
                continue
            if code == m.CANCEL_REQUEST:
                if len(payload) >= 12:
                    pid, secret = struct.unpack_from("!II", payload, 4)
                    await self.server.forward_cancel(pid, secret)
                self.close()
                return False
            major, minor = code >> 16, code & 0xFFFF
            if major != 3:
                raise PgguardError(
                    f"unsupported frontend protocol {major}.{minor}: "
                    "server supports 3.0 to 3.0", sqlstate="0A000", severity="FATAL")
            try:
                params = m.parse_startup_params(payload[4:])
            except ValueError as e:
                raise ProtocolViolation(f"invalid startup packet layout: {e}") from None
            unknown = [k for k in params if k.startswith("_pq_.")]
            if minor > 0 or unknown:
                c.transport.write(m.negotiate_protocol_version(0, unknown))
            for k in unknown:
                del params[k]
            self._check_params(params)
            self.params = params
            return True

    def _check_params(self, params: dict[str, str]) -> None:
        user = params.get("user")
        if not user:
            raise AuthRejected("no user name specified in the startup packet")
        self.identity_name = user
        self.database = params.get("database") or user
        for k in params:
            if k.lower() in FORBIDDEN_PARAMS:
                raise PgguardError(f"startup parameter \"{k}\" is not allowed through pgguard",
                                   sqlstate="42501", severity="FATAL")
        settings = {k.lower(): v for k, v in params.items()}
        opts = params.get("options")
        if opts:
            for name, value in _options(opts):
                key = name.lower().replace("-", "_")
                if key in FORBIDDEN_PARAMS:
                    raise PgguardError(
                        f"startup option \"{name}\" is not allowed through pgguard",
                        sqlstate="42501", severity="FATAL")
                settings[key] = value
        for key, allowed in PINNED_PARAMS.items():
            value = settings.get(key)
            if value is not None and \
                    value.strip().strip("'\"").lower().replace("-", "").replace("_", "") \
                    not in allowed:
                raise PgguardError(
                    f"startup setting {key}={value!r} is not allowed through pgguard",
                    detail="pgguard reads statements as a server with "
                           "standard_conforming_strings=on and client_encoding=UTF8 would",
                    sqlstate="42501", severity="FATAL")

    async def _authenticate(self) -> None:
        c = self.client
        # auth replies are typed messages; keep whatever already arrived
        rest = c.reader.take_rest()
        c.reader = FrameReader(True, MAX_AUTH_MESSAGE)
        if rest:
            c.reader.feed(rest)
        server = self.server
        name = self.identity_name
        delay = server.throttle.delay_for(self.peer)
        if delay:
            await asyncio.sleep(delay)
        if server.has_secret(name) or not server.bearer_enabled:
            await self._scram(name)
        else:
            await self._bearer(name)
        identity = self.identity
        allowed = server.cfg.upstream.databases
        if self.database != CONSOLE_DB and (
                (allowed is not None and self.database not in allowed) or
                (identity.databases is not None and self.database not in identity.databases)):
            raise AuthRejected(
                f'database "{self.database}" is not allowed for identity "{name}"')
        server.throttle.record_success(self.peer)

    # -- the psql admin console: database "pgguard", answered by pgguard itself
    def _console_start(self) -> None:
        cfg = self.server.cfg
        ident = self.identity
        if self.server.approvals is None:
            raise AuthRejected('the admin console (database "pgguard") is not enabled',
                               hint="set [admin] token_env and run pgguard with it set")
        if ident is None or ident.kind != "human" or not set(ident.groups) & set(
                cfg.admin.groups):
            raise AuthRejected(f'identity "{self.identity_name}" may not use the admin '
                               'console (database "pgguard")',
                               hint=f"it is for humans in [admin] groups {cfg.admin.groups}")
        from .approvals.console import AdminConsole
        self._console = AdminConsole(self.server.approvals, admin_groups=cfg.admin.groups,
                                     sessions=self.server.sessions_info)
        out = [m.auth_request(m.AUTH_OK)]
        for k, v in (("server_version", "16.0 (pgguard admin console)"),
                     ("server_encoding", "UTF8"), ("client_encoding", "UTF8"),
                     ("DateStyle", "ISO, MDY"), ("integer_datetimes", "on"),
                     ("standard_conforming_strings", "on"),
                     ("application_name", self.params.get("application_name", ""))):
            out.append(m.parameter_status(k, v))
        out.append(m.backend_key_data(0, 0))
        out.append(m.ready_for_query(ord("I")))
        self.client.transport.write(b"".join(out))
        self._audit_event("connect")
        self.connected_at = time.monotonic()

    async def _console_loop(self) -> None:
        c = self.client
        rest = c.reader.take_rest()
        c.reader = FrameReader(True, self.server.cfg.limits.max_message_size)
        if rest:
            c.reader.feed(rest)
        who = (self.identity_name, tuple(self.identity.groups))
        while not self.closed:
            try:
                t, payload = await c.read_message()
            except (ConnectionError, PgguardError):
                break
            if t == ord("X"):
                break
            out: list[bytes] = []
            if t != ord("Q"):
                out.append(m.error_response(
                    "0A000", "the admin console speaks the simple query protocol only"))
                if t in (ord("S"), ord("F")):
                    out.append(m.ready_for_query(ord("I")))
                c.transport.write(b"".join(out))
                continue
            sql = payload.rstrip(b"\0").decode("utf-8", "replace")
            try:
                results = await self._console.aexecute(sql, who)
            except PgguardError as e:
                out.append(m.error_response(e.sqlstate, e.message, detail=e.detail,
                                            hint=e.hint))
                results = []
            for r in results:
                if r.notice:
                    out.append(m.error_response("00000", r.notice, severity="NOTICE",
                                                notice=True))
                if r.columns:
                    out.append(m.row_description(r.columns))
                    out.extend(m.data_row(row) for row in r.rows)
                out.append(m.command_complete(r.tag))
            if not results and not out:
                out.append(m.empty_query_response())
            out.append(m.ready_for_query(ord("I")))
            c.transport.write(b"".join(out))
        self.close()

    async def _read_password_message(self) -> bytes:
        t, payload = await self.client.read_message()
        if t == ord("X"):
            raise ConnectionResetError("client quit during authentication")
        if t != ord("p"):
            raise ProtocolViolation(f"expected a password message, got type {chr(t)!r}")
        return payload

    async def _scram(self, name: str) -> None:
        """SCRAM-SHA-256 against the identity's static secret (a fake verifier of the
        same shape for unknown names: no user enumeration)."""
        from .auth import scram
        c = self.client
        identity = self.server.cfg.identities.get(name)
        verifier = self.server.verifier_for(name)
        c.transport.write(m.auth_request(m.AUTH_SASL, scram.MECHANISM.encode() + b"\0\0"))
        payload = await self._read_password_message()
        try:
            mech, pos = m.parse_cstr(payload)
            (n,) = struct.unpack_from("!i", payload, pos)
            data = payload[pos + 4:pos + 4 + n] if n >= 0 else b""
            server = scram.ScramServer(verifier)
            first = server.handle_initial(mech, data)
        except (ValueError, struct.error, scram.ScramError) as e:
            raise ProtocolViolation(f"malformed SCRAM message: {e}") from None
        c.transport.write(m.auth_request(m.AUTH_SASL_CONTINUE, first))
        payload = await self._read_password_message()
        try:
            final = server.handle_final(payload)
        except scram.ScramError as e:
            raise ProtocolViolation(f"malformed SCRAM message: {e}") from None
        if final is None or identity is None or not self.server.has_secret(name):
            self._audit_event("auth_failed", error="password authentication failed")
            await self.server.auth_failed(self)
            raise AuthFailed(f'password authentication failed for user "{name}"')
        c.transport.write(m.auth_request(m.AUTH_SASL_FINAL, final))
        self.identity = identity

    async def _bearer(self, name: str) -> None:
        """A pgguard token or an OIDC JWT as a cleartext password: only over TLS, or
        from loopback when [listen] allow_cleartext_loopback."""
        from .auth import tokens
        cfg = self.server.cfg
        if not (self.tls or (self.loopback and cfg.listen.allow_cleartext_loopback)):
            raise AuthRejected("token authentication requires TLS",
                               hint="connect with sslmode=require")
        self.client.transport.write(m.auth_request(m.AUTH_CLEARTEXT))
        password = await self._read_password_message()
        try:
            p = tokens.authenticate_password(
                cfg, name, password, database=self.database,
                revocations=self.server.revocations, oidc=self.server.oidc)
        except tokens.TokenInvalid as e:
            self._audit_event("auth_failed", error=e.reason)
            await self.server.auth_failed(self, e.reason)
            raise AuthFailed(e.message) from None
        self.principal = p
        self.identity_name = p.identity
        self.identity = p.identity_config
        self.readonly = p.readonly

    async def _connect_upstream(self) -> None:
        params = {k: v for k, v in self.params.items() if k not in ("user", "database")}
        client_app = self.params.get("application_name", "")
        # the upstream's own logs and pg_stat_activity name who is acting
        params["application_name"] = _app_name(self.identity_name, client_app)
        if self.readonly:
            opts = params.get("options", "")
            params["options"] = (opts + " -c default_transaction_read_only=on").strip()
        user, password = await self._upstream_role()
        self.up, status, key = await connect_upstream(self, self.server, self.database, params,
                                                      user=user, password=password)
        status = [_client_app_status(st, client_app) for st in status]
        role = self.identity.role if self.identity is not None else None
        if role:
            from .sideconn import UpstreamError, execute, ident
            try:
                await execute(self.up, f"SET ROLE {ident(role)}")
            except UpstreamError as e:
                raise UpstreamUnavailable(f'pgguard could not assume role "{role}"',
                                          detail=e.message) from None
            self.pinned_role = True
        pid, secret = key
        self.upstream_key = key
        cpid, csecret = self.server.cancel_cipher.encode(pid, secret)
        self.cancel_key = (cpid << 32) | csecret
        out = [m.auth_request(m.AUTH_OK)]
        out.extend(status)
        out.append(m.backend_key_data(cpid, csecret))
        out.append(m.ready_for_query(ord("I")))
        self.client.transport.write(b"".join(out))
        self.connected_at = time.monotonic()
        self._audit_event("connect")

    async def _upstream_role(self) -> tuple[str | None, str | None]:
        """The upstream login for this session: an ephemeral role when [upstream]
        provision is on, the identity's upstream_user, or the proxy's own (None)."""
        from .config import parse_duration, read_secret
        cfg = self.server.cfg
        ident = self.identity
        if cfg.upstream.provision:
            import secrets as _secrets

            from . import sideconn
            safe = re.sub(r"[^a-z0-9]", "", self.identity_name.lower())[:16] or "x"
            name = f"pgguard_{safe}_{int(time.time())}_{_secrets.token_hex(3)}"
            password = _secrets.token_urlsafe(24)
            until = self.principal.expires_at if self.principal is not None else \
                time.time() + parse_duration(cfg.auth.max_ttl)
            until_text = datetime.fromtimestamp(until, timezone.utc).isoformat()
            try:
                await sideconn.run(self.server, self.database, [
                    f"CREATE ROLE {sideconn.ident(name)} LOGIN PASSWORD "
                    f"{sideconn.literal(password)} VALID UNTIL {sideconn.literal(until_text)} "
                    f"IN ROLE {sideconn.ident(cfg.upstream.template_role)}"])
            except sideconn.UpstreamError as e:
                log.error("provisioning %s failed: %s", name, e.message)
                raise UpstreamUnavailable("pgguard could not provision an upstream role",
                                          detail=e.message) from None
            self.provisioned = name
            self.pinned_role = True
            return name, password
        if ident is not None and ident.upstream_user:
            pw = read_secret(cfg, ident.upstream_password_env, ident.upstream_password_file,
                             f"identities.{self.identity_name}")
            self.pinned_role = True
            return ident.upstream_user, pw
        return None, None

    def _enter_relay(self) -> None:
        c, up = self.client, self.up
        limits = self.server.cfg.limits
        if self.readonly or self.pinned_role or self.server.policy_inspects(
                self.identity_name, self.identity, self.database):
            from .policy.classify import PreparedMemory
            self.policy = self.server.policy
            self.prepared = PreparedMemory()
            self._cache = self.server.decision_cache(
                self.identity_name, self.database,
                ("readonly" if self.readonly else "readwrite")
                + (":pinned" if self.pinned_role else ""))
        if self.principal is not None:
            from .auth.revocations import guard_session
            p = self.principal
            self._unguard = guard_session(asyncio.get_running_loop(), self.server.revocations,
                                          p.identity, p.token_id, p.expires_at,
                                          self._end_by_token)
        audit = self.server.audit
        if audit is not None:
            from .tracking import StatementTracker
            self.tracker = StatementTracker(self, audit)
        self.watch = (b"QP" if self.policy is not None else b"") + \
            (b"QPBESF" if audit is not None else b"") + b"X"
        self.fscan = MessageScan(interest=self.watch,
                                 valid=m.FRONTEND_TYPES, counted=m.FRONTEND_SYNC_TYPES,
                                 withhold=True, max_len=limits.max_message_size)
        self.fscan.set_stop(b"QP", True)
        self.bscan = MessageScan(interest=b"CEIsZ" if audit is not None else b"",
                                 counted=b"Z", withhold=False, max_len=0x7FFFFFFF)
        self.bscan.status = ord("I")
        self.client_pipe = Pipe(self.fscan, c.transport, up.transport, self, True)
        if self.policy is not None and not self.server.audit_strict:
            self.client_pipe.exact, self.client_pipe.shapes = self._cache
        if self.tracker is not None:
            self.client_pipe.fast_log = self.tracker.flog
        self.up_pipe = Pipe(self.bscan, up.transport, c.transport, self, False)
        rest = c.reader.take_rest()
        c.phase = PH_RELAY
        up.phase = PH_RELAY
        c.transport.set_protocol(self.client_pipe)
        up.transport.set_protocol(self.up_pipe)
        log.debug("session %s: %s@%s relaying", self.id, self.identity_name, self.database)
        if self.draining:
            self.terminate(ShuttingDown("terminating connection due to administrator command"))
            return
        if rest:
            self.client_pipe.data_received(rest)

    # -- relay hooks (called by the compiled pipes)
    def client_items(self, items: list) -> None:
        """Frontend messages the scan withheld (Query, Parse, Terminate, and for the
        audit Bind/Execute/Sync) with the forwarded runs around them; everything while
        discarding after a refusal or holding for a durable audit record."""
        if self.held is not None:
            self._hold_more(items)
            return
        out: list[bytes] = []
        scan = self.fscan
        strict = self.server.audit_strict and self.tracker is not None
        while True:
            for i, it in enumerate(items):
                if it.__class__ is bytes:
                    if not self.discarding:
                        out.append(it)
                    continue
                t, msg = it
                if self.discarding:
                    # Postgres ignores everything after an error until Sync
                    if t == 83:                 # 'S' Sync: ends the discarding
                        self.discarding = False
                        scan.set_interest(ALL_TYPES, False)
                        scan.set_interest(self.watch, True)
                        out.append(msg)
                        if self.tracker is not None:
                            self.tracker.flog.append((msg, None, 0))
                    elif t == 88:               # 'X' Terminate
                        self._terminate_from_client(out, msg)
                        return
                    elif t in (81, 70):         # a dropped Query/FunctionCall: no Z
                        self.sync_adjust -= 1
                    continue
                if t == 81:                     # 'Q' simple Query
                    n = len(out)
                    self._on_query(msg, out)
                    if strict and len(out) > n and out[-1] is msg:
                        self._hold_for_record(out, items[i + 1:])
                        return
                elif t == 80:                   # 'P' Parse
                    self._on_parse(msg, out)
                elif t == 88:                   # 'X' Terminate
                    self._terminate_from_client(out, msg)
                    return
                else:                           # Bind / Execute / Sync / FunctionCall
                    out.append(msg)
                    if self.tracker is not None:
                        self.tracker.flog.append((msg, None, time.monotonic_ns()))
                        if strict and t == 69:  # Execute: durable record first
                            self._hold_for_record(out, items[i + 1:])
                            return
            rest = scan.take_rest()
            if rest is None:
                break
            items = scan.feed(rest)
        if out:
            self.up.transport.write(out[0] if len(out) == 1 else b"".join(out))

    # -- approvals: a statement held until a human decides
    def _hold_for_approval(self, d, msg: bytes, out: list, *, extended: bool, sql: bytes,
                           name: bytes = b"") -> None:
        store = self.server.approvals
        if store is None:
            from .policy.rules import Decision
            self._refuse_any(Decision(
                action="block", rule=d.rule, message=d.message, detail=d.detail,
                hint="Approvals are not enabled on this pgguard (set [admin] token_env "
                     "and start it with the token set)."), out, extended, sql)
            return
        if out:
            self.up.transport.write(b"".join(out))
            out.clear()
        self.held = []
        self.held_items = []
        self._hold_more([])
        self.client_pipe.divert = True
        task = asyncio.get_running_loop().create_task(
            self._await_approval(store, d, msg, extended, sql, name))
        self.approval = [task, None]

    async def _await_approval(self, store, d, msg, extended, sql, name) -> None:
        from .approvals import hold
        from .tracking import fast_normalize
        text = sql.decode("utf-8", "replace")
        fp = fast_normalize(sql)
        grant = store.check_grant(self.identity_name, self.database, fp)
        approver = grant.approver if grant is not None else None
        req = None
        if grant is None:
            req = store.request(identity=self.identity_name, database=self.database,
                                statement=text, fingerprint=fp,
                                classification=hold.summarize(d), rule=d.rule,
                                approvers=d.approvers, timeout_s=d.timeout,
                                session_id=self.id, cancel_key=self.cancel_key)
            self.approval[1] = req.id
            f = hold.notice_fields(req, hold.admin_url(self.server.cfg))
            self.client.transport.write(m.error_response(
                "01000", f["message"], severity="NOTICE", detail=f["detail"],
                hint=f["hint"], notice=True))
            req = await store.wait_decision(req.id)
            approver = req.approver
        self.approval = None
        if self.closed:
            return
        out: list[bytes] = []
        if req is None or req.state == "approved":
            log.info("session %s: statement approved by %s", self.id, approver)
            out.append(msg)
            self.server.count_statement("approved")
            if self.tracker is not None:
                from .tracking import Approved
                self.tracker.flog.append((msg, Approved(d, approver), time.monotonic_ns()))
            if name and self.prepared is not None and d.statements:
                self.prepared.record(name, d.statements[0])
        else:
            err = hold.refusal(req)
            from .policy.rules import Decision
            refused = Decision(action="block", rule=d.rule, message=err.message,
                               detail=err.detail or "", hint=err.hint or "",
                               statements=d.statements)
            outcome = {"denied": "denied", "timed_out": "timed_out"}.get(req.state, "error")
            self._refuse_any(refused, out, extended, sql, outcome=outcome,
                             approver=req.approver, sqlstate=err.sqlstate)
        held = self.held_items
        self.held = self.held_items = None
        self.client_pipe.divert = False
        if out:
            self.up.transport.write(b"".join(out))
        if held:
            self.client_items(held)

    def _refuse_any(self, d, out: list, extended: bool, sql: bytes, **kw) -> None:
        if extended:
            self.sync_adjust += 1
            self._inject_refusal(d, out, extended=True, sql=sql, **kw)
            self.discarding = True
            self.fscan.set_interest(ALL_TYPES, True)
        else:
            self._inject_refusal(d, out, extended=False, sql=sql, **kw)

    # -- strict audit: a statement goes upstream only once its record is on disk
    def _hold_for_record(self, out: list, later: list) -> None:
        """out[-1] is a Query or Execute: write what precedes it, log its record with
        log_strict, and hold it and everything after until the record is durable."""
        msg = out.pop()
        if out:
            self.up.transport.write(b"".join(out))
        rec = self.tracker.strict_record(msg)
        self.held = [msg]
        self.held_items = []
        self._hold_more(later)
        self.client_pipe.divert = True
        fut = self.server.audit.log_strict(rec)
        fut.add_done_callback(self._record_durable)

    def _hold_more(self, items: list) -> None:
        self.held_items.extend(items)
        scan = self.fscan
        rest = scan.take_rest()
        while rest is not None:         # keep stream order: nothing may be scanned ahead
            self.held_items.extend(scan.feed(rest))
            rest = scan.take_rest()

    def _record_durable(self, fut) -> None:
        if self.closed:
            return
        if fut.cancelled() or fut.exception() is not None:
            err = fut.exception() if not fut.cancelled() else "cancelled"
            log.error("session %s: audit record not written (%s); closing", self.id, err)
            self.fail(PgguardError("the audit log is not available; statement not run",
                                   sqlstate="58030", severity="FATAL"))
            return
        held, items = self.held, self.held_items
        self.held = self.held_items = None
        self.client_pipe.divert = False
        self.up.transport.write(b"".join(held))
        if items:
            self.client_items(items)

    def _terminate_from_client(self, out: list, msg: bytes) -> None:
        out.append(msg)
        self.up.transport.write(b"".join(out))
        self.close()

    def _decide(self, msg: bytes, text_start: int, text_end: int):
        """The policy decision for the SQL text msg[text_start:text_end], cached by
        the raw bytes and by the literal-insensitive shape."""
        exact, shapes = self._cache
        d = exact.get(msg)
        if d is not None:
            return d
        raw = msg[text_start:text_end]
        key = shape(raw)
        if key is not None:
            d = shapes.get(key)
            if d is not None:
                return d
        try:
            sql = raw.decode("utf-8")
        except UnicodeDecodeError:
            from .policy.rules import Decision
            return Decision(action="block", rule="encoding",
                            message='pgguard: statement refused by rule "encoding": the '
                                    "statement is not valid UTF-8",
                            hint="Send statements in UTF-8 (client_encoding = UTF8).")
        d = self.policy.decide(sql, self.identity_name, self.identity, self.database,
                               self.prepared)
        if self.readonly and d.action == "allow" and not _reads_only(d):
            d = _readonly_refusal(d)
        if self.pinned_role and d.action == "allow" and _changes_role(d):
            d = _pinned_refusal(d)
        self.server.remember_decision(self._cache, msg, key, d)
        return d

    def _on_query(self, msg: bytes, out: list) -> None:
        d = self._decide(msg, 5, len(msg) - 1) if self.policy is not None else None
        if d is None or d.action == "allow":
            out.append(msg)
            self.server.count_statement("allowed")
            if self.tracker is not None:
                self.tracker.flog.append((msg, d, time.monotonic_ns()))
            if d is not None and self.prepared is not None and d.statements \
                    and _touches_prepared(d):
                self.prepared.observe(d.statements)
            return
        if d.action == "approve":
            self._hold_for_approval(d, msg, out, extended=False, sql=msg[5:-1])
            return
        # the client's Query is replaced by one that fails upstream: same Z count
        self._inject_refusal(d, out, extended=False, sql=msg[5:-1])

    def _on_parse(self, msg: bytes, out: list) -> None:
        try:
            name, pos = m.parse_cstr(msg, 5)
            end = msg.index(b"\0", pos)
        except ValueError:
            self.fail(ProtocolViolation("invalid Parse message"))
            return
        d = self._decide(msg, pos, end) if self.policy is not None else None
        if d is None or d.action == "allow":
            out.append(msg)
            if self.tracker is not None:
                self.tracker.flog.append((msg, d, 0))
            if name and d is not None and self.prepared is not None and d.statements:
                self.prepared.record(name, d.statements[0])
            return
        if d.action == "approve":
            self._hold_for_approval(d, msg, out, extended=True, sql=msg[pos:end], name=name)
            return
        self._refuse_any(d, out, True, msg[pos:end])

    def _inject_refusal(self, d, out: list, extended: bool, sql: bytes = b"",
                        outcome: str = "blocked", approver: str | None = None,
                        sqlstate: str = "42501") -> None:
        log.info("session %s: %s refused by rule %s", self.id, self.identity_name, d.rule)
        out.append(_refusal_query(d))
        self.server.count_statement(outcome)
        if self.tracker is not None:
            from .tracking import REFUSAL_SYNC, statement_record
            rec = statement_record(self, sql, d, outcome, _now())
            rec.approver = approver
            rec.sqlstate = sqlstate
            rec.error = d.message
            self.server.audit.log(rec)
            self.tracker.flog.append((REFUSAL_SYNC, None, 0))
        target = self.fscan.count + self.sync_adjust
        self.refusals.append([target, d, extended, False, sqlstate])
        self._divert_backend(True)

    def _divert_backend(self, on: bool) -> None:
        pipe, scan = self.up_pipe, self.bscan
        if on:
            if pipe.divert:
                return
            self.z_count = scan.count
            scan.set_interest(ALL_TYPES, True)
            scan.set_withhold(True)
            pipe.divert = True
        elif pipe.divert and scan.set_withhold(False):
            scan.set_interest(ALL_TYPES, False)
            if self.tracker is not None:
                scan.set_interest(b"CEIsZ", True)
            pipe.divert = False

    def backend_items(self, items: list) -> None:
        """Diverted backend messages: rewrite our refusal errors, drop the extra
        ReadyForQuery a refused Parse leaves, forward the rest."""
        out: list[bytes] = []
        refusals = self.refusals
        for it in items:
            if it.__class__ is bytes:
                out.append(it)
                continue
            t, msg = it
            if t == 90:                                  # 'Z' ReadyForQuery
                self.z_count += 1
                drop = False
                if refusals and self.z_count >= refusals[0][0]:
                    target, d, extended, seen, _ = refusals.popleft()
                    if not seen and self.tracker is not None:
                        self.tracker.refusal_ignored()
                    drop = seen and extended             # answered our injected Query
                if self.tracker is not None:
                    self.tracker.on_backend(t, msg)
                if not drop:
                    out.append(msg)
            elif t == 69 and refusals and _is_marker(msg):  # 'E' ours
                r = refusals[0]
                r[3] = True
                d = r[1]
                out.append(m.error_response(r[4], d.message, detail=d.detail or None,
                                            hint=d.hint or None))
            else:
                out.append(msg)
                if self.tracker is not None and t in _TRACKED:
                    self.tracker.on_backend(t, msg)
        if out:
            self.client.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if not refusals:
            self._divert_backend(False)
        if self.draining:
            self.backend_chunk()

    def frame_error(self, e: FrameError) -> None:
        self.fail(ProtocolViolation(f"invalid frontend message: {e.args[0]}"))

    def backend_events(self, events: list) -> None:
        """Copies of backend messages the session watches (completions for the audit)."""
        tracker = self.tracker
        if tracker is not None:
            for t, msg in events:
                tracker.on_backend(t, msg)

    def backend_chunk(self) -> None:
        """After each backend chunk while draining: close once idle."""
        if self.bscan.status == 73 and self.in_flight() <= 0:
            self.terminate(ShuttingDown("terminating connection due to administrator command"))

    def in_flight(self) -> int:
        return self.fscan.count - self.bscan.count

    # -- shutdown and errors
    def begin_drain(self) -> None:
        self.draining = True
        if self.client.phase != PH_RELAY:
            if self.task is not None and self.client.phase == PH_STARTUP:
                self.fail(ShuttingDown("the database system is shutting down"))
            return
        self.up_pipe.notify_chunks = True
        self.backend_chunk()

    def upstream_lost(self, exc) -> None:
        if self.closed or self.client.phase == PH_STARTUP:
            return      # during login the startup task sees the error itself
        if self.client.phase == PH_RELAY and self.bscan.at_boundary:
            err = UpstreamUnavailable("server closed the connection unexpectedly",
                                      detail="the upstream database connection was lost")
            self._send_error(err)
        self.close()

    def fail(self, err: PgguardError) -> None:
        """Tell the client what went wrong (a real ErrorResponse), then close."""
        if self.closed:
            return
        if isinstance(err, ProtocolViolation):
            log.info("session %s from %s: %s", self.id, self.client_addr, err.message)
        self._send_error(err)
        self.close()

    def terminate(self, err: PgguardError) -> None:
        self._send_error(err)
        self.close()

    def _send_error(self, err: PgguardError) -> None:
        t = self.client.transport
        if t is not None and not t.is_closing():
            t.write(m.error_response(err.sqlstate, err.message, severity=err.severity,
                                     detail=err.detail, hint=err.hint))

    def client_gone(self) -> None:
        self.close()

    def _audit_event(self, event: str, **fields) -> None:
        audit = self.server.audit
        if audit is None:
            return
        from .audit.record import AuditRecord
        ident = self.identity
        audit.log(AuditRecord(
            session_id=self.id, event=event, ts=_now(), identity=self.identity_name,
            identity_kind=ident.kind if ident is not None else None,
            client_addr=self.client_addr,
            application_name=self.params.get("application_name"), database=self.database,
            upstream_user=self.server.cfg.upstream.user if event != "auth_failed" else None,
            **fields))

    async def _drop_provisioned(self, role: str) -> None:
        from .sideconn import drop_role
        await asyncio.sleep(0.05)       # let the upstream backend see the Terminate
        await drop_role(self.server, self.database, role,
                        self.server.cfg.upstream.template_role)

    def _end_by_token(self, err) -> None:
        """The token expired or was revoked: FATAL at a message boundary, then close."""
        log.info("session %s: %s", self.id, err.message)
        if self.bscan is None or self.bscan.at_boundary:
            self._send_error(err)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._unguard is not None:
            self._unguard()
        if self.provisioned is not None:
            self.server.background(self._drop_provisioned(self.provisioned))
            self.provisioned = None
        if self.approval is not None:
            task, req_id = self.approval
            task.cancel()
            if req_id is not None and self.server.approvals is not None:
                self.server.approvals.withdraw(req_id)
        if self.connected_at:
            self._audit_event("disconnect",
                              duration_us=int((time.monotonic() - self.connected_at) * 1e6))
        self.client.phase = PH_CLOSED
        if self.task is not None and not self.task.done() \
                and self.task is not asyncio.current_task():
            self.task.cancel()
        up = self.up
        if up is not None and up.transport is not None and not up.transport.is_closing():
            try:
                up.transport.write(m.TERMINATE)
            except Exception:
                pass
            up.transport.close()
        t = self.client.transport
        if t is not None and not t.is_closing():
            t.close()
        self.server.forget(self)


def _options(options: str) -> list[tuple[str, str | None]]:
    """(name, value) set by `-c name=value` / `--name=value` in a startup `options`."""
    tokens: list[str] = []
    cur, esc = [], False
    for ch in options:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch.isspace():
            if cur:
                tokens.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        tokens.append("".join(cur))
    out: list[tuple[str, str | None]] = []

    def add(setting: str) -> None:
        name, eq, value = setting.partition("=")
        out.append((name, value if eq else None))

    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c" and i + 1 < len(tokens):
            add(tokens[i + 1])
            i += 2
            continue
        if tok.startswith("-c"):
            add(tok[2:])
        elif tok.startswith("--"):
            add(tok[2:])
        i += 1
    return out


def _fmt_addr(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "local")


def _is_loopback(peer) -> bool:
    if not isinstance(peer, tuple):
        return True     # unix socket
    host = peer[0]
    return host.startswith("127.") or host == "::1"


# backend messages the statement tracker pairs with statements
_TRACKED = frozenset(b"CEIsZ")


_WRITE_FLAGS = frozenset({"write", "destructive", "privilege", "escape"})
_CHANGING_KINDS = frozenset({
    "insert", "update", "delete", "merge", "create", "alter", "drop", "truncate", "grant",
    "revoke", "comment", "security_label", "reassign", "refresh", "vacuum", "cluster",
    "reindex", "lock", "call", "do", "copy"})


def _changes(st) -> bool:
    return bool(_WRITE_FLAGS.intersection(st.flags) or _CHANGING_KINDS.intersection(st.kinds))


def _reads_only(d) -> bool:
    return not any(_changes(st) for st in d.statements)


_ROLE_KINDS = frozenset({"set", "reset", "discard"})


def _changes_role(d) -> bool:
    return any("privilege" in st.flags and (_ROLE_KINDS.intersection(st.kinds) or any(
        f.endswith("set_config") for f in st.functions)) for st in d.statements)


def _pinned_refusal(d):
    from .policy.rules import Decision
    return Decision(
        action="block", rule="pinned-role",
        message='pgguard: statement refused by rule "pinned-role": this session\'s '
                "upstream role is set by pgguard and cannot be changed",
        detail="SET ROLE, RESET ROLE, SET SESSION AUTHORIZATION, DISCARD ALL and "
               "set_config('role', ...) are refused in this session",
        hint="Connect as the identity whose role you need.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _readonly_refusal(d):
    from .policy.rules import Decision
    st = next(st for st in d.statements if _changes(st))
    return Decision(
        action="block", rule="readonly-scope",
        message=f'pgguard: statement refused by rule "readonly-scope": {st.kind.upper()} '
                "changes the database and this session's token is read-only",
        detail=f"statement kind: {st.kind}; flags: {', '.join(st.flags) or 'none'}",
        hint="Ask for a token with --scope readwrite.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _app_name(identity: str, client_app: str) -> str:
    name = f"pgguard:{identity}" + (f" {client_app}" if client_app else "")
    return name.encode()[:63].decode("utf-8", "ignore")


def _client_app_status(msg: bytes, client_app: str) -> bytes:
    """The upstream's application_name ParameterStatus shows the client its own name."""
    if not msg.startswith(b"S") or b"application_name\0" not in msg[5:22]:
        return msg
    return m.parameter_status("application_name", client_app)


def _now():
    return datetime.now(timezone.utc)


def _is_marker(msg: bytes) -> bool:
    return b"\0C" + REFUSAL_MARKER.encode() + b"\0" in msg


def _touches_prepared(d) -> bool:
    return any(st.kind in ("prepare", "deallocate", "discard") for st in d.statements)


def _refusal_query(d) -> bytes:
    """A Query that fails upstream with the refusal marker. The message rides along
    for the upstream's own log only (the client gets pgguard's 42501), so it is cut
    down to characters that need no quoting."""
    safe = _UNSAFE.sub("", d.message)[:200]
    sql = (f"DO $pgguard$BEGIN RAISE EXCEPTION USING ERRCODE = '{REFUSAL_MARKER}', "
           f"MESSAGE = '{safe}'; END$pgguard$")
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


_UNSAFE = re.compile(r"[^A-Za-z0-9 _.,:;()=<>*/+\"-]")
