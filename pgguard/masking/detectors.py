# Content detectors: built-in and custom patterns, one Hyperscan database, span masking.
"""Content detectors for text cells.

A :class:`DetectorSet` holds the detectors named by ``[detectors]`` in the config.
Each detector has two patterns over bytes:

- a *prefilter*, compiled into one Hyperscan block-mode database (no SOM: Hyperscan
  reports only end offsets, which is all the hot path needs to know *which* cells
  hold something);
- a *locator*, a Python :mod:`re` pattern run only on the few cells the prefilter
  flagged, and there only in a window around the prefilter's end offsets, which finds
  the spans to mask (plus a validator: Luhn for credit cards, SSN ranges).

The contract between the two: every locator match inside a cell contains a prefilter
match inside the same cell. Then "Hyperscan flags the cell, ``re`` finds the spans"
gives exactly what running ``re`` on every cell would (the pure-Python reference does
that), only faster. For custom detectors both are the same pattern.

The compiled core joins the cells of a chunk with ``\\n`` and scans them in one call;
a prefilter match that runs over the separator is attributed to the cell it ends in,
where the locator (run on that cell alone) decides, so nothing is ever masked across
cells.

Masked spans become ``[name]`` (``[email]``, ``[ssn]``, ``[credit_card]``...). The
label never contains a quote or a backslash, so JSON text and COPY escapes stay valid;
see :meth:`DetectorSet.mask_cell` for the exact span rules.

Example::

    ds = DetectorSet.from_config(["email", "ssn"], [])
    ds.mask_cell(b"mail bob@example.com now", ds.all_bits, False)
    # (b'mail [email] now', 1)
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from re import _parser as _sre_parser

import hyperscan

from ..errors import ConfigError

__all__ = ["BUILTIN", "MAX_DETECTORS", "Detector", "DetectorSet", "luhn_ok"]

# the compiled core keeps a 64-bit set of detector ids per cell
MAX_DETECTORS = 64

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def luhn_ok(digits: bytes) -> bool:
    """The Luhn checksum of ASCII digits (credit card numbers)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ch - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


Span = tuple[int, int]
Validator = Callable[[bytes, int, int], "Span | None"]


_DIGITS_ONLY = bytes.maketrans(b"", b"")


def _card(cell: bytes, s: int, e: int) -> Span | None:
    # the whole run if it is 13..19 Luhn-valid digits; else the longest, leftmost run
    # of whole digit groups that is (a card followed by more digits in the same run)
    text = cell[s:e]
    digits = text.translate(_DIGITS_ONLY, b" -")
    if 13 <= len(digits) <= 19 and luhn_ok(digits):
        return (s, e)
    groups: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        j = i
        while j < len(text) and 48 <= text[j] <= 57:
            j += 1
        groups.append((i, j))
        i = j + 1
    best: Span | None = None
    for a in range(len(groups)):
        for b in range(len(groups) - 1, a - 1, -1):
            ga, gb = groups[a][0], groups[b][1]
            digits = text[ga:gb].translate(_DIGITS_ONLY, b" -")
            if 13 <= len(digits) <= 19 and luhn_ok(digits):
                if best is None or (gb - ga) > (best[1] - best[0]):
                    best = (s + ga, s + gb)
                break
    return best


def _ssn(cell: bytes, s: int, e: int) -> Span | None:
    t = cell[s:e]
    area, group, serial = t[0:3], t[4:6], t[7:11]
    if area in (b"000", b"666") or area[:1] == b"9" or group == b"00" or serial == b"0000":
        return None
    return (s, e)


@dataclass(frozen=True)
class Detector:
    """One detector: ``prefilter`` (Hyperscan) and ``locator`` (Python re), both bytes
    patterns; ``validate(cell, start, end)`` returns the span to mask or None."""

    name: str
    prefilter: bytes
    locator: bytes
    flags: int = 0                      # re flags for the locator (re.I)
    hs_flags: int = 0
    validate: Validator | None = None
    # the spans finditer(locator) gives on a whole cell, computed faster (optional)
    locate: Callable[[bytes], list[Span]] | None = None

    @property
    def label(self) -> bytes:
        return b"[" + self.name.encode() + b"]"


_I = re.IGNORECASE
_HS_I = hyperscan.HS_FLAG_CASELESS

_EMAIL = rb"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}\b"
_EMAIL_LOCAL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_EMAIL_DOMAIN = re.compile(_EMAIL[_EMAIL.index(b"@") + 1:])


