# Exactness round 15 (helper 63), finding 1: a masked agent that hung up while pgguard
# was analysing its statement's lineage left the worker's shared lineage connection one
# round trip behind. The analysis task was cancelled (CancelledError is no Exception, so
# the link was kept) with its answers still on the way; every later analysis, for any
# session of the worker, read the answers of the statement before it: derived values of
# masked columns came back in clear (reverse(ssn)), clean columns came back masked.
# A cancelled or unfinished round trip now drops the connection.
#
# Judged by the bytes a fresh session gets afterwards, against the clear values upstream.
import asyncio
import subprocess
import sys
import time

import asyncpg
import psycopg
import pytest
import rawpg
from mask_corpus import CUSTOMERS, DB, MASKS, leaks, raw_connect, seed


@pytest.fixture(scope="module")
def cancelproxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-cancel"), extra=MASKS).start()
    yield p
    p.stop()


def _fresh(n: int) -> str:
    # a statement shape no cache has seen: its lineage is analysed upstream
    return f"SELECT id, name, email FROM customers WHERE id < 3 AND {n} = {n}"


_n = iter(range(time.time_ns() % 10**6, 10**9))


def _hang_up_simple(proxy):
    c = raw_connect(proxy)
    c.send(rawpg.query(_fresh(next(_n))))
    c.close()


def _hang_up_parse_sync(proxy):
    c = raw_connect(proxy)
    c.send(rawpg.parse(_fresh(next(_n))), rawpg.SYNC)
    c.close()


def _hang_up_parse_alone(proxy):
    c = raw_connect(proxy)
    c.send(rawpg.parse(_fresh(next(_n)), name="s1"), rawpg.FLUSH)
    c.close()


def _hang_up_extended_flush(proxy):
    c = raw_connect(proxy)
    c.send(rawpg.parse(_fresh(next(_n))), rawpg.bind(), rawpg.execute(), rawpg.FLUSH)
    c.close()


def _killed_psycopg(proxy):
    # a real client process killed while its statement waits
    code = ("import psycopg, sys\n"
            "c = psycopg.connect(sys.argv[1], autocommit=True)\n"
            "c.pgconn.send_query(sys.argv[2].encode())\n"
            "import os; os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, proxy.dsn(dbname=DB), _fresh(next(_n))],
                   timeout=60, check=True)


HANG_UPS = {"simple": _hang_up_simple, "parse-sync": _hang_up_parse_sync,
            "parse-alone": _hang_up_parse_alone, "extended-flush": _hang_up_extended_flush,
            "psycopg-killed": _killed_psycopg}


def _agent_reads(proxy) -> dict[str, list]:
    """What a fresh agent session gets, through three clients."""
    out = {}
    with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as conn:
        out["psycopg clean"] = conn.execute("SELECT 'x'::text, id FROM customers "
                                            "ORDER BY id").fetchall()
        out["psycopg derived"] = conn.execute(
            "SELECT reverse(ssn), upper(email) FROM customers ORDER BY id").fetchall()

    async def go():
        c = await asyncpg.connect(proxy.dsn(dbname=DB))
        try:
            return [tuple(r) for r in await c.fetch(
                "SELECT lower(phone), name FROM customers ORDER BY id")]
        finally:
            await c.close()
    out["asyncpg"] = asyncio.run(go())
    c = raw_connect(proxy)
    try:
        c.send(rawpg.query("SELECT ssn || '', 'y'::text FROM customers ORDER BY id"))
        out["raw"] = rawpg.rows(c.until_ready())
    finally:
        c.close()
    return out


@pytest.mark.parametrize("how", sorted(HANG_UPS))
def test_a_client_hanging_up_mid_analysis_leaves_later_sessions_masked(cancelproxy, how):
    _agent_reads(cancelproxy)                 # the lineage connection is open and warm
    for _ in range(3):
        HANG_UPS[how](cancelproxy)
        time.sleep(0.3)
    got = _agent_reads(cancelproxy)
    assert leaks(got) == [], (how, got)
    # and clean columns stay clean (the analysis is the statement's own)
    assert got["psycopg clean"] == [("x", i) for i, *_ in CUSTOMERS], (how, got)
    assert [r[1] for r in got["asyncpg"]] == [c[1] for c in CUSTOMERS], (how, got)
    assert [r[1] for r in got["raw"]] == [b"y"] * len(CUSTOMERS), (how, got)
