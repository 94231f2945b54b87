# Side connections: the proxy's own statements to the upstream, outside client traffic.
# Simple statements outside any client session (ephemeral role provisioning and its janitor, catalog lookups for the policy), and
# simple statements run on a session's upstream link before the client sees it (SET ROLE).
from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING

from ..errors import PgguardError
from ..protocol import messages as m
from ..protocol.sqltext import ident, literal
from .upstream import connect_upstream

if TYPE_CHECKING:
    from .upstream import UpstreamLink, UpstreamProtocol

log = logging.getLogger("pgguard.sideconn")


class UpstreamError(PgguardError):
    """A statement the proxy ran upstream failed; carries the server's SQLSTATE."""


class _Owner:
    """Stands in for a client session while pgguard talks to the upstream itself."""

    id = "internal"

    def upstream_opened(self, proto) -> None:
        pass                    # the caller closes the link it gets back

    def upstream_lost(self, exc) -> None:
        pass


class SideLink:
    """What a service may ask of the upstream through the proxy's own credentials
    (masking's catalog reads and lineage planner): it sees this object, never Server."""

    def __init__(self, link: UpstreamLink) -> None:
        self._link = link

    async def run(self, database: str, statements: list[str]) -> list[list[tuple]]:
        """Each statement on one fresh connection (see run())."""
        return await run(self._link, database, statements)

    async def describe(self, database: str, sql: str) -> bytes | None:
        """The RowDescription of ``sql`` (see describe())."""
        return await describe(self._link, database, sql)

    async def connect(self, database: str, application_name: str) -> UpstreamProtocol:
        """A logged-in link of the caller's own, to keep and close."""
        proto, _, _ = await connect_upstream(_Owner(), self._link, database,
                                             {"application_name": application_name})
        return proto


async def execute(proto: UpstreamProtocol, sql: str,
                  status: list[bytes] | None = None) -> list[tuple[str | None, ...]]:
    """Run one simple Query on a logged-in link (still in its login phase); rows as text.
    ``status``: collects the ParameterStatus messages it causes (whole, framed)."""
    body = sql.encode() + b"\0"
    proto.transport.write(b"Q" + struct.pack("!I", len(body) + 4) + body)
    rows: list[tuple[str | None, ...]] = []
    err = None
    while True:
        t, payload = await proto.read_message()
        if t == m.DATA_ROW:
            (n,) = struct.unpack_from("!h", payload)
            pos, row = 2, []
            for _ in range(n):
                (ln,) = struct.unpack_from("!i", payload, pos)
                pos += 4
                if ln < 0:
                    row.append(None)
                else:
                    row.append(payload[pos:pos + ln].decode("utf-8", "replace"))
                    pos += ln
            rows.append(tuple(row))
        elif t == m.ERROR_RESPONSE:
            err = m.parse_error_fields(payload)
        elif t == m.PARAMETER_STATUS and status is not None:
            status.append(b"S" + struct.pack("!I", len(payload) + 4) + payload)
        elif t == m.READY_FOR_QUERY:
            break
    if err is not None:
        raise UpstreamError(err.get("M", "upstream error"), sqlstate=err.get("C", "XX000"),
                            detail=err.get("D"))
    return rows


async def describe(link: UpstreamLink, database: str, sql: str) -> bytes | None:
    """The RowDescription message of a query run on a side connection (None: no rows).
    Raises UpstreamError when it fails there."""
    owner = _Owner()
    proto, _, _ = await connect_upstream(owner, link, database,
                                         {"application_name": "pgguard:internal"})
    try:
        body = sql.encode() + b"\0"
        proto.transport.write(b"Q" + struct.pack("!I", len(body) + 4) + body)
        desc, err = None, None
        while True:
            t, payload = await proto.read_message()
            if t == m.ROW_DESCRIPTION:
                desc = b"T" + struct.pack("!I", len(payload) + 4) + payload
            elif t == m.ERROR_RESPONSE:
                err = m.parse_error_fields(payload)
            elif t == m.READY_FOR_QUERY:
                break
        if err is not None:
            raise UpstreamError(err.get("M", "upstream error"), sqlstate=err.get("C", "XX000"))
        return desc
    finally:
        try:
            proto.transport.write(m.TERMINATE_MESSAGE)
        finally:
            proto.transport.close()


