# The masking corpus shared by test_masking_objects.py and test_masking_lineage.py: seed
# data with values unique enough to search for, the masks, statement shapes by class
# (which result columns carry masked data, which must come back byte-identical), the
# leak finder over everything a client received, and one runner per client mode.
from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

import asyncpg
import psycopg
import rawpg
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER, run_psql

DB = "appdb"

CUSTOMERS = [
    (1, "Ann", "zephyr.quill81@example.com", "732-19-4856", "+1-555-019-8234", 17),
    (2, "Bob", "marlowe.vex42@example.org", "618-27-3940", "+1-555-013-7702", 23),
    (3, "Cyd", "tindal.orb09@example.net", "504-83-1276", "+1-555-017-6611", 31),
]

SEED = """
DROP VIEW IF EXISTS cust_v, cust_rows, cust_nums CASCADE;
DROP TABLE IF EXISTS wrap, orders, customers CASCADE;
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, ssn text, phone text,
                        score int);
INSERT INTO customers VALUES
  (1, 'Ann', 'zephyr.quill81@example.com', '732-19-4856', '+1-555-019-8234', 17),
  (2, 'Bob', 'marlowe.vex42@example.org', '618-27-3940', '+1-555-013-7702', 23),
  (3, 'Cyd', 'tindal.orb09@example.net', '504-83-1276', '+1-555-017-6611', 31);
CREATE TABLE orders (id int PRIMARY KEY, cust_id int, total numeric(10,2), note text);
INSERT INTO orders VALUES (10, 1, 99.50, 'first order'), (11, 2, 12.25, 'second'),
                          (12, 3, 7.00, 'third one');
CREATE VIEW cust_v AS SELECT id, email, ssn, get_byte(ssn::bytea, 0) AS b FROM customers;
CREATE VIEW cust_rows AS SELECT id, c AS r FROM customers c;
CREATE VIEW cust_nums AS SELECT id, length(ssn) * 1000 + ascii(ssn) AS n, name FROM customers;
CREATE TABLE wrap (id int, c customers, cs customers[]);
INSERT INTO wrap SELECT c.id, c, ARRAY[c] FROM customers c;
"""

MASKS = """
[[masks]]
column = "public.customers.email"
strategy = "email"
except_groups = ["dba"]

[[masks]]
column = "public.customers.ssn"
strategy = "redact"
except_groups = ["dba"]

[[masks]]
column = "public.customers.phone"
strategy = "partial"
keep = 4
except_groups = ["dba"]
"""


def _forms(v: str) -> set[str]:
    b = v.encode()
    out = {v, v[::-1], b.hex(), base64.b64encode(b).decode(), base64.b64encode(b).decode()
           .rstrip("=")}
    digits = "".join(ch for ch in v if ch.isdigit())
    if len(digits) >= 6:
        out |= {digits, digits[::-1], digits.encode().hex()}
    if "@" in v:
        local = v.split("@")[0]
        out |= {local, local[::-1], local.encode().hex()}
    return out


SECRETS = [v for row in CUSTOMERS for v in row[2:5]]
FORMS = sorted({f.lower() for v in SECRETS for f in _forms(v)})


def flatten(obj) -> str:
    """Everything a client got, as one searchable text (bytes also as hex)."""
    parts: list[str] = []

    def walk(x):
        if x is None:
            return
        if isinstance(x, (bytes, bytearray, memoryview)):
            b = bytes(x)
            parts.append(b.decode("latin-1"))
            parts.append(b.hex())
        elif isinstance(x, str):
            parts.append(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple, set, frozenset)) or hasattr(x, "items") and \
                hasattr(x, "values") and not isinstance(x, type):
            for v in (x.values() if hasattr(x, "values") and not isinstance(
                    x, (list, tuple, set, frozenset)) else x):
                walk(v)
        else:
            parts.append(str(x))
            if hasattr(x, "__dict__"):
                walk(vars(x))
    walk(obj)
    return "\n".join(parts)


def leaks(obj) -> list[str]:
    """Every clear form (value, reversed, hex, base64, digits only, any case) of a
    seeded masked value found in obj."""
    blob = flatten(obj).lower()
    return [f for f in FORMS if f in blob]


@dataclass(frozen=True)
class Shape:
    cls: str
    sql: str
    secret: tuple[int, ...] = ()      # columns carrying masked data: never their value
    clean: tuple[int, ...] = ()       # columns that must equal a direct connection's

    @property
    def id(self) -> str:
        return f"{self.cls}:{self.sql[:60]}"


