# Red team, round 24: a Query a human approved was forwarded without the masking model
# knowing it, so its answer took the plan of the statement sent behind it. Approved
# `INSERT INTO orders ...; SELECT replace(ssn, '-', '') FROM customers` followed, in the
# same write, by `SELECT name FROM customers WHERE id = 1` gave the agent every SSN in
# clear (the plain SELECT's plan); an approved INSERT's own RETURNING came back NULL and
# `****`. An approved Query now takes an allowed statement's way through masking (its
# lineage learnt, its answers paired with its own plan). Judged by every byte the client
# got and by the rows upstream.
import subprocess

import pytest
import rawpg
from conftest import UPSTREAM_USER
from masking_tap import DB, NAMES, SSNS, connect, leaks
from test_approvals_prepared import Approver
from test_masking_channels import masked_proxy, upstream

RULE = """
[[rules]]
name = "orders-need-approval"
when = { kind = "agent", statements = ["insert", "update"], relations = ["public.orders"] }
action = "approve"
timeout = "30s"
"""

INSERT = "INSERT INTO orders (customer_id, status) VALUES (1, 'new')"


@pytest.fixture
def aproxy(pg, make_proxy):
    p = masked_proxy(pg, make_proxy, RULE)
    pg.execute("DROP TABLE IF EXISTS orders; CREATE TABLE orders (id serial PRIMARY KEY, "
               "customer_id int, status text)", dbname=DB)
    pg.execute(f"ALTER TABLE orders OWNER TO {UPSTREAM_USER}", dbname=DB)
    ap = Approver(p)
    ap.start()
    yield p
    ap.stop = True
    ap.join(5)


def _rows(msgs):
    """The text cells of every DataRow, in order."""
    out = []
    for t, p in msgs:
        if t == b"D":
            (n,) = rawpg.struct.unpack_from("!h", p)
            pos, row = 2, []
            for _ in range(n):
                (ln,) = rawpg.struct.unpack_from("!i", p, pos)
                pos += 4
                row.append(None if ln < 0 else p[pos:pos + ln].decode())
                pos += max(ln, 0)
            out.append(tuple(row))
    return out


# (held Query, what is sent behind it in the same write, the rows of what is behind it)
PIPELINES = {
    "derived-then-plain-column": (
        f"{INSERT}; SELECT replace(ssn, '-', '') FROM customers ORDER BY id",
        ["SELECT name FROM customers WHERE id = 1"], [(NAMES[0],)]),
    "derived-then-literal": (
        f"{INSERT}; SELECT split_part(email, '@', 1) FROM customers ORDER BY id",
        ["SELECT 'a'::text AS x"], [("a",)]),
    "reversed-then-two": (
        f"{INSERT}; SELECT reverse(ssn) AS x FROM customers ORDER BY id",
        ["SELECT city FROM customers WHERE id = 2", "SELECT 7"], [("New York",), ("7",)]),
    "update-returning-then-plain": (
        "UPDATE orders SET status = 'seen' RETURNING status; "
        "SELECT upper(email) FROM customers ORDER BY id",
        ["SELECT name FROM customers WHERE id = 3"], [(NAMES[2],)]),
    "returning-then-derived-then-plain": (
        f"{INSERT} RETURNING id, status",
        ["SELECT replace(ssn, '-', '') FROM customers ORDER BY id",
         "SELECT name FROM customers WHERE id = 1"], [(NAMES[0],)]),
}


@pytest.mark.parametrize("case", list(PIPELINES))
def test_an_approved_query_keeps_its_own_masking_in_a_pipeline(pg, aproxy, case):
    held, behind, want = PIPELINES[case]
    pg.execute("INSERT INTO orders (customer_id, status) VALUES (2, 'old')", dbname=DB)
    c = connect(aproxy.port)
    try:
        for q in behind:            # their analysis known (an attacker runs them first)
            c.run(q)
        c.send(rawpg.query(held), *(rawpg.query(q) for q in behind))
        msgs = c.until_ready(1 + len(behind))
    finally:
        c.close()
    assert not leaks(msgs), leaks(msgs)
    assert not rawpg.errors(msgs), rawpg.errors(msgs)
    rows = _rows(msgs)
    # what is behind it comes back as Postgres sent it (its own plan: nothing masked)
    assert rows[len(rows) - len(want):] == want, rows
    # the held statement ran, once
    assert upstream(pg, "SELECT count(*) FROM orders")[0][0] == (
        2 if INSERT in held else 1)


