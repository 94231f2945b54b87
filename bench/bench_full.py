# The issue-17 benchmark table in one interleaved run: every figure, pgguard side by side
# with PgBouncer (or with itself without the feature), medians and ratios.
"""One command for every row of the issue-17 table (``./dev bench``).

Starts its own Postgres (pgbench scale 10, ``bench_rows`` for streaming), PgBouncer in
three shapes and pgguard in six, all in a temp dir removed at exit (the machinery is
``bench_relay.py``'s), then runs ``--reps`` interleaved repetitions of every row: for each
rep, each row runs on each of its targets in turn, the order rotating from rep to rep.

Targets:

- ``direct``: Postgres itself (TCP);
- ``pgbouncer``: PgBouncer, session pool, upstream over TCP; ``pgbouncer-unix``: the same
  with the upstream over its Unix socket; ``pgbouncer-x2``: two PgBouncer processes sharing
  the listen port with ``so_reuseport = 1`` (``--workers`` N);
- ``pgguard``: policy (the default agent policy: every statement judged) + audit on,
  upstream over TCP; ``pgguard-unix``: the same over the Unix socket
  (``[upstream] host = <socket directory>``); ``pgguard-masks``: + 2 masks on
  ``bench_rows`` (a table pgbench does not read) + all built-in detectors;
  ``pgguard-noguard``: blast-radius guard off (``agents_max_rows = 0``);
  ``pgguard-noaudit``: policy, audit off; ``pgguard-bare``: neither (the relay alone);
  ``pgguard-x2``: ``--workers`` N.

Rows (the figure, what is divided by what, the issue's target):

- ``-S simple`` / ``-S prepared``: ``pgbench -n -S -c 8 -j 2``, pgguard / PgBouncer;
- the same with masks + detectors configured / PgBouncer;
- the same with both proxies on the Unix socket upstream;
- ``stream``: 1M rows ``SELECT * FROM bench_rows`` (psycopg), masks + detectors /
  pass-through pgguard (``xfer``: until libpq holds the result; ``fetch``: every row as
  Python objects too);
- ``tpcb``: ``pgbench -M prepared`` TPC-B-like as the agent, guard on / off;
  ``tpcb-simple``: the same with ``-M simple``;
- ``latency``: ``pgbench -n -S -c 1 -j 1 -M simple -l``: per-statement latency
  percentiles from the per-transaction log, pgguard with policy + masks + audit minus
  direct and minus PgBouncer;
- ``workers``: ``-S`` simple and prepared, pgguard ``--workers N`` / PgBouncer N processes.

Examples::

    ./dev bench --quick                       # ~3 minutes: 1 rep, 3 s runs, 200k rows
    ./dev bench                               # the reported run: 3 reps, 10 s, 1M rows
    ./dev bench --rows-only tpcb,latency      # some rows only
    python bench/bench_full.py --json full.json
"""
from __future__ import annotations

import argparse
import atexit
import glob
import json
import os
import platform
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_relay as br  # noqa: E402

PGBENCH_ROWS = ("simple", "prepared", "masks-simple", "masks-prepared", "unix-simple",
                "unix-prepared", "stream", "tpcb", "tpcb-simple", "latency", "workers-simple",
                "workers-prepared")

MASKS_TOML = """
[[masks]]
column = "public.bench_rows.email"
strategy = "email"
[[masks]]
column = "public.bench_rows.ssn"
strategy = "partial"
keep = 4
[detectors]
builtin = ["email", "ssn", "credit_card", "phone", "ipv4", "aws_access_key", "jwt",
           "private_key", "bearer_token", "api_token"]
"""
NOGUARD_TOML = "[policy]\nagents_max_rows = 0\n"
NOAUDIT_TOML = "[audit]\nenabled = false\n"
BARE_TOML = '[audit]\nenabled = false\n[policy]\nagents = "allow"\n'


WHAT = {"pgguard-noaudit": "policy, no audit", "pgguard-bare": "no policy, no audit"}