async def run(link: UpstreamLink, database: str, statements: list[str]) -> list[list[tuple]]:
    """Run statements on a fresh connection with the proxy's upstream credentials.

    Example: ``await run(link, "app", ["SELECT 1"])`` -> ``[[("1",)]]``.
    """
    owner = _Owner()
    proto, _, _ = await connect_upstream(owner, link, database,
                                         {"application_name": "pgguard:internal"})
    try:
        return [await execute(proto, sql) for sql in statements]
    finally:
        try:
            proto.transport.write(m.TERMINATE_MESSAGE)
        finally:
            proto.transport.close()


# the function behind an OID, one row per declared argument (none for no arguments)
FUNCTION_SQL = """
SELECT n.nspname, p.proname, p.prokind, p.proretset, a.typ,
       pg_catalog.format_type(a.typ, NULL)
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
LEFT JOIN LATERAL pg_catalog.unnest(p.proargtypes) WITH ORDINALITY AS a(typ, ord) ON true
WHERE p.oid = {oid}
ORDER BY a.ord
"""

# one row per (relation with rewrite rules, relation those rules depend on); system
# schemas are left out (writes to them are flagged by the classifier itself)
REWRITE_MAP_SQL = """
SELECT DISTINCT vn.nspname, v.relname, bn.nspname, b.relname
FROM pg_catalog.pg_rewrite r
JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace
JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
     AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
     AND d.refobjid <> r.ev_class
JOIN pg_catalog.pg_class b ON b.oid = d.refobjid
JOIN pg_catalog.pg_namespace bn ON bn.oid = b.relnamespace
WHERE vn.nspname NOT IN ('pg_catalog', 'information_schema')
  AND vn.nspname NOT LIKE 'pg\\_toast%'
UNION
-- system catalogs are pinned: pg_depend records no dependency on them, so read the
-- relation ids the rules' query trees name
SELECT DISTINCT vn.nspname, v.relname, bn.nspname, b.relname
FROM pg_catalog.pg_rewrite r
JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace
CROSS JOIN LATERAL pg_catalog.regexp_matches(r.ev_action::pg_catalog.text,
                                             ':relid (\\d+)', 'g') AS m(id)
JOIN pg_catalog.pg_class b ON b.oid = m.id[1]::pg_catalog.oid AND b.oid <> r.ev_class
JOIN pg_catalog.pg_namespace bn ON bn.oid = b.relnamespace
WHERE vn.nspname NOT IN ('pg_catalog', 'information_schema')
  AND vn.nspname NOT LIKE 'pg\\_toast%'
  AND (bn.nspname IN ('pg_catalog', 'information_schema') OR bn.nspname LIKE 'pg\\_toast%')
"""

# a partition or inheritance child holds rows of its parent (rules on the parent cover
# it), and a statement on the parent (without ONLY) reaches the child's rows
INHERITS_SQL = """
SELECT cn.nspname, c.relname, pn.nspname, p.relname
FROM pg_catalog.pg_inherits i
JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid AND c.relkind IN ('r', 'p', 'f')
JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_catalog.pg_class p ON p.oid = i.inhparent
JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE cn.nspname NOT IN ('pg_catalog', 'information_schema')
"""

# the functions INSTEAD OF triggers run (tgtype bit 6: TRIGGER_TYPE_INSTEAD)
INSTEAD_TRIGGERS_SQL = """
SELECT n.nspname, c.relname, l.lanname, p.prosrc
FROM pg_catalog.pg_trigger t
JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE NOT t.tgisinternal AND (t.tgtype & 64) <> 0
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
"""


# relations whose changes change rows no command tag counts (the blast-radius guard
# measures statements writing them by the transaction's tuple counters instead): those
# a foreign key ON DELETE/UPDATE CASCADE, SET NULL or SET DEFAULT references, those with
# a trigger or a non-SELECT rewrite rule (DO ALSO / INSTEAD), and every partitioned or
# inheritance parent of one (a write through the parent reaches it)
HIDDEN_WRITES_SQL = """
WITH RECURSIVE h(oid) AS (
  SELECT k.confrelid FROM pg_catalog.pg_constraint k
  WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))
  UNION
  SELECT t.tgrelid FROM pg_catalog.pg_trigger t WHERE NOT t.tgisinternal
  UNION
  SELECT r.ev_class FROM pg_catalog.pg_rewrite r WHERE r.ev_type <> '1'
  UNION
  SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN h ON h.oid = i.inhrelid
)
SELECT n.nspname, c.relname
FROM h
JOIN pg_catalog.pg_class c ON c.oid = h.oid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
"""


