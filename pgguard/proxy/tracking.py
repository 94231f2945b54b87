# Statement tracking: the audit record of each statement a session runs.
# The compiled tracker (pgguard._core.track) pairs frontend and backend messages;
# these helpers build the record columns.
from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .._core.sqlshape import shape
from .._core.track import REFUSAL_SYNC  # noqa: F401 (re-exported)
from .._core.track import StatementTracker as _Tracker
from ..audit.record import _TOKEN, INTROSPECTION, AuditRecord, normalize
from ..audit.scs import both_readings
from ..policy.classify import is_system_relation
from ..protocol import messages as m

if TYPE_CHECKING:
    from .session import Session

_UTC = timezone.utc


class Approved:
    """A decision a human approved (or a grant covered): the statement's record says
    ``approved`` and names the approver."""

    __slots__ = ("rule", "statements", "approver", "on_rows")

    def __init__(self, decision, approver: str | None, on_rows=None) -> None:
        self.rule = decision.rule
        self.statements = decision.statements
        self.approver = approver
        # called once with the rows its run changed (the tracker; see holds' windows)
        self.on_rows = on_rows


def StatementTracker(session: Session, audit) -> _Tracker:
    """The statement tracker of ``session`` (compiled: ``pgguard._core.track``)."""
    mono0 = time.monotonic_ns()
    return _Tracker(session, audit, _HELPERS, datetime.now(_UTC), mono0)


_MISS = object()
_PARAM = re.compile(rb"\$(\d+)")
# the normalizer's and fingerprint caches are bounded by bytes, not entries: a text
# longer than CACHE_TEXT_MAX is not kept (it is likely unique), and a cache whose
# texts reach CACHE_BYTES starts over
CACHE_TEXT_MAX = 8192
CACHE_BYTES = 8 << 20
_NORMALIZED: dict[bytes, str | None] = {}
_sizes = {"normalized": 0, "fingerprints": 0}


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
        if len(key) <= CACHE_TEXT_MAX:
            _sizes["normalized"] += 2 * len(key) + 100
            if _sizes["normalized"] > CACHE_BYTES:
                _NORMALIZED.clear()
                _sizes["normalized"] = 2 * len(key) + 100
            _NORMALIZED[key] = norm if filled.decode("utf-8", "replace") == norm else None
    return norm


_FINGERPRINTS: dict[str, str] = {}


def fingerprint(normalized: str) -> str:
    """A short stable id of a normalized statement (its literal-free shape)."""
    fp = _FINGERPRINTS.get(normalized)
    if fp is None:
        fp = hashlib.blake2b(normalized.encode(), digest_size=8).hexdigest()
        if len(normalized) <= CACHE_TEXT_MAX:
            _sizes["fingerprints"] += len(normalized) + 120
            if _sizes["fingerprints"] > CACHE_BYTES:
                _FINGERPRINTS.clear()
                _sizes["fingerprints"] = len(normalized) + 120
            _FINGERPRINTS[normalized] = fp
    return fp


def session_columns(s: Session) -> tuple:
    """Record columns session_id .. event of a statement of session ``s``."""
    return (s.id, s.identity_name, s.identity.kind if s.identity is not None else None,
            s.client_addr, s.params.get("application_name"), s.database,
            s.services.cfg.upstream.user, "statement")


# unqualified built-in functions that catalog queries (psql's among them) call; any other
# unqualified name could be a user's function, so its statement is not introspection
_CATALOG_BUILTINS = frozenset((
    "array_agg array_length array_lower array_to_string array_upper coalesce col_description "
    "concat count current_database current_schema current_schemas format format_type "
    "generate_series has_schema_privilege has_table_privilege left length lower max min "
    "obj_description quote_ident regexp_replace shobj_description string_agg "
    "string_to_array substring unnest upper version").split())


def _catalog_function(name: str) -> bool:
    if "." in name:
        return is_system_relation(name)
    return name.startswith("pg_") or name in _CATALOG_BUILTINS


def is_introspection(st) -> bool:
    """A statement that only reads the system catalogs (psql's ``\\d`` queries, ORM schema
    discovery): a SELECT with no flags, reading only pg_catalog / information_schema
    relations, calling only functions of those schemas (qualified, or a known built-in).

    Example: ``SELECT c.relname FROM pg_catalog.pg_class c`` is; ``SELECT 1`` is not."""
    return (st.kind == "select" and not st.flags and not st.relations_written
            and bool(st.relations_read) and all(map(is_system_relation, st.relations_read))
            and all(map(_catalog_function, st.functions)))


