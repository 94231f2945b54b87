# Verify the audit hash chain over every file in order and name the first thing that is
# modified, deleted, reordered, inserted or missing.
"""Tamper evidence: ``pgguard audit verify``.

Each stream (one writer process) is one chain: ``hash = hex(sha256(unhex(prev_hash) +
content))`` over every record, in file order (``seq`` 1, 2, 3 ...) then row order, the
first ``prev_hash`` being 64 zeros. Pending WAL segments (not yet sealed into Parquet)
are checked as the tail of the chain.

What is detected:

- a **modified** record: its content no longer hashes to its ``hash``;
- a **deleted**, **inserted** or **replaced** record: the next record's ``prev_hash``
  does not match (a record modified *and* re-hashed shows up here, at its successor);
- **reordered** records: a ``prev_hash`` that belongs to a record further on;
- a **missing file** in the middle or at the start: a gap in the ``seq`` numbers, and a
  chain break at the next file;
- a **deleted last file** or **truncated tail**: the head anchor ``_chain/<stream>.json``
  names a later seq or a different last hash;
- a **renamed** file (its stored seq differs from its name) and **foreign** ``.parquet``
  files (not part of any chain, but visible to ``read_parquet('**/*.parquet')``).

What cannot be detected from the files alone: someone with write access to the directory
who rewrites a whole suffix of the chain *and* the head anchor consistently, or deletes a
stream entirely (files and head). Keep a copy of the head hashes elsewhere (``verify
--json`` prints them; ship them to a log the proxy host cannot rewrite) to close that gap.
Pruning old days on purpose breaks the start of the chain; ``allow_pruned`` accepts a
chain that starts at a later seq.

With ``[audit] store`` every instance in the store is checked the same way, each of
its streams one chain (files and head objects under ``<prefix>/<instance>/``); a
problem names the instance and the file (``api-2/dt=2024-05-01/w0-000000000003.parquet``).
This instance's files not yet uploaded, and its WAL, are checked as the tail of its
chains.

Example::

    result = verify(Path("audit"))
    if not result.ok:
        print(result.problems[0].message)
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .record import CONTENT_FIELDS, FIELDS, GENESIS, SCHEMA, content_bytes
from .store import RemoteFile, Store

_BATCH = 65_536
_sha = hashlib.sha256


# positional, untyped twin of the content struct: same fields, order and omission rules,
# so a valid row encodes to the same bytes; a row with wrong types just hashes differently
_RowPos = msgspec.defstruct("_RowPos", [(n, object, None) for n in CONTENT_FIELDS],
                            omit_defaults=True, gc=False)
_encoder = msgspec.json.Encoder()


def _rfc3339(col: pa.Array) -> pa.Array:
    # msgspec's datetime text ("2024-05-01T12:00:00.000005Z", no fraction when 0),
    # computed in Arrow: far cheaper than a tz-aware datetime per row
    s = col.cast(pa.timestamp("us")).cast(pa.string())
    s = pc.replace_substring(s, " ", "T", max_replacements=1)
    s = pc.if_else(pc.ends_with(s, ".000000"), pc.utf8_slice_codeunits(s, 0, -7), s)
    return pc.binary_join_element_wise(s, "Z", "")


def _content_lines(batch: pa.RecordBatch) -> list[bytes | None]:
    """Canonical content of each row, fast; a mismatch is re-checked exactly (slow)."""
    cols = []
    for name, col in zip(batch.schema.names, batch.columns):
        if name == "ts" and pa.types.is_timestamp(col.type):
            col = _rfc3339(col)
        cols.append(col.to_pylist())
    return storage.split_lines(_encoder.encode_lines([_RowPos(*r) for r in zip(*cols)]))


def _exact_line(table: pa.Table, i: int) -> bytes | None:
    try:
        return content_bytes(table.slice(i, 1).to_pylist()[0])
    except Exception:
        return None


def _hash(prev: str | None, line: bytes | None) -> str | None:
    try:
        return _sha(bytes.fromhex(prev) + line).hexdigest()    # type: ignore[arg-type,operator]
    except Exception:
        return None


def _schema_difference(schema) -> str:
    """What a file's columns have that pgguard does not write ('' when they are exactly
    the audit schema's: names, order and types)."""
    if schema.names == SCHEMA.names and all(
            a.type == b.type for a, b in zip(schema, SCHEMA)):
        return ""
    extra = [n for n in schema.names if n not in SCHEMA.names]
    twice = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if extra or twice:
        return "columns pgguard does not write: " + ", ".join(extra + twice)
    types = [f"{a.name} is {a.type}" for a in schema
             if a.name in SCHEMA.names and a.type != SCHEMA.field(a.name).type]
    if types:
        return "column types changed: " + ", ".join(types)
    return "columns reordered"