@dataclass
class Row:
    name: str
    test: str                       # pgbench mode, "stream" or "latency"
    targets: list[str]
    subject: str                    # numerator
    reference: str                  # denominator (or the subtrahend for latency)
    figure: str
    goal: float | None = None
    samples: dict[str, list] = field(default_factory=dict)
    # more subjects shown against the same reference, without a goal (where the time goes)
    also: list[str] = field(default_factory=list)


def run_pgbench(pgbench: Path, t: br.Target, mode: str, duration: int, clients: int,
                threads: int, logdir: Path | None = None) -> dict[str, Any]:
    """One pgbench run: tps, proxy CPU per transaction; with logdir, per-transaction
    latency percentiles (µs) from pgbench's -l log."""
    workload = {"tpcb": ["-M", "prepared"], "tpcb-simple": ["-M", "simple"]}.get(
        mode, ["-S", "-M", mode])
    cmd = [str(pgbench), "-n", *workload, "-c", str(clients), "-j", str(threads),
           "-T", str(duration), "-h", "127.0.0.1", "-p", str(t.port), "-U", t.user, br.DBNAME]
    prefix = None
    if logdir is not None:
        prefix = logdir / f"lat-{t.name}-{secrets.token_hex(3)}"
        cmd[1:1] = ["-l", "--log-prefix", str(prefix)]
    cpu0 = t.cpu_split()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=t.env(),
                           timeout=duration + 60)
    except subprocess.TimeoutExpired:
        return {"value": None, "error": f"pgbench did not finish within {duration + 60}s"}
    cpu1 = t.cpu_split()
    m_tps, m_txn = br._TPS.search(r.stdout), br._PROCESSED.search(r.stdout)
    m_fail = br._FAILED.search(r.stdout)
    res: dict[str, Any] = {"value": float(m_tps.group(1)) if m_tps else None,
                           "txns": int(m_txn.group(1)) if m_txn else None,
                           "failed": int(m_fail.group(1)) if m_fail else None}
    if cpu0 is not None and cpu1 is not None and res["txns"]:
        per = {k: (cpu1[k] - cpu0[k]) / res["txns"] * 1e6 for k in cpu0}
        res["cpu_us_per_txn"] = round(sum(per.values()), 2)
        res.update({f"cpu_{k}_us": round(v, 2) for k, v in per.items()})
    if r.returncode != 0 or res["value"] is None:
        res["error"] = (f"pgbench exit {r.returncode}: "
                        + " | ".join((r.stderr.strip().splitlines() or ["(no stderr)"])[-3:]))
    if prefix is not None:
        lat: list[int] = []
        for f in glob.glob(f"{prefix}.*"):
            with open(f) as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) >= 3:
                        lat.append(int(parts[2]))       # transaction latency, µs
            os.unlink(f)
        lat.sort()
        if lat:
            res.update(p50=pct(lat, 50), p99=pct(lat, 99), p999=pct(lat, 99.9),
                       n_lat=len(lat))
    return res


def pct(sorted_vals: list[int], p: float) -> float:
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return float(sorted_vals[i])


def median(samples: list[dict], key: str) -> float | None:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, d: int = 0) -> str:
    return "-" if v is None else f"{v:,.{d}f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 rep, 3 s runs, 200k rows (unless given explicitly)")
    p.add_argument("--reps", type=int, default=None, help="interleaved reps (default 3)")
    p.add_argument("--duration", type=int, default=None, help="seconds per pgbench run "
                   "(default 10)")
    p.add_argument("--rows", type=int, default=None, help="bench_rows rows (default 1M)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c for throughput rows")
    p.add_argument("--threads", type=int, default=2, help="pgbench -j for throughput rows")
    p.add_argument("--workers", type=int, default=2,
                   help="N for the workers rows: pgguard --workers N, N PgBouncer processes")
    p.add_argument("--rows-only", default=",".join(PGBENCH_ROWS),
                   help="comma-separated rows to run: " + ",".join(PGBENCH_ROWS))
    p.add_argument("--pgguard-python", default=sys.executable)
    p.add_argument("--pg-bindir", default=None)
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.duration = a.duration or (3 if a.quick else 10)
    a.rows = a.rows or (200_000 if a.quick else 1_000_000)
    return a


