# Red team, round 10, judged by what the agent receives against the seeded values:
#  F1 - the lineage's side connection planned with the upstream's default search_path
#       ("$user", public) while the agent's session runs with search_path = public: a
#       schema named like the upstream role, with an empty table called customers, made
#       the plan read that table (nothing masked) and reverse(ssn), base64 of the email...
#       came back in clear. The side connection now plans with the session's path.
#  F2 - pg_stat_activity.query (and pg_stat_statements, pg_stat_get_activity()) carry
#       other sessions' statement texts with their literals: a DBA's WHERE ssn = '...'
#       read reversed or base64-encoded by the agent. Reading them is refused to masked
#       identities; pg_stat_activity's other columns stay readable.
import threading
import time

import psycopg
import pytest
from conftest import HUMAN, HUMAN_PASSWORD
import rawpg
from mask_corpus import DB, MASKS, MODES, leaks, raw_connect, run_mode, seed

SHADOWED = [
    "SELECT id, reverse(ssn), encode(convert_to(email, 'UTF8'), 'base64') FROM customers "
    "ORDER BY id",
    "SELECT id, replace(ssn, '-', '/'), translate(phone, '0123456789', 'abcdefghij') "
    "FROM customers ORDER BY id",
    "SELECT c.id, upper(c.email) || '' FROM customers c WHERE c.id <= 2 ORDER BY 1",
    "SELECT x.v FROM (SELECT reverse(ssn) AS v FROM customers) x ORDER BY 1",
    "SELECT string_agg(reverse(ssn), ',' ORDER BY id) FROM customers",
]


@pytest.fixture(scope="module")
def rt10proxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-rt10"), extra=MASKS).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def role_schema(rt10proxy, pg):
    """A schema named like the upstream role, holding an empty customers table. An
    agent may not create it (round 15); the upstream role did, directly."""
    with psycopg.connect(rt10proxy.dsn(dbname=DB), autocommit=True) as c:
        role = c.execute("SELECT current_user").fetchone()[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f'CREATE SCHEMA IF NOT EXISTS "{role}"')
    pg.execute(f'CREATE SCHEMA IF NOT EXISTS "{role}" AUTHORIZATION "{role}"', dbname=DB)
    with psycopg.connect(rt10proxy.dsn(dbname=DB), autocommit=True) as c:
        c.execute(f'CREATE TABLE IF NOT EXISTS "{role}".customers (id int, name text, '
                  "email text, ssn text, phone text, score int)")
    yield role
    pg.execute(f'DROP SCHEMA IF EXISTS "{role}" CASCADE', dbname=DB)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sql", SHADOWED)
def test_role_named_schema_does_not_fool_the_lineage(rt10proxy, role_schema, psql_bin, mode,
                                                     sql):
    got, blob = run_mode(mode, rt10proxy, sql, psql_bin)
    assert leaks(blob) == [], (sql, leaks(blob))
    if got is not None:
        assert got and got[0], (sql, got)           # the rows came back (masked)


DBA_SQL = ("SELECT id, pg_sleep(6) FROM public.customers WHERE ssn = '732-19-4856' "
           "AND email = 'zephyr.quill81@example.com'")
# the DBA's statement as the upstream shows it
_DBA_ROWS = ("SELECT query FROM pg_stat_activity WHERE position('pg_sleep(6)' in query) > 0 "
             "AND position('pg_stat_activity' in query) = 0")
ACTIVITY = [
    "SELECT query FROM pg_stat_activity WHERE query LIKE '%pg_sleep(6)%'",
    "SELECT reverse(a.query) FROM pg_catalog.pg_stat_activity a",
    "SELECT encode(convert_to(query, 'UTF8'), 'base64') FROM pg_stat_activity",
    "SELECT a FROM pg_stat_activity a",
    "SELECT * FROM pg_stat_activity",
    "SELECT row_to_json(x) FROM pg_stat_activity x",
    "WITH q AS (SELECT query AS t FROM pg_stat_activity) SELECT reverse(t) FROM q",
    "SELECT reverse(query) FROM pg_stat_get_activity(NULL)",
    "SELECT reverse(pg_stat_get_backend_activity(s)) FROM pg_stat_get_backend_idset() s",
    # (red team 13) a column-alias list or a join alias renames query out of sight
    "SELECT reverse(q) FROM pg_stat_activity AS s(" +
    ", ".join(f"a{i}" for i in range(1, 21)) + ", q) WHERE q LIKE '%ssn%'",
    "SELECT reverse(j.query) FROM (pg_stat_activity JOIN pg_database d ON true) AS j",
    "SELECT reverse(j.x21) FROM (pg_stat_activity a JOIN pg_database d ON d.oid = a.datid) "
    "AS j(" + ", ".join(f"x{i}" for i in range(1, 22)) + ")",
    "SELECT reverse(j::text) FROM (pg_stat_activity JOIN pg_database d ON true) AS j",
    # (red team 25) the join alias's new names read unqualified
    "SELECT reverse(q) FROM (pg_stat_activity CROSS JOIN (SELECT 1) z) AS j(" +
    ", ".join(f"a{i}" for i in range(1, 21)) + ", q) WHERE q LIKE '%pg_sleep%'",
    "SELECT reverse(q) FROM ((pg_stat_activity CROSS JOIN (SELECT 1) z) AS j0 "
    "CROSS JOIN (SELECT 2) y) AS j(" + ", ".join(f"a{i}" for i in range(1, 21)) + ", q)",
]


@pytest.fixture
def dba_statement(rt10proxy, pg):
    """A DBA's statement with literal PII, running through the proxy meanwhile."""
    def run():
        with psycopg.connect(rt10proxy.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB),
                             autocommit=True) as c:
            c.execute(DBA_SQL)
    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = pg.execute(_DBA_ROWS.replace("query", "count(*)", 1), dbname=DB)
        if seen[0][0]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the DBA's statement never showed in pg_stat_activity")
    yield
    t.join()


@pytest.mark.parametrize("mode", ["psql", "psycopg-text", "psycopg-binary",
                                  "psycopg-prepared", "asyncpg-fetch", "raw-later"])
def test_other_sessions_statement_texts_are_not_read(rt10proxy, pg, psql_bin, mode,
                                                    dba_statement):
    # the truth: the upstream shows the DBA's literals to whoever reads the view
    truth = pg.execute(_DBA_ROWS, dbname=DB)
    assert leaks(truth), truth
    for sql in ACTIVITY:
        try:
            if mode == "raw-later":     # the Parse alone: refused there
                c = raw_connect(rt10proxy)
                try:
                    c.send(rawpg.parse(sql, name="s1"), rawpg.SYNC)
                    blob = c.until_ready()
                finally:
                    c.close()
            else:
                _, blob = run_mode(mode, rt10proxy, sql, psql_bin)
        except Exception as e:      # noqa: BLE001 - the client's own way of failing
            blob = f"{e!r} {e}"
        text = str(blob)
        assert leaks(text) == [], (sql, leaks(text))
        assert 'rule \\"masking\\"' in text or 'rule "masking"' in text, (mode, sql, text)
    # the rest of pg_stat_activity stays readable
    got, blob = run_mode(mode, rt10proxy, "SELECT pid, state, wait_event_type FROM "
                         "pg_stat_activity WHERE backend_type = 'client backend'", psql_bin)
    assert leaks(blob) == [] and "42501" not in str(blob), blob
