# [audit] store: sealed Parquet uploaded to an S3-compatible server (moto, started here),
# whole files only, per instance; `pgguard audit sql|verify|report` over the whole bucket.
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import Proxy, run_psql
from pgguard.audit import AuditLog, AuditRecord
from pgguard.config import AuditConfig
from s3lib import Hop, Moto, Watcher, objects

PREFIX = "fleet"


@pytest.fixture(scope="module")
def moto():
    m = Moto().start()
    yield m
    m.stop()


@pytest.fixture
def bucket(moto):
    name = f"audit-{uuid.uuid4().hex[:12]}"
    moto.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(moto):
    return moto.client()


def cli(moto, *args: str, endpoint: str | None = None) -> subprocess.CompletedProcess:
    """`pgguard audit ...` as its own process, with the store's env only."""
    env = dict(os.environ, **moto.env(endpoint))
    return subprocess.run([sys.executable, "-m", "pgguard", "audit", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def sql(moto, bucket: str, query: str) -> list[dict]:
    r = cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "sql", "--json", query)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def store_proxy(pg, tmp: Path, moto, bucket: str, name: str, *, seal: str = "0.3s",
                durability: str = "batched", endpoint: str | None = None,
                port: int | None = None, workers: int = 1) -> Proxy:
    return Proxy(pg, tmp, port=port, env=moto.env(endpoint), workers=workers,
                 audit_extra=f'store = "s3://{bucket}/{PREFIX}"\n'
                             f'seal_interval = "{seal}"\ndurability = "{durability}"\n',
                 extra=f'[instance]\nname = "{name}"\n')


def setup_table(pg, table: str) -> None:
    pg.execute(f"DROP TABLE IF EXISTS {table}")
    pg.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, tag text)")
    pg.execute(f"GRANT ALL ON {table} TO app")
    pg.execute(f"GRANT ALL ON SEQUENCE {table}_id_seq TO app")


def upstream_count(pg, table: str, tag: str | None = None) -> int:
    q = f"SELECT count(*) FROM {table}" + (f" WHERE tag = '{tag}'" if tag else "")
    return pg.execute(q)[0][0]


def wait_for(pred, timeout: float = 90, what: str = "condition", proxy: Proxy | None = None):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, (
            f"timed out waiting for {what}" + (f"\n{proxy.output()[-3000:]}" if proxy else ""))
        time.sleep(0.1)


def inserts(proxy: Proxy, table: str, tag: str, n: int) -> int:
    """n INSERTs through psycopg, one statement each; how many were acknowledged."""
    done = 0
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(n):
            conn.execute(f"INSERT INTO {table} (tag) VALUES ('{tag}')")
            done += 1
    return done


def statement_count(moto, bucket: str, table: str, instance: str | None = None) -> int:
    cond = f" AND instance = '{instance}'" if instance else ""
    rows = sql(moto, bucket, "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM audit "
                             f"WHERE event = 'statement' AND statement LIKE 'INSERT INTO {table} %'"
                             f"{cond}")
    assert rows[0]["n"] == rows[0]["d"], rows        # every record exactly once
    return rows[0]["n"]


# -- one instance: uploads, whole objects, verify, sql --------------------------------------

