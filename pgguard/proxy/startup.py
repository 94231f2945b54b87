# The upstream startup packet: which startup settings of a client reach Postgres.
# The client's parameters and `options` are read as Postgres reads them, judged against
# an allow-list, and rebuilt as the parameters pgguard sends.
"""What a client's StartupMessage may ask of the upstream session.

Postgres applies a StartupMessage in two steps: the ``options`` string first (split on
whitespace with backslash escapes, then read as server command-line switches), then
every other parameter as a setting. pgguard reads both the same way
(:func:`client_settings`), then :func:`upstream_params` judges each setting and builds
the parameters of the upstream StartupMessage itself: the client's raw ``options`` never
reaches Postgres.

For a session under a policy (:func:`under_policy`) only the settings in ``ALLOWED``
pass, ``client_encoding`` only as UTF8, ``standard_conforming_strings`` and the
read-only defaults only as on, and no switch other than ``-c``/``--name=value``;
pgguard pins ``client_encoding=UTF8`` and ``standard_conforming_strings=on`` (what its
parser assumes) and, for read-only tokens, ``default_transaction_read_only=on``.
Nothing parses the statements of other sessions, so their settings pass, except the
ones that would change who the session is. Any refusal is a FATAL 42501 naming the
setting, sent before pgguard connects upstream.

Example::

    settings = client_settings({"user": "a", "options": "-c DateStyle=ISO"})
    params, app = upstream_params(settings, guarded=True, readonly=False)
    # params == [("datestyle", "ISO"), ("client_encoding", "UTF8"),
    #            ("standard_conforming_strings", "on")], app is None
"""
from __future__ import annotations

import fnmatch

import dataclasses
from typing import TYPE_CHECKING

from ..errors import PgguardError, PolicyRefusal
from ..masking.wire import applies

if TYPE_CHECKING:
    from ..config import Identity
    from .services import Services

# StartupMessage keys Postgres reads as something other than a setting (matched exactly
# there; any other spelling is a setting name, which a lower-cased name must not become)
PACKET_KEYS = frozenset({"user", "database", "options", "replication"})
# never through pgguard, whoever asks: they change who the session is, or make it a
# replication connection
FORBIDDEN = frozenset({"role", "session_authorization", "replication"})
# what the parser relies on, sent upstream for every session under a policy; the
# search_path is the one the classifier reads unqualified names in (public.<name>): not
# the default "$user", public, under which a schema named like the upstream role (that
# the agent may create) would shadow public's tables and views
PINNED = {"client_encoding": "UTF8", "standard_conforming_strings": "on",
          "search_path": "public"}
# settings a session under a policy may choose at startup: what libpq, psycopg, asyncpg,
# pgjdbc and node-postgres send, and settings that only change formatting, timeouts or
# planning (README, "Startup settings")
ALLOWED = frozenset({
    "application_name", "client_encoding", "standard_conforming_strings",
    "datestyle", "timezone", "intervalstyle", "extra_float_digits", "bytea_output",
    "lc_monetary", "lc_numeric", "lc_time", "xmlbinary", "xmloption",
    "client_min_messages",
    "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "idle_session_timeout", "transaction_timeout",
    "default_transaction_isolation", "default_transaction_deferrable",
    "default_transaction_read_only", "transaction_read_only",
    "geqo", "jit", "work_mem", "maintenance_work_mem",
})
# allowed only with a value that means on
ON_ONLY = frozenset({"standard_conforming_strings", "default_transaction_read_only",
                     "transaction_read_only"})
# what tags an upstream application_name with the identity acting
APP_TAG = "pgguard:"

_HINT = ('pgguard passes only the startup settings listed in its README ("Startup '
         'settings"); remove this one from the connection string, PGOPTIONS or the '
         "driver's startup parameters")
# isspace() in the C locale: what separates the words of `options`
_SPACE = frozenset(" \t\n\v\f\r")
# process_postgres_switches' getopt string: a letter followed by ':' takes an argument
_SWITCHES = "B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:"
_FLAGS = frozenset(_SWITCHES.replace(":", ""))
_TAKES_ARG = frozenset(ch for ch, nxt in zip(_SWITCHES, _SWITCHES[1:] + " ")
                       if ch != ":" and nxt == ":")
