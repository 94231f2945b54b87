# The upstream startup packet is pgguard's: settings smuggled in `options` or as startup
# parameters are judged after login (allow-list for identities under a policy, pins for
# what the parser relies on), through psql, psycopg, asyncpg and a raw client, with the
# truth read upstream (the server's connection log, the session's own settings).
import asyncio
import os
import socket
import ssl
import struct
import subprocess
import uuid
from unittest import mock

import asyncpg
import psycopg
import pytest

from conftest import (AGENT, AGENT_PASSWORD, HUMAN, HUMAN_PASSWORD, UPSTREAM_PASSWORD,
                      UPSTREAM_USER, Proxy)
from rawpg import LoginError, RawClient, cstr, rows

SECRET = "test-token-secret-0123456789abcdef-XYZ"
GUARD = """
[[rules]]
name = "agents-no-destructive"
action = "block"
when = {{ kind = "agent", flags = ["destructive"] }}

[identities.bot]
kind = "agent"
groups = ["agents"]

[auth]
state_dir = "{state}"
"""
# through the session itself: the backend's settings and its pg_stat_activity name
CHECK = ("SELECT current_setting('standard_conforming_strings'), "
         "current_setting('client_encoding'), "
         "(SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid())")
CLIENTS = ["psql", "psycopg", "asyncpg", "raw"]


@pytest.fixture(scope="module")
def gproxy(pg, tmp_path_factory):
    """ci-agent and bot under a policy (a block rule for agents), alice not; tokens on."""
    pg.set_conf(log_connections="on")
    tmp = tmp_path_factory.mktemp("startup")
    p = Proxy(pg, tmp, extra=GUARD.format(state=tmp / "state"),
              env={"PGGUARD_TOKEN_SECRET": SECRET}).start()
    yield p
    p.stop()


@pytest.fixture(scope="module", autouse=True)
def victim(pg):
    pg.execute("DROP TABLE IF EXISTS victim; CREATE TABLE victim (v int);"
               "INSERT INTO victim VALUES (1)")


def marker() -> str:
    return "mk-" + uuid.uuid4().hex[:12]


def upstream_logins(pg, mark: str) -> int:
    """Upstream backends that were authorized for a connection carrying ``mark`` in its
    application_name (log_connections; independent of the proxy's replies)."""
    text = pg.logfile.read_text(errors="replace")
    return sum(1 for line in text.splitlines()
               if "connection authorized" in line and mark in line)


def token(proxy, identity="bot", scope="readwrite"):
    from pgguard.auth.tokens import issue
    from pgguard.config import load
    with mock.patch.dict(os.environ, {"PGGUARD_TOKEN_SECRET": SECRET}):
        return issue(load(proxy.config), identity, 600, scope=scope)[0]


