# Postgres protocol constants, builders for the messages the proxy itself sends,
# and parsers for the few it reads (ErrorResponse fields, startup packets).
from __future__ import annotations

import socket
import struct

from .._core import WriteBuffer

# startup packet codes
PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

# authentication request codes (AuthenticationXXX, message 'R')
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# message type bytes, as ints (``msg[0]``; the same names as pgguard/_core/msgtypes.pxd).
# Frontend (client -> server):
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
DESCRIBE = ord("D")
EXECUTE = ord("E")
CLOSE = ord("C")
SYNC = ord("S")
FLUSH = ord("H")
FUNCTION_CALL = ord("F")
TERMINATE = ord("X")
PASSWORD_MESSAGE = ord("p")         # also SASLInitialResponse / SASLResponse
COPY_FAIL = ord("f")
# Both directions:
COPY_DATA = ord("d")
COPY_DONE = ord("c")
# Backend (server -> client):
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
PARAMETER_STATUS = ord("S")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NOTIFICATION_RESPONSE = ord("A")
ROW_DESCRIPTION = ord("T")
DATA_ROW = ord("D")
NO_DATA = ord("n")
COMMAND_COMPLETE = ord("C")
EMPTY_QUERY_RESPONSE = ord("I")
PORTAL_SUSPENDED = ord("s")
PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
PARAMETER_DESCRIPTION = ord("t")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
FUNCTION_CALL_RESPONSE = ord("V")
NEGOTIATE_PROTOCOL_VERSION = ord("v")
# what Describe and Close name (their first byte)
TARGET_STATEMENT = ord("S")
TARGET_PORTAL = ord("P")
# ReadyForQuery's transaction status byte
TX_IDLE = ord("I")
TX_IN_BLOCK = ord("T")
TX_FAILED = ord("E")
# the answer to SSLRequest / GSSENCRequest
SSL_ACCEPTED = ord("S")
SSL_REFUSED = ord("N")

# message types a client may send once authenticated
FRONTEND_TYPES = b"BCdcfDEHFPQSX"
# messages a client sends during authentication
FRONTEND_AUTH_TYPES = b"pX"
# frontend messages each answered by exactly one ReadyForQuery
FRONTEND_SYNC_TYPES = b"QSF"
# the longest frontend message Postgres reads, by type (postgres.c SocketBackend: its
# PQ_SMALL_MESSAGE_LIMIT and PQ_LARGE_MESSAGE_LIMIT, length field included); past it
# Postgres closes the connection without a word
FRONTEND_PG_LIMITS = {b"CDEHSXcf": 10000, b"BFPQd": 0x3FFFFFFE}

_ERR_FIELDS = {
    "severity": b"S", "severity_nl": b"V", "sqlstate": b"C", "message": b"M",
    "detail": b"D", "hint": b"H", "position": b"P",
}


def error_response(sqlstate: str, message: str, *, severity: str = "ERROR",
                   detail: str | None = None, hint: str | None = None,
                   notice: bool = False, position: int | None = None) -> bytes:
    """An ErrorResponse ('E') or, with notice=True, a NoticeResponse ('N'); ``position``:
    the 1-based character of the statement text it points at (P)."""
    buf = WriteBuffer()
    buf.new_message(ord("N" if notice else "E"))
    for code, value in ((b"S", severity), (b"V", severity), (b"C", sqlstate),
                        (b"M", message), (b"D", detail), (b"H", hint),
                        (b"P", str(position) if position else None)):
        if value is not None:
            buf.write_byte(code[0])
            buf.write_cstr(value.replace("\0", "").encode())
    buf.write_byte(0)
    buf.end_message()
    return buf.take()


def ready_for_query(status: int = TX_IDLE) -> bytes:
    return b"Z\x00\x00\x00\x05" + bytes((status,))


def auth_request(code: int, data: bytes = b"") -> bytes:
    return b"R" + struct.pack("!II", 8 + len(data), code) + data


def parameter_status(name: str, value: str) -> bytes:
    buf = WriteBuffer()
    buf.new_message(ord("S"))
    buf.write_str(name)
    buf.write_str(value)
    buf.end_message()
    return buf.take()


def backend_key_data(pid: int, secret: int) -> bytes:
    return b"K" + struct.pack("!III", 12, pid & 0xFFFFFFFF, secret & 0xFFFFFFFF)


def negotiate_protocol_version(version: int, unrecognized: list[str]) -> bytes:
    """NegotiateProtocolVersion: the newest protocol the server speaks for the major
    version asked, as a whole version number (3.0 is 196608, what Postgres sends; libpq 18
    read a bare 0 as a downgrade to before 3.0 and gave up)."""
    buf = WriteBuffer()
    buf.new_message(ord("v"))
    buf.write_int32(version)
    buf.write_int32(len(unrecognized))
    for name in unrecognized:
        buf.write_str(name)
    buf.end_message()
    return buf.take()


def startup_message(params: dict[str, str] | list[tuple[str, str]],
                    version: int = PROTOCOL_3_0) -> bytes:
    # a list may repeat a name: Postgres applies the parameters in order
    body = struct.pack("!I", version)
    for k, v in (params.items() if isinstance(params, dict) else params):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!IIII", 16, CANCEL_REQUEST, pid & 0xFFFFFFFF, secret & 0xFFFFFFFF)


