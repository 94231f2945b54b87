# Incremental Postgres frame reader (many messages per read, one message over many
# reads) and a write buffer that fills message lengths in on end_message().
# cython: language_level=3

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.stdint cimport uint32_t, uint8_t


class FrameError(Exception):
    """Bytes that cannot be a Postgres message; args[0] says why."""


cdef inline uint32_t _be32(const char* p) noexcept nogil:
    return ((<uint32_t><uint8_t>p[0]) << 24) | ((<uint32_t><uint8_t>p[1]) << 16) | \
           ((<uint32_t><uint8_t>p[2]) << 8) | (<uint32_t><uint8_t>p[3])


cdef class FrameReader:
    """Reads whole messages out of a byte stream.

    ``typed=False`` reads startup packets (int32 length first); ``typed=True`` reads
    regular messages (type byte, int32 length). ``next_message()`` returns
    ``(type, payload)`` (type 0 for untyped) or None when more bytes are needed.
    """

    def __cinit__(self, bint typed=True, Py_ssize_t max_len=64 * 1024 * 1024):
        self._buf = bytearray()
        self._pos = 0
        self.typed = typed
        self._max_len = max_len

    cpdef feed(self, data):
        if self._pos and self._pos == PyByteArray_GET_SIZE(self._buf):
            del self._buf[:]
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 > PyByteArray_GET_SIZE(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    cpdef object next_message(self):
        cdef Py_ssize_t avail = PyByteArray_GET_SIZE(self._buf) - self._pos
        cdef Py_ssize_t hdr = 5 if self.typed else 4
        cdef const char* p
        cdef uint32_t length
        cdef int mtype = 0
        if avail < hdr:
            return None
        p = PyByteArray_AS_STRING(self._buf) + self._pos
        if self.typed:
            mtype = <uint8_t>p[0]
            p += 1
        length = _be32(p)
        if length < 4:
            raise FrameError(f"invalid message length {length}")
        if length > <uint32_t>self._max_len:
            raise FrameError(
                f"message length {length} exceeds the limit of {self._max_len} bytes")
        if avail < hdr - 4 + <Py_ssize_t>length:
            return None
        start = self._pos + hdr
        end = self._pos + hdr - 4 + length
        payload = bytes(self._buf[start:end])
        self._pos = end
        return (mtype, payload)

    cpdef bytes take_rest(self):
        rest = bytes(self._buf[self._pos:])
        del self._buf[:]
        self._pos = 0
        return rest

    @property
    def buffered(self):
        return PyByteArray_GET_SIZE(self._buf) - self._pos


cdef class WriteBuffer:
    """Builds outbound messages: ``new_message(b'E'[0])``, writes, ``end_message()``."""

    def __cinit__(self):
        self._buf = bytearray()
        self._msg_start = -1

    cpdef new_message(self, char mtype):
        if self._msg_start >= 0:
            raise AssertionError("new_message() inside an open message")
        self._buf.append(<uint8_t>mtype)
        self._msg_start = PyByteArray_GET_SIZE(self._buf)
        self._buf += b"\0\0\0\0"

    cpdef end_message(self):
        cdef Py_ssize_t length
        cdef char* p
        if self._msg_start < 0:
            raise AssertionError("end_message() without new_message()")
        length = PyByteArray_GET_SIZE(self._buf) - self._msg_start
        p = PyByteArray_AS_STRING(self._buf) + self._msg_start
        p[0] = <char>((length >> 24) & 0xFF)
        p[1] = <char>((length >> 16) & 0xFF)
        p[2] = <char>((length >> 8) & 0xFF)
        p[3] = <char>(length & 0xFF)
        self._msg_start = -1

    cpdef write_int32(self, int v):
        cdef uint32_t u = <uint32_t>v
        self._buf += bytes(((u >> 24) & 0xFF, (u >> 16) & 0xFF, (u >> 8) & 0xFF, u & 0xFF))

    cpdef write_int16(self, int v):
        cdef unsigned int u = <unsigned int>(v & 0xFFFF)
        self._buf += bytes(((u >> 8) & 0xFF, u & 0xFF))

    cpdef write_byte(self, char v):
        self._buf.append(<uint8_t>v)

    cpdef write_bytes(self, bytes data):
        self._buf += data

    cpdef write_cstr(self, bytes data):
        if b"\0" in data:
            raise ValueError("a NUL byte inside a C string")
        self._buf += data
        self._buf.append(0)

    cpdef write_str(self, str s):
        self.write_cstr(s.encode("utf-8"))

    cpdef bytes take(self):
        if self._msg_start >= 0:
            raise AssertionError("take() inside an open message")
        out = bytes(self._buf)
        del self._buf[:]
        return out
