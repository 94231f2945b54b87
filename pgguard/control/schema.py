# The control database's tables, created and migrated idempotently under an advisory lock.
"""Versioned schema of the control database.

``migrate(link)`` runs in one transaction that first takes a transaction-level advisory
lock keyed by the schema name, so instances starting together apply each migration
once, one after another; an up-to-date schema costs one lock and one SELECT.
``<schema>.schema_version`` holds one row per applied version. A database already at
a newer version than this pgguard knows is refused (an older binary must not run
against tables it does not understand).

Example::

    link = ControlLink.from_config(cfg)
    print(migrate(link))        # -> 1 (the version now in place)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import PgguardError
from .link import driver

if TYPE_CHECKING:
    from .link import ControlLink

# each entry: the statements of one version, {s} the schema; never edit one that shipped
MIGRATIONS: list[list[str]] = [
    [   # 1: approvals and JIT windows (same columns as the embedded SQLite store),
        # token revocations, heartbeats
        """CREATE TABLE {s}.requests (
            id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            identity       text NOT NULL,
            database       text NOT NULL,
            statement      text NOT NULL,
            fingerprint    text NOT NULL,
            classification text NOT NULL,
            rule           text NOT NULL,
            approvers      text NOT NULL,
            session_id     text,
            cancel_key     bigint,
            requested_at   double precision NOT NULL,
            expires_at     double precision NOT NULL,
            state          text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending','approved','denied','timed_out','withdrawn')),
            decided_at     double precision,
            approver       text,
            reason         text,
            window_s       double precision,
            grant_id       bigint)""",
        "CREATE INDEX requests_pending ON {s}.requests (expires_at) WHERE state = 'pending'",
        "CREATE INDEX requests_decided ON {s}.requests (decided_at)",
        "CREATE INDEX requests_cancel ON {s}.requests (cancel_key) WHERE state = 'pending'",
        """CREATE TABLE {s}.grants (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            identity    text NOT NULL,
            database    text NOT NULL,
            fingerprint text NOT NULL,
            rule        text NOT NULL,
            approver    text NOT NULL,
            request_id  bigint,
            granted_at  double precision NOT NULL,
            expires_at  double precision NOT NULL,
            revoked_at  double precision)""",
        "CREATE INDEX grants_key ON {s}.grants (identity, database, fingerprint, expires_at)",
        """CREATE TABLE {s}.revocations (
            jti  text PRIMARY KEY,
            exp  bigint NOT NULL,
            at   bigint NOT NULL)""",
        """CREATE TABLE {s}.instances (
            instance   text NOT NULL,
            worker     integer NOT NULL,
            address    text NOT NULL,
            admin_url  text,
            version    text NOT NULL,
            pid        integer NOT NULL,
            sessions   integer NOT NULL DEFAULT 0,
            pending    integer NOT NULL DEFAULT 0,
            started_at double precision NOT NULL,
            last_seen  double precision NOT NULL,
            PRIMARY KEY (instance, worker))""",
    ],
    [   # 2: a window's later runs change at most the rows its approved run changed
        "ALTER TABLE {s}.grants ADD COLUMN max_rows bigint",
    ],
]


def latest() -> int:
    return len(MIGRATIONS)


def migrate(link: ControlLink) -> int:
    """Create or bring up to date the control schema; returns the version in place.

    Raises StoreUnavailable when the database cannot be reached, PgguardError when it
    is newer than this pgguard or a statement fails (permissions...).
    """
    s = link.schema
    c = link.conn()
    psycopg = driver()
    try:
        with link.tx():
            c.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))",
                      (f"pgguard-control-migrate:{s}",))
            c.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            c.execute(f"CREATE TABLE IF NOT EXISTS {s}.schema_version ("
                      "version integer PRIMARY KEY, "
                      "applied_at timestamptz NOT NULL DEFAULT now())")
            have = c.execute(f"SELECT coalesce(max(version), 0) FROM {s}.schema_version"
                             ).fetchone()[0]
            if have > latest():
                raise PgguardError(
                    f"control schema {s} is at version {have}, newer than this pgguard "
                    f"knows ({latest()}): upgrade pgguard")
            for version in range(have + 1, latest() + 1):
                for stmt in MIGRATIONS[version - 1]:
                    c.execute(stmt.format(s=s))
                c.execute(f"INSERT INTO {s}.schema_version (version) VALUES (?)", (version,))
    except psycopg.Error as e:
        raise PgguardError(f"control schema {s}: {str(e).strip().splitlines()[0]}") from None
    return latest()
