# Masking of the backend messages that are not rows: ErrorResponse / NoticeResponse
# fields, NotificationResponse payloads, ParameterStatus values, FunctionCallResponse
# results. These messages are rare, so this is plain Python off the DataRow path.
"""Scrub and scan the backend messages that carry text outside result rows.

*Tainted* means the statement the message answers read a relation with masked columns
(under masks that apply to the identity). Then:

- ErrorResponse / NoticeResponse: SQLSTATE, severity, position and Postgres' source
  location are kept. The message keeps its wording with every quoted span and hex byte
  dump dropped (``invalid input syntax for type integer: "***"``); a message the
  statement wrote itself (PL/pgSQL ``RAISE``, PL error functions) is replaced by the
  name of its error class, and so are the object-name fields it may set. DETAIL keeps
  its shape only for integrity-constraint errors (``Key (***)=(***) already exists.``);
  other details, CONTEXT (``W``) and the internal query (``q``) are withheld.
- NotificationResponse sent by this session's own backend: the payload becomes
  ``****``.
- ParameterStatus: the value becomes ``****`` (except the few settings whose values
  are keywords and that client libraries parse).
- FunctionCallResponse: the result becomes ``****``.

Whether tainted or not, every text that is left is scanned by the detectors and what
they find becomes ``[name]``. A message in which nothing is found or scrubbed is
returned as the same bytes object (Postgres' own errors stay byte-identical).

pgguard's own messages (refusals, the blast-radius guard's, approval notices) have no
``F`` (source file) field, which Postgres always sends: they pass untouched.
"""
from __future__ import annotations

import re
import struct

__all__ = ["Channels", "REDACTED", "error_fields", "build_fields", "condition_class"]

REDACTED = b"****"

# SQLSTATE classes (Postgres Appendix A)
_CLASSES = {
    "00": "successful_completion", "01": "warning", "02": "no_data",
    "03": "sql_statement_not_yet_complete", "08": "connection_exception",
    "09": "triggered_action_exception", "0A": "feature_not_supported",
    "0B": "invalid_transaction_initiation", "0F": "locator_exception",
    "0L": "invalid_grantor", "0P": "invalid_role_specification",
    "0Z": "diagnostics_exception", "20": "case_not_found", "21": "cardinality_violation",
    "22": "data_exception", "23": "integrity_constraint_violation",
    "24": "invalid_cursor_state", "25": "invalid_transaction_state",
    "26": "invalid_sql_statement_name", "27": "triggered_data_change_violation",
    "28": "invalid_authorization_specification",
    "2B": "dependent_privilege_descriptors_still_exist",
    "2D": "invalid_transaction_termination", "2F": "sql_routine_exception",
    "34": "invalid_cursor_name", "38": "external_routine_exception",
    "39": "external_routine_invocation_exception", "3B": "savepoint_exception",
    "3D": "invalid_catalog_name", "3F": "invalid_schema_name", "40": "transaction_rollback",
    "42": "syntax_error_or_access_rule_violation", "44": "with_check_option_violation",
    "53": "insufficient_resources", "54": "program_limit_exceeded",
    "55": "object_not_in_prerequisite_state", "57": "operator_intervention",
    "58": "system_error", "72": "snapshot_too_old", "F0": "config_file_error",
    "HV": "fdw_error", "P0": "plpgsql_error", "XX": "internal_error",
}

# fields kept as they are when tainted: severity (both), SQLSTATE, cursor positions,
# Postgres' source file, line and routine (server-generated, never data)
_KEEP = frozenset(b"SVCPpFLR")
# object-name fields: kept for Postgres' own errors (names, not values); a statement's
# own RAISE ... USING SCHEMA/TABLE/COLUMN/DATATYPE/CONSTRAINT may set them to anything
_NAMES = frozenset(b"stcdn")
# where a message text is the statement's own: PL/pgSQL RAISE, PL error functions
_USER_FILES = frozenset({b"pl_exec.c", b"plpy_elog.c", b"plpy_plpymodule.c", b"plperl.c",
                         b"pltcl.c"})
_USER_ROUTINES = frozenset({b"exec_stmt_raise"})

# settings whose ParameterStatus values are keywords client libraries parse
_KEYWORD_SETTINGS = frozenset({b"client_encoding", b"server_encoding", b"DateStyle",
                               b"IntervalStyle", b"integer_datetimes",
                               b"standard_conforming_strings", b"in_hot_standby",
                               b"is_superuser", b"default_transaction_read_only",
                               b"scram_iterations"})

_HEX_BYTES = re.compile(rb"0x[0-9A-Fa-f]{2}(?: 0x[0-9A-Fa-f]{2})*")
_WITHHELD_DETAIL = b"pgguard: detail withheld: the statement read masked columns"


def condition_class(sqlstate: bytes | str) -> str:
    """The name of a SQLSTATE's class (``22P02`` -> ``data_exception``)."""
    code = sqlstate.decode("ascii", "replace") if isinstance(sqlstate, bytes) else sqlstate
    return _CLASSES.get(code[:2], "error")


def error_fields(msg: bytes) -> list[tuple[int, bytes]]:
    """The (code, value) fields of a whole ErrorResponse / NoticeResponse message."""
    out = []
    pos, end = 5, len(msg)
    while pos < end and msg[pos] != 0:
        z = msg.index(b"\0", pos + 1)
        out.append((msg[pos], msg[pos + 1:z]))
        pos = z + 1
    return out


