# No parking: which masked columns a statement reads (pglast parse tree against the mask
# catalog), refusing statements that would move them anywhere but straight to the client.
"""Column-level read analysis for masked identities.

A masked column may leave the database only in a result row, where the wire masks it.
A statement that reads one and puts what it read somewhere else (a table, a view, a
setting, a large object, a cursor kept past the transaction, a function body, a server
file) would let a later plain read return it in clear, so it is refused::

    INSERT INTO t SELECT ssn FROM customers           -- refused: parks ssn in t
    CREATE TEMP TABLE t AS SELECT * FROM customers    -- refused: * reads ssn
    SELECT set_config('x.y', ssn, false) FROM customers
    INSERT INTO t SELECT id, name FROM customers      -- passes: no masked column read

Reading is judged by syntax, over the whole tree (subqueries, CTEs, PREPARE, EXPLAIN):
a ColumnRef naming a masked column (qualified by a masked table's name or alias, or
unqualified), ``*`` / ``alias.*`` over a masked table, a whole-row reference to one
(``SELECT c FROM customers c``, ``row_to_json(c)``), ``JOIN ... USING (ssn)`` and
NATURAL JOIN. Any reference counts, wherever it is (a WHERE that selects rows by a
masked value copies it a bit at a time). A column-alias list renames the columns
(``FROM customers AS x(i, n, e, s)``: ``x.s`` and a bare ``s`` are ssn): it is mapped
onto the table's live columns in attnum order (the catalog's), and without that order
every masked column counts as read through any name of the list; a join alias
(``(customers JOIN orders ON ...) AS j``) qualifies the masked columns of the tables
inside it, and its own column list counts every one of them. Names are compared conservatively: scopes are
not separated, an unqualified column named like a masked one counts as masked, and a
table named without a schema counts as the masked table of that name in any schema.
Bodies that cannot be read column by column (DO blocks, function bodies) and dynamic
SQL (the ``opaque`` flag) are refused when they read a masked table at all, or could.

Code is an allow-list: a statement that reads masked columns may call only built-in
functions of pg_catalog (``Server.user_function_test``: a name outside pg_catalog, or
not among the built-in names read from the catalog, or any name when they were not
read, counts as code pgguard cannot see into) and no operator qualified outside
pg_catalog; anything else may store or send what it is given, so it is refused::

    SELECT rt_park(ssn) FROM customers                -- refused: a user function
    SELECT rt_park2(c) FROM customers c               -- refused: a whole row to one
    SELECT rt_park(name) FROM customers               -- passes: no masked column read

DDL that makes ordinary syntax run a function on whatever it is applied to (CREATE
CAST ... WITH FUNCTION, CREATE OPERATOR, a base type's I/O functions, a domain CHECK
calling a non-built-in or a sink, transforms, conversions) is refused to a masked
identity: ``ssn::int4`` or ``'c' ~~~ ssn`` would call it with no call in sight.

DDL that changes which relations return a masked table's rows, or the names its masks
are found by, is refused to a masked identity: ``ALTER TABLE customers INHERIT t`` or
``ALTER TABLE t ATTACH PARTITION customers`` (a scan of ``t`` returns customers' rows),
NO INHERIT / DETACH PARTITION, and renaming or moving a masked table, a masked column or
a schema holding one (a mask is found by the configuration's names).

Planner statistics keep sample values of every analysed column (``pg_stats``:
``most_common_vals``, ``histogram_bounds``, ``most_common_elems``; the extended and
raw forms alike). A result row of pg_stats does not say on the wire which table it
describes, so reading those value columns is refused to masked identities outright;
the other statistics (``null_frac``, ``n_distinct``, ``correlation``...) stay readable.
"""
from __future__ import annotations

import fnmatch

import orjson
from pglast import parser as _pg

from ..policy.rules import Decision
from .wire import applies

# functions that keep their argument in the session or the database
# (pg_notify: the payload reaches every listening session, the agent's others included)
# (setval, lo_create, advisory locks, restore points, replication slots and origins: the
# value becomes a sequence's value, an OID, a lock key in pg_locks, a name)
SINK_FUNCS = frozenset({"set_config", "lo_from_bytea", "lo_put", "lowrite", "lo_import",
                        "lo_export", "dblink_exec", "dblink", "pg_logical_emit_message",
                        "pg_notify", "setval", "lo_create",
                        "pg_advisory_lock", "pg_advisory_lock_shared",
                        "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared",
                        "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
                        "pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared",
                        "pg_create_restore_point", "pg_create_physical_replication_slot",
                        "pg_create_logical_replication_slot",
                        "pg_copy_physical_replication_slot",
                        "pg_copy_logical_replication_slot", "pg_replication_origin_create",
                        "pg_replication_origin_session_setup",
                        "pg_replication_origin_xact_setup"})
# volatile built-ins that keep nothing of their arguments: every other volatile function
# of pg_catalog (``provolatile = 'v'``, read from the server's catalog) counts as a sink
# too (setseed: the value becomes the session's random state, which random() gives back
# and which can be run backwards). Stable and immutable built-ins change no state.
KEEPS_NOTHING = frozenset((
    "random random_normal clock_timestamp timeofday gen_random_uuid uuidv4 uuidv7 "
    "pg_sleep pg_sleep_for pg_sleep_until currval lastval pg_sequence_last_value "
    "txid_status pg_xact_status pg_xact_commit_timestamp pg_last_committed_xact "
    "pg_blocking_pids pg_safe_snapshot_blocking_pids pg_lock_status "
    "pg_notification_queue_usage pg_is_in_recovery pg_jit_available "
    "pg_relation_size pg_table_size pg_indexes_size pg_total_relation_size "
    "pg_database_size pg_tablespace_size pg_partition_tree pg_partition_ancestors "
    "pg_current_wal_lsn pg_current_wal_insert_lsn pg_current_wal_flush_lsn "
    "pg_last_wal_receive_lsn pg_last_wal_replay_lsn pg_last_xact_replay_timestamp "
    "pg_is_wal_replay_paused pg_get_wal_replay_pause_state pg_stat_have_stats "
    "pg_collation_actual_version pg_database_collation_actual_version "
    "pg_get_multixact_members pg_prepared_xact current_query").split())


