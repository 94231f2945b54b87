# The audit log in object storage: sealed Parquet files uploaded per instance, read back
# as one fleet (pyarrow filesystems: s3://, gs://, file://).
"""``[audit] store = "s3://bucket/prefix"``.

The write-ahead log and the Parquet file being sealed stay on local disk (``[audit]
dir``), so durability does not depend on the network. Once a segment is sealed, the
writer process's uploader thread copies it to the store and only then forgets it
locally. Layout in the store::

    <prefix>/<instance>/dt=2024-05-01/w0-000000000007.parquet   one per sealed segment
    <prefix>/<instance>/_chain/w0.json                          head of stream w0's chain

``<instance>`` is ``[instance] name`` (default ``<hostname>-<listen port>``); each
worker of an instance is one stream (``w0``, ``w1`` ...) with its own hash chain, so
instances never write the same key.

Atomic publication: on S3 and GCS an object becomes visible only when the single PUT
(or the completing call of a multipart upload) has the whole body, so each file is
written once, under its final key, from a buffer already complete in memory: a reader
sees the whole object or none. A filesystem that has no such guarantee (``file://``)
gets the file under a hidden temporary name (``.<name>.tmp``, which no ``*.parquet``
glob matches) and a rename.

Order of operations for one file (see ``Uploader``): upload the Parquet file, write the
stream's head object, record the upload in ``_store/<stream>.json`` locally, delete the
local file. A crash anywhere in between uploads the same bytes again at the next start
(the same key, the same content): the store never holds a file twice, and nothing is
deleted locally before the store has it.

Credentials and endpoint come from the environment as every AWS tool reads them
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, the instance profile otherwise);
``gs://`` uses Google's application default credentials.

Example::

    store = Store.open("s3://audit-bucket/pgguard")
    store.instances()                 # ["api-1", "api-2"]
    store.files("api-1")              # {"w0": [RemoteFile(...), ...]}
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage
from .storage import AuditError

log = logging.getLogger("pgguard.audit")

UPLOADED_DIR = "_store"
INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FILE_RE = re.compile(r"^dt=(?P<dt>\d{4}-\d{2}-\d{2})/(?P<stream>[A-Za-z0-9_]{1,64})-"
                      r"(?P<seq>\d{12})\.parquet$")
SCHEMES = ("s3", "gs", "gcs", "file")
BACKOFF_MIN = 0.5           # seconds before the first retry of a failed upload
BACKOFF_MAX = 15.0          # longest pause between retries


@dataclass(frozen=True, order=True)
class RemoteFile:
    instance: str
    stream: str
    seq: int
    key: str = field(compare=False)      # path inside the filesystem (bucket/prefix/...)
    dt: str = field(compare=False)
    size: int = field(compare=False, default=-1)

    @property
    def name(self) -> str:
        """``<instance>/dt=.../<file>``: how verify and errors name it."""
        return f"{self.instance}/dt={self.dt}/{storage.parquet_name(self.stream, self.seq)}"


class Uploaded(msgspec.Struct, kw_only=True):
    """What of a stream is in the store (local bookkeeping, ``_store/<stream>.json``)."""

    store: str
    instance: str
    seq: int                # last uploaded seq (every seq up to it is in the store)
    records: int            # records of the chain up to and including seq
    last_hash: str


def _split(uri: str) -> tuple[str, str]:
    """(scheme, base path in the filesystem) of a store URI, without any I/O."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or (scheme != "file" and not parts.netloc) or (
            scheme == "file" and not parts.path.startswith("/")):
        raise AuditError(f"[audit] store {uri!r}: unsupported (use s3://bucket/prefix, "
                         f"gs://bucket/prefix or file:///path)")
    if scheme == "file":
        return scheme, parts.path.rstrip("/") or "/"
    return scheme, (parts.netloc + parts.path).rstrip("/")


