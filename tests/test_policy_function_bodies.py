# A call of a user function is judged by what its body runs now: a function created
# before the view its body writes through (the red team's rt_f1), one a DBA created
# directly upstream, SQL-language ones, nested calls, calls inside a CTE, a subquery or
# INSERT ... SELECT, overloads, and FunctionCall by OID. Each route (psycopg simple and
# prepared, asyncpg, psql, a raw pipeline) is judged by the rows upstream, read directly
# as the superuser; near neighbours (functions that only read, or write a table no rule
# names) keep working.
import asyncio
import threading

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, run_psql
from guarded import fails_everywhere, guarded_proxy
from rawpg import SYNC, RawClient, bind, errors, execute, function_call, parse, query, rows

DB = "appdb"
RULE = "agent-writes-to-fb-orders-need-approval"
RULES = f"""
[[rules]]
name = "{RULE}"
when = {{ kind = "agent", statements = ["insert", "update", "delete", "merge"], relations = ["public.fb_orders"] }}
action = "approve"
timeout = "1s"
"""

SCHEMA = """
DROP VIEW IF EXISTS fb_v1, fb_v3 CASCADE;
DROP TABLE IF EXISTS fb_orders, fb_notes CASCADE;
DROP FUNCTION IF EXISTS fb_f1(), fb_f2(), fb_purge(), fb_cancel(int), fb_outer(),
    fb_ov(int), fb_ov(text), fb_read(), fb_note(int), fb_cyc_a(), fb_cyc_b(), fb_c();
CREATE TABLE fb_orders (id int PRIMARY KEY, status text);
CREATE TABLE fb_notes (id int PRIMARY KEY, body text);
-- created directly upstream, behind pgguard's back
CREATE FUNCTION fb_purge() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE n bigint; BEGIN DELETE FROM fb_orders WHERE id > 0; GET DIAGNOSTICS n = ROW_COUNT;
RETURN n; END$$;
CREATE FUNCTION fb_cancel(int) RETURNS int LANGUAGE sql AS
    $$ UPDATE fb_orders SET status = 'cancelled' WHERE id = $1; SELECT 1 $$;
CREATE FUNCTION fb_outer() RETURNS int LANGUAGE plpgsql AS $$
BEGIN PERFORM fb_purge(); RETURN 1; END$$;
CREATE FUNCTION fb_ov(int) RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM fb_notes $$;
CREATE FUNCTION fb_ov(text) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN DELETE FROM fb_orders WHERE status = $1; RETURN 0; END$$;
CREATE FUNCTION fb_read() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM fb_orders $$;
CREATE FUNCTION fb_note(int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN UPDATE fb_notes SET body = 'touched' WHERE id = $1; RETURN 1; END$$;
CREATE FUNCTION fb_cyc_a() RETURNS int LANGUAGE plpgsql AS $$
BEGIN IF random() > 2 THEN PERFORM fb_cyc_b(); END IF; RETURN 1; END$$;
CREATE FUNCTION fb_cyc_b() RETURNS int LANGUAGE plpgsql AS $$
BEGIN PERFORM fb_cyc_a(); RETURN 1; END$$;
"""

ORDERS = [(i, "new") for i in range(1, 6)]
NOTES = [(1, "a"), (2, "b")]


@pytest.fixture(scope="module", autouse=True)
def schema(pg):
    pg.execute(SCHEMA, dbname=DB)
    yield
    pg.execute("DROP VIEW IF EXISTS fb_v1, fb_v3 CASCADE; DROP TABLE IF EXISTS fb_orders, "
               "fb_notes CASCADE; DROP FUNCTION IF EXISTS fb_f1(), fb_f2(), fb_purge(), "
               "fb_cancel(int), fb_outer(), fb_ov(int), fb_ov(text), fb_read(), "
               "fb_note(int), fb_cyc_a(), fb_cyc_b()", dbname=DB)


@pytest.fixture(scope="module")
def guarded(pg, schema, tmp_path_factory):
    with guarded_proxy(pg, tmp_path_factory.mktemp("bodies"), RULES) as p:
        yield p


def orders(pg):
    return pg.execute("SELECT id, status FROM fb_orders ORDER BY id", dbname=DB)


def notes(pg):
    return pg.execute("SELECT id, body FROM fb_notes ORDER BY id", dbname=DB)


