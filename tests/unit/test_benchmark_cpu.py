"""The benchmark's CPU figures: user and system time of a process tree, and the report's system column."""

from __future__ import annotations

import os

from benchmarks.report import markdown
from benchmarks.run import WORKLOADS
from benchmarks.targets import cpu_time


def test_kernel_work_counts_as_system_time_and_python_work_as_user_time():
    before = cpu_time(os.getpid())
    buffer = bytearray(1 << 20)
    with open("/dev/zero", "rb", buffering=0) as zero:
        for _ in range(5_000):
            zero.readinto(buffer)  # the kernel fills 1 MiB each time
    middle = cpu_time(os.getpid())
    total = 0
    for i in range(3_000_000):
        total += i
    after = cpu_time(os.getpid())
    assert middle.system - before.system > middle.user - before.user
    assert after.user - middle.user > after.system - middle.system
    assert after.total == after.user + after.system


def _row(target: str, cpu: float, sys: float | None) -> dict:
    row = {"workload": "select-c16", "target": target, "status": "ok", "clients": "16", "round": "1",
           "tps": "1000", "cpu_us_per_tx": str(cpu), "note": ""}
    if sys is not None:  # runs recorded before the column existed have no such key
        row["sys_us_per_tx"] = str(sys)
    return row


def test_the_report_shows_the_system_share_and_reads_runs_without_it():
    text = markdown([_row("pypool", 30.0, 9.5), _row("pgbouncer", 12.0, None)], {}, WORKLOADS, "x.csv")
    assert "| pooler CPU µs/tx | of it system |" in text
    assert "| 30.0 | 9.5 |" in text
    assert "| 12.0 | – |" in text
