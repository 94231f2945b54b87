# A write needing approval sent with bound parameters (what psycopg, asyncpg and JDBC do):
# the human deciding used to see only "UPDATE orders SET status = $1 WHERE id >= $2",
# approving the Parse, and the agent chose the values (a red-team pass changed 999 rows,
# under the row limit). The Parse now goes at once (it runs nothing); each Bind asks, and
# the request shows the values it binds. Judged by what the approver saw and by the rows
# upstream: an approver who approves only row 10 gets only row 10 changed.
import asyncio

import asyncpg
import psycopg

from conftest import AGENT, AGENT_PASSWORD
from rawpg import SYNC, RawClient, bind, errors, execute, parse
from test_approvals_prepared import DB, Approver, aproxy, orders, statuses  # noqa: F401

SQL = "UPDATE orders SET status = $1 WHERE id >= $2"
GOOD = ("ten", 10)          # reaches row 10 only
BAD = ("cancelled", 2)      # reaches rows 2..10


def decide(shown: str) -> str:
    return "approve" if ("$2 = '10'" in shown or "as an integer: 10)" in shown) else "deny"


def _raw(proxy, binary: bool) -> None:
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=30)
    try:
        for status, row in (BAD, GOOD, BAD):
            v = row.to_bytes(4, "big") if binary else str(row).encode()
            c.send(parse(SQL, types=[25, 23]), bind("", [status.encode(), v],
                                                    param_formats=[0, 1 if binary else 0]),
                   execute(), SYNC)
            msgs = c.until_ready()
            assert bool(errors(msgs)) == (row != 10), msgs
    finally:
        c.close()


def _psycopg(proxy, prepare) -> None:
    with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
        for status, row in (BAD, GOOD, BAD, GOOD):
            try:
                c.execute(SQL.replace("$1", "%s").replace("$2", "%s"), (status, row),
                          prepare=prepare)
                assert row == 10
            except psycopg.errors.InsufficientPrivilege:
                assert row != 10


def _asyncpg(proxy) -> None:
    async def go():
        conn = await asyncpg.connect(proxy.dsn(dbname=DB))
        try:
            stmt = await conn.prepare(SQL)
            for status, row in (BAD, GOOD, BAD):
                try:
                    await stmt.fetch(status, row)
                    assert row == 10
                except asyncpg.InsufficientPrivilegeError:
                    assert row != 10
        finally:
            await conn.close()
    asyncio.run(go())


CLIENTS = {"raw-text": lambda p: _raw(p, False), "raw-binary": lambda p: _raw(p, True),
           "psycopg": lambda p: _psycopg(p, None), "psycopg-prepared": lambda p: _psycopg(p, True),
           "asyncpg": _asyncpg}


import pytest  # noqa: E402


@pytest.mark.parametrize("client", list(CLIENTS))
def test_the_approver_sees_the_values_each_execution_binds(pg, aproxy, client):
    ap = Approver(aproxy, decide=decide)
    ap.start()
    try:
        CLIENTS[client](aproxy)
    finally:
        ap.stop = True
        ap.join(5)
    assert statuses(pg) == ["new"] * 9 + ["ten"]
    # every execution was asked, and every request showed its values
    assert ap.seen and all(v == decide(shown) for v, shown in ap.seen), ap.seen
    assert all("$1 = 'cancelled'" in shown or "$1 = 'ten'" in shown
               for _, shown in ap.seen), ap.seen
    assert sum(v == "deny" for v, _ in ap.seen) >= 2
