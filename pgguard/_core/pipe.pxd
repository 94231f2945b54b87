# Layout of the relay-phase asyncio protocol: one per direction of a session.

from .relay cimport MessageScan
from cpython.buffer cimport Py_buffer
from .rowmask cimport RowRewriter


cdef class MaskLane:
    # The compiled lane of a masking session (one per session, shared by both pipes):
    # statements whose results read no masked column (masking/lane.py decides, once per
    # statement text or shape, prepared statement) are forwarded by the client pipe, and
    # their answers are rewritten by the upstream pipe with the detectors' plan of each
    # RowDescription, without Python. Python and the lane never have answers in flight
    # at once: the lane forwards only while ``idle`` (set by Python when nothing it
    # forwarded is owed), and Python's own messages wait until ``z`` is 0.
    # on: the session's fast path is on (off while discarding, guarding, strict audit)
    cdef public bint on
    cdef public bint idle
    # the audit's tracker hears the lane's completions (hooks.backend_events)
    cdef public bint track
    # ReadyForQuery messages the upstream owes to segments the lane forwarded
    cdef public long long z
    # statements and segments forwarded here (reported: counted in /metrics)
    cdef public long long forwarded
    cdef public long long reported
    # 1: a Query went through the lane (the unnamed statement and portal are gone);
    # 2: a Bind did (the unnamed portal is another one): Python forgets its plans
    cdef public int dirty
    # safe Query texts and shapes (-> True), safe prepared statements (by name)
    cdef public dict exact
    cdef public dict shapes
    cdef public set stmts
    # RowDescription -> the detectors' MaskPlan (None: nothing to scan), for the
    # catalog generation _gen
    cdef public dict plans
    cdef long long _gen
    # the session's MaskState (fast_rowdesc, fast_channel, fast_fallback) and rewriter
    cdef public object state
    cdef RowRewriter rw
    # the catalog generation: the first 8 bytes (big-endian) of this buffer
    # (server.CatalogSignal.mm, shared by the workers), read per RowDescription
    cdef Py_buffer _gbuf
    cdef bint _has_gbuf
    cdef long long _generation(self) noexcept


