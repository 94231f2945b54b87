# The audit's statement tracker, compiled: pairs what the client sent with what the
# server answered and emits one audit row per statement (see pgguard.proxy.tracking).
# cython: language_level=3

from collections import deque

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.datetime cimport import_datetime, timedelta_new
from datetime import datetime, timedelta, timezone
from libc.string cimport memchr, memcpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import msgspec

from .answers import answer_for
from .relay cimport MessageScan
from .rowmask cimport RowRewriter
from .sqlshape cimport shape_buf
from .msgtypes cimport (BIND, CLOSE, COMMAND_COMPLETE, EMPTY_QUERY_RESPONSE, ERROR_RESPONSE,
                        EXECUTE, FUNCTION_CALL, PARAMETER_STATUS, PARSE, PORTAL_SUSPENDED,
                        QUERY, READY_FOR_QUERY, SCRUBBED_ERROR, SYNC, TARGET_PORTAL,
                        TARGET_STATEMENT, TX_IDLE)

import_datetime()

# a frontend entry for an injected refusal Query (answered by a ReadyForQuery)
REFUSAL_SYNC = 0
# the per-session cache of statement columns: what one entry's text may be, and what
# all of them may keep (per session: a thousand sessions keep at most a thousand times it)
cdef Py_ssize_t PART_TEXT_MAX = 8192
cdef Py_ssize_t PARTS_BYTES = 1 << 20


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
# the head of a record's wire row: a msgpack array of the 26 AuditRecord fields
# (FIELDS, see pgguard.audit.ipc), then its first field, event_id, empty
cdef bytes _ROW_HEAD = b"\xdc\x00\x1a\xa0"
cdef int ROW_FIELDS = 26


cdef bytes _body(bytes enc, Py_ssize_t count):
    # a msgpack array's encoding without its header: the concatenation of its items
    return enc[1:] if count <= 15 else enc[3:]


cdef int _put_ts(unsigned char* p, long long us) noexcept:
    # a UTC instant as msgpack's timestamp extension, exactly as msgspec encodes a
    # datetime: timestamp32 (whole seconds) or timestamp64 (nanoseconds, seconds < 2**34)
    cdef long long sec = us // 1000000
    cdef unsigned long long nsec = <unsigned long long>(us - sec * 1000000) * 1000
    cdef unsigned long long v
    cdef int i
    if nsec == 0 and 0 <= sec < (1LL << 32):
        p[0] = 0xd6
        p[1] = 0xff
        for i in range(4):
            p[2 + i] = <unsigned char>((<unsigned long long>sec >> (8 * (3 - i))) & 0xff)
        return 6
    if 0 <= sec < (1LL << 34):
        v = (nsec << 34) | <unsigned long long>sec
        p[0] = 0xd7
        p[1] = 0xff
        for i in range(8):
            p[2 + i] = <unsigned char>((v >> (8 * (7 - i))) & 0xff)
        return 10
    return -1


cdef int TAIL_FIELDS = 11        # decision .. hash: what _row encodes per record


cdef inline bint _utf8(obj, const char** p, Py_ssize_t* n) except -1:
    # a str's UTF-8 (cached by the str), or NULL for None; False: any other type
    if obj is None:
        p[0] = NULL
        n[0] = 0
        return True
    if obj.__class__ is not str:
        return False
    p[0] = PyUnicode_AsUTF8AndSize(obj, n)
    return True


cdef inline Py_ssize_t _str_size(const char* s, Py_ssize_t n) noexcept:
    if s == NULL:
        return 1
    if n < 32:
        return 1 + n
    if n < 256:
        return 2 + n
    if n < 65536:
        return 3 + n
    return 5 + n


cdef inline Py_ssize_t _put_str(unsigned char* p, const char* s, Py_ssize_t n) noexcept:
    # msgpack nil, fixstr, str8, str16 or str32, as msgspec writes them
    cdef Py_ssize_t h
    if s == NULL:
        p[0] = 0xc0
        return 1
    if n < 32:
        p[0] = 0xa0 | <unsigned char>n
        h = 1
    elif n < 256:
        p[0] = 0xd9
        p[1] = <unsigned char>n
        h = 2
    elif n < 65536:
        p[0] = 0xda
        p[1] = <unsigned char>(n >> 8)
        p[2] = <unsigned char>(n & 0xff)
        h = 3
    else:
        p[0] = 0xdb
        _be(p + 1, <unsigned long long>n, 4)
        h = 5
    memcpy(p + h, s, n)
    return h + n


cdef inline void _be(unsigned char* p, unsigned long long v, int width) noexcept:
    cdef int i
    for i in range(width):
        p[i] = <unsigned char>((v >> (8 * (width - 1 - i))) & 0xff)


cdef inline Py_ssize_t _int_size(long long v) noexcept:
    if v >= 0:
        return 1 if v < 128 else 2 if v < 256 else 3 if v < 65536 else \
            5 if v < 4294967296LL else 9
    return 1 if v >= -32 else 2 if v >= -128 else 3 if v >= -32768 else \
        5 if v >= -2147483648LL else 9


