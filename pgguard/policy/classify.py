# Statement classification: pglast's JSON parse tree -> kind, relations, functions and flags.
"""Classify SQL text the way Postgres will run it.

Every statement of a text is parsed by pglast (libpg_query, the real Postgres parser,
through its fast JSON output) and becomes one :class:`Statement`::

    >>> [s.kind for s in classify("SELECT 'DROP TABLE x'; DELETE FROM t WHERE 1 = 1")]
    ['select', 'delete']
    >>> classify("DELETE FROM t WHERE 1 = 1")[0].flags
    ('destructive', 'write')

Flags (DESIGN.md section 4):

``destructive``
    DROP of any object, TRUNCATE, DELETE/UPDATE with no WHERE or a WHERE that reaches every
    row (below), ALTER TABLE ... DROP COLUMN / DROP CONSTRAINT, ALTER COLUMN ... TYPE (with
    or without USING: the conversion may lose data), ALTER TABLE sub-commands that change
    how every later write behaves or break it (SET / DROP DEFAULT, DROP NOT NULL, ADD /
    DROP IDENTITY, SET GENERATED, ALTER CONSTRAINT, a constraint added NOT VALID, REPLICA
    IDENTITY, SET STATISTICS and column options, SET STORAGE PLAIN, SET / DROP EXPRESSION)
    and any sub-command pgguard does not know (an allow-list), the same for ALTER DOMAIN,
    sequence changes that make a later nextval() fail or repeat (RESTART, a negative
    INCREMENT, CYCLE, MINVALUE / MAXVALUE, AS), CREATE OR REPLACE of a function,
    procedure, view, rule or trigger (pgguard cannot know whether one exists, so it is
    taken as replacing one), lo_unlink / lo_put / lo_truncate(64) / lowrite, state that
    ROLLBACK does not restore (setval, ALTER SEQUENCE / identity column ... RESTART, SET
    UNLOGGED), a DO INSTEAD NOTHING rule (it swallows every later write), MERGE ... WHEN
    MATCHED THEN DELETE with no condition of its own (``AND ...``), MERGE ... WHEN NOT
    MATCHED BY SOURCE THEN DELETE or UPDATE, MERGE ... THEN UPDATE/DELETE whose join does
    not narrow the target's rows (``ON true``, ``ON s.id = 1``, the target merged with
    itself), DROP OWNED, and any of these inside a data-modifying CTE, EXPLAIN ANALYZE,
    PREPARE, SQL EXECUTE, a DO block, a function body or a rule action.

    Which rows a WHERE reaches is judged by syntax, never by evaluating constants (Python
    and Postgres disagree on NaN, bpchar blanks, float4 rounding, transform_null_equals).
    "Every row" is a WHERE that references no column of the target row (constants,
    parameters, functions of them, other tables' columns as in ``DELETE ... USING o WHERE
    o.id = 1``, subqueries that ignore the target, PL/pgSQL variables and SQL function
    parameters: so ``WHERE false`` and ``WHERE 1 = 2`` count too), a comparison of a value
    with itself (``x = x``, ``t.id = id``, ``x IS NOT DISTINCT FROM x``, ``NOT (x <> x)``),
    ``col IS NOT NULL`` / ``NOT (col IS NULL)``, and an OR with such a branch. When unsure
    (an unqualified name may be the target's column), a condition counts as every row only
    if it cannot reference the target at all: ``WHERE id > 0`` passes, and only the
    run-time row limit (``Decision.max_rows``) bounds it.
``privilege``
    GRANT, REVOKE, CREATE/ALTER/DROP ROLE, SET ROLE, RESET ROLE, SET SESSION AUTHORIZATION,
    ``set_config('role', ...)`` (or with a name pgguard cannot read), DISCARD ALL (it
    resets the session authorization), ALTER ... OWNER TO, REASSIGN OWNED, ALTER DEFAULT
    PRIVILEGES, row-level security (CREATE/ALTER POLICY, ALTER TABLE ... ENABLE / DISABLE /
    [NO] FORCE ROW LEVEL SECURITY), DISABLE TRIGGER / RULE, ENABLE REPLICA TRIGGER / RULE,
    a view's security_barrier / security_invoker / check_option, SECURITY DEFINER
    functions, ``session_replication_role``, and any write to a system catalog relation
    (``pg_catalog``, ``information_schema``, ``pg_toast``; an unqualified ``pg_*`` name is
    pg_catalog's, which is searched first): INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY
    FROM, ALTER, DROP, and CREATE/DROP TRIGGER or RULE on it.
``escape``
    reaching outside the database: COPY TO/FROM PROGRAM or a server file, pg_read_file and
    the other server-file functions, lo_import/lo_export, dblink*, pg_terminate_backend,
    pg_cancel_backend, pg_reload_conf, ALTER SYSTEM, CREATE/ALTER EXTENSION, LOAD, untrusted
    or C language functions, foreign servers, user mappings, ALTER FOREIGN TABLE ...
    OPTIONS, subscriptions and publications, pg_stat_reset* / pg_stat_statements_reset,
    and settings
    that would make pgguard's parser read the text differently from the server
    (``standard_conforming_strings = off``, a client_encoding other than UTF8).
``opaque``
    SQL the proxy cannot see into: CREATE TRIGGER and CREATE RULE with actions (code that
    runs later inside other sessions' statements), CREATE EVENT TRIGGER, a statement type
    pgguard does not know (it may store a function to run later), EXECUTE of a string in
    PL/pgSQL, CALL, DO blocks and
    functions in languages other than plpgsql and sql, SQL EXECUTE of a statement this
    session was not seen preparing, query_to_xml() and other functions that run SQL text.
``write``
    INSERT, UPDATE, DELETE, MERGE, COPY FROM, TRUNCATE.

Statement kinds are lowercase: ``select`` (also VALUES and TABLE), ``insert``, ``update``,
``delete``, ``merge``, ``copy``, ``create`` (every CREATE ..., CREATE TABLE AS, SELECT INTO,
IMPORT FOREIGN SCHEMA), ``alter`` (every ALTER ..., RENAME, ALTER SYSTEM), ``drop``,
``truncate``, ``grant``, ``revoke``, ``comment``, ``security_label``, ``set``, ``reset``,
``show``, ``discard``, ``explain``, ``do``, ``call``, ``prepare``, ``execute``,
``deallocate``, ``begin``, ``commit``, ``rollback``, ``savepoint``, ``release``,
``prepare_transaction``, ``commit_prepared``, ``rollback_prepared``, ``declare``, ``fetch``,
``move``, ``close``, ``lock``, ``vacuum``, ``analyze``, ``cluster``, ``reindex``,
``refresh``, ``checkpoint``, ``listen``, ``unlisten``, ``notify``, ``load``, ``reassign``.
``Statement.kinds`` adds the kinds of statements run inside this one (a data-modifying CTE,
EXPLAIN ANALYZE, PREPARE/EXECUTE, DO and function bodies): rules match on all of them.

``Statement.settings`` lists every run-time setting the statement changes for the session
(SET / SET LOCAL / RESET name, set_config() anywhere the classifier looks, BEGIN / SET
TRANSACTION ... READ WRITE as ``transaction_read_only``, SET SESSION CHARACTERISTICS as
``default_transaction_*``, SET ROLE / SESSION AUTHORIZATION as ``role`` /
``session_authorization``), as (lowercase name, literal value or None); RESET ALL changes
nothing pgguard did not choose. ALTER ROLE / DATABASE ... SET is persistent and stays a
``privilege`` flag. ``Statement.changes_rows`` says the statement updates or deletes rows
(UPDATE, DELETE, MERGE with an UPDATE/DELETE action, INSERT ... ON CONFLICT DO UPDATE,
anywhere inside), ``Statement.counted_by_tag`` that its command tag counts all of them.
``Statement.literal_free`` is True only when the walk read no literal's value (every such
read goes through one accessor): only then may a decision be shared by shape.

Relation names are schema-qualified (``public.orders``). An unqualified name is reported
as ``public.<name>`` (``pg_temp.<name>`` for CREATE TEMP TABLE): pgguard sends
``search_path = public`` in the startup packet of every session under a policy (not the
default ``"$user", public``), search_path is outside the default settings allow-list, and a
function whose own SET search_path names other schemas is ``opaque``; a config that opens
search_path in ``[policy] settings`` lets a session make ``orders`` mean another schema's
table.
Rules that must hold whatever the search_path should name the table without a schema
(``relations = ["orders"]`` matches ``orders`` in any schema). An unqualified ``pg_*`` name
is reported as ``pg_catalog.<name>``.
Function names are schema-qualified when the SQL qualifies them, else the bare name.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec
from pglast import ast as _pgast
from pglast import parser as _pg

from ..errors import PgguardError

__all__ = [
    "FLAGS", "DEFAULT_MAX_LENGTH", "Reason", "Statement", "PreparedMemory",
    "PolicyParseError", "StatementTooLong", "classify", "is_system_relation",
]

FLAGS = ("destructive", "privilege", "escape", "opaque", "write")
DEFAULT_MAX_LENGTH = 1 << 20


class PolicyParseError(PgguardError):
    """The SQL could not be parsed; pgguard refuses what it cannot read (fail closed).

    ``position`` is the 1-based character position the parser pointed at, or None.
    """

    sqlstate = "42601"

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class StatementTooLong(PolicyParseError):
    """The text is longer than the policy's limit (default 1 MiB)."""

    sqlstate = "54000"


class Reason(msgspec.Struct, frozen=True):
    """Why a flag is set, in words fit for an error DETAIL."""

    flag: str
    text: str


class Statement(msgspec.Struct, frozen=True, kw_only=True):
    """One classified statement.

    Example::

        >>> s = classify("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d")[0]
        >>> s.kind, s.kinds, s.relations_written, s.flags
        ('select', ('select', 'delete'), ('public.orders',), ('destructive', 'write'))
    """

    kind: str
    text: str = ""
    # this kind first, then every statement kind run inside it
    kinds: tuple[str, ...] = ()
    relations_written: tuple[str, ...] = ()
    relations_read: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    reasons: tuple[Reason, ...] = ()
    # True only when the walk PROVED it consulted no literal's value (every such read goes
    # through one accessor that clears it): only then may the decision be shared with a
    # text that differs in literals. The default is the fail-closed False.
    literal_free: bool = False
    # prepared-statement name of PREPARE / EXECUTE / DEALLOCATE (None: DEALLOCATE ALL)
    name: str | None = None
    # looked up the session's prepared statements (SQL EXECUTE): never cache the decision
    session_dependent: bool = False
    # changes no data, schema, privileges or server state
    readonly: bool = False
    # schemas it creates (CREATE SCHEMA): one named like a role is first on that role's
    # default search_path ("$user", public), ahead of public (the engine judges the names)
    schemas_created: tuple[str, ...] = ()
    # every run-time setting (GUC) this statement changes for the session: (lowercase
    # name, literal value); value None when it is not a literal (or a RESET / DEFAULT);
    # name "*" when the name itself is not a literal (set_config(expr, ...))
    settings: tuple[tuple[str, str | None], ...] = ()
    # updates or deletes rows: UPDATE, DELETE, MERGE with an UPDATE/DELETE action,
    # INSERT ... ON CONFLICT DO UPDATE, here or anywhere the classifier sees into
    changes_rows: bool = False
    # the top-level command is one of those and its command tag counts every row it
    # changes: no data-modifying CTE, no function (or unusual operator) call, no nested
    # statement. Triggers and rules on the target are beyond what the text shows.
    counted_by_tag: bool = False
    # names selected from a row (`o.f`, `(o).f`): a column, or a call f(o) in
    # functional notation when f is a function of the row's type (the policy asks the
    # catalog which)
    field_calls: tuple[str, ...] = ()

    @property
    def literal_dependent(self) -> bool:
        """The decision may depend on a literal's value (not provably literal-free)."""
        return not self.literal_free

    def reasons_for(self, flag: str) -> list[str]:
        """The reason texts of one flag."""
        return [r.text for r in self.reasons if r.flag == flag]


# --------------------------------------------------------------------------- tables

# server-side functions that reach outside the database or act on other sessions
_ESCAPE_FUNCS = {
    "pg_read_file": "reads a file on the database server",
    "pg_read_binary_file": "reads a file on the database server",
    "pg_stat_file": "inspects a file on the database server",
    "pg_ls_dir": "lists a directory on the database server",
    "lo_import": "reads a server file into a large object",
    "lo_export": "writes a large object to a server file",
    "pg_terminate_backend": "terminates another session",
    "pg_cancel_backend": "cancels another session's query",
    "pg_reload_conf": "reloads the server configuration",
    "pg_rotate_logfile": "rotates the server log",
    "pg_promote": "promotes a standby server",
    "pg_switch_wal": "forces a WAL switch",
    "pg_create_restore_point": "creates a WAL restore point",
    "pg_backup_start": "starts a base backup",
    "pg_backup_stop": "stops a base backup",
    "pg_start_backup": "starts a base backup",
    "pg_stop_backup": "stops a base backup",
    "pg_create_physical_replication_slot": "creates a replication slot",
    "pg_create_logical_replication_slot": "creates a replication slot",
    "pg_drop_replication_slot": "drops a replication slot",
    "pg_copy_physical_replication_slot": "creates a replication slot",
    "pg_copy_logical_replication_slot": "creates a replication slot",
    "pg_logical_emit_message": "writes a message into the WAL",
    "pg_log_backend_memory_contexts": "signals another backend",
    "pg_wal_replay_pause": "pauses WAL replay",
    "pg_wal_replay_resume": "resumes WAL replay",
    "pg_import_system_collations": "imports operating-system collations",
    "pg_stat_statements_reset": "erases the server's statement statistics for every session",
}
_ESCAPE_PREFIXES = ("dblink", "pg_read_", "pg_ls_", "pg_file_", "pg_logdir_",
                    "pg_replication_origin_")
_ESCAPE_PREFIX_WHY = "reaches outside the database (server files, other servers or sessions)"

# functions that run SQL given as text: pgguard cannot see what they run
_OPAQUE_FUNCS = {
    name: "runs SQL given as text, which pgguard cannot see into" for name in (
        "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
        "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
        "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema",
        "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema",
        "ts_stat", "ts_rewrite",
        # extensions' functions that run SQL given as text (tablefunc, pg_background,
        # pg_cron): matched by name in any schema, as the built-ins are
        "crosstab", "crosstab2", "crosstab3", "crosstab4", "connectby",
        "pg_background_launch", "schedule", "schedule_in_database", "alter_job")
} | {
    # run an open portal's statement inside the server, where no FETCH is seen: an
    # UPDATE ... RETURNING portal the blast-radius guard watches ran to its end
    name: "runs an open cursor's statement inside the server, out of pgguard's sight"
    for name in ("cursor_to_xml", "cursor_to_xmlschema")
}

# functions that destroy data with no WHERE to narrow them (large objects live in
# pg_largeobject, outside any table a rule names). lo_from_bytea / lo_create / lo_import
# with an OID in use fail ("duplicate key"), so they cannot overwrite one.
_DESTRUCTIVE_FUNCS = {
    "lo_unlink": "deletes a large object",
    "lo_put": "overwrites part of an existing large object",
    "lo_truncate": "truncates an existing large object",
    "lo_truncate64": "truncates an existing large object",
    "lowrite": "overwrites part of an existing large object",
    # not undone by ROLLBACK; moved back, later INSERTs collide with existing keys
    "setval": "moves a sequence (not undone by ROLLBACK: later INSERTs can collide with "
              "existing keys)",
}

# functions that change state (for Statement.readonly): every advisory lock a read-only
# transaction may still take (a read-only token's pg_try_advisory_lock held a lock a
# DBA's session then waited on), the statistics resets, and what Postgres itself refuses
# in a read-only transaction
_WRITING_FUNCS = frozenset({
    "nextval", "setval", "lo_create", "lo_creat", "lo_unlink", "lo_put", "lo_from_bytea",
    "lo_truncate", "lo_truncate64", "lowrite", "pg_notify", "txid_current",
    "pg_current_xact_id",
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared",
    "pg_stat_reset", "pg_stat_reset_shared", "pg_stat_reset_single_table_counters",
    "pg_stat_reset_single_function_counters", "pg_stat_reset_slru",
    "pg_stat_reset_replication_slot", "pg_stat_reset_subscription_stats",
    # index maintenance a read-only transaction may still run
    "brin_summarize_range", "brin_summarize_new_values", "brin_desummarize_range",
    "gin_clean_pending_list",
})
WRITING_FUNCS = _WRITING_FUNCS

# settings whose change is a privilege or escape concern (SET, set_config, ALTER ... SET)
_PRIVILEGE_SETTINGS = {
    "role": "changes the role the session acts as",
    "session_authorization": "changes the session's user",
    "session_replication_role": "disables triggers and foreign-key checks",
}
_ESCAPE_SETTINGS = {
    "session_preload_libraries": "loads server libraries",
    "local_preload_libraries": "loads server libraries",
    "shared_preload_libraries": "loads server libraries",
    "dynamic_library_path": "changes where server libraries are loaded from",
}
_UTF8_NAMES = frozenset({"utf8", "utf-8", "unicode"})
_ON_VALUES = frozenset({"on", "true", "yes", "1", "t", "y"})
_OFF_VALUES = frozenset({"off", "false", "no", "0", "f", "n"})

# languages that run arbitrary code on the server (the "u" suffix is the untrusted convention)
_UNTRUSTED_LANGS = frozenset({"c", "internal", "plpythonu", "plpython2u", "plpython3u",
                              "plperlu", "pltclu", "plsh", "pljavau", "plv8u", "plrustu"})

_READONLY_KINDS = frozenset({
    "select", "explain", "show", "begin", "commit", "rollback", "savepoint", "release",
    "declare", "fetch", "move", "close", "set", "reset", "deallocate", "prepare",
    "execute", "listen", "unlisten", "discard", "do", "copy",
})

_DROP_LABEL = {
    "OBJECT_TABLE": "TABLE", "OBJECT_INDEX": "INDEX", "OBJECT_VIEW": "VIEW",
    "OBJECT_MATVIEW": "MATERIALIZED VIEW", "OBJECT_SEQUENCE": "SEQUENCE",
    "OBJECT_FOREIGN_TABLE": "FOREIGN TABLE",
}
_REL_OBJECTS = frozenset(_DROP_LABEL)
_ON_REL_OBJECTS = frozenset({"OBJECT_TRIGGER", "OBJECT_RULE", "OBJECT_POLICY"})

_TXN_KINDS = {
    "TRANS_STMT_BEGIN": "begin", "TRANS_STMT_START": "begin",
    "TRANS_STMT_COMMIT": "commit", "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint", "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback", "TRANS_STMT_PREPARE": "prepare_transaction",
    "TRANS_STMT_COMMIT_PREPARED": "commit_prepared",
    "TRANS_STMT_ROLLBACK_PREPARED": "rollback_prepared",
}

