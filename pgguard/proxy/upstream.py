# The upstream link: the connection to the real database, and its login.
# Connect, TLS per sslmode, log in with the proxy's own credentials (or the identity's),
# then relay backend chunks to the client.
from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._core import FrameReader
from ..auth import scram
from ..errors import PgguardError, UpstreamUnavailable
from ..protocol import messages as m
from .startup import PACKET_KEYS as _PACKET_KEYS

if TYPE_CHECKING:
    from ..config import Upstream
    from .session import Session

log = logging.getLogger("pgguard.upstream")

PH_STARTUP = 0
PH_RELAY = 1


@dataclass(frozen=True, slots=True)
class UpstreamLink:
    """How a worker reaches Postgres, read once from [upstream] (the password read, the
    root certificate's path resolved): what connect_upstream and the side connections
    take. Example::

        link = UpstreamLink(cfg.upstream, password, 5.0, None)
        proto, status, key = await connect_upstream(owner, link, "app", {})
    """

    cfg: Upstream
    password: str | None
    connect_timeout: float
    rootcert: str | None        # sslrootcert, resolved against the config's directory


class UpstreamProtocol(asyncio.Protocol):
    """The upstream socket while logging in; then a compiled Pipe takes over."""

    __slots__ = ("session", "transport", "phase", "reader", "raw", "waiter", "_lost")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport = None
        self.phase = PH_STARTUP
        self.reader: FrameReader | None = None   # typed messages during login
        self.raw = bytearray()                    # before login (the SSL answer)
        self.waiter: asyncio.Future | None = None
        self._lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        m.set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if self.reader is not None:
            self.reader.feed(data)
        else:
            self.raw += data
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self._lost = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError("upstream closed the connection"))
        self.session.upstream_lost(exc)

    async def _wait(self) -> None:
        if self._lost:
            raise ConnectionResetError("upstream closed the connection")
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def read_byte(self) -> int:
        while not self.raw:
            await self._wait()
        b = self.raw[0]
        del self.raw[:1]
        return b

    async def read_message(self):
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                return msg
            await self._wait()


def unix_socket_path(directory: str, port: int) -> str:
    return f"{directory.rstrip('/')}/.s.PGSQL.{port}"


def _ssl_context(link: UpstreamLink) -> ssl.SSLContext | None:
    up = link.cfg
    if up.sslmode in ("disable", "allow") or up.host.startswith("/"):
        return None
    if up.sslmode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=link.rootcert)
        ctx.check_hostname = up.sslmode == "verify-full"
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def connect_upstream(session: Session, link: UpstreamLink, database: str,
                           params: dict[str, str] | list[tuple[str, str]], *,
                           user: str | None = None,
                           password: str | None = None):
    """Open and log in an upstream connection for a session.

    ``params`` are the settings of the StartupMessage besides user and database: a dict,
    or pairs in the order Postgres applies them (pgguard.startup.upstream_params).
    Returns (protocol, [ParameterStatus messages to pass on], (pid, secret)).
    Errors become UpstreamUnavailable (08006) or the upstream's own error when it
    is about the client's request (unknown database, too many connections).
    """
    cfg = link.cfg
    pairs = list(params.items()) if isinstance(params, dict) else list(params)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(link.connect_timeout):
            if cfg.host.startswith("/"):
                # a directory: the server's unix socket, as libpq reads host
                transport, proto = await loop.create_unix_connection(
                    lambda: UpstreamProtocol(session), unix_socket_path(cfg.host, cfg.port))
            else:
                transport, proto = await loop.create_connection(
                    lambda: UpstreamProtocol(session), cfg.host, cfg.port)
    except (OSError, TimeoutError) as e:
        log.warning("upstream %s:%s unreachable: %s", cfg.host, cfg.port, e)
        raise UpstreamUnavailable(
            "could not connect to the upstream database",
            detail=f"connection to {cfg.host}:{cfg.port} failed") from None
    session.upstream_opened(proto)     # closed with the session from now on
    try:
        return await _login(proto, link, database, pairs, user, password)
    except (ConnectionError, OSError) as e:
        transport.close()
        raise UpstreamUnavailable("the upstream database closed the connection during login",
                                  detail=str(e)) from None
    except BaseException:
        transport.close()
        raise


