# No parking: a masked identity cannot move masked column values into tables, views,
# settings, large objects, held cursors, prepared statements, code or files, nor read
# planner statistics' sample values; judged by what the upstream holds afterwards.
import asyncio
import os
import subprocess

import asyncpg
import psycopg
import pytest

from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD
from rawpg import SYNC, RawClient, bind, describe, errors, execute, parse, rows

SSNS = ["123-45-6789", "987-65-4321"]
EMAILS = ["ada.lovelace@example.com", "grace.hopper@example.org"]
CLEAR = SSNS + EMAILS + [s.replace("-", "") for s in SSNS]

MASKS = """
[[masks]]
column = "public.pk_cust.ssn"
strategy = "partial"
keep = 4
except_groups = ["dba"]

[[masks]]
column = "public.pk_cust.email"
strategy = "email"
except_groups = ["dba"]
"""

CLIENTS = ["psql", "psycopg", "asyncpg", "raw"]


@pytest.fixture(scope="module")
def pk(pg, tmp_path_factory):
    from conftest import Proxy
    pg.execute("""
        DROP TABLE IF EXISTS pk_cust, pk_sink, pk_dba_copy CASCADE;
        CREATE TABLE pk_cust (id int PRIMARY KEY, name text, email text, ssn text);
        INSERT INTO pk_cust VALUES (1, 'Ada', 'ada.lovelace@example.com', '123-45-6789'),
                                   (2, 'Grace', 'grace.hopper@example.org', '987-65-4321');
        CREATE TABLE pk_sink (id int, v text);
        ANALYZE pk_cust;
    """, dbname="appdb")
    tmp = tmp_path_factory.mktemp("parking")
    os.chmod(tmp, 0o777)
    p = Proxy(pg, tmp, extra=MASKS).start()
    p.tmp = tmp
    yield p
    p.stop()


def _clear_in(text) -> list[str]:
    text = text if isinstance(text, str) else repr(text)
    return [v for v in CLEAR if v in text]


def run_client(client: str, proxy, first: str, probe: str | None = None,
               user: str = AGENT, password: str = AGENT_PASSWORD):
    """Run ``first`` then ``probe`` on one connection through the proxy; return
    (sqlstate and message of first's error or None, probe rows as text)."""
    dsn = proxy.dsn(user=user, password=password, dbname="appdb")
    if client == "psql":
        from conftest import find_tool
        script = first + ";\n" + (probe + ";\n" if probe else "")
        r = subprocess.run([str(find_tool("psql")), "-X", "-A", "-t", "-v",
                            "VERBOSITY=verbose", dsn], input=script, capture_output=True,
                           text=True, timeout=60)
        err = None
        for line in r.stderr.splitlines():
            if line.startswith("ERROR:") and err is None:
                code, _, msg = line[len("ERROR:"):].strip().partition(": ")
                err = (code, msg)
        return err, r.stdout.strip()
    if client == "psycopg":
        with psycopg.connect(dsn, autocommit=True) as conn:
            err = None
            try:
                conn.execute(first)
            except psycopg.Error as e:
                err = (e.sqlstate, str(e))
            out = conn.execute(probe).fetchall() if probe else []
            return err, repr(out)
    if client == "asyncpg":
        async def go():
            conn = await asyncpg.connect(dsn)
            try:
                err = None
                try:
                    await conn.fetch(first)
                except asyncpg.PostgresError as e:
                    err = (e.sqlstate, str(e))
                out = [tuple(r) for r in await conn.fetch(probe)] if probe else []
                return err, repr(out)
            finally:
                await conn.close()
        return asyncio.run(go())
    c = RawClient.connect(proxy.port, user, password, database="appdb")
    try:
        c.send(parse(first), bind(), describe("P"), execute(), SYNC)
        msgs = c.until_ready()
        errs = errors(msgs)
        err = (errs[0]["C"], errs[0]["M"]) if errs else None
        out = []
        if probe:
            c.send(parse(probe), bind(), execute(), SYNC)
            out = [[v.decode() if v is not None else None for v in r]
                   for r in rows(c.until_ready())]
        return err, repr(out)
    finally:
        c.close()


