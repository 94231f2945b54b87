# Malformed frames answered the way Postgres answers them, for an identity nothing parses
# for ("allow") and a guarded one with masks: each case goes to Postgres directly and to
# pgguard, and the reply class (SQLSTATEs in order, then ready / closed) must be equal;
# what the statement would have done is judged on the upstream. Classes:
#   over-long messages of types Postgres reads small (10000 bytes): it closes silently
#   lengths past Postgres' own 1 GB bound under a policy: it closes silently, not pgguard's
#     own 08P01
#   Query / Parse malformed as Postgres reads them: its own 08P01 ERROR, then on
#   malformed FunctionCalls under a policy: Postgres' own error (42883 first), nothing runs
from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))

import pgfuzz  # noqa: E402
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER  # noqa: E402
from guarded import guarded_proxy  # noqa: E402
from rawpg import SYNC, bind, cstr, execute, frame, parse, query  # noqa: E402

OVERLONG_SMALL = {
    "sync-10001": b"S" + struct.pack("!I", 10001),
    "flush-98308": b"H\x00\x01\x80\x04",
    "describe-17408": b"D\x00\x00\x44\x00" + b"S" + b"x" * 20,
    "execute-65536": b"E" + struct.pack("!I", 65536) + cstr("") + b"\0\0\0\0",
    "close-1m": b"C" + struct.pack("!I", 1 << 20) + b"S",
    "copydone-20000": b"c" + struct.pack("!I", 20000),
    "terminate-10005": b"X" + struct.pack("!I", 10005),
}

PAST_PG_BOUND = {
    "query-neg": b"Q\xff\xff\xff\xf0SELECT 1",
    "query-2g": b"Q\x80\x00\x00\x00SELECT 1",
    "parse-1g": b"P\x40\x00\x00\x00" + cstr("") + cstr("SELECT 1"),
    "bind-4g": b"B\xff\xff\xff\xff",
    "copydata-3g": b"d\xc0\x00\x00\x00xx",
    "function-call-2g": b"F\x7f\xff\xff\xff\x00\x00",
}

MALFORMED_STATEMENTS = {
    "query-no-nul": frame(b"Q", b"SELECT 1"),
    "query-embedded-nul": frame(b"Q", b"SELECT 1\0DROP TABLE fr_keep\0"),
    "query-trailing": frame(b"Q", b"SELECT 1\0\0"),
    "parse-name-only": frame(b"P", b"stmt-without-nul"),
    "parse-no-count": frame(b"P", cstr("") + cstr("SELECT 1")),
    "parse-short-oids": frame(b"P", cstr("") + cstr("SELECT $1") + struct.pack("!hI", 2, 23)),
    "parse-trailing": frame(b"P", cstr("s1") + cstr("DROP TABLE fr_keep") + b"\0\0" + b"zz"),
    "parse-then-bind-execute": frame(b"P", cstr("") + cstr("DROP TABLE fr_keep"))
    + bind() + execute() + SYNC,
}


def _fncall_cases(bump_oid: int) -> dict[str, bytes]:
    ok = struct.pack("!Ihh", bump_oid, 0, 0) + struct.pack("!h", 0)
    return {
        "unknown-oid-trailing": frame(b"F", struct.pack("!IhhIh", 1, 0, 0, 0, 0)),
        "unknown-oid-short": frame(b"F", struct.pack("!I", 4242)),
        "bump-trailing": frame(b"F", ok + b"\0\0\0\0"),
        "bump-short": frame(b"F", ok[:-2]),
        "bump-extra-arg": frame(b"F", struct.pack("!Ihhhi", bump_oid, 0, 0, 1, 1) + b"7"
                                + struct.pack("!h", 0)),
        "bump-neg-args": frame(b"F", struct.pack("!Ihh", bump_oid, 0, -3) + struct.pack("!h", 0)),
    }


@pytest.fixture(scope="module")
def frames_upstream(pg):
    pgfuzz.prepare_upstream(pg)
    pg.execute("""
        DROP TABLE IF EXISTS fr_keep, fr_bumps;
        CREATE TABLE fr_keep (a int); INSERT INTO fr_keep VALUES (1);
        CREATE TABLE fr_bumps (at timestamptz);
        GRANT ALL ON fr_keep, fr_bumps TO PUBLIC;
        CREATE OR REPLACE FUNCTION public.fr_bump() RETURNS int LANGUAGE sql
            AS 'INSERT INTO fr_bumps VALUES (now()) RETURNING 1';
    """)
    return pgfuzz.Target(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD)