def test_serve_uploads_whole_files_that_verify_and_count_once(pg, tmp_path, moto, bucket, s3,
                                                             psql_bin):
    table = "store_one"
    setup_table(pg, table)
    proxy = store_proxy(pg, tmp_path, moto, bucket, "solo")
    with Watcher(s3, bucket, PREFIX) as w, proxy:
        n = inserts(proxy, table, "psycopg", 150)
        r = run_psql(psql_bin, proxy.dsn(), "-c",
                     f"INSERT INTO {table} (tag) VALUES ('psql')")
        assert r.returncode == 0, r.stderr
        n += 1

        async def via_asyncpg() -> int:
            c = await asyncpg.connect(proxy.dsn())
            for _ in range(20):
                await c.execute(f"INSERT INTO {table} (tag) VALUES ('asyncpg')")
            await c.close()
            return 20
        import asyncio
        n += asyncio.run(via_asyncpg())
        n += inserts(proxy, table, "psycopg2", 100)
        # uploads happen while the proxy runs (the watcher reads them as they appear);
        # traffic goes on across seal intervals (on an idle machine all of the above
        # fits in one 0.3 s interval, and a file is sealed only when it has records)
        deadline = time.monotonic() + 90
        while len([k for k in objects(s3, bucket, PREFIX) if k.endswith(".parquet")]) < 2:
            assert time.monotonic() < deadline, "no uploads while serving\n" + proxy.output()[-3000:]
            n += inserts(proxy, table, "more", 3)
            time.sleep(0.4)
        assert proxy.stop() == 0
        time.sleep(0.5)
    assert not w.bad, w.bad
    assert w.reads >= 2
    keys = objects(s3, bucket, PREFIX)
    files = [k for k in keys if k.endswith(".parquet")]
    assert files and all(k.startswith(f"{PREFIX}/solo/dt=") for k in files), files
    assert f"{PREFIX}/solo/_chain/w0.json" in keys
    # uploaded files leave the local dir; the upload record stays
    assert not list(proxy.audit_dir.glob("dt=*/*.parquet"))
    assert json.loads((proxy.audit_dir / "_store" / "w0.json").read_text())["instance"] == "solo"
    # the truth upstream and the audit agree, each statement exactly once
    assert upstream_count(pg, table) == n
    assert statement_count(moto, bucket, table) == n
    r = cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "chain solo/w0:" in r.stdout and "verified:" in r.stdout
    r = cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "report", "--since", "1d", "--verify")
    assert r.returncode == 0 and "verified:" in r.stdout, r.stderr
    # the local dir alone would look like a chain with files deleted: said, not misread
    r = cli(moto, "--dir", str(proxy.audit_dir), "verify")
    assert r.returncode == 1 and f"--store s3://{bucket}/{PREFIX} --instance solo" in r.stderr
    r = cli(moto, "--dir", str(proxy.audit_dir), "--store", f"s3://{bucket}/{PREFIX}", "verify")
    assert r.returncode == 1 and "needs --instance" in r.stderr
    r = cli(moto, "--dir", str(proxy.audit_dir), "--store", f"s3://{bucket}/{PREFIX}",
            "--instance", "solo", "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    # -c reads the config's store (and this instance's local remainder)
    r = cli(moto, "-c", str(proxy.config), "sql", "--json",
            f"SELECT count(*) AS n FROM audit WHERE statement LIKE 'INSERT INTO {table} %'")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["n"] == n
    # policy replay with the same config reads the store too
    r = subprocess.run([sys.executable, "-m", "pgguard", "policy", "replay", "-c",
                        str(proxy.config), "--since", "1d", "--json"], capture_output=True,
                       text=True, env=dict(os.environ, **moto.env()), timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["records"] >= n


# -- tampering, by class ------------------------------------------------------------------

def _log_files(tmp: Path, moto, bucket: str, instance: str, files: int = 3) -> None:
    """files sealed segments of 40 records each, uploaded to the bucket as *instance*
    (the writer process reads the store's env from ours: see the test's monkeypatch)."""
    log = AuditLog(AuditConfig(dir=str(tmp / instance), flush_interval="2ms",
                               store=f"s3://{bucket}/{PREFIX}"), instance=instance)
    log.start()
    for f in range(files):
        for i in range(40):
            log.log(AuditRecord(ts=datetime.now(timezone.utc), session_id=f"s{f}",
                                identity="ci-agent", identity_kind="agent",
                                event="statement", statement=f"SELECT {f * 100 + i}",
                                decision="allowed", rows=i))
        log.roll()
    log.close()


def _put_table(s3, bucket: str, key: str, table: pa.Table, meta: dict) -> None:
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
    s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


def _get(s3, bucket: str, key: str) -> tuple[pa.Table, dict]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    meta = {k: v for k, v in pq.ParquetFile(io.BytesIO(body)).metadata.metadata.items()
            if k.startswith(b"pgguard.")}       # the file's own: seq, records, hashes
    assert meta[b"pgguard.seq"]
    return pq.read_table(io.BytesIO(body)), meta


TAMPER = ["modify_record", "delete_record", "delete_middle_file", "delete_last_file",
          "reorder_records", "foreign_object", "rehash_modified_record", "truncate_last_file"]


@pytest.mark.parametrize("kind", TAMPER)
def test_tampered_store_is_named_by_instance_and_file(tmp_path, moto, bucket, s3, kind,
                                                       monkeypatch):
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    _log_files(tmp_path, moto, bucket, "inst-a")
    _log_files(tmp_path, moto, bucket, "inst-b")
    store = f"s3://{bucket}/{PREFIX}"
    assert cli(moto, "--store", store, "verify").returncode == 0
    keys = sorted(k for k in objects(s3, bucket, f"{PREFIX}/inst-b/") if k.endswith(".parquet"))
    assert len(keys) == 3
    middle = keys[1]
    fname = middle.split("/")[-1]
    t, meta = _get(s3, bucket, middle)
    if kind == "modify_record":
        stmts = t.column("statement").to_pylist()
        stmts[5] = "SELECT 'innocent'"
        t = t.set_column(t.schema.get_field_index("statement"), "statement",
                         pa.array(stmts, pa.string()))
        _put_table(s3, bucket, middle, t, meta)
    elif kind == "rehash_modified_record":
        # change a record and recompute its own hash: its successor's link breaks
        import hashlib
        from pgguard.audit.record import CONTENT_FIELDS, content_bytes
        rows = t.to_pylist()
        rows[5]["statement"] = "SELECT 'innocent'"
        content = {k: rows[5][k] for k in CONTENT_FIELDS}
        rows[5]["hash"] = hashlib.sha256(bytes.fromhex(rows[5]["prev_hash"])
                                         + content_bytes(content)).hexdigest()
        _put_table(s3, bucket, middle, pa.Table.from_pylist(rows, schema=t.schema), meta)
    elif kind == "delete_record":
        _put_table(s3, bucket, middle, pa.concat_tables([t.slice(0, 7), t.slice(8)]), meta)
    elif kind == "reorder_records":
        idx = list(range(t.num_rows))
        idx[3], idx[4] = idx[4], idx[3]
        _put_table(s3, bucket, middle, t.take(idx), meta)
    elif kind == "delete_middle_file":
        s3.delete_object(Bucket=bucket, Key=middle)
    elif kind == "delete_last_file":
        s3.delete_object(Bucket=bucket, Key=keys[2])
        fname = keys[2].split("/")[-1]
    elif kind == "truncate_last_file":
        # the last file loses its last records, its footer rewritten to match: only the
        # head object (the chain's end as uploaded) shows it
        last, lmeta = _get(s3, bucket, keys[2])
        cut = last.slice(0, last.num_rows - 3)
        lmeta = dict(lmeta)
        lmeta[b"pgguard.records"] = str(cut.num_rows).encode()
        lmeta[b"pgguard.last_hash"] = cut.column("hash")[-1].as_py().encode()
        _put_table(s3, bucket, keys[2], cut, lmeta)
        fname = keys[2].split("/")[-1]
    elif kind == "foreign_object":
        fname = "extra.parquet"
        _put_table(s3, bucket, f"{PREFIX}/inst-b/dt=2024-01-01/{fname}", t, meta)
    r = cli(moto, "--store", store, "verify")
    assert r.returncode == 1, r.stdout
    first = r.stderr.strip().splitlines()
    assert len(first) == 1 and "inst-b" in first[0] and fname in first[0], r.stderr
    assert "inst-a" not in first[0]
    r = cli(moto, "--store", store, "verify", "--json")
    res = json.loads(r.stdout)
    assert not res["ok"] and res["problems"][0]["instance"] in ("inst-b", None)
    assert all(p["instance"] != "inst-a" for p in res["problems"])


# -- three instances, one bucket -------------------------------------------------------------

def test_three_instances_one_bucket(pg, tmp_path, moto, bucket, s3):
    table = "store_three"
    setup_table(pg, table)
    names = ["api-1", "api-2", "api-3"]
    for n in names:
        (tmp_path / n).mkdir(exist_ok=True)
    # api-3 runs two workers: two streams (w0, w1), two chains, one instance
    proxies = [store_proxy(pg, tmp_path / n, moto, bucket, n, workers=2 if n == "api-3" else 1)
               for n in names]
    acked = {}
    with Watcher(s3, bucket, PREFIX) as w:
        for p in proxies:
            p.start()
        try:
            for k, (n, p) in enumerate(zip(names, proxies)):
                acked[n] = inserts(p, table, n, 60 + 20 * k)
            # several connections: both of api-3's workers (the kernel spreads them
            # over its SO_REUSEPORT sockets at random; with 4, all went to one worker
            # once in eight runs)
            for _ in range(16):
                for n, p in zip(names, proxies):
                    acked[n] += inserts(p, table, n, 5)
        finally:
            for p in proxies:
                assert p.stop() == 0
        time.sleep(0.5)
    assert not w.bad, w.bad
    for n in names:
        assert upstream_count(pg, table, n) == acked[n]
        assert statement_count(moto, bucket, table, n) == acked[n]
    assert statement_count(moto, bucket, table) == sum(acked.values())
    r = cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    for n in names:
        assert f"chain {n}/w0:" in r.stdout
    streams = {k.split("/")[1] + "/" + k.rsplit("/", 1)[1].split("-")[0]
               for k in objects(s3, bucket, PREFIX) if k.endswith(".parquet")}
    assert {"api-1/w0", "api-2/w0", "api-3/w0"} <= streams
    assert f"{len(streams)} chain(s)" in r.stdout
    by = sql(moto, bucket, f"SELECT instance, count(*) AS n FROM audit WHERE statement LIKE "
                           f"'INSERT INTO {table} %' GROUP BY ALL ORDER BY 1")
    assert [(r["instance"], r["n"]) for r in by] == [(n, acked[n]) for n in names]


# -- kill -9 under strict durability -----------------------------------------------------

def test_kill9_strict_loses_nothing_acknowledged_wal_uploads_on_restart(pg, tmp_path, moto,
                                                                      bucket, s3):
    table = "store_kill"
    setup_table(pg, table)
    # sealed only every hour: what is acknowledged lives in the WAL when it dies
    proxy = store_proxy(pg, tmp_path, moto, bucket, "victim", seal="1h", durability="strict")
    proxy.start()
    acked = 0
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(120):
            conn.execute(f"INSERT INTO {table} (tag) VALUES ('k')")
            acked += 1
    os.kill(proxy.proc.pid, signal.SIGKILL)
    proxy.proc.wait()
    wait_for(lambda: not _writer_alive(proxy.audit_dir), what="the writer to exit")
    assert not [k for k in objects(s3, bucket, PREFIX) if k.endswith(".parquet")]
    assert list((proxy.audit_dir / "_wal" / "w0").glob("*.wal"))
    # restart: recovery seals the WAL, the uploader sends it
    again = store_proxy(pg, tmp_path, moto, bucket, "victim", seal="1h", durability="strict",
                        port=proxy.port)
    with again:
        wait_for(lambda: [k for k in objects(s3, bucket, PREFIX) if k.endswith(".parquet")],
                 what="the recovered WAL in the store", proxy=again)
        assert upstream_count(pg, table) == acked
        assert statement_count(moto, bucket, table) == acked
        r = cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "verify")
        assert r.returncode == 0, r.stdout + r.stderr


def _writer_alive(root: Path) -> bool:
    import fcntl
    lock = root / "_wal" / "w0" / "lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# -- the store unreachable ------------------------------------------------------------------

def test_store_unreachable_does_not_block_statements_backlog_uploads_later(pg, tmp_path, moto,
                                                                          bucket, s3):
    table = "store_down"
    setup_table(pg, table)
    hop = Hop(moto.port).start()
    proxy = store_proxy(pg, tmp_path, moto, bucket, "flaky", endpoint=hop.endpoint)
    with proxy:
        before = inserts(proxy, table, "before", 40)
        wait_for(lambda: [k for k in objects(s3, bucket, PREFIX) if k.endswith(".parquet")],
                 what="a first upload")
        hop.stop()
        slowest = 0.0
        during = 0
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            t_end = time.monotonic() + 3.0
            while time.monotonic() < t_end:
                t0 = time.monotonic()
                conn.execute(f"INSERT INTO {table} (tag) VALUES ('during')")
                slowest = max(slowest, time.monotonic() - t0)
                during += 1
        # statements never wait for the store
        assert slowest < 0.5, slowest
        assert during > 50
        # sealed files pile up locally while the store is away, and /metrics says so
        wait_for(lambda: list(proxy.audit_dir.glob("dt=*/*.parquet")), what="a local backlog")
        wait_for(lambda: metric(proxy, "pgguard_audit_upload_backlog") > 0,
                 what="the backlog in /metrics")
        # (the first file may be in the store with its bookkeeping cut off by the outage:
        # it counts as uploaded once the head is written after the store comes back)
        uploaded = metric(proxy, "pgguard_audit_uploaded_files_total")
        # meanwhile (the CLI reaches the store directly), -c reads the store, this
        # instance's sealed backlog and its WAL as one chain, each record once
        r = cli(moto, "-c", str(proxy.config), "verify")
        assert r.returncode == 0, r.stdout + r.stderr
        r = cli(moto, "-c", str(proxy.config), "sql", "--json",
                f"SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM audit "
                f"WHERE statement LIKE 'INSERT INTO {table} %'")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [{"n": before + during, "d": before + during}]
        assert statement_count(moto, bucket, table) < before + during
        hop.start()
        wait_for(lambda: not list(proxy.audit_dir.glob("dt=*/*.parquet")),
                 what="the backlog to upload", proxy=proxy)
        assert upstream_count(pg, table) == before + during
        assert statement_count(moto, bucket, table) == before + during
        r = cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "verify")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: metric(proxy, "pgguard_audit_upload_backlog") == 0,
                 what="the backlog in /metrics to clear")
        assert metric(proxy, "pgguard_audit_uploaded_files_total") > uploaded
    hop.stop()


