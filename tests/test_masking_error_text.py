# Error and notice texts of statements that read masked columns: an allow-list. Only what
# provably carries no value is kept (SQLSTATE, severity, the condition's name, Postgres'
# messages that have no slot for a value); the rest is withheld, saying so. A value that
# stands in a message unquoted (chr, make_date, make_time...) never reaches the
# client; judged by every byte each client received (the clear values, their digits).
import pytest

import rawpg
from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER
from masking_tap import DB, SSNS, env_fixture, leaks
from test_masking_channels import run_mode, run_raw

env = env_fixture("errtext")

CLIENTS = ["psql", "psycopg-text", "psycopg-binary", "asyncpg-x3", "raw-simple",
           "raw-extended"]
WITHHELD = b"message withheld by pgguard: the statement read masked columns"

# (statement, SQLSTATE, condition name): customer 1's SSN 219-43-6571 in each message
UNQUOTED = [
    ("SELECT chr(replace(ssn, '-', '')::int) FROM customers WHERE id = 1", "54000",
     "program_limit_exceeded"),
    ("SELECT make_date(substr(ssn, 1, 3)::int, 13, 1) FROM customers WHERE id = 1",
     "22008", "datetime_field_overflow"),
    ("SELECT repeat('x', 1) FROM customers WHERE id = 1 AND "
     "chr(replace(ssn, '-', '')::int) > ''", "54000", "program_limit_exceeded"),
    ("SELECT make_time(substr(ssn, 5, 2)::int + 40, 0, 0) FROM customers WHERE id = 1",
     "22008", "datetime_field_overflow"),
    ("SELECT to_timestamp(replace(ssn, '-', '')::float8 * 1e9) FROM customers "
     "WHERE id = 1", "22008", "datetime_field_overflow"),
]


