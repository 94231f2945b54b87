# asyncpg's own test suite (from its sdist) directly and through pgguard: every test that
# passes directly must pass through the proxy (an allow identity, no policy, no masks).
# tests/peers/run_asyncpg_suite.py does the work; the module selection and its reasons are in
# its DEFAULT_MODULES. Measured on 2 shared cores: ~90 s direct and ~105 s through pgguard,
# run at the same time on two Postgres instances.
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "peers"))

import run_asyncpg_suite as suite  # noqa: E402

BUDGET = 900   # seconds per run; the pair runs concurrently


def test_asyncpg_suite_passes_through_pgguard_as_directly(tmp_path):
    code = suite.main(["--timeout", str(BUDGET), "--json", str(tmp_path / "result.json")])
    import json
    result = json.loads((tmp_path / "result.json").read_text())
    direct = result["direct"]
    passed_direct = [t for t, (outcome, _) in direct.items() if outcome == "passed"]
    # the harness can fail: a suite that did not run at all is not a pass
    assert len(passed_direct) > 200, f"asyncpg's suite barely ran directly: {len(passed_direct)}"
    assert result["proxy_alive"], "pgguard died during asyncpg's suite"
    assert result["tracebacks"] == 0, "tracebacks in pgguard's log during asyncpg's suite"
    listing = "\n".join(f"{t}: {why}" for t, why in result["regressions"])
    assert not result["regressions"], (
        f"{len(result['regressions'])} asyncpg tests pass directly but not through pgguard:\n"
        + listing)
    assert code == 0