@pytest.fixture(autouse=True)
def unchanged(pg):
    """Every test leaves fb_orders as it was: the truth upstream."""
    pg.execute("DELETE FROM fb_orders; INSERT INTO fb_orders SELECT i, 'new' FROM "
               "generate_series(1, 5) i; DELETE FROM fb_notes; INSERT INTO fb_notes "
               "VALUES (1, 'a'), (2, 'b')", dbname=DB)
    yield
    assert orders(pg) == ORDERS


def until_row(c, value: bytes) -> list:
    """Messages up to the ReadyForQuery after the row holding ``value`` (the exact
    reply sequences of held pipelines are judged in test_hold_replay_pipelines.py)."""
    got = []
    while True:
        got.append(c.read())
        if got[-1][0] == b"Z" and [value] in rows(got):
            return got


def conn(proxy, user=AGENT, password=AGENT_PASSWORD):
    return psycopg.connect(proxy.dsn(user, password, dbname=DB), autocommit=True)


def held(e, what: str = ""):
    """Refused: the approval the rule asks for timed out (nobody approved)."""
    d = e.value.diag
    assert d.sqlstate == "42501", d.message_primary
    # (or, since round 16, refused at once: a write to a name the catalog does not
    # know yet, which a body finds only when it runs)
    assert "timed out" in d.message_primary or RULE in d.message_primary or \
        'rule "catalog"' in d.message_primary, d.message_primary
    return d


def _unknown_refused(text: str) -> bool:
    # round 16: a body writing a name the catalog does not know is refused when called
    return 'rule "catalog"' in text


def calls_refused(proxy, sql: str):
    """psycopg simple and prepared both refused."""
    with conn(proxy) as c:
        for prepare in (False, True):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                if prepare:
                    c.execute(sql, prepare=True)
                else:
                    psycopg.ClientCursor(c).execute(sql)
            held(e)
        assert c.execute("SELECT 1").fetchone() == (1,)


def refused_everywhere(proxy, psql_bin, sql: str, code: str = "42501") -> None:
    fails_everywhere(proxy, psql_bin, sql, DB, code)


_serial = iter(range(1, 1000))


@pytest.fixture
def rt(pg, guarded):
    """The red team's reproduction: the functions are created through pgguard before
    the views their bodies write through exist (then both are allowed), then the views.
    Fresh names each time (views a session announced stay known for a while)."""
    n = next(_serial)
    f1, f2, v1, v3 = f"fb_f1_{n}", f"fb_f2_{n}", f"fb_v1_{n}", f"fb_v3_{n}"
    with conn(guarded) as c:
        c.execute(f"CREATE FUNCTION {f1}() RETURNS bigint LANGUAGE plpgsql AS $$DECLARE n "
                  f"bigint; BEGIN DELETE FROM {v1} WHERE id > 0; GET DIAGNOSTICS n = "
                  "ROW_COUNT; RETURN n; END$$")
        c.execute(f"CREATE FUNCTION {f2}() RETURNS int LANGUAGE plpgsql AS $$BEGIN UPDATE "
                  f"{v3} SET status = 'cancelled' WHERE id = 3; RETURN 1; END$$")
        c.execute(f"CREATE VIEW {v1} AS SELECT * FROM fb_orders")
        c.execute(f"CREATE VIEW {v3} AS SELECT * FROM fb_orders")
    yield f1, f2
    pg.execute(f"DROP VIEW IF EXISTS {v1}, {v3}; DROP FUNCTION IF EXISTS {f1}(), {f2}()",
               dbname=DB)


# ---------------------------------------------------------------- the red team's case

def test_view_created_after_the_function(pg, guarded, rt):
    f1, f2 = rt
    notices = []
    with conn(guarded) as c:
        c.add_notice_handler(lambda d: notices.append(f"{d.message_primary} {d.message_detail}"))
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute(f"SELECT {f1}()")
        held(e)
        # the approver is shown what the call runs
        seen = " ".join(notices)
        assert "public.fb_orders" in seen, seen
    calls_refused(guarded, f"SELECT {f1}()")
    calls_refused(guarded, f"SELECT {f2}()")


