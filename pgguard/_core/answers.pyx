# The expected-answers model: pairs every frontend message sent upstream with the
# backend messages that answer it, by Postgres' own rules (postgres.c PostgresMain and
# SocketBackend, copyfromparse.c CopyGetData). One model per session; the audit
# tracker, masking and the session's count of ReadyForQuery still owed follow it.
# cython: language_level=3

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from libc.stdint cimport uint8_t, uint32_t, int32_t
from libc.string cimport memset

# frontend types
DEF F_PARSE = 80        # 'P' -> ParseComplete '1'
DEF F_BIND = 66         # 'B' -> BindComplete '2'
DEF F_EXECUTE = 69      # 'E' -> DataRow* then 'C' / 'I' / 's'
DEF F_DESCRIBE = 68     # 'D' -> ['t'] then 'T' / 'n'
DEF F_CLOSE = 67        # 'C' -> CloseComplete '3'
DEF F_SYNC = 83         # 'S' -> 'Z'
DEF F_QUERY = 81        # 'Q' -> results then 'Z'
DEF F_FCALL = 70        # 'F' -> 'V' then 'Z'
DEF F_COPYDONE = 99     # 'c'
DEF F_COPYFAIL = 102    # 'f'
# backend types
DEF B_ERROR = 69
DEF B_READY = 90
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
    return t == F_PARSE or t == F_BIND or t == F_EXECUTE or t == F_DESCRIBE or \
        t == F_CLOSE


cdef inline bint _large(uint8_t t) noexcept nogil:
    return t == F_BIND or t == F_FCALL or t == F_PARSE or t == F_QUERY or t == 100


cdef inline bint _readies(uint8_t t) noexcept nogil:
    return t == F_SYNC or t == F_QUERY or t == F_FCALL


cdef inline bint _closes(uint8_t f, uint8_t b) noexcept nogil:
    # backend message b is the last of frontend message f's answer (errors aside)
    if f == F_PARSE:
        return b == 49                          # '1'
    if f == F_BIND:
        return b == 50                          # '2'
    if f == F_CLOSE:
        return b == 51                          # '3'
    if f == F_DESCRIBE:
        return b == 84 or b == 110              # 'T' / 'n' ('t' comes before)
    if f == F_EXECUTE:
        return b == 67 or b == 73 or b == 115   # 'C' / 'I' / 's'
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
        if not (_extended(t) or _readies(t) or t == F_COPYDONE or t == F_COPYFAIL):
            return 0            # Flush, CopyData, Terminate: never answered
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
                if t == F_COPYDONE or t == F_COPYFAIL:
                    self.copy_in -= 1
                elif t == F_SYNC:
                    self._swallowed += 1
                self._pop()
                continue
            if t == F_COPYDONE or t == F_COPYFAIL:
                self._pop()
                continue
            if self.skipping and t != F_SYNC:
                if t == F_QUERY or t == F_FCALL:
                    self.skipped += 1
                self._pop()
                continue
            return 0
        return 0

    cdef int back(self, uint8_t t) except -1:
        cdef uint8_t h
        if t == 78 or t == 83 or t == 65:       # Notice, ParameterStatus, Notification
            return 0
        if not self._started:
            self._settle()
        if self._len == 0:
            if t == B_ERROR and self._listeners:
                self._tell((69, 0, 0, None))    # answers nothing (a FATAL of its own)
            elif t == B_READY:
                if self._listeners:
                    self._tell((90, self._swallowed, 0, None))
                self._swallowed = 0
                self.skipping = False
            return 0
        h = self._type[self._head]
        if t == B_ERROR:
            if self._listeners:
                self._tell((69, h, self._ord[self._head], None))
            if _extended(h):
                self._pop()
                self.skipping = True
            else:
                self._started = True            # Query / FunctionCall / Sync: Z ends it
            return 0
        if t == B_READY:
            if self._listeners:
                self._tell((90, self._swallowed, 0, None))
            self._swallowed = 0
            while self._len:
                h = self._type[self._head]
                self._pop()
                if _readies(h):
                    break
            self.skipping = False
            return 0
        if t == 71 or t == 87:                  # CopyIn / CopyBoth: its data follows
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
        ReadyForQuery ``(90, n, 0, msg)``: the Syncs a COPY swallowed since the last one
        (they get no ReadyForQuery). ``msg`` is the backend scan's copy of the message:
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
                if t == F_COPYDONE or t == F_COPYFAIL:
                    cp -= 1
                continue
            if t == F_COPYDONE or t == F_COPYFAIL or (skip and t != F_SYNC):
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
