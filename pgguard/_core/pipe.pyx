# The relay-phase asyncio protocol: forwards each received chunk to the peer transport
# after the compiled scan; Python hooks run only for messages the session asked for.
# cython: language_level=3

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memchr
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import asyncio

from .framing import FrameError
from .relay cimport MessageScan
from .msgtypes cimport (BIND, BIND_COMPLETE, CLOSE, COMMAND_COMPLETE, DATA_ROW, DESCRIBE,
                        EMPTY_QUERY_RESPONSE, ERROR_RESPONSE, EXECUTE, FUNCTION_CALL_RESPONSE,
                        NO_DATA, NOTICE_RESPONSE, NOTIFICATION_RESPONSE, PARAMETER_DESCRIPTION,
                        PARAMETER_STATUS, PARSE, PORTAL_SUSPENDED, QUERY, READY_FOR_QUERY,
                        ROW_DESCRIPTION, SCRUBBED_ERROR, SYNC, TARGET_PORTAL,
                        TARGET_STATEMENT)
from .relay import StreamedPrefix
from .rowmask cimport RowRewriter
from .sqlshape cimport shape_buf


cdef object _MISSING = object()

# a client chunk this large pauses reading the client for one turn of the loop: the
# event loop reads one socket again and again while its reads fill the buffer, and an
# ErrorResponse waiting on the upstream socket (which tells a pipelining client to stop
# sending) would wait for the whole client stream
cdef Py_ssize_t YIELD_BYTES = 65536
# client messages the audit's log may hold before the tracker reads them (log_full)
cdef Py_ssize_t LOG_BOUND = 4096


cdef inline long long _big_endian_8(const void* buf) noexcept:
    # the shared catalog generation: the first 8 bytes of the buffer, big-endian
    cdef const unsigned char* g = <const unsigned char*>buf
    cdef unsigned long long v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | g[i]
    return <long long>v


cdef class MaskLane:
    """The compiled lane of a masking session (see the layout in pipe.pxd).

    Example::

        lane = MaskLane(mask_state, mask_state.rw, server.catalog_signal.mm)
        client_pipe.mask = up_pipe.mask = lane
    """

    def __cinit__(self, state, RowRewriter rw, generation):
        self.state = state
        self.rw = rw
        self._has_gbuf = False
        PyObject_GetBuffer(generation, &self._gbuf, PyBUF_SIMPLE)
        self._has_gbuf = True
        if self._gbuf.len < 8:
            raise ValueError("the generation buffer holds fewer than 8 bytes")
        self.on = False
        self.idle = False
        self.track = False
        self.z = 0
        self.forwarded = self.reported = 0
        self.dirty = 0
        self.exact = {}
        self.shapes = {}
        self.stmts = set()
        self.plans = {}
        self._gen = -1

    def __dealloc__(self):
        if self._has_gbuf:
            PyBuffer_Release(&self._gbuf)

    cdef long long _generation(self) noexcept:
        return _big_endian_8(self._gbuf.buf)

    @property
    def generation(self):
        return self._generation()

    def forget(self):
        """Forget every safe statement and plan (the catalog or the lineage changed)."""
        self.exact.clear()
        self.shapes.clear()
        self.stmts.clear()
        self.plans.clear()


# the guard's in-block lane holds at most this much (blast.MAX_HELD_BYTES); beyond it
# Python takes over (and refuses: too much to hold)
cdef enum:
    HOLD_MAX = 32 << 20


cdef inline uint32_t _be32(const char* p) noexcept nogil:
    return ((<uint32_t><uint8_t>p[0]) << 24) | ((<uint32_t><uint8_t>p[1]) << 16) | \
           ((<uint32_t><uint8_t>p[2]) << 8) | (<uint32_t><uint8_t>p[3])


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline bint _well_formed(bytes msg):
    # a Query: text ending in its NUL; a Parse: name and text, each NUL-terminated
    cdef const char* p = PyBytes_AS_STRING(msg)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(msg)
    cdef const char* e
    if n < 6 or p[n - 1] != 0:
        return False
    if p[0] == QUERY:
        return True
    e = <const char*>memchr(p + 5, 0, n - 5)
    return e != NULL and memchr(e + 1, 0, n - (e + 1 - p)) != NULL


