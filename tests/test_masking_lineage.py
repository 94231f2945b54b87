# Lineage, fail closed: which result columns carry masked data, decided from the
# planner's own account of the statement (EXPLAIN VERBOSE), judged against Postgres
# itself. Unit cases on real plans; then, through the proxy, what the analysis cannot see
# (functions, procedures, temporary tables) is masked, exempt identities see clear
# values, DDL in the session is taken into account, cursors and prepared statements
# keep their plans through DECLARE/FETCH/CLOSE, failed re-Parse, DEALLOCATE.
import asyncio

import asyncpg
import psycopg
import pytest
import rawpg
from conftest import HUMAN, HUMAN_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER, run_psql
from mask_corpus import CUSTOMERS, DB, MASKS, leaks, plan_lineage, raw_connect, seed

EXTRA_SQL = """
CREATE OR REPLACE FUNCTION leak_text(i int) RETURNS text LANGUAGE sql STABLE
  AS $$ SELECT ssn FROM customers WHERE id = i $$;
CREATE OR REPLACE FUNCTION leak_num(i int) RETURNS numeric LANGUAGE plpgsql STABLE
  AS $$ BEGIN RETURN (SELECT replace(ssn, '-', '')::numeric FROM customers WHERE id = i);
  END $$;
CREATE OR REPLACE FUNCTION pgg_op(int, int) RETURNS text LANGUAGE sql STABLE
  AS $$ SELECT email FROM customers WHERE id = $1 + $2 $$;
DROP OPERATOR IF EXISTS ### (int, int);
CREATE OPERATOR ### (LEFTARG = int, RIGHTARG = int, FUNCTION = pgg_op);
CREATE OR REPLACE PROCEDURE leak_proc(INOUT s text) LANGUAGE plpgsql
  AS $$ BEGIN SELECT ssn INTO s FROM customers WHERE id = 1; END $$;
"""


@pytest.fixture(scope="module")
def lproxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    pg.execute(EXTRA_SQL, dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-lineage"), extra=MASKS).start()
    yield p
    p.stop()


def upstream(pg):
    return psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB), autocommit=True)


def agent(proxy, **kw):
    return psycopg.connect(proxy.dsn(dbname=DB), autocommit=True, **kw)


# -- the analysis itself, on real plans --------------------------------------------------

def _analysis(pg, sql):
    """columns_tainted over what the upstream says about sql (as the proxy asks it)."""
    return plan_lineage(pg, sql, {"public.customers": ("email", "ssn", "phone")},
                        with_sql=False)


@pytest.mark.parametrize("sql, expect", [
    ("SELECT id, email, name FROM customers", (False, True, False)),
    # (a count of a masked column is an aggregate of it like any other: round 15)
    ("SELECT count(*), count(email), count(DISTINCT ssn) FROM customers",
     (False, True, True)),
    ("SELECT count(*) FILTER (WHERE ssn > '5') FROM customers", (True,)),
    ("SELECT upper(name), score * 2, length(ssn) FROM customers", (False, False, True)),
    ("SELECT c.id, o.total, c.phone || '' FROM customers c JOIN orders o ON o.cust_id = c.id",
     (False, False, True)),
    ("WITH x AS MATERIALIZED (SELECT id, email FROM customers) SELECT id FROM x", (False,)),
    ("WITH x AS MATERIALIZED (SELECT id * 2 AS d, email FROM customers) SELECT d FROM x",
     (True,)),      # coarse: every column of a CTE that touches a masked value
    ("SELECT (SELECT max(email) FROM customers)", (True,)),
    ("SELECT id, (SELECT min(o.note) FROM orders o WHERE o.cust_id = c.id) FROM customers c",
     (False, False)),
    ("SELECT id::text FROM customers UNION ALL SELECT length(ssn)::text FROM customers",
     (True,)),
    ("SELECT id FROM customers UNION ALL SELECT score FROM customers", (False,)),
    ("SELECT leak_text(id), leak_num(id), id FROM customers", (True, True, False)),
    ("SELECT id ### 1 FROM customers", (True,)),
    ("SELECT c, row_to_json(c), ROW(c.id) FROM customers c", (True, True, False)),
    ("SELECT b, id FROM cust_v", (True, False)),
    ("SELECT w.c, w.id FROM wrap w", (False, False)),    # by type, in the proxy: below
    ("SELECT 'a@b.c', 42, now() IS NULL", (False, False, False)),
])
def test_plan_lineage(pg, lproxy, sql, expect):
    assert _analysis(pg, sql).masked == expect


