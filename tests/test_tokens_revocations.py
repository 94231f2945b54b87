# Revocations: written by one process, seen by every other worker within a second; guard_session.
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgguard import config
from pgguard.auth import revocations, tokens
from pgguard.auth.revocations import RevocationWatcher

SECRET = "revocation-test-secret-0123456789abcdef"


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("PGGUARD_TOKEN_SECRET", SECRET)
    f = tmp_path / "pgguard.toml"
    f.write_text('[auth]\nstate_dir = "state"\n[identities.ci-agent]\n')
    return config.load(f)


def test_state_dir_is_relative_to_the_config(cfg, tmp_path):
    assert revocations.store_path(cfg) == tmp_path / "state" / "revocations.jsonl"


def test_revoke_then_verify_refuses(cfg):
    token, claims = tokens.issue(cfg, "ci-agent")
    w = RevocationWatcher.from_config(cfg)
    tokens.verify(cfg, token, revocations=w)
    revocations.revoke(cfg, claims.token_id, expires_at=claims.expires_at)
    with pytest.raises(tokens.TokenRevoked):
        tokens.verify(cfg, token, revocations=w)       # is_revoked polls when stale
    assert (revocations.state_dir(cfg).stat().st_mode & 0o777) == 0o700


def test_watcher_without_a_file(tmp_path):
    w = RevocationWatcher(tmp_path / "missing" / "revocations.jsonl")
    assert not w.is_revoked("x") and w.poll() == frozenset()


def test_poll_reports_only_new_ids_and_calls_listeners(cfg):
    w = RevocationWatcher.from_config(cfg)
    seen: list[frozenset[str]] = []
    remove = w.add_listener(seen.append)
    fired: list[str] = []
    w.watch("b", fired.append)
    revocations.revoke(cfg, "a")
    assert w.poll() == {"a"}
    assert w.poll() == frozenset()          # unchanged file: one stat, nothing new
    revocations.revoke(cfg, "b")
    revocations.revoke(cfg, "a")            # twice is harmless
    assert w.poll() == {"b"}
    assert seen == [{"a"}, {"b"}] and fired == ["b"]
    remove()
    revocations.revoke(cfg, "c")
    w.poll()
    assert len(seen) == 2 and w.revoked == {"a", "b", "c"}
    already: list[str] = []
    w.watch("a", already.append)            # already revoked: called at once
    assert already == ["a"]


def test_unwatch(cfg):
    w = RevocationWatcher.from_config(cfg)
    fired: list[str] = []
    stop = w.watch("t1", fired.append)
    stop()
    revocations.revoke(cfg, "t1")
    w.poll()
    assert fired == []


def test_partial_line_is_ignored_until_complete(cfg):
    path = revocations.store_path(cfg)
    revocations.revoke(cfg, "first")
    w = RevocationWatcher(path)
    with open(path, "ab") as f:
        f.write(b'{"jti":"second","exp":99999999999,"at":1')
    assert w.poll() == frozenset()
    with open(path, "ab") as f:
        f.write(b"}\n")
    assert w.poll() == {"second"}


def test_garbage_line_is_skipped(cfg):
    path = revocations.store_path(cfg)
    revocations.revoke(cfg, "ok1")
    with open(path, "ab") as f:
        f.write(b"not json\n")
    revocations.revoke(cfg, "ok2")
    assert RevocationWatcher(path).revoked == {"ok1", "ok2"}


def test_expired_records_are_pruned(cfg):
    now = time.time()
    revocations.revoke(cfg, "old", expires_at=int(now - 3600), now=now - 7200)
    revocations.revoke(cfg, "fresh", expires_at=int(now + 3600))
    revocations.revoke(cfg, "by-id")        # unknown expiry: now + max_ttl
    ids = [r.jti for r in revocations.read(revocations.store_path(cfg))]
    assert ids == ["fresh", "by-id"]
    rec = revocations.read(revocations.store_path(cfg))[-1]
    assert rec.exp - rec.at == 24 * 3600


def test_watcher_notices_a_prune_rename(cfg):
    now = time.time()
    revocations.revoke(cfg, "old", expires_at=int(now - 3600), now=now - 7200)
    w = RevocationWatcher.from_config(cfg)
    assert w.revoked == {"old"}
    revocations.revoke(cfg, "new")          # rewrites (prunes "old") then appends
    assert w.poll() == {"new"} and w.revoked == {"new"}