# switches that set one setting: to their argument, or to a fixed value
_SWITCH_ARG = {"B": "shared_buffers", "h": "listen_addresses", "k": "unix_socket_directories",
               "N": "max_connections", "p": "port", "S": "work_mem", "W": "post_auth_delay"}
_SWITCH_FIXED = {"e": ("datestyle", "euro"), "F": ("fsync", "false"),
                 "i": ("listen_addresses", "*"), "l": ("ssl", "true"),
                 "O": ("allow_system_table_mods", "true"),
                 "P": ("ignore_system_indexes", "true"), "s": ("log_statement_stats", "true")}
# -f X: the plan type X turned off
_PLAN_TYPES = {"s": "enable_seqscan", "i": "enable_indexscan", "o": "enable_indexonlyscan",
               "b": "enable_bitmapscan", "t": "enable_tidscan", "n": "enable_nestloop",
               "m": "enable_mergejoin", "h": "enable_hashjoin"}
# Postgres' encoding names for UTF8, as clean_encoding_name() leaves them
_UTF8_NAMES = frozenset({"utf8", "unicode"})


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One setting a client asked for: ``name`` as Postgres looks it up (lower case),
    ``seen`` how the client wrote it (for messages), ``switch`` the server switch that
    set it when that was not ``-c``/``--name=value`` (``"-e"``, ``"-S"`` ...)."""

    name: str
    value: str
    seen: str
    switch: str | None = None


def split_options(text: str) -> list[str]:
    """The words of a startup ``options`` string, split as Postgres' pg_split_opts does:
    at unescaped whitespace; a backslash takes the next character literally.

    >>> split_options(r"-c search_path=a,\\ b  -ec\\ x=1")
    ['-c', 'search_path=a, b', '-ec x=1']
    """
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in _SPACE:
            i += 1
        if i == n:
            break
        word: list[str] = []
        escaped = False
        while i < n:
            ch = text[i]
            if ch in _SPACE and not escaped:
                break
            if ch == "\\" and not escaped:
                escaped = True
            else:
                escaped = False
                word.append(ch)
            i += 1
        words.append("".join(word))
    return words


def option_settings(options: str) -> list[Setting]:
    """The settings an ``options`` string makes, read as Postgres' getopt loop over its
    server switches reads them (clustered switches like ``-ec name=value``, an argument
    attached or in the next word, ``--name=value`` with ``-`` in the name read as ``_``).
    A malformed string raises the FATAL 42601 Postgres would send.

    >>> [(s.name, s.value, s.switch) for s in option_settings("-ec Time-Zone=UTC")]
    [('datestyle', 'euro', '-e'), ('time_zone', 'UTC', None)]
    """
    words = split_options(options)
    out: list[Setting] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":                        # the end of the switches
            if i < len(words):
                raise _invalid(words[i])
            break
        if len(word) < 2 or word[0] != "-":     # no database name may follow in options
            raise _invalid(word)
        pos = 1
        while pos < len(word):
            flag = word[pos]
            pos += 1
            if flag not in _FLAGS:
                raise _invalid(word)
            arg = ""
            if flag in _TAKES_ARG:
                if pos < len(word):
                    arg = word[pos:]
                elif i < len(words):
                    arg = words[i]
                    i += 1
                else:
                    raise _invalid(word)
                pos = len(word)
            out.extend(_switch(flag, arg))
    return out


def client_settings(params: dict[str, str]) -> list[Setting]:
    """Every setting a StartupMessage's parameters ask for, in the order Postgres applies
    them: ``options`` first, then the other parameters (``replication`` included, as a
    setting that is always refused)."""
    out = option_settings(params["options"]) if params.get("options") else []
    for key, value in params.items():
        if key not in ("user", "database", "options"):
            out.append(Setting(key.lower(), value, f'startup parameter "{key}"'))
    return out


def upstream_params(settings: list[Setting], *, guarded: bool, readonly: bool,
                    allow: tuple[str, ...] | list[str] = ()
                    ) -> tuple[list[tuple[str, str]], str | None]:
    """Judge the client's settings; return the parameters of the upstream StartupMessage
    besides user, database and application_name, in the client's order (a name may
    repeat: Postgres applies them one after the other, and DateStyle merges), then
    pgguard's pins; and the client's own application_name (None if it set none).
    Raises a FATAL 42501 for the first setting not allowed (``guarded``: the session is
    under a policy, see :func:`under_policy`). ``allow``: the config's ``[policy]
    settings`` (names or globs), which open a setting at startup as in the session.
    """
    params: list[tuple[str, str]] = []
    app: str | None = None
    for s in settings:
        if s.name in PACKET_KEYS or s.name in FORBIDDEN or s.name.startswith("_pq_."):
            raise _refused(s, "it would change who the session is or how it connects")
        if s.name == "application_name":
            if s.value.lstrip().lower().startswith(APP_TAG):
                raise PolicyRefusal(
                    f'application_name "{s.value}" is not allowed through pgguard',
                    detail=f"{s.seen}: a name beginning with {APP_TAG!r} is how the "
                           "upstream tells which identity a session belongs to",
                    hint=f"choose an application_name that does not begin with {APP_TAG!r}",
                    severity="FATAL")
            app = s.value
            continue
        if guarded:
            _judge(s, allow)
        if s.name:          # an ignored switch (-T, -n ...) sets nothing
            params.append((s.name, s.value))
    if guarded:
        # a search_path the client chose passed the allow-list ([policy] settings opens
        # it): the config's owner accepted that names resolve elsewhere
        chosen = {name for name, _ in params}
        params.extend((k, v) for k, v in PINNED.items()
                      if k != "search_path" or k not in chosen)
    if readonly:
        params.append(("default_transaction_read_only", "on"))
    return params, app


def under_policy(services: Services, name: str, identity: Identity, database: str,
                 readonly: bool) -> bool:
    """True if something will parse this session's statements: a read-only scope, a
    role pgguard chooses, masks or detectors, or a policy that can refuse (the
    condition under which the session enters the relay with a policy)."""
    cfg = services.cfg
    if readonly or cfg.upstream.provision or identity.upstream_user or identity.role:
        return True
    if any(applies(mk, name, identity) for mk in cfg.masks):
        return True
    if services.detectors is not None and not set(cfg.detectors.except_groups) & set(
            identity.groups):
        return True
    return services.policy_inspects(name, identity, database)


def tagged_app_name(identity: str, client_app: str | None) -> str:
    """The upstream application_name naming who acts: ``pgguard:<identity> <client's>``,
    cut to the 63 bytes Postgres keeps."""
    name = APP_TAG + identity + (f" {client_app}" if client_app else "")
    return name.encode()[:63].decode("utf-8", "ignore")


# -- helpers

def _switch(flag: str, arg: str) -> list[Setting]:
    if flag in "c-":
        name, eq, value = arg.partition("=")
        if not eq:
            raise PgguardError(f"{'-c ' if flag == 'c' else '--'}{arg} requires a value",
                               sqlstate="42601", severity="FATAL")
        if not name:
            # no such setting in Postgres; and an empty name would end a StartupMessage
            raise _invalid(f"-c {arg}" if flag == "c" else f"--{arg}")
        seen = f'options "-c {arg}"' if flag == "c" else f'options "--{arg}"'
        return [Setting(name.replace("-", "_").lower(), value, seen)]
    seen = f'options "-{flag}{" " + arg if arg else ""}"'
    pairs: list[tuple[str, str]]
    if flag in _SWITCH_ARG:
        pairs = [(_SWITCH_ARG[flag], arg)]
    elif flag in _SWITCH_FIXED:
        pairs = [_SWITCH_FIXED[flag]]
    elif flag == "d":
        pairs = _debug(_atoi(arg))
    elif flag == "f":
        if arg[:1] not in _PLAN_TYPES:
            raise _invalid(f"-f{arg}")
        pairs = [(_PLAN_TYPES[arg[0]], "false")]
    elif flag == "t":
        stat = {"pa": "log_parser_stats", "pl": "log_planner_stats"}.get(arg[:2]) or \
            ("log_executor_stats" if arg[:1] == "e" else None)
        if stat is None:
            raise _invalid(f"-t{arg}")
        pairs = [(stat, "true")]
    else:
        # b C D E j n r T v: ignored in a client's options (or only for the server itself);
        # kept so that a session under a policy refuses them like any switch
        pairs = [("", "")]
    return [Setting(n, v, seen, f"-{flag}") for n, v in pairs]


def _debug(level: int) -> list[tuple[str, str]]:
    # -d N as Postgres' set_debug_options reads it for a client
    out = [("log_min_messages", f"debug{level}" if level > 0 else "notice")]
    out += [(name, value) for n, name, value in (
        (2, "log_statement", "all"), (3, "debug_print_parse", "true"),
        (4, "debug_print_plan", "true"), (5, "debug_print_rewritten", "true"))
        if level >= n]
    return out


def _atoi(text: str) -> int:
    # C atoi: leading whitespace, a sign, the digits that follow; 0 when there are none
    s = text.lstrip(" \t\n\v\f\r")
    sign = -1 if s[:1] == "-" else 1
    s = s[1:] if s[:1] in "+-" and s else s
    digits = ""
    for ch in s:
        if not "0" <= ch <= "9":
            break
        digits += ch
    return sign * int(digits) if digits else 0


def _judge(s: Setting, allow) -> None:
    """The allow-list, for a session under a policy."""
    if s.switch is not None:
        raise PolicyRefusal(
            f"startup option {s.switch} is not allowed through pgguard",
            detail=f"{s.seen}: for identities under a policy pgguard reads only settings "
                   "(-c name=value, --name=value) in options",
            hint="write the setting as -c name=value", severity="FATAL")
    if s.name not in ALLOWED and not any(fnmatch.fnmatchcase(s.name, p.lower())
                                         for p in allow):
        raise _refused(s, "it is not on pgguard's list of startup settings for "
                          "identities under a policy")
    if s.name == "client_encoding" and _encoding_key(s.value) not in _UTF8_NAMES:
        raise PolicyRefusal(
            f"startup setting client_encoding={s.value} is not allowed through pgguard",
            detail=f"{s.seen}: pgguard reads every statement as UTF-8 and pins "
                   "client_encoding=UTF8 upstream",
            hint="connect with client_encoding=UTF8 (for psql: PGCLIENTENCODING=UTF8)",
            severity="FATAL")
    if s.name in ON_ONLY and _pg_bool(s.value) is not True:
        raise PolicyRefusal(
            f"startup setting {s.name}={s.value} is not allowed through pgguard",
            detail=f"{s.seen}: pgguard reads statements as a server with "
                   f"{s.name}=on does, and only on is accepted",
            hint=f"leave {s.name} out (pgguard sets what it needs)", severity="FATAL")


def _refused(s: Setting, why: str) -> PolicyRefusal:
    return PolicyRefusal(f"startup setting {s.name} is not allowed through pgguard",
                         detail=f"{s.seen} sets {s.name}={s.value!r}: {why}",
                         hint=_HINT, severity="FATAL")


def _invalid(arg: str) -> PgguardError:
    return PgguardError(f"invalid command-line argument for server process: {arg}",
                        hint="options holds server switches: -c name=value or "
                             "--name=value, words separated by spaces",
                        sqlstate="42601", severity="FATAL")


def _encoding_key(name: str) -> str:
    # clean_encoding_name(): the ASCII letters and digits, lower case
    return "".join(ch.lower() for ch in name if ch.isascii() and ch.isalnum())


def _pg_bool(value: str) -> bool | None:
    """A boolean setting's value as Postgres' parse_bool reads it (prefixes of true,
    false, yes, no; on, off; 1, 0; any case); None if it is not one."""
    v = value.lower()
    if not v:
        return None
    if v == "1":
        return True
    if v == "0":
        return False
    if "true".startswith(v) or "yes".startswith(v):
        return True
    if "false".startswith(v) or "no".startswith(v):
        return False
    if v == "on":
        return True
    if len(v) >= 2 and "off".startswith(v):
        return False
    return None
