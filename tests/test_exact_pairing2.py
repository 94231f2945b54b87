# Message pairing by Postgres' own rules, for every consumer of it: after an error in an
# extended-protocol message Postgres skips everything up to Sync (Query and FunctionCall
# included), and a COPY FROM STDIN swallows a Sync sent inside it. Each shape runs raw
# against Postgres itself and through pgguard (masking on, audit on and off), followed
# by a harmless Query and a masked one, and is judged by
#   (a) the reply sequence: the same as Postgres' own (types, SQLSTATEs, tags);
#   (b) masking: the masked column is never in clear, the harmless values are;
#   (c) the audit: each record names its statement with its own outcome;
#   (d) drain: once everything is answered the session is idle, and a SIGTERM ends it
#       at once (57P01), not at the shutdown timeout.
from __future__ import annotations

import signal
import time

import pytest
from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER
from exactlib import audit_rows
from rawpg import (
    SYNC,
    RawClient,
    bind,
    close,
    data_row,
    describe,
    error_fields,
    execute,
    frame,
    function_call,
    parse,
    query,
)

SECRET = "pairing-secret-4242"
MASKS = """
[[masks]]
column = "public.xp.secret"
strategy = "redact"
except_groups = ["dba"]

[[rules]]
name = "no-xblocked"
when = { relations = ["public.xblocked"] }
action = "block"
"""
NOW_OID = 1299          # pg_catalog.now()
BAD = "SELECT no_such_col_zz FROM xp"   # parses; fails at Parse (42703)


def copy_data(b: bytes) -> bytes:
    return frame(b"d", b)


COPY_DONE = frame(b"c", b"")
FLUSH = frame(b"H", b"")

# name -> (pipeline, ReadyForQuery it gets, audit expectations): the expectations map
# a piece of a statement's text to its outcome: a SQLSTATE, "ok" or "skipped" (not
# executed: an earlier message of the pipeline failed)
CASES = {
    "parse-error-query": (
        parse(BAD) + query("SELECT 1 AS skipped_q") + SYNC, 1,
        {"no_such_col_zz": "42703", "skipped_q": "skipped"}),
    "parse-error-two-queries": (
        parse(BAD) + query("SELECT 1 AS skipped_q") + query("SELECT 2 AS skipped_r")
        + SYNC, 1,
        {"no_such_col_zz": "42703", "skipped_q": "skipped", "skipped_r": "skipped"}),
    "bind-error-query": (
        bind(stmt="no_such_stmt") + execute() + query("SELECT 1 AS skipped_q") + SYNC, 1,
        {"no_such_stmt": "26000", "skipped_q": "skipped"}),
    "execute-error-functioncall": (
        parse("SELECT 1/0 AS div_zero") + bind() + execute() + function_call(NOW_OID)
        + SYNC, 1,
        {"div_zero": "22012"}),
    "parse-error-masked-statement": (
        parse(BAD) + parse("SELECT secret AS skipped_secret FROM xp", name="m1")
        + bind(stmt="m1") + execute() + SYNC, 1,
        {"no_such_col_zz": "42703", "skipped_secret": "skipped"}),
    "second-parse-error-masked-statement": (
        parse("SELECT 1 AS first_ok", name="ok1") + parse(BAD)
        + parse("SELECT secret AS skipped_secret FROM xp", name="m2") + bind(stmt="ok1")
        + execute() + bind(stmt="m2") + execute() + SYNC, 1,
        {"no_such_col_zz": "42703", "first_ok": "skipped", "skipped_secret": "skipped"}),
    "describe-error-query": (
        describe("S", "no_such_stmt") + query("SELECT 1 AS skipped_q") + SYNC, 1,
        {"skipped_q": "skipped"}),
    "execute-error-then-masked-after-sync": (
        parse("SELECT 1/0 AS div_zero") + bind() + execute() + SYNC
        + parse("SELECT secret AS run_secret, plain AS run_plain FROM xp") + bind()
        + execute() + SYNC, 2,
        {"div_zero": "22012", "run_secret": "ok"}),
    "multi-statement-query-error": (
        query("SELECT 1 AS before_err; SELECT 1/0 AS in_err; SELECT 2 AS never_run"), 1,
        {"before_err": "22012"}),
    "copy-error-simple": (
        query("COPY xc FROM STDIN") + copy_data(b"1\n") + copy_data(b"not-an-int\n")
        + COPY_DONE, 1,
        {"COPY xc": "22P02"}),
    "copy-extended-sync-inside": (
        # libpq's way: Sync right behind the Execute (swallowed by the COPY), and one more
        # after CopyDone
        parse("COPY xc FROM STDIN") + bind() + execute() + SYNC + copy_data(b"7\n")
        + COPY_DONE + SYNC, 1,
        {"COPY xc": "ok"}),
    "copy-extended-error": (
        parse("COPY xc FROM STDIN") + bind() + execute() + SYNC
        + copy_data(b"not-an-int\n") + COPY_DONE + SYNC, 1,
        {"COPY xc": "22P02"}),
    "describe-statement-and-portal-masked": (
        parse("SELECT secret AS d_secret, plain AS d_plain FROM xp", name="ds")
        + describe("S", "ds") + bind(stmt="ds") + describe("P") + execute() + SYNC, 1,
        {"d_secret": "ok"}),
    "close-and-reparse-masked": (
        parse("SELECT 1 AS c_one", name="cs") + bind(stmt="cs") + execute()
        + close("S", "cs")
        + parse("SELECT secret AS c_secret, plain AS c_plain FROM xp", name="cs")
        + bind(stmt="cs") + execute() + SYNC, 1,
        {"c_one": "ok", "c_secret": "ok"}),
    "flush-then-parse-error-query": (
        parse("SELECT secret AS f_secret FROM xp") + bind() + execute() + FLUSH
        + parse(BAD) + query("SELECT 1 AS skipped_q") + SYNC, 1,
        {"f_secret": "ok", "no_such_col_zz": "42703", "skipped_q": "skipped"}),
}

