# The compiled masking lane (pipe.MaskLane, masking/lane.py): with masks and detectors
# configured, statements whose results read no masked column are forwarded and answered
# without Python, and their rows are still scanned by the detectors. Judged by the bytes
# the client receives (raw protocol, psql, psycopg), with the values seeded upstream as
# the truth; /metrics' pgguard_masking_lane_total shows the lane carried the statements.
import subprocess
import time
import urllib.request

import psycopg
import pytest
import rawpg as r
from conftest import AGENT, AGENT_PASSWORD

EMAILS = ["ada.lovelace@example.com", "grace.hopper@example.org"]
SSNS = ["123-45-6789", "987-65-4321"]
PLAIN_PII = {7: "carol.pii@example.net", 8: "219-09-9999", 9: "4111 1111 1111 1111"}
SEEDED = EMAILS + SSNS + list(PLAIN_PII.values()) + ["lovelace", "hopper", "6789", "4321"]

MASKS = """
[[masks]]
column = "public.lane_cust.email"
strategy = "redact"
except_groups = ["dba"]

[[masks]]
column = "public.lane_cust.ssn"
strategy = "redact"
except_groups = ["dba"]

[detectors]
builtin = ["email", "ssn", "credit_card", "phone"]
"""


@pytest.fixture(scope="module")
def lproxy(pg, tmp_path_factory):
    from conftest import Proxy
    pg.execute("""
        DROP TABLE IF EXISTS lane_cust, lane_plain, lane_nums CASCADE;
        CREATE TABLE lane_cust (id int PRIMARY KEY, name text, email text, ssn text);
        INSERT INTO lane_cust VALUES (1, 'Ada', 'ada.lovelace@example.com', '123-45-6789'),
                                     (2, 'Grace', 'grace.hopper@example.org', '987-65-4321');
        CREATE TABLE lane_plain (id int PRIMARY KEY, n int, note text);
        INSERT INTO lane_plain SELECT g, g * 10, 'note ' || g FROM generate_series(1, 50) g;
        UPDATE lane_plain SET note = 'mail me: carol.pii@example.net' WHERE id = 7;
        UPDATE lane_plain SET note = 'ssn 219-09-9999 on file' WHERE id = 8;
        UPDATE lane_plain SET note = 'card 4111 1111 1111 1111 ok' WHERE id = 9;
        CREATE TABLE lane_nums (id int PRIMARY KEY, big bigint, num numeric, f8 float8,
                                small int, f4 real);
        INSERT INTO lane_nums VALUES (1, 4111111111111111, 123567.1234, 378282246310005,
                                      2147483647, 1234567),
                                     (2, 4111111111111112, 10.5, 1.5, 7, 2.5);
        CREATE VIEW lane_view AS SELECT id, lower(email) AS m FROM lane_cust;
        CREATE VIEW lane_v2 AS SELECT id, note FROM lane_plain;
    """, dbname="appdb")
    p = Proxy(pg, tmp_path_factory.mktemp("lane"), extra=MASKS).start()
    yield p
    p.stop()


def lane_total(p) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=10) as f:
        text = f.read().decode()
    for line in text.splitlines():
        if line.startswith("pgguard_masking_lane_total"):
            return float(line.split()[-1])
    return 0.0


def lane_grew(p, before: float, by: int) -> float:
    """Wait for the lane counter (folded into /metrics every second) to grow by ``by``."""
    deadline = time.monotonic() + 6
    while True:
        now = lane_total(p)
        if now >= before + by or time.monotonic() > deadline:
            return now - before
        time.sleep(0.3)


def blob(msgs) -> bytes:
    return b"".join(p for _, p in msgs)


def leaks(data: bytes) -> list[str]:
    return [v for v in SEEDED if v.encode() in data or v.replace("-", "").encode() in data
            or v.replace(" ", "").encode() in data]


def agent(p) -> r.RawClient:
    return r.RawClient.connect(p.port, AGENT, AGENT_PASSWORD, database="appdb")


def truth(pg, sql: str):
    return pg.execute(sql, dbname="appdb")


def warm(c: r.RawClient, n: int = 5) -> None:
    """Harmless statements of one shape: the first is judged in Python, the rest take
    the lane."""
    for i in range(n):
        msgs = c.run(f"SELECT n, note FROM lane_plain WHERE id = {20 + i}")
        assert r.rows(msgs) == [[str((20 + i) * 10).encode(), f"note {20 + i}".encode()]]


