# Review of round 15 (helper 64):
#  H1 - EXECUTE p(<computed over masked data>): the arguments went into a statement
#       planned apart, whose rows follow the PREPARE's lineage (PREPARE p(text) AS SELECT
#       $1 returned an SSN in clear), and the sink check saw only the EXECUTE's own text
#       (a prepared setseed / set_config / advisory lock kept the value). An EXECUTE
#       whose arguments are computed over tables with masked columns is refused now.
#  H2 - a SQL PREPARE, a DEALLOCATE of it and a protocol Parse of the same name in one
#       write: the PREPARE's answer put its (clean) plan back after the removals made
#       when the DEALLOCATE and the Parse were sent, and a later SQL EXECUTE of the name
#       got it for the protocol statement's (masked) rows. Removals happen in answer
#       order too now.
# Judged by the bytes each client got (and pg_locks, random()) against the clear values.
import psycopg
import pytest
import rawpg
from each_client import said
from mask_corpus import CUSTOMERS, DB, MASKS, leaks, raw_connect, seed

SSNS = [c[3] for c in CUSTOMERS]


@pytest.fixture(scope="module")
def exproxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    pg.execute("CREATE OR REPLACE FUNCTION public.cust_ssn(i int) RETURNS text LANGUAGE sql "
               "STABLE AS 'SELECT ssn FROM customers WHERE id = i'; "
               "GRANT EXECUTE ON FUNCTION public.cust_ssn(int) TO PUBLIC", dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-execargs"), extra=MASKS).start()
    yield p
    p.stop()


ECHO = {
    "fn-arg": ("PREPARE rx1(text) AS SELECT $1 AS v", "EXECUTE rx1(cust_ssn(1))"),
    "column-arg": ("PREPARE rx2(text) AS SELECT upper($1) AS v",
                   "EXECUTE rx2((SELECT ssn FROM customers WHERE id = 1))"),
    "expression-arg": ("PREPARE rx3(text) AS SELECT $1 || '' AS v",
                       "EXECUTE rx3(reverse(reverse(cust_ssn(1))))"),
    "int-arg": ("PREPARE rx4(bigint) AS SELECT $1 + 0 AS v",
                "EXECUTE rx4(replace(cust_ssn(1), '-', '')::bigint)"),
    "two-args": ("PREPARE rx5(int, text) AS SELECT $2 AS v",
                 "EXECUTE rx5(1, (SELECT email FROM customers WHERE id = 1))"),
}
MODES = ["psql", "psycopg", "psycopg-prepared", "asyncpg", "raw"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(ECHO))
def test_execute_of_masked_arguments_is_refused(exproxy, psql_bin, mode, case):
    prep, run = ECHO[case]
    got = said(mode, exproxy, [prep, run, f"DEALLOCATE {prep.split()[1].split('(')[0]}"],
               db=DB, psql_bin=psql_bin)
    assert leaks(got) == [] and SSNS[0] not in got and SSNS[0].replace("-", "") not in got
    assert 'rule "masking"' in got or "42501" in got, (case, mode, got)


def test_execute_with_constant_arguments_still_runs(exproxy):
    with psycopg.connect(exproxy.dsn(dbname=DB), autocommit=True) as c:
        c.execute("PREPARE rx6(int) AS SELECT id, name, email FROM customers WHERE id = $1")
        rows = c.execute("EXECUTE rx6(1)").fetchall()
        rows += c.execute("EXECUTE rx6(2 + 1)").fetchall()
    assert [r[:2] for r in rows] == [(1, "Ann"), (3, "Cyd")] and leaks(rows) == [], rows


def test_prepared_sinks_given_masked_values_keep_nothing(exproxy, pg):
    with psycopg.connect(exproxy.dsn(dbname=DB), autocommit=True) as c:
        for prep, run in (
                ("PREPARE rs1(bigint) AS SELECT pg_advisory_lock($1)",
                 "EXECUTE rs1(replace(cust_ssn(1), '-', '')::bigint)"),
                ("PREPARE rs2(text) AS SELECT set_config('timezone', $1, false)",
                 "EXECUTE rs2('XXX' || substr(cust_ssn(2), 1, 1))")):
            c.execute(prep)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(run)
        locks = pg.execute("SELECT objid::text FROM pg_locks WHERE locktype = 'advisory'")
    assert all(SSNS[0].replace("-", "") not in (r[0] or "") for r in locks or []), locks


MASKED_SQL = "SELECT upper(ssn) AS v, lower(email) AS e FROM customers ORDER BY id"


@pytest.mark.parametrize("variant", ["deallocate", "deallocate-twice", "close", "discard",
                                     "parse-only"])
def test_a_sql_plan_does_not_outlive_its_name(exproxy, variant):
    c = raw_connect(exproxy)
    out = []
    try:
        for n in ("t1", "t2", "t3"):          # the second and later: lineage cached
            first = [rawpg.query(f"PREPARE {n} AS SELECT 'x'::text AS v, 'y'::text AS e")]
            if variant == "deallocate":
                first.append(rawpg.query(f"DEALLOCATE {n}"))
            elif variant == "deallocate-twice":
                first += [rawpg.query(f"DEALLOCATE {n}"),
                          rawpg.query(f"PREPARE {n} AS SELECT '1'::text, '2'::text"),
                          rawpg.query(f"DEALLOCATE {n}")]
            elif variant == "close":
                first += [rawpg.close("S", n), rawpg.SYNC]
            elif variant == "discard":
                first.append(rawpg.query("DEALLOCATE ALL"))
            readies = len([f for f in first if f[:1] in (b"Q", b"S")])
            if variant == "parse-only":
                # Postgres refuses the Parse (the name exists): nothing changes hands
                c.send(*first)
                out += c.until_ready(readies)
                continue
            c.send(*first, rawpg.parse(MASKED_SQL, name=n), rawpg.SYNC)
            out += c.until_ready(readies + 1)
            c.send(rawpg.query(f"EXECUTE {n}"))
            out += c.until_ready(1)
            c.send(rawpg.bind(n), rawpg.execute(), rawpg.SYNC)
            out += c.until_ready(1)
    finally:
        c.close()
    assert leaks(out) == [], [p for t, p in out if t == b"D"][:6]