S = Shape
SHAPES = [
    # values derived from masked columns
    S("derived", "SELECT id, replace(ssn, '-', '') FROM customers ORDER BY id", (1,), (0,)),
    S("derived", "SELECT lower(email), upper(email) FROM customers ORDER BY id", (0, 1)),
    S("derived", "SELECT email || '', ssn || '' FROM customers ORDER BY id", (0, 1)),
    S("derived", "SELECT substr(ssn, 1, 3), substr(ssn, 4), left(email, 8) FROM customers "
                 "ORDER BY id", (0, 1, 2)),
    S("derived", "SELECT concat_ws(',', id, email), name FROM customers ORDER BY id", (0,),
      (1,)),
    S("derived", "SELECT format('%s/%s', email, ssn) FROM customers ORDER BY id", (0,)),
    S("derived", "SELECT reverse(ssn), reverse(email) FROM customers ORDER BY id", (0, 1)),
    S("derived", "SELECT translate(ssn, '0123456789', 'abcdefghij') FROM customers "
                 "ORDER BY id", (0,)),
    S("derived", "SELECT CASE WHEN id > 0 THEN phone END, coalesce(ssn, 'x') FROM customers "
                 "ORDER BY id", (0, 1)),
    # casts
    S("cast", "SELECT email::bytea FROM customers ORDER BY id", (0,)),
    S("cast", "SELECT ssn::varchar(20), email::char(40) FROM customers ORDER BY id", (0, 1)),
    S("cast", "SELECT to_json(email), to_jsonb(ssn), to_json(phone)::text FROM customers "
              "ORDER BY id", (0, 1, 2)),
    S("cast", "SELECT ssn::bytea::text, phone::name FROM customers ORDER BY id", (0, 1)),
    # arrays
    S("array", "SELECT ARRAY[email, ssn] FROM customers ORDER BY id", (0,)),
    S("array", "SELECT array_agg(email ORDER BY id), count(*) FROM customers", (0,), (1,)),
    S("array", "SELECT string_to_array(ssn, '-') FROM customers ORDER BY id", (0,)),
    S("array", "SELECT (ARRAY[email])[1], id FROM customers ORDER BY id", (0,), (1,)),
    # encode / convert / hashes
    S("encode", "SELECT encode(convert_to(ssn, 'UTF8'), 'base64') FROM customers "
                "ORDER BY id", (0,)),
    S("encode", "SELECT encode(email::bytea, 'hex') FROM customers ORDER BY id", (0,)),
    S("encode", "SELECT md5(ssn), sha256(ssn::bytea) FROM customers ORDER BY id", (0, 1)),
    S("encode", "SELECT convert_to(phone, 'LATIN1') FROM customers ORDER BY id", (0,)),
    # numbers carry values
    S("numeric", "SELECT get_byte(ssn::bytea, 0), get_byte(ssn::bytea, 1) FROM customers "
                 "ORDER BY id", (0, 1)),
    S("numeric", "SELECT (SELECT string_agg(lpad(get_byte(convert_to(c.ssn, 'UTF8'), i)"
                 "::text, 3, '0'), '' ORDER BY i) FROM generate_series(0, length(c.ssn) - 1)"
                 " i)::numeric FROM customers c ORDER BY id", (0,)),
    S("numeric", "SELECT ascii(substr(ssn, 2, 1)), length(email) FROM customers ORDER BY id",
      (0, 1)),
    S("numeric", "SELECT ('x' || encode(convert_to(left(ssn, 3), 'UTF8'), 'hex'))::bit(24)"
                 "::int FROM customers ORDER BY id", (0,)),
    S("numeric", "SELECT sum(get_byte(ssn::bytea, 0)) FROM customers", (0,)),
    S("numeric", "SELECT regexp_replace(ssn, '\\D', '', 'g')::bigint, id FROM customers "
                 "ORDER BY id", (0,), (1,)),
    S("numeric", "SELECT ssn > '6', id FROM customers ORDER BY id", (0,), (1,)),
    # CTEs
    S("cte", "WITH x AS (SELECT id, email FROM customers) SELECT id, upper(email) FROM x "
             "ORDER BY id", (1,), (0,)),
    S("cte", "WITH x AS MATERIALIZED (SELECT ssn AS s, id FROM customers) SELECT s || '!' "
             "FROM x ORDER BY id", (0,)),
    S("cte", "WITH RECURSIVE r(n, v) AS (SELECT 1, ssn FROM customers WHERE id = 1 "
             "UNION ALL SELECT n + 1, v || '' FROM r WHERE n < 2) SELECT n, v FROM r", (1,)),
    # subqueries
    S("subquery", "SELECT (SELECT email FROM customers WHERE id = 1)", (0,)),
    S("subquery", "SELECT s.e FROM (SELECT lower(email) AS e, id FROM customers) s "
                  "ORDER BY s.id", (0,)),
    S("subquery", "SELECT id, (SELECT max(c2.ssn) FROM customers c2 WHERE c2.id = c.id) "
                  "FROM customers c ORDER BY id", (1,), (0,)),
    S("subquery", "SELECT q.* FROM (SELECT email || '' AS e, ssn || '' AS s FROM customers "
                  "OFFSET 0) q", (0, 1)),
    # views
    S("view", "SELECT id, email, ssn, b FROM cust_v ORDER BY id", (1, 2, 3), (0,)),
    S("view", "SELECT b, upper(ssn) FROM cust_v ORDER BY id", (0, 1)),
    S("view", "SELECT id, r FROM cust_rows ORDER BY id", (1,), (0,)),
    S("view", "SELECT n, name FROM cust_nums ORDER BY id", (0,), (1,)),
    # whole rows and composites
    S("wholerow", "SELECT c FROM customers c ORDER BY id", (0,)),
    S("wholerow", "SELECT customers FROM customers ORDER BY id", (0,)),
    S("wholerow", "SELECT row_to_json(c) FROM customers c ORDER BY id", (0,)),
    S("wholerow", "SELECT (s.c).* FROM (SELECT c FROM customers c) s ORDER BY 1", (2, 3, 4)),
    S("wholerow", "SELECT ROW(email, ssn), id FROM customers ORDER BY id", (0,), (1,)),
    S("wholerow", "SELECT c, ARRAY[c] FROM customers c ORDER BY id", (0, 1)),
    S("composite", "SELECT id, w.c, w.cs FROM wrap w ORDER BY id", (1, 2), (0,)),
    S("composite", "SELECT to_jsonb(c), jsonb_build_object('e', email) FROM customers c "
                   "ORDER BY id", (0, 1)),
    S("composite", "SELECT (w.c).ssn, (w.cs[1]).email FROM wrap w ORDER BY id", (0, 1)),
    # set operations
    S("union", "SELECT email FROM customers UNION SELECT 'x' ORDER BY 1", (0,)),
    S("union", "SELECT id::text FROM customers UNION ALL SELECT ssn FROM customers", (0,)),
    S("union", "SELECT name FROM customers INTERSECT SELECT name FROM customers "
               "UNION ALL SELECT phone FROM customers", (0,)),
    # window functions
    S("window", "SELECT id, first_value(ssn) OVER (ORDER BY id) FROM customers ORDER BY id",
      (1,), (0,)),
    S("window", "SELECT lag(email) OVER (ORDER BY id), count(*) OVER () FROM customers "
                "ORDER BY id", (0,), (1,)),
    # lateral joins
    S("lateral", "SELECT j.key, j.value FROM customers c, LATERAL jsonb_each_text(to_jsonb(c))"
                 " j ORDER BY c.id, j.key", (0, 1)),
    S("lateral", "SELECT x.v FROM customers c CROSS JOIN LATERAL (SELECT c.ssn || '' AS v) x "
                 "ORDER BY c.id", (0,)),
    S("lateral", "SELECT u FROM customers c, LATERAL unnest(ARRAY[c.email, c.ssn]) u "
                 "ORDER BY 1", (0,)),
]

