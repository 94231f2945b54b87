#!/usr/bin/env python3
"""asyncpg's own test suite, run directly against Postgres and through pgguard, compared.

    python tests/peers/run_asyncpg_suite.py [--modules test_execute,test_copy,...] [--all]

The suite comes from asyncpg's sdist on the package index, for the asyncpg version installed
in this interpreter (`pip download --no-deps --no-binary asyncpg`; cached under
$PGGUARD_PEERS_CACHE, else $XDG_CACHE_HOME/pgguard/peers or ~/.cache/pgguard/peers). Its `tests/` run with the sdist's
`asyncpg/_testbase` against the installed (compiled) asyncpg.

asyncpg's testbase starts its own cluster unless PGHOST is set; with PGHOST it uses
`cluster.RunningCluster()`, whose connection spec is empty, so every connection takes libpq's
environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE). Two runs, each on its
own fresh Postgres (the tests create and drop fixed names, so they must not share one):

    direct   PGUSER=app (the upstream superuser), straight to Postgres
    pgguard  PGUSER=ci-agent (agent identity, `[policy] agents = "allow"`, no masks) through a
             pgguard whose upstream user is that same superuser

Tests needing a cluster asyncpg manages itself (pg_hba edits, restarts, standbys) fail or
skip the same way in both runs; the judgement is only "passes directly => passes through
pgguard". The two runs go at once on a machine that may be busy, so a test that passes
directly and fails through pgguard is run again, alone, through pgguard (--reruns times):
one that then passes depends on timing under load; one that never passes is a difference.
The one known such test is asyncpg's test_executemany_server_failure_during_writes: it
writes 4 MB of Bind/Execute (about 2 ms of writing) and asserts it stopped early, i.e. the
server's ErrorResponse for the second row reached it before its last write. Directly that
takes a fresh backend about 0.5 ms; through pgguard one more process shares the 2 cores
and the upstream backend is as fresh (PgBouncer passes it with a pooled, warm backend), so
it passes about one time in three alone here (it fails directly too on a loaded
machine). Prints the per-run counts and every difference (with its first error line),
and exits 1 when one never passes through pgguard. tests/test_peer_asyncpg.py runs this
in CI.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# asyncpg's test modules that exercise what a proxy relays, and why each is chosen:
#   test_execute, test_prepare      simple/extended protocol, prepared statements, pipelining
#   test_cursor                     portals, Execute with row limits, scrollable cursors
#   test_copy                       COPY in/out, in both formats, with and without records
#   test_listeners                  LISTEN/NOTIFY (drops own notifications by backend pid),
#                                   NoticeResponse, termination listeners
#   test_cancellation, test_timeout CancelRequest routing by BackendKeyData, timeouts
#   test_transaction                BEGIN/COMMIT/ROLLBACK, savepoints, isolation levels
#   test_codecs                     binary transfer of every built-in type (server-side types)
#   test_pool                       many connections, reset queries, pid use, release/terminate
#   test_cache_invalidation         statement cache vs. DDL (error-driven re-prepare)
#   test_introspection              type introspection queries over the extended protocol
#   test_exceptions, test_record    error fields (SQLSTATE, detail, position), row decoding
#   test_adversity                  connection loss mid-query (via asyncpg's fuzzing proxy)
#   test_logging, test_utils        log messages, copy utilities
# Left out: test__sourcecode (flake8 of asyncpg's own tree), test__environment (compares the
# server version with an env var), test_test (the testbase itself), test_subinterpreters
# (interpreter feature, no server), test_scram (SASLprep unit tests, no server), test_types
# (pure Python Range/etc., no server), test_connect (imports `distro`, which the project's
# environment does not have; its server tests need a cluster asyncpg manages: pg_hba edits).
DEFAULT_MODULES = (
    "test_execute", "test_prepare", "test_cursor", "test_copy", "test_listeners",
    "test_cancellation", "test_timeout", "test_transaction", "test_codecs", "test_pool",
    "test_cache_invalidation", "test_introspection", "test_exceptions", "test_record",
    "test_adversity", "test_logging", "test_utils",
)

# conftest for the suite's run directory: asyncpg._testbase comes from the sdist (the package
# itself stays the installed, compiled one).
_CONFTEST = '''
import importlib.util, sys
import asyncpg
_tb = {testbase!r}
spec = importlib.util.spec_from_file_location(
    "asyncpg._testbase", _tb + "/__init__.py", submodule_search_locations=[_tb])
mod = importlib.util.module_from_spec(spec)
sys.modules["asyncpg._testbase"] = mod
spec.loader.exec_module(mod)
asyncpg._testbase = mod
'''


def cache_dir() -> Path:
    if os.environ.get("PGGUARD_PEERS_CACHE"):
        return Path(os.environ["PGGUARD_PEERS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "pgguard" / "peers"


def fetch_suite(python: str = sys.executable) -> Path:
    """The unpacked sdist of the installed asyncpg version (downloaded once, then cached)."""
    version = subprocess.run([python, "-c", "import asyncpg; print(asyncpg.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    root = cache_dir()
    unpacked = root / f"asyncpg-{version}"
    if (unpacked / "tests").is_dir() and (unpacked / "asyncpg" / "_testbase").is_dir():
        return unpacked
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        # --no-binary only for asyncpg: with :all: pip also builds Cython and setuptools from
        # source for the sdist's metadata step (over 5 minutes on 2 cores).
        subprocess.run([python, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--no-deps", "--no-binary", "asyncpg", f"asyncpg=={version}", "-d", tmp],
                       check=True, timeout=600)
        sdist = next(Path(tmp).glob("asyncpg-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        shutil.move(str(Path(tmp) / f"asyncpg-{version}"), unpacked)
    return unpacked


def _prepare_rundir(suite: Path, where: Path, modules: list[str]) -> Path:
    run = where / "suite"
    shutil.copytree(suite / "tests", run / "tests")
    (run / "conftest.py").write_text(_CONFTEST.format(testbase=str(suite / "asyncpg" / "_testbase")))
    (run / "pytest.ini").write_text("[pytest]\n")
    missing = [m for m in modules
               if not (run / (m.split("::")[0] if "::" in m else f"tests/{m}.py")).exists()]
    if missing:
        raise SystemExit(f"no such asyncpg test module: {', '.join(missing)}")
    return run


def node_id(tid: str) -> str:
    """pytest's node id of a junit test id: tests.test_x.TestY::test_z ->
    tests/test_x.py::TestY::test_z."""
    cls, name = tid.split("::")
    parts = cls.split(".")
    return f"{parts[0]}/{parts[1]}.py::{'::'.join(parts[2:] + [name])}"


def _run_pytest(run: Path, env: dict, modules: list[str], junit: Path, log: Path,
                timeout: float) -> None:
    # modules: module names, or node ids (a rerun of single tests)
    targets = [m if "::" in m else f"tests/{m}.py" for m in modules]
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--tb=line",
            "--assert=plain", "--import-mode=importlib", "-o", "addopts=",
            f"--junitxml={junit}", *targets]
    with open(log, "wb") as out:
        try:
            subprocess.run(args, cwd=run, env=env, stdout=out, stderr=subprocess.STDOUT,
                           timeout=timeout)
        except subprocess.TimeoutExpired:
            out.write(f"\n!! suite run killed after {timeout}s\n".encode())


def parse_junit(path: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first line of the failure) from pytest's junit xml."""
    results: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return results
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                msg = (el.get("message") or el.text or "").strip().splitlines()
                msg = msg[0][:300] if msg else ""
                if tag != "skipped":
                    break
        # a test that errors in teardown after passing still counts as failed
        if outcome == "passed" or results.get(tid, ("",))[0] != "failed":
            results[tid] = (outcome, msg)
    return results


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST="127.0.0.1", PGDATABASE="postgres", PGSSLMODE="disable",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)    # the suite must not import this repo's tests package
    return env