_KIND_OVERRIDES = {
    "IndexStmt": "create", "ViewStmt": "create", "RuleStmt": "create",
    "DefineStmt": "create", "CompositeTypeStmt": "create", "CreatedbStmt": "create",
    "ImportForeignSchemaStmt": "create", "CreateTableAsStmt": "create",
    "RenameStmt": "alter", "ReplicaIdentityStmt": "alter",
    "CommentStmt": "comment", "SecLabelStmt": "security_label", "LockStmt": "lock",
    "CheckPointStmt": "checkpoint", "ClusterStmt": "cluster", "ReindexStmt": "reindex",
    "RefreshMatViewStmt": "refresh", "DiscardStmt": "discard", "ListenStmt": "listen",
    "UnlistenStmt": "unlisten", "NotifyStmt": "notify", "LoadStmt": "load",
    "ReassignOwnedStmt": "reassign", "DeclareCursorStmt": "declare",
    "ClosePortalStmt": "close", "VariableShowStmt": "show", "ConstraintsSetStmt": "set",
    "DeallocateStmt": "deallocate", "CallStmt": "call", "DoStmt": "do",
    "ReturnStmt": "return", "PLAssignStmt": "assign", "CopyStmt": "copy",
    "TruncateStmt": "truncate", "ExplainStmt": "explain", "PrepareStmt": "prepare",
    "ExecuteStmt": "execute", "SelectStmt": "select", "InsertStmt": "insert",
    "UpdateStmt": "update", "DeleteStmt": "delete", "MergeStmt": "merge",
}

# utility statements that always carry a flag: tag -> (flag, reason)
_UTILITY_FLAGS: dict[str, tuple[tuple[str, str], ...]] = {
    "CreateRoleStmt": (("privilege", "CREATE ROLE creates a role"),),
    "AlterRoleStmt": (("privilege", "ALTER ROLE changes a role"),),
    "AlterRoleSetStmt": (("privilege", "ALTER ROLE ... SET changes a role's settings"),),
    "AlterDatabaseSetStmt": (("privilege", "ALTER DATABASE ... SET changes the settings of "
                                           "every later session"),),
    "AlterDatabaseStmt": (("destructive", "ALTER DATABASE changes how every session may "
                                          "connect (CONNECTION LIMIT, ALLOW_CONNECTIONS, "
                                          "IS_TEMPLATE) or where the database lives "
                                          "(TABLESPACE): a limit of 1 locks everyone out"),),
    "DropRoleStmt": (("privilege", "DROP ROLE removes a role"),
                     ("destructive", "DROP ROLE removes a role")),
    "DropOwnedStmt": (("destructive", "DROP OWNED drops every object a role owns"),
                      ("privilege", "DROP OWNED revokes a role's privileges")),
    "ReassignOwnedStmt": (("privilege", "REASSIGN OWNED changes object owners"),),
    "AlterOwnerStmt": (("privilege", "ALTER ... OWNER TO changes an object's owner"),),
    "AlterDefaultPrivilegesStmt": (
        ("privilege", "ALTER DEFAULT PRIVILEGES changes future grants"),),
    "CreatePolicyStmt": (("privilege", "CREATE POLICY changes row-level security"),),
    "AlterPolicyStmt": (("privilege", "ALTER POLICY changes row-level security"),),
    "SecLabelStmt": (("privilege", "SECURITY LABEL changes a security label"),),
    "AlterSystemStmt": (("escape", "ALTER SYSTEM rewrites the server configuration"),),
    "CreateExtensionStmt": (("escape", "CREATE EXTENSION installs server code"),),
    "AlterExtensionStmt": (("escape", "ALTER EXTENSION changes installed server code"),),
    "AlterExtensionContentsStmt": (
        ("escape", "ALTER EXTENSION changes installed server code"),),
    "LoadStmt": (("escape", "LOAD loads a shared library into the server"),),
    "CreatePLangStmt": (("escape", "CREATE LANGUAGE installs a procedural language"),),
    "CreateFdwStmt": (("escape", "CREATE FOREIGN DATA WRAPPER installs a connector"),),
    "AlterFdwStmt": (("escape", "ALTER FOREIGN DATA WRAPPER changes a connector"),),
    "CreateForeignServerStmt": (("escape", "CREATE SERVER connects to another server"),),
    "AlterForeignServerStmt": (("escape", "ALTER SERVER changes a remote connection"),),
    "CreateUserMappingStmt": (("escape", "CREATE USER MAPPING stores remote credentials"),),
    "AlterUserMappingStmt": (("escape", "ALTER USER MAPPING changes remote credentials"),),
    "ImportForeignSchemaStmt": (("escape", "IMPORT FOREIGN SCHEMA reads another server"),),
    "CreateSubscriptionStmt": (("escape", "CREATE SUBSCRIPTION connects to another server"),),
    "AlterSubscriptionStmt": (("escape", "ALTER SUBSCRIPTION changes a remote connection"),),
    "DropdbStmt": (("destructive", "DROP DATABASE"),),
    "DropTableSpaceStmt": (("destructive", "DROP TABLESPACE"),),
    "DropSubscriptionStmt": (("destructive", "DROP SUBSCRIPTION"),),
    "DropUserMappingStmt": (("destructive", "DROP USER MAPPING"),),
    "CreatePublicationStmt": (("escape", "CREATE PUBLICATION sends table rows to subscribers "
                                         "outside this database"),),
    "AlterPublicationStmt": (("escape", "ALTER PUBLICATION changes which rows leave this "
                                        "database for subscribers"),),
}


def _utility_kind(tag: str) -> str:
    kind = _KIND_OVERRIDES.get(tag)
    if kind is not None:
        return kind
    for prefix in ("Create", "Alter", "Drop"):
        if tag.startswith(prefix):
            return prefix.lower()
    return tag[:-4].lower() if tag.endswith("Stmt") else tag.lower()


# --------------------------------------------------------------------------- accumulator

class _Acc:
    """Everything seen while walking one statement's tree."""

    __slots__ = ("kind", "kinds", "writes", "reads", "funcs", "flags", "reasons", "literal",
                 "ctes", "rvwrite", "utility", "ctx", "text", "name", "prepared",
                 "writing_funcs", "sub_kind", "session", "settings", "changes_rows",
                 "counted", "entered", "odd_ops", "plvars", "scoped_set", "fields", "schemas")

    def __init__(self, text: str = "", prepared: Mapping[str, Statement] | None = None,
                 plvars: frozenset[str] = frozenset()):
        self.kind: str | None = None
        self.kinds: dict[str, None] = {}
        self.writes: dict[str, None] = {}
        self.reads: dict[str, None] = {}
        self.funcs: dict[str, None] = {}
        self.flags: set[str] = set()
        self.reasons: list[tuple[str, str]] = []
        self.literal = False                   # a literal's value was read (_lit(), or a
                                               # DO / function body, a COPY file name)
        self.ctes: list[frozenset[str]] = []   # CTE names in scope, innermost last
        self.rvwrite = False                   # a RangeVar met now is a written object
        self.utility = False                   # inside a utility statement's own fields
        self.ctx = ""                          # prefix for reasons ("in a WITH query: ")
        self.text = text
        self.name: str | None = None
        self.schemas: list[str] = []           # CREATE SCHEMA: the names created
        self.prepared = prepared
        self.writing_funcs = False
        self.sub_kind = False                  # next statement entered counts in kinds
        self.session = False                   # consulted the prepared statements
        self.settings: list[tuple[str, str | None]] = []
        self.changes_rows = False
        self.counted = False                   # the top command's tag counts its rows
        self.entered = 0                       # statements entered, SELECTs aside
        self.odd_ops = False                   # an operator that may run user code
        self.plvars = plvars                   # PL/pgSQL variables / function parameters
        self.scoped_set = False                # SET clauses of CREATE/ALTER FUNCTION
        self.fields: dict[str, None] = {}      # o.f / (o).f: see Statement.field_calls

    def flag(self, flag: str, why: str) -> None:
        self.flags.add(flag)
        self.reasons.append((flag, self.ctx + why))

    def enter(self, kind: str) -> None:
        if kind != "select":
            self.entered += 1
        if self.kind is None:
            self.kind = kind
            self.kinds[kind] = None
        elif kind != "select" or self.sub_kind:
            self.kinds[kind] = None
        self.sub_kind = False

    def merge(self, st: Statement, ctx: str, *, executes: bool = True,
              kinds: tuple[str, ...] | None = None) -> None:
        """Fold a classified inner statement into this one."""
        if executes:
            for k in (st.kinds if kinds is None else kinds):
                self.kinds[k] = None
            for r in st.relations_written:
                self.writes[r] = None
            for r in st.relations_read:
                self.reads[r] = None
            for r in st.reasons:
                self.flags.add(r.flag)
                self.reasons.append((r.flag, ctx + r.text))
            if not st.readonly:
                self.writing_funcs = True
            self.settings.extend(st.settings)
            if st.changes_rows:
                self.changes_rows = True
            self.entered += 1
        else:
            # seen but not run: relations count as read, only non-execution flags stay
            for r in st.relations_written:
                self.reads[r] = None
            for r in st.relations_read:
                self.reads[r] = None
            for r in st.reasons:
                if r.flag not in ("write", "destructive") and not (
                        r.flag == "privilege" and _CATALOG_WHY in r.text):
                    self.flags.add(r.flag)
                    self.reasons.append((r.flag, ctx + r.text))
        for f in st.functions:
            self.funcs[f] = None
        if not st.literal_free:
            self.literal = True
        if st.session_dependent:
            self.session = True

    def build(self, text: str) -> Statement:
        kinds = tuple(self.kinds)
        if self.flags:
            flags = tuple(f for f in FLAGS if f in self.flags)
            reasons = tuple(Reason(f, t) for f, t in dict.fromkeys(self.reasons))
            readonly = False
        else:
            flags = reasons = ()
            readonly = (not self.writes and not self.writing_funcs
                        and _READONLY_KINDS.issuperset(kinds))
        return Statement(
            kind=self.kind or "unknown", text=text, kinds=kinds,
            relations_written=tuple(self.writes), relations_read=tuple(self.reads),
            functions=tuple(self.funcs), flags=flags, reasons=reasons,
            literal_free=not self.literal, name=self.name, readonly=readonly,
            session_dependent=self.session,
            settings=tuple(dict.fromkeys(self.settings)),
            changes_rows=self.changes_rows,
            counted_by_tag=(self.counted and self.changes_rows and self.entered == 1
                            and not self.funcs and not self.odd_ops),
            field_calls=tuple(self.fields), schemas_created=tuple(self.schemas))


# --------------------------------------------------------------------------- helpers

def _sval(node: Any) -> str:
    # {"String": {"sval": "x"}} -> "x"
    if type(node) is dict:
        inner = node.get("String")
        if type(inner) is dict:
            return inner.get("sval", "")
    return ""


def _dotted(names: list | None) -> str:
    return ".".join(_sval(n) for n in names or ())


def _funcname(parts: list[str]) -> str:
    # a called function's name as "schema.name": a part that holds a dot or a quote
    # (`"pg_catalog.f"()`, a function in schema "a.b") is quoted, so it can never read
    # as another schema's function (the catalog finds no such name: fail closed)
    return ".".join('"' + p.replace('"', '""') + '"' if "." in p or '"' in p else p
                    for p in parts)


def _relname(rv: dict) -> str:
    schema = rv.get("schemaname")
    name = rv.get("relname", "")
    if schema is None:
        schema = _default_schema(name, rv.get("relpersistence") == "t")
    return schema + "." + name


def _default_schema(name: str, temp: bool = False) -> str:
    # pg_catalog is searched before the search_path (unless the path names it later,
    # which the settings allow-list refuses) and every catalog relation is named pg_*
    if temp:
        return "pg_temp"
    return "pg_catalog" if name.startswith("pg_") else "public"


def is_system_relation(name: str) -> bool:
    """A schema-qualified relation of the system catalogs (pg_catalog, information_schema,
    pg_toast...): any write to it is ``privilege``. For callers that resolve views to
    their base tables after classification.

    Example::

        >>> is_system_relation("pg_catalog.pg_authid"), is_system_relation("public.t")
        (True, False)
    """
    schema = name.split(".", 1)[0]
    return schema in ("pg_catalog", "information_schema") or (
        schema.startswith("pg_") and not schema.startswith("pg_temp"))


_CATALOG_WHY = "writes to the system catalog relation "
# statement kinds that name a relation without changing what it holds or defines
_MAINTENANCE_KINDS = frozenset({"vacuum", "analyze", "lock", "reindex", "cluster",
                                "refresh", "comment", "security_label"})


def _written(acc: _Acc, name: str) -> None:
    """Record a relation this statement writes (rows, definition, triggers or rules)."""
    acc.writes[name] = None
    if is_system_relation(name) and acc.kind not in _MAINTENANCE_KINDS:
        acc.flag("privilege", f"{_CATALOG_WHY}{name}: only administrators change the "
                 "catalogs")


_NOVAL = object()
_TEXT_CASTS = frozenset({"text", "varchar", "name"})


def _lit(acc: _Acc, node: Any) -> Any:
    """The value of a literal node as text (None for NULL), or _NOVAL if it is not one.

    EVERY read of a constant's value in this module goes through here: it marks the
    statement literal-dependent, so that its decision is never shared with a text that
    differs only in literals (tests/test_policy_rules.py checks that no other function
    reads A_Const). Reads of identifiers (names) do not count.
    """
    acc.literal = True
    if type(node) is not dict:
        return _NOVAL
    c = node.get("A_Const")
    if type(c) is dict:
        if c.get("isnull"):
            return None
        for key in ("sval", "ival", "fval", "boolval", "bsval"):
            v = c.get(key)
            if type(v) is dict:
                x = v.get(key, 0 if key == "ival" else False if key == "boolval" else "")
                if key == "boolval":
                    return "true" if x else "false"
                return str(x)
        return _NOVAL
    tc = node.get("TypeCast")
    if type(tc) is dict:
        # only a cast to an unbounded text type keeps the literal's text as it is
        tn = tc.get("typeName") or {}
        names = tn.get("names") or ()
        if names and _sval(names[-1]) in _TEXT_CASTS and not tn.get("typmods") \
                and not tn.get("arrayBounds"):
            return _lit(acc, tc.get("arg"))
        return _NOVAL
    # option values of utility statements (DefElem args): String, Integer, Float, Boolean
    for key, field in (("String", "sval"), ("Integer", "ival"), ("Float", "fval")):
        v = node.get(key)
        if type(v) is dict:
            return str(v.get(field, 0 if key == "Integer" else ""))
    v = node.get("Boolean")
    if type(v) is dict:
        return "true" if v.get("boolval") else "false"
    return _NOVAL


_MISSING = object()


def _walk(acc: _Acc, node: Any) -> None:
    # Generic descent. A list holds tagged nodes ({"Tag": {...}}); they are dispatched
    # here, without a call per element: a handler for known tags (None: nothing to find
    # below), a generic descent for the others. A RangeVar or FuncCall stored without its
    # tag (a field typed as such, like InsertStmt.relation) is recognised by its keys.
    get = _NODE.get
    for x in (node if type(node) is list else (node,)):
        if type(x) is not dict:
            if type(x) is list:
                _walk(acc, x)
            continue
        if "relname" in x:
            _rangevar(acc, x)
            continue
        if "funcformat" in x and "funcname" in x:
            _funccall(acc, x)
            continue
        for k, v in x.items():
            h = get(k, _MISSING)
            if h is _MISSING:
                if type(v) is dict or type(v) is list:
                    _walk(acc, v)
            elif h is not None:
                h(acc, v)


def _walk_except(acc: _Acc, body: dict, skip: tuple[str, ...]) -> None:
    get = _NODE.get
    for k, v in body.items():
        if k in skip:
            continue
        h = get(k, _MISSING)
        if h is _MISSING:
            if type(v) is dict or type(v) is list:
                _walk(acc, v)
        elif h is not None:
            h(acc, v)


# The commonest expression nodes, walked field by field: skipping their scalar fields
# and one level of generic descent is most of the cost of a DML statement's walk.
def _res_target(acc: _Acc, b: dict) -> None:
    v = b.get("val")
    if v is not None:
        _walk(acc, v)
    v = b.get("indirection")
    if v is not None:
        _walk(acc, v)


# operators of the built-in types: any other may call a user function, which may change
# rows the command tag does not count (Statement.counted_by_tag)
_STD_OPS = frozenset({
    "=", "<>", "!=", "<", ">", "<=", ">=", "+", "-", "*", "/", "%", "^", "||", "~~", "!~~",
    "~~*", "!~~*", "~", "!~", "~*", "!~*", "@>", "<@", "&&", "&", "|", "#", "<<", ">>",
    "@", "|/", "||/", "->", "->>", "#>", "#>>", "?", "?|", "?&", "@?", "@@", "#-", "-|-",
    "&<", "&>", "<<=", ">>=", "<->", "~=", "BETWEEN", "NOT BETWEEN", "BETWEEN SYMMETRIC",
    "NOT BETWEEN SYMMETRIC",
})


def _a_expr(acc: _Acc, b: dict) -> None:
    names = b.get("name")
    if names is not None and (len(names) != 1 or _sval(names[0]) not in _STD_OPS):
        acc.odd_ops = True
    v = b.get("lexpr")
    if v is not None:
        _walk(acc, v)
    v = b.get("rexpr")
    if v is not None:
        _walk(acc, v)


def _args_node(acc: _Acc, b: dict) -> None:
    v = b.get("args")
    if v is not None:
        _walk(acc, v)


def _list_node(acc: _Acc, b: dict) -> None:
    v = b.get("items")
    if v is not None:
        _walk(acc, v)


def _rangevar(acc: _Acc, rv: dict) -> None:
    if type(rv) is not dict:
        return
    if acc.rvwrite:
        _written(acc, _relname(rv))
        return
    if acc.ctes and "schemaname" not in rv:
        name = rv.get("relname")
        for scope in acc.ctes:
            if name in scope:
                return
    acc.reads[_relname(rv)] = None


def _func_class(bare: str) -> tuple[str, str] | None:
    why = _ESCAPE_FUNCS.get(bare)
    if why is not None:
        return "escape", why
    if bare.startswith("pg_stat_reset"):
        return "escape", "erases server statistics that every session and the DBA rely on"
    if bare.startswith(_ESCAPE_PREFIXES):
        return "escape", _ESCAPE_PREFIX_WHY
    why = _OPAQUE_FUNCS.get(bare)
    if why is not None:
        return "opaque", why
    why = _DESTRUCTIVE_FUNCS.get(bare)
    if why is not None:
        return "destructive", why
    return None


def _funccall(acc: _Acc, fc: dict) -> None:
    names = fc.get("funcname") or ()
    name = _funcname([_sval(n) for n in names])
    bare = _sval(names[-1]) if names else ""
    acc.funcs[name] = None
    if name != bare and bare in _NEWER_SYNTAX and names and _sval(names[0]) == "pg_catalog":
        # syntax of a newer grammar than the server's that the parser turns into a
        # pg_catalog call: on Postgres 15 the same words are a plain call, found by
        # search_path (json_object(1, 2) runs public.json_object if there is one)
        acc.funcs[bare] = None
    cls = _func_class(bare)
    if cls is not None:
        acc.flag(cls[0], f"{name}() {cls[1]}")
        if bare in _WRITING_FUNCS:
            acc.writing_funcs = True
    elif bare == "set_config":
        _set_config(acc, fc.get("args"))
    elif bare in _WRITING_FUNCS:
        acc.writing_funcs = True
    for k, v in fc.items():
        if k != "funcname" and (type(v) is dict or type(v) is list):
            _walk(acc, v)


