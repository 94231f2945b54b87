# A write needing approval sent with bound parameters (what psycopg, asyncpg and JDBC do):
# the human deciding used to see only "UPDATE orders SET status = $1 WHERE id >= $2",
# approving the Parse, and the agent chose the values (a red-team pass changed 999 rows,
# under the row limit). The request now shows the values: a held Parse those of the Bind
# that came with it (that execution is the one approved), a later Bind its own. Judged by
# what the approver saw and by the rows upstream: an approver who approves only row 10
# gets only row 10 changed. (A Parse sent alone, as asyncpg prepares, shows none: its
# first execution runs under the row limit; test_approvals_prepared covers it.)
import asyncio

import asyncpg
import psycopg

from conftest import AGENT, AGENT_PASSWORD
from rawpg import SYNC, RawClient, bind, errors, execute, parse
import test_approvals_prepared
from test_approvals_prepared import DB, Approver, statuses

aproxy = test_approvals_prepared.aproxy
orders = test_approvals_prepared.orders     # (autouse there: here too)

SQL = "UPDATE orders SET status = $1 WHERE id >= $2"
GOOD = ("ten", 10)          # reaches row 10 only
BAD = ("cancelled", 2)      # reaches rows 2..10


def decide(shown: str) -> str:
    if "parameters not sent yet" in shown:      # asyncpg's prepare (then fetch(*GOOD))
        return "approve"
    return "approve" if ("$2 = '10'" in shown or "$2 = 10" in shown
                         or "if an integer: 10)" in shown) else "deny"


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
        # prepare=True parses first, alone: that request covers the first execution
        for status, row in ((GOOD,) if prepare else ()) + (BAD, GOOD, BAD, GOOD):
            try:
                c.execute(SQL.replace("$1", "%s").replace("$2", "%s"), (status, row),
                          prepare=prepare)
                assert row == 10
            except psycopg.errors.InsufficientPrivilege:
                assert row != 10


def _rebind(proxy) -> None:
    # a named statement approved with the values of its first Bind, bound again
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB, timeout=30)
    try:
        c.send(parse(SQL, "st", types=[25, 23]), bind("st", [b"ten", b"10"]), execute(), SYNC)
        assert not errors(c.until_ready())
        for status, row in (BAD, BAD, GOOD):
            c.send(bind("st", [status.encode(), str(row).encode()]), execute(), SYNC)
            assert bool(errors(c.until_ready())) == (row != 10)
    finally:
        c.close()


def _asyncpg(proxy) -> None:
    async def go():
        conn = await asyncpg.connect(proxy.dsn(dbname=DB))
        try:
            stmt = await conn.prepare(SQL)
            await stmt.fetch(*GOOD)     # the prepare's approval covers this execution
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
           "raw-rebind": lambda p: _rebind(p), "asyncpg": _asyncpg}


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
               or "parameters not sent yet" in shown for _, shown in ap.seen), ap.seen
    assert sum(v == "deny" for v, _ in ap.seen) >= 2