def password_message(data: bytes) -> bytes:
    return b"p" + struct.pack("!I", len(data) + 4) + data


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    body = mechanism.encode() + b"\0" + struct.pack("!i", len(data)) + data
    return b"p" + struct.pack("!I", len(body) + 4) + body


TERMINATE_MESSAGE = b"X\x00\x00\x00\x04"


def parse_startup_params(payload: bytes) -> dict[str, str]:
    """Key/value pairs of a StartupMessage payload after the version int32, read as
    Postgres' postmaster reads them (ProcessStartupPacket): the buffer has an implicit
    NUL after its end; a name with no room for a value ends the walk (and is ignored);
    the walk must end on the packet's last byte. ValueError otherwise."""
    n, off = len(payload), 0
    params: dict[str, str] = {}
    while off < n:
        if payload[off] == 0:
            break                               # the terminator
        end = payload.find(b"\0", off)
        val = (n if end < 0 else end) + 1
        if val >= n:
            break                               # a name with no value: checked below
        vend = payload.find(b"\0", val)
        vend = n if vend < 0 else vend
        params[payload[off:val - 1].decode("utf-8", "replace")] = \
            payload[val:vend].decode("utf-8", "replace")
        off = vend + 1
    if off != n - 1:
        raise ValueError("expected terminator as last byte")
    return params


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse payload (after the 5-byte header)."""
    out: dict[str, str] = {}
    for part in payload.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


def parse_row_description(msg: bytes) -> list[tuple[int, int, int, int]]:
    """(table OID, attnum, type OID, format) of each field of a RowDescription."""
    (n,) = struct.unpack_from("!h", msg, 5)
    pos, out = 7, []
    for _ in range(n):
        pos = msg.index(b"\0", pos) + 1
        table, attnum, typ, _size, _mod, fmt = struct.unpack_from("!IhIhih", msg, pos)
        out.append((table, attnum, typ, fmt))
        pos += 18
    return out


def parse_param_oids(parse: bytes, pos: int | None = None) -> tuple:
    """The parameter type OIDs a Parse message declares (0: left to the server); ``pos``:
    where they start (after the query string's NUL), else found from the two names.
    A malformed message declares none: ``()``."""
    try:
        if pos is None:
            pos = parse.index(b"\0", parse.index(b"\0", 5) + 1) + 1
        (n,) = struct.unpack_from("!h", parse, pos)
        return struct.unpack_from(f"!{n}I", parse, pos + 2) if n > 0 else ()
    except (ValueError, struct.error):
        return ()


def bind_parameters(bind: bytes, pos: int) -> tuple[tuple, list, int]:
    """A Bind's parameters from ``pos`` (just after its statement name's NUL), or a
    FunctionCall's arguments (after its OID): (format codes, values as bytes or None for
    NULL, where the result format code(s) start). Raises ``struct.error`` or
    ``ValueError`` on a malformed message."""
    (nf,) = struct.unpack_from("!h", bind, pos)
    if nf < 0:
        raise ValueError("negative format count")
    fmts = struct.unpack_from(f"!{nf}h", bind, pos + 2) if nf > 0 else ()
    pos += 2 + 2 * nf
    (n,) = struct.unpack_from("!h", bind, pos)
    if n < 0:
        raise ValueError("negative value count")
    pos += 2
    values: list = []
    for _ in range(n):
        (ln,) = struct.unpack_from("!i", bind, pos)
        pos += 4
        if ln < 0:
            values.append(None)
            continue
        if pos + ln > len(bind):
            raise ValueError("a Bind parameter runs past the message")
        values.append(bind[pos:pos + ln])
        pos += ln
    return fmts, values, pos


def parse_cstr(payload: bytes, pos: int = 0) -> tuple[str, int]:
    end = payload.index(b"\0", pos)
    return payload[pos:end].decode("utf-8", "replace"), end + 1


TEXT_OID = 25


def row_description(columns: list[str]) -> bytes:
    """RowDescription of text columns (no table, text format)."""
    buf = WriteBuffer()
    buf.new_message(ord("T"))
    buf.write_int16(len(columns))
    for name in columns:
        buf.write_str(name)
        buf.write_int32(0)          # table OID
        buf.write_int16(0)          # attribute number
        buf.write_int32(TEXT_OID)
        buf.write_int16(-1)         # type size
        buf.write_int32(-1)         # type modifier
        buf.write_int16(0)          # text format
    buf.end_message()
    return buf.take()


def data_row(values: list[str | None]) -> bytes:
    buf = WriteBuffer()
    buf.new_message(ord("D"))
    buf.write_int16(len(values))
    for v in values:
        if v is None:
            buf.write_int32(-1)
        else:
            raw = str(v).encode()
            buf.write_int32(len(raw))
            buf.write_bytes(raw)
    buf.end_message()
    return buf.take()


def parse_message(name: bytes, sql: bytes) -> bytes:
    """A Parse of ``sql`` as prepared statement ``name``, no parameter types given."""
    body = name + b"\0" + sql + b"\0\0\0"
    return b"P" + struct.pack("!I", len(body) + 4) + body


def command_complete(tag: str) -> bytes:
    buf = WriteBuffer()
    buf.new_message(ord("C"))
    buf.write_str(tag)
    buf.end_message()
    return buf.take()


def empty_query_response() -> bytes:
    return b"I\x00\x00\x00\x04"


def set_nodelay(transport) -> None:
    """TCP_NODELAY on a TCP transport: messages go out as written, not coalesced."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
