# Masking through the proxy: no seeded PII leaves in clear, however an agent asks
# (alias, join, view, expressions, row_to_json, binary, prepared, COPY); exempt
# identities see clear values; unmasked columns come back byte-identical.
import asyncio
import base64

import asyncpg
import psycopg
import pytest

from conftest import HUMAN, HUMAN_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER

EMAILS = ["ada.lovelace@example.com", "grace.hopper@example.org"]
SSNS = ["123-45-6789", "987-65-4321"]
CARDS = ["4111111111111111", "5500005555555559"]
NOTE_EMAIL = "reach me at secret.person@example.net please"
NOTE_KEY = "key AKIAIOSFODNN7EXAMPLE in the notes"

MASKS = """
[[masks]]
column = "public.cust.email"
strategy = "email"
except_groups = ["dba"]

[[masks]]
column = "public.cust.ssn"
strategy = "partial"
keep = 4
except_groups = ["dba"]

[[masks]]
column = "public.cust.card"
strategy = "redact"
except_groups = ["dba"]

[detectors]
builtin = ["email", "ssn", "credit_card", "aws_access_key"]
except_groups = ["dba"]
"""
SEEDED = EMAILS + SSNS + CARDS + ["secret.person@example.net", "AKIAIOSFODNN7EXAMPLE"]


@pytest.fixture(scope="module")
def mproxy(pg, tmp_path_factory):
    from conftest import Proxy
    pg.execute("""
        DROP TABLE IF EXISTS cust CASCADE;
        CREATE TABLE cust (id int PRIMARY KEY, name text, email text, ssn text, card text,
                           notes text, doc jsonb);
        INSERT INTO cust VALUES
          (1, 'Ada', 'ada.lovelace@example.com', '123-45-6789', '4111111111111111',
           'reach me at secret.person@example.net please', '{"contact": "x@y.io"}'),
          (2, 'Grace', 'grace.hopper@example.org', '987-65-4321', '5500005555555559',
           'key AKIAIOSFODNN7EXAMPLE in the notes', '{"n": 1}');
        CREATE OR REPLACE VIEW cust_view AS SELECT id, email AS mail FROM cust;
    """, dbname="appdb")
    p = Proxy(pg, tmp_path_factory.mktemp("mask"), extra=MASKS).start()
    yield p
    p.stop()


def leaked(blob) -> list[str]:
    text = blob if isinstance(blob, str) else repr(blob)
    found = []
    for v in SEEDED:
        for form in (v, v.encode().hex(), base64.b64encode(v.encode()).decode(),
                     v.replace("-", "")):
            # (any case: upper() gives a lower-cased key back whole)
            if form in text or form.lower() in text.lower():
                found.append(form)
    return found


def rows(dsn, sql, **kw):
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(binary=kw.pop("binary", False))
        cur.execute(sql, kw.pop("params", None), prepare=kw.pop("prepare", None))
        return cur.fetchall()


@pytest.mark.parametrize("sql", [
    "SELECT * FROM cust ORDER BY id",
    "SELECT c.email AS e, c.ssn s, c.card FROM cust c JOIN cust d ON d.id = c.id",
    "SELECT * FROM cust_view",
    "SELECT lower(email), upper(ssn), replace(ssn, '-', ''), card || '' FROM cust",
    "SELECT row_to_json(c) FROM cust c",
    "SELECT json_agg(c) FROM cust c",
    "SELECT encode(email::bytea, 'hex'), encode(convert_to(ssn, 'UTF8'), 'base64') FROM cust",
    "SELECT ARRAY[email, ssn] FROM cust",
    "SELECT (SELECT email FROM cust WHERE id = 1)",
    "WITH x AS (SELECT email FROM cust) SELECT * FROM x",
    "SELECT notes FROM cust",
    "SELECT lower(notes), initcap(notes) FROM cust",
])
def test_no_seeded_value_leaves_in_clear(mproxy, sql):
    got = rows(mproxy.dsn(dbname="appdb"), sql)
    assert got, sql
    assert leaked(got) == [], (sql, got)


def test_strategies_and_untouched_columns(pg, mproxy):
    got = rows(mproxy.dsn(dbname="appdb"), "SELECT id, name, email, ssn, card FROM cust "
               "ORDER BY id")
    assert [r[:2] for r in got] == [(1, "Ada"), (2, "Grace")]
    assert got[0][2].endswith("@example.com") and "ada" not in got[0][2]
    assert got[0][3].endswith("6789") and got[0][3] != SSNS[0]
    assert got[0][4] == "****"
    direct = pg.execute("SELECT id, name FROM cust ORDER BY id", dbname="appdb")
    assert [r[:2] for r in got] == direct