def sink_functions(volatile) -> frozenset:
    """The built-in functions that keep what they are given where masking cannot follow:
    SINK_FUNCS, plus each of ``volatile`` (pg_catalog's volatile names; None: not read)
    that is not known to keep nothing."""
    if not volatile:
        return SINK_FUNCS
    return SINK_FUNCS | (volatile - KEEPS_NOTHING)


# functions that read an open cursor's rows inside the server: the rows never pass the
# wire as the cursor's own result, so its masking plan never applies to them
CURSOR_READERS = frozenset({"cursor_to_xml", "cursor_to_xmlschema"})
# DECLARE ... WITH HOLD (CURSOR_OPT_HOLD): the result is materialized and kept
_CURSOR_OPT_HOLD = 0x0020
# statements whose target relation is a plain field, not a RangeVar node
# statements whose own target's columns are in scope of their expressions (ALTER TABLE:
# a generated column or a CHECK reads the table's columns, and a STORED generated column
# keeps a copy of the value in clear under a name no mask covers)
_TARGETED = frozenset({"UpdateStmt", "DeleteStmt", "MergeStmt", "InsertStmt",
                       "AlterTableStmt",
                       # an expression index keeps its values (and its statistics show
                       # them); a partial index's predicate reads the columns too
                       "IndexStmt"})
# value-carrying columns of the statistics relations (pg_catalog)
STATS_VALUES = {
    "pg_stats": frozenset({"most_common_vals", "histogram_bounds", "most_common_elems"}),
    "pg_stats_ext": frozenset({"most_common_vals", "most_common_val_nulls"}),
    "pg_stats_ext_exprs": frozenset({"most_common_vals", "histogram_bounds",
                                     "most_common_elems", "expr"}),
    "pg_statistic": frozenset({f"stavalues{i}" for i in range(1, 6)}),
    "pg_statistic_ext_data": frozenset({"stxdmcv", "stxdexpr"}),
}
# columns that carry other sessions' statement texts, literals and all (a DBA's
# WHERE ssn = '...'): pg_stat_statements lives in its extension's schema, any schema
ACTIVITY_VALUES = {
    "pg_stat_activity": frozenset({"query"}),
    "pg_stat_statements": frozenset({"query"}),
}
_ANY_SCHEMA = frozenset({"pg_stat_statements"})
# functions that return other sessions' statement texts
ACTIVITY_FUNCS = frozenset({"pg_stat_get_activity", "pg_stat_get_backend_activity",
                            "pg_stat_statements"})


def masked_names(catalog, identity_name: str, identity) -> dict[str, frozenset[str]]:
    """{schema.table: masked column names} of the masks that apply to this identity
    (cached on the catalog object, which is replaced when it is read again)."""
    memo = catalog.__dict__.setdefault("_parking", {})
    hit = memo.get(identity_name)
    if hit is None:
        cols: dict[str, set[str]] = {}
        for (oid, attnum), mk in catalog.columns.items():
            if not applies(mk, identity_name, identity):
                continue
            table, attrs = catalog.tables.get(oid, (None, ()))
            name = next((n for a, n in attrs if a == attnum), None)
            if table is not None and name is not None:
                cols.setdefault(table, set()).add(name)
        hit = memo[identity_name] = {t: frozenset(c) for t, c in cols.items()}
    return hit


# SQL-syntax calls without parentheses the parser (a newer grammar) makes of words that
# name columns on a Postgres 15 server
_WORDS_BEFORE_16 = frozenset({"pg_catalog.system_user"})


