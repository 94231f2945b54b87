# Masking of the backend messages that are not rows: ErrorResponse / NoticeResponse
# fields, NotificationResponse payloads, ParameterStatus values, FunctionCallResponse
# results. These messages are rare, so this is plain Python off the DataRow path.
"""Scrub and scan the backend messages that carry text outside result rows.

*Tainted* means the statement the message answers read a relation with masked columns
(under masks that apply to the identity). Then:

- ErrorResponse / NoticeResponse: an allow-list. SQLSTATE, severity, position and
  Postgres' source location are kept. The message is kept only when it is one of
  Postgres' messages that have no slot for a value (``division by zero``, ``integer out
  of range``...); any other is replaced by the name of its condition and a note
  (``invalid_text_representation: message withheld by pgguard: the statement read
  masked columns``): a value may stand in a message unquoted (``requested character
  too large for encoding: 599316947``, ``large object 599316947 does not exist``,
  ``date field value out of range: 599-13-01``), so no scrubbing of a message's text
  can be shown to remove every one. A message the statement wrote itself (PL/pgSQL
  ``RAISE``, PL error functions) is replaced by the name of its error class, and so
  are the object-name fields it may set. DETAIL keeps its shape only for
  integrity-constraint errors (``Key (***)=(***) already exists.``); other details,
  HINT, CONTEXT (``W``) and the internal query (``q``) are withheld.
- NotificationResponse sent by this session's own backend: the payload becomes
  ``****``.
- ParameterStatus: the value becomes ``****`` (except the few settings whose values
  are keywords and that client libraries parse, and TimeZone when it is a zone name).
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

__all__ = ["Channels", "REDACTED", "error_fields", "build_fields", "condition_class",
           "condition_name"]

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

# condition names (Postgres' errcodes.txt) of the SQLSTATEs a value error may carry;
# others are named by their class
_CONDITIONS = {
    "0A000": "feature_not_supported", "21000": "cardinality_violation",
    "22000": "data_exception", "2202E": "array_subscript_error",
    "22021": "character_not_in_repertoire", "22008": "datetime_field_overflow",
    "22012": "division_by_zero", "22005": "error_in_assignment",
    "2200B": "escape_character_conflict", "22022": "indicator_overflow",
    "22015": "interval_field_overflow", "2201E": "invalid_argument_for_logarithm",
    "22014": "invalid_argument_for_ntile_function",
    "22016": "invalid_argument_for_nth_value_function",
    "2201F": "invalid_argument_for_power_function",
    "2201G": "invalid_argument_for_width_bucket_function",
    "22018": "invalid_character_value_for_cast", "22007": "invalid_datetime_format",
    "22019": "invalid_escape_character", "2200D": "invalid_escape_octet",
    "22025": "invalid_escape_sequence", "22P06": "nonstandard_use_of_escape_character",
    "22010": "invalid_indicator_parameter_value", "22023": "invalid_parameter_value",
    "22013": "invalid_preceding_or_following_size",
    "2201B": "invalid_regular_expression", "2201W": "invalid_row_count_in_limit_clause",
    "2201X": "invalid_row_count_in_result_offset_clause",
    "2202H": "invalid_tablesample_argument", "2202G": "invalid_tablesample_repeat",
    "22009": "invalid_time_zone_displacement_value",
    "2200C": "invalid_use_of_escape_character", "2200G": "most_specific_type_mismatch",
    "22004": "null_value_not_allowed", "22002": "null_value_no_indicator_parameter",
    "22003": "numeric_value_out_of_range", "2200H": "sequence_generator_limit_exceeded",
    "22026": "string_data_length_mismatch", "22001": "string_data_right_truncation",
    "22011": "substring_error", "22027": "trim_error", "22024": "unterminated_c_string",
    "2200F": "zero_length_character_string", "22P01": "floating_point_exception",
    "22P02": "invalid_text_representation", "22P03": "invalid_binary_representation",
    "22P04": "bad_copy_file_format", "22P05": "untranslatable_character",
    "2200L": "not_an_xml_document", "2200M": "invalid_xml_document",
    "2200N": "invalid_xml_content", "2200S": "invalid_xml_comment",
    "2200T": "invalid_xml_processing_instruction",
    "22030": "duplicate_json_object_key_value",
    "22031": "invalid_argument_for_sql_json_datetime_function",
    "22032": "invalid_json_text", "22033": "invalid_sql_json_subscript",
    "22034": "more_than_one_sql_json_item", "22035": "no_sql_json_item",
    "22036": "non_numeric_sql_json_item", "22037": "non_unique_keys_in_a_json_object",
    "22038": "singleton_sql_json_item_required", "22039": "sql_json_array_not_found",
    "2203A": "sql_json_member_not_found", "2203B": "sql_json_number_not_found",
    "2203C": "sql_json_object_not_found", "2203D": "too_many_json_array_elements",
    "2203E": "too_many_json_object_members", "2203F": "sql_json_scalar_required",
    "2203G": "sql_json_item_cannot_be_cast_to_target_type",
    "23000": "integrity_constraint_violation", "23001": "restrict_violation",
    "23502": "not_null_violation", "23503": "foreign_key_violation",
    "23505": "unique_violation", "23514": "check_violation",
    "23P01": "exclusion_violation", "25P02": "in_failed_sql_transaction",
    "2F005": "function_executed_no_return_statement", "40001": "serialization_failure",
    "40P01": "deadlock_detected", "42601": "syntax_error",
    "42501": "insufficient_privilege", "42846": "cannot_coerce",
    "42804": "datatype_mismatch", "42P18": "indeterminate_datatype",
    "42703": "undefined_column", "42883": "undefined_function",
    "42P01": "undefined_table", "42P02": "undefined_parameter",
    "42704": "undefined_object", "42725": "ambiguous_function", "53200": "out_of_memory",
    "54000": "program_limit_exceeded", "54001": "statement_too_complex",
    "55P03": "lock_not_available", "57014": "query_canceled", "P0001": "raise_exception",
    "P0002": "no_data_found", "P0003": "too_many_rows", "P0004": "assert_failure",
}

# Postgres' messages that have no slot for a value: kept as they are when tainted
_SAFE_MESSAGES = frozenset({
    b"division by zero", b"integer out of range", b"bigint out of range",
    b"smallint out of range", b"OID out of range", b"value out of range: overflow",
    b"value out of range: underflow", b"numeric field overflow", b"input is out of range",
    b"timestamp out of range", b"date out of range", b"interval out of range",
    b"array subscript out of range", b"negative substring length not allowed",
    b"cannot take logarithm of zero", b"cannot take logarithm of a negative number",
    b"cannot take square root of a negative number",
    b"zero raised to a negative power is undefined",
    b"a negative number raised to a non-integer power yields a complex result",
    b"more than one row returned by a subquery used as an expression",
    b"canceling statement due to statement timeout",
    b"canceling statement due to user request",
    b"current transaction is aborted, commands ignored until end of transaction block",
    b"could not serialize access due to concurrent update", b"deadlock detected",
})
_WITHHELD = b": message withheld by pgguard: the statement read masked columns"

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

# TimeZone: a zone name as the time zone database spells them (America/New_York, UTC,
# Etc/GMT+5: Area/Location) passes; client libraries decode every timestamptz by it (psycopg
# fell back to UTC with '****'). Anything else it may hold (POSIX specs, offsets) is
# replaced as before. Its only route from data is set_config(), a refused sink.
_ZONE_NAME = re.compile(rb"UTC|GMT|[A-Z][A-Za-z_]{1,30}(?:/[A-Z][A-Za-z0-9_+\-]{0,40}){1,2}")

_WITHHELD_DETAIL = b"pgguard: detail withheld: the statement read masked columns"


def condition_class(sqlstate: bytes | str) -> str:
    """The name of a SQLSTATE's class (``22P02`` -> ``data_exception``)."""
    code = sqlstate.decode("ascii", "replace") if isinstance(sqlstate, bytes) else sqlstate
    return _CLASSES.get(code[:2], "error")


