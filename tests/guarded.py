# A pgguard whose agents are under the "guarded" default policy, for policy wire tests.
from __future__ import annotations

import asyncio
from contextlib import contextmanager

import asyncpg
import psycopg

from conftest import AGENT, AGENT_PASSWORD, Proxy, run_psql
from rawpg import SYNC, RawClient, bind, errors, execute, parse, query, rows


@contextmanager
def guarded_proxy(pg, tmp, extra: str = "", **kw):
    """A started Proxy with ``[policy] agents = "guarded"`` and ``extra`` config; stopped
    on exit (``stop()`` inside is fine: it flushes the audit for a test to read)."""
    p = Proxy(pg, tmp, extra=extra, **kw)
    p.config.write_text(p.config.read_text().replace('agents = "allow"', 'agents = "guarded"'))
    p.start()
    try:
        yield p
    finally:
        p.stop()


def fails_everywhere(proxy, psql_bin, sql: str, db: str, code: str | None = "42501") -> None:
    """``sql`` through psycopg (simple and prepared), asyncpg (extended), a raw pipeline
    and psql: each fails with SQLSTATE ``code`` (None: any error, a refusal or Postgres'
    own), and the session goes on."""
    def check(state):
        assert code is None or state == code, (state, code, sql)

    with psycopg.connect(proxy.dsn(AGENT, AGENT_PASSWORD, dbname=db), autocommit=True) as c:
        for prepare in (False, True):
            try:
                if prepare:
                    c.execute(sql, prepare=True)
                else:
                    psycopg.ClientCursor(c).execute(sql)
            except psycopg.Error as e:
                check(e.sqlstate)
            else:
                raise AssertionError(f"psycopg (prepare={prepare}) ran {sql!r}")
        assert c.execute("SELECT 1").fetchone() == (1,)

    async def main():
        a = await asyncpg.connect(proxy.dsn(dbname=db))
        try:
            try:
                await a.fetch(sql)
            except asyncpg.PostgresError as e:
                check(e.sqlstate)
            else:
                raise AssertionError(f"asyncpg ran {sql!r}")
            assert await a.fetchval("SELECT 2") == 2
        finally:
            await a.close()
    asyncio.run(main())
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=db)
    try:
        c.send(parse(sql) + bind() + execute() + SYNC + query("SELECT 'tail'"))
        got = c.until_ready(2)
        errs = [e["C"] for e in errors(got)]
        assert len(errs) == 1 and (code is None or errs == [code]), got
        assert [b"tail"] in rows(got)
    finally:
        c.close()
    r = run_psql(psql_bin, proxy.dsn(dbname=db), "-c", sql)
    assert r.returncode != 0, r
    if code == "42501":
        assert "pgguard" in r.stderr, r