TRAILER = query("SELECT 'harmless-value' AS harmless") + \
    query("SELECT secret, plain FROM xp")


@pytest.fixture(scope="module", autouse=True)
def tables(pg):
    pg.execute(f"""
        DROP TABLE IF EXISTS xp CASCADE;
        DROP TABLE IF EXISTS xc CASCADE;
        CREATE TABLE xp (id int, secret text, plain text);
        INSERT INTO xp VALUES (1, '{SECRET}', 'open-value');
        CREATE TABLE xc (id int);
        DROP TABLE IF EXISTS xblocked;
        CREATE TABLE xblocked (id int);
    """, dbname="appdb")


def _run(port: int, user: str, password: str, data: bytes, zs: int):
    """The replies to ``data`` + TRAILER: (sequence, rows, client)."""
    c = RawClient.connect(port, user, password, database="appdb")
    c.sock.settimeout(15)
    c.send(data + TRAILER)
    seq, rows, seen = [], [], 0
    while seen < zs + 2:
        t, p = c.read()
        if t in (b"N", b"S", b"A"):
            continue
        if t == b"E":
            seq.append(("E", error_fields(p)["C"]))
        elif t == b"C":
            seq.append(("C", p.rstrip(b"\0").decode()))
        else:
            seq.append((t.decode(), None))
        if t == b"D":
            rows.append([v.decode() if v is not None else None for v in data_row(p)])
        elif t == b"Z":
            seen += 1
    return seq, rows, c


@pytest.fixture(scope="module")
def direct(pg):
    """Postgres' own replies per case (cached)."""
    got = {}

    def run(name):
        if name not in got:
            data, zs, _ = CASES[name]
            seq, rows, c = _run(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, data, zs)
            c.close()
            got[name] = (seq, rows)
        return got[name]
    return run