def metric(proxy: Proxy, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/metrics",
                                timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# -- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("store, ok", [
    ("s3://bucket/prefix", True), ("gs://bucket/p", True), ("file:///var/audit", True),
    ("ftp://host/x", False), ("s3:///nobucket", False), ("bucket/prefix", False),
])
def test_store_uri_is_checked(tmp_path, store, ok):
    cfg = tmp_path / "pgguard.toml"
    cfg.write_text(f'[audit]\nstore = "{store}"\n')
    r = subprocess.run([sys.executable, "-m", "pgguard", "check", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    if ok:
        assert "store must be" not in r.stdout + r.stderr
    else:
        assert r.returncode != 0 and "audit.store: store must be" in r.stderr, r.stdout + r.stderr


def test_file_store_renames_into_place(tmp_path):
    store = tmp_path / "store"
    log = AuditLog(AuditConfig(dir=str(tmp_path / "local"), flush_interval="2ms",
                               store=f"file://{store}"), instance="disk-1")
    log.start()
    for i in range(100):
        log.log(AuditRecord(ts=datetime.now(timezone.utc), session_id="s", event="statement",
                            statement=f"SELECT {i}"))
    log.close()
    files = list(store.glob("disk-1/dt=*/*.parquet"))
    assert len(files) == 1 and pq.read_metadata(files[0]).num_rows == 100
    assert not list(store.rglob("*.tmp"))
    from pgguard.audit.cli import main
    out = io.StringIO()
    assert main(["--store", f"file://{store}", "verify"], out) == 0
    assert "chain disk-1/w0: 100 records" in out.getvalue()


def test_a_reset_local_dir_never_overwrites_the_store(tmp_path, moto, bucket, s3, monkeypatch):
    """A second chain under the same instance name (local dir lost, or a name shared by
    two instances) must not replace a file in the store: its uploads stop with an error
    naming the key, its files stay local, and the store's chain still verifies."""
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    _log_files(tmp_path / "first", moto, bucket, "twin", files=2)
    keys = {k: v for k, v in objects(s3, bucket, f"{PREFIX}/twin/").items()
            if k.endswith(".parquet")}
    etags = {k: s3.head_object(Bucket=bucket, Key=k)["ETag"] for k in keys}
    log = AuditLog(AuditConfig(dir=str(tmp_path / "second"), flush_interval="2ms",
                               store=f"s3://{bucket}/{PREFIX}"), instance="twin",
                   upload_drain=3.0)
    log.start()
    for i in range(30):
        log.log(AuditRecord(ts=datetime.now(timezone.utc), session_id="other",
                            event="statement", statement=f"SELECT {i}"))
    log.roll()
    deadline = time.monotonic() + 30
    while not log.stats().upload_error and time.monotonic() < deadline:
        time.sleep(0.1)
    err = log.stats().upload_error or ""
    log.close()
    assert "already holds a different" in err and "twin/dt=" in err, err
    assert {k: s3.head_object(Bucket=bucket, Key=k)["ETag"] for k in keys} == etags
    assert len(list((tmp_path / "second").glob("dt=*/*.parquet"))) == 1
    assert cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "verify").returncode == 0


def test_reading_the_store_needs_no_duckdb_extension(tmp_path, moto, bucket, monkeypatch):
    """The store is read through pyarrow, so DuckDB never needs httpfs (which it would
    download from the internet): with extension autoloading off, the view still reads
    every record, and httpfs stays unloaded."""
    import duckdb

    from pgguard.audit.query import open_audit
    from pgguard.audit.store import Store
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    _log_files(tmp_path, moto, bucket, "offline", files=2)
    con = duckdb.connect()
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con, snap = open_audit(None, store=Store.open(f"s3://{bucket}/{PREFIX}"), con=con)
    assert len(snap.remote) == 2
    assert con.sql("SELECT count(*), count(DISTINCT event_id), min(instance), "
                   "min(dt) IS NOT NULL FROM audit").fetchall() == [(80, 80, "offline", True)]
    # filters and projections reach the pyarrow dataset
    assert con.sql("SELECT count(*) FROM audit WHERE statement = 'SELECT $1' "
                   "AND session_id = 's1'").fetchall() == [(40,)]
    loaded = con.sql("SELECT extension_name FROM duckdb_extensions() WHERE loaded").fetchall()
    assert ("httpfs",) not in loaded


def test_kill9_with_store_away_backlog_and_wal_upload_on_restart(pg, tmp_path, moto, bucket,
                                                                 s3):
    """Killed while the store is unreachable: sealed files not uploaded and the WAL tail
    are both local; the next start seals the tail and uploads everything, once."""
    table = "store_kill_away"
    setup_table(pg, table)
    hop = Hop(moto.port).start()
    proxy = store_proxy(pg, tmp_path, moto, bucket, "away", seal="1s", durability="strict",
                        endpoint=hop.endpoint)
    proxy.start()
    acked = inserts(proxy, table, "up", 30)
    wait_for(lambda: [k for k in objects(s3, bucket, PREFIX) if k.endswith(".parquet")],
             what="a first upload", proxy=proxy)
    hop.stop()
    acked += inserts(proxy, table, "away", 40)
    wait_for(lambda: list(proxy.audit_dir.glob("dt=*/*.parquet")), what="a sealed backlog",
             proxy=proxy)
    acked += inserts(proxy, table, "tail", 15)
    os.kill(proxy.proc.pid, signal.SIGKILL)
    proxy.proc.wait()
    wait_for(lambda: not _writer_alive(proxy.audit_dir), what="the writer to exit")
    assert list(proxy.audit_dir.glob("dt=*/*.parquet"))
    assert list((proxy.audit_dir / "_wal" / "w0").glob("*.wal"))
    hop.start()
    again = store_proxy(pg, tmp_path, moto, bucket, "away", seal="1s", durability="strict",
                        endpoint=hop.endpoint, port=proxy.port)
    with again:
        assert upstream_count(pg, table) == acked
        wait_for(lambda: statement_count(moto, bucket, table) == acked,
                 what="every acknowledged statement in the store", proxy=again)
        wait_for(lambda: not list(again.audit_dir.glob("dt=*/*.parquet")),
                 what="the local backlog to go", proxy=again)
        r = cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "verify")
        assert r.returncode == 0, r.stdout + r.stderr
    hop.stop()