def test_refusal_says_what_was_seen():
    """The decision's text, as the policy makes it from the catalog's rows (no server)."""
    from pgguard.config import Identity, loads
    from pgguard.policy.bodies import Bodies, judgement
    from pgguard.policy.rules import PolicyEngine
    from pgguard.policy.views import ViewMap
    engine = PolicyEngine(loads('[policy]\nagents = "guarded"\n' + RULES))
    j = judgement("fb_f1", [("public", "fb_f1", "1", "plpgsql", "f", "f", "v", None,
                             "CREATE FUNCTION public.fb_f1() RETURNS bigint LANGUAGE plpgsql "
                             "AS $f$BEGIN DELETE FROM fb_v1 WHERE id > 0; RETURN 0; END$f$",
                             None)])
    d = engine.decide("SELECT fb_f1()", AGENT, Identity(kind="agent"), DB,
                      views=ViewMap({"public.fb_v1": frozenset({"public.fb_orders"})}),
                      functions=Bodies(lambda n: n == "fb_f1", {"fb_f1": j}.get))
    assert d.action == "approve" and d.rule == RULE
    assert "fb_f1() deletes from public.fb_v1, a view over public.fb_orders" in d.message
    assert "public.fb_orders" in d.detail and d.hint


def test_red_team_via_asyncpg(pg, guarded, rt):
    f1, f2 = rt
    async def main():
        c = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            for sql in (f"SELECT {f1}()", f"SELECT {f2}()", f"SELECT * FROM {f1}()"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await c.fetchval(sql)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await c.execute(f"SELECT {f1}()")       # simple protocol
            assert await c.fetchval("SELECT fb_read()") == 5
        finally:
            await c.close()
    asyncio.run(main())


def test_red_team_via_psql(pg, guarded, psql_bin, rt):
    f1, f2 = rt
    r = run_psql(psql_bin, guarded.dsn(dbname=DB), "-v", "ON_ERROR_STOP=0",
                 input=f"SELECT {f1}();\nSELECT {f2}();\nSELECT 'still here';\n")
    assert r.stderr.count("ERROR:  approval #") == 2, r.stderr
    assert "still here" in r.stdout


def test_red_team_via_raw_pipeline(pg, guarded, rt):
    f1, f2 = rt
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        sqls = [f"SELECT {f1}()", "SELECT fb_read()", f"SELECT {f2}()", "SELECT 7"]
        c.send(*(parse(s) + bind() + execute() + SYNC for s in sqls), query("SELECT 'end'"))
        got = until_row(c, b"end")
        errs = errors(got)
        assert [e["C"] for e in errs] == ["42501", "42501"], errs
        assert [b"5"] in rows(got) and [b"7"] in rows(got), rows(got)
        # FunctionCall by OID
        oid = int(pg.execute(f"SELECT '{f1}'::regproc::oid", dbname=DB)[0][0])
        c.send(function_call(oid))
        errs = errors(c.until_ready())
        assert errs and errs[0]["C"] == "42501", errs
        assert rows(c.run("SELECT 8")) == [[b"8"]]
    finally:
        c.close()


# ---------------------------------------------------------------- variants

VARIANTS = [
    "SELECT fb_purge()",                                        # created upstream
    "SELECT fb_cancel(3)",                                      # SQL language
    "SELECT fb_outer()",                                        # nested call
    "SELECT public.fb_purge()",                                 # qualified
    "WITH x AS (SELECT fb_purge() AS n) SELECT n FROM x",       # inside a CTE
    "SELECT * FROM (SELECT fb_cancel(2)) s",                    # in a subquery
    "SELECT 1 WHERE EXISTS (SELECT fb_purge())",
    "INSERT INTO fb_notes (id, body) SELECT 10, fb_purge()::text",
    "SELECT fb_ov('new')",                                      # overloads
    "SELECT count(*) FROM fb_notes WHERE fb_cancel(id) = 1",
]


@pytest.mark.parametrize("sql", VARIANTS)
def test_variants_psycopg(pg, guarded, sql):
    calls_refused(guarded, sql)
    assert notes(pg) == NOTES


def test_variants_asyncpg_and_pipeline(pg, guarded):
    async def main():
        c = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            for sql in VARIANTS:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await c.fetch(sql)
        finally:
            await c.close()
    asyncio.run(main())
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        c.send(*(parse(s) + bind() + execute() + SYNC for s in VARIANTS), query("SELECT 'end'"))
        errs = errors(until_row(c, b"end"))
        assert [e["C"] for e in errs] == ["42501"] * len(VARIANTS), errs
    finally:
        c.close()
    assert notes(pg) == NOTES


def test_cycle_is_refused_with_a_reason(pg, guarded):
    with conn(guarded) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("SELECT fb_cyc_a()")
        msg = e.value.diag.message_primary
        assert "cycle" in msg and "fb_cyc_a()" in msg and "fb_cyc_b()" in msg, msg


# ---------------------------------------------------------------- changed bodies

def test_body_replaced_through_pgguard_forgets_the_cached_decision(pg, guarded):
    """fb_note writes a table no rule names: allowed (and cached); a human replaces its
    body through pgguard to write fb_orders: the agent's next call is judged again."""
    pg.execute("CREATE OR REPLACE FUNCTION fb_note(int) RETURNS int LANGUAGE plpgsql AS $$"
               "BEGIN UPDATE fb_notes SET body = 'touched' WHERE id = $1; RETURN 1; END$$",
               dbname=DB)
    try:
        with conn(guarded) as c:
            for _ in range(3):
                assert c.execute("SELECT fb_note(1)").fetchone() == (1,)
            with conn(guarded, HUMAN, HUMAN_PASSWORD) as h:
                h.execute("CREATE OR REPLACE FUNCTION fb_note(int) RETURNS int LANGUAGE "
                          "plpgsql AS $$BEGIN UPDATE fb_orders SET status = 'x' WHERE id = "
                          "$1; RETURN 1; END$$")
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute("SELECT fb_note(1)")
            held(e)
    finally:
        pg.execute("CREATE OR REPLACE FUNCTION fb_note(int) RETURNS int LANGUAGE plpgsql AS "
                   "$$BEGIN UPDATE fb_notes SET body = 'touched' WHERE id = $1; RETURN 1; "
                   "END$$", dbname=DB)


def test_function_and_view_in_one_transaction(pg, guarded):
    """Created, made dangerous and called before the catalog shows the function."""
    with conn(guarded) as c:
        c.execute("BEGIN")
        c.execute("CREATE FUNCTION fb_c() RETURNS int LANGUAGE plpgsql AS $$BEGIN "
                  "DELETE FROM fb_v9 WHERE id > 0; RETURN 1; END$$")
        c.execute("CREATE VIEW fb_v9 AS SELECT * FROM fb_orders")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute("SELECT fb_c()")
        held(e)
        c.execute("ROLLBACK")


# ---------------------------------------------------------------- near neighbours

def test_reading_and_unruled_functions_still_run(pg, guarded):
    with conn(guarded) as c:
        assert c.execute("SELECT fb_read()").fetchone() == (5,)
        assert c.execute("SELECT fb_read()", prepare=True).fetchone() == (5,)
        assert c.execute("SELECT fb_note(2)").fetchone() == (1,)
        assert c.execute("SELECT now() IS NOT NULL, lower('A')").fetchone() == (True, "a")
    assert notes(pg) == [(1, "a"), (2, "touched")]

    async def main():
        a = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            assert await a.fetchval("SELECT fb_read()") == 5
            assert await a.fetchval("SELECT fb_note(1)") == 1
        finally:
            await a.close()
    asyncio.run(main())
    assert notes(pg) == [(1, "touched"), (2, "touched")]


# ---------------------------------------------------------------- a review's routes
# (each found by running it: an agent got a body past the judgement; now each is refused
# or judged, and fb_orders keeps its rows: the autouse fixture checks upstream)

def _fresh() -> tuple[str, str]:
    n = next(_serial)
    return f"fb_r{n}", f"fb_rv{n}"


def _deleting(c, fn: str, view: str, args: str = "", name_sql: str | None = None):
    """A function whose body deletes through ``view`` (created afterwards)."""
    c.execute(f"CREATE FUNCTION {name_sql or fn}({args}) RETURNS bigint LANGUAGE plpgsql AS "
              f"$$DECLARE n bigint; BEGIN DELETE FROM {view} WHERE id > 0; GET DIAGNOSTICS "
              "n = ROW_COUNT; RETURN n; END$$")


def test_a_quoted_name_with_a_dot_is_not_run_unjudged(pg, guarded):
    fn, view = _fresh()
    with conn(guarded) as c:
        _deleting(c, fn, view, name_sql=f'"{fn}.x"')
        c.execute(f"CREATE VIEW {view} AS SELECT * FROM fb_orders")
    for sql in (f'SELECT "{fn}.x"()', f'SELECT public."{fn}.x"()',
                f'SELECT 1 WHERE "{fn}.x"() > 0'):
        with conn(guarded) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute(sql)
            assert "catalog" in (e.value.diag.message_detail or "") + \
                e.value.diag.message_primary
    pg.execute(f'DROP VIEW {view}; DROP FUNCTION "{fn}.x"()', dbname=DB)


PLANTING = [
    "CREATE VIEW {obj} AS SELECT {fn}() AS x",
    "CREATE TABLE {obj} (a int, b bigint DEFAULT {fn}())",
    "CREATE TABLE {obj} (a int CHECK ({fn}() >= 0))",
    "CREATE MATERIALIZED VIEW {obj} AS SELECT {fn}() AS x WITH NO DATA",
    "CREATE DOMAIN {obj} AS bigint CHECK (VALUE > {fn}())",
    "ALTER TABLE fb_notes ADD COLUMN {obj} bigint DEFAULT {fn}()",
    "CREATE OPERATOR #@!# (leftarg = int, rightarg = int, function = {fn2})",
    "CREATE CAST (fb_notes AS bigint) WITH FUNCTION {fn2}(int, int)",
]


@pytest.mark.parametrize("ddl", PLANTING)
def test_definitions_that_keep_a_call_of_a_user_function_are_refused(pg, guarded, psql_bin,
                                                                     ddl):
    fn, view = _fresh()
    n = fn[4:]
    with conn(guarded) as c:
        _deleting(c, fn, view)
        _deleting(c, fn + "b", view, args="a int, b int")
        sql = ddl.format(obj=f"fb_o{n}", fn=fn, fn2=fn + "b", n=n)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute(sql)
        assert "keeps a call of" in (e.value.diag.message_detail or "") + \
            e.value.diag.message_primary, e.value.diag.message_detail
        c.execute(f"CREATE VIEW {view} AS SELECT * FROM fb_orders")
    refused_everywhere(guarded, psql_bin, sql)
        # the object does not exist upstream: nothing runs the body later
    assert pg.execute(f"SELECT count(*) FROM pg_class WHERE relname = 'fb_o{n}'",
                      dbname=DB) == [(0,)]
    assert pg.execute("SELECT count(*) FROM pg_operator WHERE oprname = '#@!#'",
                      dbname=DB) == [(0,)]
    assert pg.execute("SELECT count(*) FROM information_schema.columns WHERE "
                      f"column_name = 'fb_o{n}'", dbname=DB) == [(0,)]
    pg.execute(f"DROP VIEW {view}; DROP FUNCTION {fn}(), {fn}b(int, int)", dbname=DB)


@pytest.mark.parametrize("builtin", ["upper", "length", "abs", "md5", "lower"])
def test_a_function_shadowing_a_builtin_name_is_refused(pg, guarded, psql_bin, builtin):
    """CREATE FUNCTION upper(int) (a body deleting through a view made afterwards): an
    overload of a built-in's name takes over other sessions' calls its argument types
    fit better, so an agent may not create one (round 15); the built-in still runs."""
    _, view = _fresh()
    with conn(guarded) as a:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            _deleting(a, builtin, view, args="int")
        assert "a function of that name exists" in str(e.value)
    assert pg.execute(f"SELECT count(*) FROM pg_proc WHERE proname = '{builtin}' AND "
                      "pronamespace = 'public'::regnamespace", dbname=DB) == [(0,)]
    with conn(guarded) as b:
        arg = "-2" if builtin == "abs" else "'x'"
        assert b.execute(f"SELECT {builtin}({arg}) IS NOT NULL").fetchone() == (True,)


def test_a_refused_shadow_leaves_the_builtin_usable(pg, guarded):
    with conn(guarded) as c:
        c.execute("BEGIN")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("CREATE FUNCTION count(text) RETURNS bigint LANGUAGE sql "
                      "AS 'SELECT 1::bigint'")
        c.execute("ROLLBACK")
    with conn(guarded) as c:
        assert c.execute("SELECT count(*) FROM fb_notes").fetchone() == (2,)
        assert c.execute("SELECT upper('x')").fetchone() == ("X",)


# a statement prepared while its function's body was harmless, executed after a view
# gave the body's name a new meaning: judged again at the Bind (the catalog moved)

def _fresh_pair(pg, guarded):
    """A function that deletes through ``view`` once it exists (0 before)."""
    fn, view = _fresh()
    with conn(guarded) as c:
        c.execute(f"CREATE FUNCTION {fn}() RETURNS bigint LANGUAGE plpgsql AS $$DECLARE n "
                  f"bigint := 0; BEGIN IF to_regclass('{view}') IS NOT NULL THEN DELETE FROM "
                  f"{view} WHERE id > 0; GET DIAGNOSTICS n = ROW_COUNT; END IF; RETURN n; "
                  "END$$")
    return fn, view


def test_prepared_before_the_view_raw(pg, guarded):
    fn, view = _fresh_pair(pg, guarded)
    c = RawClient.connect(guarded.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        c.send(parse(f"SELECT {fn}()", name="s1") + SYNC)
        first = errors(c.until_ready(1))
        if first and _unknown_refused(first[0]["M"]):
            return
        with conn(guarded) as other:
            other.execute(f"CREATE VIEW {view} AS SELECT * FROM fb_orders")
        c.send(bind("s1") + execute() + SYNC + query("SELECT 'tail'"))
        got = c.until_ready(2)
        errs = errors(got)
        assert errs and errs[0]["C"] == "42501", got
        assert "judged again at Bind" in errs[0]["M"], errs
        assert [b"tail"] in rows(got)
    finally:
        c.close()
    pg.execute(f"DROP VIEW {view}; DROP FUNCTION {fn}()", dbname=DB)


def test_prepared_before_the_view_psycopg(pg, guarded):
    fn, view = _fresh_pair(pg, guarded)
    with conn(guarded) as c:
        try:
            assert c.execute(f"SELECT {fn}()", prepare=True).fetchone() == (0,)
        except psycopg.errors.InsufficientPrivilege as e:
            assert _unknown_refused(str(e)), e
            return
        with conn(guarded) as other:
            other.execute(f"CREATE VIEW {view} AS SELECT * FROM fb_orders")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"SELECT {fn}()", prepare=True)
        assert c.execute("SELECT 1").fetchone() == (1,)
    pg.execute(f"DROP VIEW {view}; DROP FUNCTION {fn}()", dbname=DB)


def test_prepared_before_the_view_asyncpg(pg, guarded):
    fn, view = _fresh_pair(pg, guarded)

    async def main():
        c = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            try:
                stmt = await c.prepare(f"SELECT {fn}()")
                assert await stmt.fetchval() == 0
            except asyncpg.InsufficientPrivilegeError as e:
                assert _unknown_refused(str(e)), e
                return
            other = await asyncpg.connect(guarded.dsn(dbname=DB))
            await other.execute(f"CREATE VIEW {view} AS SELECT * FROM fb_orders")
            await other.close()
            for _ in range(2):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await stmt.fetchval()
            assert await c.fetchval("SELECT 2") == 2
        finally:
            await c.close()
    asyncio.run(main())
    pg.execute(f"DROP VIEW {view}; DROP FUNCTION {fn}()", dbname=DB)


def test_prepared_statements_still_run_after_unrelated_ddl(pg, guarded):
    """The generation moves with any DDL: a harmless statement is judged again, and runs."""
    with conn(guarded) as c:
        for _ in range(3):
            assert c.execute("SELECT fb_read()", prepare=True).fetchone() == (5,)
        with conn(guarded) as other:
            other.execute("CREATE TABLE IF NOT EXISTS fb_unrelated (a int)")
        assert c.execute("SELECT fb_read()", prepare=True).fetchone() == (5,)
    pg.execute("DROP TABLE IF EXISTS fb_unrelated", dbname=DB)


# o.f is f(o) when f takes o's row type ("functional notation"): a call all the same

def _row_deleting(pg, guarded):
    fn, view = _fresh()
    with conn(guarded) as c:
        c.execute(f"CREATE FUNCTION {fn}(o fb_orders) RETURNS int LANGUAGE plpgsql AS $$BEGIN "
                  f"DELETE FROM {view} WHERE id = o.id; RETURN 1; END$$")
        c.execute(f"CREATE VIEW {view} AS SELECT * FROM fb_orders")
    return fn, view


@pytest.mark.parametrize("form", ["SELECT o.{fn} FROM fb_orders o",
                                  "SELECT (o).{fn} FROM fb_orders o",
                                  "SELECT x.{fn} FROM (SELECT * FROM fb_orders) x",
                                  "SELECT 1 FROM fb_orders o WHERE o.{fn} = 1",
                                  "SELECT fb_orders.{fn} FROM fb_orders"])
def test_functional_notation_is_a_call(pg, guarded, psql_bin, form):
    fn, view = _row_deleting(pg, guarded)
    refused_everywhere(guarded, psql_bin, form.format(fn=fn))
    pg.execute(f"DROP VIEW {view}; DROP FUNCTION {fn}(fb_orders)", dbname=DB)


def test_functional_notation_kept_in_a_view_is_refused(pg, guarded):
    fn, view = _row_deleting(pg, guarded)
    with conn(guarded) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"CREATE VIEW {view}_k AS SELECT o.{fn} FROM fb_orders o")
        # columns selected the same way still read as columns
        assert c.execute("SELECT o.id, (o).status FROM fb_orders o ORDER BY o.id "
                         "LIMIT 1").fetchone() == (1, "new")
    pg.execute(f"DROP VIEW {view}; DROP FUNCTION {fn}(fb_orders)", dbname=DB)