def test_an_approved_insert_returns_what_it_inserted(pg, aproxy, psql_bin):
    # its RETURNING reads no masked column: the values Postgres returned
    c = connect(aproxy.port)
    try:
        rows = _rows(c.run(f"{INSERT} RETURNING id, customer_id, status, -1 AS k"))
    finally:
        c.close()
    (oid, cust, status), = upstream(pg, "SELECT id, customer_id, status FROM orders")
    assert rows == [(str(oid), str(cust), status, "-1")]
    # psql: a masked read in the same approved Query stays masked
    r = subprocess.run([psql_bin, "-X", "-At", "-d", aproxy.dsn(dbname=DB), "-c",
                        f"{INSERT} RETURNING status; SELECT ssn FROM customers ORDER BY id"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # (several statements reading masked data: every text cell of the Query masked,
    # as for an allowed one; the SSNs by their mask)
    assert r.stdout.split()[-3:] == ["****6571", "****1234", "****3057"], r.stdout
    assert not any(s in r.stdout for s in ("219-43-6571", "345-67-1234", "412-88-3057"))
    assert upstream(pg, "SELECT count(*) FROM orders")[0][0] == 2


@pytest.mark.parametrize("client", ["raw-unnamed", "raw-named-describe", "psycopg",
                                    "psycopg-binary", "asyncpg"])
def test_an_approved_parse_returns_what_it_inserted(pg, aproxy, client):
    # an approved Parse (extended protocol) went upstream unknown to masking: its
    # rows came back as of an unknown statement (NULL, ****); and the statements behind
    # it keep their own plans (a derived SSN masked, a plain column in clear)
    ret = f"{INSERT} RETURNING id, status"
    derived = "SELECT replace(ssn, '-', '') FROM customers ORDER BY id"
    plain = "SELECT name FROM customers WHERE id = 1"
    if client.startswith("raw"):
        c = connect(aproxy.port)
        try:
            c.run(plain)
            named = client == "raw-named-describe"
            msgs = []
            for i, sql in enumerate((ret, derived, plain)):
                name = f"s{i}" if named else ""
                msgs.append(rawpg.parse(sql, name))
                if named:
                    msgs.append(rawpg.describe("S", name))
                msgs += [rawpg.bind(name), rawpg.execute()]
            c.send(*msgs, rawpg.SYNC)
            got = c.until_ready()
        finally:
            c.close()
        assert not leaks(got), leaks(got)
        rows = _rows(got)
    elif client.startswith("psycopg"):
        import psycopg
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            b = client == "psycopg-binary"
            rows = [tuple(str(x) for x in c.cursor(binary=b).execute(ret).fetchone())]
            rows += [tuple(r) for r in c.cursor(binary=b).execute(derived).fetchall()]
            rows += [tuple(r) for r in c.cursor(binary=b).execute(plain).fetchall()]
    else:
        import asyncio

        import asyncpg

        async def main():
            c = await asyncpg.connect(aproxy.dsn(dbname=DB))
            try:
                r = [tuple(str(x) for x in await c.fetchrow(ret))]
                r += [tuple(x) for x in await c.fetch(derived)]
                r += [tuple(x) for x in await c.fetch(plain)]
                return r
            finally:
                await c.close()
        rows = asyncio.run(main())
    (oid, status), = upstream(pg, "SELECT id, status FROM orders")
    assert rows[0] == (str(oid), status), rows
    assert all("*" in r[0] for r in rows[1:4]), rows
    assert rows[4:] == [(NAMES[0],)], rows
    assert not any(s.replace("-", "") in str(rows) for s in SSNS)


@pytest.mark.parametrize("client", ["psycopg", "psycopg-pipeline", "asyncpg"])
def test_an_approved_parse_is_not_masked_by_the_statement_before_it(pg, aproxy, client):
    # (helper 132) the approved unnamed Parse took the plan of the unnamed statement
    # parsed before it (two plain text columns): the e-mail address and
    # SSN in free text, which the detectors find, came back in clear
    pg.execute("INSERT INTO orders (customer_id, status) VALUES (1, 'new'), (2, 'new'), "
               "(99, 'old'); ALTER TABLE customers ADD COLUMN notes text; "
               "UPDATE customers SET notes = 'call ' || email || ', ssn ' || ssn", dbname=DB)
    before = "SELECT status, status || '!' FROM orders WHERE customer_id = $1"
    held = ("UPDATE orders o SET status = o.status FROM customers c "
            "WHERE c.id = o.customer_id AND o.id = ANY($1) RETURNING c.notes, c.name")
    if client.startswith("psycopg"):
        import psycopg
        with psycopg.connect(aproxy.dsn(dbname=DB), autocommit=True) as c:
            q = before.replace("$1", "%s")
            if client == "psycopg":
                assert c.execute(q, (99,)).fetchall() == [("old", "old!")]
                rows = c.execute(held.replace("$1", "%s"), ([1, 2],)).fetchall()
            else:
                with c.pipeline():
                    c.execute(q, (99,))
                    cur = c.execute(held.replace("$1", "%s"), ([1, 2],))
                rows = cur.fetchall()
    else:
        import asyncio

        import asyncpg

        async def main():
            c = await asyncpg.connect(aproxy.dsn(dbname=DB), statement_cache_size=0)
            try:
                assert [tuple(r) for r in await c.fetch(before, 99)] == [("old", "old!")]
                return [tuple(r) for r in await c.fetch(held, [1, 2])]
            finally:
                await c.close()
        rows = asyncio.run(main())
    text = repr(rows)
    assert "zqalpha.7731@example.com" not in text and "219-43-6571" not in text, rows
    assert sorted(r[1] for r in rows) == sorted(NAMES[:2]), rows
