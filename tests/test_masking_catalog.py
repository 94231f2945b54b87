# Catalog freshness: a masked column stays masked when its table is renamed, moved to
# another schema, its column renamed, or the table dropped and created again; done
# upstream directly or through the proxy, seen by new and open sessions, in every worker.
import zlib

import psycopg
import pytest

from conftest import HUMAN, HUMAN_PASSWORD
from test_masking_parking import CLIENTS, run_client

MASKS = """
[[masks]]
column = "public.fr_*.ssn"
strategy = "partial"
keep = 4
except_groups = ["dba"]
"""


def ssn(tag: str) -> str:
    n = zlib.crc32(tag.encode()) % 10**9
    return f"{n // 10**6 % 1000:03d}-{n // 10**4 % 100:02d}-{n % 10**4:04d}"


@pytest.fixture(scope="module")
def fr(pg, tmp_path_factory):
    from conftest import Proxy
    pg.execute("CREATE SCHEMA IF NOT EXISTS fr_other", dbname="appdb")
    p = Proxy(pg, tmp_path_factory.mktemp("fresh"), extra=MASKS).start()
    yield p
    p.stop()


def make(pg, table: str, value: str) -> None:
    pg.execute(f"DROP TABLE IF EXISTS {table} CASCADE; "
               f"CREATE TABLE {table} (id int, name text, ssn text); "
               f"INSERT INTO {table} VALUES (1, 'n1', '{value}')", dbname="appdb")


def read(client, proxy, sql):
    err, out = run_client(client, proxy, "SELECT 1", sql)
    assert err is None, err
    return out


def assert_masked(pg, client, proxy, sql, value):
    # the upstream holds the clear value: only the proxy stands between
    assert value in repr(pg.execute(sql, dbname="appdb"))
    out = read(client, proxy, sql)
    assert value not in out and value.replace("-", "") not in out, (sql, out)
    assert value[-4:] in out, out       # the partial mask, not an error or no rows


