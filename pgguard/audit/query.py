# DuckDB over the audit files: a consistent snapshot of sealed Parquet plus pending WAL,
# exposed as one view named `audit`.
"""Query the audit log with DuckDB.

``open_audit(root)`` returns a DuckDB connection with a view ``audit``: every sealed
Parquet file of every chain (``read_parquet([...], hive_partitioning = true)``, so the
``dt`` partition column is there too) plus the records still in the write-ahead log, so
the last seconds are visible before their file is sealed. The file list is taken once,
WAL first: a segment sealed meanwhile is counted once, never twice, never lost.

Outside pgguard, the same data is one line of DuckDB::

    SELECT * FROM read_parquet('audit/**/*.parquet', hive_partitioning = true);

With ``[audit] store`` (``store=``), the view reads every instance's files in the store
as well, with one more column, ``instance``: the store is listed after the local
directory, and a file of this instance that is in both (uploaded meanwhile) is read from
the store only. The store is read through pyarrow's filesystem (a pyarrow dataset
registered with DuckDB: projections and filters are pushed down), not DuckDB's httpfs:
no DuckDB extension to download, one set of credentials and one code path (s3, gs,
file) for writing and reading.

Example::

    con, snap = open_audit(Path("audit"))
    con.sql("SELECT identity, decision, count(*) FROM audit GROUP BY ALL").show()
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from ..config import parse_duration
from ..errors import PgguardError
from . import storage
from .record import SCHEMA, UTC
from .store import RemoteFile, Store

WAL_VIEW_TABLE = "_audit_wal"


@dataclass
class Snapshot:
    files: list[storage.ParquetFile] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)
    wal: list[tuple[str, int, pa.Table]] = field(default_factory=list)   # stream, seq, rows
    remote: list[RemoteFile] = field(default_factory=list)   # files in [audit] store
    instance: str | None = None     # whose local files these are (store mode)

    @property
    def wal_records(self) -> int:
        return sum(t.num_rows for _, _, t in self.wal)


def take_snapshot(root: Path | None, *, include_wal: bool = True,
                  store: Store | None = None, instance: str | None = None) -> Snapshot:
    """Local files and WAL under *root* (if any), then the files in *store* (if any);
    a local file of *instance* the store also holds is taken from the store only."""
    snap = Snapshot(instance=instance)
    if root is not None and root.is_dir():
        _local_snapshot(snap, root, include_wal)
    if store is None:
        return snap
    for inst in store.instances():
        streams, _ = store.listing(inst)
        for files in streams.values():
            snap.remote.extend(files)
    if instance is not None:
        there = {(f.stream, f.seq) for f in snap.remote if f.instance == instance}
        snap.files = [f for f in snap.files if (f.stream, f.seq) not in there]
        snap.wal = [w for w in snap.wal if (w[0], w[1]) not in there]
    return snap


def _local_snapshot(snap: Snapshot, root: Path, include_wal: bool) -> None:
    wal_lists = ({s: storage.list_wal(root, s) for s in storage.list_wal_streams(root)}
                 if include_wal else {})
    streams, snap.foreign = storage.list_parquet(root)
    sealed = {(f.stream, f.seq) for files in streams.values() for f in files}
    for files in streams.values():
        snap.files.extend(files)
    for stream, segs in wal_lists.items():
        for seq, path in segs:
            if (stream, seq) in sealed:
                continue
            try:
                seg = storage.read_wal(path)
            except FileNotFoundError:
                # sealed between our two listings: take the file instead
                again, _ = storage.list_parquet(root)
                snap.files.extend(f for f in again.get(stream, []) if f.seq == seq)
                continue
            t = storage.wal_table(seg)
            if t.num_rows:
                dt = pa.array([seg.created.date()] * t.num_rows, type=pa.date32())
                snap.wal.append((stream, seq, t.append_column("dt", dt)))


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


_DT = pads.partitioning(pa.schema([("dt", pa.date32())]), flavor="hive")


def open_audit(root: Path | None, *, include_wal: bool = True,
               con: duckdb.DuckDBPyConnection | None = None,
               store: Store | None = None, instance: str | None = None
               ) -> tuple[duckdb.DuckDBPyConnection, Snapshot]:
    """A DuckDB connection with the ``audit`` view, and the snapshot it reads.

    *store* (with *instance*, this instance's name, when *root* is its local dir):
    the whole fleet's files in the store too, and a column ``instance``."""
    snap = take_snapshot(root, include_wal=include_wal, store=store, instance=instance)
    con = con or duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:
        pass
    empty = SCHEMA.empty_table().append_column("dt", pa.array([], type=pa.date32()))
    wal = pa.concat_tables([t for _, _, t in snap.wal]) if snap.wal else empty
    con.register(WAL_VIEW_TABLE, wal)
    # the same column on every part in store mode: the instance that wrote the row
    tag = "" if store is None else (
        f", {_sql_str(instance)} AS instance" if instance else ", NULL::VARCHAR AS instance")
    parts = [f"SELECT *{tag} FROM {WAL_VIEW_TABLE}"]
    if snap.files:
        files = ", ".join(_sql_str(str(f.path)) for f in snap.files)
        parts.append(f"SELECT *{tag} FROM read_parquet([{files}], hive_partitioning = true, "
                     f"union_by_name = true)")
    if store is not None:
        by_instance: dict[str, list[str]] = {}
        for f in snap.remote:
            by_instance.setdefault(f.instance, []).append(f.key)
        for i, (inst, keys) in enumerate(sorted(by_instance.items())):
            name = f"_audit_store_{i}"
            con.register(name, pads.dataset(
                keys, filesystem=store.fs, format="parquet", partitioning=_DT,
                partition_base_dir=f"{store.base}/{inst}"))
            parts.append(f"SELECT *, {_sql_str(inst)} AS instance FROM {name}")
    con.execute("CREATE OR REPLACE VIEW audit AS " + " UNION ALL BY NAME ".join(parts))
    return con, snap


def fetch(con: duckdb.DuckDBPyConnection, sql: str,
          params: list | None = None) -> tuple[list[str], list[tuple]]:
    """Column names and rows of *sql*, through Arrow (timestamps come back as aware
    datetimes in UTC without needing pytz)."""
    rel = con.sql(sql, params=params) if params else con.sql(sql)
    if rel is None:             # a statement without a result (SET, CREATE ...)
        return [], []
    t = rel.to_arrow_table()
    if not t.num_columns:
        return [], []
    cols = [c.to_pylist() for c in t.columns]
    return t.column_names, list(zip(*cols))


def rows_as_dicts(con: duckdb.DuckDBPyConnection, sql: str,
                  params: list | None = None) -> list[dict]:
    names, rows = fetch(con, sql, params)
    return [dict(zip(names, r)) for r in rows]


def parse_when(text: str, now: datetime) -> datetime:
    """``--since`` / ``--until``: a duration back from ``now`` (``7d``, ``12h``) or a date
    or ISO time (UTC unless it says otherwise). Example: ``parse_when("7d", now)``."""
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise PgguardError(f"invalid time {text!r} (use a duration like 7d or a date "
                           f"like 2024-05-01)") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
