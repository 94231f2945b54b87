# asyncpg's own test suite in CI: its sdist (the installed asyncpg's version, from the
# package index, cached under $PGGUARD_PEERS_CACHE or ~/.cache/pgguard/peers) runs directly
# against Postgres and through pgguard, each on its own Postgres; every test that passes
# directly must pass through pgguard (tests/peers/run_asyncpg_suite.py: the harness, and
# what a test that fails only under load gets). About 2.5 minutes on 2 cores.
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "peers"))

import run_asyncpg_suite as peer  # noqa: E402


def test_asyncpg_suite_passes_through_pgguard(tmp_path):
    suite = peer.fetch_suite()
    modules = list(peer.DEFAULT_MODULES)
    res = peer.compare_suite(suite, tmp_path, modules, timeout=1200, reruns=15)
    print(peer.report(suite, modules, res))
    direct, through = res["direct"], res["pgguard"]
    passed_direct = sum(1 for o, _ in direct["results"].values() if o == "passed")
    # the direct run is the yardstick: it must itself have run asyncpg's suite
    assert passed_direct >= 250, peer.counts(direct)
    assert len(through["results"]) == len(direct["results"]), (
        peer.counts(direct), peer.counts(through))
    assert through["proxy_alive"], through["proxy_log"][-3000:]
    assert through["tracebacks"] == 0, through["proxy_log"][-3000:]
    assert not res["regressions"], peer.report(suite, modules, res)


def test_node_ids_name_what_junit_reports():
    assert peer.node_id("tests.test_execute.TestExecuteMany::test_executemany_basic") == \
        "tests/test_execute.py::TestExecuteMany::test_executemany_basic"
    results = {"t.a::x": ("passed", ""), "t.a::y": ("passed", ""), "t.a::z": ("failed", "e")}
    through = {"t.a::x": ("passed", ""), "t.a::y": ("failed", "boom")}
    assert peer.compare({"results": results}, {"results": through}) == [
        ("t.a::y", "failed: boom")]
