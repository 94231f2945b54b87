# One client connection: startup, authentication, the upstream link, and the relay.
from __future__ import annotations

import asyncio
import logging
import re
import secrets as _secrets
import struct
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NoReturn

from .._core import FrameError, FrameReader, MessageScan, Pipe
from .._core.answers import Answers, AnswerWriter
from .._core.pipe import MaskLane
from ..audit.record import AuditRecord
from ..auth import scram, tokens
from ..auth.revocations import guard_session
from ..config import parse_duration, read_secret
from ..errors import (AuthFailed, AuthRejected, IdleInTransaction, PgguardError,
                     ProtocolViolation, ShuttingDown, UpstreamUnavailable)
from ..policy.classify import PreparedMemory
from ..policy.views import SessionViews
from ..protocol import messages as m
from . import sideconn
from .console import CONSOLE_DB, Console
from .enforce import Enforcement, _now
from .blast import Guard
from .fncall import FunctionCalls
from .holds import Holds
from ..masking.wire import MASK_BACKEND, MaskState, applies
from .sideconn import UpstreamError, drop_role, execute
from .pinned import PinnedSettings
from .startup import client_settings, tagged_app_name, under_policy, upstream_params
from .tracking import StatementTracker
from .upstream import UpstreamProtocol, connect_upstream

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("pgguard.session")
# after a client's Terminate, how long the proxy waits for Postgres to answer what came
# before it and close, before it closes both sides itself
TERMINATE_GRACE = 60.0
# bytes a client may have sent ahead while its session starts, before reading pauses
STARTUP_BUFFER_MAX = 256 << 10
# CancelRequests being forwarded (kept alive when their client is gone first)
_CANCELS: set = set()

# startup packets are small; Postgres caps their body (after the length) at 10000 bytes
MAX_STARTUP_PACKET = 10000 + 4
MAX_AUTH_MESSAGE = 65536
# Postgres' own bound on a frontend message (PQ_LARGE_MESSAGE_LIMIT, length included)
PG_MAX_MESSAGE = 0x3FFFFFFE
# after a malformed frame, how long the upstream has to answer what came before it
# and close (it always does: Postgres ends the connection on such bytes)
VIOLATION_GRACE = 30.0
# of a message streamed past [limits] max_message_size, what the audit keeps
STREAM_KEEP = 1 << 20


# session phases
PH_STARTUP = 0
PH_RELAY = 1
PH_CLOSED = 2


def _nothing_ahead(c, what: str) -> None:
    if c.reader.buffered:
        raise ProtocolViolation(
            f"received unencrypted data after {what}",
            detail="This could be either a client-software bug or evidence of an "
                   "attempted man-in-the-middle attack.")


class SilentClose(Exception):
    """Bytes Postgres drops the connection on without a word (a startup packet of
    impossible length, a frame of impossible length): log, close, answer nothing."""


