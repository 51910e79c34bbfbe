"""The sqlglot half of statement classification: is a would-be read provably read-only?

:mod:`pypool.routing.classify` decides every keyword-led statement itself and
hands only SELECT-like text here. This module is imported on the first such
statement, not at start-up: sqlglot costs about 30 MiB per process, which a
pool without the query parser (or a worker of one) never needs.
"""

from __future__ import annotations

from sqlglot import exp
from sqlglot.dialects.postgres import Postgres

__all__ = ["ALWAYS_WRITE_FUNCTIONS", "DIALECT", "query_problem"]

# Never read-only, whatever the configured allow-list says: they write,
# depend on per-session state that a replica/pooled connection does not
# have, or fail on a hot standby.
ALWAYS_WRITE_FUNCTIONS: frozenset[str] = frozenset(
    """
    nextval setval currval lastval set_config pg_notify setseed
    txid_current txid_current_if_assigned pg_current_xact_id
    pg_current_xact_id_if_assigned pg_current_wal_lsn pg_current_wal_insert_lsn
    pg_current_wal_flush_lsn pg_switch_wal pg_create_restore_point
    pg_reload_conf pg_rotate_logfile pg_cancel_backend pg_terminate_backend
    pg_logical_emit_message pg_sleep pg_sleep_for pg_sleep_until
    """.split()
)
_ALWAYS_WRITE_PREFIXES = ("pg_advisory", "pg_try_advisory", "lo_", "dblink", "pg_stat_reset")


def _always_writes(name: str) -> bool:
    base = name.rpartition(".")[2]
    return base in ALWAYS_WRITE_FUNCTIONS or base.startswith(_ALWAYS_WRITE_PREFIXES)


# sqlglot expression classes that stand for syntax or for a built-in
# construct rather than a call resolved by name (CASE, ::, ->, ARRAY[...],
# EXTRACT(x FROM y), CURRENT_DATE...), plus the typed children the builders
# of allow-listed functions create.  A Func node of any other class that did
# not come from a named call (and so has no recorded name) makes a write.
_SYNTAX_FUNC_CLASSES: frozenset[type] = frozenset(
    getattr(exp, n)
    for n in """
    Case Cast TryCast Array Exists Collate RegexpLike RegexpILike
    JSONExtract JSONExtractScalar JSONBExtract JSONBExtractScalar JSONBContains
    JSONBContainsAnyTopKeys JSONBContainsAllTopKeys JSONBDeleteAtPath
    JSONBExists ArrayContains ArrayContainsAll ArrayOverlaps ArrayContained
    Extract Substring Trim StrPosition Overlay Ceil Floor Initcap Chr Decode
    GroupConcat JSONObject JSONArrayAgg JSONObjectAgg Normalize Pow Coalesce
    CurrentDate CurrentTime CurrentTimestamp CurrentUser CurrentRole
    CurrentCatalog CurrentSchema SessionUser Localtime Localtimestamp
    Convert Struct Unnest Explode ArrayContainedBy MatchAgainst Sqrt Cbrt Abs
    """.split()
    if hasattr(exp, n)
)
# Reserved words sqlglot may leave as an anonymous call.
_SYNTAX_NAMES = frozenset(("all", "any", "some", "row", "array"))
# Operators (a + b, a AND b, a @> b ...) that sqlglot models as functions.
_OPERATOR_CLASSES = (exp.Binary, exp.Connector)


class _Dialect(Postgres):
    """PostgreSQL dialect that records the name a known function was
    called by (sqlglot keeps it in ``node.meta[ORIGINAL_NAME_META_KEY]``)."""

    ORIGINAL_NAME_META_KEY = "pypool_name"


DIALECT = _Dialect()
_NAME_KEY = _Dialect.ORIGINAL_NAME_META_KEY


def _qualifier(node: exp.Expr) -> str | None:
    parent = node.parent
    if isinstance(parent, exp.Dot) and parent.expression is node:
        return _dotted(parent.this)
    return None


def _dotted(node: exp.Expr) -> str:
    if isinstance(node, exp.Dot):
        return f"{_dotted(node.this)}.{_dotted(node.expression)}"
    if isinstance(node, exp.Identifier):
        return node.this if node.quoted else node.this.lower()
    if isinstance(node, exp.Column):
        return ".".join(_dotted(p) for p in node.parts)
    return node.sql(dialect=DIALECT).lower()


def _function_problem(node: exp.Func, text: str, allowed: frozenset[str]) -> str | None:
    """None if the call is known read-only, else a reason."""
    if isinstance(node, exp.Anonymous):
        this = node.this
        quoted = isinstance(this, exp.Identifier) and this.quoted
        name = this.this if isinstance(this, exp.Identifier) else str(this)
    else:
        meta = node._meta  # avoid creating a dict on every node
        written = meta.get(_NAME_KEY) if meta else None
        if written is None:
            if type(node) in _SYNTAX_FUNC_CLASSES or isinstance(node, _OPERATOR_CLASSES):
                return None
            if isinstance(node, exp.If) and isinstance(node.parent, exp.Case):
                return None  # a WHEN branch; a call if(...) would have a name
            return f"function {node.key}"
        start = meta.get("start")
        quoted = start is not None and text[start : start + 1] == '"'
        name = written
    qual = _qualifier(node)
    if not quoted:
        name = name.lower()
        if name in _SYNTAX_NAMES and qual is None:
            return None  # x = ANY(...)/ALL(...), ROW(...), ARRAY(...): reserved words
    if qual is not None and qual != "pg_catalog":
        name = f"{qual}.{name}"
    if _always_writes(name) or name not in allowed:
        return f"function {name}"
    return None


_READ_ROOTS = (exp.Select, exp.SetOperation, exp.Values, exp.Subquery, exp.Paren)
_WRITE_NODES = tuple(
    getattr(exp, n)
    for n in """
    DML DDL Insert Update Delete Merge Copy Create Drop Alter TruncateTable
    Command Set Grant Revoke Comment Analyze Transaction Commit Rollback Use
    Cache Uncache Pragma Kill Refresh LoadData Declare Execute Describe
    Summarize Into
    """.split()
    if hasattr(exp, n)
)


def query_problem(text: str, allowed: frozenset[str]) -> str | None:
    """Parse a would-be read with sqlglot; None if provably read-only."""
    try:
        trees = DIALECT.parse(text)
    except Exception:  # ParseError, TokenError, and anything odd inside sqlglot
        return "parse error"
    if not trees or all(t is None for t in trees):
        return "parse error"
    for tree in trees:
        if tree is None:
            continue
        if not isinstance(tree, _READ_ROOTS):
            return "unsupported syntax" if isinstance(tree, exp.Command) else tree.key
        for node in tree.walk():
            if isinstance(node, exp.Func):
                problem = _function_problem(node, text, allowed)
                if problem is not None:
                    return problem
            elif isinstance(node, exp.Lock):
                if node.args.get("update"):
                    return "for no key update" if node.args.get("key") else "for update"
                return "for key share" if node.args.get("key") else "for share"
            elif isinstance(node, _WRITE_NODES):
                return "select into" if isinstance(node, exp.Into) else node.key
    return None
