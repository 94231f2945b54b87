# The classifier reads an unqualified name as public.<name>. Two routes made Postgres
# read it elsewhere (red-team pass 9): the upstream's default search_path "$user", public
# (the agent creates a schema named like the upstream role and a view in it over a table
# a rule guards: UPDATE ords went to orders without approval), and a function's own SET
# search_path (its body's names resolved in the agent's schema). pgguard now pins
# search_path = public for every guarded session, and refuses a function whose SET
# search_path names other schemas, at CREATE / ALTER and at the call of one a DBA made.
# Judged by the rows upstream, through psycopg (simple and prepared), asyncpg, psql and a
# raw pipeline.
import asyncio

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD, run_psql
from guarded import fails_everywhere, guarded_proxy

DB = "appdb"
RULE = "agent-writes-to-sp-orders-need-approval"
RULES = f"""
[[rules]]
name = "{RULE}"
when = {{ kind = "agent", statements = ["insert", "update", "delete", "merge"], relations = ["public.sp_orders"] }}
action = "approve"
timeout = "1s"
"""
ORDERS = [(i, "new") for i in range(1, 6)]


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    pg.execute("DROP TABLE IF EXISTS sp_orders CASCADE; CREATE TABLE sp_orders "
               "(id int PRIMARY KEY, status text)", dbname=DB)
    with guarded_proxy(pg, tmp_path_factory.mktemp("search_path"), RULES) as p:
        yield p
    pg.execute("DROP TABLE IF EXISTS sp_orders CASCADE", dbname=DB)


def orders(pg):
    return pg.execute("SELECT id, status FROM sp_orders ORDER BY id", dbname=DB)


@pytest.fixture(autouse=True)
def unchanged(pg, guarded):
    """Every test leaves sp_orders as it was: the truth upstream."""
    pg.execute("DELETE FROM sp_orders; INSERT INTO sp_orders SELECT i, 'new' FROM "
               "generate_series(1, 5) i", dbname=DB)
    yield
    assert orders(pg) == ORDERS


def conn(proxy):
    return psycopg.connect(proxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB), autocommit=True)


def upstream_user(proxy) -> str:
    with conn(proxy) as c:
        return c.execute("SELECT current_user").fetchone()[0]


def every_client_fails(proxy, psql_bin, sql: str) -> None:
    fails_everywhere(proxy, psql_bin, sql, DB, None)


def test_guarded_sessions_run_with_search_path_public(pg, guarded, psql_bin):
    with conn(guarded) as c:
        assert c.execute("SHOW search_path").fetchone() == ("public",)
        c.execute("RESET ALL")                      # back to the session's start: public
        assert c.execute("SHOW search_path").fetchone() == ("public",)

    async def main():
        a = await asyncpg.connect(guarded.dsn(dbname=DB))
        try:
            return await a.fetchval("SELECT current_setting('search_path')")
        finally:
            await a.close()
    assert asyncio.run(main()) == "public"
    r = run_psql(psql_bin, guarded.dsn(dbname=DB), "-At", "-c", "SHOW search_path")
    assert r.stdout.strip() == "public", r


def test_schema_named_like_the_upstream_role_shadows_nothing(pg, guarded, psql_bin):
    # the red team's F1: CREATE SCHEMA <upstream user>; a view there over the guarded
    # table; UPDATE through its unqualified name (before: applied with no approval)
    schema = upstream_user(guarded)
    try:
        with conn(guarded) as c:
            # (round 15: the agent may not create it; someone else did)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        pg.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}" AUTHORIZATION "{schema}"',
                   dbname=DB)
        with conn(guarded) as c:
            c.execute(f'CREATE VIEW "{schema}".sp_ords AS SELECT * FROM public.sp_orders')
        for sql in ("UPDATE sp_ords SET status = 'refunded' WHERE id = 2",
                    "DELETE FROM sp_ords WHERE id = 3",
                    "INSERT INTO sp_ords VALUES (9, 'x')",
                    "WITH u AS (UPDATE sp_ords SET status = 'x' WHERE id = 4 RETURNING 1) "
                    "SELECT * FROM u",
                    "MERGE INTO sp_ords o USING (SELECT 5 AS id) s ON o.id = s.id "
                    "WHEN MATCHED THEN UPDATE SET status = 'y'"):
            every_client_fails(guarded, psql_bin, sql)
            assert orders(pg) == ORDERS, sql
    finally:
        pg.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', dbname=DB)