def raw_socket(port: int, tls: bool = False) -> socket.socket:
    """A socket to ``port``, after an SSLRequest and a TLS handshake if ``tls``."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if not tls:
        return s
    s.sendall(struct.pack("!II", 8, 80877103))
    assert s.recv(1) == b"S"
    return _no_verify().wrap_socket(s)


def _no_verify() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def via(client, proxy, *, user=AGENT, password=AGENT_PASSWORD, options=None,
        params=None, sql=CHECK, app=None, tls=False):
    """Connect with ``client`` (psql, psycopg, asyncpg, raw), over TLS if ``tls``, asking
    for ``options`` and startup ``params``; run ``sql``. Returns ("ok", [first row as
    strings]) or ("refused", sqlstate or None when the client does not expose it, the
    message with its detail and hint)."""
    params = dict(params or {})
    if app is not None:
        params["application_name"] = app
    dsn = proxy.dsn(user=user, password=password, sslmode="require" if tls else "disable")
    if client == "psql":
        env = dict(os.environ)
        env.pop("PGCLIENTENCODING", None)
        env.pop("PGOPTIONS", None)
        if options is not None:
            env["PGOPTIONS"] = options
        names = {"client_encoding": "PGCLIENTENCODING", "application_name": "PGAPPNAME"}
        for k, v in params.items():
            env[names[k]] = v       # psql can send no other startup parameter
        r = subprocess.run(["/usr/bin/psql", "-X", "-A", "-t", "-F", "|", "-v",
                            "ON_ERROR_STOP=1", "-c", sql, dsn],
                           capture_output=True, text=True, env=env, timeout=60)
        if r.returncode:
            return "refused", None, r.stderr
        return "ok", r.stdout.strip().split("\n")[0].split("|")
    if client == "psycopg":
        kw = dict(params)
        if options is not None:
            kw["options"] = options
        try:
            with psycopg.connect(dsn, autocommit=True, **kw) as conn:
                assert conn.pgconn.ssl_in_use == tls
                return "ok", [str(v) for v in conn.execute(sql).fetchone()]
        except psycopg.OperationalError as e:
            return "refused", None, str(e)
    if client == "asyncpg":
        settings = dict(params)
        if options is not None:
            settings["options"] = options

        async def go():
            try:
                conn = await asyncpg.connect(proxy.dsn(user=user, password=password),
                                             ssl=_no_verify() if tls else False,
                                             server_settings=settings)
            except asyncpg.PostgresError as e:
                return "refused", e.sqlstate, f"{e} {e.detail or ''} {e.hint or ''}"
            try:
                return "ok", [str(v) for v in await conn.fetchrow(sql)]
            finally:
                await conn.close()
        return asyncio.run(go())
    assert client == "raw"
    if options is not None:
        params["options"] = options
    c = RawClient(raw_socket(proxy.port, tls))
    try:
        c.login(user, password, {"user": user, "database": "postgres", **params})
    except LoginError as e:
        c.sock.close()
        f = e.fields
        return "refused", f.get("C"), " ".join(f.get(k, "") for k in "MDH")
    try:
        return "ok", [(v or b"").decode() for v in rows(c.run(sql))[0]]
    finally:
        c.close()


def assert_refused(pg, out, mark, *words, sqlstate="42501"):
    assert out[0] == "refused", out
    if out[1] is not None:
        assert out[1] == sqlstate, out
    for w in words:
        assert w in out[2], out
    # truth upstream: the refusal came before any upstream connection
    assert upstream_logins(pg, mark) == 0


# -- settings smuggled in `options`, for an identity under a policy ------------------------

SMUGGLED = [
    ("-c standard_conforming_strings=off", "standard_conforming_strings=off"),
    ("--standard-conforming-strings=off", "standard_conforming_strings=off"),
    ("-c statement_timeout=5 -ec standard_conforming_strings=off", "startup option -e"),
    (r"-c sess\ion_replication_role=replica", "startup setting session_replication_role"),
    ("-cSESSION_REPLICATION_ROLE=replica", "startup setting session_replication_role"),
    ("-c\tsession_preload_libraries=auto_explain", "startup setting session_preload_libraries"),
    (r"-c\ session_replication_role=replica", "is not allowed through pgguard"),
    ("-c client_encoding=LATIN1", "client_encoding=LATIN1"),
    ("--CLIENT-ENCODING=SJIS", "client_encoding=SJIS"),
    ("-c default_transaction_read_only=off", "default_transaction_read_only=off"),
    ("-c role=postgres", "startup setting role"),
    ("--session_authorization=postgres", "startup setting session_authorization"),
    ("-c row_security=off", "startup setting row_security"),
    ("-c transform_null_equals=on", "startup setting transform_null_equals"),
    ("-c user=postgres", "startup setting user"),
    ("-O", "startup option -O"),
    ("-c statement_timeout=5 -F", "startup option -F"),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("options, words", SMUGGLED, ids=[s[0] for s in SMUGGLED])
def test_options_smuggling_is_refused(pg, gproxy, client, options, words):
    mark = marker()
    out = via(client, gproxy, options=options, app=mark)
    assert_refused(pg, out, mark, words, "not allowed through pgguard")


# -- settings as startup parameters ---------------------------------------------------------

PARAMS = [
    ({"client_encoding": "LATIN1"}, "client_encoding=LATIN1"),
    ({"client_encoding": "SQL_ASCII"}, "client_encoding=SQL_ASCII"),
    ({"client_encoding": "EUC_JP"}, "client_encoding=EUC_JP"),
    ({"client_encoding": "'win1252'"}, "client_encoding='win1252'"),
    ({"standard_conforming_strings": "off"}, "standard_conforming_strings=off"),
    ({"Standard_Conforming_Strings": "0"}, "standard_conforming_strings=0"),
    ({"session_replication_role": "replica"}, "startup setting session_replication_role"),
    ({"session_preload_libraries": "auto_explain"}, "session_preload_libraries"),
    ({"local_preload_libraries": "auto_explain"}, "local_preload_libraries"),
    ({"role": "postgres"}, "startup setting role"),
    ({"ROLE": "postgres"}, "startup setting role"),
    ({"session_authorization": "postgres"}, "startup setting session_authorization"),
    ({"replication": "database"}, "startup setting replication"),
    ({"User": "postgres"}, "startup setting user"),
    ({"Options": "-c role=postgres"}, "startup setting options"),
    ({"allow_system_table_mods": "on"}, "startup setting allow_system_table_mods"),
    ({"pgguard_unknown_knob": "1"}, "startup setting pgguard_unknown_knob"),
    ({"myapp.tenant": "42"}, "startup setting myapp.tenant"),
]


@pytest.mark.parametrize("client", ["asyncpg", "raw"])
@pytest.mark.parametrize("params, words", PARAMS, ids=[str(p[0]) for p in PARAMS])
def test_startup_parameters_are_refused(pg, gproxy, client, params, words):
    mark = marker()
    out = via(client, gproxy, params=params, app=mark)
    assert_refused(pg, out, mark, words, "not allowed through pgguard")


@pytest.mark.parametrize("client", ["psql", "psycopg"])
@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII", "EUC_JP", "WIN1252", "SJIS"])
def test_libpq_client_encodings_are_refused(pg, gproxy, client, encoding):
    mark = marker()
    out = via(client, gproxy, params={"client_encoding": encoding}, app=mark)
    assert_refused(pg, out, mark, "client_encoding", "not allowed through pgguard")


# -- the read-only scope of a token cannot be switched off at startup ------------------------

READ_WRITE = [
    ("options", "-c default_transaction_read_only=off"),
    ("options", "--default-transaction-read-only=0"),
    ("options", "-c DEFAULT_TRANSACTION_READ_ONLY=of"),
    ("options", "-c transaction_read_only=false"),
    ("options", "-c default_transaction_read_only=on -c default_transaction_read_only=no"),
    ("params", {"default_transaction_read_only": "off"}),
    ("params", {"default_transaction_read_only": "no"}),
    ("params", {"Transaction_Read_Only": "0"}),
]
# libpq (psql, psycopg) can send options but no arbitrary startup parameter
READ_WRITE_CASES = [(c, kind, v) for kind, v in READ_WRITE for c in CLIENTS
                    if kind == "options" or c in ("asyncpg", "raw")]


@pytest.mark.parametrize("client, kind, value", READ_WRITE_CASES)
def test_readonly_token_cannot_switch_off_read_only(pg, gproxy, client, kind, value):
    mark = marker()
    out = via(client, gproxy, user="bot", password=token(gproxy, scope="readonly"),
              app=mark, **{kind: value})
    assert_refused(pg, out, mark, "read_only", "not allowed through pgguard")


@pytest.mark.parametrize("client", CLIENTS)
def test_readonly_token_is_pinned_read_only(pg, gproxy, client):
    mark = marker()
    out = via(client, gproxy, user="bot", password=token(gproxy, scope="readonly"),
              options="-c default_transaction_read_only=yes", app=mark,
              sql="SELECT current_setting('default_transaction_read_only'), "
                  "current_setting('transaction_read_only')")
    assert out == ("ok", ["on", "on"])
    out = via(client, gproxy, user="bot", password=token(gproxy, scope="readonly"),
              app=mark, sql="SELECT current_setting('default_transaction_read_only')")
    assert out == ("ok", ["on"])
    assert upstream_logins(pg, mark) == 2


# -- what a string means to pglast is what it means upstream --------------------------------

ATTACK = r"SELECT 'a\''; DROP TABLE victim; --'"


def test_attack_string_is_real_with_standard_conforming_strings_off(pg):
    # control: directly upstream with the setting a client would smuggle, the string
    # pglast reads as one SELECT drops a table
    pg.execute("DROP TABLE IF EXISTS victim_ctl; CREATE TABLE victim_ctl (v int)")
    with psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, "postgres"),
                         options="-c standard_conforming_strings=off",
                         autocommit=True) as conn:
        conn.execute(ATTACK.replace("victim", "victim_ctl"), prepare=False)
    assert pg.execute("SELECT to_regclass('victim_ctl')") == [(None,)]


@pytest.mark.parametrize("client", CLIENTS)
def test_attack_string_stays_one_select_upstream(pg, gproxy, client):
    for how in ({"options": "-c standard_conforming_strings=off"},
                {"options": "-ec standard_conforming_strings=off"},
                {"params": {"standard_conforming_strings": "off"}}):
        if client in ("psql", "psycopg") and "params" in how:
            continue
        out = via(client, gproxy, sql=ATTACK, **how)
        assert out[0] == "refused", out
    out = via(client, gproxy, sql=ATTACK)
    assert out == ("ok", ["a\\'; DROP TABLE victim; --"])
    assert pg.execute("SELECT count(*) FROM victim") == [(1,)]


# -- legitimate startups still connect, and Postgres reports what the client asked for ------

@pytest.mark.parametrize("client", CLIENTS)
def test_default_startup_of_each_client_connects(pg, gproxy, client):
    mark = marker()
    out = via(client, gproxy, app=mark)
    assert out == ("ok", ["on", "UTF8", f"pgguard:{AGENT} {mark}"])
    assert upstream_logins(pg, mark) == 1


@pytest.mark.parametrize("client", CLIENTS)
def test_allowed_settings_in_options_reach_the_backend(gproxy, client):
    out = via(client, gproxy,
              options=r"-c statement_timeout=1234 --lock-timeout=4321 "
                      r"-cDateStyle=SQL,DMY "
                      r"-c client_encoding=UTF-8 -c standard_conforming_strings=true",
              sql="SELECT current_setting('statement_timeout'), "
                  "current_setting('lock_timeout'), "
                  "current_setting('DateStyle'), current_setting('client_encoding'), "
                  "current_setting('standard_conforming_strings')")
    assert out == ("ok", ["1234ms", "4321ms", "SQL, DMY", "UTF8", "on"])


DRIVERS = {
    # pgjdbc 42.x getParametersForStartup (assumeMinServerVersion >= 9.0, currentSchema)
    "pgjdbc": {"client_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "Europe/Berlin",
               "extra_float_digits": "3", "application_name": "PostgreSQL JDBC Driver"},
    "pgjdbc-old": {"client_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "GMT-05:00",
                   "extra_float_digits": "2"},
    # node-postgres: its timeouts, then client_encoding (UTF8; older versions 'utf-8')
    "node-postgres": {"application_name": "node", "statement_timeout": "5000",
                      "lock_timeout": "2000", "idle_in_transaction_session_timeout": "9000",
                      "client_encoding": "UTF8"},
    "node-postgres-old": {"client_encoding": "'utf-8'"},
    # lib/pq (Go)
    "lib/pq": {"client_encoding": "UTF8", "datestyle": "ISO, MDY",
               "extra_float_digits": "2"},
    # asyncpg's own first parameter, with server_settings a user might add
    "asyncpg": {"client_encoding": "'utf-8'", "IntervalStyle": "iso_8601",
                "bytea_output": "hex", "default_transaction_isolation": "repeatable read",
                "standard_conforming_strings": "on", "geqo": "off", "work_mem": "8MB"},
}


@pytest.mark.parametrize("driver", DRIVERS)
def test_driver_startup_packets_connect_and_are_reported_back(pg, gproxy, driver):
    """What each driver sends connects, and the client gets the same ParameterStatus
    and settings as from Postgres directly (the same upstream role)."""
    asked = DRIVERS[driver]
    names = [k for k in asked if k != "application_name"]
    sql = "SELECT " + ", ".join(f"current_setting('{k}')" for k in names)
    got = {}
    for where, port, user, pw in (("proxy", gproxy.port, AGENT, AGENT_PASSWORD),
                                  ("direct", pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD)):
        c = RawClient.connect(port, user, pw, **asked)
        try:
            got[where] = (dict(c.params), rows(c.run(sql))[0])
        finally:
            c.close()
    assert got["proxy"] == got["direct"]


# -- identities not under a policy keep their settings (nothing parses their SQL) ------------

@pytest.mark.parametrize("client", CLIENTS)
def test_unguarded_identity_settings_pass_through(gproxy, client):
    out = via(client, gproxy, user=HUMAN, password=HUMAN_PASSWORD,
              options="-c standard_conforming_strings=off -e -c work-mem=5MB",
              params={"client_encoding": "LATIN1"},
              sql="SELECT current_setting('standard_conforming_strings'), "
                  "current_setting('client_encoding'), current_setting('DateStyle'), "
                  "current_setting('work_mem')")
    assert out == ("ok", ["off", "LATIN1", "ISO, DMY", "5MB"])


WHO = [
    ("-c role=postgres", {}, "startup setting role"),
    ("--session-authorization=postgres", {}, "startup setting session_authorization"),
    ("-c options=-crole=postgres", {}, "startup setting options"),
    ("-c database=template1", {}, "startup setting database"),
    ("", {"role": "postgres"}, "startup setting role"),
    ("", {"replication": "database"}, "startup setting replication"),
    ("", {"User": "postgres"}, "startup setting user"),
    ("", {"Database": "template1"}, "startup setting database"),
]
WHO_CASES = [(c, *w) for w in WHO for c in CLIENTS if not w[1] or c in ("asyncpg", "raw")]


@pytest.mark.parametrize("client, options, params, words", WHO_CASES)
def test_unguarded_identity_cannot_change_who_it_is(pg, gproxy, client, options, params,
                                                     words):
    mark = marker()
    out = via(client, gproxy, user=HUMAN, password=HUMAN_PASSWORD, options=options or None,
              params=params, app=mark)
    assert_refused(pg, out, mark, words)


@pytest.mark.parametrize("client", ["asyncpg", "raw"])
@pytest.mark.parametrize("options, words", [
    ("-c", "invalid command-line argument for server process: -c"),
    ("postgres", "invalid command-line argument for server process: postgres"),
    ("-c statement_timeout", "-c statement_timeout requires a value"),
    ("--lock_timeout", "--lock_timeout requires a value"),
    ("-Z 1", "invalid command-line argument for server process: -Z"),
    ("-- -c role=postgres", "invalid command-line argument for server process: -c"),
    ("-fq", "invalid command-line argument for server process: -fq"),
    ("-c =off", "invalid command-line argument for server process: -c =off"),
    ("--=x", "invalid command-line argument for server process: --=x"),
])
def test_malformed_options_fail_as_postgres_would(pg, gproxy, client, options, words):
    for user, pw in ((AGENT, AGENT_PASSWORD), (HUMAN, HUMAN_PASSWORD)):
        mark = marker()
        out = via(client, gproxy, user=user, password=pw, options=options, app=mark)
        assert_refused(pg, out, mark, words, sqlstate="42601")


# -- the options reader agrees with Postgres ------------------------------------------------

OPTIONS_CORPUS = [
    "-ec standard_conforming_strings=off",
    r"-c sess\ion_replication_role=replica",
    "-cSESSION_REPLICATION_ROLE=replica --Work-Mem=5MB",
    "-c search_path=pg_catalog,\\ public -c\tstatement_timeout=7",
    "-fs -fi -S 1234 -P",
    "-d 2 -tpa -tpl -te",
    "-s -d 0",
    "-c myapp.tenant=42 -c DateStyle=SQL,DMY -e",
    "-c statement_timeout=5 -c statement_timeout=6 -- ",
    r"-c application_name=a\\b\ c",
    "-Tn -c lock_timeout=3",
    r"-c\ session_replication_role=replica",
    "-c", "x", "-c statement_timeout", "-Z", "-- -c x=1", "-fq", "-tx", "-c =1", "--=1",
]


@pytest.mark.parametrize("options", OPTIONS_CORPUS)
def test_options_reader_agrees_with_postgres(pg, options):
    """Postgres given the raw options, and Postgres given the settings pgguard reads out of
    them as separate parameters (what pgguard sends for an identity not under a policy),
    end up with the same settings, or both refuse the connection."""
    from pgguard.errors import PgguardError
    from pgguard.proxy.startup import option_settings

    def attempt(params):
        # a list of pairs may repeat a name, as pgguard's upstream packet does
        pairs = list(params.items()) if isinstance(params, dict) else params
        pairs = [("user", UPSTREAM_USER), ("database", "postgres"), *pairs]
        body = struct.pack("!I", 196608) + b"".join(cstr(k) + cstr(v) for k, v in pairs) + b"\0"
        c = RawClient(socket.create_connection(("127.0.0.1", pg.port), timeout=10))
        c.send(struct.pack("!I", len(body) + 4) + body)
        try:
            c.auth(UPSTREAM_USER, UPSTREAM_PASSWORD)
        except LoginError as e:
            return "refused", e.fields.get("C")
        try:
            sql = "SELECT " + ", ".join(f"current_setting('{n}', true)" for n in names)
            return "ok", rows(c.run(sql))[0]
        finally:
            c.close()
    try:
        settings = option_settings(options)
    except PgguardError as e:
        names = ["work_mem"]
        assert attempt({"options": options})[0] == "refused"
        assert e.sqlstate == "42601"
        return
    mine = [(s.name, s.value) for s in settings if s.name]
    names = sorted({n for n, _ in mine}) or ["work_mem"]
    direct = attempt({"options": options})
    rebuilt = attempt(mine)
    assert direct == rebuilt
    if " session" not in options:
        assert direct[0] == "ok"