def _duckdb_unreadable(path: Path) -> str | None:
    """Why DuckDB cannot read every row of the Parquet file at ``path`` (None: it can)."""
    import duckdb   # why: loaded only when verifying
    try:
        con = duckdb.connect()
        try:
            # (every column's pages decoded: a count of each column's values)
            con.execute("SELECT count(COLUMNS(*)) FROM read_parquet(?)",
                        [str(path)]).fetchall()
        finally:
            con.close()
    except Exception as e:     # noqa: BLE001 - any refusal is the answer
        msg = str(e).strip().splitlines()
        return msg[0] if msg else type(e).__name__
    return None


def _metadata_lie(meta: pq.FileMetaData, table: pa.Table) -> str | None:
    """What a Parquet footer says of its rows that the rows do not bear out: row-group
    sizes, each column chunk's null count and min/max statistics, and bloom filters or
    page indexes (the writer makes none). None: it tells the truth."""
    start = 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        part = table.slice(start, rg.num_rows)
        start += rg.num_rows
        for j in range(rg.num_columns):
            c = rg.column(j)
            path = c.path_in_schema
            if c.bloom_filter_offset is not None or c.has_column_index or c.has_offset_index:
                return f"row group {i} column {path}: a bloom filter or page index"
            st = c.statistics
            if st is None:
                continue
            top = path.split(".", 1)[0]
            if top not in part.column_names:
                return f"row group {i}: statistics of an unknown column {path}"
            col = part.column(top)
            nested = "." in path
            if nested:
                col = pc.list_flatten(col)
            elif st.has_null_count and st.null_count != col.null_count:
                return (f"row group {i} column {path}: the footer counts {st.null_count} "
                        f"nulls, the rows hold {col.null_count}")
            if st.has_min_max:
                mm = pc.min_max(col)
                lo, hi = mm["min"].as_py(), mm["max"].as_py()
                if st.min != lo or st.max != hi:
                    return (f"row group {i} column {path}: the footer's min/max "
                            f"{st.min!r}..{st.max!r}, the rows' {lo!r}..{hi!r}")
    if start != table.num_rows:
        return f"the row groups count {start} rows, the file holds {table.num_rows}"
    return None


@dataclass
class Problem:
    kind: str            # modified | deleted | reordered | missing_file | missing_tail |
    #                      renamed | foreign_file | unreadable | wal_damaged
    stream: str
    message: str
    file: str | None = None
    row: int | None = None
    event_id: str | None = None
    instance: str | None = None     # store mode: the instance whose chain it is


@dataclass
class StreamReport:
    stream: str
    instance: str | None = None
    files: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    head_seq: int | None = None
    head_hash: str | None = None
    pending_wal_records: int = 0


@dataclass
class VerifyResult:
    streams: list[StreamReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def records(self) -> int:
        return sum(s.records + s.pending_wal_records for s in self.streams)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "records": self.records,
                "streams": [asdict(s) for s in self.streams],
                "problems": [asdict(p) for p in self.problems]}


