# Red team, round 14, judged by what lands upstream (read directly as the superuser)
# against the seeded clear values:
#  F1 - code that FETCHes from a cursor by name read a cursor's (or a protocol portal's)
#       rows over masked columns inside the server and stored them: a PL/pgSQL function
#       taking a refcursor, one naming the cursor in a string, a bound cursor variable
#       left unopened (it reads the portal of its own name), a DO block, the agent's own
#       function, a FunctionCall message. A statement whose code runs FETCH or MOVE is
#       refused to a masked identity (the call, or the definition).
#  F2 - CREATE TABLE ... AS EXECUTE p copied the masked columns of a prepared statement
#       into a new table (the CTAS text names no column). A statement that EXECUTEs a
#       prepared statement reading masked tables into a sink is refused.
import psycopg
import pytest
import rawpg
from each_client import said
from mask_corpus import DB, MASKS, leaks, raw_connect, seed

FUNCS = """
DROP TABLE IF EXISTS rt14_loot;
CREATE TABLE rt14_loot (v text);
CREATE OR REPLACE FUNCTION rt14_drain(r refcursor) RETURNS int LANGUAGE plpgsql AS $$
DECLARE v text; n int := 0;
BEGIN LOOP FETCH r INTO v; EXIT WHEN NOT FOUND; INSERT INTO rt14_loot VALUES (v);
n := n + 1; END LOOP; RETURN n; END $$;
CREATE OR REPLACE FUNCTION rt14_fetch1(r refcursor) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v text; BEGIN FETCH r INTO v; RETURN v; END $$;
CREATE OR REPLACE FUNCTION rt14_byname() RETURNS int LANGUAGE plpgsql AS $$
DECLARE r refcursor := 'c'; v text;
BEGIN FETCH ABSOLUTE 2 FROM r INTO v; INSERT INTO rt14_loot VALUES (v); RETURN 1; END $$;
CREATE OR REPLACE FUNCTION rt14_bound() RETURNS int LANGUAGE plpgsql AS $$
DECLARE c CURSOR FOR SELECT 'nothing'; v text;
BEGIN FETCH c INTO v; INSERT INTO rt14_loot VALUES (v); RETURN 1; END $$;
CREATE OR REPLACE FUNCTION rt14_outer(r refcursor) RETURNS int LANGUAGE plpgsql AS $$
BEGIN RETURN rt14_drain(r); END $$;
"""

DECLARE = "DECLARE c CURSOR FOR SELECT ssn FROM customers ORDER BY id"
# (setup run as the agent before the cursor, the call reading it)
CALLS = {
    "drain": ((), "SELECT rt14_drain('c')"),
    "fetch1": ((), "INSERT INTO rt14_loot SELECT rt14_fetch1('c')"),
    "byname": ((), "SELECT rt14_byname()"),
    "bound": ((), "SELECT rt14_bound()"),
    "nested": ((), "SELECT rt14_outer('c')"),
    "do": ((), "DO $$DECLARE r refcursor := 'c'; v text; BEGIN FETCH r INTO v; "
               "INSERT INTO rt14_loot VALUES (v); END$$"),
    "own": (("CREATE OR REPLACE FUNCTION rt14_own(r refcursor) RETURNS int LANGUAGE "
             "plpgsql AS $$DECLARE v text; BEGIN FETCH r INTO v; INSERT INTO rt14_loot "
             "VALUES (reverse(v)); RETURN 1; END$$",), "SELECT rt14_own('c')"),
}


