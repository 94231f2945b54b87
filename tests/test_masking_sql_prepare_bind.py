# A statement made by SQL PREPARE shares its namespace with the protocol's statements:
# libpq's PQexecPrepared (or any raw Bind) can run it by name. No Parse ever told
# pgguard its row shape, so its rows used to end the session ("the mask plan has 0
# columns"). The Bind now asks Postgres for the statement's description (withheld from
# the client) and its portal takes the PREPARE's masking plan: the rows come back masked,
# in text and binary, whole or a few rows at a time, and the session goes on. Judged by
# the bytes the client got against the seeded clear values, and by the rows a direct
# connection returns.
import psycopg
import pytest
import rawpg
from mask_corpus import DB, MASKS, leaks, raw_connect, seed

from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER

PREPARES = [
    ("p_plain", "PREPARE p_plain AS SELECT id, email, ssn FROM customers ORDER BY id", []),
    ("p_expr", "PREPARE p_expr AS SELECT id, reverse(ssn), upper(email) FROM customers "
     "ORDER BY id", []),
    ("p_row", "PREPARE p_row AS SELECT c FROM customers c ORDER BY id", []),
    ("p_param", "PREPARE p_param(int) AS SELECT id, email, phone FROM customers "
     "WHERE id <= $1 ORDER BY id", [b"3"]),
    ("p_union", "PREPARE p_union AS SELECT name FROM customers UNION ALL "
     "SELECT ssn FROM customers", []),
]
CLEAN = ("p_clean", "PREPARE p_clean AS SELECT id, name FROM customers ORDER BY id", [])


@pytest.fixture(scope="module")
def proxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-sqlprep"), extra=MASKS).start()
    yield p
    p.stop()


def _direct_rows(pg, prepare, params):
    c = rawpg.RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
    try:
        return _raw_variant(c, "text", prepare, params)[1]
    finally:
        c.close()


def _raw_variant(c, variant, prepare, params):
    """(every message, the rows) of running ``prepare``'s statement by raw Binds."""
    name = prepare.split()[1].split("(")[0]
    msgs = c.run(prepare)
    assert not rawpg.errors(msgs), rawpg.errors(msgs)
    rows = []
    if variant in ("text", "binary"):
        fmt = [1] if variant == "binary" else []
        c.send(rawpg.bind(name, params, result_formats=fmt), rawpg.execute(), rawpg.SYNC)
        got = c.until_ready()
        msgs += got
        rows = rawpg.rows(got)
    elif variant == "describe-and-chunks":
        c.send(rawpg.bind(name, params, portal="pp"), rawpg.describe("P", "pp"),
               rawpg.execute("pp", 1), rawpg.execute("pp", 1), rawpg.execute("pp", 0),
               rawpg.SYNC)
        got = c.until_ready()
        msgs += got
        rows = rawpg.rows(got)
    elif variant == "three-times":
        for _ in range(3):
            c.send(rawpg.bind(name, params), rawpg.execute(), rawpg.SYNC)
            got = c.until_ready()
            msgs += got
            rows = rawpg.rows(got)
    elif variant == "in-a-block":
        c.send(rawpg.query("BEGIN"))
        msgs += c.until_ready()
        c.send(rawpg.bind(name, params, portal="b1"), rawpg.execute("b1", 2),
               rawpg.bind(name, params, portal="b2"), rawpg.execute("b2"),
               rawpg.execute("b1"), rawpg.SYNC)
        got = c.until_ready()
        msgs += got
        rows = rawpg.rows(got)
        msgs += c.run("COMMIT")
    msgs += c.run(f"DEALLOCATE {name}")
    return msgs, rows


