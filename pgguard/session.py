# One client connection: startup, authentication, the upstream link, and the relay.
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING

from ._core import FrameError, FrameReader, MessageScan, Pipe
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
                await self._connect_upstream()
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
        opts = params.get("options")
        if opts:
            for name in _option_names(opts):
                if name.lower().replace("-", "_") in FORBIDDEN_PARAMS:
                    raise PgguardError(
                        f"startup option \"{name}\" is not allowed through pgguard",
                        sqlstate="42501", severity="FATAL")

    async def _authenticate(self) -> None:
        from .auth import scram
        c = self.client
        # auth replies are typed messages; keep whatever already arrived
        rest = c.reader.take_rest()
        c.reader = FrameReader(True, MAX_AUTH_MESSAGE)
        if rest:
            c.reader.feed(rest)
        name = self.identity_name
        identity = self.server.cfg.identities.get(name)
        verifier = self.server.verifier_for(name)   # a fake one for unknown names
        c.transport.write(m.auth_request(m.AUTH_SASL, scram.MECHANISM.encode() + b"\0\0"))
        t, payload = await c.read_message()
        if t == ord("X"):
            raise ConnectionResetError("client quit during authentication")
        if t != ord("p"):
            raise ProtocolViolation(f"expected SASL response, got message type {chr(t)!r}")
        try:
            mech, pos = m.parse_cstr(payload)
            (n,) = struct.unpack_from("!i", payload, pos)
            data = payload[pos + 4:pos + 4 + n] if n >= 0 else b""
            server = scram.ScramServer(verifier)
            first = server.handle_initial(mech, data)
        except (ValueError, struct.error, scram.ScramError) as e:
            raise ProtocolViolation(f"malformed SCRAM message: {e}") from None
        c.transport.write(m.auth_request(m.AUTH_SASL_CONTINUE, first))
        t, payload = await c.read_message()
        if t != ord("p"):
            raise ProtocolViolation(f"expected SASL response, got message type {chr(t)!r}")
        try:
            final = server.handle_final(payload)
        except scram.ScramError as e:
            raise ProtocolViolation(f"malformed SCRAM message: {e}") from None
        if final is None or identity is None or not self.server.has_secret(name):
            await self.server.auth_failed(self)
            raise AuthFailed(f'password authentication failed for user "{name}"')
        c.transport.write(m.auth_request(m.AUTH_SASL_FINAL, final))
        self.identity = identity
        allowed = self.server.cfg.upstream.databases
        if (allowed is not None and self.database not in allowed) or (
                identity.databases is not None and self.database not in identity.databases):
            raise AuthRejected(
                f'database "{self.database}" is not allowed for identity "{name}"')

    async def _connect_upstream(self) -> None:
        params = {k: v for k, v in self.params.items() if k not in ("user", "database")}
        self.up, status, key = await connect_upstream(self, self.server, self.database, params)
        pid, secret = key
        self.upstream_key = key
        cpid, csecret = self.server.cancel_cipher.encode(pid, secret)
        out = [m.auth_request(m.AUTH_OK)]
        out.extend(status)
        out.append(m.backend_key_data(cpid, csecret))
        out.append(m.ready_for_query(ord("I")))
        self.client.transport.write(b"".join(out))

    def _enter_relay(self) -> None:
        c, up = self.client, self.up
        limits = self.server.cfg.limits
        self.fscan = MessageScan(interest=b"X", valid=m.FRONTEND_TYPES,
                                 counted=m.FRONTEND_SYNC_TYPES, withhold=True,
                                 max_len=limits.max_message_size)
        self.bscan = MessageScan(interest=b"", counted=b"Z", withhold=False,
                                 max_len=0x7FFFFFFF)
        self.bscan.status = ord("I")
        self.client_pipe = Pipe(self.fscan, c.transport, up.transport, self, True)
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
        """Frontend scan output with withheld messages (Terminate here)."""
        up = self.up.transport
        for it in items:
            if it.__class__ is bytes:
                up.write(it)
            elif it[0] == 88:        # 'X' Terminate: pass it on, then close both
                up.write(it[1])
                self.close()
                return
            else:
                up.write(it[1])

    def frame_error(self, e: FrameError) -> None:
        self.fail(ProtocolViolation(f"invalid frontend message: {e.args[0]}"))

    def backend_events(self, events: list) -> None:
        """Whole backend messages the session asked to see (none yet)."""

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

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
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


def _option_names(options: str) -> list[str]:
    """Names set by `-c name=value` / `--name=value` in a startup `options` string."""
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
    names = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c" and i + 1 < len(tokens):
            names.append(tokens[i + 1].split("=", 1)[0])
            i += 2
            continue
        if tok.startswith("-c"):
            names.append(tok[2:].split("=", 1)[0])
        elif tok.startswith("--"):
            names.append(tok[2:].split("=", 1)[0])
        i += 1
    return names


def _fmt_addr(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "local")


def _is_loopback(peer) -> bool:
    if not isinstance(peer, tuple):
        return True     # unix socket
    host = peer[0]
    return host.startswith("127.") or host == "::1"