FN_SETS = ["zz", "zz, public", '"$user", public', "public, zz", "public, pg_catalog",
           # quoted, or a string constant: a schema "Public", not public (review of pass 9)
           '"Public"', "'Public'", 'pg_catalog, "Public"']


@pytest.mark.parametrize("path", FN_SETS)
def test_function_with_its_own_search_path_is_refused(pg, guarded, psql_bin, path):
    # the red team's F3: a function whose SET search_path resolves its body's names in
    # the agent's schema; refused when created, altered into it, or (made by a DBA
    # upstream) called
    user = upstream_user(guarded)
    for schema in ("zz", f'"{user}"', '"Public"'):
        pg.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}; CREATE OR REPLACE VIEW "
                   f"{schema}.sp_ov AS SELECT * FROM public.sp_orders", dbname=DB)
    body = "UPDATE sp_ov SET status = 'refunded' WHERE id = 1 RETURNING 1"
    if path == "public, pg_catalog":        # sp_ov is not on that path: a plain body
        body = "SELECT 1"
    try:
        create = (f"CREATE FUNCTION sp_zf() RETURNS int LANGUAGE sql SET search_path = {path}"
                  f" AS $$ {body} $$")
        every_client_fails(guarded, psql_bin, create)
        assert pg.execute("SELECT count(*) FROM pg_proc WHERE proname = 'sp_zf'",
                          dbname=DB) == [(0,)]
        # created plainly, then altered into it
        pg.execute("CREATE FUNCTION sp_zf() RETURNS int LANGUAGE sql AS "
                   "$$ SELECT 1 $$", dbname=DB)
        every_client_fails(guarded, psql_bin, f"ALTER FUNCTION sp_zf() SET search_path = {path}")
        assert pg.execute("SELECT proconfig FROM pg_proc WHERE proname = 'sp_zf'",
                          dbname=DB) == [(None,)]
        # made by a DBA directly upstream: the call is refused
        # (as the superuser, "$user" is another schema: bodies are checked at the call)
        pg.execute(f"SET check_function_bodies = off; DROP FUNCTION sp_zf(); {create}; "
                   "CREATE PROCEDURE sp_zp() LANGUAGE sql "
                   f"SET search_path = {path} AS $$ {body.replace(' RETURNING 1', '')} $$",
                   dbname=DB)
        for call in ("SELECT sp_zf()", "SELECT * FROM sp_zf()", "CALL sp_zp()",
                     "SELECT 1 FROM sp_orders WHERE id = sp_zf()"):
            every_client_fails(guarded, psql_bin, call)
    finally:
        pg.execute("DROP FUNCTION IF EXISTS sp_zf(); DROP PROCEDURE IF EXISTS sp_zp(); "
                   f'DROP SCHEMA IF EXISTS zz CASCADE; DROP SCHEMA IF EXISTS "{user}" CASCADE; '
                   'DROP SCHEMA IF EXISTS "Public" CASCADE', dbname=DB)


@pytest.mark.parametrize("path", ["pg_catalog, public", "''", "public", "public, pg_temp"])
def test_function_with_a_plain_search_path_still_runs(pg, guarded, path):
    # the hardening DBAs apply (SET search_path = pg_catalog, public or '') is no reason
    # to refuse: names resolve where pgguard reads them
    try:
        with conn(guarded) as c:
            c.execute(f"CREATE FUNCTION sp_ok() RETURNS bigint LANGUAGE sql SET search_path = "
                      f"{path} AS $$ SELECT count(*) FROM public.sp_orders $$")
            assert c.execute("SELECT sp_ok()").fetchone() == (5,)
            assert c.execute("SELECT sp_ok()", prepare=True).fetchone() == (5,)
    finally:
        pg.execute("DROP FUNCTION IF EXISTS sp_ok()", dbname=DB)
