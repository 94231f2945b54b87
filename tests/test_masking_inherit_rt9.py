# Red team 9, F2: a table with masked columns made a child or partition of another table
# (ALTER TABLE ... INHERIT, ATTACH PARTITION): a scan of the parent returns the child's
# rows, so the parent (and its parents, views over it, its row type) carries the same
# masks by column name; a masked identity may not make such links itself, take a table
# out of one, nor rename or move a masked table, column or schema. Judged by what the
# client receives (rows, notices, notifications, errors: no clear value in any form) and
# by the upstream (refused DDL did not happen, nothing was parked), through psycopg
# (plain and prepare=True three times), asyncpg, and the raw simple and extended protocol.
import asyncio
import zlib

import asyncpg
import psycopg
import pytest
from conftest import (
    AGENT,
    AGENT_PASSWORD,
    HUMAN,
    HUMAN_PASSWORD,
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
)
from rawpg import SYNC, RawClient, bind, describe, errors, execute, parse, query

DB = "appdb"
MASKS = """
[[masks]]
column = "public.ihc_*.ssn"
strategy = "redact"
except_groups = ["dba"]

[[masks]]
column = "public.ihc_*.card_number"
strategy = "partial"
keep = 4
except_groups = ["dba"]

[[masks]]
column = "ihs_*.ihc_*.ssn"
strategy = "redact"
except_groups = ["dba"]
"""
CLIENTS = ["psycopg", "psycopg-prepared", "asyncpg", "raw-simple", "raw-extended"]
COLS = "id int, name text, ssn text, card_number text"


@pytest.fixture(scope="module")
def ih(pg, tmp_path_factory):
    from conftest import Proxy
    p = Proxy(pg, tmp_path_factory.mktemp("inherit-rt9"), extra=MASKS).start()
    yield p
    p.stop()


def secrets(tag: str) -> list[tuple[int, str, str]]:
    out = []
    for i in (1, 2, 3):
        n = zlib.crc32(f"{tag}/{i}".encode())
        out.append((i, f"{n // 10**6 % 1000:03d}-{n // 10**4 % 100:02d}-{n % 10**4:04d}",
                    f"4{n:015d}"[:16]))
    return out


def forms(v: str) -> set[str]:
    """A clear value as the attacks spell it (plain, digits only, reversed, translated)."""
    tr = str.maketrans("0123456789-", "abcdefghijX")
    base = {v, v.replace("-", "")}
    return base | {b[::-1] for b in base} | {b.translate(tr) for b in base} | \
        {b[::-1].translate(tr) for b in base}


def leaks(tag: str, blob) -> list[str]:
    text = blob if isinstance(blob, str) else repr(blob)
    return sorted(f for _, s, c in secrets(tag) for v in (s, c) for f in forms(v)
                  if f in text)


def make(pg, tag: str, schema: str = "public") -> str:
    """ihc_<tag>: a table with masked columns holding this tag's values."""
    t = f"{schema}.ihc_{tag}"
    rows = ", ".join(f"({i}, 'n{i}', '{s}', '{c}')" for i, s, c in secrets(tag))
    pg.execute(f"DROP TABLE IF EXISTS {t} CASCADE; CREATE TABLE {t} ({COLS}); "
               f"INSERT INTO {t} VALUES {rows}", dbname=DB)
    return t


def upstream(pg, sql):
    return pg.execute(sql, dbname=DB)


def inherits(pg, child: str) -> list:
    return upstream(pg, f"SELECT inhparent::regclass::text FROM pg_inherits "
                        f"WHERE inhrelid = '{child}'::regclass")


def _repeat(sql: str) -> int:
    return 3 if sql.lstrip().upper().startswith(("SELECT", "TABLE", "DO")) else 1