class _Reads:
    """What one parse tree reads: range variables, column references, USING lists."""

    def __init__(self) -> None:
        self.ranges: list[tuple[str | None, str, str | None]] = []   # schema, rel, alias
        self.refs: list[list[str]] = []        # ColumnRef fields, "*" for A_Star
        self.using: list[str] = []
        self.natural = False
        self.funcs: set[str] = set()
        self.calls: set[str] = set()           # functions as written (schema.name)
        self.operators: set[str] = set()       # OPERATOR(schema.op) outside pg_catalog
        self.hooks: list[tuple[str, object]] = []   # DDL that hooks code into syntax
        self.hold = False
        self.rule_on: list[tuple[str | None, str]] = []   # CREATE RULE/TRIGGER relation
        # relations named with a column-alias list (FROM customers AS x(i, n, e, s)):
        # schema, relation, alias, the new names (positional over the live columns)
        self.renamed: list[tuple[str | None, str, str, tuple[str, ...]]] = []
        # joins with an alias ((a JOIN b ON ...) AS j, or j(c1, c2...)): alias, its
        # column-alias list (None: none), the relations (and renamings) inside
        self.joins: list[tuple[str, tuple[str, ...] | None, _Reads]] = []
        self.executes: list[str] = []          # prepared statements run by EXECUTE
        self.exec_computed = False             # ... with an argument computed when run

    @staticmethod
    def only_rules(reads: _Reads) -> _Reads:
        r = _Reads()
        r.rule_on = reads.rule_on
        return r

    def walk(self, node) -> None:
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, list):
                stack.extend(n)
                continue
            if not isinstance(n, dict):
                continue
            for k, v in n.items():
                if k == "RangeVar":
                    alias = v.get("alias", {}).get("aliasname")
                    self.ranges.append((v.get("schemaname"), v["relname"], alias))
                    cols = _colnames(v.get("alias"))
                    if cols is not None:
                        self.renamed.append((v.get("schemaname"), v["relname"], alias, cols))
                elif k == "ColumnRef":
                    self.refs.append([f["String"]["sval"] if "String" in f else "*"
                                      for f in v.get("fields", [])])
                elif k == "JoinExpr":
                    self.natural |= bool(v.get("isNatural"))
                    self.using.extend(u["String"]["sval"] for u in v.get("usingClause", [])
                                      if "String" in u)
                    if v.get("alias", {}).get("aliasname"):
                        inner = _Reads()
                        inner.walk([v.get("larg"), v.get("rarg")])
                        self.joins.append((v["alias"]["aliasname"],
                                           _colnames(v.get("alias")), inner))
                elif k == "FuncCall":
                    names = v.get("funcname", [])
                    if names and "String" in names[-1]:
                        self.funcs.add(names[-1]["String"]["sval"].lower())
                    self.calls.add(_dotted(names))
                    if v.get("funcformat") == "COERCE_SQL_SYNTAX" and not v.get("args") \
                            and _dotted(names) in _WORDS_BEFORE_16:
                        # the parser reads a newer grammar than a Postgres 15 server's,
                        # for which the bare word is a column (FROM customers AS
                        # x(id, name, email, "system_user") renames ssn)
                        self.refs.append([names[-1]["String"]["sval"]])
                elif k in ("A_Expr", "SubLink") and v.get("name" if k == "A_Expr"
                                                          else "operName"):
                    op = v.get("name" if k == "A_Expr" else "operName")
                    if len(op) > 1 and op[0].get("String", {}).get("sval") != "pg_catalog":
                        self.operators.add(_dotted(op))
                elif k in _HOOK_DDL:
                    self.hooks.append((k, v))
                elif k == "ExecuteStmt":
                    self.executes.append(v.get("name", ""))
                    self.exec_computed |= any(not _fixed_arg(a) for a in v.get("params") or ())
                elif k == "DeclareCursorStmt":
                    self.hold |= bool(v.get("options", 0) & _CURSOR_OPT_HOLD)
                elif k in _TARGETED and "relation" in v:     # the target's columns too
                    rel = v["relation"]
                    alias = rel.get("alias", {}).get("aliasname")
                    self.ranges.append((rel.get("schemaname"), rel.get("relname", ""), alias))
                if k in ("RuleStmt", "CreateTrigStmt"):
                    rel = v.get("relation", {})
                    self.rule_on.append((rel.get("schemaname"), rel.get("relname", "")))
                stack.append(v)


def _colnames(alias) -> tuple[str, ...] | None:
    """The column-alias list of an Alias node (None: none)."""
    cols = (alias or {}).get("colnames")
    if not cols:
        return None
    return tuple(c.get("String", {}).get("sval", "") for c in cols)


def _dotted(names) -> str:
    """A qualified name as written (case kept: "Upper" is not pg_catalog.upper)."""
    return ".".join(n["String"]["sval"] if "String" in n else "*" for n in names)


# DDL that makes ordinary syntax run a function: a cast (``ssn::int4`` then calls it), an
# operator (``'chan' ~~~ ssn``), a domain's CHECK (``ssn::dom`` evaluates it), a base
# type's I/O functions, a transform, an encoding conversion (``convert``)
_HOOK_DDL = frozenset({"CreateCastStmt", "DefineStmt", "CreateDomainStmt",
                       "AlterDomainStmt", "CreateTransformStmt", "CreateConversionStmt"})


def _hook(kind: str, v: dict, user_fn) -> str | None:
    """What a statement of ``_HOOK_DDL`` would make ordinary syntax run, when that may be
    code other than pg_catalog's side-effect free functions (None: nothing such)."""
    if kind == "CreateCastStmt":
        if v.get("func"):
            return f"CREATE CAST ... WITH FUNCTION {_dotted(v['func'].get('objname', []))}"
        return None
    if kind == "DefineStmt":
        what = v.get("kind", "")
        if what == "OBJECT_OPERATOR":
            return f"CREATE OPERATOR {_dotted(v.get('defnames', []))}"
        if what == "OBJECT_TYPE" and v.get("definition"):
            return f"CREATE TYPE {_dotted(v.get('defnames', []))} with I/O functions"
        return None
    if kind in ("CreateTransformStmt", "CreateConversionStmt"):
        return "CREATE TRANSFORM" if kind == "CreateTransformStmt" else "CREATE CONVERSION"
    # CREATE DOMAIN / ALTER DOMAIN: its CHECK runs at every cast to the domain
    inner = _Reads()
    inner.walk(v.get("constraints") if kind == "CreateDomainStmt" else v.get("def"))
    calls = sorted(f for f in inner.calls if user_fn(f)
                   or f.rsplit(".", 1)[-1].lower() in SINK_FUNCS) + sorted(inner.operators)
    if calls:
        return f"a domain CHECK that calls {', '.join(calls)}"
    return None


def _every_function(name: str) -> bool:
    return True


def _tables_named(schema, rel, masked, by_rel) -> list[str]:
    tables = [f"{schema}.{rel}"] if schema else by_rel.get(rel, [])
    return [t for t in tables if t in masked]


def _masked_scope(reads: _Reads, masked: dict[str, frozenset[str]]):
    """{name or alias a masked table goes by here: (table, its masked columns)}."""
    by_rel: dict[str, list[str]] = {}
    for table in masked:
        by_rel.setdefault(table.split(".", 1)[1], []).append(table)
    scope: dict[str, list[str]] = {}
    for schema, rel, alias in reads.ranges:
        for t in _tables_named(schema, rel, masked, by_rel):
            for name in {alias, rel, f"{schema}.{rel}" if schema else None} - {None}:
                scope.setdefault(name, []).append(t)
    for alias, _cols, inner in reads.joins:     # j.ssn of (customers JOIN ...) AS j
        for schema, rel, _a in inner.ranges:
            for t in _tables_named(schema, rel, masked, by_rel):
                scope.setdefault(alias, []).append(t)
    for schema, rel in reads.rule_on:          # NEW / OLD of a rule or trigger on it
        tables = [f"{schema}.{rel}"] if schema else by_rel.get(rel, [])
        for t in (t for t in tables if t in masked):
            for name in ("new", "old"):
                scope.setdefault(name, []).append(t)
    return scope


