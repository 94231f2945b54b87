# Exactness round 15 (helper 63), finding 2: an extended-protocol COPY FROM STDIN with a
# Sync sent before its data (Postgres ignores a Sync in copy-in mode, so it gets no
# ReadyForQuery), then more statements. The masked session's queue kept that Sync at its
# head, so the next statement's answers went unmatched: the client got the description
# pgguard asked for on its own behalf ('t', 'T'), and the statement's values came back
# NULL. An answer to a later message now lets such a Sync go. Compared message by
# message with a direct connection (masked values aside), and judged by the rows upstream.
import pytest
import rawpg
from mask_corpus import DB, MASKS, leaks, raw_connect, seed

from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER

COPY = "COPY copy_sink (id, t) FROM STDIN"
DATA = rawpg.frame(b"d", b"1\tx\n")
DONE = rawpg.frame(b"c", b"")


def _frames(variant: str) -> tuple[list[bytes], int]:
    """(frames, ReadyForQuery messages to wait for)."""
    head = [rawpg.parse(COPY), rawpg.bind(), rawpg.execute()]
    nxt = [rawpg.parse("SELECT 1, 'two'::text"), rawpg.bind(), rawpg.execute(), rawpg.SYNC]
    if variant == "sync-then-data":
        return head + [rawpg.SYNC, DATA, DONE] + nxt, 1
    if variant == "describe-next":
        return head + [rawpg.SYNC, DATA, DONE, rawpg.parse("SELECT 1, 'two'::text"),
                       rawpg.bind(), rawpg.describe("P"), rawpg.execute(), rawpg.SYNC], 1
    if variant == "two-syncs":
        return head + [rawpg.SYNC, DATA, rawpg.SYNC, DONE] + nxt, 1
    if variant == "flush-and-sync":
        return head + [rawpg.FLUSH, rawpg.SYNC, DATA, DONE] + nxt, 1
    if variant == "named-next":
        return head + [rawpg.SYNC, DATA, DONE,
                       rawpg.parse("SELECT 1, 'two'::text", name="n1"), rawpg.bind("n1"),
                       rawpg.execute(), rawpg.SYNC,
                       rawpg.bind("n1"), rawpg.execute(), rawpg.SYNC], 2
    raise AssertionError(variant)


VARIANTS = ["sync-then-data", "describe-next", "two-syncs", "flush-and-sync", "named-next"]


@pytest.fixture(scope="module")
def proxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    pg.execute("DROP TABLE IF EXISTS copy_sink; CREATE TABLE copy_sink (id int, t text); "
               "GRANT ALL ON copy_sink TO PUBLIC", dbname=DB)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-copy-sync"), extra=MASKS).start()
    yield p
    p.stop()


def _run(c, variant):
    frames, readies = _frames(variant)
    c.send(*frames)
    got = c.until_ready(readies)
    after = c.run("SELECT email, 42 FROM customers WHERE id = 1")
    return got, after


def _shape(msgs):
    return [(t, p if t in (b"C", b"D", b"Z") else b"") for t, p in msgs
            if t not in (b"S", b"N")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_copy_in_with_an_early_sync_then_more_statements(pg, proxy, variant):
    pg.execute("TRUNCATE copy_sink", dbname=DB)
    d = rawpg.RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
    try:
        want, _ = _run(d, variant)
    finally:
        d.close()
    assert pg.execute("SELECT count(*) FROM copy_sink", dbname=DB) == [(1,)]
    pg.execute("TRUNCATE copy_sink", dbname=DB)
    c = raw_connect(proxy)
    try:
        got, after = _run(c, variant)
    finally:
        c.close()
    assert _shape(got) == _shape(want), (variant, got, want)
    assert pg.execute("SELECT id, t FROM copy_sink", dbname=DB) == [(1, "x")]
    # the session goes on, its masking in step: the masked column masked, 42 clear
    assert leaks(after) == [] and rawpg.rows(after) == [[b"z***@example.com", b"42"]], after
