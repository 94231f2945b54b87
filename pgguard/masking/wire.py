# Masking on the wire: which result columns are masked (catalog-exact, by table OID and
# attribute number), the plan per RowDescription, and the pairing of extended-protocol
# responses so rows of a statement executed without Describe are masked too.
from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import re
import struct
import time
from collections import deque
from typing import TYPE_CHECKING

from .._core.answers import answer_for
from .._core.rowmask import RowRewriter
from .._core.sqlshape import shape
from ..config import Mask
from ..errors import ConfigError, UpstreamUnavailable
from ..protocol import messages as m
from ..protocol.messages import parse_row_description
from ..protocol.sqltext import literal
from . import lineage as lg
from .channels import Channels
from .lane import PENDING, LaneState, ObjPlan  # noqa: F401 (PENDING re-exported)
from .strategies import ACTION_DETECT, ColumnMask, build_plan, column_mask, copy_format

if TYPE_CHECKING:
    from ..config import Config, Identity
    from .lineage import SideLink

log = logging.getLogger("pgguard.masking")

CATALOG_TTL = 30.0
# backend messages other than rows that carry text: ErrorResponse, NoticeResponse,
# NotificationResponse, ParameterStatus, FunctionCallResponse (see channels.py)
CHANNEL_TYPES = frozenset(b"ENASV")
# every backend message the session hands to MaskState.feed whole: the ones paired with
# the frontend messages they answer (_PAIRED) and the other channels
MASK_BACKEND = b"Ttn2HCEIsZ" + b"NASV"


class Catalog:
    """Masked columns of one database: (table OID, attnum) -> Mask, the masked tables by
    name, and every column of those tables in order (for COPY)."""

    def __init__(self, columns: dict, tables: dict, loaded: float,
                 views: frozenset = frozenset(), types: dict | None = None) -> None:
        self.columns: dict[tuple[int, int], Mask] = columns
        self.tables: dict[int, tuple[str, list[tuple[int, str]]]] = tables
        self.names = frozenset(name for name, _ in tables.values())
        self.loaded = loaded
        self.views = views          # OIDs in tables that are views (their columns derive)
        self.types = types or {}    # type OID -> table OID whose whole rows it carries
        self.typed: list = []       # (schema, relation, column, type) of such types
        self.fingerprint: str | None = None     # the catalog rows it was read from
        self.derived: frozenset = frozenset()   # view columns masked for their sources


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


# (database, mask column) said to match nothing already: said once per process
_UNMATCHED_SAID: set[tuple[str, str]] = set()


async def _warn_unmatched(side: SideLink, database: str, masks: list[Mask],
                          matched: set[int]) -> None:
    """Log, once, each [[masks]] entry that names no column of ``database``: a typo in
    a column or table name masks nothing (the detectors are then all that stands
    between the values and the client)."""
    for i, mk in enumerate(masks):
        if i in matched or (database, mk.column) in _UNMATCHED_SAID:
            continue
        _UNMATCHED_SAID.add((database, mk.column))
        table, _, col = mk.column.rpartition(".")
        have = ""
        if not any(ch in table for ch in "*?["):
            got = (await side.run(database, [
                "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = "
                f"pg_catalog.to_regclass({literal(_quoted_relation(table))}) "
                "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"]))[0]
            if got:
                have = (f": table {table} has no column {col!r} (its columns: "
                        f"{', '.join(r[0] for r in got)})")
            else:
                have = f": database {database} has no table {table}"
        log.warning("masks[%d].column: %r matches no column in database %s%s; this mask "
                    "masks nothing until the name is fixed in the config", i, mk.column,
                    database, have)


def _quoted_relation(name: str) -> str:
    schema, _, rel = name.partition(".")
    return ".".join('"' + p.replace('"', '""') + '"' for p in (schema, rel) if p)


