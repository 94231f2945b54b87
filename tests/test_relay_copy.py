# COPY IN and OUT through pgguard: byte-identical round trips, and recovery from a
# COPY that fails midway.
import psycopg
import pytest

from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER

N = 100_000


def _rows() -> bytes:
    return b"".join(b"%d\tname-%d\t{\"k\": %d}\tline with \\t tab and \\\\ back\n" % (i, i, i)
                    for i in range(N))


@pytest.fixture
def table(pg):
    pg.execute("DROP TABLE IF EXISTS copyt; "
               "CREATE TABLE copyt (id int, name text, j jsonb, note text)", dbname="appdb")
    yield "copyt"


def test_copy_in_and_out_round_trip_byte_identical(pg, proxy, table):
    data = _rows()
    with psycopg.connect(proxy.dsn(dbname="appdb"), autocommit=True) as conn:
        with conn.cursor().copy("COPY copyt FROM STDIN") as cp:
            for i in range(0, len(data), 65536):
                cp.write(data[i:i + 65536])
        out = bytearray()
        with conn.cursor().copy("COPY (SELECT * FROM copyt ORDER BY id) TO STDOUT") as cp:
            for chunk in cp:
                out += chunk
    assert bytes(out) == data
    direct = bytearray()
    with psycopg.connect(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, "appdb")) as conn:
        with conn.cursor().copy("COPY (SELECT * FROM copyt ORDER BY id) TO STDOUT") as cp:
            for chunk in cp:
                direct += chunk
    assert direct == out


def test_copy_csv_and_binary_out_match_direct(pg, proxy, table):
    pg.execute("INSERT INTO copyt SELECT g, 'n' || g, '{}', NULL FROM generate_series(1, 5000) g",
               dbname="appdb")

    def dump(dsn, fmt):
        buf = bytearray()
        with psycopg.connect(dsn) as conn:
            with conn.cursor().copy(f"COPY (SELECT * FROM copyt ORDER BY id) TO STDOUT {fmt}") \
                    as cp:
                for chunk in cp:
                    buf += chunk
        return bytes(buf)

    for fmt in ("(FORMAT csv, HEADER)", "(FORMAT binary)"):
        assert dump(proxy.dsn(dbname="appdb"), fmt) == \
            dump(pg.dsn(UPSTREAM_USER, UPSTREAM_PASSWORD, "appdb"), fmt)


def test_copy_failing_midway_recovers(proxy, table):
    with psycopg.connect(proxy.dsn(dbname="appdb"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            with conn.cursor().copy("COPY copyt (id, name) FROM STDIN") as cp:
                cp.write(b"1\ta\n2\tb\nnot-a-number\tc\n4\td\n")
        # the client aborting a COPY itself
        with pytest.raises(psycopg.errors.QueryCanceled):
            with conn.cursor().copy("COPY copyt (id, name) FROM STDIN") as cp:
                cp.write(b"1\ta\n")
                raise psycopg.errors.QueryCanceled("client gave up")
        assert conn.execute("SELECT count(*) FROM copyt").fetchone() == (0,)
        with conn.cursor().copy("COPY copyt (id, name) FROM STDIN") as cp:
            cp.write(b"7\tseven\n")
        assert conn.execute("SELECT name FROM copyt").fetchall() == [("seven",)]