VARIANTS = ["text", "binary", "describe-and-chunks", "three-times", "in-a-block"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_binds_of_a_sql_prepare_are_masked(proxy, pg, variant):
    c = raw_connect(proxy)
    try:
        for name, prepare, params in PREPARES:
            want = _direct_rows(pg, prepare, params)
            assert leaks(want), name              # the clear values are there upstream
            msgs, rows = _raw_variant(c, variant, prepare, params)
            assert not rawpg.errors(msgs), (name, rawpg.errors(msgs))
            assert leaks(msgs) == [], (name, variant, leaks(msgs))
            if variant not in ("describe-and-chunks", "in-a-block"):
                assert len(rows) == len(want), (name, variant)
            else:                                 # the portal(s) read every row once
                assert len(rows) == len(want) * (2 if variant == "in-a-block" else 1)
        # the session goes on
        assert rawpg.rows(c.run("SELECT 41 + 1")) == [[b"42"]]
    finally:
        c.close()


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_libpq_exec_prepared_of_a_sql_prepare_is_masked(proxy, pg, binary):
    with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as conn:
        for name, prepare, params in PREPARES:
            conn.execute(prepare)
            res = conn.pgconn.exec_prepared(name.encode(), params or None,
                                            result_format=1 if binary else 0)
            assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
            cells = [res.get_value(r, f) for r in range(res.ntuples)
                     for f in range(res.nfields)]
            assert res.ntuples == len(_direct_rows(pg, prepare, params)), name
            assert leaks(cells) == [], (name, leaks(cells))
            conn.execute(f"DEALLOCATE {name}")
        assert conn.execute("SELECT 42").fetchone() == (42,)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_clean_sql_prepare_bound_raw_is_byte_identical(proxy, pg, variant):
    name, prepare, params = CLEAN
    want = _direct_rows(pg, prepare, params)
    c = raw_connect(proxy)
    try:
        msgs, rows = _raw_variant(c, variant, prepare, params)
    finally:
        c.close()
    assert not rawpg.errors(msgs)
    if variant == "text":
        assert rows == want
    elif variant == "describe-and-chunks" or variant == "three-times":
        assert rows == want


def test_a_prepare_replaced_in_the_same_write_is_masked(proxy, pg):
    """A clean PREPARE, then in one write: a Query that deallocates it and prepares the
    name again over a masked column, and a Bind of the name. The Bind's rows are the new
    statement's: never read with the old, clean plan."""
    c = raw_connect(proxy)
    try:
        for i, new in enumerate(["SELECT reverse(ssn) FROM customers ORDER BY id",
                                 "SELECT email || '' FROM customers ORDER BY id",
                                 "SELECT upper(name) || ssn FROM customers ORDER BY id",
                                 "SELECT (SELECT ssn FROM customers c2 WHERE c2.id = c.id) "
                                 "FROM customers c ORDER BY id",
                                 "SELECT concat(ssn) FROM customers ORDER BY id"]):
            assert not rawpg.errors(c.run(f"PREPARE r{i} AS SELECT name FROM customers "
                                          "ORDER BY id"))
            c.send(rawpg.query(f"DEALLOCATE r{i}; PREPARE r{i} AS {new}"),
                   rawpg.bind(f"r{i}"), rawpg.execute(), rawpg.SYNC)
            msgs = c.until_ready(2)
            assert not rawpg.errors(msgs), rawpg.errors(msgs)
            assert rawpg.rows(msgs), new
            assert leaks(msgs) == [], (new, leaks(msgs))
        assert rawpg.rows(c.run("SELECT 41 + 1")) == [[b"42"]]
    finally:
        c.close()


# (round 17, helper 87) a comment before PREPARE / EXECUTE hid them from the masking's
# cursor-and-prepare bookkeeping: EXECUTE q returned NULL for a clean column
COMMENTED = [
    ("/*c*/ PREPARE cq1 AS SELECT id, name FROM customers WHERE id = $1", "EXECUTE cq1(1)"),
    ("-- note\nPREPARE cq2 AS SELECT id, name FROM customers WHERE id = $1",
     "/* run */ EXECUTE cq2(2)"),
    ("/* a */ /* b */ PREPARE cq3 AS SELECT id, name FROM customers WHERE id = $1",
     "-- x\n EXECUTE cq3(3)"),
]


@pytest.mark.parametrize("prepare,run", COMMENTED)
def test_a_commented_sql_prepare_runs_as_it_would_directly(proxy, pg, prepare, run):
    got = []
    for dsn in (pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB), proxy.dsn(dbname=DB)):
        with psycopg.connect(dsn, autocommit=True) as c:
            psycopg.ClientCursor(c).execute(prepare)
            got.append(psycopg.ClientCursor(c).execute(run).fetchall())
    assert got[1] == got[0] and got[0] and got[0][0][1] is not None, got