async def _login(proto: UpstreamProtocol, link: UpstreamLink, database: str,
                 params: list[tuple[str, str]], user: str | None = None,
                 password: str | None = None):
    cfg = link.cfg
    user = user or cfg.user
    if password is None and user == cfg.user:
        password = link.password
    ctx = _ssl_context(link)
    if ctx is not None:
        proto.transport.write(struct.pack("!II", 8, m.SSL_REQUEST))
        answer = await proto.read_byte()
        if answer == m.SSL_ACCEPTED:
            if proto.raw:
                raise UpstreamUnavailable("upstream sent unencrypted data after SSL response")
            loop = asyncio.get_running_loop()
            try:
                proto.transport = await loop.start_tls(
                    proto.transport, proto, ctx,
                    server_hostname=cfg.host if cfg.sslmode == "verify-full" else None)
            except (ssl.SSLError, OSError) as e:
                log.warning("upstream TLS failed: %s", e)
                raise UpstreamUnavailable("TLS handshake with the upstream database failed",
                                          detail=str(e)) from None
        elif answer == m.SSL_REFUSED:
            if cfg.sslmode not in ("prefer",):
                raise UpstreamUnavailable("the upstream database does not support TLS",
                                          detail=f"sslmode={cfg.sslmode}")
        else:
            raise UpstreamUnavailable("unexpected answer to SSLRequest from upstream")
    proto.reader = FrameReader(True, 0x7FFFFFFF)
    # pgguard chooses who and where; params are settings only (pgguard.startup built
    # them), never a key Postgres reads as something else
    bad = [k for k, _ in params if k in _PACKET_KEYS or k.startswith("_pq_.")]
    if bad:
        raise PgguardError(f"internal error: startup parameter {bad[0]!r} is not a setting",
                           severity="FATAL")
    start = [("user", user), ("database", database), *params]
    proto.transport.write(m.startup_message(start))
    status: list[bytes] = []
    key = (0, 0)
    scram_client = None
    while True:
        t, payload = await proto.read_message()
        if t == m.AUTHENTICATION:
            (code,) = struct.unpack_from("!I", payload)
            if code == m.AUTH_OK:
                continue
            scram_client = _answer_auth(proto, user, password, code, payload[4:],
                                        scram_client)
        elif t == m.PARAMETER_STATUS:
            status.append(b"S" + struct.pack("!I", len(payload) + 4) + payload)
        elif t == m.BACKEND_KEY_DATA:
            key = struct.unpack_from("!II", payload)
        elif t == m.READY_FOR_QUERY:
            return proto, status, key
        elif t == m.ERROR_RESPONSE:
            raise _upstream_error(m.parse_error_fields(payload))
        elif t == m.NOTICE_RESPONSE:
            continue
        elif t == m.NEGOTIATE_PROTOCOL_VERSION:
            continue     # we asked for 3.0, nothing to do
        else:
            raise UpstreamUnavailable(f"unexpected message {chr(t)!r} from upstream at login")


def _answer_auth(proto: UpstreamProtocol, user: str, password: str | None, code: int,
                 data: bytes, scram_client):
    try:
        if code == m.AUTH_CLEARTEXT:
            _need(password)
            proto.transport.write(m.password_message(password.encode() + b"\0"))
        elif code == m.AUTH_MD5:
            _need(password)
            proto.transport.write(m.password_message(
                scram.md5_password(user, password, data[:4]) + b"\0"))
        elif code == m.AUTH_SASL:
            _need(password)
            mech = scram.choose_mechanism(scram.parse_sasl_mechanisms(data))
            scram_client = scram.ScramClient(password)
            mech, first = scram_client.initial()
            proto.transport.write(m.sasl_initial_response(mech, first))
        elif code == m.AUTH_SASL_CONTINUE:
            proto.transport.write(m.password_message(scram_client.handle_continue(data)))
        elif code == m.AUTH_SASL_FINAL:
            scram_client.handle_final(data)
        else:
            raise UpstreamUnavailable(
                f"the upstream database asks for an authentication method pgguard "
                f"does not support (code {code})")
    except scram.ScramError as e:
        log.warning("upstream SCRAM failed: %s", e)
        raise UpstreamUnavailable("upstream authentication failed") from None
    return scram_client


def _need(password: str | None) -> None:
    if password is None:
        raise UpstreamUnavailable(
            "the upstream database asks for a password and none is configured",
            hint="set [upstream] password_env or password_file")


# upstream errors that are about the client's request, passed on as they are
_PASS_ON = {"3D000", "53300", "57P03", "42501", "28000", "0A000", "55000", "22023", "42704"}


def _upstream_error(fields: dict[str, str]) -> PgguardError:
    code = fields.get("C", "08006")
    msg = fields.get("M", "upstream error")
    if code.startswith("28"):
        # never tell the client about the proxy's own credentials
        log.warning("upstream authentication failed: %s", msg)
        return UpstreamUnavailable("upstream authentication failed",
                                   hint="the proxy's [upstream] credentials were refused")
    if code in _PASS_ON or code.startswith("57"):
        return PgguardError(msg, sqlstate=code, severity="FATAL",
                            detail=fields.get("D"), hint=fields.get("H"))
    log.warning("upstream refused the connection: %s %s", code, msg)
    return UpstreamUnavailable(msg)