# relations with a deferrable trigger of a user's (CREATE CONSTRAINT TRIGGER ...
# DEFERRABLE), every partitioned or inheritance parent of one, and every relation a
# foreign key ON DELETE/UPDATE CASCADE, SET NULL or SET DEFAULT reaches one from: such
# a trigger may run at COMMIT (INITIALLY DEFERRED, or SET CONSTRAINTS ... DEFERRED),
# after the guard counted the statement's rows
DEFERRED_TRIGGERS_SQL = """
WITH RECURSIVE h(oid) AS (
  SELECT t.tgrelid FROM pg_catalog.pg_trigger t WHERE NOT t.tgisinternal AND t.tgdeferrable
  UNION
  SELECT x.up FROM h JOIN (
    SELECT i.inhrelid AS down, i.inhparent AS up FROM pg_catalog.pg_inherits i
    UNION ALL
    SELECT k.conrelid, k.confrelid FROM pg_catalog.pg_constraint k
    WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd')
                               OR k.confupdtype IN ('c', 'n', 'd'))
  ) x ON x.down = h.oid
)
SELECT n.nspname, c.relname
FROM h
JOIN pg_catalog.pg_class c ON c.oid = h.oid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
"""


# the definitions of views and materialized views (a read of one runs the functions
# its definition calls; a REFRESH runs them too)
VIEW_DEFS_SQL = """
SELECT n.nspname, c.relname, pg_catalog.pg_get_viewdef(c.oid)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
UNION ALL
SELECT n.nspname, c.relname, 'SELECT ' || pg_catalog.string_agg(
    '(' || COALESCE(pg_catalog.pg_get_expr(p.polqual, p.polrelid), 'true')
    || '), (' || COALESCE(pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid),
                                    'true') || ')', ', ')
FROM pg_catalog.pg_policy p
JOIN pg_catalog.pg_class c ON c.oid = p.polrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relrowsecurity AND n.nspname NOT IN ('pg_catalog', 'information_schema')
GROUP BY n.nspname, c.relname
"""

# code that runs beside a statement: the functions of user operators (by symbol) and
# casts (by target type) that are not an extension's (SELECT 1 === 'x' ran a DBA's
# writing function), and, beside DDL, event triggers' functions
GLOBAL_CODE_SQL = """
WITH coded(key, cls, obj, fn) AS (
  SELECT 'op:' || o.oprname, 'pg_catalog.pg_operator'::pg_catalog.regclass, o.oid, o.oprcode
  FROM pg_catalog.pg_operator o
  UNION ALL
  SELECT 'cast:' || pg_catalog.lower(t.typname), 'pg_catalog.pg_cast'::pg_catalog.regclass,
         c.oid, c.castfunc
  FROM pg_catalog.pg_cast c JOIN pg_catalog.pg_type t ON t.oid = c.casttarget
)
SELECT x.key, 'SELECT ' || pg_catalog.string_agg(DISTINCT
       pg_catalog.quote_ident(pn.nspname) || '.' || pg_catalog.quote_ident(p.proname)
       || '()', ', ')
FROM coded x
JOIN pg_catalog.pg_proc p ON p.oid = x.fn
JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace
WHERE pn.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                  WHERE d.classid = x.cls AND d.objid = x.obj AND d.deptype = 'e')
GROUP BY x.key
UNION ALL
SELECT 'ddl', 'SELECT ' || pg_catalog.string_agg(pg_catalog.quote_ident(pn.nspname) || '.'
       || pg_catalog.quote_ident(p.proname) || '()', ', ')
FROM pg_catalog.pg_event_trigger e
JOIN pg_catalog.pg_proc p ON p.oid = e.evtfoid
JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace
WHERE e.evtenabled <> 'D'
HAVING pg_catalog.count(*) > 0
"""


