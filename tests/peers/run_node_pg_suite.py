#!/usr/bin/env python3
"""node-postgres' own integration tests (and pg-pool's, pg-cursor's, pg-query-stream's), run directly against Postgres and through pgguard,
compared (outside CI: it needs Node.js and the monorepo's npm dependencies).

    python tests/peers/run_node_pg_suite.py --src /path/to/node-postgres [--json out.json]

Prepare the checkout once: `npm install` at its root, then `npx tsc` in
packages/pg-protocol (the pg package requires its built dist/). Each file under
packages/pg/test/integration runs as `node FILE` (the suite's own Makefile does the same),
with PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE set. A file stops at its first failing test,
so the judgement is per file and per test name: every test that passes directly must pass
through pgguard. Two runs at once, each on its own Postgres, as tests/peers/
run_asyncpg_suite.py does; pgguard's identity is the agent `ci-agent` (`[policy] agents =
"allow"`, audit on, no masks, `[upstream] application_name = "client"`).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import run_asyncpg_suite as common  # noqa: E402  (environment)

# the monorepo's other packages with tests against a server (mocha; their own scripts)
MOCHA_PACKAGES = (
    ("pg-pool", "*.js", []),
    ("pg-cursor", "*.js", []),
    ("pg-query-stream", "*.ts", ["-r", "ts-node/register"]),
)
_PASSED = re.compile(r"^\s{2}(.*?) ✔$", re.M)


def run_one(kind: str, src: Path, workdir: Path, files: list[Path], timeout: float,
            packages: tuple = ()) -> dict:
    where = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
    results: dict[str, dict] = {}
    target = common.Target(kind, where, 'application_name = "client"', "nodepg")
    try:
        env = common._base_env()
        env.update(PGPORT=str(target.port), PGUSER=target.user, PGPASSWORD=target.password,
                   PGDATABASE="nodepg")
        pgdir = src / "packages" / "pg"
        t0 = time.monotonic()
        for f in files:
            rel = str(f.relative_to(pgdir))
            try:
                r = subprocess.run(["node", rel], cwd=pgdir, env=env, capture_output=True,
                                   text=True, timeout=timeout)
                out, code = r.stdout + r.stderr, r.returncode
            except subprocess.TimeoutExpired as e:
                out = (e.stdout or b"").decode(errors="replace") if isinstance(
                    e.stdout, bytes) else (e.stdout or "")
                out, code = out + f"\n!! killed after {timeout}s", -9
            results[rel] = {"code": code, "passed": _PASSED.findall(out), "tail": out[-1500:]}
        for pkg, pattern, extra in packages:
            d = src / "packages" / pkg
            tests = sorted(str(p.relative_to(d)) for p in (d / "test").glob(pattern)
                           if p.stem not in ("helper", "setup"))
            if not tests:
                continue
            cmd = [str(src / "node_modules" / ".bin" / "mocha"), "--reporter", "json",
                   "--exit", *extra, *tests]
            try:
                r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True,
                                   timeout=timeout * 5)
                out, code = r.stdout, r.returncode
            except subprocess.TimeoutExpired:
                out, code = "", -9
            try:
                doc = json.loads(out[out.index("{"):])
                passed = [t["fullTitle"] for t in doc.get("passes", [])]
            except ValueError:
                passed = []
            results[f"{pkg} (mocha)"] = {"code": code, "passed": passed,
                                         "tail": (out + r.stderr)[-1500:] if code != -9 else
                                         "killed"}
        elapsed = time.monotonic() - t0
        left = target.finish()
    finally:
        target.stop()
    return {"kind": kind, "results": results, "seconds": round(elapsed, 1), **left}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="a node-postgres checkout")
    ap.add_argument("--timeout", type=float, default=120, help="per test file, seconds")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reruns", type=int, default=2,
                    help="tries, alone through pgguard, of a test that failed only there")
    args = ap.parse_args(argv)
    pgdir = args.src / "packages" / "pg"
    files = sorted((pgdir / "test" / "integration").rglob("*-tests.js"))
    workdir = Path(tempfile.mkdtemp(prefix="node-pg-suite-"))
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fd = ex.submit(run_one, "direct", args.src, workdir, files, args.timeout,
                       MOCHA_PACKAGES)
        ft = ex.submit(run_one, "pgguard", args.src, workdir, files, args.timeout,
                       MOCHA_PACKAGES)
        direct, through = fd.result(), ft.result()
    n_direct = sum(len(r["passed"]) for r in direct["results"].values())
    n_through = sum(len(r["passed"]) for r in through["results"].values())
    diffs = []
    for rel, d in sorted(direct["results"].items()):
        t = through["results"][rel]
        missing = [n for n in d["passed"] if n not in t["passed"]]
        if missing or (d["code"] == 0 and t["code"] != 0):
            diffs.append((rel, missing, t["code"], t["tail"]))
    # the two runs go at once on a busy machine, and some tests measure milliseconds
    # (pg-pool's idle timeouts): a difference is run again alone through pgguard
    for _ in range(args.reruns):
        if not diffs:
            break
        again_files = [pgdir / rel for rel, *_ in diffs if not rel.endswith("(mocha)")]
        again_pkgs = tuple(p for p in MOCHA_PACKAGES
                           if any(rel == f"{p[0]} (mocha)" for rel, *_ in diffs))
        again = run_one("pgguard", args.src, workdir, again_files, args.timeout, again_pkgs)
        left = []
        for rel, missing, code, tail in diffs:
            r = again["results"][rel]
            still = [n for n in missing if n not in r["passed"]]
            if still or (not missing and r["code"] != 0):
                left.append((rel, still, r["code"], r["tail"]))
        diffs = left
    print(f"node-postgres integration tests ({len(files)} files)")
    print(f"  direct:  {n_direct} tests passed, "
          f"{sum(r['code'] == 0 for r in direct['results'].values())} files clean "
          f"in {direct['seconds']}s")
    print(f"  pgguard: {n_through} tests passed, "
          f"{sum(r['code'] == 0 for r in through['results'].values())} files clean "
          f"in {through['seconds']}s; proxy alive: {through['proxy_alive']}; "
          f"tracebacks in its log: {through['tracebacks']}")
    print(f"files with a test passing directly and never through pgguard: {len(diffs)}")
    for rel, missing, code, tail in diffs:
        print(f"  {rel} (exit {code}); not passed through pgguard: {missing[:5]}")
        print("      " + "\n      ".join(tail.strip().splitlines()[-6:]))
    if args.json:
        args.json.write_text(json.dumps({"direct": direct, "pgguard": through,
                                         "diffs": diffs}, indent=1))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
