"""The benchmark harness (benchmarks/run.py) end to end.

The default test runs a small slice in about a minute: pgbench -S at 64
clients against PostgreSQL directly, pypool and pypool with ``workers = "auto"``,
the raw-socket SELECT 1 round trip, and the RSS with a few hundred idle
clients, pgbench scale 1 in its own database, and a fixed rate through the uvloop
floor relay and pypool. It checks that the harness
starts pypool (one process and a supervisor with a worker per core) from generated
configs, drives real pgbench through them, reads the poolers' CPU from /proc
and writes the CSV, the markdown report and the chart.

``PYPOOL_BENCH_QUICK=1`` also runs ``python -m benchmarks.run --quick``: the
whole matrix, PgBouncer included (installed with apt-get if missing), one
round of 3 s cells, about 4 minutes. The real benchmark stays a manual
command (README, "Benchmarks").
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run_benchmark(results: Path, *args: str, timeout: float) -> dict[tuple[str, str], dict]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--results-dir", str(results), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    csvs = sorted(results.glob("*.csv"))
    assert len(csvs) == 1, list(results.iterdir())
    with open(csvs[0], newline="") as fh:
        return {(r["workload"], r["target"]): r for r in csv.DictReader(fh)}


def test_benchmark_harness_smoke(tmp_path: Path, pg_cluster) -> None:
    results = tmp_path / "results"
    rows = run_benchmark(results, "--targets", "direct,floor,pypool,pypool-auto",
                         "--workloads", "select-c64,select-rate-c16,rtt,memory",
                         "--duration", "2", "--rounds", "1", "--scale", "1", "--warmup", "0",
                         "--rtt-queries", "300", "--memory-clients", "200", timeout=240)
    for target in ("direct", "pypool", "pypool-auto"):
        row = rows[("select-c64", target)]
        assert row["status"] == "ok", (target, row["note"])
        assert float(row["tps"]) > 0 and int(row["transactions"]) > 0, row
        assert int(row["failed"] or 0) == 0, row
    for target in ("pypool", "pypool-auto"):  # pooler CPU from /proc (all of pypool-auto's processes)
        assert float(rows[("select-c64", target)]["cpu_us_per_tx"]) > 0
    for target in ("floor", "pypool"):  # the same fixed rate through the cheapest relay and through pypool
        row = rows[("select-rate-c16", target)]
        assert row["status"] == "ok", (target, row["note"])
        assert int(row["failed"] or 0) == 0 and float(row["cpu_us_per_tx"]) > 0, row
    for target in ("direct", "pypool"):
        rtt = rows[("rtt", target)]
        assert rtt["status"] == "ok", rtt["note"]
        assert 0 < float(rtt["lat_p50_us"]) <= float(rtt["lat_p99_us"]), rtt
    memory = rows[("memory", "pypool")]
    assert memory["status"] == "ok", memory["note"]
    assert int(memory["connections"]) == 200
    assert int(memory["rss_kib"]) > int(memory["rss_idle_kib"]) > 0
    report = (results / "latest.md").read_text()
    assert "## Targets (issue 16)" in report
    assert 'select-c64: workers = "auto" TPS' in report
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (results / "latest.png").stat().st_size > 10_000


@pytest.mark.skipif(os.environ.get("PYPOOL_BENCH_QUICK") != "1",
                    reason="the whole matrix in quick mode takes minutes: set PYPOOL_BENCH_QUICK=1")
def test_benchmark_quick_mode_runs_the_whole_matrix(tmp_path: Path, pg_cluster) -> None:
    rows = run_benchmark(tmp_path / "results", "--quick", "--no-chart", timeout=1200)
    problems = {key: row["note"] for key, row in rows.items()
                if row["status"] not in ("ok", "skipped", "not-available")}
    assert not problems, problems
    for workload in ("select-c1", "select-c16", "select-c64", "select-ext-c16", "tpcb-c16", "select-connect-c16",
                     "rtt", "memory"):
        for target in ("pypool", "pgbouncer"):
            assert rows[(workload, target)]["status"] == "ok", (workload, target, rows[(workload, target)]["note"])
    assert rows[("select-c64", "pypool-auto")]["status"] == "ok"
    assert rows[("rw-split-c64", "pypool-rw")]["status"] == "ok"
    assert float(rows[("rw-split-c64", "pypool-rw")]["replica_share"]) > 0.5
