# Round 20 (helper 106): one agent token opening sessions in a loop took every upstream
# connection slot (every identity reaches Postgres as the same role), and the DBA could
# not log in; connections that never authenticate (a startup packet trickled a byte at
# a time) filled max_client_connections, and nobody could log in for as long as an
# attacker kept reconnecting. Agents' sessions are capped (limits.agent_sessions), and
# so are connections still logging in (limits.max_logging_in). Judged by who can log in
# and by the sessions Postgres holds.
from __future__ import annotations

import socket
import struct
import time

import psycopg
import pytest
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, Proxy
from rawpg import RawClient, query, startup_packet


@pytest.fixture
def capped(pg, tmp_path):
    p = Proxy(pg, tmp_path)
    p.config.write_text(p.config.read_text().replace(
        "[limits]", "[limits]\nagent_sessions = 3\nmax_logging_in = 4"))
    p.start()
    yield p
    p.stop()


def _upstream_sessions(pg) -> int:
    return pg.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                      "'client backend' AND pid <> pg_backend_pid()")[0][0]


def test_agents_cannot_take_every_session(capped, pg):
    before = _upstream_sessions(pg)
    agents = [psycopg.connect(capped.dsn(AGENT, AGENT_PASSWORD)) for _ in range(3)]
    try:
        for i in range(5):          # the fourth and later: refused, saying why
            with pytest.raises(psycopg.OperationalError) as e:
                psycopg.connect(capped.dsn(AGENT, AGENT_PASSWORD))
            assert "too many sessions of agent identities" in str(e.value)
        assert _upstream_sessions(pg) == before + 3
        # the DBA still gets in, and the agents' sessions work
        with psycopg.connect(capped.dsn(HUMAN, HUMAN_PASSWORD)) as h:
            assert h.execute("SELECT 1").fetchone() == (1,)
        assert all(a.execute("SELECT 2").fetchone() == (2,) for a in agents)
    finally:
        for a in agents:
            a.close()
    # their slots are free again (once pgguard saw them close)
    _eventually(capped.dsn(AGENT, AGENT_PASSWORD))


