# Exception hierarchy: one root, a subclass per failure a client or operator can see,
# each carrying the SQLSTATE a client receives.
from __future__ import annotations


class PgguardError(Exception):
    """Root of every pgguard error. ``sqlstate`` is what a client sees."""

    sqlstate = "XX000"
    severity = "ERROR"

    def __init__(self, message: str, *, detail: str | None = None,
                 hint: str | None = None, sqlstate: str | None = None,
                 severity: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        if sqlstate is not None:
            self.sqlstate = sqlstate
        if severity is not None:
            self.severity = severity


class ConfigError(PgguardError):
    """The configuration is invalid; the message names the key path."""


class ProtocolViolation(PgguardError):
    """A client or server sent bytes that are not the Postgres protocol."""

    sqlstate = "08P01"
    severity = "FATAL"


class AuthFailed(PgguardError):
    """Bad password, expired or revoked token. Says nothing that helps guessing."""

    sqlstate = "28P01"
    severity = "FATAL"


class AuthRejected(PgguardError):
    """Unknown identity or a database the identity may not use."""

    sqlstate = "28000"
    severity = "FATAL"


class UpstreamUnavailable(PgguardError):
    """The real database could not be reached or went away."""

    sqlstate = "08006"
    severity = "FATAL"


class TooManyConnections(PgguardError):
    sqlstate = "53300"
    severity = "FATAL"


class IdleInTransaction(PgguardError):
    """A session idle in a transaction past its limit: ended, its transaction rolled
    back (Postgres' own word for it)."""

    sqlstate = "25P03"
    severity = "FATAL"


class ShuttingDown(PgguardError):
    sqlstate = "57P01"
    severity = "FATAL"


class PolicyRefusal(PgguardError):
    """A statement refused by policy, or a denied / timed-out approval."""

    sqlstate = "42501"
