# Layout of the relay scan: walks a stream of typed Postgres messages chunk by chunk,
# forwarding by default and handing whole "interesting" messages to Python.

from libc.stdint cimport uint8_t, uint32_t

from .answers cimport Answers


cdef class MessageScan:
    # per type byte: 1 = deliver whole to Python, 0 = forward untouched
    cdef uint8_t _interest[256]
    # per type byte: 1 = a type the peer may send (others: FrameError)
    cdef uint8_t _valid[256]
    # per type byte: 1 = counted in .count (e.g. Query/Sync/FunctionCall, ReadyForQuery)
    cdef uint8_t _counted[256]
    # True: interesting messages are withheld from the forward stream and Python
    # decides what to send (frontend); False: they are forwarded and copied (backend)
    cdef bint _withhold
    cdef Py_ssize_t _max_len
    # per type byte: the longest message Postgres itself reads (length field included;
    # 0 = no bound of Postgres' own). A longer one is malformed as Postgres judges it
    # ("length": it closes without a word); one only within _max_len is ours ("limit")
    cdef uint32_t _pg_max[256]

    # a header split across chunks: its bytes so far (_hdr_fill of 5)
    cdef char _hdr[5]
    cdef int _hdr_fill
    # body bytes of the current message still to come (0 = at a header)
    cdef Py_ssize_t _remain
    cdef uint8_t _cur_type
    # collecting the current message whole into _hold (it is interesting)
    cdef bint _collect
    # a header split across chunks whose first _hdr_sent bytes were already
    # forwarded raw (the scan switched to withhold mode in between): the message
    # stays raw, and only the rest of its header is emitted
    cdef int _hdr_sent
    # the current message is a ReadyForQuery whose status byte is still to come
    cdef bint _want_status
    cdef bytearray _hold

    # counters Python reads after feed(): messages of counted types seen, and the
    # transaction status byte of the last ReadyForQuery ('I', 'T', 'E')
    cdef public long long count
    # backend, for the audit: DataRows since the last completion; while .suspended is a
    # list, the count at each PortalSuspended is appended to it (the statement tracker
    # takes them in order: a suspended Execute's tag-less answer)
    cdef long long _rows
    cdef public object suspended
    cdef public int status
    # total bytes and messages seen, for metrics
    cdef public long long bytes_seen
    cdef public long long messages

    # withhold mode: per type byte, stop after such a withheld message; the unscanned
    # rest waits in .rest so Python can change the interest before the next byte
    cdef uint8_t _stop[256]
    cdef public object rest

    # withhold mode: the first malformed frame ends the stream. feed() returns what
    # came before it; .error says why (a FrameError), .bad holds its 5 header bytes,
    # and every later feed() returns nothing
    cdef public object error
    cdef public bytes bad
    # the type of the last message begun (e.g. 'E' when a backend's last word was an
    # ErrorResponse)
    cdef public int last_type
    # frontend (track_sync set): an extended-protocol message (Parse, Bind, Describe,
    # Execute, Close, Flush) was scanned since the last Sync (unsynced), and whether one
    # was when the last Query began (query_unsynced): its answers, and what it did to the
    # transaction, come before the Query's (or Postgres skips the Query, after an error)
    cdef public bint track_sync
    cdef public bint unsynced
    cdef public bint query_unsynced
    # and whether one was when the last extended-protocol message began (a Parse stops
    # the scan: for it, whether it is the first of its segment)
    cdef public bint before_unsynced

    # withhold mode: a message of an interesting type longer than stream_over (0: never)
    # is not held whole but forwarded as it comes; its header and first stream_keep body
    # bytes come back, after its bytes, as (type, StreamedPrefix) for the audit
    cdef public Py_ssize_t stream_over
    cdef public Py_ssize_t stream_keep
    cdef bint _streaming

    # the backend scan: every message's type goes to the session's expected-answers
    # model (None: none)
    cdef public Answers model

    cpdef list feed(self, bytes data)
    cpdef bint set_withhold(self, bint on)
    cdef int _begin(self, uint8_t t, uint32_t length) except -1
    cdef _finish_collect(self, list out)
    cdef list _malformed(self, object err, bytes hdr, list out)
    cdef object _streamed(self)
    cpdef set_interest(self, bytes types, bint on)
    cpdef set_stop(self, bytes types, bint on)
