# The masking lane's Python side: which statements the compiled lane (pipe.MaskLane) may
# forward, the detectors' plan of each RowDescription it meets, and taking its answers
# over when it cannot finish them.
#
# A statement is safe for the lane when its result reads no masked column: one SELECT
# (nothing nested that writes), allowed by the policy, not naming a relation with masked
# columns, and, with masks on, the planner's lineage analysed and saying that no column
# derives from a masked column and no masked relation is read. Its rows then get the
# plan a statement that reads nothing masked gets in Python (the detectors on text-like
# columns; a column of a masked table or of a type carrying masked rows is still masked:
# the plan comes from the RowDescription, not from the safety flag). Anything unknown
# stays on the Python path.
from __future__ import annotations

from typing import Any

from .._core.sqlshape import shape
from ..errors import ProtocolViolation
from ..protocol import messages as m
from ..protocol.messages import parse_row_description
from . import lineage as lg

_SAFE_KINDS = frozenset({"select"})



# the masking layer's response queue entries (MaskState.expect), by kind
K_PARSE, K_PDESC, K_DESC_S, K_DESC_P, K_BIND, K_EXEC, K_CLOSE, K_SYNC, K_READY = range(9)
K_CURSOR_DESC = 9       # pgguard's Describe of a SQL cursor's portal, before an Execute


class ObjPlan:
    """The masking plan of a prepared statement, SQL cursor or simple Query: its
    RowDescription (None: none known yet), its lineage (None: not analysed, every
    column that is not a plain unmasked column is masked when it reads masked data),
    whether it reads masked data, and the cursor a FETCH reads (its plan is the
    cursor's)."""

    __slots__ = ("copies", "copy", "declare", "fetch", "lineage", "reads", "rowdesc", "safe",
                 "src")

    def __init__(self, lineage=None, reads: bool = True, fetch: tuple | None = None,
                 declare: tuple | None = None) -> None:
        self.rowdesc: bytes | None = None
        self.lineage = lineage
        self.reads = reads
        self.fetch = fetch
        # ("cursor" | "prepared", name, its ObjPlan) for DECLARE / PREPARE; fetch: the
        # (kind, name) whose plan a FETCH / EXECUTE gets
        self.declare = declare
        # COPY TO STDOUT: ``copies`` the specs (plan entries or None, CopyFormat) of the
        # COPYs of a Query, in order (taken as their CopyOutResponses come); ``copy`` the
        # spec of a prepared COPY statement (every Execute of it)
        self.copies: list | None = None
        self.copy: tuple | None = None
        self.safe = False           # the masking lane may run it (LaneState.safe_statement)
        # a protocol-prepared statement's (text, parameter type OIDs): its lineage is
        # asked for again when a catalog read dropped it (MaskState.relineage)
        self.src: tuple | None = None


PENDING = object()      # lineage_now: ask the planner first

