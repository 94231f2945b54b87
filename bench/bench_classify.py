# Per-statement cost of policy classification and decisions, uncached and cached.
"""Per-statement cost of pgguard's policy layer, in microseconds.

For a simple SELECT (pgbench -S), a 5-way join, an INSERT and an UPDATE (pgbench's
TPC-B statements) it measures, in one process:

- ``parse``: pglast ``parse_sql_json`` alone (the floor: the real Postgres parser);
- ``fingerprint``: pglast ``fingerprint``, for comparison (not used as a cache key);
- ``classify``: :func:`pgguard.policy.classify.classify`, uncached;
- ``decide miss``: ``PolicyEngine.decide_uncached`` (classify + rules + decision);
- ``exact hit``: ``decide`` on a text seen before;
- ``shape hit``: ``decide`` on a text seen before with other literals (pgbench traffic).

Each figure is the best of ``--repeat`` timing loops of ``--number`` calls (the least
disturbed by other work on the machine), and the table gives the ratio against the issue's
target of 8 µs for an uncached simple statement (``classify / 8 µs``: at most 1.00 is on
target). Example::

    /tmp/venv/bin/python bench/bench_classify.py
    /tmp/venv/bin/python bench/bench_classify.py --number 20000 --repeat 9 --json classify.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pglast import parser as pg  # noqa: E402

from pgguard.config import Identity, loads  # noqa: E402
from pgguard.policy import PolicyEngine  # noqa: E402
from pgguard.policy.classify import classify  # noqa: E402

TARGET_US = 8.0

# name -> template; {n} and {m} take fresh literals for the shape-hit run
STATEMENTS = {
    "simple select": "SELECT abalance FROM pgbench_accounts WHERE aid = {n}",
    "5-way join": (
        "SELECT o.id, c.name, p.title, s.status, w.city FROM orders o "
        "JOIN customers c ON c.id = o.customer_id JOIN products p ON p.id = o.product_id "
        "JOIN shipments s ON s.order_id = o.id JOIN warehouses w ON w.id = s.warehouse_id "
        "WHERE o.id = {n} AND s.status <> 'lost'"),
    "insert": ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
               "VALUES ({m}, {m}, {n}, {m}, CURRENT_TIMESTAMP)"),
    "update": "UPDATE pgbench_accounts SET abalance = abalance + {m} WHERE aid = {n}",
}


def best_us(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def measure(template: str, number: int, repeat: int) -> dict[str, float]:
    sql = template.format(n=42, m=7)
    engine = PolicyEngine(loads(""))
    agent = Identity(kind="agent")
    out = {
        "parse": best_us(lambda: pg.parse_sql_json(sql), number, repeat),
        "fingerprint": best_us(lambda: pg.fingerprint(sql), number, repeat),
        "classify": best_us(lambda: classify(sql), number, repeat),
        "decide miss": best_us(
            lambda: engine.decide_uncached(sql, "bench", agent, "bench"), number, repeat),
    }
    engine.decide(sql, "bench", agent, "bench")
    out["exact hit"] = best_us(lambda: engine.decide(sql, "bench", agent, "bench"),
                               number, repeat)
    # a new literal on every call, like pgbench: served by the shape cache
    fresh = (template.format(n=i, m=i % 97 + 1)
             for i in itertools.count(1000))
    texts = [next(fresh) for _ in range(number * repeat + 1)]
    it = iter(texts)
    engine.decide(next(it), "bench", agent, "bench")
    hits0 = engine.cache.hits_shape
    out["shape hit"] = best_us(lambda: engine.decide(next(it), "bench", agent, "bench"),
                               number, repeat)
    out["shape hit rate"] = (engine.cache.hits_shape - hits0) / (number * repeat)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=10_000, help="calls per timing loop")
    ap.add_argument("--repeat", type=int, default=7, help="timing loops; the best is kept")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"pgguard policy classification, best of {args.repeat} x {args.number} calls; "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs, load {load:.2f}")
    results = {name: measure(t, args.number, args.repeat) for name, t in STATEMENTS.items()}

    cols = ["parse", "fingerprint", "classify", "decide miss", "exact hit", "shape hit"]
    head = f"{'statement':<14}" + "".join(f"{c:>13}" for c in cols) + f"{'classify/8µs':>14}"
    print()
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        ratio = r["classify"] / TARGET_US
        print(f"{name:<14}" + "".join(f"{r[c]:>11.2f}µs" for c in cols) + f"{ratio:>14.2f}")
    print()
    simple = results["simple select"]
    print(f"classify - parse (pgguard's own work on the simple select): "
          f"{simple['classify'] - simple['parse']:.2f} µs")
    for name, r in results.items():
        print(f"{name}: decide miss / exact hit = {r['decide miss'] / r['exact hit']:.0f}x, "
              f"decide miss / shape hit = {r['decide miss'] / r['shape hit']:.1f}x, "
              f"shape hit rate {r['shape hit rate']:.0%}")
    ok = simple["classify"] <= TARGET_US
    print(f"\ntarget: uncached simple statement <= {TARGET_US:.0f} µs: "
          f"{'met' if ok else 'NOT met'} ({simple['classify']:.2f} µs); "
          f"cache hit <= 2 µs: exact {simple['exact hit']:.2f} µs, "
          f"shape {simple['shape hit']:.2f} µs")
    if args.json:
        Path(args.json).write_text(json.dumps({"load": load, "number": args.number,
                                               "repeat": args.repeat, "target_us": TARGET_US,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
