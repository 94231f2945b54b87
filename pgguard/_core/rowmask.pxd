# Layout of the DataRow / CopyData rewriter: a mask plan compiled to C arrays, and the
# streaming rewriter of a backend message stream that applies it.
#
# Contracts:
# - RowRewriter.feed(chunk) returns the bytes for the client. With no plan it returns
#   the chunk object itself; with a plan, messages other than DataRow (rows mode) or
#   CopyData (copy modes) pass byte-identical, and a row in which nothing is masked is
#   copied as it is. The only bytes held back between feeds are a header split across
#   chunks (< 5 bytes) and one DataRow/CopyData while a plan is set (bounded by max_len).
# - A plan applies from the next message boundary to the end of the current result:
#   CommandComplete 'C', ErrorResponse 'E', EmptyQueryResponse 'I', PortalSuspended
#   's' and ReadyForQuery 'Z' passing through clear it. A message already started when
#   the plan changes finishes under the plan it started with.
# - RowDescription 'T' and CopyOutResponse 'H' are NOT interpreted: the session reads
#   them (MessageScan) and calls set_plan() before the first row.
# - Malformed rows, or a row whose column count differs from the plan, raise FrameError
#   from feed(); the rewriter's state is then undefined (close the connection).

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef enum MaskAction:
    ACT_NONE = 0         # copy the cell
    ACT_STRATEGY = 1     # replace the value per the column's strategy
    ACT_NULL = 2         # the cell becomes SQL NULL
    ACT_DETECT = 3       # mask only the spans the detectors find

cdef enum MaskStrategy:
    STRAT_REDACT = 0     # the replacement string
    STRAT_PARTIAL = 1    # replacement + last `keep` code points
    STRAT_EMAIL = 2      # first code point + "***@" + domain; else the replacement
    STRAT_HASH = 3       # "h_" + 16 hex digits of HMAC-SHA256(key, value)

cdef enum CellKind:
    KIND_OTHER = 0       # strategies make it NULL; detectors skip it
    KIND_TEXT = 1        # text-like: the same bytes in text and binary format
    KIND_JSON = 2        # json (text, binary), jsonb (text): masked values are JSON strings
    KIND_JSONB_BIN = 3   # jsonb binary: one version byte, then JSON text
    KIND_WHOLE = 4       # arrays, composites, records, xml (any format): detectors scan
                         # the raw value; a validated match makes the whole cell NULL
                         # (always decodable); strategies make it NULL
    KIND_LITERAL = 5     # the same types in text format (rows): the detectors' labels go
                         # in place when no span touches the literal's syntax, else NULL
    KIND_HEX = 6         # bytea in text format ("\x" + hex digits): the detectors scan
                         # the bytes it spells; a validated match makes it NULL
    KIND_INT8_BIN = 7    # int8 / xid8 / numeric / float8 in binary format: the detectors
    KIND_UINT8_BIN = 8   # scan the decimal text a client prints of the value (a card
    KIND_NUMERIC_BIN = 9 # number fits an int8); a validated match makes it NULL;
    KIND_FLOAT8_BIN = 10 # strategies make it NULL
    KIND_FLOAT8_TEXT = 11  # float8 in text format: the same digits, of the value its text
                           # reads as ('4.111111111111111e+15' prints as 16 digits)

cdef enum PlanMode:
    MODE_ROWS = 0        # DataRow 'D'
    MODE_COPY_TEXT = 1   # CopyData 'd' of COPY TO STDOUT, text format
    MODE_COPY_CSV = 2    # CopyData 'd', csv format


from .cbuf cimport Buf     # a growable byte buffer owned by the rewriter (malloc)

ctypedef struct HmacKey:
    uint32_t inner[8]    # SHA-256 state after the (key xor ipad) block
    uint32_t outer[8]    # SHA-256 state after the (key xor opad) block

