# Statements held back on their way upstream: until a human approves them, or until
# their audit record is durable (strict durability). Nothing after them is scanned
# ahead while they wait, so the stream's order is kept.
from __future__ import annotations

import asyncio
import logging
import time

from ..approvals import hold
from ..approvals.store import StoreUnavailable
from ..errors import PgguardError
from ..policy.rules import Decision
from ..protocol import messages as m
from .sideconn import describe
from .tracking import Approved, fast_normalize

log = logging.getLogger("pgguard.session")

# what a session may send while a statement of it is held (waiting for an approval, a
# durable audit record, a catalog lookup): past this, its socket is not read until the
# hold ends (the kernel's buffers, then the client, wait)
HOLD_BYTES = 1 << 20


class Holds:
    """Session mixin: approval holds and strict-audit holds."""

    def _begin_hold(self, out: list, held: list, later: list = ()) -> None:
        """Write what came before the held message, then keep the client's stream
        (``later``: the rest of the batch, then anything scanned or arriving) until
        _release_hold."""
        if out:
            self.up.transport.write(b"".join(out))
            out.clear()
        self.held = held
        self.held_items = []
        self.held_bytes = 0
        self._hold_more(list(later))
        self.client_pipe.divert = True

    def _release_hold(self, out: list) -> None:
        """Send ``out`` (the held message, or what replaces it), then go on with what
        the client sent meanwhile."""
        items = self.held_items
        self.held = self.held_items = None
        self.client_pipe.divert = False
        if self.held_bytes > HOLD_BYTES:
            t = self.client.transport
            if t is not None and not t.is_closing() and self.violation is None:
                t.resume_reading()
        self.held_bytes = 0
        if out:
            self.up.transport.write(b"".join(out))
        if items:
            self.client_items(items)
        self.flush_poison()

    # -- approvals: a statement held until a human decides
    def _hold_for_approval(self, d, msg: bytes, out: list, *, extended: bool, sql: bytes,
                           name: bytes = b"", parse: bytes | None = None) -> None:
        """Hold ``msg`` (a Query, a Parse, or a Bind of an approved statement, whose
        Parse message is ``parse``) until a human decides."""
        store = self.server.approvals
        if store is None:
            self._refuse_any(Decision(
                action="block", rule=d.rule, message=d.message, detail=d.detail,
                hint="Approvals are not enabled on this pgguard (set [admin] token_env "
                     "and start it with the token set)."), out, extended, sql)
            return
        self._begin_hold(out, [])
        task = asyncio.get_running_loop().create_task(
            self._await_approval(store, d, msg, extended, sql, name, parse))
        self.approval = [task, None]

    async def _await_approval(self, store, d, msg, extended, sql, name, parse=None) -> None:
        text = sql.decode("utf-8", "replace")
        fp = fast_normalize(sql)
        req = failure = None
        try:
            # off the loop: the store may be a fleet's control database
            grant = await asyncio.to_thread(store.check_grant, self.identity_name,
                                            self.database, fp)
            approver = grant.approver if grant is not None else None
            if grant is None:
                req = await asyncio.to_thread(
                    lambda: store.request(identity=self.identity_name,
                                          database=self.database, statement=text,
                                          fingerprint=fp, classification=hold.summarize(d),
                                          rule=d.rule, approvers=d.approvers,
                                          timeout_s=d.timeout, session_id=self.id,
                                          cancel_key=self.cancel_key))
                self.approval[1] = req.id
                f = hold.notice_fields(req, hold.admin_url(self.server.cfg))
                self.client.transport.write(m.error_response(
                    "01000", f["message"], severity="NOTICE", detail=f["detail"],
                    hint=f["hint"], notice=True))
                req = await store.wait_decision(req.id)
                approver = req.approver
        except asyncio.CancelledError:
            raise
        except Exception as e:      # noqa: BLE001 - the store failed: refuse, fail closed
            log.error("session %s: approval store failed: %s", self.id, e)
            failure = e
        self.approval = None
        if self.closed:
            return
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
            self._refuse_any(refused, out, extended, sql, outcome="error")
        elif req is None or req.state == "approved":
            log.info("session %s: statement approved by %s", self.id, approver)
            out.append(msg)
            self.server.count_statement("approved")
            if self.tracker is not None:
                if parse is not None:   # the statement's record names this approver
                    self.tracker.flog.append((parse, Approved(d, approver), 0))
                self.tracker.flog.append((msg, Approved(d, approver), time.monotonic_ns()))
            if parse is not None:       # a Bind: its masking pairs as forwarded now
                if self.masking is not None:
                    self.masking.frontend(m.BIND, msg)
            elif extended and self.guard is not None:
                # a Parse: each later Bind of it asks again
                pname = name.encode() if isinstance(name, str) else (name or b"")
                self.guard.on_approved_parse(pname, d, sql, msg)
                self._guard_watch()
            if name and self.prepared is not None and d.statements:
                self.prepared.record(name, d.statements[0])
            if (not extended and self.server.audit_strict and self.tracker is not None
                    and out and out[-1] is msg):
                # strict: the approved Query goes upstream once its record is on disk
                # (an Execute gets its record on its own way through the stream)
                out.pop()
                if out:
                    self.up.transport.write(b"".join(out))
                self.held = [msg]
                fut = self.server.audit.log_strict(self.tracker.strict_record(msg))
                fut.add_done_callback(self._record_durable)
                return
        else:
            err = hold.refusal(req)
            refused = Decision(action="block", rule=d.rule, message=err.message,
                               detail=err.detail or "", hint=err.hint or "",
                               statements=d.statements)
            outcome = {"denied": "denied", "timed_out": "timed_out"}.get(req.state, "error")
            self._refuse_any(refused, out, extended, sql, outcome=outcome,
                             approver=req.approver, sqlstate=err.sqlstate)
        self._release_hold(out)


    # -- COPY (query) under masking: learn the query's columns before it runs
    def _hold_for_copy_plan(self, msg: bytes, out: list, specs: list) -> None:
        """specs: enforce._copy_specs of the Query msg (the list its queued plan holds);
        its COPY (query) entries are resolved on the side connection, then the Query goes
        upstream."""
        self._begin_hold(out, [])
        task = asyncio.get_running_loop().create_task(self._copy_plan(msg, specs))
        self.approval = [task, None]

    async def _copy_plan(self, msg: bytes, specs: list) -> None:
        out: list[bytes] = []
        mask = self.masking
        try:
            for i, sp in enumerate(specs):
                if sp[0] == "query":
                    _, query, fmt, opts = sp
                    desc = await describe(self.server, self.database,
                                          f"SELECT * FROM ({query}) AS pgguard_copy LIMIT 0")
                    await mask.lineage_load(query.encode(), None)
                    # in place: the Query's plan (queued already) holds this list
                    specs[i] = mask.copy_query_spec(desc, fmt, opts, query)
            out.append(msg)
        except Exception as e:      # noqa: BLE001 - cannot plan it: refuse, never leak
            mask.fseg -= 1          # the injected refusal counts its own ReadyForQuery
            self._inject_refusal(Decision(
                action="block", rule="masking",
                message='pgguard: statement refused by rule "masking": pgguard could not '
                        "work out which columns of this COPY (query) to mask",
                detail=str(e)[:300], hint="Use SELECT instead."), out, extended=False,
                sql=msg[5:-1])
        self.approval = None
        if self.closed:
            return
        self._release_hold(out)

    def _hold_for_copy_parse(self, msg: bytes, out: list, name: bytes, spec: tuple,
                             reads: bool, d) -> None:
        """A Parse of COPY (query) of masked data: its plan is learnt before the Parse
        goes upstream; what the client sends meanwhile waits."""
        self._begin_hold(out, [])
        task = asyncio.get_running_loop().create_task(
            self._copy_parse_plan(msg, name, spec, reads, d))
        self.approval = [task, None]

    async def _copy_parse_plan(self, msg: bytes, name: bytes, spec: tuple, reads: bool,
                               d) -> None:
        out: list[bytes] = []
        mask = self.masking
        _, query, fmt, opts = spec
        try:
            desc = await describe(self.server, self.database,
                                  f"SELECT * FROM ({query}) AS pgguard_copy LIMIT 0")
            await mask.lineage_load(query.encode(), None)
            # its read counts first: a computed column of masked data is masked whole
            injected = mask.frontend(m.PARSE, msg, reads)
            mask.parsed_copy(mask.copy_query_spec(desc, fmt, opts, query))
            out.append(msg)
            out.append(injected)
        except Exception as e:      # noqa: BLE001 - cannot plan it: refuse, never leak
            self._refuse_any(Decision(
                action="block", rule="masking",
                message='pgguard: statement refused by rule "masking": pgguard could not '
                        "work out which columns of this COPY (query) to mask",
                detail=str(e)[:300], hint="Use SELECT instead."), out, True,
                msg[5:-1])
        self.approval = None
        if self.closed:
            return
        self._release_hold(out)

    # -- strict audit: a statement goes upstream only once its record is on disk
    def _hold_for_record(self, out: list, later: list) -> None:
        """out[-1] is a Query or Execute: write what precedes it, log its record with
        log_strict, and hold it and everything after until the record is durable."""
        msg = out.pop()
        rec = self.tracker.strict_record(msg)
        self._begin_hold(out, [msg], later)
        fut = self.server.audit.log_strict(rec)
        fut.add_done_callback(self._record_durable)

    def _hold_more(self, items: list) -> None:
        held = self.held_items
        n = len(held)
        held.extend(items)
        scan = self.fscan
        rest = scan.take_rest()
        while rest is not None:         # keep stream order: nothing may be scanned ahead
            held.extend(scan.feed(rest))
            rest = scan.take_rest()
        self._count_held(held, n)

    def _count_held(self, held: list, start: int) -> None:
        """The one place that bounds what a session buffers while held: past
        HOLD_BYTES, its socket is not read until the hold ends."""
        size = 0
        for it in held[start:]:
            size += len(it) if it.__class__ is bytes else len(it[1])
        self.held_bytes += size
        if self.held_bytes > HOLD_BYTES:        # (again: a drained upstream resumes it)
            t = self.client.transport
            if t is not None and not t.is_closing():
                t.pause_reading()

    def _record_durable(self, fut) -> None:
        if self.closed:
            return
        if fut.cancelled() or fut.exception() is not None:
            err = fut.exception() if not fut.cancelled() else "cancelled"
            log.error("session %s: audit record not written (%s); closing", self.id, err)
            self.fail(PgguardError("the audit log is not available; statement not run",
                                   sqlstate="58030", severity="FATAL"))
            return
        self._release_hold(self.held)