def _check_rows(rows, want_rows, checked: int) -> None:
    """The last ``checked`` rows: the masked column never in clear, every other value as
    Postgres sent it."""
    assert len(rows) == len(want_rows)
    for got_row, want_row in zip(rows[-checked:], want_rows[-checked:]):
        for g, w in zip(got_row, want_row, strict=True):
            if w == SECRET:
                assert g != SECRET and g is not None and g.strip("*") == "", rows
            else:
                assert g == w, (rows, want_rows)


def _check_records(recs, want: dict) -> set:
    """Each audit record (statement, sqlstate, error, ...) against the outcome of the
    first piece of ``want`` in its text ("" matches an empty statement); the pieces
    matched."""
    seen = set()
    for stmt, state, err, *_ in recs:
        keys = [k for k in want if (k in stmt if k else stmt == "")]
        if not keys:
            # anything else recorded (a FunctionCall judged as its SQL) fails nothing it
            # did not run: no SQLSTATE of an error that was not its own
            assert state is None, (stmt, state, err, recs)
            continue
        outcome = want[keys[0]]
        seen.add(keys[0])
        if outcome == "ok":
            assert state is None and err is None, (stmt, state, err, recs)
        elif outcome == "skipped":
            assert state is None and err and err.startswith("not executed"), \
                (stmt, state, err, recs)
        else:
            assert state == outcome, (stmt, state, err, recs)
    return seen


def _drained_at_once(proxy, c) -> None:
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    t, p = c.read()
    waited = time.monotonic() - t0
    assert (t, error_fields(p).get("C")) == (b"E", "57P01"), (t, p)
    assert waited < 2.5, f"the idle session was closed only after {waited:.1f}s"
    assert proxy.proc.wait(15) == 0      # (the SIGTERM ends it)


def _through(make_proxy, audit: str, data: bytes, zs: int):
    """A proxy with the masks (audit on or off) and _run of ``data`` through it."""
    proxy = make_proxy(extra=MASKS, audit_extra="enabled = false" if audit == "noaudit"
                       else "")
    return proxy, _run(proxy.port, AGENT, AGENT_PASSWORD, data, zs)


@pytest.mark.parametrize("audit", ["audit", "noaudit"])
@pytest.mark.parametrize("name", list(CASES))
def test_pairing_follows_postgres(pg, make_proxy, direct, name, audit):
    data, zs, expect = CASES[name]
    want_seq, want_rows = direct(name)
    assert ("T", None) in want_seq and any(SECRET in r for r in want_rows)
    assert not any("skipped" in str(r) or "never_run" in str(r) for r in want_rows)
    proxy, (seq, rows, c) = _through(make_proxy, audit, data, zs)
    # (a) what Postgres itself answers
    assert seq == want_seq
    # (b) the masked column never in clear; every other value as Postgres sent it
    assert ["harmless-value"] in rows
    # (masking computes no lineage per statement of a multi-statement Query: it fails
    # closed on its computed columns, a limit of its own and not pairing's)
    _check_rows(rows, want_rows, 2 if name == "multi-statement-query-error" else len(rows))
    # (d) everything answered: idle, a shutdown ends it at once
    _drained_at_once(proxy, c)
    if audit == "noaudit":
        return
    # (c) the audit: each statement with its own outcome, in order
    recs = audit_rows(proxy, "SELECT statement, sqlstate, error, rows FROM audit "
                      "WHERE event = 'statement' ORDER BY ts")
    want = dict(expect)
    want["$1 AS harmless"] = "ok"
    want["secret, plain FROM xp"] = "ok"
    seen = _check_records(recs, want)
    missing = [k for k in want if k not in seen]
    assert not missing, (missing, recs)
    masked = [r for r in recs if "secret, plain FROM xp" in r[0]]
    assert len(masked) == 1 and masked[0][3] == 1, recs


REFUSED = query("SELECT id FROM xblocked")


@pytest.mark.parametrize("audit", ["audit", "noaudit"])
@pytest.mark.parametrize("name", ["parse-error-query", "parse-error-masked-statement",
                                  "copy-extended-error", "execute-error-functioncall",
                                  "bind-error-query"])