# volatile built-ins that keep their argument (a large object's OID, the random seed):
# refused before they run (masking.parking.sink_functions), so no error text at all
REFUSED = [
    "SELECT lo_get(replace(ssn, '-', '')::oid) FROM customers WHERE id = 1",
    "SELECT setseed(replace(ssn, '-', '')::float8) FROM customers WHERE id = 1",
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql", REFUSED)
def test_volatile_builtins_given_masked_values_are_refused(env, psql_bin, client, sql):
    msgs, codes = run_mode(client, env, sql, psql_bin)
    assert codes and set(codes) == {"42501"}, codes
    assert leaks(msgs) == [], (client, sql)
    digits = SSNS[0].replace("-", "")
    text = b"".join(p for t, p in msgs if t in (b"E", b"N"))
    assert not any(digits[i:i + 3].encode() in text for i in range(len(digits) - 2)), text


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("sql,code,name", UNQUOTED)
def test_unquoted_values_in_errors_are_withheld(env, psql_bin, client, sql, code, name):
    msgs, codes = run_mode(client, env, sql, psql_bin)
    assert codes and set(codes) == {code}, codes          # the error did reach the client
    assert leaks(msgs) == [], (client, sql, [m for m in msgs if m[0] in b"EN"])
    # not one digit run of the value either (3 digits and more of 219436571)
    digits = SSNS[0].replace("-", "")
    text = b"".join(p for t, p in msgs if t in (b"E", b"N"))
    assert not any(digits[i:i + 3].encode() in text for i in range(len(digits) - 2)), text
    for p in (p for t, p in msgs if t == b"E"):
        err = rawpg.error_fields(p)
        assert err["C"] == code
        assert err["M"] == f"{name}: {WITHHELD.decode()}", err
        assert "H" not in err and "W" not in err and "q" not in err, err


NOTICES = [
    # Postgres' own notices and warnings of a statement that read masked columns
    "SELECT ssn::varchar(3)::text FROM customers WHERE id = 1 AND "
    "to_regclass(replace(ssn, '-', '')) IS NULL",
    "DO $$BEGIN RAISE NOTICE 'v %', (SELECT replace(ssn, '-', '') FROM customers "
    "WHERE id = 1); END$$",
    "DO $$BEGIN RAISE WARNING USING MESSAGE = (SELECT ssn FROM customers LIMIT 1); END$$",
    "DO $$DECLARE s text; BEGIN SELECT email INTO s FROM customers WHERE id = 2; "
    "RAISE NOTICE USING MESSAGE = reverse(s); END$$",
    "DO $$BEGIN RAISE NOTICE '%', (SELECT encode(ssn::bytea, 'hex') FROM customers "
    "WHERE id = 1); END$$",
    "BEGIN; DECLARE rt_cur CURSOR FOR SELECT replace(ssn, '-', '') FROM customers; "
    "DO $$BEGIN RAISE NOTICE 'n'; END$$; "
    "SELECT chr(replace(ssn, '-', '')::int) FROM customers WHERE id = 1; ROLLBACK",
]


# several statements in one Query go through the clients that send it as one (psql,
# the raw simple protocol); the others prepare each statement on its own
_NOTICE_CASES = [(c, s) for s in NOTICES
                 for c in ("psql", "psycopg-text", "psycopg-binary", "asyncpg-x3",
                           "raw-simple")
                 if c in ("psql", "raw-simple") or not s.startswith("BEGIN")]


@pytest.mark.parametrize("client,sql", _NOTICE_CASES)
def test_notices_of_masked_statements_carry_no_value(env, psql_bin, client, sql):
    msgs, _ = run_mode(client, env, sql, psql_bin)
    assert leaks(msgs) == [], (client, sql, [m for m in msgs if m[0] in b"EN"])
    text = b"".join(p for t, p in msgs if t in (b"E", b"N"))
    assert b"219436571" not in text and b"6571" not in text, text


# -- what keeps its text
def test_messages_without_a_value_slot_are_kept(env):
    proxy, _ = env
    for sql, want in [
            ("SELECT 1 / (length(ssn) - length(ssn)) FROM customers", "division by zero"),
            ("SELECT (length(email) * 1000000000)::int FROM customers",
             "integer out of range"),
            ("SELECT (SELECT ssn FROM customers)", "more than one row returned by a "
             "subquery used as an expression")]:
        (err,) = rawpg.errors(run_raw(proxy.port, sql))
        assert err["M"] == want, err


@pytest.mark.parametrize("sql", [
    "SELECT chr(219436571)",
    "SELECT lo_get(219436571)",
    "SELECT make_date(219, 13, 1)",
    "SELECT setseed(219436571)",
    "SELECT chr(replace(body, ' ', '')::int) FROM plain_notes WHERE id = 3",
])
def test_untainted_errors_are_byte_identical(env, pg, sql):
    proxy, _ = env
    got = [p for t, p in run_raw(proxy.port, sql) if t == b"E"]
    c = rawpg.RawClient.connect(pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD, database=DB)
    try:
        want = [p for t, p in c.run(sql) if t == b"E"]
    finally:
        c.close()
    assert len(got) == 1 and got == want


def test_exempt_identity_sees_the_message(env):
    from masking_tap import connect
    proxy, _ = env
    c = connect(proxy.port, human=True)
    try:
        (err,) = rawpg.errors(c.run("SELECT chr(replace(ssn, '-', '')::int) FROM customers "
                                    "WHERE id = 1"))
    finally:
        c.close()
    assert err["M"] == "requested character too large for encoding: 219436571", err


def test_channels_unit_allow_list():
    from pgguard.masking.channels import Channels, build_fields, condition_name, \
        error_fields
    ch = Channels(None)
    base = [(ord("S"), b"ERROR"), (ord("V"), b"ERROR"), (ord("C"), b"22008"),
            (ord("F"), b"datetime.c"), (ord("L"), b"1"), (ord("R"), b"DateTimeParseError")]
    e = build_fields(ord("E"), base + [(ord("M"), b"date field value out of range: "
                                                  b"599-13-01"),
                                       (ord("H"), b"Perhaps 599-13-01"),
                                       (ord("D"), b"value 599")])
    got = dict(error_fields(ch.error(e, True)))
    assert got[ord("M")] == b"datetime_field_overflow: " + WITHHELD
    assert ord("H") not in got and b"599" not in got[ord("D")]
    assert got[ord("C")] == b"22008" and got[ord("F")] == b"datetime.c"
    assert ch.error(e, False) is e                      # untainted: the same bytes
    kept = build_fields(ord("E"), base + [(ord("M"), b"division by zero")])
    assert ch.error(kept, True) is kept
    n = build_fields(ord("N"), [(ord("S"), b"NOTICE"), (ord("C"), b"00000"),
                                (ord("M"), b"identifier 599316947 will be truncated"),
                                (ord("F"), b"scansup.c")])
    assert dict(error_fields(ch.error(n, True)))[ord("M")] == \
        b"successful_completion: " + WITHHELD
    assert condition_name("22P02") == "invalid_text_representation"
    assert condition_name(b"42P99") == "syntax_error_or_access_rule_violation"
