# Mask plan building: [[masks]] strategies and column types -> the compiled core's MaskPlan.
"""Turn config and result shapes into :class:`~pgguard._core.rowmask.MaskPlan` objects.

The session knows, for each column of a result, which ``[[masks]]`` entry applies (if
any), its type OID and its format code; whether detectors scan it follows from the
config. :func:`column_mask` turns that into one plan entry, :func:`build_plan` compiles
the entries (once per result shape; plans are immutable and can be cached).

Strategies (``replacement`` defaults to ``"****"``):

==========  ==========================================================================
redact      the replacement
partial     the replacement + the last ``keep`` characters (code points), when the
            value has more than ``keep`` of them; else the replacement alone
email       first character of the local part + ``***@`` + the domain
            (``jane@example.com`` -> ``j***@example.com``); not an email: the replacement
hash        ``h_`` + 16 hex digits of HMAC-SHA256(key, value): the same value gives the
            same token under one key, so joins and GROUP BY still work
null        SQL NULL
==========  ==========================================================================

Types: values stay decodable by the client. Text-like columns (text, varchar, bpchar,
name, unknown) get the strategy's text, in text and binary format alike (their binary
form is the text). json and jsonb get it as a JSON string (``"****"``; binary jsonb keeps
its version byte). Every other type (numbers, dates, uuid, bytea...) becomes NULL,
whatever the strategy: no other value would decode as that type. Detectors scan
text-like and JSON columns span by span, and every type that may carry text (arrays,
composites, records, xml, bytea, extension types): in binary format as a whole raw
value, a match making that cell NULL; in text format span by span, the labels in place
where they keep the literal valid, else NULL.

Example::

    cols = [column_mask(None, oid=23),
            column_mask(Mask(column="public.c.email", strategy="email"), oid=25)]
    plan = build_plan(cols)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from .._core.rowmask import MaskPlan
from ..config import Mask

__all__ = [
    "ACTION_DETECT",
    "ACTION_NONE",
    "ACTION_NULL",
    "ACTION_STRATEGY",
    "KIND_JSON",
    "KIND_HEX",
    "KIND_INT8_BINARY",
    "KIND_UINT8_BINARY",
    "KIND_NUMERIC_BINARY",
    "KIND_FLOAT8_BINARY",
    "KIND_FLOAT8_TEXT",
    "KIND_JSONB_BINARY",
    "KIND_LITERAL",
    "KIND_OTHER",
    "KIND_TEXT",
    "KIND_WHOLE",
    "STRATEGIES",
    "TEXT_LIKE_OIDS",
    "ColumnMask",
    "CopyFormat",
    "build_plan",
    "cell_kind",
    "column_mask",
    "copy_format",
    "counts_by_rule",
]

ACTION_NONE = 0        # the cell passes as it is
ACTION_STRATEGY = 1    # the whole value is replaced per the strategy
ACTION_NULL = 2        # the cell becomes NULL
ACTION_DETECT = 3      # detectors mask the spans they find

STRATEGIES = {"redact": 0, "partial": 1, "email": 2, "hash": 3}

KIND_OTHER = 0
KIND_TEXT = 1
KIND_JSON = 2
KIND_JSONB_BINARY = 3
KIND_WHOLE = 4         # arrays, composites, records, xml (binary): scanned raw, NULL on a match
KIND_LITERAL = 5       # the same in text format: labels in place when they fit, else NULL
KIND_HEX = 6           # bytea in text format: the bytes it spells scanned, NULL on a match
# int8, xid8, numeric, float8 in binary format: the digits a client prints of the value
# scanned (a card number fits an int8), NULL on a match
KIND_INT8_BINARY = 7
KIND_UINT8_BINARY = 8
KIND_NUMERIC_BINARY = 9
KIND_FLOAT8_BINARY = 10
KIND_FLOAT8_TEXT = 11    # float8 in text format: the digits of the value its text reads as
# int8[], numeric[], float8[], xid8[]: in text format a match makes the cell NULL (a
# label inside '{4111111111111111}' would not parse as the element type)
_DIGIT_ARRAY_OIDS = frozenset({1016, 1231, 1022, 271})
_DIGITS_BINARY = {20: KIND_INT8_BINARY, 5069: KIND_UINT8_BINARY, 1700: KIND_NUMERIC_BINARY,
                  701: KIND_FLOAT8_BINARY}
BYTEA_OID = 17

# text, varchar, bpchar, name, unknown; 0: no type known (COPY): treated as text
TEXT_LIKE_OIDS = frozenset({25, 1043, 1042, 19, 705, 0})
JSON_OID = 114
JSONB_OID = 3802


# types whose values hold no text the detectors could find (in either format): bool,
# integers, oid, floats, numeric, money, date/time types, uuid, pg_lsn, tid, xid, cid
SCALAR_OIDS = frozenset({16, 20, 21, 23, 26, 700, 701, 1700, 790, 1082, 1083, 1114, 1184,
                         1186, 1266, 2950, 3220, 27, 28, 29, 5069})


# scalar types whose text form can spell a detector match: credit_card's 13-19 digits fit
# an int8, xid8, numeric or a float8 below 1e15 ("411111111111111"); phone's "123 567.1234"
# shape is a numeric or float8 ("123567.1234"). In text format the detectors scan them and
# a match makes the cell NULL (a label would not parse as the type); in binary format they
# scan the digits a client prints of the value (asyncpg decodes an int8 to the same
# number), NULL on a match. The other scalars cannot: int2/int4/oid/xid/cid have at most 10 digits
# and no separator, float4 at most 9 significant digits, money groups digits with commas,
# date/time types break digit runs with ':' and have at most 2-digit groups around them.
DIGIT_TEXT_OIDS = frozenset({20, 1700, 701, 5069})


def cell_kind(oid: int, binary: bool = False, textlike: bool | None = None) -> int:
    """How the core may rewrite a cell of this type and format. ``textlike=True``
    declares an extension type whose text and binary forms are its text (citext).
    Every other type that may hold text (arrays, composites, records, xml, domains,
    extension types: anything not a known scalar) is KIND_WHOLE in binary format: the
    detectors scan its raw value and a match makes the cell NULL, the one value that
    decodes as any type; in text format KIND_LITERAL: the labels go in place when no
    span touches the literal's syntax, else the cell is NULL."""
    if textlike or (textlike is None and oid in TEXT_LIKE_OIDS):
        return KIND_TEXT
    if oid == JSON_OID:
        return KIND_JSON              # binary json is its text
    if oid == JSONB_OID:
        return KIND_JSONB_BINARY if binary else KIND_JSON
    if oid == 701 and not binary:
        return KIND_FLOAT8_TEXT       # '4.111111111111111e+15' prints as 16 digits
    if oid in _DIGIT_ARRAY_OIDS and not binary:
        return KIND_WHOLE             # a label would not parse as a number: NULL
    if oid in DIGIT_TEXT_OIDS:
        return _DIGITS_BINARY[oid] if binary else KIND_WHOLE
    if oid in SCALAR_OIDS:
        return KIND_OTHER
    if oid == BYTEA_OID and not binary:
        return KIND_HEX               # ("\x..."; binary bytea is its bytes: KIND_WHOLE)
    return KIND_WHOLE if binary else KIND_LITERAL