class _Checker:
    def __init__(self, root: Path | None, result: VerifyResult, stream: str,
                 max_problems: int, store: Store | None = None,
                 instance: str | None = None):
        self.root = root
        self.result = result
        self.stream = stream
        self.max_problems = max_problems
        self.store = store
        self.instance = instance
        self.label = f"{instance}/{stream}" if instance else stream
        self.expected: str | None = GENESIS
        self.expected_seq = 1
        self.report = StreamReport(stream, instance)
        self.prev_name = "the start of the chain"
        self.full = False
        self.link_broken = False    # the previous row broke the chain (reported once)

    def problem(self, kind: str, message: str, **kw: object) -> None:
        mine = [p for p in self.result.problems
                if p.stream == self.stream and p.instance == self.instance]
        if len(mine) >= self.max_problems:
            self.full = True
            return
        if self.instance:
            message = f"instance {self.instance}: {message}"
        self.result.problems.append(Problem(
            kind, self.stream, message, instance=self.instance, **kw))  # type: ignore[arg-type]

    def rel(self, path: Path | RemoteFile) -> str:
        if isinstance(path, RemoteFile):
            return path.name
        if self.instance:   # a local file of this instance, not uploaded yet
            return f"{self.instance}/{path.relative_to(self.root)} (local, not uploaded)"
        try:
            return str(path.relative_to(self.root))     # type: ignore[arg-type]
        except ValueError:
            return str(path)

    def check_rows(self, name: str, table: pa.Table, boundary: bool) -> None:
        """Check the chain over *table*'s rows; *boundary*: the first row starts a file."""
        hashes = table.column("hash").to_pylist()
        prevs = table.column("prev_hash").to_pylist()
        ids = table.column("event_id").to_pylist()
        position = {h: i for i, h in enumerate(hashes)}
        content = table.select(list(CONTENT_FIELDS))
        i = 0
        for batch in content.to_batches(_BATCH):
            for line in _content_lines(batch):
                h = _hash(prevs[i], line)
                if h != hashes[i]:
                    h = _hash(prevs[i], _exact_line(content, i))
                self._check_row(name, i, h, ids[i], prevs[i], hashes[i], position,
                                boundary and i == 0)
                i += 1
                if self.full:
                    return

    def _check_row(self, name: str, i: int, h: str | None, eid: str | None,
                   prev: str | None, stored: str | None, position: dict, first: bool) -> None:
        where = f"{name} record {i + 1} (event_id {eid})"
        if h != stored:
            self.problem("modified", f"modified: {where} does not hash to its stored hash",
                         file=name, row=i + 1, event_id=eid)
        broken = self.expected is not None and prev != self.expected
        if broken and self.link_broken and not first:
            pass    # the same disorder as the row before (a swap breaks 2-3 links)
        elif broken:
            j = position.get(prev)
            if j is not None and j != i - 1:
                self.problem("reordered",
                             f"reordered: {where} should follow record {j + 1} of {name}",
                             file=name, row=i + 1, event_id=eid)
            elif first:
                self.problem("deleted",
                             f"deleted: chain break between {self.prev_name} and {where}: "
                             f"records at the end of the previous file or the start of "
                             f"this one are missing or were modified",
                             file=name, row=i + 1, event_id=eid)
            else:
                self.problem("deleted",
                             f"deleted: {where} does not follow the record before it: a "
                             f"record in between was deleted, or the one before it was "
                             f"modified and re-hashed", file=name, row=i + 1, event_id=eid)
        self.link_broken = broken
        self.report.records += 1
        self.expected = stored if isinstance(stored, str) else None

    def check_file(self, pf: storage.ParquetFile | RemoteFile) -> None:
        remote = isinstance(pf, RemoteFile)
        name = self.rel(pf if remote else pf.path)
        if pf.seq > self.expected_seq:
            missing = (f"seq {self.expected_seq} "
                       f"({storage.parquet_name(self.stream, self.expected_seq)})"
                       if pf.seq == self.expected_seq + 1
                       else f"seqs {self.expected_seq}..{pf.seq - 1}")
            self.problem("missing_file",
                         f"missing file: {self.stream} {missing} "
                         f"(between {self.prev_name} and {name})", file=name)
        self.expected_seq = pf.seq + 1
        bad = None if remote else _duckdb_unreadable(pf.path)
        if bad is not None:
            # what the auditor's queries read it with (audit sql / tail, read_parquet):
            # a footer pyarrow still reads may be one DuckDB refuses (round 20)
            self.problem("unreadable", f"unreadable: {name}: DuckDB cannot read it: {bad}",
                         file=name)
            self.expected = None
            self.prev_name = name
            return
        try:
            f = pq.ParquetFile(self.store.open_input(pf.key) if remote  # type: ignore[union-attr]
                               else pf.path)
            meta = f.metadata.metadata or {}
            table = f.read()
        except Exception as e:
            self.problem("unreadable", f"unreadable: {name}: {e}", file=name)
            self.expected = None
            self.prev_name = name
            return
        missing_cols = [c for c in FIELDS if c not in table.column_names]
        if missing_cols:
            self.problem("modified", f"modified: {name} lacks columns {missing_cols}",
                         file=name)
            self.expected = None
            self.prev_name = name
            return
        odd = _schema_difference(table.schema)
        if odd:
            # readers match names without case (DuckDB) or take the first of a name: an
            # added IDENTITY, or a column twice, is what they read instead of the
            # chained one
            self.problem("modified", f"modified: {name}: {odd}", file=name)
            if len(set(table.column_names)) != len(table.column_names):
                self.expected = None        # (no column of the name can be trusted)
                self.prev_name = name
                return
        stored_seq = meta.get(b"pgguard.seq")
        if stored_seq is not None and stored_seq.decode() != str(pf.seq):
            self.problem("renamed", f"renamed: {name} was written as seq "
                                    f"{stored_seq.decode()}", file=name)
        stored_dt = meta.get(b"pgguard.dt")
        here = getattr(pf, "dt", None)
        if stored_dt is not None and here and stored_dt.decode() != here:
            # a reader filtering on the dt= partition would not find its records
            self.problem("renamed", f"moved: {name} was written under dt="
                                    f"{stored_dt.decode()}", file=name)
        written = meta.get(b"pgguard.records")
        self.report.files += 1
        if self.report.first_seq is None:
            self.report.first_seq = pf.seq
        self.report.last_seq = pf.seq
        before = len(self.result.problems)
        self.check_rows(name, table, boundary=True)
        lie = _metadata_lie(f.metadata, table)
        if lie:
            # the chain covers the rows, not the footer; DuckDB skips row groups by the
            # footer's statistics (and reads bloom filters and page indexes): a footer
            # that misstates them hides records from every filtered query
            self.problem("modified", f"modified: {name}: {lie}", file=name)
        if (written is not None and int(written) != table.num_rows
                and len(self.result.problems) == before):
            self.problem("deleted", f"deleted: {name} holds {table.num_rows} records, "
                                    f"{int(written)} were written", file=name)
        self.prev_name = name
        self.report.last_hash = self.expected

    def check_wal(self, seg: storage.WalSegment) -> None:
        name = self.rel(seg.path)
        if seg.seq > self.expected_seq:
            self.problem("missing_file", f"missing file: {self.stream} seqs "
                                         f"{self.expected_seq}..{seg.seq - 1} before {name}",
                         file=name)
        self.expected_seq = seg.seq + 1
        if seg.damaged:
            self.problem("wal_damaged", f"modified: pending WAL {name}: a frame after record "
                                        f"{seg.records} does not match the hash written "
                                        f"with it", file=name, row=seg.records + 1)
        elif seg.bad_last:
            # (a frame being written is incomplete, not complete and wrong)
            self.problem("wal_damaged", f"modified or cut: pending WAL {name}: its last "
                                        f"frame ({seg.bad_records} records after record "
                                        f"{seg.records}) does not match the hash written "
                                        "with it: a change, or a write a crash cut short "
                                        "(never acknowledged; pgguard sets it aside when it "
                                        "starts again)", file=name, row=seg.records + 1)
        if self.expected is not None and seg.prev_hash != self.expected and seg.records:
            self.problem("deleted", f"deleted: chain break between {self.prev_name} and "
                                    f"pending WAL {name}", file=name)
        self.report.pending_wal_records += seg.records
        if seg.records:
            self.expected = seg.last_hash
        self.prev_name = name


