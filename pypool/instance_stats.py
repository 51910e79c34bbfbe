"""Whole-instance statistics from the per-worker ones (``[general] workers = N``).

Each worker process answers admin ``SHOW`` commands and builds Prometheus
families from its own pools and clients. With several workers, what a user
asks for is the instance: this module merges the workers' answers. It works on
the answers themselves (admin result sets as columns and rows, metric families
as samples), never on live objects, so it is plain data in, plain data out.

How a number merges depends on what it means: counts and totals add up (each
worker's ``pool_size`` share adds up to the configured ``pool_size``), a
longest wait or a ban flag is the largest of the workers', a per-transaction
average is weighted by the transactions behind it, and a list of connections
is the concatenation of the workers' lists.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from pypool.protocol import messages as m

TEXT = 25
_NUMERIC_OIDS = frozenset({20, 21, 23, 1700})


# ------------------------------------------------------------ admin result sets

@dataclass
class ResultSet:
    columns: list[tuple[str, int]]
    rows: list[list[Any]]
    tag: str

    def encode(self) -> bytes:
        return m.result_set(self.columns, self.rows, tag=self.tag)

    def to_json(self) -> dict:
        return {"columns": self.columns, "rows": self.rows, "tag": self.tag}

    @classmethod
    def from_json(cls, data: dict) -> "ResultSet":
        return cls([(name, oid) for name, oid in data["columns"]], [list(r) for r in data["rows"]], data["tag"])


def decode_result_set(data: bytes) -> ResultSet | None:
    """RowDescription + DataRows + CommandComplete back into columns and typed rows.

    None for anything else (a NOTICE, no rows at all): such answers are not merged.
    """
    columns: list[tuple[str, int]] = []
    rows: list[list[Any]] = []
    tag = None
    pos = 0
    while pos < len(data):
        kind = data[pos]
        length = struct.unpack_from("!I", data, pos + 1)[0]
        payload = data[pos + 5:pos + 1 + length]
        pos += 1 + length
        if kind == m.ROW_DESCRIPTION:
            (count,) = struct.unpack_from("!H", payload, 0)
            at = 2
            for _ in range(count):
                name, at = m.read_cstring(payload, at)
                oid = struct.unpack_from("!I", payload, at + 6)[0]
                at += 18
                columns.append((name, oid))
        elif kind == m.DATA_ROW:
            rows.append(_decode_row(payload, columns))
        elif kind == m.COMMAND_COMPLETE:
            tag = m.read_cstring(payload, 0)[0]
        else:
            return None
    if tag is None or not columns:
        return None
    return ResultSet(columns, rows, tag)


def _decode_row(payload: bytes, columns: list[tuple[str, int]]) -> list[Any]:
    (count,) = struct.unpack_from("!H", payload, 0)
    at = 2
    row: list[Any] = []
    for i in range(count):
        (size,) = struct.unpack_from("!i", payload, at)
        at += 4
        if size < 0:
            row.append(None)
            continue
        text = payload[at:at + size].decode("utf-8")
        at += size
        row.append(_number(text) if columns[i][1] in _NUMERIC_OIDS else text)
    return row


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


@dataclass(frozen=True)
class RowMerge:
    """How the rows of one SHOW merge: rows with equal ``key`` columns become one row.

    Numeric columns add up unless listed in ``largest`` (the largest value wins)
    or ``weighted`` (column -> weight column: an average weighted by the weight).
    Text columns keep the first worker's value. ``wait_pairs`` are
    (seconds, microseconds) column pairs whose combined value is the largest.
    """

    key: tuple[str, ...]
    largest: frozenset[str] = frozenset()
    weighted: dict[str, str] = field(default_factory=dict)
    wait_pairs: tuple[tuple[str, str], ...] = ()

    def merge(self, results: Sequence[ResultSet]) -> ResultSet:
        first = results[0]
        names = [name for name, _ in first.columns]
        numeric = [oid in _NUMERIC_OIDS for _, oid in first.columns]
        index = {name: i for i, name in enumerate(names)}
        key_at = [index[k] for k in self.key]
        merged: dict[tuple, list[Any]] = {}
        weights: dict[tuple, dict[str, float]] = {}
        waits: dict[tuple, dict[tuple[str, str], int]] = {}
        for result in results:
            for row in result.rows:
                key = tuple(row[i] for i in key_at)
                target = merged.get(key)
                if target is None:
                    merged[key] = target = [None if numeric[i] else v for i, v in enumerate(row)]
                    weights[key] = {}
                    waits[key] = {}
                for i, name in enumerate(names):
                    value = row[i]
                    if not numeric[i] or value is None:
                        continue
                    if name in self.weighted:
                        weight = row[index[self.weighted[name]]] or 0
                        w = weights[key]
                        w[name] = w.get(name, 0.0) + value * weight
                        w[name + "/"] = w.get(name + "/", 0.0) + weight
                        target[i] = max(target[i] or 0, value)  # when no weight at all
                    elif name in self.largest:
                        target[i] = value if target[i] is None else max(target[i], value)
                    else:
                        target[i] = value if target[i] is None else target[i] + value
                for seconds, micros in self.wait_pairs:
                    total = (row[index[seconds]] or 0) * 1_000_000 + (row[index[micros]] or 0)
                    waits[key][(seconds, micros)] = max(waits[key].get((seconds, micros), 0), total)
        for key, target in merged.items():
            for name in self.weighted:
                total_weight = weights[key].get(name + "/", 0.0)
                if total_weight:
                    target[index[name]] = round(weights[key][name] / total_weight)
            for (seconds, micros), total in waits[key].items():
                target[index[seconds]], target[index[micros]] = divmod(total, 1_000_000)
        return ResultSet(first.columns, list(merged.values()), first.tag)


def _concatenate(results: Sequence[ResultSet]) -> ResultSet:
    return ResultSet(results[0].columns, [row for r in results for row in r.rows], results[0].tag)


def _distinct(results: Sequence[ResultSet]) -> ResultSet:
    seen: dict[tuple, list[Any]] = {}
    for result in results:
        for row in result.rows:
            seen.setdefault(tuple(row), row)
    return ResultSet(results[0].columns, list(seen.values()), results[0].tag)


def _bans(results: Sequence[ResultSet]) -> ResultSet:
    """A server banned by any worker is listed once, with the longest remaining ban."""
    names = [name for name, _ in results[0].columns]
    key_at = [names.index(k) for k in ("db", "user", "role", "host", "port")]
    remaining = names.index("ban_remaining_seconds")
    best: dict[tuple, list[Any]] = {}
    for result in results:
        for row in result.rows:
            key = tuple(row[i] for i in key_at)
            if key not in best or int(row[remaining]) > int(best[key][remaining]):
                best[key] = row
    return ResultSet(results[0].columns, list(best.values()), results[0].tag)


def _lists(results: Sequence[ResultSet]) -> ResultSet:
    """Connection lists add up; the configured databases, users and pools are the same in every worker."""
    same_everywhere = {"databases", "users", "pools"}
    totals: dict[str, int] = {}
    for result in results:
        for name, items in result.rows:
            if name in same_everywhere:
                totals[name] = max(totals.get(name, 0), items)
            else:
                totals[name] = totals.get(name, 0) + items
    return ResultSet(results[0].columns, [[name, n] for name, n in totals.items()], results[0].tag)


def _config(results: Sequence[ResultSet]) -> ResultSet:
    """Each worker runs with its share of pool_size and min_pool_size: report the instance's."""
    rows: dict[str, list[Any]] = {}
    for result in results:
        for key, value, default, changeable in result.rows:
            if key not in rows:
                rows[key] = [key, value, default, changeable]
            elif key.endswith((".pool_size", ".min_pool_size")):
                rows[key][1] = str(int(rows[key][1]) + int(value))
    return ResultSet(results[0].columns, list(rows.values()), results[0].tag)


