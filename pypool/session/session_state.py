"""What a statement does to the session, for a client whose session spans many server connections.

In transaction mode a client's "session" is spread over whichever server
connections run its transactions, so pypool must notice the statements
whose effect outlives the transaction:

* ``SET``/``RESET``/``set_config()``/``SET SESSION ...`` change settings:
  the client session is marked so that, when its transaction ends, pypool
  reads back the server's session-level settings (PostgreSQL has already
  undone ``SET LOCAL`` and rolled-back ``SET``s) and replays them on every
  server connection the client uses next;
* ``DEALLOCATE name`` forgets the client's statement (the server-side copy
  is shared, so it stays); ``DEALLOCATE ALL``/``DISCARD ALL`` run on the
  server and empty both the client's names and the server's statements;
* ``LISTEN``/``UNLISTEN`` are served by the pool's listener connection;
* ``SET LOCAL synchronous_commit = off`` makes the transaction's commit
  asynchronous: causal reads must then wait for its insert position, not its
  flush position (``pypool.causal.requirement.parse_commit_row``);
* ``CREATE``/``ALTER``/``DROP`` move the database's schema generation on, so
  statements prepared afterwards parse again (pypool/session/schema.py);
* state that lives on the server connection itself -- SQL ``PREPARE``,
  session advisory locks, temporary objects that outlive the transaction,
  ``WITH HOLD`` cursors -- pins the client to that connection
  (pypool/session/pinning.py), or is refused with SQLSTATE 0A000 and a hint
  (``session_pinning = "refuse"``, or every pinnable connection taken);
  statements that may release it (DROP, DISCARD, CLOSE, DEALLOCATE, the
  advisory unlock functions) make pypool ask the server's catalogs.

A cheap byte-level test (``might_matter``) runs on every query text of the
relay; only texts it flags are lexed (``analyze``, cached).
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

from pypool import sqlstates
from pypool.routing.classify import lex_statements

# Statements that may matter start with one of these words (after comments) ...
_LEADING_WORDS = ("set", "reset", "discard", "prepare", "execute", "deallocate", "listen", "unlisten", "notify",
                  "declare", "create", "alter", "drop", "close")
_LEADING = re.compile(rb"\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*(?i:" + "|".join(_LEADING_WORDS).encode() + rb")\b", re.S)
# ... so a text can only match _LEADING if it starts with a space or a comment, or with the first three
# letters of one of the words in any case (one slice and one set lookup rule out SELECT, INSERT, ...).
_LEADING_HEADS = frozenset("".join(c.upper() if upper else c for c, upper in zip(word[:3], case)).encode()
                           for word in _LEADING_WORDS for case in itertools.product((False, True), repeat=3))
_SPACE_OR_COMMENT = frozenset(b" \t\n\r\f\v/-")
# ... or name one of these anywhere (one search: cheaper than a find each). TEMP: SELECT ... INTO TEMP.
_INSIDE = re.compile(rb"_config|advisory|pg_notify|TEMP|temp|Temp")
_ADVISORY_LOCK_FUNCTIONS = frozenset((
    "PG_ADVISORY_LOCK", "PG_ADVISORY_LOCK_SHARED", "PG_TRY_ADVISORY_LOCK", "PG_TRY_ADVISORY_LOCK_SHARED",
))
_ADVISORY_UNLOCK_FUNCTIONS = frozenset(("PG_ADVISORY_UNLOCK", "PG_ADVISORY_UNLOCK_SHARED", "PG_ADVISORY_UNLOCK_ALL"))
# Settings pypool re-reads after a client changed some (base units, as SET accepts them back).
SETTINGS_QUERY = "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'"
# Stands in for a DEALLOCATE of a client's statement name (the server's copy stays).
NOOP_STATEMENT = "DO $pypool$BEGIN END$pypool$"
LISTEN_NOOP_CHANNEL = "pypool.listen"
# What this backend keeps beyond its transactions, as the catalogs tell it (one row; see ``held_state``).
# Outside a transaction only WITH HOLD cursors and session-level advisory locks remain.
PINNED_STATE_QUERY = (
    "SELECT (SELECT count(*) FROM pg_catalog.pg_class"
    " WHERE relnamespace = pg_catalog.pg_my_temp_schema()),"
    " (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable),"
    " (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql),"
    " (SELECT count(*) FROM pg_catalog.pg_locks"
    " WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid())"
)
_HELD_KINDS = ("temporary relations", "cursors WITH HOLD", "SQL prepared statements", "session advisory locks")


def held_state(row: list) -> str:
    """The answer to PINNED_STATE_QUERY in words ("1 temporary relations, ..."); "" when nothing is held."""
    return ", ".join(f"{int(n)} {kind}" for n, kind in zip(row, _HELD_KINDS) if n is not None and int(n))
# synchronous_commit's spellings of off (it is an enum that also takes boolean words).
_SYNCHRONOUS_COMMIT_OFF = frozenset(("off", "false", "no", "0"))


def might_matter(data: bytes, start: int, end: int) -> bool:
    """Cheap pre-test on raw query text: False means ``analyze`` would find nothing (and the text
    names no NOTIFY or pg_notify, which effects.py looks for). Keywords are matched in upper, lower
    and capitalised spelling."""
    if start < end and (data[start] in _SPACE_OR_COMMENT or data[start:start + 3] in _LEADING_HEADS) \
            and _LEADING.match(data, start, end):
        return True
    semi = data.find(b";", start, end)
    if 0 <= semi < end - 3:  # more than one statement: look at each
        return True
    return _INSIDE.search(data, start, end) is not None


# ``might_matter`` by text: drivers send the same texts again and again (every Parse of a statement
# whose values travel in Bind). Emptied when full: texts that differ only in literals never repeat.
_KNOWN_TEXTS: dict[bytes, bool] = {}
_KNOWN_TEXTS_KEPT = 4096


def text_might_matter(data: bytes, start: int, end: int) -> bool:
    """``might_matter`` of ``data[start:end]``, remembered by text."""
    text = data[start:end]
    known = _KNOWN_TEXTS.get(text)
    if known is None:
        if len(_KNOWN_TEXTS) >= _KNOWN_TEXTS_KEPT:
            _KNOWN_TEXTS.clear()
        known = _KNOWN_TEXTS[text] = might_matter(data, start, end)
    return known


@dataclass(frozen=True, slots=True)
class Effects:
    settings: bool = False  # may change session-level settings
    forget_all: bool = False  # DISCARD ALL / DEALLOCATE ALL
    forget: tuple[str, ...] = ()  # DEALLOCATE name
    listen: tuple[tuple[str, str], ...] = ()  # ("LISTEN"|"UNLISTEN", channel, "*" = all)
    refusal: tuple[str, str] | None = None  # (message, hint)
    # State that outlives the transaction on its server connection: (what, message, hint);
    # the client is pinned to that connection, or refused with the message and hint.
    pins: tuple[str, str, str] | None = None
    may_release: bool = False  # may drop such state: the catalogs are asked after the transaction
    # Puts settings back to their defaults (RESET, SET ... TO DEFAULT, DISCARD ALL): PostgreSQL's
    # default is the client's startup value, a pooled server's is its own (see effects.py).
    resets: bool = False
    asynchronous_commit: bool = False  # SET LOCAL synchronous_commit = off: this transaction's commit
    schema: bool = False  # DDL: prepared statements may describe what is no longer there


NOTHING = Effects()


def _pins(what: str, hint: str) -> Effects:
    return Effects(pins=(what, f"{what} cannot be used through pypool in transaction mode: "
                               "the next transaction may run on another server connection", hint))


_RELEASES = Effects(may_release=True)
_DROPS = Effects(may_release=True, schema=True)  # may drop a temporary object; moves the schema on


def _identifier(tok: tuple) -> str:
    kind, text = tok[0], tok[1]
    if kind == "qid":
        return text[1:-1].replace('""', '"')
    return text.lower()


def _statement(toks: list) -> Effects:
    first = toks[0][1]
    second = toks[1][1] if len(toks) > 1 else ""
    words = [t[1] for t in toks if t[0] == "word"]
    for i, tok in enumerate(toks[:-1]):
        if tok[0] == "word" and toks[i + 1][1] == "(":
            if tok[1] in _ADVISORY_LOCK_FUNCTIONS:
                return _pins(f"session-level advisory lock function {tok[1].lower()}()",
                             "use the transaction-level pg_advisory_xact_lock() family inside a transaction, "
                             "or pool_mode = \"session\"")
            if tok[1] in _ADVISORY_UNLOCK_FUNCTIONS:
                return _RELEASES
    if first == "SET":
        if second == "LOCAL" and len(toks) > 4 and toks[2][1] == "SYNCHRONOUS_COMMIT" \
                and toks[-1][1].strip("'\"").lower() in _SYNCHRONOUS_COMMIT_OFF:
            return Effects(asynchronous_commit=True)
        if second in ("LOCAL", "TRANSACTION", "CONSTRAINTS"):
            return NOTHING  # ends with the transaction
        return Effects(settings=True, resets="DEFAULT" in words)
    if first == "RESET":
        return Effects(settings=True, resets=True)
    if first == "DISCARD":
        if second == "ALL":
            return Effects(settings=True, forget_all=True, may_release=True, resets=True)
        return _RELEASES if second in ("TEMP", "TEMPORARY") else NOTHING
    if first == "DEALLOCATE":
        rest = toks[2:] if second == "PREPARE" else toks[1:]
        if not rest:
            return NOTHING
        if rest[0][0] == "word" and rest[0][1] == "ALL":
            return Effects(forget_all=True, may_release=True)
        return Effects(forget=(_identifier(rest[0]),), may_release=True)
    if first == "DROP":
        return _DROPS
    if first == "CLOSE":
        return _RELEASES
    if first == "PREPARE" and second != "TRANSACTION":
        return _pins("SQL PREPARE", "use your driver's prepared statements (protocol-level Parse/Bind), "
                     "which pypool maps onto every server connection, or pool_mode = \"session\"")
    if first == "EXECUTE":
        # Runs where its PREPARE pinned the client; elsewhere the server says it does not exist.
        return _pins("SQL EXECUTE of a prepared statement",
                     "use your driver's prepared statements (protocol-level Parse/Bind), or pool_mode = \"session\"")
    if first in ("LISTEN", "UNLISTEN") and len(toks) == 2:
        channel = "*" if toks[1][1] == "*" else _identifier(toks[1])
        return Effects(listen=((first, channel),))
    if first == "DECLARE" and "HOLD" in words and "WITHOUT" not in words[:words.index("HOLD")]:
        return _pins("a cursor WITH HOLD", "declare the cursor WITHOUT HOLD and use it inside one transaction")
    if (first == "SELECT" or first == "WITH" or first == "(") and _into_temporary(toks):
        return _pins("a temporary table made by SELECT ... INTO",
                     "use CREATE TEMP TABLE ... ON COMMIT DROP AS ... inside a transaction, or pool_mode = \"session\"")
    temporary = first == "CREATE" and ("TEMP" in words[1:4] or "TEMPORARY" in words[1:4])
    if temporary:
        text = " ".join(words)
        if "ON COMMIT DROP" not in text:
            return _pins("a temporary object that outlives its transaction",
                         "create it inside a transaction with ON COMMIT DROP, or use pool_mode = \"session\"")
    elif first in ("CREATE", "ALTER"):
        return Effects(schema=True)
    if "SET_CONFIG" in words:
        return Effects(settings=True)
    return NOTHING


def _into_temporary(toks: list) -> bool:
    """A SELECT's ``INTO [LOCAL | GLOBAL] TEMP | TEMPORARY [TABLE] name`` (not INSERT INTO / MERGE INTO)."""
    for i, tok in enumerate(toks):
        if tok[0] == "word" and tok[1] == "INTO" and i and toks[i - 1][1] not in ("INSERT", "MERGE"):
            j = i + 1
            if j < len(toks) and toks[j][0] == "word" and toks[j][1] in ("LOCAL", "GLOBAL"):
                j += 1
            return j < len(toks) and toks[j][0] == "word" and toks[j][1] in ("TEMP", "TEMPORARY")
    return False