@pytest.fixture(scope="module")
def rt14proxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    pg.execute(FUNCS, dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-rt14"), extra=MASKS).start()
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def loot(pg):
    pg.execute("TRUNCATE rt14_loot", dbname=DB)

    def landed():
        return pg.execute("SELECT v FROM rt14_loot", dbname=DB)
    return landed


def _masking(text: str) -> bool:
    return 'rule "masking"' in text or 'rule \\"masking\\"' in text


MODES = ["psql", "psycopg", "psycopg-binary", "asyncpg", "raw"]


def _run(mode, proxy, psql_bin, sqls) -> str:
    """The statement under test (the last but COMMIT) extended in the raw mode."""
    return said(mode, proxy, sqls, db=DB, psql_bin=psql_bin, extended_at=len(sqls) - 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_code_fetching_a_cursor_by_name_moves_no_masked_value(rt14proxy, pg, psql_bin,
                                                              loot, mode, call):
    setup, sql = CALLS[call]
    said = _run(mode, rt14proxy, psql_bin, [*setup, "BEGIN", DECLARE, sql, "COMMIT"])
    assert leaks(loot()) == [], (call, mode, loot())
    assert loot() == [], loot()
    assert _masking(said), said


def test_a_protocol_portal_read_by_a_function_moves_no_masked_value(rt14proxy, loot):
    """A named portal Bound and never Executed is a refcursor by its name."""
    c = raw_connect(rt14proxy)
    try:
        c.send(rawpg.query("BEGIN"))
        c.until_ready()
        c.send(rawpg.parse("SELECT email FROM customers ORDER BY id", name="s1"),
               rawpg.bind("s1", portal="p1"), rawpg.SYNC)
        assert not rawpg.errors(c.until_ready())
        c.send(rawpg.query("SELECT rt14_drain('p1')"))
        said = c.until_ready()
        c.send(rawpg.query("COMMIT"))
        c.until_ready()
    finally:
        c.close()
    assert loot() == [], loot()
    assert _masking(str(rawpg.errors(said))), said


def test_a_function_call_message_reading_a_cursor_moves_no_masked_value(rt14proxy, pg,
                                                                        loot):
    oid = pg.execute("SELECT 'rt14_drain(refcursor)'::regprocedure::oid", dbname=DB)[0][0]
    c = raw_connect(rt14proxy)
    try:
        c.send(rawpg.query(f"BEGIN; {DECLARE}"))
        c.until_ready()
        c.send(rawpg.function_call(oid, [b"c"]))
        said = c.until_ready()
        c.send(rawpg.query("COMMIT"))
        c.until_ready()
    finally:
        c.close()
    assert loot() == [], loot()
    assert rawpg.errors(said), said


def test_the_agent_still_fetches_its_own_cursors(rt14proxy):
    """FETCH by the client itself: the rows are masked on the way out."""
    with psycopg.connect(rt14proxy.dsn(dbname=DB)) as conn:
        conn.execute(DECLARE)
        rows = conn.execute("FETCH 2 FROM c").fetchall()
        conn.rollback()
    assert len(rows) == 2 and leaks(rows) == [], rows


# F2: CREATE TABLE ... AS EXECUTE
CTAS = [
    ("PREPARE rt14p(int) AS SELECT ssn, email FROM customers WHERE id = $1",
     "CREATE TABLE rt14_t{n} AS EXECUTE rt14p(1)"),
    ("PREPARE rt14p(int) AS SELECT ssn, email FROM customers WHERE id = $1",
     "CREATE UNLOGGED TABLE rt14_t{n} AS EXECUTE rt14p(2)"),
    ("PREPARE rt14p(int) AS SELECT ssn, email FROM customers WHERE id = $1",
     "EXPLAIN ANALYZE CREATE TABLE rt14_t{n} AS EXECUTE rt14p(3)"),
    ("PREPARE rt14p AS SELECT c.* FROM customers c",
     "CREATE TABLE IF NOT EXISTS rt14_t{n} AS EXECUTE rt14p"),
    ("PREPARE rt14p AS SELECT reverse(email) AS x FROM customers",
     "CREATE TABLE rt14_t{n} (x) AS EXECUTE rt14p WITH DATA"),
]
_n = iter(range(10_000))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(CTAS)))
def test_create_table_as_execute_parks_no_masked_value(rt14proxy, pg, psql_bin, mode, case):
    prep, ctas = CTAS[case]
    n = next(_n)
    table = f"rt14_t{n}"
    said = _run(mode, rt14proxy, psql_bin, ["BEGIN", prep, ctas.format(n=n), "COMMIT"])
    made = pg.execute("SELECT relkind FROM pg_class WHERE relname = %s", (table,), dbname=DB)
    if made:
        kept = pg.execute(f"SELECT * FROM {table}", dbname=DB)
        pg.execute(f"DROP {'MATERIALIZED VIEW' if made[0][0] == 'm' else 'TABLE'} {table}",
                   dbname=DB)
        assert leaks(kept) == [], (mode, ctas, kept)
    assert made == [], (mode, ctas, said)
    assert _masking(said), said


def test_a_protocol_statement_executed_into_a_table_parks_no_masked_value(rt14proxy, pg):
    """psycopg's own prepared statement (_pg3_0 over the protocol) run by SQL EXECUTE."""
    with psycopg.connect(rt14proxy.dsn(dbname=DB), autocommit=True) as conn:
        conn.execute("SELECT ssn FROM customers WHERE id = %s", (1,), prepare=True)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE rt14_proto AS EXECUTE _pg3_0(1)")
    assert pg.execute("SELECT 1 FROM pg_class WHERE relname = 'rt14_proto'", dbname=DB) == []


def test_create_table_as_execute_of_a_table_without_masks_still_works(rt14proxy, pg):
    with psycopg.connect(rt14proxy.dsn(dbname=DB), autocommit=True) as conn:
        conn.execute("PREPARE rt14q AS SELECT id, note FROM orders")
        conn.execute("CREATE TABLE rt14_ok AS EXECUTE rt14q")
    try:
        assert pg.execute("SELECT count(*) FROM rt14_ok", dbname=DB) == [(3,)]
    finally:
        pg.execute("DROP TABLE rt14_ok", dbname=DB)
