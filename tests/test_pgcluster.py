# Proves the real-Postgres test harness (tests/pgcluster.py, tests/certs.py) works.
import asyncio

import asyncpg
import psycopg
import pytest

from pgcluster import PgCluster, find_pg_bindir, find_tool


@pytest.fixture(scope="module")
def cluster():
    with PgCluster() as c:
        yield c


def test_select_one(cluster):
    with psycopg.connect(cluster.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert cluster.psql("select 1, 'a'") == "1|a"
    assert cluster.execute("select current_setting('fsync')") == [("off",)]
    assert cluster.execute("create table if not exists t_probe (i int)") is None


def _asyncpg_connect(dsn):
    async def go():
        conn = await asyncpg.connect(dsn)
        await conn.close()
    asyncio.run(go())


@pytest.mark.parametrize("method, prefix", [("scram-sha-256", "SCRAM-SHA-256$"),
                                            ("md5", "md5"), ("password", "SCRAM-SHA-256$")])
def test_password_roles(cluster, method, prefix):
    name = "u_" + method.replace("-", "_")
    dsn = cluster.create_role(name, "right pass'word", method)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select current_user").fetchone() == (name,)
    stored = cluster.execute("select rolpassword from pg_authid where rolname = %s", [name])
    assert stored[0][0].startswith(prefix)
    with pytest.raises(asyncpg.InvalidPasswordError) as e:
        _asyncpg_connect(cluster.dsn(name, "wrong"))
    assert e.value.sqlstate == "28P01"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(cluster.dsn(name, "wrong"))


def test_set_conf_and_hba(cluster):
    cluster.set_conf(work_mem="7MB")
    assert cluster.execute("show work_mem") == [("7MB",)]
    cluster.execute("create role nobody login")
    cluster.add_hba(["host all nobody 127.0.0.1/32 reject"])
    with pytest.raises(psycopg.OperationalError, match="rejects connection"):
        psycopg.connect(cluster.dsn("nobody"))


def test_ssl_verify_full(cluster):
    if not cluster.has_ssl_support():
        pytest.skip("server binaries built without SSL")
    pki = cluster.enable_ssl()
    dsn = cluster.dsn(sslmode="verify-full", sslrootcert=pki["ca_cert"])
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone() == (True,)
    with psycopg.connect(dsn.replace("127.0.0.1", "localhost")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_kill_and_start_again(cluster):
    port, datadir = cluster.port, cluster.datadir
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("set synchronous_commit = on")
        conn.execute("create table survives (x int); insert into survives values (42)")
        cluster.kill()
        assert not cluster.running
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    cluster.start()
    assert (cluster.port, cluster.datadir) == (port, datadir)
    assert cluster.execute("select x from survives") == [(42,)]


def test_context_manager_cleans_up():
    with PgCluster() as c:
        base = c.base
        assert c.psql("select 2") == "2"
    assert not base.exists() and not c.running


def test_binary_lookup(monkeypatch, tmp_path):
    assert (find_pg_bindir() / "initdb").is_file()
    assert find_tool("psql").is_file()
    monkeypatch.setenv("PGGUARD_TEST_PGBIN", str(tmp_path))
    with pytest.raises(RuntimeError, match="PGGUARD_TEST_PGBIN"):
        find_pg_bindir()
