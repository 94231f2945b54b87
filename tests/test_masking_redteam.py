# Red team of masking: shapes an attacker tries that the shared corpus lacks, through
# every client mode plus COPY (simple and extended protocol), and the corpus itself
# through COPY; then the session-state tricks a statement table cannot express: SQL
# PREPARE bound over the protocol, DEALLOCATE and re-Parse, scroll cursors read
# backwards, cursors WITH HOLD, portals suspended and resumed after a Sync, RETURNING
# of an allowed UPDATE, MERGE. Judged by the bytes the client receives (every message:
# DataRow, CopyData, ErrorResponse, NoticeResponse, NotificationResponse,
# ParameterStatus) against the seeded values in every form (mask_corpus.leaks), and by
# Postgres itself for the columns that must come back unchanged.
import asyncio

import asyncpg
import psycopg
import pytest
import rawpg
from mask_corpus import (
    REFUSED,
    copy_mode,
    CLEAN,
    DB,
    MASKS,
    MODES,
    SHAPES,
    Shape,
    check,
    direct_mode,
    leaks,
    raw_connect,
    run_mode,
    seed,
)

S = Shape
# new shapes by class; (secret columns), (clean columns)
NEW_SHAPES = [
    # lateral joins
    S("lateral2", "SELECT l.x FROM customers c, LATERAL (SELECT upper(c.email) AS x OFFSET 0) l"
                  " ORDER BY c.id", (0,)),
    S("lateral2", "SELECT t FROM customers c, LATERAL regexp_split_to_table(c.ssn, '-') t "
                  "ORDER BY c.id, t", (0,)),
    S("lateral2", "SELECT c.id, k.v FROM customers c LEFT JOIN LATERAL (SELECT c.phone || "
                  "c.ssn AS v) k ON true ORDER BY c.id", (1,), (0,)),
    # window functions
    S("window2", "SELECT string_agg(ssn, ',') OVER (ORDER BY id) FROM customers ORDER BY id",
      (0,)),
    S("window2", "SELECT nth_value(email, 2) OVER (ORDER BY id ROWS BETWEEN UNBOUNDED "
                 "PRECEDING AND UNBOUNDED FOLLOWING), id FROM customers ORDER BY id", (0,),
      (1,)),
    S("window2", "SELECT max(phone) OVER (PARTITION BY id % 2), id FROM customers ORDER BY id",
      (0,), (1,)),
    # recursive CTEs
    S("recursive", "WITH RECURSIVE r(i, ch) AS (SELECT 1, substr((SELECT ssn FROM customers "
                   "WHERE id = 1), 1, 1) UNION ALL SELECT i + 1, substr((SELECT ssn FROM "
                   "customers WHERE id = 1), i + 1, 1) FROM r WHERE i < 11) "
                   "SELECT string_agg(ch, '' ORDER BY i) FROM r", (0,)),
    S("recursive", "WITH RECURSIVE r(v) AS (SELECT email FROM customers UNION SELECT "
                   "lower(v) FROM r) SELECT v FROM r ORDER BY v", (0,)),
    # SEARCH / CYCLE columns carry the CTE's values as records (PostgreSQL 14+)
    S("recursive", "WITH RECURSIVE t(i, s) AS (SELECT id, ssn FROM customers UNION ALL "
                   "SELECT i + 10, s FROM t WHERE i < 5) SEARCH DEPTH FIRST BY s SET oc "
                   "SELECT oc, i FROM t ORDER BY i", (0,)),
    S("recursive", "WITH RECURSIVE t(i, e) AS (SELECT id, email FROM customers UNION ALL "
                   "SELECT i + 10, e FROM t WHERE i < 5) CYCLE e SET c USING p "
                   "SELECT p::text, c, i FROM t ORDER BY i", (0,)),
    # set-returning functions over masked columns
    S("srf", "SELECT unnest(string_to_array(email, '@')) FROM customers ORDER BY 1", (0,)),
    S("srf", "SELECT regexp_matches(ssn, '(\\d+)-(\\d+)-(\\d+)') FROM customers ORDER BY 1",
      (0,)),
    S("srf", "SELECT substr(c.ssn, g, 4) FROM customers c, generate_series(1, 8) g "
             "ORDER BY c.id, g", (0,)),
    # (a record expanded from a masked table's whole rows: every column masked)
    S("srf", "SELECT x.* FROM unnest((SELECT array_agg(c ORDER BY c.id) FROM customers c)) x",
      (2, 3, 4)),
    S("srf", "SELECT (unnest(ARRAY[c])).ssn FROM customers c ORDER BY 1", (0,)),
    # whole rows in JSON / hstore / records
    S("rowjson", "SELECT row_to_json(t) FROM (SELECT email, ssn FROM customers) t", (0,)),
    S("rowjson", "SELECT to_jsonb(t) FROM (SELECT id, ssn FROM customers) t ORDER BY 1",
      (0,)),
    S("rowjson", "SELECT json_agg(c ORDER BY id) FROM customers c", (0,)),
    S("rowjson", "SELECT jsonb_object_agg(id, ssn) FROM customers", (0,)),
    S("rowjson", "SELECT jsonb_path_query(to_jsonb(c), '$.ssn') FROM customers c ORDER BY 1",
      (0,)),
    S("rowjson", "SELECT * FROM json_populate_record(null::customers, (SELECT row_to_json(c) "
                 "FROM customers c WHERE id = 1))", (2, 3, 4)),
    # aggregates and string building
    S("strings", "SELECT string_agg(email, ';' ORDER BY id) FROM customers", (0,)),
    S("strings", "SELECT format('%L', ssn), format('%I', email) FROM customers ORDER BY id",
      (0, 1)),
    S("strings", "SELECT regexp_replace(ssn, '(\\d)', '\\1 ', 'g') FROM customers ORDER BY id",
      (0,)),
    S("strings", "SELECT overlay(email placing 'X' from 1 for 1) FROM customers ORDER BY id",
      (0,)),
    S("strings", "SELECT translate(email, 'aeiou', 'AEIOU') FROM customers ORDER BY id", (0,)),
    S("strings", "SELECT quote_literal(email), quote_ident(ssn) FROM customers ORDER BY id",
      (0, 1)),
    S("strings", "SELECT array_to_string(ARRAY(SELECT ssn FROM customers ORDER BY id), ',')",
      (0,)),
    S("strings", "SELECT to_tsvector('simple', email) FROM customers ORDER BY id", (0,)),
    # one-way values: masked too (the README: a value derived from a masked column)
    S("oneway", "SELECT md5(email), strpos(ssn, '-') FROM customers ORDER BY id", (0, 1)),
    S("oneway", "SELECT hashtext(ssn), id FROM customers ORDER BY id", (0,), (1,)),
    # xml built from values
    S("xml", "SELECT xmlelement(name e, email) FROM customers ORDER BY id", (0,)),
    S("xml", "SELECT xmlforest(email, ssn), id FROM customers ORDER BY id", (0,), (1,)),
    # other ways to name the table
    S("tablecmd", "TABLE customers", (2, 3, 4), (0, 1, 5)),
    S("tablecmd", "SELECT * FROM ONLY customers TABLESAMPLE SYSTEM (100) ORDER BY id",
      (2, 3, 4), (0, 1, 5)),
    S("tablecmd", "VALUES ((SELECT ssn FROM customers WHERE id = 1))", (0,)),
    S("tablecmd", "SELECT DISTINCT ON (id) ssn, id FROM customers ORDER BY id", (0,), (1,)),
    S("tablecmd", "SELECT email, count(*) FROM customers GROUP BY ROLLUP (email) ORDER BY 1",
      (0,)),
    S("tablecmd", "SELECT email COLLATE \"C\" FROM customers ORDER BY id", (0,)),
    S("tablecmd", "SELECT pg_catalog.textin(pg_catalog.textout(ssn)) FROM customers "
                  "ORDER BY id", (0,)),
]

