# `pgguard approvals ...`: list, show, approve and deny held statements through the admin API.
"""List, approve and deny statements held for approval.

Talks to the running proxy's admin API (``[admin] address``/``port``, or ``--url``)
with the token from the environment variable named by ``[admin] token_env``
(default ``PGGUARD_ADMIN_TOKEN``), else from the file ``[admin] token_file`` (the demo
writes one, so these commands work in any terminal).

Examples::

    pgguard approvals -c pgguard.toml list
    pgguard approvals -c pgguard.toml list --json
    pgguard approvals -c pgguard.toml approve 17 --as alice
    pgguard approvals -c pgguard.toml approve 17 --as alice --window 10m
    pgguard approvals -c pgguard.toml deny 17 --as alice --reason "not during the freeze"

``--as NAME`` names the approver, an identity in the config. It may be left out only
when $PGGUARD_APPROVER names one, or your login name is one. Nobody approves their own request; the approver must be in one
of the rule's ``approvers`` groups, or in ``[admin] groups`` when the rule names none.
"""
from __future__ import annotations

import argparse
import getpass
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any, TextIO

import orjson

from ..cliparse import Parser as _Parser, UsageError as _UsageError
from ..config import admin_token, load
from ..errors import PgguardError
from .hold import admin_url


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="pgguard TOML config (admin address, port and token variable)")
    common.add_argument("--url", metavar="URL", default=argparse.SUPPRESS,
                        help="admin server URL, e.g. http://127.0.0.1:6480 (instead of -c)")
    p = _Parser(prog="pgguard approvals", parents=[common], description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("list", parents=[common], help="held statements (pending by default)",
                       description="Held statements, oldest first.\n\n"
                       "  pgguard approvals -c pgguard.toml list --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--json", action="store_true", help="a JSON array of objects on stdout")
    s.add_argument("--state", default="pending",
                   choices=["pending", "decided", "all", "approved", "denied", "timed_out",
                            "withdrawn"], help="which requests (default pending)")
    s.add_argument("--limit", type=int, default=100, metavar="N",
                   help="at most N decided requests (default 100)")

    s = sub.add_parser("show", parents=[common], help="one request in full")
    s.add_argument("id", type=int)
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")

    for name, helptext in (("approve", "run a held statement"),
                           ("deny", "refuse a held statement")):
        s = sub.add_parser(name, parents=[common], help=helptext,
                           description=f"{helptext.capitalize()}.\n\n  pgguard approvals "
                           f"-c pgguard.toml {name} 17 --as alice"
                           + (" --window 10m" if name == "approve" else " --reason \"why\""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("id", type=int, help="the approval number (from list)")
        s.add_argument("--as", dest="approver", metavar="NAME", default=None,
                       help=f"{name} as this identity of the config (default "
                            "$PGGUARD_APPROVER, else your login name when it is one)")
        s.add_argument("--reason", metavar="TEXT", default=None,
                       help="why (the client sees it when denied)")
        if name == "approve":
            s.add_argument("--window", metavar="DURATION", default=None,
                           help="also let the same statement from the same identity through "
                                "for this long (e.g. 10m, 1h)")
        s.add_argument("--json", action="store_true", help="the decided request as JSON")
    return p


class _Client:
    def __init__(self, url: str, token: str | None, token_env: str,
                 token_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.token_env = token_env
        self.token_file = token_file

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if not self.token:
            where = f"environment variable {self.token_env} is not set"
            if self.token_file is None:
                where += " and the config names no [admin] token_file"
            raise PgguardError(f"no admin token: {where}")
        data = None if body is None else orjson.dumps(body)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                msg = orjson.loads(e.read()).get("error") or f"HTTP {e.code}"
            except Exception:
                msg = f"HTTP {e.code} {e.reason}"
            raise PgguardError(msg) from None
        except urllib.error.URLError as e:
            reason = getattr(e.reason, "strerror", None) or str(e.reason)
            raise PgguardError(f"cannot reach the admin server at {self.url}: {reason} "
                               "(is pgguard serve running?)") from None
        except (TimeoutError, OSError) as e:
            raise PgguardError(f"admin server at {self.url}: {e}") from None


def _client(args: argparse.Namespace) -> _Client:
    token_env = "PGGUARD_ADMIN_TOKEN"
    token = os.environ.get(token_env)
    token_file = None
    url = getattr(args, "url", None)
    cfg_path = getattr(args, "config", None)
    if cfg_path is None and url is None and os.path.exists("pgguard.toml"):
        cfg_path = "pgguard.toml"
    if cfg_path is not None:
        cfg = load(cfg_path)
        token_env, token_file = cfg.admin.token_env, cfg.admin.token_file
        token = admin_token(cfg)
        if url is None:
            url = admin_url(cfg)
    if url is None:
        raise PgguardError("say where the proxy is: -c pgguard.toml or --url URL")
    return _Client(url, token, token_env, token_file)


def _approver(args: argparse.Namespace) -> str:
    if args.approver:
        return str(args.approver)
    env = os.environ.get("PGGUARD_APPROVER")
    if env:
        return env
    try:
        return getpass.getuser()
    except Exception:
        raise PgguardError("who approves? pass --as NAME (an identity in the config)") from None


def _ago(iso: str | None) -> str:
    if not iso:
        return ""
    secs = time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    return _dur(secs)


def _dur(secs: float) -> str:
    s = int(abs(secs))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _one_line(sql: str) -> str:
    return " ".join(sql.split())


def _print_table(rows: list[dict[str, Any]], out: TextIO, state: str) -> None:
    if not rows:
        print("no approvals waiting" if state == "pending" else "no approvals", file=out)
        return
    pending = state == "pending"
    head = ["ID", "AGE", "EXPIRES", "IDENTITY", "DATABASE", "RULE"] if pending else \
        ["ID", "STATE", "WHEN", "IDENTITY", "DATABASE", "RULE", "BY"]
    table = []
    for r in rows:
        if pending:
            left = -(time.time() - datetime.fromisoformat(
                r["expires_at"].replace("Z", "+00:00")).timestamp())
            cells = [str(r["id"]), _ago(r["requested_at"]), "in " + _dur(max(0, left)),
                     r["identity"], r["database"], r["rule"]]
        else:
            cells = [str(r["id"]), r["state"], _ago(r["decided_at"]) + " ago"
                     if r["decided_at"] else "", r["identity"], r["database"], r["rule"],
                     r["approver"] or ""]
        table.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(head)]
    width = shutil.get_terminal_size((120, 20)).columns
    used = sum(widths) + 2 * len(widths)
    room = max(20, width - used - 9)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  STATEMENT", file=out)
    for cells, r in zip(table, rows):
        sql = _one_line(r["statement"])
        if len(sql) > room and out.isatty():
            sql = sql[:room - 1] + "…"
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + sql, file=out)


def _print_request(r: dict[str, Any], out: TextIO) -> None:
    for key in ("id", "state", "identity", "database", "rule", "classification",
                "approvers", "requested_at", "expires_at", "decided_at", "approver",
                "reason", "window_seconds", "session_id"):
        value = r.get(key)
        if value is None or value == []:
            continue
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key + ':':16}{value}", file=out)
    print(f"{'statement:':16}{r['statement']}", file=out)


def _cmd_list(args: argparse.Namespace, api: _Client, out: TextIO) -> int:
    rows = api.call("GET", f"/api/approvals?state={args.state}&limit={args.limit}")
    if args.json:
        out.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_table(rows, out, args.state)
    return 0


def _cmd_show(args: argparse.Namespace, api: _Client, out: TextIO) -> int:
    r = api.call("GET", f"/api/approvals/{args.id}")
    if args.json:
        out.write(orjson.dumps(r).decode() + "\n")
    else:
        _print_request(r, out)
    return 0


def _cmd_decide(args: argparse.Namespace, api: _Client, out: TextIO) -> int:
    body: dict[str, Any] = {"approver": _approver(args)}
    if args.reason:
        body["reason"] = args.reason
    if getattr(args, "window", None):
        body["window"] = args.window
    try:
        r = api.call("POST", f"/api/approvals/{args.id}/{args.cmd}", body)
    except PgguardError as e:
        if args.approver or "unknown approver" not in e.message:
            raise
        raise PgguardError(f"{e.message} (without --as the approver is $PGGUARD_APPROVER, "
                           "else your login name; pass --as NAME)") from None
    if args.json:
        out.write(orjson.dumps(r).decode() + "\n")
        return 0
    line = f"approval #{r['id']} {r['state']} by {r['approver']}"
    if r.get("window_seconds"):
        line += (f"; {r['identity']} may repeat this statement for "
                 f"{_dur(r['window_seconds'])}")
    print(line, file=out)
    return 0


_COMMANDS = {"list": _cmd_list, "show": _cmd_show, "approve": _cmd_decide,
             "deny": _cmd_decide}


def main(argv: list[str], out: TextIO | None = None) -> int:
    """Entry point of ``pgguard approvals``; *argv* is everything after ``approvals``.

    Returns the exit status; every failure prints one line on stderr.
    Example: ``main(["-c", "pgguard.toml", "approve", "17", "--as", "alice"])``.
    """
    out = out or sys.stdout
    try:
        args = _build_parser().parse_args(argv)
    except _UsageError as e:
        print(f"pgguard approvals: {e} (see pgguard approvals --help)", file=sys.stderr)
        return 2
    except SystemExit as e:     # --help
        return int(e.code or 0)
    try:
        return _COMMANDS[args.cmd](args, _client(args), out)
    except PgguardError as e:
        print(f"pgguard approvals {args.cmd}: {e.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
