# Views and rewrite rules resolved to the relations they really touch, for rule matching.
"""What a statement on a view (or a partition) really touches.

``UPDATE my_view SET ...`` changes the tables behind ``my_view``; a rule on
``public.orders`` must see that. Likewise ``UPDATE orders_2024 ...`` changes rows of the
partitioned ``orders`` (and a child of an inheritance parent holds the parent's rows): a
partition or child has an edge to each parent. A :class:`ViewMap` holds, for every relation that has
rewrite rules (a view's ``_RETURN`` rule, ``INSTEAD`` / ``ALSO`` rules), the relations
those rules use, and resolves them transitively (views of views). The policy engine
expands a statement's ``relations_written`` / ``relations_read`` with them before any
rule matches (``PolicyEngine.decide(..., views=...)``), so the decision and the audit
record name the view and the base relations both.

Where the edges come from:

- the upstream catalog (``pg_rewrite`` joined to ``pg_depend``, and the bodies of
  plpgsql / SQL functions of INSTEAD OF triggers, read by the proxy per database:
  ``pgguard.proxy.sideconn.rewrite_rows``, turned into a map by :meth:`ViewMap.from_rows`);
- the session's own statements (:func:`learned`): ``CREATE [OR REPLACE] [TEMP] VIEW``,
  ``CREATE RULE``, ``CREATE MATERIALIZED VIEW``, ``CREATE SCHEMA ... CREATE VIEW``,
  ``CREATE TRIGGER ... INSTEAD OF`` with a function the session created, renames and
  ``SET SCHEMA`` of a known view, and DO blocks that create relations (read coarsely:
  every relation the block writes counts as a view over everything it touches). A
  session sees its TEMP views, and views of a transaction not yet committed, before the
  catalog does.

Not seen: what functions in languages other than plpgsql and SQL touch, views and
triggers created by code pgguard cannot read (dynamic SQL, functions called by name)
until the catalog shows them, and views made outside this pgguard process (directly
upstream, or through another worker) until its map is read again (``VIEW_MAP_TTL``, or
the next DDL through it).

Names are the classifier's: schema-qualified, an unqualified name is ``public.<name>``.
A TEMP view the session creates is known to it as ``pg_temp.<name>`` and as
``public.<name>`` (an unqualified name reaches the session's temporary schema first);
the catalog's temporary schemas (``pg_temp_N``) belong to sessions pgguard cannot tell
apart, so their views are known only under those names.

Example::

    >>> from pgguard.policy.classify import classify
    >>> vm = ViewMap({"public.v": frozenset({"public.w"}), "public.w": frozenset({"public.orders"})})
    >>> vm.expand(classify("UPDATE v SET status = 'x' WHERE id = 1"))[0].relations_written
    ('public.v', 'public.w', 'public.orders')
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec
import orjson
from pglast import parser as _pg

from .classify import FLAGS, Reason, Statement, classify, is_system_relation

__all__ = ["ViewMap", "SessionViews", "learned", "CATALOG_KINDS"]

# statement kinds that change the catalog: their decisions are never cached, so that
# each one reaches the session (view learning, catalog caches dropped)
CATALOG_KINDS = frozenset({"create", "alter", "drop"})

_EMPTY: frozenset[str] = frozenset()


class ViewMap:
    """Relation -> relations its rewrite rules use (direct edges), resolved
    transitively on demand. Immutable: :meth:`merged` makes a new map."""

    __slots__ = ("edges", "_closure", "hidden", "foreign", "deferred", "runs", "used")

    def __init__(self, edges: Mapping[str, frozenset[str]] | None = None,
                 hidden: frozenset[str] = frozenset(),
                 foreign: frozenset[str] = frozenset(),
                 deferred: frozenset[str] = frozenset(),
                 runs: Mapping[str, Statement] | None = None) -> None:
        self.edges: dict[str, frozenset[str]] = dict(edges or {})
        self._closure: dict[str, tuple[str, ...]] = {}
        # relations a change of which changes other rows no command tag counts: those
        # referenced by a foreign key ON DELETE/UPDATE CASCADE, SET NULL or SET
        # DEFAULT, and those with row triggers
        self.hidden = hidden
        self.foreign = foreign      # foreign tables (their rows change in another server)
        # relations with deferrable user triggers (they may run at COMMIT)
        self.deferred = deferred
        # views and materialized views whose definitions call functions: what the
        # definition runs (a read of the view runs it, a REFRESH too)
        self.runs: dict[str, Statement] = dict(runs or {})
        self.used = tuple(k for k in self.runs if k.startswith(("\0op:", "\0cast:")))

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[Any, ...]],
                  triggers: Iterable[tuple[Any, ...]] = (),
                  hidden: Iterable[tuple[Any, ...]] = (),
                  foreign: Iterable[tuple[Any, ...]] = (),
                  inherits: Iterable[tuple[Any, ...]] = (),
                  deferred: Iterable[tuple[Any, ...]] = (),
                  defs: Iterable[tuple[Any, ...]] = (),
                  code: Iterable[tuple[Any, ...]] = (),
                  glob: Iterable[tuple[Any, ...]] = ()) -> ViewMap:
        """Rows of (schema, relation with rewrite rules, schema, relation they use), and
        of (schema, view, language, function source) for INSTEAD OF triggers: the
        relations a plpgsql or SQL trigger function touches are behind the view too;
        of (schema, relation) whose changes change rows unseen (``hidden``); and of
        (schema, child, schema, parent) for partitions and inheritance children (a
        statement on the parent reaches the child's rows: see :meth:`descendants`)."""
        edges: dict[str, set[str]] = {}
        for vs, vn, bs, bn in rows:
            if None in (vs, vn, bs, bn):
                continue
            base = f"{bs}.{bn}"
            for name in _aliases(vs, vn):
                edges.setdefault(name, set()).add(base)
        for cs, cn, ps, pn in inherits:
            if None in (cs, cn, ps, pn):
                continue
            for child in _aliases(cs, cn):
                edges.setdefault(child, set()).add(f"{ps}.{pn}")
            for parent in _aliases(ps, pn):
                edges.setdefault(_CHILDREN + parent, set()).update(_aliases(cs, cn))
        for vs, vn, lang, src in triggers:
            if vs is None or vn is None:
                continue
            for name in _aliases(vs, vn):
                edges.setdefault(name, set()).update(_body_relations(lang, src))
        unseen = frozenset(n for hs, hn in hidden if hs is not None and hn is not None
                           for n in _aliases(hs, hn))
        remote = frozenset(n for fs, fn in foreign if fs is not None and fn is not None
                           for n in _aliases(fs, fn))
        late = frozenset(n for ds, dn in deferred if ds is not None and dn is not None
                         for n in _aliases(ds, dn))
        runs: dict[str, Statement] = {}
        for rows, prefix in ((defs, ""), (code, _WRITE_CODE)):
            for rs, rn, text in rows:
                if rs is None or rn is None or text is None:
                    continue
                st = _definition(text)
                if st is not None:
                    for name in _aliases(rs, rn):
                        runs[prefix + name] = st
        for kind, text in glob:
            st = _definition(text) if text is not None else None
            if st is not None and kind is not None and (
                    kind == "ddl" or kind.startswith(("op:", "cast:"))):
                runs["\0" + kind] = st
        return cls({k: frozenset(v) for k, v in edges.items() if v}, unseen, remote, late,
                   runs)

    def __bool__(self) -> bool:
        return bool(self.edges) or bool(self.runs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ViewMap) and other.edges == self.edges and \
            other.hidden == self.hidden and other.foreign == self.foreign and \
            other.deferred == self.deferred and other.runs == self.runs

    __hash__ = None  # type: ignore[assignment]

    def __contains__(self, name: str) -> bool:
        return name in self.edges

    def merged(self, edges: Mapping[str, frozenset[str]]) -> ViewMap:
        """A new map with ``edges`` added (unions where a name is in both)."""
        if not edges:
            return self
        out = dict(self.edges)
        for k, v in edges.items():
            out[k] = out.get(k, _EMPTY) | v
        return ViewMap(out, self.hidden, self.foreign, self.deferred, self.runs)

    def bases(self, name: str) -> tuple[str, ...]:
        """Every relation ``name``'s rules reach, views of views included, nearest first
        (empty for a plain table)."""
        hit = self._closure.get(name)
        if hit is not None:
            return hit
        seen: dict[str, None] = {}
        todo = list(self.edges.get(name, ()))
        todo.sort()
        while todo:
            n = todo.pop(0)
            if n == name or n in seen:
                continue
            seen[n] = None
            todo.extend(sorted(self.edges.get(n, ())))
        out = tuple(seen)
        if len(self._closure) > 50_000:
            self._closure.clear()
        self._closure[name] = out
        return out

    def descendants(self, name: str) -> tuple[str, ...]:
        """The partitions and inheritance children of ``name``, theirs included: a
        statement on a parent (without ONLY) reads and changes their rows."""
        edges = self.edges
        if _CHILDREN + name not in edges:
            return ()
        seen: dict[str, None] = {}
        todo = sorted(edges[_CHILDREN + name])
        while todo:
            n = todo.pop(0)
            if n == name or n in seen:
                continue
            seen[n] = None
            todo.extend(sorted(edges.get(_CHILDREN + n, ())))
        return tuple(seen)

    def expand(self, stmts: Iterable[Statement]) -> tuple[Statement, ...]:
        """``stmts`` with each relation followed by the relations behind it. A view
        created by an earlier statement of the same text counts for the later ones."""
        vm = self
        out = []
        for st in stmts:
            out.append(vm._expand_one(st))
            new = learned(st, vm)
            if new:
                vm = vm.merged(new)
        return tuple(out)

    def _expand_one(self, st: Statement) -> Statement:
        return self._with_runs(self._expand_rel(st))

    def _with_runs(self, st: Statement) -> Statement:
        """``st`` with what the definitions of the views it reaches call folded in:
        ``SELECT * FROM v`` runs every function ``v``'s definition calls (a DBA's view
        over ``wipe()`` deleted rows, one over ``pg_terminate_backend(pid)`` ended
        sessions), and so does ``REFRESH MATERIALIZED VIEW v``. The calls are judged as
        if the statement made them (user functions by their bodies, next)."""
        runs = self.runs
        if not runs:
            return st
        hit = {n: runs[n] for n in dict.fromkeys(st.relations_read + st.relations_written)
               if n in runs}
        if self.used:
            # an operator used by its symbol, a cast by its target type's name: what
            # the text names may resolve to a DBA's function (the implicit casts of an
            # INSERT are not seen)
            low = st.text.lower()
            for key in self.used:
                if key[4:] in low if key.startswith("\0op:") else \
                        re.search(r"\b" + re.escape(key[6:]) + r"\b", low):
                    hit[key] = runs[key]
        if _DDL_CODE in runs and (not _DDL_KINDS.isdisjoint(st.kinds) or st.kind in _DDL_KINDS):
            hit[_DDL_CODE] = runs[_DDL_CODE]
        if not _ROW_WRITES.isdisjoint(st.kinds) or st.kind in _ROW_WRITES:
            # (a DDL on the table, ALTER or CREATE INDEX, runs none of it); a write to a
            # partitioned table or a parent runs the code of the partition or child its
            # rows go to: any of them
            for n in dict.fromkeys(st.relations_written + tuple(
                    d for w in st.relations_written for d in self.descendants(w))):
                if _WRITE_CODE + n in runs:
                    hit[_WRITE_CODE + n] = runs[_WRITE_CODE + n]
        if not hit:
            return st
        kinds = dict.fromkeys(st.kinds)
        read = dict.fromkeys(st.relations_read)
        funcs = dict.fromkeys(st.functions)
        flags = set(st.flags)
        reasons: list[Reason] = []
        settings = dict.fromkeys(st.settings)
        changes, readonly = st.changes_rows, st.readonly
        for name, body in hit.items():
            kinds.update(dict.fromkeys(body.kinds))
            read.update(dict.fromkeys(body.relations_read))
            funcs.update(dict.fromkeys(body.functions))
            flags.update(body.flags)
            settings.update(dict.fromkeys(body.settings))
            changes = changes or body.changes_rows
            readonly = readonly and body.readonly
            what = f"writing {name[len(_WRITE_CODE):]}" if name.startswith(_WRITE_CODE) \
                else f"operator {name[4:]}" if name.startswith("\0op:") \
                else f"a cast to {name[6:]}" if name.startswith("\0cast:") \
                else "an event trigger of the database" if name == _DDL_CODE \
                else f"reading {name}"
            reasons.extend(Reason(r.flag, f"{what} runs: {r.text}") for r in body.reasons)
        # (the bodies of the user functions it calls are folded in next, by the caller's
        # Bodies, which also stops counting its rows by the command tag)
        return msgspec.structs.replace(
            st, kinds=tuple(kinds), relations_read=tuple(read), functions=tuple(funcs),
            flags=tuple(f for f in FLAGS if f in flags),
            reasons=tuple(dict.fromkeys(reasons + list(st.reasons))),
            settings=tuple(settings), changes_rows=changes, readonly=readonly)

    def _expand_rel(self, st: Statement) -> Statement:
        w = self._names(st.relations_written)
        r = self._names(st.relations_read)
        # the partitions and children below what it reads or writes: their rows are
        # reached too. Listed as read (rules match both lists), so that the row-limit
        # guard, which measures each table written, measures the parent's tree once
        below = self._below((st.relations_written if w is None else w)
                            + (st.relations_read if r is None else r))
        if below:
            r = tuple(dict.fromkeys((st.relations_read if r is None else r) + below))
        if w is None and r is None:
            return st
        changes = {}
        # a write that reaches a system catalog through a view is a catalog write
        hidden = [n for n in (w or ()) if n not in st.relations_written
                  and is_system_relation(n)]
        if hidden and "privilege" not in st.flags:
            changes["flags"] = tuple(f for f in FLAGS if f in st.flags or f == "privilege")
            changes["reasons"] = st.reasons + (Reason(
                "privilege", f"writes {hidden[0]} (a system catalog) through a view"),)
        return msgspec.structs.replace(
            st, relations_written=st.relations_written if w is None else w,
            relations_read=st.relations_read if r is None else r, **changes)

    def _names(self, names: tuple[str, ...]) -> tuple[str, ...] | None:
        edges = self.edges
        if not edges or not any(n in edges for n in names):
            return None
        out: dict[str, None] = {}
        for n in names:
            out[n] = None
            for b in self.bases(n):
                if not b.startswith(_FUNCTION):
                    out[b] = None
        return tuple(out)

    def _below(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The partitions and children of ``names`` (and what their rules reach)."""
        edges = self.edges
        if not edges or not any(_CHILDREN + n in edges for n in names):
            return ()
        out: dict[str, None] = {}
        for n in names:
            for c in self.descendants(n):
                out[c] = None
                for b in self.bases(c):
                    if not b.startswith(_FUNCTION):
                        out[b] = None
        return tuple(k for k in out if k not in names)


_TEMP_SCHEMA = re.compile(r"pg_temp_\d+")


def _aliases(schema: str, name: str) -> tuple[str, ...]:
    # the session's temporary relation is reached unqualified (the classifier says
    # public.<name> then)
    if schema == "pg_temp":
        return (f"pg_temp.{name}", f"public.{name}")
    return (f"{schema}.{name}",)


def _body_relations(lang: str | None, src: str | None) -> frozenset[str]:
    """The relations a trigger function's body touches, as the classifier reads a
    function body (plpgsql and SQL only: other languages cannot be seen into)."""
    if lang not in ("plpgsql", "sql") or not src:
        return _EMPTY
    tag = "$pgguard_body$"
    while tag in src:
        tag = tag[:-1] + "_$"
    try:
        stmts = classify(f"CREATE FUNCTION pgguard_trigger() RETURNS trigger LANGUAGE {lang} "
                         f"AS {tag}{src}{tag}")
    except Exception:   # noqa: BLE001 - a body pgguard cannot read adds nothing it knows
        return _EMPTY
    return frozenset(r for st in stmts for r in st.relations_written + st.relations_read)


def _rv_names(rv: Any, default_schema: str | None = None) -> tuple[str, ...]:
    if type(rv) is not dict or not rv.get("relname"):
        return ()
    name = rv["relname"]
    schema = rv.get("schemaname") or default_schema
    if schema is None:
        if rv.get("relpersistence") == "t":
            return _aliases("pg_temp", name)
        return (f"public.{name}",)
    if rv.get("relpersistence") == "t" or _TEMP_SCHEMA.fullmatch(schema):
        # the session's own statement: its temporary schema named as pg_temp_N is
        # pg_temp (the catalog's pg_temp_N of other sessions shadow nothing here)
        return _aliases("pg_temp", name)
    return _aliases(schema, name)


# a function's body, as a node of the map: a trigger's relation -> function -> relations
# (never shown as a relation itself)
_FUNCTION = "function:"
# a parent's partitions and inheritance children, as a node of the map: "children:" +
# parent -> its children (the reverse of their edges to it)
_CHILDREN = "children:"
_TRIGGER_INSTEAD = 64


def _qualified(names: Any) -> str:
    parts = [n.get("String", {}).get("sval", "") for n in names or () if type(n) is dict]
    return ".".join(parts) if len(parts) > 1 else "public." + "".join(parts)


_RELATION_OBJECTS = frozenset({"OBJECT_VIEW", "OBJECT_TABLE", "OBJECT_MATVIEW",
                               "OBJECT_FOREIGN_TABLE"})
_DDL_KINDS = frozenset({"create", "alter", "do"})


def learned(st: Statement, known: ViewMap | None = None) -> dict[str, frozenset[str]]:
    """Edges a statement adds to the view map when it runs: a view (or a relation with
    a new rewrite rule) -> the relations behind it. ``known`` resolves renames.

    Example::

        >>> from pgguard.policy.classify import classify
        >>> learned(classify("CREATE TEMP VIEW v AS SELECT * FROM orders")[0])["public.v"]
        frozenset({'public.orders'})
    """
    if _DDL_KINDS.isdisjoint(st.kinds):
        return {}
    touched = frozenset(st.relations_written) | frozenset(st.relations_read)
    try:
        tree = orjson.loads(_pg.parse_sql_json(st.text))["stmts"][0]["stmt"]
    except Exception:       # noqa: BLE001 - unreadable here: read it coarsely below
        tree = None
    tag, body = next(iter(tree.items())) if type(tree) is dict and tree else ("", {})
    names: tuple[str, ...] = ()
    coarse = inherits = False
    if tag == "ViewStmt":
        names = _rv_names(body.get("view"))
    elif tag == "RuleStmt":
        names = _rv_names(body.get("relation"))
    elif tag == "CreateStmt" and body.get("inhRelations"):
        # a partition or inheritance child holds rows of its parents: rules on them cover it
        names = _rv_names(body.get("relation"))
        inherits = True
    elif tag == "AlterTableStmt":
        names = _attached(body)
        inherits = True
    elif tag == "CreateTableAsStmt" and body.get("objtype") == "OBJECT_MATVIEW":
        names = _rv_names((body.get("into") or {}).get("rel"))
    elif tag == "CreateSchemaStmt":
        for el in body.get("schemaElts") or ():
            inner = el.get("ViewStmt") if type(el) is dict else None
            if inner is not None:
                names += _rv_names(inner.get("view"), body.get("schemaname"))
    elif tag in ("RenameStmt", "AlterObjectSchemaStmt") and known:
        kind = body.get("renameType") or body.get("objectType")
        if kind not in _RELATION_OBJECTS:
            return {}
        rv = body.get("relation")
        old = [n for n in _rv_names(rv) if n in known]
        if not old or type(rv) is not dict:
            return {}
        behind = frozenset().union(*(known.edges[n] for n in old))
        if tag == "RenameStmt":
            new = _rv_names(dict(rv, relname=body.get("newname") or ""))
        else:
            new = _aliases(body.get("newschema") or "public", rv.get("relname", ""))
        return {n: behind for n in new}
    elif tag == "CreateFunctionStmt":
        # what its body touches, for an INSTEAD OF trigger that may run it later
        return {_FUNCTION + _qualified(body.get("funcname")): touched} if touched else {}
    elif tag == "CreateTrigStmt" and body.get("timing") == _TRIGGER_INSTEAD:
        fn = frozenset({_FUNCTION + _qualified(body.get("funcname"))})
        return {n: fn for n in _rv_names(body.get("relation"))}
    elif tag == "DoStmt" and "create" in st.kinds:
        # a DO block that creates relations (pgguard does not tell views from tables
        # there): each relation it writes may be a view over everything it touches
        coarse = True
        names = tuple(n for w in st.relations_written
                      for n in ((w, "public." + w.split(".", 1)[1])
                                if w.startswith("pg_temp.") else (w,)))
    if not names:
        return {}
    edges: dict[str, frozenset[str]] = {}
    # the object itself, as the classifier named it among the relations written
    selves = frozenset(names) & frozenset(st.relations_written)
    for n in names:
        behind = touched - ({n} if coarse else selves)
        if behind:
            edges[n] = frozenset(behind)
            if inherits:            # and a statement on the parent reaches the child
                for parent in behind - {n}:
                    edges[_CHILDREN + parent] = edges.get(_CHILDREN + parent,
                                                          _EMPTY) | {n}
    return edges


def _attached(body: dict) -> tuple[str, ...]:
    """The tables ALTER TABLE ... ATTACH PARTITION / INHERIT makes children of another."""
    out: tuple[str, ...] = ()
    for c in body.get("cmds") or ():
        cmd = c.get("AlterTableCmd") if type(c) is dict else None
        if type(cmd) is not dict or type(cmd.get("def")) is not dict:
            continue
        if cmd.get("subtype") == "AT_AttachPartition":
            out += _rv_names((cmd["def"].get("PartitionCmd") or {}).get("name"))
        elif cmd.get("subtype") == "AT_AddInherit":
            out += _rv_names(body.get("relation"))
    return out


class SessionViews:
    """One session's view knowledge: the database's map (``source()``, kept by the
    proxy) plus what this session's own statements created (its TEMP views, views of a
    transaction not yet committed). ``publish(edges)`` is told about views others may
    see (not temporary) as soon as the session sends them."""

    __slots__ = ("_source", "_publish", "own", "_base", "_combined")

    def __init__(self, source: Callable[[], ViewMap],
                 publish: Callable[[dict[str, frozenset[str]]], None]) -> None:
        self._source = source
        self._publish = publish
        self.own: dict[str, frozenset[str]] = {}
        self._base: ViewMap | None = None
        self._combined: ViewMap | None = None

    def current(self) -> ViewMap:
        """The map decisions of this session expand with."""
        base = self._source()
        if not self.own:
            return base
        if base is not self._base or self._combined is None:
            self._base = base
            self._combined = base.merged(self.own)
        return self._combined

    def learn(self, stmts: Iterable[Statement]) -> bool:
        """Remember the views ``stmts`` create (once they were let through); True when
        this session now knows views the database's map does not show."""
        vm = self.current()
        own: dict[str, frozenset[str]] = {}
        shared: dict[str, frozenset[str]] = {}
        for st in stmts:
            new = learned(st, vm)
            if not new:
                continue
            vm = vm.merged(new)
            for k, v in new.items():
                own[k] = own.get(k, _EMPTY) | v
                if not k.startswith(("pg_temp.", "pg_temp_")) and not _is_temp_alias(k, new):
                    shared[k] = shared.get(k, _EMPTY) | v
        if not own:
            return False
        for k, v in own.items():
            self.own[k] = self.own.get(k, _EMPTY) | v
        self._combined = None
        if shared:
            self._publish(shared)
        return True


# the key of the code a write to a table runs (triggers, defaults, checks) in runs
_WRITE_CODE = "\0write:"
# the statement kinds that write rows (and so run a table's triggers, defaults, checks,
# index expressions, domain checks)
_ROW_WRITES = frozenset({"insert", "update", "delete", "merge", "copy", "analyze"})
# the key of what runs beside DDL (event triggers); "\0op:<symbol>" and "\0cast:<type>"
# those of user operators and casts
_DDL_CODE = "\0ddl"
_DDL_KINDS = frozenset({"create", "alter", "drop", "grant", "revoke", "comment",
                        "security_label", "refresh"})
_DEFINITIONS: dict[str, Statement | None] = {}
_UNREADABLE = Statement(kind="select", flags=("opaque",), reasons=(Reason(
    "opaque", "its definition could not be read by pgguard's parser"),))


def _definition(text: str) -> Statement | None:
    """What a view's definition (``pg_get_viewdef``) runs, as the classifier reads it;
    None when it calls no function (its relations are the map's edges already).
    Cached by text: the map is read again every few seconds."""
    if text in _DEFINITIONS:
        return _DEFINITIONS[text]
    try:
        got = classify(text)
        st = got[0] if len(got) == 1 else _UNREADABLE
    except Exception:       # noqa: BLE001 - unreadable: what it runs is not known
        st = _UNREADABLE
    if st is not _UNREADABLE and not st.functions and not st.flags:
        st = None
    if len(_DEFINITIONS) >= 20_000:
        _DEFINITIONS.clear()
    _DEFINITIONS[text] = st
    return st


def _is_temp_alias(name: str, edges: Mapping[str, frozenset[str]]) -> bool:
    # public.<n> learned as the unqualified alias of a TEMP view pg_temp.<n>
    return name.startswith("public.") and ("pg_temp." + name[7:]) in edges
