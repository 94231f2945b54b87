# Red team, round 24 (helper 130): an agent's `SELECT ... FOR UPDATE` (every row of
# orders, an allowed read) in a transaction it then left open held the locks for as
# long as it liked: Postgres' idle_in_transaction_session_timeout is the client's to turn
# off (`SET idle_in_transaction_session_timeout = 0` is an allowed setting). pgguard ends
# an agent's session idle in a transaction past limits.agent_idle_in_transaction (its
# transaction rolled back, its locks released), whatever the session set. Judged by
# whether another session can update the rows, and by pg_stat_activity.
import asyncio
import time

import asyncpg
import psycopg
import pytest
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, Proxy
from rawpg import RawClient

DB = "appdb"


@pytest.fixture
def iproxy(pg, tmp_path):
    pg.execute("DROP TABLE IF EXISTS locked; CREATE TABLE locked (id int, v text); "
               "INSERT INTO locked SELECT g, 'a' FROM generate_series(1, 5) g", dbname=DB)
    from conftest import UPSTREAM_USER
    pg.execute(f"ALTER TABLE locked OWNER TO {UPSTREAM_USER}", dbname=DB)
    p = Proxy(pg, tmp_path)
    p.config.write_text(p.config.read_text().replace(
        "[limits]", '[limits]\nagent_idle_in_transaction = "1s"'))
    p.start()
    yield p
    p.stop()


def _writable(pg) -> bool:
    """Another session can update every row now (no lock held on them)."""
    try:
        pg.execute("SET lock_timeout = '500ms'; UPDATE locked SET v = 'b'", dbname=DB)
        return True
    except psycopg.errors.LockNotAvailable:
        return False


def _idle_sessions(pg) -> int:
    return pg.execute("SELECT count(*) FROM pg_stat_activity WHERE state IN "
                      "('idle in transaction', 'idle in transaction (aborted)') "
                      "AND datname = %s", [DB])[0][0]


LOCKS = ["SELECT * FROM locked FOR UPDATE",
         "SELECT * FROM locked FOR NO KEY UPDATE",
         "WITH l AS (SELECT * FROM locked FOR UPDATE) SELECT count(*) FROM l"]


@pytest.mark.parametrize("lock", LOCKS)
def test_an_agent_idle_in_a_transaction_is_ended_and_its_locks_go(pg, iproxy, lock):
    c = psycopg.connect(iproxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB))
    try:
        c.execute("SET idle_in_transaction_session_timeout = 0")   # its own: no help
        c.execute(lock)
        assert not _writable(pg)
        time.sleep(2.2)
        assert _writable(pg)
        assert _idle_sessions(pg) == 0
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as e:
            c.execute("SELECT 1")       # (what Postgres' own timeout says: 25P03)
        assert "limits.agent_idle_in_transaction" in (e.value.diag.message_detail or "")
    finally:
        c.close()


def test_asyncpg_and_raw_clients_and_a_failed_transaction(pg, iproxy):
    async def go():
        c = await asyncpg.connect(iproxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB))
        tr = c.transaction()
        await tr.start()
        await c.fetch(LOCKS[0])
        await asyncio.sleep(2.2)
        assert _writable(pg)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError,
                            ConnectionError)):
            await c.fetch("SELECT 1")
        c.terminate()
    asyncio.run(go())
    # raw: the FATAL itself, then the end of the connection
    r = RawClient.connect(iproxy.port, AGENT, AGENT_PASSWORD, database=DB)
    r.run("BEGIN")
    r.run("SELECT 1/0")                 # a failed transaction ('E') counts too
    r.sock.settimeout(5)
    t, body = r.read()
    assert t == b"E" and b"25P03" in body and b"agent_idle_in_transaction" in body, body
    with pytest.raises((ConnectionError, OSError)):
        r.read()
    r.sock.close()


def test_an_agent_that_keeps_working_or_is_idle_outside_a_transaction_stays(pg, iproxy):
    with psycopg.connect(iproxy.dsn(AGENT, AGENT_PASSWORD, dbname=DB)) as c:
        c.execute(LOCKS[0])
        for _ in range(8):              # 2.4 s of statements, 0.3 s apart
            time.sleep(0.3)
            c.execute("SELECT count(*) FROM locked")
        c.commit()
        time.sleep(2.2)                 # idle, no transaction open
        assert c.execute("SELECT 2").fetchone() == (2,)


def test_a_human_is_not_ended_by_the_agents_limit(pg, iproxy):
    with psycopg.connect(iproxy.dsn(HUMAN, HUMAN_PASSWORD, dbname=DB)) as c:
        c.execute("SELECT 1")
        time.sleep(2.2)
        assert c.execute("SELECT 3").fetchone() == (3,)
        c.rollback()


def test_the_limit_reads_as_a_duration_and_says_its_key(tmp_path, pg):
    p = Proxy(pg, tmp_path)
    p.config.write_text(p.config.read_text().replace(
        "[limits]", '[limits]\nagent_idle_in_transaction = "soon"'))
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pgguard", "check", "-c", str(p.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "limits.agent_idle_in_transaction" in r.stderr + r.stdout




@pytest.mark.parametrize("trickle", ["flush", "sync", "partial-message", "copy-open"])
def test_trickled_bytes_are_no_work(pg, iproxy, trickle):
    # (helper 133) a Flush, a bare Sync or one byte of a message every 0.4 s kept the
    # transaction and its locks; so did a COPY FROM STDIN left waiting for its data
    import struct
    r = RawClient.connect(iproxy.port, AGENT, AGENT_PASSWORD, database=DB)
    try:
        r.run("BEGIN")
        r.run(LOCKS[0])
        if trickle == "copy-open":
            sql = b"COPY locked FROM STDIN\0"
            r.send(struct.pack("!cI", b"Q", 4 + len(sql)) + sql)
            assert r.read()[0] == b"G"          # CopyInResponse: it waits for data
        assert not _writable(pg)
        deadline = time.monotonic() + 3.0
        sent = 0
        while time.monotonic() < deadline:
            time.sleep(0.4)
            try:
                if trickle == "flush":
                    r.send(b"H\0\0\0\x04")
                elif trickle == "sync":
                    r.send(b"S\0\0\0\x04")
                elif trickle == "partial-message" and sent < 20:
                    r.send(b"Q\0\0\0\xff"[sent:sent + 1] if sent < 5 else b"x")
                sent += 1
            except OSError:
                break
        assert _writable(pg)
        assert _idle_sessions(pg) == 0
    finally:
        r.sock.close()