def _email_spans(cell: bytes) -> list[Span]:
    # finditer(_EMAIL) from each "@" instead of from every byte: a local part is the
    # run of local characters right before its "@" (at most 64, none before the end
    # of the previous match); the domain is matched from the "@" on
    out: list[Span] = []
    floor = 0
    at = cell.find(b"@")
    while at >= 0:
        s = at
        while s > floor and s > at - 64 and cell[s - 1] in _EMAIL_LOCAL:
            s -= 1
        if s < at:
            m = _EMAIL_DOMAIN.match(cell, at + 1)
            if m is not None:
                out.append((s, m.end()))
                floor = m.end()
                at = cell.find(b"@", floor)
                continue
        at = cell.find(b"@", at + 1)
    return out

# api tokens: (prefix, body class, minimum body length) -> prefilter: the prefix and
# exactly the minimum; locator: at a word start, the prefix and the whole body
_API_KINDS = (
    (rb"(?:sk|rk|pk)_(?:live|test)_", rb"[A-Za-z0-9]", 16),           # Stripe
    (rb"sk-(?:proj-|svcacct-|admin-)?", rb"[A-Za-z0-9]", 20),         # OpenAI
    (rb"gh[pousr]_", rb"[A-Za-z0-9]", 30),                            # GitHub
    (rb"github_pat_", rb"[A-Za-z0-9_]", 30),
    (rb"xox[abprs]-", rb"[A-Za-z0-9-]", 10),                          # Slack
    (rb"glpat-", rb"[A-Za-z0-9_-]", 20),                              # GitLab
    (rb"AIza", rb"[A-Za-z0-9_-]", 35),                                # Google
)
_API_PRE = b"|".join(b"%s%s{%d}" % (p, c, n) for p, c, n in _API_KINDS)
_API_LOC = rb"\b(?:" + b"|".join(
    b"%s%s{%d}[A-Za-z0-9_-]*" % (p, c, n) for p, c, n in _API_KINDS) + b")"

# Built-in detectors. Prefilters avoid leading \b and open-ended tails: each real
# match then ends at one offset only (one callback), and Hyperscan runs at GB/s.
BUILTIN: dict[str, Detector] = {d.name: d for d in (
    Detector(
        "email",
        rb"[A-Za-z0-9._%+-]@[A-Za-z0-9-]{1,63}\.[A-Za-z0-9-]",
        _EMAIL,
        locate=_email_spans),
    Detector(
        "ssn",
        rb"\d{3}-\d{2}-\d{4}",
        rb"\b\d{3}-\d{2}-\d{4}\b",
        validate=_ssn),
    Detector(
        "credit_card",
        rb"\d(?:[ -]?\d){12}",
        # 13..19 digits, a single space or dash allowed between two digits
        rb"\b\d(?:[ -]?\d){12,18}\b",
        validate=_card),
    Detector(
        "phone",
        rb"\d{3}[ .-]\d{4}",
        # (the lookahead only makes re skip faster over prose)
        rb"(?=[+(0-9])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\) ?|\b\d{3}[ .-]?)\d{3}[ .-]\d{4}\b"),
    Detector(
        "ipv4",
        rb"\d\.\d{1,3}\.\d{1,3}\.\d",
        rb"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b"),
    Detector(
        "aws_access_key",
        rb"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}",
        rb"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b",
        # any case: a lower-cased key comes back whole through upper()
        flags=_I, hs_flags=_HS_I),
    Detector(
        "jwt",
        rb"eyJ[A-Za-z0-9_-]{5}[A-Za-z0-9_-]*\.eyJ",
        rb"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{8,}"),
    Detector(
        "private_key",
        rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----",
        # the whole PEM block when it is there (\\ covers JSON-escaped newlines)
        rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
        rb"(?:[A-Za-z0-9+/=\s\\:,-]{0,16384}?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)?"),
    Detector(
        "bearer_token",
        rb"bearer\s+[A-Za-z0-9._~+/-]{16}",
        rb"\bbearer\s+[A-Za-z0-9._~+/-]{16,}=*",
        flags=_I, hs_flags=_HS_I),
    Detector("api_token", _API_PRE, _API_LOC),
)}


def _compile_db(dets: Sequence[Detector], ids: Sequence[int] | None = None) -> hyperscan.Database:
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(
        expressions=[d.prefilter for d in dets],
        ids=list(range(len(dets))) if ids is None else list(ids),
        elements=len(dets),
        flags=[d.hs_flags for d in dets],
    )
    return db


_ANCHORS = re.compile(rb"(?<!\\)(?:\\\\)*\\[AZzG]")


