# The psql admin console (virtual database "pgguard"): SHOW / APPROVE / DENY commands.
"""Commands a human in an ``[admin] groups`` group runs with psql against the virtual
database ``pgguard``, PgBouncer style::

    $ psql "postgresql://alice@proxy:6432/pgguard"
    pgguard=> SHOW APPROVALS;
    pgguard=> APPROVE 17;
    pgguard=> APPROVE 18 FOR '10m';        -- and let repeats through for 10 minutes
    pgguard=> DENY 19 'not during the freeze';
    pgguard=> SHOW GRANTS;  REVOKE GRANT 3;
    pgguard=> SHOW HISTORY 20;  SHOW SESSIONS;  SHOW HELP;

The session turns each :class:`Result` into RowDescription + DataRow* (when it has
columns) + CommandComplete(tag), and an exception into an ErrorResponse with the
exception's ``sqlstate`` (42601 for an unknown command or bad syntax, 42501 when the
user may not decide, 42704 for an unknown id, 55000 for a request no longer pending).
"""
from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import msgspec

from ..config import parse_duration
from ..errors import PgguardError
from .store import ApprovalStore, NotAllowed, iso

SessionsProvider = Callable[[], Iterable[Mapping[str, Any]]]

SESSION_COLUMNS = ("session_id", "identity", "database", "client_addr",
                   "application_name", "connected_at", "state", "waiting_approval")


class ConsoleSyntaxError(PgguardError):
    """An unknown console command or bad arguments (SQLSTATE 42601)."""

    sqlstate = "42601"


class Result(msgspec.Struct, kw_only=True):
    """One command's answer. ``columns`` empty: no rows, only the command ``tag``;
    ``notice`` (optional) is a line worth sending as a NoticeResponse."""

    columns: list[str] = msgspec.field(default_factory=list)
    rows: list[list[str | None]] = msgspec.field(default_factory=list)
    tag: str = "SHOW"
    notice: str | None = None


HELP = [
    ("SHOW APPROVALS", "held statements waiting for a decision"),
    ("SHOW HISTORY [n]", "the last n (default 20) decided, timed-out or withdrawn requests"),
    ("SHOW GRANTS", "active just-in-time windows"),
    ("SHOW SESSIONS", "client sessions of this worker"),
    ("SHOW HELP", "this list"),
    ("APPROVE id [FOR 'duration']", "run the held statement; FOR '10m' also lets the same "
                                    "statement from the same identity through for 10 minutes"),
    ("DENY id ['reason']", "refuse the held statement (the client sees the reason)"),
    ("REVOKE GRANT id", "end a just-in-time window now"),
]

_TOKEN = re.compile(r"""\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>\d+)|(?P<word>[A-Za-z_][A-Za-z0-9_]*)
                         |(?P<bad>\S))""", re.X)


