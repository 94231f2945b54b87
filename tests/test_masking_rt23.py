# Red team, round 23 (helper 122): a masked column renamed by a DBA directly upstream
# (ALTER TABLE customers RENAME ssn TO social: an ordinary migration pgguard does not
# see) stayed masked when selected as itself (the wire masks by table OID and attnum),
# but the plan reader knew masked columns by the names of the catalog pgguard had read:
# replace(social, '-', ''), reverse(social), split_part(contact, '@', 1) came back in
# clear, through every client, for 30 s in new sessions and without end in open ones;
# renamed back after a catalog read, the real ssn counted as clean. The plan reader now
# also takes the masked columns' names of now (by OID and attnum, in the same round trip
# as the plan), has every worker read the catalog again when they differ, and an open
# session reads it again once it is older than the catalog's TTL. Judged by the seeded
# clear values (every form: digits, reversed, hex, base64) in all a client received.
import time

import psycopg
import pytest
from mask_corpus import DB, MASKS, MODES, REFUSED, direct_mode, leaks, run_mode, seed

from pgguard.masking.wire import CATALOG_TTL

RENAME = ("ALTER TABLE customers RENAME ssn TO social; "
          "ALTER TABLE customers RENAME email TO contact")
BACK = ("ALTER TABLE customers RENAME social TO ssn; "
        "ALTER TABLE customers RENAME contact TO email")

DERIVED = [
    "SELECT id, replace(social, '-', '') AS v FROM customers ORDER BY id",
    "SELECT id, reverse(social) AS v FROM customers ORDER BY id",
    "SELECT id, split_part(contact, '@', 1) || ' at ' || split_part(contact, '@', 2) AS v "
    "FROM customers ORDER BY id",
    "SELECT id, lower(social) AS v FROM customers ORDER BY id",
    "SELECT c.id, upper(x.s) AS v FROM customers c, LATERAL (SELECT c.social AS s) x "
    "ORDER BY 1",
]
# after the names went back (read while renamed): the real names again
DERIVED_BACK = [sql.replace("social", "ssn").replace("contact", "email") for sql in DERIVED]


@pytest.fixture(scope="module")
def rt23proxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-rt23"), extra=MASKS).start()
    yield p
    p.stop()


@pytest.fixture
def renamed(pg, rt23proxy):
    # the proxy has read its catalog under the old names first
    with psycopg.connect(rt23proxy.dsn(dbname=DB)) as c:
        assert "*" in c.execute("SELECT ssn FROM customers LIMIT 1").fetchone()[0]
    pg.execute(RENAME, dbname=DB)
    try:
        yield
    finally:
        cols = {r[0] for r in pg.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'customers'::regclass",
            dbname=DB)}
        if "social" in cols:
            pg.execute(BACK, dbname=DB)


def _got(mode, proxy, sql, psql_bin):
    try:
        return run_mode(mode, proxy, sql, psql_bin)
    except Exception as e:      # noqa: BLE001 - the client's own way of failing
        return None, f"{e!r} {e}"


def test_the_renamed_columns_spell_the_values_upstream(pg, renamed):
    for sql in DERIVED:
        assert leaks(direct_mode(pg, "psycopg-text", sql)), sql


@pytest.mark.parametrize("mode", MODES)
def test_a_column_renamed_upstream_stays_masked_in_what_derives_from_it(
        rt23proxy, psql_bin, renamed, mode):
    for sql in DERIVED:
        got, blob = _got(mode, rt23proxy, sql, psql_bin)
        assert not leaks(blob), (mode, sql, leaks(blob))
        assert got is REFUSED or got is None or any(got), (mode, sql, blob[:300])


def test_an_open_session_and_the_names_renamed_back(rt23proxy, pg, renamed):
    # a session open across the renames: the derived values stay masked after each, and
    # after the names went back (the catalog was read while they were renamed)
    with psycopg.connect(rt23proxy.dsn(dbname=DB), autocommit=True) as c:
        for sql in DERIVED:
            assert not leaks(c.execute(sql).fetchall()), sql
        pg.execute(BACK, dbname=DB)
        for sql in DERIVED_BACK:
            assert not leaks(c.execute(sql).fetchall()), sql
    with psycopg.connect(rt23proxy.dsn(dbname=DB), autocommit=True) as c:
        for sql in DERIVED_BACK:
            assert not leaks(c.execute(sql).fetchall()), sql
        # CREATE TABLE AS of the real columns is refused (masked values kept in clear)
        with pytest.raises(psycopg.Error) as e:
            c.execute("CREATE TEMP TABLE rt23_loot AS SELECT id, ssn, email FROM customers")
        assert "masking" in str(e.value)


def test_a_catalog_read_again_unchanged_keeps_what_sessions_learned(rt23proxy, pg):
    # (the slow one) the read past the TTL finds nothing changed: a prepared statement's
    # computed clean column still comes back as Postgres answers it, not masked as a
    # statement whose lineage was dropped would be
    sql = "SELECT id, upper(name) AS v FROM customers ORDER BY id"
    want = direct_mode(pg, "psycopg-text", sql)
    with psycopg.connect(rt23proxy.dsn(dbname=DB), autocommit=True) as c:
        cur = c.cursor()
        for _ in range(3):
            assert [list(r) for r in cur.execute(sql, prepare=True).fetchall()] == want
        time.sleep(CATALOG_TTL + 1)
        # a statement judged now reads the catalog again (older than the TTL)
        c.execute("SELECT id, lower(name) FROM customers WHERE id = 1").fetchall()
        for _ in range(3):
            assert [list(r) for r in cur.execute(sql, prepare=True).fetchall()] == want


def test_a_statement_judged_before_a_swap_is_judged_again(rt23proxy, pg):
    # (the slow one: CATALOG_TTL) a text an open session ran before the DBA swapped the
    # names (name -> name_old, ssn -> name) is read again once the catalog is older than
    # the TTL: lower(name) is the SSN then, and comes back masked
    sql = "SELECT id, lower(name) AS v FROM customers ORDER BY id"
    with psycopg.connect(rt23proxy.dsn(dbname=DB), autocommit=True) as c:
        before = c.execute(sql).fetchall()
        assert not leaks(before) and any(v for _, v in before)
        pg.execute("ALTER TABLE customers RENAME name TO name_old; "
                   "ALTER TABLE customers RENAME ssn TO name", dbname=DB)
        try:
            assert leaks(direct_mode(pg, "psycopg-text", sql))
            time.sleep(CATALOG_TTL + 1)
            for _ in range(3):
                assert not leaks(c.execute(sql).fetchall())
        finally:
            pg.execute("ALTER TABLE customers RENAME name TO ssn; "
                       "ALTER TABLE customers RENAME name_old TO name", dbname=DB)