SHOW_MERGES = {
    "POOLS": RowMerge(key=("database", "user", "pool_mode"), wait_pairs=(("maxwait", "maxwait_us"),)).merge,
    "STATS": RowMerge(key=("instance", "database", "user"),
                      weighted={"avg_xact_time": "avg_xact_count", "avg_query_time": "avg_query_count",
                                "avg_wait_time": "avg_xact_count"}).merge,
    "STATS_TOTALS": RowMerge(key=("database",)).merge,
    "STATS_AVERAGES": RowMerge(key=("database",),
                               weighted={"xact_time": "xact_count", "query_time": "query_count",
                                         "wait_time": "server_assignment_count"}).merge,
    "DATABASES": RowMerge(key=("name",), largest=frozenset({"paused", "disabled"})).merge,
    "SERVERS": _concatenate,
    "CLIENTS": _concatenate,
    "LISTS": _lists,
    "BANS": _bans,
    "CONFIG": _config,
}
"""SHOW commands whose answer differs per worker, and how to merge it. The others
(USERS, VERSION, HELP) are the same in every worker: the local answer is the answer."""

COMMAND_MERGES = {"BAN": _distinct, "UNBAN": _distinct}
"""Commands every worker must run (each has its own pools), and how to merge their rows."""
BROADCAST_COMMANDS = frozenset({"RELOAD", "PAUSE", "RESUME", "BAN", "UNBAN"})


