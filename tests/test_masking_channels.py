# Masking of every backend message that is not a row: ErrorResponse and NoticeResponse
# of statements that read masked columns (scrubbed, then scanned), NotificationResponse,
# ParameterStatus and FunctionCallResponse; in every client mode, every message checked
# for the clear values and their hex, base64, reversed, case and digits-only forms.
import asyncio
import struct

import asyncpg
import psycopg
import pytest

import rawpg
from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER
from masking_tap import DB, EMAILS, SSNS, connect, env_fixture, leaks, psql_messages, \
    types_seen


env = env_fixture("mask2ch")


def upstream(pg, sql):
    with psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, DB), autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description is not None else None


# -- running one statement in a client mode; every backend message comes from the tap

def run_psycopg(dsn, sql, binary=False, prepare=None, times=1, pre=()):
    errs = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: None)
        for p in pre:
            conn.execute(p)
        for _ in range(times):
            try:
                conn.cursor(binary=binary).execute(sql, prepare=prepare).fetchall()
            except psycopg.Error as e:
                errs.append(e.sqlstate)
    return errs


def run_asyncpg(dsn, sql, times=3, pre=()):
    async def go():
        conn = await asyncpg.connect(dsn)
        errs = []
        try:
            for p in pre:
                await conn.execute(p)
            for _ in range(times):
                try:
                    await conn.fetch(sql)
                except asyncpg.PostgresError as e:
                    errs.append(e.sqlstate)
        finally:
            await conn.close()
        return errs
    return asyncio.run(go())


def run_raw(port, sql, extended=False, later=False, pre=()):
    c = connect(port)
    try:
        out = [m for p in pre for m in c.run(p)]
        if not extended:
            return out + c.run(sql)
        if later:                   # Parse with its own Sync; Bind/Execute afterwards
            c.send(rawpg.parse(sql, "s1"), rawpg.SYNC)
            out += c.until_ready()
            c.send(rawpg.bind("s1"), rawpg.execute(), rawpg.SYNC)
            return out + c.until_ready()
        c.send(rawpg.parse(sql), rawpg.bind(), rawpg.describe(), rawpg.execute(),
               rawpg.SYNC)
        return out + c.until_ready()
    finally:
        c.close()


MODES = ["raw-simple", "raw-extended", "raw-parse-sync-later", "psycopg-text",
         "psycopg-binary", "psycopg-prepared-x3", "asyncpg-x3", "psql"]


def run_mode(mode, env, sql, psql_bin, pre=()):
    """Every backend message of running sql (after pre, in the same session) in a client
    mode, and the SQLSTATEs of the errors the client got."""
    proxy, tap = env
    tap.reset()
    if mode.startswith("raw-"):
        msgs = run_raw(proxy.port, sql, extended=mode != "raw-simple",
                       later=mode == "raw-parse-sync-later", pre=pre)
        return msgs, [e["C"] for e in rawpg.errors(msgs)]
    if mode == "psql":
        msgs = psql_messages(psql_bin, tap, "; ".join([*pre, sql]), check=False)
        return msgs, [e["C"] for e in rawpg.errors(msgs)]
    if mode == "asyncpg-x3":
        codes = run_asyncpg(tap.dsn(), sql, pre=pre)
    else:
        codes = run_psycopg(tap.dsn(), sql, binary=mode == "psycopg-binary",
                            prepare=True if mode == "psycopg-prepared-x3" else None,
                            times=3 if mode == "psycopg-prepared-x3" else 1, pre=pre)
    return tap.messages(), codes


# -- ErrorResponse / NoticeResponse of statements that read masked columns

