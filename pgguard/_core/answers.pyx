# The expected-answers model: pairs every frontend message sent upstream with the
# backend messages that answer it, by Postgres' own rules (postgres.c PostgresMain and
# SocketBackend, copyfromparse.c CopyGetData). One model per session; the audit
# tracker, masking and the session's count of ReadyForQuery still owed follow it.
# cython: language_level=3

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from libc.stdint cimport uint8_t, uint32_t, int32_t
from libc.string cimport memset

from .msgtypes cimport (BIND, BIND_COMPLETE, CLOSE, CLOSE_COMPLETE, COMMAND_COMPLETE,
                        COPY_BOTH_RESPONSE, COPY_DATA, COPY_DONE, COPY_FAIL, COPY_IN_RESPONSE,
                        DESCRIBE, EMPTY_QUERY_RESPONSE, ERROR_RESPONSE, EXECUTE, FUNCTION_CALL,
                        NO_DATA, NOTICE_RESPONSE, NOTIFICATION_RESPONSE, PARAMETER_STATUS,
                        PARSE, PARSE_COMPLETE, PORTAL_SUSPENDED, QUERY, READY_FOR_QUERY,
                        ROW_DESCRIPTION, SYNC)

# what answers each frontend message: Parse '1', Bind '2', Close '3', Describe ['t'] then
# 'T' / 'n', Execute DataRow* then 'C' / 'I' / 's', Sync and Query 'Z', FunctionCall 'V'
# then 'Z'; CopyData / CopyDone / CopyFail nothing
# the longest message Postgres reads, length field included (postgres.c SocketBackend:
# PQ_LARGE_MESSAGE_LIMIT; PQ_SMALL_MESSAGE_LIMIT for the small types): a longer header
# (a frame pgguard or Postgres refuses) is no message, Postgres closes on it
DEF PG_MAX_LEN = 0x3ffffffe
DEF PG_SMALL_LEN = 10000


cdef inline uint32_t _be32(const char* p) noexcept nogil:
    return ((<uint32_t><uint8_t>p[0]) << 24) | ((<uint32_t><uint8_t>p[1]) << 16) | \
           ((<uint32_t><uint8_t>p[2]) << 8) | (<uint32_t><uint8_t>p[3])


cdef inline bint _extended(uint8_t t) noexcept nogil:
    # an error answering one of these makes Postgres skip everything up to Sync
    return t == PARSE or t == BIND or t == EXECUTE or t == DESCRIBE or \
        t == CLOSE


cdef inline bint _large(uint8_t t) noexcept nogil:
    return t == BIND or t == FUNCTION_CALL or t == PARSE or t == QUERY or t == COPY_DATA


cdef inline bint _readies(uint8_t t) noexcept nogil:
    return t == SYNC or t == QUERY or t == FUNCTION_CALL


cdef inline bint _closes(uint8_t f, uint8_t b) noexcept nogil:
    # backend message b is the last of frontend message f's answer (errors aside)
    if f == PARSE:
        return b == PARSE_COMPLETE
    if f == BIND:
        return b == BIND_COMPLETE
    if f == CLOSE:
        return b == CLOSE_COMPLETE
    if f == DESCRIBE:
        return b == ROW_DESCRIPTION or b == NO_DATA     # ('t' comes before)
    if f == EXECUTE:
        return b == COMMAND_COMPLETE or b == EMPTY_QUERY_RESPONSE or b == PORTAL_SUSPENDED
    return False


