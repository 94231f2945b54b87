#!/usr/bin/env python3
"""How often asyncpg's executemany is stopped early by the server's error, directly, through
PgBouncer and through pgguard (the race behind asyncpg's
test_executemany_server_failure_during_writes).

    python tests/peers/stop_early.py [--tries 30] [--targets direct,pgbouncer,pgguard]

Each try opens a fresh connection, creates the table, and runs the test's own executemany:
two rows ('a', 0) (the second violates the primary key) then 126 rows of 32 KB, from a
generator that counts the rows asyncpg took. asyncpg writes 128 KB, yields to its loop,
writes again, and stops taking rows once the ErrorResponse has arrived; the test asserts
it took fewer than all 128. Prints, per target, the tries that took all 128 and the median
count. PgBouncer (session pool, from the system's package) keeps its upstream backend
between client connections; direct and pgguard start a fresh backend per connection.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import asyncpg  # noqa: E402
from run_asyncpg_suite import Target  # noqa: E402

ROWS = 128


class Bouncer:
    """A fresh Postgres with PgBouncer (session pool) before it."""

    def __init__(self, where: Path) -> None:
        from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER, free_port
        exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.target = Target("direct", where)
        d = Path(tempfile.mkdtemp(prefix="pgb-", dir=where))
        os.chmod(d, 0o777)
        self.port, self.user, self.password = free_port(), UPSTREAM_USER, UPSTREAM_PASSWORD
        (d / "users.txt").write_text(f'"{UPSTREAM_USER}" "{UPSTREAM_PASSWORD}"\n')
        (d / "pgb.ini").write_text(
            "[databases]\n"
            f"postgres = host=127.0.0.1 port={self.target.port} dbname=postgres "
            f"user={UPSTREAM_USER} password={UPSTREAM_PASSWORD}\n"
            "[pgbouncer]\nlisten_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\nauth_type = plain\nauth_file = {d}/users.txt\n"
            f"pool_mode = session\nlogfile = {d}/pgb.log\npidfile = {d}/pgb.pid\n"
            "unix_socket_dir =\n")
        for f in d.iterdir():
            os.chmod(f, 0o666)
        cmd = [exe, str(d / "pgb.ini")]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        self.proc = subprocess.Popen(cmd)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    log = d / "pgb.log"
                    self.stop()
                    raise RuntimeError("pgbouncer did not start: " + (
                        log.read_text()[-1000:] if log.exists() else "no log"))
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.target.stop()


async def one_try(port: int, user: str, password: str) -> int:
    con = await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=password,
                                database="postgres")
    try:
        await con.execute("DROP TABLE IF EXISTS exmany; "
                          "CREATE TABLE exmany (a text PRIMARY KEY, b int)")
        taken = 0

        def rows():
            nonlocal taken
            while taken < ROWS:
                taken += 1
                yield ("a", 0) if taken < 3 else ("a" * 32768, taken)
        try:
            await con.executemany("INSERT INTO exmany (a, b) VALUES ($1, $2)", rows())
        except asyncpg.UniqueViolationError:
            pass
        return taken
    finally:
        await con.close()


def measure(kind: str, tries: int, where: Path) -> list[int]:
    t = Bouncer(where) if kind == "pgbouncer" else Target(kind, where)
    try:
        async def run() -> list[int]:
            return [await one_try(t.port, t.user, t.password) for _ in range(tries)]
        return asyncio.run(run())
    finally:
        t.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tries", type=int, default=30)
    ap.add_argument("--targets", default="direct,pgbouncer,pgguard")
    args = ap.parse_args(argv)
    where = Path(tempfile.mkdtemp(prefix="pgguard-stop-early-"))
    os.chmod(where, 0o755)          # pgbouncer runs as postgres when we are root
    print(f"{'target':<10} {'took all 128':>13} {'median rows taken':>18}")
    for kind in args.targets.split(","):
        taken = sorted(measure(kind, args.tries, where))
        full = sum(1 for n in taken if n >= ROWS)
        print(f"{kind:<10} {f'{full}/{len(taken)}':>13} {taken[len(taken) // 2]:>18}")
    shutil.rmtree(where, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
