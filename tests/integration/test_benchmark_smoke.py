"""The benchmark harness (benchmarks/run.py) end to end, in its smallest form.

One workload (pgbench -S, 16 clients, 2 s), pypool and PostgreSQL directly,
one round, pgbench scale 1 in its own database: checks that the harness
starts pypool from a generated config, drives pgbench through it and writes a
CSV with a throughput for both targets. The real benchmark is opt-in:
``python -m benchmarks.run`` (see benchmarks/README.md).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_harness_smoke(tmp_path: Path, pg_cluster) -> None:
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--targets", "direct,pypool", "--workloads", "select-c16",
         "--duration", "2", "--rounds", "1", "--scale", "1", "--warmup", "0", "--no-chart",
         "--results-dir", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    csvs = sorted(results.glob("*.csv"))
    assert len(csvs) == 1, list(results.iterdir())
    with open(csvs[0], newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["workload"] == "select-c16"]
    by_target = {r["target"]: r for r in rows}
    assert set(by_target) == {"direct", "pypool"}, rows
    for target, row in by_target.items():
        assert row["status"] == "ok", (target, row["note"], proc.stdout[-2000:])
        assert float(row["tps"]) > 0, (target, row)
        assert int(row["transactions"]) > 0, (target, row)
    # pypool's own CPU time was read from /proc
    assert float(by_target["pypool"]["cpu_us_per_tx"]) > 0
    assert (results / "latest.md").read_text().count("pypool") > 0