def upstream_one(pg, sql):
    return pg.execute(sql, dbname="appdb")[0][0]


def assert_refused(err, rules=("masking",)):
    assert err is not None, "statement was not refused"
    code, msg = err
    assert code == "42501", err
    assert any(f'rule "{r}"' in msg for r in rules), err


# (statement, probe on the same connection returning evidence, upstream evidence query)
# evidence is 0 / empty when nothing was parked
TABLES = [
    "INSERT INTO pk_sink SELECT id, ssn FROM pk_cust",
    "INSERT INTO pk_sink (id, v) SELECT c.id, c.email FROM pk_cust c",
    "INSERT INTO pk_sink SELECT id, row_to_json(c)::text FROM pk_cust c",
    "INSERT INTO pk_sink VALUES (1, (SELECT ssn FROM pk_cust WHERE id = 1))",
    "UPDATE pk_sink SET v = c.ssn FROM pk_cust c WHERE c.id = pk_sink.id",
    "MERGE INTO pk_sink s USING pk_cust c ON s.id = c.id "
    "WHEN NOT MATCHED THEN INSERT VALUES (c.id, c.email)",
    "WITH x AS (INSERT INTO pk_sink SELECT id, ssn FROM pk_cust RETURNING 1) "
    "SELECT count(*) FROM x",
    "INSERT INTO pk_sink SELECT p.id, p.v FROM (SELECT id, upper(ssn) AS v "
    "FROM pk_cust) p",
    "INSERT INTO pk_sink SELECT 1, string_agg(x.email, ',') FROM pk_cust AS x",
    "INSERT INTO pk_sink SELECT id, name FROM pk_cust JOIN pk_sink USING (id) "
    "WHERE ssn LIKE '1%'",
    # round 16 (helper 72): pgguard's parser reads a newer grammar than Postgres 15's,
    # where a bare system_user is no keyword but the column an alias list renamed
    "INSERT INTO pk_sink SELECT id, reverse(system_user) FROM pk_cust "
    "AS x(id, name, email, \"system_user\")",
    "INSERT INTO pk_sink SELECT id, system_user FROM pk_cust AS x(id, name, \"system_user\")",
    "INSERT INTO pk_sink SELECT 1, (SELECT translate(system_user, '-', '+') FROM pk_cust "
    "AS x(id, name, email, \"system_user\") WHERE id = 1)",
    "UPDATE pk_sink SET v = system_user FROM pk_cust AS x(id, name, email, \"system_user\") "
    "WHERE x.id = pk_sink.id",
    "INSERT INTO pk_sink SELECT c.id, system_user FROM pk_cust AS c(id, n, e, "
    "\"system_user\") JOIN pk_sink s ON s.id = c.id",
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", TABLES)
def test_tables_refused(pg, pk, client, sql):
    pg.execute("TRUNCATE pk_sink; INSERT INTO pk_sink VALUES (1, 'seed')", dbname="appdb")
    err, _ = run_client(client, pk, sql)
    assert_refused(err)
    got = pg.execute("SELECT id, v FROM pk_sink ORDER BY id", dbname="appdb")
    assert got == [(1, "seed")], got
    assert _clear_in(got) == []


# a column kept by the table itself: a STORED generated column (or any ALTER TABLE whose
# expressions read a masked column) copies the value in clear under a name no mask covers
GENERATED = [
    "ALTER TABLE pk_cust ADD COLUMN pk_g1 text GENERATED ALWAYS AS (ssn) STORED",
    "ALTER TABLE pk_cust ADD COLUMN pk_g2 text GENERATED ALWAYS AS (upper(email)) STORED",
    "ALTER TABLE public.pk_cust ADD COLUMN IF NOT EXISTS pk_g3 text "
    "GENERATED ALWAYS AS (pk_cust.ssn || '') STORED",
    "ALTER TABLE ONLY pk_cust ADD COLUMN pk_g4 text GENERATED ALWAYS AS "
    "(reverse(ssn)) STORED, ADD COLUMN pk_g5 int",
    "ALTER TABLE pk_cust ADD COLUMN pk_g6 int GENERATED ALWAYS AS (length(email) * 0 + "
    "ascii(email)) STORED",
    "ALTER TABLE pk_cust ADD COLUMN pk_g7 text GENERATED ALWAYS AS "
    "(translate(ssn, '0123456789', 'abcdefghij')) STORED",
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", GENERATED)
def test_generated_columns_refused(pg, pk, client, sql):
    err, _ = run_client(client, pk, sql)
    assert_refused(err)
    cols = pg.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'pk_cust'::regclass "
                      "AND attnum > 0 AND NOT attisdropped ORDER BY attnum", dbname="appdb")
    assert cols == [("id",), ("name",), ("email",), ("ssn",)], cols


CREATED = [
    ("CREATE TABLE pk_ctas AS SELECT * FROM pk_cust", "pk_ctas"),
    ("SELECT id, ssn INTO pk_into FROM pk_cust", "pk_into"),
    ("CREATE TABLE pk_ctas2 AS SELECT c FROM pk_cust c", "pk_ctas2"),
    ("CREATE VIEW pk_v1 AS SELECT id, ssn FROM pk_cust", "pk_v1"),
    ("CREATE VIEW pk_v2 AS SELECT c.* FROM pk_cust c", "pk_v2"),
    ("CREATE MATERIALIZED VIEW pk_mv AS SELECT lower(email) AS e FROM pk_cust", "pk_mv"),
    ("CREATE TABLE pk_ctas3 AS TABLE pk_cust", "pk_ctas3"),
    ("CREATE FUNCTION pk_f() RETURNS SETOF text LANGUAGE sql AS "
     "'SELECT ssn FROM pk_cust'", "pk_f"),
    ("CREATE PROCEDURE pk_p() LANGUAGE plpgsql AS "
     "$$BEGIN INSERT INTO pk_sink SELECT id, ssn FROM pk_cust; END$$", "pk_p"),
    ("CREATE FUNCTION pk_f2() RETURNS text LANGUAGE plpgsql AS "
     "$$BEGIN RETURN (SELECT string_agg(email, ',') FROM pk_cust); END$$", "pk_f2"),
    ("CREATE RULE pk_r AS ON UPDATE TO pk_cust DO ALSO "
     "INSERT INTO pk_sink VALUES (NEW.id, NEW.ssn)", "pk_r"),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql,name", CREATED)
def test_objects_refused(pg, pk, client, sql, name):
    err, _ = run_client(client, pk, sql)
    assert_refused(err)
    n = upstream_one(pg, "SELECT (SELECT count(*) FROM pg_class WHERE relname = %(n)s) + "
                         "(SELECT count(*) FROM pg_proc WHERE proname = %(n)s) + "
                         "(SELECT count(*) FROM pg_rewrite WHERE rulename = %(n)s)"
                         .replace("%(n)s", f"'{name}'"))
    assert n == 0


APP_PROBE = ("SELECT count(*) FROM (SELECT current_setting('application_name') AS v) s "
             "WHERE v LIKE '%@%' OR v LIKE '%-45-%' OR v LIKE '%-65-%' OR v ~ '[0-9]{9}'")
SESSION = [
    ("SELECT set_config('application_name', ssn, false) FROM pk_cust WHERE id = 1",
     APP_PROBE),
    ("SELECT set_config('application_name', email, false) FROM pk_cust WHERE id = 1",
     APP_PROBE),
    ("SELECT set_config('application_name', (SELECT email FROM pk_cust LIMIT 1), false)",
     APP_PROBE),
    ("SELECT set_config('application_name', replace(c.ssn, '-', ''), true) "
     "FROM pk_cust c", APP_PROBE),
    ("CREATE TEMP TABLE pk_tt AS SELECT ssn FROM pk_cust",
     "SELECT count(*) FROM pg_class WHERE relname = 'pk_tt'"),
    ("CREATE TEMP VIEW pk_tv AS SELECT email FROM pk_cust",
     "SELECT count(*) FROM pg_class WHERE relname = 'pk_tv'"),
    ("DECLARE pk_hc CURSOR WITH HOLD FOR SELECT ssn FROM pk_cust",
     "SELECT count(*) FROM pg_cursors WHERE name = 'pk_hc'"),
    ("PREPARE pk_pp AS INSERT INTO pk_sink SELECT id, ssn FROM pk_cust",
     "SELECT count(*) FROM pg_prepared_statements WHERE name = 'pk_pp'"),
    ("DO $$BEGIN PERFORM set_config('application_name', "
     "(SELECT ssn FROM pk_cust LIMIT 1), false); END$$", APP_PROBE),
    ("DO $$BEGIN EXECUTE 'INSERT INTO pk_sink SELECT id, ss' || 'n FROM pk_cust'; END$$",
     "SELECT count(*) FROM pk_sink"),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql,probe", SESSION)
def test_session_state_refused(pg, pk, client, sql, probe):
    pg.execute("TRUNCATE pk_sink", dbname="appdb")
    err, out = run_client(client, pk, sql, probe)
    # set_config with a value that is not a literal is refused by the settings
    # allow-list already (under a policy); either refusal keeps the value out
    assert_refused(err, ("masking", "settings") if "set_config" in sql else ("masking",))
    assert out.strip("[]()', ") in ("0", "0,"), out
    assert upstream_one(pg, "SELECT count(*) FROM pk_sink") == 0


NOTIFY = [
    "SELECT pg_notify('pk_chan', ssn) FROM pk_cust",
    "SELECT pg_notify('pk_chan', email) FROM pk_cust WHERE id = 1",
    "SELECT pg_notify('pk_chan', (SELECT string_agg(ssn, ',') FROM pk_cust))",
    "SELECT pg_notify('pk_chan', replace(c.ssn, '-', '')) FROM pk_cust c",
    "WITH x AS (SELECT email FROM pk_cust) SELECT pg_notify('pk_chan', upper(email)) FROM x",
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", NOTIFY)
def test_notifications_refused(pg, pk, client, sql):
    """A payload reaches every listening session (another session of the same agent
    too): pg_notify of masked values is parking. Judged by a listener upstream."""
    import psycopg
    listener = psycopg.connect(pg.dsn(dbname="appdb"), autocommit=True)
    try:
        listener.execute("LISTEN pk_chan")
        err, _ = run_client(client, pk, sql)
        assert_refused(err)
        got = [n.payload for n in listener.notifies(timeout=0.5, stop_after=1)]
        assert got == [], got
    finally:
        listener.close()


LARGE_OBJECTS = [
    "SELECT lo_from_bytea(0, ssn::bytea) FROM pk_cust",
    "SELECT lo_from_bytea(0, convert_to(email, 'UTF8')) FROM pk_cust WHERE id = 1",
    "SELECT lo_put(lo_create(0), 0, ssn::bytea) FROM pk_cust",
    "SELECT lo_from_bytea(0, (SELECT string_agg(ssn, '') FROM pk_cust)::bytea)",
    "SELECT lowrite(lo_open(lo_create(0), 131072), c.email::bytea) FROM pk_cust c",
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", LARGE_OBJECTS)
def test_large_objects_refused(pg, pk, client, sql):
    before = upstream_one(pg, "SELECT count(*) FROM pg_largeobject_metadata")
    err, _ = run_client(client, pk, sql)
    assert_refused(err)
    assert upstream_one(pg, "SELECT count(*) FROM pg_largeobject_metadata") == before
    data = upstream_one(pg, "SELECT coalesce(string_agg(encode(data, 'escape'), ''), '') "
                            "FROM pg_largeobject")
    assert _clear_in(data) == []


def test_copy_to_file_refused(pg, pk):
    for i, client in enumerate(CLIENTS + ["psycopg"]):
        path = pk.tmp / f"out{i}.csv"
        sql = [f"COPY (SELECT ssn FROM pk_cust) TO '{path}'",
               f"COPY (SELECT c.* FROM pk_cust c) TO '{path}' (FORMAT csv)",
               f"COPY (SELECT email FROM pk_cust) TO PROGRAM 'cat > {path}'",
               f"COPY (SELECT upper(ssn) FROM pk_cust) TO '{path}'",
               f"COPY (SELECT row_to_json(c) FROM pk_cust c) TO '{path}'"][i]
        err, _ = run_client(client, pk, sql)
        assert_refused(err)
        assert not path.exists(), sql


STATS = [
    "SELECT * FROM pg_stats WHERE tablename = 'pk_cust'",
    "SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'pk_cust'",
    "SELECT s.histogram_bounds::text FROM pg_catalog.pg_stats s "
    "WHERE s.tablename = 'pk_cust'",
    "SELECT row_to_json(s) FROM pg_stats s WHERE tablename = 'pk_cust'",
    "SELECT s FROM pg_stats s WHERE tablename = 'pk_cust'",
    "SELECT stavalues1::text FROM pg_statistic",
    "SELECT * FROM pg_stats_ext",
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", STATS)
def test_statistics_values_refused(pg, pk, client, sql):
    # the upstream does hold the values there: the refusal is what keeps them in
    direct = pg.execute("SELECT histogram_bounds::text FROM pg_stats "
                        "WHERE tablename = 'pk_cust' AND attname = 'ssn'", dbname="appdb")
    assert _clear_in(direct), direct
    err, out = run_client(client, pk, sql)
    assert_refused(err)
    assert _clear_in(out) == []


# -- what must keep working
@pytest.mark.parametrize("client", CLIENTS)
def test_reading_masked_columns_to_the_client_is_masked(pk, client):
    err, out = run_client(client, pk, "SELECT 1", "SELECT id, ssn, email FROM pk_cust")
    assert err is None
    assert "6789" in out and _clear_in(out) == [], out


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", [
    "INSERT INTO pk_sink SELECT id, name FROM pk_cust",
    "INSERT INTO pk_sink VALUES (1, 'x'), (2, 'y')",
    "UPDATE pk_sink SET v = c.name FROM pk_cust c WHERE c.id = pk_sink.id",
    "CREATE TEMP TABLE pk_ok AS SELECT id, name FROM pk_cust",
    "SELECT set_config('application_name', 'pk-ok', false) FROM pk_cust WHERE id = 1",
    "SELECT attname, null_frac, n_distinct FROM pg_stats WHERE tablename = 'pk_cust'",
    "UPDATE pk_cust SET ssn = 'x' WHERE false",
])
def test_writes_that_read_no_masked_column_pass(pg, pk, client, sql):
    # a third row no statement touches: an UPDATE that reached every row of pk_sink
    # would be refused by the blast-radius guard's "every row" measure
    pg.execute("TRUNCATE pk_sink; INSERT INTO pk_sink VALUES (1, 'a'), (2, 'b'), (3, 'c')",
               dbname="appdb")
    err, _ = run_client(client, pk, sql)
    assert err is None, err
    if sql.startswith("INSERT INTO pk_sink SELECT"):
        assert upstream_one(pg, "SELECT count(*) FROM pk_sink WHERE v IN "
                                "('Ada', 'Grace')") == 2
    if sql.startswith("UPDATE pk_sink"):
        assert upstream_one(pg, "SELECT string_agg(v, ',' ORDER BY id) FROM pk_sink") \
            == "Ada,Grace,c"


def test_cursor_without_hold_passes_and_is_masked(pk):
    with psycopg.connect(pk.dsn(dbname="appdb")) as conn:
        conn.execute("DECLARE pk_c CURSOR FOR SELECT id, ssn FROM pk_cust ORDER BY id")
        got = conn.execute("FETCH ALL FROM pk_c").fetchall()
    assert len(got) == 2 and _clear_in(got) == [], got


@pytest.mark.parametrize("client", CLIENTS)
def test_exempt_dba_may_copy(pg, pk, client):
    pg.execute("DROP TABLE IF EXISTS pk_dba_copy", dbname="appdb")
    err, _ = run_client(client, pk, "CREATE TABLE pk_dba_copy AS SELECT * FROM pk_cust",
                        user=HUMAN, password=HUMAN_PASSWORD)
    assert err is None, err
    got = pg.execute("SELECT ssn FROM pk_dba_copy ORDER BY id", dbname="appdb")
    assert [r[0] for r in got] == SSNS
    pg.execute("DROP TABLE pk_dba_copy", dbname="appdb")
