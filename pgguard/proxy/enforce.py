# The relay hooks: what a session does with each statement it watches.
# Policy decisions (cached, with a compiled fast path), refusals that keep Postgres'
# transaction semantics exactly, and the backend rewrite that turns a refusal's upstream
# error into the client's 42501.
from __future__ import annotations

import asyncio
import itertools
import logging
import re
import struct
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec
import orjson
from pglast import parse_sql, parser
from pglast.stream import RawStream

from .._core.answers import answer_for
from .._core.sqlshape import shape
from ..errors import PgguardError, ProtocolViolation
from ..masking import parking
from ..masking.wire import MASK_BACKEND, PENDING
from ..policy.bodies import Bodies, BodiesPending, created_functions, own_definitions
from ..policy.classify import WRITING_FUNCS
from ..policy.rules import Decision
from ..policy.views import CATALOG_KINDS
from ..protocol import messages as m
from .blast import MAX_TABLES, either_plan, has_txn_control, plan_for
from .holds import sync_points
from .tracking import REFUSAL_SYNC, statement_record

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("pgguard.session")

ALL_TYPES = bytes(range(256))
# what decide() returns while a called user function's body is read from the catalog:
# the statement is held and decided again once it is (never cached, never acted on)
BODIES_PENDING = Decision(action="pending", rule="function-body")
# statements longer than this (bytes) are parsed and judged on a thread
DECIDE_INLINE = 64 << 10
# function bodies a session remembers from its own CREATE FUNCTION statements
OWN_BODIES_MAX = 1000
# prepared statements whose generation and text a session keeps (see parsed)
STMT_NAMES_KEPT = 10_000
STMT_TEXT_BYTES = 16 << 20
STMT_ALTS_KEPT = 4          # texts a name may still run besides its last Parse's
# statement kinds of DDL that may change what a function name means
_FUNCTION_DDL = re.compile(r"\b(function|procedure|routine|aggregate)\b", re.IGNORECASE)

# a refusal reaches the upstream as a statement that raises this SQLSTATE, so the
# upstream transaction fails exactly where the client is told; the backend path
# turns that error into the client's 42501
REFUSAL_MARKER = "PGG42"


class Guarded:
    """A cached allow decision of a statement the blast-radius guard runs: its action
    is not "allow", so the compiled pipe hands it to Python, which unwraps it."""

    __slots__ = ("decision", "action", "rule", "statements")

    def __init__(self, d) -> None:
        self.decision = d
        self.action = "guarded"
        self.rule = d.rule                  # what remember_decision reads
        self.statements = d.statements


