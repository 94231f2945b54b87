# Identity hygiene: a client cannot make the upstream show another identity, and names
# that exist, names with a static secret, token-only names and unknown names get the same
# authentication exchange and the same failure (code, message, audit record, timing class).
import statistics
import struct
import time

import psycopg
import pytest
from psycopg import sql as pgsql

from certs import make_test_pki
from conftest import AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, UPSTREAM_USER, Proxy
from rawpg import LoginError, RawClient, cstr, frame, rows, startup_packet
from test_audit_wire import audit_rows
from test_policy_startup import SECRET, marker, raw_socket, token, upstream_logins, via

INTL_PASSWORD = "päss\u00a0wörd \u2168"      # NBSP maps to a space, Ⅸ to IX (SASLprep)
IDENTITIES = """
[identities.bot]
kind = "agent"
groups = ["agents"]

[identities.intl]
kind = "human"
password_env = "TEST_INTL_PASSWORD"

[auth]
state_dir = "{state}"
throttle_after = 1000000
"""
# names of every kind: a static secret, a human with one, token only, unknown
NAMES = [AGENT, HUMAN, "bot", "ghost", "pgguard"]


@pytest.fixture(scope="module", autouse=True)
def connection_log(pg):
    pg.set_conf(log_connections="on")       # upstream_logins() reads it


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def _proxy(pg, tmp, pki, *, tokens=True, loopback_cleartext=True, upstream_extra=""):
    env = {"PGGUARD_TOKEN_SECRET": SECRET if tokens else "",
           "TEST_INTL_PASSWORD": INTL_PASSWORD}
    return Proxy(pg, tmp, extra=IDENTITIES.format(state=tmp / "state"), env=env,
                 listen_extra=f'tls_cert = "{pki["server_cert"]}"\n'
                              f'tls_key = "{pki["server_key"]}"\n'
                              f"allow_cleartext_loopback = "
                              f"{'true' if loopback_cleartext else 'false'}",
                 upstream_extra=upstream_extra).start()


@pytest.fixture(scope="module")
def proxies(pg, pki, tmp_path_factory):
    """loop: tokens on, cleartext allowed from loopback; strict: tokens on, cleartext only
    over TLS; plain: no tokens (SCRAM only)."""
    p = {"loop": _proxy(pg, tmp_path_factory.mktemp("loop"), pki),
         "strict": _proxy(pg, tmp_path_factory.mktemp("strict"), pki,
                          loopback_cleartext=False),
         "plain": _proxy(pg, tmp_path_factory.mktemp("plain"), pki, tokens=False)}
    yield p
    for proxy in p.values():
        proxy.stop()


def _socket(proxy, tls: bool):
    return raw_socket(proxy.port, tls)


def first_request(proxy, user, tls):
    """The proxy's first answer to a StartupMessage for ``user``: (type, payload)."""
    c = RawClient(_socket(proxy, tls))
    try:
        c.send(startup_packet({"user": user, "database": "postgres"}))
        return c.read()
    finally:
        c.sock.close()


EXCHANGES = [("loop", False, 3), ("loop", True, 3), ("strict", False, 10),
             ("strict", True, 3), ("plain", False, 10), ("plain", True, 10)]


@pytest.mark.parametrize("which, tls, code", EXCHANGES)
def test_first_auth_request_depends_on_the_connection_only(proxies, which, tls, code):
    firsts = {name: first_request(proxies[which], name, tls) for name in NAMES}
    assert len(set(firsts.values())) == 1, firsts
    t, payload = firsts[AGENT]
    assert t == b"R" and struct.unpack_from("!I", payload)[0] == code


@pytest.mark.parametrize("which, tls", [("strict", False), ("plain", False), ("plain", True)])
def test_scram_server_first_has_the_same_shape_for_every_name(proxies, which, tls):
    from pgguard.auth.scram import ScramClient
    shapes = set()
    for name in NAMES:
        c = RawClient(_socket(proxies[which], tls))
        c.send(startup_packet({"user": name, "database": "postgres"}))
        t, p = c.read()
        assert struct.unpack_from("!I", p)[0] == 10
        mech, first = ScramClient("x").initial()
        c.send(frame(b"p", cstr(mech) + struct.pack("!i", len(first)) + first))
        t, p = c.read()
        fields = dict(part.split("=", 1) for part in p[4:].decode().split(","))
        shapes.add((t, struct.unpack_from("!I", p)[0], len(fields["s"]), fields["i"]))
        c.sock.close()
    assert shapes == {(b"R", 11, 24, "4096")}


