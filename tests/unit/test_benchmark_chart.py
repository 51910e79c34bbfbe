"""The benchmark chart's bar panels: value labels clear their whiskers, and the axis holds every whisker."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.report import Summary, chart, cpu_by_clients, goals_section, label_layout, markdown, read_csv

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_labels_sit_above_the_whiskers_inside_the_axes():
    csv = sorted(RESULTS.glob("2*.csv"))[-1]  # the latest stored run
    s = Summary(read_csv(csv))
    panels = 0
    for workload in ("select-c1", "select-c16", "select-c64", "tpcb-c16", "select-connect-c16", "rw-split-c64"):
        names = [t for t in s.targets_for(workload) if s.med(workload, t, "tps") is not None]
        if not names:
            continue
        panels += 1
        values = [s.med(workload, t, "tps") for t in names]
        highs = [s.range(workload, t, "tps")[1] for t in names]
        label_ys, ylim_top = label_layout(values, [h - v for h, v in zip(highs, values)])
        for value, high, y in zip(values, highs, label_ys):
            assert y > high >= value  # above the whisker, which would cross a label on the bar
        assert ylim_top > max(label_ys)  # no whisker or label leaves the axes
    assert panels >= 4


def test_without_whiskers_labels_sit_on_the_bars():
    label_ys, ylim_top = label_layout([100.0, None, 50.0], None)
    assert label_ys[0] > 100 and label_ys[2] > 50 and label_ys[1] < 50
    assert ylim_top > max(label_ys)


def _row(workload: str, target: str, clients: int, cpu: float, round_: int = 1) -> dict:
    return {"workload": workload, "target": target, "status": "ok", "clients": str(clients), "round": str(round_),
            "cpu_us_per_tx": str(cpu), "tps": "1000"}


def test_cpu_by_clients_is_one_sorted_series_per_target_of_round_medians():
    rows = [_row("select-c256", "pypool", 256, 50.0), _row("select-c16", "pypool", 16, 40.0),
            _row("select-c16", "pypool", 16, 44.0, round_=2), _row("select-c16", "pypool", 16, 90.0, round_=3),
            _row("select-c16", "pgbouncer", 16, 20.0), _row("tpcb-c16", "pypool", 16, 300.0),
            {**_row("select-c64", "pypool", 64, 1.0), "status": "error"}]
    series = cpu_by_clients(Summary(rows))
    assert series == {"pypool": [(16, 44.0), (256, 50.0)], "pgbouncer": [(16, 20.0)]}


def test_chart_draws_the_cpu_by_clients_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.run import WORKLOADS

    rows = [_row(f"select-c{n}", t, n, cpu) for n in (16, 64, 256, 1000)
            for t, cpu in (("pypool", 40.0 + n / 100), ("pgbouncer", 22.0))]
    out = tmp_path / "chart.png"
    assert chart(rows, {"rounds": "1"}, WORKLOADS, out) is None
    assert out.stat().st_size > 10_000


def test_targets_list_the_floor_relay_at_full_speed_as_context():
    rows = [{**_row("select-c16", "floor", 16, 15.0), "tps": "900"}, _row("select-c16", "pgbouncer", 16, 12.0),
            _row("select-c16", "pypool", 16, 30.0)]
    lines = "\n".join(goals_section(Summary(rows)))
    assert "| select-c16 (context): uvloop relay (floor) TPS / PgBouncer's | 0.90 x | – |" in lines
    assert "| select-c16 (context): uvloop relay (floor) CPU per transaction / PgBouncer's | 1.25 x | – |" in lines
    assert "| select-ext-c16 (context): uvloop relay (floor) TPS / PgBouncer's | – | – |" in lines


def test_the_report_shows_the_system_share_and_reads_runs_without_it():
    from benchmarks.run import WORKLOADS

    rows = [{**_row("select-c16", "pypool", 16, 30.0), "sys_us_per_tx": "9.5"},
            _row("select-c16", "pgbouncer", 16, 12.0)]  # recorded before the column existed: no such key
    text = markdown(rows, {}, WORKLOADS, "x.csv")
    assert "| pooler CPU µs/tx | of it system |" in text
    assert "| 30.0 | 9.5 |" in text
    assert "| 12.0 | – |" in text