def condition_name(sqlstate: bytes | str) -> str:
    """The condition name of a SQLSTATE (``22P02`` -> ``invalid_text_representation``),
    else the name of its class."""
    code = sqlstate.decode("ascii", "replace") if isinstance(sqlstate, bytes) else sqlstate
    return _CONDITIONS.get(code) or condition_class(code)


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


# Postgres' integrity-violation details (class 23) that print values, as templates: a
# value is printed as it is stored, unquoted, so its own brackets, quotes and commas
# cannot be told from the template's (a name ending in ")" closed a bracket count and
# the masked columns after it went out in clear). Each template keeps its fixed words
# and what follows the values (a table's name, after the last separator) and every value
# becomes ***; a detail that matches none is withheld whole.
_DETAIL_TEMPLATES = tuple((re.compile(pattern, re.S), out) for pattern, out in (
    (rb"Failing row contains \(.*\)\.", b"Failing row contains (***)."),
    (rb"Partition key of the failing row contains \(.*\)\.",
     b"Partition key of the failing row contains (***)."),
    (rb"Key \(.*\) already exists\.", b"Key (***)=(***) already exists."),
    (rb"Key \(.*\) is duplicated\.", b"Key (***)=(***) is duplicated."),
    (rb"Key \(.*\) conflicts with existing key \(.*\)\.",
     b"Key (***)=(***) conflicts with existing key (***)=(***)."),
    (rb"Key \(.*\) conflicts with key \(.*\)\.", b"Key (***)=(***) conflicts with key (***)=(***)."),
    (rb"Key \(.*\) is not present in table (\".*\")\.",
     b"Key (***)=(***) is not present in table \\1."),
    (rb"Key \(.*\) is still referenced from table (\".*\")\.",
     b"Key (***)=(***) is still referenced from table \\1."),
    # the same errors when the role may not see the values: nothing but names
    (rb"Key is not present in table \"[^\"]*\"\.", None),
    (rb"Key is still referenced from table \"[^\"]*\"\.", None),
    (rb"Key conflicts with existing key\.", None),
))


def scrub_integrity_detail(text: bytes) -> bytes:
    """An integrity violation's DETAIL with the values it prints replaced by ``***``
    (``Key (email)=(a@b.c) already exists.`` -> ``Key (***)=(***) already exists.``); a text
    no template matches is withheld."""
    for pattern, out in _DETAIL_TEMPLATES:
        m = pattern.fullmatch(text)
        if m is not None:
            return text if out is None else m.expand(out)
    return _WITHHELD_DETAIL


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
            elif code == 77:                    # M message: an allow-list
                if user:
                    value = cls + _WITHHELD
                elif value not in _SAFE_MESSAGES:
                    value = condition_name(sqlstate).encode() + _WITHHELD
                out.append((code, value))
            elif code == 68:                    # D detail
                if not user and sqlstate[:2] == b"23":
                    out.append((code, scrub_integrity_detail(value)))
                else:
                    out.append((code, _WITHHELD_DETAIL))
            elif code in _NAMES:
                if not user:
                    out.append((code, value))
            # H hint, W context, q internal query, and anything unknown: withheld
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
        if tainted and value and name not in _KEYWORD_SETTINGS and not (
                name == b"TimeZone" and _ZONE_NAME.fullmatch(value)):
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