assert len(NEW_SHAPES) >= 30

# SQL text run inside a function: no lineage can see into it; refused (42501)
SQL_TEXT = [
    "SELECT query_to_xml('SELECT ssn FROM customers', true, false, '')",
    "SELECT table_to_xml('customers', true, false, '')",
    ("SELECT xpath('/row/email/text()', query_to_xml('SELECT email FROM customers "
     "WHERE id = 1', false, false, ''))"),
    "SELECT query_to_xml_and_xmlschema('SELECT email FROM customers', true, false, '')",
    "SELECT schema_to_xml('public', true, false, '')",
]

COPY_MODES = ["copy-simple", "copy-extended"]

# a table that holds whole rows of the masked table (wrap.c customers, wrap.cs
# customers[]) copied by name: no masked column of its own
COPY_TABLES = [
    "COPY wrap TO STDOUT",
    "COPY wrap (c) TO STDOUT",
    "COPY public.wrap (id, cs) TO STDOUT (FORMAT csv, HEADER true)",
    "COPY wrap TO STDOUT (FORMAT csv)",
    "COPY (SELECT * FROM wrap) TO STDOUT",
    "COPY (SELECT (w.c).email FROM wrap w) TO STDOUT (FORMAT csv)",
]


@pytest.fixture(scope="module")
def rproxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-redteam"), extra=MASKS).start()
    yield p
    p.stop()