# -- through the proxy: what the analysis cannot see is masked --------------------------

def test_functions_and_operators_that_read_masked_tables(pg, lproxy):
    sql = "SELECT id, leak_text(id), leak_num(id), id ### 0 FROM customers ORDER BY id"
    with agent(lproxy) as conn:
        got = conn.execute(sql).fetchall()
    with upstream(pg) as conn:
        truth = conn.execute(sql).fetchall()
    assert [r[0] for r in got] == [r[0] for r in truth] == [1, 2, 3]
    assert all(r[2] is None and r[1] != t[1] and r[3] != t[3] for r, t in zip(got, truth))
    assert leaks(got) == []


def test_procedure_out_parameters_masked(pg, lproxy, psql_bin):
    # a procedure over masked tables is refused outright for a masked identity (no
    # parking: pgguard cannot follow what it runs); nothing leaks either way
    with agent(lproxy) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            conn.execute("CALL leak_proc(NULL)").fetchall()
    assert 'rule "masking"' in str(ei.value) and leaks(str(ei.value)) == []
    r = run_psql(psql_bin, lproxy.dsn(dbname=DB), "-A", "-t", "-c", "CALL leak_proc(NULL)")
    assert r.returncode != 0 and leaks(r.stdout + r.stderr) == [], r.stdout


def test_unresolved_statements_fail_closed(lproxy):
    # a temporary table is unknown to the side connection: the plan cannot be read, so
    # computed columns are masked (plain columns of known unmasked tables still pass)
    # beside a masked table; over the session's own temporary tables alone nothing
    # masked is read (none can be written there), and the values come back (round 20)
    with agent(lproxy) as conn:
        conn.execute("CREATE TEMP TABLE tmp_n AS SELECT 5 AS x")
        assert conn.execute("SELECT x + 1 FROM tmp_n").fetchall() == [(6,)]
        got = conn.execute("SELECT t.x, c.id, c.email || '' FROM tmp_n t, customers c "
                           "ORDER BY c.id").fetchall()
        assert [r[1] for r in got] == [1, 2, 3] and leaks(got) == []
        # several statements in one Query: computed columns masked
        cur = conn.cursor()
        cur.execute("SELECT 1; SELECT replace(ssn, '-', '') FROM customers")
        assert leaks(cur.fetchall()) == []


def test_exempt_identity_sees_derived_values(pg, lproxy):
    sql = ("SELECT replace(ssn, '-', ''), get_byte(ssn::bytea, 0), c FROM customers c "
           "ORDER BY id")
    with psycopg.connect(lproxy.dsn(user=HUMAN, password=HUMAN_PASSWORD, dbname=DB),
                         autocommit=True) as conn:
        got = conn.execute(sql).fetchall()
    with upstream(pg) as conn:
        assert got == conn.execute(sql).fetchall()


def test_masking_composite_and_numbers_keep_wire_valid(lproxy):
    async def go():
        conn = await asyncpg.connect(lproxy.dsn(dbname=DB))
        try:
            out = []
            for _ in range(3):
                out += await conn.fetch("SELECT id, w.c, w.cs, get_byte(ssn::bytea, 2) "
                                        "FROM wrap w JOIN customers USING (id) ORDER BY id")
            return out
        finally:
            await conn.close()
    got = asyncio.run(go())
    assert [(r[0], r[1], r[2], r[3]) for r in got] == [(i, None, None, None)
                                                      for _ in range(3) for i in (1, 2, 3)]


def test_ddl_in_session_is_seen(pg, lproxy):
    sql = "SELECT id, n FROM pgg_v2 ORDER BY id"
    with agent(lproxy) as conn:
        conn.execute("CREATE OR REPLACE VIEW pgg_v2 AS SELECT id, score + 0 AS n FROM customers")
        assert conn.execute(sql).fetchall() == [(1, 17), (2, 23), (3, 31)]
        # a view over a masked column would park its values: refused, view unchanged
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            conn.execute("CREATE OR REPLACE VIEW pgg_v2 AS SELECT id, ascii(ssn) AS n "
                         "FROM customers")
        assert 'rule "masking"' in str(ei.value)
        assert conn.execute(sql).fetchall() == [(1, 17), (2, 23), (3, 31)]
    with upstream(pg) as conn:
        conn.execute("CREATE OR REPLACE VIEW pgg_v2 AS SELECT id, ascii(ssn) AS n "
                     "FROM customers")
    with agent(lproxy) as conn:           # made upstream: read through lineage, masked
        conn.execute("SELECT 1")
    with agent(lproxy) as conn:
        got = conn.execute(sql).fetchall()
    with upstream(pg) as conn:
        assert conn.execute(sql).fetchall() == [(1, 55), (2, 54), (3, 53)]
        conn.execute("DROP VIEW pgg_v2")
    assert [r[0] for r in got] in ([1, 2, 3], [None, None, None]) and \
        all(r[1] is None for r in got), got