cdef inline Py_ssize_t _put_int(unsigned char* p, long long v) noexcept:
    # msgpack's smallest form of v, as msgspec writes it
    cdef unsigned long long u = <unsigned long long>v
    if v >= 0:
        if v < 128:
            p[0] = <unsigned char>v
            return 1
        if v < 256:
            p[0] = 0xcc
            _be(p + 1, u, 1)
            return 2
        if v < 65536:
            p[0] = 0xcd
            _be(p + 1, u, 2)
            return 3
        if v < 4294967296LL:
            p[0] = 0xce
            _be(p + 1, u, 4)
            return 5
        p[0] = 0xcf
        _be(p + 1, u, 8)
        return 9
    if v >= -32:
        p[0] = <unsigned char>(v & 0xff)
        return 1
    if v >= -128:
        p[0] = 0xd0
        _be(p + 1, u, 1)
        return 2
    if v >= -32768:
        p[0] = 0xd1
        _be(p + 1, u, 2)
        return 3
    if v >= -2147483648LL:
        p[0] = 0xd2
        _be(p + 1, u, 4)
        return 5
    p[0] = 0xd3
    _be(p + 1, u, 8)
    return 9


cdef object _tail(decision, rule, approver, long long rows, long long out, masked,
                  duration, state, err):
    # a record's last 11 fields (decision .. hash) as msgspec encodes them in its row
    # (no array header), encoded here in C; None when one is not what the fast path
    # knows (a str that is not UTF-8, an int beyond 64 bits, another type)
    cdef const char* sp[5]
    cdef Py_ssize_t sn[5]
    cdef long long m, d = 0
    cdef Py_ssize_t n = 2, k = 0, i
    cdef bytes enc
    cdef unsigned char* p
    try:
        if not _utf8(decision, &sp[0], &sn[0]) or not _utf8(rule, &sp[1], &sn[1]) or \
                not _utf8(approver, &sp[2], &sn[2]) or not _utf8(state, &sp[3], &sn[3]) \
                or not _utf8(err, &sp[4], &sn[4]):
            return None
        m = masked
        if duration is not None:
            d = duration
    except (UnicodeError, OverflowError, TypeError):
        return None
    for i in range(5):
        n += _str_size(sp[i], sn[i])
    n += _int_size(rows) + _int_size(out) + _int_size(m) + \
        (_int_size(d) if duration is not None else 1)
    enc = PyBytes_FromStringAndSize(NULL, n)
    p = <unsigned char*>PyBytes_AS_STRING(enc)
    for i in range(3):                       # decision, rule, approver
        k += _put_str(p + k, sp[i], sn[i])
    k += _put_int(p + k, rows)
    k += _put_int(p + k, out)
    k += _put_int(p + k, m)
    if duration is None:
        p[k] = 0xc0
        k += 1
    else:
        k += _put_int(p + k, d)
    k += _put_str(p + k, sp[3], sn[3])       # sqlstate, error
    k += _put_str(p + k, sp[4], sn[4])
    p[k] = 0xa0                              # prev_hash, hash: the writer's
    p[k + 1] = 0xa0
    return enc


def row_tail(decision, rule, approver, long long rows, long long out, masked, duration,
             state, err):
    """_tail's bytes (tests compare them with msgspec's encoding of the same fields)."""
    return _tail(decision, rule, approver, rows, out, masked, duration, state, err)


def row_timestamp(long long us):
    """_put_ts's bytes for ``us`` µs since the epoch (tests compare them with msgspec)."""
    cdef unsigned char buf[16]
    cdef int n = _put_ts(buf, us)
    return None if n < 0 else PyBytes_FromStringAndSize(<char*>buf, n)


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


# CommandComplete tags of statements that may change what the view map holds (views,
# rules, triggers, partitions, renames; a DO block may do any of them)
_DDL_TAGS = (b"CREATE ", b"ALTER ", b"DROP ", b"DO\x00", b"IMPORT FOREIGN SCHEMA")


cdef class _Pending:
    # one statement (sql is not None) or sync point (sync), oldest first
    cdef object sql         # bytes, or None for a sync marker
    cdef object dec         # the policy decision (or Approved), or None
    cdef object key         # the text's shape, when the relay computed it (or None)
    cdef long long t0       # monotonic ns when forwarded (0: unknown)
    cdef long long rows
    cdef object state       # SQLSTATE of its error
    cdef object err
    cdef bint sync          # a Query (answered by its own ReadyForQuery) or a Sync
    cdef bint done
    # a Query or FunctionCall: Postgres skips it after an extended-protocol error until
    # Sync (it gets no ReadyForQuery of its own then)
    cdef bint skippable
    # K_STATEMENT (a Query, Execute, judged FunctionCall, or a marker), K_PARSE / K_BIND
    # (recorded only when Postgres answers it with an error), K_SYNC (a Sync message)
    cdef int kind
    cdef int ordinal            # a Parse's / Bind's: among its type since the last sync
    cdef _Pending src           # an Execute's Bind, a Bind's Parse (None: unknown)
    cdef long long syncno       # a sync point's number (StatementTracker._syncs_sent)
    cdef object refused         # (rule, rows) when its error is pgguard's own refusal
    # a Parse's: its statement name and what the name held before it (a tuple of
    # stmts, or None), put back when Postgres fails or skips the Parse
    cdef object name
    cdef object prev

    def __cinit__(self, sql, dec, long long t0, bint sync, bint done):
        self.sql = sql
        self.dec = dec
        self.t0 = t0
        self.sync = sync
        self.done = done
        self.skippable = False
        self.kind = K_STATEMENT
        self.ordinal = 0
        self.src = None
        self.syncno = 0
        self.key = None
        self.refused = None
        self.name = None
        self.prev = None


cdef enum:
    K_STATEMENT = 0
    K_PARSE = 1
    K_BIND = 2
    K_SYNC = 3
    K_CLOSE_S = 4       # a Close of a statement: its name is forgotten once it ran
    K_CLOSE_P = 5       # ... of a portal


