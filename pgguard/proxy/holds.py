# Holds: statements kept back on their way upstream, and the client's stream after them.
# Until a human approves them, until their audit record is durable (strict durability),
# or until a catalog lookup answers. Nothing after them is scanned ahead while they
# wait: the client's bytes are kept raw, and scanned (counted, judged) once the hold
# ends, as if they arrived then. So the stream's order is kept, and whoever acts on a
# message sees what follows it unread, exactly as on the wire.
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import struct
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ..approvals import hold
from ..approvals.store import StoreUnavailable
from ..errors import PgguardError
from ..policy.rules import Decision
from ..protocol import messages as m
from .tracking import Approved, statement_record

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("pgguard.session")

# what a session may send while a statement of it is held (waiting for an approval, a
# durable audit record, a catalog lookup): past this, its socket is not read until the
# hold ends (the kernel's buffers, then the client, wait)
HOLD_BYTES = 1 << 20

_SYNC_TYPES = frozenset(m.FRONTEND_SYNC_TYPES)


BIND_VALUE_SHOWN = 200          # characters of one bound value an approver sees


# binary values pgguard can read by the type the Parse declared
def _bool(b: bytes) -> str:
    # as Postgres' boolrecv reads it: one byte, any but 0 is true (round 18: 0x02 was
    # shown to the approver as false and ran as true); another length fails the Bind
    if len(b) != 1:
        raise struct.error("a bool is one byte")
    return "true" if b[0] else "false"


_BINARY = {16: _bool,
           21: lambda b: str(struct.unpack("!h", b)[0]), 23: lambda b: str(struct.unpack("!i", b)[0]),
           20: lambda b: str(struct.unpack("!q", b)[0]), 700: lambda b: repr(struct.unpack("!f", b)[0]),
           701: lambda b: repr(struct.unpack("!d", b)[0])}
_TEXTUAL = frozenset({25, 1042, 1043, 19, 114, 3802})   # text, bpchar, varchar, name, json(b)


def _shadowed(s, d) -> list[str]:
    """The names ``d`` reads or writes as public.x that this session's own temporary
    view or table of that name stands for (an unqualified name reaches it first)."""
    views = s.views.current() if s.views is not None else None
    temps = s.enforce.temp_names
    out: list[str] = []
    for st in d.statements:
        for name in (*st.relations_written, *st.relations_read):
            if name.startswith("public.") and name[7:] not in out and (
                    name[7:] in temps or (views is not None and
                                          "pg_temp." + name[7:] in views)):
                out.append(name[7:])
    return out


# how long an approval request waits for the statements sent before it to be answered
SETTINGS_WAIT = 10.0


def _values_digest(bind: bytes) -> str:
    """The parameters of a Bind, exactly (formats, values, result formats): a digest."""
    try:
        end = bind.index(b"\0", bind.index(b"\0", 5) + 1) + 1
    except ValueError:
        return "malformed"
    return hashlib.sha256(bind[end:]).hexdigest()


