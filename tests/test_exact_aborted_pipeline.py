# A refusal pgguard answers itself (it sends a Query that fails with its marker in place
# of the refused message, and drops that Query's ReadyForQuery when the refused message
# was a Parse or Bind) must give the client exactly what Postgres gives for a message
# that fails there. Found by a random 3,000-message pipeline (helper 129): the masked
# agent got ONE MORE ReadyForQuery than Postgres sent for the same bytes, two ways:
#  - Queries Postgres skipped after an extended-protocol error (everything up to Sync is
#    read and dropped) were only known to be skipped once their answers came; the
#    refusal's place among the ReadyForQuery messages was counted when it was sent, as
#    if they had been answered, so the refusal's own ReadyForQuery was passed on (and a
#    later one dropped, or none);
#  - in a failed transaction the refusal's Query fails with 25P02, not the marker: its
#    ReadyForQuery was taken for one Postgres owes the client, and passed on.
# Judged against Postgres' own reply to the same bytes, with a statement that fails there
# (DELETE of a missing table: refused by pgguard at Parse, failing at Parse in Postgres).
import pytest
import rawpg
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER, Proxy
from mask_corpus import DB, MASKS, seed
from rawpg import SYNC, RawClient, bind, close, execute, parse, query

REFUSED = "DELETE FROM no_such_t"       # refused (no WHERE), and fails at Parse upstream
MASKED = "SELECT id, phone FROM customers WHERE id <= 2"
SERIES = "SELECT g FROM generate_series(1, 40) g"
CARD = "SELECT c.ssn FROM customers c, generate_series(1, 3)"
END = query("SELECT 'end-of-case'")     # answered whatever came before (after a Sync)
RULES = """
[[rules]]
name = "no-destructive"
when = { kind = "agent", flags = ["destructive"] }
action = "block"
"""

CASES = {
    # the minimal pipelines, shrunk from the random one (seed 2)
    "skipped-queries-then-refused-parse": (
        bind(stmt="no_such_s") + query("SELECT 2") + query("SELECT 2") + SYNC
        + parse(REFUSED) + SYNC),
    "skipped-masked-queries-then-refused-parse": (
        bind(stmt="no_such_s") + query(MASKED) + query(MASKED) + SYNC
        + parse(REFUSED) + bind() + execute() + SYNC),
    "refused-parse-in-failed-transaction": (
        query("BEGIN") + query("SELECT 1/0") + parse(REFUSED) + SYNC + query("ROLLBACK")),
    "refused-parse-bind-execute-in-failed-transaction": (
        query("BEGIN") + query("SELECT 1/0") + parse(REFUSED) + bind() + execute() + SYNC
        + query("ROLLBACK")),
    "refused-query-and-parse-in-failed-transaction": (
        query("BEGIN") + query("SELECT 1/0") + query(REFUSED) + parse(REFUSED) + SYNC
        + query("ROLLBACK")),
    # the random pipeline's own minimum: "s2" re-parsed while it exists (the first
    # re-Parse fails, 42P05, and Postgres skips the rest up to the Sync, Queries too),
    # then a Bind of it pgguard refuses ("statement-memory": too many texts it may run)
    # and Postgres fails (one parameter for none)
    "stale-bind-refused-after-skipped-queries": (
        parse(SERIES, "s2") + parse(CARD, "s2") + parse("SELECT nosuchcol FROM customers", "s2")
        + parse("SELECT 1/0", "s2") + parse("SELECT 1", "s2") + parse(CARD, "s2")
        + query(MASKED) + close("S", "s2") + query(MASKED) + SYNC
        + bind("s2", params=[b"3"]) + SYNC),
    # (these were right before: the refusal's own Query skipped by Postgres)
    "refused-parse-skipped-then-refused-parse": (
        bind(stmt="no_such_s") + parse(REFUSED) + SYNC + parse(REFUSED) + SYNC),
    "skipped-queries-then-refused-query-and-parse": (
        bind(stmt="no_such_s") + query("SELECT 2") + query("SELECT 2") + SYNC
        + query(REFUSED) + parse(REFUSED) + SYNC),
}


@pytest.fixture(scope="module", params=["masked", "plain"])
def proxy(request, pg, tmp_path_factory):
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("aborted-pipeline"),
              extra=RULES + (MASKS if request.param == "masked" else "")).start()
    yield p
    p.stop()


def _shape(msgs):
    """The reply as a client reads it: message types (notices and reported settings
    aside), each ReadyForQuery with its transaction status."""
    return [t + p[:1] if t == b"Z" else t for t, p in msgs if t not in (b"N", b"S")]


def _run(port, user, password, data, readies):
    c = RawClient.connect(port, user, password, database=DB)
    c.sock.settimeout(20)
    try:
        c.send(data + END)
        return c.until_ready(readies)
    finally:
        c.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusals_answer_as_postgres_does_in_failed_pipelines(pg, proxy, case):
    data = CASES[case]
    # Postgres' reply, read up to the end marker's ReadyForQuery
    c = RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
    c.sock.settimeout(20)
    try:
        c.send(data + END)
        want = []
        while not (want and want[-1][0] == b"Z" and any(
                t == b"D" and b"end-of-case" in p for t, p in want)):
            want.extend(c.until_ready())
    finally:
        c.close()
    readies = sum(1 for t, _ in want if t == b"Z")
    got = _run(proxy.port, AGENT, AGENT_PASSWORD, data, readies)
    assert _shape(got) == _shape(want), (case, _shape(got), _shape(want))
    # the last answer is the end marker's row: nothing was left over or missing
    assert rawpg.rows(got)[-1] == [b"end-of-case"], got[-6:]
    # pgguard's own refusals reach the client as its 42501, never as the marker
    codes = [e.get("C") for e in rawpg.errors(got)]
    assert "PGG42" not in codes, rawpg.errors(got)
    assert "42501" in codes or "25P02" in codes, codes      # (the refusal was made)
