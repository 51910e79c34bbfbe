"""CSV, markdown table and chart from the benchmark's rows."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

LABELS = {
    "direct": "PostgreSQL direct",
    "floor": "uvloop relay (floor)",
    "pypool": "pypool",
    "pypool-auto": 'pypool workers="auto"',
    "pypool-w2": "pypool workers=2",
    "pypool-rw": "pypool R/W split",
    "pypool-rw-auto": 'pypool R/W split, workers="auto"',
    "pypool-rw-causal": "pypool R/W split, causal reads",
    "pypool-base": "pypool baseline",
    "pypool-compiled": "pypool, compiled hot path",
    "pgbouncer": "PgBouncer",
    "pgcat": "PgCat",
    "pgcat-rw": "PgCat R/W split",
}
COLORS = {
    "direct": "#8c8c8c",
    "floor": "#bdbdbd",
    "pypool": "#1f77b4",
    "pypool-auto": "#08519c",
    "pypool-w2": "#08519c",
    "pypool-rw": "#6baed6",
    "pypool-rw-auto": "#9ecae1",
    "pypool-rw-causal": "#3182bd",
    "pypool-base": "#c6dbef",
    "pypool-compiled": "#17becf",
    "pgbouncer": "#ff7f0e",
    "pgcat": "#2ca02c",
    "pgcat-rw": "#98df8a",
}


_COMPARED = ("pypool", "pgcat", "floor")  # targets whose rows carry ratios to PgBouncer


def _num(x) -> float | None:
    if x is None or x == "":
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def fmt_row(row) -> str:
    if row.status not in ("ok",):
        return f"{row.status}: {row.note}"
    if row.workload == "memory":
        return (f"RSS {row.rss_idle_kib / 1024:.1f} MiB idle -> {row.rss_kib / 1024:.1f} MiB with "
                f"{row.connections} clients; {row.note}")
    parts = [f"tps {row.tps:>9.1f}" if row.tps is not None else "tps ?"]
    if row.lat_avg_us is not None:
        parts.append(f"avg {row.lat_avg_us / 1000:.3f} ms")
    if row.lat_p50_us is not None and row.workload == "rtt":
        parts.append(f"p50 {row.lat_p50_us:.1f} us")
    if row.lat_p99_us is not None:
        parts.append(f"p99 {row.lat_p99_us / 1000:.3f} ms")
    if row.cpu_us_per_tx is not None:
        parts.append(f"cpu {row.cpu_us_per_tx:.1f} us/tx")
    if row.sys_us_per_tx is not None:
        parts.append(f"(sys {row.sys_us_per_tx:.1f})")
    if row.replica_share is not None:
        parts.append(f"on replicas {row.replica_share:.0%}")
    return "  ".join(parts)


def write_csv(rows: Sequence, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    cols = type(rows[0]).columns()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if getattr(r, c) is None else getattr(r, c) for c in cols])
    tmp.replace(path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------
# aggregation


def _as_dicts(rows: Iterable) -> list[dict]:
    out = []
    for r in rows:
        out.append(r if isinstance(r, dict) else dict(vars(r)))
    return out


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Summary:
    """Medians over rounds per (workload, target) and per-round ratios pypool/PgBouncer."""

    def __init__(self, rows: Iterable) -> None:
        self.rows = _as_dicts(rows)
        self.ok: dict[tuple[str, str], list[dict]] = defaultdict(list)
        self.other: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in self.rows:
            key = (r["workload"], r["target"])
            (self.ok if r["status"] == "ok" else self.other)[key].append(r)

    def targets_for(self, workload: str) -> list[str]:
        """Targets that ran (or were meant to run and failed) for this workload; not the unavailable ones."""
        seen = []
        for r in self.rows:
            if r["workload"] == workload and r["target"] not in seen and r["status"] != "not-available":
                seen.append(r["target"])
        order = list(LABELS)
        return sorted(seen, key=lambda t: order.index(t) if t in order else 99)

    def med(self, workload: str, target: str, col: str) -> float | None:
        return _median([_num(r.get(col)) for r in self.ok.get((workload, target), [])])

    def range(self, workload: str, target: str, col: str) -> tuple[float, float] | None:
        vals = [v for v in (_num(r.get(col)) for r in self.ok.get((workload, target), [])) if v is not None]
        return (min(vals), max(vals)) if vals else None

    def n(self, workload: str, target: str) -> int:
        return len(self.ok.get((workload, target), []))

    def ratio(self, workload: str, num: str, den: str, col: str) -> tuple[float | None, list[float]]:
        """Median over rounds of (num/den) for ``col``, computed within each round."""
        by_round: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        for t in (num, den):
            for r in self.ok.get((workload, t), []):
                v = _num(r.get(col))
                if v is not None:
                    by_round[r["round"]][t] = v
        ratios = [d[num] / d[den] for d in by_round.values() if num in d and d.get(den)]
        return (_median(ratios), ratios)

    def pypool_name(self, workload: str) -> str | None:
        ts = self.targets_for(workload)
        for cand in ("pypool-rw", "pypool"):
            if cand in ts:
                return cand
        return None


def _f(v: float | None, fmt: str = "{:,.0f}", dash: str = "–") -> str:
    return dash if v is None else fmt.format(v)


def _tps_cell(s: Summary, wl: str, t: str) -> str:
    med = s.med(wl, t, "tps")
    if med is None:
        other = s.other.get((wl, t))
        return other[0]["status"] if other else "–"
    rng = s.range(wl, t, "tps")
    if rng and s.n(wl, t) > 1:
        return f"{med:,.0f} ({rng[0]:,.0f}–{rng[1]:,.0f})"
    return f"{med:,.0f}"


def _ratio_cell(s: Summary, wl: str, num: str, den: str, col: str) -> str:
    med, all_ = s.ratio(wl, num, den, col)
    if med is None:
        return "–"
    if len(all_) > 1:
        return f"{med:.2f} ({min(all_):.2f}–{max(all_):.2f})"
    return f"{med:.2f}"


def markdown(rows: Sequence, meta: dict, workloads: Sequence, csv_name: str) -> str:
    s = Summary(rows)
    titles = {w.name: w.title for w in workloads}
    pg_wls = [w.name for w in workloads if w.kind == "pgbench" and any(r["workload"] == w.name for r in s.rows)]
    has_pgcat = any(r["target"].startswith("pgcat") and r["status"] == "ok" for r in s.rows)
    out: list[str] = []
    out.append(f"# pypool benchmark {meta.get('run_id', '')} ({meta.get('mode', '')})\n")
    out.append(
        f"pgbench scale {meta.get('scale')} (database `{meta.get('database')}`), {meta.get('rounds')} round(s) of "
        f"{meta.get('duration_s')} s per run, targets interleaved within each round (the order rotates every "
        f"round). Poolers in transaction mode with {meta.get('pool_size')} server connections per pool. "
        f"Everything -- three PostgreSQL servers, the pooler and pgbench -- shares {meta.get('cpus')} cores, so "
        f"compare targets within this table, not with other machines. Cells are medians over rounds; "
        f"TPS ranges and ratio ranges are min–max over rounds; ratios are computed within a round, then the "
        f"median is taken. Raw data: `{csv_name}`.\n")

    # ---- summary
    out.append("## Summary: pypool vs PgBouncer\n")
    head = ["workload", "direct TPS", "pypool TPS", "PgBouncer TPS"]
    if has_pgcat:
        head.append("PgCat TPS")
    head += ["pypool / PgBouncer TPS", "pypool / PgBouncer CPU per tx", "pypool CPU µs/tx", "PgBouncer CPU µs/tx"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for wl in pg_wls:
        py = s.pypool_name(wl) or "pypool"
        cells = [titles.get(wl, wl), _tps_cell(s, wl, "direct") if "direct" in s.targets_for(wl) else "n/a",
                 _tps_cell(s, wl, py), _tps_cell(s, wl, "pgbouncer")]
        if has_pgcat:
            cells.append(_tps_cell(s, wl, "pgcat-rw" if py == "pypool-rw" else "pgcat"))
        cells += [_ratio_cell(s, wl, py, "pgbouncer", "tps"), _ratio_cell(s, wl, py, "pgbouncer", "cpu_us_per_tx"),
                  _f(s.med(wl, py, "cpu_us_per_tx"), "{:.1f}"), _f(s.med(wl, "pgbouncer", "cpu_us_per_tx"), "{:.1f}")]
        out.append("| " + " | ".join(cells) + " |")
    if any(r["workload"] == "rtt" for r in s.rows):
        cells = ["SELECT 1 round trip p50 / p99 (µs)"]
        for t in ["direct", "pypool", "pgbouncer"] + (["pgcat"] if has_pgcat else []):
            p50, p99 = s.med("rtt", t, "lat_p50_us"), s.med("rtt", t, "lat_p99_us")
            cells.append("–" if p50 is None else f"{p50:.1f} / {p99:.1f}")
        cells += [_ratio_cell(s, "rtt", "pypool", "pgbouncer", "lat_p50_us") + " (p50)",
                  _ratio_cell(s, "rtt", "pypool", "pgbouncer", "cpu_us_per_tx"),
                  _f(s.med("rtt", "pypool", "cpu_us_per_tx"), "{:.1f}"),
                  _f(s.med("rtt", "pgbouncer", "cpu_us_per_tx"), "{:.1f}")]
        out.append("| " + " | ".join(cells) + " |")
    mem = [r for r in s.rows if r["workload"] == "memory"]
    if mem:
        conns = next((r["clients"] for r in mem), "")
        cells = [f"RSS with {int(float(conns)):,} idle clients (MiB)", "n/a"]
        for t in ["pypool", "pgbouncer"] + (["pgcat"] if has_pgcat else []):
            v = s.med("memory", t, "rss_kib")
            cells.append(_f(v / 1024 if v else None, "{:.1f}"))
        cells += [_ratio_cell(s, "memory", "pypool", "pgbouncer", "rss_kib") + " (RSS)", "", "", ""]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.extend(goals_section(s))

    # ---- all pgbench measurements
    out.append("## All pgbench measurements\n")
    out.append("TPS and latency average from pgbench's summary; p99 of each run from pgbench's "
               "per-transaction `--log` (every transaction), then the median over rounds. "
               "Pooler CPU: utime+stime of the pooler's processes "
               "from `/proc/<pid>/stat` before and after the run, divided by the transactions pgbench "
               "completed; of it, stime (the kernel: system calls, the TCP stack) is the next column.\n")
    head = ["workload", "target", "TPS (min–max)", "lat avg ms", "lat p99 ms", "pooler CPU µs/tx", "of it system",
            "TPS vs PgBouncer", "CPU vs PgBouncer", "note"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for wl in pg_wls:
        for t in s.targets_for(wl):
            notes = []
            share = s.med(wl, t, "replica_share")
            if share is not None:
                what = "-S reads" if wl.startswith("mixed") else "transactions"
                notes.append(f"{share:.0%} of {what} counted on the replicas")
            for r in s.other.get((wl, t), []):
                notes.append(f"round {r['round']}: {r['status']}: {r['note']}")
            cells = [titles.get(wl, wl) if t == s.targets_for(wl)[0] else "", LABELS.get(t, t),
                     _tps_cell(s, wl, t),
                     _f(_div(s.med(wl, t, "lat_avg_us"), 1000), "{:.3f}"),
                     _f(_div(s.med(wl, t, "lat_p99_us"), 1000), "{:.3f}"),
                     _f(s.med(wl, t, "cpu_us_per_tx"), "{:.1f}"),
                     _f(s.med(wl, t, "sys_us_per_tx"), "{:.1f}"),
                     _ratio_cell(s, wl, t, "pgbouncer", "tps") if t.startswith(_COMPARED) else "",
                     _ratio_cell(s, wl, t, "pgbouncer", "cpu_us_per_tx") if t.startswith(_COMPARED) else "",
                     _dedupe(notes)]
            out.append("| " + " | ".join(cells) + " |")
    out.append("")

    if any(r["workload"] == "rtt" for r in s.rows):
        out.append("## Single-client `SELECT 1` round trip\n")
        out.append("One connection, simple-protocol `Query('SELECT 1')`, one query in flight; each round trip "
                   "timed with `perf_counter_ns` from sending the message to reading `ReadyForQuery`, after 200 "
                   "untimed warm-up queries (client: `benchmarks/pgwire.py`).\n")
        head = ["target", "p50 µs", "p99 µs", "avg µs", "queries/s", "pooler CPU µs/query", "p50 vs PgBouncer", "note"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for t in s.targets_for("rtt"):
            notes = [f"round {r['round']}: {r['status']}: {r['note']}" for r in s.other.get(("rtt", t), [])]
            out.append("| " + " | ".join([
                LABELS.get(t, t), _f(s.med("rtt", t, "lat_p50_us"), "{:.1f}"), _f(s.med("rtt", t, "lat_p99_us"), "{:.1f}"),
                _f(s.med("rtt", t, "lat_avg_us"), "{:.1f}"), _f(s.med("rtt", t, "tps")),
                _f(s.med("rtt", t, "cpu_us_per_tx"), "{:.1f}"),
                _ratio_cell(s, "rtt", t, "pgbouncer", "lat_p50_us") if t != "pgbouncer" and t != "direct" else "",
                _dedupe(notes)]) + " |")
        out.append("")

    if mem:
        out.append("## Memory with idle clients\n")
        out.append("A freshly started pooler; one client runs 10 queries (warm pool), then RSS (`VmRSS` from "
                   "`/proc/<pid>/status`) is read; then N client connections complete startup and SCRAM-SHA-256 "
                   "login and stay idle; 2 s later RSS is read again.\n")
        head = ["target", "idle clients", "RSS before (MiB)", "RSS with clients (MiB)", "KiB per idle client",
                "logins/s", "note"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in mem:
            before, after, n = _num(r["rss_idle_kib"]), _num(r["rss_kib"]), _num(r["connections"])
            per = (after - before) / n if before is not None and after is not None and n else None
            rate = n / _num(r["duration_s"]) if n and _num(r["duration_s"]) else None
            out.append("| " + " | ".join([
                LABELS.get(r["target"], r["target"]), _f(n), _f(_div(before, 1024), "{:.1f}"),
                _f(_div(after, 1024), "{:.1f}"), _f(per, "{:.2f}"), _f(rate),
                r["status"] if r["status"] != "ok" else ""]) + " |")
        out.append("")

    problems = [r for r in s.rows if r["status"] != "ok"]
    unavailable = meta.get("unavailable")
    if problems or unavailable:
        out.append("## Not measured, skipped or failed\n")
        if unavailable:
            for part in unavailable.split("; "):
                out.append("- " + " ".join(part.split()))
        seen = set()
        for r in problems:
            key = (r["workload"], r["target"], r["status"], r["note"][:80])
            if key in seen or r["status"] == "not-available":
                continue
            seen.add(key)
            note = " ".join(r["note"].split())
            out.append(f"- {r['workload']} / {r['target']} (round {r['round']}): {r['status']}: {note}")
        out.append("")

    out.append("## Environment\n")
    for k in ("git", "pypool", "python", "pgbench", "pgbouncer", "pgcat", "cpus", "loadavg_start", "loadavg_end",
              "elapsed_min"):
        if meta.get(k):
            out.append(f"- {k}: {meta[k]}")
    out.append("")
    return "\n".join(out)


GOALS_MIB = 100  # 10,000 idle clients in at most this RSS
SCALING_WORKLOADS = ("select-c1", "select-c16", "select-c64", "select-c256", "select-c1000")


def goals_section(s: Summary) -> list[str]:
    """The targets of issue 16, each with this run's figure and whether it is met."""
    rows: list[tuple[str, str, bool | None]] = []

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("met" if ok else "**missed**")

    def at_least(goal: str, value: float | None, bound: float, fmt: str = "{:.2f} x") -> None:
        rows.append((goal, _f(value, fmt), None if value is None else value >= bound))

    def at_most(goal: str, value: float | None, bound: float, fmt: str = "{:.2f} x") -> None:
        rows.append((goal, _f(value, fmt), None if value is None else value <= bound))

    own16 = s.med("select-c16", "pypool", "cpu_us_per_tx")
    for wl in ("select-c16", "select-c64", "select-c256", "select-c1000", "select-ext-c16", "tpcb-c16"):
        at_least(f"{wl}: pypool TPS >= 0.9 x PgBouncer", s.ratio(wl, "pypool", "pgbouncer", "tps")[0], 0.9)
        at_most(f"{wl}: pypool CPU per transaction <= 1.5 x PgBouncer's",
                s.ratio(wl, "pypool", "pgbouncer", "cpu_us_per_tx")[0], 1.5)
        cpu = s.med(wl, "pypool", "cpu_us_per_tx")
        if wl in ("select-c256", "select-c1000"):
            at_most(f"{wl}: pypool CPU per transaction <= 1.15 x its own at 16 clients",
                    None if cpu is None or not own16 else cpu / own16, 1.15)
    for wl in ("select-c16", "select-c64", "select-c256", "select-c1000"):
        at_least(f'{wl}: workers = "auto" TPS >= 1.0 x PgBouncer', s.ratio(wl, "pypool-auto", "pgbouncer", "tps")[0],
                 1.0)
    split, plain = s.med("rw-split-c64", "pypool-rw", "cpu_us_per_tx"), s.med("select-c64", "pypool", "cpu_us_per_tx")
    at_most("rw-split-c64: split CPU per transaction <= plain path's (select-c64) + 5 µs",
            None if split is None or plain is None else split - plain, 5.0, "{:+.1f} µs")
    at_most("select-connect-c16: pypool CPU per login + transaction <= 2 x PgBouncer's",
            s.ratio("select-connect-c16", "pypool", "pgbouncer", "cpu_us_per_tx")[0], 2.0)
    # Context, not targets: what the floor relay (no framing, no pooling) reaches is the room a pooler
    # has under the targets above; at one fixed rate CPU per transaction compares costs alone.
    for wl in ("select-c16", "select-ext-c16"):
        for measure, what in (("tps", "TPS"), ("cpu_us_per_tx", "CPU per transaction")):
            rows.append((f"{wl} (context): {LABELS['floor']} {what} / PgBouncer's",
                         _f(s.ratio(wl, "floor", "pgbouncer", measure)[0], "{:.2f} x"), None))
    for t in ("floor", "pypool"):
        rows.append((f"select-rate-c16 (context): {LABELS[t]} CPU per transaction / PgBouncer's at the same rate",
                     _f(s.ratio("select-rate-c16", t, "pgbouncer", "cpu_us_per_tx")[0], "{:.2f} x"), None))
    rss = s.med("memory", "pypool", "rss_kib")
    clients = next((int(float(r["connections"] or 0)) for r in s.ok.get(("memory", "pypool"), [])), 0)
    rows.append((f"10,000 idle clients in <= {GOALS_MIB} MiB RSS",
                 "–" if rss is None else f"{rss / 1024:.0f} MiB with {clients:,} clients",
                 None if rss is None else rss / 1024 <= GOALS_MIB and clients >= 10_000))
    out = ["## Targets (issue 16)\n", "| target | this run | verdict |", "|---|---|---|"]
    out += [f"| {goal} | {value} | {verdict(ok)} |" for goal, value, ok in rows]
    out.append("")
    return out


