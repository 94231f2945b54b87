# Protocol edges through pgguard: LISTEN/NOTIFY, cancel, TLS both ways, upstream auth
# methods, malformed frames, startup rules.
import socket
import struct
import threading
import time

import psycopg
import pytest

from certs import make_test_pki
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, run_psql
from pgcluster import has_ssl_support


def connect_error(dsn: str) -> tuple[str, str]:
    """(SQLSTATE, message) of a refused connection, via asyncpg (libpq does not
    expose the SQLSTATE of a failed login)."""
    import asyncio

    import asyncpg

    async def attempt():
        try:
            conn = await asyncpg.connect(dsn, ssl=False)
        except asyncpg.PostgresError as e:
            return e.sqlstate, str(e)
        await conn.close()
        raise AssertionError("connection unexpectedly succeeded")
    return asyncio.run(attempt())


def test_listen_notify(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as listener, \
            psycopg.connect(proxy.dsn(), autocommit=True) as sender:
        listener.execute("LISTEN chan")
        sender.execute("NOTIFY chan, 'hello through the proxy'")
        got = next(listener.notifies(timeout=5))
        assert (got.channel, got.payload) == ("chan", "hello through the proxy")


def test_cancel_pg_sleep(proxy):
    with psycopg.connect(proxy.dsn()) as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - t0 < 10
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cancel_reaches_backend_with_several_workers(make_proxy):
    proxy = make_proxy(workers=2)
    conns = [psycopg.connect(proxy.dsn()) for _ in range(6)]
    try:
        for conn in conns:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            conn.rollback()
    finally:
        for c in conns:
            c.close()


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_test_pki(d)
    return d


@pytest.fixture(scope="module")
def pki(pki_dir):
    return make_test_pki(pki_dir) if not (pki_dir / "ca.crt").exists() else {
        "ca_cert": pki_dir / "ca.crt", "server_cert": pki_dir / "server.crt",
        "server_key": pki_dir / "server.key"}


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
def test_client_tls(make_proxy, pki, sslmode):
    proxy = make_proxy(listen_extra=f'tls_cert = "{pki["server_cert"]}"\n'
                                    f'tls_key = "{pki["server_key"]}"')
    dsn = proxy.dsn(sslmode=sslmode, sslrootcert=str(pki["ca_cert"]))
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        assert conn.pgconn.ssl_in_use
    with psycopg.connect(proxy.dsn(sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use


def test_client_tls_refused_without_cert(proxy):
    with pytest.raises(psycopg.OperationalError, match="SSL"):
        psycopg.connect(proxy.dsn(sslmode="require"))


@pytest.mark.parametrize("method", ["md5", "scram-sha-256", "password"])
def test_upstream_auth_methods(pg, make_proxy, method):
    user = f"up_{method.replace('-', '_')}"
    if not pg.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [user]):
        pg.create_role(user, "pw-" + method, method)
    proxy = make_proxy(upstream_user=user, upstream_password="pw-" + method)
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
    bad = make_proxy(upstream_user=user, upstream_password="wrong")
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(bad.dsn())
    assert "upstream authentication failed" in str(e.value)
    assert "wrong" not in str(e.value) and user not in str(e.value)


@pytest.mark.skipif(not has_ssl_support(), reason="server binaries built without SSL")
@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
def test_upstream_tls(pg, make_proxy, pki, pki_dir, sslmode):
    if not pg.execute("SHOW ssl")[0][0] == "on":
        pg.enable_ssl(pki_dir)
    proxy = make_proxy(sslmode=sslmode, upstream_extra=f'sslrootcert = "{pki["ca_cert"]}"'
                       if sslmode == "verify-full" else "")
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") \
            .fetchone() == (True,)


def _raw(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return s


def _startup(user=AGENT, db="postgres", version=196608):
    body = struct.pack("!I", version) + b"user\0" + user.encode() + b"\0database\0" \
        + db.encode() + b"\0\0"
    return struct.pack("!I", len(body) + 4) + body


def _logged_in_socket(proxy):
    """A raw socket through the proxy, logged in as the agent with SCRAM done by hand."""
    from pgguard.auth.scram import ScramClient
    s = _raw(proxy)
    s.sendall(_startup())
    hdr = s.recv(5)
    body = s.recv(struct.unpack("!I", hdr[1:])[0] - 4)
    assert hdr[:1] == b"R" and struct.unpack("!I", body[:4])[0] == 10
    client = ScramClient(AGENT_PASSWORD)
    mech, first = client.initial()
    payload = mech.encode() + b"\0" + struct.pack("!i", len(first)) + first
    s.sendall(b"p" + struct.pack("!I", len(payload) + 4) + payload)
    hdr = s.recv(5)
    body = s.recv(struct.unpack("!I", hdr[1:])[0] - 4)
    final = client.handle_continue(body[4:])
    s.sendall(b"p" + struct.pack("!I", len(final) + 4) + final)
    buf = b""
    while not buf.endswith(b"Z\x00\x00\x00\x05I"):
        buf += s.recv(65536)
    return s


def _read_all(s) -> bytes:
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    except (socket.timeout, ConnectionResetError):
        return out


@pytest.mark.parametrize("frame, what", [
    # as Postgres: a length it refuses closes the connection without a word
    (b"Q\x00\x00\x00\x02", None),
    (b"!\x00\x00\x00\x08abcd", "invalid frontend message type"),
    (b"Q\x7f\x00\x00\x00select", None),
])
def test_malformed_frames_get_08P01_and_others_keep_working(proxy, frame, what):
    other = psycopg.connect(proxy.dsn(), autocommit=True)
    s = _logged_in_socket(proxy)
    s.sendall(frame)
    reply = _read_all(s)
    s.close()
    if what is None:
        assert reply == b""
    else:
        assert reply[:1] == b"E"
        assert b"C08P01" in reply and what.encode() in reply
    assert other.execute("SELECT 'fine'").fetchone() == ("fine",)
    other.close()


def test_protocol_v2_gets_clear_fatal(proxy):
    s = _raw(proxy)
    s.sendall(_startup(version=2 << 16))
    reply = _read_all(s)
    # in the old protocol's format, as Postgres answers it
    assert reply == b"EFATAL:  unsupported frontend protocol 2.0: server supports 3.0 to 3.0\n\0"


def test_garbage_startup_packet(proxy):
    s = _raw(proxy)
    s.sendall(struct.pack("!I", 3) + b"xx")
    reply = _read_all(s)
    assert reply == b""         # Postgres logs it and closes without a word


def _packet(params: bytes) -> bytes:
    body = struct.pack("!I", 196608) + params
    return struct.pack("!I", len(body) + 4) + body


def _first_reply(port: int, packet: bytes) -> str:
    """What a server answers a StartupMessage with: "layout" (08P01, the packet's
    layout refused), "error" (another ErrorResponse), "auth" (an authentication
    message: the packet was read), "silent" (closed without a word)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(packet)
        reply = s.recv(65536)
    except (socket.timeout, ConnectionResetError):
        reply = b""
    finally:
        s.close()
    if not reply:
        return "silent"
    if reply[:1] == b"R":
        return "auth"
    if b"C08P01" in reply and b"startup packet layout" in reply:
        return "layout"
    return "error"


@pytest.mark.parametrize("tail, expect", [
    # Postgres' walk (ProcessStartupPacket): a last name with no room for its value ends
    # it, and the walk may end on the last byte: accepted, the name ignored (found by the
    # long protocol fuzz: pgguard refused it)
    (b"\x10", "read"),
    (b"xyz", "layout"),           # a name with no value, not on the last byte
    (b"", "layout"),              # no terminator at all
    (b"\0", "read"),             # the plain terminator
    (b"\0\0", "layout"),          # a byte after the terminator
])
def test_startup_layout_read_as_postgres_reads_it(pg, proxy, tail, expect):
    from conftest import UPSTREAM_USER
    for port, user in ((pg.port, UPSTREAM_USER), (proxy.port, AGENT)):
        params = b"user\0" + user.encode() + b"\0database\0postgres\0"
        params = params[:-1] if tail == b"" else params + tail
        got = _first_reply(port, _packet(params))
        want = {"read": ("auth", "error"), "layout": ("layout",)}[expect]
        assert got in want, (port == pg.port and "postgres" or "pgguard", tail, got)


def test_ssl_request_answered_N_without_tls(proxy):
    s = _raw(proxy)
    s.sendall(struct.pack("!II", 8, 80877103))
    assert s.recv(1) == b"N"
    s.sendall(struct.pack("!II", 8, 80877104))      # GSSENCRequest
    assert s.recv(1) == b"N"
    s.close()


def _negotiation(port: int, version: int) -> tuple[int, list[bytes]]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        body = struct.pack("!I", version) + b"user\0ci-agent\0_pq_.foo\0bar\0\0"
        s.sendall(struct.pack("!I", len(body) + 4) + body)
        hdr = s.recv(5)
        assert hdr[:1] == b"v", hdr
        body = b""
        want = struct.unpack("!I", hdr[1:])[0] - 4
        while len(body) < want:
            body += s.recv(want - len(body))
        newest, n = struct.unpack_from("!II", body)
        return newest, body[8:].split(b"\0")[:n]
    finally:
        s.close()


@pytest.mark.parametrize("minor", [2, 5])
def test_protocol_3_2_negotiated_down(proxy, pg, minor):
    # libpq 18 may ask for 3.2 or send _pq_ options: the proxy answers as Postgres 15
    # does, with the whole newest version it speaks (3.0, 196608), not the minor alone
    asked = (3 << 16) | minor
    direct = _negotiation(pg.port, asked)
    assert _negotiation(proxy.port, asked) == direct == (196608, [b"_pq_.foo"])


@pytest.mark.skipif(psycopg.pq.version() < 180000, reason="libpq 18 asks for protocol 3.2")
def test_libpq_18_asking_for_protocol_3_2_connects(proxy):
    with psycopg.connect(proxy.dsn(max_protocol_version="3.2")) as conn:
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        assert conn.pgconn.protocol_version == 3


def test_wrong_password_and_unknown_identity_look_the_same(proxy):
    msgs = []
    for user, pw in ((AGENT, "nope"), ("no-such-agent", "nope")):
        state, msg = connect_error(proxy.dsn(user=user, password=pw))
        assert state == "28P01"
        msgs.append(msg.replace(user, "USER"))
    assert msgs[0] == msgs[1]


def test_forbidden_startup_options(proxy):
    for opts in ("-c role=postgres", "-csession_authorization=postgres", "--role=postgres"):
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(proxy.dsn(options=opts))
        assert "not allowed through pgguard" in str(e.value)
    with psycopg.connect(proxy.dsn(options="-c statement_timeout=1234")) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)


def test_database_allow_list(make_proxy):
    proxy = make_proxy(upstream_extra='databases = ["appdb"]')
    with psycopg.connect(proxy.dsn(dbname="appdb")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("appdb",)
    state, msg = connect_error(proxy.dsn(dbname="postgres"))
    assert state == "28000"
    assert 'database "postgres" is not allowed' in msg


def test_unknown_database_error_passed_on(proxy):
    assert connect_error(proxy.dsn(dbname="nope_db"))[0] == "3D000"


def test_upstream_unreachable_is_08006(make_proxy, pg):
    from pgcluster import free_port
    proxy = make_proxy(upstream_extra="")
    proxy.stop()
    text = proxy.config.read_text().replace(f"port = {pg.port}", f"port = {free_port()}")
    proxy.config.write_text(text)
    proxy.start()
    assert connect_error(proxy.dsn())[0] == "08006"


def test_startup_timeout(make_proxy):
    proxy = make_proxy()
    text = proxy.config.read_text().replace('startup_timeout = "5s"', 'startup_timeout = "500ms"')
    proxy.stop()
    proxy.config.write_text(text)
    proxy.start()
    s = _raw(proxy)
    s.sendall(_startup()[:6])       # half a startup packet, then silence
    t0 = time.monotonic()
    reply = _read_all(s)
    assert time.monotonic() - t0 < 4
    assert b"timeout" in reply


def test_too_many_connections(make_proxy):
    proxy = make_proxy(extra="")
    text = proxy.config.read_text().replace("[limits]", "[limits]\nmax_client_connections = 2")
    proxy.stop()
    proxy.config.write_text(text)
    proxy.start()
    a = psycopg.connect(proxy.dsn())
    b = psycopg.connect(proxy.dsn())
    assert connect_error(proxy.dsn())[0] == "53300"
    a.close()
    time.sleep(0.2)
    with psycopg.connect(proxy.dsn()) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    b.close()


@pytest.mark.parametrize("sslmode", ["prefer", "require"])
def test_too_many_connections_over_tls_says_so(make_proxy, pki, psql_bin, sslmode):
    # round 22 (helper 118): the 53300 went out in place of the answer to SSLRequest,
    # and libpq clients in sslmode=prefer / require said only "server sent an error
    # response during SSL exchange". Now TLS is negotiated first, as Postgres does.
    import asyncio

    import asyncpg
    proxy = make_proxy(listen_extra=f'tls_cert = "{pki["server_cert"]}"\n'
                                    f'tls_key = "{pki["server_key"]}"')
    text = proxy.config.read_text().replace("[limits]", "[limits]\nmax_client_connections = 2")
    proxy.stop()
    proxy.config.write_text(text)
    proxy.start()
    dsn = proxy.dsn(sslmode=sslmode)
    with psycopg.connect(dsn) as held, psycopg.connect(dsn):
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(dsn)
        assert "too many clients" in str(e.value), str(e.value)
        r = run_psql(psql_bin, dsn, "-c", "SELECT 1")
        assert r.returncode != 0 and "too many clients" in r.stderr, r.stderr

        async def go():
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await asyncpg.connect(dsn, ssl=sslmode)
        asyncio.run(go())
        assert held.execute("SELECT 1").fetchone() == (1,)


def test_a_cancel_is_honoured_at_the_connection_limit(make_proxy, pg):
    # the CancelRequest comes on a connection of its own: at the limit it was refused
    # like a login, and the running statement went on
    proxy = make_proxy(extra="")
    text = proxy.config.read_text().replace("[limits]", "[limits]\nmax_client_connections = 2")
    proxy.stop()
    proxy.config.write_text(text)
    proxy.start()
    with psycopg.connect(proxy.dsn()) as conn, psycopg.connect(proxy.dsn()):
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - t0 < 10
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_human_identity_and_psql(proxy, psql_bin):
    r = run_psql(psql_bin, proxy.dsn(user=HUMAN, password=HUMAN_PASSWORD), "-Atc",
                 "SELECT 'hello ' || 'alice'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hello alice"


def test_notices_pass_through(proxy):
    got = []
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: got.append((d.severity, d.message_primary)))
        conn.execute("DO $$BEGIN RAISE NOTICE 'look: %', 42; RAISE WARNING 'careful'; END$$")
    assert got == [("NOTICE", "look: 42"), ("WARNING", "careful")]


def test_function_call_message(proxy):
    """FunctionCall ('F'), the legacy fast-path libpq's large objects use."""
    s = _logged_in_socket(proxy)
    # int4pl(40, 2): function OID 177, two binary int4 arguments, binary result
    args = struct.pack("!IhhhIiIi", 177, 1, 1, 2, 4, 40, 4, 2) + struct.pack("!h", 1)
    s.sendall(b"F" + struct.pack("!I", len(args) + 4) + args)
    reply = b""
    while not reply.endswith(b"Z\x00\x00\x00\x05I"):
        reply += s.recv(65536)
    assert reply[:1] == b"V"
    (n,) = struct.unpack_from("!i", reply, 5)
    assert n == 4 and struct.unpack_from("!i", reply, 9) == (42,)
    s.sendall(b"X\x00\x00\x00\x04")
    assert _read_all(s) == b""


def _refusal_after_n(port: int, payload: bytes) -> tuple[bytes, str | None, str | None]:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(payload)
        got = _read_all(s)
    finally:
        s.close()
    if len(got) < 6 or got[1:2] != b"E":
        return got[:1], None, repr(got[1:60])
    fields = dict((f[:1].decode(), f[1:].decode()) for f in got[6:].split(b"\0") if f)
    return got[:1], fields.get("C"), fields.get("M")


def test_bytes_sent_ahead_of_the_ssl_answer(proxy):
    # (red team 25) the answer 'N' first, then the FATAL 08P01 a Postgres without TLS
    # sends (backend_startup: the test's Postgres has TLS on after test_upstream_tls):
    # pgguard sent the error without the 'N'
    payload = struct.pack("!II", 8, 80877103) + _startup()
    assert _refusal_after_n(proxy.port, payload) == (
        b"N", "08P01", "received unencrypted data after SSL request")


@pytest.mark.parametrize("lead", [
    struct.pack("!II", 8, 80877104),                                # GSSENCRequest
    struct.pack("!II", 8, 80877104) + struct.pack("!II", 8, 80877103),
])
def test_bytes_sent_ahead_of_the_gssapi_answer(proxy, lead):
    # pgguard answers 'N' (no GSSAPI encryption), then what a Postgres answering 'N'
    # says (be-secure-gssapi: this server's Postgres, built with GSSAPI, answers 'G'):
    # pgguard went on reading the bytes as the next packet
    assert _refusal_after_n(proxy.port, lead + _startup()) == (
        b"N", "08P01", "received unencrypted data after GSSAPI encryption request")