cdef class Answers:
    """What the upstream still owes, by Postgres' rules.

    Fed with every frontend message sent upstream (:meth:`sent`, or the
    :class:`AnswerWriter` in front of the upstream transport) and with every backend
    message's type (``back``, called by the backend MessageScan it is attached to).
    Answers come strictly in order; NoticeResponse, ParameterStatus and
    NotificationResponse pair with nothing. An ErrorResponse answering a Parse, Bind,
    Execute, Describe or Close makes Postgres ignore every message (Query and
    FunctionCall included) up to Sync; CopyData, CopyDone and CopyFail outside a COPY are
    ignored; inside a COPY FROM STDIN a Sync or Flush is swallowed.

    Example::

        a = Answers()
        a.sent(parse_bad + query + sync)   # bytes written upstream
        # ... backend: 'E' (the Parse's error), then 'Z' (the Sync's)
        a.owed()                           # ReadyForQuery still owed: 0
    """

    def __cinit__(self):
        self._cap = 64
        self._type = <uint8_t*>PyMem_Malloc(self._cap)
        self._ord = <int32_t*>PyMem_Malloc(self._cap * sizeof(int32_t))
        if self._type == NULL or self._ord == NULL:
            raise MemoryError()
        self._head = 0
        self._len = 0
        self._syncs = 0
        memset(self._seg, 0, sizeof(self._seg))
        self._started = False
        self.skipping = False
        self.copy_in = 0
        self.skipped = 0
        self._listeners = []
        self._swallowed = 0
        self._hdr_fill = 0
        self._remain = 0

    def __dealloc__(self):
        PyMem_Free(self._type)
        PyMem_Free(self._ord)

    # -- frontend
    cdef int front(self, uint8_t t) except -1:
        cdef Py_ssize_t i, j, cap
        cdef uint8_t* nt
        cdef int32_t* no
        if not (_extended(t) or _readies(t) or t == COPY_DONE or t == COPY_FAIL):
            return 0            # Flush, CopyData, Terminate: never answered
        if self.skipping and self._syncs == 0 and _extended(t):
            # after an error, before the Sync that ends the skip: Postgres reads and
            # drops it, and so does the model (a client flooding Executes after an
            # error would otherwise grow the ring without bound)
            return 0
        if t == SYNC:
            self._syncs += 1
        if self._len == self._cap:
            cap = self._cap * 2
            nt = <uint8_t*>PyMem_Malloc(cap)
            no = <int32_t*>PyMem_Malloc(cap * sizeof(int32_t))
            if nt == NULL or no == NULL:
                PyMem_Free(nt)
                PyMem_Free(no)
                raise MemoryError()
            for i in range(self._len):
                j = (self._head + i) % self._cap
                nt[i] = self._type[j]
                no[i] = self._ord[j]
            PyMem_Free(self._type)
            PyMem_Free(self._ord)
            self._type, self._ord, self._cap, self._head = nt, no, cap, 0
        j = (self._head + self._len) % self._cap
        self._type[j] = t
        self._ord[j] = self._seg[t]
        self._len += 1
        if _readies(t):
            memset(self._seg, 0, sizeof(self._seg))
        else:
            self._seg[t] += 1
        return 0

    cpdef int sent(self, bytes data) except -1:
        """Frontend bytes written upstream (whole messages or pieces of them)."""
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t pos = 0, take
        cdef uint32_t length
        cdef const char* h
        while pos < n:
            if self._remain:
                take = self._remain if self._remain <= n - pos else n - pos
                pos += take
                self._remain -= take
                continue
            if self._hdr_fill or n - pos < 5:
                take = stash_header(self._hdr, self._hdr_fill, p + pos, n - pos)
                self._hdr_fill += take
                pos += take
                if self._hdr_fill < 5:
                    break
                self._hdr_fill = 0
                h = self._hdr
            else:
                h = p + pos
                pos += 5
            length = _be32(h + 1)
            if length < 4:
                continue
            if length <= (PG_MAX_LEN if _large(<uint8_t>h[0]) else PG_SMALL_LEN):
                self.front(<uint8_t>h[0])
            self._remain = length - 4
        return 0

    # -- backend
    cdef int _pop(self) except -1:
        if self._type[self._head] == SYNC:
            self._syncs -= 1
        self._head = (self._head + 1) % self._cap
        self._len -= 1
        self._started = False
        return 0

    cdef int _settle(self) except -1:
        # drop what gets no answer before the next answered message: a COPY's data
        # (Sync / Flush swallowed there), CopyDone/CopyFail outside a COPY, and
        # everything up to Sync after an extended-protocol error
        cdef uint8_t t
        while self._len:
            t = self._type[self._head]
            if self.copy_in:
                if t == COPY_DONE or t == COPY_FAIL:
                    self.copy_in -= 1
                elif t == SYNC:
                    self._swallowed += 1
                self._pop()
                continue
            if t == COPY_DONE or t == COPY_FAIL:
                self._pop()
                continue
            if self.skipping and t != SYNC:
                if t == QUERY or t == FUNCTION_CALL:
                    self.skipped += 1
                self._pop()
                continue
            return 0
        return 0

    cdef int back(self, uint8_t t) except -1:
        cdef uint8_t h
        if t == NOTICE_RESPONSE or t == PARAMETER_STATUS or t == NOTIFICATION_RESPONSE:
            return 0
        if not self._started:
            self._settle()
        if self._len == 0:
            if t == ERROR_RESPONSE and self._listeners:
                self._tell((69, 0, 0, None))    # answers nothing (a FATAL of its own)
            elif t == READY_FOR_QUERY:
                if self._listeners:
                    self._tell((90, self._swallowed, self.skipped, None))
                self._swallowed = 0
                self.skipping = False
            return 0
        h = self._type[self._head]
        if t == ERROR_RESPONSE:
            if self._listeners:
                self._tell((69, h, self._ord[self._head], None))
            if _extended(h):
                self._pop()
                self.skipping = True
            else:
                self._started = True            # Query / FunctionCall / Sync: Z ends it
            return 0
        if t == READY_FOR_QUERY:
            if self._listeners:
                self._tell((90, self._swallowed, self.skipped, None))
            self._swallowed = 0
            while self._len:
                h = self._type[self._head]
                self._pop()
                if _readies(h):
                    break
            self.skipping = False
            return 0
        if t == COPY_IN_RESPONSE or t == COPY_BOTH_RESPONSE:     # its data follows
            self.copy_in += 1
        if _closes(h, t):
            self._pop()
        else:
            self._started = True
        return 0

    cdef int _tell(self, tuple item) except -1:
        for q in self._listeners:
            q.append(item)
        return 0

    cdef int note(self, object msg) except -1:
        # the scan's copy of the ErrorResponse / ReadyForQuery just told: listeners
        # find their entry by it (see answer_for)
        for q in self._listeners:
            if q:
                e = <tuple>q[len(q) - 1]
                if e[3] is None:
                    q[len(q) - 1] = (e[0], e[1], e[2], msg)
        return 0

    def listen(self):
        """A deque that gets, per backend ErrorResponse, ``(69, type, ordinal, msg)``:
        the type of the frontend message it answers (0: none) and that message's
        ordinal among those of its type since the last Sync / Query / FunctionCall; per
        ReadyForQuery ``(90, n, skipped, msg)``: the Syncs a COPY swallowed since the last
        one (they get no ReadyForQuery), and the Queries and FunctionCalls Postgres
        skipped up to this ReadyForQuery (``skipped`` as it was then: the model reads a
        whole backend chunk before its listeners handle its messages). ``msg`` is the backend scan's copy of the message:
        the listener takes its entry with :func:`answer_for`."""
        from collections import deque
        q = deque(maxlen=LISTEN_MAX)
        self._listeners.append(q)
        return q

    def on_backend(self, int t):
        """One backend message of type ``t`` (for callers without a scan)."""
        self.back(<uint8_t>t)

    def owed(self):
        """ReadyForQuery messages the upstream still owes for what it was sent."""
        cdef Py_ssize_t i = 0
        cdef long long n = 0
        cdef int cp = self.copy_in
        cdef bint skip = self.skipping
        cdef uint8_t t
        if self._started and self._len:
            if _readies(self._type[self._head]):
                n += 1
            i = 1
        while i < self._len:
            t = self._type[(self._head + i) % self._cap]
            i += 1
            if cp:
                if t == COPY_DONE or t == COPY_FAIL:
                    cp -= 1
                continue
            if t == COPY_DONE or t == COPY_FAIL or (skip and t != SYNC):
                continue
            if _readies(t):
                n += 1
                skip = False
        return n

    @property
    def pending(self):
        """The frontend message types still unanswered, oldest first (for tests)."""
        if not self._started:
            self._settle()
        return bytes([self._type[(self._head + i) % self._cap] for i in range(self._len)])


