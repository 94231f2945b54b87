# The proxy's own upstream connections: simple statements outside any client session
# (ephemeral role provisioning and its janitor), and simple statements run on a
# session's upstream link before the client sees it (SET ROLE).
from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING

from .errors import PgguardError
from .protocol import messages as m
from .upstream import connect_upstream

if TYPE_CHECKING:
    from .server import Server
    from .upstream import UpstreamProtocol

log = logging.getLogger("pgguard.sideconn")


class UpstreamError(PgguardError):
    """A statement the proxy ran upstream failed; carries the server's SQLSTATE."""


class _Owner:
    """Stands in for a client session while pgguard talks to the upstream itself."""

    id = "internal"
    up = None

    def upstream_lost(self, exc) -> None:
        pass


async def execute(proto: UpstreamProtocol, sql: str) -> list[tuple[str | None, ...]]:
    """Run one simple Query on a logged-in link (still in its login phase); rows as text."""
    body = sql.encode() + b"\0"
    proto.transport.write(b"Q" + struct.pack("!I", len(body) + 4) + body)
    rows: list[tuple[str | None, ...]] = []
    err = None
    while True:
        t, payload = await proto.read_message()
        if t == ord("D"):
            (n,) = struct.unpack_from("!h", payload)
            pos, row = 2, []
            for _ in range(n):
                (ln,) = struct.unpack_from("!i", payload, pos)
                pos += 4
                if ln < 0:
                    row.append(None)
                else:
                    row.append(payload[pos:pos + ln].decode("utf-8", "replace"))
                    pos += ln
            rows.append(tuple(row))
        elif t == ord("E"):
            err = m.parse_error_fields(payload)
        elif t == ord("Z"):
            break
    if err is not None:
        raise UpstreamError(err.get("M", "upstream error"), sqlstate=err.get("C", "XX000"),
                            detail=err.get("D"))
    return rows


async def describe(server: Server, database: str, sql: str) -> bytes | None:
    """The RowDescription message of a query run on a side connection (None: no rows).
    Raises UpstreamError when it fails there."""
    owner = _Owner()
    proto, _, _ = await connect_upstream(owner, server, database,
                                         {"application_name": "pgguard:internal"})
    try:
        body = sql.encode() + b"\0"
        proto.transport.write(b"Q" + struct.pack("!I", len(body) + 4) + body)
        desc, err = None, None
        while True:
            t, payload = await proto.read_message()
            if t == ord("T"):
                desc = b"T" + struct.pack("!I", len(payload) + 4) + payload
            elif t == ord("E"):
                err = m.parse_error_fields(payload)
            elif t == ord("Z"):
                break
        if err is not None:
            raise UpstreamError(err.get("M", "upstream error"), sqlstate=err.get("C", "XX000"))
        return desc
    finally:
        try:
            proto.transport.write(m.TERMINATE)
        finally:
            proto.transport.close()


async def run(server: Server, database: str, statements: list[str]) -> list[list[tuple]]:
    """Run statements on a fresh connection with the proxy's upstream credentials.

    Example: ``await run(server, "app", ["SELECT 1"])`` -> ``[[("1",)]]``.
    """
    owner = _Owner()
    proto, _, _ = await connect_upstream(owner, server, database,
                                         {"application_name": "pgguard:internal"})
    try:
        return [await execute(proto, sql) for sql in statements]
    finally:
        try:
            proto.transport.write(m.TERMINATE)
        finally:
            proto.transport.close()


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A quoted SQL string literal, safe whatever standard_conforming_strings says."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


async def drop_role(server: Server, database: str, role: str, successor: str | None,
                    attempts: int = 6) -> bool:
    """Drop an ephemeral role once its sessions are gone (retrying while its backend
    exits); objects it owns go to ``successor``."""
    stmts = []
    if successor:
        stmts.append(f"REASSIGN OWNED BY {ident(role)} TO {ident(successor)}")
    stmts += [f"DROP OWNED BY {ident(role)}", f"DROP ROLE IF EXISTS {ident(role)}"]
    delay = 0.05
    for _ in range(attempts):
        try:
            exists = await run(server, database, [
                f"SELECT 1 FROM pg_roles WHERE rolname = {literal(role)}"])
            if not exists[0]:
                return True
            await run(server, database, stmts)
            return True
        except (PgguardError, OSError) as e:
            log.debug("dropping role %s: %s", role, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    log.warning("could not drop ephemeral role %s; the janitor will retry at next start", role)
    return False