cdef bytes _cstr(bytes msg, Py_ssize_t pos, Py_ssize_t* after):
    # the NUL-terminated string at pos; after: the position behind its NUL
    cdef const char* p = PyBytes_AS_STRING(msg)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(msg)
    cdef const char* e
    if pos >= n:
        raise ValueError("truncated message")
    e = <const char*>memchr(p + pos, 0, n - pos)
    if e == NULL:
        raise ValueError("unterminated string")
    after[0] = e - p + 1
    return msg[pos:e - p]


cdef long long _rows(bytes msg):
    # CommandComplete tag: "SELECT 5", "INSERT 0 1", "UPDATE 3", "COPY 10", "CREATE TABLE"
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(msg)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(msg) - 1         # the tag's NUL
    cdef Py_ssize_t i = end
    cdef long long v = 0
    while i > 5 and 48 <= p[i - 1] <= 57:
        i -= 1
    if i == end or (i > 5 and p[i - 1] != 32) or end - i > 18:
        return 0
    while i < end:
        v = v * 10 + (p[i] - 48)
        i += 1
    return v


# entries kept for the messages of a pipeline after an error (see _drain)
cdef Py_ssize_t SKIPPED_KEPT = 1024
cdef bytes _SCS = b"standard_conforming_strings\0"


cdef bytes _error_text(bytes msg, scrubbed):
    # an ErrorResponse's fields as the client got them (masking scrubs them: a cast
    # error quoting an SSN reached the log in clear, round 19), else as sent
    if scrubbed is not None and PyBytes_GET_SIZE(scrubbed) > 5:
        return (<bytes>scrubbed)[5:]
    return msg[5:]
# prepared statements whose texts one session keeps; past it the oldest is forgotten
# (an Execute of it is recorded with a text saying so), so a client preparing names
# without end cannot grow the proxy without bound
STMTS_KEPT = 10_000
STMTS_BYTES = 16 << 20          # ... and at most this much of their texts
# named portals kept before those of finished transactions are pruned
PORTALS_PRUNE = 64
_NO_PORTAL = (b"", None, 0)
_FORGOTTEN = (b"(pgguard: the text of prepared statement \"%s\" was not kept: the "
              b"prepared statements of the session passed what is kept of them: 10000 "
              b"statements or 16 MB of text)")
_FCALL = b"/* pgguard: FunctionCall of the function with OID %d */"
_SQL_PREPARED = (b"/* pgguard: prepared statement \"%s\", prepared by SQL PREPARE or "
                 b"not known to pgguard: its text is in the record of its PREPARE */")
_SQL_PORTAL = (b"/* pgguard: portal \"%s\", a cursor opened by SQL DECLARE or not known "
               b"to pgguard: its query is in the record of its DECLARE */")


cdef inline int _be32(const char* p) noexcept:
    return <int>(((<unsigned int><unsigned char>p[0]) << 24) |
                 ((<unsigned int><unsigned char>p[1]) << 16) |
                 ((<unsigned int><unsigned char>p[2]) << 8) | (<unsigned char>p[3]))


