# A raw-protocol Postgres client for tests: hand-built frontend messages, every backend
# message back as (type, payload). For what client libraries cannot express (FunctionCall,
# hand-built startup packets, Parse+Sync then Bind/Execute later, pipelines).
from __future__ import annotations

import socket
import struct
from collections.abc import Iterable


def frame(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def startup_packet(params: dict[str, str], version: int = 196608) -> bytes:
    body = struct.pack("!I", version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) \
        + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def query(sql: str | bytes) -> bytes:
    return frame(b"Q", cstr(sql))


def parse(sql: str | bytes, name: str = "", types: Iterable[int] = ()) -> bytes:
    types = list(types)
    return frame(b"P", cstr(name) + cstr(sql) + struct.pack(f"!h{len(types)}I", len(types),
                                                            *types))


def bind(stmt: str = "", params: Iterable[bytes | None] = (), portal: str = "",
         param_formats: Iterable[int] = (), result_formats: Iterable[int] = ()) -> bytes:
    params, pf, rf = list(params), list(param_formats), list(result_formats)
    body = cstr(portal) + cstr(stmt) + struct.pack(f"!h{len(pf)}h", len(pf), *pf)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    body += struct.pack(f"!h{len(rf)}h", len(rf), *rf)
    return frame(b"B", body)


def describe(kind: str = "P", name: str = "") -> bytes:
    return frame(b"D", kind.encode() + cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return frame(b"E", cstr(portal) + struct.pack("!i", max_rows))


def close(kind: str = "S", name: str = "") -> bytes:
    return frame(b"C", kind.encode() + cstr(name))


SYNC = frame(b"S", b"")
FLUSH = frame(b"H", b"")
TERMINATE = frame(b"X", b"")


def function_call(oid: int, args: Iterable[bytes | None] = (), arg_format: int = 0,
                  result_format: int = 0) -> bytes:
    args = list(args)
    body = struct.pack("!Ihh", oid, 1, arg_format) + struct.pack("!h", len(args))
    for a in args:
        body += struct.pack("!i", -1) if a is None else struct.pack("!i", len(a)) + a
    body += struct.pack("!h", result_format)
    return frame(b"F", body)


def error_fields(payload: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields by code letter ('C', 'M', 'D', 'H'...)."""
    out = {}
    for part in payload.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


def data_row(payload: bytes) -> list[bytes | None]:
    (n,) = struct.unpack_from("!h", payload)
    pos, out = 2, []
    for _ in range(n):
        (ln,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(payload[pos:pos + ln])
            pos += ln
    return out


class RawClient:
    """One connection: ``RawClient.connect(port, user, password)`` logs in (SCRAM,
    cleartext, md5 or trust, whatever the server asks), then ``send`` frames and
    ``until_ready`` / ``read`` messages."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.params: dict[str, str] = {}
        self.key: tuple[int, int] | None = None
        self.status = b""

    @classmethod
    def connect(cls, port: int, user: str, password: str | None = None,
                database: str = "postgres", host: str = "127.0.0.1",
                timeout: float = 10, **params: str) -> RawClient:
        c = cls(socket.create_connection((host, port), timeout=timeout))
        c.login(user, password, {"user": user, "database": database, **params})
        return c

    def login(self, user: str, password: str | None, params: dict[str, str]) -> None:
        self.sock.sendall(startup_packet(params))
        self.auth(user, password)

    def auth(self, user: str, password: str | None) -> None:
        scram = None
        while True:
            t, p = self.read()
            if t == b"E":
                raise LoginError(error_fields(p))
            if t == b"R":
                (code,) = struct.unpack_from("!I", p)
                if code == 0:
                    continue
                if code == 3:
                    self.send(frame(b"p", cstr(password or "")))
                elif code == 5:
                    import hashlib
                    inner = hashlib.md5((password or "").encode() + user.encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + p[4:8]).hexdigest()
                    self.send(frame(b"p", cstr("md5" + outer)))
                elif code == 10:
                    from pgguard.auth.scram import ScramClient
                    scram = ScramClient(password or "")
                    mech, first = scram.initial()
                    self.send(frame(b"p", cstr(mech) + struct.pack("!i", len(first)) + first))
                elif code == 11:
                    self.send(frame(b"p", scram.handle_continue(p[4:])))
                elif code == 12:
                    continue
                else:
                    raise LoginError({"M": f"unsupported auth request {code}"})
            elif t == b"S":
                k, _, v = p.rstrip(b"\0").partition(b"\0")
                self.params[k.decode()] = v.decode()
            elif t == b"K":
                self.key = struct.unpack_from("!II", p)
            elif t == b"Z":
                self.status = p
                return

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def read(self) -> tuple[bytes, bytes]:
        while len(self.buf) < 5:
            self._fill()
        (n,) = struct.unpack_from("!I", self.buf, 1)
        while len(self.buf) < n + 1:
            self._fill()
        t, p = self.buf[:1], self.buf[5:n + 1]
        self.buf = self.buf[n + 1:]
        return t, p

    def until_ready(self, count: int = 1) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the ``count``-th ReadyForQuery."""
        out = []
        while count:
            t, p = self.read()
            out.append((t, p))
            if t == b"Z":
                self.status = p
                count -= 1
        return out

    def read_all(self) -> list[tuple[bytes, bytes]]:
        """Messages until the server closes the connection (or the timeout)."""
        out = []
        try:
            while True:
                out.append(self.read())
        except (ConnectionError, socket.timeout, OSError):
            return out

    def run(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(query(sql))
        return self.until_ready()

    def close(self) -> None:
        try:
            self.send(TERMINATE)
        except OSError:
            pass
        self.sock.close()


class LoginError(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", ""))
        self.fields = fields


def errors(msgs: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [error_fields(p) for t, p in msgs if t == b"E"]


def tags(msgs: list[tuple[bytes, bytes]]) -> list[str]:
    return [p.rstrip(b"\0").decode() for t, p in msgs if t == b"C"]


def rows(msgs: list[tuple[bytes, bytes]]) -> list[list[bytes | None]]:
    return [data_row(p) for t, p in msgs if t == b"D"]
