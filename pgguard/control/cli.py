# `pgguard control init|status`: set up the control database, list the live instances.
"""pgguard control — the control database shared by a fleet of pgguard instances.

  init     create or migrate the control schema ([control] schema) now; instances do
           the same when they start, so this is for setting it up ahead of time
           (or with a more privileged DSN than the instances get)
  status   the live instances (a heartbeat within [control] instance_ttl): address,
           version, workers, open sessions, statements held for approval

Examples::

    PGGUARD_CONTROL_DSN=postgresql://admin@db/pgguard pgguard control init -c pgguard.toml
    pgguard control status -c pgguard.toml
    pgguard control status -c pgguard.toml --json
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

import orjson

from ..config import load, parse_duration
from ..errors import PgguardError
from . import open_link
from .fleet import live_instances
from .schema import migrate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgguard control", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["init", "status"])
    p.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="the pgguard TOML config file (its [control] section)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


def main(argv: list[str]) -> int:
    """Run ``pgguard control ACTION -c FILE``; 0 ok, 1 failure (one line on stderr)."""
    args = _parser().parse_args(argv)
    try:
        cfg = load(args.config)
        if cfg.control is None:
            raise PgguardError(f"{args.config} has no [control] section")
        link = open_link(cfg, role="cli")
        assert link is not None
        try:
            if args.action == "init":
                version = migrate(link)
                out = {"schema": cfg.control.schema, "version": version}
                if args.json:
                    print(orjson.dumps(out).decode())
                else:
                    print(f"control schema {cfg.control.schema} is at version {version}")
                return 0
            rows = live_instances(link, parse_duration(cfg.control.instance_ttl))
        finally:
            link.close()
    except PgguardError as e:
        print(f"pgguard control: {e.message}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps({"instances": rows}).decode())
        return 0
    if not rows:
        print("no live instances")
        return 0
    cols = ("instance", "address", "version", "workers", "sessions", "pending_approvals",
            "started", "last_seen_s")
    table = [[r["instance"], r["address"], r["version"], r["workers"], r["sessions"],
              r["pending_approvals"],
              datetime.fromtimestamp(r["started_at"], timezone.utc).strftime(
                  "%Y-%m-%dT%H:%M:%SZ"), f'{r["age_seconds"]:.1f}'] for r in rows]
    widths = [max(len(str(x)) for x in [c] + [t[i] for t in table])
              for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(str(x).ljust(w) for x, w in zip(t, widths)))
    return 0
