# Messages past [limits] max_message_size pass for identities nothing parses (up to
# Postgres' own 1 GB bound), streamed rather than held whole; the audit keeps a prefix.
# Where something parses (a policy), the bound stays.

import pytest
from conftest import AGENT, AGENT_PASSWORD
from exactlib import audit_rows, rss_kb
from rawpg import SYNC, RawClient, bind, errors, execute, parse, query, rows, tags

SMALL_LIMIT = ""


@pytest.fixture
def make_proxy(pg, tmp_path):
    """Proxies with [limits] max_message_size = 1 MiB (cheap long messages)."""
    from conftest import Proxy
    started = []

    def make(**kw):
        p = Proxy(pg, tmp_path, **kw)
        text = p.config.read_text()
        p.config.write_text(text.replace("[limits]\n", "[limits]\nmax_message_size = 1048576\n", 1))
        started.append(p.start())
        return p

    yield make
    for p in started:
        p.stop()






def _streamed(text: str) -> bool:
    return "message of" in text or text.startswith("<statement not normalizable") \
        or "bytes in all */" in text


@pytest.mark.parametrize("mib", [2, 5, 12])
def test_long_query_passes_without_a_policy(pg, make_proxy, mib):
    proxy = make_proxy(extra=SMALL_LIMIT)
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD)
    n = mib << 20
    c.send(query(f"SELECT length('{'q' * n}') AS n, 'tag{mib}'"))
    msgs = c.until_ready()
    assert rows(msgs) == [[str(n).encode(), f"tag{mib}".encode()]], errors(msgs)
    # the session goes on, pipelined and extended
    c.send(query("SELECT 1"), parse("SELECT $1::text"), bind(params=[b"x" * n]), execute(),
           SYNC)
    msgs = c.until_ready(2)
    assert tags(msgs) == ["SELECT 1", "SELECT 1"]
    assert len(rows(msgs)[1][0]) == n
    c.close()
    assert proxy.stop() == 0
    got = audit_rows(proxy, "SELECT statement FROM audit WHERE event = 'statement'")
    texts = [r[0] for r in got]
    # the streamed statement is recorded (its kept prefix; a cut literal is not
    # normalizable, and the record says so rather than leak it)
    assert len(texts) == 3 and _streamed(texts[0]), [t[:80] for t in texts]
    assert any(t == "SELECT $1" for t in texts)
    assert "Traceback" not in proxy.output()


def test_long_statements_pipelined_with_short_ones(pg, make_proxy):
    proxy = make_proxy(extra=SMALL_LIMIT)
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD)
    big = [query(f"SELECT {i}, length('{'z' * (3 << 20)}')") for i in range(3)]
    small = [query(f"SELECT 'small{i}'") for i in range(3)]
    c.send(b"".join(x for pair in zip(small, big) for x in pair))
    msgs = c.until_ready(6)
    got = rows(msgs)
    assert [r[0] for r in got] == [b"small0", b"0", b"small1", b"1", b"small2", b"2"]
    c.close()
    assert proxy.stop() == 0
    stmts = [r[0] for r in audit_rows(
        proxy, "SELECT statement FROM audit WHERE event = 'statement' ORDER BY event_id")]
    assert len(stmts) == 6
    assert [_streamed(s) for s in stmts] == [False, True] * 3


def test_rss_bounded_while_long_messages_stream(pg, make_proxy):
    proxy = make_proxy(extra=SMALL_LIMIT)
    pid = proxy.proc.pid
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD)
    c.run("SELECT 1")
    base = rss_kb(pid)
    peak = base
    for i in range(4):
        c.send(parse("SELECT length($1::text)"), bind(params=[b"w" * (24 << 20)]),
               execute(), SYNC)
        assert rows(c.until_ready()) == [[str(24 << 20).encode()]]
        peak = max(peak, rss_kb(pid))
    c.close()
    assert peak - base < 20 * 1024, f"RSS grew {(peak - base) // 1024} MiB"


@pytest.mark.parametrize("kw", [
    {"extra": """
[[rules]]
name = "no-destructive"
when = { flags = ["destructive"] }
action = "block"
"""},
    {"audit_extra": 'durability = "strict"\n'},
], ids=["policy", "strict-audit"])
def test_the_bound_stays_where_something_parses(pg, make_proxy, kw):
    proxy = make_proxy(**kw)
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD)
    c.send(query("SELECT 'first'"), query(f"SELECT length('{'q' * (2 << 20)}')"))
    msgs = []
    try:
        while True:
            msgs.append(c.read())
    except (ConnectionError, OSError):
        pass
    assert rows(msgs) == [[b"first"]]
    assert [e["C"] for e in errors(msgs)] == ["08P01"]
