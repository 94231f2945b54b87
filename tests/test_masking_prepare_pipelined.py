# Exactness round 15 (helper 63), finding 3: a SQL PREPARE and a protocol Bind of its name
# in one write. pgguard learns a SQL PREPARE's plan when its CommandComplete comes back,
# after the Bind went by: the Bind got no description, its rows met an empty plan and
# the masked session was closed (FrameError in the proxy's log). The same for a name
# prepared by a multi-statement Query. A Bind of a name pgguard has neither parsed nor
# seen prepared now asks Postgres for the statement's shape; the plan is the PREPARE's in
# effect when the answer comes (Postgres ran everything before the Bind by then), else an
# unknown one (every column masked). Judged by the bytes the client got against the seeded
# clear values, by a direct connection's rows, and by the session going on.
import pytest
import rawpg
from mask_corpus import DB, MASKS, leaks, raw_connect, seed

from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER

CLEAN = "PREPARE pq(int) AS SELECT id, note FROM orders WHERE id >= $1 ORDER BY id"
MASKED = "PREPARE pm(int) AS SELECT name, email, ssn FROM customers WHERE id >= $1 ORDER BY id"


def _frames(variant: str, prepare: str, name: str) -> list[bytes]:
    if variant == "bind":
        return [rawpg.query(prepare), rawpg.bind(name, [b"1"]), rawpg.execute(), rawpg.SYNC]
    if variant == "bind-describe":
        return [rawpg.query(prepare), rawpg.bind(name, [b"1"]), rawpg.describe("P"),
                rawpg.execute(), rawpg.SYNC]
    if variant == "binary":
        return [rawpg.query(prepare), rawpg.bind(name, [b"1"], result_formats=[1]),
                rawpg.execute(), rawpg.SYNC]
    if variant == "chunks":
        return [rawpg.query(prepare), rawpg.bind(name, [b"1"], portal="c1"),
                rawpg.execute("c1", 1), rawpg.execute("c1", 0), rawpg.SYNC]
    if variant == "deallocate-first":
        # the name held a clean statement before; DEALLOCATE and PREPARE in the same write
        return [rawpg.query("PREPARE " + name + "(int) AS SELECT 1, 'x'::text, $1::text"),
                rawpg.query(f"DEALLOCATE {name}"), rawpg.query(prepare),
                rawpg.bind(name, [b"1"]), rawpg.execute(), rawpg.SYNC]
    if variant == "protocol-first":
        # the name was a protocol statement (clean, answered); SQL replaces it in the
        # same write as the Bind
        return [rawpg.parse("SELECT 1, 'x'::text, $1::text", name=name), rawpg.SYNC,
                rawpg.query(f"DEALLOCATE {name}"), rawpg.query(prepare),
                rawpg.bind(name, [b"1"]), rawpg.execute(), rawpg.SYNC]
    if variant == "multi-statement":
        # the Query prepares it among other statements: which name it made is not read
        return [rawpg.query("SELECT 1; " + prepare), rawpg.bind(name, [b"1"]),
                rawpg.execute(), rawpg.SYNC]
    raise AssertionError(variant)


VARIANTS = ["bind", "bind-describe", "binary", "chunks", "deallocate-first", "protocol-first",
            "multi-statement"]
READIES = {"deallocate-first": 4, "protocol-first": 4}


@pytest.fixture(scope="module")
def proxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-prep-pipe"), extra=MASKS).start()
    yield p
    p.stop()


def _run(c, variant, prepare, name):
    c.send(*_frames(variant, prepare, name))
    return c.until_ready(READIES.get(variant, 2))


def _kinds(msgs):
    return [t for t, _ in msgs if t not in (b"S", b"N")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_clean_statement_prepared_and_bound_in_one_write(pg, proxy, variant):
    d = rawpg.RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
    try:
        want = _run(d, variant, CLEAN, "pq")
    finally:
        d.close()
    c = raw_connect(proxy)
    try:
        got = _run(c, variant, CLEAN, "pq")
        after = c.run("SELECT 42")
    finally:
        c.close()
    assert not rawpg.errors(got), got
    assert _kinds(got) == _kinds(want), (got, want)
    if variant == "multi-statement":
        # its plan is not known: every column masked, none in clear, the session goes on
        assert len(rawpg.rows(got)) == len(rawpg.rows(want)) > 1
    else:
        assert rawpg.rows(got) == rawpg.rows(want), (got, want)
    assert rawpg.rows(after) == [[b"42"]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_statement_prepared_and_bound_in_one_write(proxy, variant):
    c = raw_connect(proxy)
    try:
        got = _run(c, variant, MASKED, "pm")
        after = c.run("SELECT 42")
    finally:
        c.close()
    assert not rawpg.errors(got), got
    assert leaks(got) == [], (variant, got)
    first = [t for t, _ in got].index(b"Z")
    rows = rawpg.rows(got[first:])          # the Bind's (after the Query's ReadyForQuery)
    assert len(rows) == 3, got
    if variant != "binary":
        # the PREPARE's plan (or, not known, the columns' own masks): name is clear
        assert [r[0] for r in rows] == [b"Ann", b"Bob", b"Cyd"], rows
    assert rawpg.rows(after) == [[b"42"]]
