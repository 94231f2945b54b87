# DataRow / CopyData rewriter: applies a mask plan to a backend message stream in C;
# every other message, and every row with nothing to mask, passes byte-identical.
# cython: language_level=3

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.math cimport fabs, floor, isfinite
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport strtod

cdef extern from "<string.h>" nogil:
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen)
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memchr, memcmp, memcpy, memset

import hashlib

from .cbuf cimport _grow, _put, _putc
from .msgtypes cimport (COMMAND_COMPLETE, COPY_DATA, DATA_ROW, EMPTY_QUERY_RESPONSE,
                        ERROR_RESPONSE, PORTAL_SUSPENDED, READY_FOR_QUERY)
from .framing import FrameError

# what a plan knows of the column types (the Python side resolves kinds: strategies.py)
ACTION_NONE = ACT_NONE
ACTION_STRATEGY = ACT_STRATEGY
ACTION_NULL = ACT_NULL
ACTION_DETECT = ACT_DETECT
STRATEGY_REDACT = STRAT_REDACT
STRATEGY_PARTIAL = STRAT_PARTIAL
STRATEGY_EMAIL = STRAT_EMAIL
STRATEGY_HASH = STRAT_HASH
CELL_OTHER = KIND_OTHER
CELL_TEXT = KIND_TEXT
CELL_JSON = KIND_JSON
CELL_JSONB_BINARY = KIND_JSONB_BIN
CELL_WHOLE = KIND_WHOLE
CELL_LITERAL = KIND_LITERAL
CELL_HEX = KIND_HEX
CELL_INT8_BINARY = KIND_INT8_BIN
CELL_UINT8_BINARY = KIND_UINT8_BIN
CELL_NUMERIC_BINARY = KIND_NUMERIC_BIN
CELL_FLOAT8_BINARY = KIND_FLOAT8_BIN
CELL_FLOAT8_TEXT = KIND_FLOAT8_TEXT

cdef enum:
    MAX_DETECTORS = 64

cdef char _HEX[17]
memcpy(_HEX, b"0123456789abcdef", 17)


# -- small helpers ------------------------------------------------------------------

cdef inline uint32_t _be32(const char* p) noexcept nogil:
    return ((<uint32_t><uint8_t>p[0]) << 24) | ((<uint32_t><uint8_t>p[1]) << 16) | \
           ((<uint32_t><uint8_t>p[2]) << 8) | (<uint32_t><uint8_t>p[3])


cdef inline void _put32(char* p, uint32_t v) noexcept nogil:
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


cdef void _shrink(Buf* b, Py_ssize_t keep) noexcept:
    # give back a buffer a huge row grew, so an idle session stays small
    if b.cap > keep and b.len == 0:
        free(b.p)
        b.p = NULL
        b.cap = 0


# -- SHA-256 / HMAC (FIPS 180-4, RFC 2104) -------------------------------------------

cdef uint32_t _K[64]
_K_INIT = (
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2)
for _i in range(64):
    _K[_i] = _K_INIT[_i]

cdef uint32_t _IV[8]
_IV_INIT = (0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c,
            0x1f83d9ab, 0x5be0cd19)
for _i in range(8):
    _IV[_i] = _IV_INIT[_i]


cdef extern from *:
    """
    /* SHA-256 compression with the x86 SHA extensions (SHA-NI), chosen at run time */
    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    #include <cpuid.h>
    #include <immintrin.h>
    static int pgg_sha_ni_available(void) {
        unsigned a, b, c, d;
        if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 19))) return 0;   /* SSE4.1 */
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
        return (b >> 29) & 1;                                                 /* SHA */
    }
    __attribute__((target("sha,sse4.1")))
    static void pgg_sha256_ni(uint32_t *h, const char *blk, const uint32_t *k) {
        const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
        __m128i dcba = _mm_loadu_si128((const __m128i *)h);
        __m128i hgfe = _mm_loadu_si128((const __m128i *)(h + 4));
        __m128i cdab = _mm_shuffle_epi32(dcba, 0xB1);
        __m128i efgh = _mm_shuffle_epi32(hgfe, 0x1B);
        __m128i abef = _mm_alignr_epi8(cdab, efgh, 8);
        __m128i cdgh = _mm_blend_epi16(efgh, cdab, 0xF0);
        __m128i abef0 = abef, cdgh0 = cdgh, w[16], m;
        int g;
        for (g = 0; g < 16; g++) {
            if (g < 4) {
                w[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(blk + 16 * g)), bswap);
            } else {
                m = _mm_sha256msg1_epu32(w[g - 4], w[g - 3]);
                m = _mm_add_epi32(m, _mm_alignr_epi8(w[g - 1], w[g - 2], 4));
                w[g] = _mm_sha256msg2_epu32(m, w[g - 1]);
            }
            m = _mm_add_epi32(w[g], _mm_loadu_si128((const __m128i *)(k + 4 * g)));
            cdgh = _mm_sha256rnds2_epu32(cdgh, abef, m);
            abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(m, 0x0E));
        }
        abef = _mm_add_epi32(abef, abef0);
        cdgh = _mm_add_epi32(cdgh, cdgh0);
        __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
        __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        _mm_storeu_si128((__m128i *)h, _mm_blend_epi16(feba, dchg, 0xF0));
        _mm_storeu_si128((__m128i *)(h + 4), _mm_alignr_epi8(dchg, feba, 8));
    }
    #else
    static int pgg_sha_ni_available(void) { return 0; }
    static void pgg_sha256_ni(uint32_t *h, const char *blk, const uint32_t *k) {}
    #endif
    """
    int pgg_sha_ni_available() noexcept nogil
    void pgg_sha256_ni(uint32_t* h, const char* blk, const uint32_t* k) noexcept nogil


cdef bint _sha_ni = pgg_sha_ni_available()
# whether the hash strategy runs on the CPU's SHA extensions
SHA_NI = bool(_sha_ni)


cdef inline uint32_t _rotr(uint32_t x, int n) noexcept nogil:
    return (x >> n) | (x << (32 - n))


