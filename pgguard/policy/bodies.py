# Calls of user functions judged by what their bodies run now.
"""A statement that calls a function pgguard did not write (not a built-in) runs that
function's body: ``SELECT purge_orders()`` deletes what the body deletes. The body was
classified once, when CREATE FUNCTION went by (against names as they resolved then), if
pgguard saw it at all (a DBA may have created it directly upstream). So a call is judged
by the body as it is at the call:

- the proxy reads every overload the called name may mean from the upstream catalog
  (``pg_proc``: a qualified name in its schema, a bare one in every schema but
  ``pg_catalog`` and ``information_schema``, a superset of what any search_path can
  reach), and turns each into a :class:`Judgement` (:func:`judgement`): SQL and PL/pgSQL
  bodies are read by the classifier exactly as the CREATE FUNCTION path reads them
  (:func:`pgguard.policy.classify.classify_function_body`); bodies in other languages
  (C, internal, plpython...) are left to the blast-radius guard, which measures the
  rows any call of a non-built-in function changes, as before;
- :class:`Bodies` folds what the bodies run (statement kinds, relations written and
  read, functions, flags and their reasons, settings, whether rows change) into the
  calling statement, through the current view map, before any rule matches; calls the
  bodies make to other user functions are followed to :data:`MAX_DEPTH` levels; a
  cycle, or a chain deeper than that, is ``opaque`` (refused under the guarded
  default) with a reason that says so;
- a name not yet read raises :class:`BodiesPending` (the session holds the statement,
  reads the catalog, and decides again); a catalog that could not be read raises
  :class:`BodiesUnreadable` (refused: fail closed).

Example::

    >>> j = judgement("f", [("public", "f", 1, "sql", "f", False, "v", None,
    ...     "CREATE FUNCTION public.f() RETURNS void LANGUAGE sql AS 'DELETE FROM t WHERE id = 1'",
    ...     None)])
    >>> b = Bodies(lambda n: n != "now", {"f": j}.get)
    >>> from pgguard.policy.classify import classify
    >>> st = b.expand(classify("SELECT f()"))[0]
    >>> st.kinds, st.relations_written
    (('select', 'delete'), ('public.t',))
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import msgspec
import orjson
from pglast import parser as _pg

from .classify import FLAGS, SQL_SYNTAX_CALLS, Reason, Statement, classify, \
    classify_function_body

if TYPE_CHECKING:
    from .views import ViewMap

__all__ = ["MAX_DEPTH", "SEEN_LANGUAGES", "Bodies", "BodiesPending", "BodiesUnreadable",
           "Judgement", "judgement", "own_definitions", "unreadable"]

# calls followed through bodies: f() -> g() -> h() is depth 3
MAX_DEPTH = 4
# languages whose bodies the classifier reads
SEEN_LANGUAGES = frozenset({"sql", "plpgsql"})

_VERBS = {"delete": "deletes from", "update": "updates", "insert": "inserts into",
          "merge": "merges into", "truncate": "truncates", "copy": "copies into"}


class BodiesPending(Exception):
    """Some called function names are not read yet: ``names`` to read first."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(dict.fromkeys(names))
        super().__init__(", ".join(self.names))


class BodiesUnreadable(Exception):
    """The catalog could not be read for ``name``: the call is refused."""

    def __init__(self, name: str, error: str) -> None:
        self.name, self.error = name, error
        super().__init__(f"{name}: {error}")


class Judgement(msgspec.Struct, frozen=True):
    """What calling one name runs: ``body`` merges every overload's body (None: no
    overload has a body pgguard reads, so nothing is added); ``found`` how many
    overloads the catalog has; ``other_languages`` those it cannot read (the guard
    measures them); ``nested`` other functions they run; ``error`` set when the catalog
    could not be read; ``digest`` tells two readings apart."""

    name: str
    found: int = 0
    body: Statement | None = None
    other_languages: tuple[str, ...] = ()
    nested: tuple[str, ...] = ()
    security_definer: bool = False
    error: str = ""
    digest: str = ""


def _qual(schema: str, name: str) -> str:
    return f"{schema}.{name}"