def build_rows(wanted: list[str], n: int) -> list[Row]:
    x = f"x{n}"
    rows = {
        "simple": Row("simple", "simple", ["direct", "pgbouncer", "pgguard", "pgguard-noaudit",
                                           "pgguard-bare"], "pgguard",
                      "pgbouncer", "-S simple, policy + audit / PgBouncer", 1.0,
                      also=["pgguard-noaudit", "pgguard-bare"]),
        "prepared": Row("prepared", "prepared", ["direct", "pgbouncer", "pgguard",
                                                 "pgguard-noaudit", "pgguard-bare"], "pgguard",
                        "pgbouncer", "-S prepared, policy + audit / PgBouncer", 1.0,
                        also=["pgguard-noaudit", "pgguard-bare"]),
        "masks-simple": Row("masks-simple", "simple", ["pgbouncer", "pgguard-masks"],
                            "pgguard-masks", "pgbouncer",
                            "-S simple, + masks + detectors / PgBouncer", 0.95),
        "masks-prepared": Row("masks-prepared", "prepared", ["pgbouncer", "pgguard-masks"],
                              "pgguard-masks", "pgbouncer",
                              "-S prepared, + masks + detectors / PgBouncer", 0.95),
        "unix-simple": Row("unix-simple", "simple", ["pgbouncer-unix", "pgguard-unix"],
                           "pgguard-unix", "pgbouncer-unix",
                           "-S simple, Unix-socket upstream / PgBouncer same", 1.0),
        "unix-prepared": Row("unix-prepared", "prepared", ["pgbouncer-unix", "pgguard-unix"],
                             "pgguard-unix", "pgbouncer-unix",
                             "-S prepared, Unix-socket upstream / PgBouncer same", 1.0),
        "stream": Row("stream", "stream", ["direct", "pgguard", "pgguard-masks"],
                      "pgguard-masks", "pgguard",
                      "1M-row stream, 2 masks + detectors / pass-through", 0.75),
        "tpcb": Row("tpcb", "tpcb", ["pgbouncer", "pgguard", "pgguard-noguard"], "pgguard",
                    "pgguard-noguard", "TPC-B (agent), blast-radius guard / no guard", 0.9),
        "tpcb-simple": Row("tpcb-simple", "tpcb-simple",
                           ["pgbouncer", "pgguard", "pgguard-noguard"], "pgguard",
                           "pgguard-noguard", "TPC-B -M simple (agent), guard / no guard", 0.9),
        "latency": Row("latency", "latency", ["direct", "pgbouncer", "pgguard-masks",
                                              "pgguard"],
                       "pgguard-masks", "pgbouncer",
                       "added latency at -c 1 (policy + masks + audit), µs", 50.0,
                       also=["pgguard"]),
        "workers-simple": Row("workers-simple", "simple", [f"pgbouncer-{x}", f"pgguard-{x}"],
                              f"pgguard-{x}", f"pgbouncer-{x}",
                              f"-S simple, {n} workers / {n} PgBouncers (so_reuseport)", 1.0),
        "workers-prepared": Row("workers-prepared", "prepared",
                                [f"pgbouncer-{x}", f"pgguard-{x}"], f"pgguard-{x}",
                                f"pgbouncer-{x}",
                                f"-S prepared, {n} workers / {n} PgBouncers", 1.0),
    }
    bad = [w for w in wanted if w not in rows]
    if bad:
        raise br.BenchError(f"--rows-only: unknown {', '.join(bad)}")
    return [rows[w] for w in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, br._on_signal)
    atexit.register(br.CLEANUP.run)
    rows = build_rows([x.strip() for x in args.rows_only.split(",") if x.strip()],
                      args.workers)
    needed = {t for r in rows for t in r.targets}

    import psycopg
    meta: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]), "nproc": os.cpu_count(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reps": args.reps,
        "duration": args.duration, "psycopg": psycopg.__version__}
    sha = subprocess.run(["git", "-C", str(br.REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    meta["pgguard_commit"] = sha or "unknown"

    root = Path(tempfile.mkdtemp(prefix="pgguard-bench-"))
    root.chmod(0o755)
    br.CLEANUP.push("tempdir", (lambda: br.log(f"kept {root}")) if args.keep
                    else (lambda: __import__("shutil").rmtree(root, ignore_errors=True)))
    br.log(f"work dir {root}")
    bindir = br.find_pg_bindir(args.pg_bindir)
    pgbench = bindir / "pgbench"
    pg = br.PostgresServer(bindir, root)
    pg.start()
    data = br.load_data(pg, args.rows, args.scale)
    meta.update(postgres=pg.version, rows=data["rows"], datarow_bytes=data["datarow_bytes"])

    extra_dir = root / "extra"
    extra_dir.mkdir()
    files = {}
    for name, text in (("unix", f'[upstream]\nhost = "{pg.sockdir}"\n'),
                       ("masks", MASKS_TOML), ("noguard", NOGUARD_TOML),
                       ("noaudit", NOAUDIT_TOML), ("bare", BARE_TOML)):
        files[name] = extra_dir / f"{name}.toml"
        files[name].write_text(text)

    targets: dict[str, br.Target] = {}
    if "direct" in needed:
        targets["direct"] = pg.target()
    exe = br.find_or_install_pgbouncer(not args.no_install)
    meta["pgbouncer"] = None
    if exe is not None:
        v = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        meta["pgbouncer"] = (v.splitlines() or ["PgBouncer ?"])[0].strip()
        for name, host, n in (("pgbouncer", "127.0.0.1", 1),
                              ("pgbouncer-unix", str(pg.sockdir), 1),
                              (f"pgbouncer-x{args.workers}", "127.0.0.1", args.workers)):
            if name in needed:
                br.log(f"starting {name}")
                targets[name] = br.start_pgbouncer(exe, root, pg, name, host, n)
                br.log(f"{name} is up: pids {targets[name].pids}, port {targets[name].port}")
    password = secrets.token_urlsafe(18)
    for name, extras, workers in (("pgguard", [], 1), ("pgguard-unix", [files["unix"]], 1),
                                  ("pgguard-masks", [files["masks"]], 1),
                                  ("pgguard-noguard", [files["noguard"]], 1),
                                  ("pgguard-noaudit", [files["noaudit"]], 1),
                                  ("pgguard-bare", [files["bare"]], 1),
                                  (f"pgguard-x{args.workers}", [], args.workers)):
        if name in needed:
            br.log(f"starting {name}")
            targets[name] = br.start_pgguard(name, root, pg, extras, args.pgguard_python,
                                             workers, password)
            br.log(f"{name} is up: pid {targets[name].proc.pid}, port {targets[name].port}")
    missing = needed - set(targets)
    if missing:
        br.log(f"not available: {', '.join(sorted(missing))} (their rows show '-')")

    for t in targets.values():         # warm-up: caches, decision caches, catalogs
        run_pgbench(pgbench, t, "simple", 1, args.clients, args.threads)
        run_pgbench(pgbench, t, "prepared", 1, args.clients, args.threads)

    logdir = root / "latency"
    logdir.mkdir()
    for rep in range(args.reps):
        for row in rows:
            names = [n for n in row.targets if n in targets]
            k = rep % max(1, len(names))
            for n in names[k:] + names[:k]:
                t = targets[n]
                if row.test == "stream":
                    res = br.run_stream(t, "select", data)
                    shown = f"{fmt(res.get('xfer'), 1)} MB/s xfer, {fmt(res.get('value'), 1)} fetch"
                elif row.test == "latency":
                    res = run_pgbench(pgbench, t, "simple", args.duration, 1, 1, logdir)
                    shown = (f"p50 {fmt(res.get('p50'))} p99 {fmt(res.get('p99'))} "
                             f"p99.9 {fmt(res.get('p999'))} µs")
                else:
                    res = run_pgbench(pgbench, t, row.test, args.duration, args.clients,
                                      args.threads)
                    shown = f"{fmt(res.get('value'))} tps, {fmt(res.get('cpu_us_per_txn'), 1)} " \
                            "µs proxy CPU/txn"
                row.samples.setdefault(n, []).append(res)
                br.log(f"rep {rep + 1} {row.name:<17} {n:<16} {shown}"
                       + (f"  ERROR {res['error']}" if res.get("error") else ""))
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = report(meta, rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"meta": meta, "rows": [{"name": r.name, "figure": r.figure, "goal": r.goal,
                                     "samples": r.samples} for r in rows], **summary},
            indent=2, default=str) + "\n")
        br.log(f"wrote {args.json}")
    return 0


def report(meta: dict[str, Any], rows: list[Row], args: argparse.Namespace) -> dict:
    out = sys.stdout
    print("\npgguard issue-17 benchmark", file=out)
    print(f"  command: {meta['command']}", file=out)
    print(f"  machine: nproc={meta['nproc']}, {meta['platform']}, load avg "
          f"{meta['loadavg_start']} at start, {meta['loadavg_end']} at end", file=out)
    print(f"  versions: PostgreSQL {meta['postgres']}, {meta['pgbouncer'] or 'PgBouncer n/a'}, "
          f"pgguard {meta['pgguard_commit']}", file=out)
    print(f"  {meta['reps']} interleaved rep(s), pgbench -T {meta['duration']} "
          f"(-c {args.clients} -j {args.threads}; latency: -c 1 -j 1), "
          f"bench_rows {meta['rows']:,} rows ({meta['datarow_bytes'] / 1e6:.1f} MB DataRow); "
          "medians", file=out)
    print("", file=out)
    head = f"{'figure':<54}{'pgguard':>22}{'reference':>22}{'ratio':>8}{'target':>9}  verdict"
    print(head, file=out)
    print("-" * len(head), file=out)
    table = []
    for r in rows:
        s, ref = r.samples.get(r.subject, []), r.samples.get(r.reference, [])
        if r.test == "latency":
            direct = r.samples.get("direct", [])
            for p, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
                a, b, d = median(s, p), median(ref, p), median(direct, p)
                over_b = a - b if a is not None and b is not None else None
                over_d = a - d if a is not None and d is not None else None
                goal = r.goal if p == "p50" else None
                verdict = "" if goal is None or over_b is None else \
                    ("met" if over_b <= goal else "NOT met")
                cell_a = f"{fmt(a)} µs"
                cell_b = f"{fmt(b)} µs (pgb)"
                print(f"{'latency ' + label + ' at -c 1: pgguard - PgBouncer (- direct)':<54}"
                      f"{cell_a:>22}{cell_b:>22}{fmt(over_b):>8}"
                      f"{('<= ' + fmt(goal)) if goal else 'report':>9}  {verdict}"
                      f"  (+{fmt(over_d)} µs over direct {fmt(d)})", file=out)
                table.append({"figure": f"latency {label}", "pgguard_us": a,
                              "pgbouncer_us": b, "direct_us": d, "over_pgbouncer_us": over_b,
                              "over_direct_us": over_d, "goal": goal})
                for other in r.also:        # the same without masks (policy + audit)
                    o = median(r.samples.get(other, []), p)
                    ob = o - b if o is not None and b is not None else None
                    od = o - d if o is not None and d is not None else None
                    print(f"{'  same, ' + other + ' (policy + audit, no masks)':<54}"
                          f"{fmt(o) + ' µs':>22}{cell_b:>22}{fmt(ob):>8}{'':>9}  "
                          f"  (+{fmt(od)} µs over direct)", file=out)
                    table.append({"figure": f"latency {label}: {other}", "pgguard_us": o,
                                  "over_pgbouncer_us": ob, "over_direct_us": od})
            continue
        keys = [("xfer", "xfer MB/s"), ("value", "fetch MB/s")] if r.test == "stream" \
            else [("value", "tps")]
        for key, unit in keys:
            a, b = median(s, key), median(ref, key)
            ratio = a / b if a is not None and b else None
            verdict = "" if ratio is None or r.goal is None else \
                ("met" if ratio >= r.goal else "NOT met")
            extra = ""
            if r.test != "stream":
                ca, cb = median(s, "cpu_us_per_txn"), median(ref, "cpu_us_per_txn")
                extra = f"  (proxy CPU {fmt(ca, 1)} vs {fmt(cb, 1)} µs/txn)" \
                    if ca is not None and cb is not None else ""
                if r.reference == "pgbouncer" and "direct" in r.samples:
                    d = median(r.samples["direct"], key)
                    extra += f"  direct {fmt(d)} tps"
            elif key == "xfer" and a is not None and r.goal is not None:
                verdict += " (>= 200 MB/s: " + ("met" if a >= 200 else "NOT met") + ")"
            fig = r.figure + (f" [{'fetch' if key == 'value' else key}]"
                              if r.test == "stream" else "")
            print(f"{fig:<54}{fmt(a, 1 if r.test == 'stream' else 0) + ' ' + unit.split()[-1]:>22}"
                  f"{fmt(b, 1 if r.test == 'stream' else 0) + ' ' + unit.split()[-1]:>22}"
                  f"{fmt(ratio, 2):>8}{('>= ' + fmt(r.goal, 2)) if r.goal else '':>9}  "
                  f"{verdict}{extra}", file=out)
            table.append({"figure": fig, "subject": r.subject, "reference": r.reference,
                          "value": a, "reference_value": b, "ratio": ratio, "goal": r.goal})
            for other in r.also:
                o = median(r.samples.get(other, []), key)
                co = median(r.samples.get(other, []), "cpu_us_per_txn")
                cb = median(ref, "cpu_us_per_txn")
                ratio_o = o / b if o is not None and b else None
                label = f"  same, {other} ({WHAT.get(other, '')})"
                print(f"{label:<54}{fmt(o) + ' tps':>22}{fmt(b) + ' tps':>22}"
                      f"{fmt(ratio_o, 2):>8}{'':>9}  "
                      + (f"  (proxy CPU {fmt(co, 1)} vs {fmt(cb, 1)} µs/txn)"
                         if co is not None and cb is not None else ""), file=out)
                table.append({"figure": f"{fig}: {other}", "subject": other,
                              "reference": r.reference, "value": o, "reference_value": b,
                              "ratio": ratio_o, "goal": None})
    print("  subject / reference: " + "; ".join(f"{r.name}: {r.subject} / {r.reference}"
                                               for r in rows), file=out)
    cpu_breakdown(rows, out)
    errors = [(r.name, n, s["error"]) for r in rows for n, ss in r.samples.items()
              for s in ss if s.get("error")]
    if errors:
        print("\nerrors:", file=out)
        for e in errors[:30]:
            print(f"  {e[0]} {e[1]}: {e[2]}", file=out)
    return {"table": table}


def cpu_breakdown(rows: list[Row], out) -> None:
    """Where each proxy's CPU per transaction goes (medians): user and system time of
    the serving processes, and pgguard's audit writer; the kernel's share of a relay is
    the same for both proxies, the rest is what pgguard does on top."""
    keys = ("proxy_user", "proxy_sys", "writer_user", "writer_sys")
    lines = []
    for r in rows:
        if r.test not in ("simple", "prepared", "tpcb", "tpcb-simple"):
            continue
        for name, ss in r.samples.items():
            vals = [median(ss, f"cpu_{k}_us") for k in keys]
            if any(v is None for v in vals):
                continue
            lines.append(f"  {r.name:<16}{name:<18}" + "".join(f"{fmt(v, 1):>10}" for v in vals)
                         + f"{fmt(sum(vals), 1):>10}")
    if not lines:
        return
    print("\nproxy CPU per transaction, µs (medians; /proc utime and stime of the process "
          "tree)", file=out)
    print(f"  {'row':<16}{'target':<18}" + "".join(f"{h:>10}" for h in (
        "user", "system", "audit usr", "audit sys", "total")), file=out)
    for line in lines:
        print(line, file=out)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except br.BenchError as e:
        print(f"bench_full: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench_full: interrupted; cleaning up", file=sys.stderr)
        sys.exit(130)
