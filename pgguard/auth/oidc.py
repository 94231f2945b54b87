# OIDC: a JWT as the password, checked (PyJWT) against a JWKS file or URL; claims -> identity.
"""Verify an identity provider's JWT and map its claims to a pgguard identity.

Configured under ``[auth.oidc]``::

    [auth.oidc]
    issuer = "https://dev-123.okta.com/oauth2/default"
    audience = "pgguard"
    jwks_url = "https://dev-123.okta.com/oauth2/default/v1/keys"   # or jwks_file = "jwks.json"
    identity_claim = ["preferred_username", "upn", "email", "sub"]  # first present wins
    groups_claim = "groups"
    kind = "agent"                          # for identities not in [identities]

Claim conventions of common providers:

- Okta: ``sub`` / ``email`` for the user, ``groups`` (with a groups claim configured).
- Keycloak: ``preferred_username``; roles in ``realm_access.roles`` (dotted names reach
  into objects) or a ``groups`` mapper.
- Azure AD / Entra ID: ``upn`` or ``preferred_username``; ``roles`` (app roles) and
  ``groups`` (object ids; translate them with ``group_map``).

Several ``groups_claim`` names are unioned; ``group_map = { "okta-dbas" = "dba" }``
renames groups. The client connects with the mapped identity as its user name.
Only asymmetric algorithms in ``algorithms`` are accepted (never ``none`` or HS*); a key's
type and curve must fit the algorithm. The signature, expiry (``exp`` required),
not-before, issuer and audience checks are PyJWT's.

Example::

    v = OidcVerifier(cfg)
    p = v.verify(jwt_text, username="alice@corp.example")   # -> tokens.Principal
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import msgspec

from ..config import Identity, parse_duration
from .tokens import (
    Principal,
    TokenBadSignature,
    TokenExpired,
    TokenInvalid,
    TokenMalformed,
    TokenUnknownKey,
    TokenWrongIdentity,
    UnknownIdentity,
)

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("pgguard.auth")

# algorithm -> (JWK kty, EC curve or None)
_KEY_TYPES = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"),
}
_REFETCH_AFTER = 60.0     # an unknown kid refetches a jwks_url at most this often
_MAX_JWKS_BYTES = 1 << 20
_MAX_IDENTITY_LEN = 256


class TokenWrongIssuer(TokenInvalid):
    """The JWT's ``iss`` is not ``[auth.oidc] issuer``."""


class TokenWrongAudience(TokenInvalid):
    """The JWT's ``aud`` does not include ``[auth.oidc] audience``."""