def one_prepared(c: r.RawClient, name: str, sql: str, types=()) -> None:
    c.send(r.parse(sql, name, types), r.SYNC)
    msgs = c.until_ready()
    assert not r.errors(msgs), r.errors(msgs)


def run_prepared(c: r.RawClient, name: str, params, fmt: int = 0):
    c.send(r.bind(name, params, result_formats=[fmt]), r.describe("P"), r.execute(), r.SYNC)
    return c.until_ready()


# -- (a) detectors still scan what the lane forwards (a table with no masks) -----------

class TestDetectorsThroughLane:
    def test_simple(self, lproxy):
        c = agent(lproxy)
        before = lane_total(lproxy)
        warm(c)
        got = {}
        for i in PLAIN_PII:
            msgs = c.run(f"SELECT n, note FROM lane_plain WHERE id = {i}")
            got[i] = r.rows(msgs)[0][1]
            assert not leaks(blob(msgs)), got[i]
        c.close()
        assert got == {7: b"mail me: [email]", 8: b"ssn [ssn] on file",
                       9: b"card [credit_card] ok"}
        assert lane_grew(lproxy, before, 6) >= 6

    def test_prepared_three_times(self, lproxy):
        c = agent(lproxy)
        one_prepared(c, "pn", "SELECT id, note FROM lane_plain WHERE id = $1", [23])
        before = lane_total(lproxy)
        for _ in range(3):
            for i, label in ((7, b"[email]"), (8, b"[ssn]"), (9, b"[credit_card]"), (3, None)):
                msgs = run_prepared(c, "pn", [str(i).encode()])
                assert not r.errors(msgs)
                note = r.rows(msgs)[0][1]
                assert not leaks(blob(msgs))
                if label is None:
                    assert note == b"note 3"
                else:
                    assert label in note
        c.close()
        assert lane_grew(lproxy, before, 12) >= 12

    def test_binary_results(self, lproxy):
        c = agent(lproxy)
        one_prepared(c, "pb", "SELECT n, note FROM lane_plain WHERE id = $1", [23])
        for _ in range(3):
            msgs = run_prepared(c, "pb", [b"7"], fmt=1)
            row = r.rows(msgs)[0]
            assert row[0] == (70).to_bytes(4, "big")          # binary int4 untouched
            assert row[1] == b"mail me: [email]"             # binary text is text
            assert not leaks(blob(msgs))
        c.close()

    def test_psycopg_prepared_and_psql(self, lproxy, psql_bin):
        with psycopg.connect(lproxy.dsn(dbname="appdb"), autocommit=True) as conn:
            for _ in range(4):
                for i in PLAIN_PII:
                    row = conn.execute("SELECT note FROM lane_plain WHERE id = %s", (i,),
                                       prepare=True).fetchone()
                    assert not leaks(row[0].encode()) and "[" in row[0]
        env = {"PGPASSWORD": AGENT_PASSWORD, "PATH": "/usr/bin:/bin"}
        cmds = [a for i in (1, 2, 7, 8, 9, 7)
                for a in ("-c", f"SELECT note FROM lane_plain WHERE id = {i}")]
        out = subprocess.run(
            [psql_bin, "-h", "127.0.0.1", "-p", str(lproxy.port), "-U", AGENT, "-d", "appdb",
             "-At", *cmds], capture_output=True, text=True, env=env, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:6] == ["note 1", "note 2", "mail me: [email]",
                                             "ssn [ssn] on file", "card [credit_card] ok",
                                             "mail me: [email]"]
        assert not leaks(out.stdout.encode())

    def test_cursor_and_pipelined(self, lproxy):
        c = agent(lproxy)
        warm(c)
        # several Queries in one write: the lane forwards them all
        c.send(*[r.query(f"SELECT n, note FROM lane_plain WHERE id = {i}")
                 for i in (1, 7, 2, 8, 3, 9)])
        msgs = c.until_ready(6)
        notes = [row[1] for row in r.rows(msgs)]
        assert notes == [b"note 1", b"mail me: [email]", b"note 2", b"ssn [ssn] on file",
                         b"note 3", b"card [credit_card] ok"]
        assert not leaks(blob(msgs))
        assert not r.errors(c.run("BEGIN"))
        msgs = c.run("DECLARE cur CURSOR FOR SELECT id, note FROM lane_plain ORDER BY id")
        assert not r.errors(msgs)
        msgs = c.run("FETCH 20 FROM cur")
        assert len(r.rows(msgs)) == 20 and not leaks(blob(msgs))
        assert r.rows(msgs)[6][1] == b"mail me: [email]"
        c.run("COMMIT")
        c.close()


