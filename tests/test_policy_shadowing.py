# Red team, round 15 (helper 65): objects the agent creates that take the place of the
# DBA's in other sessions' statements.
#  F1 - CREATE SCHEMA <upstream role>: first on that role's default search_path
#       ("$user", public), its tables and functions replaced public's for the
#       application's sessions and for humans through pgguard (new orders went to the
#       agent's table, order_total() returned 0). A schema named like a role pgguard logs
#       in as upstream is refused as destructive; CREATE SCHEMA ... AUTHORIZATION is a
#       privilege change.
#  F2 - a new overload of an existing function (the DBA's order_total(bigint) gained an
#       order_total(int); pg_catalog's concat(VARIADIC "any") a public.concat(text, text,
#       text)) took over every call its argument types fit better, without OR REPLACE;
#       its body could write (1000 orders cancelled by a human's SELECT concat(...)).
#       Creating a function, procedure or aggregate whose name a function already has is
#       refused to an agent.
# Judged upstream: the catalog (pg_namespace, pg_proc) and what a direct session's calls
# return and change.
from __future__ import annotations

import psycopg
import pytest
from conftest import UPSTREAM_PASSWORD
from each_client import MODES, said

import test_policy_blast_fastlane

gproxy = test_policy_blast_fastlane.gproxy
DB = "postgres"


@pytest.fixture()
def dba_objects(pg):
    from conftest import UPSTREAM_USER
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {UPSTREAM_USER} CASCADE; DROP SCHEMA IF EXISTS "
                  "sh_other CASCADE; DROP TABLE IF EXISTS sh_orders CASCADE")
        c.execute("CREATE TABLE sh_orders (id bigint PRIMARY KEY, total numeric)")
        c.execute("INSERT INTO sh_orders SELECT g, g * 10 FROM generate_series(1, 20) g")
        c.execute("CREATE OR REPLACE FUNCTION public.sh_total(p bigint) RETURNS numeric "
                  "LANGUAGE sql AS 'SELECT total FROM sh_orders WHERE id = p'")
        c.execute(f"ALTER TABLE sh_orders OWNER TO {UPSTREAM_USER}")
        c.execute(f"ALTER FUNCTION public.sh_total(bigint) OWNER TO {UPSTREAM_USER}")
        c.execute(f"GRANT CREATE ON DATABASE {DB} TO {UPSTREAM_USER}")
    yield UPSTREAM_USER
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {UPSTREAM_USER} CASCADE; DROP SCHEMA IF EXISTS "
                  "sh_other CASCADE; DROP TABLE IF EXISTS sh_orders CASCADE")
        for f in ("sh_total(int)", "sh_total(bigint)", "concat(text, text, text)",
                  "lower(text, int)", "sh_sum(numeric)", "sum(sh_orders)"):
            c.execute(f"DROP FUNCTION IF EXISTS public.{f}")
        c.execute("DROP AGGREGATE IF EXISTS public.sum(int2, int2)")
        c.execute(f"REVOKE CREATE ON DATABASE {DB} FROM {UPSTREAM_USER}")


def _schemas(pg, role):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return [r[0] for r in c.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = %s", (role,))]


SCHEMA_ROUTES = {
    "plain": ["CREATE SCHEMA {role}", "CREATE TABLE {role}.sh_orders (id bigint, total "
              "numeric)"],
    "authorization": ["CREATE SCHEMA AUTHORIZATION {role}"],
    "if-not-exists": ["CREATE SCHEMA IF NOT EXISTS {role}"],
    "quoted": ['CREATE SCHEMA "{role}"'],
    "with-elements": ["CREATE SCHEMA {role} CREATE TABLE sh_orders (id bigint, total numeric)"],
    "in-a-block": ["BEGIN", "CREATE SCHEMA {role}", "COMMIT"],
    "superuser": ["CREATE SCHEMA postgres"],          # a role that logs in directly
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", sorted(SCHEMA_ROUTES))
def test_a_schema_named_like_the_upstream_role_is_refused(gproxy, pg, dba_objects, psql_bin,
                                                          mode, route):
    role = dba_objects
    got = said(mode, gproxy, [s.format(role=role) for s in SCHEMA_ROUTES[route]], db=DB,
               psql_bin=psql_bin)
    assert _schemas(pg, role) == [] and _schemas(pg, "postgres") == [], (route, mode, got)
    # the application's default search_path still finds public's objects
    with psycopg.connect(pg.dsn(user=role, password=UPSTREAM_PASSWORD), autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM sh_orders").fetchone() == (20,)
    assert "42501" in got or 'rule "' in got, got


def test_other_schemas_are_still_created(gproxy, pg, dba_objects):
    said("psycopg", gproxy, ["CREATE SCHEMA sh_other"], db=DB)
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        assert c.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'sh_other'").fetchall()


OVERLOADS = {
    "dba-function": "CREATE FUNCTION public.sh_total(p int) RETURNS numeric LANGUAGE sql "
                    "AS 'SELECT -1::numeric'",
    "builtin-variadic": "CREATE FUNCTION public.concat(a text, b text, c text) RETURNS text "
                        "LANGUAGE sql AS 'SELECT ''shadow'''",
    "builtin-arity": "CREATE FUNCTION lower(a text, b int) RETURNS text LANGUAGE sql "
                     "AS 'SELECT a'",
    "whole-row": "CREATE FUNCTION public.sum(r sh_orders) RETURNS int LANGUAGE sql "
                 "AS 'SELECT 0'",
    "aggregate": "CREATE AGGREGATE public.sum(int2, int2) (sfunc = int2pl, stype = int2)",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(OVERLOADS))
def test_an_overload_of_an_existing_function_is_refused(gproxy, pg, dba_objects, psql_bin,
                                                        mode, case):
    got = said(mode, gproxy, [OVERLOADS[case]], db=DB, psql_bin=psql_bin)
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        made = c.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = "
            "'public'::regnamespace AND p.proname IN ('sh_total', 'concat', 'lower', "
            "'sum')").fetchall()
        # the DBA's function still answers the application's int literal
        assert c.execute("SELECT sh_total(7)").fetchone() == (70,)
        assert c.execute("SELECT concat('a', 'b', 'c')").fetchone() == ("abc",)
    assert made == [("sh_total(bigint)",)], (case, mode, got)
    assert "42501" in got or 'rule "' in got, got


def test_a_function_of_a_new_name_is_still_created(gproxy, pg, dba_objects):
    said("psycopg", gproxy, ["CREATE FUNCTION public.sh_sum(x numeric) RETURNS numeric "
                             "LANGUAGE sql AS 'SELECT x'"], db=DB)
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        assert c.execute("SELECT sh_sum(2)").fetchone() == (2,)