def test_a_view_created_inside_a_function_body_is_seen_before_the_next_call(pg, guarded):
    """A view made by a called body (its command tag says SELECT, not CREATE VIEW) is in
    the view map before another session's call that writes through it is decided, even
    when that call's "allowed" was cached from before the view existed."""
    n = next(_serial)
    mk, dl, w = f"fb_mk{n}", f"fb_dl{n}", f"fb_w{n}"
    with conn(guarded) as c:
        c.execute(f"CREATE FUNCTION {mk}() RETURNS int LANGUAGE sql AS $$CREATE VIEW {w} AS "
                  "SELECT * FROM fb_orders; SELECT 1$$")
        c.execute(f"CREATE FUNCTION {dl}() RETURNS int LANGUAGE plpgsql AS $$BEGIN DELETE "
                  f"FROM {w} WHERE id > 0; RETURN 1; END$$")
    with conn(guarded) as c2, pytest.raises(psycopg.errors.UndefinedTable):
        c2.execute(f"SELECT {dl}()")        # allowed (no such view yet), and cached
    with conn(guarded) as c3:
        assert c3.execute(f"SELECT {mk}()").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c3.execute(f"SELECT {dl}()")
        held(e)
    pg.execute(f"DROP VIEW {w}; DROP FUNCTION {mk}(), {dl}()", dbname=DB)