@pytest.fixture
def hstore(pg):
    # only for the tests that use it: hstore's operators (=, ||, ->) live outside
    # pg_catalog, and the lineage treats every use of those names as opaque (masked),
    # which masks 'a' || 'b' and asyncpg's type lookups while it is installed
    pg.execute("CREATE EXTENSION IF NOT EXISTS hstore", dbname=DB)
    yield
    pg.execute("DROP EXTENSION IF EXISTS hstore CASCADE", dbname=DB)


def _run(mode, proxy, sql, psql_bin):
    if mode in COPY_MODES:
        return copy_mode(proxy, sql, mode == "copy-extended")
    return run_mode(mode, proxy, sql, psql_bin)


@pytest.mark.parametrize("mode", MODES + COPY_MODES)
@pytest.mark.parametrize("shape", NEW_SHAPES, ids=lambda s: s.id)
def test_new_shapes(rproxy, pg, psql_bin, mode, shape):
    got, blob = _run(mode, rproxy, shape.sql, psql_bin)
    direct = direct_mode(pg, mode, shape.sql) if got is not None else None
    check(shape, got, blob, direct)


# an extension type (hstore) of a whole row. Not through asyncpg: while hstore is
# installed its type lookup query comes back masked through pgguard (the lineage treats
# operators by name, and hstore has an = outside pg_catalog), so asyncpg cannot decode
# a non-built-in type (over-masking, no leak; see the report)
HSTORE = [S("rowjson", "SELECT hstore(c) FROM customers c ORDER BY id", (0,)),
          S("rowjson", "SELECT hstore(c) -> 'ssn', id FROM customers c ORDER BY id", (0,),
            (1,)),
          S("rowjson", "SELECT each(hstore(c)) FROM customers c ORDER BY 1", (0,)),
          S("rowjson", "SELECT akeys(hstore(c)), avals(hstore(c)) FROM customers c "
                       "ORDER BY id", (1,)),
          S("rowjson", "SELECT hstore_to_json(hstore(c)) FROM customers c ORDER BY id",
            (0,))]


@pytest.mark.parametrize("mode", [m for m in MODES if not m.startswith("asyncpg")]
                         + COPY_MODES)