def verify(root: Path | str, *, allow_pruned: bool = False,
           max_problems: int = 20) -> VerifyResult:
    """Check every stream's chain under *root*; problems in chain order.

    Example: ``verify("audit").ok``.
    """
    root = Path(root)
    result = VerifyResult()
    if not root.is_dir():
        result.problems.append(Problem("missing_file", "", f"no audit directory at {root}"))
        return result
    # WAL first, then Parquet: a segment sealed meanwhile shows up at least once
    wal = {s: storage.list_wal(root, s) for s in storage.list_wal_streams(root)}
    streams, foreign = storage.list_parquet(root)
    heads = storage.list_heads(root)
    for path in foreign:
        result.problems.append(Problem(
            "foreign_file", "", f"foreign file: {path.relative_to(root)} is not part of any "
                                f"audit chain (but DuckDB queries over **/*.parquet read it)",
            file=str(path.relative_to(root))))
    for stream in sorted(set(streams) | set(heads) | {s for s, w in wal.items() if w}):
        c = _Checker(root, result, stream, max_problems)
        _check_stream(c, streams.get(stream, []), heads.get(stream), wal.get(stream, []),
                      allow_pruned, lambda s=stream: _sealed_seqs(root, s))
        result.streams.append(c.report)
    return result


def verify_store(store: Store, *, root: Path | str | None = None,
                 instance: str | None = None, allow_pruned: bool = False,
                 max_problems: int = 20) -> VerifyResult:
    """Check every instance's chains in *store*; with *root* and *instance* (this
    instance's local dir and name), its files not yet uploaded and its WAL too.

    Example: ``verify_store(Store.open("s3://bucket/pgguard")).ok``.
    """
    result = VerifyResult()
    local = Path(root) if root is not None and instance else None
    wal: dict[str, list] = {}
    local_files: dict[str, list[storage.ParquetFile]] = {}
    if local is not None and local.is_dir():
        # local first, then the store: a file uploaded meanwhile is seen at least once
        wal = {s: storage.list_wal(local, s) for s in storage.list_wal_streams(local)}
        local_files, _ = storage.list_parquet(local)
    instances = store.instances()
    if local is not None and instance not in instances and (wal or local_files):
        instances.append(instance)      # nothing uploaded yet
    for inst in sorted(instances):
        streams, foreign = store.listing(inst)
        heads = store.heads(inst)
        for key in foreign:
            result.problems.append(Problem(
                "foreign_file", "", f"foreign file: {key} in the store is not part of any "
                                    f"audit chain", file=key, instance=inst))
        mine = inst == instance and local is not None
        names = set(streams) | set(heads)
        if mine:
            names |= set(local_files) | {s for s, w in wal.items() if w}
        for stream in sorted(names):
            files: list = list(streams.get(stream, []))
            if mine:
                there = {f.seq for f in files}
                files += [f for f in local_files.get(stream, []) if f.seq not in there]
            c = _Checker(local, result, stream, max_problems, store=store, instance=inst)

            def sealed(s: str = stream, i: str = inst, m: bool = mine) -> set[int]:
                seqs = {f.seq for f in store.listing(i)[0].get(s, [])}
                return seqs | (_sealed_seqs(local, s) if m and local else set())
            _check_stream(c, files, heads.get(stream),
                          wal.get(stream, []) if mine else [], allow_pruned, sealed)
            result.streams.append(c.report)
    return result