# -- (b) a masked read after many cached harmless statements is masked -----------------

class TestMaskedAfterLane:
    def test_simple(self, lproxy, pg):
        c = agent(lproxy)
        warm(c, 30)
        for _ in range(3):
            msgs = c.run("SELECT id, email, ssn FROM lane_cust ORDER BY id")
            assert len(r.rows(msgs)) == 2 and not leaks(blob(msgs))
            warm(c, 3)
        assert [row[0] for row in truth(pg, "SELECT email FROM lane_cust ORDER BY id")] \
            == EMAILS                   # the truth upstream holds the values
        c.close()

    def test_prepared_three_times(self, lproxy):
        c = agent(lproxy)
        one_prepared(c, "h", "SELECT n, note FROM lane_plain WHERE id = $1", [23])
        for _ in range(10):
            run_prepared(c, "h", [b"1"])
        one_prepared(c, "m", "SELECT id, email, ssn FROM lane_cust WHERE id = $1", [23])
        for _ in range(3):
            for fmt in (0, 1):
                msgs = run_prepared(c, "m", [b"1"], fmt)
                assert len(r.rows(msgs)) == 1 and not leaks(blob(msgs))
                msgs = run_prepared(c, "h", [b"2"], fmt)
                assert r.rows(msgs)[0][1] == b"note 2"
        c.close()

    def test_same_name_reused(self, lproxy):
        # a safe statement the lane knows, closed (Close is not watched) and parsed
        # again under the same name reading masked columns
        c = agent(lproxy)
        for round_ in range(3):
            one_prepared(c, "s", "SELECT note FROM lane_plain WHERE id = $1", [23])
            for _ in range(3):
                assert r.rows(run_prepared(c, "s", [b"1"])) == [[b"note 1"]]
            c.send(r.close("S", "s"), r.SYNC)
            c.until_ready()
            one_prepared(c, "s", "SELECT email FROM lane_cust WHERE id = $1", [23])
            for _ in range(3):
                msgs = run_prepared(c, "s", [b"1"], round_ % 2)
                assert len(r.rows(msgs)) == 1 and not leaks(blob(msgs))
            c.send(r.close("S", "s"), r.SYNC)
            c.until_ready()
        c.close()

    def test_sql_prepare_takes_the_name(self, lproxy):
        c = agent(lproxy)
        one_prepared(c, "p1", "SELECT note FROM lane_plain WHERE id = $1", [23])
        for _ in range(3):
            run_prepared(c, "p1", [b"1"])
        for sql in ("DEALLOCATE p1",
                    "PREPARE p1 (int) AS SELECT email, ssn FROM lane_cust WHERE id = $1"):
            assert not r.errors(c.run(sql))
        for _ in range(3):
            msgs = c.run("EXECUTE p1(1)")
            assert len(r.rows(msgs)) == 1 and not leaks(blob(msgs))
        # a protocol Bind of the SQL-prepared name: masked, or (pgguard does not know its
        # plan) the session ends before its rows leave: never the clear values
        c.send(r.bind("p1", [b"2"]), r.describe("P"), r.execute(), r.SYNC)
        c.sock.settimeout(5)
        msgs = c.read_all()
        assert not leaks(blob(msgs))
        c.sock.close()

    def test_pipelined_behind_harmless(self, lproxy):
        c = agent(lproxy)
        warm(c)
        one_prepared(c, "h", "SELECT n, note FROM lane_plain WHERE id = $1", [23])
        one_prepared(c, "m", "SELECT email, ssn FROM lane_cust WHERE id = $1", [23])
        for _ in range(3):
            frames = [r.query(f"SELECT n, note FROM lane_plain WHERE id = {i}")
                      for i in range(1, 6)]
            frames.append(r.query("SELECT email, ssn FROM lane_cust ORDER BY id"))
            frames += [r.bind("h", [b"3"]), r.describe("P"), r.execute(), r.SYNC,
                       r.bind("m", [b"1"]), r.describe("P"), r.execute(), r.SYNC,
                       r.bind("h", [b"4"]), r.describe("P"), r.execute(), r.SYNC]
            frames.append(r.query("SELECT n, note FROM lane_plain WHERE id = 5"))
            c.send(*frames)
            msgs = c.until_ready(10)
            rows = r.rows(msgs)
            assert len(rows) == 5 + 2 + 1 + 1 + 1 + 1
            assert rows[0] == [b"10", b"note 1"] and rows[-1] == [b"50", b"note 5"]
            assert not leaks(blob(msgs)), leaks(blob(msgs))
        c.close()


    def test_segment_mixing_safe_and_masked(self, lproxy):
        # one Sync segment: a safe statement the lane would take, then a masked one;
        # the lane hands the whole segment to Python (its bookkeeping included)
        c = agent(lproxy)
        one_prepared(c, "h", "SELECT n, note FROM lane_plain WHERE id = $1", [23])
        one_prepared(c, "m", "SELECT email, ssn FROM lane_cust WHERE id = $1", [23])
        for _ in range(3):
            run_prepared(c, "h", [b"1"])
        for fmt in (0, 1, 0):
            c.send(r.bind("h", [b"2"], result_formats=[fmt]), r.describe("P"), r.execute(),
                   r.bind("m", [b"1"], result_formats=[fmt]), r.describe("P"), r.execute(),
                   r.bind("h", [b"3"], result_formats=[fmt]), r.execute(), r.SYNC)
            msgs = c.until_ready()
            rows = r.rows(msgs)
            assert len(rows) == 3 and not r.errors(msgs)
            assert rows[0][1] == rows[2][1].replace(b"3", b"2") == b"note 2"
            assert not leaks(blob(msgs)), leaks(blob(msgs))
        c.close()

    def test_execute_without_describe(self, lproxy):
        # asyncpg's way: Bind/Execute/Sync with no Describe (Python's path), between
        # segments the lane takes, binary and text
        c = agent(lproxy)
        one_prepared(c, "h", "SELECT n, note FROM lane_plain WHERE id = $1", [23])
        one_prepared(c, "m", "SELECT id, email, ssn FROM lane_cust WHERE id = $1", [23])
        for i in range(6):
            fmt = i % 2
            c.send(r.bind("m", [b"2"], result_formats=[fmt]), r.execute(), r.SYNC)
            msgs = c.until_ready()
            assert len(r.rows(msgs)) == 1 and not leaks(blob(msgs))
            msgs = run_prepared(c, "h", [b"7"], fmt)
            assert r.rows(msgs)[0][1] == b"mail me: [email]"
            c.send(r.bind("h", [b"8"], result_formats=[fmt]), r.execute(), r.SYNC)
            msgs = c.until_ready()
            assert r.rows(msgs)[0][1] == b"ssn [ssn] on file" and not leaks(blob(msgs))
        c.close()


