"""SQL text -> read / write / transaction control / session-affecting.

The rule is one-sided: a statement is a READ only when it is provably
read-only; everything else, including whatever we fail to understand, is a
WRITE and goes to the primary.

How a text is examined:

1. A small PostgreSQL-faithful lexer (``lex_statements``) splits the text into
   statements on top-level ``;`` (strings, ``E''`` strings, dollar quotes,
   quoted identifiers and nested ``/* */`` comments are honoured; SQL-standard
   ``BEGIN ATOMIC ... END`` function bodies are kept whole).
2. Each statement is dispatched on its leading keyword(s).  Transaction
   control, SET/RESET/DISCARD, SHOW, LISTEN/NOTIFY, COPY, EXPLAIN, PREPARE,
   cursors and every DML/DDL/utility command are decided from keywords alone:
   sqlglot turns many of them into a generic ``Command`` or mis-parses them
   (``LISTEN x`` becomes an alias expression), and no keyword-led write can be
   a read anyway.
3. Only statements that may be reads (``SELECT``, ``WITH``, ``VALUES``,
   ``TABLE``, a parenthesised query, and the query inside EXPLAIN ANALYZE /
   COPY (...) TO / PREPARE ... AS / DECLARE ... FOR) are parsed with sqlglot
   (dialect postgres) and the whole tree is walked: any data-modifying node
   (also a DML CTE nested inside a subquery), ``FOR UPDATE/NO KEY
   UPDATE/SHARE/KEY SHARE``, ``SELECT ... INTO``, or a call of a function that
   is not on the read-only allow-list makes it a write.

Function names are checked as PostgreSQL resolves them: unquoted names fold to
lower case, quoted names are exact, ``pg_catalog.f`` is ``f`` and any other
qualified call ``s.f`` must be allow-listed as ``"s.f"``.  sqlglot normalises
known functions into typed nodes (``now()`` -> ``CurrentTimestamp``); a
private dialect subclass makes the parser record the name as written, so the
allow-list is always matched against the user's spelling, never against
sqlglot's idea of what the function is.  Typed nodes that come from syntax
rather than a named call (``CASE``, ``::``, ``->``, ``EXTRACT(... FROM ...)``)
are accepted only from an explicit list of classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

__all__ = [
    "Classification",
    "READ",
    "EMPTY",
    "DEFAULT_READ_ONLY_FUNCTIONS",
    "classify",
    "role_hint",
    "read_only_functions",
]


@dataclass(frozen=True, slots=True)
class Classification:
    writes: bool  # True if any statement is not provably read-only
    has_statement: bool  # at least one statement that is not transaction control
    # None, "default", "read only", "read write" or "serializable" (the last BEGIN in the text)
    begin: str | None
    ends_transaction: bool  # COMMIT/END/ROLLBACK/ABORT (not ROLLBACK TO SAVEPOINT)
    sets_session: bool  # SET/RESET (not SET LOCAL / SET TRANSACTION), DISCARD
    reason: str  # short why, for logs


READ = Classification(False, True, None, False, False, "select")
EMPTY = Classification(False, False, None, False, False, "empty")
PARSE_ERROR = Classification(True, True, None, False, False, "parse error")


# --------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------

# Built-ins that neither write nor depend on/affect session state, and that
# run on a hot standby.  Names as PostgreSQL folds them (lower case).
DEFAULT_READ_ONLY_FUNCTIONS: frozenset[str] = frozenset(
    """
    count sum avg min max every bool_and bool_or bit_and bit_or bit_xor
    array_agg string_agg json_agg jsonb_agg json_object_agg jsonb_object_agg
    json_agg_strict jsonb_agg_strict json_object_agg_strict jsonb_object_agg_strict
    json_arrayagg json_objectagg xmlagg range_agg range_intersect_agg
    stddev stddev_pop stddev_samp variance var_pop var_samp corr covar_pop
    covar_samp regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope
    regr_sxx regr_sxy regr_syy mode percentile_cont percentile_disc
    rank dense_rank percent_rank cume_dist grouping
    row_number ntile lag lead first_value last_value nth_value
    coalesce nullif greatest least num_nulls num_nonnulls
    abs ceil ceiling floor round trunc sign sqrt cbrt exp ln log log10 power pow
    mod div pi degrees radians sin cos tan asin acos atan atan2 sind cosd tand
    asind acosd atand atan2d cot cotd sinh cosh tanh asinh acosh atanh
    width_bucket gcd lcm factorial scale min_scale trim_scale random
    setseed_is_not_here
    length char_length character_length octet_length bit_length lower upper
    initcap substr substring concat concat_ws left right lpad rpad ltrim rtrim
    btrim trim replace translate repeat reverse split_part strpos position
    overlay starts_with format quote_ident quote_literal quote_nullable
    md5 sha224 sha256 sha384 sha512 encode decode to_hex ascii chr unistr
    normalize convert convert_from convert_to regexp_match regexp_matches
    regexp_replace regexp_split_to_array regexp_split_to_table regexp_like
    regexp_count regexp_substr regexp_instr string_to_array string_to_table
    array_to_string to_ascii parse_ident get_bit get_byte
    now current_timestamp current_date current_time localtime localtimestamp
    clock_timestamp statement_timestamp transaction_timestamp timeofday
    date_trunc date_part date_bin extract age make_date make_time make_timestamp
    make_timestamptz make_interval to_char to_date to_timestamp to_number
    justify_days justify_hours justify_interval isfinite timezone
    array_length array_lower array_upper array_dims array_ndims cardinality
    array_position array_positions array_append array_prepend array_cat
    array_remove array_replace array_fill trim_array array_sample array_shuffle
    unnest generate_series generate_subscripts
    to_json to_jsonb row_to_json array_to_json json_build_object
    jsonb_build_object json_build_array jsonb_build_array json_object
    jsonb_object json_array_length jsonb_array_length json_each jsonb_each
    json_each_text jsonb_each_text json_extract_path jsonb_extract_path
    json_extract_path_text jsonb_extract_path_text json_object_keys
    jsonb_object_keys json_array_elements jsonb_array_elements
    json_array_elements_text jsonb_array_elements_text json_typeof jsonb_typeof
    json_strip_nulls jsonb_strip_nulls jsonb_set jsonb_set_lax jsonb_insert
    jsonb_pretty jsonb_path_query jsonb_path_query_array jsonb_path_query_first
    jsonb_path_exists jsonb_path_match json_populate_record
    jsonb_populate_record json_populate_recordset jsonb_populate_recordset
    json_to_record jsonb_to_record json_to_recordset jsonb_to_recordset
    jsonb_exists jsonb_exists_any jsonb_exists_all jsonb_contains
    json_scalar json_serialize json_array
    version current_user session_user user current_role current_database
    current_catalog current_schema current_schemas current_setting
    inet_server_port inet_server_addr inet_client_addr inet_client_port
    pg_backend_pid pg_postmaster_start_time pg_conf_load_time
    pg_is_in_recovery pg_last_wal_replay_lsn pg_last_wal_receive_lsn
    pg_last_xact_replay_timestamp pg_is_wal_replay_paused
    pg_get_wal_replay_pause_state pg_wal_lsn_diff
    txid_current_snapshot pg_current_snapshot pg_snapshot_xmin pg_snapshot_xmax
    txid_snapshot_xmin txid_snapshot_xmax
    has_table_privilege has_schema_privilege has_database_privilege
    has_column_privilege has_any_column_privilege has_function_privilege
    has_sequence_privilege has_type_privilege pg_has_role
    pg_typeof format_type pg_get_viewdef pg_get_indexdef pg_get_constraintdef
    pg_get_expr pg_get_userbyid pg_get_functiondef pg_get_function_arguments
    pg_get_function_result pg_get_function_identity_arguments
    pg_get_serial_sequence pg_get_triggerdef pg_get_ruledef pg_get_keywords
    pg_table_is_visible pg_type_is_visible pg_function_is_visible
    pg_relation_size pg_total_relation_size pg_table_size pg_indexes_size
    pg_database_size pg_tablespace_size pg_size_pretty pg_size_bytes
    pg_column_size pg_relation_filenode pg_relation_filepath
    pg_encoding_to_char pg_char_to_encoding pg_client_encoding
    obj_description col_description shobj_description
    to_regclass to_regtype to_regproc to_regprocedure to_regnamespace
    to_regrole to_regoper to_regoperator to_regcollation
    gen_random_uuid uuid_generate_v4
    to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery
    ts_rank ts_rank_cd ts_headline setweight strip tsvector_to_array
    array_to_tsvector numnode querytree get_current_ts_config
    similarity word_similarity levenshtein soundex difference metaphone
    host hostmask masklen netmask network broadcast family inet_merge
    st_distance st_dwithin st_intersects st_contains st_within st_x st_y
    st_astext st_asgeojson st_geomfromtext st_makepoint st_setsrid st_transform
    text int2 int4 int8 float4 float8 numeric bool date time timestamp
    timestamptz interval varchar bpchar
    """.split()
) - {"setseed_is_not_here"}


def read_only_functions(extra: Iterable[str] = ()) -> frozenset[str]:
    """The default allow-list plus configured names (folded to lower case;
    use ``"schema.func"`` to allow a schema-qualified call)."""
    return DEFAULT_READ_ONLY_FUNCTIONS | frozenset(n.strip().lower() for n in extra if n.strip())


def _query_problem(text: str, allowed: frozenset[str]) -> str | None:
    """Parse a would-be read with sqlglot (pypool.routing.query_tree); None if provably read-only."""
    from pypool.routing.query_tree import query_problem  # sqlglot loads on the first read to parse

    return query_problem(text, allowed)


# --------------------------------------------------------------------------
# Lexer (PostgreSQL rules) and statement splitting
# --------------------------------------------------------------------------

_IDENT_START = r"A-Za-z_\x80-\U0010ffff"
_IDENT_CONT = r"A-Za-z0-9_$\x80-\U0010ffff"

TOKEN_RE = re.compile(
    rf"""
     (?P<ws>[ \t\n\r\f\v]+)
    |(?P<lc>--[^\n\r]*)
    |(?P<bc>/\*)
    |(?P<str>[eE]'(?:[^'\\]|\\[\s\S]|'')*'?|(?:[bBxXnN]|[uU]&)?'(?:[^']|'')*'?)
    |(?P<qid>(?:[uU]&)?"(?:[^"]|"")*"?)
    |(?P<dollar>\$(?P<tag>(?:[{_IDENT_START}][A-Za-z0-9_\x80-\U0010ffff]*)?)\$)
    |(?P<param>\$[0-9]+)
    |(?P<num>0[xXoObB][0-9a-fA-F_]+|(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9]+)?)
    |(?P<word>[{_IDENT_START}][{_IDENT_CONT}]*)
    |(?P<op>(?:[+*<>=~!@\#%^&|`?]|-(?!-)|/(?!\*))+)
    |(?P<punct>::|[(),;\[\].:])
    |(?P<other>[\s\S])
    """,
    re.X,
)


def block_comment_span(sql: str, start: int) -> tuple[int, bool]:
    """End offset of the (nested) block comment opening at ``start``, and
    whether it is closed (an unclosed one runs to the end of the text)."""
    depth = 0
    i = start
    n = len(sql)
    while i < n:
        o = sql.find("/*", i)
        c = sql.find("*/", i)
        if c < 0:
            return n, False
        if 0 <= o < c:
            depth += 1
            i = o + 2
        else:
            depth -= 1
            i = c + 2
            if depth == 0:
                return i, True
    return n, False


def _block_comment_end(sql: str, start: int) -> int:
    return block_comment_span(sql, start)[0]


# A string or quoted identifier token is complete only if it matches these
# (``TOKEN_RE`` also accepts one that runs to the end of the text unclosed).
_CLOSED_QUOTE_RE = re.compile(
    r"[eE]'(?:[^'\\]|\\[\s\S]|'')*'"
    r"|(?:[bBxXnN]|[uU]&)?'(?:[^']|'')*'"
    r'|(?:[uU]&)?"(?:[^"]|"")*"'
)


def unterminated(kind: str, token: str) -> bool:
    """True for a string, quoted identifier or dollar quote that never closes."""
    if kind == "dollar":
        tag = token[: token.index("$", 1) + 1]
        return len(token) < 2 * len(tag) or not token.endswith(tag)
    return _CLOSED_QUOTE_RE.fullmatch(token) is None


class Unterminated(Exception):
    """The text ends inside a literal, quoted identifier or comment: the server will refuse it."""

    # Not a PoolerError: the classifier catches it and the client sees the server's own syntax error.


# A token is (kind, TEXT, start, end); TEXT is upper-cased for words.
Token = tuple[str, str, int, int]


def lex_statements(sql: str) -> list[list[Token]]:
    """Split into statements of significant tokens (no whitespace/comments)."""
    statements: list[list[Token]] = []
    cur: list[Token] = []
    pos = 0
    n = len(sql)
    match = TOKEN_RE.match
    atomic = False  # inside CREATE ... BEGIN ATOMIC ... END
    while pos < n:
        m = match(sql, pos)
        kind = m.lastgroup
        end = m.end()
        if kind == "ws" or kind == "lc":
            pos = end
            continue
        if kind == "bc":
            pos, closed = block_comment_span(sql, pos)
            if not closed:
                raise Unterminated("comment")
            continue
        if kind == "dollar":
            close = sql.find(m.group(), end)
            if close < 0:
                raise Unterminated("dollar quote")
            end = close + len(m.group())
            kind = "str"
        elif (kind == "str" or kind == "qid") and end == n and unterminated(kind, m.group()):
            raise Unterminated("quoted text")
        if kind == "punct" and m.group() == ";":
            if atomic:
                cur.append(("punct", ";", pos, end))
            elif cur:
                statements.append(cur)
                cur = []
            pos = end
            continue
        text = m.group() if kind != "str" else sql[pos:end]
        if kind == "word":
            text = text.upper()
            if text == "ATOMIC" and cur and cur[-1][1] == "BEGIN" and cur[0][1] == "CREATE":
                atomic = True
            elif atomic and text == "END" and cur and cur[-1][1] == ";":
                atomic = False
        cur.append((kind, text, pos, end))
        pos = end
    if cur:
        statements.append(cur)
    return statements


# --------------------------------------------------------------------------
# Statement dispatch
# --------------------------------------------------------------------------

# Leading keywords of statements that are never read-only.  Anything not
# listed here and not handled below is a write too ("unknown statement").
_WRITE_KEYWORDS = frozenset(
    """
    INSERT UPDATE DELETE MERGE TRUNCATE CREATE ALTER DROP GRANT REVOKE COMMENT
    SECURITY REASSIGN IMPORT VACUUM ANALYZE ANALYSE CLUSTER REINDEX CHECKPOINT
    LOCK DO CALL LISTEN NOTIFY UNLISTEN REFRESH LOAD EXECUTE DEALLOCATE
    """.split()
)
_QUERY_STARTS = frozenset(("SELECT", "WITH", "VALUES", "TABLE", "("))

# (writes, has_statement, begin, ends_transaction, sets_session, reason)
_R = tuple[bool, bool, "str | None", bool, bool, str]


def _begin_mode(toks: list[Token], i: int) -> str:
    mode = "default"
    n = len(toks)
    while i < n:
        word = toks[i][1]
        if word == "READ" and i + 1 < n:
            nxt = toks[i + 1][1]
            if nxt == "ONLY" and mode == "default":
                mode = "read only"
            elif nxt == "WRITE" and mode != "serializable":
                mode = "read write"
        elif word == "SERIALIZABLE" and i and toks[i - 1][1] == "LEVEL":
            # A hot standby refuses serializable transactions, READ ONLY or not.
            mode = "serializable"
        i += 1
    return mode


def _word(toks: list[Token], i: int) -> str:
    if i < len(toks) and toks[i][0] == "word":
        return toks[i][1]
    return ""


def _matching_paren(toks: list[Token], i: int) -> int:
    """Index of the ``)`` closing the ``(`` at ``i``; len(toks) if none."""
    depth = 0
    for j in range(i, len(toks)):
        t = toks[j][1]
        if t == "(" or t == "[":
            depth += 1
        elif t == ")" or t == "]":
            depth -= 1
            if depth == 0:
                return j
    return len(toks)


def _find_top(toks: list[Token], i: int, words: tuple[str, ...]) -> int:
    """Index of the first top-level (paren depth 0) word in ``words``."""
    depth = 0
    for j in range(i, len(toks)):
        kind, t = toks[j][0], toks[j][1]
        if t == "(" or t == "[":
            depth += 1
        elif t == ")" or t == "]":
            depth -= 1
        elif depth == 0 and kind == "word" and t in words:
            return j
    return -1


def _inner_query(sql: str, toks: list[Token], i: int, end: int, allowed: frozenset[str]) -> str | None:
    """Problem with the query starting at token ``i`` (up to offset ``end``)."""
    if i >= len(toks):
        return "parse error"
    first = toks[i][1]
    if first not in _QUERY_STARTS:
        return first.lower() if first in _WRITE_KEYWORDS else "unknown statement"
    return _query_problem(sql[toks[i][2] : end], allowed)


def _statement(sql: str, toks: list[Token], allowed: frozenset[str]) -> _R:
    first = toks[0][1]

    if first in _QUERY_STARTS:
        problem = _query_problem(sql[toks[0][2] : toks[-1][3]], allowed)
        if problem is None:
            return (False, True, None, False, False, "select")
        return (True, True, None, False, False, problem)

    if toks[0][0] != "word":
        return (True, True, None, False, False, "parse error")

    if first in _WRITE_KEYWORDS:
        return (True, True, None, False, False, first.lower())

    if first in ("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"):
        return _transaction_control(first, toks)

    # --- session state -----------------------------------------------------
    if first == "SET":
        nxt = _word(toks, 1)
        if nxt in ("LOCAL", "TRANSACTION", "CONSTRAINTS"):
            return (False, False, None, False, False, "set " + nxt.lower())
        return (True, True, None, False, True, "set")
    if first in ("RESET", "DISCARD"):
        return (True, True, None, False, True, first.lower())

    # --- reads decided by keywords -----------------------------------------
    if first == "SHOW":
        return (False, True, None, False, False, "show")
    if first in ("FETCH", "MOVE", "CLOSE"):
        # Routing only sees statements that open a transaction, and the only
        # cursor alive outside one is a WITH HOLD cursor, which was declared
        # on the primary (see DECLARE below): go where it lives.
        return (True, True, None, False, False, _CURSOR_OUTSIDE)

    # --- statements wrapping another statement -----------------------------
    wrapping = _WRAPPING.get(first)
    if wrapping is not None:
        return wrapping(sql, toks, allowed)
    return (True, True, None, False, False, "unknown statement")


def _transaction_control(first: str, toks: list[Token]) -> _R:
    """BEGIN, COMMIT, ROLLBACK and friends: neutral, they do not choose a role."""
    if first == "BEGIN":
        i = 2 if _word(toks, 1) in ("WORK", "TRANSACTION") else 1
        return (False, False, _begin_mode(toks, i), False, False, "begin")
    if first == "START":
        if _word(toks, 1) == "TRANSACTION":
            return (False, False, _begin_mode(toks, 2), False, False, "begin")
        return (True, True, None, False, False, "unknown statement")
    if first in ("SAVEPOINT", "RELEASE"):
        return (False, False, None, False, False, first.lower())
    i = 2 if _word(toks, 1) in ("WORK", "TRANSACTION") else 1
    nxt = _word(toks, i)
    if nxt == "PREPARED" and first in ("COMMIT", "ROLLBACK"):
        # two-phase commit of another, prepared transaction
        return (True, True, None, False, False, first.lower() + " prepared")
    if nxt == "TO" and first == "ROLLBACK":
        return (False, False, None, False, False, "rollback to savepoint")
    why = "commit" if first in ("COMMIT", "END") else "rollback"
    if nxt == "AND" and _word(toks, i + 1) == "CHAIN":
        # a new transaction starts at once on the same server connection
        return (False, False, None, False, False, why + " and chain")
    return (False, False, None, True, False, why)


def _explain(sql: str, toks: list[Token], allowed: frozenset[str]) -> _R:
    i = 1
    analyze = False
    if i < len(toks) and toks[i][1] == "(":
        close = _matching_paren(toks, i)
        analyze = any(t[1] in ("ANALYZE", "ANALYSE") for t in toks[i:close])
        i = close + 1
    else:
        while _word(toks, i) in ("ANALYZE", "ANALYSE", "VERBOSE"):
            analyze = analyze or _word(toks, i) != "VERBOSE"
            i += 1
    if not analyze:
        return (False, True, None, False, False, "explain")
    if i < len(toks):
        inner = _statement(sql, toks[i:], allowed)
        if not inner[0] and inner[1]:
            return (False, True, None, False, False, "explain analyze")
        return (True, True, None, False, False, "explain analyze " + inner[5])
    return (True, True, None, False, False, "parse error")


def _copy(sql: str, toks: list[Token], allowed: frozenset[str]) -> _R:
    i = 1
    if i < len(toks) and toks[i][1] == "(":
        close = _matching_paren(toks, i)
        if close >= len(toks):
            return (True, True, None, False, False, "parse error")
        inner_end = toks[close][2]
        problem = _inner_query(sql, toks, i + 1, inner_end, allowed)
        if problem is not None:
            return (True, True, None, False, False, "copy " + problem)
        j = close + 1
        direction = _word(toks, j)
    else:
        j = _find_top(toks, i, ("FROM", "TO"))
        direction = toks[j][1] if j >= 0 else ""
    if direction == "TO" and _word(toks, j + 1) == "STDOUT":
        return (False, True, None, False, False, "copy to stdout")
    if direction == "FROM":
        return (True, True, None, False, False, "copy from")
    return (True, True, None, False, False, "copy to file")


def _prepare(sql: str, toks: list[Token], allowed: frozenset[str]) -> _R:
    if _word(toks, 1) == "TRANSACTION":
        return (True, True, None, True, False, "prepare transaction")
    return _query_after(sql, toks, 2, "AS", allowed, "prepare", "prepare ")


def _declare(sql: str, toks: list[Token], allowed: frozenset[str]) -> _R:
    c = _find_top(toks, 1, ("CURSOR",))
    if c < 0:
        return (True, True, None, False, False, "parse error")
    if _word(toks, c + 1) == "WITH" and _word(toks, c + 2) == "HOLD":
        return (True, True, None, False, False, "cursor with hold")
    return _query_after(sql, toks, c + 1, "FOR", allowed, "declare cursor", "declare ")


def _query_after(sql: str, toks: list[Token], start: int, keyword: str, allowed: frozenset[str],
                 read: str, write_prefix: str) -> _R:
    """The query after the top-level ``keyword`` decides: a read is ``read``, the rest writes."""
    j = _find_top(toks, start, (keyword,))
    if j < 0:
        return (True, True, None, False, False, "parse error")
    problem = _inner_query(sql, toks, j + 1, toks[-1][3], allowed)
    if problem is None:
        return (False, True, None, False, False, read)
    return (True, True, None, False, False, write_prefix + problem)


# Statements that wrap another statement, which decides.
_WRAPPING = {"EXPLAIN": _explain, "COPY": _copy, "PREPARE": _prepare, "DECLARE": _declare}


_CURSOR_OUTSIDE = "cursor outside a transaction"
_PREPARED_FOR_LATER = "prepare (kept after the transaction)"
_CONSTANTS: dict[tuple, Classification] = {}
for _c in (READ, EMPTY, PARSE_ERROR):
    _CONSTANTS[(_c.writes, _c.has_statement, _c.begin, _c.ends_transaction, _c.sets_session, _c.reason)] = _c


def classify(sql: str, read_only_functions: frozenset[str] = DEFAULT_READ_ONLY_FUNCTIONS) -> Classification:
    """Classify one simple-query text (one or more statements).  Never raises."""
    try:
        statements = lex_statements(sql)
    except Unterminated:
        return PARSE_ERROR
    except Exception:  # pragma: no cover - the lexer matches every character
        return PARSE_ERROR
    if not statements:
        return EMPTY
    writes = has_statement = ends = sets = False
    begin: str | None = None
    reason_write = reason_stmt = reason_tx = None
    # Read-only cursors and prepared statements created earlier in this text:
    # using them is provably read-only too (BEGIN; DECLARE c ...; FETCH c / PREPARE p ...; EXECUTE p).
    declared: set[str] = set()
    prepared: set[str] = set()
    for toks in statements:
        try:
            r = _statement(sql, toks, read_only_functions)
        except Exception:  # defensive: never let a classifier bug pick a replica
            r = (True, True, None, False, False, "parse error")
        why = r[5]
        if why == "declare cursor":
            declared.add(toks[1][1])
        elif why == _CURSOR_OUTSIDE and toks[-1][1] in declared:
            r = (False, True, None, False, False, "cursor")
        elif why == "prepare":
            prepared.add(toks[1][1])
        elif why == "execute" and len(toks) > 1 and toks[1][1] in prepared:
            r = (False, True, None, False, False, "execute")
        elif why == "deallocate" and toks[-1][1] in prepared and len(toks) <= 3:
            r = (False, True, None, False, False, "deallocate")
            prepared.discard(toks[-1][1])
        w, s, b, e, ss, why = r
        if w:
            writes = True
            if reason_write is None:
                reason_write = why
        if s:
            has_statement = True
            if reason_stmt is None:
                reason_stmt = why
        elif reason_tx is None:
            reason_tx = why
        if b is not None:
            begin = b
        ends = ends or e
        sets = sets or ss
    if prepared and not writes:
        # The statement outlives the text and pins its client to that server connection
        # (pypool/session/pinning.py): the primary, where the client's later writes can run too.
        writes, reason_write = True, _PREPARED_FOR_LATER
    reason = reason_write or reason_stmt or reason_tx or "empty"
    key = (writes, has_statement, begin, ends, sets, reason)
    c = _CONSTANTS.get(key)
    if c is None:
        c = Classification(*key)
        if len(_CONSTANTS) < 4096:  # a few hundred distinct results in practice
            _CONSTANTS[key] = c
    return c


# --------------------------------------------------------------------------
# Routing hint
# --------------------------------------------------------------------------

# The marker is lower-case "pypool" (the hot path looks for exactly that); the rest of the
# hint is case-insensitive.
_HINT_RE = re.compile(r"pypool\s*:\s*(?i:role\s*=\s*(primary|replica))\b")


def role_hint(sql: str) -> str | None:
    """``/* pypool: role=primary */`` (or ``-- pypool: role=replica``) in a
    comment anywhere in the text -> "primary" / "replica"; else None.

    The common case (no "pypool" in the text) is one substring search.  A
    hint inside a string literal or quoted identifier does not count.
    """
    if "pypool" not in sql:
        return None
    pos = 0
    n = len(sql)
    match = TOKEN_RE.match
    while pos < n:
        m = match(sql, pos)
        kind = m.lastgroup
        if kind == "lc":
            h = _HINT_RE.search(m.group())
            if h:
                return h.group(1).lower()
            pos = m.end()
        elif kind == "bc":
            end = _block_comment_end(sql, pos)
            h = _HINT_RE.search(sql, pos, end)
            if h:
                return h.group(1).lower()
            pos = end
        elif kind == "dollar":
            close = sql.find(m.group(), m.end())
            pos = n if close < 0 else close + len(m.group())
        else:
            pos = m.end()
    return None
