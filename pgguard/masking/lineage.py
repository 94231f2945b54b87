# Lineage of result columns: which output columns of a statement depend on a masked
# column. Postgres answers it: the statement is prepared on a side connection (inside a
# READ ONLY transaction that is rolled back, under the session's role when it can be
# assumed) and its generic plan read back with EXPLAIN (VERBOSE, FORMAT JSON), which
# names every output expression with the scans it comes from, across views, CTEs,
# subqueries, set operations and sub-plans. Fail closed: what cannot be analysed is None
# (every derived column is masked by the caller).
"""Per-output-column lineage of SQL statements, from the planner.

:func:`analyse` returns a :class:`Lineage`: for each result column whether it may carry
a value of a masked column (``masked``), and whether the statement reads a masked
relation at all (``reads``). ``masked`` is None when the statement could not be
analysed (unknown objects such as temporary tables, syntax EXPLAIN does not take, the
side connection failing, a plan node this module does not know: Custom Scan, a Foreign
Scan of a join, ...): callers mask every column they cannot prove clean.

A column is clean when it is a plain column of a base table (RowDescription names the
table and attribute, and the table is an ordinary, partitioned or foreign table) that
is not masked, or when its output expression references nothing tainted. Tainted are
masked columns of scanned relations, whole-row references of relations with masked
columns, every column of a subquery, CTE, function scan or VALUES whose plan touches a
tainted expression, the results of tainted sub-plans, and calls of functions and
operators outside pg_catalog (their bodies are not seen: by name, and every
schema-qualified call). EXPLAIN does not print the expressions of a multi-row VALUES
list (its Values Scan shows only "*VALUES*".column1): every column of one is tainted
when the statement reads a masked relation (LATERAL VALUES may reference it) or its
text names a function or operator outside pg_catalog. A count is an aggregate like any
other (``count(CASE WHEN g <= ascii(ssn) THEN 1 END)`` is a character's code). When the
number of rows is itself decided by masked values (a function scan over them, a derived
relation carrying them, a LIMIT or OFFSET computed when the statement runs), every
computed column is tainted: ``count(*)`` over ``generate_series(1, ascii(ssn))`` is the
value. A filter or join condition on a masked column is not followed (the README's
oracles).

A column-alias list renames a relation's columns in the plan (``FROM customers AS
x(i, n, e, s)`` prints ssn as ``x.s``; ``x(ssn)`` prints the real ssn as ``x.ssn_1``).
The lists of the statement's text and of the views over masked relations are mapped onto
the relation's live columns in attnum order, as Postgres names them; a scan whose alias
such a list may govern but cannot be mapped exactly (another relation by that alias, a
partition printed under its parent's names, columns not known, text pglast cannot read)
has every column tainted, and so has one the plan qualifies with a name the relation
does not have (a renaming seen nowhere else: an inlined function body).

Expression text (and statement text) is read by one scanner, as Postgres' lexer reads
it: quoted names ("" escapes) and literals ('' escapes, E'', dollar quotes) are read
whole, so nothing inside a name is taken for a literal or the reverse; an expression it
cannot read unambiguously is tainted.

Example::

    lin = await analyse(side, "app", "SELECT id, lower(email) FROM c WHERE id > $1",
                        (23,), {("public", "c"): frozenset({"email"})}, role=None)
    lin.masked   # (False, True)
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
import struct
from typing import Any, NamedTuple, Protocol

import orjson

from .._core.framing import FrameReader
from ..protocol import messages as m
from ..protocol.messages import parse_row_description
from ..protocol.sqltext import ident, literal

log = logging.getLogger("pgguard.masking")


class SideLink(Protocol):
    """What masking asks of the upstream, given to it by the proxy (sideconn.SideLink):
    statements on a fresh connection with the proxy's credentials, or a link to keep
    (an object with ``transport`` and ``async read_message() -> (type, payload)``)."""

    async def run(self, database: str, statements: list[str]) -> list[list[tuple]]: ...

    async def connect(self, database: str, application_name: str) -> Any: ...

__all__ = [
    "UNRESOLVED",
    "Lineage",
    "analyse",
    "cached",
    "columns_tainted",
    "forget",
    "named_statement",
    "needs_lineage",
    "remember",
    "statement_query",
]


class Lineage(NamedTuple):
    masked: tuple[bool, ...] | None    # per result column; None: could not be analysed
    reads: bool                        # the statement reads a relation with masked columns
    # why the statement is refused ("" : it is not): how many rows it returns, or which
    # rows, is decided by masked values, which no masking of cells hides
    refused: str = ""


UNRESOLVED = Lineage(None, True)

# statement kinds whose result columns EXPLAIN can explain
_EXPLAINABLE = frozenset({"select", "insert", "update", "delete", "merge"})
_FIRST_WORD = re.compile(rb"\s*(?:--[^\n\r]*[\n\r]\s*|/\*.*?\*/\s*)*\(*\s*([A-Za-z]+)", re.DOTALL)
_WORD_KINDS = {b"select": "select", b"with": "select", b"values": "select",
               b"table": "select", b"insert": "insert", b"update": "update",
               b"delete": "delete", b"merge": "merge"}


def needs_lineage(d, sql: bytes) -> bool:
    """Whether the statement's result columns are worth asking the planner about:
    one statement of a kind EXPLAIN takes (from the policy decision, or from its
    first word when no policy judges the session)."""
    if d is not None:
        return len(d.statements) == 1 and d.statements[0].kind in _EXPLAINABLE
    mo = _FIRST_WORD.match(sql)
    return mo is not None and mo.group(1).lower() in _WORD_KINDS and b";" not in sql.rstrip(
        b"; \t\r\n\0")


# -- reading SQL and the expressions EXPLAIN prints ----------------------------------------
# One scanner for every reader of SQL text or of plan expressions: a name is only ever
# read whole (quotes undone), a literal only ever skipped whole, so that nothing inside
# an identifier is taken for a literal and nothing inside a literal for a name.

class _Tok(NamedTuple):
    kind: str       # "name" (a word or a quoted identifier), "str", "param", "num", "op",
    #                 "punct"
    text: str       # as written
    name: str       # what a name denotes: quotes undone, a word folded to lower case


_NAME_CH = r"A-Za-z_\x80-\U0010ffff"
# (possessive repeats over runs of characters: a repeat of a one-character alternative
# keeps a backtracking entry per character, some 300 bytes each: the plan of SELECT
# repeat('x', 6000000) prints the folded 6 MB constant, and reading it took 1.8 GB)
_SCAN = re.compile(rf"""
    (?P<space>[ \t\n\r\f\v]+|--[^\n\r]*)
  | (?P<comment>/\*)
  | (?P<uesc>[uU]&['"])
  | (?P<ident>"(?:[^"]++|"")++")
  | (?P<estr>[eE]'(?:[^'\\]++|''|\\.)*+')
  | (?P<str>'(?:[^']++|'')*+')
  | (?P<param>\$[0-9]+)
  | (?P<dollar>\$(?:[{_NAME_CH}][{_NAME_CH}0-9]*)?\$)
  | (?P<word>[{_NAME_CH}][{_NAME_CH}0-9$]*)
  | (?P<num>0[xXoObB][0-9A-Fa-f_]+
      |(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9]+)?)
  | (?P<op>(?:(?!--|/\*)[-+*/<>=~!@\#%^&|`?])++)
  | (?P<punct>::|[()\[\],;.:])
""", re.VERBOSE | re.DOTALL)
_COMMENT_EDGE = re.compile(r"/\*|\*/")
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_OPERATOR_NAME = re.compile(r"[-+*/<>=~!@#%^&|`?]+")
_NAMEDATALEN = 64


def _name(name: str) -> str:
    b = name.encode("utf-8", "surrogatepass")           # identifiers are truncated
    return name if len(b) < _NAMEDATALEN else b[:_NAMEDATALEN - 1].decode("utf-8", "ignore")


def _scan(text: str, sql: bool = False) -> list[_Tok] | None:
    """The tokens of ``text`` (SQL when ``sql``, else an expression EXPLAIN printed), as
    Postgres' lexer reads them, without spaces and comments. None when they cannot be
    read unambiguously: an unterminated quote, literal or comment, a character outside
    every token, U& strings and names (escapes), and in SQL a backslash in a plain
    literal (its end depends on standard_conforming_strings; EXPLAIN doubles what it
    must, so its literals end in the same place either way)."""
    out: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        mo = _SCAN.match(text, i)
        if mo is None or mo.lastgroup == "uesc":
            return None
        kind, tok, i = mo.lastgroup, mo.group(), mo.end()
        if kind == "space":
            continue
        if kind == "comment":                       # /* ... */, nested
            depth = 1
            while depth:
                edge = _COMMENT_EDGE.search(text, i)
                if edge is None:
                    return None
                depth += 1 if edge.group() == "/*" else -1
                i = edge.end()
            continue
        if kind == "dollar":                        # $tag$ ... $tag$
            end = text.find(tok, i)
            if end < 0:
                return None
            kind, tok, i = "str", text[mo.start():end + len(tok)], end + len(tok)
        elif kind == "estr":
            kind = "str"
        elif kind == "str" and sql and "\\" in tok:
            return None
        if kind == "ident":
            out.append(_Tok("name", tok, _name(tok[1:-1].replace('""', '"'))))
        elif kind == "word":
            out.append(_Tok("name", tok, _name(tok.translate(_LOWER))))
        else:
            out.append(_Tok(kind, tok, tok))
    return out


def _closing(toks: list[_Tok], start: int) -> int:
    """Index of the parenthesis closing the one at ``start`` (-1: none)."""
    depth = 0
    for j in range(start, len(toks)):
        if toks[j].text == "(":
            depth += 1
        elif toks[j].text == ")":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _refs(toks: list[_Tok]) -> set[str]:
    """The parameters ($n) and sub-plans (SubPlan n, InitPlan n) the tokens name."""
    out = set()
    for i, t in enumerate(toks):
        if t.kind == "param":
            out.add(t.text)
        elif t.text in ("SubPlan", "InitPlan") and i + 1 < len(toks) \
                and toks[i + 1].kind == "num":
            out.add(f"{t.text} {toks[i + 1].text}")
    return out


def _may_call(sql: str | None, opaque: frozenset) -> bool:
    """Whether statement text may call a function or operator outside pg_catalog
    (unreadable, or not given: it may)."""
    if not opaque:
        return False
    toks = None if sql is None else _scan(sql, sql=True)
    if toks is None:
        return True
    ops = [o for o in opaque if _OPERATOR_NAME.fullmatch(o)]
    return any(t.kind == "name" and t.name in opaque
               or t.kind == "op" and any(o in t.text for o in ops) for t in toks)


# -- reading a plan ----------------------------------------------------------------------

# plan nodes that scan a relation (named in "Relation Name": without it, not understood)
_RELATION_SCANS = frozenset({
    "Seq Scan", "Sample Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan",
    "Tid Scan", "Tid Range Scan", "Foreign Scan", "ModifyTable"})
# plan nodes EXPLAIN prints every expression of that feeds their output columns
_SHOWN = _RELATION_SCANS | frozenset({
    "Result", "ProjectSet", "Append", "Merge Append", "Recursive Union", "BitmapAnd",
    "BitmapOr", "Bitmap Index Scan", "Nested Loop", "Merge Join", "Hash Join", "Gather",
    "Gather Merge", "Subquery Scan", "Function Scan", "Table Function Scan", "CTE Scan",
    "WorkTable Scan", "Materialize", "Memoize", "Sort", "Incremental Sort", "Group",
    "Aggregate", "WindowAgg", "Unique", "SetOp", "LockRows", "Limit", "Hash"})
# plan nodes whose expressions EXPLAIN does not print (a VALUES list's): its columns may
# carry whatever the statement reads, or what a function it calls returns
_HIDDEN = frozenset({"Values Scan"})
# node fields whose expressions feed the node's output columns
_EXPR_FIELDS = ("Output", "Function Call", "Table Function Call")
# node fields that hold no expression: names, kinds, numbers. Every other field of a node
# (Filter, Hash Cond, TID Cond, Order By, Cache Key, Sampling Parameters, Grouping Sets'
# keys, a field a later Postgres adds ...) is read as a condition or key: which rows
# meet, in which order, in which group
_META_FIELDS = frozenset({
    "Node Type", "Parent Relationship", "Subplan Name", "Custom Plan Provider",
    "Relation Name", "Schema", "Alias", "Function Name", "Table Function Name",
    "CTE Name", "Tuplestore Name", "Index Name", "Scan Direction", "Join Type",
    "Strategy", "Partial Mode", "Command", "Operation", "Conflict Resolution",
    "Conflict Arbiter Indexes", "Cache Mode", "Sampling Method", "Sort Method",
    "Sort Space Type", "Plans", "Target Tables"} | set(_EXPR_FIELDS))
# names of functions and operators outside pg_catalog (user-defined, extensions): calls
# of them are not seen into, so an output that calls one is masked
_OPAQUE_SQL = ("SELECT p.proname FROM pg_catalog.pg_proc p WHERE p.pronamespace NOT IN "
               "('pg_catalog'::pg_catalog.regnamespace, "
               "'information_schema'::pg_catalog.regnamespace) UNION "
               "SELECT o.oprname FROM pg_catalog.pg_operator o WHERE o.oprnamespace <> "
               "'pg_catalog'::pg_catalog.regnamespace")
_CHILD_ALIAS = re.compile(r"^(.+)_\d+$", re.DOTALL)
# system columns a scan may print qualified by its alias (x.ctid)
_SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})


def _alias_names(live: tuple[str, ...], colnames: tuple[str, ...]) -> list[str] | None:
    """The names EXPLAIN prints a relation's live columns under (attnum order) when it
    is named with the column-alias list ``colnames``: positional over the live columns
    (a shorter list renames the first ones), each made unique within the relation by a
    _n suffix as ruleutils does (FROM customers x(ssn): the real ssn prints as ssn_1).
    None when a list longer than the columns or a name near the length limit makes
    that uncertain."""
    if len(colnames) > len(live):
        return None
    out: list[str] = []
    used: set[str] = set()
    for i, real in enumerate(live):
        name = colnames[i] if i < len(colnames) else real
        if name in used:
            k = 1
            while f"{name}_{k}" in used:
                k += 1
            name = f"{name}_{k}"
        if len(name.encode("utf-8", "surrogatepass")) >= _NAMEDATALEN - 1:
            return None
        used.add(name)
        out.append(name)
    return out


@functools.lru_cache(maxsize=2048)
def _parsed_dicts(sql: str) -> list | None:
    """Every JSON object of pglast's parse tree of ``sql`` (None: it cannot be read)."""
    from pglast import parser
    try:
        tree = orjson.loads(parser.parse_sql_json(sql))
    except Exception:       # noqa: BLE001 - unreadable: the caller fails closed
        return None
    return _parsed_dicts_of(tree)


def _constant_values(sql: str | None) -> bool:
    """Whether every VALUES list of the text holds constants only (literals, casts of
    them, parameters): its rows then carry nothing of another row source. False when
    the text cannot be read."""
    nodes = _parsed_dicts(sql) if sql else None
    if nodes is None:
        return False
    for n in nodes:
        for row in (n.get("SelectStmt") or {}).get("valuesLists") or ():
            for item in (row.get("List") or {}).get("items") or ():
                cast = item.get("TypeCast")
                if cast is not None:
                    item = cast.get("arg") or {}
                if not ("A_Const" in item or "ParamRef" in item):
                    return False
    return True


def _sublink_tests(sql: str | None) -> set[tuple[str | None, str]] | None:
    """The columns the left-hand sides of the text's ANY / ALL / row-comparison
    sub-selects reference, as (qualifier or None, column or "*") (x IN (SELECT ...),
    (a, b) > ALL (...)): a plan prints such a test as "(SubPlan n)", never the
    comparison. None: the text cannot be read."""
    links = _sublinks(sql, ("ANY_SUBLINK", "ALL_SUBLINK", "ROWCOMPARE_SUBLINK"))
    if links is None:
        return None
    refs: set[tuple[str | None, str]] = set()
    for link in links:
        for x in _parsed_dicts_of(link.get("testexpr")):
            names = _column_ref(x)
            if names:
                refs.add((names[-2] if len(names) > 1 else None, names[-1]))
    return refs


def _sublinks(sql: str | None, kinds: tuple[str, ...]) -> list[dict] | None:
    """The text's sub-selects of the given SubLink kinds (None: unreadable text)."""
    if not sql:
        return []
    nodes = _parsed_dicts(sql)
    if nodes is None:
        return None
    return [n["SubLink"] for n in nodes if isinstance(n.get("SubLink"), dict)
            and n["SubLink"].get("subLinkType") in kinds]


def _column_ref(x: dict) -> list[str]:
    """The names of a ColumnRef node (a star as "*"); [] for any other node."""
    fields = (x.get("ColumnRef") or {}).get("fields") or ()
    return ["*" if "A_Star" in f else _name((f.get("String") or {}).get("sval", ""))
            for f in fields]


def _exists_outer_refs(sql: str | None, columns: dict | None
                       ) -> set[tuple[str | None, str]] | None:
    """The columns of an outer query that the conditions of the text's EXISTS
    sub-selects reference, as (qualifier or None, column): a qualifier the sub-select's
    own FROM does not name, or a bare name that no masked relation of that FROM has
    (``columns``: their live columns; another relation's are not known, so its bare
    names count). None: the text cannot be read."""
    links = _sublinks(sql, ("EXISTS_SUBLINK",))
    if links is None:
        return None
    refs: set[tuple[str | None, str]] = set()
    for link in links:
        sub = (link.get("subselect") or {}).get("SelectStmt")
        if not isinstance(sub, dict):
            return None                 # (a set operation: fail closed)
        local: set[str] = set()
        known: set[str] = set()
        for x in _parsed_dicts_of(sub.get("fromClause")):
            rv = x.get("RangeVar")
            if isinstance(rv, dict):
                rel = _name(rv.get("relname", ""))
                local.add(_name((rv.get("alias") or {}).get("aliasname", "")) or rel)
                local.add(rel)
                schema = _name(rv["schemaname"]) if rv.get("schemaname") else None
                for (sch, r), cols in (columns or {}).items():
                    if r == rel and schema in (None, sch):
                        known.update(cols)
            for k in ("RangeSubselect", "RangeFunction", "RangeTableFunc", "JoinExpr"):
                alias = (x.get(k) or {}).get("alias") if isinstance(x.get(k), dict) \
                    else None
                if isinstance(alias, dict) and alias.get("aliasname"):
                    local.add(_name(alias["aliasname"]))
        for part in ("whereClause", "havingClause", "targetList"):
            for x in _parsed_dicts_of(sub.get(part)):
                names = _column_ref(x)
                if not names:
                    continue
                if len(names) > 1:
                    if names[-2] not in local:
                        refs.add((names[-2], names[-1]))
                elif names[0] not in known:
                    refs.add((None, names[0]))
    return refs


def _members(node: dict) -> list[dict]:
    """A node's children that make its rows (not its InitPlans or SubPlans)."""
    return [c for c in node.get("Plans", ())
            if c.get("Parent Relationship") not in ("InitPlan", "SubPlan")]


_NUMBERED_ALIAS = re.compile(r"([\w$]+)_\d+\.")


def _same_rows(members: list[dict]) -> bool:
    """Whether a set operation's members print the same output expressions once a
    scan's numbered alias is read as its table's (customers_1.id as customers.id; a
    partitioned table's c_1.id, c_2.id): its columns are then what they print."""
    outs = []
    for mem in members:
        out = mem.get("Output")
        if not isinstance(out, list):
            return False
        outs.append([_NUMBERED_ALIAS.sub(r"\1.", e) if isinstance(e, str) else e
                     for e in out])
    return all(o == outs[0] for o in outs[1:])


def _holds_run(seq: list[str], run: tuple[str, ...]) -> bool:
    """Whether ``run`` occurs in ``seq`` as consecutive items."""
    k = len(run)
    first = run[0]
    return any(seq[i] == first and tuple(seq[i:i + k]) == run
               for i in range(len(seq) - k + 1))


def _parsed_dicts_of(tree: Any) -> list[dict]:
    out: list[dict] = []
    stack: list[Any] = [tree]
    while stack:
        n = stack.pop()
        if isinstance(n, list):
            stack.extend(n)
        elif isinstance(n, dict):
            out.append(n)
            stack.extend(n.values())
    return out


def renamings(sql: str | None) -> tuple[tuple[str | None, str, str, tuple[str, ...]], ...] | None:
    """(schema, relation, alias, column names) of every relation the text names with a
    column-alias list (FROM customers AS x(i, n, e, s)), as Postgres stores the names;
    () for no text, None when the text cannot be parsed."""
    if not sql:
        return ()
    nodes = _parsed_dicts(sql)
    if nodes is None:
        return None
    out = []
    for n in nodes:
        rv = n.get("RangeVar")
        if isinstance(rv, dict):
            cols = rv.get("alias", {}).get("colnames")
            if cols:
                out.append((None if rv.get("schemaname") is None else
                            _name(rv["schemaname"]), _name(rv.get("relname", "")),
                            _name(rv["alias"].get("aliasname", "")),
                            tuple(_name(c.get("String", {}).get("sval", "")) for c in cols)))
    return tuple(out)


def _nodes(plan: dict, out: list) -> list:
    out.append(plan)
    for child in plan.get("Plans", ()):
        _nodes(child, out)
    return out


_SRF = "a set-returning function over masked values"


_CALL_NAME = re.compile(r"(?:[\w$]+\.)?\"?([\w$]+)\"?\(")


# aggregates whose value comes from the rows of a group (EXPLAIN prints them by name)
_AGGREGATES = frozenset(
    "count sum avg min max array_agg string_agg bool_and bool_or every bit_and bit_or "
    "bit_xor json_agg jsonb_agg json_object_agg jsonb_object_agg json_objectagg "
    "json_arrayagg xmlagg stddev stddev_pop stddev_samp variance var_pop var_samp corr "
    "covar_pop covar_samp regr_avgx regr_avgy regr_count regr_intercept regr_r2 "
    "regr_slope regr_sxx regr_sxy regr_syy percentile_cont percentile_disc mode rank "
    "dense_rank percent_rank cume_dist range_agg range_intersect_agg any_value "
    "grouping".split())


def _no_column_call(toks: list, open_at: int) -> bool:
    """Whether the call whose "(" is toks[open_at] names no column in its arguments
    (count(*), random(), sum(1)); unbalanced: it may."""
    j = _closing(toks, open_at)
    if j < 0:
        return True
    for k in range(open_at + 1, j):
        t = toks[k]
        if t.kind == "param" or t.text in ("SubPlan", "InitPlan"):
            return False
        if t.kind != "name" or toks[k - 1].text in (".", "::"):
            continue
        if k + 1 < j and toks[k + 1].text == "(":
            continue                    # a nested call's name
        if t.name not in _SQL_WORDS:
            return False                # a column (qualified or bare)
    return True


def _over_follows(toks: list, open_at: int) -> bool:
    """Whether the call whose "(" is toks[open_at] is followed by OVER: a window
    function (unbalanced: it may be)."""
    j = _closing(toks, open_at)
    return j < 0 or j + 1 < len(toks) and toks[j + 1].text.upper() == "OVER"


def _child_outputs(node: dict) -> set[str]:
    """What a node's children output: a ProjectSet passes them through unchanged."""
    return {e for c in node.get("Plans", ())
            if c.get("Parent Relationship") not in ("InitPlan", "SubPlan")
            for e in _as_outputs(c)}


def _as_outputs(node: dict) -> list[str]:
    v = node.get("Output")
    return v if isinstance(v, list) else [v] if isinstance(v, str) else []


def _exprs(node: dict) -> list[str]:
    out: list[str] = []
    for f in _EXPR_FIELDS:
        v = node.get(f)
        if isinstance(v, list):
            out.extend(x for x in v if isinstance(x, str))
        elif isinstance(v, str):
            out.append(v)
    return out


# nodes whose rows come from several members: the plan prints their columns (and the
# columns of every node above them) by the first member's expressions
_SET_OPS = frozenset({"Append", "Merge Append", "SetOp", "Recursive Union"})
# nodes whose columns are their one child's, in the same places
_PASS_THROUGH = frozenset({"Sort", "Incremental Sort", "Limit", "Unique", "LockRows",
                           "Materialize", "Gather", "Gather Merge", "Memoize"})


class _Taint:
    """What in one plan carries masked values (see the module docstring)."""

    def __init__(self, root: dict, masked_rel: dict, opaque: frozenset = frozenset(),
                 sql: str | None = None, columns: dict | None = None,
                 renames: list | None = None, views: tuple[str, ...] = ()) -> None:
        self.opaque = opaque                          # names of functions/operators not
        #                                               in pg_catalog: not seen into
        self.pairs: set[tuple[str, str]] = set()     # (alias, column) of masked columns
        self.rows: set[str] = set()                   # aliases of relations with masks
        self.aliases: set[str] = set()                # every column of the alias
        self.tokens: set[str] = set()                 # $n, SubPlan n, InitPlan n
        self.reads = False
        self.written = False                          # a write fed from masked values
        self.unknown = False                          # a node not understood: unresolved
        self.entangling: set[str] = set()             # see below
        self.root = root
        self.nodes = _nodes(root, [])
        # functions a ProjectSet runs as set-returning (generate_series(1, 60) in a
        # select list): above it, each row holds another of their values, printed as
        # a bare call; an expression setting one against a masked value compares it
        # with another row source's values (see _mixed)
        self.srfs: set[str] = {
            m.group(1).lower() for n in self.nodes if n.get("Node Type") == "ProjectSet"
            for e in _exprs(n) if e not in _child_outputs(n)
            for m in [_CALL_NAME.match(e.lstrip("("))] if m is not None}
        self._toks: dict[str, list[_Tok] | None] = {}
        scans: list[tuple[tuple[str, str], set[str], frozenset]] = []
        for n in self.nodes:
            kind = n.get("Node Type")
            if kind not in _SHOWN and kind not in _HIDDEN or (
                    kind in _RELATION_SCANS and "Relation Name" not in n):
                self.unknown = True
            rel = n.get("Relation Name")
            if rel is None:
                continue
            cols = masked_rel.get((n.get("Schema", "public"), rel))
            if cols:
                alias = n.get("Alias", rel)
                self.reads = True
                names = {alias}
                mo = _CHILD_ALIAS.match(alias)
                if mo is not None:
                    # a partition or child scanned for its parent: the plan above it
                    # names the parent's alias (the child's without the _n EXPLAIN adds)
                    names.add(mo.group(1))
                for a in names:
                    self.rows.add(a)
                    self.pairs.update((a, c) for c in cols)
                scans.append(((n.get("Schema", "public"), rel), names, cols))
        # a column-alias list (FROM customers AS x(i, n, e, s)) renames the relation's
        # columns: the plan prints them under the new names
        for key, names, cols in scans:
            self._renamed(key, names, cols, columns, renames)
        # a plan over one relation prints its columns without the alias
        self.bare = {c for _, c in self.pairs}
        hidden = [n for n in self.nodes if n.get("Node Type") in _HIDDEN]
        if hidden and (self.reads or _may_call(sql, opaque)):
            # what a VALUES list computes is not printed: it may reference any relation
            # the statement reads (LATERAL) or call what is not seen into
            self.aliases.update(n.get("Alias", "") for n in hidden)
        for _ in range(len(self.nodes) + 2):          # to a fixed point
            if not self._spread():
                break
        # the aliases of derived relations (not a table's scan)
        self.derived = {n["Alias"] for n in self.nodes
                        if "Alias" in n and "Relation Name" not in n}
        # a plan with one range table entry prints its columns without the alias too
        aliases = {n["Alias"] for n in self.nodes if "Alias" in n}
        self.lone = len(aliases) == 1 and not aliases.isdisjoint(self.aliases)
        # rows whose number a masked value decides: a function scan or a set-returning
        # target list over masked values (generate_series(1, ascii(ssn))), a derived
        # relation (subquery, CTE, recursive CTE) that carries them, a LIMIT / OFFSET
        # or a window frame's bound computed from them. Whatever counts, sums or numbers such rows carries the
        # value (count(*) gave back six digits of an SSN): every computed column of the
        # statement is tainted
        self.shaped = self.reads and (any(
            n.get("Alias") in self.aliases and "Relation Name" not in n
            or n.get("Node Type") == "ProjectSet" and self._subtree(n)
            or n.get("Node Type") == "Recursive Union" and self._any_expr(n)
            or n.get("Node Type") == "Limit" and any(
                self._subtree(c) for c in n.get("Plans", ())
                if c.get("Parent Relationship") in ("InitPlan", "SubPlan"))
            for n in self.nodes) or any(n.get("Node Type") == "Limit" for n in self.nodes)
            and any(map(_runtime_limit, (sql, *views)))
            or any(n.get("Node Type") == "WindowAgg" for n in self.nodes)
            and any(map(_runtime_frame, (sql, *views))))
        # a condition, sort or grouping key that sets a masked value against a column of
        # another row source (a generator, another table, the same table under another
        # alias, a sub-plan's result): which rows meet, or which comes first, spells the
        # value out in that column (JOIN generate_series(1, 255) g ON g = ascii(...) gave
        # every character's code). Every column of such a statement is masked, stored
        # ones included. A masked value set against a constant, or against the row's own
        # columns, is the README's oracle and left alone.
        # the $n sub-plans compute (InitPlan 1 (returns $0)): values of another row
        # source; any other $n is a parameter of the statement (a constant to it)
        self.computed = {x for n in self.nodes
                         for x in re.findall(r"\$\d+", n.get("Subplan Name") or "")}
        # the sub-plans whose own result carries masked values: a condition naming one
        # ((SubPlan 1), (hashed SubPlan 1)) compares that result with the row in a way
        # EXPLAIN does not print (g >= ALL (SELECT ascii(substr(ssn, p, 1)) ...) printed
        # as "(SubPlan 1)" spelled an SSN out in g)
        self.returned = {n["Subplan Name"] for n in self.nodes
                         if str(n.get("Subplan Name", "")).startswith("SubPlan ")
                         and any(self.expr(e) for e in _exprs(n))}
        # derived relations (subquery, CTE, VALUES, function scans) that compute a masked
        # value against another row source's inside (ascii(substr(c.ssn, p.id, 1)) =
        # k.id AS hit): a condition on any of their columns above (WHERE s.hit) chooses
        # rows by that comparison, which no condition of the plan shows. A VALUES list
        # carrying masked values prints none of its expressions: counted so too
        if self.reads:
            ctes = {n["Subplan Name"][4:]: n for n in self.nodes
                    if str(n.get("Subplan Name", "")).startswith("CTE ")}
            for n in self.nodes:
                alias = n.get("Alias")
                if alias is None or "Relation Name" in n or alias not in self.aliases:
                    continue
                inner = [c for c in n.get("Plans", ())
                         if c.get("Parent Relationship") not in ("InitPlan", "SubPlan")]
                if n.get("CTE Name") in ctes:
                    inner.append(ctes[n["CTE Name"]])
                if n.get("Node Type") == "Values Scan" and len(self.rows | self.derived) > 1 \
                        and not all(map(_constant_values, (sql, *views))) \
                        or any(self._mixes_inside(c) for c in inner):
                    self.entangling.add(alias)
        self.entangled = self.reads and (any(
            self._mixed(conj)
            for n in self.nodes for text in _cond_texts(n)
            for conj in _conjuncts(self._scanned(text))) or self._sorted_union(root)
            or self._masked_sublink_test(sql, views) or self._against_set_op()
            or self._masked_exists_test(sql, views, columns))
        # the number of rows, or which stored rows come back, decided by masked values:
        # a set-returning function over them (generate_series(1, ascii(ssn)) gave 53
        # rows for a '5'), a recursive query stopping on them, a LIMIT / OFFSET computed
        # from them (OFFSET <the SSN's digits> returned the stored id after them)
        self.multiplied = ""
        if self.reads:
            texts = (sql, *views)
            for n in self.nodes:
                kind = n.get("Node Type")
                if kind in ("Function Scan", "Table Function Scan") and any(
                        self.expr(e) for e in _exprs(n) if e not in _as_outputs(n)):
                    self.multiplied = _SRF
                elif kind == "ProjectSet" and any(
                        self.expr(e) for e in _exprs(n) if e not in _child_outputs(n)):
                    self.multiplied = _SRF
                elif kind == "Sample Scan" and any(
                        self.expr(e) for e in _cond_texts(n)):
                    self.multiplied = "a TABLESAMPLE fraction or seed computed from masked values"
                elif kind == "Recursive Union" and (self._any_masked_cond(n) or any(
                        self._masked_ref(e) for c in n.get("Plans", ())
                        for e in _as_outputs(c))):
                    # (a step's own result computed from masked values: UNION's removal
                    # of duplicates stops it, least(n + 1, <the code>) made code + 1 rows)
                    self.multiplied = "a recursive query whose steps depend on masked values"
                elif kind == "Limit" and (any(map(_limit_columns, texts)) or any(
                        self._subtree(c) for c in n.get("Plans", ())
                        if c.get("Parent Relationship") in ("InitPlan", "SubPlan"))
                        and any(map(_runtime_limit, texts))):
                    # (EXPLAIN does not print what a Limit computes: a column in a LIMIT
                    # is an outer one, LATERAL, and any counts; a sub-select's sub-plan
                    # hangs off the Limit with those of the rest of its query level, so
                    # it counts when the text's LIMIT is not a constant)
                    self.multiplied = "a LIMIT or OFFSET computed from masked values"
                if self.multiplied:
                    break
            if not self.multiplied and self.entangled:
                # which rows pass a condition setting masked values against another row
                # source is the values: JOIN generate_series(1, 255) g ON g <= ascii(ssn)
                # returns as many rows as the code, whatever the cells say
                self.multiplied = ("a condition, sort or grouping key setting masked values "
                                   "against another row source's values")

    def _renamed(self, key: tuple[str, str], names: set[str], cols: frozenset,
                 columns: dict | None, renames: list | None) -> None:
        """The names a scan of masked relation ``key`` (under plan aliases ``names``) may
        print its masked columns under: the column-alias lists of the statement's text
        and of the views over masked relations (``renames``: (schema, relation, alias,
        column names) of every relation named with one; None: unknown), mapped onto the
        relation's live columns in attnum order (``columns``) as Postgres does, or, when
        that cannot be done exactly, every column of the alias (fail closed). A
        reference qualified by the alias to a name the relation does not print is taken
        for a renaming seen nowhere (a function body inlined): every column too."""
        live = (columns or {}).get(key)
        if renames is None:
            self.aliases.update(names)                  # the text could not be read
            return
        printed = set(live or ())
        for schema, rel, alias, colnames in renames:
            if alias not in names:
                continue
            if rel != key[1] or schema not in (None, key[0]) or live is None:
                # another relation by that alias (a partition scanned for its parent
                # prints the parent's names), or columns not known: all of it
                self.aliases.update(names)
                return
            got = _alias_names(live, colnames)
            if got is None:
                self.aliases.update(names)
                return
            printed.update(got)
            for real, new in zip(live, got):
                if real in cols:
                    self.pairs.update((a, new) for a in names)
        if live is None:
            return
        printed |= _SYSTEM_COLUMNS
        for n in self.nodes:
            for v in n.values():
                for text in (v if isinstance(v, list) else (v,)):
                    if not isinstance(text, str) or "." not in text:
                        continue
                    toks = self._scanned(text) or ()
                    for i in range(len(toks) - 2):
                        if toks[i].kind == "name" and toks[i].name in names \
                                and toks[i + 1].text == "." and (i == 0 or toks[i - 1].text
                                                                  != ".") \
                                and toks[i + 2].kind == "name" \
                                and toks[i + 2].name not in printed \
                                and (i + 3 == len(toks) or toks[i + 3].text != "("):
                            self.aliases.update(names)
                            return

    def _scanned(self, text: str) -> list[_Tok] | None:
        """The tokens of an expression EXPLAIN printed; None when unreadable (or its
        parentheses do not balance)."""
        if text not in self._toks:
            toks = _scan(text)
            depth = 0
            for t in toks or ():
                depth += (t.text == "(") - (t.text == ")")
                if depth < 0:
                    break
            self._toks[text] = toks if depth == 0 else None
        return self._toks[text]

    def expr(self, text: str) -> bool:
        """Whether an expression may carry a masked value (unreadable: it may)."""
        toks = self._scanned(text)
        return toks is None or self._tainted(toks)

    def _tainted(self, toks: list[_Tok]) -> bool:
        if self.tokens and not self.tokens.isdisjoint(_refs(toks)):
            return True
        n = len(toks)
        for i, t in enumerate(toks):
            prev = toks[i - 1].text if i else ""
            if t.kind == "op":
                if t.text in self.opaque:
                    return True
                continue
            if t.kind != "name" or prev == ".":       # (a field of a value: read whole)
                continue
            chain, j = [t], i + 1                      # a.b, a.*, schema.f(, ...
            while j < n and toks[j].text == ".":
                if j + 1 == n or toks[j + 1].kind not in ("name", "op"):
                    return True                        # not a name after a dot: unreadable
                chain.append(toks[j + 1])
                j += 2
            call = j < n and toks[j].text == "("
            if len(chain) == 1:
                if call and t.name in self.opaque:
                    return True
                if not call and prev != "::" and t.name in self.bare:
                    return True                        # a column printed without its alias
                continue
            a, c = chain[0].name, chain[-1]
            if call or len(chain) > 2 or c.kind == "op" and c.text != "*":
                return True            # schema.function(, OPERATOR(schema.op): not seen into
            if a in self.aliases or (c.text == "*" and a in self.rows) \
                    or (c.kind == "name" and (a, c.name) in self.pairs):
                return True
        return False

    def _mixed(self, toks: list[_Tok] | None) -> bool:
        """Whether an expression sets something tainted against a value of another row
        source (see ``entangled``); unreadable: it may."""
        if toks is None:
            return self.reads
        if not self._tainted(toks):
            return False
        t_alias: set[str] = set()
        c_alias: set[str] = set()
        derived: dict[str, set[str]] = {}
        t_tok = c_tok = bare_clean = False
        n = len(toks)
        for i, t in enumerate(toks):
            prev = toks[i - 1].text if i else ""
            if t.kind == "param" or t.text in ("SubPlan", "InitPlan"):
                ref = t.text if t.kind == "param" else \
                    f"{t.text} {toks[i + 1].text}" if i + 1 < n else t.text
                if ref in self.returned:
                    return True                         # a comparison not printed
                if ref in self.tokens:
                    t_tok = True
                elif t.kind != "param" or ref in self.computed:
                    c_tok = True
                continue
            if t.kind != "name" or prev in (".", "::"):
                continue
            if i + 1 < n and toks[i + 1].text == "(":
                # a call: a window function's value comes from other rows of its
                # partition (row_number() OVER w numbered a cross join's rows and
                # picked one bit of an SSN each), a set-returning one's from its series,
                # an aggregate's from its group's rows (HAVING substr(c.ssn, count(*) /
                # 10, 1) = (count(*) % 10)::text over a generator's groups gave every
                # digit), and a call of no column (random(), a volatile one: folded
                # constants are printed as constants) from nothing the row holds
                if t.name.lower() in self.srfs or _over_follows(toks, i + 1) or \
                        t.name.lower() in _AGGREGATES or _no_column_call(toks, i + 1):
                    c_tok = True
                continue
            if i + 2 < n and toks[i + 1].text == "." and toks[i + 2].text == "*":
                # a whole row (to_jsonb(t.*), c.*::text): that row source, all of it
                a = t.name
                if a in self.entangling:
                    return True
                if a in self.aliases or a in self.rows:
                    t_alias.add(a)
                else:
                    c_alias.add(a)
                continue
            if i + 2 < n and toks[i + 1].text == "." and toks[i + 2].kind == "name":
                a, c = t.name, toks[i + 2].name
                if i + 3 < n and toks[i + 3].text == "(":
                    continue                            # schema.function(
                if a in self.entangling:
                    return True                         # a comparison made inside it
                if a in self.aliases or (a, c) in self.pairs:
                    t_alias.add(a)
                    if a in self.derived:
                        derived.setdefault(a, set()).add(c)
                else:
                    c_alias.add(a)
            elif t.name in self.bare:
                continue                                # a masked column of the one scan
            elif t.name not in _SQL_WORDS:
                bare_clean = True
        # two columns of one derived relation (a subquery, CTE or function scan carrying
        # masked values): its rows may join several sources (SELECT o.id, ascii(c.ssn)
        # AS v FROM orders o, customers c OFFSET 0) s WHERE s.id = s.v), so they are
        # not one row's own columns
        # and any second alias: a clean column of one that also carries masked columns
        # (b.id beside left(b.email, 0)) or a masked one (whose mask may keep characters
        # in clear, right(b.card, 1)) spells out, row by row, the value it is set against
        return bool(len(c_alias | t_alias) > 1 or c_tok
                    or (t_tok and (c_alias or bare_clean))
                    or any(len(cols) > 1 for cols in derived.values()))

    def _any_masked_cond(self, node: dict) -> bool:
        # a condition or key of the subtree naming a masked column itself, or a value a
        # sub-plan computes from masked values (not a derived relation's other columns:
        # a recursive walk over ids of a table with masked columns is no such step)
        return any(self._masked_ref(text) for text in _cond_texts(node)) or any(
            self._any_masked_cond(c) for c in node.get("Plans", ()))

    def _masked_ref(self, text: str) -> bool:
        toks = self._scanned(text)
        if toks is None or self.tokens and not self.tokens.isdisjoint(_refs(toks)):
            return True
        for i, t in enumerate(toks):
            if t.kind != "name" or (i and toks[i - 1].text == "."):
                continue
            if i + 2 < len(toks) and toks[i + 1].text == "." and (
                    (t.name, toks[i + 2].name) in self.pairs or toks[i + 2].text == "*"
                    and (t.name in self.rows or t.name in self.aliases)):
                return True
            if t.name in self.bare and not (i + 1 < len(toks) and
                                            toks[i + 1].text in (".", "(")):
                return True
        return False

    def _masked_sublink_test(self, sql: str | None, views: tuple[str, ...]) -> bool:
        # a masked value tested against a sub-select's rows (ascii(ssn) IN (SELECT
        # <generator>), > ALL (...)): the plan prints "(SubPlan n)" only, so which rows
        # pass is read nowhere else; a whole row or any masked column's name counts
        whole = self.rows | self.aliases
        known = None
        for text in (sql, *views):
            refs = _sublink_tests(text)
            if refs is None:
                return True
            for qual, col in refs:
                if col == "*" or qual in self.aliases or (qual, col) in self.pairs or (
                        qual is None and (col in self.bare or col in whole)):
                    return True
                if not self.reads:
                    continue
                # a name the plan does not print: a subquery, CTE or LATERAL that renamed
                # a masked column was pulled up into the query ((SELECT id, ssn AS s FROM
                # customers) c ... substr(c.s, 1, 1) IN (SELECT ...) gave every digit)
                if known is None:
                    known = self._printed_names()
                if (qual is not None and qual not in known[0]) or \
                        (qual is None and col not in known[1]):
                    return True
        return False

    def _printed_names(self) -> tuple[set[str], set[str]]:
        """(the aliases and relation names the plan's scans print, the column names
        its expressions print)."""
        quals: set[str] = set()
        cols: set[str] = set()
        for n in self.nodes:
            for k in ("Alias", "Relation Name", "CTE Name"):
                if isinstance(n.get(k), str):
                    quals.add(n[k])
            for text in _exprs(n) + _cond_texts(n):
                toks = self._scanned(text) or ()
                for i, t in enumerate(toks):
                    if t.kind == "name" and (i + 1 == len(toks) or toks[i + 1].text != "("):
                        cols.add(t.name)
        return quals, cols

    def _masked_exists_test(self, sql: str | None, views: tuple[str, ...],
                            columns: dict | None) -> bool:
        # EXISTS (SELECT 1 WHERE substr(c.ssn, 1, 1) = '5') outside a WHERE's top level
        # (a select list, a CASE, an OR): the planner turns it into substr(c.ssn, 1, 1)
        # = ANY (hashed SubPlan n) and EXPLAIN before Postgres 17 prints "(hashed
        # SubPlan n)" only, never the test: a masked value of the outer row in the
        # sub-select's conditions counts as tested against its rows (the IN case)
        for text in (sql, *views):
            refs = _exists_outer_refs(text, columns)
            if refs is None:
                return True
            for qual, col in refs:
                if qual in self.aliases or (qual, col) in self.pairs or (
                        qual is None and col in self.bare):
                    return True
        return False

    def _set_op_columns(self) -> list[tuple[str, ...]]:
        # the columns of set operations whose members are not the same rows (a UNION
        # ALL of constants, of values of several sources), as the plan prints them
        # above the set operation: by the first member's expressions ('0'::text), which
        # read as constants there
        out = []
        for n in self.nodes:
            if n.get("Node Type") not in _SET_OPS:
                continue
            kids = _members(n)
            if len(kids) < 2 or _same_rows(kids):
                continue
            first = kids[0].get("Output")
            if not isinstance(first, list):
                continue
            for e in first:
                toks = self._scanned(e) if isinstance(e, str) else None
                if toks:
                    out.append(tuple(t.text for t in toks))
        return out

    def _against_set_op(self) -> bool:
        # a condition setting a masked value against such a column (JOIN (SELECT '0' e
        # UNION ALL SELECT '1' ...) d ON substr(c.ssn, 1, 1) = d.e, printed "substr(c.ssn,
        # 1, 1) = ('0'::text)", gave every digit of every SSN): it compares them with
        # every member's values, another row source
        cols = self._set_op_columns()
        if not cols:
            return False
        for n in self.nodes:
            for text in _cond_texts(n):
                for conj in _conjuncts(self._scanned(text)):
                    if conj is None:
                        continue
                    if not self._tainted(conj):
                        continue
                    seen = [t.text for t in conj]
                    if any(_holds_run(seen, c) for c in cols):
                        return True
        return False

    def _chooses_members(self, node: dict) -> bool:
        # a set operation whose members are not the same rows and one of which has a
        # condition on masked values (LATERAL (SELECT '0' WHERE substr(c.ssn, 1, 1) =
        # '0' UNION ALL SELECT '1' WHERE ...) returned each SSN's digits): which
        # member's values come back is the masked value, as a CASE over it would be
        kids = _members(node)
        if len(kids) < 2 or not any(self._any_masked_cond(c) for c in kids):
            return False
        # members that print the same expressions are the same rows only as the scans of
        # one table's partitions (or one table scanned again) are: each member a plain
        # scan whose masked conditions name its own row. SELECT g FROM generate_series(0,
        # 9) g WHERE g = 5 AND substr(c.ssn, 1, 1) = '5' UNION ALL ... printed g.g and
        # g_1.g alike, and gave every digit back
        return not (_same_rows(kids) and all(self._own_scan(c) for c in kids))

    def _own_scan(self, node: dict) -> bool:
        """A plain relation scan (its bitmap index scans aside) whose conditions name
        masked values of its own alias only (no other alias, no sub-plan's value)."""
        alias = node.get("Alias", node.get("Relation Name"))
        if "Relation Name" not in node or node.get("Node Type") == "ModifyTable":
            return False
        stack = list(node.get("Plans", ()))
        while stack:
            c = stack.pop()
            if c.get("Node Type") not in ("Bitmap Index Scan", "BitmapAnd", "BitmapOr"):
                return False
            stack.extend(c.get("Plans", ()))
        texts = list(_cond_texts(node))
        for c in node.get("Plans", ()):
            texts += _cond_texts(c)
        for text in texts:
            toks = self._scanned(text)
            if toks is None or self.tokens and not self.tokens.isdisjoint(_refs(toks)):
                return False
            for i in range(len(toks) - 2):
                if toks[i].kind == "name" and toks[i + 1].text == "." and \
                        toks[i].name != alias and (i == 0 or toks[i - 1].text != ".") and (
                            toks[i].name in self.rows or toks[i].name in self.aliases):
                    return False
        return True

    def _mixes_inside(self, node: dict) -> bool:
        # an output expression of the subtree setting masked values against another row
        # source's (see entangling)
        return any(self._mixed(conj) for e in _exprs(node)
                   for conj in _conjuncts(self._scanned(e))) or any(
            self._mixes_inside(c) for c in node.get("Plans", ()))

    def _sorted_union(self, node: dict, keyed: bool = False) -> bool:
        # rows of a set operation mixing masked values with another row source's
        # (UNION ALL of customers.ssn and generate_series' digits), ordered, grouped or
        # numbered above it: where each masked row lands among the known values spells
        # its value out, and EXPLAIN prints the key by the first member's expression
        # only (Sort Key: customers.ssn), one alias to _mixed
        kind = node.get("Node Type")
        keyed = keyed or kind in ("Unique", "WindowAgg", "SetOp") or any(
            k in node for k in ("Sort Key", "Group Key", "Presorted Key"))
        if keyed and kind in ("Append", "Merge Append"):
            kids = [c for c in node.get("Plans", ())
                    if c.get("Parent Relationship") not in ("InitPlan", "SubPlan")]
            if len(kids) > 1 and any(self._subtree(c) for c in kids):
                bases = set()
                for c in kids:
                    if "Relation Name" not in c:
                        bases.add(None)         # a computed member: another source
                        continue
                    # one table: scanned again (customers, customers_1) or by
                    # partitions under its alias (c_1, c_2)
                    alias = c.get("Alias", "")
                    mo = _CHILD_ALIAS.match(alias)
                    bases.add(mo.group(1) if mo is not None else alias)
                if len(bases) > 1 or None in bases:   # not one table's partitions
                    return True
        return any(self._sorted_union(c, keyed) for c in node.get("Plans", ()))

    def _any_expr(self, node: dict) -> bool:
        # any expression of the subtree, its filters and join conditions included (what
        # decides when a recursive CTE stops: how many rows it makes)
        if any(self.expr(e) for e in _exprs(node)) or any(
                self.expr(text) for text in _cond_texts(node)):
            return True
        return any(self._any_expr(c) for c in node.get("Plans", ()))

    def _subtree(self, node: dict) -> bool:
        return any(self.expr(e) for e in _exprs(node)) or any(
            self._subtree(c) for c in node.get("Plans", ()))

    def _spread(self) -> bool:
        changed = False
        for n in self.nodes:
            alias = n.get("Alias")
            kids = [c for c in n.get("Plans", ())
                    if c.get("Parent Relationship") not in ("InitPlan", "SubPlan")]
            # (a sub-plan's values enter through the $n / SubPlan n its expressions name,
            # tracked as tokens: the sub-plan itself does not make the alias carry them)
            if alias is not None and "Relation Name" not in n and alias not in self.aliases \
                    and (any(self.expr(e) for e in _exprs(n))
                         or any(self._subtree(c) or self._any_masked_cond(c) for c in kids)):
                # a subquery, function, VALUES ... scan carrying masked values, or whose
                # rows masked values choose (a LATERAL UNION ALL of SELECT 'a' WHERE
                # substr(c.ssn, 1, 1) = '0' ... spelled every SSN in letters)
                self.aliases.add(alias)
                changed = True
            if n.get("Node Type") == "ModifyTable" and not self.written and any(
                    self._subtree(c) for c in n.get("Plans", ())):
                # rows written from masked values and returned: the target's columns
                # carry them (RETURNING, ON CONFLICT ... RETURNING, data-modifying CTEs)
                self.written = True
                self.aliases.add(n.get("Alias", n.get("Relation Name", "")))
                changed = True
            sub = n.get("Subplan Name")
            if sub is None or not (self._subtree(n) or self._any_masked_cond(n)):
                continue
            if sub.startswith("CTE "):
                cte = sub[4:]                       # the CTE's name as it is (not quoted)
                for x in self.nodes:
                    a = x.get("Alias", cte)
                    if x.get("CTE Name") == cte and a not in self.aliases:
                        self.aliases.add(a)
                        changed = True
                continue
            toks = _scan(sub)
            if toks is None:
                self.unknown = True
                continue
            new = _refs(toks)                       # $n, SubPlan n, InitPlan n
            if new - self.tokens:
                self.tokens |= new
                changed = True
        return changed

    def outputs(self, node: dict, n: int) -> list[bool] | None:
        """Taint of the first n output columns of node (None: cannot tell). A set
        operation's columns are its members' (its own Output, and that of every node
        above it, prints the first member's expressions): once a member's columns carry
        masked values, so does every column of the nodes above."""
        if self.lone:
            return [True] * n
        out = node.get("Output")
        kind = node.get("Node Type")
        if isinstance(out, list) and kind not in _SET_OPS:
            if len(out) < n:
                return None
            own = [self._output(e) for e in out[:n]]
            if not self._set_op_below(node):
                return own
            kids = [c for c in node.get("Plans", ())
                    if c.get("Parent Relationship") not in ("InitPlan", "SubPlan")]
            if kind in _PASS_THROUGH and len(kids) == 1:
                # its columns are its child's, in place: the members' taint by position
                got = self.outputs(kids[0], n)
                return None if got is None else [a or b for a, b in zip(own, got)]
            return [True] * n
        members = [c for c in node.get("Plans", ())
                   if c.get("Parent Relationship") not in ("InitPlan", "SubPlan")]
        if not members:
            return None
        if kind in _SET_OPS and self._chooses_members(node):
            return [True] * n
        acc = [False] * n
        for c in members:
            got = self.outputs(c, n)
            if got is None:
                return None
            acc = [a or b for a, b in zip(acc, got)]
        return acc

    def _set_op_below(self, node: dict) -> bool:
        """A set operation under ``node`` (not in its InitPlans or SubPlans) whose
        members' columns carry masked values (a partitioned table's Append whose
        members only filter on a masked column does not count)."""
        for c in node.get("Plans", ()):
            if c.get("Parent Relationship") in ("InitPlan", "SubPlan"):
                continue
            if c.get("Node Type") in _SET_OPS:
                first = next((m for m in c.get("Plans", ()) if isinstance(
                    m.get("Output"), list)), None)
                width = len(first["Output"]) if first is not None else 0
                got = self.outputs(c, width) if width else None
                if got is None and self._subtree(c) or got is not None and any(got):
                    return True
            if self._set_op_below(c):
                return True
        return False

    def _output(self, text: str) -> bool:
        # (a count of an expression over masked values is tainted like any aggregate:
        # count(CASE WHEN g <= ascii(ssn) THEN 1 END) over generate_series(1, 255) is
        # the character's code)
        toks = self._scanned(text)
        return toks is None or self._tainted(toks)


_GROUP_KEYS = ("Group Key", "Hash Key")


def _strings(values: list, inside) -> list[str]:
    """Every string in ``values``, lists read through and a dict through the values
    ``inside(dict)`` gives."""
    out: list[str] = []
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(inside(v))
    return out


_SET_KEYS = ("Group Keys", "Hash Keys", "Group Key", "Hash Key")


def _cond_texts(node: dict) -> list[str]:
    """The texts of a node's conditions and keys: every string of every field but
    ``_META_FIELDS`` (lists and nested groups, such as Grouping Sets, read through)."""
    # every grouping key of the node, the grouping sets' too, is one key: GROUP BY g,
    # ascii(c.ssn) hashes both together (the order of the groups gave the code away),
    # and so do GROUPING SETS ((g, ascii(c.ssn)), (g)), CUBE and ROLLUP, whose keys
    # EXPLAIN prints as lists inside "Grouping Sets"
    keys = _strings([node.get(k) for k in _GROUP_KEYS] + [node.get("Grouping Sets")],
                    lambda d: (d.get(k) for k in _SET_KEYS))
    out = [", ".join(keys)] if len(keys) > 1 else []
    return out + _strings([v for k, v in node.items() if k not in _META_FIELDS],
                          lambda d: (x for k, x in d.items() if k not in _META_FIELDS))


# words EXPLAIN prints in expressions that name no column
_SQL_WORDS = frozenset(
    "and or not is null true false case when then else end any all array in like ilike "
    "similar to between distinct from collate some exists row interval at time zone with "
    "without desc asc nulls first last using escape overlaps isnull notnull unknown "
    "symmetric varying double precision character national cast".split())


def _conjuncts(toks: list[_Tok] | None) -> list:
    """The top-level AND operands of an expression's tokens (each a token list); None
    (unreadable) as one."""
    if toks is None:
        return [None]
    while len(toks) > 1 and toks[0].text == "(" and _closing(toks, 0) == len(toks) - 1:
        toks = toks[1:-1]
    out, start, depth = [], 0, 0
    for i, t in enumerate(toks):
        depth += (t.text == "(") - (t.text == ")")
        if depth == 0 and t.kind == "name" and t.name == "and":
            out.append(toks[start:i])
            start = i + 1
    out.append(toks[start:])
    return out


# where a LIMIT / OFFSET and a window frame's bounds sit in the parse tree
_LIMIT_KEYS = ("limitCount", "limitOffset")
_FRAME_KEYS = ("startOffset", "endOffset")


def _runtime_limit(sql: str | None) -> bool:
    """A LIMIT or OFFSET of the statement that is computed when it runs (a column, a
    sub-select, an expression), not a constant or a parameter; unreadable text: True."""
    return _runtime(sql, _LIMIT_KEYS)


def _runtime_frame(sql: str | None) -> bool:
    """``_runtime_limit`` for the bounds of a window frame (ROWS BETWEEN CURRENT ROW AND
    (SELECT ...) FOLLOWING): EXPLAIN prints a window function as count(*) OVER (?),
    without them."""
    return _runtime(sql, _FRAME_KEYS)


@functools.lru_cache(maxsize=256)
def _tree(sql: str) -> dict | None:
    """The parse tree of a statement text as JSON (None: unreadable), once per text for
    the readers below."""
    from pglast import parser
    try:
        return orjson.loads(parser.parse_sql_json(sql))
    except Exception:       # noqa: BLE001 - unreadable: the callers fail closed
        return None


@functools.lru_cache(maxsize=256)
def _limit_columns(sql: str | None) -> bool:
    """A LIMIT or OFFSET naming a column outside a sub-select (an outer or LATERAL
    column: LIMIT ascii(c.ssn)); unreadable text: True."""
    tree = None if sql is None else _tree(sql)
    if tree is None:
        return True
    todo: list[Any] = [tree]
    limits: list[Any] = []
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            limits.extend(v[k] for k in _LIMIT_KEYS if v.get(k) is not None)
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
    while limits:
        v = limits.pop()
        if isinstance(v, dict):
            if "ColumnRef" in v:
                return True
            limits.extend(x for k, x in v.items() if k != "SubLink")
        elif isinstance(v, list):
            limits.extend(v)
    return False


@functools.lru_cache(maxsize=512)
def _runtime(sql: str | None, keys: tuple[str, ...]) -> bool:
    tree = None if sql is None else _tree(sql)
    if tree is None:
        return True
    todo: list[Any] = [tree]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            for key in keys:
                lim = v.get(key)
                if lim is not None and not _fixed(lim):
                    return True
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
    return False


def _fixed(node: Any) -> bool:
    # a constant, a parameter, or a cast of one (LIMIT 10, LIMIT $1, LIMIT '5'::int)
    if not isinstance(node, dict):
        return False
    if "A_Const" in node or "ParamRef" in node:
        return True
    cast = node.get("TypeCast")
    return isinstance(cast, dict) and _fixed(cast.get("arg"))


def columns_tainted(plan_json: list, fields: list[tuple[int, int, int, int]],
                    base_tables: set[int], masked_rel: dict,
                    masked_cols: set[tuple[int, int]],
                    opaque: frozenset = frozenset(), sql: str | None = None,
                    columns: dict | None = None, views: tuple[str, ...] = ()) -> Lineage:
    """The lineage of a statement from its EXPLAIN (VERBOSE, FORMAT JSON) output, its
    RowDescription fields (table OID, attnum, type, format) and which of those table OIDs
    are base tables; ``sql``: its text (without it, a VALUES list is taken to call
    whatever is in ``opaque``, and no column-alias list of its own is known);
    ``columns``: {(schema, relation): its live column names in attnum order} of the
    masked relations; ``views``: the definitions of the views over them (their
    column-alias lists rename the columns the plan prints). A relation renamed by a
    column-alias list that cannot be mapped exactly has every column masked."""
    root = plan_json[0]["Plan"]
    renames = renamings(sql)
    for v in views:
        more = renamings(v)
        renames = None if renames is None or more is None else renames + more
    taint = _Taint(root, masked_rel, opaque, sql, columns,
                   None if renames is None else list(renames), views)
    if taint.unknown:
        return UNRESOLVED
    n = len(fields)
    outs = taint.outputs(root, n) if n else []
    masked = []
    for i, (table, attnum, _typ, _fmt) in enumerate(fields):
        if taint.written or taint.entangled:
            # rows written from masked values, or chosen / ordered by masked values set
            # against another row source's: all they return
            masked.append(True)
        elif table and attnum > 0 and table in base_tables:
            masked.append((table, attnum) in masked_cols)    # a stored value, as it is
        else:
            masked.append(True if outs is None or taint.shaped else outs[i])
    return Lineage(tuple(masked), taint.reads, taint.multiplied)


# -- asking the upstream -----------------------------------------------------------------

_CACHE: dict[tuple, Lineage] = {}
# a plan printed longer than this is not read: its statement is unresolved (masked). A
# folded constant makes a plan as long as the value (SELECT repeat('x', 100000000))
PLAN_MAX = 1 << 20
# ... and one printed longer than this is read on a thread: reading it takes a while (a
# 2 MB plan of a 35,000-arm CASE took 3.4 s), and on the event loop every session of the
# worker would wait (the thread gives the loop its turns)
PLAN_INLINE = 64 << 10
_CACHE_MAX = 8192
_STMT = b"pgguard_lineage"


def cached(key: tuple) -> Lineage | None:
    return _CACHE.get(key)


def remember(key: tuple, lin: Lineage) -> None:
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = lin


class _Link:
    """A persistent side connection of a (side link, database), used one call at a time
    (LINKS_PER_DATABASE of them, so one session's slow plans do not hold every other
    session's)."""

    def __init__(self) -> None:
        self.proto = None
        self.lock = asyncio.Lock()
        self.no_role: set[str] = set()
        # a round trip was written and not read to its end (its caller was cancelled,
        # or failed): the connection holds another statement's answers, never reused
        self.unread = False


_LINKS: dict[tuple[int, str], list[_Link]] = {}
LINKS_PER_DATABASE = 3
# the largest message read on a lineage link: a plan beyond PLAN_MAX is not read anyway
# (a constant of 100 MB in a select list made the plan that big: read whole, it took
# the worker's memory and time; refused by its declared length, it is never buffered)
LINK_MESSAGE_MAX = PLAN_MAX + (256 << 10)


def _pick(key: tuple[int, str]) -> _Link:
    links = _LINKS.get(key)
    if links is None:
        links = _LINKS[key] = [_Link()]
    for link in links:
        if not link.lock.locked():
            return link
    if len(links) < LINKS_PER_DATABASE:
        links.append(_Link())
        return links[-1]
    return min(links, key=lambda k: len(getattr(k.lock, "_waiters", None) or ()))


def _frame(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def _query(sql: str) -> bytes:
    return _frame(b"Q", sql.encode() + b"\0")


async def _until_ready(proto, count: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    while count:
        t, payload = await proto.read_message()
        got.append((t, payload))
        if t == m.READY_FOR_QUERY:
            count -= 1
    return got


def _row_fields(payload: bytes) -> list[tuple[int, int, int, int]]:
    return parse_row_description(b"T" + struct.pack("!I", len(payload) + 4) + payload)


async def analyse(side: SideLink, database: str, sql: bytes, param_oids: tuple[int, ...],
                  masked_rel: dict, masked_cols: set[tuple[int, int]],
                  role: str | None = None, on_drift=None) -> Lineage:
    """The lineage of one statement (see the module docstring); UNRESOLVED on failure."""
    link = _pick((id(side), database))
    async with link.lock:
        try:
            return await asyncio.wait_for(
                _analyse(side, database, link, sql, param_oids, masked_rel, masked_cols,
                         role, on_drift), 10.0)
        except Exception as e:      # noqa: BLE001 - fail closed: everything derived masked
            log.debug("lineage: %r", e)
            _drop(link)
            return UNRESOLVED
        except BaseException:
            # cancelled (the session that asked went away) in the middle of a round
            # trip: its answers are still on the way, and the next statement analysed
            # would read them as its own (another statement's lineage: masked columns in
            # clear, clean ones masked, for every session of the worker)
            _drop(link)
            raise


def _drop(link: _Link) -> None:
    if link.proto is not None:
        try:
            link.proto.transport.close()
        except Exception as e:       # noqa: BLE001 - closing a broken link
            log.debug("lineage: closing the side connection: %s", e)
    link.proto = None


def _param_count(sql: bytes) -> int:
    """The highest $n of the text outside literals, names and comments (wrong, or the
    text unreadable, only makes the EXPLAIN fail: unresolved, masked)."""
    toks = _scan(sql.decode("utf-8", "replace"), sql=True) or ()
    return max((int(t.text[1:]) for t in toks if t.kind == "param"), default=0)


async def _analyse(side, database, link, sql, param_oids, masked_rel, masked_cols,
                   role, on_drift=None) -> Lineage:
    """One round trip: prepare (under the role, read only), describe, EXPLAIN the generic
    plan, list the views and the functions/operators outside pg_catalog, roll back."""
    if link.unread:
        _drop(link)
    if link.proto is None or link.proto.transport.is_closing():
        link.proto = await side.connect(database, "pgguard:lineage")
        link.unread = False
        if link.proto.reader.buffered == 0:
            link.proto.reader = FrameReader(True, LINK_MESSAGE_MAX)
    proto = link.proto
    # names resolve as in the masked session, which pgguard starts with search_path =
    # public (not the upstream's "$user", public: a schema named like the upstream role
    # would make the plan read another table than the session does)
    setup = "BEGIN READ ONLY; SET LOCAL statement_timeout = '5s'; SET LOCAL search_path = public"
    if role and role not in link.no_role:
        setup += f"; SET LOCAL ROLE {ident(role)}"
    # (a long text's scan, like its plan's reading, on a thread: see PLAN_INLINE)
    count = await asyncio.to_thread(_param_count, sql) if len(sql) > PLAN_INLINE else \
        _param_count(sql)
    nparams = max(count, len(param_oids))
    body = _STMT + b"\0" + sql + b"\0" + struct.pack(f"!h{len(param_oids)}I",
                                                     len(param_oids), *param_oids)
    explain = ("SET LOCAL plan_cache_mode = force_generic_plan; "
               f"EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE {_STMT.decode()}"
               + (f"({', '.join(['NULL'] * nparams)})" if nparams else "")
               + "; SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relkind IN ('v', 'm'); "
               + _OPAQUE_SQL + "; " + _columns_sql(masked_rel, masked_cols))
    proto.transport.write(_query(setup) + _frame(b"P", body)
                          + _frame(b"D", b"S" + _STMT + b"\0") + _frame(b"S", b"")
                          + _query(explain) + _frame(b"C", b"S" + _STMT + b"\0")
                          + _frame(b"S", b"") + _query("ROLLBACK"))
    link.unread = True
    got = await _until_ready(proto, 5)
    link.unread = False
    zs = [i for i, (t, _) in enumerate(got) if t == m.READY_FOR_QUERY]
    if role and any(t == m.ERROR_RESPONSE for t, _ in got[:zs[0]]):
        # the role cannot be assumed from here: plan without it (still read only)
        link.no_role.add(role)
        return await _analyse(side, database, link, sql, param_oids, masked_rel,
                              masked_cols, None, on_drift)
    if any(t == m.ERROR_RESPONSE for t, _ in got[:zs[2]]):
        log.debug("lineage: %r", next(p for t, p in got if t == m.ERROR_RESPONSE)[:200])
        return UNRESOLVED
    fields = None
    for t, payload in got[zs[0] + 1:zs[1]]:
        if t == m.ROW_DESCRIPTION:
            fields = _row_fields(payload)
        elif t == m.NO_DATA:
            fields = []
    sets: list[list[bytes]] = []
    for t, payload in got[zs[1] + 1:zs[2]]:
        if t == m.ROW_DESCRIPTION:
            sets.append([])
        elif t == m.DATA_ROW and sets:
            (ln,) = struct.unpack_from("!i", payload, 2)
            sets[-1].append(payload[6:6 + ln] if ln >= 0 else b"")
    if fields is None or len(sets) != 6 or not sets[0] or len(sets[0][0]) > PLAN_MAX:
        return UNRESOLVED
    # the masked columns by the names they have now: a DBA's RENAME (of a column or its
    # table, or SET SCHEMA) directly upstream is in the plan before the mask catalog is
    # read again (red team 23: replace(social, '-', '') came back in clear after ssn was
    # renamed social); the names the session knew stay masked too
    now: dict = {}
    for r in sets[5]:
        schema, rel, att = orjson.loads(r)
        now.setdefault((schema, rel), set()).add(att)
    drift = [k for k, atts in now.items() if not atts <= masked_rel.get(k, frozenset())]
    if drift:
        masked_rel = dict(masked_rel)
        for k in drift:
            masked_rel[k] = masked_rel.get(k, frozenset()) | now[k]
        if on_drift is not None:
            on_drift()
    if not fields:
        return Lineage((), False)
    plan = orjson.loads(sets[0][0])
    views = {int(r) for r in sets[1]}
    base = {t for t, _, _, _ in fields if t} - views
    opaque = frozenset(r.decode("utf-8", "replace") for r in sets[2])
    columns = {}
    for r in sets[3]:
        schema, rel, names = orjson.loads(r)
        columns[(schema, rel)] = tuple(names)
    views = tuple(r.decode("utf-8", "replace") for r in sets[4])
    args = (plan, fields, base, masked_rel, masked_cols, opaque,
            sql.decode("utf-8", "replace"), columns, views)
    if len(sets[0][0]) > PLAN_INLINE:
        return await asyncio.to_thread(columns_tainted, *args)
    return columns_tainted(*args)


def _columns_sql(masked_rel: dict, masked_cols=()) -> str:
    """Three statements: the live columns (attnum order) of the masked relations, one
    JSON [schema, relation, [names]] a row; the definitions of the views that read them
    (their column-alias lists rename what the plan prints); the masked columns (table
    OID, attnum) by their names now, [schema, relation, column] a row."""
    keys = ", ".join(f"({literal(s)}, {literal(r)})" for s, r in sorted(masked_rel))
    pairs = ", ".join(f"({int(o)}::oid, {int(a)}::int2)" for o, a in sorted(masked_cols))
    oids = ", ".join(sorted({str(int(o)) for o, _ in masked_cols}))
    rels = ("SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
            "ON n.oid = c.relnamespace WHERE "
            + (f"(n.nspname::text, c.relname::text) IN (VALUES {keys})" if keys else "false")
            + (f" OR c.oid IN ({oids})" if oids else ""))
    return ("SELECT pg_catalog.json_build_array(n.nspname, c.relname, "
            "pg_catalog.array_agg(a.attname ORDER BY a.attnum))::text "
            "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE a.attnum > 0 AND NOT a.attisdropped AND c.oid IN ({rels}) "
            "GROUP BY n.nspname, c.relname; "
            "SELECT DISTINCT pg_catalog.pg_get_viewdef(r.ev_class) FROM pg_catalog.pg_rewrite r "
            "JOIN pg_catalog.pg_depend d ON d.objid = r.oid "
            "AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
            "AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
            f"WHERE d.refobjid IN ({rels}) AND r.ev_class <> d.refobjid; "
            "SELECT pg_catalog.json_build_array(n.nspname, c.relname, a.attname)::text "
            "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE "
            + (f"(a.attrelid, a.attnum) IN (VALUES {pairs}) AND NOT a.attisdropped"
               if pairs else "false"))


@functools.lru_cache(maxsize=1024)
def positional(sql: bytes) -> bool:
    """Whether the statement names output columns by number (ORDER BY 3, GROUP BY 2,
    GROUPING SETS ((g), (p, 6)), DISTINCT ON (1)), at any level; unreadable: True. Such
    a number is no value: the statement with its literals as parameters (normalized)
    groups or sorts by a constant instead, and texts of one literal-insensitive shape
    (sqlshape) sort by different columns, so neither stands for the text."""
    try:
        tree = _tree(sql.decode("utf-8"))
    except UnicodeDecodeError:
        tree = None
    if tree is None:
        return True                 # unreadable: the caller analyses the text
    for v in _parsed_dicts_of(tree):
        if any(map(_int_const, _group_items(v.get("groupClause")))) or any(
                map(_int_const, v.get("distinctClause") or ())):
            return True
        sort = v.get("SortBy")
        if isinstance(sort, dict) and _int_const(sort.get("node")):
            return True
    return False


def _group_items(items: list | None) -> list:
    """The expressions of a GROUP BY list, through grouping sets (GROUPING SETS, CUBE,
    ROLLUP) and their parenthesized lists ((p, 6) is a row of two items)."""
    out: list = []
    todo = list(items or ())
    while todo:
        x = todo.pop()
        inner = x.get("GroupingSet") or x.get("RowExpr") if isinstance(x, dict) else None
        if isinstance(inner, dict):
            todo.extend(inner.get("content") or inner.get("args") or ())
        else:
            out.append(x)
    return out


def _int_const(node: Any) -> bool:
    return isinstance(node, dict) and isinstance(node.get("A_Const"), dict) \
        and "ival" in node["A_Const"]


def normalized(sql: bytes) -> bytes | None:
    """The statement with its literals as parameters ($n after its own), or None."""
    from pglast import parser
    try:
        return parser.normalize(sql.decode("utf-8")).encode()
    except Exception:       # noqa: BLE001 - not parseable here: analyse the text itself
        return None


def forget() -> None:
    _CACHE.clear()


# -- cursors and SQL prepared statements ---------------------------------------------------------------------------

def _one_statement(sql: str) -> dict | None:
    from pglast import parser
    try:
        stmts = orjson.loads(parser.parse_sql_json(sql)).get("stmts", [])
    except Exception:       # noqa: BLE001 - unreadable: the caller fails closed
        return None
    return stmts[0]["stmt"] if len(stmts) == 1 else None


_NAMED = {"DeclareCursorStmt": ("declare", "portalname"),
          "FetchStmt": ("fetch", "portalname"),
          "ClosePortalStmt": ("close", "portalname"),
          "PrepareStmt": ("prepare", "name"),
          "ExecuteStmt": ("execute", "name"),
          "DeallocateStmt": ("deallocate", "name")}


def named_statement(sql: str) -> tuple[str, str | None] | None:
    """(kind, name) of a statement about a SQL cursor or prepared statement: "declare",
    "fetch" (and MOVE), "close", "prepare", "execute", "deallocate"; name None for
    CLOSE ALL / DEALLOCATE ALL. None for anything else or unreadable SQL."""
    st = _one_statement(sql)
    if st is None:
        return None
    for tag, (kind, field) in _NAMED.items():
        if tag in st:
            return kind, st[tag].get(field)
    return None


def statement_query(sql: bytes, d) -> bytes | None:
    """The query whose result columns matter: the statement itself, or the query of a
    DECLARE; None when the planner is not asked (utility statements, several
    statements in one Query)."""
    kind = d.statements[0].kind if d is not None and len(d.statements) == 1 else None
    if d is None:
        mo = _FIRST_WORD.match(sql)
        kind = mo.group(1).lower().decode() if mo is not None else None
    if kind in ("declare", "prepare"):
        from pglast import parse_sql
        from pglast.stream import RawStream
        try:
            return RawStream()(parse_sql(sql.decode("utf-8"))[0].stmt.query).encode()
        except Exception:       # noqa: BLE001 - unreadable: no lineage, masked as unresolved
            return None
    return sql if needs_lineage(d, sql) else None