# -- (c) derived expressions over a masked column stay masked ---------------------------

DERIVED = [
    "SELECT lower(email) FROM lane_cust WHERE id = 1",
    "SELECT email::text FROM lane_cust WHERE id = 1",
    "SELECT concat('x', email, ssn) FROM lane_cust WHERE id = 1",
    "SELECT (SELECT email FROM lane_cust WHERE id = 1) AS e",
    "WITH c AS (SELECT email, ssn FROM lane_cust) SELECT * FROM c",
    "SELECT m FROM lane_view WHERE id = 1",
    "SELECT upper(substr(ssn, 1, 11)) FROM lane_cust",
]


@pytest.mark.parametrize("sql", DERIVED)
def test_derived_masked_after_lane(lproxy, sql):
    c = agent(lproxy)
    harmless = sql.replace("lane_cust", "lane_plain").replace("email", "note") \
        .replace("ssn", "note").replace("lane_view", "lane_v2").replace("SELECT m ", "SELECT note ")
    for _ in range(4):                      # the harmless look-alike takes the lane
        msgs = c.run(harmless)
        assert not r.errors(msgs), (harmless, r.errors(msgs))
    for _ in range(3):
        msgs = c.run(sql)
        assert not r.errors(msgs) and r.rows(msgs), sql
        assert not leaks(blob(msgs)), (sql, leaks(blob(msgs)))
    one_prepared(c, "d", sql)
    for fmt in (0, 1, 0):
        msgs = run_prepared(c, "d", [], fmt)
        assert r.rows(msgs) and not leaks(blob(msgs)), (sql, fmt)
    c.close()


def bump_catalog(p) -> None:
    """DDL through pgguard in another agent session: the catalog generation moves."""
    o = agent(p)
    for sql in ("CREATE TABLE lane_bump (a int)", "DROP TABLE lane_bump"):
        assert not r.errors(o.run(sql))
    o.close()


