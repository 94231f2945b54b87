# Red team, round 18 (helper 91): an integrity violation's DETAIL prints the failing row
# or key as stored, values unquoted ("Failing row contains (1, null, x), ZK-4471-QP,
# 8832-KITE)."). The scrub blanked the outermost bracketed group, so a ")" the agent put
# into a column before the masked ones closed it early and the masked values after it
# went out in clear (detectors catch only the formats they know: these codes are none of
# them). Details are now matched whole against Postgres' templates. Judged by every byte
# each client got against the values stored upstream, and by the rows upstream.
import asyncio

import asyncpg
import psycopg
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER, run_psql

DB = "maskdetaildb"
CODES = ["ZK-4471-QP", "RW-9052-LM", "TT-1838-XV"]
PINS = ["8832-KITE", "1907-ROOK", "5520-PAWN"]
# every form of a stored value that would tell it (whole, or the parts a mask hides)
SECRETS = [v.encode() for v in CODES + PINS] + [b"4471", b"KITE", b"9052", b"ROOK"]

MASKS = """
[[masks]]
column = "public.members.code"
strategy = "partial"
keep = 2
except_groups = ["dba"]

[[masks]]
column = "public.members.pin"
strategy = "redact"
except_groups = ["dba"]

[detectors]
builtin = ["email", "ssn", "credit_card"]
"""

SEED = [
    "DROP TABLE IF EXISTS members, member_refs",
    "CREATE TABLE members (id int PRIMARY KEY, name text NOT NULL, tag text, "
    "code text NOT NULL UNIQUE, pin text CHECK (length(pin) < 20))",
    "INSERT INTO members VALUES " + ", ".join(
        f"({i + 1}, 'm{i + 1}', 't{i + 1}', '{c}', '{p}')"
        for i, (c, p) in enumerate(zip(CODES, PINS))),
    "CREATE TABLE member_refs (id int PRIMARY KEY, tag text, code text "
    "REFERENCES members (code))",
    f"INSERT INTO member_refs VALUES (1, 'r', '{CODES[2]}')",
    "GRANT ALL ON members, member_refs TO PUBLIC",
]

# statements that fail on an integrity rule, a ")" (or more) in a value printed before
# the masked ones
STATEMENTS = [
    "UPDATE members SET tag = 'x)', name = NULL WHERE id = 1",
    "UPDATE members SET tag = ')))', name = NULL WHERE id = 2",
    "UPDATE members SET tag = 'a), b, (c', name = NULL WHERE id IN (1, 2)",
    "UPDATE members SET tag = ')', pin = pin || repeat('z', 30) WHERE id = 1",
    "INSERT INTO members SELECT 9, NULL, ')', code, pin FROM members WHERE id = 2",
    "INSERT INTO members VALUES (1, 'n', ')', 'new', 'p') ON CONFLICT (id) "
    "DO UPDATE SET tag = ')', name = NULL",
    "MERGE INTO members m USING (SELECT 1 AS id) v ON m.id = v.id "
    "WHEN MATCHED THEN UPDATE SET tag = 'q)', name = NULL",
    f"UPDATE members SET tag = ')', code = '{CODES[1]}' WHERE id = 1",
    "UPDATE members SET tag = ')', code = 'other' WHERE id = 3",
    "DELETE FROM members WHERE id = 3 AND tag <> ')'",
    "UPDATE members SET name = NULL, tag = ')' || code WHERE id = 3",
]

CLIENTS = ["raw-simple", "raw-extended", "psycopg", "psycopg-prepared", "asyncpg", "psql"]


@pytest.fixture(scope="module")
def dproxy(pg, tmp_path_factory):
    from conftest import Proxy
    if not pg.execute(f"SELECT 1 FROM pg_database WHERE datname = '{DB}'"):
        pg.execute(f"CREATE DATABASE {DB} OWNER {UPSTREAM_USER}")
    for stmt in SEED:
        pg.execute(stmt, dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-detail"), extra=MASKS).start()
    yield p
    p.stop()


def _received(client: str, proxy, psql_bin: str, sql: str) -> tuple[bytes, str | None]:
    """Everything the client got that could carry text (as bytes), and the SQLSTATE."""
    dsn = proxy.dsn(dbname=DB)
    if client.startswith("raw-"):
        c = rawpg.RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database=DB)
        try:
            if client == "raw-simple":
                msgs = c.run(sql)
            else:
                c.send(rawpg.parse(sql), rawpg.bind(), rawpg.describe(), rawpg.execute(),
                       rawpg.SYNC)
                msgs = c.until_ready()
        finally:
            c.close()
        errs = rawpg.errors(msgs)
        return b"".join(p for _, p in msgs), errs[0]["C"] if errs else None
    if client.startswith("psycopg"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                conn.execute(sql, prepare=client == "psycopg-prepared")
            except psycopg.Error as e:
                d = e.diag
                text = " ".join(str(x) for x in (e, d.message_primary, d.message_detail,
                                                 d.message_hint, d.context))
                return text.encode(), e.sqlstate
        return b"", None
    if client == "asyncpg":
        async def go():
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(sql)
            except asyncpg.PostgresError as e:
                return " ".join(str(x) for x in (e, e.detail, e.hint)).encode(), e.sqlstate
            finally:
                await conn.close()
            return b"", None
        return asyncio.run(go())
    r = run_psql(psql_bin, dsn, "-v", "VERBOSITY=verbose", "-c", sql)
    return (r.stdout + r.stderr).encode(), ("error" if r.returncode else None)


def _rows(pg) -> list:
    with psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB), autocommit=True) as c:
        return c.execute("SELECT id, name, tag, code, pin FROM members ORDER BY id").fetchall()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", STATEMENTS)
def test_integrity_details_do_not_carry_masked_values(dproxy, pg, psql_bin, client, sql):
    before = _rows(pg)
    got, state = _received(client, dproxy, psql_bin, sql)
    assert state is not None, (client, sql, got)        # the statement failed
    assert [s for s in SECRETS if s in got] == [], (client, sql, got)
    assert _rows(pg) == before


def test_the_detail_keeps_its_shape(dproxy):
    c = rawpg.RawClient.connect(dproxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        (err,) = rawpg.errors(c.run("UPDATE members SET tag = 'x)', name = NULL "
                                    "WHERE id = 1"))
        assert err["C"] == "23502" and err["D"] == "Failing row contains (***).", err
        (err,) = rawpg.errors(c.run("UPDATE members SET tag = ')', code = 'other' "
                                    "WHERE id = 3"))
        assert err["C"] == "23503", err
        assert err["D"] == 'Key (***)=(***) is still referenced from table "member_refs".', \
            err
        (err,) = rawpg.errors(c.run(f"UPDATE members SET code = '{CODES[1]}' WHERE id = 1"))
        assert err["C"] == "23505" and err["D"] == "Key (***)=(***) already exists.", err
    finally:
        c.close()
