# Literal-insensitive cache key for SQL text: numbers and single-quoted strings become
# a NUL byte (which no SQL text contains: `?` is an operator); identifiers, keywords, comments, parameters and dollar-quoted bodies stay
# verbatim (a dollar-quoted body is code for DO / CREATE FUNCTION, so it is part of
# the shape). Two texts with one shape differ only in literal values.
# cython: language_level=3

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp, memcpy


cdef extern from "string.h" nogil:
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen)


cdef inline bint _ident_char(unsigned char c) noexcept nogil:
    return (c >= 97 and c <= 122) or (c >= 65 and c <= 90) or (c >= 48 and c <= 57) \
        or c == 95 or c == 36 or c >= 128


cdef inline bint _ident_start(unsigned char c) noexcept nogil:
    return (c >= 97 and c <= 122) or (c >= 65 and c <= 90) or c == 95 or c >= 128


cdef inline bint _digit(unsigned char c) noexcept nogil:
    return c >= 48 and c <= 57


cpdef bytes shape(bytes sql):
    """``shape(b"SELECT * FROM t WHERE id = 42 AND n = 'x'")`` is
    ``b"SELECT * FROM t WHERE id = \\0 AND n = \\0"``; None when the text does not
    scan cleanly (unterminated quote or comment) or uses U& escapes: such text is
    never shared."""
    return shape_buf(<const unsigned char*>PyBytes_AS_STRING(sql), PyBytes_GET_SIZE(sql))


cdef bytes shape_buf(const unsigned char* p, Py_ssize_t n):
    cdef unsigned char* out = <unsigned char*>malloc(n + 1)
    if out == NULL:
        raise MemoryError()
    try:
        return _shape(p, n, out)
    finally:
        free(out)


cdef bytes _shape(const unsigned char* p, Py_ssize_t n, unsigned char* out):
    cdef Py_ssize_t i = 0, j, k, start, tag_len, depth, o = 0
    cdef unsigned char c, prev = 32
    cdef bint escapes
    if memmem(p, n, b"U&", 2) != NULL or memmem(p, n, b"u&", 2) != NULL \
            or memchr(p, 0, n) != NULL:
        # U& identifiers and strings take their escape character from a UESCAPE
        # literal: blanking that literal could merge two different names
        return None
    start = 0                      # start of the pending verbatim run
    while i < n:
        c = p[i]
        if c == 39:                # ' : a string literal, maybe with a prefix
            escapes = False
            # E'...' (and e'...') use backslash escapes; the prefix letter is part
            # of the verbatim run before the quote, which is fine for the key
            if i > 0 and (p[i - 1] == 69 or p[i - 1] == 101) and \
                    (i == 1 or not _ident_char(p[i - 2])):
                escapes = True
            j = i + 1
            while True:
                if j >= n:
                    return None
                if escapes and p[j] == 92:        # backslash escapes the next byte
                    j += 2
                    continue
                if p[j] == 39:
                    if j + 1 < n and p[j + 1] == 39:
                        j += 2
                        continue
                    break
                j += 1
            if escapes:
                # a literal continued on a later line ('...' <newline> '...') keeps
                # the escapes of its first part: E'a' + newline + '\' z ' is one string
                # to Postgres (its \' an escaped quote) and would be two here: never
                # shared
                k = j + 1
                while k < n:
                    if p[k] == 32 or p[k] == 9 or p[k] == 10 or p[k] == 13 or \
                            p[k] == 12 or p[k] == 11:
                        k += 1
                    elif p[k] == 45 and k + 1 < n and p[k + 1] == 45:
                        while k < n and p[k] != 10 and p[k] != 13:
                            k += 1
                    else:
                        break
                if k < n and p[k] == 39:
                    return None
            memcpy(out + o, p + start, i - start)
            o += i - start
            out[o] = 0
            o += 1
            i = j + 1
            start = i
            prev = 63
            continue
        if c == 34:                # "quoted identifier": verbatim
            j = i + 1
            while True:
                if j >= n:
                    return None
                if p[j] == 34:
                    if j + 1 < n and p[j + 1] == 34:
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
            prev = 34
            continue
        if c == 45 and i + 1 < n and p[i + 1] == 45:      # -- comment: verbatim
            # (to the end of the line, which a carriage return ends too, as in Postgres'
            # scanner: a quote after --\r is a literal's, not the comment's)
            while i < n and p[i] != 10 and p[i] != 13:
                i += 1
            prev = 32
            continue
        if c == 47 and i + 1 < n and p[i + 1] == 42:      # /* nested */ comment
            depth = 1
            i += 2
            while depth:
                if i + 1 >= n:
                    return None
                if p[i] == 47 and p[i + 1] == 42:
                    depth += 1
                    i += 2
                elif p[i] == 42 and p[i + 1] == 47:
                    depth -= 1
                    i += 2
                else:
                    i += 1
            prev = 32
            continue
        if c == 36 and not _ident_char(prev):
            if i + 1 < n and _digit(p[i + 1]):            # $1: a parameter
                i += 1
                while i < n and _digit(p[i]):
                    i += 1
                prev = 48
                continue
            # $tag$ ... $tag$ : a dollar-quoted body, kept verbatim
            j = i + 1
            if j < n and p[j] != 36 and not _ident_start(p[j]):
                i += 1
                prev = c
                continue
            while j < n and p[j] != 36:
                if not _ident_char(p[j]):
                    break
                j += 1
            if j >= n or p[j] != 36:
                i += 1
                prev = c
                continue
            tag_len = j - i + 1
            k = j + 1
            while True:
                if k + tag_len > n:
                    return None
                if p[k] == 36 and memcmp(p + k, p + i, tag_len) == 0:
                    break
                k += 1
            i = k + tag_len
            prev = 36
            continue
        if (_digit(c) or (c == 46 and i + 1 < n and _digit(p[i + 1]))) \
                and not _ident_char(prev):
            # a numeric literal: digits, '.', exponent, 0x/0o/0b, '_' separators
            j = i
            if c == 48 and j + 1 < n and p[j + 1] in b"xXoObB":
                j += 2
                while j < n and (_ident_char(p[j])):
                    j += 1
            else:
                while j < n and (_digit(p[j]) or p[j] == 95):
                    j += 1
                if j < n and p[j] == 46:
                    j += 1
                    while j < n and (_digit(p[j]) or p[j] == 95):
                        j += 1
                if j < n and (p[j] == 101 or p[j] == 69):
                    k = j + 1
                    if k < n and (p[k] == 43 or p[k] == 45):
                        k += 1
                    if k < n and _digit(p[k]):
                        j = k
                        while j < n and _digit(p[j]):
                            j += 1
            if j < n and _ident_char(p[j]):
                # 123abc is not a plain number (trailing junk): keep it verbatim
                i = j
                prev = 97
                continue
            memcpy(out + o, p + start, i - start)
            o += i - start
            out[o] = 0
            o += 1
            i = j
            start = i
            prev = 63
            continue
        prev = c
        i += 1
    memcpy(out + o, p + start, n - start)
    o += n - start
    return PyBytes_FromStringAndSize(<char*>out, o)