def _check_stream(c: _Checker, files: list, head: storage.Head | None, wal: list,
                  allow_pruned: bool, sealed_seqs) -> None:
    stream = c.stream
    if allow_pruned and files and files[0].seq > 1:
        c.expected = None
        c.expected_seq = files[0].seq
    seen: set[int] = set()
    for pf in files:
        if pf.seq in seen:
            name = c.rel(pf if isinstance(pf, RemoteFile) else pf.path)
            c.problem("foreign_file", f"duplicate: a second file for {stream} seq "
                                      f"{pf.seq}: {name}", file=name)
            continue
        seen.add(pf.seq)
        c.check_file(pf)
        if c.full:
            break
    if head is None and seen and not c.instance:
        # (a writer moves the head with every file it seals: files without one lost it;
        # in a store the head object may wait for its upload still)
        c.problem("missing_file",
                  f"missing head anchor: {stream} has sealed files but no _chain/{stream}.json"
                  f": the last file(s) and the head may have been deleted together",
                  file=c.prev_name)
    if head is not None:
        c.report.head_seq, c.report.head_hash = head.seq, head.last_hash
        last = c.report.last_seq or 0
        if head.seq > last and not set(range(last + 1, head.seq + 1)) <= sealed_seqs():
            c.problem("missing_file",
                      f"missing file: {stream} seq {last + 1}"
                      f"{'' if head.seq == last + 1 else f'..{head.seq}'} named by the "
                      f"head anchor ({head.file}): the last file(s) were deleted",
                      file=f"{c.instance}/{head.file}" if c.instance else head.file)
        elif head.seq == last and c.expected is not None and head.last_hash != c.expected:
            c.problem("missing_tail",
                      f"deleted: {c.prev_name} does not end with the record the head "
                      f"anchor names: records at its end were deleted or modified",
                      file=c.prev_name)
    for seq, path in wal:
        if seq in seen:
            continue            # sealed while we looked
        try:
            seg = storage.read_wal(path)
        except FileNotFoundError:
            continue
        except storage.AuditError as e:
            c.problem("wal_damaged", str(e), file=c.rel(path))
            continue
        c.check_wal(seg)


def _sealed_seqs(root: Path, stream: str) -> set[int]:
    # a live writer may have sealed more files after we listed them
    streams, _ = storage.list_parquet(root)
    return {f.seq for f in streams.get(stream, [])}
