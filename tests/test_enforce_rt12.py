# Red team, round 12 (policy side), judged upstream:
#  F4 - a call of a function whose body runs DDL (CREATE TEMP TABLE ...) was never
#       answered when masks are configured: every fresh decision of the call (after
#       waiting for its lineage, the function bodies or the catalog) counted its DDL
#       again, made the catalog stale again and went back to wait, for ever. The call
#       is answered now, and what its body did is in the catalog.
import asyncio
import subprocess

import asyncpg
import psycopg
import pytest
import rawpg
from mask_corpus import DB, MASKS, raw_connect, seed


@pytest.fixture(scope="module", params=["policy", "masks"])
def rt12proxy(request, pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("enforce-rt12"),
              extra=MASKS if request.param == "masks" else "").start()
    yield p
    p.stop()


# (body statement, upstream catalog query that sees what it did)
BODIES = [
    ("CREATE TEMP TABLE IF NOT EXISTS rt12_tt{n}(x int)",
     "SELECT count(*) FROM pg_class WHERE relname = 'rt12_tt{n}' AND relpersistence = 't'"),
    # (a TEMP view made by a body is refused since round 14: it would shadow a table)
    ("CREATE VIEW rt12_tv{n} AS SELECT 1 AS x",
     "SELECT count(*) FROM pg_class WHERE relname = 'rt12_tv{n}' AND relkind = 'v'"),
    ("CREATE TABLE IF NOT EXISTS rt12_own{n}(x int)",
     "SELECT count(*) FROM pg_class WHERE relname = 'rt12_own{n}'"),
    ("CREATE TABLE IF NOT EXISTS rt12_ix{n}(x int); "
     "CREATE INDEX IF NOT EXISTS rt12_ix{n}_x ON rt12_ix{n}(x)",
     "SELECT count(*) FROM pg_class WHERE relname = 'rt12_ix{n}_x' AND relkind = 'i'"),
    ("CREATE TABLE IF NOT EXISTS rt12_cm{n}(x int); COMMENT ON TABLE rt12_cm{n} IS 'hi'",
     "SELECT count(*) FROM pg_description d JOIN pg_class c ON c.oid = d.objoid "
     "WHERE c.relname = 'rt12_cm{n}'"),
]
CLIENTS = ["psql", "psycopg", "asyncpg", "raw"]
_seq = iter(range(10_000))


def _create(proxy, fn, body):
    with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True, connect_timeout=10) as c:
        c.execute(f"CREATE OR REPLACE FUNCTION {fn}() RETURNS int LANGUAGE plpgsql "
                  f"AS $$BEGIN {body}; RETURN 7; END$$")


