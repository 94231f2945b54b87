# Statements through one real client after another: the attack-class tests run the same
# list of statements through psql, psycopg, asyncpg and a raw-protocol client and judge
# the result upstream; this is the one way they send them.
"""``said(mode, proxy, sqls, db=...)`` runs ``sqls`` in turn in one session of ``mode``
and returns everything the client said about them (error messages with their SQLSTATE,
psql's stderr): the caller judges the truth upstream, and may check that a refusal was
given.

Modes: ``psql`` (each statement a ``-c``, going on after errors), ``psycopg`` (simple
protocol, client-side binding), ``psycopg-prepared`` and ``psycopg-binary`` (extended
protocol, prepared; binary results), ``asyncpg`` (extended protocol), ``raw`` (a raw
client: the statement at index ``extended_at`` as Parse/Bind/Execute/Sync, the others as
simple Queries; ``extended_at=None``: every statement extended).
"""
from __future__ import annotations

import asyncio

import asyncpg
import psycopg

import rawpg
from conftest import AGENT, AGENT_PASSWORD, run_psql

MODES = ["psql", "psycopg", "psycopg-prepared", "asyncpg", "raw"]


def said(mode: str, proxy, sqls: list[str], *, db: str, psql_bin: str = "psql",
         extended_at: int | None = None, user: str = AGENT,
         password: str = AGENT_PASSWORD) -> str:
    dsn = proxy.dsn(user, password, dbname=db)
    out: list[str] = []
    if mode == "psql":
        r = run_psql(psql_bin, dsn, "-v", "ON_ERROR_STOP=0",
                     *[a for s in sqls for a in ("-c", s)])
        return r.stdout + r.stderr
    if mode.startswith("psycopg"):
        with psycopg.connect(dsn, autocommit=True) as c:
            for s in sqls:
                try:
                    if mode == "psycopg":
                        psycopg.ClientCursor(c).execute(s)
                    else:
                        c.cursor(binary=mode == "psycopg-binary").execute(s, prepare=True)
                except psycopg.Error as e:
                    out.append(f"{e.sqlstate} {e}")
        return "\n".join(out)
    if mode == "asyncpg":
        async def go():
            c = await asyncpg.connect(dsn)
            try:
                for s in sqls:
                    try:
                        await c.execute(s)
                    except asyncpg.PostgresError as e:
                        out.append(f"{e.sqlstate} {e}")
            finally:
                await c.close()
        asyncio.run(go())
        return "\n".join(out)
    if mode != "raw":
        raise ValueError(mode)
    c = rawpg.RawClient.connect(proxy.port, user, password, database=db)
    try:
        for i, s in enumerate(sqls):
            if extended_at is None or i == extended_at:
                c.send(rawpg.parse(s), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
            else:
                c.send(rawpg.query(s))
            out += [f"{e.get('C')} {e.get('M')}" for e in rawpg.errors(c.until_ready())]
    finally:
        c.close()
    return "\n".join(out)