_UNKNOWN = None     # a renaming that cannot be mapped: every masked column


def _renamings(reads: _Reads, masked: dict, order: dict | None):
    """{(alias, table): [(new name -> real names, or _UNKNOWN; the alias list)]} of the
    masked tables named with a column-alias list, and of the join aliases over them
    (a join's own list is not mapped: every masked column inside it)."""
    by_rel: dict[str, list[str]] = {}
    for table in masked:
        by_rel.setdefault(table.split(".", 1)[1], []).append(table)
    out: dict[tuple[str, str], list] = {}

    def table_renamings(r: _Reads):
        got = []
        for schema, rel, alias, cols in r.renamed:
            for t in _tables_named(schema, rel, masked, by_rel):
                live = (order or {}).get(t)
                if live is None or len(cols) > len(live) or not isinstance(
                        masked[t], (frozenset, set)):
                    got.append((alias, t, _UNKNOWN, cols))
                    continue
                m: dict[str, set[str]] = {}
                for i, real in enumerate(live):
                    m.setdefault(cols[i] if i < len(cols) else real, set()).add(real)
                got.append((alias, t, m, cols))
        return got

    for alias, t, m, cols in table_renamings(reads):
        out.setdefault((alias, t), []).append((m, cols))
    for alias, cols, inner in reads.joins:
        if cols is not None:
            for schema, rel, _a in inner.ranges:
                for t in _tables_named(schema, rel, masked, by_rel):
                    out.setdefault((alias, t), []).append((_UNKNOWN, cols))
            continue
        for _a, t, m, c in table_renamings(inner):  # j.s of (customers x(i,n,e,s) ...) j
            out.setdefault((alias, t), []).append((m, c))
    return out