class Enforcement:
    """A session's part: the relay hooks for watched frontend messages and diverted
    backend messages. It owns the relay's bookkeeping of refusals and watching
    (``discarding`` after a refused Parse until Sync, ``sync_adjust``, ``refusals``
    awaiting their answer, ``z_count``, ``watch``); only its own methods change them.
    The session's pipes call client_items()/backend_items() (the session hands them on
    as its own attributes, no extra call)."""

    def __init__(self, session, services: Services) -> None:
        self.s = session
        self.services = services
        self.discarding = False         # after a refused Parse: drop until Sync
        # query_lane's plans: id(decision) -> (decision, generation, view map, plan)
        self._plans: dict[int, tuple] = {}
        self.lane_allowed = 0           # statements query_lane ran (for the metrics)
        # the decision cache the session decides through ((raw message -> decision,
        # shape -> decision)): shared by the sessions of one identity, database and mode
        # (given at relay start), or this session's own once its DDL taught it views
        # its peers do not know; the compiled pipe holds the same two dicts
        self.cache: tuple[dict, dict] = ({}, {})
        self.own_cache = False
        self._sync_adjust = 0           # see sync_adjust
        self.refusals: deque = deque()  # injected refusals awaiting their answer
        # the expected-answers model's queue (Answers.listen), from the first refusal:
        # per ReadyForQuery, the Queries and FunctionCalls Postgres skipped up to it
        self._readies = None
        self._skipped = 0
        self.drop_next_z = False
        self.z_count = 0
        self.watch = b"X"
        self._base_watch = b"X"
        self._guarding = False          # Bind/Execute/Close/Sync watched for it
        # calls of user functions: bodies this session created (by bare name), whether
        # it sent function DDL (then a name the catalog does not show is opaque), and
        # the names a pending decision waits for
        self.own_bodies: dict = {}
        self.function_ddl = False
        self.pending_bodies: tuple = ()
        self._views_wait = None         # the message decide() waited for the view map for
        self._fnames_wait = None        # ... for a fresh read of the function names for
        self._masks_wait = None         # ... for the mask catalog for
        # a long text is judged on a thread (parsing ~1 MB into a tree took ~1 s, every
        # session of the worker waiting): (msg, arguments) while it runs, then (msg,
        # its decision or the exception it raised)
        self._big_wait = None
        self._big_done = None
        self._effects_of = None         # the DDL message whose catalog effects are done
        # a function body or DO block ran DDL that no catalog read can see before its
        # transaction commits (a view over orders made inside mkw()): until then, and
        # until the view map is read again after it, an agent's writes are refused (see
        # _after_body_ddl). True, "reading" (the map is being read again), False
        self.body_ddl: bool | str = False
        # temporary relations this session created (bare names): the classifier calls
        # an unqualified name public.<name>, and these are found first (_unknown_writes)
        self.temp_names: set[str] = set()
        # (a COPY (query) Query, its specs completed or why not): see _mask_query
        self._copy_planned: tuple | None = None
        # prepared statements: name -> the catalog generation they were judged under
        # (the compiled client pipe reads it at each Bind), and their texts (an unnamed
        # one the pipe forwarded itself since is its unnamed_parse, which was
        # _unnamed_seen when this part last noted one)
        self.stmt_gens: dict[bytes, int] = {}
        self.stmt_texts: dict[bytes, bytes] = {}
        # the texts a name held before a Parse that may have failed (a named Parse of a
        # name Postgres still has fails, 42P05, and leaves the older statement; an
        # unnamed one after an unsynced message may be skipped): any of them may run,
        # so a stale Bind judges each (like the guard's maybe_plan)
        self.stmt_alts: dict[bytes, list[bytes]] = {}
        self._rebind_qs: dict[bytes, bytes] = {}    # text -> the Query it is judged as
        self._texts_bytes = 0
        self._forgot_names = False
        self._closed_names: dict[bytes, None] = {}  # closed names, oldest first
        self._unnamed_seen: bytes | None = None
        # (Query message, Approved): a Query an approval window (a grant, matched by the
        # statement's shape) lets through, taken up again to run under the blast-radius
        # guard: its values are not the ones a human saw
        self.granted: tuple | None = None
        self._fb: Bodies | None = None

    @property
    def sync_adjust(self) -> int:
        """Sync points (Query, Sync, FunctionCall) Postgres answers, less those the
        client scan counted: pgguard's own injected ones count, those it dropped do not,
        and neither do the Queries and FunctionCalls Postgres skipped after an
        extended-protocol error (round 18: a Query skipped in an earlier segment left
        the guard waiting for its ReadyForQuery, and the session hung)."""
        a = self.s.answers
        return self._sync_adjust - (a.skipped if a is not None else 0)

    @sync_adjust.setter
    def sync_adjust(self, value: int) -> None:
        a = self.s.answers
        self._sync_adjust = value + (a.skipped if a is not None else 0)

    def relay_starts(self) -> None:
        """What the client scan watches from the relay's start: what the policy, the
        audit and masking each need to see in Python."""
        s = self.s
        # (under a policy a Bind is watched too: one of a statement judged before DDL
        # went by is judged again, see stale_bind)
        self.watch = (b"QPFB" if s.policy is not None else b"") + \
            (b"QPBESFC" if self.services.audit is not None else b"") + \
            (b"QPBDES" if s.masking is not None else b"") + b"X"
        self._base_watch = self.watch

    def watch_statements(self) -> None:
        """Under a policy, from the relay's start: remember the catalog generation
        each prepared statement was judged under (the compiled pipe records the unnamed
        Parses it forwards), so a Bind after DDL judges its statement again."""
        s = self.s
        if s.policy is None:
            return
        s.client_pipe.watch_statements(self.stmt_gens, s.services.catalog_signal.mm)

    def parsed(self, name: bytes, sql: bytes, msg: bytes) -> None:
        """A Parse judged here goes upstream: note its text and generation."""
        pipe = self.s.client_pipe
        if pipe.stmt_gens is None:
            return
        gens, texts, closed = self.stmt_gens, self.stmt_texts, self._closed_names
        if name not in gens:
            # at most STMT_NAMES_KEPT names and STMT_TEXT_BYTES of their texts: past
            # them the oldest closed ones are forgotten first (a Bind of one fails
            # upstream when its Close ran), then the oldest; a Bind of a name not known
            # is refused from then on (its text is not known)
            while gens and (len(gens) >= STMT_NAMES_KEPT
                            or self._texts_bytes + len(sql) > STMT_TEXT_BYTES):
                old = next(iter(closed)) if closed else next(iter(gens))
                closed.pop(old, None)
                del gens[old]
                self._texts_bytes -= len(texts.pop(old, b""))
                self._texts_bytes -= sum(map(len, self.stmt_alts.pop(old, ())))
                if not self._forgot_names:
                    self._forgot_names = True
                    pipe.names_forgotten()
        else:
            closed.pop(name, None)
            before = texts.get(name)
            if not name and not self.s.fscan.before_unsynced:
                # first of its segment: Postgres drops the unnamed statement as the
                # Parse begins, failing or not; what it held before is gone too
                self._texts_bytes -= len(before or b"")
                self._forget_alternatives(name)
            elif before is not None and before != sql:
                self._keep_alternative(name, before)
            else:
                self._texts_bytes -= len(before or b"")
        gens[name] = pipe.generation
        texts[name] = sql
        self._texts_bytes += len(sql)
        if not name:
            self._unnamed_seen = pipe.unnamed_parse

    def _keep_alternative(self, name: bytes, text: bytes) -> None:
        # (its bytes stay counted: they move from stmt_texts to stmt_alts)
        alts = self.stmt_alts.setdefault(name, [])
        if text in alts:
            self._texts_bytes -= len(text)
            return
        alts.append(text)
        if len(alts) > STMT_ALTS_KEPT:
            # more candidates than are judged again: the oldest goes, and the name is
            # judged as unknown from then on (refused at a stale Bind, never guessed)
            self._texts_bytes -= len(alts.pop(0))
            alts.append(b"")

    def _forget_alternatives(self, name: bytes) -> None:
        self._texts_bytes -= sum(map(len, self.stmt_alts.pop(name, ())))

    def _forget_name(self, name: bytes) -> None:
        # Postgres has no statement of this name now
        if self.stmt_gens.pop(name, None) is not None:
            self._texts_bytes -= len(self.stmt_texts.pop(name, b""))
        self._closed_names.pop(name, None)
        self._forget_alternatives(name)

    def deallocated(self, d) -> None:
        """A Query with SQL DEALLOCATE (name or ALL) goes upstream: outside a failed
        transaction it runs, and the names are gone (a Bind of one fails upstream)."""
        if self.s.bscan.status == m.TX_FAILED or \
                not any(st.kind == "deallocate" for st in d.statements):
            return
        for st in d.statements:
            if st.kind != "deallocate":
                continue
            if st.name is None:
                for name in [n for n in self.stmt_gens if n]:
                    self._forget_name(name)
            else:
                self._forget_name(st.name.encode())
        if self.s.guard is not None:
            self.s.guard.deallocated(d)

    def closed_statement(self, msg: bytes) -> None:
        """A Close of a statement: Postgres may not run it (an error earlier in its
        pipeline skips it, and the name lives on), so the name is kept, as stale: a
        later Bind of it is judged again (and fails upstream if the Close ran). The
        first message of its segment cannot be skipped: then the name is gone."""
        if len(msg) > 6 and msg[5] == m.TARGET_STATEMENT:
            name = msg[6:msg.find(b"\0", 6)]
            if not self.s.fscan.before_unsynced:
                # (the scan's view is this Close's, or a later message's of its
                # segment: then unsynced, and the name is kept as below)
                self._forget_name(name)
                return
            if name in self.stmt_gens:
                self.stmt_gens[name] = -1
                self._closed_names[name] = None     # forgotten first (see parsed)

    def stale_bind(self, msg: bytes, out: list, later: list) -> bool:
        """A Bind of a statement judged under an older catalog generation (DDL went by
        since its Parse: Postgres resolves its names again, and a view or temporary
        object may shadow them now): judge its text again. True: go on with the Bind.
        False: refused, or it waits for the catalog (then it is taken up again)."""
        gens = self.stmt_gens
        if not gens:
            return True
        s = self.s
        name = _bind_statement(msg)
        if name is None:
            return True                 # malformed: Postgres answers it
        gen = gens.get(name)
        now = s.client_pipe.generation
        if gen is None and not (name and self._forgot_names) or gen == now:
            return True
        sql = self.stmt_texts.get(name)
        parse = s.client_pipe.unnamed_parse
        if not name and parse is not None and parse is not self._unnamed_seen:
            try:                        # the compiled pipe forwarded a later one
                _, pos = m.parse_cstr(parse, 5)
                sql = parse[pos:parse.index(b"\0", pos)]
            except ValueError:
                sql = None
        texts = [sql, *self.stmt_alts.get(name, ())]
        if sql is None or b"" in texts:
            # its text was forgotten (STMT_NAMES_KEPT): refuse, never forward unjudged
            self.refuse_any(Decision(
                action="block", rule="statement-memory",
                message='pgguard: statement refused by rule "statement-memory": pgguard '
                        "no longer knows what this prepared statement runs",
                detail=f"this session prepared more than {STMT_NAMES_KEPT} statements "
                       "(or their texts passed the memory kept for them); the oldest "
                       "are forgotten",
                hint="Prepare the statement again, and close statements no longer used."),
                out, True, b"/* the prepared statement " + name.replace(b"*/", b"* /") +
                b", forgotten */", ahead=sync_points(later))
            return False
        if not self._judge_again(name, texts, msg, out, later,
                                 "the catalog changed since the statement was prepared"):
            return False
        gens[name] = now
        return True

    def mask_bind(self, msg: bytes, out: list) -> bool:
        """A Bind in a masked session (Python's path): the mask catalog read again
        first when DDL moved it (in any worker, or directly upstream: see
        Services._masks_tick; a session whose statements were all prepared before
        never meets a RowDescription that would say so), and the statement's lineage
        taken again when that read dropped it (Postgres plans the statement again: a
        view it reads may read masked columns now). True: go on with the Bind. False:
        it waits (then it is taken up again)."""
        s = self.s
        mask = s.masking
        if not mask.masks_apply():
            return True
        if self._masks_wait is not msg and mask.catalog_behind():
            self._masks_wait = msg
            s.holds.begin(out, [])
            s.holds.side_task(self._rebind_then(msg, None))
            return False
        name = _bind_statement(msg)
        if name is None:
            return True                 # malformed: Postgres answers it
        src = mask.relineage(name)
        if src is None:
            return True
        s.holds.begin(out, [])
        s.holds.side_task(self._rebind_then(msg, src))
        return False

    async def _rebind_then(self, msg: bytes, src: tuple | None) -> None:
        s = self.s
        if src is None:
            await s.masking.catch_up()
        else:
            await s.masking.lineage_load(src[0], None, src[1])
        s.holds.side_task_done()
        if s.closed:
            return
        s.holds.put_back([(msg[0], msg)])
        s.holds.release([])

    def fast_path(self, on: bool) -> None:
        """Let the compiled client pipe forward what needs no Python (off while
        discarding after a refusal): statements the policy's cached decision allows,
        or all of them without a policy; with the audit, the extended-protocol messages
        the tracker pairs too. Masking and the strict audit see each message in Python."""
        s = self.s
        strict = self.services.audit_strict
        logged = None if s.tracker is None else b"BES" if s.policy is not None else b"BESF"
        if s.client_pipe.mask is not None and on and not strict and not self._guarding \
                and s.policy is not None:
            # masking: the lane, for statements that read no mask
            exact, shapes = self.cache
            s.set_fast_path(lane=True, exact=exact, shapes=shapes, log_types=logged)
            s.masking.maybe_idle()
            return
        if not on or strict or s.masking is not None or self._guarding:
            # while the blast-radius guard watches, Query/Parse go to Python, and only
            # the Bind/Execute/Close/Sync that name nothing guarded are forwarded there
            # (with the guard's bookkeeping): the unguarded statements of a session that
            # prepared a guarded one pay no Python
            s.set_fast_path(guard=s.guard if on and self._guarding and not strict and
                            s.masking is None else None)
        elif s.policy is not None:
            exact, shapes = self.cache
            # a FunctionCall is judged under a policy: never forwarded there then
            s.set_fast_path(exact=exact, shapes=shapes, log_types=logged,
                            guard_query=self.query_lane if s.guard is not None else None)
        else:
            s.set_fast_path(allow_all=True, log_types=logged)

    # -- relay hooks (called by the compiled pipes)
    def client_items(self, items: list) -> None:
        """See _client_items; a fault in pgguard's own code ends the session saying
        so, never leaves it unanswered (helper 133: a TypeError in a Bind's judging
        again left the client's socket paused, the client waiting for ever)."""
        try:
            self._client_items(items)
        except Exception as e:      # noqa: BLE001 - any fault: fail closed, loudly
            self._fault(e)

    def backend_items(self, items: list, routed: bool = False) -> None:
        """See _backend_items; a fault ends the session (as client_items)."""
        try:
            self._backend_items(items, routed)
        except Exception as e:      # noqa: BLE001 - any fault: fail closed, loudly
            self._fault(e)

    def _fault(self, e: Exception) -> None:
        s = self.s
        log.exception("session %s: internal error, the session is closed", s.id,
                      exc_info=e)
        s.fail(PgguardError("pgguard: internal error; the session is closed",
                            detail=f"{e.__class__.__name__} (see the pgguard log for "
                                   f"session {s.id})", sqlstate="XX000", severity="FATAL"))

    def _client_items(self, items: list) -> None:
        """Frontend messages the scan withheld (Query, Parse, Terminate, and for the
        audit Bind/Execute/Sync) with the forwarded runs around them; everything while
        discarding after a refusal or holding for a durable audit record."""
        s = self.s
        if s.holds.held is not None:
            s.holds.more(items)
            return
        out: list[bytes] = []
        scan = s.fscan
        strict = s.services.audit_strict and s.tracker is not None
        done = 0
        while True:
            for i, it in enumerate(items):
                if s.holds.held is not None:       # a hold began: keep the rest, in order
                    s.holds.more(items[i:])
                    return
                done += 1
                if done > CLIENT_SLICE and not self.discarding:
                    # a long batch (a pipeline of thousands of messages in one write):
                    # the rest waits for the next turn of the loop (what arrives
                    # meanwhile kept raw), so that one client cannot keep every other
                    # session of the worker waiting (red team 23: 50,000 Bind /
                    # Execute / Sync stalled logins for 12 s)
                    s.holds.begin_turn(out, items[i:])
                    s.holds.side_task(self._next_turn())
                    return
                if it.__class__ is bytes:
                    if not self.discarding:
                        out.append(it)
                    continue
                t, msg = it
                if self.discarding:
                    # Postgres ignores everything after an error until Sync
                    if t == m.SYNC:             # ends the discarding
                        self.discarding = False
                        scan.set_interest(ALL_TYPES, False)
                        scan.set_interest(self.watch, True)
                        self.fast_path(True)
                        guard = s.guard
                        if guard is not None and guard.owe is not None:
                            # the guard opened this implicit transaction's block: it
                            # ends it around the Sync (rolled back: an error failed it)
                            guard.before_sync(out, msg, items[i + 1:])
                            self.guard_watch()
                        else:
                            out.append(msg)
                        if guard is not None:
                            guard.on_sync()
                        if s.masking is not None:    # its ReadyForQuery pairs too
                            s.masking.frontend(m.SYNC, msg)
                        if s.tracker is not None:
                            s.tracker.flog.append((msg, None, 0))
                    elif t == m.TERMINATE:
                        self._terminate_from_client(out, msg)
                        return
                    elif t == m.QUERY or t == m.FUNCTION_CALL:   # dropped: no Z
                        self.sync_adjust -= 1
                    continue
                if (t == m.QUERY or t == m.FUNCTION_CALL) and s.guard is not None and \
                        s.guard.owe == "commit" and s.guard.commit_before(out, items[i:]):
                    # a sync point right after the guard's write (no Sync between): its
                    # block is committed first, as the implicit transaction would be
                    self.guard_watch()
                    return
                if (t == m.QUERY or t == m.PARSE) and _pg_rejects(msg):
                    # malformed as Postgres reads it: it runs nothing and answers
                    # with its own 08P01 ERROR, so it goes upstream unjudged
                    self._forward_rejected(t, msg, out)
                elif t == m.QUERY:
                    n = len(out)
                    self._on_query(msg, out, _Rest(items, i + 1))
                    if strict and len(out) > n and out[-1] is msg:
                        s.holds.for_record(out, items[i + 1:])
                        return
                elif t == m.PARSE:
                    self._on_parse(msg, out)
                elif t == m.TERMINATE:
                    self._terminate_from_client(out, msg)
                    return
                elif t == m.FUNCTION_CALL and s.fncalls is not None:
                    if s.fncalls.on_message(msg, out, items[i + 1:]):
                        return          # its function is looked up: the stream waits
                else:                           # Bind / Describe / Execute / Sync / ...
                    if t == m.BIND and self.stmt_gens and not self.stale_bind(
                            msg, out, _Rest(items, i + 1)):
                        continue                # refused, or waits for a catalog read
                    if t == m.BIND and s.masking is not None and not self.mask_bind(
                            msg, out):
                        continue                # waits for the catalog or the lineage
                    elif t == m.CLOSE and self.stmt_gens:
                        self.closed_statement(msg)
                    guard = s.guard
                    plan = None
                    if guard is not None and guard.watching:
                        if t == m.BIND:         # the portal inherits the guard
                            stale = guard.stale_plan(
                                msg, s.services.decision_generation(s.database))
                            if stale is not None and not self._bind_again(
                                    stale, msg, out, items[i + 1:]):
                                continue        # refused, or waits for a catalog read
                            again = guard.bind_needs_approval(msg)
                            if again is not None:   # an approval covers one execution
                                # (its portal takes the statement's plan once approved)
                                s.holds.for_approval(
                                    again[0], msg, out, extended=True, sql=again[1],
                                    parse=again[2])
                                continue
                            guard.on_bind(msg)
                        elif t == m.CLOSE:
                            guard.on_close(msg)
                            self.guard_watch()
                        elif t == m.EXECUTE:
                            guard.before_execute(msg)
                            plan = guard.portal_plan(msg, items[:i])
                            if plan is None:
                                guard.on_execute()
                        elif t == m.SYNC:
                            if guard.owe is not None:
                                guard.before_sync(out, msg, items[i + 1:])
                                self.guard_watch()
                                msg = None
                            guard.on_sync()
                    if msg is not None and plan is None:
                        out.append(msg)
                    if s.masking is not None:
                        ask = s.masking.frontend(t, it[1])
                        if ask is not None and msg is not None and plan is None:
                            if t == m.EXECUTE:  # a cursor portal's Describe: first
                                out.insert(len(out) - 1, ask)
                            else:               # a Bind's Describe (of a SQL PREPARE)
                                out.append(ask)
                        elif ask is not None and t == m.EXECUTE:
                            s.masking.unask()   # (not sent: the guard runs it)
                    if s.tracker is not None:
                        s.tracker.flog.append((it[1], None, time.monotonic_ns()))
                        if strict and t == m.EXECUTE and plan is None:  # durable record first
                            s.holds.for_record(out, items[i + 1:])
                            return
                    if plan is not None:        # runs under the row limit
                        guard.start_execute(it[1], plan, out, items[i + 1:])
                        return
            rest = scan.take_rest()
            if rest is None:
                break
            items = scan.feed(rest)
        if out:
            s.up.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def _next_turn(self) -> None:
        # the rest of a long batch (client_items), at the next turn of the loop
        await asyncio.sleep(0)
        s = self.s
        s.holds.side_task_done()
        if not s.closed:
            s.holds.release([])

    def _forward_rejected(self, t: int, msg: bytes, out: list) -> None:
        """A Query or Parse that Postgres refuses as malformed (_pg_rejects): sent on
        as it is, with the bookkeeping of a statement that fails (its error, then the
        Query's ReadyForQuery or the skip to Sync)."""
        s = self.s
        out.append(msg)
        mask = s.masking
        if mask is not None:
            if t == m.QUERY:
                mask.owe_ready()
            else:
                mask.failed_parse()
        if s.tracker is not None:
            s.tracker.flog.append((msg, None, time.monotonic_ns()))

    def _terminate_from_client(self, out: list, msg: bytes) -> None:
        # Postgres answers every message before the Terminate, then closes: the client
        # gets those answers (INSERT 0 1, the rows of a SELECT sent with it) before the
        # proxy closes, when the upstream does
        s = self.s
        out.append(msg)
        s.up.transport.write(b"".join(out))
        s.close_after_upstream()


    def decide(self, msg: bytes, text_start: int, text_end: int):
        """The policy decision for the SQL text msg[text_start:text_end], cached by
        the raw bytes and by the literal-insensitive shape."""
        s = self.s
        exact, shapes = self.cache
        d = exact.get(msg)
        if d is not None:
            return d.decision if d.__class__ is Guarded else d
        if self._effects_of is not None and self._effects_of != msg:
            self._effects_of = None     # another statement: the next DDL counts again
        raw = msg[text_start:text_end]
        # (a text past the policy's length limit is judged as itself: a short
        # statement's shape would let it through)
        key = shape(raw) if s.policy is None or len(raw) <= s.policy.max_length else None
        if key is not None:
            d = shapes.get(key)
            if d is not None:
                return d.decision if d.__class__ is Guarded else d
        try:
            sql = raw.decode("utf-8")
        except UnicodeDecodeError:
            return Decision(action="block", rule="encoding",
                            message='pgguard: statement refused by rule "encoding": the '
                                    "statement is not valid UTF-8",
                            detail=f"the bytes at offset {_bad_utf8_offset(raw)} do not "
                                   "decode as UTF-8",
                            hint="Send statements in UTF-8 (client_encoding = UTF8).")
        if self.body_ddl and s.bscan.status == m.TX_IDLE and s.in_flight() <= 0:
            # the body's DDL is committed (or rolled back): judge on a view map read
            # after that, once (still being read: writes stay refused, _after_body_ddl)
            if self.body_ddl is True:
                self.body_ddl = "reading"
                s.services.catalog_committed(s.database)
            if s.services.views_fresh(s.database):
                self.body_ddl = False
            elif self._views_wait is not msg:
                self._views_wait = msg
                self.pending_bodies = ()
                return BODIES_PENDING
        try:
            args = (sql, s.identity_name, s.identity, s.database, s.prepared)
            kw = {"views": s.views.current() if s.views is not None else None,
                  "functions": self._bodies()}
            if len(raw) <= DECIDE_INLINE:
                d = s.policy.decide(*args, **kw)
            else:
                done, self._big_done = self._big_done, None
                if done is None:
                    self._big_wait = (msg, args, kw)    # judged on a thread first
                    self.pending_bodies = ()
                    return BODIES_PENDING
                if done[0] == msg:
                    d = done[1]
                    if isinstance(d, BaseException):
                        raise d
                else:       # not the text judged apart: here, never another round
                    d = s.policy.decide(*args, **kw)
        except BodiesPending as e:      # a called function's body is read first
            self.pending_bodies = e.names
            return BODIES_PENDING
        if s.prepared is not None and d.statements and _touches_prepared(d):
            # what a PREPARE may make its name mean, whatever becomes of it (refused,
            # held for approval, failed upstream): names are judged by the union
            s.prepared.observe(d.statements)
        if self._views_wait is not msg and not s.services.views_fresh(s.database) and \
                any(self.is_user_function(f) for st in d.statements for f in st.functions):
            # what a called body writes is resolved through the view map, and the map
            # is being read again (DDL went by): wait for it (once for this message)
            self._views_wait = msg
            self.pending_bodies = ()
            return BODIES_PENDING
        if d.action != "block" and s.masking is not None and self._masks_wait is not msg \
                and (s.masking.catalog_behind() or (
                    not _reads_only(d) and s.masking.masks_apply() and any(
                        st.relations_read or st.functions for st in d.statements))):
            # what may park masked values is judged on the catalog of now (DDL went by:
            # a table may have become a masked table's parent); a statement that writes,
            # on names checked against the catalog's fingerprint first (a DBA may have
            # renamed a masked column or its table directly upstream: INSERT INTO zc
            # SELECT replace(social, '-', '') ..., red team 23)
            self._masks_wait = msg
            s.masking.verify_next()
            self.pending_bodies = ()
            return BODIES_PENDING
        if s.readonly and d.action in ("allow", "approve") and not _reads_only(d):
            # (a write that would wait for a human is refused at once: approved, the
            # read-only session would refuse it anyway)
            d = _readonly_refusal(d)
        if d.action != "block" and s.guard is not None and any(
                st.kind in _LATER_KINDS for st in d.statements) and \
                self.unmeasurable(d):
            # a cursor's query runs at each FETCH/MOVE (or at COMMIT, WITH HOLD), a
            # COPY's streams out: neither is a statement the guard can measure
            d = unguarded_refusal(d, "DECLARE ... CURSOR" if any(
                st.kind == "declare" for st in d.statements) else "COPY (query) TO")
        if d.action != "block" and s.guard is not None and s.views is not None and any(
                st.kind == "copy" and st.relations_written for st in d.statements):
            hidden = s.views.current().hidden
            if any(t in hidden for st in d.statements for t in st.relations_written):
                # COPY FROM streams rows in: a trigger or rule of its table changes
                # other rows where the guard cannot measure them
                d = unguarded_refusal(d, "COPY FROM into a table with triggers or rules")
        if d.action != "block" and s.guard is not None and s.views is not None:
            remote = s.views.current().foreign
            if remote and any(t in remote for st in d.statements
                              for t in st.relations_written):
                plan = self._plan(d)
                if plan is not None and not plan.by_tag:
                    # measured by this backend's tuple counters, which never see rows
                    # changed in another server
                    d = unguarded_refusal(d, "writing a foreign table (its rows change in "
                                             "another server)")
        if d.action != "block" and s.guard is not None and s.views is not None:
            views = s.views.current()
            if views.deferred:
                d = _deferred_refusal(d, views, self._plan(d))
        if d.action != "block" and s.guard is not None:
            plan = self._plan(d)
            if plan is not None and len(plan.tables) > MAX_TABLES:
                d = _too_many_tables_refusal(d, plan.tables)
            elif plan is not None and not plan.by_tag:
                d = _uncounting_refusal(d)
        if s.pinned_role and _changes_role(d):     # whatever the policy said
            d = _pinned_refusal(d)
        if d.action != "block" and s.identity is not None and s.identity.kind == "agent" \
                and any("create" in st.kinds and _FUNCTION_CREATE.search(st.text)
                        for st in d.statements):
            taken = [n for n in created_functions(d.statements)
                     if s.services.function_name_taken(s.database, n)]
            if taken and self._fnames_wait is not msg:
                # the names may be older than a DROP (or a rolled-back CREATE): read them
                # again, then decide (once for this message)
                self._fnames_wait = msg
                self.pending_bodies = ()
                return BODIES_PENDING
            if taken:
                d = _overload_refusal(d, taken[0])
        agent = s.identity is not None and s.identity.kind == "agent"
        # writes to names the catalog does not know (read once: the check below, and
        # such a decision is never kept)
        unknown = _unknown_writes(s, d, self.temp_names) if agent and \
            d.action != "block" else []
        if unknown and (len(d.statements) > 1 or s.in_flight() > 0
                        or s.fscan.before_unsynced
                        or any(_body_writes(st) for st in d.statements)):
            # judged now, run later (after a slow statement before it): Postgres finds
            # the names it writes then, and another session may have made one a view
            # over a guarded table meanwhile (SELECT pg_sleep(4); DELETE FROM w50)
            if self._fnames_wait is not msg:
                self._fnames_wait = msg         # read the names again first
                self.pending_bodies = ()
                return BODIES_PENDING
            return _unknown_write_refusal(d, unknown[0])
        if d.action != "block" and s.identity is not None and s.identity.kind == "agent":
            roles = [n for st in d.statements for n in st.schemas_created
                     if s.services.role_name(n)]
            if roles:
                d = _role_schema_refusal(d, roles[0])
        if d.action != "block" and s.masking is not None:
            d = parking.judge(s, d, sql)     # no parking of masked values
        if d.action != "block" and s.identity is not None and s.identity.kind == "agent":
            refused = self._after_body_ddl(d)
            if refused is not None:
                return refused              # (not kept: it holds until a commit)
        if d.action != "block" and s.views is not None:
            self._catalog_effects(d, msg)
        if d.rule == "function-body" or self.body_ddl or unknown:
            # (a write to a name the catalog does not know is judged again each time:
            # sent later behind a slow statement, it must meet the check above)
            pass                        # the catalog could not be read: not kept
        elif s.guard is None or d.action != "allow" or self._plan(d) is None:
            s.services.remember_decision(self.cache, msg, key, d)
        else:
            # guarded statements never take the compiled fast path (its test is
            # action == "allow"), but their decision is not made again each time
            s.services.remember_decision(self.cache, msg, key, Guarded(d))
        return d


    def _after_body_ddl(self, d):
        """A refusal of ``d`` when it writes rows after DDL ran inside a function body or
        DO block in the same transaction (or earlier in the same Query): what the names
        it writes mean (a view over orders made by the body) is invisible to every
        catalog read until that transaction commits. None: ``d`` goes on."""
        seen = bool(self.body_ddl)
        for st in d.statements:
            if seen and (st.relations_written or _WRITING_KINDS.intersection(st.kinds)):
                return _body_ddl_refusal(d, st)
            if _body_ddl(st):
                seen = True
        return None

    def _bodies(self) -> Bodies:
        """How this session's decisions see into the user functions they call."""
        s = self.s
        services = s.services
        db = s.database
        fb = self._fb
        if fb is None or fb.strict_missing != self.function_ddl:
            fb = self._fb = Bodies(self.is_user_function,
                                   lambda name: services.function_judgement(db, name),
                                   self.own_bodies, self.function_ddl,
                                   lambda name: services.builtin_function_name(db, name))
        return fb

    def unmeasurable(self, d) -> bool:
        """Whether ``d``, run where the blast-radius guard cannot measure it (a cursor,
        a COPY, a FunctionCall), may change rows: it changes rows itself or in a body
        pgguard reads, or it calls code pgguard cannot read (another language, a body
        not read) — what the guard would have measured."""
        if self._plan(d) is None:
            return False
        if any(st.changes_rows for st in d.statements):
            return True
        s = self.s
        todo = [f for st in d.statements for f in st.functions if self.is_user_function(f)]
        seen: set[str] = set()
        while todo:
            f = todo.pop()
            if f in seen:
                continue
            seen.add(f)
            j = s.services.function_judgement(s.database, f)
            if j is None or j.error or j.other_languages or j.body is None or \
                    j.body.changes_rows or len(seen) > 64:
                return True
            todo.extend(n for n in j.nested if self.is_user_function(n))
        return False

    def is_user_function(self, name: str) -> bool:
        """Whether a called name may run code pgguard cannot see into: the server's
        test (not a built-in of pg_catalog by the names last read), or a name this
        session created itself (`CREATE FUNCTION upper(int)` shadows a built-in's name
        before any catalog read could show it)."""
        s = self.s
        if s.services.user_function_test(s.database)(name):
            return True
        return bool(self.own_bodies) and name.rpartition(".")[2] in self.own_bodies

    def _bind_again(self, stale: tuple, msg: bytes, out: list, later: list) -> bool:
        """A Bind of a statement prepared under an older decision generation (a view
        or a function body it runs may mean something else now): judge its text again.
        True: go on with the Bind (under the new plan). False: it was refused, or it
        waits for function bodies to be read (then it is taken up again)."""
        name, plan = stale
        return self._judge_again(name, [plan.sql], msg, out, later,
                                 "what the prepared statement runs changed since it was "
                                 "prepared")

    def _judge_again(self, name: bytes, texts: list, msg: bytes, out: list, later: list,
                     why: str) -> bool:
        """Judge a prepared statement's texts again at its Bind ``msg`` (the one it was
        last prepared as, and those it may still be: see stmt_alts). True: every one is
        allowed (the guard has a plan for whichever runs). False: one is refused (the
        Bind fails, saying ``why``), or it waits for function bodies or a catalog read
        (then it is taken up again)."""
        s = self.s
        plans = []
        for sql in texts:
            # the same message object each time this text is judged again: what
            # decide() waited for (the view map, the mask catalog) is known by it
            q = self._rebind_qs.get(sql)
            if q is None:
                if len(self._rebind_qs) >= 2 * STMT_ALTS_KEPT:
                    self._rebind_qs.clear()
                q = self._rebind_qs[sql] = b"Q" + struct.pack("!I", len(sql) + 5) + sql + \
                    b"\0"
            d = self.decide(q, 5, len(q) - 1)
            if d is BODIES_PENDING:
                self.bodies_wait(msg, out, q)
                return False
            if d.action != "allow":
                self.refuse_any(Decision(
                    action="block", rule=d.rule, statements=d.statements,
                    message=d.message + f" (judged again at Bind: {why})",
                    detail=d.detail, hint=(d.hint + " " if d.hint else "") +
                    "Prepare the statement again to be judged (and approved) afresh."),
                    out, True, sql, ahead=sync_points(later))
                return False
            plans.append(self._plan(d, sql))
        if s.guard is not None:
            s.guard.on_parse(name, either_plan(plans), again=True)
            self.guard_watch()
        return True

    def bodies_wait(self, msg: bytes, out: list, judged: bytes | None = None) -> None:
        """decide() returned BODIES_PENDING for ``msg`` (a Query, Parse or
        FunctionCall; or for ``judged``, the text a Bind's statement is judged again
        as): hold the stream (what came before goes on), read the bodies, then take
        the message up again."""
        s = self.s
        names = list(self.pending_bodies)
        s.holds.begin(out, [])
        s.holds.side_task(self._bodies_then(msg, names, msg if judged is None else judged))

    async def _bodies_then(self, msg: bytes, names: list, judged: bytes) -> None:
        s = self.s
        try:
            if names:
                await s.services.load_function_bodies(s.database, names)
            if self._views_wait is judged:
                await s.services.ready_views(s.database)
            if self._masks_wait is judged:
                await s.masking.catch_up()
            if self._fnames_wait is judged:
                await s.services.reload_function_names(s.database)
            big = self._big_wait
            if big is not None:         # (a FunctionCall's text is rendered again: equal)
                self._big_wait = None
                self._big_done = (big[0], await asyncio.to_thread(self._decide_apart, big))
        except asyncio.CancelledError:
            raise
        except Exception as e:      # noqa: BLE001 - the judgement refuses it (fail closed)
            log.warning("session %s: reading function bodies failed: %s", s.id, e)
        s.holds.side_task_done()
        if s.closed:
            return
        s.holds.put_back([(msg[0], msg)])
        s.holds.release([])

    def _decide_apart(self, big: tuple):
        """The policy's decision of a long text, on a worker thread (the event loop goes
        on meanwhile): the decision, or the exception it raised (given to decide())."""
        _, args, kw = big
        try:
            return self.s.policy.decide(*args, **kw)
        except Exception as e:  # noqa: BLE001 - handed back to decide() on the loop
            return e

    def _learn_functions(self, d) -> None:
        """Function DDL let through: what this session's own calls run may differ
        from what the catalog shows until its transaction commits."""
        s = self.s
        if not any(_FUNCTION_DDL.search(st.text) for st in d.statements):
            return
        own = own_definitions(d.statements)
        if len(self.own_bodies) + len(own) > OWN_BODIES_MAX:
            self.own_bodies.clear()
        self.own_bodies.update(own)
        if own:
            s.services.note_functions(s.database, own)     # every session, at once
        if not self.function_ddl or own:
            self.function_ddl = True
            # decisions differ from the peers' now: decide again, in a cache of its own
            self.own_cache = True
            self.cache = ({}, {})
            s.decide_through(self.cache)

    def _catalog_effects(self, d, msg: bytes) -> None:
        """DDL let through: the catalog caches are stale; views it creates count for
        this session's next statements at once (and for other sessions when not
        temporary). Such decisions are never cached, so each one gets here.

        Once per message: a statement decided again before it goes upstream (after a
        wait for its lineage, the function bodies or the catalog) made the caches
        stale already, and making them stale again would send it to wait once more,
        for ever (a call of a function whose body runs DDL never got an answer)."""
        s = self.s
        if all(CATALOG_KINDS.isdisjoint(st.kinds) for st in d.statements):
            return
        if self._effects_of is not None and self._effects_of == msg:
            return
        self._effects_of = msg
        for st in d.statements:
            if st.kind == "create":
                self.temp_names.update(r[8:] for r in st.relations_written
                                       if r.startswith("pg_temp."))
        if len(self.temp_names) > 10_000:
            self.temp_names.clear()
        if any(_body_ddl(st) for st in d.statements):
            self.body_ddl = True
            # decided again from now on (no cached decision skips _after_body_ddl)
            self.own_cache = True
            self.cache = ({}, {})
            s.decide_through(self.cache)
        s.services.catalog_changed(s.database)
        if s.tracker is not None:
            s.tracker.note_ddl()        # read the catalog again once it is committed
        if s.masking is not None:
            s.masking.ddl_sent()
        self._learn_functions(d)
        if s.views.learn(d.statements):
            # this session's view knowledge differs from its peers' (and from what its
            # cached decisions saw): decide again, in a cache of its own
            self.own_cache = True
            self.cache = ({}, {})
            s.decide_through(self.cache)

    def run_granted(self, msg: bytes, d, approved, bound=None) -> bool:
        """A Query an approval window let through without a human seeing its values:
        True when it changes rows under a row limit, and is then taken up again (the
        caller puts it back in the stream) to run under the blast-radius guard like an
        allowed statement, recorded as approved."""
        if self.s.guard is None or self._plan(d, msg[5:-1]) is None:
            return False
        self.granted = (msg, approved, d, True, bound)
        return True

    def run_approved(self, msg: bytes, d, approved) -> None:
        """A Query a human approved, in a masked session: the caller puts it back in the
        stream, where it takes an allowed statement's way (its lineage learnt, its
        answers paired with its own plan, COPY columns, the strict record), recorded as
        approved, with no row limit (the human saw its values). (Forwarded as it was,
        its answers took the plan of the statement behind it: red team 24, clear SSNs.)"""
        self.granted = (msg, approved, d, False, None)

    @staticmethod
    def _parse_parts(msg: bytes) -> tuple[int, int, tuple]:
        pos = msg.index(b"\0", 5) + 1
        end = msg.index(b"\0", pos)
        return pos, end, m.parse_param_oids(msg, end + 1)

    async def learn_approved_parse(self, msg: bytes, d) -> None:
        """The lineage of a Parse a human approved, in a masked session (before
        :meth:`mask_approved_parse`)."""
        s = self.s
        if s.masking is None or any(st.kind == "copy" for st in d.statements):
            return
        pos, end, oids = self._parse_parts(msg)
        if s.masking.lineage_now(msg[pos:end], d, oids) is PENDING:
            await s.masking.lineage_load(msg[pos:end], d, oids)

    def mask_approved_parse(self, msg: bytes, d, out: list, ahead: int) -> bool:
        """A Parse a human approved goes upstream (appended to ``out``) with its masking
        plan, as an allowed one does (forwarded as it was, its Binds' rows were masked
        as of an unknown statement); False: refused instead (its row count shaped by
        masked data), the refusal in ``out`` (``ahead``: as for inject_refusal)."""
        s = self.s
        if s.masking is None or any(st.kind == "copy" for st in d.statements):
            out.append(msg)
            return True
        pos, end, oids = self._parse_parts(msg)
        lin = s.masking.lineage_now(msg[pos:end], d, oids)
        if lin is not None and lin is not PENDING and lin.refused:
            self.refuse_any(_shaped_refusal(lin.refused, d), out, True, msg[pos:end],
                            ahead=ahead)
            return False
        out.append(msg)
        out.append(s.masking.frontend(m.PARSE, msg, _reads_masked(s, d, True),
                                      None if lin is PENDING else lin, d))
        return True

    def _granted_again(self, granted, msg: bytes) -> None:
        # a granted Query waits (its lineage, its COPY's columns) and comes back: it
        # comes back granted, not to be decided (and asked for) again
        if granted is not None and granted[0] is msg:
            self.granted = granted

    def forget_decisions(self) -> None:
        """Empty this session's own decision cache (its view map changed)."""
        if self.own_cache:
            self.cache[0].clear()
            self.cache[1].clear()

    def _on_query(self, msg: bytes, out: list, later: list = ()) -> None:
        s = self.s
        granted = self.granted
        record = None                   # what the audit names as the decision
        guarded, bound = True, None
        if granted is not None and granted[0] is msg:
            self.granted = None
            record = granted[1]
            d = msgspec.structs.replace(granted[2], action="allow")
            guarded, bound = granted[3], granted[4]
        else:
            d = self.decide(msg, 5, len(msg) - 1) if s.policy is not None else None
        if d is BODIES_PENDING:
            self.bodies_wait(msg, out)
            return
        if d is None or d.action == "allow":
            if s.masking is not None and self._lineage_wait(d, msg, 5, len(msg) - 1, (),
                                                               out):
                self._granted_again(granted, msg)
                return
            if s.masking is not None and d is not None and len(d.statements) > 1 \
                    and _reads_masked(s, d):
                # several statements: the cells of all are masked as a whole, but how
                # many rows each returns is its own (SELECT 1; SELECT 1 FROM customers
                # c, generate_series(1, ascii(c.ssn)) returned the code as a count)
                subs = [(st.text.encode(), _One(st)) for st in d.statements]
                if self._lineages_wait(msg, subs, out):
                    self._granted_again(granted, msg)
                    return
                why = next((w for w in (_shaped_by_masked(s, q, one, ()) for q, one in subs)
                            if w), "")
            else:
                why = _shaped_by_masked(s, msg[5:-1], d, ())
            if why:
                self.inject_refusal(_shaped_refusal(why, d), out, extended=False,
                                     sql=msg[5:-1])
                return
            plan = None
            if s.guard is not None and guarded:
                if d is not None and s.guard.portal_ghosts and _rolls_back(d):
                    s.guard.revive()
                s.guard.on_query()
                plan = self._plan(d, msg[5:-1])
                if plan is not None and bound is not None:
                    plan = plan.bounded(*bound)     # a window: its approved run's rows
                if plan is not None and len(d.statements) > 1 and has_txn_control(d):
                    self.inject_refusal(_mixed_txn_refusal(d), out, extended=False,
                                         sql=msg[5:-1])
                    return
                inside = _prepares_inside(d)
                if inside or _fetches_guarded(s.guard, d, msg[5:-1]):
                    self.inject_refusal(unguarded_refusal(
                        d, "PREPARE inside a DO block or function" if inside else
                        "FETCH or MOVE"), out, extended=False, sql=msg[5:-1])
                    return
                if plan is not None:
                    _sql_prepares(s.guard, d, plan)
                if plan is not None and s.fscan.query_unsynced:
                    # an Execute sent before it with no Sync runs first, and may have
                    # ended or begun the transaction: the guard cannot know where it
                    # would run the statement
                    self.inject_refusal(_unsynced_refusal(d), out, extended=False,
                                         sql=msg[5:-1])
                    return
            if s.masking is not None and not self._mask_query(d, msg, out):
                if s.holds.approval is not None:    # its COPY's columns are learnt first
                    self._granted_again(granted, msg)
                return
            if plan is None:
                out.append(msg)
            s.services.count_statement("allowed" if record is None else "approved")
            if s.tracker is not None:
                s.tracker.flog.append((msg, d if record is None else record,
                                       time.monotonic_ns()))
            if plan is not None:
                s.guard.start_query(msg, plan, out, list(later))
                self.guard_watch()
            if d is not None and s.prepared is not None and d.statements \
                    and _touches_prepared(d):
                s.prepared.observe(d.statements)
                self.deallocated(d)
            return
        if d.action == "approve":
            s.holds.for_approval(d, msg, out, extended=False, sql=msg[5:-1])
            return
        # the client's Query is replaced by one that fails upstream: same Z count
        self.inject_refusal(d, out, extended=False, sql=msg[5:-1])


    def query_lane(self, msg: bytes, g: Guarded, key) -> bool:
        """The compiled pipe's Query ``msg`` whose cached decision ``g`` the guard runs
        (found by the text's shape ``key``, or by the text when None), last in its
        chunk with everything before it written: when it can go down the
        guard's in-block lane now (what _on_query then start_query would do with it:
        a block open, nothing unanswered, a single statement its tag counts), run it
        there and return True. False: nothing was done; the hooks get it as usual.
        (It runs per guarded statement: what depends on the decision alone is kept
        per decision, see _lane_entry.)"""
        s = self.s
        guard = s.guard
        exact, shapes = self.cache
        if guard is None or s.masking is not None or self.discarding or \
                self.granted is not None or s.holds.held is not None or \
                (exact.get(msg) is not g if key is None else shapes.get(key) is not g):
            return False
        d = g.decision
        # (_pg_rejects of a Query: its one string must end exactly at the message's end)
        if d.action != "allow" or len(d.statements) != 1 or s.fscan.query_unsynced or \
                msg.find(b"\0", 5) != len(msg) - 1:
            return False
        got = self._lane_entry(d, msg)
        plan = got[3]
        if plan is None or not plan.by_tag or not guard._lane_free() or \
                self.visible_status() != m.TX_IN_BLOCK or \
                s.fscan.count + self.sync_adjust - self.visible_z() != 1:
            return False
        guard.on_query()
        self.lane_allowed += 1          # (the metrics take it with the fast path's)
        if s.tracker is not None:     # (with the shape, as the compiled pipe logs it)
            s.tracker.flog.append((msg, d, time.monotonic_ns()) if key is None else
                                  (msg, d, time.monotonic_ns(), key))
        guard.query_on_lane(msg, plan, got[4])
        if guard.watching != self._guarding:
            self.guard_watch()
        if got[5]:                      # PREPARE / DEALLOCATE / DISCARD
            s.prepared.observe(d.statements)
        return True

    def _lane_entry(self, d, msg: bytes) -> tuple:
        """(d, generation, view map, plan, lane limit, touches prepared statements) of
        decision ``d``, kept while the decision generation and the view map stay as
        they are. The plan's text is the first statement's that made it: the lane
        gives the running one's to a refusal (Guard.lane_fallback)."""
        s = self.s
        gen = s.services.decision_generation(s.database)
        views = s.views.current() if s.views is not None else None
        got = self._plans.get(id(d))
        if got is None or got[0] is not d or got[1] != gen or got[2] is not views:
            if len(self._plans) >= 64:
                self._plans.clear()
            plan = self._plan(d, msg[5:-1])
            got = (d, gen, views, plan, plan.lane_limit() if plan is not None else 0,
                   s.prepared is not None and _touches_prepared(d))
            self._plans[id(d)] = got
        return got

    def _mask_query(self, d, msg: bytes, out: list) -> bool:
        """Bookkeeping for a Query about to run under masking; False when it is refused
        instead (a COPY of masked data pgguard cannot mask) or held while pgguard learns
        the columns of a COPY (query)."""
        s = self.s
        mask = s.masking
        reads = _reads_masked(s, d)
        lin = mask.lineage_now(msg[5:-1], d)
        rows_reads = reads or _rows_unseen(d)
        if d is not None and any(st.kind == "copy" for st in d.statements):
            specs = _copy_specs(mask, msg[5:-1].decode("utf-8", "replace"), reads)
            if isinstance(specs, str):
                self.inject_refusal(_copy_refusal(specs, d), out, extended=False,
                                     sql=msg[5:-1])
                return False
            if any(sp[0] == "query" for sp in specs):
                # COPY (query): its columns are learnt first (side connection), then the
                # Query is taken up again and goes the way of every other (recorded,
                # counted, written first in strict mode)
                got, self._copy_planned = self._copy_planned, None
                if got is None or got[0] is not msg:
                    s.holds.begin(out, [])
                    s.holds.side_task(self._copy_plan_then(msg, specs))
                    return False
                if isinstance(got[1], str):
                    self.inject_refusal(Decision(
                        action="block", rule="masking",
                        message='pgguard: statement refused by rule "masking": pgguard '
                                "could not work out which columns of this COPY (query) to "
                                "mask",
                        detail=got[1], hint="Use SELECT instead."), out, extended=False,
                        sql=msg[5:-1])
                    return False
                specs = got[1]
            mask.frontend(m.QUERY, msg, rows_reads, None if lin is PENDING else lin)
            mask.query_copies(specs)
            mask.owe_ready()
            return True
        if d is not None and any(st.kind in ("create", "alter", "drop")
                                 for st in d.statements):
            s.services.catalog_changed(s.database)
            mask.ddl_sent()
            mask.forget_lineage()
        mask.frontend(m.QUERY, msg, rows_reads, None if lin is PENDING else lin, d)
        mask.owe_ready()
        return True

    async def _copy_plan_then(self, msg: bytes, specs: list) -> None:
        # the columns of each COPY (query) of a Query, then the Query again (_mask_query)
        s = self.s
        mask = s.masking
        got: list | str = specs
        try:
            for i, sp in enumerate(specs):
                if sp[0] == "query":
                    _, query, fmt, opts = sp
                    desc = await s.services.side.describe(
                        s.database, f"SELECT * FROM ({query}) AS pgguard_copy LIMIT 0")
                    await mask.lineage_load(query.encode(), None)
                    specs[i] = mask.copy_query_spec(desc, fmt, opts, query)
        except Exception as e:      # noqa: BLE001 - cannot plan it: refuse, never leak
            got = str(e)[:300] or e.__class__.__name__
        s.holds.side_task_done()
        if s.closed:
            return
        self._copy_planned = (msg, got)
        s.holds.put_back([(msg[0], msg)])
        s.holds.release([])

    def _mask_parse_copy(self, d, msg: bytes, name: bytes, sql: bytes, out: list) -> bool:
        """A COPY prepared through Parse: its plan is kept by statement name for every
        Bind/Execute of it; False when it is refused instead."""
        s = self.s
        mask = s.masking
        reads = _reads_masked(s, d)
        specs = _copy_specs(mask, sql.decode("utf-8", "replace"), reads)
        if isinstance(specs, str):
            self.refuse_any(_copy_refusal(specs, d), out, True, sql)
            return False
        if specs and specs[0][0] == "query":
            # COPY (query): the stream waits while pgguard learns its columns
            s.holds.for_copy_parse(msg, out, name, specs[0], reads, d)
            return True
        out.append(msg)
        out.append(mask.frontend(m.PARSE, msg, _reads_masked(s, d, True)))
        mask.parsed_copy(specs[0] if specs else None)
        return True

    def _lineage_wait(self, d, msg: bytes, start: int, end: int, oids: tuple,
                      out: list) -> bool:
        """Masking needs the planner's lineage of a statement it has not seen: hold the
        stream (what came before goes on) until it is known, then take the message up
        again. False when it is known already (or not needed)."""
        s = self.s
        if s.masking.lineage_now(msg[start:end], d, oids) is not PENDING:
            return False
        s.holds.begin(out, [])
        s.holds.side_task(self._lineage_then(d, msg, start, end, oids))
        return True

    async def _lineage_then(self, d, msg: bytes, start: int, end: int, oids: tuple) -> None:
        s = self.s
        await s.masking.lineage_load(msg[start:end], d, oids)
        s.holds.side_task_done()
        if s.closed:
            return
        s.holds.put_back([(msg[0], msg)])
        s.holds.release([])

    def _lineages_wait(self, msg: bytes, subs: list, out: list) -> bool:
        """``_lineage_wait`` for each statement of a Query holding several."""
        s = self.s
        todo = [(q, one) for q, one in subs if s.masking.lineage_now(q, one) is PENDING]
        if not todo:
            return False
        s.holds.begin(out, [])
        s.holds.side_task(self._lineages_then(msg, todo))
        return True

    async def _lineages_then(self, msg: bytes, todo: list) -> None:
        s = self.s
        for q, one in todo:
            await s.masking.lineage_load(q, one)
        s.holds.side_task_done()
        if s.closed:
            return
        s.holds.put_back([(msg[0], msg)])
        s.holds.release([])

    def _on_parse(self, msg: bytes, out: list) -> None:
        s = self.s
        try:
            name, pos = m.parse_cstr(msg, 5)
            end = msg.index(b"\0", pos)
        except ValueError:
            s.fail(ProtocolViolation("invalid Parse message"))
            return
        d = self.decide(msg, pos, end) if s.policy is not None else None
        if d is BODIES_PENDING:
            self.bodies_wait(msg, out)
            return
        if d is not None and d.action == "allow" and s.guard is not None:
            if _prepares_inside(d):
                d = unguarded_refusal(d, "PREPARE inside a DO block or function")
            elif _fetches_guarded(s.guard, d, msg[pos:end]):
                d = unguarded_refusal(d, "FETCH or MOVE")
        if d is None or d.action == "allow":
            lin = None
            if s.masking is not None and d is not None and any(
                    st.kind == "copy" for st in d.statements):
                # a COPY: its plan is the COPY's spec (no lineage of its own)
                if not self._mask_parse_copy(d, msg, name.encode() if isinstance(name, str)
                                             else name, msg[pos:end], out):
                    return
            else:
                if s.masking is not None:
                    oids = m.parse_param_oids(msg, end + 1)
                    if self._lineage_wait(d, msg, pos, end, oids, out):
                        return
                    lin = s.masking.lineage_now(msg[pos:end], d, oids)
                    if lin is not None and lin is not PENDING and lin.refused:
                        self.refuse_any(_shaped_refusal(lin.refused, d), out, True,
                                        msg[pos:end])
                        return
                out.append(msg)
                if s.masking is not None:
                    out.append(s.masking.frontend(m.PARSE, msg, _reads_masked(s, d, True),
                                                  lin, d))
            if s.tracker is not None:
                s.tracker.flog.append((msg, d, 0))
            self.parsed(name.encode() if isinstance(name, str) else name, msg[pos:end], msg)
            if name and d is not None and s.prepared is not None and d.statements:
                s.prepared.record(name, d.statements[0])
            if s.guard is not None:
                bname = name.encode() if isinstance(name, str) else name
                first = not s.fscan.before_unsynced
                plan = self._plan(d, msg[pos:end])
                if d is not None:
                    rolls = _rolls_back(d)
                    if rolls and s.guard.portal_ghosts:
                        s.guard.revive()
                    s.guard.on_rollback_parse(bname, rolls, first)
                    if plan is not None:
                        _sql_prepares(s.guard, d, plan)
                s.guard.on_parse(bname, plan, first=first)
                self.guard_watch()
            return
        if d.action == "approve":
            s.holds.for_approval(d, msg, out, extended=True, sql=msg[pos:end], name=name)
            return
        self.refuse_any(d, out, True, msg[pos:end])


    def refuse_any(self, d, out: list, extended: bool, sql: bytes, **kw) -> None:
        s = self.s
        if extended:
            self.sync_adjust += 1
            self.inject_refusal(d, out, extended=True, sql=sql, **kw)
            self.discarding = True
            s.fscan.set_interest(ALL_TYPES, True)
            self.fast_path(False)       # each message to client_items until Sync
        else:
            self.inject_refusal(d, out, extended=False, sql=sql, **kw)


    def inject_refusal(self, d, out: list, extended: bool, sql: bytes = b"",
                        outcome: str = "blocked", approver: str | None = None,
                        sqlstate: str = "42501", ahead: int = 0) -> None:
        """Send a statement that fails in place of a refused one. ``ahead``: sync
        points the scan has already counted past the refused message (a Bind is not
        a stop of the scan: what follows it in its batch is counted)."""
        s = self.s
        log.info("session %s: %s refused by rule %s", s.id, s.identity_name, d.rule)
        if d.rule == "parse-error" and sqlstate == "42501":
            sqlstate = "42601"          # a syntax error, as Postgres says it (P: where)
        out.append(_refusal_query(d))
        if s.masking is not None:
            s.masking.owe_ready()
        s.services.count_statement(outcome)
        if s.tracker is not None:
            rec = statement_record(s, sql, d, outcome, _now())
            rec.approver = approver
            rec.sqlstate = sqlstate
            rec.error = d.message
            s.services.audit.log(rec)
            s.tracker.flog.append((REFUSAL_SYNC, None, 0))
        # its Query's place among the sync points sent upstream, those Postgres will
        # skip counted too: which earlier ones it skips (after an error earlier in their
        # pipeline) is known only from its answers, by the ReadyForQuery that ends them
        target = s.fscan.count - ahead + self._sync_adjust
        self.refusals.append([target, d, extended, False, sqlstate])
        if self._readies is None and s.answers is not None:
            self._readies = s.answers.listen()
            self._skipped = s.answers.skipped
        self._divert_backend(True)


    def _divert_backend(self, on: bool) -> None:
        s = self.s
        pipe, scan = s.up_pipe, s.bscan
        if on:
            if pipe.divert:
                return
            self.z_count = scan.count
            if self._readies is not None and (s.masking is None or s.masking.held is None):
                self._readies.clear()   # (the ReadyForQuery messages forwarded so far)
            scan.set_interest(ALL_TYPES, True)
            scan.set_withhold(True)
            pipe.divert = True
        elif s.masking is not None:
            if scan.at_boundary:
                scan.set_interest(ALL_TYPES, False)
                scan.set_interest(MASK_BACKEND, True)
        elif pipe.divert and scan.set_withhold(False):
            scan.set_interest(ALL_TYPES, False)
            if s.tracker is not None:
                scan.set_interest(b"CEIsZ", True)
            if s.pinned is not None:
                scan.set_interest(b"S", True)       # reported settings (Session.pinned)
            pipe.divert = False


    def plan_of(self, d, sql: bytes = b""):
        """The blast-radius plan of decision ``d`` (None: not guarded)."""
        return self._plan(d, sql)

    def _plan(self, d, sql: bytes = b""):
        """The blast-radius guard's plan for decision ``d`` of this session (None: not
        guarded)."""
        s = self.s
        if d is None:
            return None
        cfg = s.services.cfg.policy
        default = cfg.agents_max_rows if s.identity.kind == "agent" else \
            cfg.humans_max_rows
        return plan_for(d, s.identity, sql, default, self.is_user_function,
                        s.services.decision_generation(s.database),
                        s.views.current().hidden if s.views is not None else frozenset())

    def _routed(self, items: list):
        """The backend items after the blast-radius guard took its own answers out
        (one at a time: a guard step may release held client messages, which read the
        ReadyForQuery count as of that item)."""
        s = self.s
        guard = s.guard
        for it in items:
            if not guard.chain:
                yield it
                continue
            yield from guard.route(it)

    def _skipped_by(self, msg: bytes) -> int:
        """Queries and FunctionCalls Postgres skipped up to the ReadyForQuery ``msg``
        (the model's count then: it reads a whole backend chunk ahead)."""
        got = answer_for(self._readies, msg) if self._readies else None
        if got is not None:
            self._skipped = got[2]
        return self._skipped    # (one the model did not tell: as of the last it did)

    def divert_all(self) -> None:
        """Every backend message to backend_items (the guard reads them all)."""
        s = self.s
        pipe, scan = s.up_pipe, s.bscan
        if not pipe.divert:
            self.z_count = scan.count
        scan.set_interest(ALL_TYPES, True)
        scan.set_withhold(True)
        pipe.divert = True

    def visible_z(self) -> int:
        """ReadyForQuery messages the client has been sent (or is being sent)."""
        s = self.s
        if not s.up_pipe.divert:
            return s.bscan.count
        g = s.guard
        return self.z_count + (sum(1 for it in g.out if it.__class__ is tuple
                                   and it[0] == m.READY_FOR_QUERY) if g is not None else 0)

    def visible_status(self) -> int:
        """The transaction status of the last ReadyForQuery the client gets."""
        s = self.s
        g = s.guard
        if g is not None:
            for it in reversed(g.out):
                if it.__class__ is tuple and it[0] == m.READY_FOR_QUERY:
                    return it[1][5]
        return s.bscan.status

    def guard_watch(self) -> None:
        """Bind/Execute/Close/Sync reach Python while a guarded statement or portal
        exists (and no statement takes the compiled fast path meanwhile)."""
        s = self.s
        on = s.guard.watching
        if on == self._guarding:
            return
        self._guarding = on
        s.guard.segment_unseen()     # earlier messages of this segment went unseen
        self.watch = self._base_watch + (b"BECS" if on else b"")
        if not self.discarding:
            scan = s.fscan
            scan.set_interest(ALL_TYPES, False)
            scan.set_interest(self.watch, True)
            self.fast_path(True)        # guard mode while on (see fast_path)

    def count_readies(self, n: int) -> None:
        """ReadyForQuery messages forwarded outside Python (the masking lane)."""
        self.z_count += n

    def _backend_rest(self, rest: list, routed: bool) -> None:
        s = self.s
        if s.closed:
            return
        mask = s.masking
        self.backend_items(rest, routed)
        if len(rest) <= BACKEND_SLICE and not s.closed and (
                mask is None or mask.held is None):
            # (a mask catalog read the rows wait for resumes reading itself)
            s.up.transport.resume_reading()

    def _backend_items(self, items: list, routed: bool = False) -> None:
        """Diverted backend messages: rewrite our refusal errors, drop the extra
        ReadyForQuery a refused Parse leaves, forward the rest."""
        s = self.s
        out: list[bytes] = []
        refusals = self.refusals
        mask = s.masking
        guard = s.guard
        if mask is not None and mask.holding(items):
            return                      # rows wait for the mask catalog: keep order
        if len(items) > BACKEND_SLICE and (routed or guard is None or not guard.chain) \
                and not s.closed:
            # the answers of a long pipeline: the rest after the next turn of the loop,
            # the upstream unread meanwhile (nothing can come between them)
            rest = items[BACKEND_SLICE:]
            items = items[:BACKEND_SLICE]
            s.up.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._backend_rest, rest, routed)
        seq = iter(items if routed or guard is None or not guard.chain
                   else self._routed(items))
        for it in seq:
            if it.__class__ is bytes:
                if mask is not None:
                    it = mask.feed(0, it, False)
                out.append(it)
                continue
            t, msg = it
            if t == m.ROW_DESCRIPTION and mask is not None and mask.stale(msg):
                mask.hold_rows(out, [it, *seq])     # unknown table: read the catalog
                return
            if t == m.READY_FOR_QUERY:
                self.z_count += 1
                s.upstream_ready(msg[5])
                drop = False
                if refusals:
                    # the sync points upstream answered or skipped by this one
                    done = self.z_count + self._skipped_by(msg)
                    while refusals and refusals[0][0] <= done:
                        target, _, extended, _, _ = refusals.popleft()
                        if target < done:
                            # Postgres skipped our injected Query (an error earlier in
                            # its pipeline), as it skips the refused message
                            if s.tracker is not None:
                                s.tracker.refusal_ignored()
                        else:
                            # our injected Query's own, whatever its error said (in a
                            # failed transaction: 25P02, not our marker): a refused
                            # extended-protocol message gets none
                            drop = extended
                if s.tracker is not None:
                    s.tracker.on_backend(t, msg)
                if mask is not None and msg[5] == m.TX_IDLE and mask.ddl_committed():
                    # its DDL is committed (or rolled back)
                    s.services.catalog_changed(s.database)
                if mask is not None:
                    msg = mask.feed(t, msg, True)
                if not drop and msg is not None:
                    out.append(msg)
            elif t == m.ERROR_RESPONSE and refusals and _is_marker(msg):  # ours
                r = refusals[0]
                r[3] = True
                d = r[1]
                out.append(m.error_response(r[4], d.message, detail=d.detail or None,
                                            hint=d.hint or None,
                                            position=d.position if r[4] == "42601" else None))
            else:
                if t == m.PARAMETER_STATUS and s.tracker is None:
                    s.parameter_reported(msg)       # a pinned setting moved: it ends
                if s.tracker is not None and t in _TRACKED:
                    if t == m.ERROR_RESPONSE and mask is not None:
                        # recorded as the client gets it (the masking layer's pairing
                        # follows the tracker's: feed() after it, as before)
                        s.tracker.error_as_sent(mask.error_as_sent(msg))
                    s.tracker.on_backend(t, msg)    # (ParameterStatus: the same, first)
                if mask is not None:
                    msg = mask.feed(t, msg, True)
                if msg is not None:
                    out.append(msg)
        if out:
            s.client.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if not refusals and (guard is None or not guard.chain):
            self._divert_backend(False)
        if s.draining:
            s.backend_chunk()