cdef void _sha_block(uint32_t* h, const char* blk) noexcept nogil:
    cdef uint32_t w[64]
    cdef uint32_t a, b, c, d, e, f, g, hh, t1, t2, s0, s1
    cdef int i
    if _sha_ni:
        pgg_sha256_ni(h, blk, _K)
        return
    for i in range(16):
        w[i] = _be32(blk + 4 * i)
    for i in range(16, 64):
        s0 = _rotr(w[i - 15], 7) ^ _rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)
        s1 = _rotr(w[i - 2], 17) ^ _rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)
        w[i] = w[i - 16] + s0 + w[i - 7] + s1
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; hh = h[7]
    for i in range(64):
        t1 = hh + (_rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)) + ((e & f) ^ (~e & g)) \
            + _K[i] + w[i]
        t2 = (_rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2
    h[0] += a; h[1] += b; h[2] += c; h[3] += d
    h[4] += e; h[5] += f; h[6] += g; h[7] += hh


cdef void _sha_finish(uint32_t* h, const char* msg, Py_ssize_t n,
                      uint64_t prefix) noexcept nogil:
    # hash msg[0:n] into h, which already absorbed `prefix` bytes (whole blocks)
    cdef char blk[128]
    cdef Py_ssize_t r
    cdef uint64_t bits = (prefix + <uint64_t>n) * 8
    cdef int i, last
    while n >= 64:
        _sha_block(h, msg)
        msg += 64
        n -= 64
    r = n
    memcpy(blk, msg, r)
    blk[r] = <char>0x80
    last = 64 if r < 56 else 128
    memset(blk + r + 1, 0, last - r - 1)
    for i in range(8):
        blk[last - 1 - i] = <char>(bits >> (8 * i))
    _sha_block(h, blk)
    if last == 128:
        _sha_block(h, blk + 64)


cdef void _hmac_init(HmacKey* k, const char* key, Py_ssize_t klen) noexcept nogil:
    # klen <= 64 (longer keys are hashed first, on the Python side)
    cdef char ipad[64]
    cdef char opad[64]
    cdef int i
    memset(ipad, 0, 64)
    memcpy(ipad, key, klen)
    memcpy(opad, ipad, 64)
    for i in range(64):
        ipad[i] ^= 0x36
        opad[i] ^= 0x5c
    memcpy(k.inner, _IV, 32)
    memcpy(k.outer, _IV, 32)
    _sha_block(k.inner, ipad)
    _sha_block(k.outer, opad)


cdef void _hmac(const HmacKey* k, const char* msg, Py_ssize_t n, char* out) noexcept nogil:
    cdef uint32_t h[8]
    cdef char digest[32]
    cdef int i
    memcpy(h, k.inner, 32)
    _sha_finish(h, msg, n, 64)
    for i in range(8):
        _put32(digest + 4 * i, h[i])
    memcpy(h, k.outer, 32)
    _sha_finish(h, digest, 32, 64)
    for i in range(8):
        _put32(out + 4 * i, h[i])


def hmac_sha256(bytes key, bytes msg, bint portable=False):
    """HMAC-SHA256 as the ``hash`` strategy computes it (for tests; ``portable``
    bypasses the SHA extensions)."""
    global _sha_ni
    cdef bint saved = _sha_ni
    cdef HmacKey k
    cdef char out[32]
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    if portable:
        _sha_ni = False
    try:
        _hmac_init(&k, PyBytes_AS_STRING(key), len(key))
        _hmac(&k, PyBytes_AS_STRING(msg), len(msg), out)
    finally:
        _sha_ni = saved
    return PyBytes_FromStringAndSize(out, 32)


# -- strategies -----------------------------------------------------------------------

cdef int _strategy(const ColPlan* col, const HmacKey* keys, const char* v, Py_ssize_t n,
                   Buf* dst) except -1:
    cdef Py_ssize_t k, cnt, at, j
    cdef char mac[32]
    cdef int i
    if col.strategy == STRAT_REDACT:
        _put(dst, col.repl, col.repl_len)
    elif col.strategy == STRAT_PARTIAL:
        # the last `keep` code points (UTF-8 lead bytes), if the value has more
        k = n
        cnt = 0
        while k > 0 and cnt < col.keep:
            k -= 1
            if (<uint8_t>v[k] & 0xC0) != 0x80:
                cnt += 1
        if cnt == col.keep:
            # keep them only if something is left to hide before them
            j = k - 1
            while j >= 0 and (<uint8_t>v[j] & 0xC0) == 0x80:
                j -= 1
            if j < 0:
                k = n
        else:
            k = n
        _put(dst, col.repl, col.repl_len)
        _put(dst, v + k, n - k)
    elif col.strategy == STRAT_EMAIL:
        at = n - 1
        while at >= 0 and v[at] != c'@':
            at -= 1
        if at <= 0 or at == n - 1:
            _put(dst, col.repl, col.repl_len)
        else:
            j = 1
            while j < at and (<uint8_t>v[j] & 0xC0) == 0x80:
                j += 1
            _put(dst, v, j)
            _put(dst, b"***@", 4)
            _put(dst, v + at + 1, n - at - 1)
    else:
        _hmac(&keys[col.key], v, n, mac)
        if dst.len + 18 > dst.cap:
            _grow(dst, 18)
        dst.p[dst.len] = c'h'
        dst.p[dst.len + 1] = c'_'
        for i in range(8):
            dst.p[dst.len + 2 + 2 * i] = _HEX[(<uint8_t>mac[i]) >> 4]
            dst.p[dst.len + 3 + 2 * i] = _HEX[(<uint8_t>mac[i]) & 15]
        dst.len += 18
    return 0


cdef int _json_quote(const char* v, Py_ssize_t n, Buf* dst) except -1:
    cdef Py_ssize_t i
    cdef uint8_t c
    _putc(dst, c'"')
    for i in range(n):
        c = <uint8_t>v[i]
        if c == 34 or c == 92:
            _putc(dst, c'\\')
            _putc(dst, <char>c)
        elif c < 0x20:
            _put(dst, b"\\u00", 4)
            _putc(dst, _HEX[c >> 4])
            _putc(dst, _HEX[c & 15])
        else:
            _putc(dst, <char>c)
    _putc(dst, c'"')
    return 0


cdef int _copy_text_escape(const char* v, Py_ssize_t n, char delim, Buf* dst) except -1:
    cdef Py_ssize_t i
    cdef char c
    for i in range(n):
        c = v[i]
        if c == c'\\':
            _put(dst, b"\\\\", 2)
        elif c == c'\n':
            _put(dst, b"\\n", 2)
        elif c == c'\r':
            _put(dst, b"\\r", 2)
        elif c == c'\t':
            _put(dst, b"\\t", 2)
        elif c == c'\b':
            _put(dst, b"\\b", 2)
        elif c == c'\f':
            _put(dst, b"\\f", 2)
        elif c == c'\v':
            _put(dst, b"\\v", 2)
        elif c == delim:
            _putc(dst, c'\\')
            _putc(dst, c)
        else:
            _putc(dst, c)
    return 0


cdef int _copy_csv_escape(const char* v, Py_ssize_t n, MaskPlan plan, Buf* dst) except -1:
    cdef Py_ssize_t i
    cdef char c
    cdef bint q = n == 0
    cdef Py_ssize_t nl = PyBytes_GET_SIZE(plan.null_str)
    if n == nl and memcmp(v, PyBytes_AS_STRING(plan.null_str), n) == 0:
        q = True
    if n == 2 and v[0] == c'\\' and v[1] == c'.':
        q = True
    i = 0
    while not q and i < n:
        c = v[i]
        if c == plan.delim or c == plan.quote or c == plan.escape or c == c'\n' or c == c'\r':
            q = True
        i += 1
    if not q:
        return _put(dst, v, n)
    _putc(dst, plan.quote)
    for i in range(n):
        c = v[i]
        if c == plan.quote or c == plan.escape:
            _putc(dst, plan.escape)
        _putc(dst, c)
    _putc(dst, plan.quote)
    return 0


# -- the plan -------------------------------------------------------------------------

cdef class MaskPlan:
    """What to do with each column of one result, as C arrays.

    ``columns``: one entry per result column with attributes ``action`` (0 none,
    1 strategy, 2 NULL, 3 detectors), ``strategy`` (0 redact, 1 partial, 2 email,
    3 hash), ``kind`` (0 other, 1 text-like, 2 JSON, 3 binary jsonb, 4 whole: array, composite,
    record or xml, whose raw value the detectors scan and which becomes NULL when they
    find something), ``keep`` (int),
    ``replacement`` (bytes), ``key`` (bytes, hash only). Build them with
    :func:`pgguard.masking.strategies.column_mask`; a strategy on a column of kind
    other, whole or literal becomes NULL, detectors on a column of kind other become none.
    ``detectors``: a :class:`pgguard.masking.detectors.DetectorSet` or None.
    ``copy``: None for DataRow; for COPY TO STDOUT an object with ``format`` ("text" or
    "csv"), ``delimiter``, ``quote``, ``escape``, ``null`` (bytes) and ``header`` (bool)
    (:class:`pgguard.masking.strategies.CopyFormat`).

    Example::

        plan = MaskPlan([column_mask(None), column_mask(mask, oid=25)], detectors)
    """

    def __cinit__(self):
        self.cc_id = self.phone_id = self.ssn_id = self.email_id = -1
        self.pre_bits = self.loc_bits = 0
        self.cols = NULL
        self.act = NULL
        self._keys = NULL
        self.ncols = 0
        self.nact = 0
        self._nkeys = 0

    def __dealloc__(self):
        free(self.cols)
        free(self.act)
        free(self._keys)

    def __init__(self, columns, detectors=None, copy=None):
        cdef int i, n
        cdef ColPlan* col
        cdef bytes repl, key
        if self.cols != NULL:
            raise TypeError("a MaskPlan is immutable")
        cols = tuple(columns)
        n = len(cols)
        if n > 65535:
            raise ValueError("a result has at most 65535 columns")
        self.columns = cols
        self.copy = copy
        self.detectors = detectors
        self._refs = []
        if copy is None:
            self.mode = MODE_ROWS
        else:
            if copy.format == "text":
                self.mode = MODE_COPY_TEXT
            elif copy.format == "csv":
                self.mode = MODE_COPY_CSV
            else:
                raise ValueError(f"COPY format {copy.format!r} cannot be masked")
            for name in ("delimiter", "quote", "escape"):
                if len(getattr(copy, name)) != 1:
                    raise ValueError(f"COPY {name} must be one byte")
            self.delim = (<bytes>copy.delimiter)[0]
            self.quote = (<bytes>copy.quote)[0]
            self.escape = (<bytes>copy.escape)[0]
            self.null_str = bytes(copy.null)
            self.header = bool(copy.header)
            # text format writes values escaped but the NULL string as it is: a value
            # can read the same as any NULL string but \N. Then every field is a value
            # (masked as one), never a NULL that would let a matching value through
            self.null_ambiguous = self.mode == MODE_COPY_TEXT and self.null_str != b"\\N"
        if detectors is not None:
            if len(detectors.names) > MAX_DETECTORS:
                raise ValueError(f"at most {MAX_DETECTORS} detectors")
            self._scan = detectors.hs_db.scan if detectors.hs_db is not None else None
            self._mask_cell = detectors.mask_cell
            self._labels = list(detectors.labels)
            native = detectors.native
            self.cc_id = native.get("credit_card", -1)
            self.phone_id = native.get("phone", -1)
            self.ssn_id = native.get("ssn", -1)
            self.email_id = native.get("email", -1)
            self.pre_bits = 0
            self.loc_bits = 0
            if self.cc_id >= 0:
                self.pre_bits |= (<uint64_t>1) << self.cc_id
                self.loc_bits |= (<uint64_t>1) << self.cc_id
            if self.phone_id >= 0:
                self.pre_bits |= (<uint64_t>1) << self.phone_id
                self.loc_bits |= (<uint64_t>1) << self.phone_id
            if self.ssn_id >= 0:
                self.loc_bits |= (<uint64_t>1) << self.ssn_id
            if self.email_id >= 0:
                self.loc_bits |= (<uint64_t>1) << self.email_id
        self.cols = <ColPlan*>calloc(n if n else 1, sizeof(ColPlan))
        self.act = <int*>calloc(n if n else 1, sizeof(int))
        if self.cols == NULL or self.act == NULL:
            raise MemoryError()
        self.ncols = n
        keys = {}
        for i in range(n):
            c = cols[i]
            col = &self.cols[i]
            col.action = int(c.action)
            col.strategy = int(c.strategy)
            col.kind = int(c.kind)
            col.keep = int(c.keep)
            if col.action > ACT_DETECT or col.strategy > STRAT_HASH or \
                    col.kind > KIND_FLOAT8_TEXT:
                raise ValueError(f"column {i}: invalid action, strategy or kind")
            if col.keep < 0:
                raise ValueError(f"column {i}: keep must not be negative")
            if self.mode != MODE_ROWS and col.kind == KIND_JSONB_BIN:
                col.kind = KIND_JSON
            if self.mode != MODE_ROWS and col.kind == KIND_LITERAL:
                col.kind = KIND_TEXT
            if col.action == ACT_STRATEGY and (col.kind == KIND_OTHER or col.kind == KIND_WHOLE
                                               or col.kind == KIND_LITERAL
                                               or col.kind >= KIND_HEX):
                col.action = ACT_NULL
            if col.action == ACT_DETECT and (col.kind == KIND_OTHER or detectors is None):
                col.action = ACT_NONE
            repl = bytes(c.replacement)
            self._refs.append(repl)
            col.repl = PyBytes_AS_STRING(repl)
            col.repl_len = PyBytes_GET_SIZE(repl)
            col.key = -1
            if col.action == ACT_STRATEGY and col.strategy == STRAT_HASH:
                key = bytes(c.key or b"")
                if not key:
                    raise ValueError(f"column {i}: the hash strategy needs a key")
                if len(key) > 64:
                    key = hashlib.sha256(key).digest()
                if key not in keys:
                    keys[key] = len(keys)
                col.key = keys[key]
            if col.action != ACT_NONE:
                self.act[self.nact] = i
                self.nact += 1
                if col.action == ACT_DETECT:
                    self.has_detect = True
        self._keys = <HmacKey*>calloc(len(keys) if keys else 1, sizeof(HmacKey))
        if self._keys == NULL:
            raise MemoryError()
        for key, i in keys.items():
            _hmac_init(&self._keys[i], PyBytes_AS_STRING(key), len(key))
        self._nkeys = len(keys)

    @property
    def ncolumns(self):
        return self.ncols

    @property
    def actions(self):
        """The resolved action of each column (what the core will do)."""
        return [self.cols[i].action for i in range(self.ncols)]

    @property
    def kinds(self):
        return [self.cols[i].kind for i in range(self.ncols)]

    @property
    def masks_anything(self):
        return self.nact > 0


# -- built-in detectors in C ----------------------------------------------------------
# The same results as detectors.py (the reference runs its re locators on every cell):
# credit_card and phone prefilters as one digit automaton per cell (Hyperscan crawls
# through digit-dense text on their bounded repeats); credit_card, ssn, email and phone
# located and validated here (Luhn and digit groups, SSN ranges), for text cells. A
# cell flagged by any other detector, or a JSON or literal cell, goes to
# DetectorSet.mask_cell (Python re on that cell only).

ctypedef struct _Span:
    Py_ssize_t s
    Py_ssize_t e
    int id

cdef enum:
    _MAX_SPANS = 64


cdef inline bint _isdigit(char c) noexcept nogil:
    return c'0' <= c <= c'9'


cdef inline bint _isword(char c) noexcept nogil:
    # \\w of a bytes pattern: ASCII letters, digits, underscore
    return (c'0' <= c <= c'9') or (c'a' <= c <= c'z') or (c'A' <= c <= c'Z') or c == c'_'


cdef inline void _note(DetCell* d, int id, Py_ssize_t end) noexcept nogil:
    # a prefilter match of detector `id` ends at `end` (from the value's start)
    if not d.bits:
        d.lo = d.hi = end
    elif end < d.lo:
        d.lo = end
    elif end > d.hi:
        d.hi = end
    d.bits |= (<uint64_t>1) << id


cdef extern from *:
    """
    /* eight bytes at a time (SWAR) for the digit prefilter */
    static inline uint64_t pgg_ld64(const char *p) { uint64_t w; memcpy(&w, p, 8); return w; }
    #define PGG_REP(c) (0x0101010101010101ULL * (uint64_t)(c))
    static inline int pgg_has_zero(uint64_t y) {
        return ((y - PGG_REP(1)) & ~y & PGG_REP(0x80)) != 0;
    }
    /* a space, dash or dot among the eight bytes */
    static inline int pgg_has_sep(uint64_t w) {
        return pgg_has_zero(w ^ PGG_REP(0x20)) | pgg_has_zero(w ^ PGG_REP(0x2d))
            | pgg_has_zero(w ^ PGG_REP(0x2e));
    }
    /* bit j set: byte j is an ASCII digit (little-endian load) */
    static inline unsigned pgg_digit_mask(uint64_t w) {
        uint64_t x = w & PGG_REP(0x7f);
        uint64_t d = (x + PGG_REP(0x50)) & ~(x + PGG_REP(0x46)) & ~w & PGG_REP(0x80);
        return (unsigned)(((d >> 7) * 0x0102040810204080ULL) >> 56);
    }
    static inline int pgg_lead_ones(unsigned m) { return __builtin_ctz(~m); }
    static inline int pgg_trail_ones(unsigned m) { return __builtin_clz((~m) & 0xFFu) - 24; }
    """
    uint64_t pgg_ld64(const char* p) noexcept nogil
    int pgg_has_sep(uint64_t w) noexcept nogil
    unsigned pgg_digit_mask(uint64_t w) noexcept nogil
    int pgg_lead_ones(unsigned m) noexcept nogil
    int pgg_trail_ones(unsigned m) noexcept nogil


cdef void _digit_prefilter(const char* v, Py_ssize_t n, int cc, int ph,
                           DetCell* d) noexcept nogil:
    # every end offset of  \\d(?:[ -]?\\d){12}  (cc) and  \\d{3}[ .-]\\d{4}  (ph).
    # Until the first separator (" ", "-", "."), only runs of digits count: phone needs
    # a separator, a card is 13 digits in a row; hex and ids stay on this loop, eight
    # bytes at a time, byte by byte only where a run may reach 13.
    cdef Py_ssize_t i = 0, j
    cdef uint32_t r = 0
    cdef unsigned m
    cdef uint64_t w
    cdef uint8_t u
    while i + 8 <= n:
        w = pgg_ld64(v + i)
        if pgg_has_sep(w):
            _digit_chains(v, n, cc, ph, d)
            return
        m = pgg_digit_mask(w)
        if m == 0:
            r = 0
        elif m == 0xFF and r + 8 < 13:
            r += 8
        elif m != 0xFF and r + <uint32_t>pgg_lead_ones(m) < 13:
            r = <uint32_t>pgg_trail_ones(m)
        else:
            for j in range(8):
                r = (r + 1) * ((m >> j) & 1)
                if r >= 13 and cc >= 0:
                    _note(d, cc, i + j + 1)
        i += 8
    while i < n:
        u = <uint8_t>v[i]
        if u == 32 or u == 45 or u == 46:
            _digit_chains(v, n, cc, ph, d)
            return
        r = (r + 1) * (<uint8_t>(u - 48) <= 9)
        i += 1
        if r >= 13 and cc >= 0:
            _note(d, cc, i)


cdef void _digit_chains(const char* v, Py_ssize_t n, int cc, int ph,
                        DetCell* d) noexcept nogil:
    # _digit_prefilter's automaton with separators
    cdef Py_ssize_t i = 0
    cdef int chain, run, after
    cdef bint sep
    cdef char ch
    while i < n:
        # idle: skip to the next digit
        while i < n and <uint8_t>(<uint8_t>v[i] - 48) > 9:
            i += 1
        chain = run = 0
        after = -1
        sep = False
        while i < n:
            ch = v[i]
            i += 1
            if c'0' <= ch <= c'9':
                chain += 1
                sep = False
                run += 1
                if after >= 0:
                    after += 1
                    if after == 4 and ph >= 0:
                        _note(d, ph, i)
                if chain >= 13 and cc >= 0:
                    _note(d, cc, i)
                continue
            if ch == c' ' or ch == c'-':
                if sep or chain == 0:
                    chain = 0
                    sep = False
                else:
                    sep = True
                after = 0 if run >= 3 else -1
            elif ch == c'.':
                chain = 0
                sep = False
                after = 0 if run >= 3 else -1
            else:
                chain = 0
                sep = False
                after = -1
            run = 0
            if chain == 0 and after < 0:
                break               # idle again


cdef bint _luhn(const char* v, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    # the Luhn sum of the digits of v[a:b] (other bytes skipped)
    cdef int total = 0, k = 0, dg
    cdef Py_ssize_t i = b - 1
    while i >= a:
        if _isdigit(v[i]):
            dg = v[i] - c'0'
            if k & 1:
                dg *= 2
                if dg > 9:
                    dg -= 9
            total += dg
            k += 1
        i -= 1
    return total % 10 == 0


cdef int _ndigits(const char* v, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    cdef int k = 0
    cdef Py_ssize_t i
    for i in range(a, b):
        if _isdigit(v[i]):
            k += 1
    return k


cdef bint _card(const char* v, Py_ssize_t s, Py_ssize_t e, Py_ssize_t* os,
                Py_ssize_t* oe) noexcept nogil:
    # detectors._card: the whole run if it is 13..19 Luhn-valid digits; else the
    # longest, leftmost run of whole digit groups that is
    cdef Py_ssize_t gs[40]
    cdef Py_ssize_t ge[40]
    cdef int ng = 0, a, b, k
    cdef Py_ssize_t i, j, ga, gb, best_s = -1, best_e = -1
    k = _ndigits(v, s, e)
    if 13 <= k <= 19 and _luhn(v, s, e):
        os[0] = s
        oe[0] = e
        return True
    i = s
    while i < e and ng < 40:
        j = i
        while j < e and _isdigit(v[j]):
            j += 1
        gs[ng] = i
        ge[ng] = j
        ng += 1
        i = j + 1
    for a in range(ng):
        b = ng - 1
        while b >= a:
            ga = gs[a]
            gb = ge[b]
            k = _ndigits(v, ga, gb)
            if 13 <= k <= 19 and _luhn(v, ga, gb):
                if best_s < 0 or gb - ga > best_e - best_s:
                    best_s = ga
                    best_e = gb
                break
            b -= 1
    if best_s < 0:
        return False
    os[0] = best_s
    oe[0] = best_e
    return True


cdef inline void _widen_span(const char* v, Py_ssize_t n, Py_ssize_t* ps,
                             Py_ssize_t* pe) noexcept nogil:
    # detectors._widen: whole UTF-8 characters, backslash escapes never cut
    cdef Py_ssize_t s = ps[0], e = pe[0], k
    while s > 0 and (<uint8_t>v[s] & 0xC0) == 0x80:
        s -= 1
    k = s
    while k > 0 and v[k - 1] == c'\\':
        k -= 1
    if (s - k) & 1:
        s -= 1
    k = e
    while k > 0 and v[k - 1] == c'\\':
        k -= 1
    if (e - k) & 1 and e < n:
        e += 1
    while e < n and (<uint8_t>v[e] & 0xC0) == 0x80:
        e += 1
    ps[0] = s
    pe[0] = e


cdef inline bint _add_span(_Span* sp, int* ns, const char* v, Py_ssize_t n, Py_ssize_t s,
                           Py_ssize_t e, int id) noexcept nogil:
    if ns[0] >= _MAX_SPANS:
        return False
    _widen_span(v, n, &s, &e)
    sp[ns[0]].s = s
    sp[ns[0]].e = e
    sp[ns[0]].id = id
    ns[0] += 1
    return True


cdef bint _cc_spans(const char* v, Py_ssize_t n, int id, _Span* sp, int* ns) noexcept nogil:
    # finditer(rb"\\b\\d(?:[ -]?\\d){12,18}\\b") + _card; False: too many spans
    cdef Py_ssize_t dpos[19]
    cdef Py_ssize_t p = 0, q, e, found, s2, e2
    cdef int k, kk
    while p < n:
        if _isdigit(v[p]) and (p == 0 or not _isword(v[p - 1])):
            dpos[0] = p
            k = 1
            q = p + 1
            while k < 19:
                if q + 1 < n and (v[q] == c' ' or v[q] == c'-') and _isdigit(v[q + 1]):
                    dpos[k] = q + 1
                    q += 2
                elif q < n and _isdigit(v[q]):
                    dpos[k] = q
                    q += 1
                else:
                    break
                k += 1
            found = -1
            kk = k
            while kk >= 13:
                e = dpos[kk - 1] + 1
                if e == n or not _isword(v[e]):
                    found = e
                    break
                kk -= 1
            if found >= 0:
                if _card(v, p, found, &s2, &e2) and s2 < e2:
                    if not _add_span(sp, ns, v, n, s2, e2, id):
                        return False
                p = found
                continue
        p += 1
    return True


cdef bint _ssn_spans(const char* v, Py_ssize_t n, int id, _Span* sp, int* ns) noexcept nogil:
    # finditer(rb"\\b\\d{3}-\\d{2}-\\d{4}\\b") + _ssn (no 000/666/9xx area, 00 group,
    # 0000 serial); False: too many spans
    cdef Py_ssize_t p = 0
    while p + 11 <= n:
        if _isdigit(v[p]) and (p == 0 or not _isword(v[p - 1])) and _isdigit(v[p + 1]) \
                and _isdigit(v[p + 2]) and v[p + 3] == c'-' and _isdigit(v[p + 4]) \
                and _isdigit(v[p + 5]) and v[p + 6] == c'-' and _isdigit(v[p + 7]) \
                and _isdigit(v[p + 8]) and _isdigit(v[p + 9]) and _isdigit(v[p + 10]) \
                and (p + 11 == n or not _isword(v[p + 11])):
            if not ((memcmp(v + p, b"000", 3) == 0 or memcmp(v + p, b"666", 3) == 0
                     or v[p] == c'9' or memcmp(v + p + 4, b"00", 2) == 0
                     or memcmp(v + p + 7, b"0000", 4) == 0)):
                if not _add_span(sp, ns, v, n, p, p + 11, id):
                    return False
            p += 11
            continue
        p += 1
    return True


cdef inline bint _email_local(char c) noexcept nogil:
    return _isword(c) or c == c'.' or c == c'%' or c == c'+' or c == c'-'


cdef Py_ssize_t _email_domain(const char* v, Py_ssize_t n, Py_ssize_t q) noexcept nogil:
    # re.match(rb"(?:[A-Za-z0-9-]{1,63}\\.){1,8}[A-Za-z]{2,24}\\b", v, q).end(), -1 if
    # none. A label is a whole run of [A-Za-z0-9-] (a shorter one is followed by
    # another label byte, not the dot), so the groups are fixed; backtracking only
    # gives back whole groups, the last of which must then hold the top level domain.
    cdef Py_ssize_t ends[9]
    cdef Py_ssize_t p = q, r, m
    cdef int k = 0
    cdef char ch
    ends[0] = q
    while k < 8:
        r = p
        while r < n and (_isword(v[r]) and v[r] != c'_' or v[r] == c'-'):
            r += 1
        if r == p or r - p > 63 or r >= n or v[r] != c'.':
            break
        p = r + 1
        k += 1
        ends[k] = p
    while k >= 1:
        p = ends[k]
        m = p
        while m < n and ((c'a' <= v[m] <= c'z') or (c'A' <= v[m] <= c'Z')):
            m += 1
        if 2 <= m - p <= 24 and (m == n or not _isword(v[m])):
            return m
        k -= 1
    return -1


cdef bint _email_spans(const char* v, Py_ssize_t n, int id, _Span* sp, int* ns) noexcept nogil:
    # detectors._email_spans: from each "@", the local part before it, the domain after
    cdef Py_ssize_t floor = 0, at, s, e
    cdef const char* hit = <const char*>memchr(v, c'@', n)
    while hit != NULL:
        at = hit - v
        s = at
        while s > floor and s > at - 64 and _email_local(v[s - 1]):
            s -= 1
        if s < at:
            e = _email_domain(v, n, at + 1)
            if e >= 0:
                if not _add_span(sp, ns, v, n, s, e, id):
                    return False
                floor = e
                hit = <const char*>memchr(v + e, c'@', n - e) if e < n else NULL
                continue
        hit = <const char*>memchr(v + at + 1, c'@', n - at - 1) if at + 1 < n else NULL
    return True


cdef inline bint _phone_sep(char c) noexcept nogil:
    return c == c' ' or c == c'.' or c == c'-'


cdef inline bint _digits_at(const char* v, Py_ssize_t n, Py_ssize_t q, int k) noexcept nogil:
    cdef int i
    if q + k > n:
        return False
    for i in range(k):
        if not _isdigit(v[q + i]):
            return False
    return True


cdef Py_ssize_t _phone_tail(const char* v, Py_ssize_t n, Py_ssize_t q) noexcept nogil:
    # \\d{3}[ .-]\\d{4}\\b at q: its end, or -1
    if _digits_at(v, n, q, 3) and q + 3 < n and _phone_sep(v[q + 3]) \
            and _digits_at(v, n, q + 4, 4) and (q + 8 == n or not _isword(v[q + 8])):
        return q + 8
    return -1


cdef Py_ssize_t _phone_area(const char* v, Py_ssize_t n, Py_ssize_t q) noexcept nogil:
    # (?:\\(\\d{3}\\) ?|\\b\\d{3}[ .-]?) then the tail, in re's order of trying
    cdef Py_ssize_t e, r
    if q + 5 <= n and v[q] == c'(' and _digits_at(v, n, q + 1, 3) and v[q + 4] == c')':
        r = q + 5
        if r < n and v[r] == c' ':
            e = _phone_tail(v, n, r + 1)
            if e >= 0:
                return e
        e = _phone_tail(v, n, r)
        if e >= 0:
            return e
    if _digits_at(v, n, q, 3) and (q == 0 or not _isword(v[q - 1])):
        r = q + 3
        if r < n and _phone_sep(v[r]):
            e = _phone_tail(v, n, r + 1)
            if e >= 0:
                return e
        return _phone_tail(v, n, r)
    return -1


cdef bint _phone_spans(const char* v, Py_ssize_t n, int id, _Span* sp, int* ns) noexcept nogil:
    # finditer of the phone locator:
    # (?:\\+\\d{1,3}[ .-]?)?(?:\\(\\d{3}\\) ?|\\b\\d{3}[ .-]?)\\d{3}[ .-]\\d{4}\\b
    cdef Py_ssize_t p = 0, e, r
    cdef int k
    while p < n:
        e = -1
        if v[p] == c'+':
            k = 0
            while k < 3 and p + 1 + k < n and _isdigit(v[p + 1 + k]):
                k += 1
            while k >= 1 and e < 0:
                r = p + 1 + k
                if r < n and _phone_sep(v[r]):
                    e = _phone_area(v, n, r + 1)
                if e < 0:
                    e = _phone_area(v, n, r)
                k -= 1
        if e < 0 and (v[p] == c'(' or _isdigit(v[p])):
            e = _phone_area(v, n, p)
        if e >= 0:
            if not _add_span(sp, ns, v, n, p, e, id):
                return False
            p = e
        else:
            p += 1
    return True


cdef int _native_mask(MaskPlan plan, const char* v, Py_ssize_t n, uint64_t bits,
                      Buf* out, uint64_t* hit) except -1:
    # DetectorSet.mask_cell(v, bits, 0) for bits within plan.loc_bits: 1 and the new
    # value in `out`, 0 when nothing is found, -2 when the spans overflow (use Python)
    cdef _Span sp[_MAX_SPANS]
    cdef _Span t
    cdef int ns = 0, i, j, m
    cdef Py_ssize_t pos
    cdef bytes lab
    if plan.cc_id >= 0 and bits & ((<uint64_t>1) << plan.cc_id):
        if not _cc_spans(v, n, plan.cc_id, sp, &ns):
            return -2
    if plan.ssn_id >= 0 and bits & ((<uint64_t>1) << plan.ssn_id):
        if not _ssn_spans(v, n, plan.ssn_id, sp, &ns):
            return -2
    if plan.email_id >= 0 and bits & ((<uint64_t>1) << plan.email_id):
        if not _email_spans(v, n, plan.email_id, sp, &ns):
            return -2
    if plan.phone_id >= 0 and bits & ((<uint64_t>1) << plan.phone_id):
        if not _phone_spans(v, n, plan.phone_id, sp, &ns):
            return -2
    if ns == 0:
        return 0
    for i in range(1, ns):             # by start, then end, then id
        t = sp[i]
        j = i - 1
        while j >= 0 and (sp[j].s > t.s or (sp[j].s == t.s and (
                sp[j].e > t.e or (sp[j].e == t.e and sp[j].id > t.id)))):
            sp[j + 1] = sp[j]
            j -= 1
        sp[j + 1] = t
    m = 0                              # overlapping spans merge; the first one's label
    for i in range(ns):
        if m and sp[i].s < sp[m - 1].e:
            if sp[i].e > sp[m - 1].e:
                sp[m - 1].e = sp[i].e
        else:
            sp[m] = sp[i]
            m += 1
    out.len = 0
    pos = 0
    hit[0] = 0
    for i in range(m):
        _put(out, v + pos, sp[i].s - pos)
        lab = <bytes>plan._labels[sp[i].id]
        _put(out, PyBytes_AS_STRING(lab), PyBytes_GET_SIZE(lab))
        pos = sp[i].e
        hit[0] |= (<uint64_t>1) << sp[i].id
    _put(out, v + pos, n - pos)
    return 1


cdef class _Hits:
    def __cinit__(self):
        self.to = NULL
        self.ids = NULL
        self.n = 0
        self.cap = 0

    def __dealloc__(self):
        free(self.to)
        free(self.ids)

    cdef int add(self, uint32_t id, uint64_t to) except -1:
        cdef Py_ssize_t cap
        cdef void* p
        if self.n == self.cap:
            cap = self.cap * 2 if self.cap else 256
            p = realloc(self.to, cap * sizeof(uint64_t))
            if p == NULL:
                raise MemoryError()
            self.to = <uint64_t*>p
            p = realloc(self.ids, cap * sizeof(uint32_t))
            if p == NULL:
                raise MemoryError()
            self.ids = <uint32_t*>p
            self.cap = cap
        self.to[self.n] = to
        self.ids[self.n] = id
        self.n += 1
        return 0


def _on_match(unsigned int id, unsigned long long frm, unsigned long long to,
              unsigned int flags, _Hits hits):
    # Hyperscan match callback: record (id, end); None lets the scan go on
    hits.add(id, to)


# -- the rewriter ---------------------------------------------------------------------

cdef Py_ssize_t _hex_bytes(const char* v, Py_ssize_t n) noexcept nogil:
    # how many bytes a bytea's hex text ("\x" then pairs of hex digits) spells, or -1
    cdef Py_ssize_t i
    if n < 2 or v[0] != c'\\' or v[1] != c'x' or (n - 2) & 1:
        return -1
    for i in range(2, n):
        if _hexval(v[i]) < 0:
            return -1
    return (n - 2) >> 1


DEF HEXRUN_MIN = 12     # hex digits after "\\x" that make a run worth decoding (6 bytes)


cdef Py_ssize_t _hexview(const char* v, Py_ssize_t n, char* out) noexcept nogil:
    # a text holding bytea hex runs ("\\x" then HEXRUN_MIN or more hex digits: how
    # ::bytea::text, arrays, records and JSON of a bytea print it): the text, a newline,
    # then the text again with every run replaced by the bytes it spells (written to out
    # unless NULL; both are scanned); its length, or -1 if there is no run
    cdef Py_ssize_t i = 0, o = n + 1, j, k, run
    cdef const char* s
    cdef bint found = False
    if out != NULL:
        memcpy(out, v, n)
        out[n] = c'\n'
    while i < n:
        s = <const char*>memchr(v + i, c'\\', n - i)
        if s == NULL:
            break
        j = s - v
        if j + 1 < n and v[j + 1] == c'x':
            k = j + 2
            while k < n and _hexval(v[k]) >= 0:
                k += 1
            run = (k - j - 2) & ~(<Py_ssize_t>1)
            if run >= HEXRUN_MIN:
                if out != NULL:
                    memcpy(out + o, v + i, j - i)
                    _hex_decode(v + j + 2, run >> 1, out + o + (j - i))
                o += (j - i) + (run >> 1)
                i = j + 2 + run
                found = True
                continue
        if out != NULL:
            memcpy(out + o, v + i, j + 1 - i)
        o += j + 1 - i
        i = j + 1
    if not found:
        return -1
    if out != NULL:
        memcpy(out + o, v + i, n - i)
    return o + (n - i)


cdef inline Py_ssize_t _put_dec(char* out, Py_ssize_t o, uint64_t v, int width) noexcept nogil:
    # v in decimal, at least width digits (zero-padded), at out + o unless out is NULL
    cdef char t[24]
    cdef int k = 0, i
    while v or k < width or k == 0:
        t[k] = <char>(48 + <int>(v % 10))
        v //= 10
        k += 1
    if out != NULL:
        for i in range(k):
            out[o + i] = t[k - 1 - i]
    return o + k


cdef Py_ssize_t _digits_view(int kind, const char* v, Py_ssize_t n, char* out) noexcept nogil:
    # the decimal text a client prints of a binary int8 / xid8 / numeric / float8 value
    # (written to out unless NULL): its length, or -1 when it prints no digits (NaN,
    # infinity, a malformed value). numeric as Postgres' numeric_out writes it; float8
    # whole numbers below 1e19 in every digit (as clients print a double), others in the
    # shortest %g that reads back the same
    cdef uint64_t u = 0
    cdef int64_t s
    cdef double f
    cdef Py_ssize_t o = 0, i
    cdef int ndigits, weight, sign, dscale, dig, d, p
    cdef char t[48]
    if kind == KIND_FLOAT8_TEXT:
        if n <= 0 or n >= <Py_ssize_t>sizeof(t):
            return -1
        memcpy(t, v, n)
        t[n] = 0
        f = strtod(t, NULL)
        memcpy(&u, &f, 8)
        kind = KIND_FLOAT8_BIN
    elif kind == KIND_INT8_BIN or kind == KIND_UINT8_BIN or kind == KIND_FLOAT8_BIN:
        if n != 8:
            return -1
        for i in range(8):
            u = (u << 8) | <uint8_t>v[i]
    if kind == KIND_INT8_BIN or kind == KIND_UINT8_BIN or kind == KIND_FLOAT8_BIN:
        if kind == KIND_UINT8_BIN:
            return _put_dec(out, 0, u, 1)
        if kind == KIND_INT8_BIN:
            s = <int64_t>u
            if s < 0:
                if out != NULL:
                    out[0] = c'-'
                return _put_dec(out, 1, <uint64_t>0 - u, 1)
            return _put_dec(out, 0, u, 1)
        memcpy(&f, &u, 8)
        if not isfinite(f):
            return -1
        if f == floor(f) and fabs(f) < 1e19:
            o = snprintf(t, sizeof(t), b"%.0f", f)
        else:
            for p in range(15, 18):
                o = snprintf(t, sizeof(t), b"%.*g", p, f)
                if strtod(t, NULL) == f:
                    break
        if o <= 0 or o >= <Py_ssize_t>sizeof(t):
            return -1
        if out != NULL:
            memcpy(out, t, o)
        return o
    # numeric: ndigits, weight, sign, dscale (int16 each), then ndigits base-10000 digits
    if n < 8:
        return -1
    ndigits = <int16_t>((<uint8_t>v[0] << 8) | <uint8_t>v[1])
    weight = <int16_t>((<uint8_t>v[2] << 8) | <uint8_t>v[3])
    sign = (<uint8_t>v[4] << 8) | <uint8_t>v[5]
    dscale = <int16_t>((<uint8_t>v[6] << 8) | <uint8_t>v[7])
    if ndigits < 0 or dscale < 0 or n != 8 + 2 * ndigits or \
            (sign != 0 and sign != 0x4000):
        return -1                       # NaN, infinities, or not a numeric
    for i in range(ndigits):
        if ((<uint8_t>v[8 + 2 * i] << 8) | <uint8_t>v[9 + 2 * i]) > 9999:
            return -1
    if sign == 0x4000:
        if out != NULL:
            out[0] = c'-'
        o = 1
    if weight < 0:
        o = _put_dec(out, o, 0, 1)
    else:
        for d in range(weight + 1):
            dig = ((<uint8_t>v[8 + 2 * d] << 8) | <uint8_t>v[9 + 2 * d]) if d < ndigits else 0
            o = _put_dec(out, o, <uint64_t>dig, 1 if d == 0 else 4)
    if dscale > 0:
        if out != NULL:
            out[o] = c'.'
        o += 1
        d = weight + 1
        i = 0
        while i < dscale:
            dig = ((<uint8_t>v[8 + 2 * d] << 8) | <uint8_t>v[9 + 2 * d]) \
                if 0 <= d < ndigits else 0
            if dscale - i >= 4:
                o = _put_dec(out, o, <uint64_t>dig, 4)
                i += 4
            else:
                # the last group, cut to dscale digits
                if out != NULL:
                    _put_dec(t, 0, <uint64_t>dig, 4)
                    memcpy(out + o, t, dscale - i)
                o += dscale - i
                i = dscale
            d += 1
    return o


cdef inline int _num_kind(uint32_t oid) noexcept nogil:
    # a binary element's rendering by its type OID (0: not a number that can spell one)
    if oid == 20:
        return KIND_INT8_BIN
    if oid == 5069:
        return KIND_UINT8_BIN
    if oid == 1700:
        return KIND_NUMERIC_BIN
    if oid == 701:
        return KIND_FLOAT8_BIN
    return 0


cdef Py_ssize_t _bin_numbers(const char* v, Py_ssize_t n, char* out, Py_ssize_t o,
                             int depth) noexcept nogil:
    # the int8 / xid8 / numeric / float8 values inside a binary array or record (and the
    # arrays and records nested in it), each as the digits a client prints of it and a
    # newline, at out + o unless out is NULL: the new o, or -1 when v is not a well-formed
    # binary array or record. An array carries its element type, a record each field's.
    cdef Py_ssize_t pos, q, i, total
    cdef int32_t ndim, ln, nf
    cdef int kind
    cdef uint32_t oid
    if depth > 8 or n < 4:
        return -1
    # an array: ndim, flags, element type, (size, lower bound) per dimension, elements
    ndim = <int32_t>_be32(v)
    if 0 <= ndim <= 6 and n >= 12 + 8 * ndim and _be32(v + 4) <= 1:
        oid = _be32(v + 8)
        pos = 12
        total = 1 if ndim else 0
        for i in range(ndim):
            ln = <int32_t>_be32(v + pos)
            if ln < 0 or (ln and total > n // ln):
                total = -1
                break
            total *= ln
            pos += 8
        if total >= 0 and total <= n:
            q = o
            kind = _num_kind(oid)
            for i in range(total):
                if pos + 4 > n:
                    q = -1
                    break
                ln = <int32_t>_be32(v + pos)
                pos += 4
                if ln == -1:
                    continue
                if ln < 0 or pos + ln > n:
                    q = -1
                    break
                q = _bin_element(kind, v + pos, ln, out, q, depth)
                pos += ln
            if q >= 0 and pos == n:
                return q
    # a record: field count, then (type, length, value) per field
    nf = <int32_t>_be32(v)
    if nf < 0 or nf > 1664:
        return -1
    pos = 4
    q = o
    for i in range(nf):
        if pos + 8 > n:
            return -1
        oid = _be32(v + pos)
        ln = <int32_t>_be32(v + pos + 4)
        pos += 8
        if ln == -1:
            continue
        if ln < 0 or pos + ln > n:
            return -1
        q = _bin_element(_num_kind(oid), v + pos, ln, out, q, depth)
        pos += ln
    return q if pos == n else -1


cdef inline Py_ssize_t _bin_element(int kind, const char* v, Py_ssize_t n, char* out,
                                    Py_ssize_t o, int depth) noexcept nogil:
    # one element of _bin_numbers: a number's digits and a newline, a nested array or
    # record's numbers, or nothing
    cdef Py_ssize_t k, r
    if kind:
        k = _digits_view(kind, v, n, NULL if out == NULL else out + o)
        if k < 0:
            return o
        if out != NULL:
            out[o + k] = c'\n'
        return o + k + 1
    if n >= 4 and v[0] == 0:
        r = _bin_numbers(v, n, out, o, depth + 1)
        if r >= 0:
            return r
    return o


cdef Py_ssize_t _binnum_view(const char* v, Py_ssize_t n, char* out) noexcept nogil:
    # a binary array's or record's bytes, a newline, then the digits of the numbers in
    # it (written to out unless NULL; both are scanned): its length, or -1 when it holds
    # no such number (the bytes alone are scanned then, as before)
    cdef Py_ssize_t o
    if out != NULL:
        memcpy(out, v, n)
        out[n] = c'\n'
    o = _bin_numbers(v, n, out, n + 1, 0)
    if o <= n + 1:
        return -1
    return o


cdef Py_ssize_t _expview(const char* v, Py_ssize_t n, char* out) noexcept nogil:
    # a text holding numbers in exponent form with 12 to 18 digits before the point once
    # expanded ('4.111111111111111e+15', as Postgres prints a float8 from 1e15 and a
    # client reads it back as 16 digits): the text, a newline, then each such number's
    # digits and a newline (written to out unless NULL): its length, or -1 if none
    cdef const char* s
    cdef Py_ssize_t i = 0, j, b, e, o = n + 1, k
    cdef char t[48]
    cdef char* endp
    cdef double f
    cdef int exp
    if out != NULL:
        memcpy(out, v, n)
        out[n] = c'\n'
    while i + 3 <= n:
        s = <const char*>memmem(v + i, n - i, b"e+1", 3)
        if s == NULL:
            break
        j = s - v
        i = j + 1
        if j == 0:
            continue
        # the mantissa before the 'e' (digits and one point), the exponent after it
        b = j
        while b > 0 and (48 <= <uint8_t>v[b - 1] <= 57 or v[b - 1] == c'.'):
            b -= 1
        if b > 0 and v[b - 1] == c'-':
            b -= 1
        e = j + 2
        exp = 0
        while e < n and 48 <= <uint8_t>v[e] <= 57 and e - j < 6:
            exp = exp * 10 + (<uint8_t>v[e] - 48)
            e += 1
        if exp < 12 or exp > 18 or e - b >= <Py_ssize_t>sizeof(t) or b == j:
            continue
        memcpy(t, v + b, e - b)
        t[e - b] = 0
        f = strtod(t, &endp)
        if endp != t + (e - b) or not isfinite(f) or fabs(f) >= 1e19:
            continue                    # not one number ('1.2.3e+15'), or too large
        k = snprintf(t, sizeof(t), b"%.0f", f)
        if k <= 0 or k >= <Py_ssize_t>sizeof(t):
            continue
        if out != NULL:
            memcpy(out + o, t, k)
            out[o + k] = c'\n'
        o += k + 1
    if o == n + 1:
        return -1
    return o


cdef void _hex_decode(const char* v, Py_ssize_t nbytes, char* out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(nbytes):
        out[i] = <char>((_hexval(v[2 * i]) << 4) | _hexval(v[2 * i + 1]))


cdef inline bint _cell_changed(const ColPlan* col, const Cell* c) noexcept nogil:
    if col.action == ACT_DETECT:
        return c.repl != -1
    return c.val_len >= 0


cdef class RowRewriter:
    """Applies a :class:`MaskPlan` to a stream of backend messages, chunk by chunk.

    ``feed(chunk)`` returns what to send to the client. ``set_plan(plan)`` arms a plan
    from the current message boundary; CommandComplete, ErrorResponse,
    EmptyQueryResponse, PortalSuspended and ReadyForQuery passing through clear it
    (``clear_plan()`` does it by hand, e.g. when the session withholds those).
    ``take_counts()`` returns and resets the masked cells per plan column and per
    detector.

    Example::

        rw = RowRewriter()
        rw.set_plan(plan)            # after the RowDescription
        transport.write(rw.feed(chunk))
    """

    def __cinit__(self, Py_ssize_t max_len=1024 * 1024 * 1024):
        self._max_len = max_len
        self._plan = None
        self._hold_plan = None
        self._hdr_fill = 0
        self._hdr_raw = 0
        self._remain = 0
        self._holding = False
        self._hold_need = 0
        self._copy_header = False
        memset(&self._hold, 0, sizeof(Buf))
        memset(&self._out, 0, sizeof(Buf))
        memset(&self._tmp, 0, sizeof(Buf))
        memset(&self._tmp2, 0, sizeof(Buf))
        memset(&self._arena, 0, sizeof(Buf))
        memset(&self._hex, 0, sizeof(Buf))
        self._rows = NULL
        self._nrows = self._rows_cap = 0
        self._recs = NULL
        self._nrecs = self._recs_cap = 0
        self._cells = NULL
        self._ncells = self._cells_cap = 0
        self._dcells = NULL
        self._ndcells = self._dcells_cap = 0
        self._repls = []
        self._hits = _Hits()
        self._counts = NULL
        self._counts_cap = self._counts_n = 0
        memset(self._det_counts, 0, sizeof(self._det_counts))
        self._det_n = 0
        self.masked_cells = 0
        self.rows_rewritten = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def __dealloc__(self):
        free(self._hold.p)
        free(self._out.p)
        free(self._tmp.p)
        free(self._tmp2.p)
        free(self._arena.p)
        free(self._hex.p)
        free(self._rows)
        free(self._recs)
        free(self._cells)
        free(self._dcells)
        free(self._counts)

    # -- plan ---------------------------------------------------------------------

    cpdef set_plan(self, MaskPlan plan):
        """Mask the rows of the current result with ``plan`` (None: pass-through)."""
        cdef int64_t* p
        if plan is None:
            self._plan = None
            return
        if plan.ncols > self._counts_cap:
            p = <int64_t*>realloc(self._counts, plan.ncols * sizeof(int64_t))
            if p == NULL:
                raise MemoryError()
            memset(p + self._counts_cap, 0, (plan.ncols - self._counts_cap) * sizeof(int64_t))
            self._counts = p
            self._counts_cap = plan.ncols
        if plan.ncols > self._counts_n:
            self._counts_n = plan.ncols
        if plan.detectors is not None and len(plan.detectors.names) > self._det_n:
            self._det_n = len(plan.detectors.names)
        self._plan = plan
        self._copy_header = plan.header and plan.mode != MODE_ROWS

    cpdef clear_plan(self):
        """Back to pass-through from the next message on."""
        self._plan = None

    @property
    def plan(self):
        return self._plan

    @property
    def at_boundary(self):
        """True when no message is partly seen (held, stashed or streaming)."""
        return not (self._hdr_fill or self._remain or self._holding)

    @property
    def pending(self):
        """Bytes held back for the next feed (a split header or one partial row)."""
        return self._hold.len if self._holding else (self._hdr_fill - self._hdr_raw)

    def take_counts(self):
        """``(per plan column, per detector id)`` masked cells since the last call."""
        cols = [self._counts[i] for i in range(self._counts_n)]
        dets = [self._det_counts[i] for i in range(self._det_n)]
        self._reset_counts()
        return cols, dets

    cpdef long long take_total(self):
        """The masked cells since the last call, all columns and detectors together
        (what an audit record counts), without building the per-column lists."""
        cdef long long n = 0
        cdef int i
        for i in range(self._counts_n):
            n += self._counts[i]
        for i in range(self._det_n):
            n += self._det_counts[i]
        if n:
            self._reset_counts()
        return n

    cdef void _reset_counts(self) noexcept:
        if self._counts_cap:
            memset(self._counts, 0, self._counts_cap * sizeof(int64_t))
        memset(self._det_counts, 0, sizeof(self._det_counts))
        self._counts_n = self._plan.ncols if self._plan is not None else 0
        self._det_n = 0
        if self._plan is not None and self._plan.detectors is not None:
            self._det_n = len(self._plan.detectors.names)

    # -- the stream ---------------------------------------------------------------

    cdef int _begin_raw(self, uint8_t t, Py_ssize_t length) except -1:
        # a message that passes through untouched; results end at C, E, I, s, Z
        if length < 4:
            raise FrameError(f"invalid message length {length} for message type {t}")
        self._remain = length - 4
        if (t == COMMAND_COMPLETE or t == ERROR_RESPONSE or t == EMPTY_QUERY_RESPONSE
                or t == PORTAL_SUSPENDED or t == READY_FOR_QUERY):
            self._plan = None
        return 0

    cdef int _add_row(self, const char* msg, Py_ssize_t length, Py_ssize_t off) except -1:
        cdef Py_ssize_t cap
        cdef void* p
        cdef RowRef* r
        if self._nrows == self._rows_cap:
            cap = self._rows_cap * 2 if self._rows_cap else 64
            p = realloc(self._rows, cap * sizeof(RowRef))
            if p == NULL:
                raise MemoryError()
            self._rows = <RowRef*>p
            self._rows_cap = cap
        r = &self._rows[self._nrows]
        r.msg = msg
        r.len = length
        r.off = off
        r.rec0 = 0
        r.nrec = 0
        r.cell0 = 0
        r.changed = False
        self._nrows += 1
        return 0

    cpdef bytes feed(self, bytes data):
        """The bytes to send for ``data`` (``data`` itself when nothing changes)."""
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t pos = 0, run = 0, end = n, take, length, total, i
        cdef uint8_t t, want
        cdef MaskPlan plan
        cdef RowRef* r
        cdef bytes result
        self.bytes_in += n

        if self._plan is None and not self._holding and self._hdr_fill == self._hdr_raw:
            # no plan: only follow the message boundaries
            if self._hdr_fill:
                take = 5 - self._hdr_fill
                if take > n:
                    take = n
                memcpy(self._hdr + self._hdr_fill, p, take)
                self._hdr_fill += take
                self._hdr_raw += take
                pos = take
                if self._hdr_fill < 5:
                    self.bytes_out += n
                    return data
                self._hdr_fill = self._hdr_raw = 0
                self._begin_raw(<uint8_t>self._hdr[0], _be32(self._hdr + 1))
            while True:
                if self._remain:
                    take = self._remain if self._remain <= n - pos else n - pos
                    pos += take
                    self._remain -= take
                if pos >= n:
                    break
                if n - pos < 5:
                    memcpy(self._hdr, p + pos, n - pos)
                    self._hdr_fill = self._hdr_raw = <int>(n - pos)
                    break
                self._begin_raw(<uint8_t>p[pos], _be32(p + pos + 1))
                pos += 5
            self.bytes_out += n
            return data

        self._out.len = 0
        # (a) a header split across feeds
        if self._hdr_fill:
            take = 5 - self._hdr_fill
            if take > n:
                take = n
            memcpy(self._hdr + self._hdr_fill, p, take)
            self._hdr_fill += take
            pos = take
            if self._hdr_raw:
                self._hdr_raw += take
            if self._hdr_fill < 5:
                if self._hdr_raw:
                    self.bytes_out += n
                    return data
                return b""
            self._hdr_fill = 0
            t = <uint8_t>self._hdr[0]
            length = _be32(self._hdr + 1)
            if self._hdr_raw:
                # begun raw without a plan: its header bytes so far are already out
                self._hdr_raw = 0
                self._begin_raw(t, length)
            elif self._plan is not None and t == (DATA_ROW if self._plan.mode == MODE_ROWS
                                                  else COPY_DATA):
                self._start_hold(self._hdr, 5, length)
                run = pos
            else:
                _put(&self._out, self._hdr, 5)
                self._begin_raw(t, length)
                run = pos

        # (b) finish the held row, alone, under the plan it began with
        if self._holding:
            take = self._hold_need - self._hold.len
            if take > n - pos:
                take = n - pos
            _put(&self._hold, p + pos, take)
            pos += take
            run = pos
            if self._hold.len < self._hold_need:
                result = PyBytes_FromStringAndSize(self._out.p, self._out.len)
                self._out.len = 0
                self.bytes_out += len(result)
                return result
            self._holding = False
            plan = self._hold_plan
            self._hold_plan = None
            self._nrows = 0
            self._add_row(self._hold.p, self._hold.len, -1)
            self._process(plan)
            r = &self._rows[0]
            if r.changed:
                if plan.mode == MODE_ROWS:
                    self._emit_row(plan, r)
                else:
                    self._emit_copy(plan, r)
            else:
                _put(&self._out, r.msg, r.len)
            self._hold.len = 0
            _shrink(&self._hold, 1 << 20)

        # (c) the rest of a pass-through body
        if self._remain:
            take = self._remain if self._remain <= n - pos else n - pos
            pos += take
            self._remain -= take

        # (d) whole messages of this chunk; rows of the plan are batched
        plan = self._plan
        want = 0
        if plan is not None:
            want = 68 if plan.mode == MODE_ROWS else 100
        self._nrows = 0
        while pos < n:
            if n - pos < 5:
                memcpy(self._hdr, p + pos, n - pos)
                self._hdr_fill = <int>(n - pos)
                self._hdr_raw = 0
                end = pos
                break
            t = <uint8_t>p[pos]
            length = _be32(p + pos + 1)
            if t == want and self._plan is not None:
                total = length + 1
                if length < 4 or total > self._max_len:
                    raise FrameError(f"invalid message length {length} for a row")
                if total <= n - pos:
                    self._add_row(p + pos, total, pos)
                    pos += total
                else:
                    self._start_hold(p + pos, n - pos, length)
                    end = pos
                    break
            else:
                self._begin_raw(t, length)
                pos += 5
                take = self._remain if self._remain <= n - pos else n - pos
                pos += take
                self._remain -= take
        if self._nrows:
            self._process(plan)

        if self._out.len == 0:
            for i in range(self._nrows):
                if self._rows[i].changed:
                    break
            else:
                # nothing rewritten: the chunk itself (or the part not held back)
                self.bytes_out += end - run
                if run == 0 and end == n:
                    return data
                return PyBytes_FromStringAndSize(p + run, end - run)
        for i in range(self._nrows):
            r = &self._rows[i]
            if not r.changed:
                continue
            _put(&self._out, p + run, r.off - run)
            if plan.mode == MODE_ROWS:
                self._emit_row(plan, r)
            else:
                self._emit_copy(plan, r)
            run = r.off + r.len
        _put(&self._out, p + run, end - run)
        result = PyBytes_FromStringAndSize(self._out.p, self._out.len)
        self._out.len = 0
        self._arena.len = 0
        _shrink(&self._out, 4 << 20)
        _shrink(&self._arena, 4 << 20)
        _shrink(&self._hex, 4 << 20)
        self.bytes_out += len(result)
        return result

    cdef int _start_hold(self, const char* s, Py_ssize_t n, Py_ssize_t length) except -1:
        if length < 4 or length + 1 > self._max_len:
            raise FrameError(f"invalid message length {length} for a row")
        self._hold.len = 0
        _put(&self._hold, s, n)
        self._hold_need = length + 1
        self._holding = True
        self._hold_plan = self._plan
        return 0

    # -- a batch: parse, detect, decide --------------------------------------------

    cdef int _process(self, MaskPlan plan) except -1:
        cdef Py_ssize_t i, j, k, total = 0
        cdef RowRef* r
        cdef Rec* rec
        cdef Cell* c
        self._ncells = 0
        self._nrecs = 0
        if plan.mode == MODE_ROWS:
            for i in range(self._nrows):
                self._parse_datarow(plan, &self._rows[i])
        else:
            for i in range(self._nrows):
                total += self._rows[i].len
            self._arena.len = 0
            if total > self._arena.cap:
                _grow(&self._arena, total)
            for i in range(self._nrows):
                self._parse_copy(plan, i)
        if plan.has_detect:
            self._detect(plan)
        for i in range(self._nrows):
            r = &self._rows[i]
            if plan.mode == MODE_ROWS:
                for j in range(plan.nact):
                    if _cell_changed(&plan.cols[plan.act[j]], &self._cells[r.cell0 + j]):
                        r.changed = True
                        break
            else:
                for k in range(r.rec0, r.rec0 + r.nrec):
                    rec = &self._recs[k]
                    if rec.skip:
                        continue
                    for j in range(plan.nact):
                        if _cell_changed(&plan.cols[plan.act[j]], &self._cells[rec.cell0 + j]):
                            rec.changed = True
                            r.changed = True
                            break
        return 0

    cdef int _need_cells(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t cap
        cdef void* p
        if self._ncells + extra > self._cells_cap:
            cap = self._cells_cap * 2 if self._cells_cap else 256
            while cap < self._ncells + extra:
                cap *= 2
            p = realloc(self._cells, cap * sizeof(Cell))
            if p == NULL:
                raise MemoryError()
            self._cells = <Cell*>p
            self._cells_cap = cap
        return 0

    cdef int _parse_datarow(self, MaskPlan plan, RowRef* r) except -1:
        cdef const char* msg = r.msg
        cdef Py_ssize_t L = r.len, q = 7, raw
        cdef int nc, i, j = 0, nexta
        cdef int32_t clen
        cdef Cell* c
        if L < 7:
            raise FrameError("DataRow too short")
        nc = ((<uint8_t>msg[5]) << 8) | (<uint8_t>msg[6])
        if nc != plan.ncols:
            raise FrameError(f"DataRow has {nc} columns; the mask plan has {plan.ncols}")
        self._need_cells(plan.nact)
        r.cell0 = self._ncells
        r.nrec = 1
        nexta = plan.act[0] if plan.nact else -1
        for i in range(nc):
            if q + 4 > L:
                raise FrameError("DataRow ends inside a column length")
            clen = <int32_t>_be32(msg + q)
            if clen < -1:
                raise FrameError(f"DataRow column length {clen}")
            raw = 4 if clen < 0 else 4 + <Py_ssize_t>clen
            if q + raw > L:
                raise FrameError("DataRow column runs past the message")
            if i == nexta:
                c = &self._cells[self._ncells]
                c.raw_off = q
                c.raw_len = raw
                c.val = msg + q + 4 if clen >= 0 else NULL
                c.val_len = clen
                c.repl = -1
                self._ncells += 1
                j += 1
                nexta = plan.act[j] if j < plan.nact else -1
            q += raw
        if q != L:
            raise FrameError("DataRow has bytes after its last column")
        return 0

    cdef int _parse_copy(self, MaskPlan plan, Py_ssize_t ri) except -1:
        cdef RowRef* r = &self._rows[ri]
        cdef const char* msg = r.msg
        cdef Py_ssize_t L = r.len, q = 5, f0, fend, cap, line_end
        cdef int i, j, nexta
        cdef bint text = plan.mode == MODE_COPY_TEXT, special, quoted, inq, last, plain
        cdef const char* hit
        cdef char ch, delim = plan.delim, quote = plan.quote, esc = plan.escape
        cdef Rec* rec
        cdef Cell* c
        cdef void* p
        cdef const char* nul = PyBytes_AS_STRING(plan.null_str)
        cdef Py_ssize_t nul_len = PyBytes_GET_SIZE(plan.null_str)
        r.rec0 = self._nrecs
        r.nrec = 0
        r.cell0 = self._ncells
        while q < L:
            if self._nrecs == self._recs_cap:
                cap = self._recs_cap * 2 if self._recs_cap else 64
                p = realloc(self._recs, cap * sizeof(Rec))
                if p == NULL:
                    raise MemoryError()
                self._recs = <Rec*>p
                self._recs_cap = cap
            self._need_cells(plan.nact)
            rec = &self._recs[self._nrecs]
            self._nrecs += 1
            r.nrec += 1
            rec.start = q
            rec.cell0 = self._ncells
            rec.skip = self._copy_header
            rec.changed = False
            self._copy_header = False
            i = 0
            j = 0
            nexta = plan.act[0] if plan.nact else -1
            # fast path: a line with no backslash (text) or no quote (csv) before its
            # first newline ends there, and its fields end at each delimiter
            hit = <const char*>memchr(msg + q, c'\n', L - q)
            line_end = (hit - msg) if hit != NULL else L
            plain = memchr(msg + q, c'\\' if text else quote, line_end - q) == NULL
            while True:
                # one field: [f0, fend); q stops on its delimiter or terminator
                f0 = q
                special = False
                quoted = False
                if plain:
                    hit = <const char*>memchr(msg + q, delim, line_end - q)
                    q = (hit - msg) if hit != NULL else line_end
                elif text:
                    while q < L:
                        ch = msg[q]
                        if ch == c'\\':
                            special = True
                            q += 2
                            continue
                        if ch == delim or ch == c'\n':
                            break
                        q += 1
                    if q > L:
                        q = L
                else:
                    inq = False
                    while q < L:
                        ch = msg[q]
                        if inq:
                            if ch == esc and q + 1 < L and (msg[q + 1] == quote or (
                                    esc != quote and msg[q + 1] == esc)):
                                q += 2
                                continue
                            if ch == quote:
                                inq = False
                            q += 1
                            continue
                        if ch == delim or ch == c'\n':
                            break
                        if ch == quote:
                            inq = True
                            quoted = True
                        q += 1
                fend = q
                last = q >= L or msg[q] == c'\n'
                if last and q < L and fend > f0 and msg[fend - 1] == c'\r':
                    fend -= 1
                if i >= plan.ncols:
                    raise FrameError(f"COPY row has more than {plan.ncols} fields")
                if i == nexta:
                    c = &self._cells[self._ncells]
                    self._ncells += 1
                    c.raw_off = f0
                    c.raw_len = fend - f0
                    c.repl = -1
                    if not quoted and not plan.null_ambiguous and fend - f0 == nul_len \
                            and memcmp(msg + f0, nul, nul_len) == 0:
                        c.val = NULL
                        c.val_len = -1
                    elif text and special:
                        c.val = self._arena.p + self._arena.len
                        c.val_len = _unescape_text(msg + f0, fend - f0,
                                                   self._arena.p + self._arena.len)
                        self._arena.len += c.val_len
                    elif quoted:
                        c.val = self._arena.p + self._arena.len
                        c.val_len = _unescape_csv(msg + f0, fend - f0, quote, esc,
                                                  self._arena.p + self._arena.len)
                        self._arena.len += c.val_len
                    else:
                        c.val = msg + f0
                        c.val_len = fend - f0
                    j += 1
                    nexta = plan.act[j] if j < plan.nact else -1
                i += 1
                if last:
                    rec.end = fend
                    rec.term = (q + 1 if q < L else q) - fend
                    q = q + 1 if q < L else q
                    break
                q += 1      # the delimiter
            if i != plan.ncols:
                raise FrameError(f"COPY row has {i} fields; the mask plan has {plan.ncols}")
        return 0

    cdef int _detect(self, MaskPlan plan) except -1:
        cdef Py_ssize_t i, j, k, total = 0, lo, hi, mid, skip, cap, hexlen = 0
        cdef Py_ssize_t nrows = self._nrows
        cdef RowRef* r
        cdef Rec* rec
        cdef Cell* c
        cdef ColPlan* col
        cdef DetCell* d
        cdef char* b
        cdef uint64_t to, bits
        cdef void* p
        cdef bytes buf
        cdef _Hits hits = self._hits
        cdef int got
        self._ndcells = 0
        self._repls = []
        # the detector cells of the batch, in stream order
        for i in range(self._nrecs if plan.mode != MODE_ROWS else nrows):
            if plan.mode == MODE_ROWS:
                k = self._rows[i].cell0
            else:
                rec = &self._recs[i]
                if rec.skip:
                    continue
                k = rec.cell0
            for j in range(plan.nact):
                col = &plan.cols[plan.act[j]]
                if col.action != ACT_DETECT:
                    continue
                c = &self._cells[k + j]
                skip = 1 if col.kind == KIND_JSONB_BIN else 0
                if c.val_len <= skip:
                    continue
                if self._ndcells == self._dcells_cap:
                    cap = self._dcells_cap * 2 if self._dcells_cap else 256
                    p = realloc(self._dcells, cap * sizeof(DetCell))
                    if p == NULL:
                        raise MemoryError()
                    self._dcells = <DetCell*>p
                    self._dcells_cap = cap
                d = &self._dcells[self._ndcells]
                self._ndcells += 1
                d.cell = k + j
                d.scan_off = total
                d.bits = 0
                d.dv = c.val + skip
                d.dlen = c.val_len - skip
                d.hexoff = -1
                d.view = False
                if col.kind == KIND_HEX and _hex_bytes(c.val, c.val_len) >= 0:
                    d.dlen = _hex_bytes(c.val, c.val_len)
                    d.hexoff = hexlen
                    hexlen += d.dlen
                elif col.kind >= KIND_INT8_BIN:
                    # a binary number: the digits a client prints of it
                    cap = _digits_view(col.kind, d.dv, d.dlen, NULL)
                    if cap < 0:
                        self._ndcells -= 1
                        continue
                    d.rawlen = d.dlen
                    d.dlen = cap
                    d.view = True
                    d.vkind = 1
                    d.hexoff = hexlen
                    hexlen += cap
                else:
                    cap = -1
                    d.vkind = 0
                    if col.kind == KIND_WHOLE and d.dlen >= 4 and d.dv[0] == 0:
                        # a binary array or record: its numbers' digits too
                        cap = _binnum_view(d.dv, d.dlen, NULL)
                        d.vkind = 2
                    if cap < 0:
                        cap = _hexview(d.dv, d.dlen, NULL)
                        d.vkind = 0
                    if cap < 0 and col.kind != KIND_JSONB_BIN:
                        # a number in exponent form (4.111111111111111e+15): its digits
                        cap = _expview(d.dv, d.dlen, NULL)
                        d.vkind = 3
                    if cap >= 0:
                        d.rawlen = d.dlen
                        d.dlen = cap
                        d.view = True
                        d.hexoff = hexlen
                        hexlen += cap
                total += d.dlen + 1
        if self._ndcells == 0:
            return 0
        if hexlen:
            # bytea in text format: the detectors read the bytes it spells
            self._hex.len = 0
            if hexlen > self._hex.cap:
                _grow(&self._hex, hexlen)
            for i in range(self._ndcells):
                d = &self._dcells[i]
                if d.view:
                    col = &plan.cols[plan.act[d.cell % plan.nact]]
                    if d.vkind == 1:
                        _digits_view(col.kind, d.dv, d.rawlen, self._hex.p + d.hexoff)
                    elif d.vkind == 2:
                        _binnum_view(d.dv, d.rawlen, self._hex.p + d.hexoff)
                    elif d.vkind == 3:
                        _expview(d.dv, d.rawlen, self._hex.p + d.hexoff)
                    else:
                        _hexview(d.dv, d.rawlen, self._hex.p + d.hexoff)
                    d.dv = self._hex.p + d.hexoff
                elif d.hexoff >= 0:
                    c = &self._cells[d.cell]
                    _hex_decode(c.val + 2, d.dlen, self._hex.p + d.hexoff)
                    d.dv = self._hex.p + d.hexoff
            self._hex.len = hexlen
        if plan.pre_bits:
            # the digit prefilters, cell by cell, without a copy
            for i in range(self._ndcells):
                d = &self._dcells[i]
                _digit_prefilter(d.dv, d.dlen, plan.cc_id, plan.phone_id, d)
        if plan._scan is not None:
            # one Hyperscan scan over the other prefilters: the cells joined by "\n"
            buf = PyBytes_FromStringAndSize(NULL, total)
            b = PyBytes_AS_STRING(buf)
            for i in range(self._ndcells):
                d = &self._dcells[i]
                memcpy(b + d.scan_off, d.dv, d.dlen)
                b[d.scan_off + d.dlen] = c'\n'
            hits.n = 0
            plan._scan(buf, _on_match, 0, hits)
            for i in range(hits.n):
                # the cell holding the last byte of the match
                to = hits.to[i] - 1
                lo = 0
                hi = self._ndcells - 1
                while lo < hi:
                    mid = (lo + hi + 1) >> 1
                    if <uint64_t>self._dcells[mid].scan_off <= to:
                        lo = mid
                    else:
                        hi = mid - 1
                d = &self._dcells[lo]
                _note(d, hits.ids[i], <Py_ssize_t>(hits.to[i] - <uint64_t>d.scan_off))
            hits.n = 0
        for i in range(self._ndcells):
            d = &self._dcells[i]
            if not d.bits:
                continue
            c = &self._cells[d.cell]
            col = &plan.cols[plan.act[d.cell % plan.nact]]
            skip = 1 if col.kind == KIND_JSONB_BIN else 0
            if col.kind == KIND_HEX or d.view:
                # found in the bytes it spells: the cell becomes NULL (validated first)
                if (d.bits & ~plan.loc_bits) == 0:
                    got = _native_mask(plan, d.dv, d.dlen, d.bits, &self._tmp, &bits)
                    self._tmp.len = 0
                    if got == 0:
                        continue
                    if got == 1:
                        c.repl = -2
                        self._count_dets(bits)
                        continue
                res = plan._mask_cell(PyBytes_FromStringAndSize(d.dv, d.dlen), d.bits, 0,
                                      d.lo, d.hi)
                if res is not None:
                    c.repl = -2
                    self._count_dets(<uint64_t>res[1])
                continue
            if (d.bits & ~plan.loc_bits) == 0 and (col.kind == KIND_TEXT
                                                     or col.kind == KIND_WHOLE):
                # located and validated in C
                got = _native_mask(plan, c.val + skip, c.val_len - skip, d.bits,
                                   &self._tmp, &bits)
                if got == 0:
                    continue
                if got == 1:
                    c.repl = len(self._repls)
                    self._repls.append(PyBytes_FromStringAndSize(self._tmp.p, self._tmp.len))
                    self._tmp.len = 0
                    self._count_dets(bits)
                    continue
            # mask_cell's third argument: 0 text, 1 JSON text, 2 array/composite literal
            res = plan._mask_cell(PyBytes_FromStringAndSize(c.val + skip, c.val_len - skip),
                                  d.bits, 2 if col.kind == KIND_LITERAL else (
                                      0 if col.kind == KIND_TEXT or col.kind == KIND_WHOLE
                                      else 1), d.lo, d.hi)
            if res is None:
                continue
            if res[0] is None:
                c.repl = -2                 # no label fits the literal: NULL
            else:
                c.repl = len(self._repls)
                self._repls.append(<bytes?>res[0])
            self._count_dets(<uint64_t>res[1])
        return 0

    cdef int _count_dets(self, uint64_t bits) except -1:
        cdef int j = 0
        while bits:
            if bits & 1:
                self._det_counts[j] += 1
            bits >>= 1
            j += 1
        return 0

    # -- output ---------------------------------------------------------------------

    cdef int _masked_value(self, MaskPlan plan, ColPlan* col, Cell* c, Buf* dst) except -1:
        # the masked value in wire form (DataRow) or before COPY escaping
        cdef const char* v = c.val
        cdef Py_ssize_t n = c.val_len
        cdef bytes repl
        if col.kind == KIND_JSONB_BIN:
            _putc(dst, v[0] if n > 0 else <char>1)
            if n > 0:
                v += 1
                n -= 1
        if col.action == ACT_DETECT:
            repl = <bytes>self._repls[c.repl]
            return _put(dst, PyBytes_AS_STRING(repl), PyBytes_GET_SIZE(repl))
        if col.kind == KIND_TEXT:
            return _strategy(col, plan._keys, v, n, dst)
        self._tmp.len = 0
        _strategy(col, plan._keys, v, n, &self._tmp)
        return _json_quote(self._tmp.p, self._tmp.len, dst)

    cdef int _emit_row(self, MaskPlan plan, RowRef* r) except -1:
        cdef Py_ssize_t start = self._out.len, cursor = 5, lenpos, j
        cdef Cell* c
        cdef ColPlan* col
        cdef Buf* out = &self._out
        _put(out, r.msg, 5)
        for j in range(plan.nact):
            col = &plan.cols[plan.act[j]]
            c = &self._cells[r.cell0 + j]
            if not _cell_changed(col, c):
                continue
            _put(out, r.msg + cursor, c.raw_off - cursor)
            lenpos = out.len
            _put(out, b"\xff\xff\xff\xff", 4)
            if col.action != ACT_NULL and col.kind != KIND_WHOLE and c.repl != -2:
                self._masked_value(plan, col, c, out)
                _put32(out.p + lenpos, <uint32_t>(out.len - lenpos - 4))
            cursor = c.raw_off + c.raw_len
            self._counts[plan.act[j]] += 1
            self.masked_cells += 1
        _put(out, r.msg + cursor, r.len - cursor)
        _put32(out.p + start + 1, <uint32_t>(out.len - start - 1))
        self.rows_rewritten += 1
        return 0

    cdef int _emit_copy(self, MaskPlan plan, RowRef* r) except -1:
        cdef Py_ssize_t start = self._out.len, cursor, k, j, mark
        cdef Rec* rec
        cdef Cell* c
        cdef ColPlan* col
        cdef Buf* out = &self._out
        _put(out, r.msg, 5)
        for k in range(r.rec0, r.rec0 + r.nrec):
            rec = &self._recs[k]
            if not rec.changed:
                _put(out, r.msg + rec.start, rec.end + rec.term - rec.start)
                continue
            cursor = rec.start
            for j in range(plan.nact):
                col = &plan.cols[plan.act[j]]
                c = &self._cells[rec.cell0 + j]
                if not _cell_changed(col, c):
                    continue
                _put(out, r.msg + cursor, c.raw_off - cursor)
                if col.action == ACT_NULL or col.kind == KIND_WHOLE or c.repl == -2:
                    _put(out, PyBytes_AS_STRING(plan.null_str), PyBytes_GET_SIZE(plan.null_str))
                else:
                    self._tmp2.len = 0
                    self._masked_value(plan, col, c, &self._tmp2)
                    if plan.mode == MODE_COPY_TEXT:
                        mark = out.len
                        _copy_text_escape(self._tmp2.p, self._tmp2.len, plan.delim, out)
                        if out.len - mark == PyBytes_GET_SIZE(plan.null_str) and out.len > mark \
                                and memcmp(out.p + mark, PyBytes_AS_STRING(plan.null_str),
                                           out.len - mark) == 0:
                            # a value that reads as the NULL string: its first byte in octal
                            out.len = mark
                            _putc(out, c'\\')
                            _putc(out, <char>(c'0' + ((<uint8_t>self._tmp2.p[0]) >> 6)))
                            _putc(out, <char>(c'0' + (((<uint8_t>self._tmp2.p[0]) >> 3) & 7)))
                            _putc(out, <char>(c'0' + ((<uint8_t>self._tmp2.p[0]) & 7)))
                            _copy_text_escape(self._tmp2.p + 1, self._tmp2.len - 1, plan.delim, out)
                    else:
                        _copy_csv_escape(self._tmp2.p, self._tmp2.len, plan, out)
                cursor = c.raw_off + c.raw_len
                self._counts[plan.act[j]] += 1
                self.masked_cells += 1
            _put(out, r.msg + cursor, rec.end + rec.term - cursor)
        _put32(out.p + start + 1, <uint32_t>(out.len - start - 1))
        self.rows_rewritten += 1
        return 0


# -- COPY unescaping (into a buffer at least as long as the raw field) ----------------

cdef inline int _hexval(char c) noexcept nogil:
    if c'0' <= c <= c'9':
        return c - c'0'
    if c'a' <= c <= c'f':
        return c - c'a' + 10
    if c'A' <= c <= c'F':
        return c - c'A' + 10
    return -1


cdef Py_ssize_t _unescape_text(const char* s, Py_ssize_t n, char* out) noexcept nogil:
    cdef Py_ssize_t i = 0, k = 0
    cdef int v, d, cnt
    cdef char c
    while i < n:
        c = s[i]
        if c != c'\\' or i + 1 >= n:
            out[k] = c
            k += 1
            i += 1
            continue
        i += 1
        c = s[i]
        if c'0' <= c <= c'7':
            v = 0
            cnt = 0
            while cnt < 3 and i < n and c'0' <= s[i] <= c'7':
                v = v * 8 + (s[i] - c'0')
                i += 1
                cnt += 1
            out[k] = <char>(v & 0xFF)
        elif c == c'x' and i + 1 < n and _hexval(s[i + 1]) >= 0:
            i += 1
            v = _hexval(s[i])
            i += 1
            if i < n:
                d = _hexval(s[i])
                if d >= 0:
                    v = v * 16 + d
                    i += 1
            out[k] = <char>v
        else:
            if c == c'b':
                out[k] = c'\b'
            elif c == c'f':
                out[k] = c'\f'
            elif c == c'n':
                out[k] = c'\n'
            elif c == c'r':
                out[k] = c'\r'
            elif c == c't':
                out[k] = c'\t'
            elif c == c'v':
                out[k] = c'\v'
            else:
                out[k] = c
            i += 1
        k += 1
    return k


cdef Py_ssize_t _unescape_csv(const char* s, Py_ssize_t n, char quote, char esc,
                              char* out) noexcept nogil:
    cdef Py_ssize_t i = 0, k = 0
    cdef bint inq = False
    cdef char c
    while i < n:
        c = s[i]
        if inq:
            if c == esc and i + 1 < n and (s[i + 1] == quote or (esc != quote and s[i + 1] == esc)):
                out[k] = s[i + 1]
                k += 1
                i += 2
                continue
            if c == quote:
                inq = False
            else:
                out[k] = c
                k += 1
            i += 1
            continue
        if c == quote:
            inq = True
        else:
            out[k] = c
            k += 1
        i += 1
    return k