class ClientProtocol(asyncio.Protocol):
    """The client's socket until the session relays; then a compiled Pipe takes over
    (``transport.set_protocol``)."""

    __slots__ = ("services", "session", "transport", "phase", "reader", "waiter", "_lost",
                 "_paused", "eof")

    def __init__(self, services: Services) -> None:
        self.services = services
        self.session: Session | None = None
        self.transport: asyncio.Transport | None = None
        self.phase = PH_STARTUP
        self.reader = FrameReader(False, MAX_STARTUP_PACKET)
        self.waiter: asyncio.Future | None = None
        self._lost = False
        self._paused = False        # reading paused in the startup phase (buffer full)
        self.eof = False            # half-closed once logged in: the relay answers first

    # -- asyncio callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport
        m.set_nodelay(transport)
        self.session = Session(self.services, self)
        self.session.start()

    def data_received(self, data: bytes) -> None:
        if self.phase == PH_STARTUP:
            self.reader.feed(data)
            if self.reader.buffered > STARTUP_BUFFER_MAX and not self._paused:
                # what a client pipelines before the relay starts waits in the kernel
                # (read again when it starts), not in this process: memory stays
                # bounded, and the relay's first chunk small
                self._paused = True
                self.transport.pause_reading()
            w = self.waiter
            if w is not None and not w.done():
                w.set_result(None)

    def eof_received(self):
        # after the login's ReadyForQuery the client may pipeline statements and
        # half-close before the relay starts: they are answered (Session.client_eof);
        # during the login an end of file ends it
        s = self.session
        if s is None or not s.connected_at or s.console is not None or \
                self.transport.get_extra_info("sslcontext") is not None:
            return False
        self.eof = True
        return True

    def connection_lost(self, exc) -> None:
        self._lost = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError("client closed the connection"))
        if self.session is not None:
            self.session.client_gone()

    # -- handshake helpers
    def renew_reader(self, max_len: int) -> None:
        """Read typed messages up to ``max_len`` from now on (what the old reader holds
        unread goes first)."""
        rest = self.reader.take_rest()
        self.reader = FrameReader(True, max_len)
        if rest:
            self.reader.feed(rest)

    async def read_message(self):
        while True:
            try:
                msg = self.reader.next_message()
            except FrameError as e:
                # a length Postgres refuses: a startup packet's is logged and the
                # connection closed without a word (a password message's: see
                # Session._read_password_message)
                raise SilentClose(f"invalid message length: {e.args[0]}") from None
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

    def __init__(self, services: Services, client: ClientProtocol) -> None:
        self.services = services
        self.front = services.front
        self.client = client
        self.up: UpstreamProtocol | None = None
        self.fscan: MessageScan | None = None
        self.bscan: MessageScan | None = None
        self.client_pipe: Pipe | None = None
        self.up_pipe: Pipe | None = None
        self.task: asyncio.Task | None = None
        self.id = services.front.next_session_id()
        peer = client.transport.get_extra_info("peername")
        self.peer = peer
        self.admitted_at = time.monotonic()     # (admitted as it is made: Services.admit)
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
        # the client sent Terminate: the timer that closes if the upstream does not
        # (close_after_upstream); nothing more the client sends is read
        self.quitting: asyncio.TimerHandle | None = None
        # (what the client and upstream had exchanged, since when) while idle in a
        # transaction: see idle_check
        self._idle: tuple | None = None
        self.started = time.monotonic()
        self.started_wall = time.time()
        # policy state
        self.policy = None              # the engine, when statements are inspected
        self.prepared = None            # PREPARE / named Parse memory for EXECUTE
        # the relay hooks and their bookkeeping (enforce.py); the pipes call these two
        self.enforce = Enforcement(self, self.services)
        self.client_items = self.enforce.client_items
        self.backend_items = self.enforce.backend_items
        self.tracker = None             # audit: statements in flight
        self.answers = None             # what the upstream still owes (Answers)
        self.holds = Holds(self, self.services)     # statements held back (holds.py)
        self.principal = None           # token / OIDC login: who, scope, expiry
        self.masking = None             # MaskState when masks or detectors apply
        self.cancel_key = 0
        self.fast_reported = 0          # fast-path statements already counted in metrics
        self.provisioned = None         # ephemeral upstream role to drop at disconnect
        self.pinned_role = False        # the upstream role is chosen by pgguard
        self.readonly = False
        self.guarded = False            # statements judged (startup.under_policy)
        self.pinned = None              # PinnedSettings of a guarded session
        self.end_reason = None          # why pgguard ended the session (audit)
        self.guard = None               # the blast-radius guard, under a policy
        self.views = None               # SessionViews under a policy
        self.fncalls = None             # FunctionCall judge under a policy
        self._unguard = None            # cancels the token expiry/revocation guard
        self.connected_at = 0.0
        self.console: Console | None = None     # database "pgguard": the admin console
        # a malformed frame from the client: None (none), False (Postgres answers it),
        # or the error pgguard sends once the upstream closed; _poison: its header,
        # waiting for a hold to end before it goes upstream
        self.violation = None
        self._poison = None

    # -- lifecycle
    def start(self) -> None:
        if not self.front.admit(self):
            return
        self.task = asyncio.get_running_loop().create_task(self._startup())

    def refuse(self, err: PgguardError) -> None:
        """Admission refused (too many clients, shutting down): answered as Postgres
        answers it, after the TLS negotiation and the startup packet, so that a client
        in sslmode=prefer or require reads the error (answered at once, libpq said only
        "server sent an error response during SSL exchange"); a CancelRequest on such
        a connection is still honoured. Past REFUSED_MAX such connections at once (or
        after REFUSED_WAIT), the error goes at once."""
        if len(_REFUSED) >= REFUSED_MAX:
            self.fail(err)
            return
        _REFUSED.add(self)
        self.task = asyncio.get_running_loop().create_task(self._refused(err))

    async def _refused(self, err: PgguardError) -> None:
        try:
            async with asyncio.timeout(REFUSED_WAIT):
                if not await self._negotiate():
                    return
            self.fail(err)
        except (PgguardError, TimeoutError):
            self.fail(err)
        except (SilentClose, ConnectionError, OSError):
            self.close()
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception:
            log.exception("session %s: internal error refusing a connection", self.id)
            self.close()
        finally:
            _REFUSED.discard(self)

    async def _startup(self) -> None:
        try:
            async with asyncio.timeout(self.front.startup_timeout):
                ok = await self._negotiate()
                if not ok:
                    return
                await self._authenticate()
                if not self.front.logged_in(self):
                    return
                if self.database == CONSOLE_DB:
                    self.console = Console(self, self.services)
                    self.console.start()
                    self._audit_event("connect")
                    self.connected_at = time.monotonic()
                else:
                    await self._connect_upstream()
                    await self._setup_masking()
                    if self._under_policy():
                        await self._setup_views()
            if self.database == CONSOLE_DB:
                await self.console.run()
                return
            self._enter_relay()
        except PgguardError as e:
            self.fail(e)
        except SilentClose as e:
            log.info("session %s from %s: %s", self.id, self.client_addr, e)
            self.close()
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
                raise SilentClose("invalid length of startup packet")
            (code,) = struct.unpack_from("!I", payload)
            if code == m.SSL_REQUEST:
                ctx = self.front.client_ssl
                if ctx is None or self.tls:
                    c.transport.write(b"N")
                    # bytes sent before the answer: a client bug or an injection (told
                    # after the answer, as Postgres tells it)
                    _nothing_ahead(c, "SSL request")
                    continue
                if c.reader.buffered:
                    # bytes after SSLRequest before the handshake: injection attempt
                    raise ProtocolViolation("received unencrypted data after SSL request")
                c.transport.write(b"S")
                loop = asyncio.get_running_loop()
                new = await loop.start_tls(c.transport, c, ctx, server_side=True)
                c.transport = new
                self.tls = True
                continue
            if code == m.GSSENC_REQUEST:
                c.transport.write(b"N")
                _nothing_ahead(c, "GSSAPI encryption request")
                continue
            if code == m.CANCEL_REQUEST:
                # a request of another length is dropped unanswered, as Postgres does
                if len(payload) == 12:
                    pid, secret = struct.unpack_from("!II", payload, 4)
                    # shielded: a client that closes (or half-closes) right after
                    # sending it closes this session first, and Postgres would still
                    # have honoured the request
                    task = asyncio.ensure_future(self.front.forward_cancel(
                        pid, secret, self.client_addr_host()))
                    _CANCELS.add(task)
                    task.add_done_callback(_CANCELS.discard)
                    await asyncio.shield(task)
                self.close()
                return False
            major, minor = code >> 16, code & 0xFFFF
            if 1 <= major < 3:
                # answered in the old protocol's error format, as Postgres does
                c.transport.write(b"EFATAL:  unsupported frontend protocol %d.%d: server "
                                  b"supports 3.0 to 3.0\n\0" % (major, minor))
                raise SilentClose(f"unsupported frontend protocol {major}.{minor}")
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
                c.transport.write(m.negotiate_protocol_version(m.PROTOCOL_3_0, unknown))
            for k in unknown:
                del params[k]
            self._check_params(params)
            self.params = params
            return True

    def _check_params(self, params: dict[str, str]) -> None:
        # who and where; the settings are judged once the identity is known (_connect_upstream)
        user = params.get("user")
        if not user:
            raise AuthRejected("no PostgreSQL user name specified in startup packet")
        self.identity_name = user
        self.database = params.get("database") or user

    async def _authenticate(self) -> None:
        c = self.client
        # auth replies are typed messages; keep whatever already arrived
        rest = c.reader.take_rest()
        c.reader = FrameReader(True, MAX_AUTH_MESSAGE)
        if rest:
            c.reader.feed(rest)
        sv, front = self.services, self.front
        name = self.identity_name
        delay = sv.throttle.delay_for(self.peer)
        if delay is None:
            e = AuthRejected(
                "too many failed authentication attempts from this address",
                detail="Attempts from one address are answered one per throttle delay; "
                       "this one would have waited longer than [auth] throttle_max_delay.",
                hint="Wait, then try again with the right credentials.")
            said = _throttled_said(self.client_addr_host())
            if said is not None:
                # (at most one record a second per address: a flood of refused logins
                # would otherwise be a flood of records; the count says how many)
                self._audit_event("auth_failed", error=e.message + (
                    f" ({said} more refused since the last record)" if said else ""),
                    sqlstate=e.sqlstate)
            raise e
        if delay:
            # nothing the client sends meanwhile is read (or buffered)
            c.transport.pause_reading()
            try:
                await asyncio.sleep(delay)
            finally:
                if not c.transport.is_closing():
                    c.transport.resume_reading()
        # the exchange depends on the connection only, never on the name: which names
        # exist, and which have a static secret, is not for a client to learn
        if front.bearer_enabled and (
                self.tls or (self.loopback and sv.cfg.listen.allow_cleartext_loopback)):
            await self._cleartext(name)
        else:
            await self._scram(name)
        identity = self.identity
        allowed = sv.cfg.upstream.databases
        if self.database != CONSOLE_DB and (
                (allowed is not None and self.database not in allowed) or
                (identity.databases is not None and self.database not in identity.databases)):
            e = AuthRejected(
                f'database "{self.database}" is not allowed for identity "{name}"')
            self._audit_event("auth_failed", error=e.message, sqlstate=e.sqlstate)
            raise e
        sv.throttle.record_success(self.peer, name)

    async def _read_password_message(self) -> bytes:
        try:
            t, payload = await self.client.read_message()
        except SilentClose:
            # Postgres reads no password from it: a failed login (28P01), as there
            await self._login_failed("invalid password message length")
        if t == m.TERMINATE:
            raise ConnectionResetError("client quit during authentication")
        if t != m.PASSWORD_MESSAGE:
            raise ProtocolViolation(f"expected a password message, got type {chr(t)!r}")
        return payload

    async def _scram(self, name: str) -> None:
        """SCRAM-SHA-256 against the identity's static secret (a fake verifier of the
        same shape for unknown names: no user enumeration)."""
        c = self.client
        identity = self.services.cfg.identities.get(name)
        verifier = self.front.verifier_for(name)
        c.transport.write(m.auth_request(m.AUTH_SASL, scram.MECHANISM.encode() + b"\0\0"))
        payload = await self._read_password_message()
        try:
            mech, pos = m.parse_cstr(payload)
            (n,) = struct.unpack_from("!i", payload, pos)
            data = payload[pos + 4:pos + 4 + n] if n >= 0 else b""
            exchange = scram.ScramServer(verifier)
            first = exchange.handle_initial(mech, data)
        except (ValueError, struct.error, scram.ScramError) as e:
            raise ProtocolViolation(f"malformed SCRAM message: {e}") from None
        c.transport.write(m.auth_request(m.AUTH_SASL_CONTINUE, first))
        payload = await self._read_password_message()
        try:
            final = exchange.handle_final(payload)
        except scram.ScramError as e:
            raise ProtocolViolation(f"malformed SCRAM message: {e}") from None
        if final is None or identity is None or not self.front.has_secret(name):
            hint = "pgguard tokens are accepted only over TLS (sslmode=require)" \
                if self.front.bearer_enabled else None
            await self._login_failed("password authentication failed", hint)
        c.transport.write(m.auth_request(m.AUTH_SASL_FINAL, final))
        self.identity = identity

    async def _cleartext(self, name: str) -> None:
        """A cleartext password, over TLS or from loopback when [listen]
        allow_cleartext_loopback, asked of every name once bearer credentials are on: a
        pgguard token or an OIDC JWT, or else the identity's static secret. A failure
        costs the same checks whatever the name (the secret's PBKDF2 runs against a fake
        verifier for names without one)."""
        sv, front = self.services, self.front
        self.client.transport.write(m.auth_request(m.AUTH_CLEARTEXT))
        password = (await self._read_password_message()).rstrip(b"\0")
        try:
            p = tokens.authenticate_password(
                sv.cfg, name, password, database=self.database,
                revocations=sv.revocations, oidc=front.oidc)
        except tokens.TokenInvalid as e:
            # a token-shaped password keeps its reason (expired, revoked ...) for the
            # audit; it does not depend on whether the name exists
            bearer_reason = e.reason if _bearer_shaped(password) else None
        else:
            self.principal = p
            self.identity_name = p.identity
            self.identity = p.identity_config
            self.readonly = p.readonly
            return
        verifier = front.verifier_for(name)
        ok = await asyncio.get_running_loop().run_in_executor(
            None, verifier.verify_password, password)
        identity = sv.cfg.identities.get(name)
        if not ok or identity is None or not front.has_secret(name):
            await self._login_failed(bearer_reason or "password authentication failed")
        self.identity = identity

    async def _login_failed(self, reason: str, hint: str | None = None) -> NoReturn:
        """The one answer to every failed login, whatever the name: 28P01, the same
        message, an auth_failed audit record, a throttled address."""
        self._audit_event("auth_failed", error=reason, sqlstate=AuthFailed.sqlstate)
        await self.front.auth_failed(self, reason)
        raise AuthFailed(f'password authentication failed for user "{self.identity_name}"',
                         hint=hint)

    async def _connect_upstream(self) -> None:
        # judge the client's settings now that the identity is known, before anything
        # happens upstream (no connection, no provisioned role for a refused session)
        cfg = self.services.cfg
        guarded = self.guarded = under_policy(self.services, self.identity_name,
                                              self.identity, self.database, self.readonly)
        try:
            params, client_app = upstream_params(client_settings(self.params),
                                                 guarded=guarded, readonly=self.readonly,
                                                 allow=cfg.policy.settings)
        except PgguardError as e:
            if e.sqlstate == "42501" and 'rule "' not in e.message:
                # every refusal names its rule (what an agent reads first)
                e.message = f'pgguard: connection refused by rule "startup-settings": {e.message}'
            self._audit_event("auth_failed", error=e.message, sqlstate=e.sqlstate,
                              decision="blocked", rule="startup-settings")
            raise
        if client_app is not None:
            self.params["application_name"] = client_app    # what the audit shows
        tag = cfg.upstream.application_name == "tag" or (
            cfg.upstream.application_name == "agents" and self.identity is not None
            and self.identity.kind == "agent")
        if tag:
            # the upstream's own logs and pg_stat_activity name who is acting
            params.append(("application_name", tagged_app_name(self.identity_name,
                                                                client_app)))
        elif client_app is not None:
            params.append(("application_name", client_app))
        user, password = await self._upstream_role()
        self.up, status, key = await connect_upstream(self, self.services.link, self.database, params,
                                                      user=user, password=password)
        if tag:
            status = [_client_app_status(st, client_app or "") for st in status]
        role = self.identity.role if self.identity is not None else None
        if role:
            changed: list[bytes] = []
            try:
                await execute(self.up, f"SET ROLE {sideconn.ident(role)}", status=changed)
            except UpstreamError as e:
                raise UpstreamUnavailable(f'pgguard could not assume role "{role}"',
                                          detail=e.message) from None
            self.pinned_role = True
            # what the role changed (is_superuser): the client is told the values in
            # force, and the pins hold those, not the login's
            status = _status_merged(status, changed)
        if guarded:
            self.pinned = PinnedSettings(status, self.readonly)
        pid, secret = key
        self.upstream_key = key
        cpid, csecret = self.front.cancel_cipher.encode(pid, secret)
        self.cancel_key = (cpid << 32) | csecret
        out = [m.auth_request(m.AUTH_OK)]
        out.extend(status)
        out.append(m.backend_key_data(cpid, csecret))
        out.append(m.ready_for_query(m.TX_IDLE))
        self.client.transport.write(b"".join(out))
        self.connected_at = time.monotonic()
        self._audit_event("connect")

    async def _upstream_role(self) -> tuple[str | None, str | None]:
        """The upstream login for this session: an ephemeral role when [upstream]
        provision is on, the identity's upstream_user, or the proxy's own (None)."""
        cfg = self.services.cfg
        ident = self.identity
        if cfg.upstream.provision:
            safe = re.sub(r"[^a-z0-9]", "", self.identity_name.lower())[:16] or "x"
            name = f"pgguard_{safe}_{int(time.time())}_{_secrets.token_hex(3)}"
            password = _secrets.token_urlsafe(24)
            until = self.principal.expires_at if self.principal is not None else \
                time.time() + parse_duration(cfg.auth.max_ttl)
            until_text = datetime.fromtimestamp(until, timezone.utc).isoformat()
            try:
                await sideconn.run(self.services.link, self.database, [
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
                             f"identities.{self.identity_name}", "upstream_")
            self.pinned_role = True
            return ident.upstream_user, pw
        return None, None

    async def _setup_masking(self) -> None:
        """Masking for this identity: masks it is not exempt from, detectors unless its
        groups are exempt. None when nothing applies (the relay stays pass-through)."""
        cfg, ident = self.services.cfg, self.identity
        masks_on = any(applies(mk, self.identity_name, ident) for mk in cfg.masks)
        dets = self.services.detectors
        if dets is not None and set(cfg.detectors.except_groups) & set(ident.groups):
            dets = None
        if not masks_on and dets is None:
            return
        try:
            catalog = await self.services.mask_catalog(self.database)
        except (UpstreamError, PgguardError, OSError) as e:
            # fail closed: no way to know which columns to mask
            raise UpstreamUnavailable("pgguard could not read the upstream catalog to "
                                      "apply masks", detail=str(e)) from None
        self.masking = MaskState(self, catalog, masks_on and bool(catalog.columns), dets,
                                 self.services.mask_key)

    def _under_policy(self) -> bool:
        """Whether this session's statements are judged (else the relay forwards them):
        one answer, given by startup.under_policy when the startup settings were judged,
        so the settings pinned upstream and the judging always go together."""
        return self.guarded

    async def _setup_views(self) -> None:
        """The database's view map, for rules that see through views, and its function
        names, for the blast-radius guard (fail closed: no session under a policy
        without them)."""
        try:
            await self.services.ready_views(self.database)
            await self.services.ready_function_names(self.database)
        except (UpstreamError, PgguardError, OSError) as e:
            raise UpstreamUnavailable("pgguard could not read the upstream catalog's "
                                      "views", detail=str(e)) from None

    def _enter_relay(self) -> None:
        c, up = self.client, self.up
        limits = self.services.cfg.limits
        if self._under_policy():
            self.policy = self.services.policy
            self.prepared = PreparedMemory()
            self.enforce.cache = self.services.decision_cache(
                self.identity_name, self.database,
                ("readonly" if self.readonly else "readwrite")
                + (":pinned" if self.pinned_role else ""))
            sv, db = self.services, self.database
            self.views = SessionViews(lambda: sv.view_map(db),
                                      lambda edges: sv.views_published(db, edges))
            self.fncalls = FunctionCalls(self)
        if self.principal is not None:
            p = self.principal
            self._unguard = guard_session(asyncio.get_running_loop(), self.services.revocations,
                                          p.identity, p.token_id, p.expires_at,
                                          self._end_by_token)
        audit = self.services.audit
        if audit is not None:
            self.tracker = StatementTracker(self, audit)
            self.backend_events = self.tracker.on_events    # no Python loop per chunk
        self.enforce.relay_starts()
        if self.policy is not None:
            self.guard = Guard(self)
        # [limits] max_message_size bounds what something parses (policy, masking, the
        # audit's normalizer) and holds whole; a session where nothing does streams
        # every message, and only Postgres' own bound applies
        # (the batched audit keeps a prefix of longer ones: the statement runs as sent)
        parsed = self.policy is not None or self.masking is not None or \
            self.services.audit_strict
        self.fscan = MessageScan(interest=self.enforce.watch,
                                 valid=m.FRONTEND_TYPES, counted=m.FRONTEND_SYNC_TYPES,
                                 withhold=True, pg_limits=m.FRONTEND_PG_LIMITS,
                                 max_len=limits.max_message_size if parsed else PG_MAX_MESSAGE)
        self.fscan.track_sync = True     # (the guard's in-block statements ask)
        # a FunctionCall under a policy stops the scan too: it may hold the stream; and
        # a Close, so that whether it is the first of its segment (it runs for sure:
        # the statement is gone) is read for it, not for a later message
        self.fscan.set_stop(b"QPFC" if self.policy is not None else b"QP", True)
        if not parsed:
            # nothing here changes the scan's interest mid-chunk: no stops, so no item
            # of a streamed message ever waits in the scan's rest
            self.fscan.set_stop(b"QP", False)
            self.fscan.stream_over = limits.max_message_size
            self.fscan.stream_keep = min(limits.max_message_size, STREAM_KEEP)
        # ParameterStatus too under a policy: a pinned setting reported changed ends
        # the session (rare: only a change of a reported setting sends one)
        # (and for the audit: standard_conforming_strings off changes how it reads)
        self.bscan = MessageScan(interest=(b"CEIsZ" if audit is not None else b"")
                                 + (b"S" if self.pinned is not None or audit is not None
                                    else b""),
                                 counted=b"Z", withhold=False, max_len=0x7FFFFFFF)
        self.bscan.status = m.TX_IDLE
        if audit is not None:           # a suspended Execute's rows, for its record
            self.bscan.suspended = []
        # one model of what each message sent upstream is answered with (every write
        # upstream is told to it, every backend message's type too): in_flight, the
        # audit's pairing and masking follow it
        self.answers = Answers()
        up.transport = AnswerWriter(up.transport, self.answers)
        self.bscan.model = self.answers
        if self.tracker is not None:
            self.tracker.answers = self.answers.listen()
        if self.masking is not None:
            self.masking.answers = self.answers.listen()
        self.client_pipe = Pipe(self.fscan, c.transport, up.transport, self, True)
        self.enforce.watch_statements()
        self.enforce.fast_path(True)
        if self.tracker is not None:
            self.client_pipe.fast_log = self.tracker.flog
        self.up_pipe = Pipe(self.bscan, up.transport, c.transport, self, False)
        if self.masking is not None:
            # every result goes through the rewriter, message boundaries known
            self.bscan.set_interest(MASK_BACKEND, True)
            self.bscan.set_withhold(True)
            self.up_pipe.divert = True
            self._mask_lane()
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
        if c.eof and not self.client_eof():
            self.close()
            return
        if c._paused and not c.transport.is_closing():
            c._paused = False
            c.transport.resume_reading()

    def _mask_lane(self) -> None:
        """The compiled masking lane (pipe.MaskLane, masking/lane.py): statements that
        read no masked column, and their answers, without Python."""
        mask = self.masking
        lane = MaskLane(mask, mask.rw, self.services.catalog_signal.mm)
        lane.track = self.tracker is not None
        mask.lane = lane
        self.client_pipe.mask = self.up_pipe.mask = lane
        self.enforce.fast_path(True)

    def take_masked_cells(self) -> int:
        """Cells masked since the last call (for the audit record and /metrics)."""
        if self.masking is None:
            return 0
        n = self.masking.rw.take_total()
        if n:
            self.services.count_masked(n)
        return n

    def resume_items(self, items: list) -> None:
        """``client_items`` for a stream taken up again outside the client pipe's
        ``data_received`` (a FunctionCall's catalog lookup or a hold ended): a malformed
        frame the scan meets in its rest is answered as the pipe answers one (the pipe
        checks only after the chunks it reads itself)."""
        self.client_items(items)
        scan = self.fscan
        if scan.error is not None and self.violation is None and not self.closed:
            self.frame_error(scan.error, scan.bad)

    def log_full(self) -> None:
        """The client pipe's log of messages for the audit grew long with no answer to
        read it (a pipeline after an error, which Postgres skips to Sync): the tracker
        reads it now, keeping one entry per skipped message at most up to a bound."""
        if self.tracker is not None:
            self.tracker.read_log()

    def frame_error(self, e: FrameError, bad: bytes) -> None:
        """A malformed frame behind whatever came before it in the stream: that went
        its way; the frame's header goes upstream too, so Postgres itself answers it
        (08P01 FATAL for a type it does not know, a silent close for a length it
        refuses) after answering the messages before it. A frame only pgguard's own
        bound refuses reaches Postgres as a length it refuses too, and the client gets
        pgguard's 08P01 once the upstream closed. Nothing the client sends later is
        read (Postgres reads no further either)."""
        if self.violation is not None or self.closed:
            return
        kind = e.args[1] if len(e.args) > 1 else "length"
        log.info("session %s from %s: invalid frontend message: %s", self.id,
                 self.client_addr, e.args[0])
        if kind == "limit" and self.fscan is not None and self.fscan.max_len < PG_MAX_MESSAGE:
            self.violation = ProtocolViolation(
                f"invalid frontend message: {e.args[0]}",
                hint="Raise [limits] max_message_size, or send smaller statements.")
            poison = bad[:1] + b"\xff\xff\xff\xff"
        else:
            self.violation = False      # Postgres' own answer (or silence) is the answer
            poison = bad
        self.client.transport.pause_reading()
        self._poison = poison
        self.flush_poison()
        # Postgres closes on these bytes; should it not, the session ends all the same
        asyncio.get_running_loop().call_later(VIOLATION_GRACE, self._violation_expired, e)

    def _violation_expired(self, e: FrameError) -> None:
        if self.closed or self._poison is not None:
            return
        if self.in_flight() > 0:        # still answering what came before: wait on
            asyncio.get_running_loop().call_later(VIOLATION_GRACE, self._violation_expired, e)
            return
        self.fail(ProtocolViolation(f"invalid frontend message: {e.args[0]}"))

    def flush_poison(self) -> None:
        """Send the malformed frame's header upstream once nothing is held before it."""
        if self._poison is None or self.holds.held is not None or self.closed:
            return
        poison, self._poison = self._poison, None
        t = self.up.transport
        if t is not None and not t.is_closing():
            t.write(poison)

    def upstream_opened(self, proto) -> None:
        """The upstream connection is open (its login follows): it closes with us."""
        self.up = proto

    def set_fast_path(self, *, exact: dict | None = None, shapes: dict | None = None,
                      allow_all: bool = False, log_types: bytes | None = None,
                      guard=None, lane: bool = False, guard_query=None) -> None:
        """What the compiled client pipe forwards without Python (Enforcement.fast_path
        decides): Query/Parse whose decision in ``exact``/``shapes`` allows them, or
        every well-formed one (``allow_all``); the message types it logs for the audit;
        the blast-radius ``guard``'s Bind/Execute/Close/Sync; the masking ``lane``; the
        guard's in-block lane for Queries whose cached decision it runs
        (``guard_query``)."""
        pipe = self.client_pipe
        if pipe.mask is not None:
            pipe.mask.on = lane
            pipe.mask.idle = False
        pipe.exact, pipe.shapes, pipe.allow_all = exact, shapes, allow_all
        pipe.shape_max = self.policy.max_length if self.policy is not None else 0
        pipe.log_types = log_types
        pipe.guard = guard
        pipe.guard_query = guard_query

    def decide_through(self, cache: tuple[dict, dict]) -> None:
        """The decision cache the compiled pipe reads, when it reads one."""
        pipe = self.client_pipe
        if pipe is not None and pipe.exact is not None:
            pipe.exact, pipe.shapes = cache

    def client_may_read(self) -> bool:
        """Whether the client's socket may be read again (the compiled pipe paused it
        for a loop turn): not when closed or past a malformed frame, nor while a part
        keeps it paused (a hold past its bytes, a function lookup's reader past its
        buffer, an upstream that cannot take more); those resume it themselves."""
        if self.closed or self.violation is not None or self._poison is not None:
            return False
        if self.holds.reads_held():
            return False
        if self.fncalls is not None and self.fncalls.reads_paused():
            return False
        up = self.up_pipe
        return up is None or not up.writing_paused

    def take_fast_counts(self) -> tuple[int, int]:
        """Statements the compiled pipe, and the masking lane, forwarded since the last
        call (for the metrics)."""
        pipe = self.client_pipe
        if pipe is None:
            return 0, 0
        n = pipe.fast_forwarded + self.enforce.lane_allowed - self.fast_reported
        self.fast_reported += n
        lane, k = pipe.mask, 0
        if lane is not None:
            k = lane.forwarded - lane.reported
            lane.reported = lane.forwarded
        return n, k

    # -- what the session's parts ask of the relay it owns (the pipes and scans)
    def upstream_ready(self, status: int) -> None:
        """A ReadyForQuery Python forwarded: its transaction status is the session's."""
        self.bscan.status = status

    def swallow_ready(self) -> None:
        """A ReadyForQuery the upstream sent and the client never sees (the guard's
        own statement): not counted as one the client was answered."""
        self.bscan.count -= 1

    def lane_readies(self, n: int) -> None:
        """ReadyForQuery messages the masking lane forwarded."""
        self.enforce.count_readies(n)

    def backend_events(self, events: list) -> None:
        """Copies of backend messages the session watches (completions for the audit,
        reported settings under a policy)."""
        tracker = self.tracker
        if tracker is not None:
            for t, msg in events:
                tracker.on_backend(t, msg)
        else:
            for t, msg in events:
                if t == m.PARAMETER_STATUS:
                    self.parameter_reported(msg)

    def parameter_reported(self, msg: bytes) -> None:
        """A ParameterStatus from the upstream: a pinned setting that moved ends the
        session at once, before another statement is judged on a wrong reading."""
        pinned = self.pinned
        if pinned is None or self.closed:
            return
        err = pinned.check(msg)
        if err is not None:
            log.warning("session %s (%s): %s", self.id, self.identity_name, err.message)
            self.end_reason = err.message          # on the audit's disconnect record
            self.terminate(err)

    def hold_done(self) -> None:
        """The upstream pipe's guard lane forwarded what it held (Guard.lane_done)."""
        self.guard.lane_done()

    def hold_fallback(self) -> None:
        """The upstream pipe's guard lane hands its held answers to Python."""
        self.guard.lane_fallback()

    def backend_chunk(self) -> None:
        """After each backend chunk while draining: close once idle."""
        if self.bscan.status == m.TX_IDLE and self.in_flight() <= 0:
            self.terminate(ShuttingDown("terminating connection due to administrator command"))

    def idle_check(self, now: float, limit: float) -> None:
        """(Services, every half second.) End the session once it has been idle in a
        transaction for ``limit`` seconds: the upstream's last ReadyForQuery saying in a
        transaction (or a failed one), everything sent answered (or a COPY FROM STDIN
        waiting for its data), no statement held (an approval, a lookup), and no
        statement answered meanwhile: a Sync, a Flush or a byte of a message is no work
        (helper 133 kept its locks so), a COPY's data is. Closing the upstream
        connection rolls the transaction back and releases its locks, as Postgres'
        idle_in_transaction_session_timeout would (which the client may turn off)."""
        bs = self.bscan
        copy_in = bs is not None and bs.last_type == m.COPY_IN_RESPONSE
        if self.closed or bs is None or self.client.phase != PH_RELAY or \
                bs.status not in (m.TX_IN_BLOCK, m.TX_FAILED) or \
                (self.in_flight() > 0 and not copy_in) or \
                self.holds.held is not None or self.holds.approval is not None:
            self._idle = None
            return
        # answers other than ReadyForQuery (a statement's), and a COPY's data
        mark = (bs.messages - bs.count, self.fscan.bytes_seen if copy_in else 0)
        if self._idle is None or self._idle[0] != mark:
            self._idle = (mark, now)
            return
        if now - self._idle[1] < limit:
            return
        ident = self.identity
        key = "agent_idle_in_transaction" if ident is not None and ident.kind == "agent" \
            else "idle_in_transaction"
        log.info("session %s: idle in a transaction for %.0f s: ended (limits.%s)",
                 self.id, now - self._idle[1], key)
        self.terminate(IdleInTransaction(
            "terminating connection due to idle-in-transaction timeout",
            detail=f"pgguard: the session was idle in a transaction for {limit:g} s "
                   f"(limits.{key}); its transaction is rolled back and its locks released",
            hint="Commit or roll back before pausing: a transaction left open holds the "
                 "rows it locked against everyone else."))

    def in_flight(self) -> int:
        """ReadyForQuery messages the upstream still owes, by Postgres' rules (the
        session's Answers: one per Sync, Query and FunctionCall sent upstream, less the
        ones Postgres skips after an extended-protocol error until Sync or swallows in a
        COPY)."""
        return self.answers.owed()

    # -- shutdown and errors
    def begin_drain(self) -> None:
        self.draining = True
        if self.client.phase != PH_RELAY:
            if self.task is not None and self.client.phase == PH_STARTUP:
                self.fail(ShuttingDown("the database system is shutting down"))
            return
        self.up_pipe.notify_chunks = True
        self.backend_chunk()

    def client_eof(self) -> bool:
        """The client half-closed its socket (``shutdown(SHUT_WR)``): Postgres reads its
        end of file after the whole messages, answers them first (as before a
        Terminate), and runs nothing of a message left unfinished; so the session goes
        on as if the client had sent a Terminate after its last whole message (True:
        keep the socket open for the answers). A message whose start went upstream
        already: the upstream is told of the end of file the same way, after it. Over
        TLS, or when the upstream cannot be half-closed, the connection ends now
        (False)."""
        t = self.client.transport
        if self.closed or self.client.phase != PH_RELAY or t is None or \
                t.get_extra_info("sslcontext") is not None:
            return False
        if self.quitting is not None:       # after the client's own Terminate
            return not self.closed
        if self.holds.reader is not None and not self.fscan.at_boundary:
            # a hold began behind a message the scan had begun: the bytes kept raw
            # since go on it, with no boundary of their own to cut at
            return False
        if not self.fscan.drop_partial():
            # its start is upstream: Postgres must read the end of file there itself
            up = self.up.transport if self.up is not None else None
            if self.holds.held is not None or up is None or up.is_closing() or \
                    not up.can_write_eof():
                return False
            up.write_eof()
            self.close_after_upstream()
            return not self.closed
        self.holds.cut_partial()
        self.client_pipe.data_received(m.TERMINATE_MESSAGE)
        return not self.closed

    def close_after_upstream(self) -> None:
        """The client sent Terminate (written upstream): read nothing more from it, let
        what Postgres still answers reach it, and close when the upstream closes (at
        most TERMINATE_GRACE seconds later)."""
        if self.closed:
            return
        self.violation = False          # the upstream's close is the expected end
        t = self.client.transport
        if t is not None and not t.is_closing():
            try:
                t.pause_reading()
            except Exception:       # noqa: BLE001 - closing anyway
                pass
        self.quitting = asyncio.get_running_loop().call_later(TERMINATE_GRACE, self.close)

    def upstream_lost(self, exc) -> None:
        """The upstream closed. After its own FATAL (the last message it sent, relayed
        already) or after a malformed frame the client sent, Postgres has said all it
        says: nothing more. Otherwise (lost without a word) the client learns 08006."""
        if self.closed or self.client.phase == PH_STARTUP:
            return      # during login the startup task sees the error itself
        if self.client.phase == PH_RELAY and self.bscan.at_boundary:
            if self.violation is not None:
                if self.violation:
                    self._send_error(self.violation)
            elif self.bscan.last_type != m.ERROR_RESPONSE:  # not after its own FATAL
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

    def client_addr_host(self) -> str:
        peer = self.peer
        return str(peer[0]) if isinstance(peer, tuple) else str(peer)

    def client_gone(self) -> None:
        self.close()

    def _audit_event(self, event: str, **fields) -> None:
        audit = self.services.audit
        if audit is None:
            return
        ident = self.identity
        audit.log(AuditRecord(
            session_id=self.id, event=event, ts=_now(), identity=self.identity_name,
            identity_kind=ident.kind if ident is not None else None,
            client_addr=self.client_addr,
            application_name=self.params.get("application_name"), database=self.database,
            upstream_user=self.services.cfg.upstream.user if event != "auth_failed" else None,
            **fields))

    async def _drop_provisioned(self, role: str) -> None:
        await asyncio.sleep(0.05)       # let the upstream backend see the Terminate
        await drop_role(self.services.link, self.database, role,
                        self.services.cfg.upstream.template_role)

    def _end_by_token(self, err) -> None:
        """The token expired or was revoked: FATAL at a message boundary, then close.
        A statement still running upstream (and what the backend read behind it) is
        stopped with its backend: closing the connection would let it run on and commit
        (red team 20: INSERT ... FROM pg_sleep(5) committed after the revocation)."""
        log.info("session %s: %s", self.id, err.message)
        if self.upstream_key is not None and self.answers is not None and self.in_flight() > 0:
            self.services.background(self._stop_backend(self.upstream_key))
        if self.bscan is None or self.bscan.at_boundary:
            self._send_error(err)
        self.close()

    async def _stop_backend(self, key: tuple[int, int]) -> None:
        """pg_terminate_backend of this session's upstream backend (a cancel would let
        the backend read on and run what the client pipelined behind the statement);
        a CancelRequest when the proxy's role may not terminate it."""
        try:
            rows = await self.services.side.run(
                self.database, [f"SELECT pg_catalog.pg_terminate_backend({int(key[0])})"])
            if rows and rows[0] and rows[0][0][0] in ("t", True):
                return
        except Exception as e:      # noqa: BLE001 - fall back to the cancel
            log.warning("session %s: could not end its upstream backend: %s", self.id, e)
        cpid, csecret = self.front.cancel_cipher.encode(*key)
        await self.front.forward_cancel(cpid, csecret)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.quitting is not None:
            self.quitting.cancel()
        if self._unguard is not None:
            self._unguard()
        if self.provisioned is not None:
            self.services.background(self._drop_provisioned(self.provisioned))
            self.provisioned = None
        if self.holds.approval is not None:
            task, req_id = self.holds.approval
            task.cancel()
            if req_id is not None and self.services.approvals is not None:
                self.services.approvals.withdraw(req_id)
            self.holds.abandoned()
        if self.tracker is not None:
            # what was sent upstream and not answered may have run: recorded, saying so
            self.tracker.abandon("outcome unknown: the session ended before Postgres "
                                 "answered (it may have run)")
        if self.connected_at:
            self._audit_event("disconnect", error=self.end_reason,
                              duration_us=int((time.monotonic() - self.connected_at) * 1e6))
        self.client.phase = PH_CLOSED
        if self.task is not None and not self.task.done() \
                and self.task is not asyncio.current_task():
            self.task.cancel()
        up = self.up
        if up is not None and up.transport is not None and not up.transport.is_closing():
            try:
                up.transport.write(m.TERMINATE_MESSAGE)
            except Exception:
                pass
            up.transport.close()
        t = self.client.transport
        if t is not None and not t.is_closing():
            t.close()
        for scan in (self.fscan, self.bscan):
            if scan is not None:
                scan.release()      # (a message half received: up to max_message_size)
        self.front.forget(self)


# connections refused at admission still negotiating (see Session.refuse): at most so
# many at once per worker, each for at most so long
# throttled logins recorded: per client address, (when last recorded, refused since)
_THROTTLED: dict[str, list] = {}


def _throttled_said(host: str) -> int | None:
    """How many throttled logins of ``host`` went unrecorded since its last record,
    when one is due now (at most one a second per address); None: not yet."""
    now = time.monotonic()
    got = _THROTTLED.get(host)
    if got is not None and now - got[0] < 1.0:
        got[1] += 1
        return None
    if len(_THROTTLED) > 4096:
        _THROTTLED.clear()
    _THROTTLED[host] = [now, 0]
    return 0 if got is None else got[1]


REFUSED_MAX = 64
REFUSED_WAIT = 5.0
_REFUSED: set = set()


def _fmt_addr(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "local")


def _is_loopback(peer) -> bool:
    if not isinstance(peer, tuple):
        return True     # unix socket
    host = peer[0]
    return host.startswith("127.") or host == "::1"


def _bearer_shaped(password: bytes) -> bool:
    # a pgguard token or what could be a JWT: its refusal reason is worth auditing
    return password.startswith(b"pgg_") or (password.startswith(b"eyJ")
                                            and password.count(b".") == 2)


def _status_merged(status: list[bytes], changed: list[bytes]) -> list[bytes]:
    """ParameterStatus messages ``status`` with the values of ``changed`` in force (same
    names replaced in place, new ones after)."""
    def name(msg: bytes) -> bytes:
        return msg[5:msg.find(b"\0", 5)]
    new = {name(x): x for x in changed}
    out = [new.pop(name(x), x) for x in status]
    return out + list(new.values())


def _client_app_status(msg: bytes, client_app: str) -> bytes:
    """The upstream's application_name ParameterStatus shows the client its own name."""
    if not msg.startswith(b"S") or b"application_name\0" not in msg[5:22]:
        return msg
    return m.parameter_status("application_name", client_app)


