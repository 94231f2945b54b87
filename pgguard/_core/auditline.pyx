# The audit writer's hot path, compiled: msgpack rows from the worker -> canonical JSON
# lines and their sha256 chain, in one pass with no Python object per field.
# cython: language_level=3
"""What ``writerproc`` does per record, in C.

``Transcoder.lines(payload, ...)`` reads the msgpack array of rows a worker sends (see
``pgguard.audit.ipc``), checks every value against the types the writer accepts
without coercion (``ipc.WireRow``), and writes each row's canonical content line: the
bytes msgspec's JSON encoder gives for the record without ``prev_hash``/``hash`` (fields
in schema order, nulls omitted, ``ts`` as RFC 3339 UTC), with the writer's ``event_id``
and, when ``ts`` is null, the writer's clock. Statements go through the writer's
normalizer (a Python callable), cached by their raw bytes.

Any value it is not sure of (a type msgspec would coerce or refuse, invalid UTF-8, a
timestamp finer than a microsecond, a year outside 1..9999) makes it return ``None``:
the caller then takes the frame through the msgspec path, which coerces and reports. The
tests hold both paths to the same bytes.

Hashes: ``sha256(prev + line)``, through the low-level SHA256_* functions of the
OpenSSL that ``hashlib`` already loaded (the per-call cost of ``hashlib.sha256`` is
mostly OpenSSL 3's EVP setup, not hashing); ``hashlib`` when they cannot be found.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy

from .cbuf cimport Buf, _grow, _put, _putc

import hashlib

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_NOW
    int RTLD_NOLOAD

ctypedef int (*sha_init_t)(void *ctx) noexcept nogil
ctypedef int (*sha_update_t)(void *ctx, const void *data, size_t n) noexcept nogil
ctypedef int (*sha_final_t)(unsigned char *md, void *ctx) noexcept nogil

cdef sha_init_t _sha_init = NULL
cdef sha_update_t _sha_update = NULL
cdef sha_final_t _sha_final = NULL
_sha256 = hashlib.sha256


def _find_openssl():
    # the libcrypto this process has loaded (hashlib's); nothing is loaded anew
    global _sha_init, _sha_update, _sha_final
    cdef void *h
    try:
        import _hashlib  # noqa: F401
        with open("/proc/self/maps", "rb") as f:
            paths = {ln.split().pop() for ln in f if b"libcrypto" in ln}
    except (ImportError, OSError):
        return None
    for p in sorted(paths):
        h = dlopen(p, RTLD_NOW | RTLD_NOLOAD)
        if h == NULL:
            continue
        i = dlsym(h, b"SHA256_Init")
        u = dlsym(h, b"SHA256_Update")
        fi = dlsym(h, b"SHA256_Final")
        if i != NULL and u != NULL and fi != NULL:
            _sha_init = <sha_init_t>i
            _sha_update = <sha_update_t>u
            _sha_final = <sha_final_t>fi
            return p.decode(errors="replace")
    return None


OPENSSL = _find_openssl()
"""Path of the libcrypto whose SHA256_* the chain uses (None: ``hashlib``)."""


def use_hashlib(bint on):
    """Hash with ``hashlib`` even when OpenSSL's functions were found (tests)."""
    global _sha_init, OPENSSL
    if on:
        _sha_init = NULL
        OPENSSL = None
    else:
        OPENSSL = _find_openssl()


cdef int _digest(const unsigned char *prev, const char *data, Py_ssize_t n,
                 unsigned char *out) except -1:
    global _sha_init, OPENSSL
    cdef unsigned char ctx[512]     # SHA256_CTX is 112 bytes
    if _sha_init != NULL:
        if (_sha_init(ctx) and _sha_update(ctx, prev, 32)
                and _sha_update(ctx, data, <size_t>n) and _sha_final(out, ctx)):
            return 0
        # refused (a FIPS provider, say): hashlib from now on
        _sha_init = NULL
        OPENSSL = None
    h = _sha256(PyBytes_FromStringAndSize(<const char *>prev, 32))
    h.update(PyBytes_FromStringAndSize(data, n))
    d = h.digest()
    memcpy(out, PyBytes_AS_STRING(d), 32)
    return 0


# -- output ---------------------------------------------------------------------------