def analyze(sql: str) -> Effects:
    """What the statements in ``sql`` do to the session (cached for texts of everyday size)."""
    return _analyze_cached(sql) if len(sql) <= _CACHED_TEXT_LENGTH else _analyze(sql)


_CACHED_TEXT_LENGTH = 4096


@functools.lru_cache(maxsize=4096)
def _analyze_cached(sql: str) -> Effects:
    return _analyze(sql)


def _analyze(sql: str) -> Effects:
    statements = lex_statements(sql)
    found = [_statement(toks) for toks in statements]
    refusal = next((e.refusal for e in found if e.refusal), None)
    if refusal:
        return Effects(refusal=refusal)
    merged = Effects(
        settings=any(e.settings for e in found),
        forget_all=any(e.forget_all for e in found),
        forget=tuple(n for e in found for n in e.forget),
        listen=tuple(op for e in found for op in e.listen),
        pins=next((e.pins for e in found if e.pins), None),
        may_release=any(e.may_release for e in found),
        resets=any(e.resets for e in found),
        asynchronous_commit=any(e.asynchronous_commit for e in found),
        schema=any(e.schema for e in found),
    )
    # The pooler answers a LISTEN and a DEALLOCATE of a driver's statement by sending another
    # text instead; mixed with other statements it cannot. The rest run as sent (resets
    # like asyncpg's "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;").
    replaced = sum(1 for e in found if e.forget or any(op == "LISTEN" for op, _ in e.listen))
    if replaced and len(found) > 1:
        return Effects(refusal=("LISTEN and DEALLOCATE must be sent on their own through pypool in "
                                "transaction mode, not together with other statements",
                                "send them as separate statements"))
    return NOTHING if merged == NOTHING else merged