_WORKER = r"""
import sys, time
from pgguard import config
from pgguard.auth import revocations
cfg = config.load(sys.argv[1])
w = revocations.RevocationWatcher.from_config(cfg)
print("ready", flush=True)
deadline = time.monotonic() + 10
while not w.is_revoked(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.01)
print("seen" if w.is_revoked(sys.argv[2]) else "missed", flush=True)
"""


def test_another_worker_sees_a_revocation_within_a_second(cfg, tmp_path):
    token, claims = tokens.issue(cfg, "ci-agent")
    cfg_file = str(tmp_path / "pgguard.toml")
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, cfg_file, claims.token_id],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        # revoke with the real CLI entry point from a third process
        r = subprocess.run([sys.executable, "-c",
                            "import sys; from pgguard.auth import cli; "
                            "sys.exit(cli.main('revoke', sys.argv[1:]))",
                            "-c", cfg_file, token], capture_output=True, text=True,
                           env=os.environ.copy())
        assert r.returncode == 0, r.stderr
        t_revoked = time.monotonic()
        assert worker.stdout.readline().strip() == "seen"
        assert time.monotonic() - t_revoked < 1.0, "worker took longer than a second"
        assert time.monotonic() - t0 < 10
    finally:
        worker.kill()
        worker.wait()


def test_watcher_started_on_a_loop_fires_within_a_second(cfg):
    async def main() -> float:
        loop = asyncio.get_running_loop()
        w = RevocationWatcher.from_config(cfg)
        w.start(loop)
        fired = loop.create_future()
        w.add_listener(lambda ids: fired.done() or fired.set_result(time.monotonic()))
        t0 = time.monotonic()
        # another process writes
        await asyncio.to_thread(subprocess.run, [
            sys.executable, "-c",
            "import sys; from pgguard import config; from pgguard.auth import revocations;"
            "revocations.revoke(config.load(sys.argv[1]), 'zz')",
            str(Path(cfg.base_dir) / "pgguard.toml")], check=True)
        t_written = time.monotonic()
        at = await asyncio.wait_for(fired, 5)
        w.stop()
        assert at >= t0
        return at - t_written
    assert asyncio.run(main()) < 1.0


_WRITER = r"""
import sys
from pgguard import config
from pgguard.auth import revocations
cfg = config.load(sys.argv[1])
for i in range(40):
    revocations.revoke(cfg, f"{sys.argv[2]}-{i}")
"""


def test_concurrent_writers_lose_nothing(cfg, tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "pgguard.toml"),
                               f"w{n}"]) for n in range(6)]
    for p in procs:
        assert p.wait(60) == 0
    lines = revocations.store_path(cfg).read_bytes().split(b"\n")
    assert lines[-1] == b""
    ids = {r.jti for r in revocations.read(revocations.store_path(cfg))}
    assert ids == {f"w{n}-{i}" for n in range(6) for i in range(40)}


def test_guard_session_expiry_and_revocation(cfg):
    async def main() -> list:
        loop = asyncio.get_running_loop()
        w = RevocationWatcher.from_config(cfg, interval=0.05)
        w.start(loop)
        ended: list = []
        # expires in 0.3 s
        revocations.guard_session(loop, w, "ci-agent", "t-exp", time.time() + 0.3,
                                  ended.append)
        # revoked after 0.1 s
        revocations.guard_session(loop, w, "ci-agent", "t-rev", time.time() + 60,
                                  ended.append)
        # cancelled: never fires
        cancel = revocations.guard_session(loop, w, "ci-agent", "t-can", time.time() + 0.1,
                                           ended.append)
        cancel()
        await asyncio.sleep(0.1)
        revocations.revoke(cfg, "t-rev")
        revocations.revoke(cfg, "t-can")
        await asyncio.sleep(0.5)
        w.stop()
        return ended
    ended = asyncio.run(main())
    assert [e.why for e in ended] == ["revoked", "expired"]
    assert all(e.sqlstate == "28P01" and e.severity == "FATAL" for e in ended)
    assert "revoked" in ended[0].message and "expired" in ended[1].message


def test_guard_session_fires_once(cfg):
    async def main() -> list:
        loop = asyncio.get_running_loop()
        w = RevocationWatcher.from_config(cfg, interval=0.02)
        w.start(loop)
        ended: list = []
        revocations.revoke(cfg, "t1")
        w.poll()
        revocations.guard_session(loop, w, "ci-agent", "t1", time.time() - 1, ended.append)
        await asyncio.sleep(0.1)
        w.stop()
        return ended
    assert len(asyncio.run(main())) == 1