def test_a_stream_without_its_writer_is_uploaded_by_another(tmp_path, moto, bucket, s3,
                                                          monkeypatch):
    """Fewer workers after a restart: stream w1's sealed files, left local while the
    store was away, are uploaded by w0's writer (under w1's lock), into w1's chain."""
    hop = Hop(moto.port)            # never started: nothing listens there
    for k, v in moto.env(hop.endpoint).items():
        monkeypatch.setenv(k, v)
    local = tmp_path / "audit"
    conf = AuditConfig(dir=str(local), flush_interval="2ms", store=f"s3://{bucket}/{PREFIX}")
    w1 = AuditLog(conf, stream="w1", instance="shrunk", upload_drain=1.0)
    w1.start()
    for i in range(25):
        w1.log(AuditRecord(ts=datetime.now(timezone.utc), session_id="old", event="statement",
                           statement=f"SELECT {i}"))
    w1.roll()
    w1.close()
    assert len(list(local.glob("dt=*/w1-*.parquet"))) == 1
    assert not objects(s3, bucket, PREFIX)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    w0 = AuditLog(conf, stream="w0", instance="shrunk")
    w0.start()
    deadline = time.monotonic() + 60
    while list(local.glob("dt=*/w1-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.1)
    w0.close()
    keys = objects(s3, bucket, f"{PREFIX}/shrunk/")
    assert [k for k in keys if "/w1-" in k] and f"{PREFIX}/shrunk/_chain/w1.json" in keys
    r = cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "sql", "--json",
            "SELECT count(*) AS n FROM audit WHERE session_id = 'old'")
    assert json.loads(r.stdout) == [{"n": 25}], r.stderr
    assert cli(moto, "--store", f"s3://{bucket}/{PREFIX}", "verify").returncode == 0
