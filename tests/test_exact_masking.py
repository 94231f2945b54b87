# Masking pairs each result with its own statement, whatever the pipelining: a harmless
# statement ahead of a masked read is not masked, the masked read is (issue 13).
import pytest
from conftest import AGENT, AGENT_PASSWORD, Proxy
from rawpg import SYNC, RawClient, bind, execute, parse, query, rows

SECRET = "top-secret-value-77"
MASKS = """
[[masks]]
column = "public.xm.secret"
strategy = "redact"
except_groups = ["dba"]
"""


@pytest.fixture(scope="module")
def xproxy(pg, tmp_path_factory):
    pg.execute(f"""
        DROP TABLE IF EXISTS xm CASCADE;
        CREATE TABLE xm (id int, secret text, plain text);
        INSERT INTO xm VALUES (1, '{SECRET}', 'open');
    """, dbname="appdb")
    p = Proxy(pg, tmp_path_factory.mktemp("xmask"), extra=MASKS).start()
    yield p
    p.stop()


def _client(proxy):
    return RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, database="appdb")


def _values(msgs):
    return [r[0].decode() if r[0] is not None else None for r in rows(msgs)]


@pytest.mark.parametrize("first,second", [
    ("SELECT 'harmless'", "SELECT lower(secret) FROM xm"),
    ("SELECT plain FROM xm", "SELECT upper(secret) FROM xm"),
    ("SELECT 'a' || 'b'", "SELECT secret || '' FROM xm"),
    ("SELECT 'x'::text", "SELECT concat(secret) FROM xm"),
    ("SELECT repeat('h', 3)", "SELECT reverse(reverse(secret)) FROM xm"),
])
def test_pipelined_queries_mask_their_own_results(xproxy, first, second):
    c = _client(xproxy)
    c.send(query(first) + query(second))
    msgs = c.until_ready(2)
    got = _values(msgs)
    assert len(got) == 2
    # the harmless statement comes back as Postgres sent it; the derived secret masked
    assert "*" not in got[0] and got[0] in ("harmless", "open", "ab", "x", "hhh")
    assert SECRET not in got[1] and SECRET.upper() not in got[1], got
    c.close()


@pytest.mark.parametrize("order", ["masked-first", "masked-last", "three"])
def test_pipelined_order_both_ways(xproxy, order):
    c = _client(xproxy)
    seq = {"masked-first": ["SELECT lower(secret) FROM xm", "SELECT 'fine'"],
           "masked-last": ["SELECT 'fine'", "SELECT lower(secret) FROM xm"],
           "three": ["SELECT 'fine'", "SELECT lower(secret) FROM xm", "SELECT 'fine'"]}[order]
    c.send(b"".join(query(s) for s in seq))
    got = _values(c.until_ready(len(seq)))
    for sql, v in zip(seq, got):
        if "secret" in sql:
            assert SECRET not in v
        else:
            assert v == "fine", got
    c.close()


def test_extended_statements_mask_their_own_results(xproxy):
    c = _client(xproxy)
    c.send(parse("SELECT 'plainvalue'", "a"), parse("SELECT lower(secret) FROM xm", "b"),
           bind("a"), execute(), bind("b"), execute(), bind("a"), execute(), SYNC)
    got = _values(c.until_ready())
    assert got[0] == "plainvalue" and got[2] == "plainvalue"
    assert SECRET not in got[1]
    c.close()


def test_error_then_skipped_until_sync_keeps_pairing(xproxy):
    c = _client(xproxy)
    # an error in the extended segment: Postgres skips the rest until Sync; the next
    # segments still pair with their own statements
    c.send(parse("SELECT 1/0"), bind(), execute(), parse("SELECT lower(secret) FROM xm"),
           bind(), execute(), SYNC, query("SELECT 'after'"),
           query("SELECT lower(secret) FROM xm"))
    msgs = c.until_ready(3)
    got = _values(msgs)
    assert got[0] == "after"
    assert SECRET not in got[1]
    c.close()


def test_direct_truth_the_secret_is_there(pg, xproxy):
    assert pg.execute("SELECT lower(secret) FROM xm", dbname="appdb") == [(SECRET,)]


def _frame(t: bytes, body: bytes) -> bytes:
    import struct
    return t + struct.pack("!I", len(body) + 4) + body


TRUNCATED = [
    _frame(b"B", b""),                                  # nothing at all
    _frame(b"B", b"portal"),                            # name without its NUL
    _frame(b"B", b"\0\0\0"),                            # counts missing
    _frame(b"B", b"\0\0\0\x01\0\0"),                    # format count, no formats
    _frame(b"B", b"\0\0\0\0\0\x01\0\0\0\x10ab"),        # a value shorter than said
    _frame(b"D", b"S"),                                 # Describe without a name
    _frame(b"B", b"\0nosuch\0\0\0\0\0\0\0"),         # a statement that does not exist
]


def _shape(msgs):
    from rawpg import errors
    return [(t, errors([(t, p)])[0]["C"] if t == b"E" else b"") for t, p in msgs]


@pytest.mark.parametrize("bad", TRUNCATED)
def test_truncated_messages_under_masking_answered_like_postgres(pg, xproxy, bad):
    got = []
    for port, user, pw in ((xproxy.port, AGENT, AGENT_PASSWORD),
                           (pg.port, "app", "app-secret-Zq9")):
        c = RawClient.connect(port, user, pw, database="appdb")
        c.send(parse("SELECT 1"), bad, execute(), SYNC, query("SELECT 'still'"))
        msgs = c.until_ready(2)
        got.append(_shape(msgs))
        assert _values(msgs)[-1] == "still"
        c.close()
    assert got[0] == got[1]
    assert "Traceback" not in xproxy.output()


@pytest.mark.parametrize("skipped", ["SELECT lower(secret) FROM xm", "SELECT 'harmless'"])
def test_query_skipped_after_extended_error_never_shifts_masking(xproxy, skipped):
    # P/B/E fails, so Postgres skips the Query behind it until Sync: one ReadyForQuery
    # for both. Later statements must still be masked by their own reads.
    c = _client(xproxy)
    c.send(parse("SELECT 1/0"), bind(), execute(), query(skipped), SYNC)
    c.until_ready()
    for _ in range(3):
        c.send(query("SELECT 'x'"))
        c.until_ready()
        c.send(query("SELECT lower(secret) FROM xm"))
        got = _values(c.until_ready())
        assert SECRET not in got[0], got
    c.close()