class ColumnMask(msgspec.Struct, frozen=True):
    """One column of a plan. ``rule`` names what masks it (for per-rule counts)."""

    action: int = ACTION_NONE
    strategy: int = 0
    kind: int = KIND_TEXT
    keep: int = 4
    replacement: bytes = b"****"
    key: bytes = b""
    rule: str | None = None


PASS = ColumnMask()


def column_mask(mask: Mask | None, *, oid: int = 25, binary: bool = False,
                textlike: bool | None = None, detect: bool = False,
                hash_key: bytes | str | None = None) -> ColumnMask:
    """The plan entry of one result column.

    ``mask`` is the ``[[masks]]`` entry that applies (None: no column rule; then
    ``detect=True`` lets the detectors scan it). ``hash_key`` is required for the
    hash strategy.
    """
    kind = cell_kind(oid, binary, textlike)
    if mask is None:
        if detect and kind != KIND_OTHER:
            return ColumnMask(ACTION_DETECT, kind=kind, rule="detectors")
        return ColumnMask(kind=kind)
    repl = mask.replacement.encode()
    if mask.strategy == "null" or kind in (KIND_OTHER, KIND_WHOLE, KIND_LITERAL) or \
            kind >= KIND_HEX:
        return ColumnMask(ACTION_NULL, kind=kind, replacement=repl, rule=mask.column)
    key = b""
    if mask.strategy == "hash":
        if not hash_key:
            raise ValueError(f"masks: {mask.column}: the hash strategy needs a key")
        key = hash_key.encode() if isinstance(hash_key, str) else bytes(hash_key)
    return ColumnMask(ACTION_STRATEGY, STRATEGIES[mask.strategy], kind, mask.keep, repl,
                      key, mask.column)