def _set_config(acc: _Acc, args: list | None) -> None:
    # set_config(name, value, is_local): a session setting like SET (or SET LOCAL)
    acc.writing_funcs = True
    first = _lit(acc, args[0]) if args else _NOVAL
    if type(first) is not str:
        acc.settings.append(("*", None))
        acc.flag("privilege", "set_config() with a computed setting name may change the role")
        return
    second = _lit(acc, args[1]) if len(args) > 1 else _NOVAL
    _setting(acc, first.strip().lower(), second if type(second) is str else None,
             "set_config()", resetting=second is None)


def _setting(acc: _Acc, name: str, value: str | None, how: str, *,
             resetting: bool = False, session: bool = True,
             parts: list[str] | None = None) -> None:
    """A setting the statement changes: recorded for the allow-list (``session``: for
    the session, not only inside a function) and flagged when it is a privilege or
    escape concern whatever the allow-list says."""
    if session or acc.scoped_set and name != "search_path":
        # (a function's SET clause too: it holds while the function runs, and is judged
        # by the same settings rules, at CREATE FUNCTION and at each call; its
        # search_path has a rule of its own, below)
        acc.settings.append((name, value))
    elif name == "search_path" and acc.scoped_set and not resetting and \
            not _plain_search_path(parts):
        # a function's own search_path resolves the names of its body, which pgguard
        # reads as public.<name> (the path it pins for the session): another path can
        # make "orders" mean a view or table pgguard never judged
        acc.flag("opaque", f"{how} search_path to {value if value is not None else '?'} "
                 "makes the unqualified names of the function's body resolve in other "
                 "schemas than pgguard reads them in (public, after pg_catalog); qualify "
                 "the names in the body and leave search_path out, or set it to "
                 "pg_catalog, public")
    why = _PRIVILEGE_SETTINGS.get(name)
    if why is not None:
        acc.flag("privilege", f"{how} {name} {why}")
        return
    why = _ESCAPE_SETTINGS.get(name)
    if why is not None:
        acc.flag("escape", f"{how} {name} {why}")
        return
    if resetting or name not in ("standard_conforming_strings", "client_encoding"):
        return
    v = (value or "").strip().lower()
    if name == "standard_conforming_strings":
        if v not in _ON_VALUES:
            acc.flag("escape", f"{how} standard_conforming_strings to {value or '?'} changes "
                     "how string literals are read; pgguard's parser assumes it is on")
    elif v not in _UTF8_NAMES:
        acc.flag("escape", f"{how} client_encoding to {value or '?'}: encodings other than "
                 "UTF8 can hide quotes from pgguard's parser")


_PLAIN_SCHEMAS = ("pg_catalog", "public", "pg_temp")


def _plain_search_path(parts: list[str] | None) -> bool:
    """A search_path under which an unqualified name means what pgguard reads it as:
    only pg_catalog, public and pg_temp, pg_catalog (if named) before public; a single
    empty value is plain too (then only pg_catalog and pg_temp are searched). ``parts``
    are the SET's values as the parse tree has them: an unquoted name already folded to
    lower case, a quoted one or a string constant as written (Postgres quotes each as an
    identifier: 'Public' and "Public" name a schema "Public", not public)."""
    if parts is None:
        return False
    if parts == [""]:
        return True
    if any(p not in _PLAIN_SCHEMAS for p in parts):
        return False
    if "pg_temp" in parts and ("public" not in parts
                               or parts.index("pg_temp") < parts.index("public")):
        # pg_temp first: the body's unqualified CREATE VIEW makes a temporary view, which
        # then comes before public for the session's names (UPDATE t7 wrote orders
        # through it unseen)
        return False
    return not ("pg_catalog" in parts and "public" in parts
                and parts.index("pg_catalog") > parts.index("public"))


def _set_parts(acc: _Acc, args: list | None) -> list[str] | None:
    """The values of SET name = v[, v...], one each (None when any is not a literal)."""
    parts = []
    for a in args or ():
        v = _lit(acc, a)
        if type(v) is not str:
            return None
        parts.append(v)
    return parts


def _set_value(acc: _Acc, args: list | None) -> str | None:
    """The literal value of SET name = v[, v...] (None when any part is not a literal)."""
    parts = _set_parts(acc, args)
    return ", ".join(parts) if parts else None


# --------------------------------------------------------------------------- WHERE analysis
#
# Which rows a WHERE clause reaches is judged syntactically, never by evaluating
# constants (Python's rules differ from Postgres': NaN, bpchar blanks, float4 rounding,
# transform_null_equals). A condition is
#   _INDEP  when it references no column of the target row: the same for every row, so
#           it matches every row or none (constants, parameters, functions of them,
#           columns of other relations, uncorrelated subqueries, PL/pgSQL variables);
#   _TRUE   when it is true for every (non-null) row: x = x, t.id = id, col IS NOT NULL;
#   _FALSE  when it is false for every row (x <> x);
#   _ROW    otherwise: it may narrow the rows (WHERE id > 0 may not; the run-time row
#           limit catches what no syntax can).
# An unqualified name may be the target's column, so it counts as a reference to the
# target (unless it is a PL/pgSQL variable): when unsure, a condition is "every row"
# only if it has no reference to the target at all.

_INDEP, _TRUE, _FALSE, _ROW = 1, 2, 3, 4
_FLIP = {_TRUE: _FALSE, _FALSE: _TRUE, _INDEP: _INDEP, _ROW: _ROW}
_SELF_TRUE_OPS = frozenset({"=", "<=", ">="})
_SELF_FALSE_OPS = frozenset({"<>", "!=", "<", ">"})
_NEGATED_OP = {"=": "<>", "<>": "=", "!=": "=", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}


class _Target:
    """The names that mean the target row in a condition: the table's alias (or its name
    when it has none), plus the source's for MERGE ... WHEN conditions."""

    __slots__ = ("plvars", "quals")

    def __init__(self, quals: frozenset[str], plvars: frozenset[str]) -> None:
        self.quals = quals
        self.plvars = plvars


def _rel_quals(node: Any) -> frozenset[str]:
    """How a FROM item is referred to: its alias, else the relation's name."""
    if type(node) is not dict:
        return frozenset()
    if "relname" not in node:          # a tagged node: RangeVar, RangeSubselect, ...
        if len(node) != 1:
            return frozenset()
        node = next(iter(node.values()))
        if type(node) is not dict:
            return frozenset()
    alias = node.get("alias")
    if type(alias) is dict and alias.get("aliasname"):
        return frozenset((alias["aliasname"],))
    name = node.get("relname")
    return frozenset((name,)) if name else frozenset()


def _from_names(node: Any, out: set[str]) -> None:
    # every alias and relation name of a FROM list (more names only shadow more)
    if type(node) is dict:
        for k, v in node.items():
            if (k == "aliasname" or k == "relname") and type(v) is str:
                out.add(v)
            elif type(v) is dict or type(v) is list:
                _from_names(v, out)
    elif type(node) is list:
        for v in node:
            _from_names(v, out)


def _target_col(cr: dict, tgt: _Target, shadow: frozenset[str] = frozenset()) -> Any:
    """The target column a ColumnRef may name ("" for the whole row), or None."""
    fields = cr.get("fields") or ()
    n = len(fields)
    if n == 1:
        name = _sval(fields[0])
        if name and name in tgt.plvars:
            return None
        return name
    if n == 0:
        return None
    qual = _sval(fields[n - 2])
    if qual in shadow or qual not in tgt.quals:
        return None
    return _sval(fields[n - 1])


# fields that name things (operators, types, functions) and hold no column reference
_NO_COLUMNS = frozenset({"name", "typeName", "funcname"})


def _refs_target(node: Any, tgt: _Target, shadow: frozenset[str] = frozenset()) -> bool:
    if type(node) is dict:
        fc = node.get("fromClause")
        if fc is not None:                 # a subquery: its FROM names hide the target's
            names: set[str] = set()
            _from_names(fc, names)
            shadow = shadow | names
        for k, v in node.items():
            if k == "ColumnRef":
                if type(v) is dict and _target_col(v, tgt, shadow) is not None:
                    return True
            elif k == "CurrentOfExpr" or (
                    (type(v) is dict or type(v) is list) and k not in _NO_COLUMNS
                    and _refs_target(v, tgt, shadow)):
                return True
        return False
    if type(node) is list:
        for v in node:
            if _refs_target(v, tgt, shadow):
                return True
    return False


def _same(a: Any, b: Any, tgt: _Target) -> bool:
    """The same expression on both sides (target columns named either way)."""
    if type(a) is not dict or type(b) is not dict or a.keys() != b.keys():
        return False
    return _canon(a, tgt) == _canon(b, tgt)


def _canon(node: Any, tgt: _Target) -> Any:
    # the expression with locations dropped and target columns named alike (t.id, id)
    if type(node) is dict:
        cr = node.get("ColumnRef")
        if type(cr) is dict and len(node) == 1:
            col = _target_col(cr, tgt)
            if col is not None:
                return ("@target", col)
        return tuple((k, _canon(v, tgt)) for k, v in node.items() if k != "location")
    if type(node) is list:
        return tuple(_canon(v, tgt) for v in node)
    return node


def _cond(node: Any, tgt: _Target, neg: bool = False) -> int:
    """_INDEP / _TRUE / _FALSE / _ROW for a condition (``neg``: under a NOT)."""
    if type(node) is not dict or len(node) != 1:
        return _ROW if _refs_target(node, tgt) else _INDEP
    tag, b = next(iter(node.items()))
    if type(b) is not dict:
        return _INDEP
    if tag == "BoolExpr":
        op = b.get("boolop")
        args = b.get("args") or ()
        if op == "NOT_EXPR":
            return _cond(args[0], tgt, not neg) if args else _INDEP
        vals = [_cond(a, tgt, neg) for a in args]
        if (op == "AND_EXPR") != neg:      # AND, or an OR under NOT (De Morgan)
            if _FALSE in vals:
                return _FALSE
            if _ROW in vals:
                return _ROW
            return _TRUE if all(v == _TRUE for v in vals) else _INDEP
        # OR: one branch that does not depend on the row may be true for every row
        if _INDEP in vals:
            return _INDEP
        if _TRUE in vals:
            return _TRUE
        return _ROW if _ROW in vals else _FALSE
    # (the common `col = value`: its left side names the target, no walk needed)
    left = b.get("lexpr")
    if not (type(left) is dict and type(left.get("ColumnRef")) is dict
            and _target_col(left["ColumnRef"], tgt) is not None) \
            and not _refs_target(node, tgt):
        return _INDEP
    if tag == "A_Expr":
        kind = b.get("kind")
        names = b.get("name") or ()
        op = _sval(names[-1]) if names else ""
        left, right = b.get("lexpr"), b.get("rexpr")
        if left is None or right is None:
            return _ROW
        if kind == "AEXPR_OP" and len(names) == 1 and (
                op in _SELF_TRUE_OPS or op in _SELF_FALSE_OPS):
            if neg:
                op = _NEGATED_OP[op]
            if _same(left, right, tgt):
                # a value compared with itself: true (or false) on every non-null row
                return _TRUE if op in _SELF_TRUE_OPS else _FALSE
        elif kind in ("AEXPR_DISTINCT", "AEXPR_NOT_DISTINCT") and _same(left, right, tgt):
            return _TRUE if (kind == "AEXPR_NOT_DISTINCT") != neg else _FALSE
        return _ROW
    if tag == "NullTest":
        arg = b.get("arg")
        is_null = (b.get("nulltesttype") == "IS_NULL") != neg
        if not is_null and type(arg) is dict and "ColumnRef" in arg:
            return _TRUE                   # col IS NOT NULL: every row that has a value
        return _ROW
    if tag == "BooleanTest":
        t = b.get("booltesttype", "")
        if t in ("IS_TRUE", "IS_NOT_FALSE"):
            return _cond(b.get("arg"), tgt, neg)
        if t in ("IS_FALSE", "IS_NOT_TRUE"):
            return _cond(b.get("arg"), tgt, not neg)
        return _ROW
    return _ROW


def _where_check(acc: _Acc, verb: str, target: str, where: Any, tgt: _Target) -> None:
    if where is None:
        acc.flag("destructive", f"{verb} on {target} has no WHERE clause: every row")
        return
    v = _cond(where, tgt)
    if v == _TRUE:
        acc.flag("destructive", f"{verb} on {target} has a WHERE clause that is true for "
                 "every row")
    elif v == _INDEP:
        acc.flag("destructive", f"{verb} on {target} has a WHERE clause that does not "
                 "depend on the target's rows (constants, parameters, other tables): it "
                 "matches every row or none")


def _dml_quals(acc: _Acc, b: dict) -> _Target:
    return _Target(_rel_quals(b.get("relation")), acc.plvars)


# --------------------------------------------------------------------------- statements

def _push_ctes(acc: _Acc, with_clause: Any) -> bool:
    """Walk a WITH list's queries, each with the CTE names it sees, and put every name
    in scope for the statement it belongs to (the caller pops it). Without RECURSIVE a
    CTE sees only the CTEs before it: a later sibling's name in its query is the real
    relation (round 20: ``WITH a AS (SELECT ssn FROM customers), customers AS (SELECT
    1) ...`` read customers unseen); with RECURSIVE it sees them all."""
    if type(with_clause) is not dict:
        return False
    ctes = [c["CommonTableExpr"] for c in with_clause.get("ctes") or ()
            if type(c) is dict and type(c.get("CommonTableExpr")) is dict]
    names = [c.get("ctename", "") for c in ctes]
    recursive = bool(with_clause.get("recursive"))
    saved = acc.ctx
    acc.ctx = saved + "in a WITH query: "
    for i, cte in enumerate(ctes):
        acc.ctes.append(frozenset(names if recursive else names[:i]))
        _walk(acc, cte.get("ctequery"))
        acc.ctes.pop()
    acc.ctx = saved
    acc.ctes.append(frozenset(names))
    return True


def _select(acc: _Acc, b: dict) -> None:
    into = b.get("intoClause")
    acc.enter("create" if into is not None and acc.kind is None else "select")
    saved_w, saved_u = acc.rvwrite, acc.utility
    acc.rvwrite = acc.utility = False
    pushed = _push_ctes(acc, b.get("withClause"))
    if type(into) is dict:
        rel = into.get("rel")
        if type(rel) is dict:
            _written(acc, _relname(rel))
    _walk_except(acc, b, ("withClause", "intoClause"))
    if pushed:
        acc.ctes.pop()
    acc.rvwrite, acc.utility = saved_w, saved_u


def _dml_target(acc: _Acc, b: dict) -> str:
    rel = b.get("relation")
    if type(rel) is not dict:
        return "?"
    name = _relname(rel)
    _written(acc, name)
    return name


def _changes_rows(acc: _Acc) -> None:
    # an UPDATE / DELETE / MERGE / upsert: the top command's tag counts its own rows
    if acc.kind is None:
        acc.counted = True
    acc.changes_rows = True


def _insert(acc: _Acc, b: dict) -> None:
    occ = b.get("onConflictClause")
    upsert = type(occ) is dict and occ.get("action") == "ONCONFLICT_UPDATE"
    if upsert:
        _changes_rows(acc)
    acc.enter("insert")
    if upsert:
        acc.kinds["update"] = None          # it updates rows too: rules on "update" match
    saved_w, saved_u = acc.rvwrite, acc.utility
    acc.rvwrite = acc.utility = False
    pushed = _push_ctes(acc, b.get("withClause"))
    target = _dml_target(acc, b)
    acc.flag("write", f"INSERT into {target}")
    _walk_except(acc, b, ("withClause", "relation"))
    if pushed:
        acc.ctes.pop()
    acc.rvwrite, acc.utility = saved_w, saved_u


def _update_or_delete(acc: _Acc, b: dict, verb: str) -> None:
    _changes_rows(acc)
    acc.enter(verb.lower())
    saved_w, saved_u = acc.rvwrite, acc.utility
    acc.rvwrite = acc.utility = False
    pushed = _push_ctes(acc, b.get("withClause"))
    target = _dml_target(acc, b)
    acc.flag("write", f"{verb} on {target}")
    _where_check(acc, verb, target, b.get("whereClause"), _dml_quals(acc, b))
    _walk_except(acc, b, ("withClause", "relation"))
    if pushed:
        acc.ctes.pop()
    acc.rvwrite, acc.utility = saved_w, saved_u


def _update(acc: _Acc, b: dict) -> None:
    _update_or_delete(acc, b, "UPDATE")


def _delete(acc: _Acc, b: dict) -> None:
    _update_or_delete(acc, b, "DELETE")


_MERGE_ACTIONS = {"CMD_INSERT": "insert", "CMD_UPDATE": "update", "CMD_DELETE": "delete"}


def _merge(acc: _Acc, b: dict) -> None:
    clauses = [w.get("MergeWhenClause") for w in b.get("mergeWhenClauses") or ()
               if type(w) is dict and type(w.get("MergeWhenClause")) is dict]
    if any(wc.get("commandType") in ("CMD_DELETE", "CMD_UPDATE") for wc in clauses):
        _changes_rows(acc)
    acc.enter("merge")
    # what the MERGE can do, so that a rule on "insert"/"update"/"delete" matches it too
    for wc in clauses:
        action = _MERGE_ACTIONS.get(wc.get("commandType"))
        if action:
            acc.kinds[action] = None
    saved_w, saved_u = acc.rvwrite, acc.utility
    acc.rvwrite = acc.utility = False
    pushed = _push_ctes(acc, b.get("withClause"))
    target = _dml_target(acc, b)
    acc.flag("write", f"MERGE into {target}")
    src = b.get("sourceRelation")
    src_rv = src.get("RangeVar") if type(src) is dict else None
    self_join = type(src_rv) is dict and _relname(src_rv) == target
    tgt = _dml_quals(acc, b)
    # WHEN ... AND conditions may narrow by the source row as well as the target's
    pair = _Target(tgt.quals | _rel_quals(src), acc.plvars)
    jc = b.get("joinCondition")
    join = _cond(jc, tgt) if jc is not None else _TRUE
    every_match = join in (_TRUE, _INDEP) or self_join
    for wc in clauses:
        cmd = wc.get("commandType")
        if cmd not in ("CMD_DELETE", "CMD_UPDATE"):
            continue
        verb = "DELETE" if cmd == "CMD_DELETE" else "UPDATE"
        cond = wc.get("condition")
        # whether the clause's own condition leaves every target row it is given: by the
        # target alone when the join matches every target row, else by the matched pair
        all_rows = cond is None or _cond(cond, tgt) in (_TRUE, _INDEP)
        all_cond = cond is None or _cond(cond, pair) in (_TRUE, _INDEP)
        match = wc.get("matchKind")
        if match == "MERGE_WHEN_MATCHED" and every_match and all_rows:
            why = ("the source is the target itself" if self_join
                   else "the join condition does not narrow the target's rows")
            acc.flag("destructive", f"MERGE into {target} ... THEN {verb} reaches every row: "
                     f"{why}")
        elif match == "MERGE_WHEN_MATCHED" and verb == "DELETE" and all_cond:
            acc.flag("destructive", f"MERGE into {target} WHEN MATCHED THEN DELETE deletes "
                     "every row the source matches, with no condition of its own")
        elif match == "MERGE_WHEN_NOT_MATCHED_BY_SOURCE" and all_rows:
            acc.flag("destructive", f"MERGE into {target} WHEN NOT MATCHED BY SOURCE THEN "
                     f"{verb} reaches every target row missing from the source")
    _walk_except(acc, b, ("withClause", "relation"))
    if pushed:
        acc.ctes.pop()
    acc.rvwrite, acc.utility = saved_w, saved_u


