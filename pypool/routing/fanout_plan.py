"""plan_fanout: whether a read can run on every shard and be merged exactly, and how (sqlglot).

The plan's shape and the merge are in :mod:`pypool.routing.fanout`; this
module is imported only when a pool with ``default_shard = "all"`` plans a
statement, so that other pools do not load sqlglot (about 30 MiB per process).
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from pypool.routing.fanout import FanoutError, FanoutPlan, OrderKey

__all__ = ["plan_fanout"]


_AGGREGATES = {exp.Count: "count", exp.Sum: "sum", exp.Min: "min", exp.Max: "max", exp.Avg: "avg"}


def plan_fanout(sql: str, key: str) -> FanoutPlan:
    """How to run ``sql`` on every shard; FanoutError says why it cannot be."""
    missing = f"add a WHERE condition on the sharding key {key} to run it on one shard"
    try:
        statements = [s for s in sqlglot.parse(sql, read="postgres") if s is not None]
    except SqlglotError:
        raise FanoutError(f"pypool cannot read this query to run it on every shard; {missing}") from None
    if len(statements) != 1 or not isinstance(statements[0], exp.Select):
        raise FanoutError(f"only one SELECT at a time runs on every shard; {missing}")
    select = statements[0]
    for what, present in (("DISTINCT", select.args.get("distinct")), ("HAVING", select.args.get("having")),
                          ("a window function", select.find(exp.Window)),
                          ("SELECT ... INTO", select.args.get("into"))):
        if present:
            raise FanoutError(f"{what} cannot be merged across shards; {missing}")
    columns = _columns(select, missing)
    order_by = _order_by(select, missing)
    limit = _constant(select.args.get("limit"), "LIMIT", missing)
    offset = _constant(select.args.get("offset"), "OFFSET", missing) or 0
    reads_tables = select.find(exp.Table) is not None
    if columns[0] == "row" and not offset:
        # each shard runs the text as it is
        return FanoutPlan(sql, columns, order_by, limit, offset, reads_tables)
    shard = select.copy()
    shard.set("offset", None)
    if columns[0] != "row":
        shard.set("limit", None)  # groups are only complete after the merge
        shard.set("expressions", _split_avg(shard.expressions))
        columns = tuple(c for kind in columns for c in (("avg_sum", "avg_count") if kind == "avg" else (kind,)))
    elif limit is not None:
        shard.set("limit", exp.Limit(expression=exp.Literal.number(limit + offset)))
    return FanoutPlan(shard.sql(dialect="postgres"), columns, order_by, limit, offset, reads_tables)


def _sql(node: exp.Expression) -> str:
    return node.sql(dialect="postgres")


def _columns(select: exp.Select, missing: str) -> tuple[str, ...]:
    kinds = []
    selected_groups: set[str] = set()
    groups = {_sql(g) for g in (select.args.get("group") or exp.Group()).expressions}
    for item in select.expressions:
        node = item.this if isinstance(item, exp.Alias) else item
        kind = _AGGREGATES.get(type(node))
        if kind is not None:
            if node.find(exp.Distinct) or any(isinstance(n, exp.AggFunc) for n in node.this.find_all(exp.AggFunc)):
                raise FanoutError(f"{_sql(node)} cannot be merged across shards; {missing}")
            kinds.append(kind)
        elif node.find(exp.AggFunc):
            raise FanoutError(f"{_sql(item)} cannot be merged across shards (only count, sum, min, max "
                              f"and avg on their own are); {missing}")
        elif groups:
            if _sql(node) not in groups:
                raise FanoutError(f"{_sql(item)} is neither grouped nor aggregated; {missing}")
            selected_groups.add(_sql(node))
            kinds.append("group")
        else:
            kinds.append("row")
    if "row" in kinds and len(set(kinds)) > 1:
        raise FanoutError(f"columns mix aggregates and plain values; {missing}")
    if groups != selected_groups:
        raise FanoutError(f"GROUP BY {', '.join(sorted(groups - selected_groups))} must be in the select list "
                          f"to be merged across shards; {missing}")
    return tuple(kinds)


def _order_by(select: exp.Select, missing: str) -> tuple[OrderKey, ...]:
    order = select.args.get("order")
    if order is None:
        return ()
    names = []
    for item in select.expressions:
        names.append((item.alias_or_name.lower(), _sql(item.this if isinstance(item, exp.Alias) else item)))
    keys = []
    for ordered in order.expressions:
        node = ordered.this
        index = None
        if isinstance(node, exp.Literal) and not node.is_string:
            index = int(node.this) - 1
        else:
            for i, (name, text) in enumerate(names):
                if _sql(node) == text or (isinstance(node, exp.Column) and not node.table
                                          and node.name.lower() == name):
                    index = i
                    break
        star = any(isinstance(item, exp.Star) or (isinstance(item, exp.Column) and item.is_star)
                   for item in select.expressions)
        if index is None and star and isinstance(node, exp.Column) and not node.table:
            index, name = -1, node.name.lower()  # a column of *: looked up in the RowDescription
        else:
            name = ""
        if index is None or not -1 <= index < len(names):
            raise FanoutError(f"ORDER BY {_sql(node)} must be a column of the select list to be merged "
                              f"across shards; {missing}")
        descending = bool(ordered.args.get("desc"))
        nulls_first = ordered.args.get("nulls_first")
        keys.append(OrderKey(index, descending, descending if nulls_first is None else bool(nulls_first), name))
    return tuple(keys)


def _constant(clause: exp.Expression | None, what: str, missing: str) -> int | None:
    if clause is None:
        return None
    node = clause.expression
    if isinstance(node, exp.Literal) and not node.is_string:
        return int(node.this)
    if isinstance(node, exp.Null):
        return None
    raise FanoutError(f"{what} {_sql(node)} must be a number to be merged across shards; {missing}")


def _split_avg(items: list[exp.Expression]) -> list[exp.Expression]:
    out = []
    for item in items:
        node = item.this if isinstance(item, exp.Alias) else item
        if isinstance(node, exp.Avg):
            out.append(exp.Sum(this=node.this.copy()))
            out.append(exp.Count(this=node.this.copy()))
        else:
            out.append(item)
    return out