def masked_reads(reads: _Reads, masked: dict[str, frozenset[str]],
                 order: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """schema.table.column of every masked column the tree reads (sorted). ``order``:
    {schema.table: its live column names in attnum order}, to map column-alias lists
    (FROM customers AS x(i, n, e, s): x.s is ssn) onto the real columns; a table whose
    order is not known has every masked column read through any name its list gives."""
    scope = _masked_scope(reads, masked)
    if not scope:
        return []
    in_scope = {t for ts in scope.values() for t in ts}
    renamed = _renamings(reads, masked, order)
    hits: set[str] = set()

    def every(tables) -> None:
        hits.update(f"{t}.{c}" for t in tables for c in masked[t])

    def through(key: str, t: str, name: str) -> None:
        """The masked columns of t that ``name`` may be, qualified by ``key``."""
        if name in masked[t]:
            hits.add(f"{t}.{name}")
        for m, _cols in renamed.get((key, t), ()):
            if m is _UNKNOWN:
                every([t])
            else:
                hits.update(f"{t}.{c}" for c in m.get(name, ()) if c in masked[t])

    def unqualified(name: str) -> None:
        hits.update(f"{t}.{name}" for t in in_scope if name in masked[t])
        for (_alias, t), entries in renamed.items():
            for m, cols in entries:
                if m is _UNKNOWN:
                    if name in cols:
                        every([t])
                else:
                    hits.update(f"{t}.{c}" for c in m.get(name, ()) if c in masked[t])

    for fields in reads.refs:
        if not fields:
            continue
        last = fields[-1]
        if len(fields) == 1:
            if last == "*":
                every(in_scope)
            elif last in scope:                 # a whole row: SELECT c FROM customers c
                every(scope[last])
            else:
                unqualified(last)
            continue
        qual = ".".join(fields[:-1])
        key = qual if qual in scope else fields[-2]
        tables = scope.get(key, [])
        if last == "*":
            every(tables)
        else:
            for t in tables:
                through(key, t, last)
    for name in reads.using:
        unqualified(name)
    if reads.natural:
        every(in_scope)
    return sorted(hits)


def stats_reads(reads: _Reads, values: dict = STATS_VALUES) -> list[str]:
    """Value columns of the planner statistics (or of ``values``: relation -> value
    columns) the tree reads."""
    scope: dict[str, str] = {}
    for schema, rel, alias in reads.ranges:
        if rel in values and (schema in (None, "pg_catalog") or rel in _ANY_SCHEMA):
            for name in {alias, rel} - {None}:
                scope[name] = rel
    if not scope:
        return []
    hits: set[str] = set()
    rels = set(scope.values())
    for fields in reads.refs:
        if not fields:
            continue
        last = fields[-1]
        tables = rels if len(fields) == 1 else {scope[fields[-2]]} \
            if fields[-2] in scope else set()
        if len(fields) == 1 and last in scope:
            tables, last = {scope[last]}, "*"
        for rel in tables:
            if last == "*":
                hits.update(f"pg_catalog.{rel}.{c}" for c in values[rel])
            elif last in values[rel]:
                hits.add(f"pg_catalog.{rel}.{last}")
    if reads.natural:
        hits.update(f"pg_catalog.{rel}.*" for rel in rels)
    # a column-alias list renames the value columns out of sight (`pg_stats AS s(a, b,
    # ..., x)`): the whole relation counts as read through it (fail closed)
    for schema, rel, _, _ in reads.renamed:
        if rel in values and (schema in (None, "pg_catalog") or rel in _ANY_SCHEMA):
            hits.update(f"pg_catalog.{rel}.{c}" for c in values[rel])
    # a join alias hides the relations inside it: a value column (or the whole row)
    # read through the alias counts; a join alias with a column-alias list renames
    # them, and its new names are read unqualified as well as through the alias
    # (`(pg_stats CROSS JOIN x) AS j(a, ..., hb)` then `SELECT hb`): the whole
    # relation counts as read (fail closed, as for a list on the relation itself)
    for jalias, jcols, inner in reads.joins:
        inside = {rel for schema, rel, _ in inner.ranges if rel in values and (
            schema in (None, "pg_catalog") or rel in _ANY_SCHEMA)}
        for rel in inside:
            through = [f for f in reads.refs if f and (f[0] == jalias or (
                len(f) > 1 and f[-2] == jalias))]
            if jcols is not None or any(
                    len(f) == 1 or f[-1] == "*" or f[-1] in values[rel] for f in through):
                hits.update(f"pg_catalog.{rel}.{c}" for c in values[rel])
    return sorted(hits)


def _sink(st, reads: _Reads, sinks: frozenset = SINK_FUNCS) -> str | None:
    """Where this statement puts what it reads, other than the client (None: nowhere);
    ``sinks``: the functions that keep their arguments (sink_functions)."""
    if st.relations_written:
        return "writes " + ", ".join(st.relations_written)
    if "create" in st.kinds:
        return "creates an object that keeps what it reads"
    funcs = sorted(reads.funcs & sinks)
    if funcs:
        return "calls " + ", ".join(f"{f}()" for f in funcs)
    if reads.hold:
        return "declares a cursor WITH HOLD (its rows outlive the transaction)"
    if "escape" in st.flags:
        return "sends data outside the database"
    return None


def _fixed_arg(node) -> bool:
    # a literal, a parameter, or an operator / cast over them (EXECUTE p(1), p($1), p(-2))
    if not isinstance(node, dict):
        return False
    if "A_Const" in node or "ParamRef" in node:
        return True
    if isinstance(node.get("TypeCast"), dict):
        return _fixed_arg(node["TypeCast"].get("arg"))
    e = node.get("A_Expr")
    if isinstance(e, dict) and e.get("kind") == "AEXPR_OP":
        return all(_fixed_arg(x) for x in (e.get("lexpr"), e.get("rexpr")) if x is not None)
    return False


def _view_keeps_sink(d, sql: str, sinks: frozenset):
    """The refusal of a view (or materialized view) whose query calls a function that
    keeps what it is given: read under a statement over masked columns (a LIMIT of a
    masked value's size), each row it yields runs the call once more (nextval, an
    advisory lock, a notification channel): the count is the value, kept for later."""
    stmts = _tree(sql)
    for st, raw in zip(d.statements, stmts or ()):
        node = raw.get("stmt") if isinstance(raw, dict) else None
        if not isinstance(node, dict):
            continue
        body = None
        if isinstance(node.get("ViewStmt"), dict):
            body = node["ViewStmt"].get("query")
        elif isinstance(node.get("CreateTableAsStmt"), dict) and \
                node["CreateTableAsStmt"].get("objtype") == "OBJECT_MATVIEW":
            body = node["CreateTableAsStmt"].get("query")
        if body is None:
            continue
        reads = _Reads()
        reads.walk(body)
        kept = sorted(reads.funcs & sinks)
        if kept:
            return _refusal(
                d, st, f"a view that calls {kept[0]}() keeps a call of a function that keeps "
                "what it is given: read under a statement over masked columns, the number "
                "of calls can carry a masked value",
                f"statement kind: {st.kind}; the view calls "
                + ", ".join(f"{f}()" for f in kept),
                "Call such functions in your own statements (not over masked columns); "
                "views may not keep calls of them for a masked identity.")
    return None


def _tree(sql: str) -> list | None:
    """The statements' parse trees (None: the text does not parse)."""
    try:
        return orjson.loads(_pg.parse_sql_json(sql)).get("stmts", [])
    except Exception:       # noqa: BLE001 - any parser failure: the caller fails closed
        return None


def _refusal(d, st, what: str, detail: str, hint: str):
    return Decision(action="block", rule="masking",
                    message=f'pgguard: statement refused by rule "masking": {what}',
                    detail=detail, hint=hint, statements=d.statements,
                    verdicts=d.verdicts, index=d.statements.index(st) if st in
                    d.statements else -1)


_HINT = ("Masked columns may only be read straight back to the client, where they are "
         "masked. Leave them out of statements that write, create objects, set settings "
         "or large objects, or keep cursors; or ask an identity exempt from the mask.")


class _ColumnGlobs:
    """The masked columns of a table the catalog does not know yet (created since it was
    read): every column name a mask's column glob matches."""

    def __init__(self, globs: tuple[str, ...]) -> None:
        self.globs = globs

    def __contains__(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.globs)

    def __iter__(self):
        return iter(self.globs)


def _by_glob(d, masked: dict, globs) -> dict:
    """``masked`` plus the relations this text names that match a mask's table glob but
    the catalog has not seen (the catalog is read again only when their rows come)."""
    extra: dict[str, list[str]] = {}
    for st in d.statements:
        for r in st.relations_read + st.relations_written:
            if r in masked:
                continue
            for table_glob, col_glob in globs:
                if fnmatch.fnmatchcase(r, table_glob):
                    extra.setdefault(r, []).append(col_glob)
    if not extra:
        return masked
    return {**masked, **{r: _ColumnGlobs(tuple(g)) for r, g in extra.items()}}


def check(d, sql: str, masked: dict[str, frozenset[str]], globs=(), user_fn=None,
          order: dict[str, tuple[str, ...]] | None = None, volatile=None):
    """A refusal Decision when the allowed decision ``d`` for ``sql`` would park values
    of masked columns (or read statistics sample values); None when it may run.
    ``globs``: (table glob, column glob) of the masks that apply, for tables created
    since the catalog was read. ``user_fn``: ``name -> bool``, whether a function name
    (as written, ``schema.name`` or bare) may be one pgguard cannot see into (not a
    built-in of pg_catalog); None: every function may be (fail closed). ``order``:
    {schema.table: live column names in attnum order}, to map column-alias lists onto
    the masked columns (without it, every masked column is read through any of them).
    ``volatile``: the names of pg_catalog's volatile functions (sink_functions)."""
    user_fn = user_fn or _every_function
    sinks = sink_functions(volatile)
    masked = _by_glob(d, masked, globs)
    names = set(masked)
    bare = {t.split(".", 1)[1] for t in names}
    for st in d.statements:
        readers = sorted({f.rsplit(".", 1)[-1] for f in st.functions} & CURSOR_READERS)
        if readers and (names or globs):
            return _refusal(
                d, st, f"{readers[0]}() reads a cursor's rows inside the server, where "
                "masking cannot follow them",
                f"statement kind: {st.kind}; calls {', '.join(r + '()' for r in readers)}",
                "FETCH from the cursor instead: its rows are masked on the way to you.")
        if (names or globs) and st.kind not in ("fetch", "move") and (
                "fetch" in st.kinds or "move" in st.kinds):
            # a body's FETCH reads any open cursor or protocol portal by its name (a
            # refcursor argument, a string, a bound cursor variable left unopened)
            return _refusal(
                d, st, "code it runs FETCHes from a cursor inside the server, where "
                "masking cannot follow the rows (any open cursor or portal, by name)",
                f"statement kind: {st.kind}; the code (a DO block or a function body) "
                "runs FETCH or MOVE",
                "FETCH from the cursor yourself: its rows are masked on the way to you.")
        texts = sorted({f.rsplit(".", 1)[-1] for f in st.functions} & ACTIVITY_FUNCS)
        if texts and (names or globs):
            return _refusal(
                d, st, f"{texts[0]}() returns other sessions' statement texts, with the "
                "literal values they were sent with",
                f"statement kind: {st.kind}; calls {', '.join(t + '()' for t in texts)}",
                "Read pg_stat_activity without its query column, or ask an identity "
                "exempt from the masks.")
    if (names or globs) and any(st.kind == "create" for st in d.statements):
        refusal = _view_keeps_sink(d, sql, sinks)
        if refusal is not None:
            return refusal
    if (names or globs) and any(k in ("create", "alter") for st in d.statements
                                for k in (st.kind, *st.kinds)):
        refusal = _hooks(d, sql, user_fn) or _moves(d, sql, masked, globs)
        if refusal is not None:
            return refusal
    if not any(r in names or r.split(".", 1)[-1] in bare or r.split(".", 1)[-1] in
               STATS_VALUES or r.split(".", 1)[-1] in ACTIVITY_VALUES or "opaque" in st.flags
               for st in d.statements
               for r in st.relations_read + st.relations_written + ("",)):
        return None                 # reads nothing masked: nothing to park
    stmts = _tree(sql)
    if stmts is None or len(stmts) != len(d.statements):
        if any(r in names for st in d.statements for r in st.relations_read):
            return _refusal(d, None, "pgguard could not analyse which masked columns "
                            "this statement reads", "the statement reads a table with "
                            "masked columns", _HINT)
        return None
    for st, raw in zip(d.statements, stmts):
        reads = _Reads()
        reads.walk(raw.get("stmt"))
        stats = stats_reads(reads)
        if stats and (names or globs):
            return _refusal(
                d, st, "planner statistics hold sample values of masked columns",
                f"reads {', '.join(stats)}",
                "Read the statistics without their values (null_frac, n_distinct, "
                "correlation, avg_width), or ask an identity exempt from the masks.")
        texts = stats_reads(reads, ACTIVITY_VALUES)
        if texts and (names or globs):
            return _refusal(
                d, st, "other sessions' statement texts carry the literal values they "
                "were sent with, masked columns' values included",
                f"reads {', '.join(texts)}",
                "Read pg_stat_activity without its query column (pid, state, "
                "wait_event, query_start...), or ask an identity exempt from the masks.")
        if (names or globs) and (st.kind in ("do", "call") or _creates_code(raw) or any(
                user_fn(f) for f in reads.calls)):
            # code reads them where the column check above cannot look (a DO block, a
            # function's body): the statement texts and sample values come out in a
            # NOTICE, a table, a return value
            hidden = sorted(r for r in st.relations_read
                            if r.split(".", 1)[-1] in STATS_VALUES
                            or r.split(".", 1)[-1] in ACTIVITY_VALUES)
            if hidden:
                return _refusal(
                    d, st, f"{st.kind.upper()} runs code that reads {hidden[0]}, whose "
                    "values (planner samples, other sessions' statement texts) include "
                    "masked columns' values",
                    f"statement kind: {st.kind}; the code reads {', '.join(hidden)}",
                    "Read these views directly, without their value columns; DO blocks, "
                    "procedures and function bodies may not read them for a masked "
                    "identity.")
        if not names:
            continue
        touched = sorted(r for r in st.relations_read + st.relations_written
                         if r in names or r.split(".", 1)[-1] in bare and
                         r.startswith("public."))
        opaque = "opaque" in st.flags
        if opaque or touched and (st.kind in ("do", "call") or _creates_code(raw)):
            seen = ", ".join(touched) or "SQL pgguard cannot see into"
            return _refusal(
                d, st, f"{st.kind.upper()} runs code whose data flow pgguard cannot "
                "follow, over tables with masked columns",
                f"statement kind: {st.kind}; reads {seen}"
                + ("; opaque: " + "; ".join(st.reasons_for("opaque")) if opaque else ""),
                "Run the SELECT itself: DO blocks, procedures, functions and dynamic SQL "
                "may not read tables with masked columns for a masked identity.")
        if _masked_scope(_Reads.only_rules(reads), masked):
            return _refusal(
                d, st, "a trigger or rule on a table with masked columns sees every "
                "masked value", f"statement kind: {st.kind}; on "
                + ", ".join(f"{s or 'public'}.{r}" for s, r in reads.rule_on), _HINT)
        cols = masked_reads(reads, masked, order)
        unseen = [f"{f}()" for f in sorted(reads.calls) if user_fn(f)] + \
            [f"operator {o}" for o in sorted(reads.operators)]
        # o.f in functional notation: f(o), the whole row (the policy found f in the
        # catalog and counts it among the statement's functions)
        fcalls = [f"{f}()" for f in getattr(st, "field_calls", ())
                  if f in st.functions and user_fn(f)]
        if fcalls:
            unseen += [f for f in fcalls if f not in unseen]
            if not cols and touched:
                cols = [f"{t}.* (whole rows given to {fcalls[0]} as o.f)" for t in touched]
        own = {f"{sch or 'public'}.{rel}" for sch, rel, _alias in reads.ranges}
        via_bodies = [t for t in touched if t not in own]
        if reads.executes and reads.exec_computed and (cols or touched):
            # EXECUTE p(<computed>): the arguments go into a statement planned apart,
            # whose rows, and whatever it stores, follow the PREPARE's lineage, not the
            # arguments' (EXECUTE p(ssn_of(1)) with p AS SELECT $1 returned it in clear)
            return _refusal(
                d, st, f"EXECUTE {reads.executes[0]}(...) computes its arguments over "
                "tables with masked columns; the prepared statement is planned apart and "
                "would return or keep them unmasked",
                f"statement kind: {st.kind}; reads {', '.join(touched or cols)}",
                "Pass constants or parameters to EXECUTE, or run the statement itself.")
        if not cols and via_bodies and unseen:
            # a table with masked columns the statement's own text does not read: a
            # called function's body reads it (the policy folds bodies in), so what it
            # returns may be a masked value in clear. Read straight back it is masked as
            # a computed column; stored, sent, or handed to other code it is not
            sink = _sink(st, reads, sinks)
            if sink is not None or len(unseen) > 1:
                return _refusal(
                    d, st, f"{st.kind.upper()} calls {', '.join(unseen)}, whose code reads "
                    f"table {via_bodies[0]} with masked columns, and "
                    + (sink if sink is not None else "passes values between functions "
                       "pgguard cannot see into"),
                    f"statement kind: {st.kind}; the function bodies read "
                    f"{', '.join(via_bodies)}", _HINT)
        if cols and unseen:
            return _refusal(
                d, st, f"{st.kind.upper()} passes values of masked column {cols[0]} to "
                f"{unseen[0]}, whose code pgguard cannot see into",
                f"statement kind: {st.kind}; reads masked column(s) {', '.join(cols)}; "
                f"calls {', '.join(unseen)}, not a built-in "
                "function of pg_catalog (it may store or send what it is given)",
                "Call your own functions and operators on unmasked columns only, or read "
                "the masked columns with built-in functions; or ask an identity exempt "
                "from the mask.")
        sink = _sink(st, reads, sinks)
        if sink is None:
            continue
        if touched and reads.executes:
            # CREATE TABLE ... AS EXECUTE p: the columns are the prepared statement's,
            # which this statement's text does not name
            return _refusal(
                d, st, f"{st.kind.upper()} runs prepared statement {reads.executes[0]}, "
                f"which reads table {touched[0]} with masked columns, and {sink}",
                f"statement kind: {st.kind}; EXECUTE {', '.join(reads.executes)}; reads "
                f"{', '.join(touched)}", _HINT)
        if cols:
            return _refusal(
                d, st, f"{st.kind.upper()} would move values of masked column "
                f"{cols[0]} out of reach of masking",
                f"statement kind: {st.kind}; reads masked column(s) {', '.join(cols)}; "
                f"{sink}", _HINT)
    return None


def _hooks(d, sql: str, user_fn):
    """The refusal of DDL in ``sql`` that would make a cast, an operator or a type run
    code on whatever it is applied to (masked values too), for a masked identity."""
    stmts = _tree(sql)
    if stmts is None:       # the policy parsed it; should this parse fail: fail closed
        return _refusal(d, None, "pgguard could not analyse this statement's DDL",
                        "the statement could not be parsed again", _HINT)
    for i, raw in enumerate(stmts):
        reads = _Reads()
        reads.walk(raw.get("stmt"))
        for kind, v in reads.hooks:
            what = _hook(kind, v, user_fn)
            if what is None:
                continue
            st = d.statements[i] if i < len(d.statements) else None
            return _refusal(
                d, st, f"{what} would run code on every value it is applied to, masked "
                "values too, where masking cannot follow them",
                f"statement kind: {st.kind if st else 'create'}; {what}",
                "Casts, operators, types and domain checks that call functions may not "
                "be created by an identity masked columns are hidden from; call the "
                "function by name instead, or ask a database administrator.")
    return None


# ALTER TABLE sub-commands that make a table a child or partition of another one, or
# take it out of one (the table is the statement's own, or the PartitionCmd's)
_INHERITANCE = {"AT_AddInherit": "INHERIT", "AT_DropInherit": "NO INHERIT",
                "AT_AttachPartition": "ATTACH PARTITION",
                "AT_DetachPartition": "DETACH PARTITION",
                "AT_DetachPartitionFinalize": "DETACH PARTITION ... FINALIZE"}
# (ALTER INDEX ... RENAME renames any relation, a table too)
_RELATION_KINDS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW",
                             "OBJECT_FOREIGN_TABLE", "OBJECT_COLUMN", "OBJECT_ATTRIBUTE",
                             "OBJECT_INDEX"})