def test_shape_cache_cannot_fold_references_away(pg, lproxy):
    # one shape, literals differ: the first folds the masked column away in Postgres's
    # planner, the second does not; the shape's analysis used parameters, so it holds
    with agent(lproxy) as conn:
        for sql in ("SELECT CASE WHEN 1 = 0 THEN ssn ELSE name END FROM customers ORDER BY id",
                    "SELECT CASE WHEN 1 = 1 THEN ssn ELSE name END FROM customers ORDER BY id",
                    "SELECT substr(ssn, 2, 5) FROM customers ORDER BY id",
                    "SELECT substr(ssn, 1, 11) FROM customers ORDER BY id"):
            got = conn.execute(sql).fetchall()
            assert leaks(got) == [] and all(r[0] in (None, "****") for r in got), (sql, got)


def test_parameters_asyncpg_and_psycopg(pg, lproxy):
    async def go():
        conn = await asyncpg.connect(lproxy.dsn(dbname=DB))
        try:
            out = []
            for _ in range(3):
                out.append(await conn.fetch("SELECT id, replace(ssn, $1, '') FROM customers "
                                            "WHERE id >= $2 ORDER BY id", "-", 1))
                out.append(await conn.fetch("SELECT id, name FROM customers WHERE id = $1", 2))
            return out
        finally:
            await conn.close()
    got = asyncio.run(go())
    assert leaks([list(r) for rs in got for r in rs]) == []
    assert [tuple(r) for r in got[1]] == [(2, "Bob")] == [tuple(r) for r in got[5]]
    with agent(lproxy) as conn:
        for _ in range(3):
            rows = conn.execute("SELECT id, ssn || %s FROM customers WHERE id > %s",
                                ["x", 0], prepare=True).fetchall()
            assert [r[0] for r in rows] == [1, 2, 3] and leaks(rows) == []


# -- cursors and prepared statements keep their plans -----------------------------------

def test_sql_cursors(pg, lproxy, psql_bin):
    script = ("BEGIN;\n"
              "DECLARE k1 CURSOR FOR SELECT id, replace(ssn, '-', ''), get_byte(ssn::bytea, 0) "
              "FROM customers ORDER BY id;\n"
              "FETCH 1 FROM k1;\nFETCH ALL FROM k1;\n"
              "DECLARE k2 CURSOR FOR SELECT id, name FROM customers ORDER BY id;\n"
              "FETCH ALL FROM k2;\nCLOSE ALL;\nCOMMIT;\n")
    r = run_psql(psql_bin, lproxy.dsn(dbname=DB), "-A", "-t", input=script)
    assert r.returncode == 0, r.stderr
    assert leaks(r.stdout) == [] and "1|Ann" in r.stdout and "3|Cyd" in r.stdout, r.stdout
    assert "55" not in r.stdout        # get_byte of '7'
    # extended protocol: DECLARE and FETCH parsed separately (psycopg named cursors do)
    c = raw_connect(lproxy)
    try:
        c.send(rawpg.query("BEGIN"))
        c.until_ready()
        c.send(rawpg.parse("DECLARE k3 CURSOR FOR SELECT email || '', id FROM customers"),
               rawpg.bind(), rawpg.execute(), rawpg.SYNC)
        c.until_ready()
        c.send(rawpg.parse("FETCH 2 FROM k3", name="f"), rawpg.SYNC)
        c.until_ready()
        msgs = []
        for _ in range(2):
            c.send(rawpg.bind("f"), rawpg.execute(), rawpg.SYNC)
            msgs += c.until_ready()
        got = rawpg.rows(msgs)
        assert [r[1] for r in got] == [b"1", b"2", b"3"] and leaks(msgs) == [], got
    finally:
        c.close()


