# A guarded Execute (the blast-radius guard opens the implicit transaction's block itself)
# followed, in the same pipeline, by a statement the policy refuses: the guard's block
# must end at the Sync as Postgres ends an implicit transaction after an error (rolled
# back, ReadyForQuery 'I'). It stayed open and failed ('E', every later statement
# "current transaction is aborted") because the Sync that ends the discarding after a
# refusal went upstream without the guard. Judged against Postgres' own reply sequence
# for the same pipeline with a statement that fails there in place of the refused one,
# and by the rows upstream.
import pytest

from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER
from guarded import guarded_proxy
from rawpg import SYNC, RawClient, bind, execute, parse, query

DB = "appdb"
REFUSED = "DROP TABLE rs_t"             # refused by the guarded default
FAILS = "DROP TABLEX rs_t"              # fails at Parse in Postgres: the stand-in

# (pipeline builder taking the refused/failing text), what Postgres leaves in rs_t
CASES = {
    "update-then-refused-parse": lambda bad: (
        parse("UPDATE rs_t SET v = 'b' WHERE id = $1::int") + bind(params=[b"1"])
        + execute() + parse(bad) + bind() + execute() + SYNC),
    "delete-then-refused-parse": lambda bad: (
        parse("DELETE FROM rs_t WHERE id = $1::int") + bind(params=[b"2"]) + execute()
        + parse(bad) + SYNC),
    "two-guarded-then-refused": lambda bad: (
        parse("UPDATE rs_t SET v = 'c' WHERE id = $1::int") + bind(params=[b"3"])
        + execute() + bind(params=[b"4"]) + execute() + parse(bad) + bind() + execute()
        + SYNC),
    "refused-then-next-segment": lambda bad: (
        parse("UPDATE rs_t SET v = 'd' WHERE id = $1::int") + bind(params=[b"5"])
        + execute() + parse(bad) + SYNC
        + parse("UPDATE rs_t SET v = 'e' WHERE id = $1::int") + bind(params=[b"6"])
        + execute() + SYNC),
    "unnamed-reparse-after-refusal": lambda bad: (
        parse("UPDATE rs_t SET v = 'f' WHERE id = $1::int") + bind(params=[b"7"])
        + execute() + parse(bad) + bind() + execute() + SYNC
        + query("SELECT count(*) FROM rs_t WHERE v = 'a'")),
}


@pytest.fixture(scope="module")
def gp(pg, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("refused-in-segment")) as p:
        yield p


@pytest.fixture(autouse=True)
def table(pg):
    pg.execute("DROP TABLE IF EXISTS rs_t; CREATE TABLE rs_t (id int, v text); "
               "INSERT INTO rs_t SELECT g, 'a' FROM generate_series(1, 10) g", dbname=DB)


def _shape(msgs):
    """The reply sequence as a client reads it: types, errors by class (pgguard's
    refusal and Postgres' parse error alike), ReadyForQuery with its status."""
    out = []
    for t, p in msgs:
        if t == b"Z":
            out.append(b"Z" + p[:1])
        elif t in (b"1", b"2", b"3", b"C", b"E", b"T", b"D", b"n"):
            out.append(t)
    return out


def _run(port, user, password, data, readies):
    c = RawClient.connect(port, user, password, database=DB)
    try:
        c.send(data)
        got = c.until_ready(readies)
        after = c.run("SELECT 1")
        return _shape(got), _shape(after)
    finally:
        c.close()


def _rows(pg):
    return pg.execute("SELECT id, v FROM rs_t ORDER BY id", dbname=DB)


@pytest.mark.parametrize("case", sorted(CASES))
def test_guarded_block_ends_with_the_segment_after_a_refusal(pg, gp, case):
    build = CASES[case]
    readies = 1 + (case in ("refused-then-next-segment", "unnamed-reparse-after-refusal"))
    want, want_after = _run(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, build(FAILS), readies)
    truth = _rows(pg)
    pg.execute("DROP TABLE rs_t; CREATE TABLE rs_t (id int, v text); "
               "INSERT INTO rs_t SELECT g, 'a' FROM generate_series(1, 10) g", dbname=DB)
    got, got_after = _run(gp.port, AGENT, AGENT_PASSWORD, build(REFUSED), readies)
    assert got == want, (case, got, want)
    assert got_after == want_after == [b"T", b"D", b"C", b"ZI"]
    assert _rows(pg) == truth, case
