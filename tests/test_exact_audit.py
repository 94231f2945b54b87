# One client cannot switch the audit off: records of any size are written (strict and
# batched), the writer never spins, and a writer whose proxy is gone exits.
import os
import signal
import threading
import time

import psycopg
import pytest
from conftest import AGENT, AGENT_PASSWORD
from exactlib import audit_rows
from rawpg import SYNC, RawClient, bind, execute, parse, query, tags


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            todo.append(k)
    return out


def _cmd(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        return ""


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _writers(proxy) -> set[int]:
    return {p for p in _descendants(proxy.proc.pid) if "writerproc" in _cmd(p)}


def _long_statement(mib: float, tag: str) -> str:
    # a statement whose normalized text stays long (an identifier, unlike a literal, is
    # kept by the normalizer) and costs Postgres nothing (it truncates the identifier)
    return f"SELECT '{tag}' AS tag, count(*) AS \"{'i' * int(mib * (1 << 20))}\""


@pytest.mark.parametrize("mib", [5, 9])
def test_strict_long_statement_is_recorded_and_the_worker_goes_on(pg, make_proxy, mib):
    proxy = make_proxy(audit_extra='durability = "strict"\n')
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        sql = _long_statement(mib, f"long{mib}")
        assert conn.execute(sql).fetchone() == (f"long{mib}", 1)
        # the worker's strict sessions go on
        for i in range(5):
            assert conn.execute(f"SELECT 'after{i}'").fetchone() == (f"after{i}",)
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert other.execute("SELECT 'other'").fetchone() == ("other",)
    assert proxy.stop() == 0
    got = audit_rows(proxy, "SELECT statement FROM audit WHERE event = 'statement' "
                     "AND statement LIKE '%bytes in all */'")
    # its start kept (up to the name the cut would leave open), saying how long it was
    # (normalized: $1 for the tag)
    assert len(got) == 1 and f"... {len(sql)} bytes in all */" in got[0][0]
    assert got[0][0].startswith("SELECT $1 AS tag, count(*) AS")
    after = audit_rows(proxy, "SELECT count(*) FROM audit WHERE statement LIKE 'SELECT $1'")
    assert after[0][0] >= 6


def test_batched_burst_of_long_statements_all_recorded(pg, make_proxy):
    proxy = make_proxy()
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD)
    stmts = [_long_statement(2.5, f"burst{i}") for i in range(6)]
    c.send(b"".join(query(s) for s in stmts))
    msgs = c.until_ready(6)
    assert tags(msgs) == ["SELECT 1"] * 6
    for i in range(5):
        assert tags(c.run(f"SELECT {i}")) == ["SELECT 1"]
    c.close()
    time.sleep(0.5)
    writers = _writers(proxy)
    assert writers
    # once it has written the burst, the writer goes idle (it does not spin)
    for p in writers:
        deadline = time.monotonic() + 30
        while True:
            t0 = _cpu_ticks(p)
            time.sleep(1)
            if _cpu_ticks(p) - t0 < 10:
                break
            assert time.monotonic() < deadline, "the audit writer spins while idle"
    assert proxy.stop() == 0
    got = audit_rows(proxy, "SELECT count(*) FROM audit WHERE event = 'statement' "
                     "AND statement LIKE '%bytes in all */'")
    assert got[0][0] == 6
    small = audit_rows(proxy, "SELECT count(*) FROM audit WHERE statement = 'SELECT $1'")
    assert small[0][0] == 5


def test_writer_exits_when_its_worker_is_killed_after_a_long_record(pg, make_proxy):
    proxy = make_proxy(audit_extra='durability = "strict"\n')
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(_long_statement(6, "dying"))
    writers = _writers(proxy)
    assert writers
    os.kill(proxy.proc.pid, signal.SIGKILL)
    proxy.proc.wait()
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{p}") and "writerproc" in _cmd(p) for p in writers):
        assert time.monotonic() < deadline, "the audit writer outlived its proxy"
        time.sleep(0.2)


@pytest.mark.parametrize("n", [1, 3])
def test_several_long_records_in_strict_from_parallel_sessions(pg, make_proxy, n):
    proxy = make_proxy(audit_extra='durability = "strict"\n')
    errors = []

    def one(i):
        try:
            with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                assert conn.execute(_long_statement(4.5, f"par{i}")).fetchone()[0] == f"par{i}"
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors
    assert proxy.stop() == 0
    got = audit_rows(proxy, "SELECT count(*) FROM audit WHERE statement LIKE '%bytes in all */'")
    assert got[0][0] == n


@pytest.mark.parametrize("behind", [
    [query("SELECT 777")],
    [query("SELECT 777"), query("SELECT 778")],
    [query("SELECT 777"), parse("SELECT 779"), bind(), execute()],
])
def test_audit_pairing_when_postgres_skips_queries_after_an_error(pg, make_proxy, behind):
    proxy = make_proxy()
    c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD)
    # the Execute fails: Postgres skips everything behind it until Sync, Queries too;
    # one ReadyForQuery answers the lot
    c.send(parse("SELECT 1/0"), bind(), execute(), *behind, SYNC)
    msgs = c.until_ready()
    assert [t for t, _ in msgs].count(b"Z") == 1
    for i in range(3):
        assert tags(c.run(f"SELECT {880 + i}, 'after'")) == ["SELECT 1"]
    c.close()
    assert proxy.stop() == 0
    got = audit_rows(proxy, "SELECT statement, sqlstate, error, rows FROM audit "
                     "WHERE event = 'statement' ORDER BY event_id")
    assert got[0][:2] == ("SELECT $1/$2", "22012")
    skipped = [r for r in got if r[0] == "SELECT $1"]
    assert skipped and all(r[2] and r[2].startswith("not executed") for r in skipped), got
    after = [r for r in got if r[0] == "SELECT $1, $2"]
    # each later statement paired with its own result: one row, no error
    assert [(r[1], r[2], r[3]) for r in after] == [(None, None, 1)] * 3, got
