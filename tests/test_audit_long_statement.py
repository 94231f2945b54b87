# A statement longer than the audit keeps (256 KiB) is recorded by its start and its
# length, and normalized from that start only. Normalizing the whole text ran on the
# event loop at ~0.4 s per MB: a human's 50 MB Query (a big comment, an inline blob)
# held every other session of the worker for about 20 s. Judged by what an auditor
# reads with `pgguard audit sql`, and by the statements answered meanwhile.
from __future__ import annotations

import json
import subprocess
import sys
import threading

import psycopg
import rawpg
from conftest import HUMAN, HUMAN_PASSWORD

BIG = 20 << 20


def _records(p, like: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "pgguard", "audit", "sql", "--dir",
                          str(p.audit_dir), "--json",
                          "SELECT statement, decision, identity FROM audit WHERE "
                          f"event = 'statement' AND statement LIKE '{like}' "
                          "ORDER BY event_id"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_huge_statement_is_recorded_by_its_start(make_proxy):
    proxy = make_proxy()
    shapes = {
        "comment": "SELECT 1 /* hugecomment " + "x" * BIG + " */",
        "literal": "SELECT length('hugeliteral " + "y" * BIG + "')",
        "behind": "/* " + "z" * BIG + " */\n-- pad\n" + " " * BIG + "SELECT 'behindcomments'",
    }
    answered: list[int] = []
    stop = threading.Event()

    def others() -> None:
        # another session of the same worker keeps being answered meanwhile
        with psycopg.connect(proxy.dsn(HUMAN, HUMAN_PASSWORD), autocommit=True) as c:
            while not stop.is_set():
                answered.append(c.execute("SELECT 41 + 1").fetchone()[0])

    t = threading.Thread(target=others)
    t.start()
    try:
        c = rawpg.RawClient.connect(proxy.port, HUMAN, HUMAN_PASSWORD, timeout=120)
        try:
            for sql in shapes.values():
                msgs = c.run(sql)
                assert not rawpg.errors(msgs), rawpg.errors(msgs)
            assert rawpg.rows(c.run("SELECT 'after'")) == [[b"after"]]
        finally:
            c.close()
    finally:
        stop.set()
        t.join(60)
    assert answered and set(answered) == {42}
    assert proxy.stop() == 0                        # every record written
    # each kept up to what the cut would leave open (the comment, the literal), with
    # its length; a literal never lands in clear
    for name, start in (("comment", "SELECT $1 "), ("literal", "SELECT length(")):
        recs = _records(proxy, f"{start}%/* ... {len(shapes[name])} bytes in all */")
        assert len(recs) == 1, name
    assert not _records(proxy, "%yyyyyyyyyy%")
    # a statement behind huge leading comments and blanks is kept, not the comments
    recs = _records(proxy, f"SELECT $1 /* ... {len(shapes['behind'])} bytes in all */")
    assert len(recs) == 1, _records(proxy, "%bytes in all%")
