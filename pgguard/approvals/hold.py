# What a session needs to hold a statement: summary, notice text, the refusal it ends with.
"""Helpers for the session side of an approval.

Example (inside the session, after ``decision.action == "approve"``)::

    if (g := store.check_grant(identity, database, fp)) is None:
        req = store.request(identity=identity, database=database, statement=sql,
                            fingerprint=fp, classification=summarize(decision),
                            rule=decision.rule, approvers=decision.approvers,
                            timeout_s=decision.timeout, session_id=sid)
        send_notice(**notice_fields(req, admin_url(cfg)))
        req = await store.wait_decision(req.id)
        if req.state != "approved":
            raise refusal(req)       # 42501 (denied / timed out) or 57014 (withdrawn)
    ...  # forward the statement
"""
from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Any

from ..errors import PgguardError, PolicyRefusal
from .store import Request

if TYPE_CHECKING:
    from ..config import Config


_UNUSUAL = re.compile(r"[^\t\n\x20-\x7e]")


def _escaped(m: re.Match) -> str:
    ch = m.group()
    if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        return ch
    n = ord(ch)
    if ch == "\r":
        # a line break to Postgres (it ends a -- comment): shown as one, and named
        # (round 19: `-- note\rUPDATE ...` read as one comment line, and ran)
        return "\\x0d\n"
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def visible(text: str) -> str:
    """``text`` as an approver may be shown it: control, format (bidi overrides,
    zero-width), unassigned and separator characters spelled as escapes, so a terminal,
    a browser or Slack shows what the statement says, not what its bytes make them draw.

    Example: ``visible("DELETE /*\\x1b[8m*/")`` -> ``"DELETE /*\\\\x1b[8m*/"``."""
    return _UNUSUAL.sub(_escaped, text)


def summarize(decision: Any) -> str:
    """One line from a policy ``Decision``: each statement's kind, written relations and
    flags. Example: ``"update public.orders [write]"``."""
    parts = []
    for st in getattr(decision, "statements", ()) or ():
        rels = list(st.relations_written) or list(st.relations_read)
        text = st.kind + (" " + ", ".join(rels) if rels else "")
        if st.flags:
            text += " [" + ", ".join(st.flags) + "]"
        parts.append(text)
    return "; ".join(parts) or str(getattr(decision, "rule", ""))


def admin_url(cfg: Config) -> str:
    """Where people reach the web console: ``[admin] public_url`` or
    ``http://<address>:<port>/`` (a wildcard address shows as 127.0.0.1)."""
    if cfg.admin.public_url:
        return cfg.admin.public_url.rstrip("/") + "/"
    host = cfg.admin.address
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.admin.port}/"


def _duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s >= 3600 and s % 3600 == 0:
        return f"{s // 3600}h"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s" if s % 60 else f"{s // 60}m"
    return f"{s}s"


def notice_fields(req: Request, console_url: str | None = None) -> dict[str, str]:
    """``message``/``detail``/``hint`` of the NoticeResponse a held client gets at once.

    Example: ``notice_fields(req)["message"]`` ->
    ``"waiting for approval #17 (rule orders-need-approval); times out in 5m"``.
    """
    hint = f"An approver runs: pgguard approvals approve {req.id} --as NAME -c CONFIG"
    if console_url:
        hint += f", or uses the web console {console_url}#{req.id}"
    hint += f", or APPROVE {req.id} in the psql admin console (database pgguard)."
    return {
        "message": f"waiting for approval #{req.id} (rule {req.rule}); "
                   f"times out in {_duration(req.timeout_s)}",
        "detail": f"{req.classification}; approvers: {', '.join(req.approvers)}",
        "hint": hint,
    }


def refusal(req: Request) -> PgguardError:
    """The error a client gets when its held statement does not run.

    Denied and timed out: SQLSTATE 42501 naming the rule (and the approver's reason);
    withdrawn (the client cancelled): 57014 ``canceling statement due to user request``.
    """
    if req.state == "withdrawn":
        return PgguardError("canceling statement due to user request", sqlstate="57014",
                            detail=f"approval request #{req.id} was withdrawn")
    if req.state == "denied":
        msg = f"statement denied by {req.approver} (approval #{req.id}, rule {req.rule})"
        if req.reason:
            msg += f": {req.reason}"
        return PolicyRefusal(msg, detail=req.classification,
                             hint="Change the statement or talk to the approver.")
    if req.state == "timed_out":
        return PolicyRefusal(
            f"approval #{req.id} timed out after {_duration(req.timeout_s)} "
            f"(rule {req.rule})", detail=req.classification,
            hint="Ask an approver to watch for it, then run the statement again.")
    return PolicyRefusal(f"approval #{req.id} is {req.state} (rule {req.rule})")