# backend messages the statement tracker pairs with statements
_TRACKED = frozenset(b"CEIsZS")


_WRITE_FLAGS = frozenset({"write", "destructive", "privilege", "escape"})


_CHANGING_KINDS = frozenset({
    "insert", "update", "delete", "merge", "create", "alter", "drop", "truncate", "grant",
    "revoke", "comment", "security_label", "reassign", "refresh", "vacuum", "cluster",
    "reindex", "lock", "call", "do", "copy",
    # Postgres' read-only mode lets these through: a notification leaves the database,
    # ANALYZE rewrites the statistics
    "notify", "analyze"})


def _writing_call(st) -> str | None:
    """A built-in function the statement calls that changes state Postgres' read-only
    mode does not guard (large objects, notifications, transaction ids, locks)."""
    return next((f for f in st.functions if f.rsplit(".", 1)[-1] in WRITING_FUNCS), None)


_ROLE_KINDS = frozenset({"set", "reset", "discard"})


_UNSAFE = re.compile(r"[^A-Za-z0-9 _.,:;()=<>*/+\"-]")


def _pg_rejects(msg: bytes) -> bool:
    """True for a Query or Parse Postgres refuses before running anything: its fields
    read as postgres.c reads them (pq_getmsgstring: a NUL-terminated string;
    pq_getmsgint(2) parameter count and its 4-byte OIDs) do not end exactly at the
    message's end (pq_getmsgend)."""
    n = len(msg)
    first = msg.find(b"\0", 5)
    if msg[0] == m.QUERY:                            # one string, nothing after
        return first != n - 1
    if first < 0:                                   # Parse: name, text, count, OIDs
        return True
    second = msg.find(b"\0", first + 1)
    if second < 0 or second + 3 > n:
        return True
    return second + 3 + 4 * int.from_bytes(msg[second + 1:second + 3], "big") != n


