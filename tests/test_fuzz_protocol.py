# The seeded protocol fuzzer (tests/fuzz/pgfuzz.py), a short run per identity: startup
# packets and frontend messages, split at random, mutated, pipelined and in wrong states,
# sent to Postgres and to pgguard; pgguard must stay up, never hang, log no traceback, keep
# its RSS bounded, keep a healthy session alongside working (masking intact for the guarded
# agent), and answer every case with the same class of reply as Postgres (SQLSTATEs in
# order, then ready / closed). A fixed seed set (PGFUZZ_SEED, PGFUZZ_CASES per identity).
# Long run: python tests/fuzz/pgfuzz.py --seconds 600 (or --cases N)
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))

import pgfuzz  # noqa: E402
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER  # noqa: E402
from guarded import guarded_proxy  # noqa: E402

# a fixed seed set: the same cases every run (case count, not wall time, bounds a run)
CASES = int(os.environ.get("PGFUZZ_CASES", "80"))          # per identity
SEED = int(os.environ.get("PGFUZZ_SEED", "13"))
RSS_BOUND_KB = 64 * 1024


def _judge(rep: pgfuzz.Report) -> None:
    print(rep.summary(limit=20))
    assert rep.cases == CASES, f"the fuzzer did not run its cases: {rep.cases} of {CASES}"
    assert not rep.crashed, rep.summary()
    assert not rep.hangs, rep.summary()
    assert rep.tracebacks == 0, rep.summary()
    assert rep.rss_end_kb - rep.rss_start_kb <= RSS_BOUND_KB, rep.summary()
    assert not rep.healthy_failures, rep.summary()
    # every case answered with the reply class Postgres gives it (SQLSTATEs in order,
    # then ready / closed / closed after the client's EOF)
    assert not rep.mismatches, rep.summary(limit=40)


@pytest.fixture(scope="module")
def fuzz_upstream(pg):
    pgfuzz.prepare_upstream(pg)
    return pgfuzz.Target(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD)


def test_fuzz_allow_identity(fuzz_upstream, make_proxy):
    p = make_proxy()
    rep = pgfuzz.run(fuzz_upstream, pgfuzz.Target(p.port, AGENT, AGENT_PASSWORD), p.proc, p.log,
                     seed=SEED, seconds=3600, max_cases=CASES, guarded=False)
    _judge(rep)


def test_fuzz_guarded_agent_with_masks(fuzz_upstream, pg, tmp_path):
    with guarded_proxy(pg, tmp_path, extra=pgfuzz.GUARDED_EXTRA) as p:
        rep = pgfuzz.run(fuzz_upstream, pgfuzz.Target(p.port, AGENT, AGENT_PASSWORD), p.proc,
                         p.log, seed=SEED + 1, seconds=3600, max_cases=CASES,
                         guarded=True)
    _judge(rep)
