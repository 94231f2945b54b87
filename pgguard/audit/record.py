# The audit record: DESIGN §6 columns as a msgspec Struct, their Arrow schema, statement
# normalization and secret scrubbing, and the canonical bytes the hash chain covers.
"""One audit event and everything that defines its stored form.

The columns (DESIGN §6) are stable; their order is the Parquet column order::

    event_id  ts  session_id  identity  identity_kind  client_addr  application_name
    database  upstream_user  event  statement  fingerprint  statement_kind  relations
    flags  decision  rule  approver  rows  bytes_out  masked_cells  duration_us
    sqlstate  error  prev_hash  hash

Canonical form and chain (what ``pgguard audit verify`` recomputes)::

    content  = msgspec JSON of the record without prev_hash and hash, fields in schema
               order, fields that are null omitted, ts as RFC 3339 UTC ("...Z", µs)
    hash     = hex(sha256(unhex(prev_hash) + content))
    prev_hash of the first record of a stream = "0" * 64

Example::

    >>> from datetime import datetime, timezone
    >>> r = AuditRecord(session_id="s1", event="statement", identity="ci-agent",
    ...                 statement="SELECT * FROM t WHERE id = $1", rows=1,
    ...                 ts=datetime(2024, 5, 1, tzinfo=timezone.utc), event_id="01HX")
    >>> content_bytes(r)[:60]
    b'{"event_id":"01HX","ts":"2024-05-01T00:00:00Z","session_id":'
    >>> chain_hash(GENESIS, content_bytes(r))[:12]
    '4a4b7b329b31'
"""
from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from typing import Annotated

import msgspec
import pyarrow as pa

UTC = timezone.utc

# the value in ``flags`` of a statement that only read the system catalogs (psql's \\d
# queries): audit queries and reports leave such records out with
# ``NOT coalesce(list_contains(flags, 'introspection'), false)``
INTROSPECTION = "introspection"
GENESIS = "0" * 64

# event values (DESIGN §6; "audit_dropped" marks records the batched queue had to drop)
EVENT_CONNECT = "connect"          # authenticated connection established (auth ok)
EVENT_AUTH_FAILED = "auth_failed"
EVENT_STATEMENT = "statement"
EVENT_DISCONNECT = "disconnect"
EVENT_AUDIT_DROPPED = "audit_dropped"
EVENTS = (EVENT_CONNECT, EVENT_AUTH_FAILED, EVENT_STATEMENT, EVENT_DISCONNECT,
          EVENT_AUDIT_DROPPED)

DECISIONS = ("allowed", "blocked", "approved", "denied", "timed_out", "withdrawn", "error")

# a statement longer than this is stored truncated, with a marker saying how long it was
MAX_STATEMENT_CHARS = 1 << 20

_I64 = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]