def _split(sql: str) -> list[str]:
    """Statements separated by ';' outside string literals; comments dropped."""
    out, cur, i, n = [], [], 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "'":
            j = i + 1
            while j < n:
                if sql[j] == "'" and (j + 1 >= n or sql[j + 1] != "'"):
                    break
                j += 2 if sql[j] == "'" else 1
            cur.append(sql[i:j + 1])
            i = j + 1
        elif sql.startswith("--", i):
            nl = sql.find("\n", i)
            i = n if nl < 0 else nl
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
            cur.append(" ")
        elif c == ";":
            out.append("".join(cur))
            cur = []
            i += 1
        else:
            cur.append(c)
            i += 1
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def _tokens(stmt: str) -> list[tuple[str, str]]:
    toks = []
    for m in _TOKEN.finditer(stmt):
        kind = m.lastgroup
        if kind is None:
            continue
        text = m.group(kind)
        if kind == "bad":
            raise ConsoleSyntaxError(f"syntax error at or near {text!r}",
                                     hint="SHOW HELP lists the commands")
        if kind == "str":
            text = text[1:-1].replace("''", "'")
        toks.append((kind, text if kind != "word" else text.upper()))
    return toks


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s % 3600 else f"{s // 3600}h"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s" if s % 60 else f"{s // 60}m"
    return f"{s}s"


def _fmt(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


class AdminConsole:
    """Executes console commands against the approval store.

    ``sessions`` is a callable returning this worker's sessions as mappings (keys from
    ``SESSION_COLUMNS`` first, in that order, then any others; missing values are NULL).

    Example::

        console = AdminConsole(store, admin_groups=cfg.admin.groups,
                               sessions=lambda: [s.describe() for s in live_sessions])
        for r in console.execute("SHOW APPROVALS; APPROVE 17", ("alice", ["dba"])):
            print(r.tag, r.columns, r.rows)
    """

    def __init__(self, store: ApprovalStore, *, admin_groups: Iterable[str] | None = None,
                 sessions: SessionsProvider | None = None) -> None:
        self.store = store
        self.admin_groups = tuple(admin_groups if admin_groups is not None
                                  else store.admin_groups)
        self.sessions = sessions

    def execute(self, sql_text: str, who: tuple[str, Sequence[str]]) -> list[Result]:
        """Run every command in ``sql_text`` (``;``-separated) as ``who`` = (name, groups);
        returns one :class:`Result` per command (empty text: an empty list). The first
        failing command raises; commands before it have taken effect."""
        name, groups = who
        if not set(groups) & set(self.admin_groups):
            raise NotAllowed(f"{name} is not in an admin group ({', '.join(self.admin_groups)})")
        return [self._one(stmt, name, tuple(groups)) for stmt in _split(sql_text)]

    async def aexecute(self, sql_text: str, who: tuple[str, Sequence[str]]) -> list[Result]:
        """:meth:`execute` in a worker thread (store writes may wait for SQLite's lock)."""
        return await asyncio.to_thread(self.execute, sql_text, who)

    # ------------------------------------------------------------------ dispatch

    def _one(self, stmt: str, name: str, groups: tuple[str, ...]) -> Result:
        toks = _tokens(stmt)
        words = [t for k, t in toks if k == "word"]
        head = words[0] if words else ""
        if head == "SHOW" and len(toks) >= 2 and toks[1][0] == "word":
            what = toks[1][1]
            rest = toks[2:]
            if what == "APPROVALS" and not rest:
                return self._show_approvals()
            if what == "HISTORY" and (not rest or (len(rest) == 1 and rest[0][0] == "num")):
                return self._show_history(int(rest[0][1]) if rest else 20)
            if what == "GRANTS" and not rest:
                return self._show_grants()
            if what == "SESSIONS" and not rest:
                return self._show_sessions()
            if what == "HELP" and not rest:
                return self._help()
            raise ConsoleSyntaxError(f"unknown SHOW command: {stmt!r}",
                                     hint="SHOW HELP lists the commands")
        if head == "HELP" and len(toks) == 1:
            return self._help()
        if head == "APPROVE":
            return self._approve(toks, name, groups)
        if head == "DENY":
            return self._deny(toks, name, groups)
        if head == "REVOKE" and len(toks) == 3 and toks[1] == ("word", "GRANT") \
                and toks[2][0] == "num":
            g = self.store.revoke_grant(int(toks[2][1]))
            return Result(tag="REVOKE", notice=f"grant #{g.id} ({g.identity} on {g.database}) "
                                               "revoked")
        raise ConsoleSyntaxError(
            f"unknown command {stmt.split()[0] if stmt.split() else stmt!r}: this is the "
            "pgguard admin console, not a database",
            hint="SHOW HELP lists the commands (SHOW APPROVALS, APPROVE id, DENY id 'reason')")

    def _approve(self, toks: list[tuple[str, str]], name: str,
                 groups: tuple[str, ...]) -> Result:
        # APPROVE id [FOR 'duration' | FOR duration-word]
        window = None
        if len(toks) == 2 and toks[1][0] == "num":
            pass
        elif len(toks) in (4, 5) and toks[1][0] == "num" and toks[2] == ("word", "FOR"):
            text = "".join(t for _, t in toks[3:]).lower()
            try:
                window = parse_duration(text)
            except ValueError as e:
                raise ConsoleSyntaxError(f"APPROVE ... FOR: {e}") from None
        else:
            raise ConsoleSyntaxError("usage: APPROVE id [FOR '10m']")
        req = self.store.decide(int(toks[1][1]), True, name, groups, window_s=window)
        note = f"approval #{req.id} approved: {req.identity}'s statement runs now"
        if window:
            note += f"; repeats pass for {_age(window)}"
        return Result(tag="APPROVE", notice=note)

    def _deny(self, toks: list[tuple[str, str]], name: str, groups: tuple[str, ...]) -> Result:
        if len(toks) == 2 and toks[1][0] == "num":
            reason = None
        elif len(toks) == 3 and toks[1][0] == "num" and toks[2][0] == "str":
            reason = toks[2][1] or None
        else:
            raise ConsoleSyntaxError("usage: DENY id ['reason']")
        req = self.store.decide(int(toks[1][1]), False, name, groups, reason=reason)
        return Result(tag="DENY", notice=f"approval #{req.id} denied")

    # ------------------------------------------------------------------ SHOW

    def _show_approvals(self) -> Result:
        now = time.time()
        cols = ["id", "identity", "database", "rule", "age", "expires_in", "approvers",
                "classification", "statement"]
        rows = [[str(r.id), r.identity, r.database, r.rule, _age(now - r.requested_at),
                 _age(r.expires_at - now), ",".join(r.approvers), r.classification,
                 r.statement] for r in self.store.pending()]
        return Result(columns=cols, rows=rows)

    def _show_history(self, n: int) -> Result:
        cols = ["id", "state", "identity", "database", "rule", "approver", "reason",
                "decided_at", "waited", "window", "statement"]
        rows = [[str(r.id), r.state, r.identity, r.database, r.rule, r.approver, r.reason,
                 iso(r.decided_at), _age(r.wait_s or 0),
                 _age(r.window_s) if r.window_s else None, r.statement]
                for r in self.store.recent(n)]
        return Result(columns=cols, rows=rows)

    def _show_grants(self) -> Result:
        now = time.time()
        cols = ["id", "identity", "database", "rule", "approver", "request_id",
                "expires_at", "expires_in", "fingerprint"]
        rows = [[str(g.id), g.identity, g.database, g.rule, g.approver,
                 _fmt(g.request_id), iso(g.expires_at), _age(g.expires_at - now),
                 g.fingerprint] for g in self.store.grants()]
        return Result(columns=cols, rows=rows)

    def _show_sessions(self) -> Result:
        sessions = [dict(s) for s in (self.sessions() if self.sessions else [])]
        cols = list(SESSION_COLUMNS)
        for s in sessions:
            cols.extend(k for k in s if k not in cols)
        rows = [[_fmt(s.get(c)) for c in cols] for s in sessions]
        return Result(columns=cols, rows=rows)

    def _help(self) -> Result:
        return Result(columns=["command", "description"], rows=[list(r) for r in HELP])