# the code a write to a table runs besides the statement: its triggers' functions, its
# columns' DEFAULT and generated expressions, its CHECK constraints; one SELECT of them
# all per table (the classifier reads it: user functions are judged by their bodies)
WRITE_CODE_SQL = """
WITH RECURSIVE reach(up, down) AS (
  -- a write to "up" changes rows of "down" through cascading foreign keys: its code runs
  SELECT k.confrelid, k.conrelid FROM pg_catalog.pg_constraint k
  WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))
  UNION
  SELECT r.up, k.conrelid FROM reach r
  JOIN pg_catalog.pg_constraint k ON k.confrelid = r.down AND k.contype = 'f'
   AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))
), own(rel, code) AS (
  SELECT t.tgrelid AS rel, pg_catalog.quote_ident(pn.nspname) || '.'
         || pg_catalog.quote_ident(p.proname) || '()' AS code
  FROM pg_catalog.pg_trigger t
  JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
  JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace
  WHERE NOT t.tgisinternal
  UNION ALL
  -- a trigger's WHEN condition, as its definition prints it
  SELECT t.tgrelid, '(' || pg_catalog.substring(pg_catalog.pg_get_triggerdef(t.oid),
                                                ' WHEN \\((.*)\\) EXECUTE ') || ')'
  FROM pg_catalog.pg_trigger t WHERE NOT t.tgisinternal AND t.tgqual IS NOT NULL
  UNION ALL
  SELECT d.adrelid, '(' || pg_catalog.pg_get_expr(d.adbin, d.adrelid) || ')'
  FROM pg_catalog.pg_attrdef d
  UNION ALL
  SELECT k.conrelid, '(' || pg_catalog.pg_get_expr(k.conbin, k.conrelid) || ')'
  FROM pg_catalog.pg_constraint k WHERE k.contype = 'c' AND k.conrelid <> 0
  UNION ALL
  SELECT i.indrelid, '(' || pg_catalog.pg_get_expr(i.indexprs, i.indrelid) || ')'
  FROM pg_catalog.pg_index i WHERE i.indexprs IS NOT NULL
  UNION ALL
  SELECT i.indrelid, '(' || pg_catalog.pg_get_expr(i.indpred, i.indrelid) || ')'
  FROM pg_catalog.pg_index i WHERE i.indpred IS NOT NULL
  UNION ALL
  SELECT a.attrelid, '(' || pg_catalog.pg_get_expr(k.conbin, 0) || ')'
  FROM pg_catalog.pg_attribute a
  JOIN pg_catalog.pg_constraint k ON k.contypid = a.atttypid AND k.contype = 'c'
  WHERE a.attnum > 0 AND NOT a.attisdropped
)
SELECT n.nspname, c.relname, 'SELECT ' || pg_catalog.string_agg(DISTINCT x.code, ', ')
FROM (SELECT rel, code FROM own
      UNION ALL
      SELECT r.up, o.code FROM reach r JOIN own o ON o.rel = r.down) x
JOIN pg_catalog.pg_class c ON c.oid = x.rel
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
GROUP BY n.nspname, c.relname
"""


# foreign tables: rows written there change in another server, where this backend's
# tuple counters cannot see them
FOREIGN_TABLES_SQL = """
SELECT n.nspname, c.relname
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'f'
"""


async def function_rows(link: UpstreamLink, database: str, oid: int) -> list[tuple]:
    """The function with ``oid``: one row per declared argument (schema, name, kind,
    returns a set, argument type OID, type name), one with NULL type for a function of
    no arguments, none when no function has that OID."""
    return (await run(link, database, [FUNCTION_SQL.format(oid=int(oid))]))[0]


async def rewrite_rows(link: UpstreamLink, database: str
                       ) -> tuple[list[tuple], list[tuple], list[tuple], list[tuple],
                                  list[tuple], list[tuple], list[tuple], list[tuple]]:
    """(schema, relation, base schema, base relation) for every relation with rewrite
    rules (views, INSTEAD/ALSO rules) and each relation those rules use; (schema, view,
    language, source) of the functions of INSTEAD OF triggers; (schema, relation) of
    the relations whose changes change rows unseen (cascading foreign keys, row
    triggers), and of foreign tables; and (schema, child, schema, parent) of every
    partition or inheritance child; (schema, relation) of the relations with deferrable
    triggers of a user's (and their parents); (schema, view, definition) of every view
    and materialized view (and a SELECT of the row-level security policies of each
    table with them); (schema, table, a SELECT of the code a write to it runs); ("op:"
    symbol, "cast:" type or "ddl", a SELECT of what a statement using that operator, a
    cast to that type, or DDL runs)."""
    return tuple(await run(
        link, database, [REWRITE_MAP_SQL, INSTEAD_TRIGGERS_SQL, HIDDEN_WRITES_SQL,
                         FOREIGN_TABLES_SQL, INHERITS_SQL, DEFERRED_TRIGGERS_SQL,
                         VIEW_DEFS_SQL, WRITE_CODE_SQL, GLOBAL_CODE_SQL]))