@pytest.fixture(params=["allow", "guarded"])
def target(request, make_proxy, pg, tmp_path):
    if request.param == "allow":
        p = make_proxy()
        yield pgfuzz.Target(p.port, AGENT, AGENT_PASSWORD)
        return
    with guarded_proxy(pg, tmp_path, extra=pgfuzz.GUARDED_EXTRA) as p:
        yield pgfuzz.Target(p.port, AGENT, AGENT_PASSWORD)


def _same_as_postgres(direct, target, cases: dict[str, bytes]) -> dict[str, tuple]:
    got = {}
    diffs = []
    for i, (name, data) in enumerate(sorted(cases.items())):
        case = pgfuzz.Case("session", name, data)
        want = pgfuzz.run_case(direct, case, i, 3.0)
        have = pgfuzz.run_case(target, case, i, 3.0)
        got[name] = have
        if want != have:
            diffs.append(f"{name}: postgres {want} pgguard {have}")
    assert not diffs, "\n".join(diffs)
    return got


def test_overlong_small_messages_close_silently(frames_upstream, target):
    got = _same_as_postgres(frames_upstream, target, OVERLONG_SMALL)
    assert all(g == ("closed",) for g in got.values()), got


def test_lengths_past_postgres_bound_close_silently(frames_upstream, target):
    got = _same_as_postgres(frames_upstream, target, PAST_PG_BOUND)
    assert all(g == ("closed",) for g in got.values()), got


def test_malformed_statements_get_postgres_error_and_run_nothing(frames_upstream, target, pg):
    got = _same_as_postgres(frames_upstream, target, MALFORMED_STATEMENTS)
    assert all(g[0] == "ready" and "08P01" in g for g in got.values()), got
    assert pg.execute("SELECT count(*) FROM fr_keep") == [(1,)]


def test_malformed_function_calls_get_postgres_answer_and_call_nothing(frames_upstream,
                                                                      target, pg):
    oid = pg.execute("SELECT 'public.fr_bump()'::regprocedure::oid")[0][0]
    before = pg.execute("SELECT count(*) FROM fr_bumps")[0][0]
    got = _same_as_postgres(frames_upstream, target, _fncall_cases(oid))
    assert all(g[0] == "ready" for g in got.values()), got
    assert got["unknown-oid-trailing"] == ("ready", "42883")
    assert pg.execute("SELECT count(*) FROM fr_bumps")[0][0] == before


def test_pg_rejects_reads_fields_as_postgres_does():
    from pgguard.proxy.enforce import _pg_rejects
    assert not _pg_rejects(query("SELECT 1"))
    assert not _pg_rejects(parse("SELECT $1", types=[23]))
    assert not _pg_rejects(frame(b"P", cstr("") + cstr("SELECT 1") + b"\0\0"))
    for bad in MALFORMED_STATEMENTS.values():
        first = bad[:struct.unpack("!I", bad[1:5])[0] + 1]
        assert _pg_rejects(first), first


CANCELS = {f"cancel-{i}": struct.pack("!IIII", 16, 80877102, pid, key) for i, (pid, key) in
           enumerate([(0xFE29BBDE, 0x8B20B700), (0xFFFFFFFF, 0xFFFFFFFF), (0x80000000, 0),
                      (1, 0xFFFFFFFF), (0x7FFFFFFF, 0x80000001)])}


def test_cancel_requests_with_any_key_close_silently(frames_upstream, target):
    # a CancelRequest whose key matches nothing: Postgres closes without a word (the key's
    # high bits once overflowed the approvals store's lookup: XX000 and a traceback)
    from rawpg import RawClient
    warm = RawClient.connect(target.port, target.user, target.password)
    warm.run("SELECT 1")       # a started pgguard (catalogs loaded), as a client meets it
    warm.close()
    diffs = []
    for i, (name, data) in enumerate(sorted(CANCELS.items())):
        case = pgfuzz.Case("startup", name, data)
        want = pgfuzz.run_case(frames_upstream, case, i, 3.0)
        have = pgfuzz.run_case(target, case, i, 3.0)
        if want != have or have != ("closed",):
            diffs.append(f"{name}: postgres {want} pgguard {have}")
    assert not diffs, "\n".join(diffs)


def test_approvals_store_takes_any_cancel_key(tmp_path):
    from pgguard.approvals.store import _int64
    assert _int64(5) == 5
    assert _int64((1 << 64) - 1) == -1
    assert _int64(1 << 63) == -(1 << 63)
    assert len({_int64(k) for k in (0, 1 << 63, (1 << 64) - 1, (1 << 63) - 1)}) == 4