def _make_fs(uri: str) -> pafs.FileSystem:
    scheme, base = _split(uri)
    try:
        if scheme == "s3":
            # pyarrow (>= 15) reads AWS_ENDPOINT_URL itself; passing it keeps an
            # http:// endpoint (a local S3-compatible server) working on every build.
            # Without AWS_REGION the bucket's region is asked of S3 (what
            # FileSystem.from_uri does too).
            kw: dict[str, Any] = {}
            endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3")
                        or os.environ.get("AWS_ENDPOINT_URL"))
            if endpoint:
                ep = urlsplit(endpoint)
                kw["endpoint_override"] = ep.netloc or ep.path
                kw["scheme"] = ep.scheme or "https"
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if not region and not endpoint:
                region = pafs.resolve_s3_region(base.split("/", 1)[0])
            if region:
                kw["region"] = region
            return pafs.S3FileSystem(**kw)
        return pafs.FileSystem.from_uri(uri)[0]
    except (OSError, ValueError, TypeError) as e:
        raise AuditError(f"audit store {uri}: {e}") from None


class Store:
    """An audit store: a pyarrow filesystem and the base path in it. The filesystem is
    made at first use, so opening a store needs no network (a writer starts while the
    store is unreachable; its uploads retry)."""

    def __init__(self, uri: str, fs: pafs.FileSystem | None = None) -> None:
        self.uri = uri
        self.scheme, self.base = _split(uri)
        self._fs = fs
        # local filesystems show a half-written file: write aside, then rename
        self.rename = self.scheme == "file"

    @classmethod
    def open(cls, uri: str) -> Store:
        """Example: ``Store.open("s3://bucket/prefix")``; raises ``AuditError`` for a
        URI it cannot use."""
        return cls(uri)

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = _make_fs(self.uri)
        return self._fs

    # -- keys ---------------------------------------------------------------------

    def key(self, instance: str, rel: str) -> str:
        return f"{self.base}/{instance}/{rel}"

    def file_key(self, instance: str, dt: str, stream: str, seq: int) -> str:
        return self.key(instance, f"dt={dt}/{storage.parquet_name(stream, seq)}")

    def head_key(self, instance: str, stream: str) -> str:
        return self.key(instance, f"{storage.CHAIN_DIR}/{stream}.json")

    # -- reading ------------------------------------------------------------------

    def instances(self) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        except OSError as e:
            raise AuditError(f"audit store {self.uri}: {e}") from None
        return sorted(i.base_name for i in infos
                      if i.type == pafs.FileType.Directory and INSTANCE_RE.match(i.base_name))

    def listing(self, instance: str) -> tuple[dict[str, list[RemoteFile]], list[str]]:
        """Sealed files of *instance* by stream (sorted by seq), and other ``.parquet``
        keys under it (not ours)."""
        root = f"{self.base}/{instance}"
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(root, recursive=True,
                                                            allow_not_found=True))
        except OSError as e:
            raise AuditError(f"audit store {self.uri}: {e}") from None
        streams: dict[str, list[RemoteFile]] = {}
        foreign: list[str] = []
        for i in infos:
            if i.type != pafs.FileType.File or not i.path.endswith(".parquet"):
                continue
            rel = i.path[len(root) + 1:]
            m = _FILE_RE.match(rel)
            if not m:
                foreign.append(f"{instance}/{rel}")
                continue
            f = RemoteFile(instance, m["stream"], int(m["seq"]), i.path, m["dt"], i.size)
            streams.setdefault(f.stream, []).append(f)
        for files in streams.values():
            files.sort()
        return streams, sorted(foreign)

    def heads(self, instance: str) -> dict[str, storage.Head]:
        root = f"{self.base}/{instance}/{storage.CHAIN_DIR}"
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        except OSError as e:
            raise AuditError(f"audit store {self.uri}: {e}") from None
        out: dict[str, storage.Head] = {}
        for i in infos:
            stem = i.base_name[:-5] if i.base_name.endswith(".json") else ""
            if i.type != pafs.FileType.File or not storage.STREAM_RE.match(stem):
                continue
            try:
                with self.fs.open_input_stream(i.path) as f:
                    out[stem] = msgspec.json.decode(f.read(), type=storage.Head)
            except (OSError, msgspec.DecodeError) as e:
                raise AuditError(f"audit store: {instance}/{storage.CHAIN_DIR}/{i.base_name}: "
                                 f"unreadable chain head: {e}") from None
        return out

    def open_input(self, key: str) -> Any:
        return self.fs.open_input_file(key)

    # -- writing ------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Publish *data* at *key* whole or not at all (see the module docstring)."""
        parent, name = key.rsplit("/", 1)
        target = key
        if self.rename:         # object stores have no directories to create
            self.fs.create_dir(parent, recursive=True)
            target = f"{parent}/.{name}.tmp"
        with self.fs.open_output_stream(target) as out:
            out.write(data)         # one buffer, already complete: no partial object
        if self.rename:
            self.fs.move(target, key)

    def last_hash_of(self, key: str) -> str | None:
        """The chain hash a stored file ends with (from its footer), None if there is
        no such object."""
        if self.fs.get_file_info(key).type != pafs.FileType.File:
            return None
        with self.fs.open_input_file(key) as f:
            meta = pq.ParquetFile(f).metadata.metadata or {}
        return meta.get(b"pgguard.last_hash", b"?").decode()