def cpu_by_clients(s: Summary, targets: Sequence[str] = ("pypool", "pypool-auto", "pgbouncer", "pgcat")
                   ) -> dict[str, list[tuple[int, float]]]:
    """Per target, (clients, median CPU µs per transaction) over the read-only workloads, by clients."""
    out: dict[str, list[tuple[int, float]]] = {}
    for target in targets:
        points = []
        for wl in SCALING_WORKLOADS:
            cpu = s.med(wl, target, "cpu_us_per_tx")
            rows = s.ok.get((wl, target), [])
            if cpu is not None and rows:
                points.append((int(float(rows[0]["clients"])), cpu))
        if points:
            out[target] = sorted(points)
    return out


def _div(v: float | None, d: float) -> float | None:
    return None if v is None else v / d


def _dedupe(notes: list[str]) -> str:
    seen, out = set(), []
    for n in notes:
        n = " ".join(n.replace("|", "/").split())
        if n not in seen:
            seen.add(n)
            out.append(n)
    return "; ".join(out)


# --------------------------------------------------------------------------
# chart


def label_layout(values: Sequence[float | None], above: Sequence[float] | None) -> tuple[list[float], float]:
    """Heights of the value labels of a bar panel, and the top of its y axis.

    ``above`` is how far each whisker reaches above its bar. A label sits just
    above its whisker (not on the bar, where the whisker would cross it) and
    the axis ends above the highest label, so no whisker or label is cut off.
    """
    ends = [(v or 0) + (above[i] if above else 0) for i, v in enumerate(values)]
    top = max(ends + [1])
    pad = top * 0.02
    return [end + pad for end in ends], top * 1.15


