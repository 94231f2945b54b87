# Masking on the wire: which result columns are masked (catalog-exact, by table OID and
# attribute number), the plan per RowDescription, and the pairing of extended-protocol
# responses so rows of a statement executed without Describe are masked too.
from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import struct
import time
from collections import deque
from typing import TYPE_CHECKING

from .._core.rowmask import RowRewriter
from ..errors import ConfigError
from .strategies import build_plan, column_mask, copy_format

if TYPE_CHECKING:
    from ..config import Config, Identity, Mask
    from ..server import Server

log = logging.getLogger("pgguard.masking")

CATALOG_TTL = 30.0
# types whose values cannot carry a masked string out (count(email), length(ssn) ...)
_SCALAR_OIDS = frozenset({16, 20, 21, 23, 26, 700, 701, 1700, 1082, 1083, 1114, 1184, 1186})


class Catalog:
    """Masked columns of one database: (table OID, attnum) -> Mask, the masked tables by
    name, and every column of those tables in order (for COPY)."""

    def __init__(self, columns: dict, tables: dict, loaded: float) -> None:
        self.columns: dict[tuple[int, int], Mask] = columns
        self.tables: dict[int, tuple[str, list[tuple[int, str]]]] = tables
        self.names = frozenset(name for name, _ in tables.values())
        self.loaded = loaded


def _like(glob: str) -> str:
    out = []
    for ch in glob:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


async def load_catalog(server: Server, database: str) -> Catalog:
    """Resolve the config's mask globs against the upstream catalog (side connection)."""
    from ..sideconn import literal, run
    masks = server.cfg.masks
    if not masks:
        return Catalog({}, {}, time.monotonic())
    likes = ", ".join(literal(_like(mk.column)) for mk in masks)
    rows = (await run(server, database, [
        "SELECT c.oid, a.attnum, n.nspname || '.' || c.relname, a.attname "
        "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r','p','v','m','f') "
        "AND c.oid IN (SELECT c2.oid FROM pg_attribute a2 JOIN pg_class c2 "
        "  ON c2.oid = a2.attrelid JOIN pg_namespace n2 ON n2.oid = c2.relnamespace "
        f"  WHERE n2.nspname || '.' || c2.relname || '.' || a2.attname LIKE ANY (ARRAY[{likes}])) "
        "ORDER BY c.oid, a.attnum"]))[0]
    columns: dict[tuple[int, int], Mask] = {}
    tables: dict[int, tuple[str, list[tuple[int, str]]]] = {}
    for oid, attnum, table, attname in rows:
        oid, attnum = int(oid), int(attnum)
        tables.setdefault(oid, (table, []))[1].append((attnum, attname))
        full = f"{table}.{attname}"
        for mk in masks:                        # first matching [[masks]] entry wins
            if fnmatch.fnmatchcase(full, mk.column):
                columns[(oid, attnum)] = mk
                break
    # views (and views of views) over masked columns: RowDescription names the view's
    # own column, so every text-like column of such a view is masked as a whole
    from ..config import Mask as _Mask
    frontier = set(columns)
    for _ in range(4):
        if not frontier:
            break
        pairs = ", ".join(f"({o}, {a})" for o, a in sorted(frontier))
        vrows = (await run(server, database, [
            "SELECT DISTINCT v.oid, n.nspname || '.' || v.relname, a.attnum, a.attname, "
            "t.typcategory FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid "
            "JOIN pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm') "
            "JOIN pg_namespace n ON n.oid = v.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = v.oid AND a.attnum > 0 "
            "AND NOT a.attisdropped JOIN pg_type t ON t.oid = a.atttypid "
            f"WHERE (d.refobjid, d.refobjsubid) IN (VALUES {pairs})"]))[0]
        frontier = set()
        for void, vname, attnum, attname, cat in vrows:
            key = (int(void), int(attnum))
            tables.setdefault(int(void), (vname, []))
            if (int(attnum), attname) not in tables[int(void)][1]:
                tables[int(void)][1].append((int(attnum), attname))
            if cat in ("S", "U") and key not in columns:     # string and JSON-ish types
                columns[key] = _Mask(column=f"{vname}.{attname}", strategy="redact")
                frontier.add(key)
    return Catalog(columns, tables, time.monotonic())


def applies(mask: Mask, identity_name: str, identity: Identity) -> bool:
    return identity_name not in mask.except_identities and not (
        set(mask.except_groups) & set(identity.groups))


def hash_key(cfg: Config) -> bytes | None:
    if not any(mk.strategy == "hash" for mk in cfg.masks):
        return None
    env = cfg.masking.hash_key_env
    key = os.environ.get(env, "")
    if len(key) < 16:
        raise ConfigError(f"masking.hash_key_env: environment variable {env} must hold at "
                          "least 16 characters for the hash strategy")
    return key.encode()


