# `pgguard explain`: show how a SQL text is classified and which rule decides it.
"""Show how pgguard classifies a SQL text and which rule decides it.

Usage::

    pgguard explain -c pgguard.toml [--identity NAME] [--json] [--check] "SQL"

For every statement: its kind (and the kinds it runs inside), relations written and
read, functions called, flags with the reason for each, the rule that matched and its
verdict; then the decision for the whole text, with the message, detail and hint a
refused client would see (SQLSTATE 42501).

Without ``--identity`` the text is decided as a generic agent: an identity of kind
``agent`` with no groups, so rules naming identities or groups do not apply. The database
is the first of ``[upstream] databases`` when the config lists some (else none), or
``--database`` when the command line offers it.

``--json`` prints one JSON object: ``sql``, ``identity``, ``database``, ``decision``
(allow | block | approve), ``rule``, ``message``, ``detail``, ``hint``, ``max_rows`` (the
blast-radius limit, null for none) and ``statements`` (each with ``kind``, ``kinds``,
``text``, ``relations_written``, ``relations_read``, ``functions``, ``flags``, ``reasons``
[{flag, text}], ``settings`` [[name, value]], ``changes_rows``, ``counted_by_tag``,
``rule``, ``action``).

Exit status: 0 when it explained, whatever the decision (a refusal is an answer, not a
failure); 1 the command itself failed (bad config, unknown identity). With ``--check``
(for CI gating) the decision sets it: 0 the text would be allowed; 3 it would be blocked
(including parse errors); 4 it would wait for an approval. Examples::

    $ pgguard explain -c pgguard.toml --identity ci-agent "DROP INDEX orders_pkey"
    $ pgguard explain -c pgguard.toml --json "DELETE FROM orders WHERE 1 = 1" | jq .rule
    $ pgguard explain -c pgguard.toml --check "SELECT * FROM orders" && echo allowed
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import msgspec

from ..config import Identity, load
from ..errors import ConfigError, PgguardError
from .rules import Decision, PolicyEngine

__all__ = ["main", "explain", "EXIT_ALLOW", "EXIT_BLOCK", "EXIT_APPROVE"]

EXIT_ALLOW, EXIT_BLOCK, EXIT_APPROVE = 0, 3, 4
GENERIC_AGENT = "(generic agent)"


def explain(engine: PolicyEngine, sql: str, identity_name: str | None,
            database: str) -> tuple[Decision, dict[str, Any]]:
    """Decide ``sql`` uncached and return the decision and its JSON-ready report.

    Example::

        >>> d, report = explain(PolicyEngine(cfg), "SELECT 1", None, "app")  # doctest: +SKIP
        >>> report["decision"], report["statements"][0]["kind"]             # doctest: +SKIP
        ('allow', 'select')
    """
    cfg = engine.cfg
    if identity_name is None:
        ident = Identity(kind="agent")
        name = GENERIC_AGENT
    else:
        ident = cfg.identities.get(identity_name)
        if ident is None:
            known = ", ".join(sorted(cfg.identities)) or "none configured"
            raise PgguardError(f"unknown identity {identity_name!r} (known: {known})")
        name = identity_name
    d = engine.decide_uncached(sql, name, ident, database)
    stmts = []
    for i, st in enumerate(d.statements):
        v = d.verdicts[i] if i < len(d.verdicts) else None
        stmts.append({
            "kind": st.kind, "kinds": list(st.kinds), "text": st.text,
            "relations_written": list(st.relations_written),
            "relations_read": list(st.relations_read), "functions": list(st.functions),
            "flags": list(st.flags),
            "reasons": [{"flag": r.flag, "text": r.text} for r in st.reasons],
            "settings": [list(x) for x in st.settings], "changes_rows": st.changes_rows,
            "counted_by_tag": st.counted_by_tag,
            "rule": v.rule if v else d.rule, "action": v.action if v else d.action,
        })
    report = {
        "sql": sql, "identity": name, "identity_kind": ident.kind, "database": database,
        "decision": d.action, "rule": d.rule, "message": d.message, "detail": d.detail,
        "hint": d.hint, "max_rows": d.max_rows, "statements": stmts,
    }
    if d.position is not None:
        report["position"] = d.position
    return d, report


def _print_table(report: dict[str, Any], out: TextIO) -> None:
    w = out.write
    w(f"identity: {report['identity']} ({report['identity_kind']})   "
      f"database: {report['database'] or '-'}\n")
    for i, st in enumerate(report["statements"], 1):
        text = " ".join(st["text"].split())
        if len(text) > 100:
            text = text[:97] + "..."
        w(f"\nstatement {i}: {text}\n")
        rows = [
            ("kind", st["kind"] + (f" (runs {', '.join(st['kinds'][1:])})"
                                   if len(st["kinds"]) > 1 else "")),
            ("writes", ", ".join(st["relations_written"]) or "-"),
            ("reads", ", ".join(st["relations_read"]) or "-"),
            ("functions", ", ".join(st["functions"]) or "-"),
            ("flags", ", ".join(st["flags"]) or "-"),
            ("settings", ", ".join(n if v is None else f"{n} = {v}"
                                   for n, v in st["settings"]) or "-"),
            ("rows", ("changes rows" + (", counted by the command tag"
                                        if st["counted_by_tag"] else ""))
             if st["changes_rows"] else "-"),
        ]
        for label, value in rows:
            w(f"  {label:<10} {value}\n")
        for r in st["reasons"]:
            w(f"  {'':<10}   {r['flag']}: {r['text']}\n")
        w(f"  {'rule':<10} {st['rule']}\n")
        w(f"  {'verdict':<10} {st['action']}\n")
    w("\n")
    action = report["decision"].upper()
    w(f"decision: {action} (rule \"{report['rule']}\")\n")
    if report.get("max_rows") is not None:
        w(f"  row limit: {report['max_rows']} rows per statement that updates or deletes\n")
    if report["message"]:
        w(f"  ERROR:  {report['message']}\n")
        if report["detail"]:
            w(f"  DETAIL: {report['detail']}\n")
        if report["hint"]:
            w(f"  HINT:   {report['hint']}\n")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``pgguard explain``; see the module docstring for output and exit."""
    cfg = load(args.config)
    database = getattr(args, "database", None)
    if database is None:
        dbs = cfg.upstream.databases
        ident = cfg.identities.get(args.identity) if args.identity else None
        if ident is not None and ident.databases:
            dbs = [d for d in (dbs or ident.databases) if d in ident.databases]
        database = dbs[0] if dbs else ""
    elif cfg.upstream.databases is not None and database not in cfg.upstream.databases:
        raise ConfigError(f"--database {database!r}: not in upstream.databases (the proxy "
                          "refuses sessions to it)")
    else:
        ident = cfg.identities.get(args.identity) if args.identity else None
        if ident is not None and ident.databases is not None and \
                database not in ident.databases:
            raise ConfigError(f"--database {database!r}: identity {args.identity!r} may not "
                              f"use it (identities.{args.identity}.databases)")
    engine = PolicyEngine(cfg)
    d, report = explain(engine, args.sql, args.identity, database)
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        _print_table(report, sys.stdout)
    sys.stdout.flush()
    if d.action == "allow" or not getattr(args, "check", False):
        return EXIT_ALLOW
    return EXIT_APPROVE if d.action == "approve" else EXIT_BLOCK