def bind_values(msg: bytes, parse: bytes | None = None) -> str:
    """What the Bind ``msg`` binds, for the human deciding on it: ``\n-- $1 = 'x',
    $2 = NULL`` (text values as SQL literals; binary ones by the type the statement's
    ``parse`` declares, else as text or hex saying the type is unknown; long ones cut)."""
    oids = m.parse_param_oids(parse) if parse is not None else ()
    try:
        end = msg.index(b"\0", 5)
        fmts, values, _ = m.bind_parameters(msg, msg.index(b"\0", end + 1) + 1)
        nf = len(fmts)
        shown = []
        for i, raw in enumerate(values):
            if raw is None:
                shown.append(f"${i + 1} = NULL")
                continue
            ln = len(raw)
            binary = (fmts[i] if nf > 1 else fmts[0] if nf else 0) == 1
            oid = oids[i] if i < len(oids) else 0
            if binary and oid in _BINARY:
                try:
                    v = _BINARY[oid](raw)
                except struct.error:
                    v = "'\\x" + raw[:BIND_VALUE_SHOWN // 2].hex() + "' (binary, malformed)"
            elif binary and oid in _TEXTUAL and _printable(raw[:BIND_VALUE_SHOWN]) is not None:
                v = "'" + _shown(raw[:BIND_VALUE_SHOWN].decode()) + "'"
            elif binary:
                # the type is the server's to know: printable bytes as text, 2, 4 or 8
                # bytes also as the integer they would be
                text = _printable(raw[:BIND_VALUE_SHOWN])
                v = ("'" + _shown(text) + "' (binary, type unknown" if text is not None
                     else "'\\x" + raw[:BIND_VALUE_SHOWN // 2].hex() + "' (binary, type unknown")
                if ln in (2, 4, 8):
                    v += f"; if an integer: {int.from_bytes(raw, 'big', signed=True)}"
                v += ")"
            else:
                v = "'" + _shown(raw[:BIND_VALUE_SHOWN].decode("utf-8", "replace")) + "'"
            if ln > (BIND_VALUE_SHOWN // 2 if binary else BIND_VALUE_SHOWN):
                v += f" (first of {ln} bytes)"
            shown.append(f"${i + 1} = {v}")
    except (ValueError, struct.error, IndexError):
        return "\n-- parameters: (unreadable Bind)"
    return "\n-- " + ", ".join(shown) if shown else ""


def _shown(text: str) -> str:
    # a SQL literal's inside, on one line: a value cannot draw lines of its own into
    # what the approver reads
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text) \
        .replace("'", "''")


def _printable(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def _bound(grant) -> tuple[int, str] | None:
    """The row bound of a window's run: the rows its approved run changed (one at
    least: a window approved while its statement matched nothing still covers a run
    of one row, as the guard's every-row check does)."""
    if grant is None or grant.max_rows is None:
        return None
    return max(grant.max_rows, 1), (f"as many as the run approved by {grant.approver} "
                                    f"changed: window #{grant.id}")


def whole_prefix(raw: bytes) -> int:
    """The length of the whole messages at the start of ``raw`` (from a boundary on)."""
    pos, n = 0, len(raw)
    while pos + 5 <= n:
        end = pos + 1 + int.from_bytes(raw[pos + 1:pos + 5], "big")
        if end > n:
            break
        pos = end
    return pos


def sync_points(items) -> int:
    """The sync points (Query, Sync, FunctionCall) among ``items``, scan items from a
    message boundary on (raw runs and (type, message) pairs), as the scan counted them:
    those inside raw runs too (a Sync nobody watched still gets its ReadyForQuery).
    A message's header is never split across items; its body may be."""
    n = 0
    remain = 0                      # bytes of the current raw message in later runs
    for it in items:
        if it.__class__ is not bytes:
            if it[0] in _SYNC_TYPES:
                n += 1
            continue
        size = len(it)
        pos = remain
        while pos + 5 <= size:
            if it[pos] in _SYNC_TYPES:
                n += 1
            pos += 1 + int.from_bytes(it[pos + 1:pos + 5], "big")
        remain = pos - size if pos > size else 0
    return n


class RawReader:
    """What the client sends while the stream waits (a held statement, a FunctionCall's
    lookup): the client pipe hands each chunk here (``Pipe.sink_to``) instead of scanning
    it; the bytes stay raw (unscanned, in order) in ``data``, and the socket is not read
    past ``limit`` bytes (``paused``; whoever ends the wait resumes it)."""

    def __init__(self, session, limit: int = HOLD_BYTES) -> None:
        self.s = session
        self.limit = limit
        self.data: list[bytes] = []
        self.size = 0
        self.paused = False

    def data_received(self, data: bytes) -> None:
        self.data.append(data)
        self.size += len(data)
        if self.size > self.limit and not self.paused:
            t = self.s.client.transport
            if t is not None and not t.is_closing():
                self.paused = True
                t.pause_reading()


class Holds:
    """A session's part: statements held back on their way upstream. It owns the hold
    (``held``: the held message(s), or None; ``items``: what the client sent after it
    that the scan had read already (the rest of the batch it came in), in order;
    ``reader``: the client's socket's RawReader meanwhile, which keeps the bytes that
    come raw; ``approval``: [side task, request id] while one runs); only its own
    methods change them. The session calls begin()/release() and the for_*() holds;
    more() keeps what the scan hands on while held."""

    def __init__(self, session, services: Services) -> None:
        self.s = session
        self.services = services
        self.held: list | None = None
        self.items: list | None = None
        self.reader: RawReader | None = None
        self.approval: list | None = None
        # (decision, text) of the statement waiting for a human, until they decide
        self.waiting: tuple | None = None

    def begin(self, out: list, held: list, later: list = ()) -> None:
        """Write what came before the held message, then keep the client's stream
        (``later``: the rest of the batch; the scan's unread rest and what arrives
        stay raw) until release()."""
        s = self.s
        if out:
            s.up.transport.write(b"".join(out))
            out.clear()
        self.held = held
        self.items = []
        reader = self.reader = RawReader(s)
        s.client_pipe.sink_to(reader)
        self.more(list(later))

    def cut_partial(self) -> None:
        """The client's end of file: a message it began and did not finish, among the
        bytes kept raw (the scan's unread rest, then what came meanwhile), is dropped:
        Postgres reads the end of file there and runs nothing of it (a Terminate added
        after it would finish it)."""
        reader = self.reader
        if reader is None:          # (no hold: the scan keeps no unread rest)
            return
        rest = self.s.fscan.take_rest()
        raw = (rest or b"") + b"".join(reader.data)
        # (the scan's rest goes in front of the raw bytes, as more() puts it)
        raw = raw[:whole_prefix(raw)]
        reader.data = [raw] if raw else []
        reader.size = len(raw)

    def begin_turn(self, out: list, later: list) -> None:
        """``begin`` for the rest of a long batch taken up at the next turn of the loop
        (Enforcement.client_items): the scan's unread rest stays in the scan (read
        after ``later`` when the hold ends, never scanned twice); what arrives
        meanwhile is kept raw behind it."""
        s = self.s
        if out:
            s.up.transport.write(b"".join(out))
            out.clear()
        self.held = []
        self.items = later
        reader = self.reader = RawReader(s)
        s.client_pipe.sink_to(reader)

    def begin_clear(self) -> None:
        """``begin`` with nothing to write and nothing scanned after the held point
        (the compiled pipe's guard lane)."""
        s = self.s
        self.held = []
        self.items = []
        reader = self.reader = RawReader(s)
        s.client_pipe.sink_to(reader)

    def reads_held(self) -> bool:
        """True while the hold keeps the client's socket unread (past HOLD_BYTES): its
        release resumes it."""
        return self.reader is not None and self.reader.paused

    def release(self, out: list) -> None:
        """Send ``out`` (the held message, or what replaces it), then go on with what
        the client sent meanwhile: the messages the scan had read, then the raw bytes,
        through the client's reader of now (the compiled pipe, which scans them as
        they had just arrived; or the reader of a hold that began meanwhile)."""
        s = self.s
        items, reader = self.items, self.reader
        self.held = self.items = self.reader = None
        t = s.client.transport
        pipe = s.client_pipe
        if reader is not None:
            pipe.unsink(reader)
        if out:
            s.up.transport.write(b"".join(out))
        if items:
            s.resume_items(items)
        if reader is not None:
            if reader.data and not s.closed:
                pipe.reader.data_received(b"".join(reader.data))
            if reader.paused and not s.closed and t is not None and not t.is_closing() \
                    and s.violation is None and not self.reads_held():
                t.resume_reading()
        s.flush_poison()

    # -- side tasks: what a hold waits on (an approval, a lookup) and can be cancelled
    def side_task(self, coro) -> None:
        """Run ``coro`` while the stream is held; the session cancels it if it ends."""
        self.approval = [asyncio.get_running_loop().create_task(coro), None]

    def side_task_done(self) -> None:
        self.approval = None

    def put_back(self, items: list) -> None:
        """Messages taken out of the held stream go back in front of it, in order."""
        self.items[0:0] = items

    # -- approvals: a statement held until a human decides
    def for_approval(self, d, msg: bytes, out: list, *, extended: bool, sql: bytes,
                     name: bytes = b"", parse: bytes | None = None) -> None:
        """Hold ``msg`` (a Query, a Parse, or a Bind of an approved statement, whose
        Parse message is ``parse``) until a human decides."""
        s = self.s
        store = self.services.approvals
        if store is None:
            s.enforce.refuse_any(Decision(
                action="block", rule=d.rule, message=d.message, detail=d.detail,
                hint="Approvals are not enabled on this pgguard (set [admin] token_env "
                     "and start it with the token set)."), out, extended, sql)
            return
        # messages before it in its pipeline with no Sync between: what they change
        # (SET DateStyle) is reported only at that Sync, after this statement ran
        unsynced = s.fscan.before_unsynced if extended else s.fscan.query_unsynced
        self.begin(out, [])
        task = asyncio.get_running_loop().create_task(
            self._await_approval(store, d, msg, extended, sql, name, parse, unsynced))
        self.approval = [task, None]
        self.waiting = (d, sql)

    def abandoned(self) -> None:
        """The session ends while a statement waits for a human (the client closed its
        connection, or was ended): the request is withdrawn, and the statement recorded
        as withdrawn, saying why (nothing of it ran upstream)."""
        s = self.s
        waiting, self.waiting = self.waiting, None
        if waiting is None or s.tracker is None:
            return
        d, sql = waiting
        req_id = self.approval[1] if self.approval is not None else None
        rec = statement_record(s, sql, d, "withdrawn", datetime.now(timezone.utc))
        rec.error = ("the session ended while the statement waited for approval" + (
            f" (request #{req_id} withdrawn)" if req_id is not None else "") +
            "; it did not run")
        self.services.count_statement("withdrawn")
        self.services.audit.log(rec)

    async def _await_approval(self, store, d, msg, extended, sql, name, parse=None,
                              unsynced: bool = False) -> None:
        s = self.s
        # what was sent before it is answered first (a SET DateStyle in the same write
        # changes how its literals read: round 19): the settings are read after that
        deadline = time.monotonic() + SETTINGS_WAIT
        while s.in_flight() > 0 and not s.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        text = sql.decode("utf-8", "replace")
        bound = None                        # the Bind whose values it runs with
        if parse is not None:               # a Bind: the values it binds
            bound = msg
            shown = text + bind_values(msg, parse)
        elif extended:                      # a Parse: its Bind's, when it came with it
            bound = self._first_bind(name)
            # with no values seen, its first run is free only under a row limit (an
            # INSERT ... SELECT has none: its first Bind asks with its values too)
            unseen_free = s.guard is not None and s.enforce.plan_of(d, sql) is not None
            shown = text + (bind_values(bound, msg) if bound is not None else
                            "\n-- parameters not sent yet: the first execution runs under "
                            "the row limit, each later one asks with its values"
                            if unseen_free else
                            "\n-- parameters not sent yet: each execution asks again with "
                            "its values")
        else:
            shown = text
        moved = s.pinned.inputs_text() if s.pinned is not None else ""
        if unsynced or s.in_flight() > 0:
            moved += ("; " if moved else "") + (
                "and what the messages sent before it (not answered yet) set")
        if moved:
            # how the literals read in this session (round 18: with DateStyle 'ISO, DMY'
            # set first, '01/12/2024' meant December to Postgres and January to the
            # approver): shown always (round 19: set at login, it was never shown), and
            # part of what a window matches
            shown += f"\n-- session settings (literals read by them): {moved}"
        # a window covers this exact statement (its text, the values bound to it, the
        # settings its literals read by), never other values of its shape (red team 19:
        # a window on `... WHERE id = ANY('{49}')` let `ANY('{2,...,1000}')` through,
        # 999 rows under the row limit): other values are another decision to ask for
        # (the values whole, not as shown: a long one is cut there, and helper 101 sent
        # one that began like the approved one; a Parse sent alone has none)
        fp = text + (f"\n-- values: {_values_digest(bound)}" if bound is not None else
                     "\n-- no values" if extended else "")
        if moved:
            fp += f"\n-- session settings: {moved}"
        shadowed = _shadowed(s, d)
        if shadowed:
            # (round 19: a TEMP view named orders over other rows: the approver read
            # public.orders, and the approved DELETE took 12 real orders through it)
            note = ("\n-- in this session " + ", ".join(shadowed) + " name temporary "
                    "objects of its own, not the public tables of that name")
            shown += note
            fp += note
        if unsynced or any("execute" in (st.kinds or (st.kind,)) for st in d.statements):
            # EXECUTE of a SQL-prepared name: what the name runs may change (DEALLOCATE,
            # PREPARE again) while the text stays: no window covers it, each one asks
            fp += f"\n-- asked once: {os.urandom(8).hex()}"
        # and what the policy read in it: a window covers statements of the same kinds
        # on the same relations only, whatever two texts' fingerprints have in common
        fp = f"{fp}\n-- pgguard: {hold.summarize(d)}" + (f"\n-- settings: {moved}" if moved else "")
        gen = self.services.decision_generation(s.database)
        req = failure = grant = None
        try:
            # off the loop: the store may be a fleet's control database
            grant = await asyncio.to_thread(store.check_grant, s.identity_name,
                                            s.database, fp)
            if grant is not None:
                kind = self._window_kind(d, sql)
                if kind is None or kind == "counted" and grant.max_rows is None:
                    # a window covers a run whose reach it can bound: no write, a plain
                    # UPDATE / DELETE its approved run's count bounds (once counted),
                    # an INSERT of the values in its text; anything else (INSERT ...
                    # SELECT, COPY FROM, several statements, a function: helper 133
                    # went past the bound with each) is asked for every time
                    grant = None
            approver = grant.approver if grant is not None else None
            if grant is None:
                req = await asyncio.to_thread(
                    lambda: store.request(identity=s.identity_name,
                                          database=s.database,
                                          statement=hold.visible(shown), fingerprint=fp,
                                          classification=hold.visible(hold.summarize(d)),
                                          rule=d.rule, approvers=d.approvers,
                                          timeout_s=d.timeout, session_id=s.id,
                                          cancel_key=s.cancel_key))
                self.approval[1] = req.id
                f = hold.notice_fields(req, hold.admin_url(self.services.cfg))
                s.client.transport.write(m.error_response(
                    "01000", f["message"], severity="NOTICE", detail=f["detail"],
                    hint=f["hint"], notice=True))
                req = await store.wait_decision(req.id)
                approver = req.approver
        except asyncio.CancelledError:
            raise
        except Exception as e:      # noqa: BLE001 - the store failed: refuse, fail closed
            log.error("session %s: approval store failed: %s", s.id, e)
            failure = e
        self.approval = None
        if s.closed:
            return
        if failure is None and (req is None or req.state == "approved") and extended \
                and parse is None and s.masking is not None:
            await s.enforce.learn_approved_parse(msg, d)     # (never raises)
            if s.closed:
                return
        self.waiting = None
        out: list[bytes] = []
        if failure is not None:
            if isinstance(failure, StoreUnavailable):
                # a fleet's control database is away: nothing can be approved (fail closed)
                refused = Decision(
                    action="block", rule=d.rule,
                    message=f'pgguard: statement refused by rule "{d.rule}": the control '
                            "database is unreachable, so no approval can be requested or "
                            "decided", detail=failure.message[:300],
                    hint=failure.hint or "", statements=d.statements)
            else:
                refused = Decision(
                    action="block", rule=d.rule,
                    message=f'pgguard: statement refused by rule "{d.rule}": the approval '
                            "could not be requested", detail=str(failure)[:300],
                    statements=d.statements)
            s.enforce.refuse_any(refused, out, extended, sql, outcome="error",
                                 ahead=sync_points(self.items or ()))
        elif req is None and not extended and self._prepares_approved(d) and \
                s.enforce.run_granted(msg, d, Approved(d, approver), _bound(grant)):
            # a window (grant) matched the statement by its shape: the values are not
            # the ones a human saw, so it runs under the row limit like an allowed one
            log.info("session %s: statement let through by %s's window, guarded", s.id,
                     approver)
            self.put_back([(m.QUERY, msg)])
        elif req is not None and req.state == "approved" and not extended and \
                self.services.decision_generation(s.database) != gen and any(
                    s.enforce.is_user_function(f) for st in d.statements
                    for f in st.functions) and self._prepares_approved(d) and \
                s.enforce.run_granted(msg, d, self._approved(d, approver, req, sql)):
            # DDL went by while it waited: a function it calls may run another body (a
            # new overload) than the one the approver's decision saw, so it runs under
            # the row limit like an allowed statement
            log.info("session %s: statement approved by %s after DDL, guarded", s.id,
                     approver)
            self.put_back([(m.QUERY, msg)])
        elif (req is None or req.state == "approved") and not extended and \
                s.masking is not None:
            log.info("session %s: statement approved by %s", s.id, approver)
            self._prepares_approved(d)
            s.enforce.run_approved(msg, d, self._approved(d, approver, req, sql))
            self.put_back([(m.QUERY, msg)])
        elif (req is None or req.state == "approved") and extended and parse is None \
                and not s.enforce.mask_approved_parse(msg, d, out,
                                                      sync_points(self.items or ())):
            pass                # refused by masking (out holds the refusal)
        elif req is None or req.state == "approved":
            log.info("session %s: statement approved by %s", s.id, approver)
            if not (extended and parse is None):
                out.append(msg)             # (a Parse: appended with its masking plan)
            self.services.count_statement("approved")
            if s.tracker is not None:
                rec = self._approved(d, approver, req, sql)
                if parse is not None:   # the statement's record names this approver
                    s.tracker.flog.append((parse, rec, 0))
                s.tracker.flog.append((msg, rec, time.monotonic_ns()))
            if parse is not None:       # a Bind: its masking pairs as forwarded now
                if s.masking is not None:
                    ask = s.masking.frontend(m.BIND, msg)
                    if ask is not None:     # a Bind's Describe (of a SQL PREPARE)
                        out.append(ask)
                if s.guard is not None:     # its Execute runs under the statement's plan
                    s.guard.on_bind(msg)
                    self._prepares_approved(d)  # a SQL PREPARE it runs: its Binds ask
            elif extended and s.guard is not None:
                # a Parse: each later Bind of it asks again, and its Executes run under
                # the row limit (the approver saw placeholders, not the values bound)
                pname = name.encode() if isinstance(name, str) else (name or b"")
                plan = s.enforce.plan_of(d, sql)
                if plan is not None and grant is not None and grant.max_rows is not None:
                    plan = plan.bounded(*_bound(grant))
                s.guard.on_approved_parse(pname, d, sql, msg, plan,
                                          free=1 if bound is not None or plan is not None
                                          else 0)
                s.enforce.parsed(pname, sql, msg)
                self._prepares_approved(d)      # a SQL PREPARE it runs: its Binds ask
            elif not extended:
                self._prepares_approved(d)
            if name and s.prepared is not None and d.statements:
                s.prepared.record(name, d.statements[0])
            if (not extended and self.services.audit_strict and s.tracker is not None
                    and out and out[-1] is msg):
                # strict: the approved Query goes upstream once its record is on disk
                # (an Execute gets its record on its own way through the stream)
                out.pop()
                if out:
                    s.up.transport.write(b"".join(out))
                self.held = [msg]
                fut = self.services.audit.log_strict(s.tracker.strict_record(msg))
                fut.add_done_callback(self.record_durable)
                return
        else:
            err = hold.refusal(req)
            refused = Decision(action="block", rule=d.rule, message=err.message,
                               detail=err.detail or "", hint=err.hint or "",
                               statements=d.statements)
            outcome = {"denied": "denied", "timed_out": "timed_out",
                       "withdrawn": "withdrawn"}.get(req.state, "error")
            # a Bind is no stop of the scan: what came behind it in its batch is
            # counted already (a Query or Parse stops it: nothing is)
            s.enforce.refuse_any(refused, out, extended, sql, outcome=outcome,
                                 approver=req.approver, sqlstate=err.sqlstate,
                                 ahead=sync_points(self.items or ()))
        self.release(out)


    def _window_kind(self, d, sql: bytes) -> str | None:
        """How a window may cover runs of ``d``: "free" (it writes nothing, or inserts
        only the rows its text spells), "counted" (one plain UPDATE / DELETE: its
        command's count, bounded by the approved run's), None (not at all: its reach
        depends on data or code the window cannot bound)."""
        s = self.s
        enf = s.enforce
        calls = any(enf.is_user_function(f) for st in d.statements for f in st.functions)
        writes = calls or any(st.changes_rows or st.relations_written or
                              st.kind in ("insert", "copy", "merge", "call", "do")
                              for st in d.statements)
        if not writes:
            return "free"
        if len(d.statements) != 1 or calls:
            return None
        st = d.statements[0]
        plan = enf.plan_of(d, sql)
        if st.kind in ("update", "delete") and plan is not None and plan.by_tag:
            return "counted"
        if st.kind == "insert" and not st.relations_read and plan is None and \
                not st.changes_rows and not st.kinds[1:]:
            return "free"
        return None

    def _approved(self, d, approver, req, sql: bytes) -> Approved:
        """The record of a statement a human approved: when the approval opened a
        window, its run's row count bounds the window's later runs."""
        gid = req.grant_id if req is not None else None
        if gid is None or self._window_kind(d, sql) != "counted":
            return Approved(d, approver)
        store = self.services.approvals
        loop = asyncio.get_running_loop()
        sid = self.s.id

        def told(rows: int) -> None:
            def done(f) -> None:
                if f.exception() is not None:
                    log.error("session %s: the row count of window #%s's approved run "
                              "could not be kept (%s): the window asks again", sid, gid,
                              f.exception())
            loop.run_in_executor(None, store.grant_rows, gid, rows).add_done_callback(done)
        return Approved(d, approver, on_rows=told)

    def _first_bind(self, name) -> bytes | None:
        """The first Bind of the statement ``name`` (a Parse waiting for approval) among
        what the client sent behind it, whole and in order: the execution the human
        sees. None when there is none yet (or the name is parsed again, or a Query drops
        the unnamed statement, before it)."""
        stmt = name.encode() if isinstance(name, str) else (name or b"")
        parts = [it if it.__class__ is bytes else it[1] for it in self.items or ()]
        if self.reader is not None:
            parts.extend(self.reader.data)
        buf = b"".join(parts)
        pos = 0
        while pos + 5 <= len(buf):
            t = buf[pos]
            (ln,) = struct.unpack_from("!I", buf, pos + 1)
            end = pos + 1 + ln
            if ln < 4 or end > len(buf):
                return None
            try:
                if t == m.BIND:
                    e = buf.index(b"\0", pos + 5, end)
                    if buf[e + 1:buf.index(b"\0", e + 1, end)] == stmt:
                        return buf[pos:end]
                elif t == m.PARSE and buf[pos + 5:buf.index(b"\0", pos + 5, end)] == stmt:
                    return None
                elif t == m.QUERY and not stmt:
                    return None
            except ValueError:
                return None
            pos = end
        return None

    def _prepares_approved(self, d) -> bool:
        """A Query approved (or let through by a window) that SQL-PREPAREs: each name
        is a protocol prepared statement too, and every Bind of it asks a human again,
        as EXECUTE does (the approval covered the PREPARE, no execution). True."""
        s = self.s
        if s.guard is None:
            return True
        for st in d.statements:
            if st.kind == "prepare" and st.name:
                pname, text = st.name.encode(), st.text.encode()
                s.guard.on_approved_parse(pname, d, text, m.parse_message(pname, text),
                                          s.enforce.plan_of(d, text), free=0)
        s.enforce.guard_watch()
        return True

    # -- COPY (query) under masking: learn the query's columns before it runs
    def for_copy_parse(self, msg: bytes, out: list, name: bytes, spec: tuple,
                       reads: bool, d) -> None:
        """A Parse of COPY (query) of masked data: its plan is learnt before the Parse
        goes upstream; what the client sends meanwhile waits."""
        self.begin(out, [])
        task = asyncio.get_running_loop().create_task(
            self._copy_parse_plan(msg, name, spec, reads, d))
        self.approval = [task, None]

    async def _copy_parse_plan(self, msg: bytes, name: bytes, spec: tuple, reads: bool,
                               d) -> None:
        s = self.s
        out: list[bytes] = []
        mask = s.masking
        _, query, fmt, opts = spec
        try:
            desc = await self.services.side.describe(
                s.database, f"SELECT * FROM ({query}) AS pgguard_copy LIMIT 0")
            await mask.lineage_load(query.encode(), None)
            # its read counts first: a computed column of masked data is masked whole
            injected = mask.frontend(m.PARSE, msg, reads)
            mask.parsed_copy(mask.copy_query_spec(desc, fmt, opts, query))
            out.append(msg)
            out.append(injected)
        except Exception as e:      # noqa: BLE001 - cannot plan it: refuse, never leak
            s.enforce.refuse_any(Decision(
                action="block", rule="masking",
                message='pgguard: statement refused by rule "masking": pgguard could not '
                        "work out which columns of this COPY (query) to mask",
                detail=str(e)[:300], hint="Use SELECT instead."), out, True,
                msg[5:-1])
        self.approval = None
        if s.closed:
            return
        self.release(out)

    # -- strict audit: a statement goes upstream only once its record is on disk
    def for_record(self, out: list, later: list) -> None:
        """out[-1] is a Query or Execute: write what precedes it, log its record with
        log_strict, and hold it and everything after until the record is durable."""
        s = self.s
        msg = out.pop()
        rec = s.tracker.strict_record(msg)
        self.begin(out, [msg], later)
        fut = self.services.audit.log_strict(rec)
        fut.add_done_callback(self.record_durable)

    def more(self, items: list) -> None:
        """Messages the scan read after the held one (the rest of their batch): kept in
        order; the scan's unread rest goes to the raw bytes, first (nothing may be
        scanned ahead: what follows a Query, Parse or FunctionCall is read once the
        hold ends)."""
        s = self.s
        self.items.extend(items)
        rest = s.fscan.take_rest()
        if rest is not None:
            self.reader.data.insert(0, rest)
            self.reader.size += len(rest)

    def record_durable(self, fut) -> None:
        s = self.s
        if s.closed:
            return
        if fut.cancelled() or fut.exception() is not None:
            err = fut.exception() if not fut.cancelled() else "cancelled"
            log.error("session %s: audit record not written (%s); closing", s.id, err)
            s.fail(PgguardError("the audit log is not available; statement not run",
                                sqlstate="58030", severity="FATAL"))
            return
        self.release(self.held)

