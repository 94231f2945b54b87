# Layouts of the incremental frame reader and the outbound message builder.

cdef class FrameReader:
    # bytes received and not yet returned as messages; _pos is the read offset
    cdef bytearray _buf
    cdef Py_ssize_t _pos
    # False while reading startup packets, which have no type byte
    cdef public bint typed
    # a declared length above this is refused (FrameError) before any body is buffered
    cdef Py_ssize_t _max_len

    cpdef feed(self, data)
    cpdef object next_message(self)
    cpdef bytes take_rest(self)


cdef class WriteBuffer:
    # contract: new_message() opens a message, end_message() writes its length;
    # messages never nest; take() returns everything written so far and resets
    cdef bytearray _buf
    cdef Py_ssize_t _msg_start

    cpdef new_message(self, char mtype)
    cpdef end_message(self)
    cpdef write_int32(self, int v)
    cpdef write_int16(self, int v)
    cpdef write_byte(self, char v)
    cpdef write_bytes(self, bytes data)
    cpdef write_cstr(self, bytes data)
    cpdef write_str(self, str s)
    cpdef bytes take(self)