cdef inline bytes _log_form(bytes msg):
    # what the audit reads of a Bind is its portal and statement names: a long one is
    # logged as that prefix, so the parameters are not kept until the answers come
    cdef const char* p = PyBytes_AS_STRING(msg)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(msg)
    cdef const char* e
    if n <= 512 or p[0] != BIND:
        return msg
    e = <const char*>memchr(p + 5, 0, n - 5)
    if e != NULL:
        e = <const char*>memchr(e + 1, 0, n - (e + 1 - p))
    if e == NULL:
        return msg
    return PyBytes_FromStringAndSize(p, e + 1 - p)


cdef object _writelines_of(peer):
    # a TLS transport encrypts each piece of a writelines as a record of its own: join
    if peer.get_extra_info("ssl_object") is not None:
        return None
    return peer.writelines


cdef class Pipe:
    """One direction of an established session, installed with ``set_protocol``.

    Example::

        up_pipe = Pipe(bscan, upstream_transport, client_transport, session, False)
        upstream_transport.set_protocol(up_pipe)
    """

    def __cinit__(self, MessageScan scan, transport, peer, hooks, bint client_side):
        self.scan = scan
        self.transport = transport
        self.peer = peer
        self._peer_write = peer.write
        self._peer_writelines = _writelines_of(peer)
        self._hooks = hooks
        self._client_side = client_side
        self.notify_chunks = False
        self.divert = False
        self.exact = None
        self.shapes = None
        self.shape_max = 0
        self.allow_all = False
        self.log_types = None
        self.fast_log = None
        self._fast = 0
        self._raw_sink = None
        self._last_key = None
        self._bad_seen = False
        self._guard = None
        self._g_stmts = self._g_portals = self._g_approved = None
        self._hold_limit = -1
        self._held = None
        self.mask = None
        self.writing_paused = False
        self._yielded = False
        self._call_soon = None
        self.stmt_gens = None
        self.unknown_stale = False
        self.unnamed_parse = None
        self._has_sbuf = False

    def __dealloc__(self):
        if self._has_sbuf:
            PyBuffer_Release(&self._sbuf)

    def names_forgotten(self):
        """Statement names were forgotten (the session keeps a bounded number): a Bind
        of a name stmt_gens does not hold goes to the hooks from now on."""
        self.unknown_stale = True

    def watch_statements(self, dict gens, generation):
        """Judge a Bind again when its statement was judged under an older catalog
        generation: ``gens`` maps statement names to the generation (the first 8 bytes,
        big-endian, of the buffer ``generation``) their Parse was judged under; this
        pipe records the unnamed Parses it forwards itself."""
        if self._has_sbuf:
            PyBuffer_Release(&self._sbuf)
            self._has_sbuf = False
        PyObject_GetBuffer(generation, &self._sbuf, PyBUF_SIMPLE)
        self._has_sbuf = True
        if self._sbuf.len < 8:
            raise ValueError("the generation buffer holds fewer than 8 bytes")
        self.stmt_gens = gens

    @property
    def generation(self):
        """The shared catalog generation (watch_statements), or -1."""
        return self._sig_gen()

    cdef long long _sig_gen(self) noexcept:
        if not self._has_sbuf:
            return -1
        return _big_endian_8(self._sbuf.buf)

    cdef bint _bind_stale(self, bytes msg) except -1:
        # True: this Bind names a statement judged under another catalog generation
        # (or is malformed: Python reads it)
        cdef const char* p = PyBytes_AS_STRING(msg)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(msg)
        cdef const char* e
        cdef const char* e2
        if not self.stmt_gens:
            return False
        if n < 7:
            return True
        e = <const char*>memchr(p + 5, 0, n - 5)
        if e == NULL:
            return True
        e2 = <const char*>memchr(e + 1, 0, n - (e + 1 - p))
        if e2 == NULL:
            return True
        g = self.stmt_gens.get(PyBytes_FromStringAndSize(e + 1, e2 - (e + 1)))
        if g is None:
            return self.unknown_stale and e2 > e + 1
        return <long long>g != self._sig_gen()

    @property
    def fast_forwarded(self):
        """Statements forwarded by the compiled fast path."""
        return self._fast

    cdef object _cached_allow(self, bytes msg):
        # the cached decision when it allows this Query / unnamed Parse, else None
        cdef const char* p = PyBytes_AS_STRING(msg)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(msg)
        cdef const char* q
        cdef const char* e
        self._last_key = None
        self._last_entry = None
        if p[0] == PARSE and (n < 7 or p[5] != 0):
            return None                         # a named Parse: always the hooks'
        d = self.exact.get(msg)
        if d is None:
            if self.shape_max and n > self.shape_max:
                return None                      # judged as it is (its length too)
            if p[0] == QUERY:                    # text up to the final NUL
                key = self._last_key = shape_buf(<const unsigned char*>p + 5, n - 6)
            else:                                # 'P': "" name, then the text
                if n < 7 or p[5] != 0:
                    return None
                q = p + 6
                e = <const char*>memchr(q, 0, n - 6)
                if e == NULL:
                    return None
                key = shape_buf(<const unsigned char*>q, e - q)
            if key is None:
                return None
            d = self.shapes.get(key)
            if d is None:
                return None
        if d.action != "allow":
            self._last_entry = d
            return None
        return d

    @property
    def guard(self):
        """The blast-radius Guard whose unguarded Bind/Execute/Close/Sync this pipe
        forwards itself (None: they go to the hooks)."""
        return self._guard

    @guard.setter
    def guard(self, g):
        self._guard = g
        self._g_stmts = None if g is None else g.stmts
        self._g_portals = None if g is None else g.portals
        self._g_approved = None if g is None else g.approved
        self._g_ghosts = None if g is None else g.portal_ghosts
        self._g_rollbacks = None if g is None else g.rollbacks
        self._g_rb_portals = None if g is None else g.rb_portals
        self._g_gen_now = None if g is None else g.generation_now

    cdef bint _guard_passes(self, int t, bytes msg) except -1:
        # True: nothing guarded in this Bind / Execute / Close / Sync (the guard's
        # bookkeeping done here); False: the hooks must see it
        cdef const char* p = PyBytes_AS_STRING(msg)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(msg)
        cdef const char* e
        cdef const char* e2
        if t == SYNC:
            if self._guard.owe is not None:
                return False
            self._guard.on_sync()               # segment bookkeeping, skip state ended
            return True
        if n < 7:
            return False
        if t == BIND:                           # portal, statement
            e = <const char*>memchr(p + 5, 0, n - 5)
            if e == NULL:
                return False
            e2 = <const char*>memchr(e + 1, 0, n - (e + 1 - p))
            if e2 == NULL:
                return False
            name = PyBytes_FromStringAndSize(e + 1, e2 - (e + 1))
            # an approved statement's Bind asks again (Guard.bind_needs_approval); a
            # statement that rolls back revives portals (Guard.on_bind)
            if self._g_approved and name in self._g_approved or \
                    self._g_rollbacks and name in self._g_rollbacks:
                return False
            # Guard.on_bind here: the portal takes its statement's plan (or loses the
            # plan of the portal it replaces), unless the plan was made under another
            # decision generation (Guard.stale_plan: the hooks judge it again)
            plan = self._g_stmts.get(name)
            if plan is not None:
                gen = plan.gen
                if gen is not None and gen != self._g_gen_now():
                    return False
                self._g_portals[PyBytes_FromStringAndSize(p + 5, e - (p + 5))] = plan
            elif self._g_portals:
                portal = PyBytes_FromStringAndSize(p + 5, e - (p + 5))
                old = self._g_portals.get(portal)
                if old is not None:
                    # the Bind may fail or be skipped: the replaced portal is kept as a
                    # ghost (Guard.on_bind; the hooks when there are too many)
                    if portal not in self._g_ghosts and len(self._g_ghosts) >= 1024:
                        return False
                    del self._g_portals[portal]
                    self._g_ghosts[portal] = (old, self._guard.seg_no)
            return True
        if t == EXECUTE:                        # portal, row limit
            e = <const char*>memchr(p + 5, 0, n - 5)
            if e == NULL:
                return False
            if self._g_portals or self._g_rb_portals:     # (the name only when needed)
                name = PyBytes_FromStringAndSize(p + 5, e - (p + 5))
                if self._g_portals and name in self._g_portals or \
                        self._g_rb_portals and name in self._g_rb_portals:
                    return False
            self._guard.seg_exec = self._guard.seg_exec + 1
            return True
        if t == CLOSE:                          # kind, name
            e = <const char*>memchr(p + 6, 0, n - 6)
            if e == NULL:
                return False
            name = PyBytes_FromStringAndSize(p + 6, e - (p + 6))
            if p[5] == TARGET_STATEMENT and self._g_approved and name in self._g_approved:
                return False
            return name not in (self._g_stmts if p[5] == TARGET_STATEMENT else self._g_portals)
        return False

    def hold_count(self, long long limit):
        """Hold what the upstream sends next up to its ReadyForQuery, for the guard's
        in-block lane (see the class layout)."""
        self._hold_limit = limit
        self._held = bytearray()
        self._held_pos = 0
        self._held_count = 0
        self._held_counted = False

    @property
    def holding(self):
        return self._hold_limit >= 0

    cdef int _hold_scan(self) except -1:
        # 0: wait for more; 1: its ReadyForQuery is in, within the limit, no error;
        # 2: Python decides (an error, past the limit, a tag not read here, too much)
        cdef const char* p = PyByteArray_AS_STRING(self._held)
        cdef Py_ssize_t n = PyByteArray_GET_SIZE(self._held)
        cdef Py_ssize_t pos = self._held_pos
        cdef Py_ssize_t ln, i, sp
        cdef long long v
        cdef char t
        while pos + 5 <= n:
            t = p[pos]
            ln = <Py_ssize_t>_be32(p + pos + 1)
            if ln < 4:
                return 2
            if pos + 1 + ln > n:
                break
            if t == ERROR_RESPONSE:
                return 2
            if t == READY_FOR_QUERY:
                self._held_pos = pos + 1 + ln
                return 1 if self._held_counted and self._held_count <= self._hold_limit \
                    else 2
            if t == COMMAND_COMPLETE or t == EMPTY_QUERY_RESPONSE or t == PORTAL_SUSPENDED:
                if self._held_counted:
                    # a second result before the ReadyForQuery: answers of something
                    # else than the one statement the lane was started for (e.g. an
                    # unsynced Execute ahead of it): Python reads and counts them all
                    return 2
                self._held_counted = True
                if t == COMMAND_COMPLETE:               # "TAG ... N\0"
                    sp = -1
                    for i in range(pos + 5, pos + ln):
                        if p[i] == 32:
                            sp = i
                    v = 0
                    if sp >= 0:
                        if pos + ln - 1 - sp > 18 or pos + ln - 1 - sp < 1 or \
                                p[pos + ln] != 0:
                            return 2
                        for i in range(sp + 1, pos + ln):
                            if p[i] < 48 or p[i] > 57:
                                return 2
                            v = v * 10 + (p[i] - 48)
                    self._held_count = v
            pos += 1 + ln
        self._held_pos = pos
        return 2 if n > HOLD_MAX else 0

    def set_peer(self, peer):
        self.peer = peer
        self._peer_write = peer.write
        self._peer_writelines = _writelines_of(peer)

    def connection_made(self, transport):
        self.transport = transport

    def sink_to(self, sink):
        """Client side: hand every chunk from now on to ``sink.data_received``, raw
        (a hold's or a lookup's RawReader), until :meth:`unsink`."""
        self._raw_sink = sink

    def unsink(self, sink):
        """Scan what arrives again, if ``sink`` is still the one chunks go to."""
        if self._raw_sink is sink:
            self._raw_sink = None

    @property
    def reader(self):
        """Whoever reads the client's chunks now: the sink, or this pipe."""
        return self._raw_sink if self._raw_sink is not None else self

    def data_received(self, bytes data):
        cdef list items
        if self._client_side:
            if self._raw_sink is not None:
                self._raw_sink.data_received(data)
                return
            if self._bad_seen:
                return          # past a malformed frame: Postgres reads no further
            whole = self.scan._hdr_fill == 0 and self.scan._remain == 0
            items = self.scan.feed(data)
            if self.divert:
                if self.mask is not None:
                    self.mask.idle = False
                self._hooks.client_items(items)
            elif len(items) == 1 and type(items[0]) is bytes and self.scan.rest is None:
                self._peer_write(items[0])      # nothing watched in this chunk
            elif self.mask is not None and self.mask.on:
                self._mask_chunk(items)
            else:
                self._client_chunk(items, data if whole else None)
            if self.scan.error is not None:
                # what came before the malformed frame went its way first
                self._bad_seen = True
                self._hooks.frame_error(self.scan.error, self.scan.bad)
            elif PyBytes_GET_SIZE(data) >= YIELD_BYTES and not self._yielded:
                self._yield_turn()
            if self.fast_log is not None and len(self.fast_log) > LOG_BOUND:
                # no answer may come for a long time (after an error Postgres skips to
                # Sync, answering nothing): the log is read now, not at the next answer
                self._hooks.log_full()
            return
        cdef int r = 0
        if self._hold_limit >= 0 and not self.divert:
            self._held += data
            r = self._hold_scan()
            if r == 0:
                return
            data = bytes(self._held)
            self._hold_limit = -1
            self._held = None
            if r == 2:
                self._hooks.hold_fallback()     # diverts: Python reads it all
        if self.divert:
            if self.mask is not None and self.mask.z > 0:
                self._mask_answers(data)        # answers of the masking lane
                return
            self._hooks.backend_items(self.scan.feed(data))
            return
        # upstream: the client gets the bytes first, the scan only reads them
        self._peer_write(data)
        items = self.scan.feed(data)
        if items:
            self._hooks.backend_events(items)
        if r == 1:
            self._hooks.hold_done()
        if self.notify_chunks:
            self._hooks.backend_chunk()

    cdef _client_chunk(self, list items, bytes data):
        # forward runs and cache-allowed statements; hand the rest (from the first
        # message Python must see) to hooks.client_items, which takes scan.rest too.
        # data is the chunk when it began at a message boundary: when every piece of it
        # goes on unchanged it is written as it came (no join: a join of a large chunk
        # costs a fresh allocation and a copy of every byte)
        cdef list out = []
        cdef Py_ssize_t i, n
        cdef Py_ssize_t total = 0
        cdef bint ok
        cdef int t
        while True:
            n = len(items)
            for i in range(n):
                it = items[i]
                if type(it) is bytes:
                    out.append(it)
                    total += PyBytes_GET_SIZE(it)
                    continue
                t = (<tuple>it)[0]
                msg = (<tuple>it)[1]
                if type(msg) is StreamedPrefix:
                    # forwarded already, as it came: only the audit hears of it
                    data = None
                    if self.fast_log is not None:
                        self.fast_log.append((bytes(msg), None, _now_ns()))
                    continue
                d = None
                if t == QUERY or t == PARSE:
                    if self.exact is not None:
                        d = self._cached_allow(msg)
                        ok = d is not None
                    else:
                        self._last_entry = None     # (of an earlier message)
                        ok = self.allow_all and _well_formed(msg)
                    if ok:
                        self._fast += 1
                        if t == PARSE and self.stmt_gens is not None:
                            # (only an unnamed Parse is forwarded here)
                            self.stmt_gens[b""] = self._sig_gen()
                            self.unnamed_parse = msg
                elif t == BIND and self.stmt_gens is not None and self._bind_stale(msg):
                    ok = False                  # judged again by the hooks
                elif self._guard is not None and (t == BIND or t == EXECUTE or t == SYNC
                                                    or t == CLOSE):
                    ok = self._guard_passes(t, msg)
                    if not ok and t == EXECUTE and i == n - 2 and self.scan.rest is None:
                        # a guarded portal's Execute with its Sync last in the chunk:
                        # the guard's in-block lane, when it can take it now
                        # (Guard.lane_execute), forwards both from here
                        nxt = items[i + 1]
                        if type(nxt) is tuple and (<tuple>nxt)[0] == SYNC and \
                                self._guard.lane_execute(msg, (<tuple>nxt)[1]):
                            sync = (<tuple>nxt)[1]
                            out.append(msg)
                            out.append(sync)
                            total += PyBytes_GET_SIZE(msg) + PyBytes_GET_SIZE(sync)
                            if self.fast_log is not None:
                                now = _now_ns()
                                self.fast_log.append((msg, None, now))
                                self.fast_log.append((sync, None, now))
                            break
                elif t == BIND and self.stmt_gens is not None and self.exact is not None:
                    ok = True                   # watched for its statement's generation
                else:
                    ok = self.log_types is not None and \
                        memchr(PyBytes_AS_STRING(self.log_types), <int>t,
                               PyBytes_GET_SIZE(self.log_types)) != NULL
                if not ok:
                    self._flush(out)
                    if self.mask is not None:
                        self.mask.idle = False
                    if t == QUERY and self.guard_query is not None and i == n - 1 and \
                            self.exact is not None and \
                            self._last_entry is not None and self.scan.rest is None and \
                            self._last_entry.action == "guarded" and \
                            self.guard_query(msg, self._last_entry, self._last_key):
                        self._last_entry = None
                        return          # run on the guard's in-block lane
                    self._hooks.client_items(items if i == 0 else items[i:])
                    return
                out.append(msg)
                total += PyBytes_GET_SIZE(msg)
                if self.fast_log is not None:
                    if t == QUERY and d is not None and self._last_key is not None:
                        self.fast_log.append((msg, d, _now_ns(), self._last_key))
                    else:
                        self.fast_log.append((_log_form(msg), d, _now_ns()))
            rest = self.scan.rest
            if rest is None:
                break
            data = None
            self.scan.rest = None
            items = self.scan.feed(rest)
        if data is not None and total == PyBytes_GET_SIZE(data) and self.scan.error is None \
                and self.scan._hdr_fill == 0 and self.scan._remain == 0:
            self._peer_write(data)
        else:
            self._flush(out)

    cdef object _mask_query_ok(self, bytes msg):
        # the cached decision when it allows this Query and its text or shape is safe
        # for the masking lane, else None
        cdef MaskLane lane = self.mask
        cdef const char* p = PyBytes_AS_STRING(msg)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(msg)
        self._last_key = None
        if self.exact is None:
            return None
        d = self.exact.get(msg)
        safe = msg in lane.exact
        if d is None or not safe:
            if not _well_formed(msg):
                return None
            key = self._last_key = shape_buf(<const unsigned char*>p + 5, n - 6)
            if key is None:
                return None
            if d is None:
                d = self.shapes.get(key)
                if d is None:
                    return None
            if not safe and key not in lane.shapes:
                return None
        if d.action != "allow":
            return None
        return d

    cdef _mask_chunk(self, list items):
        # the masking lane, client side: a Query whose cached decision allows it and
        # whose text or shape is safe, and whole extended segments (Bind of a safe
        # prepared statement to the unnamed portal, Describe of that portal, Execute,
        # ... Sync) are forwarded here while Python has nothing in flight. From the
        # first message that is not, the rest (with the open segment) goes to
        # hooks.client_items; so does a segment the chunk ends in the middle of.
        cdef MaskLane lane = self.mask
        cdef list out = []
        cdef list seg = None           # the open segment's items, held back
        cdef list seglog = None
        cdef Py_ssize_t i, n, ln
        cdef int t
        cdef int step = 0              # in a segment: 1 bound, 2 described, 3 executed
        cdef bint ok
        cdef const char* p
        cdef const char* e
        cdef bint logged
        while True:
            n = len(items)
            for i in range(n):
                it = items[i]
                if type(it) is bytes:
                    if seg is not None:
                        seg.append(it)
                    else:
                        out.append(it)
                    continue
                t = (<tuple>it)[0]
                msg = (<tuple>it)[1]
                ok = False
                d = None
                if lane.idle and type(msg) is bytes:
                    p = PyBytes_AS_STRING(msg)
                    ln = PyBytes_GET_SIZE(msg)
                    if t == QUERY:
                        if seg is None:
                            d = self._mask_query_ok(msg)
                            ok = d is not None
                    elif t == BIND:                     # unnamed portal, safe statement
                        if (step == 0 or step == 3) and ln >= 7 and p[5] == 0 and not (
                                self.stmt_gens is not None and self._bind_stale(msg)):
                            e = <const char*>memchr(p + 6, 0, ln - 6)
                            if e != NULL and PyBytes_FromStringAndSize(p + 6, e - (p + 6)) \
                                    in lane.stmts:
                                ok = True
                                step = 1
                    elif t == DESCRIBE:                 # of the unnamed portal
                        if step == 1 and ln == 7 and p[5] == TARGET_PORTAL and p[6] == 0:
                            ok = True
                            step = 2
                    elif t == EXECUTE:                  # of the unnamed portal
                        if step == 2 and ln >= 10 and p[5] == 0:
                            ok = True
                            step = 3
                    elif t == SYNC:
                        ok = step == 3
                if not ok:
                    if seg is not None:
                        seg.extend(items[i:])
                        rest_items = seg
                    else:
                        rest_items = items if i == 0 else items[i:]
                    self._flush(out)
                    lane.idle = False
                    self._hooks.client_items(rest_items)
                    return
                logged = self.fast_log is not None and self.log_types is not None and \
                    memchr(PyBytes_AS_STRING(self.log_types), <int>t,
                           PyBytes_GET_SIZE(self.log_types)) != NULL
                if t == QUERY:
                    out.append(msg)
                    lane.z += 1
                    lane.dirty |= 3
                    lane.stmts.discard(b"")     # a Query replaces the unnamed statement
                    lane.forwarded += 1
                    self._fast += 1
                    if self.fast_log is not None:
                        if self._last_key is not None:
                            self.fast_log.append((msg, d, _now_ns(), self._last_key))
                        else:
                            self.fast_log.append((msg, d, _now_ns()))
                    continue
                if seg is None:
                    seg = []
                    seglog = []
                seg.append(it)                  # as scanned: Python may get it back
                if logged:
                    seglog.append(msg)
                if t == SYNC:                           # the segment is whole: it goes
                    for x in seg:
                        out.append(x if type(x) is bytes else (<tuple>x)[1])
                    seg = None
                    step = 0
                    lane.z += 1
                    lane.dirty |= 2
                    lane.forwarded += 1
                    if seglog:
                        now = _now_ns()
                        for m in seglog:
                            self.fast_log.append((_log_form(m), None, now))
                    seglog = None
            rest = self.scan.rest
            if rest is None:
                break
            self.scan.rest = None
            items = self.scan.feed(rest)
        self._flush(out)
        if seg is not None:
            # the chunk ends inside a segment: Python takes it (and what follows)
            lane.idle = False
            self._hooks.client_items(seg)

    cdef object _mask_plan(self, bytes msg):
        # the detectors' plan for the rows after this RowDescription; False: Python
        # takes over (the catalog must be read again first)
        cdef MaskLane lane = self.mask
        cdef long long g = lane._generation()
        if g != lane._gen:
            lane.plans.clear()
            lane._gen = g
        plan = lane.plans.get(msg, _MISSING)
        if plan is _MISSING:
            plan = lane.state.fast_rowdesc(msg)
            if plan is False:
                return False
            if len(lane.plans) > 1024:
                lane.plans.clear()
            lane.plans[msg] = plan
        return plan

    cdef _mask_answers(self, bytes data):
        # the masking lane, upstream side: the answers of what the lane forwarded,
        # rows rewritten by the rewriter under the detectors' plan of their
        # RowDescription; channels (errors, notices...) scrubbed by Python; anything
        # else (COPY, a stale catalog) and everything after the lane's last
        # ReadyForQuery goes to Python
        cdef MaskLane lane = self.mask
        cdef RowRewriter rw = lane.rw
        cdef list items
        cdef list out = []
        cdef list events = [] if lane.track else None
        cdef Py_ssize_t i, n
        cdef long long nz = 0
        cdef int t
        cdef bint fallback = False
        # the chunk began and ended at message boundaries and nothing in it changed:
        # it goes as it came (no join)
        cdef bint same = self.scan._hdr_fill == 0 and self.scan._remain == 0
        rest = None
        items = self.scan.feed(data)
        n = len(items)
        for i in range(n):
            it = items[i]
            if type(it) is bytes:
                x = rw.feed(<bytes>it)
                same = same and x is it
                out.append(x)
                continue
            t = (<tuple>it)[0]
            msg = (<tuple>it)[1]
            if t == ROW_DESCRIPTION:
                plan = self._mask_plan(msg)
                if plan is False:
                    fallback = True
                    rest = items[i:]
                    break
                x = rw.feed(msg)
                same = same and x is msg
                out.append(x)
                rw.set_plan(plan)
                continue
            if t == ERROR_RESPONSE or t == NOTICE_RESPONSE or t == NOTIFICATION_RESPONSE or \
                    t == PARAMETER_STATUS or t == FUNCTION_CALL_RESPONSE:
                x = rw.feed(lane.state.fast_channel(t, msg))
                same = same and x is msg
                out.append(x)
                if t == ERROR_RESPONSE and events is not None and x is not msg:
                    # the audit records the error as the client got it (scrubbed):
                    # the original pairs it with its statement (by identity)
                    events.append((SCRUBBED_ERROR, x))
            elif t == DATA_ROW or t == COMMAND_COMPLETE or t == EMPTY_QUERY_RESPONSE or \
                    t == PORTAL_SUSPENDED or t == READY_FOR_QUERY or t == NO_DATA or \
                    t == BIND_COMPLETE or t == PARAMETER_DESCRIPTION:
                x = rw.feed(msg)
                same = same and x is msg
                out.append(x)
            else:                                       # COPY, or what the lane never sends
                fallback = True
                rest = items[i:]
                break
            if events is not None and (t == COMMAND_COMPLETE or t == ERROR_RESPONSE or
                                       t == EMPTY_QUERY_RESPONSE or t == PORTAL_SUSPENDED or
                                       t == READY_FOR_QUERY):
                events.append(it)
            if t == READY_FOR_QUERY:
                nz += 1
                lane.z -= 1
                if lane.z == 0:
                    if i + 1 < n:
                        rest = items[i + 1:]
                    break
        if same and rest is None and self.scan._hdr_fill == 0 and self.scan._remain == 0:
            self._peer_write(data)
        else:
            self._flush(out)
        if nz:
            self._hooks.lane_readies(nz)   # the session's Enforcement part counts them
        if events:
            self._hooks.backend_events(events)
        if fallback:
            lane.state.fast_fallback(rest)
        elif rest is not None:
            self._hooks.backend_items(rest)
        if self.notify_chunks:
            self._hooks.backend_chunk()

    cdef _flush(self, list out):
        cdef Py_ssize_t n = len(out)
        cdef Py_ssize_t size = 0
        if n == 0:
            return
        if n == 1:
            self._peer_write(out[0])
            return
        if self._peer_writelines is not None:
            for x in out:
                size += len(x)
            if size >= 8192 * n:
                # large pieces (a pipeline of big Binds): one writev, no joined copy
                self._peer_writelines(out)
                return
        self._peer_write(b"".join(out))

    def eof_received(self):
        # a client's half-close: the session may keep the socket open to answer it
        return self._client_side and self._hooks.client_eof()

    def connection_lost(self, exc):
        if self._client_side:
            self._hooks.client_gone()
        else:
            self._hooks.upstream_lost(exc)

    cdef _yield_turn(self):
        t = self.transport
        if not t.is_reading() or t.get_protocol() is not self or self._raw_sink is not None:
            return          # paused by someone else, or handed over: theirs to resume
        t.pause_reading()
        self._yielded = True
        if self._call_soon is None:
            self._call_soon = asyncio.get_running_loop().call_soon
        self._call_soon(self._end_turn)

    def _end_turn(self):
        # our own pause ends unless the session keeps the client paused for a reason
        # of its own (whoever paused it then resumes it)
        self._yielded = False
        t = self.transport
        if self._bad_seen or self.scan.error is not None or t.is_closing():
            return
        if self._hooks.client_may_read():
            t.resume_reading()

    def pause_writing(self):
        # our transport's buffer is full: stop reading from the peer
        self.writing_paused = True
        self.peer.pause_reading()

    def resume_writing(self):
        self.writing_paused = False
        if not self.peer.is_closing():
            self.peer.resume_reading()
