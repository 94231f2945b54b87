# Red team, round 25 (policy), judged by the sequence, the rows, the backends and the
# values upstream:
#  F1 - the subscripts of a PL/pgSQL assignment's target run (`a[f()] := 1`, a slice's
#       bounds, `a[1][(SELECT ...)]`), and pgguard read only the expression after
#       `:=`: a call or a read placed there was never seen. setval() and
#       pg_terminate_backend() ran from a DO block; a DBA's narrow DELETE function
#       called there in a loop emptied a table past the blast-radius guard; a function
#       updating an approval-ruled table ran unasked; a masked column went into a
#       setting (set_config) and came back in clear. The target's subscripts are
#       classified with the expression now.
import asyncio
import threading
import time

import asyncpg
import psycopg
import pytest

from conftest import HUMAN, HUMAN_PASSWORD
from each_client import MODES, said
from guarded import guarded_proxy
from mask_corpus import MASKS, leaks, seed

DB = "appdb"
RULES = """
[[rules]]
name = "agent-writes-to-rt25-orders-need-approval"
when = { kind = "agent", statements = ["insert", "update", "delete", "merge"], relations = ["public.rt25_orders"] }
action = "approve"
timeout = "1s"
"""


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    seed(pg)
    with guarded_proxy(pg, tmp_path_factory.mktemp("rt25"), RULES + MASKS) as p:
        yield p


@pytest.fixture()
def state(pg):
    pg.execute("""
        DROP TABLE IF EXISTS rt25_rows, rt25_orders CASCADE;
        DROP SEQUENCE IF EXISTS rt25_seq;
        CREATE SEQUENCE rt25_seq; SELECT setval('rt25_seq', 1000);
        CREATE TABLE rt25_rows (a int); INSERT INTO rt25_rows SELECT generate_series(1, 50);
        CREATE TABLE rt25_orders (id int, status text);
        INSERT INTO rt25_orders SELECT g, 'new' FROM generate_series(1, 20) g;
        CREATE OR REPLACE FUNCTION rt25_del(i int) RETURNS int LANGUAGE plpgsql AS
          $$BEGIN DELETE FROM rt25_rows WHERE a = i; RETURN 1; END$$;
        CREATE OR REPLACE FUNCTION rt25_cancel() RETURNS int LANGUAGE plpgsql AS
          $$BEGIN UPDATE rt25_orders SET status = 'cancelled' WHERE id > 0; RETURN 1; END$$;
        GRANT EXECUTE ON FUNCTION rt25_del(int), rt25_cancel() TO PUBLIC;
    """, dbname=DB)
    yield
    pg.execute("DROP FUNCTION IF EXISTS rt25_f(); DROP FUNCTION IF EXISTS rt25_del(int); "
               "DROP FUNCTION IF EXISTS rt25_cancel()", dbname=DB)


def _truth(pg) -> tuple:
    return (pg.execute("SELECT last_value FROM rt25_seq", dbname=DB)[0][0],
            pg.execute("SELECT count(*) FROM rt25_rows", dbname=DB)[0][0],
            pg.execute("SELECT count(*) FROM rt25_orders WHERE status = 'cancelled'",
                       dbname=DB)[0][0])


def _do(body: str, decl: str = "a int[]") -> str:
    return f"DO $$DECLARE {decl}; BEGIN {body} END$$"


SETVAL = "setval('rt25_seq', 1)"
HIDDEN = [
    _do(f"a[{SETVAL}] := 1;"),
    _do(f"a[{SETVAL}] = 1;"),                                   # `=` for `:=`
    _do(f"a[1:{SETVAL}] := ARRAY[1];"),                         # a slice's upper bound
    _do(f"a[{SETVAL}:2] := ARRAY[1, 2];"),                      # ... its lower bound
    _do(f"a[1][(SELECT {SETVAL})::int] := 1;"),                 # a second subscript
    _do(f"a[(SELECT {SETVAL} FROM rt25_rows LIMIT 1)] := 1;"),  # a subquery
    _do(f"a[{SETVAL}] := 1;", "a int[]; b int := 0"),
    _do("FOR i IN 1..50 LOOP a[rt25_del(i)] := 1; END LOOP;"),  # a DBA's narrow DELETE
    _do("a[rt25_cancel()] := 1;"),                              # an approval-ruled table
    _do("a[1:rt25_cancel()] := ARRAY[1];"),
]


@pytest.mark.parametrize("mode", MODES)
def test_calls_in_an_assignment_targets_subscript_are_judged(gproxy, pg, psql_bin, state,
                                                              mode):
    before = _truth(pg)
    assert before == (1000, 50, 0)
    out = said(mode, gproxy, HIDDEN, db=DB, psql_bin=psql_bin)
    assert _truth(pg) == before, out
    assert out.count("42501") >= len(HIDDEN) or mode == "psql" and \
        out.count("ERROR:") >= len(HIDDEN), out