def build_fields(t: int, fields: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(bytes((code,)) + value + b"\0" for code, value in fields) + b"\0"
    return bytes((t,)) + struct.pack("!I", len(body) + 4) + body


def _scrub_quoted(text: bytes, q: int) -> bytes:
    # from the first quote to the last: a value may hold quotes of its own; a lone
    # quote drops everything after it
    first = text.find(q)
    if first < 0:
        return text
    last = text.rfind(q)
    mark = bytes((q,))
    if last == first:
        return text[:first] + mark + b"***" + mark
    return text[:first] + mark + b"***" + mark + text[last + 1:]


def _scrub_parens(text: bytes) -> bytes:
    # the contents of every outermost parenthesised group ("Key (email)=(...)",
    # "Failing row contains (...)")
    out = bytearray()
    depth = 0
    for ch in text:
        if ch == 40:                            # (
            if depth == 0:
                out += b"(***"
            depth += 1
        elif ch == 41 and depth:                # )
            depth -= 1
            if depth == 0:
                out += b")"
        elif depth == 0:
            out.append(ch)
    if depth:
        out += b")"
    return bytes(out)


def scrub_text(text: bytes) -> bytes:
    """A Postgres message with the values it quotes dropped."""
    return _HEX_BYTES.sub(b"0x**", _scrub_quoted(_scrub_quoted(text, 34), 39))


class Channels:
    """The scrubbing of one session. ``detectors``: a DetectorSet or None."""

    def __init__(self, detectors) -> None:
        self.detectors = detectors

    def _scan(self, value: bytes) -> bytes:
        det = self.detectors
        if det is None or not value:
            return value
        got = det.mask_cell(value, det.all_bits, False)
        return value if got is None else got[0]

    # -- ErrorResponse 'E' / NoticeResponse 'N'
    def error(self, msg: bytes, tainted: bool) -> bytes:
        try:
            fields = error_fields(msg)
        except ValueError:
            return msg                         # malformed: the client reports it
        codes = {c for c, _ in fields}
        if 70 not in codes:                    # no 'F': pgguard's own message
            return msg
        new = self._scrub_error(fields) if tainted else fields
        new = [(c, v if c in _KEEP else self._scan(v)) for c, v in new]
        if new == fields:
            return msg
        return build_fields(msg[0], new)

    def _scrub_error(self, fields: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        by = dict(fields)
        user = by.get(70) in _USER_FILES or by.get(82) in _USER_ROUTINES
        sqlstate = by.get(67, b"")
        cls = condition_class(sqlstate).encode()
        out = []
        for code, value in fields:
            if code in _KEEP:
                out.append((code, value))
            elif code == 77:                    # M message
                if user:
                    value = cls + b": message withheld by pgguard: the statement read " \
                                  b"masked columns"
                else:
                    value = scrub_text(value)
                out.append((code, value))
            elif code == 68:                    # D detail
                if not user and sqlstate[:2] == b"23":
                    out.append((code, _scrub_parens(scrub_text(value))))
                else:
                    out.append((code, _WITHHELD_DETAIL))
            elif code == 72:                    # H hint
                if not user:
                    out.append((code, scrub_text(value)))
            elif code in _NAMES:
                if not user:
                    out.append((code, value))
            # W context, q internal query, and anything unknown: withheld
        return out

    # -- NotificationResponse 'A': pid, channel, payload
    def notification(self, msg: bytes, tainted_pid: int | None) -> bytes:
        try:
            (pid,) = struct.unpack_from("!i", msg, 5)
            z = msg.index(b"\0", 9)
            channel = msg[9:z]
            z2 = msg.index(b"\0", z + 1)
            payload = msg[z + 1:z2]
        except (ValueError, struct.error):
            return msg
        new_payload = REDACTED if tainted_pid is not None and pid == tainted_pid \
            and payload else self._scan(payload)
        new_channel = self._scan(channel)
        if new_payload is payload and new_channel is channel:
            return msg
        body = struct.pack("!i", pid) + new_channel + b"\0" + new_payload + b"\0"
        return b"A" + struct.pack("!I", len(body) + 4) + body

    # -- ParameterStatus 'S': name, value
    def parameter_status(self, msg: bytes, tainted: bool) -> bytes:
        try:
            z = msg.index(b"\0", 5)
            name = msg[5:z]
            z2 = msg.index(b"\0", z + 1)
            value = msg[z + 1:z2]
        except ValueError:
            return msg
        if tainted and value and name not in _KEYWORD_SETTINGS:
            new = REDACTED
        else:
            new = self._scan(value)
        if new is value:
            return msg
        body = name + b"\0" + new + b"\0"
        return b"S" + struct.pack("!I", len(body) + 4) + body

    # -- FunctionCallResponse 'V': int32 length (-1: NULL), value
    def function_result(self, msg: bytes, tainted: bool) -> bytes:
        try:
            (n,) = struct.unpack_from("!i", msg, 5)
        except struct.error:
            return msg
        if n < 0:
            return msg
        value = msg[9:9 + n]
        new = REDACTED if tainted else self._scan(value)
        if new is value:
            return msg
        return b"V" + struct.pack("!Ii", len(new) + 8, len(new)) + new
