#!/usr/bin/env python3
"""psycopg's own test suite, run directly against Postgres and through pgguard, compared
(outside CI: psycopg's sdist ships no tests, so the suite comes from a source checkout).

    python tests/peers/run_psycopg_suite.py --src /path/to/psycopg-checkout [--python PY]
        [--select 'tests/test_cursor.py tests/test_copy.py'] [--json out.json]

PY is an interpreter that has psycopg (the version the checkout's tests expect, C or binary
implementation), pytest and anyio, and pproxy (psycopg's tests import these). Two runs at
once, each on its own fresh Postgres, exactly as tests/peers/run_asyncpg_suite.py does for
asyncpg (same judgement, same rerun of a difference alone through pgguard):

    direct   PSYCOPG_TEST_DSN names the upstream superuser, straight to Postgres
    pgguard  the agent identity `ci-agent` (`[policy] agents = "allow"`, audit on, no masks,
             `[upstream] application_name = "client"`) through pgguard, whose upstream
             user is that same superuser

One difference is by design: tests.pq.test_pgconn::test_change_password creates a role in
the database and logs in as it; pgguard authenticates its own identities (like PgBouncer's
auth_file), so a role that only exists upstream cannot log in through it.

Prints the per-run counts and every test that passes directly and never through pgguard.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import run_asyncpg_suite as common  # noqa: E402  (junit parsing, comparison, environment)


def run_one(kind: str, src: Path, python: str, workdir: Path, select: list[str],
            timeout: float) -> dict:
    where = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
    run = where / "suite"
    shutil.copytree(src / "tests", run / "tests")
    if (src / "pyproject.toml").exists():
        shutil.copy(src / "pyproject.toml", run / "pyproject.toml")
    # psycopg's pool tests read back the application_name they set: pass it through
    target = common.Target(kind, where, 'application_name = "client"', "psycopg_test")
    try:
        env = common._base_env()
        env["PSYCOPG_TEST_DSN"] = (f"host=127.0.0.1 port={target.port} user={target.user} "
                                   f"password={target.password} dbname=psycopg_test "
                                   "sslmode=disable")
        junit, log = where / "junit.xml", where / "pytest.log"
        args = [python, "-m", "pytest", "-p", "no:randomly", "-q",
                "--tb=line", f"--junitxml={junit}", "-m", "not slow and not mypy",
                *(select or ["tests"])]
        t0 = time.monotonic()
        with open(log, "wb") as out:
            try:
                subprocess.run(args, cwd=run, env=env, stdout=out, stderr=subprocess.STDOUT,
                               timeout=timeout)
            except subprocess.TimeoutExpired:
                out.write(f"\n!! suite run killed after {timeout}s\n".encode())
        elapsed = time.monotonic() - t0
        left = target.finish()
    finally:
        target.stop()
    return {"kind": kind, "results": common.parse_junit(junit), "seconds": round(elapsed, 1),
            "log": str(log), **left}


def node_id(tid: str) -> str:
    """tests.test_x.TestY::test_z[param] -> tests/test_x.py::TestY::test_z[param]."""
    cls, name = tid.split("::", 1)
    parts = cls.split(".")
    # the module is the last dotted part that starts with test_
    k = max(i for i, p in enumerate(parts) if p.startswith("test_"))
    return "/".join(parts[:k + 1]) + ".py::" + "::".join(parts[k + 1:] + [name])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="a psycopg source checkout")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--select", default="", help="space-separated pytest targets")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--reruns", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    select = args.select.split()
    workdir = Path(tempfile.mkdtemp(prefix="psycopg-suite-"))
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fd = ex.submit(run_one, "direct", args.src, args.python, workdir, select, args.timeout)
        ft = ex.submit(run_one, "pgguard", args.src, args.python, workdir, select, args.timeout)
        direct, through = fd.result(), ft.result()
    first = common.compare(direct, through)
    left = dict(first)
    for _ in range(args.reruns):
        if not left:
            break
        again = run_one("pgguard", args.src, args.python, workdir,
                        [node_id(t) for t in left], args.timeout)
        for tid in list(left):
            if again["results"].get(tid, ("missing",))[0] == "passed":
                del left[tid]
    print(f"psycopg suite ({args.src})")
    print(f"  direct:  {common.counts(direct)}")
    print(f"  pgguard: {common.counts(through)}; proxy alive: {through['proxy_alive']}; "
          f"tracebacks in its log: {through['tracebacks']}")
    print(f"passes directly, not through pgguard (alongside): {len(first)}; "
          f"never through pgguard: {len(left)}")
    for tid, what in sorted(left.items()):
        print(f"  {tid}\n      {what}")
    if args.json:
        args.json.write_text(json.dumps({"direct": direct, "pgguard": through, "first": first,
                                         "never": sorted(left.items())}, indent=1))
    print(f"work directory: {workdir}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
