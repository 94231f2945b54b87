# No parking through code pgguard cannot see into: a statement that reads masked columns
# may call only pg_catalog's built-in functions (an allow-list: a user-defined function,
# operator or aggregate may store or send what it is given); DDL that makes ordinary
# syntax run a function (casts, operators, domain checks, base types) is refused to a
# masked identity; built-ins that keep a value (setval, lo_create, advisory locks) are
# sinks. Judged by what upstream holds and by every byte each client received.
import psycopg
import pytest

from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER
from masking_tap import DB, EMAILS, SSNS, env_fixture, leaks
from test_masking_channels import run_mode

SETUP = """
DROP TABLE IF EXISTS rt_log CASCADE;
CREATE TABLE rt_log (v text);
DROP SEQUENCE IF EXISTS rt_seq;
CREATE SEQUENCE rt_seq;
CREATE OR REPLACE FUNCTION rt_park(x text) RETURNS int LANGUAGE plpgsql
  AS $$BEGIN INSERT INTO rt_log VALUES (x); RETURN 1; END$$;
CREATE OR REPLACE FUNCTION rt_park2(c customers) RETURNS int LANGUAGE plpgsql
  AS $$BEGIN INSERT INTO rt_log VALUES (c.email); RETURN 1; END$$;
CREATE OR REPLACE FUNCTION rt_ntf(x text) RETURNS int LANGUAGE plpgsql
  AS $$BEGIN PERFORM pg_notify('rt_chan', reverse(x)); RETURN 1; END$$;
CREATE OR REPLACE FUNCTION rt_sum(acc text, x text) RETURNS text LANGUAGE plpgsql
  AS $$BEGIN INSERT INTO rt_log VALUES (x); RETURN coalesce(acc, '') || 'x'; END$$;
DROP AGGREGATE IF EXISTS rt_agg(text);
CREATE AGGREGATE rt_agg(text) (sfunc = rt_sum, stype = text);
CREATE OR REPLACE FUNCTION rt_len(x text) RETURNS int LANGUAGE sql AS 'SELECT length(x)';
"""

env = env_fixture("udfsinks", SETUP)

# every client: psql, psycopg (text and binary), asyncpg, raw protocol (simple, extended)
CLIENTS = ["psql", "psycopg-text", "psycopg-binary", "asyncpg-x3", "raw-simple",
           "raw-extended"]
CLEAR = SSNS + EMAILS + [s.replace("-", "") for s in SSNS] + [e[::-1] for e in EMAILS] \
    + [s[::-1] for s in SSNS]


def upstream(pg, sql):
    with psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB), autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description is not None else None


def refused(msgs, codes):
    # the first error is pgguard's masking refusal (a later Bind of a refused Parse is
    # then unknown to Postgres: 26000, as it would answer)
    assert codes and codes[0] == "42501" and set(codes) <= {"42501", "26000"}, codes
    first = next(p for t, p in msgs if t == b"E")
    assert b'rule "masking"' in first, first


@pytest.fixture
def clean(pg, env):
    upstream(pg, "TRUNCATE rt_log")
    yield
    upstream(pg, "TRUNCATE rt_log")


def log_values(pg):
    return [r[0] for r in upstream(pg, "SELECT v FROM rt_log")]