ctypedef struct ColPlan:
    uint8_t action       # MaskAction, already resolved against kind
    uint8_t strategy     # MaskStrategy (ACT_STRATEGY)
    uint8_t kind         # CellKind
    int32_t keep         # partial: code points kept at the end
    const char* repl     # replacement; the bytes object lives in MaskPlan._refs
    Py_ssize_t repl_len
    int key              # hash: index into MaskPlan._keys

ctypedef struct RowRef:
    # one whole DataRow / CopyData message of a batch
    const char* msg      # its type byte (in the chunk or in the hold buffer)
    Py_ssize_t len       # 1 + its length word
    Py_ssize_t off       # offset in the chunk (-1: the hold buffer)
    Py_ssize_t rec0      # first Rec (copy modes)
    Py_ssize_t nrec      # records in it (rows mode: 1)
    Py_ssize_t cell0     # first Cell
    bint changed

ctypedef struct Rec:
    # one line of a CopyData payload; offsets from the message start
    Py_ssize_t start
    Py_ssize_t end       # where its terminator starts
    Py_ssize_t term      # terminator length (0, 1 "\n" or 2 "\r\n")
    Py_ssize_t cell0
    bint skip            # the header line: passed as it is
    bint changed

ctypedef struct Cell:
    # one cell of an action column (only those are stored: plan.nact per row/record)
    Py_ssize_t raw_off   # from the message start: DataRow: its int32 length; COPY: the raw field
    Py_ssize_t raw_len   # DataRow: 4 + max(len, 0); COPY: raw (escaped, quoted) length
    const char* val      # the value (message, or the unescape arena for COPY)
    Py_ssize_t val_len   # -1: SQL NULL
    Py_ssize_t repl      # index into the batch's detector replacements, -1: none,
                         # -2: the cell becomes NULL (KIND_LITERAL a label cannot go in)

ctypedef struct DetCell:
    Py_ssize_t cell      # index into the batch's Cells
    Py_ssize_t scan_off  # where its value starts in the joined scan buffer
    uint64_t bits        # detectors (ids) whose prefilter ended inside it
    Py_ssize_t lo        # first and last such end offset, from the value's start
    Py_ssize_t hi
    const char* dv       # what is scanned: the value (KIND_HEX: the bytes it spells)
    Py_ssize_t dlen
    Py_ssize_t hexoff    # KIND_HEX: where its bytes are in the batch's hex arena (or -1)
    Py_ssize_t rawlen    # a hex view: the length of the value it was decoded from
    int vkind            # what the view is: 0 a hex view, 1 a binary number's digits,
                         # 2 a binary array's / record's bytes plus its numbers' digits
    bint view            # the value holds a bytea's hex spelling ("\\x" + hex digits, as
                         # ::text, arrays, records and JSON of a bytea print it): what is
                         # scanned is the value with those runs decoded; a match is NULL


cdef class MaskPlan:
    # per result column: what to do (C array, ncols long)
    cdef ColPlan* cols
    cdef int ncols
    # indices of the columns whose action is not ACT_NONE, in order (nact long)
    cdef int* act
    cdef int nact
    cdef bint has_detect
    cdef HmacKey* _keys
    cdef int _nkeys
    cdef list _refs             # bytes objects the ColPlan pointers point into
    cdef uint8_t mode           # PlanMode
    # copy modes: delimiter, quote, escape, NULL string, first line is a header
    cdef char delim
    cdef char quote
    cdef char escape
    cdef bytes null_str
    cdef bint null_ambiguous    # text format with a NULL string other than \N
    cdef bint header
    # detectors: a DetectorSet (db.scan, mask_cell) or None
    cdef readonly object detectors
    cdef object _scan           # Hyperscan over the prefilters not run in C (or None)
    cdef object _mask_cell
    # built-ins run in C (ids, -1 when absent): prefilters (credit_card, phone) and
    # locators with their validation (credit_card, ssn, email, phone); their labels by id
    cdef int cc_id
    cdef int phone_id
    cdef int ssn_id
    cdef int email_id
    cdef uint64_t pre_bits
    cdef uint64_t loc_bits
    cdef list _labels
    # the Python description it was built from (the reference rewriter reads these)
    cdef readonly tuple columns
    cdef readonly object copy


