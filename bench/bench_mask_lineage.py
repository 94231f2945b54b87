# First-execution latency of a new statement shape with masks on: the lineage step.
"""Latency of statements through pgguard when masking has to ask the planner first.

Starts a throwaway Postgres (tests/pgcluster.py) and a pgguard in front of it with two
masks (``customers.email``, ``customers.ssn``), then times, with psycopg (extended
protocol, as agents' clients send), ``--shapes`` statements that each have a shape never
seen before (a new column alias: identifiers are part of the shape), one at a time:

- ``first (masks)``: the first execution of a new shape through pgguard with masks: the
  statement is held while its lineage is read from the planner on a side connection
  (EXPLAIN (VERBOSE, FORMAT JSON) of the generic plan, in a rolled-back READ ONLY
  transaction), then runs;
- ``again (masks)``: the same statement once more (lineage cached: no side trip);
- ``same shape, new literal``: a new literal in a known shape (shape cache);
- ``first (no masks)``: a new shape through a pgguard without masks (relay only);
- ``direct``: the statement straight to Postgres.

p50 / p99 / mean in milliseconds. Example::

    /work/main/.venv/bin/python bench/bench_mask_lineage.py --shapes 300
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psycopg

MASKS = """
[[masks]]
column = "public.customers.email"
strategy = "email"

[[masks]]
column = "public.customers.ssn"
strategy = "redact"
"""

TEMPLATES = [
    "SELECT id, replace(ssn, '-', '') AS c{i} FROM customers WHERE id < {n}",
    "SELECT id AS c{i}, name, upper(email) FROM customers WHERE id < {n} ORDER BY id",
    ("WITH x{i} AS (SELECT id, email FROM customers) SELECT id, lower(email) FROM x{i} "
     "WHERE id < {n}"),
    "SELECT count(*) AS c{i}, max(length(ssn)) FROM customers WHERE id < {n}",
    ("SELECT c{i}.id, o.total FROM customers c{i} JOIN orders o ON o.cust_id = c{i}.id "
     "WHERE c{i}.id < {n}"),
]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def summary(xs: list[float]) -> dict:
    ms = [x * 1000 for x in xs]
    return {"p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "n": len(ms)}


def timed(conn, sql: str) -> float:
    t = time.perf_counter()
    conn.execute(sql).fetchall()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=int, default=300)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()

    from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER, Proxy
    from pgcluster import PgCluster
    pg = PgCluster().start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lineage-"))
    proxies = []
    try:
        pg.create_role(UPSTREAM_USER, UPSTREAM_PASSWORD, "scram-sha-256")
        pg.execute(f"ALTER ROLE {UPSTREAM_USER} SUPERUSER")
        pg.execute("CREATE DATABASE appdb")
        pg.execute(f"""
            CREATE TABLE customers (id int PRIMARY KEY, name text, email text, ssn text);
            INSERT INTO customers SELECT i, 'n' || i, 'p' || i || '@example.com',
                   lpad(i::text, 9, '0') FROM generate_series(1, {args.rows}) i;
            CREATE TABLE orders (id int PRIMARY KEY, cust_id int, total numeric);
            INSERT INTO orders SELECT i, i, i * 1.5 FROM generate_series(1, {args.rows}) i;
            ANALYZE;""", dbname="appdb")
        (tmp / "masked").mkdir()
        (tmp / "plain").mkdir()
        masked = Proxy(pg, tmp / "masked", extra=MASKS).start()
        plain = Proxy(pg, tmp / "plain").start()
        proxies = [masked, plain]
        out: dict[str, dict] = {}
        direct_dsn = pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, "appdb")
        with psycopg.connect(masked.dsn(dbname="appdb"), autocommit=True) as m, \
                psycopg.connect(plain.dsn(dbname="appdb"), autocommit=True) as p, \
                psycopg.connect(direct_dsn, autocommit=True) as d:
            for conn in (m, p, d):          # warm up: connections, side connection
                for k in range(5):
                    timed(conn, f"SELECT {k} AS warm{k}")
            first, again, literal, plain_first, direct = [], [], [], [], []
            for i in range(args.shapes):
                sql = TEMPLATES[i % len(TEMPLATES)].format(i=i, n=50)
                first.append(timed(m, sql))
                again.append(timed(m, sql))
                literal.append(timed(m, TEMPLATES[i % len(TEMPLATES)].format(i=i, n=60)))
                plain_first.append(timed(p, sql.replace(f"c{i}", f"p{i}")
                                         .replace(f"x{i}", f"y{i}")))
                direct.append(timed(d, sql.replace(f"c{i}", f"d{i}")
                                    .replace(f"x{i}", f"z{i}")))
        out["first (masks)"] = summary(first)
        out["again (masks)"] = summary(again)
        out["same shape, new literal (masks)"] = summary(literal)
        out["first (no masks)"] = summary(plain_first)
        out["direct"] = summary(direct)
        width = max(len(k) for k in out)
        print(f"{'case':<{width}}  {'p50 ms':>8}  {'p99 ms':>8}  {'mean ms':>8}")
        for k, v in out.items():
            print(f"{k:<{width}}  {v['p50_ms']:>8.3f}  {v['p99_ms']:>8.3f}  "
                  f"{v['mean_ms']:>8.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        for p in proxies:
            p.stop()
        pg.stop()


if __name__ == "__main__":
    main()