def bump_through_proxy(proxy, tag):
    """DDL through the proxy: every worker reads the catalog again."""
    with psycopg.connect(proxy.dsn(dbname="appdb"), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS fr_bump_{tag} (a int)")


UPSTREAM_MOVES = [
    ("rename", "ALTER TABLE {t} RENAME TO moved_{tag}", "moved_{tag}"),
    ("schema", "ALTER TABLE {t} SET SCHEMA fr_other", "fr_other.{t}"),
    ("column", "ALTER TABLE {t} RENAME COLUMN ssn TO x", "{t}"),
    ("both", "ALTER TABLE {t} RENAME TO gone_{tag}; "
             "ALTER TABLE gone_{tag} SET SCHEMA fr_other", "fr_other.gone_{tag}"),
    ("rename2", "ALTER TABLE {t} RENAME TO {t}_x; ALTER TABLE {t}_x RENAME TO plain_{tag}",
     "plain_{tag}"),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind,ddl,after", UPSTREAM_MOVES)
@pytest.mark.parametrize("via", ["upstream", "proxy"])
def test_moved_table_stays_masked(pg, fr, client, kind, ddl, after, via):
    tag = f"{kind}_{client}_{via}"
    t = f"fr_{tag}"
    value = ssn(tag)
    make(pg, t, value)
    col = "x" if kind == "column" else "ssn"
    assert_masked(pg, client, fr, f"SELECT id, ssn FROM {t}", value)   # catalog read
    sql = ddl.format(t=t, tag=tag)
    if via == "upstream":
        pg.execute(sql, dbname="appdb")
    else:
        # a human moves it (for a guarded agent a rename is destructive)
        err, _ = run_client(client, fr, sql.split(";")[0], user=HUMAN, password=HUMAN_PASSWORD)
        assert err is None, err
        for rest in sql.split(";")[1:]:
            pg.execute(rest, dbname="appdb")
    moved = after.format(t=t, tag=tag)
    assert_masked(pg, client, fr, f"SELECT id, {col} FROM {moved}", value)
    assert_masked(pg, client, fr, f"SELECT * FROM {moved}", value)
    bump_through_proxy(fr, tag)         # and after the catalog is read again
    assert_masked(pg, client, fr, f"SELECT {col} AS v FROM {moved} m", value)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("via", ["upstream", "proxy"])
def test_dropped_and_recreated_is_masked_in_open_and_new_sessions(pg, fr, client, via):
    tag = f"dr_{client}_{via}"
    t = f"fr_{tag}"
    make(pg, t, ssn(tag + "old"))
    value = ssn(tag)
    with psycopg.connect(fr.dsn(dbname="appdb"), autocommit=True) as open_conn:
        assert ssn(tag + "old") not in repr(open_conn.execute(f"SELECT * FROM {t}")
                                            .fetchall())
        if via == "upstream":
            make(pg, t, value)
        else:
            err, _ = run_client(client, fr, f"DROP TABLE {t}")
            assert err is None, err
            err, _ = run_client(client, fr, f"CREATE TABLE {t} (id int, name text, ssn text)")
            assert err is None, err
            err, _ = run_client(client, fr, f"INSERT INTO {t} VALUES (1, 'n1', '{value}')")
            assert err is None, err
        # the open session's catalog does not know the new table OID: rows wait
        got = repr(open_conn.execute(f"SELECT id, ssn FROM {t}").fetchall())
        assert value not in got and value[-4:] in got, got
    assert_masked(pg, client, fr, f"SELECT id, ssn FROM {t}", value)
    assert_masked(pg, client, fr, f"SELECT * FROM {t} WHERE id = 1", value)


@pytest.mark.parametrize("client", CLIENTS)
def test_table_renamed_into_a_mask_through_the_proxy(pg, fr, client):
    tag = f"in_{client}"
    value = ssn(tag)
    make(pg, f"plain_{tag}", value)
    with psycopg.connect(fr.dsn(dbname="appdb"), autocommit=True) as open_conn:
        # not masked yet: the table's name matches no mask
        assert value in repr(open_conn.execute(f"SELECT ssn FROM plain_{tag}").fetchall())
        err, _ = run_client(client, fr, f"ALTER TABLE plain_{tag} RENAME TO fr_{tag}",
                            user=HUMAN, password=HUMAN_PASSWORD)
        assert err is None, err
        got = repr(open_conn.execute(f"SELECT ssn FROM fr_{tag}").fetchall())
        assert value not in got and value[-4:] in got, got
    assert_masked(pg, client, fr, f"SELECT ssn FROM fr_{tag}", value)


def test_exempt_dba_reads_moved_table_in_clear(pg, fr):
    from conftest import HUMAN, HUMAN_PASSWORD
    value = ssn("dba")
    make(pg, "fr_dba", value)
    read("psycopg", fr, "SELECT ssn FROM fr_dba")
    pg.execute("ALTER TABLE fr_dba RENAME TO moved_dba", dbname="appdb")
    err, out = run_client("psycopg", fr, "SELECT 1", "SELECT ssn FROM moved_dba",
                          user=HUMAN, password=HUMAN_PASSWORD)
    assert err is None and value in out, (err, out)


@pytest.mark.parametrize("change", ["rename-in", "recreate", "set-schema"])
def test_ddl_through_one_worker_reaches_the_other(pg, make_proxy, change):
    p = make_proxy(extra=MASKS, workers=2)
    tag = f"w_{change.replace('-', '_')}"
    value = ssn(tag)
    src = f"plain_{tag}" if change == "rename-in" else f"fr_{tag}"
    make(pg, src, value)
    dsn = p.dsn(dbname="appdb")
    # sessions on both workers (SO_REUSEPORT spreads them), their catalogs read
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(10)]
    try:
        for c in conns:
            c.execute(f"SELECT * FROM {src}").fetchall()
        ddl = {"rename-in": f"ALTER TABLE {src} RENAME TO fr_{tag}",
               "recreate": f"DROP TABLE {src}",
               "set-schema": f"ALTER TABLE {src} SET SCHEMA fr_other"}[change]
        with psycopg.connect(p.dsn(HUMAN, HUMAN_PASSWORD, dbname="appdb"),
                             autocommit=True) as human:     # an agent may not rename
            human.execute(ddl)
            if change == "recreate":
                human.execute(f"CREATE TABLE {src} (id int, name text, ssn text)")
                human.execute(f"INSERT INTO {src} VALUES (1, 'n1', '{value}')")
        target = {"rename-in": f"fr_{tag}", "recreate": src,
                  "set-schema": f"fr_other.{src}"}[change]
        assert value in repr(pg.execute(f"SELECT ssn FROM {target}", dbname="appdb"))
        conns += [psycopg.connect(dsn, autocommit=True) for _ in range(10)]
        for c in conns:             # open sessions, then new ones
            got = repr(c.execute(f"SELECT id, ssn FROM {target}").fetchall())
            assert value not in got and value[-4:] in got, got
    finally:
        for c in conns:
            c.close()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("stmt", [
    "CREATE TABLE fr_sink_{tag} AS SELECT ssn FROM {t}",
    "CREATE TABLE fr_sink_{tag} AS SELECT * FROM {t}",
    "SELECT set_config('application_name', ssn, false) FROM {t}",
    "CREATE VIEW fr_sink_{tag} AS SELECT n.ssn FROM {t} n",
    "SELECT lo_from_bytea(0, ssn::bytea) FROM {t}",
])
def test_no_parking_from_a_table_created_since_the_catalog_was_read(pg, fr, client, stmt):
    tag = f"pk_{client}_{abs(zlib.crc32(stmt.encode()))}"
    t = f"fr_new_{tag}"
    read(client, fr, "SELECT 1")                # the catalog is read before the table
    make(pg, t, ssn(tag))
    lo_before = pg.execute("SELECT count(*) FROM pg_largeobject_metadata", dbname="appdb")
    err, _ = run_client(client, fr, stmt.format(t=t, tag=tag))
    assert err is not None and err[0] == "42501", err
    assert pg.execute(f"SELECT count(*) FROM pg_class WHERE relname = 'fr_sink_{tag}'",
                      dbname="appdb") == [(0,)]
    assert pg.execute("SELECT count(*) FROM pg_largeobject_metadata",
                      dbname="appdb") == lo_before


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("move", ["rename", "set-schema"])
def test_table_moved_into_a_mask_in_a_transaction(pg, fr, client, move):
    """The DDL's own bump comes before it commits; a catalog read by another session
    in between saw the old state: the commit makes every catalog stale again."""
    tag = f"tx_{move.replace('-', '_')}_{client}"
    value = ssn(tag)
    if move == "rename":
        make(pg, f"plain_{tag}", value)
        ddl, target = f"ALTER TABLE plain_{tag} RENAME TO fr_{tag}", f"fr_{tag}"
    else:
        make(pg, f"fr_other.fr_{tag}", value)
        ddl, target = f"ALTER TABLE fr_other.fr_{tag} SET SCHEMA public", f"fr_{tag}"
    with psycopg.connect(fr.dsn(HUMAN, HUMAN_PASSWORD, dbname="appdb")) as mover:
        mover.execute(ddl)                              # open transaction
        read(client, fr, "SELECT 1")                    # catalog read before the commit
        mover.commit()
    assert_masked(pg, client, fr, f"SELECT id, ssn FROM {target}", value)


@pytest.mark.parametrize("client", ["psycopg", "raw"])
def test_rows_of_an_unknown_table_never_leave_when_the_catalog_cannot_be_read(
        pg, make_proxy, client):
    from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_USER
    from rawpg import RawClient
    p = make_proxy(extra=MASKS)
    tag = f"fail_{client}"
    value = ssn(tag)
    make(pg, f"fr_{tag}", "000-00-0000")
    if client == "psycopg":
        conn = psycopg.connect(p.dsn(dbname="appdb"), autocommit=True)
        conn.execute(f"SELECT * FROM fr_{tag}").fetchall()
    else:
        conn = RawClient.connect(p.port, AGENT, AGENT_PASSWORD, database="appdb")
        conn.run(f"SELECT * FROM fr_{tag}")
    try:
        make(pg, f"fr_{tag}", value)                 # a new table OID
        pg.execute(f"ALTER ROLE {UPSTREAM_USER} NOLOGIN")   # no side connection now
        if client == "psycopg":
            with pytest.raises(psycopg.Error) as e:
                conn.execute(f"SELECT id, ssn FROM fr_{tag}").fetchall()
            got = str(e.value)
        else:
            from rawpg import query
            conn.send(query(f"SELECT id, ssn FROM fr_{tag}"))
            msgs = []
            try:
                while True:                 # until the proxy closes the connection
                    msgs.append(conn.read())
            except (OSError, EOFError, ConnectionError):
                pass
            got = repr(msgs)
            assert [t for t, _ in msgs] == [b"E"], msgs
        assert value not in got and "catalog" in got, got
    finally:
        pg.execute(f"ALTER ROLE {UPSTREAM_USER} LOGIN")
        conn.close()