def merge_results(what: str, results: Sequence[ResultSet]) -> ResultSet:
    merger = SHOW_MERGES.get(what) or COMMAND_MERGES.get(what)
    return merger(results) if merger is not None else results[0]


# ------------------------------------------------------------- metric families

def families_to_json(families: Iterable[Any]) -> list[dict]:
    """prometheus-client Metric objects as plain data (to cross a process boundary)."""
    return [{"name": f.name, "documentation": f.documentation, "type": f.type, "unit": f.unit,
             "samples": [[s.name, s.labels, s.value] for s in f.samples]} for f in families]


# Families whose value is a state or a maximum, not a count: the workers' largest (or smallest) wins.
LARGEST_FAMILIES = frozenset({
    "pgcat_servers_is_banned", "pgcat_servers_is_paused", "pypool_client_max_wait_seconds", "pypool_pool_paused",
    "pypool_server_banned", "pypool_server_is_primary", "pypool_replica_lag_seconds", "pypool_info",
    "pypool_query_classification_cache_entries", "process_max_fds", "python_info",
})
SMALLEST_FAMILIES = frozenset({"pypool_server_healthy", "process_start_time_seconds"})
_MAXWAIT = ("pgcat_pools_maxwait", "pgcat_pools_maxwait_us")
_CACHE = "pypool_query_classification_cache_"


def merge_families(snapshots: Sequence[list[dict]]) -> list[dict]:
    """One list of families for the instance from each worker's (and the supervisor's) list."""
    order: list[str] = []
    merged: dict[str, dict] = {}
    values: dict[str, dict[tuple, float]] = {}
    for snapshot in snapshots:
        for family in snapshot:
            name = family["name"]
            if name not in merged:
                order.append(name)
                merged[name] = {**family, "samples": []}
                values[name] = {}
            pick = max if name in LARGEST_FAMILIES else min if name in SMALLEST_FAMILIES else None
            target = values[name]
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                if key not in target:
                    target[key] = value
                elif sample_name.endswith("_created"):  # a timestamp: the earliest
                    target[key] = min(target[key], value)
                else:
                    target[key] = pick(target[key], value) if pick else target[key] + value
    _merge_maxwait(snapshots, values)
    _recompute_hit_ratio(values)
    out = []
    for name in order:
        family = merged[name]
        family["samples"] = [[sample, dict(labels), value] for (sample, labels), value in values[name].items()]
        out.append(family)
    return out


def _merge_maxwait(snapshots: Sequence[list[dict]], values: dict[str, dict[tuple, float]]) -> None:
    """PgCat splits the longest wait in whole seconds and the microseconds beyond: take the largest whole."""
    if _MAXWAIT[0] not in values:
        return
    longest: dict[tuple, float] = {}
    for snapshot in snapshots:
        parts: dict[tuple, float] = {}
        for family in snapshot:
            if family["name"] in _MAXWAIT:
                scale = 1_000_000 if family["name"] == _MAXWAIT[0] else 1
                for _, labels, value in family["samples"]:
                    key = tuple(sorted(labels.items()))
                    parts[key] = parts.get(key, 0) + value * scale
        for key, total in parts.items():
            longest[key] = max(longest.get(key, 0), total)
    for key, total in longest.items():
        seconds, micros = divmod(int(total), 1_000_000)
        values[_MAXWAIT[0]][(_MAXWAIT[0], key)] = seconds
        values[_MAXWAIT[1]][(_MAXWAIT[1], key)] = micros


def _recompute_hit_ratio(values: dict[str, dict[tuple, float]]) -> None:
    ratio = values.get(_CACHE + "hit_ratio")
    if ratio is None:
        return
    hits = {k[1]: v for k, v in values.get(_CACHE + "hits", {}).items()}
    misses = {k[1]: v for k, v in values.get(_CACHE + "misses", {}).items()}
    for key in ratio:
        labels = key[1]
        total = hits.get(labels, 0) + misses.get(labels, 0)
        ratio[key] = hits.get(labels, 0) / total if total else 0.0
