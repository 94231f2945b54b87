# The `pgguard` command: argparse front; each subcommand lives with its concern.
"""pgguard — a Postgres proxy that guards a production database from AI agents.

Examples::

    pgguard demo
    pgguard serve -c pgguard.toml --workers 2
    pgguard check -c pgguard.toml
    pgguard explain -c pgguard.toml --identity ci-agent "DROP INDEX orders_pkey"
    pgguard policy replay -c candidate.toml --since 7d

Without an active virtualenv, run it from a clone as ./dev pgguard ... (same arguments).
"""
from __future__ import annotations

import argparse
import os
import sys

from . import config
from .errors import ConfigError, PgguardError
from .policy import explain, replay


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-c", "--config", required=required, metavar="FILE",
                   help="the pgguard TOML config file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgguard", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="embedded Postgres + sample data + sample policy + proxy")
    p.add_argument("--port", type=int, default=6432, help="proxy port (default 6432)")
    p.add_argument("--dir", default=None,
                   help="where the demo keeps its database and files (default: ./pgguard-demo)")

    p = sub.add_parser("serve", help="run the proxy")
    _add_config(p)
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the port with SO_REUSEPORT (default 1)")

    p = sub.add_parser("check", help="validate a config; errors name the key path")
    _add_config(p)

    p = sub.add_parser("explain", help="show how a statement is classified and decided",
                       description=explain.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config(p)
    p.add_argument("--identity", default=None, help="decide as this identity")
    p.add_argument("--database", default=None, help="decide for this database")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--check", action="store_true",
                   help="exit 3 when the text would be blocked, 4 when held for approval "
                        "(CI gating); without it the exit status is 0 once explained")
    p.add_argument("sql", help="the SQL text")

    replay.add_parser(sub)

    p = sub.add_parser(
        "token", help="issue or revoke short-lived agent tokens",
        description="Issue and revoke short-lived pgguard tokens; "
                    "'pgguard token issue --help' and 'pgguard token revoke --help' "
                    "tell more.")
    p.add_argument("action", choices=["issue", "revoke"], metavar="{issue,revoke}", nargs="?",
                   help="issue: a token for an identity (-c FILE --identity NAME "
                        "[--ttl 15m] [--database DB] [--json]); revoke: by token id or "
                        "token (-c FILE ID)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    p = sub.add_parser("approvals", help="list, approve or deny held statements")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("control", help="a fleet's control database: init | status")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("audit", help="query and verify the audit log (DuckDB)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    # the detectors compile as serve compiles them (an unknown name, a bad pattern)
    from .masking.detectors import DetectorSet  # why: Hyperscan loads only when checking
    try:
        DetectorSet.from_config(cfg.detectors.builtin, cfg.detectors.custom)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    # secret files must exist; unset env vars are only a warning (they may be set
    # where the proxy runs, not where the config is checked)
    secrets = [("upstream", cfg.upstream.password_env, cfg.upstream.password_file)]
    secrets += [(f"identities.{n}", i.password_env, i.password_file)
                for n, i in cfg.identities.items()]
    if cfg.control is not None:
        secrets.append(("control.dsn_env", cfg.control.dsn_env, None))
    if cfg.listen.cancel_key_env:
        secrets.append(("listen.cancel_key_env", cfg.listen.cancel_key_env, None))
    for name in cfg.identities:
        try:
            config.identity_secret(cfg, name)
        except ConfigError as e:
            if "is not set" not in str(e):      # (an unset variable: warned below)
                raise ConfigError(f"{args.config}: {e}") from None
    for key, env, file in secrets:
        if file:
            try:
                config.read_secret(cfg, None, file, key)
            except ConfigError as e:
                raise ConfigError(f"{args.config}: {e}") from None
        elif env and env not in os.environ:
            print(f"pgguard check: warning: {key}: environment variable {env} is not set",
                  file=sys.stderr)
    _check_serve_would_refuse(cfg, args.config)
    print(f"{args.config}: ok ({len(cfg.identities)} identities, {len(cfg.rules)} rules, "
          f"{len(cfg.masks)} masks)")
    return 0


def _check_serve_would_refuse(cfg, path: str) -> None:
    """What serve refuses (or runs without) that the config file alone tells: the same
    errors and warnings, at check time."""
    from .auth import tokens  # why: the token module loads only where tokens are used
    from .proxy.server import _same_port  # why: serve's own test, loaded for check only
    a, ln = cfg.admin, cfg.listen
    if (a.token_env or a.token_file) and _same_port(cfg):
        raise ConfigError(f"{path}: admin.port: {a.port} is listen.port too (the proxy and "
                          "the admin page need a port each)")
    for key in ("tls_cert", "tls_key"):
        name = getattr(ln, key)
        if name:
            f = name if os.path.isabs(name) else os.path.join(cfg.base_dir, name)
            if not os.path.isfile(f):
                raise ConfigError(f"{path}: listen.{key}: no such file {f}")
    keys_ready = False
    for kid in cfg.auth.key_ids():
        try:
            tokens.load_key(cfg, kid)
            keys_ready = True
        except ConfigError as e:
            if "is not set" not in str(e):
                raise ConfigError(f"{path}: {e}") from None
            print(f"pgguard check: warning: {e}", file=sys.stderr)
    tokens_only = [n for n, i in cfg.identities.items()
                   if not i.password_env and not i.password_file]
    if tokens_only and not keys_ready and cfg.auth.oidc is None:
        print(f"pgguard check: warning: {', '.join(tokens_only)} can log in only with "
              "tokens, and no token key is set here (auth.token_secret_env names the "
              "variable serve reads): their logins fail until it is set",
              file=sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .proxy import server  # why: the proxy and its dependencies load for serve only
    cfg = config.load(args.config)
    return server.run(cfg, workers=args.workers)


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo  # why: the demo and the proxy load for demo only
    return demo.main(port=args.port, directory=args.dir)


def _cmd_explain(args: argparse.Namespace) -> int:
    return explain.main(args)


def _cmd_policy(args: argparse.Namespace) -> int:
    return replay.main(args)


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import cli as audit_cli  # why: duckdb and pyarrow load for audit only
    return audit_cli.main(args.rest)


def _cmd_approvals(args: argparse.Namespace) -> int:
    from .approvals import cli as approvals_cli  # why: each command loads its own
    return approvals_cli.main(args.rest)


def _cmd_control(args: argparse.Namespace) -> int:
    from .control import cli as control_cli  # why: each command loads its own
    return control_cli.main(args.rest)


def _cmd_token(args: argparse.Namespace) -> int:
    if args.action is None:
        print("pgguard token: say what to do: issue or revoke (pgguard token --help)",
              file=sys.stderr)
        return 2
    from .auth import cli as token_cli  # why: each command loads its own
    return token_cli.main(args.action, args.rest)


def _not_yet(args: argparse.Namespace) -> int:
    raise PgguardError(f"'pgguard {args.command}' is not available in this build yet")


_COMMANDS = {
    "check": _cmd_check,
    "serve": _cmd_serve,
    "demo": _cmd_demo,
    "explain": _cmd_explain,
    "policy": _cmd_policy,
    "audit": _cmd_audit,
    "token": _cmd_token,
    "approvals": _cmd_approvals,
    "control": _cmd_control,
}


# subcommands that parse their own options (so `pgguard audit -c FILE sql ...` works)
_PASS_THROUGH = {"audit", "approvals", "control"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _PASS_THROUGH and not {"-h", "--help"} & set(argv[:1]):
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except PgguardError as e:
        print(f"pgguard {args.command}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): quietly, as other command-line tools do (and
        # without a second error when Python flushes stdout at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