def test_cursor_redeclare_cannot_swap_plans(lproxy):
    c = raw_connect(lproxy)
    try:
        c.send(rawpg.query("BEGIN; DECLARE k CURSOR FOR SELECT ascii(ssn), ssn || '' "
                           "FROM customers"))
        c.until_ready()
        # a DECLARE of the same name that fails, and one parsed but never run
        c.send(rawpg.query("DECLARE k CURSOR FOR SELECT 1, 'x'"))
        assert rawpg.errors(c.until_ready())
        c.send(rawpg.query("ROLLBACK; BEGIN; DECLARE k CURSOR FOR SELECT ascii(ssn), "
                           "ssn || '' FROM customers"))
        c.until_ready()
        c.send(rawpg.parse("DECLARE k CURSOR FOR SELECT 1, 'x'", name="d"), rawpg.SYNC)
        c.until_ready()
        c.send(rawpg.query("FETCH ALL FROM k"))
        msgs = c.until_ready()
        got = rawpg.rows(msgs)
        assert len(got) == 3 and all(r[0] is None for r in got) and leaks(msgs) == [], got
    finally:
        c.close()


def test_failed_reparse_and_close_reparse(pg, lproxy):
    masked = "SELECT id, reverse(ssn) FROM customers ORDER BY id"
    clean = "SELECT id, reverse(name) FROM customers ORDER BY id"
    c = raw_connect(lproxy)
    try:
        c.send(rawpg.parse(masked, name="s1"), rawpg.SYNC)
        c.until_ready()
        c.send(rawpg.parse(clean, name="s1"), rawpg.SYNC)      # already exists: fails
        assert rawpg.errors(c.until_ready())
        c.send(rawpg.bind("s1"), rawpg.execute(), rawpg.SYNC)
        msgs = c.until_ready()
        assert [r[1] for r in rawpg.rows(msgs)] == [b"****"] * 3 and leaks(msgs) == []
        c.send(rawpg.close("S", "s1"), rawpg.parse(clean, name="s1"), rawpg.SYNC)
        c.until_ready()
        c.send(rawpg.bind("s1"), rawpg.execute(), rawpg.SYNC)
        got = rawpg.rows(c.until_ready())
        assert got == [[b"1", b"nnA"], [b"2", b"boB"], [b"3", b"dyC"]]
        # SQL PREPARE / EXECUTE / DEALLOCATE / PREPARE again
        for sql in ("PREPARE q AS " + masked, "EXECUTE q", "DEALLOCATE q",
                    "PREPARE q AS " + clean, "EXECUTE q"):
            c.send(rawpg.query(sql))
            msgs = c.until_ready()
            assert not rawpg.errors(msgs) and leaks(msgs) == [], (sql, msgs)
        assert rawpg.rows(msgs) == got
    finally:
        c.close()


def test_unknown_portal_never_leaks(lproxy):
    # a SQL cursor executed as a protocol portal: pgguard asks for the portal's shape
    # first and masks its rows by the cursor's lineage (they ended the session before:
    # no plan for them); the session goes on
    c = raw_connect(lproxy)
    try:
        c.send(rawpg.query("BEGIN; DECLARE kp CURSOR FOR SELECT ssn || '' FROM customers"))
        c.until_ready()
        c.send(rawpg.execute("kp"), rawpg.SYNC)
        msgs = c.until_ready()
        assert leaks(msgs) == [] and len(rawpg.rows(msgs)) == 3, msgs
        assert rawpg.rows(c.run("SELECT 5")) == [[b"5"]]
    finally:
        c.close()


def test_first_execution_matches_direct_for_clean_columns(pg, lproxy):
    sql = ("SELECT c.id, c.name, c.score, o.total, o.note, c.email FROM customers c "
           "JOIN orders o ON o.cust_id = c.id ORDER BY c.id")
    with agent(lproxy) as conn:
        got = conn.execute(sql).fetchall()
    with upstream(pg) as conn:
        truth = conn.execute(sql).fetchall()
    assert [r[:5] for r in got] == [r[:5] for r in truth]
    assert [r[5] for r in got] == ["z***@example.com", "m***@example.org", "t***@example.net"]
    assert CUSTOMERS[0][2] == truth[0][5]