ERRORS = [
    ("SELECT email::int FROM customers", "22P02"),
    ("SELECT ssn::date FROM customers ORDER BY id", "22008"),
    ("SELECT email::jsonb FROM customers", "22P02"),
    ("SELECT replace(email, '.', '_')::regclass FROM customers", "42P01"),
    ("SELECT to_date(ssn, 'YYYY-MM-DD') FROM customers", None),
    ("SELECT convert_from(decode(replace(ssn, '-', ''), 'hex'), 'UTF8') FROM customers",
     None),
    ("UPDATE customers SET email = (SELECT email FROM customers WHERE id = 2) WHERE id = 1",
     None),
    ("SELECT 1 / (length(email) - length(email)) FROM customers", "22012"),
    ("SELECT email::numeric FROM customers WHERE id = 3", "22P02"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sql,code", ERRORS)
def test_errors_of_masked_reads_are_scrubbed(env, pg, psql_bin, mode, sql, code):
    msgs, codes = run_mode(mode, env, sql, psql_bin)
    assert leaks(msgs) == [], (mode, sql, [m for m in msgs if m[0] in b"EN"])
    assert codes, (mode, sql)                       # the error did reach the client
    if code is not None and not mode.startswith("psql"):
        assert set(codes) == {code}, codes
    # the data did not change upstream (the UPDATE failed)
    assert upstream(pg, "SELECT email FROM customers ORDER BY id") == [(e,) for e in EMAILS]


SEQUENCES = [
    ["BEGIN", "DECLARE cc CURSOR FOR SELECT encode(email::bytea, 'hex')::int FROM customers",
     "FETCH cc", "ROLLBACK"],
    ["BEGIN", "DECLARE cd CURSOR FOR SELECT reverse(ssn)::int FROM customers",
     "FETCH 2 cd", "ROLLBACK"],
    ["BEGIN", "SELECT count(*) FROM customers",
     "DO $$ BEGIN RAISE EXCEPTION '%', (SELECT encode(email::bytea, 'base64') "
     "FROM customers LIMIT 1); END $$", "ROLLBACK"],
    ["PREPARE pp AS SELECT encode(email::bytea, 'hex')::int FROM customers", "EXECUTE pp",
     "DEALLOCATE pp"],
    ["BEGIN", "DECLARE ce CURSOR FOR SELECT upper(email)::date FROM customers",
     "MOVE 1 ce", "FETCH ce", "ROLLBACK"],
]


@pytest.mark.parametrize("seq", SEQUENCES)
def test_errors_of_later_statements_that_carry_masked_values(env, seq):
    proxy, _ = env
    c = connect(proxy.port)
    try:
        msgs = [m for sql in seq for m in c.run(sql)]
    finally:
        c.close()
    assert rawpg.errors(msgs), msgs
    assert [m for m in leaks(msgs) if m[0] != "D"] == [], msgs


def test_scrubbed_error_keeps_sqlstate_and_names_the_error(env):
    proxy, _ = env
    msgs = run_raw(proxy.port, "SELECT email::int FROM customers")
    (err,) = rawpg.errors(msgs)
    assert err["C"] == "22P02"
    assert err["M"] == ("invalid_text_representation: message withheld by pgguard: the "
                        "statement read masked columns")
    msgs = run_raw(proxy.port, "UPDATE customers SET email = 'wvbravo.4419@example.org' "
                               "WHERE id = 1")
    (err,) = rawpg.errors(msgs)
    assert err["C"] in ("23505", "42501"), err
    if err["C"] == "23505":
        assert err["D"] == "Key (***)=(***) already exists.", err
        assert err["n"] == "customers_email_key"


RAISES = [
    "DO $$ BEGIN RAISE EXCEPTION '%', (SELECT email FROM customers WHERE id = 1); END $$",
    "DO $$ BEGIN RAISE EXCEPTION 'x' USING DETAIL = (SELECT ssn FROM customers "
    "WHERE id = 2); END $$",
    "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '42703', MESSAGE = (SELECT upper(email) "
    "FROM customers WHERE id = 3); END $$",
    "DO $$ DECLARE r record; BEGIN FOR r IN SELECT email, ssn FROM customers LOOP "
    "RAISE NOTICE 'row % %', r.email, r.ssn; END LOOP; END $$",
    "DO $$ BEGIN RAISE WARNING '%', (SELECT reverse(ssn) FROM customers WHERE id = 1); END $$",
    "DO $$ BEGIN RAISE EXCEPTION 'h' USING HINT = (SELECT encode(email::bytea, 'hex') "
    "FROM customers WHERE id = 1); END $$",
    "DO $$ BEGIN RAISE EXCEPTION 'c' USING COLUMN = (SELECT email FROM customers "
    "WHERE id = 2); END $$",
]


@pytest.mark.parametrize("mode", ["raw-simple", "raw-extended", "psycopg-text",
                                  "asyncpg-x3", "psql"])
@pytest.mark.parametrize("sql", RAISES)
def test_raise_exception_and_notice_with_masked_values(env, mode, sql, psql_bin):
    msgs, _ = run_mode(mode, env, sql, psql_bin)
    assert leaks(msgs) == [], (mode, sql, [m for m in msgs if m[0] in b"EN"])
    assert types_seen(msgs) & {"E", "N"}, msgs     # the error or notice did arrive


UNMASKED_ERRORS = [
    "SELECT 1/0",
    "SELECT 'abc'::int",
    "SELECT nosuchcolumn FROM plain_notes",
    "SELECT * FROM no_such_table",
    "SELECT body::int FROM plain_notes WHERE id = 3",
    "DO $$ BEGIN RAISE EXCEPTION 'plain text % here', 42; END $$",
]


@pytest.mark.parametrize("sql", UNMASKED_ERRORS)
def test_errors_of_unmasked_statements_are_byte_identical(env, pg, sql):
    proxy, _ = env
    got = [p for t, p in run_raw(proxy.port, sql) if t == b"E"]
    c = rawpg.RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
    try:
        want = [p for t, p in c.run(sql) if t == b"E"]
    finally:
        c.close()
    assert len(got) == 1 and got == want


@pytest.mark.parametrize("sql", [
    "DO $$ BEGIN RAISE EXCEPTION 'contact zqalpha.7731@example.com'; END $$",
    "DO $$ BEGIN RAISE NOTICE 'ssn 219-43-6571'; END $$",
    "SELECT body::int FROM plain_notes WHERE id = 1",
    "SELECT body::int FROM plain_notes WHERE id = 2",
    "DO $$ BEGIN RAISE EXCEPTION 'x' USING DETAIL = 'mail wvbravo.4419@example.org'; END $$",
])
def test_detectors_scan_errors_of_unmasked_statements(env, sql):
    proxy, _ = env
    msgs = run_raw(proxy.port, sql)
    assert types_seen(msgs) & {"E", "N"}
    assert leaks(msgs) == [], msgs
    text = b"".join(p for t, p in msgs if t in (b"E", b"N"))
    assert b"[email]" in text or b"[ssn]" in text


def test_refusals_stay_intact(env, pg, make_proxy):
    # pgguard's own 42501 (a binary COPY of masked data) keeps its message and hint
    proxy, _ = env
    msgs = run_raw(proxy.port, "COPY customers TO STDOUT (FORMAT binary)")
    (err,) = rawpg.errors(msgs)
    assert err["C"] == "42501" and err["M"].startswith('pgguard: statement refused by rule '
                                                       '"masking"')
    assert "HINT" not in err and err.get("H", "").startswith("Use SELECT")


# -- NotificationResponse

NOTIFIES = [
    "SELECT pg_notify('chan', email) FROM customers WHERE id = 1",
    "SELECT pg_notify('chan', ssn) FROM customers WHERE id = 2",
    "SELECT pg_notify('chan', upper(email)) FROM customers WHERE id = 3",
    "SELECT pg_notify('chan', 'v=' || replace(ssn, '-', '')) FROM customers WHERE id = 1",
    "SELECT pg_notify('chan', encode(email::bytea, 'base64')) FROM customers WHERE id = 2",
    "SELECT pg_notify('chan', reverse(email)) FROM customers WHERE id = 1",
]


@pytest.mark.parametrize("txn", [False, True])
@pytest.mark.parametrize("sql", NOTIFIES)
def test_notification_payloads_of_masked_reads(env, sql, txn):
    proxy, _ = env
    c = connect(proxy.port)
    try:
        msgs = c.run("LISTEN chan")
        if txn:
            msgs += c.run("BEGIN") + c.run(sql) + c.run("COMMIT")
        else:
            msgs += c.run(sql)
    finally:
        c.close()
    # pg_notify of a masked value is parking (a payload reaches every listener, the
    # agent's other sessions too): refused, nothing delivered, nothing leaks
    notes = [p for t, p in msgs if t == b"A"]
    errs = [p for t, p in msgs if t == b"E"]
    assert notes == [], msgs
    assert errs and b"C42501\0" in errs[0] and b'rule "masking"' in errs[0], msgs
    assert leaks(msgs) == [], msgs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sql", NOTIFIES[:3] + NOTIFIES[4:])
def test_notification_payloads_in_client_modes(env, psql_bin, mode, sql):
    msgs, codes = run_mode(mode, env, sql, psql_bin, pre=["LISTEN chan"])
    # refused as parking in every mode (a statement whose Parse was refused is then
    # unknown to a later Bind: 26000, as Postgres would answer)
    assert codes and codes[0] == "42501" and set(codes) <= {"42501", "26000"}, codes
    notes = [p for t, p in msgs if t == b"A"]
    assert notes == [], msgs                        # nothing delivered
    assert leaks(msgs) == [], msgs


def test_notification_from_another_session_is_scanned(env, pg):
    proxy, _ = env
    c = connect(proxy.port)
    try:
        c.run("LISTEN chan2")
        upstream(pg, "SELECT pg_notify('chan2', 'mail zqalpha.7731@example.com ssn "
                     "219-43-6571 end')")
        upstream(pg, "SELECT pg_notify('chan2', 'plain payload')")
        msgs = c.run("SELECT 1")
    finally:
        c.close()
    notes = [p for t, p in msgs if t == b"A"]
    assert len(notes) == 2 and leaks(msgs) == []
    assert notes[0].endswith(b"chan2\0mail [email] ssn [ssn] end\0")
    assert notes[1].endswith(b"chan2\0plain payload\0")


# -- ParameterStatus

SETTINGS = [
    "SELECT set_app(email) FROM customers WHERE id = 1",
    "SELECT set_app(ssn) FROM customers WHERE id = 2",
    "SELECT set_app(lower(email)) FROM customers WHERE id = 3",
    "SELECT set_app(reverse(ssn)) FROM customers WHERE id = 1",
    "SELECT set_app(encode(email::bytea, 'hex')) FROM customers WHERE id = 2",
    "SELECT set_app(encode(ssn::bytea, 'base64')) FROM customers WHERE id = 3",
]


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("sql", SETTINGS)
def test_parameter_status_of_masked_reads(env, pg, sql, extended):
    proxy, _ = env
    c = connect(proxy.port)
    try:
        if extended:
            c.send(rawpg.parse(sql, "p"), rawpg.SYNC)
            msgs = c.until_ready()
            c.send(rawpg.bind("p"), rawpg.execute(), rawpg.SYNC)
            msgs += c.until_ready()
        else:
            msgs = c.run(sql)
        # set_app is a user function given masked values: refused as parking (see
        # test_masking_udf_sinks.py); the session's application_name stays clean
        apps = upstream(pg, "SELECT application_name FROM pg_stat_activity WHERE "
                            "application_name ~ '[@0-9]'")
        assert apps == [], apps
    finally:
        c.close()
    assert leaks(msgs) == [], msgs
    assert [e["C"] for e in rawpg.errors(msgs)][:1] == ["42501"], msgs
    statuses = [p for t, p in msgs if t == b"S"]
    assert statuses == [], msgs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sql", SETTINGS[:5])
def test_parameter_status_in_client_modes(env, psql_bin, mode, sql):
    msgs, codes = run_mode(mode, env, sql, psql_bin)
    # refused as parking (a user function given masked values) in every mode
    assert codes and codes[0] == "42501" and set(codes) <= {"42501", "26000"}, codes
    statuses = [p for t, p in msgs if t == b"S" and p.startswith(b"application_name\0")]
    assert leaks(msgs) == [], msgs
    assert b"application_name\0****\0" not in statuses, statuses


def test_parameter_status_of_unmasked_statements_untouched(env):
    proxy, _ = env
    c = connect(proxy.port)
    try:
        # (SET, not set_app(): a function that computes application_name is refused by
        # the settings check, which judges what a called function's body runs)
        msgs = c.run("SET application_name = 'my-tool'")
        msgs += c.run("SET application_name = 'mail zqalpha.7731@example.com'")
    finally:
        c.close()
    statuses = [p for t, p in msgs if t == b"S"]
    assert statuses == [b"application_name\0my-tool\0",
                        b"application_name\0mail [email]\0"], msgs


ZONES = ["America/New_York", "Asia/Kolkata", "UTC", "Etc/GMT+5", "America/Argentina/Salta"]


@pytest.mark.parametrize("zone", ZONES)
def test_time_zone_reported_in_a_transaction_that_read_masked_columns(env, zone):
    """A zone name is what clients decode every timestamptz by: it is reported as set,
    while application_name set in the same place is still withheld."""
    proxy, _ = env
    c = connect(proxy.port)
    try:
        msgs = c.run("BEGIN")
        msgs += c.run("SELECT name FROM customers WHERE id = 1")
        msgs += c.run(f"SET TIME ZONE '{zone}'")
        msgs += c.run("SET application_name = 'tool-7'")
        msgs += c.run("COMMIT")
    finally:
        c.close()
    statuses = [p for t, p in msgs if t == b"S"]
    assert f"TimeZone\0{zone}\0".encode() in statuses, statuses
    assert b"application_name\0****\0" in statuses, statuses


def test_time_zone_through_clients_after_masked_reads(env):
    proxy, _ = env
    with psycopg.connect(proxy.dsn(dbname=DB)) as conn:
        conn.execute("SELECT email FROM customers").fetchall()
        conn.execute("SET TIME ZONE 'America/New_York'")
        ts = conn.execute("SELECT '2026-01-15 12:00:00+00'::timestamptz").fetchone()[0]
        assert conn.info.parameter_status("TimeZone") == "America/New_York"
    assert ts.utcoffset().total_seconds() == -5 * 3600, ts

    async def go():
        c = await asyncpg.connect(proxy.dsn(dbname=DB))
        try:
            async with c.transaction():
                await c.fetch("SELECT ssn FROM customers")
                await c.execute("SET TIME ZONE 'Asia/Kolkata'")
            return c.get_settings().TimeZone
        finally:
            await c.close()
    assert asyncio.run(go()) == "Asia/Kolkata"


def test_time_zone_not_a_zone_name_stays_withheld(env):
    proxy, _ = env
    c = connect(proxy.port)
    try:
        msgs = c.run("BEGIN")
        msgs += c.run("SELECT name FROM customers WHERE id = 1")
        msgs += c.run("SET TIME ZONE 'XXX7'")             # a POSIX spec: any letters
        msgs += c.run("ROLLBACK")
    finally:
        c.close()
    statuses = [p for t, p in msgs if t == b"S" and p.startswith(b"TimeZone\0")]
    # (the ROLLBACK's own report of the zone it restores is not tainted)
    assert statuses and statuses[0] == b"TimeZone\0****\0", statuses


# -- FunctionCallResponse

def _fn_oid(pg, name):
    return upstream(pg, f"SELECT '{name}'::regproc::oid")[0][0]


@pytest.mark.parametrize("fn,arg,clear", [
    ("cust_email(int)", b"1", EMAILS[0]),
    ("cust_email(int)", b"2", EMAILS[1]),
    ("cust_ssn(int)", b"1", SSNS[0]),
    ("cust_ssn(int)", b"3", SSNS[2]),
    ("cust_email(int)", b"3", EMAILS[2]),
    ("cust_hex(int)", b"1", EMAILS[0].encode().hex()),
    ("cust_hex(int)", b"2", EMAILS[1].encode().hex()),
])
def test_function_call_results(env, pg, fn, arg, clear):
    proxy, _ = env
    oid = upstream(pg, f"SELECT 'public.{fn}'::regprocedure::oid")[0][0]
    # the truth upstream: the function returns the clear value
    assert upstream(pg, f"SELECT public.{fn.replace('(int)', '')}({arg.decode()})") == \
        [(clear,)]
    c = connect(proxy.port)
    try:
        c.send(rawpg.function_call(oid, [arg]))
        msgs = c.until_ready()
    finally:
        c.close()
    assert leaks(msgs) == [], msgs
    results = [p for t, p in msgs if t == b"V"]
    assert len(results) == 1, msgs
    for p in results:
        (n,) = struct.unpack_from("!i", p)
        assert n == 4 and p[4:] == b"****", p


# -- exempt identities see clear values in the channels too

def test_exempt_identity_errors_untouched(env, pg):
    proxy, _ = env
    c = connect(proxy.port, human=True)
    try:
        msgs = c.run("SELECT email::int FROM customers WHERE id = 1")
    finally:
        c.close()
    (err,) = rawpg.errors(msgs)
    # alice is exempt from the masks, not from the detectors: the message is not
    # scrubbed, the email detector still labels the value
    assert err["M"] == 'invalid input syntax for type integer: "[email]"'


@pytest.mark.parametrize("fn,arg,want", [
    ("pg_catalog.reverse(text)", b"abc", b"cba"),
    ("pg_catalog.quote_literal(text)", b"x", b"'x'"),
    ("pg_catalog.md5(text)", b"a", b"0cc175b9c0f1b6a831c399e269772661"),
    ("pg_catalog.length(text)", b"hello", b"5"),
    ("pg_catalog.btrim(text)", b"  pad  ", b"pad"),
])
def test_function_call_of_builtins_untouched(env, pg, fn, arg, want):
    proxy, _ = env
    oid = upstream(pg, f"SELECT '{fn}'::regprocedure::oid")[0][0]
    c = connect(proxy.port)
    try:
        c.send(rawpg.function_call(oid, [arg]))
        msgs = c.until_ready()
    finally:
        c.close()
    assert [p[4:] for t, p in msgs if t == b"V"] == [want], msgs


def test_channels_unit():
    # the scrubbing itself, message by message
    from pgguard.masking.channels import Channels, build_fields, error_fields
    from pgguard.masking.detectors import DetectorSet
    ch = Channels(DetectorSet.from_config(["email", "ssn"], []))
    own = build_fields(ord("E"), [(ord("S"), b"ERROR"), (ord("C"), b"42501"),
                                  (ord("M"), b"pgguard: refused 219-43-6571")])
    assert ch.error(own, True) is own                   # no 'F': pgguard's own
    pg_err = build_fields(ord("E"), [
        (ord("S"), b"ERROR"), (ord("C"), b"22P02"),
        (ord("M"), b'invalid input syntax for type integer: "a"b@x.io"'),
        (ord("W"), b"SQL function f"), (ord("F"), b"numutils.c"), (ord("L"), b"1"),
        (ord("R"), b"pg_strtoint32_safe")])
    got = dict(error_fields(ch.error(pg_err, True)))
    assert got[ord("M")] == b"invalid_text_representation: message withheld by " \
                            b"pgguard: the statement read masked columns"
    assert ord("W") not in got and got[ord("C")] == b"22P02"
    assert ch.error(pg_err, False) != pg_err            # the detectors still label it
    raise_err = build_fields(ord("E"), [
        (ord("S"), b"ERROR"), (ord("C"), b"P0001"), (ord("M"), b"kxcharlie"),
        (ord("c"), b"secret"), (ord("F"), b"pl_exec.c"), (ord("R"), b"exec_stmt_raise")])
    got = dict(error_fields(ch.error(raise_err, True)))
    assert got[ord("M")].startswith(b"plpgsql_error: message withheld")
    assert ord("c") not in got
    plain = build_fields(ord("N"), [(ord("S"), b"NOTICE"), (ord("C"), b"00000"),
                                    (ord("M"), b"hello"), (ord("F"), b"x.c")])
    assert ch.error(plain, False) is plain


def masked_proxy(pg, make_proxy, rules: str):
    from masking_tap import MASKS, seed
    seed(pg)
    return make_proxy(extra=MASKS + rules)


def test_approval_notice_and_timeout_refusal_intact(pg, make_proxy):
    # the approval notice and the timed-out refusal are pgguard's own: not scrubbed,
    # although the held statement reads a masked table
    p = masked_proxy(pg, make_proxy, """
[[rules]]
name = "customers-need-approval"
when = { kind = "agent", statements = ["update"], relations = ["public.customers"] }
action = "approve"
timeout = "1s"
""")
    c = connect(p.port)
    try:
        msgs = c.run("UPDATE customers SET city = 'Paris' WHERE id = 1")
    finally:
        c.close()
    notices = [rawpg.error_fields(pl) for t, pl in msgs if t == b"N"]
    assert notices and "waiting for approval #" in notices[0]["M"], msgs
    (err,) = rawpg.errors(msgs)
    assert err["C"] == "42501" and "***" not in err["M"], err
    assert "timed out" in err["M"] and "customers-need-approval" in err["M"], err
    assert upstream(pg, "SELECT city FROM customers WHERE id = 1") == [("London",)]


def test_blast_radius_refusal_intact(pg, make_proxy):
    p = masked_proxy(pg, make_proxy, """
[[rules]]
name = "customers-small-updates"
when = { kind = "agent", statements = ["update"], relations = ["public.customers"] }
action = "allow"
max_rows = 1
""")
    c = connect(p.port)
    try:
        msgs = c.run("UPDATE customers SET city = upper(city) WHERE id > 0")
    finally:
        c.close()
    (err,) = rawpg.errors(msgs)
    assert err["C"] == "42501" and "blast-radius" in err["M"], err
    assert "it changed 3 rows" in err["M"] and "customers-small-updates" in err["D"], err
    assert upstream(pg, "SELECT city FROM customers ORDER BY id") == [
        ("London",), ("New York",), ("Austin",)]
