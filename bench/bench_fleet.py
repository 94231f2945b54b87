# Fleet benchmark: approval round trip and revocation propagation across instances, and
# pgbench -S through an instance with [control] vs one without (the hot path's cost).
"""What a fleet costs and how fast it reacts, in one run on this machine.

The script starts what it needs in a temporary directory (removed at exit): one
Postgres (the upstream, with a ``control`` database as the fleet's control database),
two pgguard instances A and B sharing it, and a third pgguard C with the same config
but no ``[control]``. Then it measures:

- approval round trip: an agent's UPDATE sent through A waits for approval; a script
  standing in for the approver sees it through B's admin API and approves it there.
  Reported: request -> visible on B, decision on B -> result on A, and the whole round
  trip (request -> result), p50 and p99 over ``--rounds``;
- revocation propagation: a token session busy on B; the token is revoked through the
  control database (what ``pgguard token revoke -c A.toml`` does); time until B ended
  the session, p50 and p99;
- ``pgbench -n -S -M simple -c 8 -j 2 -T DURATION`` through C and through A,
  interleaved ``--reps`` times: median tps of each and the ratio A / C (the hot path
  does not touch the control database, so it should be ~1.0).

Examples::

    .venv/bin/python bench/bench_fleet.py --quick
    .venv/bin/python bench/bench_fleet.py --rounds 50 --reps 3 --duration 10 --json fleet.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from conftest import (AGENT, AGENT_PASSWORD, HUMAN, UPSTREAM_PASSWORD,  # noqa: E402
                      UPSTREAM_USER, Proxy)
from pgcluster import PgCluster, find_tool  # noqa: E402

RULES = """
[[rules]]
name = "bench-orders-need-approval"
when = { kind = "agent", statements = ["update"], relations = ["public.bench_orders"] }
action = "approve"
timeout = "60s"
"""
TOKEN_SECRET = "bench-fleet-token-secret-0123456789abcdef"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def approval_round_trips(a: Proxy, b: Proxy, rounds: int) -> dict:
    visible, release, total = [], [], []
    conn = psycopg.connect(a.dsn(dbname="appdb"), autocommit=True)
    # each round is a fresh Parse (psycopg would prepare it after 5 runs, and an approved
    # prepared statement runs again without asking)
    conn.prepare_threshold = None
    for n in range(rounds):
        box: dict = {}

        def agent() -> None:
            box["sent"] = time.monotonic()
            try:
                box["res"] = conn.execute("UPDATE bench_orders SET n = %s WHERE id = 1", [n]).statusmessage
            except psycopg.Error as e:
                box["error"] = e
            box["done"] = time.monotonic()
        t = threading.Thread(target=agent)
        t.start()
        while True:
            items = b.api("GET", "/api/approvals?state=pending")
            items = items.get("approvals", items) if isinstance(items, dict) else items
            if items:
                break
            if not t.is_alive():
                raise RuntimeError(f"the UPDATE was not held: {box}")
            time.sleep(0.001)
        seen = time.monotonic()
        b.api("POST", f"/api/approvals/{items[0]['id']}/approve", {"approver": HUMAN})
        decided = time.monotonic()
        t.join(30)
        if "error" in box:
            raise RuntimeError(f"the approved UPDATE failed: {box['error']}")
        visible.append(seen - box["sent"])
        release.append(box["done"] - decided)
        total.append(box["done"] - box["sent"])
    conn.close()
    ms = lambda xs: {"p50_ms": round(pct(xs, 50) * 1000, 2),  # noqa: E731
                     "p99_ms": round(pct(xs, 99) * 1000, 2)}
    return {"request_to_visible_on_B": ms(visible), "decision_on_B_to_result_on_A": ms(release),
            "round_trip": ms(total), "rounds": rounds}


def revocation_propagation(a: Proxy, b: Proxy, rounds: int) -> dict:
    from pgguard.config import load
    from pgguard.control.revocations import revoke
    cfg = load(a.config)
    lags = []
    for _ in range(rounds):
        r = subprocess.run([sys.executable, "-m", "pgguard", "token", "issue", "-c",
                            str(a.config), "--identity", AGENT, "--json"],
                           capture_output=True, text=True, env=a.env, check=True)
        tok = json.loads(r.stdout)
        conn = psycopg.connect(b.dsn(dbname="appdb", password=tok["token"]), autocommit=True)
        box: dict = {}

        def busy() -> None:
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.Error:
                box["ended"] = time.monotonic()
        t = threading.Thread(target=busy)
        t.start()
        time.sleep(0.2)
        os.environ["PGGUARD_CONTROL_DSN"] = a.env["PGGUARD_CONTROL_DSN"]
        revoke(cfg, tok["token_id"])
        committed = time.monotonic()
        t.join(10)
        lags.append(box["ended"] - committed)
        conn.close()
    return {"p50_ms": round(pct(lags, 50) * 1000, 2), "p99_ms": round(pct(lags, 99) * 1000, 2),
            "rounds": rounds}


def pgbench_tps(proxy: Proxy, duration: int) -> float:
    env = dict(os.environ, PGPASSWORD=AGENT_PASSWORD)
    r = subprocess.run([str(find_tool("pgbench")), "-n", "-S", "-M", "simple", "-c", "8",
                        "-j", "2", "-T", str(duration), "-h", "127.0.0.1", "-p",
                        str(proxy.port), "-U", AGENT, "appdb"],
                       capture_output=True, text=True, env=env, timeout=duration + 60)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    for line in r.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(r.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30, help="approvals / revocations measured")
    p.add_argument("--reps", type=int, default=3, help="interleaved pgbench repetitions")
    p.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    p.add_argument("--quick", action="store_true", help="10 rounds, 1 rep of 3 s")
    p.add_argument("--json", metavar="FILE", help="write the results here too")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.reps, args.duration = 10, 1, 3
    tmp = Path(tempfile.mkdtemp(prefix="pgguard-bench-fleet-"))
    pg = PgCluster().start()
    started: list[Proxy] = []
    try:
        pg.create_role(UPSTREAM_USER, UPSTREAM_PASSWORD, "scram-sha-256")
        pg.execute(f"ALTER ROLE {UPSTREAM_USER} SUPERUSER")
        pg.execute(f"CREATE DATABASE appdb OWNER {UPSTREAM_USER}")
        pg.execute(f"CREATE DATABASE control OWNER {UPSTREAM_USER}")
        pg.execute("CREATE TABLE bench_orders (id int PRIMARY KEY, n int);"
                   "INSERT INTO bench_orders VALUES (1, 0)", dbname="appdb")
        subprocess.run([str(find_tool("pgbench")), "-i", "-q", "-s", "2", "-h", "127.0.0.1",
                        "-p", str(pg.port), "-U", UPSTREAM_USER, "appdb"], check=True,
                       capture_output=True, env=dict(os.environ, PGPASSWORD=UPSTREAM_PASSWORD))
        env = {"PGGUARD_CONTROL_DSN": pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD,
                                             dbname="control"),
               "PGGUARD_TOKEN_SECRET": TOKEN_SECRET}
        proxies = {}
        for name, control in (("A", True), ("B", True), ("C", False)):
            d = tmp / name
            d.mkdir()
            extra = f'[instance]\nname = "{name}"\n' + RULES
            if control:
                extra += '\n[control]\nschema = "pgguard_control"\n'
            proxies[name] = Proxy(pg, d, extra=extra, env=env).start()
            started.append(proxies[name])
        a, b, c = proxies["A"], proxies["B"], proxies["C"]
        time.sleep(1.0)
        print(f"approval round trip over {args.rounds} rounds (request on A, decision on B)")
        appr = approval_round_trips(a, b, args.rounds)
        for k in ("request_to_visible_on_B", "decision_on_B_to_result_on_A", "round_trip"):
            print(f"  {k:32s} p50 {appr[k]['p50_ms']:8.2f} ms   p99 {appr[k]['p99_ms']:8.2f} ms")
        print(f"revocation propagation over {args.rounds} tokens (revoked via A, session on B)")
        rev = revocation_propagation(a, b, args.rounds)
        print(f"  commit -> session ended on B     p50 {rev['p50_ms']:8.2f} ms   "
              f"p99 {rev['p99_ms']:8.2f} ms")
        tps: dict[str, list[float]] = {"without_control": [], "with_control": []}
        for rep in range(args.reps):
            tps["without_control"].append(pgbench_tps(c, args.duration))
            tps["with_control"].append(pgbench_tps(a, args.duration))
        med = {k: statistics.median(v) for k, v in tps.items()}
        ratio = med["with_control"] / med["without_control"]
        print(f"pgbench -S -M simple -c 8, {args.reps} x {args.duration}s interleaved")
        print(f"  without [control]  {med['without_control']:10.0f} tps")
        print(f"  with [control]     {med['with_control']:10.0f} tps")
        print(f"  ratio with/without {ratio:10.3f}")
        # each repetition ran the two back to back: their ratio cancels the slow drifts
        # of a shared machine better than the ratio of medians
        pairs = [w / wo for w, wo in zip(tps["with_control"], tps["without_control"])]
        print(f"  per-repetition ratios {', '.join(f'{x:.2f}' for x in pairs)}; "
              f"median {statistics.median(pairs):.3f}")
        out = {"approval": appr, "revocation": rev, "pgbench_tps": tps,
               "pgbench_ratio": round(ratio, 4),
               "pgbench_pair_ratios": [round(x, 4) for x in pairs]}
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        for pr in started:
            pr.stop()
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