def test_partitions_carry_the_masks(pg, tmp_path_factory):
    from conftest import Proxy
    pg.execute("""
        DROP TABLE IF EXISTS pcust CASCADE;
        CREATE TABLE pcust (id int, ssn text) PARTITION BY RANGE (id);
        CREATE TABLE pcust_a PARTITION OF pcust FOR VALUES FROM (0) TO (2);
        CREATE TABLE pcust_b PARTITION OF pcust FOR VALUES FROM (2) TO (10);
        INSERT INTO pcust VALUES (1, '732-19-4856'), (2, '618-27-3940'), (3, '504-83-1276');
    """, dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-parts"), extra="""
[[masks]]
column = "public.pcust.ssn"
strategy = "redact"
""").start()
    try:
        with agent(p) as conn:
            for sql in ("SELECT ssn, id FROM pcust ORDER BY id",
                        "SELECT replace(q.ssn, '-', ''), q.id FROM pcust q ORDER BY id",
                        "SELECT ssn, ascii(ssn), id FROM pcust_b ORDER BY id",
                        "SELECT p, id FROM pcust_a p"):
                got = conn.execute(sql).fetchall()
                assert got and leaks(got) == [], (sql, got)
                assert all(r[-1] is not None for r in got)     # ids pass
                assert all(v is None or v == "****" for r in got for v in r[:-1]), got
    finally:
        p.stop()


@pytest.mark.parametrize("sql", [
    "UPDATE customers SET score = score WHERE id <= 3 RETURNING id, replace(ssn, '-', '')",
    "UPDATE customers c SET score = c.score RETURNING c.id, c, get_byte(c.ssn::bytea, 0)",
    ("WITH u AS (UPDATE customers SET score = score RETURNING id, email) "
     "SELECT id, upper(email) FROM u"),
    ("INSERT INTO orders SELECT 100 + id, id, length(ssn), ssn FROM customers "
     "ON CONFLICT (id) DO UPDATE SET note = orders.note RETURNING id, note, note || ''"),
    "DELETE FROM orders WHERE id > 1000 RETURNING id, note",
])
def test_row_changing_statements_returning_under_the_guard(pg, lproxy, sql):
    # these run under the blast-radius guard (savepoints, its own answers taken out):
    # the masking pairs the client's answers all the same, in every mode
    with upstream(pg) as conn:
        before = conn.execute("SELECT id, score, email, ssn FROM customers ORDER BY id") \
            .fetchall()
    # a write that references masked columns is refused for a masked identity (no
    # parking); whichever way, nothing leaks, in every mode, and nothing changes upstream
    with agent(lproxy) as conn:
        for _ in range(3):
            try:
                got = conn.execute(sql, prepare=True).fetchall()
            except psycopg.errors.InsufficientPrivilege as e:
                got = str(e)
                assert 'rule "masking"' in got
            assert leaks(got) == [], got
    c = raw_connect(lproxy)
    try:
        c.send(rawpg.parse(sql, name="w"), rawpg.SYNC)
        msgs = c.until_ready()
        c.send(rawpg.bind("w"), rawpg.execute(), rawpg.bind("w"), rawpg.execute(), rawpg.SYNC)
        msgs += c.until_ready()
        assert leaks(msgs) == [], msgs
        assert all(e["C"] in ("42501", "26000") for e in rawpg.errors(msgs)), msgs
    finally:
        c.close()

    async def go():
        conn = await asyncpg.connect(lproxy.dsn(dbname=DB))
        out = []
        try:
            for _ in range(3):
                try:
                    out += [list(r.values()) for r in await conn.fetch(sql)]
                except asyncpg.InsufficientPrivilegeError as e:
                    out.append(str(e))
            return out
        finally:
            await conn.close()
    assert leaks(asyncio.run(go())) == []
    with upstream(pg) as conn:
        after = conn.execute("SELECT id, score, email, ssn FROM customers ORDER BY id") \
            .fetchall()
    assert after == before


def test_values_written_from_masked_columns_and_returned(pg, lproxy):
    with psycopg.connect(lproxy.dsn(dbname=DB)) as conn:
        # a write fed from masked values would park them: refused
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            conn.execute("UPDATE customers SET name = ssn WHERE id = 1 "
                         "RETURNING id, name, score").fetchall()
        assert 'rule "masking"' in str(ei.value) and leaks(str(ei.value)) == []
        conn.rollback()
        got = conn.execute("UPDATE customers SET name = upper(name) WHERE id = 2 "
                           "RETURNING id, name, score").fetchall()
        conn.rollback()
    assert got == [(2, "BOB", 23)]              # written from clean values: as it is
    with upstream(pg) as conn:
        assert conn.execute("SELECT name FROM customers WHERE id = 1").fetchone() == ("Ann",)