def judgement(name: str, rows: list[tuple]) -> Judgement:
    """The judgement of a called ``name`` from the catalog's rows of its overloads:
    (schema, name, oid, language, kind, security definer, volatility, SET clauses,
    definition or None, support functions of an aggregate or None)."""
    bodies: list[Statement] = []
    other: dict[str, None] = {}
    nested: dict[str, None] = {}
    secdef = False
    h = hashlib.sha256()
    for row in sorted(rows, key=lambda r: int(r[2])):
        schema, pname, _oid, lang, kind, sdef, _vol, _cfg, definition, support = row[:10]
        h.update(repr(row).encode())
        secdef = secdef or sdef in (True, "t")
        what = f"{pname}()" if "." not in name else f"{_qual(schema, pname)}()"
        if sdef in (True, "t"):
            what += " (SECURITY DEFINER)"
        builtin = []
        for s in (support or "").split(","):
            s = s.strip()
            if s:
                nested[s] = None
                if s.startswith("pg_catalog."):
                    builtin.append(s)
        if builtin:
            # an aggregate's built-in support functions run on every call: judged as
            # calls of them (set_config: settings pgguard never sees change)
            bodies.append(_support_calls(what, builtin))
        # (an alias of set_config is left to the settings watch: a pinned setting that
        # moves ends the session, whatever moved it, and the watch's own tests use one)
        aliases = [a for a in ((row[10] if len(row) > 10 else None) or "").split(",")
                   if a and a != "pg_catalog.set_config"]
        if aliases:
            # C / internal code that is also another function's (pg_terminate_backend
            # under a DBA's name, an extension's dblink_exec): judged as calls of those
            # by name, not followed (they are the same code, not a body to read)
            bodies.append(_support_calls(what, aliases, alias=lang))
        if lang in SEEN_LANGUAGES and definition:
            st = classify_function_body(definition, what)
            bodies.append(st)
            for f in st.functions:
                nested[f] = None
        elif kind != "a":
            other[lang or "?"] = None
    body = _union_all(bodies) if bodies else None
    return Judgement(name=name, found=len(rows), body=body, other_languages=tuple(other),
                     nested=tuple(nested), security_definer=secdef, digest=h.hexdigest())


def _support_calls(what: str, names: list[str], alias: str | None = None) -> Statement:
    # "SELECT f(), g()" of the aggregate's built-in support functions, as the
    # classifier judges such calls (no literal argument: set_config's setting unknown)
    calls = ", ".join(
        ".".join('"' + part.replace('"', '""') + '"' for part in n.split(".", 1)) + "()"
        for n in names)
    st = classify(f"SELECT {calls}")[0]
    if not st.flags and st.readonly:
        return st
    listed = ", ".join(n.rpartition('.')[2] + '()' for n in names)
    lead = Reason(st.flags[0] if st.flags else "write",
                  f"{what} is written in {alias} as the same code as {listed}"
                  if alias else
                  f"{what} is an aggregate whose support functions ({listed}) run on "
                  "every row it reads, with values pgguard never sees")
    return msgspec.structs.replace(st, reasons=(lead, *st.reasons))


def unreadable(name: str, error: str) -> Judgement:
    return Judgement(name=name, error=error[:300] or "unknown error", digest="error")


def _union_all(sts: list[Statement]) -> Statement:
    if len(sts) == 1:
        return sts[0]
    def merged(attr: str) -> tuple:
        return tuple(dict.fromkeys(x for st in sts for x in getattr(st, attr)))
    flags = {f for st in sts for f in st.flags}
    kinds = merged("kinds")
    return Statement(
        kind=next((k for k in kinds if k != "select"), "select"), kinds=kinds,
        relations_written=merged("relations_written"),
        relations_read=merged("relations_read"), functions=merged("functions"),
        flags=tuple(f for f in FLAGS if f in flags), reasons=merged("reasons"),
        readonly=all(st.readonly for st in sts), settings=merged("settings"),
        changes_rows=any(st.changes_rows for st in sts))


def own_definitions(stmts: Iterable[Statement]) -> dict[str, Statement]:
    """Bodies of functions ``stmts`` create (CREATE [OR REPLACE] FUNCTION/PROCEDURE at
    top level), by bare name: what a session's own calls run before its transaction is
    committed (the catalog shows them only then)."""
    out: dict[str, Statement] = {}
    for st in stmts:
        if "create" not in st.kinds:
            continue
        try:
            tree = orjson.loads(_pg.parse_sql_json(st.text))["stmts"][0]["stmt"]
        except Exception:       # noqa: BLE001 - nothing readable: nothing learned
            continue
        b = tree.get("CreateFunctionStmt") if type(tree) is dict else None
        if type(b) is not dict:
            continue
        parts = [n.get("String", {}).get("sval", "") for n in b.get("funcname") or ()
                 if type(n) is dict]
        if parts:
            out[parts[-1]] = classify_function_body(st.text, f"{parts[-1]}()")
    return out


