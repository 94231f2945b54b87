# Relay scan: decide from each 5-byte header whether a message is forwarded untouched
# or delivered whole to Python; no Python object per forwarded message.
# cython: language_level=3

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.stdint cimport uint32_t, uint8_t
from libc.string cimport memset

from .answers cimport stash_header
from .msgtypes cimport ERROR_RESPONSE, READY_FOR_QUERY

from .framing import FrameError


class StreamedPrefix(bytes):
    """The start of a message forwarded as it came (too long to hold whole): its
    header, its first body bytes, a note of its full size, and a final NUL."""


# PortalSuspended row counts kept for the audit at most (one per suspended Execute not
# yet paired: a pipeline of them; past this, later ones are counted 0)
cdef Py_ssize_t SUSPENDED_KEPT = 4096


cdef inline uint32_t _be32(const char* p) noexcept nogil:
    return ((<uint32_t><uint8_t>p[0]) << 24) | ((<uint32_t><uint8_t>p[1]) << 16) | \
           ((<uint32_t><uint8_t>p[2]) << 8) | (<uint32_t><uint8_t>p[3])


cdef class MessageScan:
    """Walks a message stream chunk by chunk.

    ``feed(chunk)`` returns a list. With ``withhold=True`` (client to server) its items
    are, in stream order, ``bytes`` to forward as they are, or ``(type, message)``
    holding an interesting message whole (header included), which is not forwarded:
    Python decides. A chunk with nothing of interest comes back as ``[chunk]``, the
    same object. With ``withhold=False`` (server to client) the caller forwards every
    chunk itself and the list holds only the ``(type, message)`` copies.

    Example::

        scan = MessageScan(interest=b"QP", valid=b"BCdcfDEHFPQSX", counted=b"QSF")
        for item in scan.feed(data): ...
    """

    def __cinit__(self, bytes interest=b"", bytes valid=None, bytes counted=b"",
                  bint withhold=True, Py_ssize_t max_len=64 * 1024 * 1024,
                  dict pg_limits=None):
        cdef int i
        memset(self._pg_max, 0, sizeof(self._pg_max))
        if pg_limits:
            for types, limit in pg_limits.items():
                for i in range(len(types)):
                    self._pg_max[<uint8_t>types[i]] = limit
        memset(self._interest, 0, 256)
        memset(self._counted, 0, 256)
        memset(self._stop, 0, 256)
        if valid is None:
            memset(self._valid, 1, 256)
        else:
            memset(self._valid, 0, 256)
            for i in range(len(valid)):
                self._valid[<uint8_t>valid[i]] = 1
        for i in range(len(interest)):
            self._interest[<uint8_t>interest[i]] = 1
        for i in range(len(counted)):
            self._counted[<uint8_t>counted[i]] = 1
        self._withhold = withhold
        self._max_len = max_len
        self._hdr_fill = 0
        self._remain = 0
        self._collect = False
        self._want_status = False
        self._hdr_sent = 0
        self._hold = bytearray()
        self.rest = None
        self.error = None
        self.bad = None
        self.last_type = 0
        self.stream_over = 0
        self.stream_keep = 0
        self._streaming = False
        self.count = 0
        self.status = 0
        self.bytes_seen = 0
        self.messages = 0
        self.model = None
        self._rows = 0
        self.suspended = None

    cpdef set_interest(self, bytes types, bint on):
        cdef int i
        for i in range(len(types)):
            self._interest[<uint8_t>types[i]] = 1 if on else 0

    cpdef set_stop(self, bytes types, bint on):
        cdef int i
        for i in range(len(types)):
            self._stop[<uint8_t>types[i]] = 1 if on else 0

    cpdef bint set_withhold(self, bint on):
        """Switch between withholding (Python forwards) and forwarding (the caller
        forwards whole chunks). Leaving withhold mode is refused (False) unless at a
        message boundary; entering it mid-message keeps that message raw."""
        if on == self._withhold:
            return True
        if not on:
            if self._hdr_fill or self._remain:
                return False
            self._withhold = False
            return True
        if self._hdr_fill:
            self._hdr_sent = self._hdr_fill
        elif self._remain and self._collect:
            # its start was already forwarded: finish it raw, without an event
            self._collect = False
            del self._hold[:]
        self._withhold = True
        return True

    @property
    def withhold(self):
        return self._withhold

    def release(self):
        """The session ended: let go of a message still being gathered (up to
        max_message_size; a closed session's objects wait for the cyclic collector)."""
        self._hold = bytearray()
        self._remain = 0
        self._hdr_fill = 0

    def drop_partial(self):
        """The stream ended (the client's end of file): forget a message it began and
        did not finish, as Postgres does at the end of file. True when none is pending or
        it was held whole here (nothing of it forwarded: it is dropped, and no longer
        counted); False when its start was already forwarded (it cannot be taken back)."""
        if self._hdr_fill == 0 and self._remain == 0:
            return True
        if self._hdr_sent or (self._remain and not self._collect) or self._streaming:
            return False
        if self._remain and self._counted[self._cur_type]:
            self.count -= 1             # (counted at its header, in _begin)
        self._hold = bytearray()
        self._remain = 0
        self._hdr_fill = 0
        self._collect = False
        return True

    def take_rest(self):
        r = self.rest
        self.rest = None
        return r

    @property
    def max_len(self):
        """The longest message accepted (length field included)."""
        return self._max_len

    @property
    def at_boundary(self):
        """True when no message is partly read."""
        return self._hdr_fill == 0 and self._remain == 0

    cpdef list feed(self, bytes data):
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t run = 0        # start of the pending forward run in data
        cdef Py_ssize_t take, need
        cdef int i
        cdef uint8_t t
        cdef list out = []

        if self.error is not None:
            return out
        self.bytes_seen += n
        while pos < n:
            if self._remain:
                # inside a message body
                take = self._remain if self._remain <= n - pos else n - pos
                if self._want_status:
                    self.status = <uint8_t>p[pos]
                    self._want_status = False
                if self._collect:
                    self._hold += data[pos:pos + take]
                elif self._streaming and PyByteArray_GET_SIZE(self._hold) < self.stream_keep + 5:
                    self._hold += data[pos:pos + min(take, self.stream_keep + 5 -
                                                     PyByteArray_GET_SIZE(self._hold))]
                pos += take
                self._remain -= take
                if self._streaming and self._remain == 0:
                    if self._withhold and pos > run:
                        out.append(data[run:pos])
                    run = pos
                    out.append((self._cur_type, self._streamed()))
                if self._collect:
                    if self._withhold:
                        run = pos
                    if self._remain == 0:
                        self._finish_collect(out)
                        if self._stop[self._cur_type] and self._withhold and pos < n:
                            self.rest = data[pos:]
                            return out
                continue

            if self._hdr_fill or n - pos < 5:
                # a header split across chunks: stash it; forward nothing of it before
                # we know whether the message is withheld
                if self._withhold and self._hdr_fill == 0 and pos > run:
                    out.append(data[run:pos])
                take = stash_header(self._hdr, self._hdr_fill, p + pos, n - pos)
                self._hdr_fill += take
                pos += take
                run = pos
                if self._hdr_fill < 5:
                    if self._withhold and not self._valid[<uint8_t>self._hdr[0]]:
                        # Postgres judges the type byte before it waits for a length
                        t = <uint8_t>self._hdr[0]
                        self._hdr_fill = 0
                        return self._malformed(
                            FrameError(f"invalid message type {t}", "type"),
                            PyBytes_FromStringAndSize(self._hdr, 1), out)
                    break
                self._hdr_fill = 0
                try:
                    self._begin(<uint8_t>self._hdr[0], _be32(self._hdr + 1))
                except FrameError as e:
                    if not self._withhold:
                        raise
                    return self._malformed(e, PyBytes_FromStringAndSize(self._hdr, 5), out)
                if self._hdr_sent:
                    # begun raw before the switch: emit the rest of the header, and
                    # its body stays raw too
                    out.append(PyBytes_FromStringAndSize(self._hdr + self._hdr_sent,
                                                         5 - self._hdr_sent))
                    self._hdr_sent = 0
                    self._collect = False
                    self._streaming = False
                    continue
                hdr = PyBytes_FromStringAndSize(self._hdr, 5)
                if self._streaming:
                    self._hold += hdr
                if self._collect:
                    self._hold += hdr
                    if self._remain == 0:
                        self._finish_collect(out)
                        if self._stop[self._cur_type] and self._withhold and pos < n:
                            self.rest = data[pos:]
                            return out
                elif self._withhold:
                    out.append(hdr)
                continue

            # a whole header inside this chunk: the common case
            t = <uint8_t>p[pos]
            try:
                self._begin(t, _be32(p + pos + 1))
            except FrameError as e:
                if not self._withhold:
                    raise
                if pos > run:
                    out.append(data[run:pos])
                return self._malformed(e, data[pos:pos + 5], out)
            if not self._collect:
                if self._streaming:
                    self._hold += data[pos:pos + 5]
                pos += 5
                continue
            need = 5 + self._remain
            if need <= n - pos:
                # the whole message is here: one slice, nothing collected
                self._collect = False
                self._remain = 0
                if t == READY_FOR_QUERY:
                    self._want_status = False
                    if need > 5:
                        self.status = <uint8_t>p[pos + 5]
                if self._withhold:
                    if pos > run:
                        out.append(data[run:pos])
                    run = pos + need
                msg = data[pos:pos + need]
                out.append((t, msg))
                if self.model is not None and (t == ERROR_RESPONSE or t == READY_FOR_QUERY):
                    self.model.note(msg)
                pos += need
                if self._stop[t] and self._withhold and pos < n:
                    self.rest = data[pos:]
                    return out
                continue
            if self._withhold:
                if pos > run:
                    out.append(data[run:pos])
                run = pos + 5
            self._hold += data[pos:pos + 5]
            pos += 5

        if self._withhold and n > run:
            out.append(data if run == 0 else data[run:])
        return out

    cdef int _begin(self, uint8_t t, uint32_t length) except -1:
        if not self._valid[t]:
            raise FrameError(f"invalid message type {t!r} ({chr(t)!r})" if 32 < t < 127
                             else f"invalid message type {t}", "type")
        if length < 4 or (self._pg_max[t] and length > self._pg_max[t]):
            raise FrameError(f"invalid message length {length} for message type {chr(t)!r}",
                             "length")
        if length > <uint32_t>self._max_len:
            raise FrameError(
                f"message length {length} exceeds the limit of {self._max_len} bytes",
                "limit")
        self.messages += 1
        self.last_type = t
        if self._counted[t]:
            self.count += 1
        if self.suspended is not None:
            if t == 68:                                 # DataRow
                self._rows += 1
            elif t == 115:                              # PortalSuspended
                if len(self.suspended) < SUSPENDED_KEPT:
                    self.suspended.append(self._rows)
                self._rows = 0
            elif t == 67 or t == 90 or t == 69 or t == 73:  # C Z E I
                self._rows = 0
        if self.track_sync:
            # only a Sync ends what is unsynced: after an error Postgres skips a Query
            # or a FunctionCall too, up to the Sync
            if t == 81:                                 # Query
                self.query_unsynced = self.unsynced
            elif t == 83:                               # Sync
                self.unsynced = False
            elif t == 80 or t == 66 or t == 68 or t == 69 or t == 67 or t == 72:
                self.before_unsynced = self.unsynced    # P B D E C H
                self.unsynced = True
        if self.model is not None:
            self.model.back(t)
        self._cur_type = t
        self._remain = length - 4
        self._collect = self._interest[t]
        self._want_status = t == READY_FOR_QUERY     # keep its status byte
        self._streaming = False
        if self._collect:
            del self._hold[:]
            if self.stream_over and self._withhold and length - 4 > self.stream_over:
                self._collect = False
                self._streaming = True
        return 0

    cdef list _malformed(self, object err, bytes hdr, list out):
        self.error = err
        self.bad = hdr
        self.rest = None
        self._remain = 0
        self._hdr_fill = 0
        self._collect = False
        return out

    cdef object _streamed(self):
        cdef Py_ssize_t size = PyByteArray_GET_SIZE(self._hold)
        note = b" ... [pgguard: message of %d bytes, first %d kept]" % (
            _be32(PyByteArray_AS_STRING(self._hold) + 1) + 1, size - 5)
        msg = StreamedPrefix(bytes(self._hold) + note + b"\0")
        del self._hold[:]
        self._streaming = False
        return msg

    cdef _finish_collect(self, list out):
        cdef bytes msg = bytes(self._hold)
        del self._hold[:]
        self._collect = False
        out.append((self._cur_type, msg))
        if self.model is not None and (self._cur_type == ERROR_RESPONSE or
                                       self._cur_type == READY_FOR_QUERY):
            self.model.note(msg)
