# `pgguard policy replay`: a candidate config's policy over the recorded audit log.
"""Decide the statements of the audit log again under a candidate config's policy and
show which would now be decided differently.

Usage::

    pgguard policy replay -c candidate.toml [--since 7d] [--until WHEN]
                          [--identity NAME] [--audit-dir DIR] [--examples N] [--json]

The audit log read is the candidate's ``[audit] dir`` (a copy of the production config
edited in place keeps it), with its ``[audit] store`` when it names one (every
instance's records), or ``--audit-dir``. Every ``statement`` record in the period is
decided again, uncached, by the candidate's rules for the identity, kind, groups and
database it was recorded with; the recorded outcome and the new one are compared as
``allowed`` (allowed, approved by a standing grant, or failed upstream), ``blocked`` and
``approval`` (held: approved, denied, timed out or withdrawn). Changes are grouped by the
transition and the rule that decides now (or decided before, for ``-> allowed``) with a
count, the identities and a few example statements.

What the replay cannot know, so it says so rather than guess:

- Statements are stored normalized (literals become ``$1``, ``$2`` ...) unless the audit
  was recorded with ``[audit] capture_literals = true``; then the raw text is decided.
  From normalized text, decisions that depend on a literal can differ from what the
  proxy decided: a constant-true ``WHERE 1 = 1`` (destructive) reads as ``WHERE $1 = $2``,
  ``set_config('role', ...)`` and ``SET name = value`` lose their value. A changed
  record is counted as ``literal_dependent`` when its text holds a ``$n`` and the
  classifier could not prove that its decision reads no literal's value.
- A normalized text that no longer parses (a ``$n`` where Postgres takes no
  parameter) is counted under ``not_replayed`` rather than reported as a new refusal.
- Refusals made at run time, not by the rules: ``blast-radius`` (a measured row count),
  ``readonly-scope`` (a token's scope), ``pinned-role``, ``masking``, ``encoding``. Their
  records are counted (``not_replayed``) and left out of the comparison.
- Views are not resolved (no upstream catalog): rules on a view's base tables see the
  view's name only.
- Identities the candidate does not define are counted apart (``unknown_identities``).

Exit status 0 (a change is an answer, not a failure); 1 when the command failed.
Example::

    $ pgguard policy replay -c candidate.toml --since 7d --identity ci-agent
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import msgspec

from ..config import Config, instance_name, load
from ..errors import PgguardError
from .rules import PolicyEngine

__all__ = ["RUNTIME_RULES", "main", "outcome_of_record", "replay"]

UTC = timezone.utc

# rules the proxy applies at run time, outside PolicyEngine.decide: not replayable
RUNTIME_RULES = frozenset({"blast-radius", "readonly-scope", "pinned-role", "masking",
                           "encoding"})
UNPARSEABLE = "normalized text does not parse"
_HELD = frozenset({"approved", "denied", "timed_out", "withdrawn"})
_PARAM = re.compile(r"\$\d+")
_ACTION_OUTCOME = {"allow": "allowed", "block": "blocked", "approve": "approval"}


def outcome_of_record(decision: str | None, approver: str | None) -> str | None:
    """The recorded outcome class of a statement record: allowed | blocked | approval
    (None for records with no policy decision)."""
    if decision in ("allowed", "error"):
        return "allowed"
    if decision == "blocked":
        return "blocked"
    if decision in _HELD:
        return "approval"
    return None


def _records(root: Path, since: datetime, until: datetime,
             identity: str | None, store: str | None = None,
             instance: str | None = None) -> list[dict[str, Any]]:
    # why: duckdb and pyarrow are heavy: loaded only when the log is read
    from ..audit.query import open_audit, rows_as_dicts
    from ..audit.store import Store  # why: pyarrow, as above
    if store is None and not root.is_dir():
        raise PgguardError(f"no audit log at {root}")
    # with [audit] store: every instance's records in the store, and this one's local rest
    con, _ = open_audit(root, store=Store.open(store) if store else None, instance=instance)
    params: list = [since, until]
    sql = ("SELECT ts, identity, database, statement, decision, rule, approver "
           "FROM audit WHERE event = 'statement' AND statement IS NOT NULL "
           "AND ts >= ? AND ts < ?")
    if identity is not None:
        sql += " AND identity = ?"
        params.append(identity)
    return rows_as_dicts(con, sql + " ORDER BY ts", params)


def replay(cfg: Config, records: list[dict[str, Any]], *, examples: int = 3,
           literals_captured: bool | None = None) -> dict[str, Any]:
    """Compare each record's outcome with the candidate policy's; the JSON-ready summary.

    Example::

        >>> rep = replay(load("candidate.toml"), [{"identity": "ci-agent",  # doctest: +SKIP
        ...     "database": "shop", "statement": "DROP TABLE t", "decision": "allowed",
        ...     "rule": "allow-all", "approver": None}])
        >>> rep["changes"][0]["transition"]                                 # doctest: +SKIP
        'allowed -> blocked'
    """
    engine = PolicyEngine(cfg)
    cache: dict[tuple, tuple[str, str, bool]] = {}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    unknown: dict[str, int] = defaultdict(int)
    not_replayed: dict[str, int] = defaultdict(int)
    replayed = unchanged = literal_dependent = 0
    captured = cfg.audit.capture_literals if literals_captured is None else literals_captured
    for r in records:
        old = outcome_of_record(r.get("decision"), r.get("approver"))
        if old is None:
            continue
        if r.get("rule") in RUNTIME_RULES:
            not_replayed[r["rule"]] += 1
            continue
        name = r.get("identity")
        ident = cfg.identities.get(name) if name else None
        if ident is None:
            unknown[name or "(none)"] += 1
            continue
        key = (name, r.get("database") or "", r["statement"])
        hit = cache.get(key)
        if hit is None:
            d = engine.decide_uncached(r["statement"], name, ident, key[1])
            looked = any(st.literal_dependent for st in d.statements)
            hit = cache[key] = (_ACTION_OUTCOME.get(d.action, "blocked"), d.rule, looked)
        new, new_rule, looked = hit
        if new_rule == "parse-error" and old != "blocked" and not captured \
                and _PARAM.search(r["statement"]):
            # a $n where Postgres takes no parameter: an artifact of normalizing
            not_replayed[UNPARSEABLE] += 1
            continue
        replayed += 1
        if new == old:
            unchanged += 1
            continue
        # a normalized text whose classification may have read a literal's value
        dependent = not captured and looked and bool(_PARAM.search(r["statement"]))
        literal_dependent += dependent
        transition = f"{old} -> {new}"
        rule = (r.get("rule") or "(none)") if new == "allowed" else new_rule
        g = groups.get((transition, rule))
        if g is None:
            g = groups[(transition, rule)] = {
                "transition": transition, "rule": rule,
                "rule_was": None, "rule_now": None,
                "count": 0, "identities": [], "examples": [], "literal_dependent": 0}
        g["count"] += 1
        g["literal_dependent"] += dependent
        if name not in g["identities"]:
            g["identities"].append(name)
        if new != "allowed":
            g["rule_was"] = g["rule_was"] or r.get("rule")
        else:
            g["rule_now"] = new_rule
        if len(g["examples"]) < examples and not any(
                e["statement"] == r["statement"] for e in g["examples"]):
            ts = r.get("ts")
            g["examples"].append({
                "ts": ts.isoformat() if isinstance(ts, datetime) else ts,
                "identity": name, "database": r.get("database"),
                "statement": r["statement"], "decision_was": r.get("decision")})
    changes = sorted(groups.values(), key=lambda g: (-g["count"], g["transition"], g["rule"]))
    return {
        "records": len(records), "replayed": replayed, "unchanged": unchanged,
        "changed": replayed - unchanged, "literal_dependent": literal_dependent,
        "statements_text": "raw (capture_literals)" if captured else
                           "normalized (literals as $n)",
        "not_replayed": dict(not_replayed), "unknown_identities": dict(unknown),
        "changes": changes,
    }


def _print(rep: dict[str, Any], out: TextIO, since: datetime, until: datetime) -> None:
    w = out.write
    w(f"replayed {rep['replayed']} of {rep['records']} recorded statements "
      f"({since:%Y-%m-%d %H:%M} .. {until:%Y-%m-%d %H:%M} UTC) under the candidate policy: "
      f"{rep['changed']} would be decided differently, {rep['unchanged']} the same\n")
    if rep["statements_text"].startswith("normalized"):
        w("statements are stored normalized (literals as $1, $2 ...): a decision that "
          "depends on a literal (WHERE 1 = 1, set_config('role', ...), SET values) may "
          "differ from the proxy's; record with [audit] capture_literals = true to "
          "replay the raw text\n")
    if rep["not_replayed"]:
        parts = ", ".join(f"{n} {'' if k == UNPARSEABLE else 'refused by '}{k}"
                          for k, n in sorted(rep["not_replayed"].items()))
        w(f"not replayed (decided at run time, not by the rules, or unparseable once "
          f"normalized): {parts}\n")
    if rep["unknown_identities"]:
        parts = ", ".join(f"{k} ({n})" for k, n in sorted(rep["unknown_identities"].items()))
        w(f"not replayed (identity not in the candidate config): {parts}\n")
    for g in rep["changes"]:
        was = (f"; rule was {g['rule_was']}" if g.get("rule_was") else
               f"; rule now {g['rule_now']}" if g.get("rule_now") else "")
        lit = (f"; {g['literal_dependent']} with literals normalized away"
               if g["literal_dependent"] else "")
        label = "rule" if g["transition"].endswith(("blocked", "approval")) else "was rule"
        w(f"\n{g['transition']}  {label} {g['rule']}: {g['count']} statement"
          f"{'s' if g['count'] != 1 else ''} ({', '.join(g['identities'])}{was}{lit})\n")
        for e in g["examples"]:
            text = " ".join(e["statement"].split())
            if len(text) > 120:
                text = text[:117] + "..."
            w(f"    {e['identity']}: {text}\n")
    if not rep["changes"]:
        w("no statement would be decided differently\n")


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Entry point of ``pgguard policy replay``; see the module docstring."""
    # why: duckdb and pyarrow are heavy: loaded only when the log is read
    from ..audit.query import parse_when
    out = out or sys.stdout
    cfg = load(args.config)
    now = datetime.now(UTC)
    since = parse_when(args.since, now)
    until = parse_when(args.until, now) if getattr(args, "until", None) else now
    if since >= until:
        raise PgguardError("--since must be before --until")
    root = Path(args.audit_dir) if getattr(args, "audit_dir", None) else Path(cfg.audit.dir)
    if not root.is_absolute():
        root = (Path.cwd() if getattr(args, "audit_dir", None) else Path(cfg.base_dir)) / root
    if args.identity is not None and args.identity not in cfg.identities:
        known = ", ".join(sorted(cfg.identities)) or "none configured"
        raise PgguardError(f"unknown identity {args.identity!r} (known: {known})")
    store = None if getattr(args, "audit_dir", None) else cfg.audit.store
    records = _records(root, since, until, args.identity, store, instance_name(cfg))
    rep = replay(cfg, records, examples=args.examples)
    rep.update(since=since.isoformat(), until=until.isoformat(), audit_dir=str(root))
    if args.json:
        out.write(msgspec.json.encode(rep).decode() + "\n")
    else:
        _print(rep, out, since, until)
    return 0


def add_parser(sub: Any) -> None:
    """The ``policy`` command and its ``replay`` subcommand, on ``pgguard``'s parser."""
    p = sub.add_parser("policy", help="try a candidate policy on the recorded traffic")
    psub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    psub.required = True
    r = psub.add_parser("replay", help="which past statements a candidate config would "
                        "decide differently", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="the candidate pgguard TOML config")
    r.add_argument("--since", default="7d", metavar="WHEN",
                   help="a duration back from now (7d, 12h) or a date (default 7d)")
    r.add_argument("--until", default=None, metavar="WHEN", help="end of the period")
    r.add_argument("--identity", default=None, metavar="NAME",
                   help="only this identity's statements")
    r.add_argument("--audit-dir", default=None, metavar="DIR",
                   help="the audit log to read (default: the candidate's [audit] dir)")
    r.add_argument("--examples", type=int, default=3, metavar="N",
                   help="example statements per group (default 3)")
    r.add_argument("--json", action="store_true", help="one JSON object on stdout")