def created_functions(stmts: Iterable[Statement]) -> list[str]:
    """Bare names of the functions, procedures and aggregates ``stmts`` create (at top
    level, or among a CREATE SCHEMA's elements)."""
    out: list[str] = []
    for st in stmts:
        if "create" not in st.kinds:
            continue
        try:
            trees = [s["stmt"] for s in orjson.loads(_pg.parse_sql_json(st.text))["stmts"]]
        except Exception:       # noqa: BLE001 - nothing readable: the policy refused it
            continue
        while trees:
            tree = trees.pop()
            if type(tree) is not dict:
                continue
            cs = tree.get("CreateSchemaStmt")
            if type(cs) is dict:
                trees.extend(cs.get("schemaElts") or ())
            b = tree.get("CreateFunctionStmt")
            names = b.get("funcname") if type(b) is dict else None
            d = tree.get("DefineStmt")
            if type(d) is dict and d.get("kind") == "OBJECT_AGGREGATE":
                names = d.get("defnames")
            parts = [n.get("String", {}).get("sval", "") for n in names or ()
                     if type(n) is dict]
            if parts and parts[-1]:
                out.append(parts[-1])
    return out


_DEFINES_CODE = ("CreateFunctionStmt",)


# statements that store nothing themselves (their kinds may hold a called body's CREATE,
# folded in by an earlier round of expansion: the body is judged on its own)
_RUNS_ONLY = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt",
                        "CallStmt"})


def _plants(st: Statement) -> bool:
    """A CREATE or ALTER that stores what it calls (not a function's or an aggregate's
    own definition: calls of those are judged by their bodies when they run)."""
    if not ("create" in st.kinds or "alter" in st.kinds):
        return False
    try:
        stmt = orjson.loads(_pg.parse_sql_json(st.text))["stmts"][0]["stmt"]
    except Exception:       # noqa: BLE001 - unreadable here: it keeps whatever it calls
        return True
    tag, body = next(iter(stmt.items())) if type(stmt) is dict and stmt else ("", None)
    if tag in _DEFINES_CODE or tag in _RUNS_ONLY:
        return False
    if tag == "DefineStmt" and type(body) is dict and body.get("kind") == "OBJECT_AGGREGATE":
        return False
    return True


def _bare(name: str) -> str:
    return name.rpartition(".")[2]