def statement_columns(d) -> tuple:
    """Record columns statement_kind, relations, flags of a statement decided by ``d``;
    flags ends with ``introspection`` when every statement is one (is_introspection)."""
    sts = d.statements if d is not None else None
    if not sts:
        return (None, None, None)
    rels: list[str] = []
    flags: list[str] = []
    for st in sts:
        for r in st.relations_written + st.relations_read:
            if r not in rels:
                rels.append(r)
        for f in st.flags:
            if f not in flags:
                flags.append(f)
    if not flags and all(map(is_introspection, sts)):
        flags.append(INTROSPECTION)
    return (sts[0].kind, rels, flags)


def statement_part(sql: bytes, d, key: bytes | None) -> tuple[tuple, bool]:
    """Record columns statement .. flags of ``sql`` decided by ``d`` (literals
    normalized), and whether they hold for every text of its shape ``key``."""
    if len(sql) > AUDIT_TEXT_MAX:
        norm = fast_normalize(_audit_cut(sql))
        return (norm, fingerprint(norm)) + statement_columns(d), False
    norm = fast_normalize(sql)
    part = (norm, fingerprint(norm)) + statement_columns(d)
    return part, key is not None and _NORMALIZED.get(key).__class__ is str


# the longest statement text an audit record keeps (the rest is counted, not kept)
AUDIT_TEXT_MAX = 256 << 10


_COMMENT = re.compile(rb"--[^\n]*|/\*.*?\*/", re.S)
_DOLLAR = re.compile(rb"\$([A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$.*?\$\1\$", re.S)
_BLANKS = re.compile(rb"\s+")


def _audit_cut(sql: bytes) -> bytes:
    # normalizing costs ~0.4 s per MB on the event loop (a human's 50 MB Query stalled
    # every session of the worker for 20 s). First the compiled shape (literals out:
    # a NUL each), dollar-quoted bodies, comments and runs of blanks dropped: what is
    # left is the code, every
    # statement of it (round 18: `SELECT 1 /* 300 KB */; UPDATE ...` was recorded as its
    # first 256 KiB, the UPDATE out of sight). Only code longer than that is cut: the
    # record keeps its start, up to the literal, comment or quoted name the cut would
    # leave open (whose text would otherwise make the record "not normalizable")
    shaped = shape(sql)
    if shaped is not None:
        # (a literal as 0: normalized to $n like any other)
        # (and a dollar-quoted body, code or not, as a literal: the record is a summary)
        code = _BLANKS.sub(b" ", _COMMENT.sub(b" ", _DOLLAR.sub(b"\0", shaped))).replace(
            b"\0", b"0")
        if len(code) <= AUDIT_TEXT_MAX:
            return code.strip() + b" /* ... %d bytes in all */" % len(sql)
    body = sql.lstrip()
    while body[:2] in (b"--", b"/*"):
        # leading comments first (a statement behind 256 KiB of them is kept whole)
        end = body.find(b"\n") if body[:2] == b"--" else body.find(b"*/") + 1
        body = body[end + 1:].lstrip() if end > 0 else b""
    text = body[:AUDIT_TEXT_MAX].decode("utf-8", "replace")
    for tok in _TOKEN.finditer(text):
        if tok.lastgroup == "bad":
            text = text[:tok.start()]
            break
    return text.encode() + b" /* ... %d bytes in all */" % len(sql)


def statement_record(s: Session, sql, d, decision: str, ts: datetime) -> AuditRecord:
    """An audit record for one statement of session ``s`` (``sql`` bytes or str)."""
    fp = None
    if isinstance(sql, bytes):
        if len(sql) > AUDIT_TEXT_MAX:
            sql = _audit_cut(sql)
        norm = fast_normalize(sql)
        fp = fingerprint(norm)
        sql = sql.decode("utf-8", "replace") if s.services.cfg.audit.capture_literals else norm
    sid, ident, kind, addr, app, db, user, event = session_columns(s)
    rec = AuditRecord(
        session_id=sid, event=event, ts=ts, identity=ident, identity_kind=kind,
        client_addr=addr, application_name=app, database=db, upstream_user=user,
        statement=sql, fingerprint=fp, decision=decision)
    if d is not None:
        rec.rule = d.rule
        if d.statements:
            rec.statement_kind, rec.relations, rec.flags = statement_columns(d)
    return rec


def _both_readings(sql: bytes) -> bytes:
    return both_readings(sql, normalize)


_HELPERS = (statement_record, statement_part, session_columns, Approved, m.parse_error_fields,
            _both_readings)
