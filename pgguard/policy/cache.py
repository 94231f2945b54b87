# Bounded LRU caches of policy decisions: by exact text, and by a literal-insensitive shape.
"""Decision caches.

Two bounded LRU maps, both keyed with the identity name and the database:

- **exact**: the statement text as received. A hit costs one dict lookup.
- **shape**: the text with its string and numeric literals blanked out, so traffic
  like pgbench's (the same statement with new literals each time) hits too. Only
  decisions proven not to depend on a literal are stored here (:func:`shareable`, fail
  closed): every statement must be a plain SELECT/INSERT/UPDATE/DELETE/MERGE whose
  classification provably read no literal's value (``Statement.literal_free``: every
  such read in the classifier goes through one accessor, which clears it). So
  ``SELECT set_config('application_name', 'x', false)`` never answers for
  ``SELECT set_config('role', 'x', false)``, nor a DO body for another.

Why not pglast's ``fingerprint`` as the shape key: it also ignores schema names
(``SELECT * FROM public.t`` and ``SELECT * FROM secret.t`` have the same fingerprint),
which would let a decision for one schema answer for another; and it costs a parse
(~3.5 µs) where :func:`shape_key` costs a regular-expression pass over the text.

:func:`shape_key` returns None (no shape caching) for any text whose lexing it cannot
be sure of with a simple scanner: comments, dollar quotes or ``$n`` parameters,
backslashes (E'' strings), ``U&`` escapes and NUL. Such texts still hit the exact cache.

Example::

    >>> shape_key("SELECT abalance FROM pgbench_accounts WHERE aid = 42")
    'SELECT abalance FROM pgbench_accounts WHERE aid = \\x00'
    >>> shape_key("SELECT 1 -- comment") is None
    True

Not thread-safe: one cache per event loop (each worker process has its own).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Generic, TypeVar

__all__ = ["LRU", "DecisionCache", "shape_key", "shareable", "SHAREABLE_KINDS"]

V = TypeVar("V")

# statement kinds whose decision may be shared across literal values
SHAREABLE_KINDS = frozenset({"select", "insert", "update", "delete", "merge"})

def shareable(d: Any) -> bool:
    """May this decision answer for every text of the same shape? Only when each of its
    statements is of a shareable kind (all kinds run inside it too) and provably read no
    literal's value; anything else is cached by exact text only."""
    return bool(d.statements) and all(
        s.literal_free and s.kind in SHAREABLE_KINDS and SHAREABLE_KINDS.issuperset(s.kinds)
        for s in d.statements)


# Literals become a NUL, which no SQL text can contain. Texts with quoted identifiers go
# through the full scanner (an identifier is kept, followed by a marker, so that "t 1" and
# "t 2" stay apart); others take two cheaper passes: strings, then numbers that start a
# word (so the digits of an identifier such as t1 are kept).
_LITERALS = re.compile(
    r'("(?:[^"]|"")*")'
    r"|'(?:[^']|'')*'"
    r"|\b[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?")
_STRINGS = re.compile(r"'(?:[^']|'')*'")
_NUMBERS = re.compile(r"\b[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?")


def shape_key(sql: str) -> str | None:
    """The text with literals blanked, or None when the text is not simple enough."""
    if ("\\" in sql or "$" in sql or "--" in sql or "/*" in sql or "\x00" in sql
            or ("&" in sql and ("U&" in sql or "u&" in sql))):
        return None
    if '"' in sql:
        return _LITERALS.sub("\\1\x00", sql)
    if "'" in sql:
        sql = _STRINGS.sub("\x00", sql)
    return _NUMBERS.sub("\x00", sql)


class LRU(Generic[V]):
    """A bounded least-recently-used map with a budget on the total key-text size.

    Example::

        >>> c = LRU(maxsize=2)
        >>> c.put("a", 1, 1); c.put("b", 2, 1); c.get("a"); c.put("c", 3, 1)
        1
        >>> list(c.keys())
        ['a', 'c']
    """

    __slots__ = ("_d", "maxsize", "maxchars", "_chars", "_sizes")

    def __init__(self, maxsize: int = 10_000, maxchars: int = 32 << 20) -> None:
        self._d: OrderedDict[Any, V] = OrderedDict()
        self._sizes: dict[Any, int] = {}
        self.maxsize = maxsize
        self.maxchars = maxchars
        self._chars = 0

    def get(self, key: Any) -> V | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: Any, value: V, size: int) -> None:
        if size > self.maxchars or self.maxsize <= 0:
            return
        d = self._d
        if key in d:
            self._chars -= self._sizes[key]
        d[key] = value
        d.move_to_end(key)
        self._sizes[key] = size
        self._chars += size
        while len(d) > self.maxsize or self._chars > self.maxchars:
            old, _ = d.popitem(last=False)
            self._chars -= self._sizes.pop(old)

    def clear(self) -> None:
        self._d.clear()
        self._sizes.clear()
        self._chars = 0

    def keys(self):
        return self._d.keys()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Any) -> bool:
        return key in self._d


class DecisionCache:
    """The exact-text and shape caches of one :class:`~pgguard.policy.rules.PolicyEngine`.

    ``max_text`` bounds the length of a text worth caching (longer texts are classified
    each time); ``maxsize`` and ``maxchars`` bound each map.
    """

    def __init__(self, maxsize: int = 10_000, *, max_text: int = 64 * 1024,
                 maxchars: int = 32 << 20) -> None:
        self.exact: LRU[Any] = LRU(maxsize, maxchars)
        self.shape: LRU[Any] = LRU(maxsize, maxchars)
        self.max_text = max_text
        self.hits_exact = 0
        self.hits_shape = 0
        self.misses = 0

    def clear(self) -> None:
        self.exact.clear()
        self.shape.clear()

    def stats(self) -> dict[str, int]:
        """Counters for /metrics: hits by kind, misses, entries."""
        return {"hits_exact": self.hits_exact, "hits_shape": self.hits_shape,
                "misses": self.misses, "entries_exact": len(self.exact),
                "entries_shape": len(self.shape)}