def _masked_rel(rv, masked: dict, globs=()) -> dict:
    """{table with masked columns a RangeVar may name: its masked columns} (a bare name:
    in any schema; a name a mask's table glob matches counts too, known or not yet)."""
    if not isinstance(rv, dict) or not rv.get("relname"):
        return {}
    schema, rel = rv.get("schemaname"), rv["relname"]
    out = {t: masked[t] for t in masked if t == f"{schema}.{rel}" or
           schema is None and t.split(".", 1)[1] == rel}
    for table_glob, col_glob in globs:
        s, _, r = table_glob.partition(".")
        if fnmatch.fnmatchcase(rel, r) and (schema is None or fnmatch.fnmatchcase(schema, s)):
            name = f"{schema or s}.{rel}"
            out[name] = _ColumnGlobs(tuple(out.get(name, ())) + (col_glob,))
    return out


def _move(node: dict, masked: dict, globs) -> tuple[str, list[str]] | None:
    """(what the statement does, the tables with masked columns it does it to) for DDL
    that changes which relations return a masked table's rows, or the names its masks
    are found by; None for anything else."""
    if "AlterTableStmt" in node:
        v = node["AlterTableStmt"]
        for c in v.get("cmds", []):
            cmd = c.get("AlterTableCmd", {})
            verb = _INHERITANCE.get(cmd.get("subtype"))
            if verb is None:
                continue
            part = cmd.get("def", {}).get("PartitionCmd")
            child = part.get("name") if part is not None else v.get("relation")
            hit = _masked_rel(child, masked, globs)
            if hit:
                return f"ALTER TABLE ... {verb}", sorted(hit)
        return None
    if "RenameStmt" in node:
        v = node["RenameStmt"]
        kind = v.get("renameType")
        if kind == "OBJECT_SCHEMA":
            old = v.get("subname") or ""
            hit = sorted({t for t in masked if t.split(".", 1)[0] == old} |
                         {g for g, _ in globs if fnmatch.fnmatchcase(old, g.split(".")[0])})
            return ("ALTER SCHEMA ... RENAME", hit) if hit else None
        if kind not in _RELATION_KINDS:
            return None
        hit = _masked_rel(v.get("relation"), masked, globs)
        if kind in ("OBJECT_COLUMN", "OBJECT_ATTRIBUTE"):
            col = v.get("subname") or ""
            cols = sorted(f"{t}.{col}" for t, c in hit.items() if col in c)
            return ("RENAME COLUMN", cols) if cols else None
        return ("RENAME", sorted(hit)) if hit else None
    if "AlterObjectSchemaStmt" in node:
        v = node["AlterObjectSchemaStmt"]
        hit = _masked_rel(v.get("relation"), masked, globs) \
            if v.get("objectType") in _RELATION_KINDS else {}
        return ("SET SCHEMA", sorted(hit)) if hit else None
    return None


