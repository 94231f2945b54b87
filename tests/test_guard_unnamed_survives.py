# The unnamed prepared statement lives until the next Parse of it or a simple Query
# (Postgres drops it there). After a guarded statement outside a block, the
# blast-radius guard ends the transaction it opened around the client's Sync; its last
# step was a ROLLBACK sent as a simple Query, which dropped the client's unnamed
# statement: a client that binds "" again after the Sync, without a Parse, got 26000
# where Postgres runs it (left open in session 18). Judged against Postgres itself (the
# same bytes sent directly get the same answers) and by the rows changed upstream.
from __future__ import annotations

import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER
from guarded import guarded_proxy
from test_exact_half_close import _shape

UPD = "UPDATE {t} SET v = v + 1 WHERE id = $1"
DEL = "DELETE FROM {t} WHERE id = $1"


def _run(port: int, user: str, pw: str, steps: list[bytes]) -> list:
    c = rawpg.RawClient.connect(port, user, pw, database="appdb", timeout=20)
    try:
        got = []
        for step in steps:
            c.send(step)
            got.append(c.until_ready())
        return got
    finally:
        c.close()


def _exec(params: list[bytes], describe: bool = False) -> bytes:
    return (rawpg.bind(params=params) + (rawpg.describe("P") if describe else b"")
            + rawpg.execute() + rawpg.SYNC)


def _cases(t: str) -> dict[str, list[bytes]]:
    parse_upd = rawpg.parse(UPD.format(t=t), types=[23])
    return {
        # Parse once, run it again and again after each Sync
        "rebind-update": [parse_upd + _exec([b"1"]), _exec([b"2"]), _exec([b"3"])],
        "rebind-delete": [rawpg.parse(DEL.format(t=t), types=[23]) + _exec([b"4"]),
                          _exec([b"5"])],
        # the first run fails inside the guard's block (the guard owes a rollback)
        "after-an-error": [rawpg.parse(f"UPDATE {t} SET v = v / $1 WHERE id = 6",
                                       types=[23]) + _exec([b"0"]), _exec([b"2"])],
        "describe-after": [parse_upd + _exec([b"7"]),
                           rawpg.describe("S") + rawpg.SYNC, _exec([b"7"], describe=True)],
        "named-and-unnamed": [rawpg.parse(UPD.format(t=t), "n1", [23]) + parse_upd
                              + rawpg.bind("n1", [b"8"]) + rawpg.execute() + rawpg.SYNC,
                              _exec([b"9"]), rawpg.bind("n1", [b"10"]) + rawpg.execute()
                              + rawpg.SYNC],
    }


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("unnamed")) as p:
        yield p


def _table(pg, name: str) -> None:
    pg.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int PRIMARY KEY, v int);"
               f"INSERT INTO {name} SELECT g, 10 FROM generate_series(1, 20) g;"
               f"GRANT ALL ON {name} TO {UPSTREAM_USER}", dbname="appdb")


def _state(pg, name: str) -> list:
    return pg.execute(f"SELECT id, v FROM {name} ORDER BY id", dbname="appdb")


@pytest.mark.parametrize("case", list(_cases("x")))
def test_unnamed_statement_outlives_the_guards_block(gproxy, pg, case):
    _table(pg, "unnamed_direct")
    _table(pg, "unnamed_proxied")
    direct = _run(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, _cases("unnamed_direct")[case])
    proxied = _run(gproxy.port, AGENT, AGENT_PASSWORD, _cases("unnamed_proxied")[case])
    assert [_shape(x) for x in proxied] == [_shape(x) for x in direct]
    assert not any(e.get("C") == "26000" for x in proxied for e in rawpg.errors(x))
    assert _state(pg, "unnamed_proxied") == _state(pg, "unnamed_direct")
    assert _state(pg, "unnamed_proxied") != [(i, 10) for i in range(1, 21)]
