# FunctionCall ('F'): resolve the function by OID, render the call as SQL, judge that SQL.
"""A FunctionCall message calls a function by OID with no SQL at all. Under a policy,
pgguard resolves the OID through the upstream catalog (``pg_proc``, cached per
database), renders the call as the statement it stands for::

    SELECT pg_catalog.set_config('role', 'postgres', 'false'::boolean)

and decides that text exactly as it would decide a Query of it (rules, guarded
defaults, read-only tokens, pinned roles, the decision caches). Allowed: the original
message goes upstream untouched. Refused: the client gets 42501 then ReadyForQuery, as
for a refused Query. An approval rule holds it like a Query. Every FunctionCall gets one
audit record carrying the rendered SQL and the decision.

Arguments are inlined as quoted literals cast to the declared types (``text`` ones stay
bare string literals, which is how a client would write them). Binary arguments of the
common types are decoded (int2/4/8, oid and the reg* types, bool, float4/8, text,
varchar, name, bpchar, "char", bytea as hex); any other binary value, and any value
longer than :data:`MAX_INLINE` bytes, becomes a typed NULL: a value pgguard does not
know, which the classifier treats as unknown (``set_config`` with an unknown setting
name is refused). An unknown OID, a call whose arguments do not fit the function, or a
text argument that is not valid UTF-8 is refused outright.

Example::

    >>> info = FunctionInfo(oid=2078, schema="pg_catalog", name="set_config", kind="f",
    ...                     retset=False, argtypes=(25, 25, 16),
    ...                     argtype_names=("text", "text", "boolean"))
    >>> render(info, Call(2078, (0,), (b"role", b"postgres", b"f")))
    "SELECT pg_catalog.set_config('role', 'postgres', 'f'::boolean)"
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import struct
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NamedTuple

import msgspec
from pglast import keywords as _kw

from ..policy.rules import Decision
from ..protocol import messages as m
from .enforce import BODIES_PENDING, _reads_masked, unguarded_refusal
from .holds import RawReader
from .tracking import statement_record

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("pgguard.session")

__all__ = ["FunctionInfo", "Call", "Unrenderable", "parse_call", "render", "function_info",
           "FunctionCalls", "MAX_INLINE"]

# longer argument values are judged as unknown (a typed NULL) instead of inlined
MAX_INLINE = 8192
# while a function is looked up, the client's bytes kept before reading pauses
WAIT_BUFFER = 1 << 20

RULE = "function-call"


class FunctionInfo(msgspec.Struct, frozen=True):
    """A function as ``pg_proc`` describes it: ``kind`` f (function), p (procedure),
    a (aggregate) or w (window); ``argtype_names`` as ``format_type`` spells them."""

    oid: int
    schema: str
    name: str
    kind: str
    retset: bool
    argtypes: tuple[int, ...]
    argtype_names: tuple[str, ...]

    @property
    def qualname(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def signature(self) -> str:
        return f"{self.qualname}({', '.join(self.argtype_names)})"


def function_info(oid: int, rows: list[tuple]) -> FunctionInfo | None:
    """The FunctionInfo from the rows of ``pgguard.sideconn.function_rows`` (schema,
    name, kind, returns a set, argument type OID, its name; one row per argument).
    None: no such OID."""
    if not rows:
        return None
    schema, name, kind, retset = rows[0][:4]
    types = tuple(int(r[4]) for r in rows if r[4] is not None)
    names = tuple(r[5] for r in rows if r[4] is not None)
    return FunctionInfo(oid=oid, schema=schema, name=name, kind=kind or "f",
                        retset=retset == "t", argtypes=types, argtype_names=names)


class Call(NamedTuple):
    """A FunctionCall message's fields: OID, argument format codes, argument values
    (None: SQL NULL)."""

    oid: int
    formats: tuple[int, ...]
    args: tuple[bytes | None, ...]


def parse_call(msg: bytes) -> Call:
    """The fields of a whole FunctionCall message; ValueError when it is malformed."""
    try:
        (oid,) = struct.unpack_from("!I", msg, 5)
        formats, args, pos = m.bind_parameters(msg, 9)  # the same layout as a Bind's
        struct.unpack_from("!h", msg, pos)          # result format
        if pos + 2 != len(msg):
            raise ValueError("trailing bytes")
    except struct.error as e:
        raise ValueError(str(e)) from None
    return Call(oid, tuple(formats), tuple(args))


class Unrenderable(Exception):
    """The call cannot be written as SQL pgguard would trust (refused)."""


_BARE_TYPES = frozenset({25, 705})          # text, unknown: a bare string literal
_TEXT_TYPES = frozenset({25, 705, 1043, 19, 1042, 18})
_OID_TYPES = frozenset({26, 24, 2202, 2203, 2204, 2205, 2206, 3734, 3769, 4089, 4096, 4191})
_INTS = {21: "!h", 23: "!i", 20: "!q"}
_FLOATS = {700: "!f", 701: "!d"}
_SIMPLE_IDENT = re.compile(r"[a-z_][a-z0-9_$]*")
_KEYWORDS = _kw.RESERVED_KEYWORDS | _kw.TYPE_FUNC_NAME_KEYWORDS | _kw.COL_NAME_KEYWORDS


def _ident(name: str) -> str:
    if _SIMPLE_IDENT.fullmatch(name) and name not in _KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    if "\0" in text:
        raise Unrenderable("an argument holds a NUL character")
    return "'" + text.replace("'", "''") + "'"


def _utf8(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise Unrenderable("a text argument is not valid UTF-8") from None


def _binary_text(typ: int, value: bytes) -> str | None:
    """The text form of a binary argument of a type pgguard decodes (None: unknown)."""
    n = len(value)
    if typ in _TEXT_TYPES:
        return _utf8(value)
    if typ == 17:                                   # bytea
        return "\\x" + value.hex()
    if typ == 16:                                   # bool
        return ("true" if value[0] else "false") if n == 1 else None
    fmt = _INTS.get(typ)
    if fmt is not None:
        return str(struct.unpack(fmt, value)[0]) if n == struct.calcsize(fmt) else None
    if typ in _OID_TYPES:
        return str(struct.unpack("!I", value)[0]) if n == 4 else None
    fmt = _FLOATS.get(typ)
    if fmt is not None and n == struct.calcsize(fmt):
        v = struct.unpack(fmt, value)[0]
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return repr(v)
    return None


def render(info: FunctionInfo, call: Call) -> str:
    """The SQL a FunctionCall stands for; raises Unrenderable when it cannot be trusted."""
    types, names = info.argtypes, info.argtype_names
    if len(call.args) != len(types):
        raise Unrenderable(f"{len(call.args)} argument(s) sent; {info.signature} takes "
                           f"{len(types)}")
    fmts = call.formats
    if len(fmts) not in (0, 1, len(types)):
        raise Unrenderable(f"{len(fmts)} argument format codes for {len(types)} arguments")
    parts = []
    for i, (typ, tname) in enumerate(zip(types, names)):
        fmt = fmts[i] if len(fmts) > 1 else (fmts[0] if fmts else 0)
        value = call.args[i]
        if fmt not in (0, 1):
            raise Unrenderable(f"argument format code {fmt}")
        if value is None or len(value) > MAX_INLINE:
            text = None
        elif fmt == 0:
            text = _utf8(value)
        else:
            text = _binary_text(typ, value)
        if text is None:                # NULL, or a value pgguard does not know
            parts.append(f"NULL::{tname}")
        elif typ in _BARE_TYPES:
            parts.append(_literal(text))
        else:
            parts.append(f"{_literal(text)}::{tname}")
    verb = "CALL" if info.kind == "p" else "SELECT"
    return f"{verb} {_ident(info.schema)}.{_ident(info.name)}({', '.join(parts)})"


def _query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def _refusal(message: str, detail: str, hint: str) -> Decision:
    return Decision(action="block", rule=RULE,
                    message=f'pgguard: FunctionCall refused by rule "{RULE}": {message}',
                    detail=detail, hint=hint)


def _for_call(d: Decision, info: FunctionInfo, sql: str) -> Decision:
    """``d`` as the decision of this call: its statement carries the rendered text (the
    audit record's), a refusal names the function and says what was judged."""
    sts = d.statements
    if sts and sts[0].text != sql:
        sts = (msgspec.structs.replace(sts[0], text=sql),) + sts[1:]
    if d.action == "allow":
        return d if sts is d.statements else msgspec.structs.replace(d, statements=sts)
    message = d.message
    if info.qualname not in message:
        message += f" (FunctionCall of {info.qualname})"
    detail = (f"FunctionCall of {info.signature}, OID {info.oid}, judged as: "
              f"{sql if len(sql) <= 300 else sql[:300] + '...'}. {d.detail}").strip()
    return msgspec.structs.replace(d, statements=sts, message=message, detail=detail)


class FunctionCalls:
    """A session's FunctionCall judge. ``on_message`` takes each 'F' the relay withheld.
    A call whose OID is not cached waits for the catalog; meanwhile the client's stream
    waits unread (the scan stops after the FunctionCall and later bytes are kept raw),
    so every later message is read, counted and judged in order once it is decided."""

    __slots__ = ("s", "_wait", "_rendered")

    def __init__(self, session: Session) -> None:
        self.s = session
        self._wait: RawReader | None = None       # reading the client during a lookup
        # (FunctionCall message, the Query its call is judged as) while a decision waits
        # for the catalog: the same text object again when the message is taken up again,
        # since Enforcement.decide waits once per text object ("is"), not per value
        self._rendered: tuple[bytes, bytes] | None = None

    def reads_paused(self) -> bool:
        """True while the lookup's reader stopped reading the client (past WAIT_BUFFER):
        it resumes the client itself when the lookup ends."""
        return self._wait is not None and self._wait.paused

    def on_message(self, msg: bytes, out: list, later: list) -> bool:
        """Judge the FunctionCall ``msg`` (``out``: what goes upstream before it;
        ``later``: messages already read after it). True: the stream now waits for a
        catalog lookup (``out`` was written; ``later`` and the rest are kept)."""
        s = self.s
        try:
            call = parse_call(msg)
        except ValueError:
            # malformed as Postgres reads it too: it calls nothing (it reads every
            # argument and the message's end before the call) and answers with its own
            # error (42883 for an unknown OID, 42501, 08P01), then ReadyForQuery
            out.append(msg)
            if s.masking is not None:
                s.masking.owe_ready()             # answered by its own ReadyForQuery
            if s.tracker is not None:
                s.tracker.flog.append((msg, None, time.monotonic_ns()))
            return False
        info = s.services.cached_function(s.database, call.oid)
        if info is not None:
            self._judge(msg, call, info, out)
            return False
        if out:
            s.up.transport.write(b"".join(out))
            out.clear()
        wait = self._wait = RawReader(s, WAIT_BUFFER)
        s.client_pipe.sink_to(wait)
        s.holds.side_task(self._resolve(msg, call, list(later), wait))
        return True

    async def _resolve(self, msg: bytes, call: Call, later: list, wait: RawReader) -> None:
        s = self.s
        info = failure = None
        try:
            info = await s.services.resolve_function(s.database, call.oid)
        except asyncio.CancelledError:
            raise
        except Exception as e:      # noqa: BLE001 - cannot tell what it calls: refuse
            log.warning("session %s: looking up function OID %d failed: %s", s.id,
                        call.oid, e)
            failure = e
        s.holds.side_task_done()
        if s.closed:
            return
        transport = s.client.transport
        s.client_pipe.unsink(wait)
        self._wait = None
        out: list[bytes] = []
        self._judge(msg, call, info, out, failure)
        # go on in stream order: messages read after it, the scan's unread rest, then
        # what arrived meanwhile (through whoever reads the client now: another hold
        # may have begun)
        if s.holds.held is not None:          # held for an approval or a strict audit record
            s.holds.put_back(later)
        else:
            if out:
                s.up.transport.write(b"".join(out))
            s.resume_items(later)
        if wait.data and not s.closed:
            s.client_pipe.reader.data_received(b"".join(wait.data))
        if wait.paused and not s.closed and s.client_may_read():
            # (not while a hold that began meanwhile keeps the socket unread: its
            # release resumes it)
            transport.resume_reading()

    def _judge(self, msg: bytes, call: Call, info: FunctionInfo | None, out: list,
               failure: Exception | None = None) -> None:
        """Decide the call and act: forward, hold for approval, or refuse."""
        s = self.s
        if info is None:
            sql = f'SELECT "unknown function OID {call.oid}"()'
            if failure is not None:
                d = _refusal(f"pgguard could not look up the function with OID {call.oid}",
                             f"the catalog lookup failed: {str(failure)[:200]}",
                             "Try again; call functions by name in SQL.")
            else:
                d = _refusal(f"no function has OID {call.oid}",
                             f"FunctionCall of OID {call.oid}, which pg_proc does not list",
                             "Call functions by name in SQL.")
            self._refuse(d, out, sql)
            return
        try:
            sql = render(info, call)
        except Unrenderable as e:
            sql = f"SELECT {_ident(info.schema)}.{_ident(info.name)}(/* unreadable */)"
            self._refuse(_refusal(
                f"pgguard cannot read the arguments of this call to {info.qualname}",
                f"FunctionCall of {info.signature}, OID {info.oid}: {e}",
                "Send the arguments the function declares, in text or binary format; "
                "or call it by name in SQL."), out, sql)
            return
        r = self._rendered
        q = r[1] if r is not None and r[0] is msg else _query(sql)
        d = s.enforce.decide(q, 5, len(q) - 1)
        if d is BODIES_PENDING:
            # the function's body (or the view map, after DDL) is read first (the stream
            # is held), then this FunctionCall is taken up again and judged by what the
            # body runs: waited for under the text decide() saw, or the wait never ends
            self._rendered = (msg, q)
            s.enforce.bodies_wait(msg, out, q)
            return
        self._rendered = None
        d = _for_call(d, info, sql)
        if d.action != "block" and s.guard is not None and s.enforce.unmeasurable(d):
            # the call may change rows (a function pgguard cannot see into, or one
            # whose body writes) and a FunctionCall's changes are not measured
            d = unguarded_refusal(d, "a FunctionCall message")
        if d.action == "allow":
            self._forward(msg, d, out, sql)
        elif d.action == "approve":
            s.holds.for_approval(d, msg, out, extended=False, sql=sql.encode())
        else:
            self._refuse(d, out, sql)

    def _forward(self, msg: bytes, d: Decision, out: list, sql: str) -> None:
        s = self.s
        out.append(msg)
        if s.masking is not None:
            # a function outside pg_catalog may read anything (its body is not judged
            # here): its result is masked for a masked identity, like a masked read
            s.masking.frontend(m.FUNCTION_CALL, msg, _reads_masked(s, d)
                               or not sql.startswith("SELECT pg_catalog."))
            s.masking.owe_ready()                 # answered by its own ReadyForQuery
        s.services.count_statement("allowed")
        if s.tracker is None:
            return
        s.tracker.flog.append((msg, d, time.monotonic_ns()))
        if s.services.audit_strict:
            # the record must be durable before the call goes upstream
            out.pop()
            rec = statement_record(s, sql.encode(), d, "allowed",
                                   datetime.now(timezone.utc))
            s.holds.begin(out, [msg])
            s.services.audit.log_strict(rec).add_done_callback(s.holds.record_durable)

    def _refuse(self, d: Decision, out: list, sql: str) -> None:
        # answered like a refused Query: an ErrorResponse, then ReadyForQuery
        self.s.enforce.inject_refusal(d, out, extended=False, sql=sql.encode())

