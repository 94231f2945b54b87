# `pgguard token issue|revoke`: mint a short-lived token with a ready DSN, or revoke one.
"""Issue and revoke short-lived pgguard tokens.

Examples::

    pgguard token issue -c pgguard.toml --identity ci-agent --ttl 15m --database app
    pgguard token issue -c pgguard.toml --identity ci-agent --scope readonly --json
    pgguard token revoke -c pgguard.toml 9f2c51d0a4b7e3c1d2e5f6a7
    pgguard token revoke -c pgguard.toml pgg_k0.eyJ...

A token is the password of a connection string::

    psql "postgresql://ci-agent:pgg_k0....@127.0.0.1:6432/app?sslmode=disable"

Tokens are signed with the secret in ``[auth] token_secret_env`` (or the key chosen by
``[auth] token_key_id``) and checked by the proxy without any database. A revocation is
honoured by every worker within a second, on new and on live connections.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
import time
import urllib.parse

import orjson

from .. import config as config_mod
from ..control.revocations import revoke as revoke_shared
from ..errors import PgguardError
from . import oidc, revocations, tokens


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _parser(action: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"pgguard token {action}", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="the pgguard TOML config file")
    if action == "issue":
        p.add_argument("--identity", required=True, metavar="NAME",
                       help="an identity from [identities]")
        p.add_argument("--ttl", default=None, metavar="DURATION",
                       help="lifetime, e.g. 90s, 15m, 2h (default [auth] default_ttl; "
                            "at most [auth] max_ttl)")
        p.add_argument("--database", action="append", default=None, metavar="DB",
                       help="a database the token may open (repeatable; default: every "
                            "database the identity may use); the first goes in the DSN")
        p.add_argument("--scope", choices=list(tokens.SCOPES), default="readwrite",
                       help="readonly: read-only transactions, writes refused "
                            "(default readwrite: policy still applies)")
        p.add_argument("--host", default=None,
                       help="host name for the DSN (default: [listen] address)")
        p.add_argument("--json", action="store_true",
                       help="one JSON object: token, token_id, identity, expires_at, dsn, ...")
    else:
        p.add_argument("token", metavar="TOKEN_ID_OR_TOKEN",
                       help="a token id (from `issue --json`), a whole token, or a JWT")
        p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dsn_host(cfg: config_mod.Config, override: str | None) -> str:
    host = override or cfg.listen.address
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


def dsn(cfg: config_mod.Config, identity: str, token: str, database: str,
        host: str | None = None) -> str:
    """A libpq URI for a token: ``postgresql://NAME:TOKEN@HOST:PORT/DB?sslmode=...``.

    ``sslmode=require`` when ``[listen]`` has TLS, else ``disable`` (cleartext tokens
    are then accepted from loopback only, with ``allow_cleartext_loopback``).

    Example: ``dsn(cfg, "ci-agent", token, "app")``.
    """
    q = urllib.parse.quote
    sslmode = "require" if cfg.listen.tls_cert else "disable"
    return (f"postgresql://{q(identity, safe='')}:{q(token, safe='')}@"
            f"{_dsn_host(cfg, host)}:{cfg.listen.port}/{q(database, safe='')}"
            f"?sslmode={sslmode}")


def _default_database(cfg: config_mod.Config, identity: str,
                      databases: list[str] | None) -> str:
    if databases:
        return databases[0]
    ident = cfg.identities[identity]
    if ident.databases:
        return ident.databases[0]
    if cfg.upstream.databases:
        return cfg.upstream.databases[0]
    return "postgres"


def _issue(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    if args.identity not in cfg.identities:
        known = ", ".join(sorted(cfg.identities)) or "none configured"
        raise PgguardError(f"unknown identity {args.identity!r} (identities: {known})")
    ttl = args.ttl
    if ttl is not None:
        try:
            config_mod.parse_duration(ttl)
        except ValueError as e:
            raise PgguardError(f"--ttl: {e}") from None
    token, claims = tokens.issue(cfg, args.identity, ttl, args.database, args.scope)
    db = _default_database(cfg, args.identity, args.database)
    url = dsn(cfg, args.identity, token, db, args.host)
    if args.json:
        sys.stdout.write(orjson.dumps({
            "token": token, "token_id": claims.token_id, "identity": claims.identity,
            "expires_at": _iso(claims.expires_at), "dsn": url,
            "issued_at": _iso(claims.issued_at),
            "databases": None if claims.databases is None else list(claims.databases),
            "scope": claims.scope, "key_id": claims.key_id,
        }).decode() + "\n")
    else:
        ttl_s = claims.expires_at - claims.issued_at
        print(f"token:      {token}")
        print(f"token id:   {claims.token_id}")
        print(f"identity:   {claims.identity} ({claims.scope}, databases: "
              f"{', '.join(claims.databases) if claims.databases else 'all allowed'})")
        print(f"expires at: {_iso(claims.expires_at)} (in {_human(ttl_s)})")
        print(f"dsn:        {url}")
    return 0


def _human(seconds: float) -> str:
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def _revoke(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    arg = args.token.strip()
    expires_at: int | None = None
    if tokens.looks_like_token(arg):
        try:
            claims = tokens.peek(arg)
        except tokens.TokenInvalid as e:
            raise PgguardError(f"cannot read that token: {e.reason}") from None
        token_id, expires_at = claims.token_id, claims.expires_at
    elif arg.count(".") == 2 and arg.startswith("eyJ"):
        try:
            jclaims = oidc.peek_jwt(arg)
        except tokens.TokenInvalid as e:
            raise PgguardError(f"cannot read that JWT: {e.reason}") from None
        token_id = oidc.jwt_token_id(arg, jclaims)
        exp = jclaims.get("exp")
        expires_at = int(exp) if isinstance(exp, (int, float)) else None
    elif tokens._TOKEN_ID.match(arg):
        token_id = arg
    else:
        raise PgguardError(f"{arg[:40]!r} is neither a token id nor a token")
    if expires_at is not None and expires_at <= time.time():
        note = "already expired; recorded anyway"
    else:
        note = "live sessions using it end within a second"
    if cfg.control is not None:
        # a fleet: the control database records it and wakes every instance
        rec = revoke_shared(cfg, token_id, expires_at=expires_at)
    else:
        try:
            rec = revocations.revoke(cfg, token_id, expires_at=expires_at)
        except OSError as e:
            raise PgguardError(f"cannot write {revocations.store_path(cfg)}: "
                               f"{e.strerror or e}") from None
    if args.json:
        sys.stdout.write(orjson.dumps({"token_id": rec.jti, "revoked_at": _iso(rec.at),
                                       "forget_after": _iso(rec.exp)}).decode() + "\n")
    else:
        print(f"revoked {token_id} ({note})")
    return 0


def main(action: str, argv: list[str]) -> int:
    """Run ``pgguard token ACTION ARGV...``; returns the exit code (0 ok, 1 failure, 2 usage).

    Every failure prints one line to stderr naming what is wrong.

    Example: ``main("issue", ["-c", "pgguard.toml", "--identity", "ci-agent", "--json"])``.
    """
    if action not in ("issue", "revoke"):
        print(f"pgguard token: unknown action {action!r} (use issue or revoke)",
              file=sys.stderr)
        return 2
    prog = f"pgguard token {action}"
    try:
        args = _parser(action).parse_args(argv)
    except _UsageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    try:
        return _issue(args) if action == "issue" else _revoke(args)
    except PgguardError as e:
        print(f"{prog}: {e.message}", file=sys.stderr)
        return 1