class Bodies:
    """Expands calling statements with the bodies they run.

    ``is_user(name)``: the name may be a function pgguard cannot see into (not a
    built-in); ``lookup(name)``: its :class:`Judgement`, or None when not read yet;
    ``own``: bodies this session created (by bare name), judged with the catalog's;
    ``strict_missing``: a name the catalog does not show is opaque (the session made
    function DDL the catalog may not show yet) rather than left to the guard."""

    __slots__ = ("is_user", "lookup", "own", "strict_missing", "builtin")

    def __init__(self, is_user: Callable[[str], bool],
                 lookup: Callable[[str], Judgement | None],
                 own: Mapping[str, Statement] | None = None,
                 strict_missing: bool = False,
                 builtin: Callable[[str], bool] | None = None) -> None:
        self.is_user = is_user
        self.lookup = lookup
        self.own = own or {}
        self.strict_missing = strict_missing
        # an unqualified name pg_catalog has: with no other overload, the call runs it
        self.builtin = builtin or (lambda name: False)

    def needs(self, stmts: Iterable[Statement]) -> bool:
        """Whether any statement calls a user function (then expand() matters)."""
        test = self.is_user
        return any(test(f) for st in stmts for f in (*st.functions, *st.field_calls))

    def expand(self, stmts: Iterable[Statement],
               views: ViewMap | None = None) -> tuple[Statement, ...]:
        """``stmts`` with what their calls of user functions run folded in (through
        ``views``); raises BodiesPending / BodiesUnreadable."""
        out = []
        missing: dict[str, None] = {}
        for st in stmts:
            calls = [f for f in st.functions if self.is_user(f)]
            # o.f / (o).f: a call when the catalog has a user function of that name
            # (then it is a call in functional notation; a column otherwise)
            for f in st.field_calls:
                if f in calls or not self.is_user(f):
                    continue
                j = self.lookup(f)
                if j is None:
                    missing[f] = None
                elif j.error:
                    raise BodiesUnreadable(f, j.error)
                elif j.found or _bare(f) in self.own:
                    calls.append(f)
            if not calls:
                out.append(st)
                continue
            found: list[tuple[str, Statement]] = []
            extra: list[Reason] = []
            if _plants(st):
                # a definition that keeps the call for later (a view, a default, a
                # check, an operator, a cast, a range type's subtype_diff, an operator
                # class's support function, a handler): later statements run it
                # unjudged (an INSERT into an indexed table, ANALYZE, the planning of a
                # plain SELECT), and its body may change meaning by then
                for f in calls:
                    extra.append(Reason(
                        "opaque", f"{st.kind.upper()} keeps a call of {f}() in a definition "
                                  "(a view, a default or check, an operator, a cast, a "
                                  "type or range type, an operator class, a trigger or "
                                  "handler): later statements would run it where pgguard "
                                  "does not judge what it does; call the function "
                                  "yourself where you need it, or name a built-in one"))
                out.append(self._merged(st, found, extra, views))
                continue
            for f in calls:
                self._visit(f, (), found, extra, missing)
            out.append(self._merged(st, found, extra, views) if not missing else st)
        if missing:
            raise BodiesPending(missing)
        return tuple(out)

    def _visit(self, name: str, path: tuple[str, ...], found: list, extra: list,
               missing: dict) -> None:
        if _bare(name) in {_bare(p) for p in path}:
            chain = " -> ".join(f"{p}()" for p in (*path, name))
            extra.append(Reason(
                "opaque", f"the calls {chain} form a cycle: pgguard does not follow "
                          "recursive calls of user functions; send the statements the "
                          "functions run themselves, or ask an administrator for a rule "
                          "that allows the call"))
            return
        if len(path) >= MAX_DEPTH:
            chain = " -> ".join(f"{p}()" for p in (*path, name))
            extra.append(Reason(
                "opaque", f"the calls {chain} nest deeper than {MAX_DEPTH} user "
                          "functions: pgguard does not follow them further; send the "
                          "statements the functions run themselves, or ask an "
                          "administrator for a rule that allows the call"))
            return
        j = self.lookup(name)
        if j is None:
            missing[name] = None
            return
        if j.error:
            raise BodiesUnreadable(name, j.error)
        own = self.own.get(_bare(name))
        if own is not None:
            found.append((name, own))
        if j.found == 0 and own is None and not self.builtin(name) and \
                name not in SQL_SYNTAX_CALLS:
            # nothing by that name where pgguard looked: either no such function (the
            # call would fail anyway) or one pgguard's reading of the name misses (a
            # name with a dot or a quote in it, a schema it cannot see): never run
            # unjudged
            extra.append(Reason(
                "opaque", f"{name}() is not a function pgguard finds in the upstream "
                          "catalog (not created yet, created in a transaction not yet "
                          "committed, or a name it cannot resolve): pgguard cannot see "
                          "what it runs; commit the function first and call it by its "
                          "plain or schema-qualified name"))
        if j.body is not None:
            found.append((name, j.body))
        nxt = (*path, name)
        nested = list(j.nested)
        if own is not None:
            nested += [f for f in own.functions if f not in nested]
        for f in nested:
            if self.is_user(f):
                self._visit(f, nxt, found, extra, missing)

    def _merged(self, st: Statement, found: list[tuple[str, Statement]],
                extra: list[Reason], views: ViewMap | None) -> Statement:
        if not found and not extra:
            return st
        kinds = dict.fromkeys(st.kinds)
        written = dict.fromkeys(st.relations_written)
        read = dict.fromkeys(st.relations_read)
        funcs = dict.fromkeys(st.functions)
        for name, _body in found:
            funcs[name] = None          # a call in functional notation (o.f) too
        flags = set(st.flags)
        reasons: list[Reason] = []
        settings = dict.fromkeys(st.settings)
        changes = st.changes_rows
        readonly = st.readonly
        for name, body in found:
            if views is not None:
                body = views.expand((body,))[0]
            for k in body.kinds:
                kinds[k] = None
            for r in body.relations_written:
                written[r] = None
            for r in body.relations_read:
                read[r] = None
            for f in body.functions:
                funcs[f] = None
            flags.update(body.flags)
            settings.update(dict.fromkeys(body.settings))
            changes = changes or body.changes_rows
            readonly = readonly and body.readonly
            seen = _summary(name, body, views)
            if seen is not None:
                reasons.append(Reason("write", seen))
            reasons.extend(body.reasons)
        reasons.extend(extra)
        flags.update(r.flag for r in extra)
        return msgspec.structs.replace(
            st, kinds=tuple(kinds), relations_written=tuple(written),
            relations_read=tuple(read), functions=tuple(funcs),
            flags=tuple(f for f in FLAGS if f in flags),
            # what the bodies run is said first: a refusal names the call
            reasons=tuple(dict.fromkeys(reasons + list(st.reasons))),
            settings=tuple(settings), changes_rows=changes,
            readonly=readonly and not flags, counted_by_tag=False)


def _summary(name: str, body: Statement, views: ViewMap | None) -> str | None:
    """"f() deletes from public.v, a view over public.orders" for a body that writes."""
    raw = [r for r in body.relations_written]
    if not raw:
        return None
    verbs = [v for k, v in _VERBS.items() if k in body.kinds]
    verb = verbs[0] if len(verbs) == 1 else "writes"
    parts = []
    shown: set[str] = set()
    for r in raw:
        if r in shown:
            continue
        bases = views.bases(r) if views is not None and r in views else ()
        bases = tuple(b for b in bases if not b.startswith("function:"))
        shown.update(bases)
        shown.add(r)
        parts.append(f"{r}, a view over {', '.join(bases)}" if bases else r)
    return f"{name}() {verb} {'; '.join(parts)}"