def test_stale_catalog_harmless_answer_exact(lproxy):
    # DDL elsewhere while the lane knows the statement: its answer is finished by Python
    # (the catalog read again) and comes back exact, not over-masked
    c = agent(lproxy)
    for round_ in range(3):
        warm(c, 3)
        bump_catalog(lproxy)
        before = lane_total(lproxy)
        for i in (1, 7, 2):
            msgs = c.run(f"SELECT n, note FROM lane_plain WHERE id = {i}")
            want = {1: b"note 1", 7: b"mail me: [email]", 2: b"note 2"}[i]
            assert r.rows(msgs) == [[str(i * 10).encode(), want]], (round_, i, msgs)
        assert lane_grew(lproxy, before, 1) >= 1
    c.close()


def test_view_redefined_behind_the_lane(lproxy, pg):
    # the lane knows `SELECT note FROM lane_v2 ...` as safe; the view is redefined out of
    # band over a masked column and the catalog generation moves (DDL through pgguard
    # elsewhere): the catalog is read again before the rows leave, and what the session
    # learned with the old one (the statement's lineage) no longer counts: the column
    # is masked by its mask, not only caught by the detectors
    c = agent(lproxy)
    for _ in range(4):
        assert r.rows(c.run("SELECT note FROM lane_v2 WHERE id = 1")) == [[b"note 1"]]
    try:
        pg.execute("CREATE OR REPLACE VIEW lane_v2 AS SELECT id, email AS note FROM lane_cust",
                   dbname="appdb")
        bump_catalog(lproxy)
        for _ in range(3):
            msgs = c.run("SELECT note FROM lane_v2 WHERE id = 1")
            assert r.rows(msgs) == [[b"****"]]
            assert not leaks(blob(msgs)), leaks(blob(msgs))
    finally:
        pg.execute("CREATE OR REPLACE VIEW lane_v2 AS SELECT id, note FROM lane_plain",
                   dbname="appdb")
        c.close()


# -- numbers that spell a card or a phone number (text format) ---------------------------

NUMS = "SELECT big, num, f8, small, f4 FROM lane_nums WHERE id = {}"


@pytest.mark.parametrize("how", ["simple", "prepared-x3", "pipelined", "psycopg", "binary"])
def test_numbers_scanned_in_text(lproxy, pg, how):
    want = truth(pg, "SELECT big, num, f8, small, f4 FROM lane_nums ORDER BY id")
    assert str(want[0][0]) == "4111111111111111"          # the truth upstream
    c = agent(lproxy)
    if how == "simple":
        got = [r.rows(c.run(NUMS.format(i))) for i in (1, 2, 1, 2, 1)]
    elif how == "pipelined":
        c.send(*[r.query(NUMS.format(i)) for i in (1, 2, 1, 2, 1)])
        msgs = c.until_ready(5)
        got = [[row] for row in r.rows(msgs)]
    elif how in ("prepared-x3", "binary"):
        one_prepared(c, "n", NUMS.format("$1"), [23])
        got = [r.rows(run_prepared(c, "n", [str(i).encode()], 1 if how == "binary" else 0))
               for i in (1, 2, 1, 2, 1, 2)]
    else:
        c.close()
        with psycopg.connect(lproxy.dsn(dbname="appdb"), autocommit=True) as conn:
            got = []
            for i in (1, 2, 1, 2, 1):
                cur = conn.execute(NUMS.format("%s"), (i,), prepare=True)
                got.append([[None if v is None else str(v).encode() for v in cur.fetchone()]])
        got = [[[v if v is None else v.replace(b"Decimal('", b"").replace(b"')", b"")
                 for v in row] for row in g] for g in got]
    if how != "psycopg":
        c.close()
    for k, rows in enumerate(got):
        row = rows[0]
        if how == "binary":
            # a client decodes the binary forms to the same numbers: the card in an int8
            # and a float8 and the phone-shaped numeric are NULL there too (helper 111);
            # the others untouched, byte for byte
            if k % 2 == 0:
                assert row[0] is None and row[1] is None and row[2] is None, row
                assert row[3] == (2147483647).to_bytes(4, "big"), row
            else:
                assert row[0] == (4111111111111112).to_bytes(8, "big"), row
            continue
        if k % 2 == 0:
            # the card in an int8 and a float8, the phone-shaped numeric: NULL; an int4 and
            # a float4 cannot spell either: untouched
            assert row[0] is None and row[1] is None and row[2] is None, row
            assert row[3] == b"2147483647" and row[4] in (b"1.234567e+06", b"1234567.0"), row
        else:
            # not Luhn-valid, not phone-shaped: untouched
            assert row == [b"4111111111111112", b"10.5", b"1.5", b"7", b"2.5"], row