# -- user-defined functions given masked values
UDF_CALLS = [
    "SELECT rt_park(ssn) FROM customers WHERE id <= 2",
    "SELECT public.rt_park(upper(email)) FROM customers WHERE id = 1",
    "SELECT rt_park(replace(c.ssn, '-', '')) FROM customers c",
    "SELECT rt_park2(c) FROM customers c WHERE id = 2",
    "SELECT rt_park2(customers) FROM customers",
    "SELECT c.rt_park2 FROM customers c WHERE id = 1",          # functional notation
    "SELECT (c).rt_park2 FROM customers c",
    "SELECT id FROM customers WHERE rt_park(ssn) = 1",
    "SELECT (SELECT rt_park(email) FROM customers LIMIT 1)",
    "WITH x AS (SELECT ssn AS s FROM customers) SELECT rt_park(s) FROM x",
    "SELECT * FROM customers c, LATERAL (SELECT rt_park(c.email)) l",
    "SELECT rt_agg(ssn) FROM customers",
    "SELECT \"rt_park\"(ssn || '') FROM customers ORDER BY id",
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", UDF_CALLS)
def test_user_functions_given_masked_values_are_refused(env, pg, psql_bin, clean, client,
                                                        sql):
    msgs, codes = run_mode(client, env, sql, psql_bin)
    refused(msgs, codes)
    assert leaks(msgs) == [], msgs
    # the truth upstream: nothing was parked
    assert log_values(pg) == []


NOTIFY_CALLS = [
    "SELECT rt_ntf(email) FROM customers",
    "SELECT rt_ntf(ssn) FROM customers WHERE id = 1",
    "SELECT rt_ntf(c.email || '') FROM customers c WHERE c.id = 2",
    "SELECT rt_ntf((SELECT string_agg(ssn, ',') FROM customers))",
    "SELECT count(rt_ntf(lower(email))) FROM customers",
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", NOTIFY_CALLS)
def test_user_functions_that_notify_are_refused(env, pg, psql_bin, client, sql):
    """The payload would reach every listener, the agent's own LISTENing sessions too:
    judged by a listener upstream and by the client's own bytes (LISTEN first)."""
    listener = psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB),
                               autocommit=True)
    try:
        listener.execute("LISTEN rt_chan")
        msgs, codes = run_mode(client, env, sql, psql_bin, pre=["LISTEN rt_chan"])
        refused(msgs, codes)
        assert [p for t, p in msgs if t == b"A"] == [], msgs
        assert leaks(msgs) == [], msgs
        got = [n.payload for n in listener.notifies(timeout=0.5, stop_after=1)]
        assert got == [], got
    finally:
        listener.close()