def test_pairing_after_a_refusal(pg, make_proxy, direct, name, audit):
    """A statement pgguard refuses (its injected Query's error is rewritten, and the
    audit and masking never see that error) ahead of each shape: the pairing after it
    is still Postgres' own."""
    data, zs, expect = CASES[name]
    want_seq, want_rows = direct(name)
    proxy, (seq, rows, c) = _through(make_proxy, audit, REFUSED + data, zs + 1)
    assert seq[:2] == [("E", "42501"), ("Z", None)]
    assert seq[2:] == want_seq
    _check_rows(rows, want_rows, len(rows))
    _drained_at_once(proxy, c)
    if audit == "noaudit":
        return
    recs = audit_rows(proxy, "SELECT statement, sqlstate, error, decision FROM audit "
                      "WHERE event = 'statement' ORDER BY ts")
    assert [r[3] for r in recs if "xblocked" in r[0]] == ["blocked"], recs
    seen = _check_records([r for r in recs if "xblocked" not in r[0]], expect)
    assert seen == set(expect), recs


# -- the model itself (pgguard._core.answers.Answers), by Postgres' rules: frontend bytes
# sent, then backend message types; what is owed after each step
def _model_run(sent: bytes, backend: str, split: int = 0):
    from pgguard._core.answers import Answers
    a = Answers()
    log = a.listen()
    if split:
        for i in range(0, len(sent), split):
            a.sent(sent[i:i + split])
    else:
        a.sent(sent)
    owed = [a.owed()]
    for t in backend:
        a.on_backend(ord(t))
        owed.append(a.owed())
    return a, owed, list(log)


COPY = parse("COPY xc FROM STDIN") + bind() + execute()
MODEL_CASES = {
    # skipping after an extended-protocol error, up to Sync
    "parse-error-query": (parse(BAD) + query("SELECT 1") + SYNC, "EZ", [2, 1, 0]),
    "bind-error-two-queries": (bind(stmt="x") + execute() + query("SELECT 1")
                               + query("SELECT 2") + SYNC, "EZ", [3, 1, 0]),
    "execute-error-functioncall": (parse("SELECT 1/0") + bind() + execute()
                                   + function_call(NOW_OID) + SYNC, "12EZ", [2, 2, 2, 1, 0]),
    "describe-error-query": (describe("S", "x") + query("SELECT 1") + SYNC, "EZ", [2, 1, 0]),
    "parse-error-fcall-query": (parse(BAD) + function_call(NOW_OID) + query("SELECT 1")
                                + SYNC + query("SELECT 2"), "EZTDCZ",
                                [4, 2, 1, 1, 1, 1, 0]),
    # errors that start no skipping
    "query-error-then-extended": (query("SELECT 1/0") + parse("SELECT 1") + bind()
                                  + execute() + SYNC, "EZ12DCZ", [2, 2, 1, 1, 1, 1, 1, 0]),
    "sync-error": (parse("SELECT 1") + bind() + execute() + SYNC + query("SELECT 2"),
                   "12DCEZTDCZ", [2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 0]),
    "functioncall-error": (function_call(0) + query("SELECT 1"), "EZTDCZ",
                           [2, 2, 1, 1, 1, 1, 0]),
    # what pairs with nothing
    "async-messages": (query("SELECT 1") + SYNC, "NSTADCNZSZ",
                       [2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 0]),
    "describe-statement-and-portal": (parse("SELECT 1", name="s") + describe("S", "s")
                                      + bind(stmt="s") + describe("P") + execute() + SYNC,
                                      "1tT2TDCZ", [1, 1, 1, 1, 1, 1, 1, 1, 0]),
    "flush-answers-nothing": (parse("SELECT 1") + FLUSH + bind() + execute() + FLUSH
                              + SYNC, "12DCZ", [1, 1, 1, 1, 1, 0]),
    # COPY FROM STDIN
    "copy-simple": (query("COPY xc FROM STDIN") + copy_data(b"1\n") + COPY_DONE, "GCZ",
                    [1, 1, 1, 0]),
    "copy-simple-error": (query("COPY xc FROM STDIN") + copy_data(b"x\n") + COPY_DONE
                          + query("SELECT 1"), "GEZTDCZ", [2, 2, 2, 1, 1, 1, 1, 0]),
    "copy-extended-sync-inside": (COPY + SYNC + copy_data(b"1\n") + COPY_DONE + SYNC,
                                  "12GCZ", [2, 2, 2, 1, 1, 0]),
    "copy-extended-error": (COPY + SYNC + copy_data(b"x\n") + COPY_DONE + SYNC
                            + query("SELECT 1"), "12GEZTDCZ",
                            [3, 3, 3, 2, 2, 1, 1, 1, 1, 0]),
    "copy-fail": (query("COPY xc FROM STDIN") + frame(b"f", b"no\0") + query("SELECT 1"),
                  "GEZTDCZ", [2, 2, 2, 1, 1, 1, 1, 0]),
    "copy-done-outside-copy": (COPY_DONE + copy_data(b"1\n") + query("SELECT 1"), "TDCZ",
                               [1, 1, 1, 1, 0]),
}


