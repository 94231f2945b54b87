# Short-lived signed access tokens (HMAC-SHA256, rotating key ids): issue, verify, authenticate.
"""Signed pgguard tokens, presented by a client as its password.

A token looks like ``pgg_k0.<payload>.<signature>``:

- ``k0`` is the key id: ``k0`` is the secret named by ``[auth] token_secret_env``,
  other ids come from ``[auth] token_keys = { k2 = "ENV_VAR" }``. New tokens are
  signed with ``[auth] token_key_id`` (default ``k0``); every configured key verifies,
  so keys rotate without cutting off live tokens.
- ``<payload>`` is base64url (no padding) of a compact JSON array
  ``[version, identity, issued_at, expires_at, databases|null, scope, token_id]``.
- ``<signature>`` is base64url of HMAC-SHA256(secret, ``"pgg_k0.<payload>"``).

Only the characters ``A-Z a-z 0-9 - _ .`` appear, so a token goes into a connection
string as it is. Verification needs nothing but the config and the environment.

Every refusal is a :class:`TokenInvalid` (SQLSTATE 28P01) whose ``message`` is the
generic ``password authentication failed for user "NAME"`` and whose ``reason`` says
what was wrong, for logs and the audit record only; a token that is fine but names
another database raises :class:`DatabaseNotAllowed` (28000).

Example::

    token, claims = issue(cfg, "ci-agent", ttl=900, databases=["app"], scope="readonly")
    claims = verify(cfg, token, identity="ci-agent", database="app")
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import time
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec

from ..config import Identity, parse_duration
from ..errors import AuthFailed, AuthRejected, ConfigError

if TYPE_CHECKING:
    from ..config import Config

PREFIX = "pgg_"
PRIMARY_KEY_ID = "k0"          # the key id of [auth] token_secret_env
MIN_SECRET_LEN = 32            # characters of a signing secret
_VERSION = 1
_SIG_LEN = 43                  # base64url chars of a 32-byte HMAC-SHA256, no padding
_MAX_TOKEN_LEN = 4096
_TOKEN = re.compile(r"^pgg_([A-Za-z0-9][A-Za-z0-9-]{0,31})\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{43})$")
_TOKEN_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

Scope = Literal["readonly", "readwrite"]
SCOPES: tuple[str, ...] = ("readonly", "readwrite")


# ---- errors ---------------------------------------------------------------------------

def _failed(identity: str | None) -> str:
    if identity is None:
        return "password authentication failed"
    return f'password authentication failed for user "{identity}"'


class TokenInvalid(AuthFailed):
    """A token (or JWT) was refused. ``message`` is safe to send; ``reason`` is not.

    Example::

        try:
            verify(cfg, password, identity=user)
        except TokenInvalid as e:
            log.info("auth failed: %s", e.reason)   # the client only sees e.message
    """

    def __init__(self, reason: str, *, identity: str | None = None) -> None:
        super().__init__(_failed(identity))
        self.reason = reason


class TokenMalformed(TokenInvalid):
    """Not a token: wrong prefix, shape, encoding or payload."""


class TokenBadSignature(TokenInvalid):
    """The signature does not match: tampered, or signed with another secret."""


class TokenUnknownKey(TokenInvalid):
    """The key id is not configured (or its secret is not set)."""


class TokenExpired(TokenInvalid):
    """Past its expiry, or longer-lived than ``[auth] max_ttl`` allows."""


class TokenRevoked(TokenInvalid):
    """Revoked with ``pgguard token revoke``."""


class TokenWrongIdentity(TokenInvalid):
    """Issued for another identity than the user the client connected as."""


class DatabaseNotAllowed(AuthRejected):
    """A valid credential, but not for this database (SQLSTATE 28000)."""

    def __init__(self, identity: str, database: str) -> None:
        super().__init__(f'database "{database}" is not allowed for identity "{identity}"')
        self.reason = self.message


class UnknownIdentity(AuthRejected):
    """A valid credential for an identity the config no longer has (SQLSTATE 28000)."""

    def __init__(self, identity: str) -> None:
        super().__init__(f'identity "{identity}" is not configured')
        self.reason = self.message


class TokenSessionEnded(AuthFailed):
    """Raised into (or sent to) a live session whose token expired or was revoked.

    Example::

        err = TokenSessionEnded.expired("ci-agent")   # FATAL 28P01, clear message
    """

    def __init__(self, message: str, why: Literal["expired", "revoked"]) -> None:
        super().__init__(message)
        self.why = why
        self.reason = message

    @classmethod
    def expired(cls, identity: str) -> TokenSessionEnded:
        return cls(f'terminating connection: the token of "{identity}" expired', "expired")

    @classmethod
    def revoked(cls, identity: str) -> TokenSessionEnded:
        return cls(f'terminating connection: the token of "{identity}" was revoked', "revoked")


# ---- claims ---------------------------------------------------------------------------

class _Payload(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    v: int
    sub: str
    iat: int
    exp: int
    db: list[str] | None
    scp: Scope
    jti: str


class TokenClaims(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified token says. ``databases`` None means every database.

    Example::

        claims.identity, claims.expires_at, claims.allows("app"), claims.readonly
    """

    identity: str
    issued_at: int
    expires_at: int
    databases: tuple[str, ...] | None
    scope: Scope
    token_id: str
    key_id: str

    @property
    def readonly(self) -> bool:
        return self.scope == "readonly"

    def allows(self, database: str) -> bool:
        """True if the token may open ``database``: ``claims.allows("app")``."""
        return self.databases is None or database in self.databases

    def remaining(self, now: float | None = None) -> float:
        """Seconds until expiry (negative once expired): ``claims.remaining()``."""
        return self.expires_at - (time.time() if now is None else now)


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who a bearer credential (pgguard token or OIDC JWT) authenticated.

    ``identity_config`` is the ``[identities.NAME]`` entry (for OIDC users without one,
    a synthesized entry with the configured kind and the token's groups), so the session
    and policy treat every principal alike.

    Example::

        p = authenticate_password(cfg, "ci-agent", password, database="app")
        p.identity, p.kind, p.groups, p.scope, p.expires_at, p.token_id, p.method
    """

    identity: str
    identity_config: Identity
    kind: Literal["agent", "human"]
    groups: tuple[str, ...]
    databases: tuple[str, ...] | None
    scope: Scope
    expires_at: float
    token_id: str
    method: Literal["token", "oidc"]

    @property
    def readonly(self) -> bool:
        return self.scope == "readonly"


# ---- keys -----------------------------------------------------------------------------

def _key_env(cfg: Config, key_id: str) -> str | None:
    if key_id == PRIMARY_KEY_ID and cfg.auth.token_secret_env:
        return cfg.auth.token_secret_env
    return cfg.auth.token_keys.get(key_id)


def _key_path(key_id: str) -> str:
    return "auth.token_secret_env" if key_id == PRIMARY_KEY_ID else f"auth.token_keys.{key_id}"


def signing_key_id(cfg: Config) -> str:
    """The key id new tokens are signed with: ``signing_key_id(cfg) -> "k0"``."""
    if cfg.auth.token_key_id:
        return cfg.auth.token_key_id
    if cfg.auth.token_secret_env:
        return PRIMARY_KEY_ID
    raise ConfigError("auth.token_key_id: no signing key configured "
                      "(set [auth] token_secret_env or token_keys + token_key_id)")


def load_key(cfg: Config, key_id: str) -> bytes:
    """The secret of ``key_id`` from its environment variable; ConfigError if unusable.

    Example: ``load_key(cfg, "k0")`` reads ``$PGGUARD_TOKEN_SECRET``.
    """
    env = _key_env(cfg, key_id)
    if env is None:
        raise ConfigError(f"token key id {key_id!r} is not configured "
                          f"(have: {', '.join(cfg.auth.key_ids()) or 'none'})")
    value = os.environ.get(env)
    if value is None or value == "":
        raise ConfigError(f"{_key_path(key_id)}: environment variable {env} is not set")
    if len(value) < MIN_SECRET_LEN:
        raise ConfigError(f"{_key_path(key_id)}: the secret in {env} is too short "
                          f"(use at least {MIN_SECRET_LEN} random characters, "
                          f"e.g. `openssl rand -base64 32`)")
    return value.encode()


def check_keys(cfg: Config) -> list[str]:
    """Load every configured key (at server start); ConfigError names the first bad one.

    Returns the key ids: ``check_keys(cfg) -> ["k0", "k2"]``.
    """
    ids = cfg.auth.key_ids()
    for kid in ids:
        load_key(cfg, kid)
    return ids


# ---- encoding -------------------------------------------------------------------------

def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, signed_part: str) -> bytes:
    return hmac.new(key, signed_part.encode("ascii"), hashlib.sha256).digest()


def _split(token: str, identity: str | None) -> tuple[str, str, str]:
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_LEN:
        raise TokenMalformed("not a pgguard token", identity=identity)
    m = _TOKEN.match(token)
    if not m:
        raise TokenMalformed("not a pgguard token (pgg_KEYID.PAYLOAD.SIGNATURE)",
                             identity=identity)
    return m.group(1), m.group(2), m.group(3)


def _decode_payload(key_id: str, payload_b64: str, identity: str | None) -> TokenClaims:
    try:
        p = msgspec.json.decode(_b64d(payload_b64), type=_Payload)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise TokenMalformed("token payload does not decode", identity=identity) from None
    if p.v != _VERSION or not _TOKEN_ID.match(p.jti) or p.exp < p.iat:
        raise TokenMalformed(f"token payload version {p.v} or fields invalid",
                             identity=identity)
    return TokenClaims(identity=p.sub, issued_at=p.iat, expires_at=p.exp,
                       databases=None if p.db is None else tuple(p.db), scope=p.scp,
                       token_id=p.jti, key_id=key_id)


def looks_like_token(password: str | bytes) -> bool:
    """True if a password is meant as a pgguard token: ``looks_like_token("pgg_k0.x.y")``."""
    if isinstance(password, bytes):
        return password.startswith(PREFIX.encode())
    return password.startswith(PREFIX)


def new_token_id() -> str:
    """A fresh random token id (96 bits, hex): ``new_token_id() -> "9f2c..."``."""
    return secrets.token_hex(12)


# ---- issue / verify -------------------------------------------------------------------

def issue(cfg: Config, identity: str, ttl: float | str | None = None,
          databases: list[str] | tuple[str, ...] | None = None,
          scope: Scope = "readwrite", *, now: float | None = None,
          token_id: str | None = None) -> tuple[str, TokenClaims]:
    """Sign a new token; returns ``(token, claims)``.

    ``ttl`` is seconds or a duration (``"15m"``); default ``[auth] default_ttl``, at most
    ``[auth] max_ttl``. ``databases`` None means every database the identity may use.
    Raises ConfigError for an unknown identity, a bad TTL, scope or database, or a
    missing or short secret.

    Example::

        token, claims = issue(cfg, "ci-agent", "15m", ["app"], "readonly")
    """
    ident = cfg.identities.get(identity)
    if ident is None:
        raise ConfigError(f"unknown identity {identity!r} (not in [identities])")
    if scope not in SCOPES:
        raise ConfigError(f"scope must be readonly or readwrite, not {scope!r}")
    try:
        seconds = parse_duration(cfg.auth.default_ttl if ttl is None else ttl)
    except ValueError as e:
        raise ConfigError(f"ttl: {e}") from None
    max_ttl = parse_duration(cfg.auth.max_ttl)
    if seconds < 1:
        raise ConfigError(f"ttl: {ttl!r} is shorter than one second")
    if seconds > max_ttl:
        raise ConfigError(f"ttl: {ttl!r} is longer than auth.max_ttl ({cfg.auth.max_ttl})")
    if databases is not None:
        databases = list(dict.fromkeys(databases))
        if not databases:
            raise ConfigError("databases: give at least one, or None for all")
        for db in databases:
            if ident.databases is not None and db not in ident.databases:
                raise ConfigError(f"database {db!r} is not allowed for identity {identity!r} "
                                  f"(identities.{identity}.databases)")
            if cfg.upstream.databases is not None and db not in cfg.upstream.databases:
                raise ConfigError(f"database {db!r} is not in upstream.databases")
    key_id = signing_key_id(cfg)
    key = load_key(cfg, key_id)
    iat = int(time.time() if now is None else now)
    payload = _Payload(v=_VERSION, sub=identity, iat=iat, exp=iat + int(round(seconds)),
                       db=databases, scp=scope, jti=token_id or new_token_id())
    signed_part = f"{PREFIX}{key_id}.{_b64e(msgspec.json.encode(payload))}"
    token = f"{signed_part}.{_b64e(_sign(key, signed_part))}"
    return token, _decode_payload(key_id, signed_part.rsplit(".", 1)[1], identity)


class RevocationCheck(Protocol):
    def is_revoked(self, token_id: str) -> bool: ...


def verify(cfg: Config, token: str, *, now: float | None = None,
           identity: str | None = None, database: str | None = None,
           revocations: RevocationCheck | None = None) -> TokenClaims:
    """Check a token: shape, key id, signature (constant time), expiry, revocation,
    identity (if given) and database (if given). Returns its claims.

    Raises TokenMalformed, TokenUnknownKey, TokenBadSignature, TokenExpired,
    TokenRevoked, TokenWrongIdentity (all TokenInvalid: 28P01), DatabaseNotAllowed (28000).

    Example::

        claims = verify(cfg, password, identity=user, database=db, revocations=watcher)
    """
    key_id, payload_b64, sig_b64 = _split(token, identity)
    try:
        key = load_key(cfg, key_id)
    except ConfigError as e:
        raise TokenUnknownKey(f"key id {key_id!r}: {e.message}", identity=identity) from None
    expected = _b64e(_sign(key, f"{PREFIX}{key_id}.{payload_b64}"))
    if not hmac.compare_digest(expected.encode("ascii"), sig_b64.encode("ascii")):
        raise TokenBadSignature(f"bad signature (key id {key_id})", identity=identity)
    claims = _decode_payload(key_id, payload_b64, identity)
    now = time.time() if now is None else now
    if now >= claims.expires_at:
        raise TokenExpired(f"token {claims.token_id} expired at {claims.expires_at}",
                           identity=identity)
    if claims.expires_at - claims.issued_at > parse_duration(cfg.auth.max_ttl):
        raise TokenExpired(f"token {claims.token_id} lives longer than auth.max_ttl",
                           identity=identity)
    if revocations is not None and revocations.is_revoked(claims.token_id):
        raise TokenRevoked(f"token {claims.token_id} is revoked", identity=identity)
    if identity is not None and not hmac.compare_digest(claims.identity.encode(),
                                                        identity.encode()):
        raise TokenWrongIdentity(f"token {claims.token_id} belongs to another identity",
                                 identity=identity)
    if database is not None and not claims.allows(database):
        raise DatabaseNotAllowed(claims.identity, database)
    return claims


def peek(token: str) -> TokenClaims:
    """Decode a token's claims WITHOUT checking its signature (for ``token revoke``).

    Example: ``peek(token).token_id``. Never use the result to grant anything.
    """
    key_id, payload_b64, _ = _split(token, None)
    return _decode_payload(key_id, payload_b64, None)


# ---- one entry point for the session --------------------------------------------------

class BearerVerifier(Protocol):
    def verify(self, token: str, *, username: str | None = None,
               now: float | None = None) -> Principal: ...


def authenticate_password(cfg: Config, user: str, password: str | bytes, *,
                          database: str, revocations: RevocationCheck | None = None,
                          oidc: BearerVerifier | None = None,
                          now: float | None = None) -> Principal:
    """Authenticate a cleartext password that is a pgguard token or (with ``oidc``) a JWT.

    Checks the credential, then that the identity may use ``database`` (token databases,
    ``identities.NAME.databases``, ``upstream.databases``). Raises TokenInvalid (28P01;
    also for a password that is neither kind), DatabaseNotAllowed or UnknownIdentity (28000).
    Synchronous; with an OIDC ``jwks_url`` it may block on a fetch (see OidcVerifier).

    Example::

        p = authenticate_password(cfg, user, pw, database=db, revocations=watcher, oidc=v)
    """
    if isinstance(password, bytes):
        try:
            password = password.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenMalformed("password is not UTF-8", identity=user) from None
    password = password.rstrip("\0")
    if looks_like_token(password):
        claims = verify(cfg, password, now=now, identity=user, revocations=revocations)
        ident = cfg.identities.get(claims.identity)
        if ident is None:
            raise UnknownIdentity(claims.identity)
        p = Principal(identity=claims.identity, identity_config=ident, kind=ident.kind,
                      groups=tuple(ident.groups), databases=claims.databases,
                      scope=claims.scope, expires_at=float(claims.expires_at),
                      token_id=claims.token_id, method="token")
    elif oidc is not None and password.count(".") == 2 and password.startswith("eyJ"):
        p = oidc.verify(password, username=user, now=now)
        if revocations is not None and revocations.is_revoked(p.token_id):
            raise TokenRevoked(f"JWT {p.token_id} is revoked", identity=user)
    else:
        raise TokenMalformed("password is neither a pgguard token nor an accepted JWT",
                             identity=user)
    check_database(cfg, p, database)
    return p


def check_database(cfg: Config, p: Principal, database: str) -> None:
    """DatabaseNotAllowed unless ``p`` may open ``database``: ``check_database(cfg, p, "app")``."""
    allowed = p.databases is None or database in p.databases
    allowed = allowed and (p.identity_config.databases is None
                           or database in p.identity_config.databases)
    allowed = allowed and (cfg.upstream.databases is None
                           or database in cfg.upstream.databases)
    if not allowed:
        raise DatabaseNotAllowed(p.identity, database)