def _moves(d, sql: str, masked: dict, globs=()):
    """The refusal of DDL in ``sql`` that would let a masked table's rows out under a
    relation no mask covers, for a masked identity: making it (or a table that carries
    its rows) a child or partition of another table, whose scans then return its rows,
    or taking it out of one; renaming it, a masked column of it or its schema, or moving
    it to another schema (masks are found by the names of the configuration)."""
    if not masked and not globs:
        return None
    stmts = _tree(sql)
    if stmts is None:       # the policy parsed it; should this parse fail: fail closed
        return _refusal(d, None, "pgguard could not analyse this statement's DDL",
                        "the statement could not be parsed again", _HINT)
    for i, raw in enumerate(stmts):
        stack = [raw.get("stmt")]
        while stack:
            n = stack.pop()
            if isinstance(n, list):
                stack.extend(n)
                continue
            if not isinstance(n, dict):
                continue
            hit = _move(n, masked, globs)
            if hit is None:
                stack.extend(n.values())
                continue
            what, tables = hit
            st = d.statements[i] if i < len(d.statements) else None
            return _refusal(
                d, st, f"{what} of {tables[0]} would change which relations return "
                "masked values, or the names their masks are found by",
                f"statement kind: {st.kind if st else 'alter'}; {what} on "
                f"{', '.join(tables)} (a table with masked columns, or one that carries "
                "their rows)",
                "A masked identity may not attach a table with masked columns to another "
                "table (INHERIT, ATTACH PARTITION), detach it, or rename or move it or "
                "its masked columns; ask a database administrator (and update the masks "
                "in the configuration).")
    return None