def session(client: str, proxy, stmts: list[str], user=AGENT, password=AGENT_PASSWORD):
    """Run ``stmts`` on one connection through the proxy: per statement (error as
    (sqlstate, message) or None, its rows), and everything the client received (rows,
    errors, notices, notifications) as one text."""
    dsn = proxy.dsn(user=user, password=password, dbname=DB)
    got: list[str] = []
    results = []
    if client.startswith("psycopg"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.add_notice_handler(lambda d: got.append(
                f"NOTICE {d.message_primary} {d.message_detail} {d.message_hint}"))
            conn.add_notify_handler(lambda n: got.append(f"NOTIFY {n.channel} {n.payload}"))
            for sql in stmts:
                err, out = None, []
                for _ in range(_repeat(sql) if client == "psycopg-prepared" else 1):
                    try:
                        cur = conn.execute(sql, prepare=True if client == "psycopg-prepared"
                                           else None)
                        out = cur.fetchall() if cur.description else []
                    except psycopg.Error as e:
                        err = (e.sqlstate, f"{e} {e.diag.message_detail} {e.diag.message_hint}")
                results.append((err, out))
                got.append(repr((err, out)))
        return results, "\n".join(got)
    if client == "asyncpg":
        async def go():
            conn = await asyncpg.connect(dsn)
            conn.add_log_listener(lambda c, m: got.append(f"NOTICE {m.message} {m.detail}"))
            try:
                for sql in stmts:
                    err, out = None, []
                    for _ in range(_repeat(sql)):
                        try:
                            out = [tuple(r) for r in await conn.fetch(sql)]
                        except asyncpg.PostgresError as e:
                            err = (e.sqlstate, f"{e} {e.detail} {e.hint}")
                    results.append((err, out))
                    got.append(repr((err, out)))
            finally:
                await conn.close()
        asyncio.run(go())
        return results, "\n".join(got)
    c = RawClient.connect(proxy.port, user, password, database=DB)
    try:
        for sql in stmts:
            if client == "raw-simple":
                c.send(query(sql))
            else:
                c.send(parse(sql), bind(), describe("P"), execute(), SYNC)
            msgs = c.until_ready()
            errs = errors(msgs)
            err = (errs[0]["C"], " ".join(errs[0].get(k, "") for k in "MDH")) if errs \
                else None
            results.append((err, [p for t, p in msgs if t == b"D"]))
            got.append(repr(msgs))
    finally:
        c.close()
    return results, "\n".join(got)


def refused(err):
    assert err is not None, "statement was not refused"
    assert err[0] == "42501" and 'rule "masking"' in err[1], err


def masked_rows(tag: str, rows) -> None:
    """Rows of this tag's table read through a parent: there, and masked."""
    text = repr(rows)
    assert leaks(tag, text) == [], text
    assert "****" in text or "\\x2a\\x2a\\x2a\\x2a" in text or "b'****" in text, text


# -- the agent makes the link: refused, nothing happened upstream ------------------------

@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("link", ["inherit", "attach", "inherit-descendant",
                                  "inherit-in-list", "pipelined", "do-block", "function"])
def test_agent_may_not_link_a_masked_table(pg, ih, client, link):
    tag = f"ln_{link.replace('-', '_')}_{client.replace('-', '_')}"
    t = make(pg, tag)
    par = f"par_{tag}"
    upstream(pg, f"DROP TABLE IF EXISTS {par}, cc_{tag} CASCADE")
    child = t
    if link == "attach":
        create = f"CREATE TABLE {par} ({COLS}) PARTITION BY RANGE (id)"
        ddl = f"ALTER TABLE {par} ATTACH PARTITION {t} FOR VALUES FROM (MINVALUE) " \
              "TO (MAXVALUE)"
    else:
        create = f"CREATE TABLE {par} ({COLS})"
        ddl = f"ALTER TABLE {t} INHERIT {par}"
    if link == "inherit-descendant":
        # a child of the masked table carries masked rows too (made by a DBA, through
        # the proxy: every catalog is read again)
        r, _ = session("psycopg", ih, [
            f"CREATE TABLE cc_{tag} () INHERITS ({t})",
            f"INSERT INTO cc_{tag} SELECT id + 10, name, ssn, card_number FROM {t}"],
            user=HUMAN, password=HUMAN_PASSWORD)
        assert all(e is None for e, _ in r), r
        child = f"cc_{tag}"
        ddl = f"ALTER TABLE cc_{tag} INHERIT {par}"
    elif link == "inherit-in-list":
        ddl = f"ALTER TABLE public.{t.split('.')[1]} ADD COLUMN extra int, INHERIT {par}"
    elif link == "do-block":
        ddl = f"DO $$ BEGIN EXECUTE 'ALTER TABLE {t} INHERIT ' || '{par}'; END $$"
    elif link == "function":
        ddl = f"CREATE FUNCTION f_{tag}() RETURNS void LANGUAGE sql AS " \
              f"$$ ALTER TABLE {t} INHERIT {par} $$"
    probe = f"SELECT * FROM {par} ORDER BY id"
    stmts = [create, ddl, probe]
    if link == "pipelined":
        stmts = [create, f"{ddl}; {probe}"] if client == "raw-simple" else \
            [create, f"{ddl}", probe]
    if link == "function":
        upstream(pg, f"DROP FUNCTION IF EXISTS f_{tag}()")
        stmts.insert(2, f"SELECT f_{tag}()")
    results, blob = session(client, ih, stmts)
    assert results[0][0] is None, results[0]
    if link == "function" and results[1][0] is None:
        refused(results[2][0])          # made, but never run
    else:
        refused(results[1][0])
    if link not in ("do-block", "function"):
        assert "INHERIT" in results[1][0][1] or "ATTACH" in results[1][0][1], results[1]
    assert inherits(pg, child) == ([(t.split(".")[1],)] if child != t else []), child
    assert upstream(pg, f"SELECT count(*) FROM ONLY {par}") == [(0,)]
    assert leaks(tag, blob) == [], blob
    if link == "inherit-in-list":
        assert upstream(pg, f"SELECT count(*) FROM pg_attribute WHERE attrelid = "
                            f"'{t}'::regclass AND attname = 'extra'") == [(0,)]


# -- a DBA makes the link: the parent (grandparent, views, row type) is masked ------------

LINKS = {
    "inherit": ["CREATE TABLE {par} ({cols})", "ALTER TABLE {t} INHERIT {par}"],
    "attach": ["CREATE TABLE {par} ({cols}) PARTITION BY RANGE (id)",
               ("ALTER TABLE {par} ATTACH PARTITION {t} FOR VALUES FROM (MINVALUE) "
                "TO (MAXVALUE)")],
    "grandparent": ["CREATE TABLE {par}_g ({cols})", "CREATE TABLE {par} ({cols})",
                    "ALTER TABLE {par} INHERIT {par}_g", "ALTER TABLE {t} INHERIT {par}"],
    "sibling": ["CREATE TABLE {par} ({cols}) PARTITION BY LIST (name)",
                "CREATE TABLE {par}_other PARTITION OF {par} FOR VALUES IN ('zz')",
                "INSERT INTO {par} VALUES (9, 'zz', 'plain-ssn-9', 'plain-card-9')",
                "ALTER TABLE {par} ATTACH PARTITION {t} FOR VALUES IN ('n1', 'n2', 'n3')"],
}


def dba_link(pg, ih, tag, link, via):
    t = make(pg, tag)
    par = f"par_{tag}"
    upstream(pg, f"DROP TABLE IF EXISTS {par}, {par}_g, {par}_other CASCADE")
    stmts = [s.format(t=t, par=par, cols=COLS) for s in LINKS[link]]
    if via == "upstream":
        upstream(pg, "; ".join(stmts))
    else:
        results, _ = session("psycopg", ih, stmts, user=HUMAN, password=HUMAN_PASSWORD)
        assert all(e is None for e, _ in results), results
    assert inherits(pg, t), "the link was made"
    return t, par


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("link", ["inherit", "attach", "grandparent", "sibling"])
@pytest.mark.parametrize("via", ["upstream", "proxy"])
def test_parent_of_a_masked_table_is_masked(pg, ih, client, link, via):
    tag = f"dba_{link}_{via}_{client.replace('-', '_')}"
    _, par = dba_link(pg, ih, tag, link, via)
    top = f"{par}_g" if link == "grandparent" else par
    upstream(pg, f"CREATE VIEW {par}_v AS SELECT id, ssn, card_number FROM {top}")
    # the upstream truth: the parent returns the clear values
    assert leaks(tag, upstream(pg, f"SELECT * FROM {top}"))
    results, blob = session(client, ih, [
        f"SELECT * FROM {top} ORDER BY id",
        f"SELECT id, ssn, card_number FROM {par} WHERE id = 2",
        f"SELECT reverse(ssn), translate(ssn, '0123456789-', 'abcdefghijX') FROM {top}",
        f"SELECT p FROM {top} p ORDER BY id",
        f"SELECT * FROM {par}_v ORDER BY id",
        f"SELECT row_to_json(x) FROM {top} x",
    ])
    assert all(e is None for e, _ in results), results
    assert leaks(tag, blob) == [], blob
    masked_rows(tag, results[0][1])
    assert all(r for _, r in results), results         # rows came back (masked)
    if link == "sibling":
        # the parent's column is masked as a whole: fail closed
        assert "plain-ssn-9" not in repr(results[0][1])
    if client == "psycopg":             # COPY of the parent, by name and by query
        with psycopg.connect(ih.dsn(dbname=DB), autocommit=True) as conn:
            for sql in (f"COPY {top} TO STDOUT", f"COPY (SELECT * FROM {par}) TO STDOUT",
                        f"COPY {top} (id, ssn) TO STDOUT (FORMAT csv)"):
                try:
                    with conn.cursor().copy(sql) as cp:
                        out = b"".join(bytes(b) for b in cp)
                except psycopg.Error as e:
                    out = str(e).encode()
                assert leaks(tag, out.decode()) == [], (sql, out)
    # the exempt DBA reads the parent in clear
    results, blob = session(client, ih, [f"SELECT * FROM {top} ORDER BY id"],
                            user=HUMAN, password=HUMAN_PASSWORD)
    assert leaks(tag, blob), blob


# -- parking from the parent: refused, nothing parked, no notice or notification ---------

PARKING = [
    ("ctas", ("CREATE TABLE loot_{tag} AS SELECT id, translate(ssn, '0123456789-', "
              "'abcdefghijX'), reverse(card_number) FROM {par}")),
    ("insert", "INSERT INTO loot_{tag} SELECT id, reverse(ssn) FROM {par}"),
    ("select-into", "SELECT id, reverse(ssn) AS v INTO loot_{tag} FROM {par}"),
    ("cte", ("WITH x AS (INSERT INTO loot_{tag} SELECT id, reverse(ssn) FROM {par} "
             "RETURNING 1) SELECT count(*) FROM x")),
    ("notice", ("DO $$ BEGIN RAISE NOTICE '%', (SELECT reverse(ssn) FROM {par} "
                "WHERE id = 2); END $$")),
    ("notify", "SELECT pg_notify('ch_{tag}', (SELECT reverse(ssn) FROM {par} WHERE id = 2))"),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind,stmt", PARKING)
@pytest.mark.parametrize("link", ["inherit", "attach"])
def test_no_parking_from_a_masked_parent(pg, ih, client, kind, stmt, link):
    tag = f"pk_{kind.replace('-', '_')}_{link}_{client.replace('-', '_')}"
    # made through the proxy by a DBA: every catalog is read again
    _, par = dba_link(pg, ih, tag, link, "proxy")
    upstream(pg, f"DROP TABLE IF EXISTS loot_{tag}")
    if kind in ("insert", "cte"):
        upstream(pg, f"CREATE TABLE loot_{tag} (id int, v text)")
    listener = psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB), autocommit=True)
    try:
        listener.execute(f"LISTEN ch_{tag}")
        results, blob = session(client, ih, [stmt.format(tag=tag, par=par),
                                             f"SELECT * FROM loot_{tag}"
                                             if kind not in ("notice", "notify")
                                             else "SELECT 1"])
        heard = [n.payload for n in listener.notifies(timeout=0.5)]
    finally:
        listener.close()
    refused(results[0][0])
    assert leaks(tag, blob) == [], blob
    assert heard == [], heard
    assert upstream(pg, f"SELECT count(*) FROM pg_class WHERE relname = 'loot_{tag}'") == \
        [(1 if kind in ("insert", "cte") else 0,)]
    if kind in ("insert", "cte"):
        assert upstream(pg, f"SELECT count(*) FROM loot_{tag}") == [(0,)]