def pin_refusal(pins: tuple[str, str, str], full: str = "") -> tuple[str, str]:
    """The 0A000 (message, hint) for state that may not pin; ``full`` says why it may not."""
    _, message, hint = pins
    return message, f"{hint}; {full}" if full else hint


def refusal_sql(message: str, hint: str) -> str:
    """A statement that makes the server itself raise the pooler's error, in order with its other replies."""
    def literal(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"
    return (f"DO $pypool$BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstates.FEATURE_NOT_SUPPORTED}', "
            f"MESSAGE = {literal(message)}, HINT = {literal(hint)}; END$pypool$")


def listen_stand_in(ops: tuple[tuple[str, str], ...]) -> str:
    """Statements with the same replies as the client's LISTEN/UNLISTEN, harmless on a pooled server."""
    return "; ".join(f'{op} "{LISTEN_NOOP_CHANNEL}"' for op, _ in ops)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def startup_options(options: str) -> dict[str, str]:
    """Settings in a startup packet's ``options`` (``-c name=value`` / ``--name=value``, ``\\`` escapes).

    PostgreSQL applies these at connection start; pypool applies them with the
    client's other settings on every server connection it uses. Other
    command-line switches are ignored.
    """
    words: list[str] = []
    current: list[str] = []
    chars = iter(options)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    settings: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        pair = None
        if word == "-c" and i + 1 < len(words):
            pair = words[i + 1]
            i += 1
        elif word.startswith("-c"):
            pair = word[2:]
        elif word.startswith("--"):
            pair = word[2:]
        if pair and "=" in pair:
            name, value = pair.split("=", 1)
            settings[name.strip().lower().replace("-", "_")] = value
        i += 1
    return settings


def sync_statement(desired: dict[str, str], applied: dict[str, str]) -> str | None:
    """SQL making a server session's settings ``desired`` when pypool last left them ``applied``.

    ``set_config`` takes values as the configuration file does, so list
    settings (``search_path``) and unit-less numbers read back from
    pg_settings round-trip unchanged.
    """
    sets = [f"set_config({quote_literal(k)}, {quote_literal(v)}, false)"
            for k, v in desired.items() if applied.get(k) != v]
    resets = [f"RESET {quote_ident(k)}" for k in applied if k not in desired]
    parts = []
    if sets:
        parts.append("SELECT " + ", ".join(sets))
    parts.extend(resets)
    return "; ".join(parts) if parts else None