@pytest.mark.parametrize("split", [0, 1, 3, 7])
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_answers_model_follows_postgres(name, split):
    sent, backend, want = MODEL_CASES[name]
    a, owed, _ = _model_run(sent, backend, split)
    assert owed == want
    assert a.pending == b""


def test_answers_model_names_what_an_error_answers():
    # the second Parse of the pipeline fails: (69, 'P', 1, msg), and the Sync's
    # ReadyForQuery tells the one Query Postgres skipped up to it: (90, 0, 1, msg); the
    # Sync's ReadyForQuery after a COPY that swallowed one Sync: (90, 1, 0, msg) (msg:
    # the backend scan's copy, None without a scan)
    _, _, log = _model_run(parse("SELECT 1") + parse(BAD) + query("SELECT 1") + SYNC,
                           "1EZ")
    assert log == [(69, ord("P"), 1, None), (90, 0, 1, None)]
    # (skipped as of each ReadyForQuery, though the model read further)
    _, _, log = _model_run(parse(BAD) + query("SELECT 1") + SYNC + query("SELECT 2")
                           + parse(BAD) + query("SELECT 3") + query("SELECT 4") + SYNC,
                           "EZTDCZEZ")
    assert [e for e in log if e[0] == 90] == [(90, 0, 1, None), (90, 0, 1, None),
                                              (90, 0, 3, None)]
    _, _, log = _model_run(COPY + SYNC + copy_data(b"1\n") + COPY_DONE + SYNC, "12GCZ")
    assert log == [(90, 1, 0, None)]
    _, _, log = _model_run(query("SELECT 1/0"), "EZ")
    assert log == [(69, ord("Q"), 0, None), (90, 0, 0, None)]
    _, _, log = _model_run(b"", "E")
    assert log == [(69, 0, 0, None)]


def test_answers_model_ignores_frames_postgres_refuses():
    # a header past Postgres' own length bound (pgguard's poison for a refused frame)
    # is no message: nothing is owed for it
    _, owed, _ = _model_run(b"Q\xff\xff\xff\xff", "")
    assert owed == [0]
    _, owed, _ = _model_run(b"S\x00\x01\x00\x00", "")
    assert owed == [0]


def test_answer_for_finds_its_entry_past_hidden_ones():
    # a listener that did not see some messages (pgguard kept them from it) still gets
    # the entry of the one it handles; an unknown message leaves the queue alone
    from collections import deque

    from pgguard._core.answers import answer_for
    m1, m2, m3 = b"E1", b"Z2", b"E3"
    q = deque([(69, 81, 0, m1), (90, 0, 0, m2), (69, 80, 1, m3)])
    assert answer_for(q, b"other") is None and len(q) == 3
    assert answer_for(q, m3) == (69, 80, 1, m3) and not q
    assert answer_for(q, m1) is None
