# Policy rules: ordered [[rules]] and the [policy] defaults turn classifications into decisions.
"""Decide what happens to a statement text: allow, block, or hold for approval.

``PolicyEngine(cfg).decide(sql, identity_name, identity, database)`` classifies every
statement of ``sql`` (:mod:`pgguard.policy.classify`) and runs the ``[[rules]]`` in order;
the first rule whose ``when`` matches decides a statement. ``when`` keys AND together; the
items of a list OR together:

``identity``   identity names; ``kind``: ``agent`` or ``human``; ``groups``: any group of the
identity; ``databases``: globs on the database name; ``statements``: statement kinds
(``delete``, ``drop``, ...; see classify); ``flags``: destructive, privilege, escape,
opaque, write; ``relations``: globs on schema-qualified names read or written
(``public.orders``, ``audit.*``; a pattern without a dot matches the table in any schema);
``functions``: globs on function names (``pg_read_file`` also matches
``pg_catalog.pg_read_file``; ``dblink*``).

Statement-side keys (``statements``, ``flags``, ``relations``, ``functions``) are read so
that a rule never lets more through than it names:

- in a ``block`` or ``approve`` rule a key matches when **any** item of the statement
  matches (``relations = ["public.orders"]`` catches a join that reads orders);
- in an ``allow`` rule a key matches only when the statement has items and **every** one
  is listed (``relations = ["staging.*"]`` does not allow ``INSERT INTO staging.x SELECT
  * FROM public.users``; ``statements = ["select"]`` does not allow
  ``WITH d AS (DELETE ...) SELECT``, whose kinds are select and delete).

When no rule matches, ``[policy] agents`` / ``humans`` decides: ``guarded`` blocks a
statement flagged destructive, privilege, escape or opaque (rule name
``guarded-default``); ``allow`` allows (``allow-default``); ``block`` blocks everything
but transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE), so that a client
can always end a transaction (``block-default``).

Before the rules, a built-in check (rule name ``settings``) refuses a statement that
changes a run-time setting outside the allow-list (:class:`SettingsPolicy`:
:data:`pgguard.config.DEFAULT_SETTINGS` plus ``[policy] settings``); no rule can open
role, session_authorization, session_replication_role, row_security, the parser's
settings, server libraries or read-only mode being turned off.

An allowed (or approved) text whose statements update or delete rows
(``Statement.changes_rows``) carries ``Decision.max_rows``: the smallest ``max_rows`` of
the rules that allowed those statements, else ``[policy] agents_max_rows`` (default 1000)
or ``humans_max_rows`` (default 0: no limit); the session enforces it at run time.

A text of several statements is refused as a whole when any statement is refused: the
first blocked statement decides, else the first that needs approval. Unparseable text is
blocked by rule ``parse-error``, over-long text by ``statement-too-long``, and any failure
inside pgguard by ``internal-error``: nothing is ever allowed because classification
failed.

Example::

    >>> from pgguard.config import loads, Identity
    >>> engine = PolicyEngine(loads(""))
    >>> d = engine.decide("DROP INDEX orders_pkey", "ci-agent", Identity(kind="agent"), "app")
    >>> d.action, d.rule
    ('block', 'guarded-default')
    >>> print(d.message)  # doctest: +NORMALIZE_WHITESPACE
    pgguard: statement refused by rule "guarded-default":
    DROP INDEX public.orders_pkey is destructive
"""
from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from ..config import DEFAULT_SETTINGS, Config, Identity, Rule, never_setting, parse_duration
from ..errors import PolicyRefusal
from .cache import DecisionCache, shape_key, shareable
from .classify import (DEFAULT_MAX_LENGTH, FLAGS, PolicyParseError, Reason, Statement,
                       StatementTooLong, classify)

from .bodies import MAX_DEPTH, BodiesPending, BodiesUnreadable

if TYPE_CHECKING:
    from .bodies import Bodies
    from .views import ViewMap

__all__ = ["Decision", "Verdict", "PolicyEngine", "SettingsPolicy", "GUARDED_FLAGS"]

GUARDED_FLAGS = ("destructive", "privilege", "escape", "opaque")
_TXN_KINDS = frozenset({"begin", "commit", "rollback", "savepoint", "release"})
_GENERIC_AGENT = Identity(kind="agent")