cdef const char *_HEX = b"0123456789abcdef"
cdef const char *_B32 = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"

# what a byte of a JSON string becomes: 0 copy, 1 short escape, 2 \u00XX, 3 non-ASCII
cdef uint8_t _ESC[256]
cdef char _SHORT[256]
for _i in range(256):
    _ESC[_i] = 3 if _i >= 0x80 else (2 if _i < 0x20 else 0)
    _SHORT[_i] = 0
for _c, _e in ((0x22, b'"'), (0x5c, b"\\"), (0x08, b"b"), (0x09, b"t"), (0x0a, b"n"),
               (0x0c, b"f"), (0x0d, b"r")):
    _ESC[_c] = 1
    _SHORT[_c] = _e[0]


cdef Py_ssize_t _utf8_len(const uint8_t *s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    # length of the valid UTF-8 sequence at s[i] (the strict rules CPython decodes by:
    # no overlong forms, no surrogates, nothing above U+10FFFF), or 0
    cdef uint8_t c = s[i], c1
    if 0xc2 <= c <= 0xdf:
        if i + 1 < n and (s[i + 1] & 0xc0) == 0x80:
            return 2
        return 0
    if 0xe0 <= c <= 0xef:
        if i + 2 >= n:
            return 0
        c1 = s[i + 1]
        if (c1 & 0xc0) != 0x80 or (s[i + 2] & 0xc0) != 0x80:
            return 0
        if (c == 0xe0 and c1 < 0xa0) or (c == 0xed and c1 >= 0xa0):
            return 0
        return 3
    if 0xf0 <= c <= 0xf4:
        if i + 3 >= n:
            return 0
        c1 = s[i + 1]
        if ((c1 & 0xc0) != 0x80 or (s[i + 2] & 0xc0) != 0x80
                or (s[i + 3] & 0xc0) != 0x80):
            return 0
        if (c == 0xf0 and c1 < 0x90) or (c == 0xf4 and c1 >= 0x90):
            return 0
        return 4
    return 0


cdef int _put_str(Buf *b, const uint8_t *s, Py_ssize_t n) except -2:
    # s as a JSON string, escaped as msgspec escapes; -1 if s is not valid UTF-8
    cdef Py_ssize_t i = 0, start = 0, k
    cdef uint8_t c, e
    cdef char u[6]
    if b.len + n + 2 > b.cap:
        _grow(b, n + 2)
    b.p[b.len] = 34
    b.len += 1
    while i < n:
        c = s[i]
        e = _ESC[c]
        if e == 0:
            i += 1
            continue
        if e == 3:
            k = _utf8_len(s, i, n)
            if k == 0:
                return -1
            i += k
            continue
        _put(b, <const char *>s + start, i - start)
        if e == 1:
            u[0] = 92
            u[1] = _SHORT[c]
            _put(b, u, 2)
        else:
            u[0] = 92
            u[1] = 117      # u
            u[2] = 48
            u[3] = 48
            u[4] = _HEX[c >> 4]
            u[5] = _HEX[c & 15]
            _put(b, u, 6)
        i += 1
        start = i
    _put(b, <const char *>s + start, n - start)
    _putc(b, 34)
    return 0


cdef int _put_int(Buf *b, int64_t v) except -1:
    cdef char tmp[24]
    cdef int k = 24
    cdef uint64_t u
    if v < 0:
        u = <uint64_t>(-(v + 1)) + 1
    else:
        u = <uint64_t>v
    while True:
        k -= 1
        tmp[k] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if v < 0:
        k -= 1
        tmp[k] = 45
    _put(b, tmp + k, 24 - k)
    return 0


cdef inline void _d2(char *o, int v) noexcept nogil:
    o[0] = <char>(48 + v // 10)
    o[1] = <char>(48 + v % 10)


cdef int _put_ts(Buf *b, int64_t sec, int64_t usec) except -2:
    # "YYYY-MM-DDTHH:MM:SS[.ffffff]Z" (msgspec's form for a UTC datetime); -1 if the
    # year is not 1..9999
    cdef int64_t days, sod, z, era, doe, yoe, y, doy, mp, d, m
    cdef char o[32]
    cdef int k
    days = sec // 86400
    sod = sec - days * 86400
    # civil date from days since 1970-01-01 (the proleptic Gregorian calendar)
    z = days + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    if y < 1 or y > 9999:
        return -1
    o[0] = 34
    _d2(o + 1, <int>(y // 100))
    _d2(o + 3, <int>(y % 100))
    o[5] = 45
    _d2(o + 6, <int>m)
    o[8] = 45
    _d2(o + 9, <int>d)
    o[11] = 84
    _d2(o + 12, <int>(sod // 3600))
    o[14] = 58
    _d2(o + 15, <int>(sod // 60 % 60))
    o[17] = 58
    _d2(o + 18, <int>(sod % 60))
    k = 20
    if usec:
        o[20] = 46
        _d2(o + 21, <int>(usec // 10000))
        _d2(o + 23, <int>(usec // 100 % 100))
        _d2(o + 25, <int>(usec % 100))
        k = 27
    o[k] = 90
    o[k + 1] = 34
    _put(b, o, k + 2)
    return 0


# -- msgpack reading ------------------------------------------------------------------

cdef struct Rd:
    const uint8_t *p
    Py_ssize_t i
    Py_ssize_t n


cdef inline uint64_t _be(const uint8_t *p, int k) noexcept nogil:
    cdef uint64_t v = 0
    cdef int j
    for j in range(k):
        v = (v << 8) | p[j]
    return v


cdef inline bint _take(Rd *r, Py_ssize_t k) noexcept nogil:
    # k more bytes available?
    return r.i + k <= r.n


cdef Py_ssize_t _array(Rd *r) noexcept nogil:
    # an array header's length, or -1
    cdef uint8_t c
    if not _take(r, 1):
        return -1
    c = r.p[r.i]
    if 0x90 <= c <= 0x9f:
        r.i += 1
        return c & 15
    if c == 0xdc and _take(r, 3):
        r.i += 3
        return <Py_ssize_t>_be(r.p + r.i - 2, 2)
    if c == 0xdd and _take(r, 5):
        r.i += 5
        return <Py_ssize_t>_be(r.p + r.i - 4, 4)
    return -1


cdef Py_ssize_t _str(Rd *r) noexcept nogil:
    # a str header's length (r.i then at the bytes, which are there), or -1
    cdef uint8_t c
    cdef Py_ssize_t k
    if not _take(r, 1):
        return -1
    c = r.p[r.i]
    if 0xa0 <= c <= 0xbf:
        r.i += 1
        k = c & 31
    elif c == 0xd9 and _take(r, 2):
        k = r.p[r.i + 1]
        r.i += 2
    elif c == 0xda and _take(r, 3):
        k = <Py_ssize_t>_be(r.p + r.i + 1, 2)
        r.i += 3
    elif c == 0xdb and _take(r, 5):
        k = <Py_ssize_t>_be(r.p + r.i + 1, 4)
        r.i += 5
    else:
        return -1
    if not _take(r, k):
        return -1
    return k


cdef bint _nil(Rd *r) noexcept nogil:
    if _take(r, 1) and r.p[r.i] == 0xc0:
        r.i += 1
        return True
    return False


cdef bint _int(Rd *r, int64_t *out) noexcept nogil:
    cdef uint8_t c
    cdef uint64_t u
    cdef int k
    if not _take(r, 1):
        return False
    c = r.p[r.i]
    if c <= 0x7f:
        out[0] = c
        r.i += 1
        return True
    if c >= 0xe0:
        out[0] = <int64_t>c - 256
        r.i += 1
        return True
    if 0xcc <= c <= 0xcf:       # uint 8/16/32/64
        k = 1 << (c - 0xcc)
        if not _take(r, 1 + k):
            return False
        u = _be(r.p + r.i + 1, k)
        if u > <uint64_t>0x7fffffffffffffff:
            return False
        out[0] = <int64_t>u
        r.i += 1 + k
        return True
    if 0xd0 <= c <= 0xd3:       # int 8/16/32/64
        k = 1 << (c - 0xd0)
        if not _take(r, 1 + k):
            return False
        u = _be(r.p + r.i + 1, k)
        if k < 8 and u >= (<uint64_t>1 << (8 * k - 1)):
            out[0] = <int64_t>u - (<int64_t>1 << (8 * k))
        else:
            out[0] = <int64_t>u
        r.i += 1 + k
        return True
    return False


cdef bint _ts(Rd *r, int64_t *sec, int64_t *usec) noexcept nogil:
    # a msgpack timestamp (extension -1) of whole microseconds
    cdef uint8_t c
    cdef uint64_t v
    cdef int64_t ns
    if not _take(r, 1):
        return False
    c = r.p[r.i]
    if c == 0xd6 and _take(r, 6) and r.p[r.i + 1] == 0xff:
        sec[0] = <int64_t>_be(r.p + r.i + 2, 4)
        ns = 0
        r.i += 6
    elif c == 0xd7 and _take(r, 10) and r.p[r.i + 1] == 0xff:
        v = _be(r.p + r.i + 2, 8)
        ns = <int64_t>(v >> 34)
        sec[0] = <int64_t>(v & ((<uint64_t>1 << 34) - 1))
        r.i += 10
    elif c == 0xc7 and _take(r, 15) and r.p[r.i + 1] == 12 and r.p[r.i + 2] == 0xff:
        ns = <int64_t>_be(r.p + r.i + 3, 4)
        sec[0] = <int64_t>_be(r.p + r.i + 7, 8)
        r.i += 15
    else:
        return False
    if ns >= 1000000000 or ns % 1000:
        return False
    usec[0] = ns // 1000
    return True


# -- rows -----------------------------------------------------------------------------

# what each wire field is (the caller's spec string, one letter per field)
cdef enum:
    K_EVENT_ID = 69     # E: str; the line gets the writer's id
    K_TS = 84           # T: timestamp or nil (-> now)
    K_REQ = 82          # R: str
    K_STR = 115         # s: str or nil
    K_STMT = 81         # Q: str or nil, normalized through the cache
    K_LIST = 76         # L: list of str, or nil
    K_INT = 73          # I: int64 or nil
    K_TAIL = 88         # X: str, not part of the line


cdef Py_ssize_t CACHE_TEXT_MAX = 8192     # longest statement (bytes) the cache keeps


cdef struct Col:
    # one content column being built, in Arrow's layout: values (string bytes or
    # int64s), int32 offsets (strings; lists), a validity bitmap, and for a list of
    # strings its child's offsets and bytes
    Buf data
    Buf offs
    Buf valid
    Buf coffs
    Buf cdata
    Py_ssize_t nulls


cdef struct ColMark:
    Py_ssize_t data, offs, valid, coffs, cdata, nulls


cdef inline int _off(Buf *o, Py_ssize_t v) except -1:
    cdef int32_t x
    if v > 0x7fffffff:
        raise OverflowError("audit column over 2 GiB")
    x = <int32_t>v
    return _put(o, <const char *>&x, 4)


cdef inline int _bit(Col *c, Py_ssize_t row, bint valid) except -1:
    if (row & 7) == 0:
        _putc(&c.valid, 0)
    if valid:
        c.valid.p[row >> 3] |= <char>(1 << (row & 7))
    else:
        c.nulls += 1
    return 0


cdef inline int _col_str(Col *c, Py_ssize_t row, const char *s, Py_ssize_t n) except -1:
    _put(&c.data, s, n)
    _off(&c.offs, c.data.len)
    return _bit(c, row, True)


cdef inline int _col_null(Col *c, Py_ssize_t row, uint8_t kind) except -1:
    cdef int64_t zero = 0
    if kind == K_INT:
        _put(&c.data, <const char *>&zero, 8)
    elif kind == K_LIST:
        _off(&c.offs, c.coffs.len // 4 - 1)
    else:
        _off(&c.offs, c.data.len)
    return _bit(c, row, False)


cdef inline int _col_int(Col *c, Py_ssize_t row, int64_t v) except -1:
    _put(&c.data, <const char *>&v, 8)
    return _bit(c, row, True)


cdef class Transcoder:
    """Rows -> canonical lines, chain digests and Arrow columns. *spec*: one letter per
    wire field (see the K_* letters); *names*: the wire fields' names; *prepare(str) ->
    str | None* normalizes statements.

    ``lines`` also appends each row's values to Arrow column buffers, which ``take``
    hands over (and empties): the values the lines say, parsed by nobody."""

    cdef bytes spec
    cdef list keys          # b'"name":' for each field (None for tail fields)
    cdef object prepare
    cdef dict cache         # raw statement -> (JSON string bytes, UTF-8) or None
    cdef Py_ssize_t cache_max
    cdef Buf out
    cdef Buf stmt
    cdef Col *cols          # one per wire field (tail fields' stay empty)
    cdef ColMark *marks
    cdef Py_ssize_t ncols
    cdef Py_ssize_t nrows   # rows in the column buffers

    def __cinit__(self, bytes spec, names, prepare, Py_ssize_t cache_max=20000):
        self.spec = spec
        self.keys = [None if spec[i] == K_TAIL else (b'"' + n.encode() + b'":')
                     for i, n in enumerate(names)]
        if len(self.keys) != len(spec):
            raise ValueError("spec and names differ in length")
        self.prepare = prepare
        self.cache = {}
        self.cache_max = cache_max
        self.ncols = len(spec)
        self.cols = <Col *>calloc(self.ncols, sizeof(Col))
        self.marks = <ColMark *>calloc(self.ncols, sizeof(ColMark))
        if self.cols == NULL or self.marks == NULL:
            raise MemoryError()
        self._reset()

    def __dealloc__(self):
        cdef Py_ssize_t f
        free(self.out.p)
        free(self.stmt.p)
        if self.cols != NULL:
            for f in range(self.ncols):
                free(self.cols[f].data.p)
                free(self.cols[f].offs.p)
                free(self.cols[f].valid.p)
                free(self.cols[f].coffs.p)
                free(self.cols[f].cdata.p)
            free(self.cols)
        free(self.marks)

    cdef int _reset(self) except -1:
        cdef Py_ssize_t f
        cdef Col *c
        self.nrows = 0
        for f in range(self.ncols):
            c = &self.cols[f]
            c.data.len = c.offs.len = c.valid.len = c.coffs.len = c.cdata.len = 0
            c.nulls = 0
            _off(&c.offs, 0)
            _off(&c.coffs, 0)
        return 0

    cdef void _mark(self) noexcept:
        cdef Py_ssize_t f
        for f in range(self.ncols):
            self.marks[f].data = self.cols[f].data.len
            self.marks[f].offs = self.cols[f].offs.len
            self.marks[f].valid = self.cols[f].valid.len
            self.marks[f].coffs = self.cols[f].coffs.len
            self.marks[f].cdata = self.cols[f].cdata.len
            self.marks[f].nulls = self.cols[f].nulls

    cdef void _rewind(self, Py_ssize_t nrows) noexcept:
        # back to the state _mark saved, when the columns held nrows rows
        cdef Py_ssize_t f
        cdef Col *c
        for f in range(self.ncols):
            c = &self.cols[f]
            c.data.len = self.marks[f].data
            c.offs.len = self.marks[f].offs
            c.valid.len = self.marks[f].valid
            c.coffs.len = self.marks[f].coffs
            c.cdata.len = self.marks[f].cdata
            c.nulls = self.marks[f].nulls
            if (nrows & 7) and c.valid.len > (nrows >> 3):
                c.valid.p[nrows >> 3] &= <char>((1 << (nrows & 7)) - 1)
        self.nrows = nrows

    def take(self):
        """``(rows, columns)``: everything ``lines`` added since the last ``take``, one
        entry per content field, in order: ``(validity bitmap | None, null count,
        offsets | None, values, child offsets | None, child values | None)`` (bytes;
        see Arrow's columnar format). The buffers are emptied."""
        cdef Py_ssize_t f
        cdef Col *c
        cdef uint8_t kind
        cols = []
        for f in range(self.ncols):
            kind = <uint8_t>self.spec[f]
            if kind == K_TAIL:
                continue
            c = &self.cols[f]
            valid = (PyBytes_FromStringAndSize(c.valid.p, c.valid.len)
                     if c.nulls else None)
            if kind == K_LIST:
                cols.append((valid, c.nulls, PyBytes_FromStringAndSize(c.offs.p, c.offs.len),
                             None, PyBytes_FromStringAndSize(c.coffs.p, c.coffs.len),
                             PyBytes_FromStringAndSize(c.cdata.p, c.cdata.len)))
            elif kind == K_INT or kind == K_TS:
                cols.append((valid, c.nulls, None,
                             PyBytes_FromStringAndSize(c.data.p, c.data.len), None, None))
            else:
                cols.append((valid, c.nulls, PyBytes_FromStringAndSize(c.offs.p, c.offs.len),
                             PyBytes_FromStringAndSize(c.data.p, c.data.len), None, None))
        n = self.nrows
        self._reset()
        return n, cols

    cdef object _statement(self, const uint8_t *s, Py_ssize_t n):
        # the normalized statement as (JSON string bytes, UTF-8 bytes), None to omit,
        # False if it is not valid text
        key = PyBytes_FromStringAndSize(<const char *>s, n)
        got = self.cache.get(key, False)
        if got is not False:
            return got
        try:
            text = PyUnicode_DecodeUTF8(<const char *>s, n, NULL)
        except UnicodeDecodeError:
            return False
        norm = self.prepare(text)
        if norm is None:
            frag = None
        elif type(norm) is str:
            raw = (<str>norm).encode("utf-8")
            self.stmt.len = 0
            if _put_str(&self.stmt, <const uint8_t *>PyBytes_AS_STRING(raw),
                        PyBytes_GET_SIZE(raw)) < 0:
                return False
            frag = (PyBytes_FromStringAndSize(self.stmt.p, self.stmt.len), raw)
        else:
            return False
        if n <= CACHE_TEXT_MAX:     # a long text is likely unique: the cache stays small
            if len(self.cache) >= self.cache_max:
                self.cache.clear()
            self.cache[key] = frag
        return frag

    def lines(self, payload, Py_ssize_t count, bytes eid_prefix, uint64_t ctr,
              int64_t now_us, bytes prev, Py_ssize_t per_frame):
        """``[(lines, digests, n), ...]``, one per *per_frame* rows, or ``None`` (and
        no column changed).

        *payload*: the msgpack array of *count* rows; event ids are *eid_prefix* (18
        chars) + the counter ``ctr + 1, ctr + 2, ...`` in 8 base-32 digits; rows whose
        ts is nil get *now_us*; *prev*: the 32-byte digest the chain continues from."""
        cdef const uint8_t[::1] view = payload
        cdef Rd r
        cdef Buf *b = &self.out
        cdef Buf dig
        cdef Col *c
        cdef Py_ssize_t row, f, nf, k, j, start, rows_in = 0, nrow0 = self.nrows, at
        cdef const char *spec = PyBytes_AS_STRING(self.spec)
        cdef Py_ssize_t nspec = PyBytes_GET_SIZE(self.spec)
        cdef const char *pre = PyBytes_AS_STRING(eid_prefix)
        cdef uint8_t kind
        cdef int64_t iv, sec, usec
        cdef bint first, ok = False
        cdef uint64_t x
        cdef unsigned char last[32]
        cdef char eid[28]
        if PyBytes_GET_SIZE(eid_prefix) != 18 or PyBytes_GET_SIZE(prev) != 32:
            raise ValueError("bad event id prefix or previous digest")
        if per_frame < 1:
            raise ValueError("per_frame must be positive")
        if nspec != self.ncols:
            raise ValueError("spec changed")
        memcpy(last, PyBytes_AS_STRING(prev), 32)
        r.p = &view[0] if view.shape[0] else NULL
        r.i = 0
        r.n = view.shape[0]
        if _array(&r) != count:
            return None
        out = []
        dig.cap = 32 * (per_frame if per_frame < count else count) + 32
        dig.p = <char *>malloc(dig.cap)
        dig.len = 0
        if dig.p == NULL:
            raise MemoryError()
        self._mark()
        try:
            b.len = 0
            eid[0] = 34
            memcpy(eid + 1, pre, 18)
            eid[27] = 34
            for row in range(count):
                if _array(&r) != nspec:
                    return None
                at = self.nrows
                start = b.len
                _putc(b, 123)
                first = True
                for f in range(nspec):
                    kind = <uint8_t>spec[f]
                    c = &self.cols[f]
                    if kind == K_EVENT_ID or kind == K_TAIL or kind == K_REQ:
                        k = _str(&r)
                        if k < 0:
                            return None
                        if kind == K_TAIL:
                            if _utf8_ok(r.p + r.i, k) == 0:
                                return None
                            r.i += k
                            continue
                        _key(b, self.keys[f], first)
                        first = False
                        if kind == K_EVENT_ID:
                            if _utf8_ok(r.p + r.i, k) == 0:
                                return None
                            r.i += k
                            x = ctr + <uint64_t>row + 1
                            for j in range(8):
                                eid[19 + j] = _B32[(x >> (35 - 5 * j)) & 31]
                            _put(b, eid, 28)
                            _col_str(c, at, eid + 1, 26)
                        else:
                            if _put_str(b, r.p + r.i, k) < 0:
                                return None
                            _col_str(c, at, <const char *>r.p + r.i, k)
                            r.i += k
                        continue
                    if kind == K_TS:
                        if _nil(&r):
                            sec = now_us // 1000000
                            usec = now_us % 1000000
                        elif not _ts(&r, &sec, &usec):
                            return None
                        _key(b, self.keys[f], first)
                        first = False
                        if _put_ts(b, sec, usec) < 0:
                            return None
                        _col_int(c, at, sec * 1000000 + usec)
                        continue
                    if _nil(&r):
                        _col_null(c, at, kind)
                        continue
                    if kind == K_STMT:
                        k = _str(&r)
                        if k < 0:
                            return None
                        frag = self._statement(r.p + r.i, k)
                        r.i += k
                        if frag is False:
                            return None
                        if frag is None:
                            _col_null(c, at, kind)
                            continue
                        _key(b, self.keys[f], first)
                        first = False
                        _put(b, PyBytes_AS_STRING((<tuple>frag)[0]),
                             PyBytes_GET_SIZE((<tuple>frag)[0]))
                        _col_str(c, at, PyBytes_AS_STRING((<tuple>frag)[1]),
                                 PyBytes_GET_SIZE((<tuple>frag)[1]))
                        continue
                    _key(b, self.keys[f], first)
                    first = False
                    if kind == K_STR:
                        k = _str(&r)
                        if k < 0 or _put_str(b, r.p + r.i, k) < 0:
                            return None
                        _col_str(c, at, <const char *>r.p + r.i, k)
                        r.i += k
                    elif kind == K_INT:
                        if not _int(&r, &iv):
                            return None
                        _put_int(b, iv)
                        _col_int(c, at, iv)
                    elif kind == K_LIST:
                        nf = _array(&r)
                        if nf < 0:
                            return None
                        _putc(b, 91)
                        for j in range(nf):
                            if j:
                                _putc(b, 44)
                            k = _str(&r)
                            if k < 0 or _put_str(b, r.p + r.i, k) < 0:
                                return None
                            _put(&c.cdata, <const char *>r.p + r.i, k)
                            _off(&c.coffs, c.cdata.len)
                            r.i += k
                        _putc(b, 93)
                        _off(&c.offs, c.coffs.len // 4 - 1)
                        _bit(c, at, True)
                    else:
                        raise ValueError(f"unknown field kind {chr(kind)!r}")
                _putc(b, 125)
                _putc(b, 10)
                self.nrows += 1
                _digest(last, b.p + start, b.len - start - 1, last)
                memcpy(dig.p + dig.len, last, 32)
                dig.len += 32
                rows_in += 1
                if rows_in == per_frame or row == count - 1:
                    out.append((PyBytes_FromStringAndSize(b.p, b.len),
                                PyBytes_FromStringAndSize(dig.p, dig.len), rows_in))
                    b.len = 0
                    dig.len = 0
                    rows_in = 0
            if r.i != r.n:
                return None
            ok = True
            return out
        finally:
            free(dig.p)
            if not ok:
                self._rewind(nrow0)


cdef inline int _key(Buf *b, bytes key, bint first) except -1:
    # the separator (unless first) and '"name":'
    if not first:
        _putc(b, 44)
    _put(b, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
    return 0


cdef Py_ssize_t _utf8_ok(const uint8_t *s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0, k
    while i < n:
        if s[i] < 0x80:
            i += 1
            continue
        k = _utf8_len(s, i, n)
        if k == 0:
            return 0
        i += k
    return 1


def event_id(bytes eid_prefix, uint64_t x):
    """The event id with counter value *x* (see ``Transcoder.lines``)."""
    cdef char c[8]
    for j in range(8):
        c[j] = _B32[(x >> (35 - 5 * j)) & 31]
    return (eid_prefix + PyBytes_FromStringAndSize(c, 8)).decode()