@pytest.mark.parametrize("mode", ["binary", "prepared", "prepared-binary"])
def test_psycopg_binary_and_prepared(mproxy, mode):
    dsn = mproxy.dsn(dbname="appdb")
    for _ in range(3):      # prepared statements are reused without Describe
        got = rows(dsn, "SELECT id, email, ssn, notes FROM cust WHERE id > %s", params=[0],
                   binary="binary" in mode, prepare="prepared" in mode)
        assert len(got) == 2 and leaked(got) == [], got


@pytest.mark.parametrize("mode", ["text", "binary", "prepared-binary", "asyncpg"])
def test_a_lower_cased_access_key_is_detected(mproxy, mode):
    # (red team 25) lower(notes) came back as akiaiosfodnn7example: upper() is the key
    sql = "SELECT id, lower(notes), lower(notes) || ' x' FROM cust WHERE id > 0"
    dsn = mproxy.dsn(dbname="appdb")
    for _ in range(3):
        if mode == "asyncpg":
            async def go():
                conn = await asyncpg.connect(dsn)
                try:
                    return [tuple(r) for r in await conn.fetch(sql.replace("0", "$1"), 0)]
                finally:
                    await conn.close()
            got = asyncio.run(go())
        else:
            got = rows(dsn, sql, binary="binary" in mode, prepare="prepared" in mode)
        assert len(got) == 2 and leaked(got) == [], got
        assert any("[aws_access_key]" in str(r) for r in got), got


def test_asyncpg_statement_cache(mproxy):
    async def go():
        conn = await asyncpg.connect(mproxy.dsn(dbname="appdb"))
        try:
            out = []
            for _ in range(3):
                out += [tuple(r) for r in await conn.fetch(
                    "SELECT id, email, ssn, card, notes, doc FROM cust WHERE id >= $1", 1)]
            return out
        finally:
            await conn.close()
    got = asyncio.run(go())
    assert len(got) == 6 and leaked(got) == [], got


def test_copy_masked_and_unsupported_forms_refused(mproxy):
    with psycopg.connect(mproxy.dsn(dbname="appdb"), autocommit=True) as conn:
        for sql in ("COPY cust TO STDOUT", "COPY cust (id, email, ssn) TO STDOUT (FORMAT csv)",
                    "COPY (SELECT id, email, lower(ssn), notes FROM cust) TO STDOUT",
                    "COPY (SELECT * FROM cust_view) TO STDOUT (FORMAT csv, HEADER)"):
            buf = bytearray()
            with conn.cursor().copy(sql) as cp:
                for chunk in cp:
                    buf += chunk
            assert b"Ada" in buf or b"1," in buf or b"1\t" in buf
            assert leaked(bytes(buf).decode()) == [], (sql, bytes(buf))
        for sql in ("COPY cust TO STDOUT (FORMAT binary)",
                    "COPY (SELECT email FROM cust) TO STDOUT (FORMAT binary)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.cursor().copy(sql) as cp:
                    for _ in cp:
                        pass
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_view_columns_masked_by_rule_not_only_detectors(mproxy):
    got = rows(mproxy.dsn(dbname="appdb"), "SELECT id, mail FROM cust_view ORDER BY id")
    assert got == [(1, "****"), (2, "****")]


def test_exempt_identity_sees_clear_values(mproxy):
    got = rows(mproxy.dsn(user=HUMAN, password=HUMAN_PASSWORD, dbname="appdb"),
               "SELECT email, ssn, notes FROM cust ORDER BY id")
    assert got[0] == (EMAILS[0], SSNS[0], NOTE_EMAIL)


def test_upstream_sees_the_real_data(pg, mproxy):
    # masking is on the way out only: writes and filters use real values
    got = rows(mproxy.dsn(dbname="appdb"),
               "SELECT id FROM cust WHERE email = 'ada.lovelace@example.com'")
    assert got == [(1,)]
    direct = psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, "appdb"))
    assert direct.execute("SELECT email FROM cust WHERE id = 1").fetchone() == (EMAILS[0],)
    direct.close()


def test_masked_cells_are_audited(pg, make_proxy):
    import duckdb
    proxy = make_proxy(extra=MASKS)
    got = rows(proxy.dsn(dbname="appdb"), "SELECT email, ssn, name FROM cust")
    assert leaked(got) == []
    proxy.stop()
    rec = duckdb.sql(f"SELECT statement, masked_cells, rows FROM read_parquet("
                     f"'{proxy.audit_dir}/**/*.parquet', hive_partitioning = true) "
                     "WHERE event = 'statement'").fetchall()
    assert rec == [("SELECT email, ssn, name FROM cust", 4, 2)]


def test_psql_sees_masked_values(mproxy, psql_bin):
    from conftest import run_psql
    r = run_psql(psql_bin, mproxy.dsn(dbname="appdb"), "-c", "SELECT * FROM cust",
                 "-c", "\\copy cust to stdout")
    assert r.returncode == 0, r.stderr
    assert "a***@example.com" in r.stdout and "****6789" in r.stdout
    assert leaked(r.stdout) == []
