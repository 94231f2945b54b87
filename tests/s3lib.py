# Test helpers for [audit] store: moto's standalone S3 server (started by the tests, never
# a real cloud), a TCP hop that can make it unreachable, and a reader of the bucket.
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time

import boto3
import pyarrow.parquet as pq

from pgcluster import free_port

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
          "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class Moto:
    """``python -m moto.server`` on a free port; in-memory, gone when stopped."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Moto:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(os.environ, **S3_ENV))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto server exited") from None
                time.sleep(0.1)
        raise RuntimeError("moto server did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, endpoint: str | None = None):
        return boto3.client("s3", endpoint_url=endpoint or self.endpoint,
                            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                            region_name=S3_ENV["AWS_REGION"])

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a pgguard process needs to reach this server (the usual AWS variables)."""
        return dict(S3_ENV, AWS_ENDPOINT_URL=endpoint or self.endpoint)


class Hop:
    """A TCP forwarder to *target_port* that can be taken down (connections refused,
    live ones cut) and brought back on the same port: an unreachable store that keeps
    its contents."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._srv: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Hop:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()
        return self

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        if self._srv is not None:
            self._srv.close()
            self._srv = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def objects(s3, bucket: str, prefix: str = "") -> dict[str, int]:
    """Every key in *bucket* under *prefix*, with its size."""
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def read_object(s3, bucket: str, key: str):
    """The Parquet table of *key* (raises if the object is not a whole Parquet file)."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return pq.read_table(io.BytesIO(body)), pq.ParquetFile(io.BytesIO(body)).metadata


class Watcher:
    """Polls a bucket while pgguard uploads: every ``.parquet`` object it ever lists must
    download as a whole Parquet file holding as many rows as its writer recorded, and no
    object outside ``<prefix>/<instance>/dt=.../`` or ``_chain/`` may appear."""

    def __init__(self, s3, bucket: str, prefix: str) -> None:
        self.s3, self.bucket, self.prefix = s3, bucket, prefix
        self.seen: dict[str, int] = {}
        self.bad: list[str] = []
        self.reads = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                keys = objects(self.s3, self.bucket, self.prefix)
            except Exception:
                continue
            for key in keys:
                if key in self.seen:
                    continue
                parts = key[len(self.prefix):].lstrip("/").split("/")
                if key.endswith(".parquet"):
                    if len(parts) != 3 or not parts[1].startswith("dt="):
                        self.bad.append(f"{key}: unexpected place")
                    try:
                        t, meta = read_object(self.s3, self.bucket, key)
                        want = int(meta.metadata[b"pgguard.records"])
                        if t.num_rows != want:
                            self.bad.append(f"{key}: {t.num_rows} rows of {want}")
                        self.seen[key] = t.num_rows
                        self.reads += 1
                    except Exception as e:     # half an object, or not Parquet at all
                        self.bad.append(f"{key}: {type(e).__name__}: {e}")
                        self.seen[key] = -1
                elif not (len(parts) == 3 and parts[1] == "_chain"
                          and parts[2].endswith(".json")):
                    self.bad.append(f"{key}: unexpected object")
                    self.seen[key] = -1
            time.sleep(0.02)
