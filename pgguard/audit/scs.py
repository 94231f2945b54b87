# A statement's text as Postgres reads it with standard_conforming_strings = off.
"""Both readings of a statement whose session turned ``standard_conforming_strings`` off.

The audit normalizes a statement (every literal becomes ``$n``) with the lexer rules of
``standard_conforming_strings = on``, the value pgguard pins. A session not under a
policy may turn it off; Postgres then reads a backslash in a plain ``'...'`` literal as
an escape, so a literal can end later than the normalizer thinks, and code can hide in
what the normalizer took for a literal::

    SELECT 'a\\' , ' ; DROP TABLE t; --'

reads as ``SELECT $1 , $2`` with the setting on, and as ``SELECT $1 ; DROP TABLE t;``
with it off. :func:`off_reading` rewrites the text so that a reader with the setting on
takes the tokens Postgres took with it off (each plain literal that holds a backslash
becomes an ``E'...'`` literal, the same string); :func:`both_readings` gives what the
audit records once the session has had the setting off: the statement normalized as read
either way, both when they differ, so the code Postgres ran is in the record whichever
value the setting had when the statement was parsed.
"""
from __future__ import annotations

_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHAR = _IDENT_START | frozenset("0123456789$")

NOTE = ("\n/* pgguard: standard_conforming_strings was off in this session; "
        "read with it off, the statement is: */\n")


def _ident(c: str) -> bool:
    return c in _IDENT_CHAR or c >= "\x80"


def _quoted_end(s: str, i: int, backslash: bool) -> tuple[int, bool]:
    # s[i] is the opening quote: (index after the closing quote, or len(s) when none;
    # whether a backslash occurs inside). backslash: it escapes the next character.
    n = len(s)
    j = i + 1
    seen = False
    while j < n:
        c = s[j]
        if c == "\\":
            seen = True
            if backslash:
                j += 2
                continue
        elif c == "'":
            if j + 1 < n and s[j + 1] == "'":
                j += 2
                continue
            return j + 1, seen
        j += 1
    return n, seen


def _dollar_tag(s: str, i: int) -> str | None:
    # s[i] == '$': the whole opening delimiter ($$ or $tag$) when one starts here
    n = len(s)
    j = i + 1
    if j < n and s[j] == "$":
        return "$$"
    if j < n and (s[j] in _IDENT_START or s[j] >= "\x80"):
        j += 1
        while j < n and (s[j] in _IDENT_CHAR or s[j] >= "\x80") and s[j] != "$":
            j += 1
        if j < n and s[j] == "$":
            return s[i:j + 1]
    return None


def off_reading(sql: str) -> str | None:
    """``sql`` with each plain (or ``N``) string literal that holds a backslash written
    as an ``E'...'`` literal: read with ``standard_conforming_strings = on`` it has the
    tokens Postgres reads in ``sql`` with the setting off. None when no literal holds a
    backslash (both readings are the same)."""
    if "\\" not in sql:
        return None
    out: list[str] = []
    n = len(sql)
    i = start = 0
    changed = False
    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "/" and sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == '"':
            j = i + 1
            while j < n:
                if sql[j] == '"':
                    if j + 1 < n and sql[j + 1] == '"':
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
        elif c == "$":
            tag = _dollar_tag(sql, i)
            if tag is None:
                i += 1
                while i < n and sql[i].isdigit():
                    i += 1
            else:
                j = sql.find(tag, i + len(tag))
                i = n if j < 0 else j + len(tag)
        elif c.isdigit():
            i += 1
            while i < n and (_ident(sql[i]) or sql[i] == "."):
                i += 1
        elif c in _IDENT_START or c >= "\x80":
            j = i + 1
            while j < n and _ident(sql[j]):
                j += 1
            word = sql[i:j]
            if j < n and sql[j] == "'" and len(word) == 1 and word in "eEbBxXnN":
                # E'..' escapes with or without the setting; B'..' / X'..' never do;
                # N'..' is a plain literal (read by the setting)
                end, seen = _quoted_end(sql, j, word in "eEnN")
                if word in "nN" and seen:
                    out.append(sql[start:i])
                    out.append("E")
                    start = j
                    changed = True
                i = end
            elif j + 1 < n and word in ("u", "U") and sql[j] == "&" and sql[j + 1] in "'\"":
                i = j + 1               # U&'..' / U&"..": the quote is read next
            else:
                i = j
        elif c == "'":
            end, seen = _quoted_end(sql, i, True)
            if seen:
                out.append(sql[start:i])
                out.append("E")
                start = i
                changed = True
            i = end
        else:
            i += 1
    if not changed:
        return None
    out.append(sql[start:])
    return "".join(out)


def both_readings(sql: bytes, normalize) -> bytes:
    """What the audit records for ``sql`` from a session that has had
    ``standard_conforming_strings`` off: ``sql`` itself when both readings normalize
    alike (the writer normalizes it as usual), else both normalized texts, the usual
    reading first, joined by a comment saying why."""
    if b"\\" not in sql:
        return sql
    text = sql.decode("utf-8", "replace")
    off = off_reading(text)
    if off is None:
        return sql
    on_n, off_n = normalize(text), normalize(off)
    if on_n == off_n:
        return sql
    return (on_n + NOTE + off_n).encode()