def test_a_view_map_read_begun_before_the_body_committed_is_not_trusted(pg, guarded):
    """The view map read that was in flight when the body's view committed began before
    it (it cannot show the view): the next call waits for the read that follows it.
    The read's second half (the INSTEAD OF triggers) is held on a lock upstream until
    after the commit, so the read is in flight across it every time."""
    n = next(_serial)
    mk, dl, w = f"fb_mk{n}", f"fb_dl{n}", f"fb_w{n}"
    with conn(guarded) as c:
        c.execute(f"CREATE FUNCTION {mk}() RETURNS int LANGUAGE sql AS $$CREATE VIEW {w} AS "
                  "SELECT * FROM fb_orders; SELECT pg_sleep(2.5); SELECT 1$$")
        c.execute(f"CREATE FUNCTION {dl}() RETURNS int LANGUAGE plpgsql AS $$BEGIN DELETE "
                  f"FROM {w} WHERE id > 0; RETURN 1; END$$")
    with conn(guarded) as c2, pytest.raises(psycopg.errors.UndefinedTable):
        c2.execute(f"SELECT {dl}()")        # allowed (no such view yet), and cached
    with conn(guarded) as c3, pg.connect(dbname=DB) as lock:
        c3.execute("SELECT 1")
        lock.autocommit = True
        lock.execute("BEGIN")
        lock.execute("LOCK TABLE pg_catalog.pg_trigger IN ACCESS EXCLUSIVE MODE")
        released = threading.Timer(1.0, lock.execute, ("COMMIT",))
        try:
            # during the body's sleep a read of the map begins and stops at the lock
            assert c3.execute(f"SELECT {mk}()").fetchone() == (1,)
            released.start()
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c3.execute(f"SELECT {dl}()")
            held(e)
        finally:
            released.cancel()
            released.join()
            lock.execute("ROLLBACK")
    pg.execute(f"DROP VIEW {w}; DROP FUNCTION {mk}(), {dl}()", dbname=DB)