@pytest.mark.parametrize("shape", HSTORE, ids=lambda s: s.id)
def test_hstore_of_whole_rows(rproxy, hstore, pg, psql_bin, mode, shape):
    # hstore's functions are outside pg_catalog: given masked values (a whole row), the
    # statement is refused as parking (test_masking_udf_sinks.py judges every client)
    try:
        got, blob = _run(mode, rproxy, shape.sql, psql_bin)
    except (AssertionError, psycopg.Error) as e:
        # (raw-later / pipeline: the refused Parse's later Bind answers 26000)
        # (a named cursor over code pgguard cannot read is refused first: its rows are
        # fetched where the row limit cannot measure them)
        assert ('rule "masking"' in str(e) and "hstore()" in str(e)) or \
            "'C': '26000'" in str(e) or (
                mode == "psycopg-named" and 'rule "blast-radius"' in str(e)), e
        assert not any(v in str(e) for v in ("@example", "-43-", "-67-", "-88-")), e
        return
    direct = direct_mode(pg, mode, shape.sql) if got is not None else None
    check(shape, got, blob, direct)


@pytest.mark.parametrize("mode", COPY_MODES)
@pytest.mark.parametrize("shape", SHAPES + CLEAN, ids=lambda s: s.id)
def test_corpus_through_copy(rproxy, psql_bin, mode, shape):
    got, blob = _run(mode, rproxy, shape.sql, psql_bin)
    errs = rawpg.errors(blob) if got is not REFUSED else []
    if errs and all('rule "masking"' in e.get("M", "") for e in errs):
        got = REFUSED           # (round 16: a COPY whose rows masked values count)
    assert got is REFUSED or not errs, errs
    check(shape, got, blob, None)


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("sql", SQL_TEXT)
def test_sql_text_functions_are_refused(rproxy, sql, extended):
    c = raw_connect(rproxy)
    try:
        if extended:
            c.send(rawpg.parse(sql, name="x"), rawpg.SYNC)
            msgs = c.until_ready()
            c.send(rawpg.bind("x"), rawpg.execute(), rawpg.SYNC)
            msgs += c.until_ready()
        else:
            c.send(rawpg.query(sql))
            msgs = c.until_ready()
        assert rawpg.rows(msgs) == []
        assert rawpg.errors(msgs)[0]["C"] == "42501", rawpg.errors(msgs)
        assert leaks(msgs) == []
    finally:
        c.close()


# -- session state: names that change meaning behind the proxy's back -----------------

MASKED_SQL = [
    "SELECT ssn || '' FROM customers ORDER BY id",
    "SELECT upper(email) FROM customers ORDER BY id",
    "SELECT c FROM customers c ORDER BY id",
    "SELECT replace(phone, '-', '') FROM customers ORDER BY id",
    "SELECT get_byte(ssn::bytea, 0) FROM customers ORDER BY id",
]
CLEAN_SQL = "SELECT name FROM customers ORDER BY id"
NAMES = [[b"Ann"], [b"Bob"], [b"Cyd"]]


def _send(c, *frames):
    c.send(*frames)
    return c.until_ready()