# legitimate statements: every column must come back exactly as from Postgres itself
CLEAN = [
    S("clean", "SELECT id, name, score FROM customers ORDER BY id", (), (0, 1, 2)),
    S("clean", "SELECT count(*), count(name), count(DISTINCT score) FROM customers", (),
      (0, 1, 2)),
    S("count", "SELECT count(*), count(email), count(DISTINCT ssn) FROM customers", (1, 2),
      (0,)),
    S("clean", "SELECT id, name FROM customers WHERE ssn LIKE '7%' ORDER BY id", (), (0, 1)),
    S("clean", "SELECT c.id, upper(c.name), c.score * 2 FROM customers c ORDER BY id", (),
      (0, 1, 2)),
    S("clean", "WITH x AS (SELECT id, name, email FROM customers) SELECT id, name FROM x "
               "ORDER BY id", (), (0, 1)),
    S("clean", "SELECT o.id, o.total, o.note, c.name FROM orders o JOIN customers c "
               "ON c.id = o.cust_id ORDER BY o.id", (), (0, 1, 2, 3)),
    S("clean", "SELECT 1 + 1, 'hello', now() IS NOT NULL", (), (0, 1, 2)),
    S("clean", "SELECT id, name, email FROM customers WHERE id = 1", (2,), (0, 1)),
]


