# The settings a guarded session must keep, watched in what the upstream reports.
"""Pinned settings, checked against the upstream's own word.

pgguard pins the settings its judgement depends on: ``standard_conforming_strings=on``
and ``client_encoding=UTF8`` (how its parser reads literals and quotes),
``default_transaction_read_only=on`` for a read-only token, and the role the session
logged in as. The classifier refuses every route it knows to change them (SET,
set_config() anywhere, a function, aggregate, operator or type that names set_config,
startup options). Postgres reports each of these settings in a ParameterStatus
message whenever it changes, whatever changed it; this part reads those reports, so a
route nobody thought of still ends the session before another statement is judged
on a wrong reading: fail closed, and say which setting moved.
"""
from __future__ import annotations

from ..errors import PgguardError

# the reported name -> the value it must keep (bytes, as on the wire)
_ALWAYS = {b"standard_conforming_strings": b"on", b"client_encoding": b"UTF8"}
# reports that name a pinned value under another spelling: Postgres reports
# client_encoding = 'UNICODE' as the client wrote it (for old JDBC drivers), not as UTF8
_SAME = frozenset({(b"client_encoding", b"UNICODE")})
# kept at what the login reported (a change means another role or superuser rights)
_AS_AT_LOGIN = (b"is_superuser", b"session_authorization")


class SettingMoved(PgguardError):
    """A pinned setting was reported changed: the session is closed."""

    sqlstate = "42501"
    severity = "FATAL"


def _name_value(msg: bytes) -> tuple[bytes, bytes] | None:
    # ParameterStatus: 'S', length, name NUL, value NUL
    z = msg.find(b"\0", 5)
    if z < 0:
        return None
    z2 = msg.find(b"\0", z + 1)
    if z2 < 0:
        return None
    return msg[5:z], msg[z + 1:z2]


# reported settings that change how a statement's literals read ('01/12/2024' is
# January or December by DateStyle, a timestamptz literal moves with TimeZone): not
# pinned (clients set them), but shown to an approver with every held statement
_INPUTS = (b"DateStyle", b"TimeZone", b"IntervalStyle")


class PinnedSettings:
    """What one guarded session's reported settings must stay at."""

    __slots__ = ("pins", "inputs")

    def __init__(self, login_status: list[bytes], readonly: bool) -> None:
        pins = dict(_ALWAYS)
        self.inputs: dict[bytes, bytes] = {}
        for msg in login_status:
            nv = _name_value(msg)
            if nv is not None and nv[0] in _AS_AT_LOGIN:
                pins[nv[0]] = nv[1]
            if nv is not None and nv[0] in _INPUTS:
                self.inputs[nv[0]] = nv[1]
        if readonly:
            pins[b"default_transaction_read_only"] = b"on"
        self.pins = pins

    def inputs_text(self) -> str:
        """The settings of _INPUTS as the session has them now (``DateStyle = 'ISO,
        DMY', TimeZone = 'UTC', ...``): what an approver reads literals by."""
        return ", ".join(f"{n.decode()} = '{v.decode('utf-8', 'replace')}'"
                         for n, v in self.inputs.items())

    def check(self, msg: bytes) -> SettingMoved | None:
        """The refusal for a ParameterStatus that moves a pinned setting (None: fine)."""
        nv = _name_value(msg)
        if nv is None:
            return None
        name, value = nv
        if name in _INPUTS:
            self.inputs[name] = value
        want = self.pins.get(name)
        if want is None or value == want or (name, value) in _SAME:
            return None
        n, v, w = (x.decode("utf-8", "replace") for x in (name, value, want))
        return SettingMoved(
            f'pgguard: session closed by rule "settings": the server reported {n} = {v}, '
            f"a setting pgguard pins to {w} for this session",
            detail=f"A statement of this session changed {n} by a route pgguard did not "
                   "recognise (for example a function, aggregate or operator that calls "
                   "set_config). pgguard's reading of later statements depends on it, so "
                   "the session ends here.",
            hint="Reconnect. Leave pinned settings alone; ask a DBA if a different value "
                 "is needed.")