class LaneState:
    """Mixin of MaskState: the Python half of the compiled masking lane. ``lane`` is
    the session's pipe.MaskLane (None until the relay starts)."""

    lane: Any = None
    fast_owed = 0                   # ReadyForQuery of lane answers Python finishes

    # -- what the lane may forward
    def safe_statement(self, d, lineage, reads_masked: bool) -> bool:
        """Whether the rows of statement ``d`` read no masked column (see above)."""
        if d is None or d.action != "allow" or len(d.statements) != 1 or reads_masked:
            return False
        st = d.statements[0]
        if st.kind not in _SAFE_KINDS or not _SAFE_KINDS.issuperset(st.kinds or ()):
            return False
        if not self.pure_select(d):
            return False                # (what the lane runs changes no portal)
        if not self.masks_on:
            return True
        return lineage is not None and lineage is not PENDING and \
            lineage.masked is not None and not lineage.reads and not any(lineage.masked)

    def pure_select(self, d) -> bool:
        """Whether statement ``d`` is one SELECT that calls no function pgguard cannot
        see into: running it cannot close a portal or open a cursor (MaskState's
        portal epochs)."""
        if d is None or d.action != "allow" or len(d.statements) != 1:
            return False
        st = d.statements[0]
        if st.kind != "select" or not _SAFE_KINDS.issuperset(st.kinds or ()) or \
                "opaque" in st.flags:
            return False
        if not st.functions:
            return True
        user = self.s.services.user_function_test(self.s.database)
        return not any(user(f) for f in st.functions)

    def note_query(self, msg: bytes, d, lineage, reads_masked: bool) -> None:
        """A Query Python forwards: when safe, the lane forwards its text (or every
        text of its shape, when that is what the lineage and the decision hold for)."""
        lane = self.lane
        if lane is None or not self.safe_statement(d, lineage, reads_masked):
            return
        key = shape(msg[5:-1])
        by_shape = key is not None
        if by_shape and self.masks_on:
            # the lineage holds for the shape only when it was learned for the shape
            keys = self._lineage_keys(lineage_query(msg[5:-1], d), ())
            by_shape = len(keys) == 2 and (
                self.lineage_keys.get(keys[1]) or lg.cached(keys[1])) is lineage
        table, k = (lane.shapes, key) if by_shape else (lane.exact, msg)
        if len(table) > 4096:
            table.clear()
        table[k] = True

    def lane_stmt(self, name: bytes, safe: bool) -> None:
        """A prepared statement Postgres accepted (or one that is gone: safe=False)."""
        lane = self.lane
        if lane is None:
            return
        if safe:
            lane.stmts.add(name)
        else:
            lane.stmts.discard(name)

    def lane_forget(self) -> None:
        if self.lane is not None:
            self.lane.forget()

    def lane_dirty(self) -> None:
        """Before Python pairs anything: forget the unnamed statement / portal the lane
        replaced upstream."""
        lane = self.lane
        if lane is None or not lane.dirty:
            return
        if lane.dirty & 1:
            self.stmts.pop(b"", None)
        self.portals.pop(b"", None)
        lane.dirty = 0

    def maybe_idle(self) -> None:
        """Let the lane forward again once nothing Python forwarded is owed."""
        lane = self.lane
        if lane is None or not lane.on or lane.idle:
            return
        s = self.s
        if self.expect or self._ready or self.fast_owed or self.txn_tainted or \
                self.ddl_pending or self.held is not None or lane.z or \
                s.in_flight() > 0 or s.enforce.refusals or s.holds.held is not None or \
                s.enforce.discarding:
            return
        lane.idle = True

    # -- the lane's upstream side
    def fast_rowdesc(self, rowdesc: bytes):
        """The plan of rows after ``rowdesc`` in a lane answer; False when Python must
        take over (the catalog is to be read again first)."""
        if self.stale(rowdesc):
            return False
        return self.plan_for(rowdesc, None, ObjPlan(None, False))

    def _owed_obj(self, rowdesc: bytes):
        return ObjPlan(_owed_lineage(self.catalog, rowdesc), True)

    def fast_channel(self, t: int, data: bytes) -> bytes:
        return self._channel(t, data)

    def fast_fallback(self, items: list) -> None:
        """The lane stops inside its answers: Python finishes them (the rows with the
        plan of a statement it knows nothing of: computed columns masked)."""
        lane = self.lane
        self.fast_owed += lane.z
        lane.z = 0
        lane.idle = False
        self.s.backend_items(items)

    def feed_owed(self, t: int, data: bytes) -> bytes | None:
        """MaskState.feed for an answer of the lane (no entry in the response queue)."""
        rw = self.rw
        out = rw.feed(data)
        if t == m.ROW_DESCRIPTION:
            rw.set_plan(self.plan_for(data, None, self._owed_obj(data)))
        elif t == m.COPY_OUT_RESPONSE:
            if self.masks_on:
                self.s.fail(ProtocolViolation("pgguard: a COPY answered a statement "
                                              "that reads no masked data"))
                return None
            self._copy_plan(data, None, -1)
        elif t == m.READY_FOR_QUERY:
            self.fast_owed -= 1
            # (idle by the answers still owed here, not the model's count, which has
            # read the whole chunk already: see MaskState.feed)
            if self.fast_owed <= 0 and not any(
                    e[0] == K_READY or e[0] == K_SYNC for e in self.expect) and \
                    self.s.in_flight() <= 0:
                self.masked_reads = 0
                if data[5] == m.TX_IDLE:    # the transaction ended
                    self.txn_tainted = False
            self.maybe_idle()
        return out


def _owed_lineage(catalog, rowdesc: bytes):
    """The lineage a lane answer Python finishes is planned with, from its RowDescription
    and the catalog as read again: a direct column of a relation that is not a view over
    masked columns carries what the relation holds (its own mask, if any, applies); any
    other column (computed, or of such a view) is masked as derived. The lineage the lane
    judged the statement with may be stale (DDL moved the catalog generation)."""
    views = getattr(catalog, "views", frozenset())
    return lg.Lineage(tuple(not (table and attnum > 0 and table not in views)
                         for table, attnum, _, _ in parse_row_description(rowdesc)), True)


def lineage_query(sql: bytes, d) -> bytes:
    return lg.statement_query(sql, d) or sql