def _one(c, sql, extended):
    """``sql`` as a Query, or through Parse/Bind/Execute/Sync; every message."""
    if extended:
        return _send(c, rawpg.parse(sql), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
    return _send(c, rawpg.query(sql))


def _steps(c, steps):
    """Send each step (a tuple of frames) and read its answer; stop when the session
    ends. (messages received, whether it ended)"""
    msgs = []
    for frames in steps:
        try:
            c.send(*frames)
            msgs += c.until_ready()
        except (ConnectionError, OSError, EOFError):
            return msgs, True
    return msgs, False


def _bind_exec(name):
    return (rawpg.bind(name), rawpg.execute(), rawpg.SYNC)


@pytest.mark.parametrize("sql", MASKED_SQL)
def test_sql_prepare_bound_over_the_protocol(rproxy, sql):
    # PREPARE in SQL, then Bind/Execute of that name over the protocol: pgguard asks
    # Postgres for its row shape at the Bind, and the rows take the PREPARE's plan;
    # never in clear, and the session goes on
    c = raw_connect(rproxy)
    try:
        msgs, ended = _steps(c, [(rawpg.query(f"PREPARE sq AS {sql}"),)]
                             + [_bind_exec("sq")] * 3)
        assert not ended and len(rawpg.rows(msgs)) == 9 and leaks(msgs) == [], msgs
    finally:
        c.close()
    # the reverse: a protocol statement run by SQL EXECUTE: masked as unresolved
    c = raw_connect(rproxy)
    try:
        msgs, ended = _steps(c, [(rawpg.parse(sql, name="pq"), rawpg.SYNC)]
                             + [(rawpg.query("EXECUTE pq"),)] * 3)
        assert not ended and len(rawpg.rows(msgs)) == 9 and leaks(msgs) == [], msgs
    finally:
        c.close()


SWAPS = [
    # DEALLOCATE and PREPARE in SQL under a name parsed over the protocol
    lambda sql: [(rawpg.query("DEALLOCATE sw"),), (rawpg.query(f"PREPARE sw AS {sql}"),)],
    # the same in one Query
    lambda sql: [(rawpg.query(f"DEALLOCATE sw; PREPARE sw AS {sql}"),)],
    # DEALLOCATE ALL
    lambda sql: [(rawpg.query("DEALLOCATE ALL"),), (rawpg.query(f"PREPARE sw AS {sql}"),)],
    # DEALLOCATE and PREPARE themselves parsed over the protocol
    lambda sql: [(rawpg.parse("DEALLOCATE sw"), rawpg.bind(), rawpg.execute(), rawpg.SYNC),
                 (rawpg.parse(f"PREPARE sw AS {sql}"), rawpg.bind(), rawpg.execute(),
                  rawpg.SYNC)],
    # DEALLOCATE PREPARE sw, in a pipeline with the PREPARE
    lambda sql: [(rawpg.query("DEALLOCATE PREPARE sw"), rawpg.query(f"PREPARE sw AS {sql}"))],
    # DISCARD ALL, then PREPARE in a Query of two statements
    lambda sql: [(rawpg.query("DISCARD ALL"),),
                 (rawpg.query(f"SELECT 1; PREPARE sw AS {sql}"),)],
]


@pytest.mark.parametrize("swap", range(len(SWAPS)))
@pytest.mark.parametrize("sql", MASKED_SQL)
def test_name_swapped_by_sql_after_a_clean_parse(rproxy, sql, swap):
    # a clean protocol statement, replaced in SQL under the same name by a masked read,
    # then bound over the protocol: its old (clean) plan must not apply
    c = raw_connect(rproxy)
    try:
        msgs, ended = _steps(c, [(rawpg.parse(CLEAN_SQL, name="sw"), rawpg.SYNC)])
        first, _ = _steps(c, [_bind_exec("sw")])
        assert rawpg.rows(first) == NAMES
        steps = SWAPS[swap](sql)
        if swap == 4:
            c.send(*steps[0])
            msgs += c.until_ready(2)
            steps = []
        more, ended = _steps(c, steps + [_bind_exec("sw")] * 2)
        msgs += more
        assert leaks(msgs) == [], msgs
        # the new statement's rows come back masked, or the session ends: never clear
        assert ended or rawpg.rows(more), more
    finally:
        c.close()


@pytest.mark.parametrize("sql", MASKED_SQL)
def test_scroll_cursor_read_every_way(rproxy, sql):
    c = raw_connect(rproxy)
    try:
        msgs = _send(c, rawpg.query(f"BEGIN; DECLARE sc SCROLL CURSOR FOR {sql}"))
        for f in ("FETCH LAST FROM sc", "FETCH BACKWARD 2 FROM sc", "FETCH ABSOLUTE 1 FROM sc",
                  "FETCH PRIOR FROM sc", "MOVE LAST IN sc", "FETCH RELATIVE -1 FROM sc",
                  "FETCH BACKWARD ALL FROM sc", "FETCH FORWARD ALL FROM sc"):
            msgs += _send(c, rawpg.query(f))
        # FETCH parsed once, run over the protocol
        msgs += _send(c, rawpg.parse("FETCH BACKWARD 1 FROM sc", name="fb"), rawpg.SYNC)
        for _ in range(3):
            msgs += _send(c, rawpg.bind("fb"), rawpg.execute(), rawpg.SYNC)
        msgs += _send(c, rawpg.query("COMMIT"))
        assert not rawpg.errors(msgs), rawpg.errors(msgs)
        assert len(rawpg.rows(msgs)) >= 10 and leaks(msgs) == [], msgs
    finally:
        c.close()


@pytest.mark.parametrize("sql", MASKED_SQL)
def test_cursor_with_hold_never_reads_back_clear(pg, rproxy, sql):
    c = raw_connect(rproxy)
    try:
        msgs = _send(c, rawpg.query(f"DECLARE hc CURSOR WITH HOLD FOR {sql}"))
        msgs += _send(c, rawpg.query("FETCH ALL FROM hc"))
        msgs += _send(c, rawpg.query("CLOSE ALL"))
        errs = rawpg.errors(msgs)
        # refused as parking (42501), or read back masked
        assert not errs or errs[0]["C"] == "42501", errs
        assert leaks(msgs) == [], msgs
    finally:
        c.close()


@pytest.mark.parametrize("sql", MASKED_SQL)
def test_portal_suspended_then_resumed_after_sync(rproxy, sql):
    c = raw_connect(rproxy)
    try:
        msgs = _send(c, rawpg.query("BEGIN"))
        msgs += _send(c, rawpg.parse(sql, name="ps"), rawpg.bind("ps", portal="pp"),
                      rawpg.execute("pp", 1), rawpg.SYNC)
        msgs += _send(c, rawpg.execute("pp", 1), rawpg.SYNC)
        # another statement in between, then the rest of the portal
        msgs += _send(c, rawpg.query("SELECT 'between'"))
        msgs += _send(c, rawpg.parse(CLEAN_SQL), rawpg.bind(), rawpg.execute(),
                      rawpg.execute("pp", 0), rawpg.SYNC)
        msgs += _send(c, rawpg.query("COMMIT"))
        assert not rawpg.errors(msgs), rawpg.errors(msgs)
        got = rawpg.rows(msgs)
        assert len(got) == 1 + 1 + 1 + 3 + 1 and leaks(msgs) == [], got
        assert got[2] == [b"between"] and got[3:6] == NAMES
    finally:
        c.close()


# -- row-changing statements that hand values back -------------------------------------

RETURNING = [
    "UPDATE customers SET score = score WHERE id = 1 RETURNING ssn, email, phone",
    "UPDATE customers SET score = score RETURNING upper(email)",
    ("UPDATE customers c SET score = c.score FROM orders o WHERE o.cust_id = c.id "
     "RETURNING c.*"),
    "DELETE FROM customers WHERE id = 2 RETURNING *",
    "WITH u AS (UPDATE customers SET score = score RETURNING ssn) SELECT ssn || '' FROM u",
]


def _both_protocols(c, sql, in_txn):
    """``sql`` as a Query and through Parse/Bind/Execute, each in a transaction rolled
    back when ``in_txn``; every message received."""
    if in_txn:
        msgs = _send(c, rawpg.query(f"BEGIN; {sql}; ROLLBACK"))
        msgs += _send(c, rawpg.query("BEGIN"))
    else:
        msgs = _send(c, rawpg.query(sql))
    msgs += _send(c, rawpg.parse(sql), rawpg.bind(), rawpg.execute(), rawpg.SYNC)
    if in_txn:
        msgs += _send(c, rawpg.query("ROLLBACK"))
    return msgs


MOVES = [
    ("MERGE INTO orders o USING customers c ON o.cust_id = c.id "
     "WHEN MATCHED THEN UPDATE SET note = c.ssn"),
    ("MERGE INTO orders o USING (SELECT id, email FROM customers) c ON o.cust_id = c.id "
     "WHEN MATCHED THEN UPDATE SET note = upper(c.email)"),
    ("MERGE INTO orders o USING customers c ON o.id = c.id + 100 "
     "WHEN NOT MATCHED THEN INSERT VALUES (c.id + 100, c.id, 0, c.phone)"),
    "UPDATE orders o SET note = c.ssn FROM customers c WHERE c.id = o.cust_id",
    "INSERT INTO orders SELECT id + 200, id, 0, reverse(email) FROM customers",
]


@pytest.mark.parametrize("sql, table, refused", [(q, "customers", False) for q in RETURNING]
                         + [(q, "orders", True) for q in MOVES])
def test_row_changing_statements(pg, rproxy, sql, table, refused):
    # RETURNING of masked columns: masked or refused; moving masked values into a table:
    # refused (no parking); either way the table is unchanged (truth: Postgres)
    before = pg.execute(f"SELECT * FROM {table} ORDER BY id", dbname=DB)
    c = raw_connect(rproxy)
    try:
        msgs = _both_protocols(c, sql, not refused)
        errs = rawpg.errors(msgs)
        if refused:
            assert len(errs) == 2 and all(e["C"] == "42501" for e in errs), errs
        assert all(e["C"] in ("42501", "25P02") for e in errs), errs
        assert leaks(msgs) == [], msgs
    finally:
        c.close()
    assert pg.execute(f"SELECT * FROM {table} ORDER BY id", dbname=DB) == before


# -- every message type, through the client libraries ----------------------------------

CHANNEL_SQL = [
    "SELECT email::int FROM customers",
    "SELECT ssn::date FROM customers",
    "DO $$ BEGIN RAISE NOTICE '%', (SELECT string_agg(ssn, ',') FROM customers); END $$",
    "DO $$ BEGIN RAISE EXCEPTION '%', (SELECT min(email) FROM customers); END $$",
    "SELECT pg_notify('ch', (SELECT min(ssn) FROM customers))",
    "SELECT set_config('application_name', (SELECT min(email) FROM customers), false)",
]


@pytest.mark.parametrize("sql", CHANNEL_SQL)
def test_channels_through_psycopg_and_asyncpg(rproxy, sql):
    seen: list = []
    with psycopg.connect(rproxy.dsn(dbname=DB), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: seen.append((d.message_primary, d.message_detail)))
        conn.add_notify_handler(lambda n: seen.append((n.channel, n.payload)))
        conn.execute("LISTEN ch")
        for prepare in (False, True, True):
            try:
                seen.append(conn.execute(sql, prepare=prepare).fetchall())
            except psycopg.Error as e:
                seen.append((e.sqlstate, str(e), e.diag.message_detail, e.diag.context))
        seen.append(conn.info.parameter_status("application_name"))

    async def go():
        conn = await asyncpg.connect(rproxy.dsn(dbname=DB))
        try:
            conn.add_log_listener(lambda _c, m: seen.append((m.message, m.detail)))
            await conn.add_listener("ch", lambda *a: seen.append(a[1:]))
            for _ in range(3):
                try:
                    seen.append(await conn.fetch(sql))
                except asyncpg.PostgresError as e:
                    seen.append((e.sqlstate, str(e), e.detail, getattr(e, "context", None)))
            await asyncio.sleep(0.1)
            seen.append(conn.get_settings().application_name)
        finally:
            await conn.close()
    asyncio.run(go())
    assert leaks(seen) == [], seen


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("sql", COPY_TABLES)
def test_copy_of_a_table_holding_masked_rows(rproxy, sql, extended):
    c = raw_connect(rproxy)
    try:
        msgs = _one(c, sql, extended)
        assert not rawpg.errors(msgs), rawpg.errors(msgs)
        data = [p for t, p in msgs if t == b"d"]
        assert len(data) >= 3 and leaks(msgs) == [], msgs
    finally:
        c.close()


@pytest.mark.parametrize("sql", MASKED_SQL)
def test_cursor_read_inside_the_server_is_refused(rproxy, sql):
    # cursor_to_xml() reads an open cursor's rows in the server: they never pass the
    # wire as the cursor's result, so its masking plan would not apply
    c = raw_connect(rproxy)
    try:
        msgs = _send(c, rawpg.query(f"BEGIN; DECLARE cx CURSOR FOR {sql}"))
        for q in ("SELECT cursor_to_xml('cx', 10, true, false, '')",
                  "SELECT cursor_to_xmlschema('cx', true, false, '')"):
            got = _send(c, rawpg.query(q))
            assert rawpg.errors(got)[0]["C"] == "42501", rawpg.errors(got)
            msgs += got
            msgs += _send(c, rawpg.query("ROLLBACK; BEGIN; DECLARE cx CURSOR FOR " + sql))
        msgs += _send(c, rawpg.query("FETCH ALL FROM cx"))
        assert len(rawpg.rows(msgs)) == 3 and leaks(msgs) == [], msgs
    finally:
        c.close()


CURSOR_SWAPS = [
    lambda sql: f"CLOSE pp; DECLARE pp CURSOR FOR {sql}",
    lambda sql: f"CLOSE ALL; DECLARE pp CURSOR FOR {sql}",
    lambda sql: f"CLOSE pp; DECLARE pp SCROLL CURSOR FOR {sql}",
]


@pytest.mark.parametrize("swap", range(len(CURSOR_SWAPS)))
@pytest.mark.parametrize("sql", MASKED_SQL)
def test_portal_name_swapped_by_sql_cursor(rproxy, sql, swap):
    # a clean protocol portal, closed and re-declared in SQL under the same name over a
    # masked read (portals and cursors share one namespace), then executed over the
    # protocol: the clean portal's plan must not apply
    c = raw_connect(rproxy)
    try:
        msgs, _ = _steps(c, [
            (rawpg.query("BEGIN"),),
            (rawpg.parse(CLEAN_SQL, name="cs"), rawpg.bind("cs", portal="pp"),
             rawpg.execute("pp", 1), rawpg.SYNC),
            (rawpg.query(CURSOR_SWAPS[swap](sql)),),
            (rawpg.execute("pp", 2), rawpg.SYNC),
            (rawpg.execute("pp"), rawpg.SYNC),
            (rawpg.query("COMMIT"),)])
        assert rawpg.rows(msgs)[0] == NAMES[0]
        assert leaks(msgs) == [], msgs
    finally:
        c.close()


# COPY options an attacker picks so the rewriter misreads the fields: delimiters and
# quotes that occur inside the values, a NULL string equal to a value, forced quoting
COPY_OPTIONS = [
    "COPY customers TO STDOUT (DELIMITER '@')",
    "COPY customers TO STDOUT (DELIMITER '-')",
    "COPY customers TO STDOUT (FORMAT csv, DELIMITER '.', QUOTE '9')",
    "COPY customers TO STDOUT (FORMAT csv, FORCE_QUOTE *)",
    "COPY customers TO STDOUT (NULL '732-19-4856')",
    "COPY customers (ssn, phone) TO STDOUT (NULL '+1-555-013-7702')",
    "COPY customers TO STDOUT (FORMAT csv, QUOTE 'e', ESCAPE 'x')",
    "COPY (SELECT email, ssn, phone FROM customers) TO STDOUT (DELIMITER '+')",
    "COPY customers (email, ssn) TO STDOUT (FORMAT csv, HEADER true, DELIMITER '|')",
    "COPY customers TO STDOUT (ENCODING 'LATIN1')",
    "COPY customers TO STDOUT (FORMAT csv, NULL 'zephyr.quill81@example.com')",
]


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("sql", COPY_OPTIONS)
def test_copy_options_chosen_to_confuse(rproxy, sql, extended):
    c = raw_connect(rproxy)
    try:
        msgs = _one(c, sql, extended)
        errs = rawpg.errors(msgs)
        assert not errs or errs[0]["C"] == "42501", errs
        assert errs or len([p for t, p in msgs if t == b"d"]) >= 3
        assert leaks(msgs) == [], msgs
    finally:
        c.close()
