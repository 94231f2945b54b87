# One session's statements in flight: pairs what the client sent (Query, Parse, Bind,
# Execute, Sync) with what the server answered, and emits one audit record each.
from __future__ import annotations

import hashlib
import re
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from ._core.sqlshape import shape
from .audit.record import AuditRecord, normalize
from .protocol import messages as m

if TYPE_CHECKING:
    from .session import Session

_UTC = timezone.utc
# frontend entries the session hands over (besides the fast path's Query / Parse)
REFUSAL_SYNC = 0        # the Query a refusal injected: answered by a ReadyForQuery

class Approved:
    """A decision a human approved (or a grant covered): the statement's record says
    ``approved`` and names the approver."""

    __slots__ = ("rule", "statements", "approver")

    def __init__(self, decision, approver: str | None) -> None:
        self.rule = decision.rule
        self.statements = decision.statements
        self.approver = approver


# pending-statement fields
_SQL, _DEC, _T0, _ROWS, _STATE, _ERR, _SYNC, _DONE = range(8)


class StatementTracker:
    """Turns the session's frontend log and backend events into audit records.

    The client side appends, in the order it forwards them, ``(message, decision,
    monotonic_ns)`` for each Query / Parse / Bind / Execute / Sync (the compiled fast
    path appends its Query / Parse itself), and ``(REFUSAL_SYNC, None, 0)`` for an
    injected refusal Query. The backend side calls :meth:`on_backend` with each
    CommandComplete, EmptyQueryResponse, PortalSuspended, ErrorResponse and
    ReadyForQuery in order. Completion pairs with the oldest unfinished statement;
    ReadyForQuery closes everything up to its sync point.
    """

    __slots__ = ("session", "audit", "flog", "pending", "stmts", "portals",
                 "segment_error", "bytes_mark", "_base", "_mono0", "strict")

    def __init__(self, session: Session, audit) -> None:
        self.session = session
        self.audit = audit
        self.flog: list = []
        # statements and sync markers, oldest first
        self.pending: deque = deque()
        self.stmts: dict[bytes, tuple[bytes, object]] = {}     # name -> (sql, decision)
        self.portals: dict[bytes, bytes] = {}                   # portal -> statement name
        self.segment_error = False
        self.bytes_mark = 0
        # strict durability: records are written before forwarding (strict_record),
        # so completions emit nothing
        self.strict = session.server.audit_strict
        # wall clock of monotonic zero, for record timestamps
        self._mono0 = time.monotonic_ns()
        self._base = datetime.now(_UTC)

    # -- frontend
    def _drain(self) -> None:
        flog = self.flog
        if not flog:
            return
        pending = self.pending
        for msg, d, t0 in flog:
            if msg == REFUSAL_SYNC:
                pending.append([None, None, t0, 0, None, None, True, False])
                continue
            t = msg[0]
            if t == 81:                                  # Query
                pending.append([msg[5:-1], d, t0, 0, None, None, True, False])
            elif t == 80:                                # Parse: remember the text
                name, pos = _cstr(msg, 5)
                end = msg.index(b"\0", pos)
                self.stmts[name] = (msg[pos:end], d)
            elif t == 66:                                # Bind: portal -> statement
                portal, pos = _cstr(msg, 5)
                stmt, _ = _cstr(msg, pos)
                self.portals[portal] = stmt
            elif t == 69:                                # Execute
                portal, _ = _cstr(msg, 5)
                sql, dec = self.stmts.get(self.portals.get(portal, b""), (b"", None))
                pending.append([sql, dec, t0, 0, None, None, False, False])
            elif t == 83 or t == 70:                     # Sync / FunctionCall
                pending.append([None, None, t0, 0, None, None, True, True])
        flog.clear()

    def refusal_ignored(self) -> None:
        """An injected refusal Query the server skipped (an earlier error in the same
        pipeline): its sync marker will see no ReadyForQuery."""
        self._drain()
        for i, e in enumerate(self.pending):
            if e[_SQL] is None and e[_SYNC] and not e[_DONE]:
                del self.pending[i]
                return

    # -- backend
    def on_backend(self, t: int, msg: bytes) -> None:
        self._drain()
        pending = self.pending
        if t == 90:                                      # ReadyForQuery
            while pending:
                e = pending.popleft()
                if e[_SQL] is not None and not e[_DONE]:
                    if not e[_SYNC] and e[_STATE] is None and self.segment_error:
                        e[_ERR] = "not executed: an earlier message of the pipeline failed"
                    self._emit(e)
                if e[_SYNC]:
                    break
            self.segment_error = False
            return
        e = self._current()
        if t == 69:                                      # ErrorResponse
            fields = m.parse_error_fields(msg[5:])
            if e is None:
                self.segment_error = True
                return
            e[_STATE] = fields.get("C")
            e[_ERR] = fields.get("M")
            if not e[_SYNC]:
                self._emit(e)
                e[_DONE] = True
                self.segment_error = True
            return
        if e is None:
            return
        if t == 67:                                      # CommandComplete
            e[_ROWS] += _rows(msg)
            if not e[_SYNC]:
                self._emit(e)
                e[_DONE] = True
        elif t == 73 or t == 115:                        # EmptyQuery / PortalSuspended
            if not e[_SYNC]:
                self._emit(e)
                e[_DONE] = True

    def _current(self):
        for e in self.pending:
            if not e[_DONE] and e[_SQL] is not None:
                return e
            if e[_SYNC] and e[_SQL] is None:
                return None
        return None

    def strict_record(self, msg: bytes) -> AuditRecord:
        """The record of a Query or Execute about to be forwarded (strict mode)."""
        self._drain()
        if msg[0] == 81:
            sql, d = msg[5:-1], self.pending[-1][_DEC]
        else:
            portal, _ = _cstr(msg, 5)
            sql, d = self.stmts.get(self.portals.get(portal, b""), (b"", None))
        return statement_record(self.session, sql, d, "allowed", datetime.now(_UTC))

    def _emit(self, e: list) -> None:
        if self.strict:
            return
        s = self.session
        now = time.monotonic_ns()
        seen = s.bscan.bytes_seen
        out, self.bytes_mark = seen - self.bytes_mark, seen
        dec = e[_DEC]
        approved = dec.__class__ is Approved
        rec = statement_record(s, e[_SQL], dec, "error" if e[_STATE] is not None
                               else "approved" if approved else "allowed", self._wall(e[_T0]))
        if approved:
            rec.approver = dec.approver
        rec.rows = e[_ROWS]
        rec.bytes_out = out
        rec.duration_us = (now - e[_T0]) // 1000 if e[_T0] else None
        rec.sqlstate = e[_STATE]
        rec.error = e[_ERR]
        rec.masked_cells = s.take_masked_cells()
        self.audit.log(rec)

    def _wall(self, mono_ns: int) -> datetime:
        if not mono_ns:
            return datetime.now(_UTC)
        return self._base + timedelta(microseconds=(mono_ns - self._mono0) // 1000)


_MISS = object()
_PARAM = re.compile(rb"\$(\d+)")
_NORMALIZED: dict[bytes, str | None] = {}


def fast_normalize(sql: bytes) -> str:
    """The audit normalizer's output for ``sql``, computed once per literal-insensitive
    shape (pgbench-like traffic repeats shapes with new literals; the normalizer costs
    ~15 us a call). A shape is trusted only after its filled form matched the real
    normalizer's output for a first text of that shape."""
    key = shape(sql)
    if key is None:
        return normalize(sql.decode("utf-8", "replace"))
    hit = _NORMALIZED.get(key, _MISS)
    if hit.__class__ is str:
        return hit
    norm = normalize(sql.decode("utf-8", "replace"))
    if hit is _MISS:
        params = [int(x) for x in _PARAM.findall(key)]
        n = max(params, default=0)
        parts = key.split(b"\0")
        filled = parts[0] + b"".join(b"$%d" % (n + i) + p for i, p in enumerate(parts[1:], 1))
        if len(_NORMALIZED) >= 10_000:
            _NORMALIZED.clear()
        _NORMALIZED[key] = norm if filled.decode("utf-8", "replace") == norm else None
    return norm


_FINGERPRINTS: dict[str, str] = {}


def fingerprint(normalized: str) -> str:
    """A short stable id of a normalized statement (its literal-free shape)."""
    fp = _FINGERPRINTS.get(normalized)
    if fp is None:
        if len(_FINGERPRINTS) >= 10_000:
            _FINGERPRINTS.clear()
        fp = _FINGERPRINTS[normalized] = hashlib.blake2b(
            normalized.encode(), digest_size=8).hexdigest()
    return fp


def statement_record(s: Session, sql, d, decision: str, ts: datetime) -> AuditRecord:
    """An audit record for one statement of session ``s`` (``sql`` bytes or str)."""
    fp = None
    if isinstance(sql, bytes):
        norm = fast_normalize(sql)
        fp = fingerprint(norm)
        sql = sql.decode("utf-8", "replace") if s.server.cfg.audit.capture_literals else norm
    rec = AuditRecord(
        session_id=s.id, event="statement", ts=ts, identity=s.identity_name,
        identity_kind=s.identity.kind if s.identity is not None else None,
        client_addr=s.client_addr, application_name=s.params.get("application_name"),
        database=s.database, upstream_user=s.server.cfg.upstream.user,
        statement=sql, fingerprint=fp, decision=decision)
    if d is not None:
        rec.rule = d.rule
        sts = d.statements
        if sts:
            rec.statement_kind = sts[0].kind
            rels: list[str] = []
            flags: list[str] = []
            for st in sts:
                for r in st.relations_written + st.relations_read:
                    if r not in rels:
                        rels.append(r)
                for f in st.flags:
                    if f not in flags:
                        flags.append(f)
            rec.relations = rels
            rec.flags = flags
    return rec


def _cstr(msg: bytes, pos: int) -> tuple[bytes, int]:
    end = msg.index(b"\0", pos)
    return msg[pos:end], end + 1


def _rows(msg: bytes) -> int:
    # CommandComplete tag: "SELECT 5", "INSERT 0 1", "UPDATE 3", "COPY 10", "CREATE TABLE"
    tag = msg[5:-1]
    sp = tag.rfind(b" ")
    last = tag[sp + 1:]
    return int(last) if last.isdigit() else 0