class AuditRecord(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One audit event. Build it on the event loop, hand it to ``AuditLog.log``.

    ``session_id`` and ``event`` are required; everything else may stay ``None``.
    The writer owns the record once logged: it sets ``event_id`` (time-sortable, unique),
    stamps ``ts`` if it is ``None`` (pass ``datetime.now(timezone.utc)`` for the real event
    time), normalizes ``statement`` (literals become ``$n``) unless raw capture is
    configured, and computes the chain (``prev_hash``, ``hash``: set in the stored file,
    never on this object). Pass plain ``str``/``int`` values and tuples or lists of
    ``str``; anything else is coerced (slowly) and noted in ``error``.

    Example::

        rec = AuditRecord(session_id=sid, event="statement", identity="ci-agent",
                          identity_kind="agent", statement=sql, statement_kind="select",
                          relations=("public.orders",), decision="allowed",
                          rows=12, bytes_out=900, masked_cells=0, duration_us=420,
                          ts=datetime.now(timezone.utc))
        audit.log(rec)
    """

    event_id: str = ""
    ts: datetime | None = None
    session_id: str
    identity: str | None = None
    identity_kind: str | None = None       # agent | human
    client_addr: str | None = None
    application_name: str | None = None
    database: str | None = None
    upstream_user: str | None = None
    event: str                             # connect | auth_failed | statement | disconnect
    statement: str | None = None
    fingerprint: str | None = None
    statement_kind: str | None = None
    relations: list[str] | None = None
    flags: list[str] | None = None
    decision: str | None = None            # allowed | blocked | approved | denied | ...
    rule: str | None = None
    approver: str | None = None
    rows: int | None = None
    bytes_out: int | None = None
    masked_cells: int | None = None
    duration_us: int | None = None
    sqlstate: str | None = None
    error: str | None = None
    prev_hash: str = ""
    hash: str = ""


class _Content(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False,
               forbid_unknown_fields=True):
    # the hashed part of a record, with exact types: the writer validates each encoded
    # line against it before hashing, so every hashed line round-trips through Parquet
    event_id: str
    ts: datetime
    session_id: str
    identity: str | None = None
    identity_kind: str | None = None
    client_addr: str | None = None
    application_name: str | None = None
    database: str | None = None
    upstream_user: str | None = None
    event: str
    statement: str | None = None
    fingerprint: str | None = None
    statement_kind: str | None = None
    relations: list[str] | None = None
    flags: list[str] | None = None
    decision: str | None = None
    rule: str | None = None
    approver: str | None = None
    rows: _I64 | None = None
    bytes_out: _I64 | None = None
    masked_cells: _I64 | None = None
    duration_us: _I64 | None = None
    sqlstate: str | None = None
    error: str | None = None


FIELDS: tuple[str, ...] = AuditRecord.__struct_fields__
CONTENT_FIELDS: tuple[str, ...] = _Content.__struct_fields__
_INT_FIELDS = ("rows", "bytes_out", "masked_cells", "duration_us")
_LIST_FIELDS = ("relations", "flags")
_REQUIRED = ("event_id", "ts", "session_id", "event", "prev_hash", "hash")


def _arrow_type(name: str) -> pa.DataType:
    if name == "ts":
        return pa.timestamp("us", tz="UTC")
    if name in _INT_FIELDS:
        return pa.int64()
    if name in _LIST_FIELDS:
        return pa.list_(pa.string())
    return pa.string()


SCHEMA: pa.Schema = pa.schema(
    [pa.field(n, _arrow_type(n), nullable=n not in _REQUIRED) for n in FIELDS])
"""The Parquet/Arrow schema of the audit files (stable; DESIGN §6)."""

CONTENT_SCHEMA: pa.Schema = pa.schema([SCHEMA.field(n) for n in CONTENT_FIELDS])

_encoder = msgspec.json.Encoder()
_content_decoder = msgspec.json.Decoder(_Content)


def content_bytes(record: AuditRecord | dict) -> bytes:
    """The canonical bytes of a record (see module docstring); ``prev_hash``/``hash`` ignored.

    Example: ``content_bytes(AuditRecord(session_id="s", event="connect", ...))``.
    """
    if isinstance(record, dict):
        record = _Content(**{k: record.get(k) for k in CONTENT_FIELDS
                             if record.get(k) is not None})
    elif isinstance(record, AuditRecord) and (record.prev_hash or record.hash):
        record = msgspec.structs.replace(record, prev_hash="", hash="")
    return _encoder.encode(record)


def chain_hash(prev_hash: str, content: bytes) -> str:
    """``hex(sha256(unhex(prev_hash) + content))``. Example: ``chain_hash(GENESIS, b"{}")``.

    Raises ``ValueError`` if *prev_hash* is not 64 hex digits.
    """
    prev = bytes.fromhex(prev_hash)
    if len(prev) != 32:
        raise ValueError("prev_hash must be 64 hex digits")
    return hashlib.sha256(prev + content).hexdigest()


def validate_lines(blob: bytes) -> None:
    """Raise ``msgspec.ValidationError`` unless every line of *blob* is valid content."""
    _content_decoder.decode_lines(blob)


_CONTENT_LIST = list[_Content]


def to_content(records: list[AuditRecord]) -> list[_Content]:
    """The hashed part of *records*, type-checked (``msgspec.ValidationError`` if not).

    The writer hashes the JSON of these validated objects, never of the caller's, so
    what is hashed is exactly what Parquet can hold and give back.
    """
    return msgspec.convert(records, _CONTENT_LIST, from_attributes=True)


# -- coercion of malformed records (slow path; never taken for well-typed records) ------

def _as_text(v: object) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        s = bytes(v).decode("utf-8", "replace")     # never str(b"..."): b"'x'" hides 'x'
    else:
        s = v if isinstance(v, str) else str(v)
    # lone surrogates (e.g. from surrogateescape) cannot be stored as UTF-8
    return s.encode("utf-8", "replace").decode("utf-8")


def _as_utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, list):
        return len(a) == len(b) and all(type(x) is str and x == y for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def sanitize(record: AuditRecord, now: datetime) -> AuditRecord:
    """A copy of *record* with every field coerced to its declared type.

    Fields that had to change are named in ``error`` so an auditor sees the record was
    repaired by the writer, not by someone after the fact.
    """
    fixed: dict[str, object] = {}
    changed: list[str] = []
    for name in CONTENT_FIELDS:
        v = getattr(record, name, None)
        out: object
        if v is None:
            out = None
        elif name == "ts":
            out = _as_utc(v) if isinstance(v, datetime) else None
        elif name in _INT_FIELDS:
            if type(v) is int and -(1 << 63) <= v < (1 << 63):
                out = v
            else:
                try:
                    out = int(v) if not isinstance(v, (bool, str, bytes)) else None
                    if out is not None and not -(1 << 63) <= out < (1 << 63):
                        out = None
                except (TypeError, ValueError, OverflowError):
                    out = None
        elif name in _LIST_FIELDS:
            if isinstance(v, (str, bytes)):
                out = [_as_text(v)]
            else:
                try:
                    out = [_as_text(x) for x in v]  # type: ignore[union-attr]
                except TypeError:
                    out = [_as_text(v)]
        else:
            out = _as_text(v)
        if out is None and name in ("session_id", "event", "event_id"):
            out = ""
        if out is None and name == "ts":
            out = now
        if not _same(v, out):
            changed.append(name)
        fixed[name] = out
    if changed:
        note = "audit: coerced " + ", ".join(changed)
        err = fixed.get("error")
        fixed["error"] = f"{err}; {note}" if err else note
    return AuditRecord(**fixed)  # type: ignore[arg-type]


# -- statement normalization -----------------------------------------------------------
#
# A regex tokenizer does the common case in C; pglast's scanner (the real Postgres lexer)
# is the fallback for anything the regex declines (nested comments, unterminated quotes)
# and the oracle the tests compare against.

_IDENT_CHAR = r"[\w$]"
# string continuation (scan.l whitespace_with_newline): spaces or -- comments, a newline,
# then spaces or whole -- comment lines
_CONT = r"(?:(?:[ \t\f\v]|--[^\n\r]*)*[\n\r](?:[ \t\n\r\f\v]+|--[^\n\r]*[\n\r])*)"
_TOKEN = re.compile(
    r"""
      (?P<skip> --[^\n\r]*                         # line comment
              | /\*(?:[^*/]|\*(?!/)|/(?!\*))*\*/   # block comment (not nested)
              | "(?:[^"]|"")*"                     # quoted identifier
              | (?<![\w$\x80-\U0010ffff])\$\d+                    # parameter: stays
      )
    | (?P<lit>  (?<![\w$\x80-\U0010ffff])[Ee]'(?:[^'\\]|\\.|'')*'(?:""" + _CONT + r"""'(?:[^'\\]|\\.|'')*')*
              | (?<![\w$\x80-\U0010ffff])[BbXx]'[^']*'(?:""" + _CONT + r"""'[^']*')*
              | (?<![\w$\x80-\U0010ffff])[Uu]&'(?:[^']|'')*'
              | '(?:[^']|'')*'(?:""" + _CONT + r"""'(?:[^']|'')*')*
              | (?<![\w$\x80-\U0010ffff])\$(?P<tag>(?:[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*)?)\$.*?\$(?P=tag)\$
              | (?<![\w$.\x80-\U0010ffff])0[xX][0-9A-Fa-f_]+
              | (?<![\w$.\x80-\U0010ffff])0[oO][0-7_]+
              | (?<![\w$.\x80-\U0010ffff])0[bB][01_]+
              | (?<![\w$.\x80-\U0010ffff])(?:\d[\d_]*(?:\.(?:\d[\d_]*)?)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?
      )
    | (?P<bad>  /\* | ['"] | (?<![\w$\x80-\U0010ffff])\$(?:[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*)?\$ )
    """,
    # (ASCII: to Postgres a digit is 0-9 and every other character >= U+0080 is an
    # identifier's; \d matched '١', read $١$...$١$ as a parameter and a quote inside the
    # dollar-quoted body as a literal running on over code: two UPDATEs of different
    # code shared an approval window)
    re.X | re.S | re.A,
)
_PARAM = re.compile(r"\$(\d+)", re.A)
_HAS_LITERAL = re.compile(r"['\d$]", re.A)
_LITERAL_TOKENS = frozenset(("SCONST", "ICONST", "FCONST", "BCONST", "XCONST", "USCONST"))


class _Declined(Exception):
    pass


def _normalize_regex(sql: str, depth: int = 0) -> str:
    spans: list[tuple[int, int]] = []
    max_param = 0
    for m in _TOKEN.finditer(sql):
        kind = m.lastgroup
        if kind == "lit" or kind == "tag":
            spans.append(m.span())
        elif kind == "skip":
            text = m.group()
            if text[0] == "$" and text[1:].isdigit():
                max_param = max(max_param, int(text[1:]))
        else:
            raise _Declined
    return _splice(sql, spans, max_param, depth)


def _normalize_scanner(sql: str, depth: int = 0) -> str:
    from pglast import parser  # the real Postgres lexer (libpg_query)

    spans: list[tuple[int, int]] = []
    max_param = 0
    for tok in parser.scan(sql):
        if tok.name in _LITERAL_TOKENS:
            spans.append((tok.start, tok.end + 1))
        elif tok.name == "PARAM":
            max_param = max(max_param, int(sql[tok.start + 1:tok.end + 1]))
    return _splice(sql, spans, max_param, depth)


# a literal right after these words is code: a DO block's body, a function's body
# (AS ...), dynamic SQL (EXECUTE '...', EXECUTE ('...'), format('...') in a body),
# DO LANGUAGE x '...'; after LANGUAGE alone it is a language's name, and the literal
# right after that one is the body
_BODY_TAIL = re.compile(r"(?i)(?:^|[^\w$\x80-\U0010ffff])(?:DO|AS|EXECUTE(?:\s*\()*|format\s*\("
                        r"|LANGUAGE\s+[\w$\x80-\U0010ffff]+)\Z")
_LANG_TAIL = re.compile(r"(?i)(?:^|[^\w$\x80-\U0010ffff])LANGUAGE\Z")
_QUOTED_NAME = re.compile(r'"(?:[^"]|"")*"')
_BODY_DEPTH = 16
_E_ESCAPE = re.compile(r"''|\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)",
                       re.S)
_E_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _e_char(m: re.Match) -> str:
    g = m.group(1)
    if g is None:
        return "'"
    c = g[0]
    try:
        if c == "x" and len(g) > 1:
            return chr(int(g[1:], 16))
        if "0" <= c <= "7":
            return chr(int(g, 8))
        if c in "uU" and len(g) > 1:
            return chr(int(g[1:], 16))
    except (ValueError, OverflowError):
        return "\ufffd"
    return _E_SIMPLE.get(c, c)


def _u_unescape(text: str, esc: str) -> str:
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c != esc:
            out.append(c)
            i += 1
        elif text[i + 1:i + 2] == esc:
            out.append(esc)
            i += 2
        else:
            width = 7 if text[i + 1:i + 2] == "+" else 4
            digits = text[i + 1 + (width == 7):i + 1 + width]
            try:
                out.append(chr(int(digits, 16)))
                i += 1 + width
            except (ValueError, OverflowError):
                out.append(c)
                i += 1
    return "".join(out)


def _body(lit: str, after: str) -> str | None:
    """The text of a string literal (quoted, E'', U&'' or dollar-quoted), as Postgres
    reads it; ``after``: what follows it (a UESCAPE clause)."""
    if lit.startswith("$"):
        tag_end = lit.index("$", 1) + 1
        return lit[tag_end:len(lit) - tag_end]
    if lit[:1] in "Ee" and lit[1:2] == "'":
        return _E_ESCAPE.sub(_e_char, lit[2:-1])
    if lit[:2].upper() == "U&":
        m = re.match(r"\s*UESCAPE\s*'([^'])'", after, re.I)
        return _u_unescape(lit[3:-1].replace("''", "'"), m.group(1) if m else "\\")
    if lit[:1] == "'":
        return lit[1:-1].replace("''", "'")
    return None


def _code_before(seg: str) -> str:
    """The code a literal follows: ``seg`` (the text since the previous literal: no
    string in it) without comments (nested ones too) and trailing blanks, quoted names
    as ``x``: its last 200 characters."""
    if '"' in seg:
        seg = _QUOTED_NAME.sub("x", seg)
    if "--" in seg or "/*" in seg:
        out, i, n = [], 0, len(seg)
        while i < n:
            a, b = seg.find("--", i), seg.find("/*", i)
            j = a if b < 0 or 0 <= a < b else b
            if j < 0:
                out.append(seg[i:])
                break
            out.append(seg[i:j])
            out.append(" ")
            if j == a:
                e = seg.find("\n", j)
                i = n if e < 0 else e
                continue
            depth, k = 1, j + 2
            while depth and k < n:
                o, c = seg.find("/*", k), seg.find("*/", k)
                if c < 0:
                    k = n
                elif 0 <= o < c:
                    depth, k = depth + 1, o + 2
                else:
                    depth, k = depth - 1, c + 2
            i = k
        seg = "".join(out)
    return seg.rstrip()[-200:]


def _splice(sql: str, spans: list[tuple[int, int]], first: int, depth: int = 0) -> str:
    if not spans:
        return sql
    out: list[str] = []
    last = 0
    n = first
    lang = False                        # the previous literal was a language's name
    for start, end in spans:
        out.append(sql[last:start])
        code = _code_before(sql[last:start])
        last = end
        if (lang and not code) or _BODY_TAIL.search(code):
            lang = False
            # code in a literal: kept, its own literals normalized (round 19: every DO
            # block was recorded as `DO $1`, whatever it ran)
            body = _body(sql[start:end], sql[end:end + 40])
            if body is not None and depth < _BODY_DEPTH:
                inner = normalize(body, depth + 1)
                tag = "$pgguard$"
                k = 0
                while tag in inner:
                    k += 1
                    tag = f"$pgguard{k}$"
                out.append(tag + inner + tag)
                continue
            if body is not None:
                n += 1
                out.append(f"${n} /* pgguard: code nested deeper than {_BODY_DEPTH} "
                           "levels, not shown */")
                continue
        lang = bool(_LANG_TAIL.search(code))
        if lang:                        # a language's name: kept as written
            out.append(sql[start:end])
            continue
        n += 1
        out.append(f"${n}")
    out.append(sql[last:])
    return "".join(out)


def normalize(sql: str, depth: int = 0) -> str:
    """Replace every literal (strings, numbers, bit strings, dollar quotes) with ``$n``.

    Numbering continues after the highest ``$n`` already in the text, as in
    pg_stat_statements. Comments and identifiers are kept. Text the Postgres lexer cannot
    tokenize is not stored at all: a placeholder says how long it was.

    Example::

        >>> normalize("SELECT * FROM users WHERE email = 'bob@x.com' AND id > 42")
        'SELECT * FROM users WHERE email = $1 AND id > $2'
    """
    if not _HAS_LITERAL.search(sql):
        return sql
    try:
        return _normalize_regex(sql, depth)
    except _Declined:
        pass
    try:
        return _normalize_scanner(sql, depth)
    except Exception:  # pglast.parser.ParseError and anything odd: never log the text
        return f"<statement not normalizable: {len(sql)} chars>"


_SECRET_QUOTED = re.compile(
    r"""(?ix)
    (\bpassword \s* (?: = | \bto\b )? \s*)
    ( ''(?=[^\s'),;])(?:[^']|'''')*''   # nested in a quoted SQL string: ''secret''
    | [Ee]?'(?:[^'\\]|\\.|'')*'        # 'secret', E'secret'
    | \$(?P<t>(?:[A-Za-z_]\w*)?)\$.*?\$(?P=t)\$ )   # $$secret$$
    """,
    re.S,
)
_SECRET_CONNINFO = re.compile(r"(?i)(\bpassword\s*=\s*)(?!')([^\s',;)]+)")
_MASK = "'********'"


def scrub_secrets(sql: str) -> str:
    """Mask passwords in SQL kept verbatim (``capture_literals = true``).

    Covers ``CREATE/ALTER ROLE|USER ... [ENCRYPTED] PASSWORD '...'``, user-mapping
    ``OPTIONS (password '...')``, SQL nested in strings or dollar quotes (DO bodies), and
    ``password=...`` inside connection strings (dblink).

    Example::

        >>> scrub_secrets("ALTER ROLE app PASSWORD 'hunter2' VALID UNTIL '2030-01-01'")
        "ALTER ROLE app PASSWORD '********' VALID UNTIL '2030-01-01'"
    """
    if "assword" not in sql and "ASSWORD" not in sql and not re.search("(?i)password", sql):
        return sql
    sql = _SECRET_QUOTED.sub(
        lambda m: m.group(1) + ("''********''" if m.group(2)[:2] == "''" else _MASK), sql)
    return _SECRET_CONNINFO.sub(lambda m: m.group(1) + "********", sql)


def prepare_statement(sql: str, capture_literals: bool) -> str:
    """What the log stores for *sql*: normalized, or verbatim with secrets scrubbed.

    Example: ``prepare_statement("SELECT 1", capture_literals=False) == "SELECT $1"``.
    """
    n = len(sql)
    # a cut can leave an unterminated quote; normalize() then fails closed
    cut = sql[:MAX_STATEMENT_CHARS] if n > MAX_STATEMENT_CHARS else sql
    # normalized text has no literals left; a password can only hide in a comment
    out = scrub_secrets(cut if capture_literals else normalize(cut))
    if n > MAX_STATEMENT_CHARS or len(out) > MAX_STATEMENT_CHARS:
        out = (out[:MAX_STATEMENT_CHARS]
               + f" …[truncated: statement of {n} chars, stored up to {MAX_STATEMENT_CHARS}]")
    return out