class Verdict(msgspec.Struct, frozen=True):
    """What one statement of the text got: the action and the rule that chose it."""

    action: str
    rule: str


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome for a whole statement text.

    ``action`` is ``allow``, ``block`` or ``approve``; ``rule`` names the deciding rule;
    ``message`` / ``detail`` / ``hint`` are the ErrorResponse fields a refused client sees
    (SQLSTATE 42501); ``statements`` and ``verdicts`` give each statement's classification
    and verdict; ``index`` is the statement that decided a refusal (-1 otherwise);
    ``position`` the 1-based character a parse error points at; ``timeout`` (seconds) and
    ``approvers`` come from an ``approve`` rule; ``max_rows`` is the blast-radius limit of
    the statements that update or delete rows.

    A decision served from the shape cache was computed for another text of the same
    shape: its ``statements[i].text`` is that text's, not necessarily yours.

    Example::

        >>> from pgguard.config import Identity, loads
        >>> d = PolicyEngine(loads("")).decide("DELETE FROM t WHERE 1 = 1", "bot",
        ...                                    Identity(), "app")
        >>> d.allowed, d.hint
        (False, 'Add a WHERE clause that selects only the rows you mean to change.')
    """

    action: str
    rule: str
    message: str = ""
    detail: str = ""
    hint: str = ""
    statements: tuple[Statement, ...] = ()
    verdicts: tuple[Verdict, ...] = ()
    index: int = -1
    position: int | None = None
    timeout: float | None = None
    approvers: tuple[str, ...] = ()
    # blast-radius limit for the statements of this text that update or delete rows
    # (Statement.changes_rows): the smallest max_rows of the rules that allowed them, else
    # [policy] agents_max_rows / humans_max_rows; None when nothing changes rows or there
    # is no limit. Set on allow and approve decisions.
    max_rows: int | None = None

    @property
    def allowed(self) -> bool:
        return self.action == "allow"

    def error(self) -> PolicyRefusal:
        """The refusal as an exception carrying SQLSTATE 42501, message, detail and hint."""
        return PolicyRefusal(self.message, detail=self.detail or None, hint=self.hint or None)


# --------------------------------------------------------------------------- matching

def _glob(patterns: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(fnmatch.translate(p) for p in patterns))


class _CompiledRule:
    """One [[rules]] entry with its globs compiled."""

    __slots__ = ("name", "action", "timeout", "approvers", "identity", "kind", "groups",
                 "databases", "statements", "flags", "relations", "functions", "any",
                 "max_rows")

    def __init__(self, rule: Rule) -> None:
        w = rule.when
        self.name = rule.name
        self.action = rule.action
        self.max_rows = rule.max_rows
        self.timeout = parse_duration(rule.timeout) if rule.timeout else None
        self.approvers = tuple(rule.approvers or ())
        self.identity = frozenset(w.identity) if w.identity is not None else None
        self.kind = w.kind
        self.groups = frozenset(w.groups) if w.groups is not None else None
        self.databases = _glob(w.databases) if w.databases is not None else None
        self.statements = frozenset(s.lower() for s in w.statements) \
            if w.statements is not None else None
        self.flags = frozenset(w.flags) if w.flags is not None else None
        self.relations = _glob([p if "." in p else "*." + p for p in w.relations]) \
            if w.relations is not None else None
        self.functions = _glob(w.functions) if w.functions is not None else None
        # block and approve match when any item matches; allow only when all do
        self.any = rule.action != "allow"

    def applies_to(self, identity_name: str, identity: Identity, database: str) -> bool:
        if self.identity is not None and identity_name not in self.identity:
            return False
        if self.kind is not None and identity.kind != self.kind:
            return False
        if self.groups is not None and self.groups.isdisjoint(identity.groups):
            return False
        if self.databases is not None and not self.databases.match(database or ""):
            return False
        return True

    def matches(self, st: Statement) -> bool:
        if self.statements is not None and not self._set(self.statements, st.kinds):
            return False
        if self.flags is not None and not self._set(self.flags, st.flags):
            return False
        if self.relations is not None and not self._names(
                self.relations, st.relations_written + st.relations_read, False):
            return False
        if self.functions is not None and not self._names(self.functions, st.functions, True):
            return False
        return True

    def _set(self, wanted: frozenset[str], items: tuple[str, ...]) -> bool:
        if self.any:
            return not wanted.isdisjoint(items)
        return bool(items) and wanted.issuperset(items)

    def _names(self, pat: re.Pattern[str], items: tuple[str, ...], funcs: bool) -> bool:
        def hit(name: str) -> bool:
            if pat.match(name):
                return True
            if funcs:
                bare = name.rsplit(".", 1)[-1]
                return bool(pat.match(bare) or ("." not in name
                                                and pat.match("pg_catalog." + name)))
            return False
        if self.any:
            return any(hit(n) for n in items)
        return bool(items) and all(hit(n) for n in items)


# --------------------------------------------------------------------------- settings

_ON_WORDS = frozenset({"on", "true", "yes", "1", "t", "tr", "tru", "y", "ye"})
_PINNED = {"client_encoding": frozenset({"utf8", "utf-8", "unicode"}),
           "standard_conforming_strings": _ON_WORDS}
_READ_ONLY = frozenset({"transaction_read_only", "default_transaction_read_only"})


class SettingsPolicy:
    """Which run-time settings a session under a policy may change.

    The allow-list is :data:`pgguard.config.DEFAULT_SETTINGS` plus ``[policy] settings``
    (names or globs). Whatever the config says: the settings of
    :data:`pgguard.config.NEVER_SETTINGS` never change (client_encoding and
    standard_conforming_strings may only be set to the values pgguard pins), read-only
    mode may be turned on but never off, and application_name may not be computed or
    start with ``pgguard:`` (it would pass for another identity in pg_stat_activity).

    Example::

        >>> p = SettingsPolicy(["search_path"])
        >>> p.refusal("work_mem", "64MB"), p.refusal("search_path", "app")
        (None, None)
        >>> p.refusal("role", "postgres")
        'it changes who the session acts as'
    """

    def __init__(self, extra: list[str] | tuple[str, ...] = ()) -> None:
        names = [n.strip().lower() for n in (*DEFAULT_SETTINGS, *extra)]
        self.names = tuple(dict.fromkeys(names))
        self.exact = frozenset(n for n in self.names if not _is_glob(n))
        globs = [n for n in self.names if _is_glob(n)]
        self.globs = _glob(globs) if globs else None

    def refusal(self, name: str, value: str | None) -> str | None:
        """Why changing ``name`` to ``value`` is refused (None: allowed)."""
        v = value.strip().lower() if value is not None else None
        pinned = _PINNED.get(name)
        if pinned is not None and v in pinned:
            return None                          # sets what pgguard pins: no change
        why = never_setting(name)
        if why is not None:
            return why
        if name in _READ_ONLY:
            return None if v in _ON_WORDS else "read-only mode may be turned on, never off"
        if name == "application_name":
            if value is None:
                return "pgguard cannot read the new application_name"
            if unicodedata.normalize("NFKC", v).startswith("pgguard"):
                return ("an application_name starting with pgguard (pgguard:, pgguard_, "
                        "'pgguard alice') would pass for another identity's session in "
                        "pg_stat_activity")
            return None
        if name in self.exact or (self.globs is not None and self.globs.match(name)):
            return None
        return "it is not in the settings allow-list"


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


class _SettingCause:
    """Why the built-in "settings" check refused a statement."""

    __slots__ = ("name", "value", "why", "never")

    def __init__(self, name: str, value: str | None, why: str, never: bool) -> None:
        self.name, self.value, self.why, self.never = name, value, why, never


# --------------------------------------------------------------------------- messages

_FLAG_WORD = {"destructive": "is destructive", "privilege": "changes privileges",
              "escape": "reaches outside the database", "opaque": "cannot be inspected",
              "write": "writes data"}

_HINTS = {
    "where": "Add a WHERE clause that selects only the rows you mean to change.",
    "destructive": "Dropping, truncating or rewriting objects is not allowed for this "
                   "identity; ask a database administrator, or for a rule that allows it.",
    "privilege": "Role and privilege changes are reserved to administrators; connect as an "
                 "identity that is allowed to make them.",
    "escape": "Server files, programs, extensions, configuration and remote connections "
              "are not reachable through pgguard.",
    "opaque": "pgguard cannot see inside dynamic SQL, procedures, or statements it did not "
              "see prepared; send the SQL statements themselves.",
}


def _first_reason(st: Statement, flags: tuple[str, ...]) -> tuple[str, str] | None:
    for f in flags:
        for r in st.reasons:
            if r.flag == f:
                return f, r.text
    return None


def _summary(st: Statement) -> str:
    what = st.kind.upper()
    rels = st.relations_written or st.relations_read
    if rels:
        what += " on " + ", ".join(rels[:3]) + (" ..." if len(rels) > 3 else "")
    return what


def _detail(stmts: tuple[Statement, ...], i: int) -> str:
    st = stmts[i]
    parts = []
    if len(stmts) > 1:
        parts.append(f"statement {i + 1} of {len(stmts)}: {st.kind}")
    else:
        parts.append(f"statement: {st.kind}")
    if len(st.kinds) > 1:
        parts.append("runs " + ", ".join(st.kinds[1:]))
    if st.relations_written:
        parts.append("writes " + ", ".join(st.relations_written))
    if st.relations_read:
        parts.append("reads " + ", ".join(st.relations_read))
    if st.functions:
        parts.append("calls " + ", ".join(st.functions))
    for r in st.reasons:
        if r.flag != "write":
            parts.append(f"{r.flag}: {r.text}")
    detail = "; ".join(parts) + "."
    if len(stmts) > 1:
        detail += " No statement of this query was run."
    return detail


def _hint_for(st: Statement, flags: tuple[str, ...]) -> str:
    for f in flags:
        if f == "destructive":
            for r in st.reasons:
                if r.flag == f and "WHERE clause" in r.text and "MERGE" not in r.text:
                    return _HINTS["where"]
        h = _HINTS.get(f)
        if h:
            return h
    return ""


# --------------------------------------------------------------------------- engine

class PolicyEngine:
    """Rules, defaults and the decision cache of one configuration.

    ``max_statement_size`` (characters, default ``cfg.policy.max_statement_size`` when
    the config has it, else 1 MiB) bounds the text pglast is asked to parse; ``cache`` is
    a :class:`~pgguard.policy.cache.DecisionCache` (pass ``DecisionCache(0)`` to disable).

    Example::

        >>> from pgguard.config import Identity, loads
        >>> engine = PolicyEngine(loads(""))
        >>> engine.decide("SELECT 1", "ci-agent", Identity(kind="agent"), "app").action
        'allow'
    """

    def __init__(self, cfg: Config, *, cache: DecisionCache | None = None,
                 max_statement_size: int | None = None) -> None:
        self.cfg = cfg
        self.rules = [_CompiledRule(r) for r in cfg.rules]
        self.settings = SettingsPolicy(getattr(cfg.policy, "settings", ()))
        if max_statement_size is None:
            max_statement_size = getattr(cfg.policy, "max_statement_size", None)
        self.max_length = max_statement_size or DEFAULT_MAX_LENGTH
        self.cache = cache if cache is not None else DecisionCache()
        self._exact = self.cache.exact
        self._applicable: dict[tuple[str, str, str], list[_CompiledRule]] = {}

    def inspects(self, identity_name: str, identity: Identity, database: str) -> bool:
        """False when nothing could refuse this identity's statements on this database:
        its kind's default is ``allow`` and no block/approve rule applies to it (the
        session may then skip the policy entirely)."""
        pol = self.cfg.policy
        mode = pol.agents if identity.kind == "agent" else pol.humans
        if mode != "allow":
            return True
        return any(r.action != "allow"
                   for r in self._rules_for(identity_name, identity, database))

    # -- hot path -----------------------------------------------------------------------

    def decide(self, sql: str, identity_name: str, identity: Identity | None, database: str,
               prepared: Mapping[str, Statement] | None = None, *,
               views: ViewMap | None = None, functions: Bodies | None = None) -> Decision:
        """Decide ``sql`` for this identity and database; cached; never raises (but
        BodiesPending: see below).

        ``prepared`` is the session's :class:`~pgguard.policy.classify.PreparedMemory`
        (or any name -> Statement mapping) so that SQL ``EXECUTE name`` is judged as what
        it runs; decisions that consult it (``Statement.session_dependent``) are never
        cached. ``views`` (a :class:`~pgguard.policy.views.ViewMap`) adds the relations
        behind each view to the relations a statement reads and writes before any rule
        matches; a decision made with a map is not cached here (the map changes under
        it: the caller's caches must be emptied when it does). ``functions`` (a
        :class:`~pgguard.policy.bodies.Bodies`) folds what called user functions run
        into the statements that call them (after the view map, which it resolves the
        bodies through); it raises :class:`~pgguard.policy.bodies.BodiesPending` when a
        function must be read from the catalog first (decide again once it is); such
        decisions are not cached here either.
        """
        if views is not None or functions is not None:
            return self.decide_uncached(sql, identity_name, identity, database, prepared,
                                        views=views, functions=functions)
        key = (sql, identity_name, database)
        d = self._exact.get(key)
        if d is not None:
            self.cache.hits_exact += 1
            return d
        try:
            cache = self.cache
            skey = None
            if len(sql) <= cache.max_text and cache.shape.maxsize > 0:
                skey = shape_key(sql)
                if skey is not None:
                    d = cache.shape.get((skey, identity_name, database))
                    if d is not None:
                        # not copied into the exact map: pgbench-like traffic would only
                        # churn it (a shape hit costs ~1-2 µs anyway)
                        cache.hits_shape += 1
                        return d
            cache.misses += 1
            d = self._decide(sql, identity_name, identity, database, prepared)
            if d.rule != "internal-error" and len(sql) <= cache.max_text and not any(
                    s.session_dependent for s in d.statements):
                self._exact.put(key, d, len(sql))
                if skey is not None and shareable(d):
                    cache.shape.put((skey, identity_name, database), d, len(skey))
            return d
        except Exception as e:  # noqa: BLE001 - fail closed, whatever went wrong
            return self._internal_error(e)

    def decide_uncached(self, sql: str, identity_name: str, identity: Identity | None,
                        database: str, prepared: Mapping[str, Statement] | None = None, *,
                        views: ViewMap | None = None,
                        functions: Bodies | None = None) -> Decision:
        """Like :meth:`decide` without the cache (``pgguard explain``, tests)."""
        try:
            return self._decide(sql, identity_name, identity, database, prepared,
                                views=views, functions=functions)
        except BodiesPending:
            raise
        except BodiesUnreadable as e:
            return Decision(
                action="block", rule="function-body",
                message='pgguard: statement refused by rule "function-body": pgguard could '
                        f"not read the definition of {e.name}() from the upstream catalog",
                detail=f"the catalog lookup failed: {e.error}",
                hint="pgguard judges a call of a user function by what its body runs; "
                     "try again in a moment, or send the statements the function runs.")
        except Exception as e:  # noqa: BLE001
            return self._internal_error(e)

    # -- decision -----------------------------------------------------------------------

    def _role_schemas(self, st: Statement) -> Statement:
        """``st``, destructive when it creates a schema named like a role pgguard logs in
        as upstream: first on that role's default search_path ("$user", public), its
        tables and functions would take the place of public's for every session of the
        role that does not set a path (the application's, a human's through pgguard)."""
        roles = {self.cfg.upstream.user} | {
            i.upstream_user for i in self.cfg.identities.values() if i.upstream_user}
        hit = [n for n in st.schemas_created if n in roles]
        if not hit:
            return st
        why = (f"CREATE SCHEMA {hit[0]}: a schema named like the upstream role {hit[0]} "
               f"comes first on its default search_path (\"$user\", public), so its "
               "tables and functions would replace public's for every session of that role")
        return msgspec.structs.replace(
            st, flags=tuple(f for f in FLAGS if f in st.flags or f == "destructive"),
            reasons=st.reasons + (Reason("destructive", why),))

    def _decide(self, sql: str, identity_name: str, identity: Identity | None,
                database: str, prepared: Mapping[str, Statement] | None, *,
                views: ViewMap | None = None, functions: Bodies | None = None) -> Decision:
        if identity is None:
            identity = _GENERIC_AGENT
        try:
            stmts = tuple(classify(sql, prepared=prepared, max_length=self.max_length))
        except StatementTooLong as e:
            return Decision(
                action="block", rule="statement-too-long",
                message=f'pgguard: statement refused by rule "statement-too-long": {e.message}',
                detail=f"text length {len(sql)} characters; limit {self.max_length}.",
                hint="Send smaller statements (use COPY FROM STDIN for bulk data).")
        except PolicyParseError as e:
            where = f" at character {e.position}" if e.position else ""
            return Decision(
                action="block", rule="parse-error", position=e.position,
                message=f'pgguard: statement refused by rule "parse-error": {e.message}',
                detail=f"the SQL parser reported: {e.message}{where}.",
                hint="pgguard refuses SQL it cannot parse; check the syntax.")
        if not stmts:
            return Decision(action="allow", rule="empty")
        if views is not None:
            stmts = views.expand(stmts)
        if functions is not None and functions.needs(stmts):
            # to a fixed point: a body's writes run their tables' triggers and defaults
            # (folded by the view map), whose functions are judged by their bodies too
            # (SELECT f() whose INSERT fired a DBA's trigger ran it unjudged)
            for _ in range(MAX_DEPTH):
                seen = [st.functions for st in stmts]
                stmts = functions.expand(stmts, views)
                if views is not None:
                    stmts = views.expand(stmts)
                if [st.functions for st in stmts] == seen:
                    break
        if any(st.schemas_created for st in stmts):
            stmts = tuple(self._role_schemas(st) for st in stmts)
        rules = self._rules_for(identity_name, identity, database)
        mode = self.cfg.policy.agents if identity.kind == "agent" else self.cfg.policy.humans
        verdicts = []
        causes = []
        for st in stmts:
            v, cause = (st.settings and self._settings_verdict(st)) or \
                self._verdict(st, rules, mode)
            verdicts.append(v)
            causes.append(cause)
        idx = next((i for i, v in enumerate(verdicts) if v.action == "block"), -1)
        if idx < 0:
            idx = next((i for i, v in enumerate(verdicts) if v.action == "approve"), -1)
        vt = tuple(verdicts)
        if idx < 0:
            return Decision(action="allow", rule=verdicts[0].rule, statements=stmts,
                            verdicts=vt, max_rows=self._row_limit(stmts, causes, identity))
        d = self._refusal(stmts, vt, idx, causes[idx])
        if d.action == "approve":
            d = msgspec.structs.replace(d, max_rows=self._row_limit(stmts, causes, identity))
        return d

    def _rules_for(self, identity_name: str, identity: Identity,
                   database: str) -> list[_CompiledRule]:
        key = (identity_name, identity.kind, database)
        rules = self._applicable.get(key)
        if rules is None:
            rules = [r for r in self.rules if r.applies_to(identity_name, identity, database)]
            if len(self._applicable) > 4096:
                self._applicable.clear()
            self._applicable[key] = rules
        return rules

    def _settings_verdict(self, st: Statement) -> tuple[Verdict, _SettingCause] | None:
        """The built-in check that runs before the rules: every setting the statement
        changes must be in the allow-list."""
        for name, value in st.settings:
            why = self.settings.refusal(name, value)
            if why is not None:
                return Verdict("block", "settings"), _SettingCause(
                    name, value, why, never_setting(name) is not None)
        return None

    def _row_limit(self, stmts: tuple[Statement, ...], causes: list[Any],
                   identity: Identity) -> int | None:
        """The smallest blast-radius limit over the statements that change rows."""
        limit = None
        if not any(st.changes_rows for st in stmts):
            return limit
        pol = self.cfg.policy
        default = pol.agents_max_rows if identity.kind == "agent" else pol.humans_max_rows
        for st, cause in zip(stmts, causes):
            if not st.changes_rows:
                continue
            n = default
            if isinstance(cause, _CompiledRule) and cause.max_rows is not None:
                n = cause.max_rows
            if n and (limit is None or n < limit):
                limit = n
        return limit

    def _verdict(self, st: Statement, rules: list[_CompiledRule],
                 mode: str) -> tuple[Verdict, Any]:
        for r in rules:
            if r.matches(st):
                return Verdict(r.action, r.name), r
        if mode == "guarded":
            bad = tuple(f for f in GUARDED_FLAGS if f in st.flags)
            if bad:
                return Verdict("block", "guarded-default"), bad
            return Verdict("allow", "guarded-default"), None
        if mode == "block" and st.kind not in _TXN_KINDS:
            return Verdict("block", "block-default"), None
        return Verdict("allow", f"{mode}-default"), None

    def _refusal(self, stmts: tuple[Statement, ...], verdicts: tuple[Verdict, ...],
                 idx: int, cause: Any) -> Decision:
        st = stmts[idx]
        v = verdicts[idx]
        detail = _detail(stmts, idx)
        if isinstance(cause, _SettingCause):
            return self._settings_refusal(stmts, verdicts, idx, cause, detail)
        if isinstance(cause, tuple):                 # guarded default: the flags found
            flags = cause
            fr = _first_reason(st, flags)
            why = _because(fr) if fr is not None else f"{_summary(st)} {_FLAG_WORD[flags[0]]}"
            message = f'pgguard: statement refused by rule "{v.rule}": {why}'
            return Decision(action="block", rule=v.rule, message=message, detail=detail,
                            hint=_hint_for(st, flags), statements=stmts, verdicts=verdicts,
                            index=idx)
        if isinstance(cause, _CompiledRule):
            flags = tuple(f for f in st.flags if cause.flags is None or f in cause.flags)
            fr = _first_reason(st, flags) if flags else None
            why = _because(fr) if fr else _summary(st)
            if v.action == "approve":
                message = f'pgguard: statement needs approval under rule "{v.rule}": {why}'
                hint = (f'Rule "{v.rule}" holds this statement for a human approval; ask an '
                        "approver, or change the statement.")
                return Decision(action="approve", rule=v.rule, message=message,
                                detail=detail, hint=hint, statements=stmts,
                                verdicts=verdicts, index=idx, timeout=cause.timeout,
                                approvers=cause.approvers)
            message = f'pgguard: statement refused by rule "{v.rule}": {why}'
            hint = _hint_for(st, flags) if flags else ""
            if not hint:
                hint = (f'Rule "{v.rule}" of the pgguard policy refuses this; ask an '
                        "administrator if it should be allowed.")
            return Decision(action="block", rule=v.rule, message=message, detail=detail,
                            hint=hint, statements=stmts, verdicts=verdicts, index=idx)
        # block-default
        message = (f'pgguard: statement refused by rule "{v.rule}": {_summary(st)} is not '
                   "allowed by any rule")
        return Decision(action="block", rule=v.rule, message=message, detail=detail,
                        hint="This identity may only run what a [[rules]] entry allows; ask "
                             "an administrator for a rule.",
                        statements=stmts, verdicts=verdicts, index=idx)

    def _settings_refusal(self, stmts: tuple[Statement, ...], verdicts: tuple[Verdict, ...],
                          idx: int, c: _SettingCause, detail: str) -> Decision:
        if c.name == "*":
            what = "it changes a setting whose name is computed"
        elif c.value is None:
            what = f"it changes or resets {c.name} (to a value pgguard cannot read)"
        else:
            what = f"it changes {c.name} to {c.value!r}"
        message = f'pgguard: statement refused by rule "settings": {what}: {c.why}'
        changes = ", ".join(n if v is None else f"{n} = {v!r}"
                            for n, v in stmts[idx].settings)
        allowed = ", ".join(self.settings.names)
        if c.never or c.name in _READ_ONLY or c.name == "application_name":
            hint = (f"{c.name} cannot be changed that way through pgguard. Settings a "
                    f"session may change: {allowed}.")
        else:
            hint = (f"Settings a session may change: {allowed}. A database administrator "
                    f'can allow another with [policy] settings = ["{c.name}"] in the '
                    "pgguard configuration.")
        return Decision(action="block", rule="settings", message=message,
                        detail=f"{detail} Settings changed: {changes}.", hint=hint,
                        statements=stmts, verdicts=verdicts, index=idx)

    def _internal_error(self, e: BaseException) -> Decision:
        what = type(e).__name__
        if isinstance(e, RecursionError):
            return Decision(
                action="block", rule="internal-error",
                message='pgguard: statement refused by rule "internal-error": it is nested '
                        "too deeply for pgguard to classify",
                detail="RecursionError while walking the parse tree.",
                hint="Flatten the expression (fewer nested NOT/parentheses/subqueries).")
        return Decision(
            action="block", rule="internal-error",
            message=f'pgguard: statement refused by rule "internal-error": pgguard could not '
                    f"classify it ({what})",
            detail=f"{what}: {e}"[:500],
            hint="The statement was refused to stay safe; please report this pgguard bug.")


def _because(fr: tuple[str, str]) -> str:
    flag, text = fr
    if flag == "destructive" and text.startswith(("DROP", "TRUNCATE", "ALTER")):
        return f"{text} is destructive"
    return text
