# Layout of the expected-answers model (answers.pyx): what each frontend message sent
# upstream will be answered with, by Postgres' own rules.

from libc.stdint cimport uint8_t, int32_t


cdef class Answers:
    # the frontend messages still to be answered, oldest first: a ring of type bytes and
    # each one's ordinal among the messages of its type since the last Sync/Query/
    # FunctionCall (a Parse's error names which Parse of its pipeline failed)
    cdef uint8_t* _type
    cdef int32_t* _ord
    cdef Py_ssize_t _cap, _head, _len
    cdef Py_ssize_t _syncs          # Syncs among them
    cdef int32_t _seg[256]          # per type: messages sent since the last S/Q/F
    # the head has had part of its answer (it is not skipped or swallowed any more)
    cdef bint _started
    # an extended-protocol message failed: Postgres ignores everything up to Sync
    cdef public bint skipping
    # CopyInResponses / CopyBothResponses whose CopyDone / CopyFail is still to be
    # passed: the frontend messages behind the COPY's own message up to it are its data (a Sync or Flush there is
    # swallowed by the COPY and gets no answer)
    cdef public int copy_in
    # Queries and FunctionCalls Postgres skipped after an extended-protocol error
    cdef public long long skipped
    # the listeners' queues (see listen()): per ErrorResponse (69, type of the message
    # it answers or 0, its ordinal, the message), per ReadyForQuery (90, Syncs a COPY
    # swallowed since the last one, skipped as of it, the message)
    cdef list _listeners
    cdef long long _swallowed
    # the writer side: a message header split across writes, body bytes still to come
    cdef char _hdr[5]
    cdef int _hdr_fill
    cdef Py_ssize_t _remain

    cdef int front(self, uint8_t t) except -1
    cdef int back(self, uint8_t t) except -1
    cdef int _settle(self) except -1
    cdef int _pop(self) except -1
    cdef int _tell(self, tuple item) except -1
    cpdef int sent(self, bytes data) except -1
    cdef int note(self, object msg) except -1


cdef inline Py_ssize_t stash_header(char* hdr, int fill, const char* p,
                                    Py_ssize_t avail) noexcept nogil:
    # a message header split across chunks: copy what is here of the rest of its 5 bytes
    # (avail bytes at p) behind the fill already in hdr; returns how many it took
    cdef Py_ssize_t take = 5 - fill
    cdef Py_ssize_t i
    if take > avail:
        take = avail
    for i in range(take):
        hdr[fill + i] = p[i]
    return take