# -- local bookkeeping ------------------------------------------------------------------

def uploaded_path(root: Path, stream: str) -> Path:
    return root / UPLOADED_DIR / f"{stream}.json"


def read_uploaded(root: Path, stream: str) -> Uploaded | None:
    return storage.read_json(uploaded_path(root, stream), Uploaded, "upload record")


def write_uploaded(root: Path, u: Uploaded, stream: str) -> None:
    (root / UPLOADED_DIR).mkdir(parents=True, exist_ok=True)
    storage.write_atomic(uploaded_path(root, stream), msgspec.json.encode(u) + b"\n")


# -- the uploader -----------------------------------------------------------------------

class Uploader:
    """Thread of the writer process: uploads sealed Parquet files of its stream (and of
    streams no live writer holds) in seq order, retrying with back-off. It never holds
    anything the writer's main thread waits for, so a slow or unreachable store only
    grows the local backlog; statements go on.

    ``kick()`` after a seal; ``drain(timeout)`` at a clean exit (best effort: what is
    left uploads at the next start).
    """

    def __init__(self, store: Store, root: Path, instance: str, stream: str,
                 try_lock: Any = None, on_pass: Any = None) -> None:
        if not INSTANCE_RE.match(instance):
            raise AuditError(f"invalid instance name {instance!r} for the audit store")
        self.store = store
        self.root = root
        self.instance = instance
        self.stream = stream
        self._try_lock = try_lock       # stream -> fd | None (other, orphaned streams)
        self._on_pass = on_pass         # called after each pass (the counters changed)
        self._cond = threading.Condition()
        self._kicked = True
        self._stop = False
        self._retry_at = 0.0            # monotonic time of the next try after a failure
        self._idle = threading.Event()
        self.uploaded = 0
        self.failures = 0
        self.last_error: str | None = None
        self.backlog = 0
        self._thread = threading.Thread(target=self._run, name="audit-uploader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        with self._cond:
            self._kicked = True
            self._idle.clear()
            self._cond.notify()

    def drain(self, timeout: float) -> bool:
        """Try now (back-off or not) and wait until nothing is left to upload (True) or
        *timeout* passes; then stop."""
        with self._cond:
            self._retry_at = 0.0
        self.kick()
        done = self._idle.wait(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(1.0)
        return done

    def _run(self) -> None:
        delay = 0.0
        while True:
            with self._cond:
                # a kick (a new seal) does not cut a back-off short: a store that is
                # down is asked again after the delay, not at every seal
                while not self._stop:
                    wait = self._retry_at - time.monotonic() if self._retry_at else None
                    if wait is not None and wait > 0:
                        self._cond.wait(wait)
                    elif self._kicked or self._retry_at:
                        break
                    else:
                        self._cond.wait()
                if self._stop:
                    return
                self._kicked = False
                self._retry_at = 0.0
            try:
                left = self.pass_once()
            except Exception as e:          # the store refused or is unreachable
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                delay = min(BACKOFF_MAX, max(BACKOFF_MIN, delay * 2))
                log.warning("audit: upload to %s failed (%s); retrying in %.1fs",
                            self.store.uri, self.last_error, delay)
                with self._cond:
                    self._retry_at = time.monotonic() + delay
                self.backlog = self._local()
                self._passed()
                continue
            delay = 0.0
            self.last_error = None
            self.backlog = left
            self._passed()
            if not left:
                self._idle.set()

    def _passed(self) -> None:
        if self._on_pass is not None:
            try:
                self._on_pass()
            except Exception:
                log.exception("audit: reporting upload counters failed")

    def pass_once(self) -> int:
        """Upload every sealed local file, oldest first; the number still local."""
        streams, _ = storage.list_parquet(self.root)
        for stream, files in sorted(streams.items()):
            if stream == self.stream:
                self._upload_stream(stream, files)
                continue
            # a stream no live writer holds (fewer workers than before): upload it
            # under its lock, listed again once held; a held one uploads itself
            fd = self._try_lock(stream) if self._try_lock else None
            if fd is None:
                continue
            try:
                self._upload_stream(stream, storage.list_parquet(self.root)[0].get(stream, []))
            finally:
                os.close(fd)
        return self._local()

    def _local(self) -> int:
        # sealed files of our stream still on local disk
        try:
            streams, _ = storage.list_parquet(self.root)
        except OSError:
            return self.backlog
        return len(streams.get(self.stream, []))

    def _upload_stream(self, stream: str, files: list[storage.ParquetFile]) -> None:
        done = read_uploaded(self.root, stream)
        head = storage.read_head(self.root, stream)
        for pf in files:
            if head is not None and pf.seq > head.seq:
                break               # sealed but its head not yet written: next pass
            if done is not None and pf.seq <= done.seq:
                pf.path.unlink(missing_ok=True)     # uploaded before a crash
                continue
            done = self.upload_one(stream, pf, done)

    def upload_one(self, stream: str, pf: storage.ParquetFile,
                   done: Uploaded | None) -> Uploaded:
        data = pf.path.read_bytes()
        last, n = storage.last_hash_of(pf.path)
        key = self.store.file_key(self.instance, pf.dt, stream, pf.seq)
        there = self.store.last_hash_of(key)
        if there is not None and there != last:
            # never overwrite audit evidence: this key holds another chain's file (the
            # local directory was reset, or two instances share a name)
            raise AuditError(f"the store already holds a different {key} (its chain ends "
                             f"{there[:16]}…, ours {last[:16]}…): is [instance] name shared "
                             f"by two instances, or was the local audit dir reset?")
        if there is None:
            self.store.put(key, data)
        # else: uploaded before a crash that came before our bookkeeping
        records = (done.records if done else 0) + n
        self.store.put(self.store.head_key(self.instance, stream), msgspec.json.encode(
            storage.Head(stream=stream, seq=pf.seq, last_hash=last, records=records,
                         file=f"dt={pf.dt}/{pf.path.name}",
                         updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
            + b"\n")
        u = Uploaded(store=self.store.uri, instance=self.instance, seq=pf.seq,
                     records=records, last_hash=last)
        write_uploaded(self.root, u, stream)
        pf.path.unlink(missing_ok=True)
        storage.fsync_dir(pf.path.parent)
        self.uploaded += 1
        log.debug("audit: uploaded %s", key)
        return u
