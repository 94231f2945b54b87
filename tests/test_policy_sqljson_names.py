# The classifier parses with Postgres 18's grammar (pglast); an older server reads some of
# the same words differently. json_scalar(x), json(x), json_serialize(x), json_array(a, b),
# json_exists(a, b), merge_action() are SQL/JSON syntax to the parser (no function call),
# and json_object(a, b) a call of pg_catalog.json_object; on Postgres 15 each is a plain
# call of whatever function the name finds by search_path. A function of such a name in
# public ran unjudged: no body read, no row limit, no "keeps a call in a definition".
# They are recorded as calls of the bare name now. Judged by the rows upstream and the
# catalog, through a raw client (simple and extended), psycopg, asyncpg and psql.
from __future__ import annotations

import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_USER
import test_blast_merge_every_row as every
import test_policy_blast_fastlane

ROWS = 1500         # above the row limit (1,000)

gproxy = test_policy_blast_fastlane.gproxy

FUNCS = {
    "json_scalar": "(int)", "json": "(int)", "json_serialize": "(int)",
    "json_array": "(int, int)", "json_object": "(int, int)", "merge_action": "()",
    "json_exists": "(int, text)",
}
CALLS = {
    "json_scalar": "SELECT json_scalar(0)",
    "json": "SELECT json(0)",
    "json_serialize": "SELECT json_serialize(0)",
    "json_array": "SELECT json_array(0, 0)",
    "json_object": "SELECT json_object(0, 0)",
    "merge_action": "SELECT merge_action()",
    "json_exists": "SELECT json_exists(0, 'x')",
    "in-a-cte": "WITH x AS (SELECT json_scalar(0)) SELECT * FROM x",
    "in-values": "SELECT * FROM (VALUES (json(0))) v",
}


@pytest.fixture()
def named(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS sj_t CASCADE")
        c.execute("CREATE TABLE sj_t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        c.execute(f"INSERT INTO sj_t SELECT g, 0 FROM generate_series(1, {ROWS}) g")
        c.execute(f"ALTER TABLE sj_t OWNER TO {UPSTREAM_USER}")
        for name, args in FUNCS.items():
            where = "id > $1" if args != "()" else "id > 0"
            c.execute(f'CREATE OR REPLACE FUNCTION public."{name}"{args} RETURNS int '
                      "LANGUAGE plpgsql AS $$BEGIN UPDATE sj_t SET v = v + 1 WHERE "
                      f"{where}; RETURN 1; END$$")
    yield
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS sj_t CASCADE")
        for name, args in FUNCS.items():
            c.execute(f'DROP FUNCTION IF EXISTS public."{name}"{args}')


def changed(pg) -> int:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return c.execute("SELECT count(*) FILTER (WHERE v <> 0) FROM sj_t").fetchone()[0]


def test_the_functions_do_write_when_called_directly(pg, named):
    # the truth the other tests rely on: on this server the words call the functions
    # (Postgres 17 and later read them as SQL/JSON syntax themselves: nothing changes)
    server = int(pg.execute("SHOW server_version_num")[0][0])
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("SELECT json_scalar(0)")
    assert changed(pg) == (ROWS if server < 170000 else 0)


@pytest.mark.parametrize("block", [False, True], ids=["autocommit", "block"])
@pytest.mark.parametrize("client", list(every.CLIENTS))
@pytest.mark.parametrize("call", list(CALLS))
def test_a_sql_json_word_is_judged_as_the_call_it_is(gproxy, pg, named, psql_bin, call,
                                                      client, block):
    every._run(client, gproxy, CALLS[call], block, psql_bin)
    assert changed(pg) == 0, (call, client, block)


@pytest.mark.parametrize("call", ["json", "json_scalar", "json_object"])
def test_a_definition_keeping_such_a_call_is_refused(gproxy, pg, named, call):
    args = "id, id" if FUNCS[call] == "(int, int)" else "id"
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        # (a new table's generated column: a CHECK added to an existing table, and an
        # index over an expression, are refused as destructive whatever they call, since
        # rounds 15 and 16)
        msgs = c.run(f"CREATE TABLE sj_plant (id int, g boolean GENERATED ALWAYS AS "
                     f"({call}({args}) IS NOT NULL) STORED)")
    finally:
        c.close()
    errs = rawpg.errors(msgs)
    assert errs and "definition" in errs[0]["M"], errs
    assert pg.execute("SELECT count(*) FROM pg_class WHERE relname = 'sj_plant'") \
        == [(0,)]


def test_the_builtins_of_those_names_still_run(gproxy, pg, named):
    c = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        msgs = c.run("SELECT json_object('{a,1}'::text[])::text")
    finally:
        c.close()
    assert not rawpg.errors(msgs), rawpg.errors(msgs)
    assert rawpg.rows(msgs) == [[b'{"a" : "1"}']]


@pytest.mark.parametrize("call", ["json_scalar", "json", "json_serialize", "merge_action",
                                  "json_exists", "in-a-cte"])
def test_without_such_a_function_the_server_answers(gproxy, pg, call):
    """No function of the name anywhere: nothing unseen can run, so pgguard does not
    refuse; the server answers as it would directly (on Postgres 15 "does not exist",
    on 17 and later the SQL/JSON result)."""
    sql = CALLS[call]
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        try:
            c.execute(sql)
            want = None
        except psycopg.Error as e:
            want = e.sqlstate
    r = rawpg.RawClient.connect(gproxy.port, AGENT, AGENT_PASSWORD)
    try:
        errs = rawpg.errors(r.run(sql))
    finally:
        r.close()
    assert [e["C"] for e in errs] == ([want] if want else []), errs
    assert not any("pgguard" in e["M"] for e in errs), errs