cdef class _Hits:
    # Hyperscan match ends collected by the scan callback
    cdef uint64_t* to
    cdef uint32_t* ids
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef int add(self, uint32_t id, uint64_t to) except -1


cdef class RowRewriter:
    # the plan for rows from here on (None: pass-through), and the plan of the held row
    cdef MaskPlan _plan
    cdef MaskPlan _hold_plan
    cdef Py_ssize_t _max_len
    # a header split across chunks: _hdr_fill of 5 bytes; _hdr_raw of them were already
    # forwarded (begun without a plan: the message stays raw)
    cdef char _hdr[5]
    cdef int _hdr_fill
    cdef int _hdr_raw
    # body bytes of a pass-through message still to come
    cdef Py_ssize_t _remain
    # one DataRow/CopyData being collected whole: _hold.len of _hold_need bytes
    cdef bint _holding
    cdef Buf _hold
    cdef Py_ssize_t _hold_need
    # copy modes: the next line is the header (set by set_plan)
    cdef bint _copy_header
    # output of the current feed, strategy scratch, COPY unescape arena
    cdef Buf _out
    cdef Buf _tmp
    cdef Buf _tmp2
    cdef Buf _arena
    cdef Buf _hex               # the bytes of the batch's KIND_HEX cells, decoded
    # the current batch (rows of one feed under one plan)
    cdef RowRef* _rows
    cdef Py_ssize_t _nrows
    cdef Py_ssize_t _rows_cap
    cdef Rec* _recs
    cdef Py_ssize_t _nrecs
    cdef Py_ssize_t _recs_cap
    cdef Cell* _cells
    cdef Py_ssize_t _ncells
    cdef Py_ssize_t _cells_cap
    cdef DetCell* _dcells
    cdef Py_ssize_t _ndcells
    cdef Py_ssize_t _dcells_cap
    cdef list _repls            # detector replacements of the batch (bytes)
    cdef _Hits _hits
    # counters since set_plan: masked cells per plan column, cells per detector id
    cdef int64_t* _counts
    cdef int _counts_cap
    cdef int _counts_n
    cdef int64_t _det_counts[64]
    cdef int _det_n
    # lifetime counters
    cdef public long long masked_cells
    cdef public long long rows_rewritten
    cdef public long long bytes_in
    cdef public long long bytes_out

    cpdef set_plan(self, MaskPlan plan)
    cpdef clear_plan(self)
    cpdef bytes feed(self, bytes data)
    cpdef long long take_total(self)
    cdef void _reset_counts(self) noexcept
    cdef int _begin_raw(self, uint8_t t, Py_ssize_t length) except -1
    cdef int _add_row(self, const char* msg, Py_ssize_t length, Py_ssize_t off) except -1
    cdef int _start_hold(self, const char* s, Py_ssize_t n, Py_ssize_t length) except -1
    cdef int _need_cells(self, Py_ssize_t extra) except -1
    cdef int _process(self, MaskPlan plan) except -1
    cdef int _parse_datarow(self, MaskPlan plan, RowRef* r) except -1
    cdef int _parse_copy(self, MaskPlan plan, Py_ssize_t ri) except -1
    cdef int _detect(self, MaskPlan plan) except -1
    cdef int _count_dets(self, uint64_t bits) except -1
    cdef int _emit_row(self, MaskPlan plan, RowRef* r) except -1
    cdef int _emit_copy(self, MaskPlan plan, RowRef* r) except -1
    cdef int _masked_value(self, MaskPlan plan, ColPlan* col, Cell* c, Buf* dst) except -1
