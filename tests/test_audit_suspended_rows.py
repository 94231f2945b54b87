# An Execute with a row limit is answered by its rows and PortalSuspended, which carries
# no count: its record said rows = 0 (left open in session 18; helper 99 read 150 rows in
# three Executes of 50, and every record said 0). The relay's scan counts the DataRows of
# each suspended Execute for the audit now. Judged by the rows the client received
# against the sum of the records an auditor reads.
from __future__ import annotations

import asyncio

import asyncpg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, Proxy
from exactlib import audit_rows

DB = "appdb"


@pytest.fixture(scope="module", params=["human", "agent"])
def sproxy(request, pg, tmp_path_factory):
    p = Proxy(pg, tmp_path_factory.mktemp(f"suspended-{request.param}")).start()
    p.who = (HUMAN, HUMAN_PASSWORD) if request.param == "human" else (AGENT, AGENT_PASSWORD)
    yield p
    p.stop()


def _raw(proxy, tag: str, total: int, chunks: list[int]) -> int:
    c = rawpg.RawClient.connect(proxy.port, *proxy.who, database=DB)
    try:
        c.send(rawpg.parse(f"SELECT g AS {tag} FROM generate_series(1, {total}) g")
               + rawpg.bind() + b"".join(rawpg.execute("", n) for n in chunks) + rawpg.SYNC)
        return len(rawpg.rows(c.until_ready()))
    finally:
        c.close()


def _asyncpg(proxy, tag: str, total: int, prefetch: int) -> int:
    async def go():
        c = await asyncpg.connect(proxy.dsn(*proxy.who, dbname=DB))
        try:
            n = 0
            async with c.transaction():
                async for _ in c.cursor(f"SELECT g AS {tag} FROM generate_series(1, "
                                        f"{total}) g", prefetch=prefetch):
                    n += 1
                cur = await c.cursor(f"SELECT g AS {tag}x FROM generate_series(1, {total}) g")
                n += len(await cur.fetch(prefetch)) + len(await cur.fetch(prefetch))
            return n
        finally:
            await c.close()
    return asyncio.run(go())


CASES = {
    "raw-three-of-fifty": lambda p, tag: _raw(p, tag, 150, [50, 50, 50]),
    "raw-then-rest": lambda p, tag: _raw(p, tag, 130, [50, 50, 0]),
    "raw-past-the-end": lambda p, tag: _raw(p, tag, 70, [50, 50]),
    "raw-ones": lambda p, tag: _raw(p, tag, 5, [1, 1, 1, 1, 1, 1]),
    "asyncpg-cursors": lambda p, tag: _asyncpg(p, tag, 120, 25),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rows_of_suspended_executes_are_counted(sproxy, case):
    tag = f"susp_{case.replace('-', '_')}"
    got = CASES[case](sproxy, tag)
    assert got > 0
    sproxy.stop()
    try:
        recorded = audit_rows(sproxy, "SELECT coalesce(sum(rows), 0) FROM audit WHERE event = "
                                      f"'statement' AND statement LIKE '%{tag}%'")[0][0]
    finally:
        sproxy.start()
    assert recorded == got, (case, recorded, got)