def _reads_masked(session, d, rows: bool = False) -> bool:
    """Whether the statement reads a relation with masked columns (the classifier's
    view); ``rows``: or returns rows whose sources it cannot see."""
    names = session.masking.catalog.names
    return d is not None and any(r in names for st in d.statements
                                 for r in st.relations_read + st.relations_written) or (
        rows and _rows_unseen(d))


# statements whose result rows come from SQL the classifier does not see (a procedure's
# OUT parameters, a prepared statement run by name): their computed columns are masked
_UNSEEN_ROWS = frozenset({"call", "execute"})


def _rows_unseen(d) -> bool:
    return d is not None and (len(d.statements) > 1 or any(
        st.kind in _UNSEEN_ROWS for st in d.statements))


def _changes(st) -> bool:
    # writes, or turns read-only mode off (a setting read-only may not be turned off to,
    # or a setting whose name pgguard cannot read)
    return bool(_WRITE_FLAGS.intersection(st.flags) or _CHANGING_KINDS.intersection(st.kinds)
                or _writing_call(st) is not None
                or any(n == "*" or (n.endswith("transaction_read_only") and (
                    v is None or v.strip().lower() not in
                    ("on", "true", "yes", "1", "t", "tr", "tru", "y", "ye")))
                    for n, v in st.settings))


