"""Literal-normalising fingerprint -> Classification, an LRU in front of
``classify()`` so that sqlglot only runs on the first query of each shape.

``fingerprint()`` replaces numbers, ``'...'`` strings (also ``E'...'`` with
backslash escapes, ``B''``/``X''``/``N''``/``U&''`` bodies) and dollar-quoted
bodies with ``?``, drops comments and collapses whitespace.  Quoted
identifiers, ``$n`` parameters, identifiers with digits, keywords and
function names are kept byte for byte.  The lexical rules follow
PostgreSQL's scanner (standard_conforming_strings = on), so texts that share a
fingerprint differ only in literal values and layout and therefore classify
alike: no literal can turn a read into a write.  (EXPLAIN (ANALYZE 0) vs
(ANALYZE 1) is the one place a literal could matter; ``classify`` treats any
ANALYZE option as analyze for that reason.)

Lookup order in ``ClassificationCache.classify``:

1. the raw text itself (one dict lookup, no fingerprinting).  This hits for
   texts that are already canonical (single-line, no literals: extended
   protocol with ``$n`` parameters, pgbench -M prepared) and for the exact
   text that caused the miss of its shape (a multi-line ORM statement with
   parameters is fingerprinted once, then found by its own spelling);
2. the fingerprint;
3. on a miss, ``classify()`` on the original text, stored under the
   fingerprint and under the raw text.

Measured (see the module's commit notes): a raw-text miss costs one dict
lookup (~0.1 us) before fingerprinting, against several us saved for every
repeated text, so the raw lookup stays.

A raw text can only equal a stored fingerprint when it contains no ``?``
(see below) and then it has no literals, so it is its own fingerprint:
step 1 never returns another shape's classification.  Texts that contain a
``?`` of their own (jsonb ``?``/``?|``/``?&`` operators) are keyed by their
exact text, prefixed with a space that no fingerprint starts with, so a real
``?`` can never collide with a literal placeholder.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from pypool.routing.classify import (
    DEFAULT_READ_ONLY_FUNCTIONS,
    TOKEN_RE,
    Classification,
    block_comment_span,
    classify,
    unterminated,
)

__all__ = ["fingerprint", "fingerprint_literals", "number_shape", "ClassificationCache", "TOO_LONG"]

TOO_LONG = Classification(True, True, None, False, False, "too long")

# Character classes of PostgreSQL's scanner (scan.l).
_IDENT_CONT = r"A-Za-z0-9_$\x80-\U0010ffff"
# Whitespace as str.split() sees it in ASCII text: the server's (space, \t \n
# \r \f \v) plus \x1c-\x1f, which the server rejects outside literals anyway;
# both paths agree on it so fingerprint() is idempotent.
_WS = r"[ \t\n\r\f\v\x1c-\x1f]"
_WS_CHARS = " \t\n\r\f\v\x1c\x1d\x1e\x1f"
_EXP = r"(?:[eE][+-]?[0-9]+)?"
_TAG = r"(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?"
_BLOCK_REST = r"[^*]*(?:\*+[^*/][^*]*)*(?:\*+(?:/|\Z)|\Z)"  # after "/*", to "*/" or the end
_COMMENT = rf"(?:--[^\n\r]*|/\*{_BLOCK_REST})"

# Fast path (ASCII, no quote, no dollar, no comment): numbers are the only
# literals.  The pattern starts with a character class so the engine skips
# other characters in C; the look-behind keeps digits that continue an
# identifier (t1, col2) and parameters ($1).
_NUM_FAST_RE = re.compile(
    r"[0-9.]"
    rf"(?:(?<=\.)[0-9][0-9_]*{_EXP}"
    rf"|(?<![{_IDENT_CONT}][0-9])"
    r"(?:(?<=0)[xXoObB][0-9a-fA-F_]+"
    rf"|(?<=[0-9])[0-9_]*(?:\.[0-9_]*)?{_EXP}))"
)

# General path: one regex pass, one callback per literal / comment /
# whitespace run.  Every match is "code to keep, then one thing to replace
# (or the end)", so consecutive matches tile the text and each starts at a
# token boundary, like the server's scanner: nothing inside a quoted
# identifier, string or comment is ever mistaken for something else.
_KEEP = rf"""(?>
     [^ \t\n\r\f\v\x1c-\x1f"'$0-9.\-/eE]++  # words and operators, but not e/E
    |"[^"]*+(?:""[^"]*+)*+"?               # quoted identifier, kept verbatim
    |\ (?!{_WS})                           # a single space
    |(?<=[{_IDENT_CONT}])[0-9$]++          # digits/$ continuing an identifier
    |[eE](?!')|(?<=[{_IDENT_CONT}])[eE]    # e that does not open E'...'
    |\$[0-9]++                             # $1 parameter
    |\$(?!{_TAG}\$)                        # a $ that opens no dollar quote
    |\.(?![0-9])|-(?!-)|/(?!\*)            # . - / that start no literal/comment
)"""
_GENERAL_RE = re.compile(
    rf"""
    (?P<keep>{_KEEP}*+)
    (?:
       (?P<lit>
           [eE]'[^'\\]*+(?:(?:\\[\s\S]|'')[^'\\]*+)*+'?
          |'[^']*+(?:''[^']*+)*+'?
          |\$(?P<tag>{_TAG})\$[\s\S]*?(?:\$(?P=tag)\$|\Z)
          |0[xXoObB][0-9a-fA-F_]++
          |(?:[0-9][0-9_]*+(?:\.[0-9_]*+)?|\.[0-9][0-9_]*+){_EXP}
       )
      |(?P<cmt>{_COMMENT}(?:{_WS}*+{_COMMENT})*+{_WS}*+)
      |(?P<ws>[\t\n\r\f\v\x1c-\x1f]{_WS}*+|\ {_WS}++)
      |\Z
    )
    """,
    re.X,
)


class _NeedsScanner(Exception):
    """The regex cannot fingerprint this text exactly: use ``_fingerprint_exact``."""

    # Not a PoolerError: control flow inside this module, it never leaves it.


def _general_repl(m: re.Match) -> str:
    kind = m.lastgroup
    if kind == "lit":
        lit = m.group("lit")
        if m.end("lit") == len(m.string) and lit[0] in "'eE$" and \
                unterminated("dollar" if lit[0] == "$" else "str", lit):
            # An unclosed quote must not share the fingerprint of a closed one:
            # the server refuses it, so it is a parse failure, not a read.
            raise _NeedsScanner
        return m.group(1) + "?"
    if kind == "ws":
        return m.group(1) + " "
    if kind == "cmt":
        body = m.group("cmt")
        # PostgreSQL nests /* */ comments, a regex cannot: if a "/*" opens
        # inside a block comment (also "/*/**/"), or one never closes, use
        # the exact scanner.
        i = body.find("/*")
        while i >= 0:
            close = body.find("*/", i + 2)
            if close < 0 or body.find("/*", i + 1, close + 1) >= 0:
                raise _NeedsScanner
            i = body.find("/*", close + 2)
        start = m.start("cmt")
        if start and m.string[start - 1] in _WS_CHARS:
            return m.group(1)  # the whitespace before already gives one space
        return m.group(1) + " "
    return m.group(1)


def _fingerprint_exact(sql: str) -> str:
    """Scanner-driven fingerprint (nested or unclosed comments and quotes):
    same output rules; an unclosed tail is kept verbatim."""
    out: list[str] = []
    pos = 0
    n = len(sql)
    match = TOKEN_RE.match
    space = False
    while pos < n:
        m = match(sql, pos)
        kind = m.lastgroup
        end = m.end()
        if kind == "bc":
            end, closed = block_comment_span(sql, pos)
            if not closed:
                kind = "tail"
        elif kind == "dollar":
            close = sql.find(m.group(), end)
            if close < 0:
                kind = "tail"
            end = n if close < 0 else close + len(m.group())
        elif kind == "str" and end == n and unterminated(kind, m.group()):
            kind = "tail"
        if kind in ("ws", "lc", "bc") or (kind == "other" and m.group() in _WS_CHARS):
            space = True
            pos = end
            continue
        if kind == "tail":
            text = sql[pos:]
            end = n
        elif kind == "dollar":
            text = "?"
        elif kind == "str":
            # E'..' is one literal; a B/X/N/U& prefix stays, as in the regex path
            t = m.group()
            text = "?" if t[0] in "eE" else t[: t.find("'")] + "?"
        elif kind == "num":
            text = "?"
        else:
            text = m.group()
        if space and out:
            out.append(" ")
        space = False
        out.append(text)
        pos = end
    return "".join(out).strip(_WS_CHARS)


def _numbers_only(sql: str) -> bool:
    """ASCII without quotes, dollars or comments: numbers are the only literals."""
    return (
        sql.isascii()
        and "'" not in sql
        and '"' not in sql
        and "$" not in sql
        and "--" not in sql
        and "/*" not in sql
    )


def number_shape(sql: str) -> str | None:
    """``fingerprint(sql)`` of a text whose only literals are numbers (no quotes, dollars, comments
    or ``?`` of its own), else None. Texts of one shape differ only in numbers and layout: the
    router decides them alike without looking at them again (no hint comment can hide in one)."""
    if "?" in sql or not _numbers_only(sql):
        return None
    return " ".join(_NUM_FAST_RE.sub("?", sql).split())


def fingerprint(sql: str) -> str:
    """Literal-normalised form of ``sql`` (see the module docstring)."""
    if _numbers_only(sql):
        return " ".join(_NUM_FAST_RE.sub("?", sql).split())
    try:
        s = _GENERAL_RE.sub(_general_repl, sql)
    except _NeedsScanner:
        return _fingerprint_exact(sql)
    return s.strip(_WS_CHARS)


def fingerprint_literals(sql: str) -> tuple[str, list[str]] | None:
    """``fingerprint(sql)`` and the literals its ``?`` marks replace, in order.

    None when ``sql`` has a ``?`` of its own (an operator, not a literal) or
    needs the exact scanner (nested or unclosed comments and quotes).
    """
    if "?" in sql:
        return None
    if _numbers_only(sql):
        return " ".join(_NUM_FAST_RE.sub("?", sql).split()), _NUM_FAST_RE.findall(sql)
    literals: list[str] = []

    def collect(m: re.Match) -> str:
        if m.lastgroup == "lit":
            literals.append(m.group("lit"))
        return _general_repl(m)

    try:
        s = _GENERAL_RE.sub(collect, sql)
    except _NeedsScanner:
        return None
    return s.strip(_WS_CHARS), literals


class ClassificationCache:
    """LRU of classifications keyed by fingerprint.

    ``hits`` and ``misses`` are plain ints for the metrics collector; a text
    over ``max_length`` is answered "write" without a lookup and counts as
    neither.
    """

    __slots__ = ("maxsize", "read_only_functions", "max_length", "hits", "misses", "_data")

    def __init__(
        self,
        maxsize: int = 10_000,
        read_only_functions: frozenset[str] = DEFAULT_READ_ONLY_FUNCTIONS,
        max_length: int | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.read_only_functions = read_only_functions
        self.max_length = max_length
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[str, Classification] = OrderedDict()

    def classify(self, sql: str) -> Classification:
        max_length = self.max_length
        if max_length is not None and len(sql) > max_length:
            return TOO_LONG
        data = self._data
        if "?" not in sql:
            c = data.get(sql)
            if c is not None:
                self.hits += 1
                data.move_to_end(sql)
                return c
            key = fingerprint(sql)
        else:
            key = " " + sql
        c = data.get(key)
        if c is not None:
            self.hits += 1
            data.move_to_end(key)
            return c
        self.misses += 1
        c = classify(sql, self.read_only_functions)
        data[key] = c
        if key != sql and key[:1] != " ":
            # Also remember the exact spelling (only at a miss, so one-off
            # literal variants cannot churn the LRU): a multi-line ORM statement
            # with $n parameters then skips fingerprint() from its second run.
            data[sql] = c
        while len(data) > self.maxsize:
            data.popitem(last=False)
        return c

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()