# -- client modes: each returns (rows as lists of cells, everything received) ------------

def _cells(rows) -> list[list]:
    return [list(r) for r in rows]


def psql_mode(proxy, sql, psql_bin):
    r = run_psql(psql_bin, proxy.dsn(dbname=DB), "-A", "-t", "-c", sql)
    assert r.returncode == 0, r.stderr
    return None, r.stdout + r.stderr


def psycopg_mode(proxy, sql, binary=False, prepare=None, times=1):
    got, blob = [], []
    with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as conn:
        for _ in range(times):
            cur = conn.cursor(binary=binary)
            cur.execute(sql, prepare=prepare)
            rows = _cells(cur.fetchall())
            got.append(rows)
            blob.append(rows)
    return got, blob


def psycopg_pipeline(proxy, sql):
    """psycopg's pipeline mode: the statement three times (prepared from the second on)
    with another statement between, all answered after one Sync."""
    with psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as conn:
        with conn.pipeline():
            curs = []
            for i in range(3):
                curs.append(conn.cursor())
                curs[-1].execute(sql, prepare=i > 0)
                conn.cursor().execute("SELECT 42")
        got = [_cells(c.fetchall()) for c in curs]
    return got, got


def psycopg_named(proxy, sql):
    with psycopg.connect(proxy.dsn(dbname=DB)) as conn:
        with conn.cursor(name="pgg_named") as cur:
            cur.itersize = 2
            cur.execute(sql)
            rows = _cells(list(cur))
        conn.rollback()
    return [rows], rows


def asyncpg_mode(proxy, sql, cursor=False, times=3):
    async def go():
        conn = await asyncpg.connect(proxy.dsn(dbname=DB))
        try:
            out = []
            if cursor:
                async with conn.transaction():
                    out.append([list(r.values()) async for r in conn.cursor(sql, prefetch=2)])
                return out
            for _ in range(times):
                out.append([list(r.values()) for r in await conn.fetch(sql)])
            return out
        finally:
            await conn.close()
    got = asyncio.run(go())
    return got, got


def raw_connect(proxy_or_port, user=AGENT, password=AGENT_PASSWORD):
    port = proxy_or_port if isinstance(proxy_or_port, int) else proxy_or_port.port
    return rawpg.RawClient.connect(port, user, password, database=DB)