def _custom(i: int, name: str, pattern: str) -> Detector:
    where = f"detectors.custom[{i}]"
    if not _NAME.match(name):
        raise ConfigError(f"{where}.name: {name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if name in BUILTIN:
        raise ConfigError(f"{where}.name: {name!r} is a built-in detector name")
    pat = pattern.encode()
    if _ANCHORS.search(pat):
        raise ConfigError(
            f"{where}.pattern: \\A, \\Z, \\z and \\G are not supported (use ^ and $: "
            f"they match at the start and end of each cell)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            re.compile(pat)
    except (re.error, FutureWarning, DeprecationWarning) as e:
        raise ConfigError(f"{where}.pattern: invalid regular expression {pattern!r}: {e}") \
            from None
    det = Detector(name, pat, pat, hs_flags=hyperscan.HS_FLAG_MULTILINE)
    try:
        _compile_db([det])
    except hyperscan.error as e:
        msg = str(e.args[0] if e.args else e)
        raise ConfigError(
            f"{where}.pattern: Hyperscan rejects {pattern!r}: {msg} (backreferences, "
            f"lookaround and patterns that match an empty string are not supported)") \
            from None
    return det


class DetectorSet:
    """The detectors of one config, compiled once.

    ``db`` is the Hyperscan database (detector i has id i); the compiled core scans
    with it and calls :meth:`mask_cell` for each flagged cell.
    """

    def __init__(self, detectors: Sequence[Detector]) -> None:
        if not detectors:
            raise ValueError("a DetectorSet needs at least one detector")
        if len(detectors) > MAX_DETECTORS:
            raise ConfigError(f"detectors: at most {MAX_DETECTORS} detectors are supported")
        names = [d.name for d in detectors]
        if len(set(names)) != len(names):
            raise ConfigError("detectors: duplicate detector names")
        self.detectors: tuple[Detector, ...] = tuple(detectors)
        self.names: tuple[str, ...] = tuple(names)
        self.labels: tuple[bytes, ...] = tuple(d.label for d in detectors)
        self._locators = tuple(re.compile(d.locator, d.flags) for d in detectors)
        # the longest match each locator can make (None: unbounded): bounds the window
        # around the prefilter's end offsets that holds every match (see find_spans)
        self._widths = tuple(_max_width(d) for d in detectors)
        self._validators = tuple(d.validate for d in detectors)
        self._locate = tuple(d.locate for d in detectors)
        self.all_bits = (1 << len(detectors)) - 1
        self.db = _compile_db(detectors)
        # the compiled core's split of the same work (same ids, same results):
        # ``native`` maps the built-ins it prefilters and/or locates in C to their ids
        # (credit_card, phone: a digit automaton instead of Hyperscan, which crawls
        # through digit-dense text on their bounded repeats; all four: locator and
        # validation in C for text cells); ``hs_db`` holds the other prefilters, with
        # their ids in this set (None: none left)
        self.native: dict[str, int] = {
            d.name: i for i, d in enumerate(detectors)
            if d.name in _NATIVE and BUILTIN.get(d.name) is d}
        pre = {self.native[k] for k in _NATIVE_PREFILTER if k in self.native}
        rest = [i for i in range(len(detectors)) if i not in pre]
        self.hs_db = _compile_db([detectors[i] for i in rest], rest) if rest else None

    @classmethod
    def from_config(cls, builtin: Iterable[str], custom: Iterable[object]) -> DetectorSet | None:
        """From ``[detectors]``: builtin names and custom entries (objects or dicts with
        ``name`` and ``pattern``). None when no detector is configured."""
        dets: list[Detector] = []
        for i, name in enumerate(builtin):
            if name not in BUILTIN:
                raise ConfigError(
                    f"detectors.builtin[{i}]: unknown detector {name!r} "
                    f"(known: {', '.join(BUILTIN)})")
            if BUILTIN[name] not in dets:
                dets.append(BUILTIN[name])
        for i, c in enumerate(custom):
            name = c["name"] if isinstance(c, dict) else c.name
            pattern = c["pattern"] if isinstance(c, dict) else c.pattern
            dets.append(_custom(i, name, pattern))
        return cls(dets) if dets else None

    # -- spans -------------------------------------------------------------------

    def find_spans(self, cell: bytes, bits: int, lo: int = -1,
                   hi: int = -1) -> list[tuple[int, int, int]]:
        """``(start, end, detector id)`` of every validated match of the detectors in
        ``bits``, widened by the span rules, in order of start then end then id.

        ``lo``/``hi``: the first and last end offset of a prefilter match in the cell,
        when known. Every locator match contains a prefilter match, so it starts at or
        after ``lo - width`` and at or before ``hi``; searching ``[lo - width, hi + width]``
        (width: the longest match the locator can make) and keeping the matches that
        start by ``hi`` finds exactly what a search of the whole cell finds, at a cost
        that does not grow with the cell.
        """
        spans: list[tuple[int, int, int]] = []
        n = len(cell)
        i = 0
        while bits:
            if bits & 1:
                validate = self._validators[i]
                width = self._widths[i]
                locate = self._locate[i]
                if locate is not None:
                    found = locate(cell)
                elif lo >= 0 and width is not None:
                    found = [m.span() for m in self._locators[i].finditer(
                        cell, max(0, lo - width), min(n, hi + width + 1)) if m.start() <= hi]
                else:
                    found = [m.span() for m in self._locators[i].finditer(cell)]
                for s, e in found:
                    if validate is not None:
                        got = validate(cell, s, e)
                        if got is None:
                            continue
                        s, e = got
                    if s < e:
                        spans.append((*_widen(cell, n, s, e), i))
            bits >>= 1
            i += 1
        spans.sort()
        return spans

    def mask_cell(self, cell: bytes, bits: int, json: int, lo: int = -1,
                  hi: int = -1) -> tuple[bytes | None, int] | None:
        """Mask what the detectors in ``bits`` find in ``cell`` (a text value; JSON
        text when ``json`` is 1 or True; the text form of an array, composite, record or
        xml value when it is 2). Returns ``(new cell, ids that masked something)`` or
        None. For 2 the new cell is None (the value must become NULL) when a span touches
        the literal's syntax (braces, parentheses, commas, quotes, backslashes, angle
        brackets): no label could go there and keep the literal valid.

        Span rules (the reference rewriter and the compiled core share this code):
        a span grows to whole UTF-8 characters; it takes in a backslash that escapes
        its first character and the character its own trailing backslash escapes, so
        ``\\n``-style escapes are never cut in half. Overlapping spans merge, taking the
        label of the one that starts first (then the lower id); touching spans stay
        apart. In JSON text a span inside a string becomes ``[label]``, a span outside
        strings takes its whole token and becomes ``"[label]"``, and a span that crosses
        a quote turns the whole cell into ``"[label]"``.
        """
        spans = self.find_spans(cell, bits, lo, hi)
        if not spans:
            return None
        merged: list[list[int]] = []
        for s, e, i in spans:
            if merged and s < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e, i])
        hit = 0
        for _, _, i in merged:
            hit |= 1 << i
        if json == 2:
            if any(_LITERAL_SYNTAX.intersection(cell[s:e]) for s, e, _ in merged):
                return None, hit
        elif json:
            return _json_replace(cell, merged, self.labels), hit
        out = bytearray()
        pos = 0
        for s, e, i in merged:
            out += cell[pos:s]
            out += self.labels[i]
            pos = e
        out += cell[pos:]
        return bytes(out), hit