def _copy(acc: _Acc, b: dict) -> None:
    acc.enter("copy")
    # the file name is a literal, and pglast's JSON drops an empty one ('' reads like
    # STDIN here; Postgres refuses an empty path): the decision depends on a literal
    acc.literal = True
    is_from = bool(b.get("is_from"))
    fname = b.get("filename")
    rel = b.get("relation")
    name = _relname(rel) if type(rel) is dict else None
    what = name or "a query"
    if b.get("is_program"):
        acc.flag("escape", f"COPY {'FROM' if is_from else 'TO'} PROGRAM runs a shell command "
                 "on the database server")
    elif fname is not None:
        acc.flag("escape", f"COPY {'FROM' if is_from else 'TO'} a server file reads or writes "
                 "files on the database server")
    if is_from:
        if name:
            _written(acc, name)
        acc.flag("write", f"COPY FROM into {what}")
        acc.kinds["insert"] = None          # it inserts rows: rules on "insert" match
    elif name:
        acc.reads[name] = None
    q = b.get("query")
    if q is not None:
        acc.sub_kind = True
        saved = acc.ctx
        acc.ctx = saved + "COPY runs: "
        _walk(acc, q)
        acc.ctx = saved
        acc.sub_kind = False
    saved_u = acc.utility
    acc.utility = False
    _walk_except(acc, b, ("relation", "query"))
    acc.utility = saved_u


def _explain_analyze(acc: _Acc, options: list | None) -> bool:
    analyze = False
    for o in options or ():
        d = o.get("DefElem") if type(o) is dict else None
        if type(d) is not dict or d.get("defname") != "analyze":
            continue
        arg = d.get("arg")
        if arg is None:
            analyze = True
            continue
        value = _lit(acc, arg)
        # anything not clearly false runs the statement (fail closed)
        analyze = type(value) is not str or value.strip().lower() not in _OFF_VALUES
    return analyze


def _explain(acc: _Acc, b: dict) -> None:
    acc.enter("explain")
    q = b.get("query")
    if _explain_analyze(acc, b.get("options")):
        saved = acc.ctx
        acc.ctx = saved + "EXPLAIN ANALYZE runs it: "
        acc.sub_kind = True
        _walk(acc, q)
        acc.sub_kind = False
        acc.ctx = saved
    else:
        inner = _Acc(acc.text, acc.prepared, acc.plvars)
        _walk(inner, q)
        acc.merge(inner.build(""), acc.ctx + "plain EXPLAIN only plans it: ", executes=False)


def _prepare(acc: _Acc, b: dict) -> None:
    acc.enter("prepare")
    acc.name = b.get("name", "")
    saved = acc.ctx
    acc.ctx = saved + f'PREPARE {acc.name} AS: '
    acc.sub_kind = True
    _walk(acc, b.get("query"))
    acc.sub_kind = False
    acc.ctx = saved
    _walk(acc, b.get("argtypes"))


def _execute(acc: _Acc, b: dict) -> None:
    acc.enter("execute")
    acc.session = True
    name = b.get("name", "")
    acc.name = name
    body = acc.prepared.get(name) if acc.prepared is not None else None
    if body is None:
        acc.flag("opaque", f'EXECUTE {name}: pgguard has not seen "{name}" prepared in this '
                 "session")
    else:
        acc.merge(body, acc.ctx + f"EXECUTE {name} runs: ")
    _walk(acc, b.get("params"))


def _deallocate(acc: _Acc, b: dict) -> None:
    acc.enter("deallocate")
    acc.name = None if b.get("isall") else b.get("name", "")


def _vacuum(acc: _Acc, b: dict) -> None:
    acc.enter("vacuum" if b.get("is_vacuumcmd") else "analyze")
    _utility_walk(acc, b)
    if b.get("is_vacuumcmd") and _option_on(acc, b.get("options"), "full"):
        rels = [_relname(r["VacuumRelation"]["relation"]) for r in b.get("rels") or ()
                if type(r) is dict and type(r.get("VacuumRelation")) is dict
                and type(r["VacuumRelation"].get("relation")) is dict]
        what = ", ".join(rels) if rels else "every table of the database"
        acc.flag("destructive", f"VACUUM FULL rewrites {what} under an ACCESS EXCLUSIVE "
                 "lock: every read and write of it waits until the rewrite ends (an "
                 "outage on a large table); plain VACUUM reclaims space without that lock")


# LOCK TABLE modes (LockStmt.mode) that stop other sessions' writes or reads of the whole
# table until the transaction ends: SHARE and stronger
_LOCK_MODES = {5: "SHARE", 6: "SHARE ROW EXCLUSIVE", 7: "EXCLUSIVE", 8: "ACCESS EXCLUSIVE"}


def _option_on(acc: _Acc, options: Any, name: str, unread: bool = True) -> bool:
    """Whether DefElem option ``name`` is on as Postgres reads it: its last occurrence
    decides (``VACUUM (FULL false, FULL)`` is FULL); FULL, FULL true, FULL 1 are on,
    false / off / 0 / no off; a value pgguard cannot read counts as ``unread``."""
    on = False
    for o in options or ():
        d = o.get("DefElem") if type(o) is dict else None
        if type(d) is not dict or str(d.get("defname", "")).lower() != name:
            continue
        arg = d.get("arg")
        if arg is None:
            on = True
            continue
        v = str(_lit(acc, arg)).strip().lower()     # String, Integer, Boolean, or _NOVAL
        on = True if v in ("true", "on", "1", "yes") else False \
            if v in ("false", "off", "0", "no") else unread
    return on


def _outage(acc: _Acc, tag: str, b: dict) -> None:
    """CLUSTER, REINDEX (not CONCURRENTLY) and LOCK TABLE in SHARE mode or stronger take
    locks that stop every other session's writes (or reads) of whole tables until they
    end: the 2 a.m. outage an agent causes without destroying a row (destructive)."""
    if tag == "ClusterStmt":
        rel = b.get("relation")
        what = _relname(rel) if type(rel) is dict else "every table clustered before"
        acc.flag("destructive", f"CLUSTER rewrites {what} under an ACCESS EXCLUSIVE lock: "
                 "every read and write of it waits until the rewrite ends (an outage on a "
                 "large table)")
    elif tag == "ReindexStmt":
        if _option_on(acc, b.get("params"), "concurrently", unread=False):
            return
        rel = b.get("relation")
        what = _relname(rel) if type(rel) is dict else (b.get("name") or "the database")
        acc.flag("destructive", f"REINDEX of {what} blocks every write of the tables it "
                 "reindexes (and reads through their indexes) until it ends; REINDEX "
                 "(CONCURRENTLY) does not")
    else:
        mode = _LOCK_MODES.get(b.get("mode", 8) if type(b.get("mode")) is int else 8)
        if mode is None:
            return
        rels = ", ".join(_relname(r["RangeVar"]) for r in b.get("relations") or ()
                         if type(r) is dict and type(r.get("RangeVar")) is dict) or "?"
        stops = "every read and write" if mode in ("ACCESS EXCLUSIVE",) else (
            "every write" if mode != "EXCLUSIVE" else "every write and row lock")
        acc.flag("destructive", f"LOCK TABLE {rels} IN {mode} MODE stops {stops} of it by "
                 "other sessions until the transaction ends; lock the rows you change "
                 "(SELECT ... FOR UPDATE) instead")


def _fetch(acc: _Acc, b: dict) -> None:
    acc.enter("move" if b.get("ismove") else "fetch")


def _transaction(acc: _Acc, b: dict) -> None:
    kind = _TXN_KINDS.get(b.get("kind", ""), "transaction")
    acc.enter(kind)
    if kind == "prepare_transaction":
        acc.flag("escape", "PREPARE TRANSACTION takes the transaction out of the session: "
                 "its changes and locks outlive it, past the guard's checks, until any "
                 "session commits or rolls it back")
    elif kind in ("commit_prepared", "rollback_prepared"):
        acc.flag("escape", f"{kind.replace('_', ' ').upper()} decides a prepared "
                 "transaction, which may be another session's")
    _txn_modes(acc, b.get("options"), "transaction_", "BEGIN")


# BEGIN / SET TRANSACTION / SET SESSION CHARACTERISTICS: DefElem name -> setting suffix
_TXN_MODES = {"transaction_isolation": "transaction_isolation",
              "transaction_read_only": "transaction_read_only",
              "transaction_deferrable": "transaction_deferrable"}


def _txn_modes(acc: _Acc, options: list | None, prefix: str, how: str) -> None:
    for o in options or ():
        d = o.get("DefElem") if type(o) is dict else None
        if type(d) is not dict:
            continue
        mode = _TXN_MODES.get(d.get("defname", ""))
        if mode is None:
            continue
        value = _lit(acc, d.get("arg"))
        if type(value) is not str:
            value = None
        elif mode != "transaction_isolation":
            value = "on" if value not in ("0", "false", "off") else "off"
        name = mode if prefix == "transaction_" else "default_" + mode
        _setting(acc, name, value, how)


def _varset(acc: _Acc, b: dict) -> None:
    kind = b.get("kind", "")
    acc.enter("reset" if kind in ("VAR_RESET", "VAR_RESET_ALL") else "set")
    name = (b.get("name") or "").lower()
    # RESET ALL returns every setting to the session's start (pgguard chose those) and
    # leaves role and session_authorization alone (GUC_NO_RESET_ALL)
    if kind == "VAR_RESET_ALL" or not name:
        return
    session = not acc.scoped_set
    if kind == "VAR_SET_MULTI":
        if name == "transaction":
            _txn_modes(acc, b.get("args"), "transaction_", "SET TRANSACTION")
        elif name == "session characteristics":
            _txn_modes(acc, b.get("args"), "default_",
                       "SET SESSION CHARACTERISTICS AS TRANSACTION")
        else:
            # TRANSACTION SNAPSHOT and whatever a later Postgres adds
            _setting(acc, name.replace(" ", "_"), _set_value(acc, b.get("args")),
                     "SET", session=session)
        return
    how = "RESET" if kind == "VAR_RESET" else "SET"
    value = _set_value(acc, b.get("args")) if kind == "VAR_SET_VALUE" else None
    parts = _set_parts(acc, b.get("args")) if kind == "VAR_SET_VALUE" else None
    _setting(acc, name, value, how, parts=parts,
             resetting=kind in ("VAR_RESET", "VAR_SET_DEFAULT"),
             session=session)
    _walk(acc, b.get("args"))


def _setstmt_of(acc: _Acc, b: dict, how: str) -> None:
    # ALTER ROLE / DATABASE / SYSTEM ... SET: persistent, flagged as such by the caller;
    # the setting itself is flagged as a SET would be, not recorded as a session change
    st = b.get("setstmt")
    if type(st) is dict and st.get("name"):
        value = _set_value(acc, st.get("args")) if st.get("kind") == "VAR_SET_VALUE" \
            else None
        _setting(acc, st["name"].lower(), value, how, session=False,
                 resetting=st.get("kind") in ("VAR_RESET", "VAR_RESET_ALL",
                                              "VAR_SET_DEFAULT"))


def _discard(acc: _Acc, b: dict) -> None:
    acc.enter("discard")
    if b.get("target") == "DISCARD_ALL":
        acc.flag("privilege", "DISCARD ALL resets the session authorization and role")


def _grant(acc: _Acc, b: dict) -> None:
    is_grant = bool(b.get("is_grant"))
    acc.enter("grant" if is_grant else "revoke")
    acc.flag("privilege", f"{'GRANT' if is_grant else 'REVOKE'} changes privileges")
    _utility_walk(acc, b)


def _drop(acc: _Acc, b: dict) -> None:
    acc.enter("drop")
    rtype = b.get("removeType", "")
    label = _DROP_LABEL.get(rtype) or rtype.replace("OBJECT_", "").replace("_", " ")
    names = []
    for o in b.get("objects") or ():
        if type(o) is dict and "List" in o:
            parts = [_sval(x) for x in o["List"].get("items") or ()]
        elif type(o) is dict and "ObjectWithArgs" in o:
            parts = [_sval(x) for x in o["ObjectWithArgs"].get("objname") or ()]
        elif type(o) is dict and "String" in o:
            parts = [_sval(o)]
        elif type(o) is dict and "TypeName" in o:
            parts = [_sval(x) for x in o["TypeName"].get("names") or ()]
        else:
            parts = []
        if rtype in _REL_OBJECTS and parts:
            full = ".".join(parts) if len(parts) > 1 else _default_schema(parts[0]) + "." \
                + parts[0]
            _written(acc, full)
            names.append(full)
        elif rtype in _ON_REL_OBJECTS and len(parts) > 1:
            # DROP TRIGGER / RULE / POLICY name ON [schema.]table
            rel = parts[:-1]
            full = ".".join(rel) if len(rel) > 1 else _default_schema(rel[0]) + "." + rel[0]
            _written(acc, full)
            names.append(f"{parts[-1]} ON {full}")
        elif parts:
            names.append(".".join(parts))
    acc.flag("destructive", f"DROP {label} {', '.join(names)}".rstrip())
    if rtype == "OBJECT_POLICY":
        acc.flag("privilege", "DROP POLICY changes row-level security")
    if rtype in ("OBJECT_EXTENSION", "OBJECT_FDW", "OBJECT_FOREIGN_SERVER"):
        acc.flag("escape", f"DROP {label} changes installed connectors or server code")
    _utility_walk(acc, b, ("objects",))


def _truncate(acc: _Acc, b: dict) -> None:
    acc.enter("truncate")
    _utility_walk(acc, b)
    names = ", ".join(acc.writes) or "?"
    acc.flag("destructive", f"TRUNCATE {names} removes every row")
    acc.flag("write", f"TRUNCATE {names}")