def _call(client, proxy, fn, psql_bin):
    """Run SELECT fn() with one client; (answered, the error message or None). The
    call must come back within the timeout (it used to hang)."""
    sql = f"SELECT {fn}()"
    if client == "psql":
        r = subprocess.run([psql_bin, proxy.dsn(dbname=DB), "-X", "-At", "-c", sql],
                           capture_output=True, text=True, timeout=30)
        return True, (r.stderr or None) if r.returncode else None
    if client == "psycopg":
        with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
            c.execute("SET statement_timeout = '20s'")
            try:
                c.execute(sql, prepare=True).fetchone()
                return True, None
            except psycopg.Error as e:
                return True, e.diag.message_primary
    if client == "asyncpg":
        async def go():
            c = await asyncpg.connect(proxy.dsn(dbname=DB), timeout=10)
            try:
                await asyncio.wait_for(c.fetchval(sql), 30)
                return True, None
            except asyncpg.PostgresError as e:
                return True, str(e)
            finally:
                await c.close()
        return asyncio.run(go())
    c = raw_connect(proxy)
    try:
        c.send(rawpg.parse(sql), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
        msgs = c.until_ready()
        errs = rawpg.errors(msgs)
        return True, errs[0].get("M") if errs else None
    finally:
        c.close()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("k", range(len(BODIES)))
def test_call_of_a_function_running_ddl_is_answered(rt12proxy, pg, psql_bin, client, k):
    n = next(_seq)
    body, check = (x.format(n=n) for x in BODIES[k])
    fn = f"rt12_f{n}"
    _create(rt12proxy, fn, body)
    answered, err = _call(client, rt12proxy, fn, psql_bin)
    assert answered
    done = pg.execute(check, dbname=DB)[0][0]
    if err is None:
        # what the body did is upstream (a temporary object: seen in the catalog while
        # its session lived; gone after, so only the permanent ones are counted here)
        assert done == 1 or k < 2, (body, done)
    else:
        assert "pgguard" in err, err
        assert done == 0, (body, err)


# F2 - a statement prepared against the agent's own table was bound again after DDL
#      made its name mean something else (a temporary view over a protected table
#      shadows it, or another session renamed the table and put a view in its place):
#      Postgres resolves the names of a prepared statement again, pgguard did not judge
#      it again, and the write landed in the protected table. A Bind of a statement
#      judged before DDL went by is judged again now.
VAULT_RULES = """
[[rules]]
name = "vault-is-read-only"
when = { kind = "agent", statements = ["insert", "update", "delete", "merge"], relations = ["public.vault"] }
action = "block"
"""


@pytest.fixture(scope="module", params=["policy", "masks"])
def vproxy(request, pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    pg.execute("DROP TABLE IF EXISTS vault CASCADE; CREATE TABLE vault (id int, v text);"
               "INSERT INTO vault SELECT g, 'v' || g FROM generate_series(1, 5) g;"
               "GRANT ALL ON vault TO PUBLIC", dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("enforce-rt12-vault"), extra=VAULT_RULES + (
        MASKS if request.param == "masks" else "")).start()
    yield p
    p.stop()


def _vault(pg):
    return pg.execute("SELECT id, v FROM vault ORDER BY id", dbname=DB)


def _own(c, name):
    c.execute(f"DROP VIEW IF EXISTS {name}_old CASCADE")
    c.execute(f"CREATE TABLE IF NOT EXISTS {name} (id int, v text)")
    c.execute(f"INSERT INTO {name} VALUES (1, 'own')")


def _psycopg_shadow(proxy, sql, args):
    name = next(_tables)
    with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
        _own(c, name)
        q = sql.format(t=name)
        c.execute(q, args(1), prepare=True)
        c.execute(f"CREATE TEMP VIEW {name} AS SELECT * FROM vault")
        try:
            c.execute(q, args(2), prepare=True)
        except psycopg.errors.InsufficientPrivilege as e:
            return e.diag.message_primary
    return None


def _asyncpg_shadow(proxy, sql, args):
    name = next(_tables)

    async def go():
        c = await asyncpg.connect(proxy.dsn(dbname=DB))
        try:
            await c.execute(f"CREATE TABLE IF NOT EXISTS {name} (id int, v text)")
            await c.execute(f"INSERT INTO {name} VALUES (1, 'own')")
            q = sql.format(t=name).replace("%s", "$1")
            stmt = await c.prepare(q)
            await stmt.fetch(*args(1))
            await c.execute(f"CREATE TEMP VIEW {name} AS SELECT * FROM vault")
            try:
                await stmt.fetch(*args(2))
            except asyncpg.InsufficientPrivilegeError as e:
                return str(e)
        finally:
            await c.close()
    return asyncio.run(go())


def _raw_route(proxy, sql, args, stmt, between):
    """Parse + run the statement, send ``between(q)`` (frames, then wait for ready), make
    a temporary view over the vault shadow the table, then Bind the statement again."""
    name = next(_tables)
    with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
        _own(c, name)
    q = sql.format(t=name).replace("%s", "$1")
    c = raw_connect(proxy)
    try:
        p = [str(a).encode() for a in args(1)]
        c.send(rawpg.parse(q, stmt), rawpg.bind(stmt, p), rawpg.execute(), rawpg.SYNC)
        c.until_ready()
        c.send(*between(q))
        c.until_ready()
        # the DDL through another named statement (a Query would drop the unnamed one)
        c.send(rawpg.parse(f"CREATE TEMP VIEW {name} AS SELECT * FROM vault", "ddl"),
               rawpg.bind("ddl"), rawpg.execute(), rawpg.SYNC)
        c.until_ready()
        p = [str(a).encode() for a in args(2)]
        c.send(rawpg.bind(stmt, p), rawpg.execute(), rawpg.SYNC)
        errs = rawpg.errors(c.until_ready())
        return errs[0]["M"] if errs else None
    finally:
        c.close()


def _raw_shadow(proxy, sql, args, unnamed):
    stmt = "" if unnamed else "s1"
    # judged once (an unnamed Parse is then forwarded by the compiled pipe)
    return _raw_route(proxy, sql, args, stmt, lambda q: [rawpg.parse(q, stmt), rawpg.SYNC])


def _raw_skipped_close(proxy, sql, args, portal_too=False):
    """Round 17: a Close that Postgres skipped (an error earlier in its pipeline) made
    pgguard forget the statement's generation: its Bind after DDL was not judged."""
    closes = [rawpg.close("S", "s1")] + ([rawpg.close("P", "")] if portal_too else [])
    return _raw_route(proxy, sql, args, "s1", lambda q: [
        rawpg.parse("SELECT 1/0"), rawpg.bind(), rawpg.execute(), *closes, rawpg.SYNC])


def _raw_dup_parse(proxy, sql, args):
    """Round 18: a Parse of the name with a harmless text fails (42P05: the name is
    taken) and the older statement stays; pgguard judged the Bind after DDL as the
    failed text."""
    return _raw_route(proxy, sql, args, "s1", lambda q: [
        rawpg.parse("SELECT 1", "s1"), rawpg.SYNC])


def _renamed_by_peer(proxy, sql, args):
    """The table is renamed and a view over the vault takes its name, from another
    session, between the statement's Parse and its Bind."""
    name = next(_tables)
    with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as a, \
            psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as b:
        _own(a, name)
        q = sql.format(t=name)
        a.execute(q, args(1), prepare=True)
        b.execute(f"ALTER TABLE {name} RENAME TO {name}_old")
        b.execute(f"CREATE VIEW {name} AS SELECT * FROM vault")
        try:
            a.execute(q, args(2), prepare=True)
        except psycopg.errors.InsufficientPrivilege as e:
            return e.diag.message_primary
        finally:
            b.execute(f"DROP VIEW IF EXISTS {name}")
    return None


_tables = (f"rt12_y{i}" for i in range(10_000))
SHAPES = {
    "insert": ("INSERT INTO {t} (id, v) VALUES (%s, 'stolen')", lambda i: (900 + i,)),
    "update": ("UPDATE {t} SET v = 'stolen' WHERE id = %s", lambda i: (i,)),
    "delete": ("DELETE FROM {t} WHERE id = %s", lambda i: (i,)),
}
ROUTES = {
    "psycopg": _psycopg_shadow,
    "asyncpg": _asyncpg_shadow,
    "raw-named": lambda p, s, a: _raw_shadow(p, s, a, False),
    "raw-unnamed": lambda p, s, a: _raw_shadow(p, s, a, True),
    "peer-rename": _renamed_by_peer,
    "raw-skipped-close": _raw_skipped_close,
    "raw-skipped-closes": lambda p, s, a: _raw_skipped_close(p, s, a, True),
    "raw-dup-parse": _raw_dup_parse,
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", SHAPES)
def test_prepared_statement_is_judged_again_after_ddl(vproxy, pg, route, shape):
    before = _vault(pg)
    sql, args = SHAPES[shape]
    err = ROUTES[route](vproxy, sql, args)
    assert _vault(pg) == before, (route, shape, err)
    assert err is not None and "vault-is-read-only" in err and "judged again" in err, err


def test_prepared_statement_runs_on_after_unrelated_ddl(vproxy, pg):
    """DDL that changes nothing the statement reads: judged again and allowed."""
    with psycopg.connect(vproxy.dsn(dbname=DB), autocommit=True) as c:
        _own(c, "rt12_fine")
        for i in range(3):
            c.execute("INSERT INTO rt12_fine VALUES (%s, 'ok')", (i,), prepare=True)
            c.execute(f"CREATE TEMP TABLE rt12_other{i} (x int)")
    got = pg.execute("SELECT count(*) FROM rt12_fine WHERE v = 'ok'", dbname=DB)[0][0]
    assert got >= 3
    pg.execute("DELETE FROM rt12_fine", dbname=DB)


# Masking F3 - COPY ... TO STDOUT (ENCODING 'SJIS', DELIMITER '|'): in Shift-JIS
#      Postgres leaves a two-byte character's second byte unescaped, and 'ポ' ends in
#      '|', '表' in '\\': the masker, splitting fields on the bytes, saw one delimiter
#      too many and one too few, and the masked ssn landed in a constant's column, in
#      clear. A COPY in an encoding other than UTF-8 is refused to masked identities.
COPIES = [
    "COPY (SELECT 'ポ', translate(ssn, '-', '/'), '表', 1 FROM customers ORDER BY id) "
    "TO STDOUT (ENCODING 'SJIS', DELIMITER '|')",
    "COPY (SELECT 'ポ', replace(email, '@', ' at '), '表', 1 FROM customers ORDER BY id) "
    "TO STDOUT (ENCODING 'Shift_JIS', DELIMITER '|')",
    "COPY (SELECT 'x', ssn, 'y' FROM customers) TO STDOUT (ENCODING 'euc_jp')",
    "COPY customers TO STDOUT (ENCODING 'SJIS', DELIMITER '|')",
    "COPY customers (id, ssn) TO STDOUT (FORMAT csv, ENCODING 'LATIN1')",
    "COPY (SELECT 'ポ', ssn, '表' FROM customers) TO STDOUT WITH (FORMAT csv, "
    "DELIMITER '|', ENCODING 'WIN932')",
]


def _copy_out(client, proxy, sql, psql_bin):
    """Everything the client got back (text), and whether it was refused."""
    if client == "psql":
        r = subprocess.run([psql_bin, proxy.dsn(dbname=DB), "-X", "-c", sql],
                           capture_output=True, timeout=30)
        out = r.stdout.decode("shift_jis", "replace") + r.stdout.decode("latin-1")
        return out + r.stderr.decode("utf-8", "replace"), b"pgguard" in r.stderr
    if client == "psycopg":
        with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as c:
            data = b""
            try:
                with c.cursor().copy(sql) as cp:
                    for chunk in cp:
                        data += bytes(chunk)
            except psycopg.errors.InsufficientPrivilege as e:
                return e.diag.message_primary, True
            return data.decode("shift_jis", "replace") + data.decode("latin-1"), False
    c = raw_connect(proxy)
    try:
        if client == "raw-extended":
            c.send(rawpg.parse(sql), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
        else:
            c.send(rawpg.query(sql))
        msgs = c.until_ready()
        data = b"".join(body for t, body in msgs if t == b"d")
        errs = rawpg.errors(msgs)
        return (data.decode("shift_jis", "replace") + data.decode("latin-1") +
                repr(errs)), any("pgguard" in e.get("M", "") for e in errs)
    finally:
        c.close()


@pytest.fixture(scope="module")
def mproxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("enforce-rt12-copy"), extra=MASKS).start()
    yield p
    p.stop()


@pytest.mark.parametrize("client", ["psql", "psycopg", "raw-simple", "raw-extended"])
@pytest.mark.parametrize("sql", COPIES)
def test_copy_in_another_encoding_is_refused(mproxy, psql_bin, client, sql):
    from mask_corpus import leaks
    got, refused = _copy_out(client, mproxy, sql, psql_bin)
    assert leaks(got.replace("/", "-").replace(" at ", "@")) == [], got[:500]
    assert refused, got[:500]
    assert "ENCODING" in got, got[:500]


@pytest.mark.parametrize("enc", ["UTF8", "utf-8", "Unicode"])
def test_copy_in_utf8_still_works_and_is_masked(mproxy, pg, psql_bin, enc):
    from mask_corpus import leaks
    sql = f"COPY (SELECT id, ssn FROM customers ORDER BY id) TO STDOUT (ENCODING '{enc}')"
    got, refused = _copy_out("psycopg", mproxy, sql, psql_bin)
    assert not refused, got
    n = pg.execute("SELECT count(*) FROM customers", dbname=DB)[0][0]
    assert got.count("\n") == 2 * n          # every row (decoded twice, see _copy_out)
    assert leaks(got) == [], got[:300]