# -- the agent may not take a masked table out of a link, nor rename or move it ---------

@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("undo", ["no-inherit", "detach"])
def test_agent_may_not_unlink_a_masked_table(pg, ih, client, undo):
    tag = f"un_{undo.replace('-', '_')}_{client.replace('-', '_')}"
    t, par = dba_link(pg, ih, tag, "inherit" if undo == "no-inherit" else "attach",
                      "upstream")
    ddl = f"ALTER TABLE {t} NO INHERIT {par}" if undo == "no-inherit" else \
        f"ALTER TABLE {par} DETACH PARTITION {t}"
    results, blob = session(client, ih, [ddl, f"SELECT * FROM {par}"])
    refused(results[0][0])
    assert inherits(pg, t) == [(par,)]
    assert leaks(tag, blob) == [], blob


MOVES = [
    ("column", "ALTER TABLE {t} RENAME COLUMN ssn TO x", "attname = 'ssn'"),
    ("card", "ALTER TABLE IF EXISTS ONLY {t} RENAME card_number TO c", "attname = 'card_number'"),
    ("table", "ALTER TABLE {t} RENAME TO zz_{tag}", None),
    ("set-schema", "ALTER TABLE {t} SET SCHEMA ih_other", None),
    ("qualified", "ALTER TABLE public.ihc_{tag} RENAME TO zz_{tag}", None),
    ("index", "ALTER INDEX {t} RENAME TO zz_{tag}", None),     # renames a table too
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind,ddl,still", MOVES)
def test_agent_may_not_rename_masked_tables_or_columns(pg, ih, client, kind, ddl, still):
    tag = f"mv_{kind.replace('-', '_')}_{client.replace('-', '_')}"
    t = make(pg, tag)
    upstream(pg, "CREATE SCHEMA IF NOT EXISTS ih_other")
    results, blob = session(client, ih, [ddl.format(t=t, tag=tag),
                                         f"SELECT * FROM {t} ORDER BY id"])
    refused(results[0][0])
    assert "RENAME" in results[0][0][1] or "SET SCHEMA" in results[0][0][1], results[0]
    assert upstream(pg, f"SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                        f"ON n.oid = c.relnamespace WHERE c.oid = '{t}'::regclass") == \
        [("public", f"ihc_{tag}")]
    if still:
        assert upstream(pg, f"SELECT count(*) FROM pg_attribute WHERE attrelid = "
                            f"'{t}'::regclass AND {still}") == [(1,)]
    assert leaks(tag, blob) == [], blob
    masked_rows(tag, results[1][1])


@pytest.mark.parametrize("client", CLIENTS)
def test_agent_may_not_rename_a_schema_with_masked_tables(pg, ih, client):
    tag = f"sc_{client.replace('-', '_')}"
    schema = f"ihs_{tag}"
    upstream(pg, f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")
    make(pg, tag, schema)
    results, blob = session(client, ih, [f"ALTER SCHEMA {schema} RENAME TO ihz_{tag}",
                                         f"SELECT ssn FROM {schema}.ihc_{tag}"])
    refused(results[0][0])
    assert upstream(pg, f"SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'") \
        == [(1,)]
    assert leaks(tag, blob) == [], blob


# -- what is not masked keeps working ------------------------------------------------------

@pytest.mark.parametrize("client", CLIENTS)
def test_plain_inheritance_and_renames_keep_working(pg, ih, client):
    tag = f"pl_{client.replace('-', '_')}"
    t = make(pg, tag)
    upstream(pg, f"DROP TABLE IF EXISTS plainp_{tag}, plainc_{tag}, plaint_{tag}, "
                 f"plainq_{tag}, plainr_{tag} CASCADE")
    results, blob = session(client, ih, [
        f"CREATE TABLE plainp_{tag} (id int, v text)",
        f"CREATE TABLE plainc_{tag} (id int, v text)",
        f"INSERT INTO plainc_{tag} VALUES (1, 'clear-{tag}')",
        f"ALTER TABLE plainc_{tag} INHERIT plainp_{tag}",
        f"SELECT v FROM plainp_{tag}",
        f"CREATE TABLE plaint_{tag} AS SELECT * FROM plainp_{tag}",
        f"ALTER TABLE plainc_{tag} NO INHERIT plainp_{tag}",
        f"CREATE TABLE plainq_{tag} (id int) PARTITION BY RANGE (id)",
        f"CREATE TABLE plainr_{tag} (id int)",
        f"ALTER TABLE plainq_{tag} ATTACH PARTITION plainr_{tag} FOR VALUES FROM (0) TO (9)",
        f"ALTER TABLE plaint_{tag} RENAME TO plainz_{tag}",
        f"ALTER TABLE {t} RENAME COLUMN name TO nm",        # not a masked column
        f"SELECT id, nm FROM {t} ORDER BY id",
        f"CREATE TABLE cc_{tag} () INHERITS ({t})",          # a child: masked too
    ])
    assert all(e is None for e, _ in results), results
    assert f"clear-{tag}" in repr(results[4][1])
    assert upstream(pg, f"SELECT v FROM plainz_{tag}") == [(f"clear-{tag}",)]
    assert leaks(tag, blob) == [], blob
    upstream(pg, f"DROP TABLE IF EXISTS plainz_{tag}, plainp_{tag}, plainc_{tag}, "
                 f"plainq_{tag} CASCADE")


@pytest.mark.parametrize("kind,stmt", PARKING)
def test_open_session_judges_parking_on_the_catalog_of_now(pg, ih, kind, stmt):
    # the agent's session is open (its catalog read) when a DBA links the tables through
    # the proxy: its next statement is judged on the catalog read again, not its own
    tag = f"open_{kind.replace('-', '_')}"
    t = make(pg, tag)
    par = f"par_{tag}"
    upstream(pg, f"DROP TABLE IF EXISTS {par}, loot_{tag} CASCADE; CREATE TABLE {par} ({COLS})")
    if kind in ("insert", "cte"):
        upstream(pg, f"CREATE TABLE loot_{tag} (id int, v text)")
    got: list[str] = []
    with psycopg.connect(ih.dsn(dbname=DB), autocommit=True) as agent:
        agent.add_notice_handler(lambda d: got.append(f"{d.message_primary}"))
        assert agent.execute(f"SELECT count(*) FROM {t}").fetchone() == (3,)
        assert agent.execute(f"SELECT count(*) FROM {par}").fetchone() == (0,)
        results, _ = session("psycopg", ih, [f"ALTER TABLE {t} INHERIT {par}"],
                             user=HUMAN, password=HUMAN_PASSWORD)
        assert results[0][0] is None, results
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            agent.execute(stmt.format(tag=tag, par=par))
        assert 'rule "masking"' in str(e.value), e.value
        got.append(repr(agent.execute(f"SELECT * FROM {par} ORDER BY id").fetchall()))
    assert leaks(tag, "\n".join(got)) == [], got
    assert upstream(pg, f"SELECT count(*) FROM pg_class WHERE relname = 'loot_{tag}'") == \
        [(1 if kind in ("insert", "cte") else 0,)]
    if kind in ("insert", "cte"):
        assert upstream(pg, f"SELECT count(*) FROM loot_{tag}") == [(0,)]
