# Helpers of the test_exact_* files: process memory, the audit as DuckDB sees it, and
# reading a raw connection until the server closes it.
from __future__ import annotations

import socket
import struct


def rss_kb(pid: int) -> int:
    """Resident memory of a process, KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def audit_rows(proxy, sql: str) -> list:
    """``sql`` over the view ``audit`` of the proxy's Parquet files."""
    import duckdb
    con = duckdb.connect()
    con.execute(f"CREATE VIEW audit AS SELECT * FROM read_parquet('{proxy.audit_dir}/**/"
                "*.parquet', hive_partitioning = true, union_by_name = true)")
    return con.execute(sql).fetchall()


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Every byte until the server closes; fails if it stays open past ``timeout``."""
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk
    except TimeoutError:
        raise AssertionError(f"the connection stayed open; received {out!r}") from None
    except ConnectionResetError:
        return out


def messages(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Typed messages of a byte string."""
    out = []
    while len(raw) >= 5:
        (n,) = struct.unpack_from("!I", raw, 1)
        out.append((raw[:1], raw[5:n + 1]))
        raw = raw[n + 1:]
    return out