def failed_login(proxy, user, password, tls):
    c = RawClient(_socket(proxy, tls))
    try:
        c.login(user, password, {"user": user, "database": "postgres"})
    except LoginError as e:
        return e.fields
    finally:
        c.sock.close()
    raise AssertionError(f"{user} logged in with a wrong password")


@pytest.mark.parametrize("which, tls", [("loop", False), ("loop", True), ("strict", False),
                                        ("strict", True), ("plain", False)])
@pytest.mark.parametrize("password", [
    "wrong-password", "pgg_k0.eyJ4IjoxfQ." + "A" * 43,      # token-shaped, bad signature
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"])           # JWT-shaped
def test_failed_logins_look_the_same_for_every_name(proxies, which, tls, password):
    seen = set()
    for name in NAMES:
        f = failed_login(proxies[which], name, password, tls)
        assert f["C"] == "28P01" and f["S"] == "FATAL"
        seen.add(tuple(sorted((k, v.replace(f'"{name}"', '"NAME"')) for k, v in f.items()
                              if k in "SVCMDH")))
    assert len(seen) == 1, seen


def test_failure_timing_does_not_tell_names_apart(pg, pki, tmp_path):
    """The cleartext exchange costs the same checks for every name (a token check, then
    PBKDF2 against the name's verifier or a fake one): the medians of many interleaved
    failures stay within a small factor; skipping PBKDF2 for one kind of name would
    show as ~3x."""
    proxy = _proxy(pg, tmp_path, pki)
    try:
        times = {name: [] for name in (AGENT, "bot", "ghost")}
        for _ in range(25):
            for name in times:
                c = RawClient(_socket(proxy, False))
                c.send(startup_packet({"user": name, "database": "postgres"}))
                assert c.read()[0] == b"R"
                t0 = time.perf_counter()
                c.send(frame(b"p", cstr("not-the-password")))
                assert c.read()[0] == b"E"
                times[name].append(time.perf_counter() - t0)
                c.sock.close()
        med = {name: statistics.median(v) for name, v in times.items()}
        assert max(med.values()) / min(med.values()) < 1.8, med
    finally:
        proxy.stop()


def test_failed_logins_are_audited_alike(pg, pki, tmp_path):
    proxy = _proxy(pg, tmp_path, pki)
    for name in (AGENT, "bot", "ghost"):
        failed_login(proxy, name, "wrong-password", False)
    # and a refused startup setting, after a good login
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(options="-c role=postgres"))
    proxy.stop()
    got = audit_rows(proxy, "SELECT identity, event, error, sqlstate, rule, decision "
                            "FROM audit WHERE event = 'auth_failed' ORDER BY ts")
    # (the SQLSTATE the client got: the same 28P01 for every name, round 22)
    assert got[:3] == [(n, "auth_failed", "password authentication failed", "28P01", None,
                        None) for n in (AGENT, "bot", "ghost")]
    assert got[3][:2] == (AGENT, "auth_failed") and got[3][3:] == (
        "42501", "startup-settings", "blocked")
    assert "role" in got[3][2]


# -- logins that must keep working --------------------------------------------------------

def _who(pg, mark):
    return pg.execute("SELECT usename, application_name FROM pg_stat_activity "
                      "WHERE application_name LIKE %s", [f"%{mark}"])


@pytest.mark.parametrize("which, sslmode", [("loop", "disable"), ("loop", "require"),
                                            ("strict", "require"), ("strict", "disable"),
                                            ("plain", "disable"), ("plain", "require")])
@pytest.mark.parametrize("client", ["psql", "psycopg", "asyncpg", "raw"])
def test_static_secrets_log_in_on_every_exchange(pg, proxies, which, sslmode, client):
    proxy = proxies[which]
    mark = marker()
    sql = ("SELECT current_user, (SELECT application_name FROM pg_stat_activity "
           "WHERE pid = pg_backend_pid())")
    out = via(client, proxy, app=mark, sql=sql, tls=sslmode == "require")
    assert out == ("ok", [UPSTREAM_USER, f"pgguard:{AGENT} {mark}"])
    assert upstream_logins(pg, mark) == 1


@pytest.mark.parametrize("which, tls", [("loop", False), ("loop", True), ("strict", True)])
@pytest.mark.parametrize("client", ["psql", "psycopg", "asyncpg", "raw"])
@pytest.mark.parametrize("identity", [AGENT, "bot"])
def test_tokens_log_in_also_for_identities_with_a_static_secret(pg, proxies, which, tls,
                                                                client, identity):
    proxy = proxies[which]
    mark = marker()
    tok = token(proxy, identity)
    sql = ("SELECT (SELECT application_name FROM pg_stat_activity "
           "WHERE pid = pg_backend_pid())")
    out = via(client, proxy, user=identity, password=tok, app=mark, sql=sql, tls=tls)
    assert out == ("ok", [f"pgguard:{identity} {mark}"])
    assert upstream_logins(pg, mark) == 1


@pytest.mark.parametrize("client", ["asyncpg", "raw"])
@pytest.mark.parametrize("identity", [AGENT, "bot"])
def test_tokens_without_tls_where_cleartext_is_not_allowed(pg, proxies, client, identity):
    mark = marker()
    out = via(client, proxies["strict"], user=identity, password=token(proxies["strict"],
                                                                       identity), app=mark)
    assert out[0] == "refused" and out[1] == "28P01"
    assert "only over TLS" in out[2]
    assert upstream_logins(pg, mark) == 0


# -- SASLprep: pgguard's SCRAM verifiers are the ones Postgres would store ---------------------

@pytest.mark.parametrize("password", [
    INTL_PASSWORD, "soft\u00adhyphen", "\uff26\uff55\uff4c\uff4c", "ｶﾀｶﾅ", "ﬁne",
    "bell\u0007é",                  # a control character: SASLprep refuses, raw bytes hash
    "\u0627\u0031",                 # right-to-left ending left-to-right: refused, raw bytes
    "\u0627\u0031\u0628", "plain-ascii \u0007 kept",
])
def test_verifier_matches_what_postgres_stores(pg, password):
    from pgguard.auth.scram import ScramVerifier
    pg.execute("DROP ROLE IF EXISTS saslprep_probe")
    with pg.connect() as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(pgsql.SQL("CREATE ROLE saslprep_probe PASSWORD {}").format(
            pgsql.Literal(password)))
    (stored,), = pg.execute("SELECT rolpassword FROM pg_authid "
                            "WHERE rolname = 'saslprep_probe'")
    theirs = ScramVerifier.parse(stored)
    ours = ScramVerifier.from_password(password, salt=theirs.salt,
                                       iterations=theirs.iterations)
    assert ours == theirs
    assert theirs.verify_password(password.encode())
    pg.execute("DROP ROLE saslprep_probe")


@pytest.mark.parametrize("which, sslmode", [("plain", "disable"), ("strict", "disable"),
                                            ("loop", "disable"), ("loop", "require")])
@pytest.mark.parametrize("password", [INTL_PASSWORD, "päss wörd IX"])
def test_non_ascii_static_secret_logs_in(proxies, which, sslmode, password):
    # libpq SASLpreps the password for SCRAM; pgguard does for SCRAM and cleartext alike
    with psycopg.connect(proxies[which].dsn(user="intl", password=password,
                                            sslmode=sslmode)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- application_name cannot name another identity ----------------------------------------

SPOOFS = ["pgguard:alice", "PGGUARD:alice x", "  pgguard:alice", "pgguard:"]


@pytest.mark.parametrize("client", ["psql", "psycopg", "asyncpg", "raw"])
@pytest.mark.parametrize("spoof", SPOOFS)
@pytest.mark.parametrize("where", ["param", "options"])
def test_application_name_cannot_claim_pgguard_tag(pg, proxies, client, spoof, where):
    mark = marker()
    value = f"{spoof} {mark}"
    kw = {"app": value} if where == "param" else \
        {"options": "-c application_name=" + value.replace(" ", "\\ ")}
    out = via(client, proxies["loop"], **kw)
    assert out[0] == "refused", out
    assert "application_name" in out[2] and "not allowed through pgguard" in out[2]
    if out[1] is not None:
        assert out[1] == "42501"
    assert upstream_logins(pg, mark) == 0


@pytest.fixture(scope="module")
def client_mode(pg, pki, tmp_path_factory):
    p = _proxy(pg, tmp_path_factory.mktemp("clientmode"), pki,
               upstream_extra='application_name = "client"')
    yield p
    p.stop()


@pytest.mark.parametrize("client", ["psql", "psycopg", "asyncpg", "raw"])
def test_application_name_client_mode_passes_the_name_unchanged(pg, client_mode, client):
    mark = marker()
    sql = ("SELECT (SELECT application_name FROM pg_stat_activity "
           "WHERE pid = pg_backend_pid())")
    assert via(client, client_mode, app=f"my app {mark}", sql=sql) == \
        ("ok", [f"my app {mark}"])
    out = via(client, client_mode, app=f"pgguard:alice {mark}")
    assert out[0] == "refused"
    assert upstream_logins(pg, mark) == 1


def test_application_name_status_is_the_clients_own(pg, proxies, client_mode):
    for proxy, upstream in ((proxies["loop"], f"pgguard:{AGENT} mine"),
                            (client_mode, "mine")):
        c = RawClient.connect(proxy.port, AGENT, AGENT_PASSWORD, application_name="mine")
        try:
            assert c.params["application_name"] == "mine"
            assert rows(c.run("SELECT application_name FROM pg_stat_activity "
                              "WHERE pid = pg_backend_pid()")) == [[upstream.encode()]]
        finally:
            c.close()


@pytest.fixture(scope="module")
def tag_all(pg, pki, tmp_path_factory):
    p = _proxy(pg, tmp_path_factory.mktemp("tagall"), pki,
               upstream_extra='application_name = "tag"')
    yield p
    p.stop()


@pytest.mark.parametrize("client", ["psql", "psycopg", "asyncpg", "raw"])
def test_a_humans_application_name_answers_as_postgres_does(pg, proxies, tag_all, client):
    # the default ("agents") tags agents only: a human's SHOW, current_setting and
    # pg_stat_activity hold exactly the name the client set (psycopg's pool tests check
    # SHOW application_name); "tag" tags humans too
    sql = ("SELECT current_setting('application_name'), (SELECT application_name FROM "
           "pg_stat_activity WHERE pid = pg_backend_pid())")
    mark = marker()
    assert via(client, proxies["loop"], user=HUMAN, password=HUMAN_PASSWORD,
               app=f"app {mark}", sql=sql) == ("ok", [f"app {mark}", f"app {mark}"])
    mark = marker()
    assert via(client, proxies["loop"], app=f"app {mark}", sql=sql) == \
        ("ok", [f"pgguard:{AGENT} app {mark}"] * 2)
    mark = marker()
    assert via(client, tag_all, user=HUMAN, password=HUMAN_PASSWORD, app=f"app {mark}",
               sql=sql) == ("ok", [f"pgguard:{HUMAN} app {mark}"] * 2)
    # a human still cannot pose as an identity
    out = via(client, proxies["loop"], user=HUMAN, password=HUMAN_PASSWORD,
              app=f"pgguard:{AGENT} {mark}")
    assert out[0] == "refused"


def test_a_humans_reset_reports_its_own_name(proxies):
    c = RawClient.connect(proxies["loop"].port, HUMAN, HUMAN_PASSWORD, application_name="mine")
    try:
        c.run("SET application_name = 'other'")
        got = c.run("RESET application_name; SHOW application_name")
        statuses = [p for t, p in got if t == b"S"]
        assert statuses[-1] == b"application_name\0mine\0", statuses
        assert rows(got) == [[b"mine"]]
    finally:
        c.close()
