# The psql admin console: database "pgguard", answered by pgguard itself.
# PgBouncer style, for humans in [admin] groups: SHOW APPROVALS, APPROVE, DENY,
# SHOW SESSIONS.
from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ..approvals.console import AdminConsole
from ..errors import AuthRejected, PgguardError
from ..protocol import messages as m

if TYPE_CHECKING:
    from .services import Services
    from .session import Session

# the virtual database of the admin console
CONSOLE_DB = "pgguard"


class Console:
    """A session's part when its database is "pgguard": the admin console in place of an
    upstream link. It owns the AdminConsole; of the session it reads who logged in and
    uses the client link, and it changes nothing of it but closing it at the end."""

    def __init__(self, session: Session, services: Services) -> None:
        """Refuses (AuthRejected) unless approvals are on and the identity is a human
        in an [admin] group."""
        cfg = services.cfg
        ident = session.identity
        if services.approvals is None:
            raise AuthRejected('the admin console (database "pgguard") is not enabled',
                               hint="set [admin] token_env and run pgguard with it set")
        if ident is None or ident.kind != "human" or not set(ident.groups) & set(
                cfg.admin.groups):
            raise AuthRejected(f'identity "{session.identity_name}" may not use the admin '
                               'console (database "pgguard")',
                               hint=f"it is for humans in [admin] groups {cfg.admin.groups}")
        self.s = session
        self.services = services
        self.admin = AdminConsole(services.approvals, admin_groups=cfg.admin.groups,
                                  sessions=self._sessions)

    def start(self) -> None:
        """The login's answer: AuthenticationOk, the settings psql shows, ReadyForQuery."""
        out = [m.auth_request(m.AUTH_OK)]
        for k, v in (("server_version", "16.0 (pgguard admin console)"),
                     ("server_encoding", "UTF8"), ("client_encoding", "UTF8"),
                     ("DateStyle", "ISO, MDY"), ("integer_datetimes", "on"),
                     ("standard_conforming_strings", "on"),
                     ("application_name", self.s.params.get("application_name", ""))):
            out.append(m.parameter_status(k, v))
        out.append(m.backend_key_data(0, 0))
        out.append(m.ready_for_query(m.TX_IDLE))
        self.s.client.transport.write(b"".join(out))

    def _sessions(self) -> list[dict]:
        """The worker's sessions for SHOW SESSIONS: connected_at as an ISO timestamp (UTC,
        seconds) and admin console sessions, this one included, in state ``console``."""
        consoles = {s.id for s in self.services.sessions if s.console is not None}
        out = []
        for row in self.services.sessions_info():
            row = dict(row)
            at = row.get("connected_at")
            if isinstance(at, (int, float)):
                row["connected_at"] = datetime.fromtimestamp(at, timezone.utc).strftime(
                    "%Y-%m-%d %H:%M:%S+00")
            if row.get("session_id") in consoles:
                row["state"] = "console"
            out.append(row)
        return out

    async def run(self) -> None:
        """Answer simple Queries until the client quits; then close the session."""
        s = self.s
        c = s.client
        c.renew_reader(self.services.cfg.limits.max_message_size)
        who = (s.identity_name, tuple(s.identity.groups))
        while not s.closed:
            try:
                t, payload = await c.read_message()
            except (ConnectionError, PgguardError):
                break
            if t == m.TERMINATE:
                break
            out: list[bytes] = []
            if t != m.QUERY:
                out.append(m.error_response(
                    "0A000", "the admin console speaks the simple query protocol only"))
                if t == m.SYNC or t == m.FUNCTION_CALL:
                    out.append(m.ready_for_query(m.TX_IDLE))
                c.transport.write(b"".join(out))
                continue
            sql = payload.rstrip(b"\0").decode("utf-8", "replace")
            try:
                results = await self.admin.aexecute(sql, who)
            except PgguardError as e:
                out.append(m.error_response(e.sqlstate, e.message, detail=e.detail,
                                            hint=e.hint))
                results = []
            for r in results:
                if r.notice:
                    out.append(m.error_response("00000", r.notice, severity="NOTICE",
                                                notice=True))
                if r.columns:
                    out.append(m.row_description(r.columns))
                    out.extend(m.data_row(row) for row in r.rows)
                out.append(m.command_complete(r.tag))
            if not results and not out:
                out.append(m.empty_query_response())
            out.append(m.ready_for_query(m.TX_IDLE))
            c.transport.write(b"".join(out))
        s.close()