async def load_catalog(side: SideLink, masks: list[Mask], database: str) -> Catalog:
    """Resolve the config's mask globs against the upstream catalog (side connection)."""
    if not masks:
        return Catalog({}, {}, time.monotonic())
    likes = ", ".join(literal(_like(mk.column)) for mk in masks)
    rows = (await side.run(database, [
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
    matched: set[int] = set()
    for oid, attnum, table, attname in rows:
        oid, attnum = int(oid), int(attnum)
        tables.setdefault(oid, (table, []))[1].append((attnum, attname))
        full = f"{table}.{attname}"
        for i, mk in enumerate(masks):          # first matching [[masks]] entry wins
            if fnmatch.fnmatchcase(full, mk.column):
                columns[(oid, attnum)] = mk
                matched.add(i)
                break
    if len(matched) < len(masks):
        await _warn_unmatched(side, database, masks, matched)
    await _relatives(side, database, columns, tables)             # children, partitions
    await _relatives(side, database, columns, tables, up=True)    # parents, and theirs
    # views (and views of views) over masked columns: RowDescription names the view's
    # own column, so every text-like column of such a view is masked as a whole
    frontier = set(columns)
    views: set[int] = set()
    derived: set[tuple[int, int]] = set()
    for _ in range(4):
        if not frontier:
            break
        pairs = ", ".join(f"({o}, {a})" for o, a in sorted(frontier))
        vrows = (await side.run(database, [
            "SELECT DISTINCT v.oid, n.nspname || '.' || v.relname, a.attnum, a.attname, "
            "t.typcategory, d.refobjid, d.refobjsubid "
            "FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid "
            "JOIN pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm') "
            "JOIN pg_namespace n ON n.oid = v.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = v.oid AND a.attnum > 0 "
            "AND NOT a.attisdropped JOIN pg_type t ON t.oid = a.atttypid "
            f"WHERE (d.refobjid, d.refobjsubid) IN (VALUES {pairs})"]))[0]
        frontier = set()
        # a view column is exempt for whoever is exempt from every masked column the
        # view reads (pg_depend knows the view's sources, not which column uses which)
        sources: dict[int, list] = {}
        for void, _, _, _, _, roid, rsub in vrows:
            src = columns.get((int(roid), int(rsub)))
            if src is not None:
                sources.setdefault(int(void), []).append(src)
        for void, vname, attnum, attname, cat, _, _ in vrows:
            key = (int(void), int(attnum))
            tables.setdefault(int(void), (vname, []))
            views.add(int(void))
            if (int(attnum), attname) not in tables[int(void)][1]:
                tables[int(void)][1].append((int(attnum), attname))
            if cat in ("S", "U") and key not in columns:     # string and JSON-ish types
                srcs = sources.get(int(void), [])
                columns[key] = Mask(
                    column=f"{vname}.{attname}", strategy="redact",
                    except_groups=_common([mk.except_groups for mk in srcs]),
                    except_identities=_common([mk.except_identities for mk in srcs]))
                frontier.add(key)
                derived.add(key)
    types, typed = await _masked_types(side, database, {o for o, _ in columns})
    cat = Catalog(columns, tables, time.monotonic(), frozenset(views), types)
    cat.derived = frozenset(derived)
    cat.typed = typed
    return cat


async def _relatives(side: SideLink, database: str, columns: dict, tables: dict,
                     up: bool = False) -> None:
    """Partitions and inheritance children of tables with masked columns carry the same
    values (down), and so do their parents and partitioned tables, whose scans return the
    children's rows (up, recursively: grandparents too): their columns of the same names
    get the same masks (a plan scans them by their own names, and a client can name
    them). A parent whose other children hold nothing masked is masked as a whole."""
    known = sorted({o for o, _ in columns})
    if not known:
        return
    # (the relative, the table with masked columns it carries the values of)
    near, far = ("inhparent", "inhrelid") if up else ("inhrelid", "inhparent")
    rows = (await side.run(database, [(
        "WITH RECURSIVE d(rel, src) AS ("
        f"SELECT i.{near}, i.{far} FROM pg_inherits i WHERE i.{far} IN "
        f"({', '.join(str(o) for o in known)}) UNION "
        f"SELECT i.{near}, d.src FROM pg_inherits i JOIN d ON i.{far} = d.rel) "
        "SELECT d.rel, d.src, n.nspname || '.' || c.relname, a.attnum, a.attname "
        "FROM d JOIN pg_class c ON c.oid = d.rel JOIN pg_namespace n "
        "ON n.oid = c.relnamespace JOIN pg_attribute a ON a.attrelid = d.rel "
        "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY d.rel, d.src, a.attnum")]))[0]
    names = {o: {n: a for a, n in attrs} for o, (_, attrs) in tables.items()}
    for rel, src, name, attnum, attname in rows:
        rel, src, attnum = int(rel), int(src), int(attnum)
        attrs = tables.setdefault(rel, (name, []))[1]
        if (attnum, attname) not in attrs:
            attrs.append((attnum, attname))
        mk = columns.get((src, names.get(src, {}).get(attname, -1)))
        if mk is not None:
            have = columns.get((rel, attnum))
            columns[(rel, attnum)] = mk if have is None else _both(have, mk)


def _both(a: Mask, b: Mask) -> Mask:
    """The mask of a column that carries the values of columns masked by ``a`` and ``b``
    (a parent of two masked tables): the same strategy when they agree, else redact;
    exempt only who is exempt from both."""
    if a == b:
        return a
    same = (a.strategy, a.keep, a.replacement) == (b.strategy, b.keep, b.replacement)
    return Mask(column=a.column, strategy=a.strategy if same else "redact",
                keep=a.keep, replacement=a.replacement if same else "****",
                except_groups=_common([a.except_groups, b.except_groups]),
                except_identities=_common([a.except_identities, b.except_identities]))


async def _masked_types(side: SideLink, database: str, oids: set[int]):
    """Types whose values carry whole rows of tables with masked columns: the row types,
    their arrays and domains, and composite types with such a field (and so on):
    type OID -> the table OID; and the columns of such types in relations:
    (schema, relation, column, type OID)."""
    if not oids:
        return {}, []
    rows = (await side.run(database, [
        "SELECT c.reltype, c.oid FROM pg_class c WHERE c.reltype <> 0 AND c.oid IN ("
        + ", ".join(str(o) for o in sorted(oids)) + ")"]))[0]
    types = {int(t): int(o) for t, o in rows}
    frontier = dict(types)
    for _ in range(6):
        if not frontier:
            break
        inlist = ", ".join(str(t) for t in sorted(frontier))
        rows = (await side.run(database, [(
            "SELECT x.oid, COALESCE(NULLIF(x.typelem, 0), NULLIF(x.typbasetype, 0), "
            "(SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = x.typrelid AND "
            f"a.atttypid IN ({inlist}) AND NOT a.attisdropped LIMIT 1)) FROM pg_type x "
            f"WHERE x.typelem IN ({inlist}) OR x.typbasetype IN ({inlist}) OR x.typrelid IN "
            "(SELECT a.attrelid FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            f"WHERE a.atttypid IN ({inlist}) AND NOT a.attisdropped AND c.relkind = 'c')")]))[0]
        frontier = {}
        for t, via in rows:
            t = int(t)
            if t not in types and via is not None and int(via) in types:
                types[t] = frontier[t] = types[int(via)]
    inlist = ", ".join(str(t) for t in sorted(types))
    typed = [(ns, rel, att, int(t)) for ns, rel, att, t in (await side.run(database, [(
        "SELECT n.nspname, c.relname, a.attname, a.atttypid FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE a.atttypid IN ({inlist}) AND a.attnum > 0 AND NOT a.attisdropped "
        "AND c.relkind IN ('r', 'p', 'v', 'm', 'f')")]))[0]]
    return types, typed


def _common(lists: list) -> list[str]:
    if not lists:
        return []
    out = set(lists[0])
    for names in lists[1:]:
        out &= set(names)
    return sorted(out)


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


# -- masking plans that belong to objects ------------------------------------------------
# Every frontend message that gets a response is queued (in forwarding order) with what it
# means for masking; backend messages pop the queue. A prepared statement's plan (its
# RowDescription, lineage and whether it reads masked data) is committed when Postgres
# has accepted the Parse (our injected Describe answers), a portal's when BindComplete
# arrives, and every Execute arms its own portal's plan just before that portal's rows,
# whenever and in whatever order they come: after a Sync, in a pipeline, 2nd/3rd
# execution, after DEALLOCATE/re-Parse. SQL cursors keep the plan of their query for
# FETCH. ParseComplete and CloseComplete are not watched: they carry no rows, so their
# entries are popped when the next watched message arrives.
from .lane import (K_BIND, K_CLOSE, K_CURSOR_DESC, K_DESC_P, K_DESC_S, K_EXEC,  # noqa: E402
                   K_PARSE, K_PDESC, K_READY, K_SYNC)
_UNSEEN = (K_PARSE, K_CLOSE)
# (after any leading comments: /*c*/ PREPARE q ... made q's EXECUTE unknown, NULL)
_CURSOR_SQL = re.compile(rb"(?:\s+|--[^\n\r]*|/\*(?:[^*]|\*(?!/))*\*/)*"
                         rb"(declare|fetch|move|close|prepare|execute|deallocate)\b",
                         re.IGNORECASE | re.DOTALL)
_UNKNOWN = ("cursor", "\0unknown")


_REFUSE_ROWS = None     # a plan no DataRow fits: rows of an unknown portal end the session
_AT_ANSWER = object()   # the plan of a Bind's statement is looked up when its shape comes
_PARSED_NAMES_MAX = 4096
_PORTALS_TOUCHED_MAX = 4096


def _refuse_rows():
    global _REFUSE_ROWS
    if _REFUSE_ROWS is None:
        _REFUSE_ROWS = build_plan([])
    return _REFUSE_ROWS


class MaskState(LaneState):
    """One session's masking: the rewriter, the plans of its statements, portals and
    cursors, and the pairing of responses with the messages they answer. Every
    backend message goes through :meth:`feed` in stream order; watched frontend
    messages through :meth:`frontend` (in forwarding order)."""

    def __init__(self, session, catalog: Catalog, masks_on: bool, detectors, key) -> None:
        self.s = session
        self.catalog = catalog
        self.masks_on = masks_on
        self.detectors = detectors
        self.key = key
        self.rw = RowRewriter()
        self.plans: dict[tuple, object] = {}
        self.stmts: dict[bytes, ObjPlan] = {}       # prepared statements (committed)
        self.portals: dict[bytes, tuple[ObjPlan, bytes | None]] = {}
        self.cursors: dict[str, ObjPlan] = {}       # SQL cursors (DECLARE)
        self.sql_prepared: dict[str, ObjPlan] = {}  # SQL PREPARE (run with EXECUTE)
        # names this session Parsed over the protocol (bounded): a Bind of a name in
        # neither this nor stmts / sql_prepared binds a statement of unknown shape (a
        # SQL PREPARE still on its way, one of a multi-statement Query)
        self.parsed_names: set[bytes] = set()
        self.expect: deque = deque()                # what the backend answers next
        # -- other channels (channels.py): what in flight, or in this transaction, read
        # masked data (its errors, notices ... are scrubbed)
        self.channels = Channels(detectors)
        self.masked_reads = 0               # statements in flight that read a masked table
        self.txn_tainted = False            # this transaction ran a masked read
        self.reading_stmts: set[bytes] = set()   # prepared statements that read masked data
        self._next: ObjPlan | None = None   # the plan of the Query being forwarded
        self._ready = 0
        # a portal's plan holds while nothing that may run code (a Query, a
        # FunctionCall, an Execute of a portal whose statement is not a plain SELECT of
        # built-in functions: a function or DO block may CLOSE a portal and OPEN a
        # cursor of the same name; a transaction end destroys it) came between its Bind
        # (or its last Execute) and an Execute of it: _epoch counts those; _touched
        # keeps each portal's (epoch, its statement is pure), bounded: a name it lost
        # is asked about; _pure_stmts: whether each Parsed statement is pure
        self._epoch = 0
        self._touched: dict[bytes, tuple[int, bool]] = {}
        self._pure_stmts: dict[bytes, bool] = {}
        self._early_syncs = 0       # Syncs a COPY took, let go before their model said
        # after an extended-protocol error whose Sync was not yet forwarded: what is
        # forwarded up to that Sync is skipped by Postgres, answered by nothing
        self._skip = False
        # the session's expected-answers model's queue for masking (Answers.listen):
        # which message each ErrorResponse answers, the Syncs a COPY swallowed
        self.answers = None
        self.lineage_keys: dict = {}        # lineage analysed in this session
        self._lin_fresh: set = set()        # ids of lineage analysed at _lin_fresh_gen
        self._lin_fresh_gen = -1
        self._lkey: tuple | None = None
        self._drift_at = -1.0               # when _drifted last had the catalog read
        self._drift_n = self._drift_seen = 0    # _drifted calls, and as _learn saw them
        self._verify = False                # catch_up checks the fingerprint first
        self._take_masked_names()

    # -- which columns are masked for this identity
    def _take_masked_names(self) -> None:
        """The masked relations, columns and row types, from the current catalog."""
        self._masked_rel, self._masked_cols = self._masked_names()
        tables = {o for o, _ in self._masked_cols}
        self._masked_types = frozenset(t for t, o in
                                       getattr(self.catalog, "types", {}).items() if o in tables)

    def _masked_names(self):
        rel: dict[tuple[str, str], set[str]] = {}
        cols: set[tuple[int, int]] = set()
        if not self.masks_on:
            return {}, cols
        views = getattr(self.catalog, "views", frozenset())
        for (oid, attnum), mk in self.catalog.columns.items():
            if not applies(mk, self.s.identity_name, self.s.identity):
                continue
            cols.add((oid, attnum))
            if oid not in self.catalog.tables:
                continue
            table, attrs = self.catalog.tables[oid]
            schema, _, name = table.partition(".")
            rel.setdefault((schema, name), set()).update(
                n for a, n in attrs if a == attnum or oid in views)
        types = getattr(self.catalog, "types", {})
        for schema, name, att, typ in getattr(self.catalog, "typed", ()):
            if types.get(typ) in {o for o, _ in cols}:      # holds masked rows
                rel.setdefault((schema, name), set()).add(att)
        for oid in views:       # a materialized view over masked columns: all of it
            table, attrs = self.catalog.tables[oid]
            schema, _, name = table.partition(".")
            rel.setdefault((schema, name), set()).update(n for _, n in attrs)
        return {k: frozenset(v) for k, v in rel.items()}, cols

    def holds_masked_rows(self, name: str) -> bool:
        """Whether relation ``schema.name`` has a column whose type carries whole rows of
        a table with masked columns (for this identity)."""
        schema, _, rel = name.partition(".")
        return (schema, rel) in self._masked_rel and not any(
            n == name for n, _ in self.catalog.tables.values())

    # -- lineage of statements (the planner's answer, cached by statement and shape)
    def lineage_now(self, sql: bytes, d, param_oids: tuple = ()):
        """The lineage the plan of ``sql`` is made with: a Lineage, None (not needed:
        no masks, or a statement the planner cannot explain) or PENDING (ask first:
        :meth:`lineage_load`). Known by the exact text, or by its literal-insensitive
        shape when the shape's analysis (literals as parameters) succeeded."""
        if not self.masks_on:
            return None
        query = lg.statement_query(sql, d)
        if query is None:
            return None
        for i, key in enumerate(self._lineage_keys(query, param_oids)):
            if i and lg.positional(query):
                break           # (its shape's entries stand for other texts: positional)
            lin = self.lineage_keys.get(key)
            if lin is None:
                lin = lg.cached(key)
            if lin is not None:
                return lin
        return PENDING

    async def lineage_load(self, sql: bytes, d, param_oids: tuple = ()) -> None:
        """Ask the planner (never raises: UNRESOLVED when it cannot answer): first the
        statement with its literals turned into parameters (valid for every text of
        its shape: no value can fold a column reference away), else the text itself."""
        query = lg.statement_query(sql, d)
        if query is None:
            return
        keys = self._lineage_keys(query, param_oids)
        args = (self._masked_rel, self._masked_cols, self._role(), self._drifted)
        side, db = self.s.services.side, self.s.database
        # (a text naming output columns by number stands for itself only: see
        # lineage.positional; its shape's key is never learned, so no text of the same
        # shape finds it)
        if len(keys) == 2 and not lg.positional(query):
            norm = lg.normalized(query)
            if norm is not None:
                lin = await lg.analyse(side, db, norm, param_oids, *args)
                if lin.masked is not None:
                    self._learn(keys[1], lin)
                    return
                if norm == query:       # no literals: the text's own answer
                    self._learn(keys[0], lin)
                    return
        self._learn(keys[0], await lg.analyse(side, db, query, param_oids, *args))

    def _drifted(self) -> None:
        """The planner named a masked column (by table OID and attnum) otherwise than
        this session's catalog does: renamed directly upstream. Every worker reads the
        catalog again before its next decision (at most once a second from here)."""
        now = time.monotonic()
        self._drift_n += 1
        if now - self._drift_at >= 1.0:
            self._drift_at = now
            self.s.services.catalog_signal.bump()

    def _learn(self, key: tuple, lin) -> None:
        # lineage analysed since the catalog generation last moved holds for the catalog
        # read at that generation (see _catalog_replaced); one analysed while this
        # session's masked names were behind the catalog's (_drifted: the old names
        # counted too, masking more than they should) only until the catalog is read
        # again: it is neither fresh nor shared
        if self._drift_n != self._drift_seen:
            self._drift_seen = self._drift_n
        else:
            gen = self.s.services.catalog_signal.generation()
            if gen != self._lin_fresh_gen:
                self._lin_fresh, self._lin_fresh_gen = set(), gen
            self._lin_fresh.add(id(lin))
            lg.remember(key, lin)
        if len(self.lineage_keys) > 4096:
            self.lineage_keys.clear()
        self.lineage_keys[key] = lin

    def _lineage_keys(self, query: bytes, param_oids: tuple) -> tuple:
        base = self._lkey
        if base is None:
            # per session (its id): a view redefined behind pgguard's back (no DDL it saw)
            # is analysed again by every new session, never served from another's
            base = self._lkey = (id(self.s.services), self.s.database, self.catalog.loaded,
                                 frozenset(self._masked_cols), self._role(), self.s.id)
        key = shape(query)
        exact = base + (b"x", query, param_oids)
        return (exact,) if key is None else (exact, base + (b"s", key, param_oids))

    def _role(self) -> str | None:
        s = self.s
        ident = s.identity
        return (getattr(ident, "role", None) or getattr(s, "provisioned", None)
                or getattr(ident, "upstream_user", None))

    def _catalog_replaced(self) -> None:
        """The catalog was read again (DDL somewhere, perhaps behind pgguard's back):
        what this session learned with the old one may no longer hold (a view redefined
        over a masked column). The masked names are taken again, statements are analysed
        again under new keys, and every plan already made (prepared statements, portals,
        cursors, the results in flight) with a lineage analysed before the catalog's
        generation (the last DDL pgguard saw) falls back to the conservative reading: no
        lineage, so when the statement reads masked data every column that is not a
        plain column of a table without masks counts as derived from it (a plain
        column's own mask comes from the new catalog either way)."""
        self._take_masked_names()
        self._lkey = None
        self.lineage_keys.clear()
        lg.forget()

        fresh = self._lin_fresh if self._lin_fresh_gen == self.catalog.generation else ()

        def drop(x) -> None:
            if isinstance(x, ObjPlan) and x.lineage is not None and \
                    id(x.lineage) not in fresh:
                x.lineage = None

        def stale(o) -> None:
            if isinstance(o, (tuple, list)):
                for x in o:
                    drop(x)
            else:
                drop(o)
        for table in (self.stmts, self.portals, self.cursors, self.sql_prepared):
            for o in table.values():
                stale(o)
        for e in self.expect:
            stale(e)

    def relineage(self, name: bytes):
        """A Bind of prepared statement ``name``: the lineage a catalog read dropped
        (_catalog_replaced) is taken again, as at its Parse (Postgres plans the
        statement again too: a view it reads may read masked columns now). Returns None
        when done (or not needed), else the (text, parameter OIDs) to ask the planner
        about first (lineage_load)."""
        obj = self.stmts.get(name)
        if obj is None or obj.src is None or obj.lineage is not None or not self.masks_on:
            return None
        sql, oids = obj.src
        lin = self.lineage_now(sql, None, oids)
        if lin is PENDING:
            return obj.src
        if lin is None:
            obj.src = None              # not analysable: as at its Parse
            return None
        obj.lineage = lin
        obj.reads = self._reads(lin, obj.reads, None, sql)
        obj.safe = False                # (the lane learns it again at its next Parse)
        self.lane_stmt(name, False)
        return None

    def forget_lineage(self) -> None:
        """DDL went through this session: views and functions may differ now."""
        self.lineage_keys.clear()
        lg.forget()
        self.lane_forget()

    # -- answers that end with ReadyForQuery (Query, FunctionCall, injected refusals):
    # the session's parts tell each one sent with owe_ready() (and take one back with
    # unowe_ready()); the ReadyForQuery it is answered by ends its plan
    def owe_ready(self) -> None:
        """One more message sent upstream that Postgres answers with a ReadyForQuery."""
        if self._skip:          # Postgres skips it up to the Sync: no ReadyForQuery
            self._next = None
            return
        self._ready += 1
        plan, self._next = self._next, None
        self._push((K_READY, plan if plan is not None else ObjPlan()))

    def unowe_ready(self) -> None:
        """The last owe_ready() is taken back (it was replaced by a refusal that owes its
        own)."""
        if self._skip:
            self._next = None
            return
        self._ready -= 1
        for i in range(len(self.expect) - 1, -1, -1):
            if self.expect[i][0] == K_READY:
                del self.expect[i]
                break

    # -- planning
    def _entry(self, table: int, attnum: int, typ: int, fmt: int, derived=None):
        mk = self.catalog.columns.get((table, attnum))
        # exempt from this column's mask: clear values, the detectors do not rescan it
        exempt = mk is not None and (not self.masks_on or not applies(
            mk, self.s.identity_name, self.s.identity))
        if exempt:
            mk = None
        if mk is not None and derived is not None and (table, attnum) in getattr(
                self.catalog, "derived", ()):
            mk = None                 # a view column: its lineage says what it carries
        if typ in self._masked_types:
            derived = True            # a whole row (or rows) of a table with masked columns
        elif derived is None:         # no lineage: only plain unmasked table columns pass
            derived = self.masks_on and not (
                table and attnum > 0 and table in self.catalog.tables
                and table not in getattr(self.catalog, "views", ()))
        if mk is None and derived and self.masks_on:
            # computed from what may be a masked column: masked as a whole (text: the
            # replacement; every other type, composites and arrays too: NULL)
            mk = Mask(column="derived.value.column", strategy="redact")
        detect = self.detectors is not None and mk is None and not exempt
        return column_mask(mk, oid=typ, binary=fmt == 1, detect=detect, hash_key=self.key)

    def plan_for(self, rowdesc: bytes, formats: bytes | None = None, obj: ObjPlan | None = None):
        if obj is not None and obj.fetch is not None:
            kind, name = obj.fetch
            obj = (self.cursors if kind == "cursor" else self.sql_prepared).get(name) \
                or ObjPlan()
        lin = obj.lineage if obj is not None else None
        reads = obj.reads if obj is not None else True
        key = (rowdesc, formats, lin, reads)
        plan = self.plans.get(key)
        if plan is None:
            fields = parse_row_description(rowdesc)
            if formats is not None:
                fmts = _formats(formats, len(fields))
                fields = [(t, a, o, f) for (t, a, o, _), f in zip(fields, fmts)]
            masked = lin.masked if lin is not None else None
            if masked is not None and len(masked) != len(fields):
                masked = None
            cols = []
            for i, f in enumerate(fields):
                if masked is not None:
                    derived = masked[i]
                elif not reads:
                    derived = False
                else:
                    derived = None
                cols.append(self._entry(*f, derived=derived))
            plan = build_plan(cols, self.detectors) if any(c.action for c in cols) else None
            if len(self.plans) > 2048:
                self.plans.clear()
            self.plans[key] = plan
        return plan

    def failed_parse(self) -> None:
        """A Parse Postgres answers with an error (malformed): it creates nothing."""
        self._push((K_PARSE, b"\0"))

    # -- frontend (in forwarding order); returns bytes to inject after the message
    def frontend(self, t: int, msg: bytes, reads_masked: bool = False,
                 lineage=None, d=None) -> bytes | None:
        """``d``: the policy decision of a Query or Parse (the masking lane's test)."""
        if self.lane is not None:
            self.lane_dirty()
        if t == m.PARSE:
            name, pos = _cstr(msg, 5)
            sql, pos = _cstr(msg, pos)
            obj = self._obj(sql, lineage, reads_masked, d)
            if obj.fetch is None and obj.declare is None:
                obj.src = (sql, m.parse_param_oids(msg, pos))
            # the name is this statement's now (SQL PREPARE shares the namespace): a
            # SQL EXECUTE of it gets no plan of an older PREPARE (unknown: masked)
            self.sql_prepared.pop(name.decode("utf-8", "replace"), None)
            self.lane_stmt(name, False)     # until Postgres accepted it
            obj.safe = self.lane is not None and obj.fetch is None and \
                obj.declare is None and self.safe_statement(d, lineage, reads_masked)
            if reads_masked:
                self.reading_stmts.add(name)
                self.masked_reads += 1
                self.txn_tainted = True
            elif not name:
                # the unnamed statement is replaced by any Parse (dropped even when the
                # Parse fails); a named one Postgres may refuse to replace ("already
                # exists"), or a SQL DEALLOCATE may not have run: a name that read
                # masked data keeps counting as one
                self.reading_stmts.discard(name)
            if len(self.parsed_names) >= _PARSED_NAMES_MAX:
                self.parsed_names.clear()       # then unknown names are described again
                self._pure_stmts.clear()
            self.parsed_names.add(name)
            self._pure_stmts[name] = self.pure_select(d)
            self._push((K_PARSE, name))
            # learn its row shape now, in case the client executes without Describe
            self._push((K_PDESC, name, obj))
            return _describe_statement(name)
        if t == m.BIND:
            try:
                portal, pos = _cstr(msg, 5)
                stmt, pos = _cstr(msg, pos)
                formats = _result_formats(msg, pos)
            except (ValueError, struct.error):
                # malformed: Postgres answers it with an error (the queue skips to the
                # Sync then); nothing here may fail on it
                portal, stmt, formats = b"", b"\0", None
            self._push((K_BIND, portal, stmt, formats))
            if len(self._touched) >= _PORTALS_TOUCHED_MAX:
                self._touched.clear()
            self._touched[portal] = (self._epoch, self._pure_stmts.get(stmt, False))
            # the portal name is this Bind's now (SQL cursors share the namespace): a
            # FETCH of it gets no plan of an older DECLARE (unknown: masked)
            self.cursors.pop(portal.decode("utf-8", "replace"), None)
            if stmt in self.reading_stmts:      # its executions read masked relations
                self.masked_reads += 1
                self.txn_tainted = True
            if self.masks_on and stmt != b"\0" and self._ready > 0:
                # a Query is on its way before this Bind: a PREPARE, DEALLOCATE or
                # DISCARD in it may change what the name is (its answer comes first)
                self._push((K_PDESC, stmt, _AT_ANSWER, portal, formats))
                return _describe_statement(stmt)
            if self.masks_on and stmt not in self.stmts:
                sql = self.sql_prepared.get(stmt.decode("utf-8", "replace"))
                if sql is not None:
                    # a Bind of a SQL PREPARE's statement (one namespace): no Parse told
                    # its row shape, so ask for it now; the portal takes the PREPARE's plan
                    self._push((K_PDESC, stmt, _AT_ANSWER, portal, formats))
                    return _describe_statement(stmt)
                if stmt not in self.parsed_names and stmt != b"\0":
                    # no Parse of it, no PREPARE run yet: one on its way (a PREPARE in
                    # the same write), or one of a multi-statement Query. Its shape is
                    # asked for; the plan is the PREPARE's in effect when the answer
                    # comes (Postgres ran everything before this Bind by then), else
                    # unknown (every column masked)
                    self._push((K_PDESC, stmt, _AT_ANSWER, portal, formats))
                    return _describe_statement(stmt)
        elif t == m.DESCRIBE:                                # the client's own
            try:
                kind = msg[5]
                name, _ = _cstr(msg, 6)
            except (ValueError, IndexError):
                kind, name = 83, b"\0"                      # malformed: an error answers it
            self._push((K_DESC_S if kind == m.TARGET_STATEMENT else K_DESC_P, name))
        elif t == m.EXECUTE:
            try:
                portal, _ = _cstr(msg, 5)
            except ValueError:
                portal = b"\0"                              # malformed: an error answers it
            ask = None
            got = self._touched.get(portal)
            stale = got is None or got[0] != self._epoch
            pure = got is not None and got[1]
            if not pure:
                self._epoch += 1
            if portal != b"\0":
                self._touched[portal] = (self._epoch, pure)
            if self.masks_on and portal != b"\0" and len(msg) == len(portal) + 10 and (
                    stale or not any(e[0] == K_BIND and e[1] == portal
                                     for e in reversed(self.expect))
                    and (portal not in self.portals
                         or portal.decode("utf-8", "replace") in self.cursors)):
                # a portal no Bind of the session made (or a SQL cursor's since: DECLARE
                # took the name), or one whose Bind is older than something that ran code
                # (stale: a DO block may have closed it and opened a cursor of the name,
                # round 20): a cursor's rows come to an Execute with no
                # RowDescription (round 19: the rows met no plan, or a stale portal's,
                # and the session failed). Its shape is asked for first (sent before the
                # Execute); its plan is the cursor's lineage, else unknown. (Only for a
                # well-formed Execute: Postgres answers a malformed one with 08P01 alone)
                self._push((K_CURSOR_DESC, portal))
                ask = _describe(b"P", portal)
            self._push((K_EXEC, portal))
            return ask
        elif t == m.CLOSE:
            try:
                kind = msg[5]
                name, _ = _cstr(msg, 6)
            except (ValueError, IndexError):
                kind, name = 0, b"\0"                       # malformed: an error answers it
            self._push((K_CLOSE, kind, name))
            (self.sql_prepared if kind == m.TARGET_STATEMENT else self.cursors).pop(
                name.decode("utf-8", "replace"), None)
        elif t == m.SYNC:
            self._push((K_SYNC,))
        elif t == m.QUERY:                                   # owe_ready() queues it
            self._epoch += 1
            # (a DEALLOCATE and PREPARE in it may give a name another statement)
            self._pure_stmts.clear()
            self.portals.pop(b"", None)
            self.stmts.pop(b"", None)
            self.lane_stmt(b"", False)
            sql = msg[5:-1]
            self._next = self._obj(sql, lineage, reads_masked, d)
            if d is not None and self._next.fetch is None and self._next.declare is None:
                self.note_query(msg, d, lineage, reads_masked)
            if reads_masked:
                self.masked_reads += 1
                self.txn_tainted = True
        elif t == m.FUNCTION_CALL:
            self._epoch += 1
            if reads_masked:
                self.masked_reads += 1
                self.txn_tainted = True
        return None

    def unask(self) -> None:
        """The Describe the last Execute's :meth:`frontend` asked for is not sent: its
        answer is not expected (the portal's rows stay without a plan: refused)."""
        q = self.expect
        for i in range(len(q) - 1, -1, -1):
            if q[i][0] == K_CURSOR_DESC:
                del q[i]
                return

    def query_copies(self, specs: list) -> None:
        """The COPY TO STDOUT specs of the Query just given to :meth:`frontend` (before
        ``owe_ready()`` queues it); the list may be completed in place before it runs."""
        if self._next is None:
            self._next = ObjPlan(None, True)
        self._next.copies = specs

    def parsed_copy(self, spec: tuple | None) -> None:
        """The COPY TO STDOUT spec of the statement just parsed (:meth:`frontend` 80)."""
        for e in reversed(self.expect):
            if e[0] == K_PDESC:
                e[2].copy = spec
                return

    def _reads(self, lineage, reads_masked: bool, d=None, sql: bytes = b"") -> bool:
        if lineage is not None:       # analysed: its answer; not analysable: fail closed
            if lineage.masked is not None:
                return lineage.reads
            return not self._temp_only_clean(d, sql)
        return reads_masked or (self.masks_on and self.s.policy is None)

    def _temp_only_clean(self, d, sql: bytes) -> bool:
        """A statement the planner could not analyse because it reads this session's own
        temporary tables (the side connection does not see them; round 20: the agent
        read NULL for every column of its own temp table, count(*) too): it reads
        nothing masked when it is one SELECT of built-in functions whose relations are
        such temporary tables (no masked value can be written into a table: refused)
        and committed ordinary tables without masked columns. Anything else stays
        unresolved (every computed column masked)."""
        if not self.masks_on or not self.pure_select(d):
            return False
        s = self.s
        names = self.catalog.names
        text = sql.decode("utf-8", "replace").lower()
        if any(n.rpartition(".")[2].lower() in text for n in names):
            return False        # (it names a masked relation somewhere: not this way)
        temps = s.enforce.temp_names
        views = s.views.current() if s.views is not None else None
        temp_seen = False
        for r in d.statements[0].relations_read:
            if r in names:
                return False
            schema, _, bare = r.partition(".")
            if schema in ("public", "pg_temp") and bare in temps and not (
                    views is not None and "pg_temp." + bare in views):
                temp_seen = True        # (an unqualified name finds the temp table first)
                continue
            if schema == "pg_temp" or not s.services.plain_table(s.database, r):
                return False
        return temp_seen

    def _obj(self, sql: bytes, lineage, reads_masked: bool, d=None) -> ObjPlan:
        """The plan of a statement about to be parsed or run. DECLARE and PREPARE carry
        their query's lineage for the cursor or prepared statement (registered once they
        have run); FETCH and EXECUTE name the one whose plan their rows get; CLOSE and
        DEALLOCATE forget (rows of an unknown one are masked as unresolved)."""
        reads = self._reads(lineage, reads_masked, d, sql)
        mo = _CURSOR_SQL.match(sql)
        if mo is None:
            return ObjPlan(lineage, reads)
        got = lg.named_statement(sql.decode("utf-8", "replace"))
        if got is None:
            return ObjPlan(None, True, _UNKNOWN)
        kind, name = got
        table = "cursor" if kind in ("declare", "fetch", "close") else "prepared"
        if kind == "prepare" and reads:
            # a SQL PREPARE shares its name with the protocol's statements: a Bind of
            # it reads masked data (counted from now, whatever becomes of the PREPARE)
            self.reading_stmts.add(name.encode())
        if kind in ("declare", "prepare"):
            return ObjPlan(None, reads, None, (table, name, ObjPlan(lineage, reads)))
        if kind in ("close", "deallocate"):
            objs = self.cursors if table == "cursor" else self.sql_prepared
            if name is None:
                objs.clear()
            else:
                objs.pop(name, None)
            # DEALLOCATE / CLOSE also drop a protocol statement / portal of that name
            # (one namespace each): _declared forgets its plan once it has run
            return ObjPlan(None, reads, None, ("forget", name, table))
        return ObjPlan(None, reads, (table, name))

    def _push(self, entry: tuple) -> None:
        if self._skip:
            if entry[0] != K_SYNC:
                return
            self._skip = False
        q = self.expect
        q.append(entry)
        if entry[0] == K_EXEC:
            for e in q:
                if e is entry:
                    self._arm()     # nothing before it answers with rows: its plan now
                    break
                if e[0] not in _UNSEEN:
                    break

    def _arm(self) -> None:
        """The plan of the next Execute's rows, when it is the next answer with rows."""
        for e in self.expect:
            k = e[0]
            if k in _UNSEEN:
                continue
            if k == K_EXEC:
                got = self.portals.get(e[1])
                if got is None:
                    self.rw.set_plan(_refuse_rows() if self.masks_on else None)
                    return
                obj, formats = got
                if obj.rowdesc is not None:
                    self.rw.set_plan(self.plan_for(obj.rowdesc, formats, obj))
                else:       # no row shape known: rows (there should be none) end it
                    self.rw.set_plan(_refuse_rows() if self.masks_on else None)
            return

    def _apply_unseen(self, e: tuple) -> None:
        if e[0] == K_CLOSE:
            (self.stmts if e[1] == m.TARGET_STATEMENT else self.portals).pop(e[2], None)
            # (in answer order too: see _declared)
            (self.sql_prepared if e[1] == m.TARGET_STATEMENT else self.cursors).pop(
                e[2].decode("utf-8", "replace"), None)
            if e[1] == m.TARGET_STATEMENT:
                self.lane_stmt(e[2], False)
                self.parsed_names.discard(e[2])

    def _head(self) -> tuple | None:
        q = self.expect
        while q and q[0][0] in _UNSEEN:
            self._apply_unseen(q.popleft())
        return q[0] if q else None

    # -- backend: every message in order; returns what the client gets
    def feed(self, t: int, data: bytes, whole: bool) -> bytes | None:
        rw = self.rw
        if not whole:
            return rw.feed(data)
        # the model's word on an ErrorResponse / ReadyForQuery (None: no model)
        got = answer_for(self.answers, data) if (t == m.ERROR_RESPONSE or t == m.READY_FOR_QUERY) and self.answers \
            else None
        if t in CHANNEL_TYPES:      # scrubbed first; an ErrorResponse is paired below too
            data = self._channel(t, data)
        if t not in _PAIRED:
            return rw.feed(data)
        if self.fast_owed:
            return self.feed_owed(t, data)
        h = self._head()
        while h is not None and h[0] == K_SYNC and t in _BEFORE_READY:
            # an answer to a message after this Sync: a COPY FROM STDIN took the Sync
            # (Postgres ignores one in copy-in), so it gets no ReadyForQuery
            self.expect.popleft()
            self._early_syncs += 1
            h = self._head()
        k = h[0] if h is not None else -1
        if t == m.PARAMETER_DESCRIPTION:
            if k == K_PDESC:
                return None
            return rw.feed(data)
        if t == m.ROW_DESCRIPTION or t == m.NO_DATA:
            desc = data if t == m.ROW_DESCRIPTION else None
            if k == K_PDESC:
                self.expect.popleft()
                obj = h[2]
                if len(h) > 3:          # asked for a Bind of a SQL PREPARE's statement
                    # the plan is the PREPARE's in effect now: Postgres ran everything
                    # before the Bind when it answers this, and a later PREPARE has not
                    # answered yet (a DEALLOCATE / PREPARE / Parse of the name sent
                    # before the Bind, in the same write or not, is accounted for; one
                    # sent after it took the name away here already: unknown)
                    obj = self.sql_prepared.get(h[1].decode("utf-8", "replace"))
                    st = self.stmts.get(h[1])       # a protocol statement, still there
                    if obj is None or st is not None and st is not obj:
                        obj = st if obj is None else None
                    if obj is None:
                        # of unknown lineage (masked)
                        obj = ObjPlan()
                        obj.rowdesc = desc
                        self.portals[h[3]] = (obj, h[4])
                        self._arm()
                        return None
                    self.portals[h[3]] = (obj, h[4])
                obj.rowdesc = desc
                self.stmts[h[1]] = obj
                if len(h) == 3:
                    # a protocol Parse of the name, answered: no SQL PREPARE's plan is the
                    # name's now (one answered before it came back after the Parse was
                    # sent, which removed it then)
                    self.sql_prepared.pop(h[1].decode("utf-8", "replace"), None)
                self.lane_stmt(h[1], obj.safe)
                self._arm()
                return None
            if k == K_CURSOR_DESC:      # ours: the client does not see it
                self.expect.popleft()
                if desc is None and h[1] in self.portals:
                    # no rows: not a cursor (a DO block cannot open one that returns
                    # none); the portal the session bound, a COPY's with its plan
                    self._arm()
                    return None
                obj = ObjPlan(None, True, ("cursor", h[1].decode("utf-8", "replace")))
                obj.rowdesc = desc
                self.portals[h[1]] = (obj, None)
                self._arm()
                return None
            out = rw.feed(data)
            if k == K_DESC_S:
                self.expect.popleft()
                obj = self.stmts.get(h[1])
                if obj is not None:
                    obj.rowdesc = desc
                self._arm()
            elif k == K_DESC_P:
                self.expect.popleft()
                self._arm()
            elif t == m.ROW_DESCRIPTION:                     # a Query's result
                rw.set_plan(self.plan_for(data, None, h[1] if k == K_READY else None))
            return out
        if t == m.BIND_COMPLETE:
            out = rw.feed(data)
            if k == K_BIND:
                self.expect.popleft()
                obj = self.stmts.get(h[2])
                self.portals[h[1]] = (obj if obj is not None else ObjPlan(), h[3])
                self._arm()
            return out
        if t == m.COPY_OUT_RESPONSE:
            out = rw.feed(data)
            self._copy_plan(data, h, k)
            return out
        if t == m.ERROR_RESPONSE:
            out = rw.feed(data)
            if got is not None:         # the model: which message it answers
                extended = got[1] in _EXTENDED
            else:
                extended = k != K_READY and k != -1
            if extended:
                # Postgres skips the rest up to the Sync, also what is forwarded later
                q = self.expect
                while q and q[0][0] != K_SYNC:
                    e = q.popleft()
                    if e[0] == K_READY:
                        self._ready -= 1
                if not q:
                    self._skip = True
            return out
        if t == m.COMMAND_COMPLETE or t == m.PORTAL_SUSPENDED or t == m.EMPTY_QUERY_RESPONSE:
            out = rw.feed(data)
            if k == K_EXEC:
                self.expect.popleft()
                got = self.portals.get(h[1])
                if t == m.COMMAND_COMPLETE and got is not None:
                    self._declared(got[0], data)
                self._arm()
            elif k == K_READY and t == m.COMMAND_COMPLETE:
                self._declared(h[1], data)
            return out
        # 'Z'
        out = rw.feed(data)
        swallowed = got[1] if got is not None else 0    # Syncs a COPY took
        # (those already let go above, answered past, are not skipped twice)
        swallowed, self._early_syncs = max(0, swallowed - self._early_syncs), 0
        q = self.expect
        while q:
            e = q.popleft()
            if e[0] == K_READY:
                self._ready -= 1
                break
            if e[0] == K_SYNC:
                if swallowed:
                    swallowed -= 1
                    continue
                break
        # idle only once nothing sent is still to be answered, by this queue's own
        # count: the model's (in_flight) has read the whole chunk already, later
        # segments' ReadyForQuery included (round 19: two failing segments of a masked
        # statement in one write; the second's error went out in clear)
        # (the queue first: in a long pipeline it holds the next Sync at its head, while
        # in_flight() counts the model's whole queue at each ReadyForQuery)
        if not any(e[0] == K_READY or e[0] == K_SYNC for e in q) and \
                self.s.in_flight() <= 0:
            self.masked_reads = 0
            if data[5] == m.TX_IDLE:                        # the transaction ended
                self.txn_tainted = False
        self._arm()
        self.maybe_idle()
        return out

    def _declared(self, obj: ObjPlan, complete: bytes) -> None:
        tag = complete[5:]
        if obj.declare is not None and obj.declare[0] != "forget" and tag.startswith(
                (b"DECLARE CURSOR", b"PREPARE")):
            table, name, plan = obj.declare
            (self.cursors if table == "cursor" else self.sql_prepared)[name] = plan
        if tag.startswith((b"PREPARE", b"DEALLOCATE", b"DECLARE CURSOR", b"CLOSE CURSOR",
                           b"DISCARD ALL")):
            # SQL PREPARE / DEALLOCATE share one namespace with the protocol's statements,
            # SQL DECLARE / CLOSE with its portals: a protocol object of that name is gone
            # (or was never there), and its plan must not describe what a later Bind or
            # Execute of the name runs. Which name, when the Query held several statements
            # (or DISCARD ALL), is not known here: every named one of that kind is
            # forgotten (its rows then end the session rather than leave).
            table = "prepared" if tag.startswith((b"PREPARE", b"DEALLOCATE")) else "cursor"
            d = obj.declare
            name = None
            if d is not None and d[1] is not None and (
                    d[0] == table or (d[0] == "forget" and d[2] == table)):
                name = d[1].encode()
            if self.lane is not None:
                self.lane.stmts.clear()
            if name is None:
                # which SQL object, is not known either: none keeps its plan (unknown
                # plans are masked whole)
                for kind in ("prepared", "cursor") if tag.startswith(b"DISCARD") else (table,):
                    (self.sql_prepared if kind == "prepared" else self.cursors).clear()
            for kind in ("prepared", "cursor") if tag.startswith(b"DISCARD") else (table,):
                objs = self.stmts if kind == "prepared" else self.portals
                for n in [name] if name is not None and kind == table else \
                        [n for n in objs if n]:
                    objs.pop(n, None)
            if name is not None and tag.startswith((b"DEALLOCATE", b"CLOSE CURSOR")):
                # in answer order: a PREPARE / DECLARE answered before this (in the same
                # write) put its plan back after the removal made when it was sent
                (self.sql_prepared if table == "prepared" else self.cursors).pop(
                    name.decode("utf-8", "replace"), None)

    # -- other channels (ErrorResponse, NoticeResponse, NotificationResponse,
    #    ParameterStatus, FunctionCallResponse): channels.py does the scrubbing
    def tainted(self) -> bool:
        """Whether the statements in flight, or the transaction they run in, read a
        relation with masked columns (a cursor or a prepared statement of the
        transaction may carry masked values into a later statement's messages)."""
        return self.masks_on and (self.masked_reads > 0 or self.txn_tainted)

    def error_as_sent(self, data: bytes) -> bytes:
        """The ErrorResponse ``data`` as :meth:`feed` will give it to the client now
        (scrubbed when the statements in flight read masked data): what the audit
        records of it."""
        return self._channel(m.ERROR_RESPONSE, data)

    def _channel(self, t: int, data: bytes) -> bytes:
        ch = self.channels
        if t == m.ERROR_RESPONSE or t == m.NOTICE_RESPONSE:
            return ch.error(data, self.tainted())
        if t == m.NOTIFICATION_RESPONSE:
            key = getattr(self.s, "upstream_key", None)
            own = key[0] if key and self.masks_on and (
                self.txn_tainted or self.masked_reads > 0) else None
            return ch.notification(data, own)
        if t == m.PARAMETER_STATUS:
            self.s.parameter_reported(data)     # a pinned setting moved: session ends
            return ch.parameter_status(data, self.tainted())
        return ch.function_result(data, self.tainted())    # 'V' FunctionCallResponse

    # -- catalog freshness: rows of a table the catalog does not know (created, or
    # dropped and created again, since it was read), or read after DDL went through any
    # worker, wait until the catalog is read again; the session fails if it cannot be
    held = None                     # backend items (already routed) waiting for it
    held_raw = None                 # backend items that arrived meanwhile
    _fresh = None                   # RowDescriptions checked against this catalog
    _resolved = frozenset()         # OIDs still unknown after a fresh read: not masked
    _apply = None                   # some mask applies to this identity
    ddl_pending = False             # DDL sent: the catalog is stale again at commit

    def ddl_sent(self) -> None:
        """DDL went upstream: the catalog is stale again when its transaction ends."""
        self.ddl_pending = True

    def ddl_committed(self) -> bool:
        """The session is idle again: True (once) when DDL went upstream before."""
        was, self.ddl_pending = self.ddl_pending, False
        return was

    def stale(self, rowdesc: bytes) -> bool:
        """True when the catalog must be read again before this result's rows leave."""
        cat = self.catalog
        if not self.masks_apply() or getattr(cat, "known", None) is None:
            return False
        if cat.generation != self.s.services.catalog_signal.generation():
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
                              for mk in self.s.services.cfg.masks)
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

    def catalog_behind(self) -> bool:
        """DDL went through since this session's catalog was read (in any worker): what
        a statement reads may be masked now (a table made a masked table's parent); or
        the catalog is older than CATALOG_TTL (DDL a DBA ran directly upstream: a masked
        column renamed is named otherwise in what a statement says)."""
        cat = self.catalog
        gen = getattr(cat, "generation", None)
        if not self.masks_apply() or gen is None:
            return False
        if gen != self.s.services.catalog_signal.generation():
            return True
        return time.monotonic() - cat.loaded > CATALOG_TTL

    def verify_next(self) -> None:
        """The next catch_up checks the catalog's fingerprint first (and reads it again
        only when it moved): for statements judged by masked columns' names."""
        self._verify = True

    async def catch_up(self) -> None:
        """Read the catalog again (shared with the other sessions) and use it: one read
        at the current generation (a read already in flight may predate the DDL)."""
        sig = self.s.services.catalog_signal
        age = CATALOG_TTL
        if self._verify:
            self._verify = False
            s = self.s
            cat = self.catalog
            try:
                fp = await s.services.catalog_fingerprint(s.database)
            except Exception as e:      # noqa: BLE001 - unknown: read the catalog
                log.debug("session %s: catalog fingerprint not read: %s", s.id, e)
                fp = None
            if fp is not None and fp == getattr(cat, "fingerprint", None) and \
                    cat.generation == sig.generation() and \
                    time.monotonic() - cat.loaded <= age:
                return
            if fp != getattr(cat, "fingerprint", None):
                age = 0.0
        for _ in range(3):
            cat = await self._read_catalog((), age)
            if cat is None or self.s.closed:
                return
            self._adopt(cat)
            if cat.generation == sig.generation():
                return
        self.s.fail(UpstreamUnavailable(
            "pgguard could not read the upstream catalog to apply masks",
            detail="the catalog kept changing while it was read (DDL in other sessions)"))

    async def _read_catalog(self, need, max_age: float = CATALOG_TTL):
        # None when it cannot be read: the session is closed (fail closed: nothing is
        # judged on, or leaves under, the old one)
        s = self.s
        try:
            return await s.services.mask_catalog(s.database, need, max_age)
        except Exception as e:      # noqa: BLE001
            log.warning("session %s: mask catalog not read (%s); closing", s.id, e)
            s.fail(UpstreamUnavailable("pgguard could not read the upstream catalog to "
                                       "apply masks", detail=str(e)[:300]))
            return None

    def _adopt(self, cat) -> None:
        if cat is not self.catalog:
            self.catalog = cat
            self.masks_on = self._apply and bool(cat.columns)
            self.plans.clear()
            self._fresh = None
            self.lane_forget()
            self._catalog_replaced()

    async def _resolve(self, rowdesc: bytes) -> None:
        s = self.s
        need = [t for t, _, _, _ in parse_row_description(rowdesc) if t]
        cat = await self._read_catalog(need)       # None: these rows never leave
        if cat is None or s.closed:
            return
        self._adopt(cat)
        if cat.generation == s.services.catalog_signal.generation():
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

    # -- COPY TO STDOUT: a CopyOutResponse answers the head of the response queue: a
    # Query (its COPYs' specs, in order) or an Execute (its portal's prepared COPY)
    def _copy_plan(self, msg: bytes, h: tuple | None, k: int) -> None:
        spec = None
        if k == K_READY:
            copies = h[1].copies
            if copies:
                spec = copies.pop(0)
        elif k == K_EXEC:
            got = self.portals.get(h[1])
            if got is not None:
                spec = got[0].copy
        if msg[5] != 0:
            return          # binary COPY of masked data is refused before it runs
        if spec is None or spec[0] is None:
            if self.detectors is None:
                return
            # a source without masked columns: the detectors scan every column
            (n,) = struct.unpack_from("!h", msg, 6)
            fmt = spec[1] if spec is not None and spec[1] is not None else copy_format()
            cols = [ColumnMask(ACTION_DETECT, kind=1, rule="detectors")] * n
            self.rw.set_plan(build_plan(cols, self.detectors, fmt))
            return
        self.rw.set_plan(build_plan(spec[0], self.detectors, spec[1]))

    def copy_spec(self, table_oid: int | None, columns: list[str] | None, fmt: str,
                  options: dict) -> tuple:
        """(plan entries or None, CopyFormat) of a COPY <table> [(cols)] TO STDOUT."""
        cf = copy_format(fmt, **options)
        if table_oid is None or table_oid not in self.catalog.tables:
            return (None, cf)
        _, attrs = self.catalog.tables[table_oid]
        names = columns or [name for _, name in attrs]
        by_name = {name: num for num, name in attrs}
        return ([self._entry(table_oid, by_name.get(n, 0), 25, 0, derived=False)
                 for n in names], cf)

    def copy_query_spec(self, rowdesc: bytes | None, fmt: str, options: dict,
                        query: str | None = None) -> tuple:
        """(plan entries, CopyFormat) of a COPY (query) TO STDOUT from the query's
        RowDescription (and its lineage, when :meth:`lineage_load` has analysed
        ``query``)."""
        cf = copy_format(fmt, **options)
        if rowdesc is None:
            return (None, cf)
        fields = parse_row_description(rowdesc)
        lin = self.lineage_now(query.encode(), None) if query is not None else None
        if lin is not None and lin is not PENDING and lin.refused:
            # (the callers refuse the COPY: its row count, COPY n, would carry them)
            raise ValueError(f"{lin.refused} decides how many rows it copies")
        masked = lin.masked if lin is not None and lin is not PENDING else None
        if masked is not None and len(masked) != len(fields):
            masked = None
        return ([self._entry(t, a, typ, 0, None if masked is None else masked[i])
                 for i, (t, a, typ, _) in enumerate(fields)], cf)


_PAIRED = frozenset(b"Ttn2HCEIsZ")
# answers that come before a Sync's ReadyForQuery, never after it
_BEFORE_READY = frozenset(b"Ttn2HCIs")
# an error answering one of these makes Postgres skip everything up to Sync
_EXTENDED = frozenset(b"PBEDC")


def _cstr(msg: bytes, pos: int) -> tuple[bytes, int]:
    end = msg.index(b"\0", pos)
    return msg[pos:end], end + 1


def _result_formats(msg: bytes, pos: int) -> bytes:
    # skip parameter format codes and values; return the result format codes section
    return msg[m.bind_parameters(msg, pos)[2]:]


def _formats(section: bytes, nfields: int) -> list[int]:
    (n,) = struct.unpack_from("!h", section, 0)
    codes = list(struct.unpack_from(f"!{n}h", section, 2)) if n else []
    if n == 0:
        return [0] * nfields
    if n == 1:
        return codes * nfields
    return codes[:nfields] + [0] * (nfields - n)


def _describe(kind: bytes, name: bytes) -> bytes:
    body = kind + name + b"\0"
    return b"D" + struct.pack("!I", len(body) + 4) + body


def _describe_statement(name: bytes) -> bytes:
    return _describe(b"S", name)