_FK_ACTIONS = {"c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}


def _referential_actions(acc: _Acc, target: str, d: Any, verb: str = "ALTER TABLE") -> None:
    """A foreign key with ON DELETE/UPDATE CASCADE, SET NULL or SET DEFAULT (added to an
    existing table, or declared by CREATE TABLE): later DELETEs and UPDATEs of the
    referenced table, in every session, change rows of ``target`` without naming it,
    where no rule on ``target`` sees them and no command tag counts them (like a
    trigger): opaque."""
    if type(d) is not dict:
        return
    cons = d.get("ColumnDef", {}).get("constraints") if "ColumnDef" in d else [d]
    for c in cons or ():
        c = c.get("Constraint") if type(c) is dict else None
        if type(c) is not dict or c.get("contype") != "CONSTR_FOREIGN":
            continue
        acts = [f"ON {ev} {_FK_ACTIONS[c.get(key)]}"
                for ev, key in (("DELETE", "fk_del_action"), ("UPDATE", "fk_upd_action"))
                if c.get(key) in _FK_ACTIONS]
        if acts:
            pk = c.get("pktable")
            ref = _relname(pk) if type(pk) is dict else "?"
            acc.flag("opaque", f"{verb} {target} adds a foreign key {' '.join(acts)}: "
                     f"later changes to {ref}, in every session, change rows of {target} "
                     "without naming it")


def _alter_table(acc: _Acc, b: dict) -> None:
    acc.enter("alter")
    rel = b.get("relation")
    target = _relname(rel) if type(rel) is dict else "?"
    for c in b.get("cmds") or ():
        cmd = c.get("AlterTableCmd") if type(c) is dict else None
        if type(cmd) is not dict:
            continue
        sub = cmd.get("subtype", "")
        col = cmd.get("name") or ""
        at_col = f"ALTER TABLE {target} ALTER COLUMN {col}"
        if sub == "AT_AddColumn" and _temp_type(cmd.get("def")):
            acc.flag("destructive", f"ALTER TABLE {target} ADD COLUMN of a type in pg_temp: "
                     "the column is dropped with the type when the session ends")
        if sub == "AT_AddConstraint":
            acc.flag("destructive", f"ALTER TABLE {target} ADD CONSTRAINT: a constraint on "
                     "an existing table can refuse the application's later writes (a CHECK "
                     "that holds today but not tomorrow, a foreign key to a table someone "
                     "else controls, a UNIQUE or EXCLUDE over what it writes); ask an "
                     "administrator to add it")
        elif sub == "AT_AddColumn" and _gating_column(cmd.get("def")):
            acc.flag("destructive", f"ALTER TABLE {target} ADD COLUMN {_gating_column(cmd.get('def'))}: "
                     "a new column that can refuse the application's later writes, or "
                     "computes something anew at each of them; add it plain (a constant "
                     "DEFAULT may go with NOT NULL)")
        if sub == "AT_AddConstraint" or sub == "AT_AddColumn":
            _referential_actions(acc, target, cmd.get("def"))
            if _not_valid(cmd.get("def")):
                acc.flag("destructive", f"ALTER TABLE {target} adds a constraint NOT VALID: "
                         "the existing rows are never checked against it, so it can refuse "
                         "every later write of the application (CHECK (amount < 0)); add it "
                         "validated")
        if sub in _AT_PLAIN:
            pass
        elif sub in _AT_ENABLING:
            acc.flag("opaque", f"ALTER TABLE {target} {_AT_ENABLING[sub]} {col}".rstrip()
                     + ": switches on code that runs at every later write of the table, in "
                     "every session, where pgguard does not judge what it runs; ask an "
                     "administrator")
        elif sub in _AT_DESTRUCTIVE:
            acc.flag("destructive", _AT_DESTRUCTIVE[sub].format(t=target, c=col, at=at_col))
        elif sub == "AT_DropColumn":
            acc.flag("destructive", f"ALTER TABLE {target} DROP COLUMN {col}".rstrip())
        elif sub == "AT_DropConstraint":
            acc.flag("destructive", f"ALTER TABLE {target} DROP CONSTRAINT {col}".rstrip())
        elif sub == "AT_ChangeOwner":
            acc.flag("privilege", f"ALTER TABLE {target} OWNER TO changes the owner")
        elif sub in ("AT_DisableRowSecurity", "AT_NoForceRowSecurity"):
            acc.flag("privilege", f"ALTER TABLE {target} weakens row-level security")
        elif sub in ("AT_EnableRowSecurity", "AT_ForceRowSecurity"):
            acc.flag("privilege", f"ALTER TABLE {target} turns row-level security on: what "
                     "every session sees and may write then depends on its policies")
        elif sub in _DISABLING_SUBTYPES:
            acc.flag("privilege", f"ALTER TABLE {target} {_DISABLING_SUBTYPES[sub]} (they may "
                     "enforce integrity or auditing for every session)")
        elif sub == "AT_ColumnDefault":
            if cmd.get("def") is None:
                acc.flag("destructive", f"{at_col} DROP DEFAULT: every later INSERT that "
                         "leaves the column out, in every session, stores NULL or fails")
            else:
                acc.flag("destructive", f"{at_col} SET DEFAULT changes the value every later "
                         "INSERT that leaves the column out stores, in every session")
        elif sub == "AT_SetIdentity":
            _identity_options(acc, at_col, _cmd_options(cmd))
        elif sub == "AT_SetStorage":
            how = _lit(acc, cmd.get("def"))
            if type(how) is not str or how.lower() not in _HARMLESS_STORAGE:
                acc.flag("destructive", f"{at_col} SET STORAGE {how if type(how) is str else '?'}"
                         ": values stored inline only, so every later write of a long value "
                         "fails")
        elif sub in _INHERITANCE_SUBTYPES:
            _inheritance_change(acc, target, sub, cmd.get("def"))
        elif sub in _AT_REWRITES:
            acc.flag("destructive", f"ALTER TABLE {target} {_AT_REWRITES[sub]} rewrites the "
                     "table under an ACCESS EXCLUSIVE lock: every read and write of it waits "
                     "until the rewrite ends (an outage on a large table)")
        elif sub == "AT_SetUnLogged":
            acc.flag("destructive", f"ALTER TABLE {target} SET UNLOGGED: an unlogged table is "
                     "emptied after a crash and is not replicated")
        elif sub in ("AT_SetRelOptions", "AT_ResetRelOptions", "AT_ReplaceRelOptions"):
            weakened = sorted(_cmd_options(cmd).keys() & _SECURITY_RELOPTIONS)
            if weakened:
                acc.flag("privilege", f"ALTER {target} changes {', '.join(weakened)}, which "
                         "decides what leaks through a view")
            off = _autovacuum_off(acc, cmd) if sub != "AT_ResetRelOptions" else None
            if off is not None:
                acc.flag("destructive", f"ALTER {target} SET ({off}): autovacuum is turned "
                         "off or held back: dead rows pile up and the table bloats, and "
                         "only an emergency vacuum stops transaction ID wraparound (a slow "
                         "outage; vacuum settings are a DBA's)")
        elif sub == "AT_AlterColumnType":
            using = " ... USING" if _has_using(cmd) else ""
            acc.flag("destructive", f"ALTER TABLE {target} ALTER COLUMN {col} TYPE{using} "
                     "rewrites every value of the column (a lossy conversion or USING "
                     "can destroy it)")
        elif sub in ("AT_GenericOptions", "AT_AlterColumnGenericOptions"):
            acc.flag("escape", f"ALTER FOREIGN TABLE {target} OPTIONS changes where on the "
                     "remote server its rows are read and written")
        else:
            # an allow-list: what pgguard does not know is refused as the strongest
            acc.flag("destructive", f"ALTER TABLE {target}: pgguard does not know what the "
                     f"sub-command {sub or '?'} does to the table, so it is refused as "
                     "destructive; ask an administrator to run it")
    _utility_walk(acc, b)


# ALTER TABLE sub-commands that lose no data and leave the table's existing use as it was
# (new columns, indexes, validated constraints, storage and physical placement, switching
# triggers and rules on); the others are judged one by one above, and one pgguard does
# not know is refused as destructive
_AT_PLAIN = frozenset({
    "AT_AddColumn", "AT_AddColumnToView", "AT_SetCompression",
    "AT_AddIndex", "AT_AddConstraint", "AT_ValidateConstraint", "AT_AddIndexConstraint",
    "AT_ClusterOn", "AT_DropCluster", "AT_DropOids", "AT_DropOf",
})
# ... and those that rewrite the whole table under an ACCESS EXCLUSIVE lock (an outage on a
# large table, like VACUUM FULL)
_AT_REWRITES = {"AT_SetLogged": "SET LOGGED", "AT_SetAccessMethod": "SET ACCESS METHOD",
                "AT_SetTableSpace": "SET TABLESPACE"}
# ... and those that switch on code to run at every later write, in every session (a
# trigger or rule its owner switched off, perhaps on purpose): opaque
_AT_ENABLING = {
    "AT_EnableTrig": "ENABLE TRIGGER", "AT_EnableAlwaysTrig": "ENABLE ALWAYS TRIGGER",
    "AT_EnableTrigAll": "ENABLE TRIGGER ALL", "AT_EnableTrigUser": "ENABLE TRIGGER USER",
    "AT_EnableRule": "ENABLE RULE", "AT_EnableAlwaysRule": "ENABLE ALWAYS RULE",
}
# ... and those that change how every later write behaves, or break it ({at}: ALTER
# TABLE t ALTER COLUMN c)
_AT_DESTRUCTIVE = {
    "AT_DropIdentity": "{at} DROP IDENTITY drops the column's identity sequence: later "
                       "INSERTs get no key, and an identity added back starts over at 1, "
                       "colliding with existing keys",
    "AT_AddIdentity": "{at} ADD GENERATED AS IDENTITY starts a new sequence (at 1 unless "
                      "told otherwise) for a column that may already hold keys: later "
                      "INSERTs can collide with existing keys",
    "AT_DropNotNull": "{at} DROP NOT NULL lets every later write, in every session, store "
                      "NULL where the application relies on a value",
    "AT_DropExpression": "{at} DROP EXPRESSION stops computing the generated column: later "
                         "writes leave it stale",
    "AT_SetExpression": "{at} SET EXPRESSION rewrites every value of the generated column",
    "AT_AlterConstraint": "ALTER TABLE {t} ALTER CONSTRAINT changes when (DEFERRABLE, "
                          "INITIALLY DEFERRED) or whether the constraint is checked for "
                          "every later write, in every session",
    "AT_ReplicaIdentity": "ALTER TABLE {t} REPLICA IDENTITY changes what every later UPDATE "
                          "and DELETE logs for replication (NOTHING makes them fail on a "
                          "published table)",
    "AT_SetStatistics": "{at} SET STATISTICS changes what ANALYZE gathers for the column, "
                        "which every session's query plans rely on (0: nothing)",
    "AT_SetOptions": "{at} SET (n_distinct ...) overrides the statistics every session's "
                     "query plans rely on",
    "AT_ResetOptions": "{at} RESET (n_distinct ...) changes the statistics every session's "
                       "query plans rely on",
    "AT_SetNotNull": "{at} SET NOT NULL refuses every later write of the application that "
                     "leaves the column out",
    "AT_AddOf": "ALTER TABLE {t} OF makes the table depend on the type: dropping the type "
                "drops the table with it (a type in pg_temp is dropped when the session "
                "ends)",
}
_HARMLESS_STORAGE = frozenset({"extended", "external", "main", "default"})


def _gating_column(d: Any) -> str:
    """What makes a new column able to refuse later writes ('' : nothing): a constraint
    (CHECK, UNIQUE, PRIMARY KEY, REFERENCES, EXCLUDE), NOT NULL with no DEFAULT, a
    generated expression, a DEFAULT that calls a function."""
    if type(d) is not dict or type(d.get("ColumnDef")) is not dict:
        return ""
    cons = [c.get("Constraint") for c in d["ColumnDef"].get("constraints") or ()
            if type(c) is dict and type(c.get("Constraint")) is dict]
    kinds = {c.get("contype") for c in cons}
    for c in cons:
        kind = c.get("contype")
        if kind in ("CONSTR_CHECK", "CONSTR_UNIQUE", "CONSTR_PRIMARY", "CONSTR_FOREIGN",
                    "CONSTR_EXCLUSION", "CONSTR_GENERATED", "CONSTR_IDENTITY"):
            return kind[7:].lower().replace("_", " ")
        if kind == "CONSTR_NOTNULL" and "CONSTR_DEFAULT" not in kinds:
            return "not null (no default)"
        if kind == "CONSTR_DEFAULT" and not _constant(c.get("raw_expr")):
            # (1 / (CASE WHEN CURRENT_TIMESTAMP > '<soon>' THEN 0 ELSE 1 END) fails every
            # INSERT from then on, and calls no function)
            return "default that is not a constant"
    tn = d["ColumnDef"].get("typeName")
    tn = tn.get("TypeName", tn) if type(tn) is dict else None
    if not _builtin_type(tn):
        names = [_sval(n) for n in (tn or {}).get("names") or ()]
        # a domain carries its own CHECK and DEFAULT (nextval, clock_timestamp() with
        # CHECK (VALUE < '<soon>')): pgguard cannot tell one from a type by the name
        return f"of type {'.'.join(names)} (a domain's CHECK or DEFAULT, a serial's sequence, " \
               "can refuse later writes)"
    return ""


def _builtin_type(tn: Any) -> bool:
    """A type name that is pg_catalog's whatever the search_path: qualified by
    pg_catalog, or one of its names as written (case as the parse tree has it: a quoted
    "Int4" is a domain's name, not int4); serial types are not (a NOT NULL column drawing
    from a new sequence, which runs out)."""
    if type(tn) is not dict:
        return False
    names = [_sval(n) for n in tn.get("names") or ()]
    if not names:
        return False
    if len(names) == 2 and names[0] == "pg_catalog":
        return True
    return len(names) == 1 and names[0] in _BUILTIN_TYPES


def _constant(expr: Any) -> bool:
    """A literal, NULL, or a cast of one (DEFAULT 0, DEFAULT 'x'::text, DEFAULT -1)."""
    if type(expr) is not dict:
        return expr is None
    if "A_Const" in expr:
        return True
    cast = expr.get("TypeCast")
    if type(cast) is dict:
        # (a cast to a domain runs its CHECK at every INSERT: 'x'::gd)
        return _builtin_type(cast.get("typeName")) and _constant(cast.get("arg"))
    neg = expr.get("A_Expr")
    return type(neg) is dict and neg.get("lexpr") is None and _constant(neg.get("rexpr")) \
        and [_sval(n) for n in neg.get("name") or ()] in (["-"], ["+"])


# pg_catalog's type names as written unqualified (the SQL-standard spellings, int,
# varchar, timestamp with time zone ..., parse to pg_catalog.* names already)
_BUILTIN_TYPES = frozenset(
    "text bpchar varchar char name int2 int4 int8 float4 float8 numeric money bool "
    "date time timetz timestamp timestamptz interval bytea json jsonb xml uuid inet cidr "
    "macaddr macaddr8 bit varbit tsvector tsquery point line lseg box path polygon circle "
    "int4range int8range numrange tsrange tstzrange daterange int4multirange "
    "int8multirange nummultirange tsmultirange tstzmultirange datemultirange oid regclass "
    "regtype regproc regprocedure regoper regoperator regnamespace regrole regconfig "
    "regdictionary pg_lsn txid_snapshot pg_snapshot int integer smallint bigint real "
    "float decimal boolean character".split())


def _has_node(tree: Any, tag: str) -> bool:
    todo = [tree]
    while todo:
        v = todo.pop()
        if type(v) is dict:
            if tag in v:
                return True
            todo.extend(v.values())
        elif type(v) is list:
            todo.extend(v)
    return False


def _temp_type(d: Any) -> bool:
    """A column definition whose type is named in pg_temp (pg_temp, pg_temp_N)."""
    if type(d) is not dict or type(d.get("ColumnDef")) is not dict:
        return False
    tn = d["ColumnDef"].get("typeName")
    names = tn.get("TypeName", tn).get("names") if type(tn) is dict else None
    return any(_sval(n).lower().startswith("pg_temp") for n in names or ())


def _not_valid(d: Any) -> bool:
    """A constraint added NOT VALID (itself, or among a new column's constraints)."""
    if type(d) is not dict:
        return False
    cons = d["ColumnDef"].get("constraints") if type(d.get("ColumnDef")) is dict else [d]
    return any(type(c) is dict and type(c.get("Constraint")) is dict
               and c["Constraint"].get("skip_validation") for c in cons or ())


# sequence options that make a later nextval() fail or hand out a value again
# (ALTER SEQUENCE and an identity column's SET ...): RESTART moves it, a negative
# INCREMENT walks back over used keys, CYCLE wraps to them, MINVALUE / MAXVALUE / AS a
# narrower type make it run out
# sequence options ALTER SEQUENCE / ALTER COLUMN ... SET may carry (an allow-list: any
# other is a hazard); INCREMENT and CACHE up to _SEQ_STEP_MAX
_SEQ_OPTIONS = frozenset({"restart", "increment", "cycle", "minvalue", "maxvalue", "as",
                          "cache", "start", "owned_by", "sequence_name", "generated"})
_SEQ_STEP_MAX = 1000


def _small_count(v: Any) -> bool:
    try:
        return 1 <= int(str(v).strip()) <= _SEQ_STEP_MAX
    except ValueError:
        return False


def _sequence_hazards(acc: _Acc, opts: dict[str, Any]) -> list[str]:
    out = []
    if "restart" in opts:
        out.append("RESTART moves the sequence")
    if "increment" in opts:
        v = _lit(acc, opts["increment"])
        if type(v) is not str or v.strip().startswith("-"):
            out.append("a negative INCREMENT walks back over keys already used")
        elif not _small_count(v):
            out.append(f"INCREMENT {v} can make it run out (pgguard allows 1 to {_SEQ_STEP_MAX})")
    if "cache" in opts and not _small_count(_lit(acc, opts["cache"])):
        out.append(f"CACHE beyond {_SEQ_STEP_MAX} can make it run out (each session takes "
                   "that many values)")
    for k in opts:
        if k not in _SEQ_OPTIONS:
            out.append(f"pgguard does not know the sequence option {k.upper()}")
    if opts.get("cycle") is not None and _lit(acc, opts["cycle"]) != "false":
        out.append("CYCLE wraps around to keys already used")
    for k in ("minvalue", "maxvalue"):
        if opts.get(k) is not None:
            out.append(f"{k.upper()} can make it run out")
    if "as" in opts:
        out.append("AS another type can make it run out")
    return out


def _identity_options(acc: _Acc, at_col: str, opts: dict[str, Any]) -> None:
    hazards = _sequence_hazards(acc, opts)
    if "generated" in opts:
        hazards.append("SET GENERATED changes which later INSERTs of the column are "
                       "refused (ALWAYS) or accepted")
    if hazards:
        acc.flag("destructive", f"{at_col}: {'; '.join(hazards)} (a sequence is not moved "
                 "back by ROLLBACK: later INSERTs can fail or collide with existing keys)")


_DISABLING_SUBTYPES = {
    "AT_DisableTrig": "DISABLE TRIGGER switches a trigger off",
    "AT_DisableTrigAll": "DISABLE TRIGGER ALL switches its triggers off",
    "AT_DisableTrigUser": "DISABLE TRIGGER USER switches its triggers off",
    "AT_DisableRule": "DISABLE RULE switches a rule off",
    # a REPLICA trigger or rule fires only in replication sessions: off for every other
    "AT_EnableReplicaTrig": "ENABLE REPLICA TRIGGER switches a trigger off for every "
                            "session but replication's",
    "AT_EnableReplicaRule": "ENABLE REPLICA RULE switches a rule off for every session but "
                            "replication's",
}
_SECURITY_RELOPTIONS = frozenset({"security_barrier", "security_invoker", "check_option"})


# ALTER TABLE sub-commands that move a whole table's rows into or out of another table
_INHERITANCE_SUBTYPES = frozenset({"AT_AttachPartition", "AT_DetachPartition",
                                   "AT_DetachPartitionFinalize", "AT_AddInherit",
                                   "AT_DropInherit"})


def _inheritance_change(acc: _Acc, target: str, sub: str, d: Any) -> None:
    """ATTACH/DETACH PARTITION, [NO] INHERIT: every row of the partition or child table
    appears in or disappears from the parent, so rules on the parent's inserts and
    deletes match, and taking rows away is destructive."""
    if type(d) is not dict:
        return
    pc = d.get("PartitionCmd")
    rv = pc.get("name") if type(pc) is dict else d.get("RangeVar")
    if type(rv) is not dict:
        return
    other = _relname(rv)
    # ALTER TABLE parent ... PARTITION child; ALTER TABLE child [NO] INHERIT parent
    parent, child = (target, other) if pc is not None else (other, target)
    _written(acc, parent)
    _written(acc, child)
    if sub in ("AT_AttachPartition", "AT_AddInherit"):
        acc.kinds["insert"] = None
        acc.flag("write", f"every row of {child} becomes a row of {parent}")
    else:
        acc.kinds["delete"] = None
        acc.flag("write", f"every row of {child} leaves {parent}")
        acc.flag("destructive", f"ALTER TABLE ... {'DETACH PARTITION' if pc is not None else 'NO INHERIT'} "
                 f"removes every row of {child} from {parent}")


def _cmd_options(cmd: dict) -> dict[str, Any]:
    """The DefElem options of an ALTER TABLE sub-command (its def is a List node)."""
    d = cmd.get("def")
    if type(d) is dict and type(d.get("List")) is dict:
        return _defelems(d["List"].get("items"))
    return _defelems(d if type(d) is list else None)


def _autovacuum_off(acc: _Acc, cmd: dict) -> str | None:
    """The option of an ALTER TABLE SET (...) that turns autovacuum off for the table or
    its TOAST table (``toast.autovacuum_enabled``; a value pgguard cannot read counts as
    off) or holds it back (any other ``autovacuum_*`` option: thresholds, scale
    factors, cost limits and delays, freeze ages; ``vacuum_index_cleanup``,
    ``vacuum_truncate``), as written; None: none."""
    d = cmd.get("def")
    items = d["List"].get("items") if type(d) is dict and type(d.get("List")) is dict \
        else d if type(d) is list else None
    for o in items or ():
        de = o.get("DefElem") if type(o) is dict else None
        if type(de) is not dict:
            continue
        name = str(de.get("defname", "")).lower()
        space = de.get("defnamespace")
        shown = f"{space}.{name}" if space else name
        if name == "autovacuum_enabled":
            arg = de.get("arg")
            v = "on" if arg is None else str(_lit(acc, arg)).strip().lower()
            if v not in ("true", "on", "1", "yes"):
                return f"{shown} = off"
        elif name.startswith("autovacuum_") or name in ("vacuum_index_cleanup",
                                                         "vacuum_truncate"):
            return shown
    return None


def _has_using(cmd: dict) -> bool:
    d = cmd.get("def")
    cd = d.get("ColumnDef") if type(d) is dict else None
    return type(cd) is dict and cd.get("raw_default") is not None


def _replace_check(acc: _Acc, b: dict, what: str) -> None:
    # pgguard cannot know whether the object exists: treat it as replacing one
    if b.get("replace"):
        acc.flag("destructive", f"CREATE OR REPLACE {what} replaces the existing "
                 "definition, if there is one")


# renames and schema moves that take nothing out of a rule's or a mask's reach (pgguard's
# rules, masks and views name none of these objects); every other one is destructive
_HARMLESS_MOVES = frozenset({
    "OBJECT_INDEX", "OBJECT_TABCONSTRAINT", "OBJECT_DOMCONSTRAINT", "OBJECT_TRIGGER",
    "OBJECT_POLICY", "OBJECT_RULE", "OBJECT_STATISTIC_EXT",
})


def _moved_name(b: dict, kind: str) -> str:
    rel = b.get("relation")
    name = _relname(rel) if type(rel) is dict else ""
    if kind == "OBJECT_COLUMN" or kind == "OBJECT_ATTRIBUTE":
        return f"{name}.{b.get('subname') or '?'}"
    if name:
        return name
    if b.get("subname"):
        return str(b["subname"])
    obj = b.get("object")
    if type(obj) is dict:
        owa = obj.get("ObjectWithArgs")
        if type(owa) is dict:
            return _dotted(owa.get("objname") or ())
        if "String" in obj:
            return _sval(obj)
    if type(obj) is list:
        return _dotted(obj)
    return kind.removeprefix("OBJECT_").lower()


def _moved(acc: _Acc, b: dict, kind: str, how: str) -> None:
    """A rename or a SET SCHEMA: the old name stops existing. Rules, masks and the
    relations pgguard knows behind views name objects, so a guarded identity renaming
    one would move it out of their reach (rename ``orders`` to ``o2``, then write to
    ``o2``; a later connection no longer knows the two are one): destructive, like a
    DROP of the old name, except for the objects nothing in pgguard names."""
    if kind in _HARMLESS_MOVES:
        return
    name = _moved_name(b, kind)
    acc.flag("destructive", f"{how} {name}: the old name stops existing, so every statement, "
             "rule and mask that names it no longer reaches it")


def _rename(acc: _Acc, b: dict) -> None:
    acc.enter("alter")
    kind = b.get("renameType") or ""
    if kind == "OBJECT_ROLE":
        acc.flag("privilege", "ALTER ROLE ... RENAME changes a role")
    elif kind == "OBJECT_INDEX":
        # Postgres renames any relation through ALTER INDEX ... RENAME (a table too, for
        # compatibility): pgguard cannot tell which it names
        _moved(acc, b, "OBJECT_TABLE", "ALTER INDEX ... RENAME (which renames a table "
               "of that name too) of")
    elif kind in ("OBJECT_TABCONSTRAINT", "OBJECT_DOMCONSTRAINT"):
        # the application names its constraints (INSERT ... ON CONFLICT ON CONSTRAINT,
        # the constraint an error names); a key's index is renamed with it (round 18)
        obj = b.get("object")
        items = obj.get("List", {}).get("items") if type(obj) is dict else None
        owner = _moved_name(b, kind) if kind == "OBJECT_TABCONSTRAINT" else \
            "domain " + ".".join(_sval(x) for x in items or ())
        acc.flag("destructive", f"RENAME CONSTRAINT {b.get('subname') or '?'} of "
                 f"{owner}: every later statement that names the "
                 "constraint (INSERT ... ON CONFLICT ON CONSTRAINT), in every session, "
                 "fails; a key's index is renamed with it")
    else:
        _moved(acc, b, kind, "RENAME of")
    _utility_walk(acc, b)


def _set_schema(acc: _Acc, b: dict) -> None:
    acc.enter("alter")
    _moved(acc, b, b.get("objectType") or "",
           f"SET SCHEMA {b.get('newschema') or '?'} moves")
    _utility_walk(acc, b)


def _alter_setting(acc: _Acc, b: dict, tag: str) -> None:
    acc.enter("alter")
    for flag, why in _UTILITY_FLAGS.get(tag, ()):
        acc.flag(flag, why)
    _setstmt_of(acc, b, "ALTER ... SET")
    _utility_walk(acc, b, ("setstmt",))


def _alter_seq(acc: _Acc, b: dict) -> None:
    acc.enter("alter")
    opts = _defelems(b.get("options"))
    hazards = _sequence_hazards(acc, opts)
    owner = opts.get("owned_by")
    items = owner.get("List", {}).get("items") if type(owner) is dict else None
    if owner is not None and [_sval(i).lower() for i in items or ()] != ["none"]:
        hazards.append("OWNED BY ties it to a column: dropping that column or its table (a "
                       "temporary table when the session ends) drops the sequence and the "
                       "DEFAULT of every column drawing from it")
    if hazards:
        acc.flag("destructive", f"ALTER SEQUENCE {_relname(b.get('sequence') or {})}: "
                 f"{'; '.join(hazards)} (not undone by ROLLBACK: later INSERTs can fail or "
                 "collide with existing keys)")
    _utility_walk(acc, b)


# ALTER DOMAIN sub-commands (AlterDomainStmt.subtype) that change how every later write
# of a column of the domain behaves; SET NOT NULL ('O') and VALIDATE ('V') pass, ADD
# CONSTRAINT ('C') unless NOT VALID
_DOMAIN_DESTRUCTIVE = {
    "T": "SET / DROP DEFAULT changes the value every later INSERT that leaves a column of "
         "the domain out stores",
    "N": "DROP NOT NULL lets every later write store NULL in the domain's columns",
    "X": "DROP CONSTRAINT removes a check every later write of the domain's columns passed",
}


def _alter_domain(acc: _Acc, b: dict) -> None:
    acc.enter("alter")
    sub = b.get("subtype", "")
    name = _dotted(b.get("typeName"))
    if sub in _DOMAIN_DESTRUCTIVE:
        acc.flag("destructive", f"ALTER DOMAIN {name} {_DOMAIN_DESTRUCTIVE[sub]}")
    elif sub == "C":
        acc.flag("destructive", f"ALTER DOMAIN {name} ADD CONSTRAINT can refuse every later "
                 "write of a column of the domain (NOT VALID: the existing values are not "
                 "even checked); ask an administrator to add it")
    elif sub == "O":
        acc.flag("destructive", f"ALTER DOMAIN {name} SET NOT NULL refuses every later write "
                 "that leaves a column of the domain out")
    elif sub != "V":
        acc.flag("destructive", f"ALTER DOMAIN {name}: pgguard does not know the "
                 f"sub-command {sub or '?'}, so it is refused as destructive")
    _utility_walk(acc, b)


def _alter_role_set(acc: _Acc, b: dict) -> None:
    _alter_setting(acc, b, "AlterRoleSetStmt")


def _alter_db_set(acc: _Acc, b: dict) -> None:
    _alter_setting(acc, b, "AlterDatabaseSetStmt")


def _alter_system(acc: _Acc, b: dict) -> None:
    _alter_setting(acc, b, "AlterSystemStmt")


def _call(acc: _Acc, b: dict) -> None:
    acc.enter("call")
    fc = b.get("funccall")
    name = _dotted(fc.get("funcname")) if type(fc) is dict else "?"
    acc.flag("opaque", f"CALL {name}: pgguard cannot see what a procedure runs")
    saved_u = acc.utility
    acc.utility = False
    _walk(acc, b)
    acc.utility = saved_u


def _deferred(acc: _Acc, what: str, rel: Any, events: str) -> None:
    """A trigger or rule runs code later, inside other sessions' statements (the
    application's too), where pgguard never judges it: opaque."""
    name = _relname(rel) if type(rel) is dict else "?"
    acc.flag("opaque", f"{what} makes every later {events} on {name}, in every session, run "
             "code pgguard does not judge when it runs")


_TRIGGER_EVENTS = ((4, "INSERT"), (8, "DELETE"), (16, "UPDATE"), (32, "TRUNCATE"))


def _create_trigger(acc: _Acc, b: dict) -> None:
    acc.enter("create")
    _replace_check(acc, b, f"TRIGGER {b.get('trigname', '')}".rstrip())
    ev = int(b.get("events") or 0)
    _deferred(acc, f"CREATE TRIGGER {b.get('trigname', '')}", b.get("relation"),
              "/".join(n for bit, n in _TRIGGER_EVENTS if ev & bit) or "write")
    fn = _dotted(b.get("funcname"))
    if fn:
        acc.funcs[fn] = None
        cls = _func_class(fn.rsplit(".", 1)[-1])
        if cls is not None:
            acc.flag(cls[0], f"trigger function {fn}() {cls[1]}")
    _utility_walk(acc, b, ("funcname",))


def _query_holder(tag: str) -> Any:
    """CREATE VIEW / CREATE TABLE AS / DECLARE CURSOR: an object plus a query."""
    kind = _utility_kind(tag)

    def handler(acc: _Acc, b: dict) -> None:
        acc.enter(kind)
        if tag == "ViewStmt":
            _replace_check(acc, b, "VIEW " + _relname(b.get("view") or {}))
            _temp_view_in_body(acc, b.get("view") or {})
        saved_w, saved_u = acc.rvwrite, acc.utility
        acc.rvwrite, acc.utility = True, True
        for k in ("view", "into"):
            v = b.get(k)
            if type(v) is dict:
                _walk(acc, v)
        acc.rvwrite, acc.utility = False, False
        _walk(acc, b.get("query"))
        acc.rvwrite, acc.utility = saved_w, saved_u
        _utility_walk(acc, b, ("view", "into", "query"))
    return handler


def _temp_view_in_body(acc: _Acc, rv: dict) -> None:
    """A function body that creates a TEMP view: the view's unqualified name reaches it
    before any table of that name (the temporary schema is searched first), in the
    calling session only, where pgguard cannot see it made (a body's statements never
    pass through the proxy), so writes through that name would be judged as writes of
    the table: opaque. (A top-level CREATE TEMP VIEW, or a DO block's, is learned.)"""
    schema = rv.get("schemaname") or ""
    temp = rv.get("relpersistence") == "t" or schema == "pg_temp" or \
        _TEMP_SCHEMA.fullmatch(schema) is not None
    if temp and " body: " in acc.ctx and "DO block body: " not in acc.ctx:
        acc.flag("opaque", f"creates the temporary view {rv.get('relname', '')}: its name "
                 "would stand for the view, not for the table pgguard judges, in the "
                 "calling session; create it with CREATE TEMP VIEW yourself")


_TEMP_SCHEMA = re.compile(r"pg_temp_\d+")


def _rule(acc: _Acc, b: dict) -> None:
    acc.enter("create")
    _replace_check(acc, b, f"RULE {b.get('rulename', '')}".rstrip())
    rel = b.get("relation")
    event = str(b.get("event", "")).removeprefix("CMD_").upper()
    if b.get("actions"):
        _deferred(acc, f"CREATE RULE {b.get('rulename', '')}", rel, event)
    if type(rel) is dict:
        _written(acc, _relname(rel))
        if b.get("instead") and not b.get("actions"):
            acc.flag("destructive", f"CREATE RULE ... DO INSTEAD NOTHING silently discards "
                     f"every later {event} on {_relname(rel)}, for every session")
    saved = acc.ctx
    acc.ctx = saved + "rule action: "
    saved_w, saved_u = acc.rvwrite, acc.utility
    acc.rvwrite = acc.utility = False
    _walk(acc, b.get("actions"))
    _walk(acc, b.get("whereClause"))
    acc.rvwrite, acc.utility = saved_w, saved_u
    acc.ctx = saved


def _defelems(options: list | None) -> dict[str, Any]:
    out = {}
    for o in options or ():
        d = o.get("DefElem") if type(o) is dict else None
        if type(d) is dict:
            out[d.get("defname", "")] = d.get("arg")
    return out


def _do(acc: _Acc, b: dict) -> None:
    acc.enter("do")
    acc.literal = True                     # the body is a literal: never shared by shape
    opts = _defelems(b.get("args"))
    lang = _lit(acc, opts["language"]) if "language" in opts else "plpgsql"
    lang = lang.lower() if type(lang) is str else "?"
    _body_by_language(acc, lang, "DO block", sql_body=None)


def _create_function(acc: _Acc, b: dict) -> None:
    acc.enter("create")
    acc.literal = True                     # the body is a literal: never shared by shape
    opts = _defelems(b.get("options"))
    what = "procedure" if b.get("is_procedure") else "function"
    name = _dotted(b.get("funcname"))
    _replace_check(acc, b, f"{what.upper()} {name}")
    if "security" in opts and _lit(acc, opts["security"]) == "true":
        acc.flag("privilege", f"SECURITY DEFINER {what} {name} runs with its owner's "
                 "privileges")
    lang, body, params = _function_source(acc, b, opts)
    _body_by_language(acc, lang, f"{what} {name}", sql_body=b.get("sql_body"),
                      sql_text=body, params=params)
    _support_function(acc, b.get("options"))
    # parameters, return type, SET clauses (the body string names no function by itself);
    # a SET clause applies while the function runs: flagged, not a session setting
    saved = acc.scoped_set
    acc.scoped_set = True
    _utility_walk(acc, b, ("sql_body", "funcname"))
    acc.scoped_set = saved


# ALTER FUNCTION options that leave what its calls do as it was (planner estimates)
_HARMLESS_FUNCTION_OPTIONS = frozenset({"cost", "rows", "support", "security"})


def _alter_function(acc: _Acc, b: dict) -> None:
    acc.enter("alter")
    func = b.get("func") if type(b.get("func")) is dict else {}
    func = func.get("ObjectWithArgs", func)
    fn = _dotted(func.get("objname")) if type(func) is dict else "?"
    for a in b.get("actions") or ():
        d = a.get("DefElem") if type(a) is dict else None
        if type(d) is not dict:
            continue
        opt = d.get("defname")
        if opt == "security" and _lit(acc, d.get("arg")) == "true":
            acc.flag("privilege", "ALTER FUNCTION ... SECURITY DEFINER makes it run with "
                     "its owner's privileges")
        elif opt == "leakproof":
            acc.flag("privilege", f"ALTER FUNCTION {fn} LEAKPROOF lets security barrier "
                     "views and row-level security run it before their own checks")
        elif opt not in _HARMLESS_FUNCTION_OPTIONS:
            # an allow-list: SET / RESET of settings, STRICT, volatility, PARALLEL ...
            acc.flag("destructive", f"ALTER FUNCTION {fn} {str(opt).upper()} changes what "
                     "every session's calls of it do (a setting it runs under, what it "
                     "returns for NULL input, whether the planner may fold or cache it)")
    _support_function(acc, b.get("actions"))
    saved = acc.scoped_set
    acc.scoped_set = True
    _utility_walk(acc, b)
    acc.scoped_set = saved


def _support_function(acc: _Acc, options: list | None) -> None:
    # SUPPORT f: the planner calls f for every later query that calls the function (a
    # user one is refused by the bodies step, like any function a definition keeps)
    for arg in _def_args(options, ("support",)):
        parts = _fn_parts(arg)
        if parts:
            acc.funcs[_funcname(parts)] = None


def _body_by_language(acc: _Acc, lang: str, what: str, *, sql_body: Any,
                      sql_text: str | None = None,
                      params: frozenset[str] = frozenset()) -> None:
    saved = acc.ctx
    acc.ctx = saved + f"{what} body: "
    try:
        if lang == "plpgsql":
            _plpgsql(acc, acc.text, what)
        elif lang == "sql":
            # a parameter's name stands for a value, like a PL/pgSQL variable (where it
            # is also a column's, the column wins: treating it as a value only makes a
            # WHERE look less narrow, never more)
            if sql_body is not None:
                saved_w, saved_u, saved_v = acc.rvwrite, acc.utility, acc.plvars
                acc.rvwrite = acc.utility = False
                acc.plvars = saved_v | params
                acc.sub_kind = True
                _walk(acc, sql_body)
                acc.sub_kind = False
                acc.rvwrite, acc.utility, acc.plvars = saved_w, saved_u, saved_v
            elif sql_text is not None:
                _embedded(acc, sql_text, acc.plvars | params)
        elif lang in _UNTRUSTED_LANGS or lang.endswith("u"):
            acc.ctx = saved
            acc.flag("escape", f"{what} in language {lang} runs code on the database server")
            acc.flag("opaque", f"{what} in language {lang}: pgguard cannot see inside")
        else:
            acc.ctx = saved
            acc.flag("opaque", f"{what} in language {lang}: pgguard cannot see inside")
    finally:
        acc.ctx = saved


# functions an object runs later inside ordinary syntax (an operator's, a type's I/O, a
# range type's subtype_diff and canonical, a text search parser's or template's), by the
# DefElem that names them (Postgres reads these names lower-case; compared lower-cased)
_PLANTED_DEFS = {
    "OBJECT_OPERATOR": ("function", "procedure", "restrict", "join"),
    "OBJECT_TYPE": ("input", "output", "receive", "send", "typmod_in", "typmod_out",
                    "analyze", "subscript"),
    "OBJECT_TSPARSER": ("start", "gettoken", "end", "headline", "lextypes"),
    "OBJECT_TSTEMPLATE": ("init", "lexize"),
}
# CREATE TYPE ... AS RANGE: subtype_diff runs inside every GiST index insert and search
# and in the planner's estimates of && (a plain SELECT), canonical in every range value
# built (subtype_opclass, collation and multirange_type_name name no function)
_RANGE_DEFS = ("subtype_diff", "canonical")
# ALTER OPERATOR ... SET (restrict, join), ALTER TYPE ... SET (receive, send, ...)
_ALTER_DEFS = _PLANTED_DEFS["OBJECT_OPERATOR"] + _PLANTED_DEFS["OBJECT_TYPE"]
# DefineStmt kinds whose definition names no function called later: an aggregate's
# support functions are judged at each call of the aggregate (pgguard.policy.bodies),
# a collation, dictionary or configuration names no function at all (a dictionary's
# template and a configuration's parser were judged when they were created)
_DEFINES_NOTHING_PLANTED = frozenset({"OBJECT_AGGREGATE", "OBJECT_COLLATION",
                                      "OBJECT_TSDICTIONARY", "OBJECT_TSCONFIGURATION"})


def _fn_parts(arg: Any) -> list[str]:
    """The name parts of a function named by a DefElem's value or an object field: a
    TypeName (``f``, ``s.f``), a List or a plain list of Strings (``HANDLER s.f``), a
    String (``function = 'f'``: Postgres takes a string constant as the name), an
    ObjectWithArgs (``FUNCTION 1 f(int)``)."""
    names: Any = None
    if type(arg) is list:
        names = arg
    elif type(arg) is dict:
        if type(arg.get("TypeName")) is dict:
            names = arg["TypeName"].get("names")
        elif type(arg.get("List")) is dict:
            names = arg["List"].get("items")
        elif type(arg.get("String")) is dict:
            names = [arg]
        elif type(arg.get("ObjectWithArgs")) is dict:
            names = arg["ObjectWithArgs"].get("objname")
        elif "objname" in arg:                     # an ObjectWithArgs field, untagged
            names = arg.get("objname")
    parts = [_sval(n) for n in names or ()]
    return parts if parts and all(parts) and parts[-1].lower() != "none" else []


def _def_args(elems: Any, names: tuple[str, ...]) -> list:
    out = []
    for e in elems or ():
        d = e.get("DefElem") if type(e) is dict else None
        if type(d) is dict and str(d.get("defname", "")).lower() in names:
            out.append(d.get("arg"))
    return out


def _planted_define(b: dict) -> list:
    kind = b.get("kind", "")
    return _def_args(b.get("definition"), _PLANTED_DEFS.get(kind, ()))


def _planted_items(b: dict) -> list:
    # CREATE OPERATOR CLASS / ALTER OPERATOR FAMILY ... ADD: FUNCTION n f(...) items (an
    # index's support functions, run by every later write to and search of the index);
    # OPERATOR items name operators, judged when they were created
    if b.get("isDrop"):
        return []
    out = []
    for it in b.get("items") or ():
        c = it.get("CreateOpClassItem") if type(it) is dict else None
        if type(c) is dict and c.get("itemtype") == 2:
            out.append(c.get("name"))
    return out


# utility statements that store a function to be called later, by name (not as a call
# in an expression, which the walk records as a FuncCall): where each keeps the names
_PLANTERS: dict[str, Any] = {
    "DefineStmt": _planted_define,
    "CreateRangeStmt": lambda b: _def_args(b.get("params"), _RANGE_DEFS),
    "AlterOperatorStmt": lambda b: _def_args(b.get("options"), _ALTER_DEFS),
    "AlterTypeStmt": lambda b: _def_args(b.get("options"), _ALTER_DEFS),
    "CreateCastStmt": lambda b: [b.get("func")],
    "CreateConversionStmt": lambda b: [b.get("func_name")],
    "CreateOpClassStmt": _planted_items,
    "AlterOpFamilyStmt": _planted_items,
    "CreateTransformStmt": lambda b: [b.get("fromsql"), b.get("tosql")],
    "CreateEventTrigStmt": lambda b: [b.get("funcname")],
    "CreatePLangStmt": lambda b: [b.get("plhandler"), b.get("plinline"),
                                  b.get("plvalidator")],
    "CreateFdwStmt": lambda b: _def_args(b.get("func_options"), ("handler", "validator")),
    "AlterFdwStmt": lambda b: _def_args(b.get("func_options"), ("handler", "validator")),
    "CreateAmStmt": lambda b: [b.get("handler_name")],
}

# utility statements known to store no function by name: whatever expression they keep
# (a default, a check, a policy's USING, a statistics expression, a publication's WHERE)
# is a FuncCall the walk records, and a CREATE / ALTER that keeps a call of a user
# function is refused by the bodies step (pgguard.policy.bodies). Names of functions in
# COMMENT, ALTER ... OWNER / DEPENDS ON, ALTER EXTENSION ... ADD are no calls.
# An allow-list: a statement type in neither table (a later Postgres's) is refused.
_PLANTS_NOTHING = frozenset({
    "AlterCollationStmt", "AlterDatabaseRefreshCollStmt", "AlterDatabaseStmt",
    "AlterDefaultPrivilegesStmt", "AlterEnumStmt", "AlterEventTrigStmt",
    "AlterExtensionContentsStmt", "AlterExtensionStmt", "AlterForeignServerStmt",
    "AlterObjectDependsStmt", "AlterOwnerStmt", "AlterPolicyStmt", "AlterPublicationStmt",
    "AlterRoleStmt", "AlterStatsStmt", "AlterSubscriptionStmt", "AlterTSConfigurationStmt",
    "AlterTSDictionaryStmt", "AlterTableMoveAllStmt", "AlterTableSpaceOptionsStmt",
    "AlterUserMappingStmt", "CheckPointStmt", "ClosePortalStmt", "ClusterStmt",
    "CommentStmt", "CompositeTypeStmt", "ConstraintsSetStmt", "CreateDomainStmt",
    "CreateEnumStmt", "CreateExtensionStmt", "CreateForeignServerStmt",
    "CreateForeignTableStmt", "CreateOpFamilyStmt", "CreatePolicyStmt",
    "CreatePublicationStmt", "CreateRoleStmt", "CreateSchemaStmt", "CreateSeqStmt",
    "CreateStatsStmt", "CreateStmt", "CreateSubscriptionStmt", "CreateTableSpaceStmt",
    "CreateUserMappingStmt", "CreatedbStmt", "DropOwnedStmt", "DropRoleStmt",
    "DropSubscriptionStmt", "DropTableSpaceStmt", "DropUserMappingStmt", "DropdbStmt",
    "ImportForeignSchemaStmt", "IndexStmt", "ListenStmt", "LoadStmt", "LockStmt",
    "NotifyStmt", "PLAssignStmt", "ReassignOwnedStmt", "RefreshMatViewStmt",
    "ReindexStmt", "ReplicaIdentityStmt", "ReturnStmt", "SecLabelStmt", "UnlistenStmt",
    "VariableShowStmt",
})


def _planted(tag: str, acc: _Acc, b: dict) -> None:
    # the functions such an object names count among the statement's functions: a
    # user function there runs later unjudged (the policy refuses planting them)
    if tag == "DefineStmt":
        kind = b.get("kind", "")
        if kind not in _PLANTED_DEFS and kind not in _DEFINES_NOTHING_PLANTED:
            _unknown_statement(acc, f"{tag} of kind {kind or '?'}")
            return
    for arg in _PLANTERS[tag](b):
        parts = _fn_parts(arg)
        if parts:
            acc.funcs[_funcname(parts)] = None


def _unknown_statement(acc: _Acc, what: str) -> None:
    acc.flag("opaque", f"pgguard does not know the statement type {what}: it cannot tell "
             "whether the statement stores a function that runs later, where pgguard "
             "does not judge it; ask an administrator to run it")


def _utility(tag: str, acc: _Acc, b: dict) -> None:
    acc.enter(_utility_kind(tag))
    for flag, why in _UTILITY_FLAGS.get(tag, ()):
        acc.flag(flag, why)
    if tag in _PLANTERS:
        _planted(tag, acc, b)
    elif tag not in _PLANTS_NOTHING:
        _unknown_statement(acc, tag)
    if tag == "CreateEventTrigStmt":
        fn = _dotted(b.get("funcname"))
        acc.flag("opaque", f"CREATE EVENT TRIGGER {b.get('trigname', '')} makes every later "
                 f"{b.get('eventname', 'DDL')} event, in every session, run {fn or '?'}(), "
                 "where pgguard does not judge what it runs")
    if b.get("replace"):                   # CREATE OR REPLACE AGGREGATE, TRANSFORM, ...
        _replace_check(acc, b, tag[6:-4].upper() if tag.startswith("Create") else tag)
    if tag == "AlterEnumStmt" and b.get("oldVal") is not None:
        acc.flag("destructive", f"ALTER TYPE {_dotted(b.get('typeName'))} RENAME VALUE "
                 f"changes every stored '{b.get('oldVal')}' of the type, and the old name "
                 "stops existing (every statement naming it fails)")
    if tag == "CreateSchemaStmt":
        role = b.get("authrole")
        role = role.get("RoleSpec", role) if type(role) is dict else None
        owner = role.get("rolename") if type(role) is dict else None
        if role is not None:
            acc.flag("privilege", "CREATE SCHEMA ... AUTHORIZATION gives the schema to a role "
                     f"({owner or role.get('roletype', '?')})")
        name = b.get("schemaname") or owner
        if type(name) is str:
            acc.schemas.append(name)
    if tag == "DefineStmt" and b.get("kind") == "OBJECT_OPERATOR":
        acc.flag("destructive", f"CREATE OPERATOR {_dotted(b.get('defnames'))}: an operator "
                 "whose argument types fit an expression better than pg_catalog's takes over "
                 "it in every session (amount + 10 could run round(amount, 10))")
    if tag == "CreateCastStmt":
        acc.flag("destructive", "CREATE CAST changes how values convert in every session's "
                 "statements (an implicit or assignment cast is applied unasked)")
    if tag == "CreateConversionStmt" and b.get("def"):
        acc.flag("destructive", "CREATE DEFAULT CONVERSION changes how text converts between "
                 "encodings for every session")
    if tag == "IndexStmt" and b.get("unique"):
        acc.flag("destructive", f"CREATE UNIQUE INDEX on {_relname(b.get('relation') or {})} "
                 "can refuse the application's later writes (a partial one over (true) "
                 "admits one row more); ask an administrator, or declare the key in CREATE "
                 "TABLE")
    if tag == "IndexStmt" and not b.get("unique") and (
            b.get("whereClause") is not None or any(
                type(p) is dict and type(p.get("IndexElem")) is dict
                and p["IndexElem"].get("expr") is not None for p in b.get("indexParams") or ())):
        acc.flag("destructive", f"CREATE INDEX on {_relname(b.get('relation') or {})} over an "
                 "expression or with a WHERE predicate: Postgres computes it at every later "
                 "write of the table, in every session, and refuses the write when it fails "
                 "(CASE WHEN id > 1000 THEN 1 / (id - id) END); index plain columns, or ask "
                 "an administrator")
    if tag == "CreateStatsStmt" and any(
            type(e) is dict and type(e.get("StatsElem")) is dict
            and e["StatsElem"].get("expr") is not None for e in b.get("exprs") or ()):
        acc.flag("destructive", "CREATE STATISTICS over an expression: every later ANALYZE of "
                 "the table (autovacuum's too) computes it over the sampled rows and fails "
                 "when it does; name plain columns, or ask an administrator")
    if tag == "AlterObjectDependsStmt" and not b.get("remove"):
        ext = _sval({"String": b.get("extname")}) or "?"
        acc.flag("destructive", f"ALTER ... DEPENDS ON EXTENSION {ext}: a later DROP "
                 "EXTENSION, even without CASCADE, drops the object with it")
    if tag in ("ClusterStmt", "ReindexStmt", "LockStmt"):
        _outage(acc, tag, b)
    if tag == "RefreshMatViewStmt" and b.get("skipData"):
        acc.flag("destructive", f"REFRESH MATERIALIZED VIEW "
                 f"{_relname(b.get('relation') or {})} WITH NO DATA empties it: every "
                 "later read of it fails until someone refreshes it")
    if tag in ("AlterTSConfigurationStmt", "AlterTSDictionaryStmt"):
        acc.flag("destructive", "ALTER TEXT SEARCH CONFIGURATION / DICTIONARY changes how "
                 "every session's text is split and matched: stored tsvectors and their "
                 "indexes no longer match what searches look for; ask an administrator")
    if tag == "CreateStmt":
        target = _relname(b.get("relation") or {})
        for elt in b.get("tableElts") or ():
            _referential_actions(acc, target, elt, "CREATE TABLE")
            for ref in _foreign_keys(elt):
                if not acc.schemas and _in_public(ref) == _in_public(target):
                    # a reference to itself (manager_id REFERENCES emp), schema and name
                    # alike (x.orders REFERENCES public.orders is not; inside CREATE
                    # SCHEMA an unqualified name may be either)
                    continue
                acc.flag("destructive", f"CREATE TABLE {target} with a foreign key to {ref}: "
                         f"it puts triggers on {ref} that refuse later DELETEs, key UPDATEs "
                         f"and TRUNCATE of {ref}, in every session, while rows of {target} "
                         "refer to them; ask an administrator")
    _utility_walk(acc, b)


def _in_public(name: str) -> str:
    # an unqualified relation name as a session under pgguard resolves it (search_path
    # is pinned to public)
    return name if "." in name else "public." + name


def _foreign_keys(d: Any) -> list[str]:
    """The tables a column definition or table constraint of CREATE TABLE references."""
    if type(d) is not dict:
        return []
    cons = d["ColumnDef"].get("constraints") if type(d.get("ColumnDef")) is dict else [d]
    out = []
    for c in cons or ():
        c = c.get("Constraint") if type(c) is dict else None
        if type(c) is dict and c.get("contype") == "CONSTR_FOREIGN":
            pk = c.get("pktable")
            out.append(_relname(pk) if type(pk) is dict else "?")
    return out


def _utility_walk(acc: _Acc, b: dict, skip: tuple[str, ...] = ()) -> None:
    # a RangeVar among a utility statement's own fields is the object it changes
    saved_w, saved_u = acc.rvwrite, acc.utility
    acc.rvwrite = acc.utility = True
    if skip:
        _walk_except(acc, b, skip)
    else:
        _walk(acc, b)
    acc.rvwrite, acc.utility = saved_w, saved_u


def _string(acc: _Acc, b: Any) -> None:
    # inside utility statements, functions are named by plain strings (CREATE OPERATOR,
    # CREATE CAST, GRANT EXECUTE ...): catch the dangerous ones there too
    if acc.utility and type(b) is dict:
        # a String node may be a literal (an option's value): read through the accessor
        s = _lit(acc, {"String": b})
        if s:
            cls = _func_class(s)
            if cls is not None:
                acc.flag(cls[0], f"names {s}(), which {cls[1]}")
            elif s == "set_config":
                # an aggregate, operator or type that runs set_config() changes settings
                # (standard_conforming_strings, default_transaction_read_only, role)
                # with values pgguard never sees: the later call reads as a plain SELECT
                acc.settings.append(("*", None))
                acc.flag("privilege", "names set_config(), which changes settings with "
                                      "values pgguard cannot see when it runs later")
            elif s in _WRITING_FUNCS:
                acc.flag("opaque", f"names {s}(), which writes when it runs later, "
                                   "inside a call pgguard reads as a plain one")


def _columnref(acc: _Acc, b: Any) -> None:
    # rel.f (or schema.rel.f): f may be a function of rel's row type, called on it
    fields = b.get("fields") if type(b) is dict else None
    if fields and len(fields) >= 2:
        f = _sval(fields[-1])
        if f:
            acc.fields[f] = None


def _indirection(acc: _Acc, b: Any) -> None:
    # (expr).f: f may be a function of expr's type, called on it
    if type(b) is not dict:
        return
    for x in b.get("indirection") or ():
        f = _sval(x)
        if f:
            acc.fields[f] = None
    arg = b.get("arg")
    if type(arg) is dict or type(arg) is list:
        _walk(acc, arg)
    for x in b.get("indirection") or ():
        if type(x) is dict and "A_Indices" in x:
            _walk(acc, x)


def _nested(tag: str) -> Any:
    h = _STMT.get(tag)
    if h is not None:
        return h
    return lambda acc, b, _t=tag: _utility(_t, acc, b)


# --------------------------------------------------------------------------- PL/pgSQL

_PL_DYNAMIC = {
    "PLpgSQL_stmt_dynexecute": "EXECUTE of a string",
    "PLpgSQL_stmt_dynfors": "FOR ... IN EXECUTE of a string",
}

_json = msgspec.json.Decoder()


def _plpgsql(acc: _Acc, text: str, what: str) -> None:
    try:
        tree = _json.decode(_pg.parse_plpgsql_json(text))
    except _pg.ParseError as e:
        acc.flag("opaque", f"the PL/pgSQL body could not be parsed ({e.args[0]})")
        return
    if not tree:
        acc.flag("opaque", "pgguard found no PL/pgSQL body to read")
        return
    names = set()
    for fn in tree if type(tree) is list else (tree,):
        f = fn.get("PLpgSQL_function") if type(fn) is dict else None
        for d in (f.get("datums") or ()) if type(f) is dict else ():
            for v in d.values() if type(d) is dict else ():
                if type(v) is dict and type(v.get("refname")) is str:
                    names.add(v["refname"])
    saved = acc.plvars
    acc.plvars = saved | names
    try:
        _plwalk(acc, tree)
    finally:
        acc.plvars = saved


def _plwalk(acc: _Acc, node: Any) -> None:
    if type(node) is dict:
        for k, v in node.items():
            if k == "PLpgSQL_expr" and type(v) is dict:
                _plexpr(acc, v)
                continue
            if k == "PLpgSQL_stmt_fetch" and type(v) is dict:
                # FETCH/MOVE reads whatever portal the cursor variable names: one the
                # body opened, or any of the session's open cursors and portals
                acc.enter("move" if v.get("is_move") else "fetch")
            dyn = _PL_DYNAMIC.get(k)
            if dyn is None and type(v) is dict and "dynquery" in v:
                dyn = "OPEN/RETURN QUERY ... EXECUTE of a string"
            if dyn is not None:
                acc.flag("opaque", f"{dyn}: pgguard cannot see the SQL it runs")
                q = v.get("query") if k in _PL_DYNAMIC else v.get("dynquery")
                if type(q) is dict and type(q.get("PLpgSQL_expr")) is dict:
                    _constant_sql(acc, q["PLpgSQL_expr"].get("query", ""))
            if type(v) is dict or type(v) is list:
                _plwalk(acc, v)
    elif type(node) is list:
        for v in node:
            _plwalk(acc, v)


def _constant_sql(acc: _Acc, expr: str) -> None:
    """EXECUTE 'constant': classify the constant's text too (it is what will run)."""
    try:
        tree = _json.decode(_pg.parse_sql_json("SELECT " + expr))
        stmts = tree.get("stmts") or ()
        t = stmts[0]["stmt"]["SelectStmt"]["targetList"]
        if len(stmts) != 1 or len(t) != 1:
            return
        sql = _lit(acc, t[0]["ResTarget"]["val"])
    except (_pg.ParseError, KeyError, IndexError, TypeError):
        return
    if type(sql) is not str:
        return
    saved = acc.ctx
    acc.ctx = saved + "EXECUTE of a constant string: "
    _embedded(acc, sql, frozenset())     # dynamic SQL sees no PL/pgSQL variable
    acc.ctx = saved


def _assign_parts(q: str) -> tuple[list[str], str] | None:
    """The parts of a PL/pgSQL assignment ``target := expr`` that run: the subscripts
    of its target (``a[i]``, ``a[i:j]``, ``a[i][j]``: any expression, a call or a
    scalar subquery included) and its expression. None: not read (fail closed)."""
    depth = 0
    subs: list[str] = []
    start = -1                  # where the subscript part being read begins
    for tok in _pg.scan(q):     # (scan() reports character offsets, end inclusive)
        n = tok.name
        if n == "ASCII_91":
            if depth == 0:
                start = tok.end + 1
            depth += 1
        elif n == "ASCII_40":
            if depth == 0:
                return None     # a parenthesized target: not a form pgguard reads
            depth += 1
        elif n in ("ASCII_41", "ASCII_93"):
            depth -= 1
            if depth == 0:
                subs.append(q[start:tok.start])
        elif depth == 1 and n == "ASCII_58":        # a slice's bounds
            subs.append(q[start:tok.start])
            start = tok.end + 1
        elif depth == 0 and n in ("COLON_EQUALS", "ASCII_61"):
            return [x for x in subs if x.strip()], q[tok.end + 1:]
    return None


def _plexpr(acc: _Acc, e: dict) -> None:
    q = e.get("query", "")
    mode = e.get("parseMode", 0)
    if mode == 0:
        sql: str | None = q
    elif mode == 2:
        sql = "SELECT " + q
    elif mode in (3, 4, 5):
        parts = _assign_parts(q)
        if parts is not None and parts[0]:
            # the target's subscripts, read apart (the expression may begin with
            # DISTINCT and go on with FROM)
            _embedded(acc, "SELECT " + ", ".join(f"({x})" for x in parts[0]), acc.plvars)
        sql = None if parts is None else "SELECT " + parts[1]
    else:
        sql = None
    if sql is None:
        acc.flag("opaque", "a PL/pgSQL expression pgguard could not read")
        return
    _embedded(acc, sql, acc.plvars)


def _embedded(acc: _Acc, sql: str, plvars: frozenset[str]) -> None:
    """Classify SQL embedded in a body and fold it into ``acc``."""
    try:
        inner = _classify(sql, None, None, acc.ctx, plvars)
    except PolicyParseError as e:
        acc.flag("opaque", f"embedded SQL could not be parsed ({e.message})")
        return
    for st in inner:
        acc.merge(st, "")


# --------------------------------------------------------------------------- dispatch

_STMT: dict[str, Any] = {
    "SelectStmt": _select, "InsertStmt": _insert, "UpdateStmt": _update,
    "DeleteStmt": _delete, "MergeStmt": _merge, "CopyStmt": _copy,
    "ExplainStmt": _explain, "PrepareStmt": _prepare, "ExecuteStmt": _execute,
    "DeallocateStmt": _deallocate, "TransactionStmt": _transaction,
    "VariableSetStmt": _varset, "DiscardStmt": _discard, "GrantStmt": _grant,
    "GrantRoleStmt": _grant, "DropStmt": _drop, "TruncateStmt": _truncate,
    "AlterTableStmt": _alter_table, "RenameStmt": _rename, "AlterSeqStmt": _alter_seq,
    "AlterDomainStmt": _alter_domain,
    "AlterObjectSchemaStmt": _set_schema,
    "AlterRoleSetStmt": _alter_role_set, "AlterDatabaseSetStmt": _alter_db_set,
    "AlterSystemStmt": _alter_system, "CallStmt": _call, "CreateTrigStmt": _create_trigger,
    "ViewStmt": _query_holder("ViewStmt"), "CreateTableAsStmt": _query_holder("CreateTableAsStmt"),
    "DeclareCursorStmt": _query_holder("DeclareCursorStmt"), "RuleStmt": _rule,
    "DoStmt": _do, "CreateFunctionStmt": _create_function,
    "AlterFunctionStmt": _alter_function, "VacuumStmt": _vacuum, "FetchStmt": _fetch,
}

def _sql_json(name: str | None) -> Any:
    # SQL/JSON syntax of the parser's grammar (Postgres 16-18): on an older server the
    # same words are a plain call of whatever function the name finds by search_path
    # (SELECT json_scalar(1) runs public.json_scalar there), so the call is recorded
    def handler(acc: _Acc, b: dict) -> None:
        fn = name if name is not None else _SQL_JSON_OPS.get(b.get("op"), "json_value")
        acc.funcs[fn] = None
        if type(b) is dict:
            for v in b.values():
                if type(v) is dict or type(v) is list:
                    _walk(acc, v)
    return handler


# pg_catalog calls the parser's grammar (Postgres 18) makes of words Postgres 15 reads
# as a plain call (the older grammar pins EXTRACT, SUBSTRING, TRIM... to pg_catalog too)
_NEWER_SYNTAX = frozenset({"json_object", "system_user"})
_SQL_JSON_OPS = {"JSON_EXISTS_OP": "json_exists", "JSON_QUERY_OP": "json_query",
                 "JSON_VALUE_OP": "json_value"}
_SQL_JSON_NODES = {
    "JsonScalarExpr": "json_scalar", "JsonParseExpr": "json",
    "JsonSerializeExpr": "json_serialize", "JsonArrayConstructor": "json_array",
    "JsonArrayQueryConstructor": "json_array", "JsonObjectConstructor": "json_object",
    "JsonArrayAgg": "json_arrayagg", "JsonObjectAgg": "json_objectagg",
    "JsonTable": "json_table", "MergeSupportFunc": "merge_action", "JsonFuncExpr": None,
}

SQL_SYNTAX_CALLS = frozenset(
    {n for n in _SQL_JSON_NODES.values() if n} | set(_SQL_JSON_OPS.values()) | _NEWER_SYNTAX)
"""Names recorded for syntax a newer server runs itself: on an older one, calls of
whatever function the name finds (none found: the server has the syntax, or the call
fails there; nothing unseen runs)."""

_NODE: dict[str, Any] = {
    "RangeVar": _rangevar, "FuncCall": _funccall,
    # leaves with nothing to find
    "ColumnRef": _columnref, "A_Indirection": _indirection,
    "A_Const": None, "ParamRef": None, "A_Star": None,
    "SQLValueFunction": None, "String": _string,
    "ResTarget": _res_target, "A_Expr": _a_expr, "BoolExpr": _args_node, "List": _list_node,
}
for _tag in dir(_pgast):
    if _tag.endswith("Stmt") and _tag not in ("RawStmt", "SetOperationStmt"):
        _NODE[_tag] = _nested(_tag)
for _tag, _fn in _SQL_JSON_NODES.items():
    _NODE[_tag] = _sql_json(_fn)
del _tag, _fn


def _slices(sql: str, stmts: list) -> list[str]:
    if sql.isascii():
        src: Any = sql
    else:
        src = sql.encode()
    out = []
    for raw in stmts:
        start = raw.get("stmt_location", 0)
        length = raw.get("stmt_len", 0)
        piece = src[start:start + length] if length else src[start:]
        if type(piece) is bytes:
            piece = piece.decode(errors="replace")
        out.append(piece.strip())
    return out


# Fast path for the hot case, a lone SELECT with no subquery, CTE, INTO or flagged
# function: read relations and functions straight from the JSON text. Safe because a
# JSON string escapes every '"' it holds, so '"relname":"' can only be a real key; every
# RangeVar and FuncCall must be matched (counts compared) or the slow path runs. The
# result is identical to the slow path's (tests/test_policy_corpus.py checks).
_SELECT_HEAD = _pg.parse_sql_json("SELECT")
_SELECT_HEAD = _SELECT_HEAD[:_SELECT_HEAD.index('"SelectStmt":') + 13]
_HEAD_END = len(_SELECT_HEAD)
# (each pattern starts with a literal, which keeps Python's re on its fast scan)
_FAST_RV = re.compile(r'"relname":"([^"\\]*)"(?:,"inh":true)?,"relpersistence":"(\w)"')
_FAST_FC = re.compile(
    r'"FuncCall":\{"funcname":\[((?:\{"String":\{"sval":"(?:[^"\\]|\\.)*"\}\},?)+)\]')
_FAST_SVAL = re.compile(r'"sval":"((?:[^"\\]|\\.)*)"')
_SELECT_KINDS = ("select",)
_USE_FAST = True       # tests turn it off to compare with the slow path


def _jstr(s: str) -> str:
    return _json.decode('"' + s + '"') if "\\" in s else s


_FIELD_SELECT = re.compile(r'"fields":\[\{"String":\{"sval":"(?:[^"\\]|\\.)*"\}\},\{"String"')


def _fast_select(sql: str, js: str) -> Statement | None:
    # one statement, nothing nested (a WITH query always nests one), no SELECT INTO
    # (intoClause comes before targetList in a SelectStmt); no o.f / (o).f (may be a
    # call of f in functional notation: the slow path records them)
    if not js.startswith(_SELECT_HEAD) or js.find('Stmt"', _HEAD_END) >= 0:
        return None
    if '"A_Indirection"' in js or _FIELD_SELECT.search(js) is not None:
        return None
    if '"Json' in js or '"MergeSupportFunc"' in js or '"json_object"' in js \
            or '"system_user"' in js:
        return None         # SQL syntax recorded as calls (_funccall, _sql_json)
    t = js.find('"targetList":', _HEAD_END)
    if js.find('"intoClause":', _HEAD_END, t if t > 0 else len(js)) >= 0:
        return None
    reads: dict[str, None] = {}
    i = js.find('"relname":"')
    while i >= 0:
        m = _FAST_RV.match(js, i)
        if m is None:
            return None
        if js.startswith('",', i - 2):
            # the field before relname is schemaname (catalogname comes before that)
            k = js.rfind('"schemaname":"', 0, i)
            schema = js[k + 14:i - 2]
            if k < 0 or '"' in schema or "\\" in schema:
                return None
        else:
            name = m.group(1)
            schema = "pg_temp" if m.group(2) == "t" else \
                "pg_catalog" if name.startswith("pg_") else "public"
        reads[schema + "." + m.group(1)] = None
        i = js.find('"relname":"', m.end())
    funcs: dict[str, None] = {}
    readonly = True
    if '"funcname":' in js:
        n = 0
        for m in _FAST_FC.finditer(js):
            parts = [_jstr(x) for x in _FAST_SVAL.findall(m.group(1))]
            bare = parts[-1]
            if bare == "set_config" or _func_class(bare) is not None:
                return None
            if bare in _WRITING_FUNCS:
                readonly = False
            funcs[_funcname(parts)] = None
            n += 1
        if n != js.count('"funcname":'):
            return None
    # a lone statement: its RawStmt closes the JSON with stmt_location/stmt_len, if any
    tail = js[-48:]
    start = length = 0
    k = tail.rfind('"stmt_len":')
    if k >= 0:
        length = int(tail[k + 11:].rstrip("}]"))
    k = tail.rfind('"stmt_location":')
    if k >= 0:
        start = int(tail[k + 16:].split(",", 1)[0].rstrip("}]"))
    if start or length:
        text = _slices(sql, [{"stmt_location": start, "stmt_len": length}])[0]
    else:
        text = sql.strip()
    # no literal was read on this path: set_config and the flagged functions leave it
    return Statement(kind="select", text=text, kinds=_SELECT_KINDS,
                     relations_read=tuple(reads), functions=tuple(funcs), readonly=readonly,
                     literal_free=True)


def _classify(sql: str, prepared: Mapping[str, Statement] | None, max_length: int | None,
              ctx: str = "", plvars: frozenset[str] = frozenset()) -> list[Statement]:
    if max_length is not None and len(sql) > max_length:
        raise StatementTooLong(
            f"statement text is {len(sql)} characters; pgguard refuses texts longer than "
            f"{max_length}")
    if "\x00" in sql:
        raise PolicyParseError("statement text contains a NUL character")
    try:
        js = _pg.parse_sql_json(sql)
    except _pg.ParseError as e:
        # pglast reports a 0-based character index; ErrorResponse 'P' is 1-based
        pos = e.args[1] + 1 if len(e.args) > 1 and isinstance(e.args[1], int) else None
        msg = str(e.args[0]) if e.args else str(e)
        if pos is not None and pos > len(sql):
            pos = len(sql) or None
        elif pos is None and msg.endswith("at end of input") and sql:
            pos = len(sql) + 1          # where Postgres points: just past the text
        raise PolicyParseError(msg, pos) from None
    if _USE_FAST:
        st = _fast_select(sql, js)
        if st is not None:
            return [st]
    stmts = _json.decode(js).get("stmts") or ()
    texts = _slices(sql, stmts)
    out = []
    local: dict[str, Statement | None] = {}
    for raw, text in zip(stmts, texts):
        node = raw.get("stmt")
        if type(node) is not dict or len(node) != 1:
            raise PolicyParseError("unexpected parse tree")
        tag, body = next(iter(node.items()))
        view: Mapping[str, Statement] | None = prepared
        if local:
            view = _Overlay(local, prepared)
        acc = _Acc(text, view, plvars)
        acc.ctx = ctx
        handler = _STMT.get(tag)
        if handler is not None:
            handler(acc, body)
        else:
            _utility(tag, acc, body)
        st = acc.build(text)
        out.append(st)
        if st.kind == "prepare" and st.name is not None:
            body = _body_of_prepare(st)
            existing = view.get(st.name) if view is not None else None
            local[st.name] = body if existing is None else _union(existing, body)
        elif st.kind == "deallocate":
            if st.name is None:
                local.clear()
                prepared = None
            else:
                local[st.name] = None
        elif st.kind == "discard" and "privilege" in st.flags:
            local.clear()
            prepared = None
    return out


class _Overlay(Mapping):
    """Prepared statements of this text first (None: deallocated), then the session's."""

    def __init__(self, local: dict, base: Mapping | None) -> None:
        self.local, self.base = local, base

    def __getitem__(self, k: str) -> Statement:
        if k in self.local:
            v = self.local[k]
            if v is None:
                raise KeyError(k)
            return v
        if self.base is None:
            raise KeyError(k)
        return self.base[k]

    def __iter__(self):  # pragma: no cover - unused
        return iter(self.local)

    def __len__(self) -> int:  # pragma: no cover - unused
        return len(self.local)


def _body_of_prepare(st: Statement) -> Statement:
    """What EXECUTE of a PREPARE'd name runs: the inner statement's classification."""
    kinds = st.kinds[1:] or ("unknown",)
    prefix = f"PREPARE {st.name} AS: "
    reasons = tuple(Reason(r.flag, r.text[len(prefix):] if r.text.startswith(prefix)
                           else r.text) for r in st.reasons)
    return msgspec.structs.replace(st, kind=kinds[0], kinds=kinds, reasons=reasons,
                                   name=st.name)


def classify(sql: str, *, prepared: Mapping[str, Statement] | None = None,
             max_length: int | None = DEFAULT_MAX_LENGTH) -> list[Statement]:
    """Classify every statement of ``sql``; raise :class:`PolicyParseError` if it does not parse.

    ``prepared`` maps prepared-statement names to what they run (a
    :class:`PreparedMemory` or any mapping), so that SQL ``EXECUTE name`` is classified as
    the statement it runs; an unknown name is ``opaque``. A PREPARE earlier in the same
    text is seen by a later EXECUTE.

    Example::

        >>> [(s.kind, s.flags) for s in classify("PREPARE p AS DELETE FROM t; EXECUTE p")]
        [('prepare', ('destructive', 'write')), ('execute', ('destructive', 'write'))]
        >>> classify("select 1 from")
        Traceback (most recent call last):
        pgguard.policy.classify.PolicyParseError: syntax error at end of input
    """
    return _classify(sql, prepared, max_length)


class PreparedMemory(Mapping):
    """One session's prepared statements, as pgguard saw them prepared.

    Feed it what the session ran (``observe``) and protocol-level named Parse messages
    (``record``); pass it as ``prepared=`` to :func:`classify` or
    ``PolicyEngine.decide``. A name prepared twice keeps the union of both
    classifications (Postgres keeps the first and fails the second; pgguard may not know
    which one failed), so the memory never under-states what ``EXECUTE name`` runs.

    Example::

        >>> mem = PreparedMemory()
        >>> mem.observe(classify("PREPARE p AS DELETE FROM t WHERE id = $1"))
        >>> classify("EXECUTE p(5)", prepared=mem)[0].kinds
        ('execute', 'delete')
    """

    def __init__(self, limit: int = 10_000, text_bytes: int = 16 << 20) -> None:
        self._by_name: dict[str, Statement] = {}
        self.limit = limit
        self.text_bytes = text_bytes        # and at most this much of their texts
        self._bytes = 0

    def __getitem__(self, name: str) -> Statement:
        return self._by_name[name]

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def record(self, name: str, statement: Statement) -> None:
        """Remember what ``name`` runs (a PREPARE statement or a Parse'd statement)."""
        body = _body_of_prepare(statement) if statement.kind == "prepare" else statement
        old = self._by_name.get(name)
        if old is not None:
            body = _union(old, body)
            self._bytes -= len(old.text)
        else:
            # forgetting makes a later EXECUTE opaque: refused for agents, never allowed blind
            while self._by_name and (len(self._by_name) >= self.limit or
                                     self._bytes + len(body.text) > self.text_bytes):
                self._bytes -= len(self._by_name.pop(next(iter(self._by_name))).text)
        self._by_name[name] = body
        self._bytes += len(body.text)

    def forget(self, name: str | None) -> None:
        """DEALLOCATE name (None: DEALLOCATE ALL) or a protocol Close of a statement."""
        if name is None:
            self._by_name.clear()
            self._bytes = 0
        else:
            gone = self._by_name.pop(name, None)
            if gone is not None:
                self._bytes -= len(gone.text)

    def observe(self, statements: list[Statement] | tuple[Statement, ...]) -> None:
        """Update from statements the session sends: what each PREPARE may make its name
        mean (recorded when judged, whatever the outcome: a name is judged by the union
        of everything it may mean)."""
        for st in statements:
            if st.kind == "prepare" and st.name is not None:
                self.record(st.name, st)
            # DEALLOCATE and DISCARD ALL forget nothing: they may not have run (an
            # earlier error of the same Query or pipeline skips them, a failed block
            # never runs them), and a name that keeps what it may still mean is judged
            # by the union, never by less than the backend holds


def _union(a: Statement, b: Statement) -> Statement:
    def merged(x: tuple, y: tuple) -> tuple:
        return tuple(dict.fromkeys(x + y))
    flags = set(a.flags) | set(b.flags)
    return Statement(
        kind=a.kind, text=a.text, kinds=merged(a.kinds, b.kinds),
        relations_written=merged(a.relations_written, b.relations_written),
        relations_read=merged(a.relations_read, b.relations_read),
        functions=merged(a.functions, b.functions),
        flags=tuple(f for f in FLAGS if f in flags),
        reasons=merged(a.reasons, b.reasons),
        literal_free=a.literal_free and b.literal_free,
        name=a.name, readonly=a.readonly and b.readonly,
        session_dependent=a.session_dependent or b.session_dependent,
        settings=merged(a.settings, b.settings),
        changes_rows=a.changes_rows or b.changes_rows,
        counted_by_tag=False)


def _function_source(acc: _Acc, b: dict, opts: dict) -> tuple[str, str | None, frozenset]:
    """A CreateFunctionStmt's language (lowercase; "?" unknown), its body text (AS
    '...'; None for a SQL-standard body or a C symbol) and its parameter names."""
    lang = _lit(acc, opts["language"]) if "language" in opts else ""
    lang = lang.lower() if type(lang) is str else "?"
    if not lang:
        lang = "sql" if b.get("sql_body") is not None else "?"
    body: str | None = None
    as_ = opts.get("as")
    if type(as_) is dict and "List" in as_:
        items = as_["List"].get("items") or ()
        if items:
            v = _lit(acc, items[0])
            body = v if type(v) is str else None
    params = frozenset(
        p["FunctionParameter"]["name"] for p in b.get("parameters") or ()
        if type(p) is dict and type(p.get("FunctionParameter")) is dict
        and p["FunctionParameter"].get("name"))
    return lang, body, params


def classify_function_body(definition: str, what: str = "") -> Statement:
    """What a call of a function runs, read from its definition: the ``CREATE
    FUNCTION`` / ``CREATE PROCEDURE`` text (``pg_get_functiondef`` gives it, or the
    statement that created it). The body is read exactly as the CREATE path reads it
    (SQL and PL/pgSQL bodies: relations, kinds, functions and flags of what they run;
    any other language ``opaque``, untrusted ones ``escape`` too), with parameter
    defaults and SET clauses; the CREATE's own concerns (OR REPLACE, SECURITY DEFINER)
    are not the call's. ``what`` names it in reasons (default ``function <name>``).
    Never raises: a definition pgguard cannot read is ``opaque``.

    Example::

        >>> st = classify_function_body("CREATE FUNCTION f() RETURNS void LANGUAGE sql "
        ...                             "AS 'DELETE FROM orders WHERE id > 0'")
        >>> st.kinds, st.relations_written, st.flags
        (('delete',), ('public.orders',), ('write',))
    """
    acc = _Acc(definition)
    acc.literal = True
    try:
        stmts = _json.decode(_pg.parse_sql_json(definition)).get("stmts") or ()
        node = stmts[0].get("stmt") if len(stmts) == 1 and type(stmts[0]) is dict else None
        b = node.get("CreateFunctionStmt") if type(node) is dict else None
    except _pg.ParseError as e:
        b = None
        acc.flag("opaque", f"{what or 'the function'}: its definition could not be parsed "
                           f"({e.args[0] if e.args else e})")
    if type(b) is dict:
        kind = "procedure" if b.get("is_procedure") else "function"
        what = what or f"{kind} {_dotted(b.get('funcname'))}"
        opts = _defelems(b.get("options"))
        lang, body, params = _function_source(acc, b, opts)
        _body_by_language(acc, lang, what, sql_body=b.get("sql_body"), sql_text=body,
                          params=params)
        # parameter defaults (evaluated by the call) and SET clauses (scoped to the call)
        saved_ctx, saved_set = acc.ctx, acc.scoped_set
        acc.ctx, acc.scoped_set = f"{what}: ", True
        _utility_walk(acc, b, ("sql_body", "funcname", "options", "returnType"))
        acc.ctx, acc.scoped_set = saved_ctx, saved_set
        for o in b.get("options") or ():
            d = o.get("DefElem") if type(o) is dict else None
            if type(d) is dict and d.get("defname") == "set":
                saved_ctx, saved_set = acc.ctx, acc.scoped_set
                kinds = dict(acc.kinds)         # a SET clause is no statement of the call
                acc.ctx, acc.scoped_set = f"{what}: ", True
                _utility_walk(acc, d)
                acc.ctx, acc.scoped_set, acc.kinds = saved_ctx, saved_set, kinds
    elif not acc.flags:
        acc.flag("opaque", f"{what or 'the function'}: pgguard found no function "
                           "definition to read")
    st = acc.build("")
    return msgspec.structs.replace(st, kind=next((k for k in st.kinds if k != "select"),
                                                 "select"))