cdef class StatementTracker:
    """Turns the session's frontend log and backend events into audit records.

    The client side appends to ``flog``, in the order it forwards them, ``(message,
    decision, monotonic_ns)`` for each Query / Parse / Bind / Execute / Sync /
    FunctionCall (the compiled fast path appends its own), and ``(REFUSAL_SYNC, None,
    0)`` for an injected refusal Query. A FunctionCall with a decision (judged by the
    policy) is recorded as the text of the decision's first statement. The backend side calls :meth:`on_backend` (or
    :meth:`on_events`) with each CommandComplete, EmptyQueryResponse, PortalSuspended,
    ErrorResponse and ReadyForQuery in order. A completion pairs with the oldest
    unfinished statement; ReadyForQuery closes everything up to its sync point.

    ``helpers`` is the Python side (``pgguard.proxy.tracking``): ``statement_record``,
    ``statement_part``, ``session_columns``, ``Approved`` and ``parse_error_fields``.
    """

    cdef readonly object session
    cdef readonly object audit
    cdef readonly list flog
    cdef readonly object pending
    cdef dict stmts             # statement name -> (sql, decision, its Parse entry)
    cdef dict portals           # portal -> (statement name, its Bind entry, sync no.)
    cdef long long _syncs_sent  # sync points drained (Query, Sync, ...), numbered
    cdef bint _forgot           # a statement's text was forgotten (STMTS_KEPT)
    cdef Py_ssize_t _stmts_bytes    # the texts stmts keeps
    # the session's expected-answers model's queue for this tracker (Answers.listen):
    # which message each ErrorResponse answers, the Syncs a COPY swallowed
    cdef public object answers
    cdef int _seg_p, _seg_b     # Parses / Binds drained since the last sync point
    cdef bint segment_error
    cdef long long bytes_mark
    cdef readonly bint strict   # records are written before forwarding: emit nothing
    cdef bint raw               # literals are kept: no per-shape statement columns
    cdef object _base           # wall clock at monotonic _mono0
    cdef long long _mono0
    cdef tuple _fixed           # session columns, set at the first record
    cdef bytes _fixed_enc       # the same, msgpack-encoded (no array header)
    cdef dict _parts            # shape -> (decision, statement columns encoded)
    cdef object _last_sql, _last_dec, _last_part    # the last _part answer (prepared)
    cdef object _enc            # msgpack encoder (what AuditLog.log_row would use)
    cdef object _log_encoded    # AuditLog.log_encoded, or None: log_row
    cdef object _q              # AuditLog.encoded_queue()'s queue, or None: _log_encoded
    cdef Py_ssize_t _wake_n     # ... and the length at which the sender is woken
    cdef long long _base_us     # _base in µs since the Unix epoch
    cdef Py_ssize_t _parts_bytes  # what _parts keeps, counted by its statements' size
    cdef object _h_record, _h_part, _h_session, _approved, _error_fields, _log_row
    cdef MessageScan _bscan
    cdef bint _masking          # the session masks (counts masked cells per record)
    cdef RowRewriter _rw        # its rewriter (the cells it masked since the last record)
    # a DDL command completed in the session's current transaction: once it is idle,
    # the proxy reads the view map again (Server.catalog_committed)
    cdef bint ddl_seen
    # standard_conforming_strings was reported off in this session (a session under no
    # policy may turn it off): its statements are recorded as read either way
    cdef bint _scs_off
    # the next ErrorResponse as the client gets it (set by masking, else None)
    cdef object scrubbed
    cdef object _h_both
    # (rule, rows): the next ErrorResponse is pgguard's refusal of the running statement
    # after it ran (the blast-radius guard's, see refused_next)
    cdef object _refused

    def __init__(self, session, audit, helpers, base, long long mono0):
        self.session = session
        self.audit = audit
        self.flog = []
        self.pending = deque()
        self.stmts = {}
        self.portals = {}
        self._syncs_sent = 0
        self._forgot = False
        self._stmts_bytes = 0
        self.strict = session.services.audit_strict
        self.raw = session.services.cfg.audit.capture_literals
        self._base = base
        self._mono0 = mono0
        self._fixed = None
        self._parts = {}
        self._parts_bytes = 0
        (self._h_record, self._h_part, self._h_session, self._approved,
         self._error_fields, self._h_both) = helpers
        self._scs_off = False
        self.scrubbed = None
        self._log_row = audit.log_row
        # rows are assembled from parts encoded once (see _emit); an audit without
        # log_encoded gets tuples
        self._log_encoded = getattr(audit, "log_encoded", None)
        self._q = None
        self._wake_n = 0
        queue = getattr(audit, "encoded_queue", None)
        if queue is not None and self._log_encoded is not None:
            self._q, self._wake_n = queue()
        self._enc = msgspec.msgpack.Encoder(decimal_format="number").encode
        self._base_us = (base - _EPOCH) // _US
        self._fixed_enc = None
        self._last_sql = None
        self._bscan = None
        self.answers = None
        self._seg_p = self._seg_b = 0
        self._refused = None

    def refused_next(self, str rule, long long rows):
        """The next ErrorResponse the client gets is pgguard's refusal (by ``rule``) of
        the statement running now, which changed ``rows`` rows before it was rolled
        back: its record says "blocked", not "error"."""
        self._refused = (rule, rows)

    def read_log(self):
        """Read the client messages logged so far (Session.log_full)."""
        self._drain()

    def abandon(self, str why):
        """The session ends with statements Postgres has not answered (the client or
        the server went away): each is recorded now, its outcome unknown (it may have
        run), saying ``why``; nothing else of the session is recorded after this."""
        cdef _Pending e
        self._drain()
        for x in self.pending:
            e = <_Pending>x
            if e.sql is None or e.done or e.kind != K_STATEMENT:
                continue
            e.err = why if e.err is None else e.err
            e.done = True
            self._emit(e)
        self.pending.clear()

    # -- frontend
    cdef _drain(self):
        cdef list flog = self.flog
        cdef Py_ssize_t after, pos
        cdef bytes msg, name, portal
        cdef int t, kind
        cdef _Pending e
        cdef bint skipping
        if not flog:
            return
        pending = self.pending
        # after an error, Postgres skips every message up to the segment's Sync: while
        # no Sync waits among the entries, the Parses, Binds and Executes that arrive
        # now are skipped ones; beyond SKIPPED_KEPT entries they get none (a client
        # flooding Executes after an error would otherwise make the session's memory
        # grow without bound, where Postgres reads and drops them)
        skipping = self.segment_error and len(pending) >= SKIPPED_KEPT
        if skipping:
            for x in pending:
                if (<_Pending>x).sync:
                    skipping = False
                    break
        for item in flog:
            m = (<tuple>item)[0]
            if m.__class__ is not bytes:                 # REFUSAL_SYNC
                e = _Pending(None, None, (<tuple>item)[2], True, False)
                self._syncs_sent += 1
                e.syncno = self._syncs_sent
                pending.append(e)
                self._seg_p = self._seg_b = 0
                skipping = False
                continue
            msg = <bytes>m
            t = <unsigned char>PyBytes_AS_STRING(msg)[0]
            if skipping and (t == PARSE or t == BIND or t == EXECUTE or t == CLOSE):
                continue
            skipping = False if t == SYNC or t == QUERY or t == FUNCTION_CALL else skipping
            if t == QUERY:
                e = _Pending(msg[5:PyBytes_GET_SIZE(msg) - 1], (<tuple>item)[1],
                             (<tuple>item)[2], True, False)
                e.skippable = True
                if len(<tuple>item) > 3:            # the relay's shape of the text
                    e.key = (<tuple>item)[3]
                self._syncs_sent += 1
                e.syncno = self._syncs_sent
                pending.append(e)
                self._seg_p = self._seg_b = 0
            elif t == PARSE:                             # remember the text
                # (an entry of its own: recorded only if Postgres refuses it)
                e = _Pending(b"", (<tuple>item)[1], (<tuple>item)[2], False, True)
                e.kind = K_PARSE
                e.ordinal = self._seg_p
                self._seg_p += 1
                pending.append(e)
                try:
                    name = _cstr(msg, 5, &pos)
                    e.sql = _cstr(msg, pos, &after)
                    stmts = self.stmts
                    old = stmts.get(name)
                    if old is not None:
                        self._stmts_bytes -= len((<tuple>old)[0])
                    elif name:
                        while stmts and (len(stmts) >= STMTS_KEPT or self._stmts_bytes +
                                         len(e.sql) > STMTS_BYTES):
                            k = next(iter(stmts))
                            self._stmts_bytes -= len((<tuple>stmts.pop(k))[0])
                            self._forgot = True
                    stmts[name] = (e.sql, e.dec, e)
                    self._stmts_bytes += len(e.sql)
                    e.name = name
                    e.prev = old
                except ValueError:
                    pass
            elif t == BIND:                              # portal -> statement
                e = _Pending(b"", None, (<tuple>item)[2], False, True)
                e.kind = K_BIND
                e.ordinal = self._seg_b
                self._seg_b += 1
                pending.append(e)
                try:
                    portal = _cstr(msg, 5, &pos)
                    name = _cstr(msg, pos, &after)
                    got = self.stmts.get(name)
                    if got is not None:
                        e.sql, e.dec, e.src = got
                    elif self._forgot and name:
                        e.sql = _FORGOTTEN % (name,)
                    elif name:
                        e.sql = _SQL_PREPARED % (name.replace(b"*/", b"* /"),)
                    self.portals[portal] = (name, e, self._syncs_sent)
                except ValueError:
                    pass
            elif t == EXECUTE:
                try:
                    portal = _cstr(msg, 5, &after)
                except ValueError:
                    portal = b""
                name, b, _ = self.portals.get(portal, _NO_PORTAL)
                sql, dec, _ = self.stmts.get(name, (b"", None, None))
                if not sql and b is not None:
                    sql = (<_Pending>b).sql        # (a text forgotten, or SQL's: says so)
                elif b is None and portal:
                    sql = _SQL_PORTAL % (portal.replace(b"*/", b"* /"),)
                e = _Pending(sql, dec, (<tuple>item)[2], False, False)
                e.src = b
                pending.append(e)
            elif t == FUNCTION_CALL and (<tuple>item)[1] is not None and \
                    (<tuple>item)[1].statements:
                # FunctionCall judged by the policy: recorded as the SQL it stands for
                # (the decision's statement text), answered by its own ReadyForQuery
                dec = (<tuple>item)[1]
                e = _Pending(dec.statements[0].text.encode(), dec, (<tuple>item)[2], True,
                             False)
                e.skippable = True
                self._syncs_sent += 1
                e.syncno = self._syncs_sent
                pending.append(e)
                self._seg_p = self._seg_b = 0
            elif t == CLOSE and PyBytes_GET_SIZE(msg) > 6:
                # forgotten once Postgres ran it (an error before it skips it: the name
                # lives on), and only if the name still means what it meant here
                kind = <unsigned char>PyBytes_AS_STRING(msg)[5]
                if kind != TARGET_STATEMENT and kind != TARGET_PORTAL:
                    continue
                try:
                    name = _cstr(msg, 6, &after)
                except ValueError:
                    continue
                e = _Pending(None, None, (<tuple>item)[2], False, True)
                e.kind = K_CLOSE_S if kind == TARGET_STATEMENT else K_CLOSE_P
                e.key = (name, (self.stmts if kind == TARGET_STATEMENT
                                else self.portals).get(name))
                pending.append(e)
            elif t == FUNCTION_CALL:
                # a FunctionCall no policy judged (a session under none): recorded by
                # the function's OID, what the message names, answered by its own
                # ReadyForQuery (round 18: these ran with no record at all)
                e = _Pending(_FCALL % (_be32(PyBytes_AS_STRING(msg) + 5)
                                       if PyBytes_GET_SIZE(msg) >= 9 else -1,),
                             (<tuple>item)[1], (<tuple>item)[2], True, False)
                e.skippable = True
                self._syncs_sent += 1
                e.syncno = self._syncs_sent
                pending.append(e)
                self._seg_p = self._seg_b = 0
            elif t == SYNC:
                e = _Pending(None, None, (<tuple>item)[2], True, True)
                e.kind = K_SYNC
                self._syncs_sent += 1
                e.syncno = self._syncs_sent
                pending.append(e)
                self._seg_p = self._seg_b = 0
        flog.clear()

    cdef _closed(self, _Pending e):
        # a Close that ran upstream: its statement or portal is gone
        d = self.stmts if e.kind == K_CLOSE_S else self.portals
        name, was = <tuple>e.key
        if was is not None and d.get(name) is was:
            del d[name]
            if e.kind == K_CLOSE_S:
                self._stmts_bytes -= len((<tuple>was)[0])

    cdef _prune_portals(self, long long upto):
        # a ReadyForQuery outside a transaction block after sync point `upto`: the
        # portals bound before it are gone (they live until their transaction ends)
        portals = self.portals
        for k in [k for k, v in portals.items() if (<tuple>v)[2] < upto]:
            del portals[k]

    def note_ddl(self):
        """A statement on its way upstream changes the catalog although its command tag
        will not say so (DDL inside a called function's body): once the session is
        idle, the proxy reads the catalog again, as after a DDL tag."""
        self.ddl_seen = True

    def refusal_ignored(self):
        """An injected refusal Query the server skipped (an earlier error in the same
        pipeline): its sync marker will see no ReadyForQuery."""
        cdef _Pending e
        self._drain()
        for i, x in enumerate(self.pending):
            e = <_Pending>x
            if e.sql is None and e.sync and not e.done:
                del self.pending[i]
                return

    # -- backend
    def on_events(self, list events):
        """on_backend for each (type, message) of a relay chunk."""
        for ev in events:
            self._backend((<tuple>ev)[0], (<tuple>ev)[1])

    def on_backend(self, int t, bytes msg):
        """A CommandComplete, EmptyQueryResponse, PortalSuspended, ErrorResponse,
        ReadyForQuery or ParameterStatus from the server, in stream order."""
        self._backend(t, msg)

    cdef _backend(self, int t, bytes msg):
        cdef _Pending e
        cdef long long swallowed = 0, suspended_rows = 0
        if t == SCRUBBED_ERROR:         # the next ErrorResponse as the client got it
            self.scrubbed = msg
            return
        if t == PORTAL_SUSPENDED:       # its rows: the scan counted them (no tag)
            suspended = self.session.bscan.suspended
            suspended_rows = suspended.pop(0) if suspended else 0
        # (the scrubbed text a masking session set is this error's, or nobody's)
        scrubbed, self.scrubbed = self.scrubbed, None
        if t == PARAMETER_STATUS:       # a reported setting (the session's pins)
            if msg.startswith(_SCS, 5) and not msg.startswith(b"on\0", 5 + len(_SCS)):
                self._scs_off = True
            self.session.parameter_reported(msg)
            return
        self._drain()
        pending = self.pending
        got = answer_for(self.answers, msg) if self.answers and (
            t == ERROR_RESPONSE or t == READY_FOR_QUERY) else None
        if t == READY_FOR_QUERY:
            if self.ddl_seen and PyBytes_GET_SIZE(msg) > 5 and msg[5] == TX_IDLE:
                self.ddl_seen = False
                self.session.services.catalog_committed(self.session.database)
            if got is not None:
                swallowed = (<tuple>got)[1]     # Syncs a COPY took: no ReadyForQuery
            while pending:
                e = <_Pending>pending.popleft()
                if e.kind >= K_CLOSE_S:
                    if not self.segment_error:
                        self._closed(e)
                    continue
                # after an extended-protocol error Postgres skips Queries and
                # FunctionCalls too, until Sync: this ReadyForQuery is the Sync's
                skipped = self.segment_error and e.skippable
                if e.sql is not None and not e.done:
                    if (not e.sync or skipped) and e.state is None and self.segment_error:
                        e.err = "not executed: an earlier message of the pipeline failed"
                    self._emit(e)
                if e.sync and not skipped:
                    if swallowed and e.kind == K_SYNC:
                        swallowed -= 1
                        continue
                    if PyBytes_GET_SIZE(msg) > 5 and msg[5] == TX_IDLE and \
                            len(self.portals) > PORTALS_PRUNE:
                        self._prune_portals(e.syncno)
                    break
            self.segment_error = False
            return
        if t == COMMAND_COMPLETE and not self.ddl_seen and msg.startswith(_DDL_TAGS, 5):
            self.ddl_seen = True
        if t == ERROR_RESPONSE and got is not None and (<tuple>got)[1] != EXECUTE and \
                (<tuple>got)[1] != QUERY and (<tuple>got)[1] != FUNCTION_CALL:
            self._extended_error(msg, (<tuple>got)[1], (<tuple>got)[2], scrubbed)
            return
        e = self._current()
        if t == ERROR_RESPONSE:
            fields = self._error_fields(_error_text(msg, scrubbed))
            refused, self._refused = self._refused, None
            if e is None:
                self.segment_error = True
                return
            e.state = fields.get("C")
            e.err = fields.get("M")
            e.refused = refused
            if not e.sync:
                self._emit(e)
                e.done = True
                self.segment_error = True
                self._unparse_after(e, False)
            return
        if e is None:
            return
        if t == COMMAND_COMPLETE:
            e.rows += _rows(msg)
            if not e.sync:
                self._emit(e)
                e.done = True
        elif t == EMPTY_QUERY_RESPONSE or t == PORTAL_SUSPENDED:
            if t == PORTAL_SUSPENDED:
                e.rows += suspended_rows
            if not e.sync:
                self._emit(e)
                e.done = True

    def error_as_sent(self, bytes msg):
        """The next ErrorResponse reaches the client as ``msg`` (masking scrubbed it):
        its record keeps that text."""
        self.scrubbed = msg

    cdef _extended_error(self, bytes msg, int target, int ordinal, scrubbed):
        # an ErrorResponse answering a Parse, Bind, Describe, Close or Sync (0: nothing).
        # A Parse's or Bind's: the statement it prepared is recorded with the error (as
        # the Execute that would have run it, when one follows in the segment); the
        # rest of the segment up to Sync is skipped (see on_backend's ReadyForQuery)
        cdef _Pending e, failed = None, origin = None
        cdef int kind = K_PARSE if target == PARSE else K_BIND if target == BIND else -1
        if target == SYNC or target == 0:          # a Sync's (its commit) / a FATAL
            return
        self.segment_error = True
        if kind < 0:                             # Describe / Close: no statement ran
            return
        for x in self.pending:
            e = <_Pending>x
            if e.sync:
                break
            if failed is None:
                # (by its ordinal: answered entries before it may be gone, see _current)
                if e.kind == kind and e.ordinal == ordinal:
                    failed = origin = e
            elif e.kind == K_STATEMENT and not e.done and e.src is not None and (
                    e.src is failed or e.src.src is failed):
                failed = e                       # the Execute it would have run
                break
        if origin is not None:
            # the failed Parse prepared nothing, and the segment's later ones are skipped
            self._unparse_after(origin, kind == K_PARSE)
        if failed is None or failed.done and failed.kind == K_STATEMENT:
            return
        fields = self._error_fields(_error_text(msg, scrubbed))
        failed.state = fields.get("C")
        failed.err = fields.get("M")
        self._emit(failed)
        failed.done = True

    cdef _unparse_after(self, _Pending failed, bint itself):
        # Postgres ran no Parse of the segment after ``failed`` (nor ``failed`` itself,
        # when ``itself``): the names they prepared mean what they meant before (a
        # Parse of a name still in use fails, 42P05, and leaves the older statement)
        cdef _Pending e
        cdef bint after = False
        undone = []
        for x in self.pending:
            e = <_Pending>x
            if e is failed:
                after = True
                if not itself:
                    continue
            if not after:
                continue
            if e.sync:
                break
            if e.kind == K_PARSE and e.name is not None:
                undone.append(e)
        # latest first: each puts back what the name held before it
        for x in reversed(undone):
            e = <_Pending>x
            if e is failed and not e.name:
                # (Postgres drops the unnamed statement as an unnamed Parse begins,
                # failing or not: nothing of it comes back)
                continue
            got = self.stmts.get(e.name)
            if got is None or (<tuple>got)[2] is not e:
                continue
            self._stmts_bytes -= len((<tuple>got)[0])
            if e.prev is None:
                del self.stmts[e.name]
            else:
                self.stmts[e.name] = e.prev
                self._stmts_bytes += len((<tuple>e.prev)[0])
            e.name = None

    cdef _Pending _current(self):
        # (called for an answer of a statement: every message before it is answered,
        # so the answered entries in front — Parses, Binds, statements recorded — can
        # go now, not at the Sync's ReadyForQuery: a pipeline of N statements with one
        # Sync costs N steps, not N * N / 2)
        cdef _Pending e
        pending = self.pending
        while pending:
            e = <_Pending>pending[0]
            if not e.done or e.sync:
                break
            pending.popleft()
            if e.kind >= K_CLOSE_S:     # a message after it is answered: it ran
                self._closed(e)
        for x in pending:
            e = <_Pending>x
            if not e.done and e.sql is not None:
                return e
            if e.sync and e.sql is None:
                return None
        return None

    def strict_record(self, bytes msg):
        """The record of a Query or Execute about to be forwarded (strict mode)."""
        cdef Py_ssize_t after
        self._drain()
        if msg[0] == QUERY:
            # (no negative indices here: the core is compiled with wraparound off)
            sql = msg[5:PyBytes_GET_SIZE(msg) - 1]
            d = (<_Pending>self.pending[len(self.pending) - 1]).dec
        else:
            portal = _cstr(msg, 5, &after)
            sql, d, _ = self.stmts.get(self.portals.get(portal, _NO_PORTAL)[0],
                                       (b"", None, None))
        # a session under no policy may have turned standard_conforming_strings off in
        # a statement whose report has not come yet (this one is sent before its answer)
        if (self._scs_off or self.session.pinned is None) and not self.raw and sql and \
                b"\\" in <bytes>sql:
            sql = self._h_both(sql)
        if d is not None and d.__class__ is self._approved:
            rec = self._h_record(self.session, sql, d, "approved", self.wall(0))
            rec.approver = d.approver
            return rec
        return self._h_record(self.session, sql, d, "allowed", self.wall(0))

    cpdef wall(self, long long mono_ns):
        """The wall-clock time (UTC) of a monotonic_ns reading (0: now)."""
        if mono_ns == 0:
            mono_ns = _now_ns()
        return self._base + timedelta_new(0, 0, (mono_ns - self._mono0) // 1000)

    cdef _emit(self, _Pending e):
        cdef long long now, seen, out, rows
        cdef tuple part, fixed
        dec = e.dec
        if dec is not None and dec.__class__ is self._approved and \
                dec.on_rows is not None and e.state is None and e.refused is None:
            # the run a window's approval measured (its later runs change at most as
            # many rows): told once, strict mode too
            told, dec.on_rows = dec.on_rows, None
            told(e.rows)
        if self.strict:
            return
        s = self.session
        now = _now_ns()
        if self._bscan is None:
            self._bscan = <MessageScan?>s.bscan
            self._masking = s.masking is not None
            if self._masking:
                self._rw = <RowRewriter?>s.masking.rw
        seen = self._bscan.bytes_seen
        out = seen - self.bytes_mark
        self.bytes_mark = seen
        dec = e.dec
        if dec is not None and dec.__class__ is self._approved:
            decision, approver = "approved", dec.approver
        else:
            decision, approver = "allowed", None
        rule = dec.rule if dec is not None else None
        rows = e.rows
        if e.refused is not None:
            decision, approver = "blocked", None
            rule, rows = e.refused
        elif e.state is not None:
            decision = "error"
        duration = (now - e.t0) // 1000 if e.t0 else None
        sql, key = e.sql, e.key
        # a session under no policy may turn standard_conforming_strings off, and
        # Postgres reports it at the next ReadyForQuery only: a statement pipelined
        # behind the change (no Sync between) is answered before the report (round 19)
        if sql.__class__ is bytes and not self.raw and b"\\" in <bytes>sql and (
                self._scs_off or s.pinned is None):
            sql = self._h_both(sql)
            if sql is not e.sql:
                key = None
        part = self._part(sql, dec, key) if sql.__class__ is bytes and not self.raw \
            else None
        if part is None:            # text from elsewhere, or literals are captured
            rec = self._h_record(s, sql, dec, decision, self.wall(e.t0))
            rec.approver = approver
            rec.rule = rule
            rec.rows = rows
            rec.bytes_out = out
            rec.duration_us = duration
            rec.sqlstate = e.state
            rec.error = e.err
            rec.masked_cells = s.take_masked_cells()
            self.audit.log(rec)
            return
        fixed = self._fixed
        if fixed is None:
            fixed = self._fixed = self._h_session(s)
        masked = self._rw.take_total() if self._masking else 0
        if masked:
            s.services.count_masked(masked)      # (Session.take_masked_cells, in C)
        if self._log_encoded is not None and (<tuple>part)[1] is not None:
            row = self._row(e.t0, <bytes>(<tuple>part)[1], decision, rule, approver, rows,
                            out, masked, duration, e.state, e.err)
            if row is not None:
                if self._q is not None:
                    self._enqueue(<bytes>row)
                else:
                    self._log_encoded(row)
                return
        # the wire row: AuditRecord's fields in order (see pgguard.audit.ipc)
        self._log_row(("", self.wall(e.t0)) + fixed + (<tuple>part)[0] + (
            decision, rule, approver, rows, out, masked, duration, e.state, e.err, "", ""))

    cdef inline void _enqueue(self, bytes row) except *:
        # AuditLog.log_encoded, inline: no Python frame per statement
        cdef Py_ssize_t n = len(self._q)
        audit = self.audit
        if n >= <Py_ssize_t>audit._limit:
            audit._overflow()
            return
        self._q.append(row)
        if n == self._wake_n:
            audit._kick()

    cdef object _row(self, long long t0, bytes part_enc, str decision, rule, approver,
                     long long rows, long long out, masked, duration, state, err):
        # the msgpack row log_row would encode, assembled from the session's and the
        # statement's columns encoded once: only the time and the outcome are encoded
        # here (None: a value only the slow path encodes, e.g. an int beyond 64 bits)
        cdef unsigned char ts[16]
        cdef int nts
        cdef bytes fixed_enc, tail_enc, row
        cdef Py_ssize_t n, k
        cdef char* p
        if t0 == 0:
            t0 = _now_ns()
        nts = _put_ts(ts, self._base_us + (t0 - self._mono0) // 1000)
        if nts < 0:
            return None
        fixed_enc = self._fixed_enc
        if fixed_enc is None:
            fixed_enc = self._fixed_enc = _body(self._enc(self._fixed), len(self._fixed))
        if 2 + len(self._fixed) + 5 + TAIL_FIELDS != ROW_FIELDS:
            return None
        tail_enc = _tail(decision, rule, approver, rows, out, masked, duration, state, err)
        if tail_enc is None:
            return None
        n = 4 + nts + PyBytes_GET_SIZE(fixed_enc) + PyBytes_GET_SIZE(part_enc) + \
            PyBytes_GET_SIZE(tail_enc)
        row = PyBytes_FromStringAndSize(NULL, n)
        p = PyBytes_AS_STRING(row)
        memcpy(p, PyBytes_AS_STRING(_ROW_HEAD), 4)
        k = 4
        memcpy(p + k, ts, nts)
        k += nts
        memcpy(p + k, PyBytes_AS_STRING(fixed_enc), PyBytes_GET_SIZE(fixed_enc))
        k += PyBytes_GET_SIZE(fixed_enc)
        memcpy(p + k, PyBytes_AS_STRING(part_enc), PyBytes_GET_SIZE(part_enc))
        k += PyBytes_GET_SIZE(part_enc)
        memcpy(p + k, PyBytes_AS_STRING(tail_enc), PyBytes_GET_SIZE(tail_enc))
        return row

    cdef tuple _part(self, bytes sql, dec, key):
        # (statement columns, their encoding): the last answer again for the same text
        # object under the same decision (a prepared statement's Executes)
        if sql is self._last_sql and dec is self._last_dec:
            return self._last_part
        got = self._part_of(sql, dec, key)
        self._last_sql, self._last_dec, self._last_part = sql, dec, got
        return got

    cdef tuple _part_of(self, bytes sql, dec, key):
        cdef Py_ssize_t size
        # the statement columns (statement .. flags), cached per literal-insensitive
        # shape while the same decision object covers it (key: the shape when the relay
        # computed it already)
        if key is None:
            key = shape_buf(<const unsigned char*>PyBytes_AS_STRING(sql),
                            PyBytes_GET_SIZE(sql))
        if key is not None:
            hit = self._parts.get(key)
            if hit is not None and (<tuple>hit)[0] is dec:
                return (<tuple>hit)[1]
        cols, cacheable = self._h_part(sql, dec, key)
        try:
            part = (cols, _body(self._enc(cols), len(cols)))
        except Exception:
            part = (cols, None)
        # bounded by bytes, not entries: an entry keeps its decision (the statements'
        # texts) and its normalized text, about three times the statement's size; a
        # statement longer than PART_TEXT_MAX is likely unique and is not kept
        if cacheable and PyBytes_GET_SIZE(sql) <= PART_TEXT_MAX:
            size = 3 * PyBytes_GET_SIZE(sql) + 300
            if self._parts_bytes + size > PARTS_BYTES:
                self._parts.clear()
                self._parts_bytes = 0
            self._parts[key] = (dec, part)
            self._parts_bytes += size
        return part