def _reads_only(d) -> bool:
    return not any(_changes(st) for st in d.statements)


def _changes_role(d) -> bool:
    # a role change pgguard can see, or SQL it cannot see into (EXECUTE 'SET ROLE ' || x
    # inside DO, a procedure): refused in a pinned-role session whatever the policy says
    return any("opaque" in st.flags
               or any(n in ("role", "session_authorization", "*") for n, _ in st.settings)
               or ("privilege" in st.flags and (_ROLE_KINDS.intersection(st.kinds) or any(
                   f.endswith("set_config") for f in st.functions)))
               for st in d.statements)


# (in a statement that creates something) a function, procedure or aggregate may be it
_FUNCTION_CREATE = re.compile(r"(?i)\b(function|procedure|aggregate)\b")


def _role_schema_refusal(d, name: str):
    return Decision(
        action="block", rule="no-destructive",
        message='pgguard: statement refused by rule "no-destructive": it creates schema '
                f"{name}, named like a role: first on that role's default search_path "
                '("$user", public), its tables and functions would take the place of '
                "public's in every session of the role",
        detail=f"CREATE SCHEMA {name}: role {name} exists upstream",
        hint="Give the schema a name no role has.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _overload_refusal(d, name: str):
    return Decision(
        action="block", rule="no-destructive",
        message='pgguard: statement refused by rule "no-destructive": it creates a '
                f"function named {name}, and a function of that name exists: an overload "
                "with closer argument types takes over other sessions' calls of it",
        detail=f"CREATE of {name}(...): every session that calls {name} with arguments "
               "the new one fits better (an int literal for a bigint parameter, text for "
               "VARIADIC \"any\") would run it instead, built-ins of pg_catalog included",
        hint="Give your function a name of its own.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _pinned_refusal(d):
    st = next((st for st in d.statements if "opaque" in st.flags), None)
    if st is not None:
        why = next((r.text for r in st.reasons if r.flag == "opaque"), "")
        return Decision(
            action="block", rule="pinned-role",
            message='pgguard: statement refused by rule "pinned-role": this session\'s '
                    "upstream role is set by pgguard, and pgguard cannot see whether this "
                    "statement changes it",
            detail=f"opaque: {why}" if why else "the statement runs SQL pgguard cannot see",
            hint="Send the SQL statements themselves rather than dynamic SQL or procedures.",
            statements=d.statements, verdicts=d.verdicts, index=d.index)
    return Decision(
        action="block", rule="pinned-role",
        message='pgguard: statement refused by rule "pinned-role": this session\'s '
                "upstream role is set by pgguard and cannot be changed",
        detail="SET ROLE, RESET ROLE, SET SESSION AUTHORIZATION, DISCARD ALL and "
               "set_config('role', ...) are refused in this session",
        hint="Connect as the identity whose role you need.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


# statements whose query runs later, or streams out, where the blast-radius guard
# cannot measure the rows it changes
_LATER_KINDS = frozenset({"declare", "copy"})


_WRITING_KINDS = frozenset({"insert", "update", "delete", "merge", "truncate", "copy"})
_ROW_KINDS = frozenset({"insert", "update", "delete", "merge", "copy"})


class _One:
    """A decision's statement on its own (lineage of one statement of several)."""
    __slots__ = ("statements",)

    def __init__(self, st) -> None:
        self.statements = [st]


def _body_writes(st) -> bool:
    # rows written by a DO block: PL/pgSQL finds each name when that statement of the
    # block runs (after a pg_sleep before it). (A called function's body is judged when
    # the function is created, and at each call through the view map: not here.)
    return st.kind == "do" and bool(_ROW_KINDS.intersection(st.kinds))


def _unknown_writes(s, d, temps: set[str] = frozenset()) -> list[str]:
    """Relations the statements write rows of that the catalog does not know, no
    earlier statement of ``d`` creates and are not the session's own temporary ones."""
    made: set[str] = set()
    out = []
    for st in d.statements:
        if st.kind in _ROW_KINDS or _ROW_KINDS.intersection(st.kinds) and \
                st.kind not in CATALOG_KINDS:
            out += [r for r in st.relations_written
                    if r not in made and f"pg_temp.{r.rpartition('.')[2]}" not in made
                    and not (r.startswith("public.") and r[7:] in temps)
                    and not s.services.relation_known(s.database, r)]
        if st.kind in CATALOG_KINDS:
            made.update(st.relations_written)
    return out


def _unknown_write_refusal(d, name: str):
    return Decision(
        action="block", rule="catalog",
        message=f'pgguard: statement refused by rule "catalog": it writes {name}, which '
                "does not exist yet, behind other statements: Postgres finds the name "
                "when it runs, and another session may create it meanwhile (as a view "
                "over a guarded table)",
        detail=f"writes {name}; the catalog read has no relation of that name",
        hint=f"Create {name} first, or send the write on its own once it exists.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _body_ddl(st) -> bool:
    # DDL the statement runs through a function body or a DO block, not its own
    return not CATALOG_KINDS.isdisjoint(st.kinds) and st.kind not in CATALOG_KINDS


def _body_ddl_refusal(d, st):
    return Decision(
        action="block", rule="catalog",
        message='pgguard: statement refused by rule "catalog": it writes rows after a '
                "function body or DO block changed the catalog in the same transaction, "
                "which pgguard cannot read until it commits (a view created there may "
                "reach a guarded table)",
        detail=f"statement: {st.kind}; writes "
               + (", ".join(st.relations_written) or "rows"),
        hint="COMMIT (or run the call on its own, outside a transaction block) first, "
             "then write.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def unguarded_refusal(d, how: str, hint: str | None = None):
    """A statement that may change rows (it writes, or calls a function pgguard cannot
    see into) sent in a form whose row changes the blast-radius guard cannot measure."""
    st = next((st for st in d.statements if st.functions), d.statements[0])
    calls = ", ".join(f"{f}()" for f in st.functions[:5])
    return Decision(
        action="block", rule="blast-radius",
        message=f'pgguard: statement refused by rule "blast-radius": {how} of a statement '
                "that may change rows runs where the row limit cannot be measured",
        detail=(f"it calls {calls}, which may change rows" if calls else
                f"statement kind: {st.kind}; it changes rows"),
        hint=hint or "Run it as a plain statement (SELECT f(), an UPDATE ...): it then "
                     "runs under the row limit.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _deferred_refusal(d, views, plan):
    """``d``, or its refusal when what it writes may fire a deferrable trigger of a
    user's: such a trigger runs at COMMIT (or at SET CONSTRAINTS ... IMMEDIATE), after
    the guard counted the statement's rows (a one-row UPDATE answered "UPDATE 1" while
    its trigger deleted 4,999 rows at COMMIT). ``views.deferred`` holds the tables with
    one and those a cascading foreign key reaches one from; a statement measured by
    the transaction's counters that calls a function or writes a table whose triggers
    or rules write elsewhere may reach one too: refused as well (fail closed) while
    the database has any."""
    written = {t for st in d.statements for t in st.relations_written}
    if not written.isdisjoint(views.deferred):
        how = "writing a table with deferrable constraint triggers (they run at COMMIT, " \
              "after the rows are counted)"
    elif plan is not None and not plan.by_tag and (
            not written or not written.isdisjoint(views.hidden)):
        how = "a function call or a write whose triggers or rules write elsewhere, in a " \
              "database with deferrable constraint triggers (they run at COMMIT, after " \
              "the rows are counted),"
    else:
        return d
    return unguarded_refusal(d, how, hint="Ask a DBA to run it, or to make the "
                                          "constraint triggers NOT DEFERRABLE.")


def _bind_statement(msg: bytes) -> bytes | None:
    """The statement name a Bind names (None: malformed)."""
    try:
        end = msg.index(b"\0", 5)
        return msg[end + 1:msg.index(b"\0", end + 1)]
    except ValueError:
        return None


# client messages (backend messages) Python takes in one turn of the event loop (then
# the rest waits for the next)
CLIENT_SLICE = 1024
BACKEND_SLICE = 1024


class _Rest:
    """``items[start:]``, copied only when used: each message of a long pipeline took
    the rest of its batch as a fresh list (red team 23: 50,000 Bind / Execute / Sync in
    one write kept the worker busy for seconds, every other session waiting)."""

    __slots__ = ("items", "start")

    def __init__(self, items: list, start: int) -> None:
        self.items, self.start = items, start

    def __iter__(self):
        return itertools.islice(self.items, self.start, None)

    def __len__(self) -> int:
        return max(0, len(self.items) - self.start)


# what makes the transaction's tuple counters of a relation go away or start again
# (a dropped or discarded relation has none left; TRUNCATE zeroes them): in a statement
# measured by those counters, rows it changed
# elsewhere would be offset (red team 23: UPDATE big ... WHERE id <= 4000; DISCARD TEMP
# in one Query, after updates of a temporary table earlier in the transaction)
_UNCOUNTING = frozenset({"discard", "drop", "truncate"})
_ROW_KINDS = frozenset({"insert", "update", "delete", "merge"})


def _uncounting(st) -> bool:
    return bool(_UNCOUNTING.intersection(st.kinds or (st.kind,)))


def _uncounting_refusal(d):
    st = next((st for st in d.statements if _uncounting(st)), None)
    if st is None or len(d.statements) == 1 and not _ROW_KINDS.intersection(st.kinds):
        return d        # (alone, it changes no rows the counters would lose)
    what = st.text.strip().split(None, 2)
    return Decision(
        action="block", rule="blast-radius",
        message=f'pgguard: statement refused by rule "blast-radius": its row limit is '
                f"measured by the transaction's per-table row counters, and its "
                f"{' '.join(what[:2]).upper()} drops or empties a relation, "
                f"which takes that relation's counters out of the count",
        detail=f"statement: {st.text[:200]}",
        hint="Send that statement on its own, before or after the one that changes rows.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _too_many_tables_refusal(d, tables: tuple):
    """A statement that writes more tables than the guard measures one by one."""
    return Decision(
        action="block", rule="blast-radius",
        message=f'pgguard: statement refused by rule "blast-radius": it writes '
                f"{len(tables)} tables, and the row limit is measured for at most "
                f"{MAX_TABLES} tables a statement",
        detail="tables written: " + ", ".join(tables[:12]) + (" ..." if len(tables) > 12
                                                             else ""),
        hint=f"Split it into statements that each write at most {MAX_TABLES} tables.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _readonly_refusal(d):
    st = next(st for st in d.statements if _changes(st))
    what = "changes the database"
    call = _writing_call(st)
    if call is not None:
        what = f"calls {call}(), which changes the database"
    elif not (_WRITE_FLAGS.intersection(st.flags) or _CHANGING_KINDS.intersection(st.kinds)):
        what = "would turn read-only mode off"
    return Decision(
        action="block", rule="readonly-scope",
        message=f'pgguard: statement refused by rule "readonly-scope": {st.kind.upper()} '
                f"{what} and this session's token is read-only",
        detail=f"statement kind: {st.kind}; flags: {', '.join(st.flags) or 'none'}"
               + (f"; settings: {', '.join(f'{n} = {v}' for n, v in st.settings)}"
                  if st.settings else ""),
        hint="Ask for a token with --scope readwrite.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _mixed_txn_refusal(d):
    return Decision(
        action="block", rule="blast-radius",
        message='pgguard: statement refused by rule "blast-radius": a query text that both '
                "changes rows and controls the transaction (BEGIN/COMMIT/ROLLBACK/SAVEPOINT)",
        detail="pgguard measures how many rows each row-changing statement changes and "
               "rolls it back past the limit; it cannot do that when the same query text "
               "also commits or rolls back",
        hint="Send BEGIN, COMMIT and the like as statements of their own.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _prepares_inside(d) -> bool:
    # a PREPARE run by a DO block's or a function's code: its name becomes a protocol
    # prepared statement too, which a Bind runs, unseen by the guard
    return any(st.kind != "prepare" and "prepare" in (st.kinds or ()) for st in d.statements)


def _sql_prepares(guard, d, plan) -> None:
    # a SQL PREPARE of a statement the guard measures: its name is a protocol-level
    # prepared statement too (a Bind of it runs it)
    for st in d.statements:
        if st.kind == "prepare" and st.name:
            guard.on_sql_prepare(st.name.encode(), plan)


def _fetches_guarded(guard, d, sql: bytes) -> bool:
    # a SQL FETCH / MOVE of a protocol portal the guard measures (or may have to): it
    # would run the portal's statement where its row count is not measured. In a DO
    # block's or a function's code the cursor's name is a value (a refcursor): any
    # FETCH / MOVE there counts while such a portal exists
    if guard is None or not (guard.portals or guard.portal_ghosts) or not any(
            "fetch" in (st.kinds or (st.kind,)) or "move" in (st.kinds or (st.kind,))
            for st in d.statements):
        return False
    if any(st.kind not in ("fetch", "move") for st in d.statements):
        return True
    try:
        names = {getattr(r.stmt, "portalname", None) for r in parse_sql(
            sql.decode("utf-8", "replace"))}
    except Exception:                   # (judged already: it parsed then)
        return True
    return any(n is not None and (n.encode() in guard.portals
                                  or n.encode() in guard.portal_ghosts) for n in names)


def _rolls_back(d) -> bool:
    # ROLLBACK, ROLLBACK TO SAVEPOINT (and ABORT)
    return any("rollback" in (st.kinds or (st.kind,)) for st in d.statements)


def _unsynced_refusal(d):
    return Decision(
        action="block", rule="blast-radius",
        message='pgguard: statement refused by rule "blast-radius": a row-changing simple '
                "Query sent right after extended-protocol messages (Parse/Bind/Execute) "
                "with no Sync between them",
        detail="what those messages run (a COMMIT, a BEGIN) decides whether this statement "
               "runs inside a transaction block; pgguard cannot know that before it runs "
               "the statement, and so cannot keep its changes undone past the row limit",
        hint="Send a Sync after the extended-protocol messages (end the pipeline), then "
             "the statement.",
        statements=d.statements, verdicts=d.verdicts, index=d.index)


def _bad_utf8_offset(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    return 0


def _now():
    return datetime.now(UTC)


def _is_marker(msg: bytes) -> bool:
    return b"\0C" + REFUSAL_MARKER.encode() + b"\0" in msg


def _touches_prepared(d) -> bool:
    return any(st.kind in ("prepare", "deallocate", "discard") for st in d.statements)


def _refusal_query(d) -> bytes:
    """A Query that fails upstream with the refusal marker. The message rides along
    for the upstream's own log only (the client gets pgguard's 42501), so it is cut
    down to characters that need no quoting."""
    safe = _UNSAFE.sub("", d.message)[:200]
    sql = (f"DO $pgguard$BEGIN RAISE EXCEPTION USING ERRCODE = '{REFUSAL_MARKER}', "
           f"MESSAGE = '{safe}'; END$pgguard$")
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


_TRUE_WORDS = frozenset({"t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"})


def _copy_header(de: dict) -> bool:
    """HEADER of COPY ... TO: true when Postgres reads it as true. Anything else
    (false, 0, off, or a value COPY TO rejects) is False: the first line is then data and
    masked like data, never passed as a header."""
    arg = de.get("arg")
    if arg is None:
        return True
    if "Boolean" in arg:
        return bool(arg["Boolean"].get("boolval"))
    if "Integer" in arg:
        return arg["Integer"].get("ival", 0) == 1
    if "String" in arg:
        return arg["String"].get("sval", "").lower() in _TRUE_WORDS
    return False


# (helper 114) binary COPY rows are not scanned (the detectors read text and csv fields):
# for an identity the detectors watch, a binary COPY of any table carried PII in clear
_BINARY_UNSCANNED = ("COPY in {fmt} format for an identity whose rows the detectors scan "
                     "(they read text and csv fields, not binary tuples)")


def _copy_specs(mask, sql: str, reads: bool):
    """The plan of every COPY ... TO STDOUT of a query text, in order: (plan entries or
    None, CopyFormat) for a table (None: no masked column, the detectors scan it), or
    ("query", text, fmt, options) for a COPY (query) of masked data whose columns pgguard
    must learn first. A string: why the statement cannot be masked (refuse it)."""
    try:
        stmts = orjson.loads(parser.parse_sql_json(sql))["stmts"]
    except Exception:       # noqa: BLE001 - unreadable here: refuse rather than leak
        return "this COPY could not be analysed for masked columns"
    specs: list = []
    for i, raw in enumerate(stmts):
        stmt = raw["stmt"].get("CopyStmt")
        if stmt is None or stmt.get("is_from") or "filename" in stmt                 or stmt.get("is_program"):
            continue        # not a COPY TO STDOUT (a file or program: the policy's)
        opts: dict = {}
        fmt = "text"
        for o in stmt.get("options", []):
            de = o["DefElem"]
            val = de.get("arg", {})
            text = val.get("String", {}).get("sval") if isinstance(val, dict) else None
            if de["defname"] == "format":
                fmt = text or "text"
            elif de["defname"] in ("delimiter", "quote", "escape", "null") \
                    and text is not None:
                opts[de["defname"]] = text
            elif de["defname"] == "header":
                opts["header"] = _copy_header(de)
            elif de["defname"] == "encoding" and re.sub(
                    r"[^0-9a-z]", "", (text or "").lower()) not in ("utf8", "unicode"):
                # the masker splits fields on the bytes: in another encoding a character's
                # second byte may read as a delimiter or an escape (SJIS), and a masked
                # value lands in another column
                return (f"COPY ... ENCODING {text!r}: the masker reads UTF-8 only; leave the "
                        "ENCODING option out (or say 'UTF8') and convert on the client")
        if "query" in stmt:
            # under masks every COPY (query) is planned from its columns' types and
            # lineage (side connection), not only one that names a masked table: a
            # column of a masked table's row type (a composite stored elsewhere, a
            # function returning such rows) carries clear values too
            if fmt not in ("text", "csv"):
                if mask.masks_on:
                    return f"COPY (query) in {fmt} format for an identity with masks"
                if mask.detectors is not None:
                    return _BINARY_UNSCANNED.format(fmt=fmt)
                specs.append((None, None))
                continue
            if not mask.masks_on:
                specs.append(mask.copy_spec(None, None, fmt, opts))
                continue
            text = _copy_query_text(sql, i)
            if text is None:
                return "this COPY (query) could not be analysed for masked columns"
            specs.append(("query", text, fmt, opts))
            continue
        rel = stmt.get("relation", {})
        name = f"{rel.get('schemaname', 'public')}.{rel.get('relname')}"
        oid = next((o for o, (n, _) in mask.catalog.tables.items() if n == name), None)
        # a table without masked columns of its own but with a column of a masked
        # table's row type (or an array or domain of it)
        typed = oid is None and mask.masks_on and mask.holds_masked_rows(name)
        if fmt not in ("text", "csv"):
            if (oid is not None or typed) and mask.masks_on:
                return f"COPY in {fmt} format of a table with masked columns"
            if mask.detectors is not None:
                return _BINARY_UNSCANNED.format(fmt=fmt)
            specs.append((None, None))
            continue
        cols = [c["String"]["sval"] for c in stmt.get("attlist", [])] or None
        if typed:
            specs.append(("query", "SELECT " + (", ".join(_quote_ident(c) for c in cols)
                                                if cols else "*")
                          + " FROM " + ".".join(_quote_ident(p) for p in name.split(".", 1)),
                          fmt, opts))
            continue
        specs.append(mask.copy_spec(oid, cols, fmt, opts))
    return specs


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _shaped_by_masked(s, sql: bytes, d, oids: tuple) -> str:
    """Why the statement is refused by masking for the rows it returns ("" : it is
    not; see lineage.Lineage.refused)."""
    if s.masking is None:
        return ""
    lin = s.masking.lineage_now(sql, d, oids)
    return lin.refused if lin is not None and lin is not PENDING else ""


def _shaped_refusal(why: str, d):
    return Decision(
        action="block", rule="masking",
        message=f'pgguard: statement refused by rule "masking": {why} decides how many '
                "rows it returns, or which: the rows would carry the masked values",
        detail="statement: "
               + (", ".join(st.kind for st in d.statements) if d is not None and
                  d.statements else "?")
               + "; the number or choice of rows depends on masked columns",
        hint="Keep set-returning functions, LIMIT / OFFSET and recursive steps free of "
             "masked columns (constants or clean columns), or ask a DBA.",
        statements=d.statements if d is not None else [])


def _copy_refusal(why: str, d):
    return Decision(
        action="block", rule="masking",
        message=f'pgguard: statement refused by rule "masking": {why}',
        detail="statement: copy; reads "
               + (", ".join(r for st in d.statements for r in st.relations_read)
                  if d is not None and d.statements else "a masked table")
               + "; masked columns cannot leave in this form",
        hint="Use SELECT, or COPY <table> [(columns)] TO STDOUT in text or csv "
             "format: masked columns are masked there.",
        statements=d.statements if d is not None else [])


def _copy_query_text(copy_sql: str, index: int = 0) -> str | None:
    """The query of the index-th statement, a COPY (query) TO ..., rendered back to SQL
    by pglast."""
    try:
        return RawStream()(parse_sql(copy_sql)[index].stmt.query)
    except Exception:       # noqa: BLE001
        return None