@pytest.mark.parametrize("mode", ["psycopg", "asyncpg", "raw"])
def test_a_function_body_with_a_call_in_a_subscript_is_judged_at_the_call(
        gproxy, pg, psql_bin, state, mode):
    # created by the DBA (an agent's CREATE is judged too): the agent's call runs it
    pg.execute("CREATE OR REPLACE FUNCTION rt25_f() RETURNS int LANGUAGE plpgsql AS "
               f"$$DECLARE a int[]; BEGIN a[{SETVAL}] := 1; "
               "FOR i IN 1..50 LOOP a[rt25_del(i)] := 1; END LOOP; RETURN 1; END$$; "
               "GRANT EXECUTE ON FUNCTION rt25_f() TO PUBLIC", dbname=DB)
    out = said(mode, gproxy, ["SELECT rt25_f()"], db=DB, psql_bin=psql_bin)
    assert _truth(pg) == (1000, 50, 0), out
    assert "42501" in out, out


def test_the_plain_subscript_forms_still_run(gproxy, pg, state):
    # what an ordinary body does with arrays keeps working
    with psycopg.connect(gproxy.dsn(dbname=DB), autocommit=True) as c:
        c.execute(_do("a[1] := 2; a[2:3] := ARRAY[3, 4]; a[array_length(a, 1) + 1] := 5; "
                      "RAISE NOTICE '%', a;"))
        # an expression that begins with DISTINCT / ALL (helper 138: refused as
        # unparseable once the subscripts were read with it)
        c.execute(_do("a[1] := DISTINCT 5; a[2] := ALL 6; "
                      "a[3] := DISTINCT ON (r.a) r.a FROM rt25_rows r ORDER BY r.a LIMIT 1;"))
    assert _truth(pg) == (1000, 50, 0)


LEAKS = [
    _do("a[(SELECT length(set_config('rt25.leak', reverse(ssn) || ' ' || reverse(email), "
        "false)) FROM customers WHERE id = 2)] := 1;"),
    _do("a[(SELECT length(set_config('rt25.leak', string_agg(ssn, ','), false)) "
        "FROM customers)] := 1;"),
    _do("a[1:(SELECT length(set_config('rt25.leak', max(email), false)) FROM customers)] "
        ":= ARRAY[1];"),
]


@pytest.mark.parametrize("mode", ["psycopg", "psycopg-prepared", "asyncpg", "raw"])
def test_a_masked_value_read_in_a_subscript_is_not_parked(gproxy, pg, psql_bin, mode):
    out = said(mode, gproxy, LEAKS + ["SELECT current_setting('rt25.leak', true)"], db=DB,
               psql_bin=psql_bin)
    got = []
    with psycopg.connect(gproxy.dsn(dbname=DB), autocommit=True) as c:
        for sql in LEAKS:
            try:
                c.execute(sql)
            except psycopg.Error as e:
                got.append(f"{e.sqlstate} {e}")
            got.append(str(c.execute("SELECT current_setting('rt25.leak', true)").fetchone()))

    async def main():
        a = await asyncpg.connect(gproxy.dsn(dbname=DB))
        try:
            for sql in LEAKS:
                try:
                    await a.execute(sql)
                except asyncpg.PostgresError as e:
                    got.append(f"{e.sqlstate} {e}")
                for _ in range(3):
                    got.append(str(await a.fetchval(
                        "SELECT current_setting('rt25.leak', true)")))
        finally:
            await a.close()
    asyncio.run(main())
    text = out + "\n".join(got)
    assert leaks(text) == [], leaks(text)
    assert text.count("42501") >= 2 * len(LEAKS), text


def test_a_humans_session_is_not_ended_by_the_agents_refusals(gproxy, pg, state):
    # (the refused DO blocks leave other sessions alone: a DBA's backend lives on)
    stop = threading.Event()
    err: list[BaseException] = []
    pids: list[int] = []

    def dba():
        try:
            with psycopg.connect(gproxy.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB),
                                 autocommit=True) as c:
                pids.append(c.execute("SELECT pg_backend_pid()").fetchone()[0])
                while not stop.is_set():
                    c.execute("SELECT 1")
                    time.sleep(0.05)
        except BaseException as e:      # noqa: BLE001 - reported below
            err.append(e)
    t = threading.Thread(target=dba)
    t.start()
    try:
        time.sleep(0.3)
        pid, = pids
        out = said("psycopg", gproxy, [_do(f"a[pg_terminate_backend({pid})::int] := 1;")],
                   db=DB)
        assert "42501" in out, out
        time.sleep(0.3)
        assert pg.execute(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}",
                          dbname=DB)[0][0] == 1
    finally:
        stop.set()
        t.join()
    assert err == [], err