async def drop_role(link: UpstreamLink, database: str, role: str, successor: str | None,
                    attempts: int = 6) -> bool:
    """Drop an ephemeral role once its sessions are gone (retrying while its backend
    exits); objects it owns go to ``successor``."""
    stmts = []
    if successor:
        stmts.append(f"REASSIGN OWNED BY {ident(role)} TO {ident(successor)}")
    stmts += [f"DROP OWNED BY {ident(role)}", f"DROP ROLE IF EXISTS {ident(role)}"]
    delay = 0.05
    for _ in range(attempts):
        try:
            exists = await run(link, database, [
                f"SELECT 1 FROM pg_roles WHERE rolname = {literal(role)}"])
            if not exists[0]:
                return True
            await run(link, database, stmts)
            return True
        except (PgguardError, OSError) as e:
            log.debug("dropping role %s: %s", role, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    log.warning("could not drop ephemeral role %s; the janitor will retry at next start", role)
    return False


# every overload a called name may mean: a qualified name in its schema, a bare one in
# any schema but the system ones (a superset of what a search_path reaches); the
# definition (the CREATE text) of SQL and PL/pgSQL functions and procedures, and the
# support functions of an aggregate (they run when it is called); and for a function in
# C or `internal`, the other functions (built-ins, an extension's) whose code it runs:
# the same symbol of the same library, by the library's file name however the path is
# spelled ('$libdir/adminpack', '/usr/lib/.../adminpack.so', 'adminpack')
FUNCTION_DEFINITIONS_SQL = """
SELECT n.nspname, p.proname, p.oid, l.lanname, p.prokind, p.prosecdef, p.provolatile,
       pg_catalog.array_to_string(p.proconfig, ', '),
       CASE WHEN p.prokind IN ('f', 'p') AND l.lanname IN ('sql', 'plpgsql')
            THEN pg_catalog.pg_get_functiondef(p.oid) END,
       (SELECT pg_catalog.string_agg(sn.nspname || '.' || s.proname, ',')
        FROM pg_catalog.pg_aggregate a
        JOIN pg_catalog.pg_proc s ON s.oid IN (a.aggtransfn, a.aggfinalfn, a.aggcombinefn,
             a.aggserialfn, a.aggdeserialfn, a.aggmtransfn, a.aggminvtransfn, a.aggmfinalfn)
        JOIN pg_catalog.pg_namespace sn ON sn.oid = s.pronamespace
        WHERE a.aggfnoid = p.oid),
       {key},
       CASE WHEN l.lanname IN ('internal', 'c') THEN
       (SELECT pg_catalog.string_agg(DISTINCT an.nspname || '.' || a.proname, ',')
        FROM pg_catalog.pg_proc a
        JOIN pg_catalog.pg_namespace an ON an.oid = a.pronamespace
        WHERE a.prolang = p.prolang AND a.prosrc = p.prosrc AND a.proname <> p.proname
          AND pg_catalog.regexp_replace(pg_catalog.regexp_replace(
                coalesce(a.probin, ''), '^.*/', ''), '\\.so$', '')
            = pg_catalog.regexp_replace(pg_catalog.regexp_replace(
                coalesce(p.probin, ''), '^.*/', ''), '\\.so$', '')) END
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE {where}
"""


async def function_definitions(link: UpstreamLink, database: str,
                               names: list[str]) -> dict[str, list[tuple]]:
    """Called name -> rows of every overload it may mean (see FUNCTION_DEFINITIONS_SQL;
    an empty list: none)."""
    bare = sorted({n for n in names if "." not in n})
    # a qualified name (schema.name, or database.schema.name) as the catalog keys it
    qual: dict[str, list[str]] = {}
    for n in names:
        if "." in n:
            parts = n.split(".")
            qual.setdefault(f"{parts[-2]}.{parts[-1]}", []).append(n)
    stmts = []
    if bare:
        stmts.append(FUNCTION_DEFINITIONS_SQL.format(
            key="p.proname", where=f"p.proname IN ({', '.join(literal(n) for n in bare)}) "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema')"))
    if qual:
        pairs = ", ".join(f"({literal(s)}, {literal(p)})"
                          for s, _, p in (k.partition(".") for k in sorted(qual)))
        stmts.append(FUNCTION_DEFINITIONS_SQL.format(
            key="n.nspname || '.' || p.proname",
            where=f"(n.nspname, p.proname) IN ({pairs})"))
    out: dict[str, list[tuple]] = {n: [] for n in names}
    for i, res in enumerate(await run(link, database, stmts)):
        qualified = bool(qual) and (i == 1 or not bare)
        for row in res:
            for called in (qual.get(row[10], ()) if qualified else (row[10],)):
                out.setdefault(called, []).append((*row[:10], row[11]))
    return out