def claim(claims: dict[str, Any], name: str) -> Any:
    """A claim by name; a dotted name reaches into objects when no claim has that exact name.

    Example: ``claim({"realm_access": {"roles": ["dba"]}}, "realm_access.roles") -> ["dba"]``.
    """
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _names(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def jwt_token_id(token: str, claims: dict[str, Any] | None = None) -> str:
    """The id a JWT is revoked by: its ``jti``, else ``jwt-`` + a SHA-256 prefix of it.

    Example: ``pgguard token revoke $(jwt_token_id(t))``.
    """
    jti = (claims or {}).get("jti")
    if isinstance(jti, str) and 0 < len(jti) <= 128:
        return jti
    return "jwt-" + hashlib.sha256(token.encode()).hexdigest()[:32]


def peek_jwt(token: str) -> dict[str, Any]:
    """A JWT's claims WITHOUT verification (for ``token revoke``); TokenMalformed if not a JWT.

    Example: ``peek_jwt(t)["exp"]``. Never use the result to grant anything.
    """
    try:
        return jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise TokenMalformed("not a JWT") from None


class OidcVerifier:
    """Verifies JWTs for ``[auth.oidc]``; one per worker, keys cached.

    ``verify`` is synchronous. With ``jwks_file`` it stats the file (reloads on change).
    With ``jwks_url`` it fetches when the cache (``jwks_cache``) is stale or a kid is
    unknown (at most once a minute), waiting up to ``jwks_timeout``: from the event
    loop, use ``await verify_async(...)``, which fetches in a thread. A failed refresh
    keeps the previous keys.

    Example::

        v = OidcVerifier(cfg)
        p = await v.verify_async(password, username=user)
    """

    def __init__(self, cfg: Config) -> None:
        if cfg.auth.oidc is None:
            raise ValueError("no [auth.oidc] in the config")
        self.cfg = cfg
        self.oc = oc = cfg.auth.oidc
        self.audience = _names(oc.audience)
        self.leeway = parse_duration(oc.leeway)
        self.cache_for = parse_duration(oc.jwks_cache)
        self.timeout = parse_duration(oc.jwks_timeout)
        self.file: Path | None = None
        if oc.jwks_file is not None:
            p = Path(oc.jwks_file)
            self.file = p if p.is_absolute() else Path(cfg.base_dir) / p
        self._jwks: dict[str | None, dict[str, Any]] = {}   # kid -> JWK
        self._built: dict[tuple[str | None, str], Any] = {}  # (kid, alg) -> key object
        self._source_sig: object = None
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = threading.Lock()

    # ---- keys -------------------------------------------------------------------------

    def _install(self, data: bytes) -> None:
        try:
            doc = msgspec.json.decode(data)
        except msgspec.DecodeError:
            raise ValueError("JWKS is not JSON") from None
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, list):
            raise ValueError("JWKS has no \"keys\" array")
        jwks: dict[str | None, dict[str, Any]] = {}
        for k in keys:
            if not isinstance(k, dict) or k.get("use", "sig") != "sig":
                continue
            if k.get("kty") not in ("RSA", "EC") or "d" in k:
                continue    # only public RSA / EC keys
            jwks[k.get("kid")] = k
        self._jwks = jwks
        self._built = {}

    def _load_file(self) -> None:
        assert self.file is not None
        try:
            st = self.file.stat()
        except OSError as e:
            raise ValueError(f"cannot read jwks_file {self.file}: {e.strerror}") from None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if sig != self._source_sig:
            self._install(self.file.read_bytes())
            self._source_sig = sig

    def _fetch(self) -> None:
        url = self.oc.jwks_url
        assert url is not None
        self._attempted_at = time.monotonic()
        req = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   "User-Agent": "pgguard"})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:   # noqa: S310 (https checked)
            data = r.read(_MAX_JWKS_BYTES + 1)
        if len(data) > _MAX_JWKS_BYTES:
            raise ValueError("JWKS larger than 1 MiB")
        self._install(data)
        self._fetched_at = time.monotonic()

    def _needs_fetch(self, kid: str | None) -> bool:
        if self.oc.jwks_url is None:
            return False
        now = time.monotonic()
        if now - self._fetched_at > self.cache_for:
            return now - self._attempted_at > min(_REFETCH_AFTER, self.cache_for) or \
                not self._jwks
        return kid not in self._jwks and now - self._attempted_at > _REFETCH_AFTER

    def refresh(self, kid: str | None = None) -> None:
        """Make sure the keys are current (blocking for a jwks_url fetch).

        Example: ``await asyncio.to_thread(v.refresh)`` at worker start.
        """
        with self._lock:
            if self.file is not None:
                self._load_file()
            elif self._needs_fetch(kid):
                try:
                    self._fetch()
                except Exception as e:      # network, HTTP, JSON: keep what we had
                    log.warning("oidc: fetching %s failed: %s", self.oc.jwks_url, e)
                    if not self._jwks:
                        raise ValueError(f"JWKS unavailable: {e}") from None

    def _key_for(self, kid: str | None, alg: str, username: str | None) -> Any:
        try:
            self.refresh(kid)
        except ValueError as e:
            raise TokenUnknownKey(str(e), identity=username) from None
        jwk = self._jwks.get(kid)
        if jwk is None and kid is None and len(self._jwks) == 1:
            jwk = next(iter(self._jwks.values()))
        if jwk is None:
            raise TokenUnknownKey(f"JWT key id {kid!r} is not in the JWKS", identity=username)
        kty, crv = _KEY_TYPES[alg]
        if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv) or \
                jwk.get("alg", alg) != alg:
            raise TokenUnknownKey(f"JWT key {kid!r} does not fit algorithm {alg}",
                                  identity=username)
        built = self._built.get((kid, alg))
        if built is None:
            try:
                built = jwt.PyJWK(jwk, algorithm=alg).key
            except jwt.PyJWTError as e:
                raise TokenUnknownKey(f"JWT key {kid!r} unusable: {e}",
                                      identity=username) from None
            self._built[(kid, alg)] = built
        return built

    # ---- verify -----------------------------------------------------------------------

    def _header(self, token: str, username: str | None) -> tuple[str | None, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenMalformed("not a JWT", identity=username) from None
        alg = header.get("alg")
        if alg not in self.oc.algorithms or alg not in _KEY_TYPES:
            raise TokenMalformed(f"JWT algorithm {alg!r} is not accepted", identity=username)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenMalformed("JWT kid is not a string", identity=username)
        return kid, alg

    def verify(self, token: str, *, username: str | None = None,
               now: float | None = None) -> Principal:
        """Verify a JWT and map it to a Principal (method ``"oidc"``).

        ``username`` (the startup user) must equal the mapped identity. Raises
        TokenMalformed, TokenUnknownKey, TokenBadSignature, TokenExpired,
        TokenWrongIssuer, TokenWrongAudience, TokenWrongIdentity (TokenInvalid, 28P01),
        UnknownIdentity (28000, with ``require_known_identity``).

        Example: ``p = v.verify(password, username=user)``.
        """
        kid, alg = self._header(token, username)
        key = self._key_for(kid, alg, username)
        oc = self.oc
        try:
            claims = self._decode(token, key, alg, now)
        except jwt.ExpiredSignatureError:
            raise TokenExpired("JWT expired", identity=username) from None
        except jwt.ImmatureSignatureError:
            raise TokenExpired("JWT not yet valid (nbf/iat)", identity=username) from None
        except jwt.InvalidIssuerError:
            raise TokenWrongIssuer("JWT issuer mismatch", identity=username) from None
        except jwt.InvalidAudienceError:
            raise TokenWrongAudience("JWT audience mismatch", identity=username) from None
        except jwt.InvalidSignatureError:
            raise TokenBadSignature("JWT signature does not verify",
                                    identity=username) from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenMalformed(f"JWT lacks claim {e.claim!r}", identity=username) from None
        except jwt.PyJWTError as e:
            raise TokenMalformed(f"JWT refused: {e}", identity=username) from None

        name = None
        for cname in _names(oc.identity_claim):
            value = claim(claims, cname)
            if isinstance(value, str) and value:
                name = value
                break
        if name is None or len(name) > _MAX_IDENTITY_LEN or not name.isprintable():
            raise TokenWrongIdentity("JWT has no usable identity claim", identity=username)
        if username is not None and not hmac.compare_digest(name.encode(), username.encode()):
            raise TokenWrongIdentity("JWT identity differs from the user name",
                                     identity=username)
        groups: list[str] = []
        for gname in _names(oc.groups_claim):
            value = claim(claims, gname)
            if isinstance(value, str):
                value = [value]
            if isinstance(value, list):
                groups += [oc.group_map.get(g, g) for g in value if isinstance(g, str)]
        known = self.cfg.identities.get(name)
        if known is None and oc.require_known_identity:
            raise UnknownIdentity(name)
        if known is not None:
            kind = known.kind
            ident = msgspec.structs.replace(
                known, groups=list(dict.fromkeys([*known.groups, *groups])))
        else:
            kind = oc.kind
            ident = Identity(kind=kind, groups=list(dict.fromkeys(groups)))
        return Principal(identity=name, identity_config=ident, kind=kind,
                         groups=tuple(ident.groups), databases=None, scope=oc.scope,
                         expires_at=float(claims["exp"]),
                         token_id=jwt_token_id(token, claims), method="oidc")

    def _decode(self, token: str, key: Any, alg: str, now: float | None) -> dict[str, Any]:
        opts: dict[str, Any] = {"require": ["exp", "iss", "aud"]}
        if now is not None:
            # an explicit clock (tests): PyJWT reads the wall clock, so check times here
            opts.update(verify_exp=False, verify_nbf=False, verify_iat=False)
        claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience,
                            issuer=self.oc.issuer, leeway=self.leeway, options=opts)
        if now is not None:
            exp, nbf = claims.get("exp"), claims.get("nbf", float("-inf"))
            if not isinstance(exp, (int, float)) or now >= exp + self.leeway:
                raise jwt.ExpiredSignatureError("Signature has expired")
            if not isinstance(nbf, (int, float)) or now < nbf - self.leeway:
                raise jwt.ImmatureSignatureError("The token is not yet valid (nbf)")
        return claims

    async def verify_async(self, token: str, *, username: str | None = None,
                           now: float | None = None) -> Principal:
        """``verify`` for the event loop: any JWKS fetch runs in a thread.

        Example: ``p = await v.verify_async(password, username=user)``.
        """
        if self.oc.jwks_url is not None:
            try:
                kid = jwt.get_unverified_header(token).get("kid")
            except jwt.PyJWTError:
                kid = None
            if self._needs_fetch(kid if isinstance(kid, str) else None):
                try:
                    await asyncio.to_thread(self.refresh, kid)
                except ValueError:
                    pass        # verify raises TokenUnknownKey
        return self.verify(token, username=username, now=now)


def from_config(cfg: Config) -> OidcVerifier | None:
    """An OidcVerifier if ``[auth.oidc]`` is configured, else None.

    Example: ``verifier = oidc.from_config(cfg)`` once per worker.
    """
    return None if cfg.auth.oidc is None else OidcVerifier(cfg)