# -- DDL that makes casts, operators, domains or types run a function
HOOKS = [
    ("CREATE OPERATOR ~~~ (leftarg = text, rightarg = text, function = pg_notify)",
     "SELECT count(*) FROM pg_operator WHERE oprname = '~~~'"),
    ("CREATE OPERATOR public.#<# (leftarg = text, function = rt_park)",
     "SELECT count(*) FROM pg_operator WHERE oprname = '#<#'"),
    ("CREATE CAST (text AS int4) WITH FUNCTION rt_park(text)",
     "SELECT count(*) FROM pg_cast WHERE castfunc = 'rt_park(text)'::regprocedure"),
    ("CREATE DOMAIN rt_dom AS text CHECK (rt_park(VALUE) = 1)",
     "SELECT count(*) FROM pg_type WHERE typname = 'rt_dom'"),
    ("CREATE DOMAIN rt_dom2 AS text CHECK (pg_notify('rt_chan', VALUE) IS NULL)",
     "SELECT count(*) FROM pg_type WHERE typname = 'rt_dom2'"),
    ("ALTER DOMAIN rt_okdom ADD CONSTRAINT rt_c CHECK (public.rt_park(VALUE) > 0)",
     "SELECT count(*) FROM pg_constraint WHERE conname = 'rt_c'"),
    ("CREATE TYPE rt_base (input = rt_in, output = rt_out)",
     "SELECT count(*) FROM pg_type WHERE typname = 'rt_base'"),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql,probe", HOOKS)
def test_code_hooks_are_not_creatable(env, pg, psql_bin, client, sql, probe):
    upstream(pg, "DROP DOMAIN IF EXISTS rt_okdom; CREATE DOMAIN rt_okdom AS text")
    msgs, codes = run_mode(client, env, sql, psql_bin)
    refused(msgs, codes)
    assert upstream(pg, probe) == [(0,)]


# -- built-ins that keep what they are given
BUILTIN_SINKS = [
    ("SELECT pg_advisory_lock(replace(ssn, '-', '')::bigint) FROM customers WHERE id = 1",
     "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"),
    ("SELECT pg_try_advisory_xact_lock(hashtext(email)) FROM customers",
     "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"),
    ("SELECT setval('rt_seq', replace(ssn, '-', '')::bigint) FROM customers WHERE id = 2",
     "SELECT count(*) FROM rt_seq WHERE last_value > 1"),
    ("SELECT lo_create(replace(ssn, '-', '')::oid) FROM customers WHERE id = 3",
     "SELECT count(*) FROM pg_largeobject_metadata WHERE oid > 100000000"),
    ("SELECT pg_catalog.setval('rt_seq', length(email)) FROM customers",
     "SELECT count(*) FROM rt_seq WHERE last_value > 1"),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql,probe", BUILTIN_SINKS)
def test_builtin_sinks_are_refused(env, pg, psql_bin, client, sql, probe):
    msgs, codes = run_mode(client, env, sql, psql_bin)
    refused(msgs, codes)
    assert leaks(msgs) == [], msgs
    assert upstream(pg, probe) == [(0,)]


# -- functions whose bodies read masked columns
BODIES = [
    ("CREATE FUNCTION rt_get() RETURNS text LANGUAGE sql AS "
     "$$SELECT reverse(ssn) FROM customers LIMIT 1$$", "rt_get"),
    ("CREATE FUNCTION rt_get2() RETURNS int LANGUAGE plpgsql AS "
     "$$BEGIN INSERT INTO rt_log SELECT ssn FROM customers; RETURN 1; END$$", "rt_get2"),
    ("CREATE FUNCTION rt_get3() RETURNS text LANGUAGE sql RETURN "
     "(SELECT string_agg(email, ',') FROM public.customers)", "rt_get3"),
    ("CREATE PROCEDURE rt_get4() LANGUAGE plpgsql AS "
     "$$DECLARE r record; BEGIN FOR r IN SELECT * FROM customers LOOP "
     "INSERT INTO rt_log VALUES (r.email); END LOOP; END$$", "rt_get4"),
    ("CREATE FUNCTION rt_get5(int) RETURNS customers LANGUAGE sql AS "
     "'SELECT c FROM customers c WHERE id = $1'", "rt_get5"),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql,name", BODIES)
def test_bodies_that_read_masked_columns_are_not_creatable(env, pg, psql_bin, clean,
                                                           client, sql, name):
    msgs, codes = run_mode(client, env, sql, psql_bin)
    refused(msgs, codes)
    assert upstream(pg, f"SELECT count(*) FROM pg_proc WHERE proname = '{name}'") == [(0,)]
    assert log_values(pg) == []


# -- near neighbours that keep working
PASSING = [
    ("SELECT upper(name) FROM customers ORDER BY id", ["ADA", "GRACE", "EDSGER"]),
    ("SELECT rt_len(name) FROM customers ORDER BY id", ["3", "5", "6"]),
    # the call runs (its result is masked: pgguard cannot see into the function)
    ("SELECT rt_park(name) FROM customers WHERE id = 1", []),
    ("SELECT pg_catalog.upper(ssn), lower(email), length(ssn) FROM customers WHERE id = 1",
     ["****"]),
    ("SELECT rt_park(city), count(*) FROM customers GROUP BY city ORDER BY city LIMIT 1",
     []),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql,want", PASSING)
def test_neighbours_pass(env, pg, psql_bin, clean, client, sql, want):
    msgs, codes = run_mode(client, env, sql, psql_bin)
    assert codes == [], (codes, [p for t, p in msgs if t == b"E"])
    assert leaks(msgs) == [], msgs
    data = b"".join(p for t, p in msgs if t == b"D")
    assert data, msgs
    if client not in ("psycopg-binary", "asyncpg-x3"):     # binary results
        for w in want:
            assert w.encode() in data, (w, data)
    assert not [v for v in log_values(pg) if v in CLEAR]
    if "rt_park(name)" in sql:
        assert "Ada" in log_values(pg)


@pytest.mark.parametrize("client", CLIENTS)
def test_harmless_domain_still_creatable(env, pg, psql_bin, client):
    upstream(pg, "DROP DOMAIN IF EXISTS rt_short")
    msgs, codes = run_mode(client, env, "CREATE DOMAIN rt_short AS text CHECK "
                           "(length(VALUE) < 100)", psql_bin)
    # asyncpg runs it 3 times (42710 then); psycopg's fetchall() of a DDL: no SQLSTATE
    assert set(codes) <= {None, "42710"}, codes
    assert upstream(pg, "SELECT count(*) FROM pg_type WHERE typname = 'rt_short'") == [(1,)]
    upstream(pg, "DROP DOMAIN rt_short")


def test_check_fails_closed_without_function_names():
    """With no function names read, every function counts as one pgguard cannot see
    into: a built-in on a masked column is refused too; given the names, it passes."""
    from pgguard.config import Identity, loads
    from pgguard.masking.parking import check
    from pgguard.policy.rules import PolicyEngine
    masked = {"public.customers": frozenset({"ssn", "email"})}
    sql = "SELECT upper(ssn) FROM customers"
    d = PolicyEngine(loads("")).decide(sql, "bot", Identity(), "app")
    assert d.action == "allow"
    r = check(d, sql, masked)
    assert r is not None and r.rule == "masking" and "upper()" in r.message, r
    assert check(d, sql, masked, user_fn=lambda n: n != "upper") is None
    # a quoted name is not the built-in of the same letters
    sql = 'SELECT "Upper"(ssn) FROM customers'
    d = PolicyEngine(loads("")).decide(sql, "bot", Identity(), "app")
    r = check(d, sql, masked, user_fn=lambda n: n != "upper")
    assert r is not None and '"Upper"' not in r.message and "Upper()" in r.message


# -- functions that already exist upstream and read masked columns themselves
# (cust_ssn(int), cust_email(int): a DBA's functions, SELECT ssn/email FROM customers):
# their results may be masked values in clear, so they may not be stored, sent or
# handed to other code. The policy folds a called function's body into the statement,
# so the statement "reads" customers through it.
BODY_READS = [
    "INSERT INTO rt_log SELECT cust_ssn(1)",
    "INSERT INTO rt_log VALUES (cust_email(2))",
    "UPDATE rt_log SET v = cust_ssn(3)",
    "SELECT rt_park(cust_ssn(1))",
    "SELECT rt_park(reverse(cust_email(1)))",
    "WITH x AS (SELECT cust_ssn(2) AS s) INSERT INTO rt_log SELECT s FROM x",
    "SELECT pg_notify('rt_chan', cust_email(3))",
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", BODY_READS)
def test_results_of_bodies_that_read_masked_columns_are_not_parked(env, pg, psql_bin, clean,
                                                                   client, sql):
    upstream(pg, "INSERT INTO rt_log VALUES ('seed')")
    msgs, codes = run_mode(client, env, sql, psql_bin)
    refused(msgs, codes)
    assert leaks(msgs) == [], msgs
    assert log_values(pg) == ["seed"]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", ["SELECT cust_ssn(1)", "SELECT cust_email(2) AS e"])
def test_result_of_such_a_body_read_back_is_masked(env, pg, psql_bin, clean, client, sql):
    """Read straight back (no sink, no other code), the call passes and its result is
    masked like any computed column of a masked read. (Two such calls in one statement
    are refused: pgguard cannot tell whether one hands its value to the other.)"""
    msgs, codes = run_mode(client, env, sql, psql_bin)
    assert "42501" not in codes, msgs
    assert leaks(msgs) == [], msgs


@pytest.mark.parametrize("client", ["psycopg-text", "raw-simple", "raw-extended"])
@pytest.mark.parametrize("builtin", ["abs", "upper", "md5", "length", "lower"])
def test_a_function_shadowing_a_builtin_name_is_a_sink(env, pg, psql_bin, clean, client,
                                                       builtin):
    """In the same transaction, before any catalog read could show it: CREATE FUNCTION
    abs(text) storing its argument, then abs(ssn). (Since round 15 the CREATE itself is
    refused to an agent: an overload of an existing name.)"""
    pre = ["BEGIN",
           f"CREATE FUNCTION {builtin}(x text, y int DEFAULT 0) RETURNS int LANGUAGE plpgsql "
           "AS $$BEGIN INSERT INTO rt_log VALUES (reverse(x)); RETURN 1; END$$"]
    try:
        msgs, codes = run_mode(client, env, f"SELECT {builtin}(ssn) FROM customers",
                               psql_bin, pre=pre)
    except psycopg.Error as e:          # the client stops at the refused CREATE
        msgs, codes = [(b"E", str(e).encode())], [e.sqlstate]
    assert "42501" in codes, msgs
    assert leaks(msgs) == [], msgs
    assert log_values(pg) == []
    upstream(pg, f"DROP FUNCTION IF EXISTS public.{builtin}(text, int)")