def parse_row_description(msg: bytes) -> list[tuple[int, int, int, int]]:
    """(table OID, attnum, type OID, format) of each field of a RowDescription."""
    (n,) = struct.unpack_from("!h", msg, 5)
    pos, out = 7, []
    for _ in range(n):
        pos = msg.index(b"\0", pos) + 1
        table, attnum, typ, _size, _mod, fmt = struct.unpack_from("!IhIhih", msg, pos)
        out.append((table, attnum, typ, fmt))
        pos += 18
    return out


class MaskState:
    """One session's masking: the rewriter, plans per result shape, and the pairing of
    Parse/Bind/Describe responses. Every backend message goes through :meth:`feed` in
    stream order; watched frontend messages through :meth:`frontend`."""

    def __init__(self, session, catalog: Catalog, masks_on: bool, detectors, key) -> None:
        self.s = session
        self.catalog = catalog
        self.masks_on = masks_on
        self.detectors = detectors
        self.key = key
        self.rw = RowRewriter()
        self.plans: dict[tuple[bytes, bytes | None], object] = {}
        self.stmt_desc: dict[bytes, bytes | None] = {}      # statement -> RowDescription
        # (segment, portal, statement, formats, reads) per Bind
        self.binds: deque = deque()
        # (segment, statement or None, swallow, reads) per Describe
        self.describes: deque = deque()
        self.fseg = 0                       # frontend Sync count
        self.bseg = 0                       # backend ReadyForQuery count
        self.swallow_t = False              # dropping an injected Describe's 't'
        # whether a statement reads a masked table, known in frontend order and paired
        # with its own results: simple Queries by segment, prepared statements and
        # portals by name; `reads` is the one whose results flow now
        self.q_reads: dict[int, bool] = {}
        self.stmt_reads: dict[bytes, bool] = {}
        self.portal_reads: dict[bytes, bool] = {}
        self.reads = False
        # Postgres skips everything after an extended-protocol error until Sync, a Query
        # too: a segment whose Query follows extended messages may get no ReadyForQuery
        # of its own. The wire cannot tell which (an error of the Query looks the same),
        # so after an error there every result counts as reading a masked table until
        # the pipeline is empty (fail closed), when the segment counts meet again
        self.ext_open = False               # extended messages since the last boundary
        self.q_after_ext: set[int] = set()  # segments ended by a Query after such
        self.uncertain = False
        self.copy_cols: list | None = None  # the next COPY TO STDOUT's columns (plan entries)
        self.copy_fmt = None

    # -- planning
    def _entry(self, table: int, attnum: int, typ: int, fmt: int):
        mk = self.catalog.columns.get((table, attnum)) if self.masks_on else None
        if mk is not None and not applies(mk, self.s.identity_name, self.s.identity):
            mk = None
        derived = (table == 0 and self.reads and typ not in _SCALAR_OIDS)
        if mk is None and derived:
            # computed from what may be a masked column: masked as a whole
            from ..config import Mask
            mk = Mask(column="derived.value.column", strategy="redact")
        detect = self.detectors is not None and mk is None
        return column_mask(mk, oid=typ, binary=fmt == 1, detect=detect, hash_key=self.key)

    def plan_for(self, rowdesc: bytes, formats: bytes | None = None):
        key = (rowdesc, formats, self.reads)
        plan = self.plans.get(key)
        if plan is None:
            fields = parse_row_description(rowdesc)
            if formats is not None:
                fmts = _formats(formats, len(fields))
                fields = [(t, a, o, f) for (t, a, o, _), f in zip(fields, fmts)]
            cols = [self._entry(*f) for f in fields]
            plan = build_plan(cols, self.detectors) if any(c.action for c in cols) else None
            if len(self.plans) > 2048:
                self.plans.clear()
            self.plans[key] = plan
        return plan

    # -- frontend (in forwarding order); returns bytes to inject after the message
    def frontend(self, t: int, msg: bytes, reads_masked: bool = False) -> bytes | None:
        if t in (80, 66, 68, 69):
            self.ext_open = True
        if t == 80:                                          # Parse
            name, pos = _cstr(msg, 5)
            self.stmt_desc.pop(name, None)
            # learn its row shape now, in case the client executes without Describe
            self.describes.append((self.fseg, name, True, reads_masked))
            self.stmt_reads[name] = reads_masked
            return _describe_statement(name)
        if t == 66:                                          # Bind
            try:
                portal, pos = _cstr(msg, 5)
                stmt, pos = _cstr(msg, pos)
                formats = _result_formats(msg, pos)
            except (ValueError, struct.error):
                # malformed: Postgres answers it with an error (its entry goes with the
                # segment); nothing here may fail on it
                portal, stmt, formats = b"", b"\0", None
            reads = self.stmt_reads.get(stmt, True)
            self.portal_reads[portal] = reads
            self.binds.append((self.fseg, portal, stmt, formats, reads))
        elif t == 68:                                        # Describe (the client's own)
            try:
                kind = msg[5]
                name, _ = _cstr(msg, 6)
            except (ValueError, IndexError):
                kind, name = 83, b"\0"                      # malformed: an error answers it
            reads = (self.stmt_reads if kind == 83 else self.portal_reads).get(name, True)
            self.describes.append((self.fseg, name if kind == 83 else None, False, reads))
        elif t == 83:                                        # Sync
            self.fseg += 1
            self.ext_open = False
        elif t == 81:                                        # Query: its own segment
            self.q_reads[self.fseg] = reads_masked
            if self.ext_open:
                self.q_after_ext.add(self.fseg)
        return None

    # -- backend: every message in order; returns what the client gets
    def feed(self, t: int, data: bytes, whole: bool) -> bytes | None:
        rw = self.rw
        if not whole:
            return rw.feed(data)
        if t == 116:                                         # 't' ParameterDescription
            if self.describes and self.describes[0][2]:
                self.swallow_t = True
                return None
            return rw.feed(data)
        if t == 84 or t == 110:                              # 'T' RowDescription / NoData
            if self.describes and self.describes[0][0] == self.bseg and (
                    self.swallow_t or not self._simple_result()):
                seg, name, swallow, reads = self.describes.popleft()
                self.reads = reads or self.uncertain
                self.swallow_t = False
                if name is not None:
                    self.stmt_desc[name] = data if t == 84 else None
                if swallow:
                    return None
                out = rw.feed(data)
                if t == 84 and name is None:
                    rw.set_plan(self.plan_for(data))        # Describe(portal): rows follow
                return out
            out = rw.feed(data)
            if t == 84:
                self.reads = self.uncertain or self.q_reads.get(self.bseg, True)
                rw.set_plan(self.plan_for(data))            # simple Query result
            return out
        if t == 50:                                          # '2' BindComplete
            out = rw.feed(data)
            if self.binds:
                seg, portal, stmt, formats, reads = self.binds.popleft()
                self.reads = reads or self.uncertain
                desc = self.stmt_desc.get(stmt)
                if desc is not None:
                    rw.set_plan(self.plan_for(desc, formats))
            return out
        if t == 72:                                          # 'H' CopyOutResponse
            out = rw.feed(data)
            self._copy_plan(data)
            return out
        if t == 69:                                          # 'E': the rest of the segment is skipped
            while self.binds and self.binds[0][0] == self.bseg:
                self.binds.popleft()
            while self.describes and self.describes[0][0] == self.bseg:
                self.describes.popleft()
            self.swallow_t = False
            if self.bseg in self.q_after_ext:
                self.uncertain = True
        elif t == 90:                                        # 'Z'
            self.q_reads.pop(self.bseg, None)
            self.q_after_ext.discard(self.bseg)
            self.bseg += 1
            if self.uncertain and self.s.in_flight() <= 0:
                # nothing in flight: the counts meet again
                self.uncertain = False
                self.bseg = self.fseg
                self.q_reads.clear()
                self.q_after_ext.clear()
        return rw.feed(data)

    def _simple_result(self) -> bool:
        return False

    # -- catalog freshness: rows of a table the catalog does not know (created, or
    # dropped and created again, since it was read), or read after DDL went through any
    # worker, wait until the catalog is read again; the session fails if it cannot be
    held = None                     # backend items (already routed) waiting for it
    held_raw = None                 # backend items that arrived meanwhile
    _fresh = None                   # RowDescriptions checked against this catalog
    _resolved = frozenset()         # OIDs still unknown after a fresh read: not masked
    _apply = None                   # some mask applies to this identity
    ddl_pending = False             # DDL sent: the catalog is stale again at commit

    def stale(self, rowdesc: bytes) -> bool:
        """True when the catalog must be read again before this result's rows leave."""
        cat = self.catalog
        if not self.masks_apply() or getattr(cat, "known", None) is None:
            return False
        if cat.generation != self.s.server.catalog_signal.generation():
            return True
        fresh = self._fresh
        if fresh is None:
            fresh = self._fresh = set()
        elif rowdesc in fresh:
            return False
        known, resolved = cat.known, self._resolved
        if all(t == 0 or t in known or t in resolved
               for t, _, _, _ in parse_row_description(rowdesc)):
            if len(fresh) > 2048:
                fresh.clear()
            fresh.add(rowdesc)
            return False
        return True

    def masks_apply(self) -> bool:
        """Some configured mask applies to this identity (whatever the catalog holds)."""
        if self._apply is None:
            self._apply = any(applies(mk, self.s.identity_name, self.s.identity)
                              for mk in self.s.server.cfg.masks)
        return self._apply

    def holding(self, items: list) -> bool:
        """Keep backend items that arrive while rows wait for the catalog."""
        if self.held is None:
            return False
        self.held_raw.extend(items)
        return True

    def hold_rows(self, out: list, held: list) -> None:
        """Send ``out``, keep ``held`` (a stale RowDescription and what follows it) and
        stop reading the upstream until the catalog is read again."""
        s = self.s
        if out:
            s.client.transport.write(b"".join(out))
            out.clear()
        self.held, self.held_raw = held, []
        s.up.transport.pause_reading()
        self._resolving = asyncio.get_running_loop().create_task(
            self._resolve(held[0][1]))

    async def _resolve(self, rowdesc: bytes) -> None:
        s = self.s
        need = [t for t, _, _, _ in parse_row_description(rowdesc) if t]
        try:
            cat = await s.server.mask_catalog(s.database, need)
        except Exception as e:      # noqa: BLE001 - fail closed: these rows never leave
            log.warning("session %s: mask catalog not read (%s); closing", s.id, e)
            from ..errors import UpstreamUnavailable
            s.fail(UpstreamUnavailable("pgguard could not read the upstream catalog to "
                                       "apply masks", detail=str(e)[:300]))
            return
        if s.closed:
            return
        if cat is not self.catalog:
            self.catalog = cat
            self.masks_on = self._apply and bool(cat.columns)
            self.plans.clear()
            self._fresh = None
        if cat.generation == s.server.catalog_signal.generation():
            # read after every DDL so far and still unknown: created in a transaction
            # not committed yet, or dropped again; no mask applies to it
            self._resolved = self._resolved | {o for o in need if o not in cat.known}
        routed, raw = self.held, self.held_raw
        self.held = self.held_raw = None
        s.backend_items(routed, True)
        if self.held is not None:           # the next result waits again
            self.held_raw.extend(raw)
            return
        if raw:
            s.backend_items(raw)
        if self.held is None and not s.closed:
            s.up.transport.resume_reading()

    def _copy_plan(self, msg: bytes) -> None:
        cols, fmt = self.copy_cols, self.copy_fmt
        self.copy_cols = self.copy_fmt = None
        if msg[5] != 0 or cols is None:
            return          # binary COPY is refused before it runs; unknown: detectors only
        self.rw.set_plan(build_plan(cols, self.detectors, fmt))

    def prepare_copy_query(self, rowdesc: bytes | None, fmt: str, options: dict) -> None:
        """Plan entries for a COPY (query) TO STDOUT from the query's RowDescription."""
        if rowdesc is None:
            self.copy_cols, self.copy_fmt = None, None
            return
        self.reads = self.q_reads.get(self.fseg - 1, True)     # the COPY's own Query
        self.copy_cols = [self._entry(t, a, typ, 0)
                          for t, a, typ, _ in parse_row_description(rowdesc)]
        self.copy_fmt = copy_format(fmt, **options)

    def prepare_copy(self, table_oid: int | None, columns: list[str] | None, fmt: str,
                     options: dict) -> None:
        """Plan entries for a COPY <table> [(cols)] TO STDOUT about to run."""
        if table_oid is None or table_oid not in self.catalog.tables:
            self.copy_cols, self.copy_fmt = None, None
            return
        _, attrs = self.catalog.tables[table_oid]
        names = columns or [name for _, name in attrs]
        by_name = {name: num for num, name in attrs}
        self.copy_cols = [self._entry(table_oid, by_name.get(n, 0), 25, 0) for n in names]
        self.copy_fmt = copy_format(fmt, **options)


def _cstr(msg: bytes, pos: int) -> tuple[bytes, int]:
    end = msg.index(b"\0", pos)
    return msg[pos:end], end + 1


def _result_formats(msg: bytes, pos: int) -> bytes:
    # skip parameter format codes and values; return the result format codes section
    (n,) = struct.unpack_from("!h", msg, pos)
    pos += 2 + 2 * n
    (n,) = struct.unpack_from("!h", msg, pos)
    pos += 2
    for _ in range(n):
        (ln,) = struct.unpack_from("!i", msg, pos)
        pos += 4 + max(ln, 0)
    return msg[pos:]


def _formats(section: bytes, nfields: int) -> list[int]:
    (n,) = struct.unpack_from("!h", section, 0)
    codes = list(struct.unpack_from(f"!{n}h", section, 2)) if n else []
    if n == 0:
        return [0] * nfields
    if n == 1:
        return codes * nfields
    return codes[:nfields] + [0] * (nfields - n)


def _describe_statement(name: bytes) -> bytes:
    body = b"S" + name + b"\0"
    return b"D" + struct.pack("!I", len(body) + 4) + body