def _eventually(dsn: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with psycopg.connect(dsn) as c:
                assert c.execute("SELECT 3").fetchone() == (3,)
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_connections_that_never_log_in_leave_room(capped):
    # four connections send half a startup packet and wait: the fifth is refused until
    # they end, sessions that logged in are not counted, and the DBA logs in meanwhile
    with psycopg.connect(capped.dsn(HUMAN, HUMAN_PASSWORD)) as h:
        stalled = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", capped.port))
            s.sendall(b"\x00\x00\x00")
            stalled.append(s)
        time.sleep(0.5)
        extra = socket.create_connection(("127.0.0.1", capped.port))
        extra.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")       # SSLRequest
        # (answered as Postgres answers it: the TLS negotiation first, then the error
        # after the startup packet, where every client reads it)
        assert extra.recv(1) == b"N"
        body = b"user\0alice\0database\0appdb\0\0"
        extra.sendall(struct.pack("!II", 8 + len(body), 196608) + body)
        got = b""
        extra.settimeout(5)
        while b"\0\0" not in got[5:]:
            chunk = extra.recv(4096)
            if not chunk:
                break
            got += chunk
        assert got[:1] == b"E" and b"53300" in got and b"max_logging_in" in got, got
        extra.close()
        assert h.execute("SELECT 1").fetchone() == (1,)
        for s in stalled:
            s.close()
    _eventually(capped.dsn(HUMAN, HUMAN_PASSWORD))


def test_connections_that_never_log_in_do_not_keep_logins_out(capped):
    # (red team 23) they fill the slots and stay (or reconnect as soon as they are
    # closed): a login still gets in, taking the slot of the oldest connection of the
    # address that holds the most of them
    stalled = []
    try:
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", capped.port))
            s.sendall(b"\x00\x00\x00")
            stalled.append(s)
        time.sleep(1.1)
        # (all within the test config's startup_timeout, 5 s, which ends them anyway)
        for round_ in range(2):
            with psycopg.connect(capped.dsn(HUMAN, HUMAN_PASSWORD)) as h:
                assert h.execute("SELECT 1").fetchone() == (1,)
            # the stalled one closed for it, the attacker's way: a new one in its place
            closed = []
            for s in stalled:
                s.settimeout(0.2)
                try:
                    if s.recv(1) == b"":
                        closed.append(s)
                except (TimeoutError, socket.timeout):
                    pass
                except OSError:
                    closed.append(s)
            assert len(closed) == 1, (round_, len(closed))
            for s in closed:
                stalled.remove(s)
                s.close()
                n = socket.create_connection(("127.0.0.1", capped.port))
                n.sendall(b"\x00\x00\x00")
                stalled.append(n)
            time.sleep(1.1)
    finally:
        for s in stalled:
            s.close()


def test_auto_keeps_a_tenth_of_the_upstreams_slots_for_everyone_else():
    from pgguard import config
    from pgguard.proxy.server import agent_cap
    assert config.loads("").limits.agent_sessions == "auto"
    assert agent_cap(100, 3, 1) == 88          # 97 ordinary slots, 9 kept
    assert agent_cap(100, 3, 2) == 44          # shared among two workers
    assert agent_cap(20, 3, 1) == 12           # at least 5 kept
    assert agent_cap(4, 3, 1) == 1
    with pytest.raises(Exception, match="limits.agent_sessions"):
        config.loads('[limits]\nagent_sessions = "lots"\n')


def test_auto_reads_the_upstreams_limits(pg, tmp_path):
    # the first agent login asks the upstream; the cap follows its max_connections (the
    # refusal past a cap: test_agents_cannot_take_every_session)
    from pgguard.proxy.server import agent_cap
    p = Proxy(pg, tmp_path).start()
    try:
        with psycopg.connect(p.dsn(AGENT, AGENT_PASSWORD)) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        deadline = time.monotonic() + 10
        while "agents may hold" not in p.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        mc, res = pg.execute("SELECT current_setting('max_connections')::int, "
                             "current_setting('superuser_reserved_connections')::int")[0]
        assert f"agents may hold {agent_cap(mc, res, 1)} sessions" in p.output()
    finally:
        p.stop()


def _silent_from(addr: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((addr, 0))
    s.connect(("127.0.0.1", port))
    return s


@pytest.mark.parametrize("stall", [b"", b"\x00"])
def test_a_login_in_progress_outlasts_silent_connections(capped, stall):
    # (red team 24) a client half-way through its login (answering the password
    # request 2 s later: a slow SCRAM, a slow link) beside connections from the same
    # address that sent nothing: the silent ones are closed for new logins, never it
    slow = RawClient(socket.create_connection(("127.0.0.1", capped.port), timeout=10))
    stalled = []
    try:
        # its startup packet sent; the SCRAM exchange (its answer to the server's
        # request) comes seconds later
        slow.send(startup_packet({"user": HUMAN, "database": "appdb"}))
        time.sleep(0.1)
        # (nothing, or one byte of a startup packet: helper 133)
        for _ in range(3):
            stalled.append(socket.create_connection(("127.0.0.1", capped.port)))
            stalled[-1].sendall(stall)
        time.sleep(1.1)
        for _ in range(3):
            with psycopg.connect(capped.dsn(HUMAN, HUMAN_PASSWORD)) as h:
                assert h.execute("SELECT 1").fetchone() == (1,)
            stalled.append(socket.create_connection(("127.0.0.1", capped.port)))
            stalled[-1].sendall(stall)
            time.sleep(0.35)
        slow.auth(HUMAN, HUMAN_PASSWORD)
        assert slow.status == b"I"
        slow.send(query("SELECT 7"))
        assert slow.read()[0] == b"T" and slow.read() == (b"D", b"\0\x01\0\0\0\x017")
    finally:
        slow.sock.close()
        for s in stalled:
            s.close()


def test_one_silent_connection_per_address_does_not_keep_logins_out(capped):
    # (red team 24) the slots filled by one connection from each of four addresses
    # (on a network: four hosts of a botnet, four addresses of an IPv6 /64)
    stalled = [_silent_from(f"127.0.1.{i}", capped.port) for i in range(2, 6)]
    try:
        time.sleep(1.1)
        with psycopg.connect(capped.dsn(HUMAN, HUMAN_PASSWORD)) as h:
            assert h.execute("SELECT 1").fetchone() == (1,)
    finally:
        for s in stalled:
            s.close()


@pytest.fixture
def patient(pg, tmp_path):
    p = Proxy(pg, tmp_path)
    p.config.write_text(p.config.read_text().replace(
        "[limits]", "[limits]\nmax_logging_in = 4").replace(
        'startup_timeout = "5s"', 'startup_timeout = "60s"'))
    assert 'startup_timeout = "60s"' in p.config.read_text()
    p.start()
    yield p
    p.stop()


def test_logins_stalled_at_the_password_from_many_addresses_give_way(patient):
    # four addresses each start a login and never answer the password request: within
    # the first seconds a new login is refused (they may be slow clients), after
    # STALL_AGE (5 s) the longest-waiting gives way
    stalled = []
    try:
        for i in range(2, 6):
            s = socket.socket()
            s.bind((f"127.0.1.{i}", 0))
            s.connect(("127.0.0.1", patient.port))
            s.sendall(startup_packet({"user": HUMAN, "database": "appdb"}))
            s.settimeout(5)
            assert s.recv(1) == b"R"
            stalled.append(s)
        time.sleep(1.5)
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(patient.dsn(HUMAN, HUMAN_PASSWORD))
        assert "max_logging_in" in str(e.value)
        time.sleep(4)
        with psycopg.connect(patient.dsn(HUMAN, HUMAN_PASSWORD)) as h:
            assert h.execute("SELECT 1").fetchone() == (1,)
        gone = 0
        for s in stalled:          # (the rest of the password request, then the end)
            s.settimeout(0.2)
            try:
                while s.recv(4096):
                    pass
                gone += 1
            except (TimeoutError, socket.timeout):
                pass
            except OSError:
                gone += 1
        assert gone == 1
    finally:
        for s in stalled:
            s.close()