class Target:
    """One run's server (used by the psycopg and node-postgres harnesses too): a fresh
    Postgres whose superuser is the upstream user, and for kind "pgguard" a pgguard before
    it (the agent identity, `[policy] agents = "allow"`); port/user/password name what the
    suite connects to."""

    def __init__(self, kind: str, where: Path, upstream_extra: str = "",
                 database: str | None = None) -> None:
        from conftest import (AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD,  # noqa
                              UPSTREAM_USER, Proxy)
        from pgcluster import PgCluster
        self.cluster = PgCluster().start()
        self.proxy = None
        try:
            self.cluster.create_role(UPSTREAM_USER, UPSTREAM_PASSWORD, "scram-sha-256")
            self.cluster.execute(f"ALTER ROLE {UPSTREAM_USER} SUPERUSER")
            if database:
                self.cluster.execute(f"CREATE DATABASE {database} OWNER {UPSTREAM_USER}")
            if kind == "direct":
                self.port, self.user = self.cluster.port, UPSTREAM_USER
                self.password = UPSTREAM_PASSWORD
            else:
                self.proxy = Proxy(self.cluster, where, upstream_extra=upstream_extra).start()
                self.port, self.user, self.password = self.proxy.port, AGENT, AGENT_PASSWORD
        except BaseException:
            self.stop()
            raise

    def finish(self) -> dict:
        """What the proxy left behind, for the report."""
        log = self.proxy.output() if self.proxy else ""
        return {"proxy_log": log,
                "proxy_alive": self.proxy is None or self.proxy.proc.poll() is None,
                "tracebacks": log.count("Traceback (most recent call last)")}

    def stop(self) -> None:
        if self.proxy:
            self.proxy.stop()
        self.cluster.stop()