def _creates_code(raw) -> bool:
    s = raw.get("stmt", {})
    return any(k in s for k in ("CreateFunctionStmt", "DoStmt", "CallStmt"))


def judge(session, d, sql: str):
    """``d``, or the refusal that replaces it for this session's masked identity."""
    mask = session.masking
    if not mask.masks_apply():
        return d
    name, ident = session.identity_name, session.identity
    masked = masked_names(mask.catalog, name, ident)
    globs = [tuple(mk.column.rsplit(".", 1)) for mk in session.services.cfg.masks
             if applies(mk, name, ident) and mk.column.count(".") >= 2]
    return check(d, sql, masked, globs,
                 session.services.user_function_test(session.database),
                 column_order(mask.catalog),
                 session.services.volatile_builtins(session.database)) or d


def column_order(catalog) -> dict[str, tuple[str, ...]]:
    """{schema.table: its live column names in attnum order} of the catalog's tables
    with masked columns (cached on the catalog object, replaced when read again)."""
    memo = catalog.__dict__.get("_parking_order")
    if memo is None:
        memo = catalog.__dict__["_parking_order"] = {
            table: tuple(n for _, n in sorted(attrs))
            for oid, (table, attrs) in catalog.tables.items()
            if oid not in getattr(catalog, "views", frozenset())}
    return memo