cdef class Pipe:
    # the scan over what this side receives
    cdef readonly MessageScan scan
    # True on the client side: interesting messages are withheld and handed to
    # hooks.client_items(); False on the upstream side: every chunk is forwarded first
    cdef bint _client_side
    # the transport we read from, and the one we forward to (and its bound write)
    cdef public object transport
    cdef public object peer
    cdef object _peer_write
    cdef object _peer_writelines
    # the Python session: client_items, backend_events, backend_chunk, frame_error,
    # client_gone, upstream_lost
    cdef object _hooks
    # call hooks.backend_chunk() after every upstream chunk (set while draining)
    cdef public bint notify_chunks
    # client side: every chunk's items go to hooks.client_items (held or discarded);
    # upstream side: the scan withholds and hooks.backend_items forwards (rewriting)
    cdef public bint divert
    # client side: the session's decision maps (raw message -> decision, shape ->
    # decision); a Query or unnamed Parse whose cached decision allows it is
    # forwarded here without Python. None: every Query/Parse goes to the hooks
    cdef public dict exact
    cdef public dict shapes
    # texts longer than this (bytes) are not looked up by shape: a shape cached from a
    # short statement would let one past the policy's max_statement_size (0: no limit)
    cdef public Py_ssize_t shape_max
    # client side, no policy: every well-formed Query / Parse is forwarded here (with
    # decision None) when exact is None
    cdef public bint allow_all
    # client side: frontend message types forwarded here and logged with decision None
    # (the audit's Bind / Execute / Sync / FunctionCall); None: they go to the hooks
    cdef public bytes log_types
    # when not None, (message, decision, monotonic ns) of each fast-forwarded
    # statement is appended for the audit
    cdef public list fast_log
    # client side, while the blast-radius guard watches Bind/Execute/Close/Sync: the
    # Guard (None otherwise; set through the guard property). A Bind, Execute or Close naming no guarded statement or
    # portal, and a Sync that owes no end of block, are forwarded here with the guard's
    # own bookkeeping (Guard.on_execute / on_sync); the others go to the hooks
    cdef object _guard
    # the upstream side: our transport's buffer is over its high-water mark (the client
    # is not read until it drains)
    cdef public bint writing_paused
    # the client side: reading paused for one turn of the loop after a large chunk
    cdef bint _yielded
    cdef object _call_soon
    cdef dict _g_stmts
    cdef dict _g_portals
    cdef dict _g_approved
    cdef dict _g_ghosts
    # statements whose text rolls back, and portals bound to one (their Bind / Execute
    # goes to the hooks: Guard.revive)
    cdef set _g_rollbacks
    cdef set _g_rb_portals
    # the guard's current decision generation (a callable of no argument): a Bind of a
    # statement whose plan was made under another one goes to the hooks
    cdef object _g_gen_now
    cdef long long _fast
    # client side: while a hold or a function lookup keeps the stream, every chunk goes
    # to this sink's data_received, unscanned (set here rather than swapping the
    # transport's protocol: uvloop's set_protocol stops and starts reading, two epoll
    # changes each time)
    cdef object _raw_sink
    # the shape of the last Query text _cached_allow / _mask_query_ok computed (None:
    # not computed), handed to the audit with the statement so it is not computed twice
    cdef object _last_key
    # the cache entry _cached_allow found last, whatever its action (a guarded one is
    # offered to guard_query)
    cdef object _last_entry
    # client side, a policy with the blast-radius guard: called with a Query whose
    # cached decision is guarded, last in its chunk (everything before it written),
    # the entry, and the text's shape when the entry was found by it (else None):
    # True when it ran the Query itself on the guard's in-block lane
    # (Enforcement.query_lane); None, or False: the hooks get it
    cdef public object guard_query
    # upstream side, the blast-radius guard's in-block lane (Guard._start_in_block):
    # the answers to one Execute + Sync are held here until their ReadyForQuery; the
    # first CommandComplete's row count within _hold_limit (-1: no hold) and no error:
    # forwarded as usual and hooks.hold_done(); else hooks.hold_fallback() and Python
    # reads them all (diverted) as if they had just come
    cdef long long _hold_limit
    cdef bytearray _held
    cdef Py_ssize_t _held_pos
    cdef long long _held_count
    cdef bint _held_counted
    # client side: the scan met a malformed frame (reported once, nothing read after)
    cdef bint _bad_seen
    # a masking session's compiled lane (None: no masking)
    cdef public MaskLane mask
    # client side, under a policy: statement name -> the catalog generation (shared by
    # the workers, bumped by DDL) its Parse was judged under. A Bind of a statement
    # judged under another generation goes to the hooks, to be judged again (Postgres
    # resolves its names again: a view or temporary object may shadow them now).
    # None: not watched (see watch_statements)
    cdef public dict stmt_gens
    # a Bind of a name stmt_gens does not hold goes to Python too (names were forgotten)
    cdef public bint unknown_stale
    # the last unnamed Parse forwarded (its text, judged again at a stale Bind)
    cdef public bytes unnamed_parse
    cdef Py_buffer _sbuf
    cdef bint _has_sbuf

    cdef object _cached_allow(self, bytes msg)
    cdef long long _sig_gen(self) noexcept
    cdef bint _bind_stale(self, bytes msg) except -1
    cdef bint _guard_passes(self, int t, bytes msg) except -1
    cdef int _hold_scan(self) except -1
    cdef _client_chunk(self, list items, bytes data)
    cdef _mask_chunk(self, list items)
    cdef _yield_turn(self)
    cdef _mask_answers(self, bytes data)
    cdef object _mask_plan(self, bytes msg)
    cdef object _mask_query_ok(self, bytes msg)
    cdef _flush(self, list out)