class CopyFormat(msgspec.Struct):
    """The options of a ``COPY ... TO STDOUT`` being masked (one byte each)."""

    format: Literal["text", "csv"] = "text"
    delimiter: bytes = b"\t"
    quote: bytes = b'"'
    escape: bytes = b'"'
    null: bytes = b"\\N"
    header: bool = False


def copy_format(format: Literal["text", "csv"] = "text", *, delimiter: str | bytes | None = None,
                quote: str | bytes | None = None, escape: str | bytes | None = None,
                null: str | bytes | None = None, header: bool = False) -> CopyFormat:
    """A :class:`CopyFormat` with Postgres's defaults: text: tab and ``\\N``; csv:
    comma, ``"`` (escape = quote) and the empty string for NULL.

    >>> copy_format("csv", delimiter=";").null
    b''
    """
    def b(v: str | bytes | None, default: bytes) -> bytes:
        if v is None:
            return default
        return v.encode() if isinstance(v, str) else bytes(v)

    if format == "text":
        return CopyFormat("text", b(delimiter, b"\t"), b'"', b'"', b(null, b"\\N"), header)
    if format == "csv":
        q = b(quote, b'"')
        return CopyFormat("csv", b(delimiter, b","), q, b(escape, q), b(null, b""), header)
    raise ValueError(f"COPY format {format!r} cannot be masked (binary COPY is refused)")


def build_plan(columns: Sequence[ColumnMask], detectors: object | None = None,
               copy: CopyFormat | None = None) -> MaskPlan:
    """Compile plan entries (one per result column, in order) into a MaskPlan."""
    uses_detectors = any(c.action == ACTION_DETECT for c in columns)
    return MaskPlan(columns, detectors if uses_detectors else None, copy)


def counts_by_rule(plan: MaskPlan, column_counts: Iterable[int],
                   detector_counts: Iterable[int] = ()) -> dict[str, int]:
    """Masked cells by rule: ``[[masks]]`` column pattern, or ``detector:<name>``,
    from ``RowRewriter.take_counts()``."""
    out: dict[str, int] = {}
    cols = plan.columns
    for i, n in enumerate(column_counts):
        if n and i < len(cols):
            rule = cols[i].rule or f"column {i}"
            if rule != "detectors":
                out[rule] = out.get(rule, 0) + n
    names = plan.detectors.names if plan.detectors is not None else ()
    for i, n in enumerate(detector_counts):
        if n and i < len(names):
            key = f"detector:{names[i]}"
            out[key] = out.get(key, 0) + n
    return out