# a listener's queue keeps at most this many entries (one per ErrorResponse and
# ReadyForQuery not yet handled: those of a backend chunk, and those pgguard kept from
# that listener, e.g. the answers to its own injected statements)
LISTEN_MAX = 1 << 16


def answer_for(q, msg):
    """The entry of ``q`` (a listen() queue) for the backend message ``msg`` (the scan's
    copy), dropping the older ones (messages this listener did not see); None when
    there is none."""
    cdef Py_ssize_t i = 0
    if not q:
        return None
    for got in q:
        if (<tuple>got)[3] is msg:
            break
        i += 1
    else:
        return None
    while i:
        q.popleft()
        i -= 1
    return q.popleft()


cdef class AnswerWriter:
    """The upstream transport, with every write told to an :class:`Answers` first.
    Everything else is the transport's own."""

    cdef readonly object transport
    cdef readonly Answers answers
    cdef object _write

    def __cinit__(self, transport, Answers answers):
        self.transport = transport
        self.answers = answers
        self._write = transport.write

    def write(self, data):
        if data.__class__ is not bytes:
            data = bytes(data)
        self.answers.sent(<bytes>data)
        self._write(data)

    def writelines(self, list_of_data):
        cdef list parts = [d if d.__class__ is bytes else bytes(d) for d in list_of_data]
        for d in parts:
            self.answers.sent(<bytes>d)
        self.transport.writelines(parts)

    def __getattr__(self, name):
        return getattr(self.transport, name)