def copy_mode(proxy, sql: str, extended: bool):
    """COPY (sql) TO STDOUT, as a Query or as Parse/Bind/Execute/Sync; every message."""
    c = raw_connect(proxy)
    try:
        stmt = f"COPY ({sql}) TO STDOUT"
        if extended:
            c.send(rawpg.parse(stmt), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
        else:
            c.send(rawpg.query(stmt))
        msgs = c.until_ready()
        return None, msgs
    finally:
        c.close()


def raw_later(port, sql, user=AGENT, password=AGENT_PASSWORD):
    """Parse with its own Sync; Bind/Execute later, three times, each after a Sync."""
    c = raw_connect(port, user, password)
    try:
        msgs = []
        c.send(rawpg.parse(sql, name="s1"), rawpg.SYNC)
        msgs += c.until_ready()
        got = []
        for _ in range(3):
            c.send(rawpg.bind("s1"), rawpg.execute(), rawpg.SYNC)
            m = c.until_ready()
            assert not rawpg.errors(m), rawpg.errors(m)
            got.append(rawpg.rows(m))
            msgs += m
        return got, msgs
    finally:
        c.close()


def raw_pipeline(port, sql, user=AGENT, password=AGENT_PASSWORD):
    """One pipeline: two named portals of one statement interleaved (partial fetches),
    an unrelated statement between, then the statement again in a later pipeline, and
    after Close and a re-Parse of the same name."""
    c = raw_connect(port, user, password)
    try:
        c.send(rawpg.parse(sql, name="s2"),
               rawpg.bind("s2", portal="pa"), rawpg.bind("s2", portal="pb"),
               rawpg.execute("pa", 1), rawpg.execute("pb"),
               rawpg.parse("SELECT 42"), rawpg.bind(), rawpg.execute(),
               rawpg.execute("pa"), rawpg.SYNC,
               rawpg.bind("s2"), rawpg.execute(), rawpg.SYNC,
               rawpg.close("S", "s2"), rawpg.parse(sql, name="s2"), rawpg.SYNC,
               rawpg.bind("s2"), rawpg.execute(), rawpg.SYNC)
        msgs = c.until_ready(4)
        assert not rawpg.errors(msgs), rawpg.errors(msgs)
        rs = rawpg.rows(msgs)
        # pa's first row, pb all, 42, pa's rest, then two whole results
        n = (len(rs) - 1) // 4
        pa = [rs[0]] + rs[n + 2:2 * n + 1]
        pb = rs[1:n + 1]
        assert rs[n + 1] == [b"42"]
        return [pa, pb, rs[2 * n + 1:3 * n + 1], rs[3 * n + 1:]], msgs
    finally:
        c.close()


MODES = ["psql", "psycopg-text", "psycopg-binary", "psycopg-prepared", "psycopg-named",
         "psycopg-pipeline",
         "asyncpg-fetch", "asyncpg-cursor", "raw-later", "raw-pipeline"]


# what run_mode gives for a statement masking refused (since round 16 a statement whose
# rows masked values count or choose is refused: no row reaches the client, the safest
# answer; check() accepts it for every shape but a clean one)
REFUSED = "refused by masking"


def _masking_refusal(mode: str, e: BaseException) -> bool:
    text = str(e)
    # (raw-later prepares first, and finds its statement refused when it binds it)
    return 'rule "masking"' in text or (mode == "raw-later" and "'26000'" in text)


def run_mode(mode, proxy, sql, psql_bin=None):
    """(list of result sets, or None for psql; everything the client received);
    (REFUSED, the refusal) when masking refused the statement."""
    try:
        return _run_mode(mode, proxy, sql, psql_bin)
    except (psycopg.Error, asyncpg.PostgresError, AssertionError) as e:
        if _masking_refusal(mode, e):
            return REFUSED, str(e)
        raise


def _run_mode(mode, proxy, sql, psql_bin=None):
    if mode == "psql":
        return psql_mode(proxy, sql, psql_bin)
    if mode == "psycopg-text":
        return psycopg_mode(proxy, sql)
    if mode == "psycopg-binary":
        return psycopg_mode(proxy, sql, binary=True)
    if mode == "psycopg-prepared":
        return psycopg_mode(proxy, sql, prepare=True, times=3)
    if mode == "psycopg-named":
        return psycopg_named(proxy, sql)
    if mode == "psycopg-pipeline":
        return psycopg_pipeline(proxy, sql)
    if mode == "asyncpg-fetch":
        return asyncpg_mode(proxy, sql)
    if mode == "asyncpg-cursor":
        return asyncpg_mode(proxy, sql, cursor=True)
    if mode == "raw-later":
        return raw_later(proxy.port, sql)
    if mode == "raw-pipeline":
        return raw_pipeline(proxy.port, sql)
    raise ValueError(mode)


def cell_texts(got, blob) -> set[str]:
    """Every cell value a client mode returned (run_mode's first result), as text; psql
    (no result sets): the cells of its unaligned output."""
    if got is None:
        return {c for line in str(blob).splitlines() for c in line.split("|")}
    out: set[str] = set()

    def walk(v):
        if isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif v is not None:
            out.add(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    walk(got)
    return out


def direct_mode(pg, mode, sql):
    """The same statement straight to Postgres, decoded the way ``mode`` decodes."""
    dsn = pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB)
    if mode in ("psycopg-text", "psycopg-prepared", "psycopg-named", "psycopg-pipeline"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            return _cells(conn.execute(sql).fetchall())
    if mode == "psycopg-binary":
        with psycopg.connect(dsn, autocommit=True) as conn:
            return _cells(conn.cursor(binary=True).execute(sql).fetchall())
    if mode.startswith("asyncpg"):
        async def go():
            conn = await asyncpg.connect(dsn)
            try:
                return [list(r.values()) for r in await conn.fetch(sql)]
            finally:
                await conn.close()
        return asyncio.run(go())
    if mode.startswith("raw"):
        c = rawpg.RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
        try:
            c.send(rawpg.parse(sql), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
            return rawpg.rows(c.until_ready())
        finally:
            c.close()
    return None


def text_of(v) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("latin-1")
    return str(v)


def check(shape: Shape, got, blob, direct) -> None:
    """No seeded value in any form anywhere; masked columns never equal their clear
    value (nor does that value appear anywhere, when long enough to search for);
    clean columns equal a direct connection's."""
    found = leaks(blob)
    assert found == [], (shape.sql, found)
    if got is REFUSED:
        assert shape.cls != "clean", (shape.sql, blob)
        return
    if direct is None:
        text = flatten(blob)
        for row in _direct_text(shape):
            for i in shape.secret:
                if row[i] is not None and len(row[i]) >= 6:
                    assert row[i] not in text, (shape.sql, i, row[i])
        return
    for rows in got:
        assert len(rows) == len(direct), (shape.sql, rows, direct)
        for r, d in zip(rows, direct):
            for i in shape.secret:
                if d[i] is not None:
                    assert r[i] != d[i], (shape.sql, i, r[i])
                    if len(text_of(d[i])) >= 6:
                        assert text_of(d[i]) not in flatten(blob), (shape.sql, i)
            for i in shape.clean:
                assert r[i] == d[i], (shape.sql, i, r[i], d[i])


_TEXT_CACHE: dict[str, list] = {}
_PG = []


def _direct_text(shape: Shape) -> list:
    if shape.sql not in _TEXT_CACHE:
        pg = _PG[0]
        c = rawpg.RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
        try:
            c.send(rawpg.query(shape.sql))
            _TEXT_CACHE[shape.sql] = [[None if v is None else v.decode() for v in r]
                                      for r in rawpg.rows(c.until_ready())]
        finally:
            c.close()
    return _TEXT_CACHE[shape.sql]


def seed(pg) -> None:
    pg.execute(SEED, dbname=DB)
    _PG[:] = [pg]


def plan_lineage(pg, sql: str, masked: dict[str, tuple[str, ...]], with_sql: bool = True):
    """columns_tainted over what the upstream says about ``sql``, as the proxy asks it:
    the statement described and its generic plan EXPLAINed directly upstream; ``masked``:
    relation (as ``::regclass`` reads it) -> masked column names."""
    import struct

    from pgguard.masking.lineage import columns_tainted
    from pgguard.masking.wire import parse_row_description
    c = rawpg.RawClient.connect(pg.port, UPSTREAM_USER,
                                UPSTREAM_PASSWORD, database=DB)
    try:
        c.send(rawpg.parse(sql, name="x"), rawpg.describe("S", "x"), rawpg.SYNC)
        msgs = c.until_ready()
        assert not rawpg.errors(msgs), rawpg.errors(msgs)
        desc = next(p for t, p in msgs if t == b"T")
        fields = parse_row_description(b"T" + struct.pack("!I", len(desc) + 4) + desc)
    finally:
        c.close()
    with psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB), autocommit=True) as up:
        up.execute("SET plan_cache_mode = force_generic_plan")
        up.execute(f"PREPARE x AS {sql}")
        plan = up.execute("EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE x").fetchone()[0]
        cols = []
        for rel, names in masked.items():
            cols += up.execute(
                "SELECT n.nspname, c.relname, a.attname, c.oid::int, a.attnum "
                "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE a.attrelid = %s::regclass AND a.attname = ANY(%s)",
                [rel, list(names)]).fetchall()
        base = {r[0] for r in up.execute(
            "SELECT oid::int FROM pg_class WHERE relkind IN ('r', 'p', 'f')").fetchall()}
        opaque = frozenset(r[0] for r in up.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
            "UNION SELECT oprname FROM pg_operator "
            "WHERE oprnamespace = 'public'::regnamespace").fetchall())
    rel: dict = {}
    for nsp, name, att, _, _ in cols:
        rel.setdefault((nsp, name), set()).add(att)
    return columns_tainted(plan, fields, base, {k: frozenset(v) for k, v in rel.items()},
                           {(o, a) for *_, o, a in cols}, opaque, sql if with_sql else None)