def run_one(kind: str, suite: Path, workdir: Path, modules: list[str], timeout: float) -> dict:
    """One run on its own Postgres: kind is "direct" or "pgguard"; modules are module
    names or node ids."""
    where = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
    run = _prepare_rundir(suite, where, modules)
    target = Target(kind, where)
    try:
        env = _base_env()
        env.update(PGPORT=str(target.port), PGUSER=target.user, PGPASSWORD=target.password)
        t0 = time.monotonic()
        junit, log = where / "junit.xml", where / "pytest.log"
        _run_pytest(run, env, modules, junit, log, timeout)
        elapsed = time.monotonic() - t0
        left = target.finish()
    finally:
        target.stop()
    return {"kind": kind, "results": parse_junit(junit), "seconds": round(elapsed, 1),
            "log": str(log), **left}


def compare(direct: dict, through: dict) -> list[tuple[str, str]]:
    """Tests passing directly and not through pgguard: [(test id, what pgguard gave)]."""
    out = []
    for tid, (outcome, _) in sorted(direct["results"].items()):
        if outcome != "passed":
            continue
        got, msg = through["results"].get(tid, ("missing", "not run (suite killed or crashed)"))
        if got != "passed":
            out.append((tid, f"{got}: {msg}"))
    return out


def rerun(regressions: list[tuple[str, str]], suite: Path, workdir: Path, times: int,
          timeout: float) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Run each test that failed only through pgguard again through pgguard, alone (its
    own Postgres and pgguard, nothing else running in the suite), up to ``times`` times.
    Returns the ones that never passed, and for the others the try that passed: a test
    that passes alone is timing-dependent under load, not a difference in what pgguard
    relays."""
    left = dict(regressions)
    passed_on: dict[str, int] = {}
    for attempt in range(1, times + 1):
        if not left:
            break
        again = run_one("pgguard", suite, workdir, [node_id(t) for t in left], timeout)
        for tid in list(left):
            got, msg = again["results"].get(tid, ("missing", "not run"))
            if got == "passed":
                passed_on[tid] = attempt
                del left[tid]
            else:
                left[tid] = f"{got}: {msg}"
    return sorted(left.items()), passed_on


def compare_suite(suite: Path, workdir: Path, modules: list[str], *, timeout: float = 1200,
                  sequential: bool = False, reruns: int = 3) -> dict:
    """The whole judgement: both runs (at once unless ``sequential``), the differences,
    and the reruns of those differences through pgguard alone."""
    if sequential:
        direct = run_one("direct", suite, workdir, modules, timeout)
        through = run_one("pgguard", suite, workdir, modules, timeout)
    else:
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            fd = ex.submit(run_one, "direct", suite, workdir, modules, timeout)
            ft = ex.submit(run_one, "pgguard", suite, workdir, modules, timeout)
            direct, through = fd.result(), ft.result()
    first = compare(direct, through)
    regressions, passed_on = rerun(first, suite, workdir, reruns, timeout) if first \
        else ([], {})
    return {"direct": direct, "pgguard": through, "first": first,
            "regressions": regressions, "passed_on_rerun": passed_on}


def report(suite: Path, modules: list[str], res: dict) -> str:
    direct, through = res["direct"], res["pgguard"]
    out = [f"asyncpg suite ({suite.name}, {len(modules)} modules)",
           f"  direct:  {counts(direct)}",
           f"  pgguard: {counts(through)}; proxy alive: {through['proxy_alive']}; "
           f"tracebacks in its log: {through['tracebacks']}",
           f"passes directly, not through pgguard (in the run alongside): {len(res['first'])}"]
    for tid, what in res["first"]:
        out.append(f"  {tid}\n      {what}")
        if tid in res["passed_on_rerun"]:
            out.append(f"      passed through pgguard when run alone (try "
                       f"{res['passed_on_rerun'][tid]}): timing under load")
    out.append(f"passes directly, never through pgguard: {len(res['regressions'])}")
    for tid, what in res["regressions"]:
        out.append(f"  {tid}\n      {what}")
    return "\n".join(out)


def counts(run: dict) -> str:
    c: dict[str, int] = {}
    for outcome, _ in run["results"].values():
        c[outcome] = c.get(outcome, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(c.items())) + f" in {run['seconds']}s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default=",".join(DEFAULT_MODULES),
                    help="comma-separated asyncpg test modules (default: the proxy-relevant set)")
    ap.add_argument("--all", action="store_true", help="every test module in the sdist")
    ap.add_argument("--timeout", type=float, default=1200, help="per run, seconds")
    ap.add_argument("--sequential", action="store_true",
                    help="run direct, then pgguard (default: both at once, each on its own Postgres)")
    ap.add_argument("--json", type=Path, help="write the comparison here as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--reruns", type=int, default=15,
                    help="tries, alone through pgguard, of a test that failed only there")
    args = ap.parse_args(argv)

    suite = fetch_suite()
    modules = ([p.stem for p in sorted((suite / "tests").glob("test_*.py"))] if args.all
               else [m.strip() for m in args.modules.split(",") if m.strip()])
    workdir = Path(tempfile.mkdtemp(prefix="pgguard-asyncpg-suite-"))
    try:
        res = compare_suite(suite, workdir, modules, timeout=args.timeout,
                            sequential=args.sequential, reruns=args.reruns)
        print(report(suite, modules, res))
        direct, through = res["direct"], res["pgguard"]
        if args.json:
            args.json.write_text(json.dumps({
                "suite": suite.name, "modules": modules,
                "direct": {k: list(v) for k, v in direct["results"].items()},
                "pgguard": {k: list(v) for k, v in through["results"].items()},
                "first": res["first"], "regressions": res["regressions"],
                "passed_on_rerun": res["passed_on_rerun"],
                "proxy_alive": through["proxy_alive"], "tracebacks": through["tracebacks"],
                "seconds": {"direct": direct["seconds"], "pgguard": through["seconds"]},
            }, indent=1))
        if args.keep:
            print(f"work directory kept: {workdir}")
        return 1 if res["regressions"] or not through["proxy_alive"] else 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