def chart(rows: Sequence, meta: dict, workloads: Sequence, path: Path) -> str | None:
    """Small multiples: TPS per pgbench workload, SELECT 1 latency, CPU per tx, memory.

    Returns None on success, or why no chart was drawn.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no chart"
    s = Summary(rows)
    titles = {w.name: w.title for w in workloads}
    # Panel titles in words; the pgbench options stay in the second line for those who want them.
    short = {
        "select-c1": "Read-only, 1 client\n(pgbench -S)", "select-c16": "Read-only, 16 clients\n(pgbench -S)",
        "select-c64": "Read-only, 64 clients\n(pgbench -S)", "select-c256": "Read-only, 256 clients\n(pgbench -S)",
        "select-c1000": "Read-only, 1,000 clients\n(pgbench -S)",
        "select-ext-c16": "Read-only, extended protocol, 16 clients\n(pgbench -S -M extended)",
        "tpcb-c16": "Read-write (TPC-B-like), 16 clients\n(pgbench default script)",
        "select-connect-c16": "New connection per transaction, 16 clients\n(pgbench -S -C)",
        "rw-split-c64": "Read/write split, 64 clients: pypool reads\nfrom 2 replicas, PgBouncer from the primary",
        "select-rate-c16": "Read-only, 16 clients, a fixed 8,000 TPS\n(pgbench -S -R 8000: CPU at equal work)",
    }
    tick = {"select-c1": "read\n1 cl", "select-c16": "read\n16 cl", "select-c64": "read\n64 cl",
            "select-c256": "read\n256 cl", "select-c1000": "read\n1000 cl", "select-ext-c16": "read ext\n16 cl", "tpcb-c16": "read-write\n16 cl",
            "select-connect-c16": "connect\n16 cl", "rw-split-c64": "split\n64 cl", "select-rate-c16": "8k TPS\n16 cl"}
    pg_wls = [w.name for w in workloads if w.kind == "pgbench" and any(
        r["workload"] == w.name and r["status"] == "ok" for r in s.rows)]
    has_rtt = bool(s.targets_for("rtt")) and any(s.med("rtt", t, "lat_p50_us") for t in s.targets_for("rtt"))
    has_mem = any(s.med("memory", t, "rss_kib") for t in s.targets_for("memory"))
    cpu_wls = [wl for wl in pg_wls if s.med(wl, s.pypool_name(wl) or "pypool", "cpu_us_per_tx") is not None]
    shown = ("pypool", "pypool-auto", "pypool-base", "pypool-compiled", "pgbouncer", "pgcat")
    scaling = {t: pts for t, pts in cpu_by_clients(s, shown).items() if len(pts) > 1}
    panels = len(pg_wls) + has_rtt + bool(cpu_wls) + bool(scaling) + has_mem + 1
    cols = 4
    nrows = math.ceil(panels / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows + 0.8), squeeze=False)
    flat = [ax for row in axes for ax in row]
    used = 0
    all_targets: list[str] = []

    def bars(ax, names, values, errs=None, fmt="{:,.0f}", colors=None):
        xs = range(len(names))
        cols_ = colors or [COLORS.get(n, "#444") for n in names]
        b = ax.bar(xs, [v or 0 for v in values], color=cols_, yerr=errs, capsize=3 if errs else 0,
                   error_kw={"elinewidth": 1, "ecolor": "#333"})
        label_ys, ylim_top = label_layout(values, errs[1] if errs else None)
        for rect, v, y in zip(b, values, label_ys):
            ax.text(rect.get_x() + rect.get_width() / 2, y,
                    "n/a" if v is None else fmt.format(v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([LABELS.get(n, n).replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_ylim(0, ylim_top)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)

    for wl in pg_wls:
        ax = flat[used]
        used += 1
        names = [t for t in s.targets_for(wl) if s.med(wl, t, "tps") is not None]
        all_targets += [n for n in names if n not in all_targets]
        vals = [s.med(wl, t, "tps") for t in names]
        errs = None
        if any(s.n(wl, t) > 1 for t in names):
            lo = [v - s.range(wl, t, "tps")[0] for v, t in zip(vals, names)]
            hi = [s.range(wl, t, "tps")[1] - v for v, t in zip(vals, names)]
            errs = [lo, hi]
        bars(ax, names, vals, errs)
        ax.set_title(short.get(wl, titles.get(wl, wl)), fontsize=10)
        ax.set_ylabel("transactions/s", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    if has_rtt:
        ax = flat[used]
        used += 1
        names = [t for t in s.targets_for("rtt") if s.med("rtt", t, "lat_p50_us") is not None]
        import numpy as np

        x = np.arange(len(names))
        p50 = [s.med("rtt", t, "lat_p50_us") for t in names]
        p99 = [s.med("rtt", t, "lat_p99_us") for t in names]
        c = [COLORS.get(n, "#444") for n in names]
        b1 = ax.bar(x - 0.2, p50, 0.4, color=c, label="p50")
        b2 = ax.bar(x + 0.2, p99, 0.4, color=c, alpha=0.45, hatch="//", label="p99")
        top = max(p99 + [1])
        for rects, vals in ((b1, p50), (b2, p99)):
            for rect, v in zip(rects, vals):
                ax.text(rect.get_x() + rect.get_width() / 2, v * 1.08, f"{v:.0f}", ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(list(x))
        ax.set_xticklabels([LABELS.get(n, n).replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(min(p50) / 2, top * 2.5)
        ax.set_title("SELECT 1 round trip, 1 client, log scale\n(solid p50, hatched p99; lower is better)",
                     fontsize=10)
        ax.set_ylabel("µs", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    if cpu_wls:
        ax = flat[used]
        used += 1
        import numpy as np

        poolers = ["pypool", "pgbouncer"] + (["pgcat"] if any(s.med(w, "pgcat", "cpu_us_per_tx") for w in cpu_wls) else [])
        x = np.arange(len(cpu_wls))
        width = 0.8 / len(poolers)
        all_vals: list[float] = []
        for i, p in enumerate(poolers):
            vals = []
            for wl in cpu_wls:
                name = p
                if wl.startswith("rw-split") and p != "pgbouncer":
                    name = p + "-rw"
                vals.append(s.med(wl, name, "cpu_us_per_tx") or 0)
            all_vals += [v for v in vals if v]
            rects = ax.bar(x + (i - (len(poolers) - 1) / 2) * width, vals, width, color=COLORS[p], label=LABELS[p])
            for rect, v in zip(rects, vals):
                if v:
                    ax.text(rect.get_x() + rect.get_width() / 2, v * 1.08, f"{v:.0f}", ha="center",
                            va="bottom", fontsize=6)
        ax.set_xticks(list(x))
        ax.set_xticklabels([tick.get(w, w) for w in cpu_wls], fontsize=6)
        ax.set_title("pooler CPU µs per transaction, log scale\n(lower is better)", fontsize=10)
        ax.set_ylabel("µs CPU / transaction", fontsize=8)
        ax.set_yscale("log")
        if all_vals:
            ax.set_ylim(min(all_vals) / 2, max(all_vals) * 3)
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.set_axisbelow(True)
        ax.legend(fontsize=7, loc="upper left")
    if scaling:
        ax = flat[used]
        used += 1
        for target, points in scaling.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", color=COLORS.get(target, "#444"), label=LABELS.get(target, target))
            ax.annotate(f"{ys[-1]:.0f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 0), fontsize=7,
                        va="center")
        ax.set_xscale("log")
        ax.minorticks_off()
        ticks = sorted({x for pts in scaling.values() for x, _ in pts})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{x:,}" for x in ticks], fontsize=8)
        ax.set_ylim(bottom=0)
        ax.set_title("pooler CPU µs per read-only transaction\nby number of clients (flat is best)", fontsize=10)
        ax.set_xlabel("clients (pgbench -S), log scale", fontsize=8)
        ax.set_ylabel("µs CPU / transaction", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    if has_mem:
        ax = flat[used]
        used += 1
        names = [t for t in s.targets_for("memory") if s.med("memory", t, "rss_kib")]
        n = next((int(float(r["clients"])) for r in s.rows if r["workload"] == "memory"), 0)
        bars(ax, names, [s.med("memory", t, "rss_kib") / 1024 for t in names], fmt="{:.0f} MiB")
        ax.set_title(f"RSS with {n:,} idle clients\n(lower is better)", fontsize=10)
        ax.set_ylabel("MiB", fontsize=8)
    # legend + notes panel
    ax = flat[used]
    used += 1
    ax.axis("off")
    from matplotlib.patches import Patch

    with_data = {t for (w, t), rs in s.ok.items() if rs}
    shown = [t for t in LABELS if t in with_data]
    ax.legend(handles=[Patch(color=COLORS[t], label=LABELS[t]) for t in shown], loc="upper left", fontsize=9,
              frameon=False)
    text = (f"median of {meta.get('rounds')} round(s), {meta.get('duration_s')} s each;\n"
            f"whiskers: min–max over rounds; cl = clients\npgbench scale {meta.get('scale')}, pool size {meta.get('pool_size')},\n"
            f"transaction mode, {meta.get('cpus')} cores shared by\nPostgreSQL x3, pooler and pgbench\n"
            f"run {meta.get('run_id', '')}")
    missing = sorted({LABELS.get(t, t) for t in (r["target"] for r in s.rows if r["status"] == "not-available")})
    if missing:
        text += "\nnot measured here: " + ", ".join(missing)
    ax.text(0.0, 0.35, text, fontsize=8, va="top", transform=ax.transAxes)
    for ax in flat[used:]:
        ax.axis("off")
    fig.suptitle("Throughput of pypool, PgBouncer and PostgreSQL without a pooler: transactions per second "
                 "(higher is better), then latency, CPU and memory", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def redraw(csv_path: Path, scale: int, pool_size: int, out: Path) -> str | None:
    """Draw the chart again from a run's CSV (e.g. after a change to the chart), without measuring."""
    import collections
    import os

    from benchmarks.run import WORKLOADS

    rows = read_csv(csv_path)
    # The run's --duration: what most rows ran for (the round-trip and memory rows take their own time).
    durations = collections.Counter(r["duration_s"] for r in rows if r["duration_s"]).most_common(1)
    meta = {"run_id": rows[0]["run_id"], "rounds": str(max(int(r["round"]) for r in rows)),
            "duration_s": durations[0][0] if durations else "?", "scale": str(scale), "pool_size": str(pool_size),
            "cpus": str(os.cpu_count())}
    return chart(rows, meta, WORKLOADS, out)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="Redraw the chart of a benchmark run from its CSV.")
    parser.add_argument("csv", type=Path, help="a run's CSV, e.g. benchmarks/results/<run id>.csv")
    parser.add_argument("--scale", type=int, default=10, help="the run's pgbench scale (default 10)")
    parser.add_argument("--pool-size", type=int, default=20, help="the run's pool size (default 20)")
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "results" / "latest.png")
    args = parser.parse_args()
    problem = redraw(args.csv, args.scale, args.pool_size, args.output)
    raise SystemExit(f"no chart: {problem}" if problem else 0)