# built-ins the compiled core handles itself (rowmask.pyx): prefilters, locators
_NATIVE_PREFILTER = ("credit_card", "phone")
_NATIVE = ("credit_card", "phone", "ssn", "email")

# bytes with a meaning in array, composite and xml literals
_LITERAL_SYNTAX = frozenset(b'{}(),"\\<>&')


def _max_width(d: Detector) -> int | None:
    width = _sre_parser.parse(d.locator, d.flags).getwidth()[1]
    return width if width < 1 << 24 else None


def _widen(cell: bytes, n: int, s: int, e: int) -> tuple[int, int]:
    while s > 0 and (cell[s] & 0xC0) == 0x80:
        s -= 1
    # a backslash run right before s escapes cell[s] when it is odd
    k = s
    while k > 0 and cell[k - 1] == 92:
        k -= 1
    if (s - k) & 1:
        s -= 1
    # a backslash run ending at e - 1 escapes cell[e] when it is odd
    k = e
    while k > 0 and cell[k - 1] == 92:
        k -= 1
    if (e - k) & 1 and e < n:
        e += 1
    while e < n and (cell[e] & 0xC0) == 0x80:
        e += 1
    return s, e


_JSON_STOP = frozenset(b' \t\r\n,:[]{}"')


def _json_replace(cell: bytes, merged: list[list[int]], labels: Sequence[bytes]) -> bytes:
    n = len(cell)
    # string[i]: 1 inside a string (quotes excluded), 2 on a quote, 0 outside
    string = bytearray(n)
    inside = False
    i = 0
    while i < n:
        c = cell[i]
        if inside:
            if c == 92:
                string[i] = 1
                if i + 1 < n:
                    string[i + 1] = 1
                i += 2
                continue
            if c == 34:
                string[i] = 2
                inside = False
            else:
                string[i] = 1
        elif c == 34:
            string[i] = 2
            inside = True
        i += 1
    out = bytearray()
    pos = 0
    for s, e, lab in merged:
        s = max(s, pos)             # a token widened over the previous span
        if s >= e:
            continue
        zone = set(string[s:e])
        if zone == {1}:
            out += cell[pos:s]
            out += labels[lab]
            pos = e
        elif zone == {0}:
            while s > pos and cell[s - 1] not in _JSON_STOP and string[s - 1] == 0:
                s -= 1
            while e < n and cell[e] not in _JSON_STOP and string[e] == 0:
                e += 1
            out += cell[pos:s]
            out += b'"' + labels[lab] + b'"'
            pos = e
        else:
            return b'"' + labels[merged[0][2]] + b'"'
    out += cell[pos:]
    return bytes(out)
