"""The benchmark chart's bar panels: value labels clear their whiskers, and the axis holds every whisker."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import Summary, label_layout, read_csv

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
