# A growable byte buffer (malloc'd, owned by whoever holds the struct), shared by the
# compiled modules that build output bytes.
from libc.stdlib cimport realloc
from libc.string cimport memcpy


ctypedef struct Buf:
    char* p
    Py_ssize_t len
    Py_ssize_t cap


cdef inline int _grow(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = b.cap if b.cap else 4096
    cdef char* np
    while cap < b.len + extra:
        cap *= 2
    np = <char*>realloc(b.p, cap)
    if np == NULL:
        raise MemoryError()
    b.p = np
    b.cap = cap
    return 0


cdef inline int _put(Buf* b, const char* s, Py_ssize_t n) except -1:
    if b.len + n > b.cap:
        _grow(b, n)
    if n:
        memcpy(b.p + b.len, s, n)
    b.len += n
    return 0


cdef inline int _putc(Buf* b, char c) except -1:
    if b.len + 1 > b.cap:
        _grow(b, 1)
    b.p[b.len] = c
    b.len += 1
    return 0
