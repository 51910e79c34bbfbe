"""pgbench matrices against pypool, PostgreSQL directly, PgBouncer and (when present) PgCat.

    python -m benchmarks.run [--quick] [--rounds N] [--duration S] [--targets a,b] [--workloads a,b]

The README ("Benchmarks") says what is measured and how. Everything listens on
and connects to 127.0.0.1; every load is bounded by pgbench's ``-T``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pypool import cluster

from benchmarks import pgwire, report
from benchmarks.targets import (
    REPO,
    Target,
    TargetError,
    direct_target,
    install_pgbouncer,
    pgbouncer_target,
    check_importable,
    compiled_snapshot,
    pgcat_binary,
    floor_target,
    pypool_target,
    snapshot_pypool,
)

USER = os.environ.get("POSTGRESQL_USERNAME") or "postgres"
PASSWORD = os.environ.get("POSTGRESQL_PASSWORD") or "mysecretpassword"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONNECT_ALLOWANCE_S = 0.02  # extra pgbench -T seconds per client, for runs with >= 64 clients

POOLERS = ("pypool", "pgbouncer", "pgcat")
ALL_TARGETS = ("direct", "floor", "pypool", "pypool-auto", "pypool-rw", "pypool-rw-auto", "pypool-rw-causal", "pgbouncer",
               "pgcat", "pgcat-rw")
PLAIN = ("direct", "pypool", "pgbouncer", "pgcat")
# pypool-auto (workers = "auto": one process per core) beside one process, where clients scale.
SCALING = PLAIN + ("pypool-auto",)


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    args: tuple[str, ...] = ()
    clients: int = 1
    kind: str = "pgbench"  # pgbench | rtt | memory
    targets: tuple[str, ...] = PLAIN
    options: str = ""  # PGOPTIONS for pgbench's sessions


WORKLOADS: tuple[Workload, ...] = (
    Workload("select-c1", "Read-only (pgbench -S), 1 client", ("-S",), 1),
    # "floor" (benchmarks/floor_relay.py) is the cheapest uvloop relay there is: at 16 clients it
    # shows what any asyncio pooler pays before it frames, pools or routes anything. (At more
    # clients it would open a server connection per client: other work for PostgreSQL.)
    Workload("select-c16", "Read-only (pgbench -S), 16 clients", ("-S",), 16, targets=SCALING + ("floor",)),
    Workload("select-c64", "Read-only (pgbench -S), 64 clients", ("-S",), 64, targets=SCALING),
    Workload("select-c256", "Read-only (pgbench -S), 256 clients", ("-S",), 256, targets=SCALING),
    Workload("select-c1000", "Read-only (pgbench -S), 1,000 clients", ("-S",), 1000, targets=SCALING),
    # A fixed rate every target sustains: each then does the same work per second, so CPU per
    # transaction compares costs alone (a faster pooler finds more events per wake-up, which
    # lowers its CPU per transaction at full speed).
    Workload("select-rate-c16", "Read-only (pgbench -S), 16 clients, fixed rate of 8,000 TPS",
             ("-S", "-R", "8000"), 16, targets=("floor", "pypool", "pgbouncer")),
    Workload("select-ext-c16", "Read-only, extended protocol (-S -M extended), 16 clients",
             ("-S", "-M", "extended"), 16, targets=PLAIN + ("floor",)),
    Workload("tpcb-c16", "Read-write TPC-B-like (pgbench default), 16 clients", (), 16),
    Workload("select-connect-c16", "New connection per transaction (-S -C), 16 clients", ("-S", "-C"), 16),
    # pypool-rw-causal: the same split with causal_reads = "session"; reads that follow no write cost the same.
    Workload("rw-split-c64", "Read-only, 64 clients, reads split over 2 replicas (pypool) vs primary (PgBouncer)",
             ("-S",), 64, targets=("pypool-rw", "pypool-rw-auto", "pypool-rw-causal", "pgbouncer", "pgcat-rw")),
    # Each client mixes writes and reads: with causal reads a read after the client's own write waits
    # for a replica that replayed it. replica_share here is the share of the -S reads the replicas served.
    Workload("mixed-split-c16", "Mixed TPC-B-like 1 : read-only 9, 16 clients, split: causal reads off vs session",
             ("-b", "tpcb-like@1", "-b", "select-only@9"), 16,
             targets=("pypool-rw", "pypool-rw-causal", "pgbouncer", "pgcat-rw")),
    # The same with PostgreSQL's default synchronous_commit = on (the local cluster runs off, so a
    # commit reaches the replicas only at the WAL writer's next flush, up to wal_writer_delay later).
    Workload("mixed-split-sync-c16", "Mixed as above, synchronous_commit = on",
             ("-b", "tpcb-like@1", "-b", "select-only@9"), 16,
             targets=("pypool-rw", "pypool-rw-causal", "pgcat-rw"),  # PgBouncer refuses `options`
             options="-c synchronous_commit=on"),
    Workload("rtt", "SELECT 1 round trip, 1 client", kind="rtt", clients=1),
    Workload("memory", "RSS with idle client connections", kind="memory", targets=("pypool", "pgbouncer")),
)
BY_NAME = {w.name: w for w in WORKLOADS}


@dataclass
class Row:
    """One measurement: one target, one workload, one round. Units are in the names."""

    run_id: str
    round: int
    workload: str
    target: str
    status: str = "ok"  # ok | skipped | error | not-available
    clients: int = 0
    duration_s: float = 0.0
    transactions: int | None = None
    failed: int | None = None
    tps: float | None = None
    lat_avg_us: float | None = None
    lat_p50_us: float | None = None
    lat_p99_us: float | None = None
    pooler_cpu_s: float | None = None
    cpu_us_per_tx: float | None = None
    sys_us_per_tx: float | None = None  # of cpu_us_per_tx, the kernel's share (system calls, the TCP stack)
    rss_kib: int | None = None
    rss_idle_kib: int | None = None
    connections: int | None = None
    replica_share: float | None = None
    read_transactions: int | None = None  # the -S script's share of a mixed workload
    started_at: str = ""
    note: str = ""

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return float(sorted_values[k])


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def pg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("PG") and not k.startswith("PG_"))}
    env.update(PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    return env


# --------------------------------------------------------------------------
# the cluster and the pgbench database


def find_roles() -> tuple[cluster.Node, list[cluster.Node]]:
    by_name = {n.name: n for n in cluster.nodes()}
    rows = cluster.status()
    primaries = [by_name[r["name"]] for r in rows if r["role"] == "primary" and r["accepting"]]
    replicas = [by_name[r["name"]] for r in rows if r["role"] == "replica" and r.get("streaming")]
    if len(primaries) != 1:
        raise SystemExit(f"expected one running primary, cluster status says: {rows}")
    return primaries[0], replicas


def prepare_database(primary: cluster.Node, replicas: list[cluster.Node], db: str, scale: int) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", db):
        raise SystemExit(f"database name {db!r}: use lower-case letters, digits and _")
    if cluster.run_sql(primary, f"SELECT count(*) FROM pg_database WHERE datname = '{db}'") == "0":
        log(f"creating database {db} on {primary.name}")
        cluster.run_sql(primary, f"CREATE DATABASE {db}")
    try:
        counts = cluster.run_sql(primary, "SELECT (SELECT count(*) FROM pgbench_branches) || ' ' || "
                                          "(SELECT count(*) FROM pgbench_accounts)", dbname=db)
    except cluster.ClusterError:
        counts = ""
    if counts != f"{scale} {scale * 100000}":
        log(f"pgbench -i -s {scale} on {primary.name}/{db} (found: {counts or 'no tables'})")
        subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(primary.port),
                        "-U", USER, db], env=pg_env(), check=True, capture_output=True, timeout=900)
    wait_replicas(primary, replicas, db)


def wait_replicas(primary: cluster.Node, replicas: list[cluster.Node], db: str, timeout: float = 300) -> None:
    lsn = cluster.run_sql(primary, "SELECT pg_current_wal_lsn()")
    deadline = time.monotonic() + timeout
    for replica in replicas:
        while cluster.run_sql(replica, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") != "t":
            if time.monotonic() > deadline:
                raise SystemExit(f"replica {replica.name} did not replay up to {lsn} within {timeout:.0f}s")
            time.sleep(0.2)
        cluster.run_sql(replica, "SELECT count(*) FROM pgbench_branches", dbname=db)


def connection_headroom(primary: cluster.Node) -> int:
    """How many more client backends the primary would accept now (the superuser may use reserved slots)."""
    out = cluster.run_sql(primary, "SELECT current_setting('max_connections')::int - "
                                   "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')")
    return int(out)


def replica_account_reads(replicas: list[cluster.Node], db: str) -> int:
    """Index scans of pgbench_accounts on the replicas: one per -S transaction they served.

    Not xact_commit: pypool's monitor (and its causal-read checks) commit transactions there too.
    """
    total = 0
    for node in replicas:
        try:
            total += int(cluster.run_sql(node, "SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_tables "
                                               "WHERE relname = 'pgbench_accounts'", dbname=db))
        except (cluster.ClusterError, ValueError):
            pass
    return total


def replica_commits(replicas: list[cluster.Node], db: str) -> int:
    total = 0
    for node in replicas:
        try:
            total += int(cluster.run_sql(node, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'"))
        except (cluster.ClusterError, ValueError):
            pass
    return total


def settled_replica_commits(replicas: list[cluster.Node], db: str, limit: float = 12.0,
                            counter=replica_commits) -> int:
    """Backends publish their counters at most once a second while busy and some seconds after
    going idle: poll until the replicas' sum stops moving."""
    deadline = time.monotonic() + limit
    last = counter(replicas, db)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = counter(replicas, db)
        if now == last:
            break
        last = now
    return last


# --------------------------------------------------------------------------
# one pgbench run


_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def parse_pgbench(out: str) -> dict:
    def grab(pattern: str, conv=float):
        m = re.search(pattern, out)
        return conv(m.group(1)) if m else None

    return {
        "transactions": grab(r"number of transactions actually processed: (\d+)", int),
        "failed": grab(r"number of failed transactions: (\d+)", int),
        "lat_avg_ms": grab(r"latency average = " + _NUM + " ms"),
        "tps": grab(r"tps = " + _NUM),
        # with several -b scripts: the transactions of pgbench's builtin select-only script
        "select_only": grab(r"<builtin: select only>\n - weight: [^\n]*\n - (\d+) transactions", int),
    }


def read_latency_logs(prefix: Path) -> tuple[list[int], list[float]]:
    """Per-transaction latencies (µs) and end times (epoch seconds) from pgbench --log files
    ``prefix.<pid>[.<thread>]`` (columns: client, transaction, latency, script, epoch s, µs)."""
    lat: list[int] = []
    ends: list[float] = []
    for path in prefix.parent.glob(prefix.name + ".*"):
        with open(path, "rb") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and parts[2].isdigit():  # "failed"/"skipped" are not latencies
                    lat.append(int(parts[2]))
                    ends.append(int(parts[4]) + int(parts[5]) / 1e6)
        path.unlink()
    lat.sort()
    return lat, ends


def established(port: int) -> int:
    """TCP connections established to 127.0.0.1:``port`` (the pooler's side), from /proc/net/tcp."""
    local = f"0100007F:{port:04X}"
    count = 0
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split(None, 4)
            if fields[1] == local and fields[3] == "01":
                count += 1
    return count


def run_pgbench(target: Target, wl: Workload, duration: float, scratch: Path, row: Row) -> Row:
    """One pgbench run. A pooler's CPU per transaction counts from the moment every client is
    connected (its logins are not spread over the transactions; ``-C`` runs count everything)."""
    prefix = scratch / f"pgbench-{row.round}-{wl.name}-{target.name}"
    jobs = 1 if wl.clients < 2 else 2
    # pgbench's -T clock starts before its clients have logged in; with many clients
    # (a SCRAM login each) that can eat seconds, so give them that time on top.
    seconds = int(duration) + (math.ceil(wl.clients * CONNECT_ALLOWANCE_S) if wl.clients >= 64 else 0)
    argv = ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(target.port), "-U", USER,
            "-c", str(wl.clients), "-j", str(jobs), "-T", str(seconds), *wl.args,
            "--log", f"--log-prefix={prefix}", target.database]
    row.clients, row.duration_s = wl.clients, seconds
    steady = target.is_pooler and "-C" not in wl.args
    cpu0 = target.cpu() if target.is_pooler and not steady else None
    since = 0.0
    env = {**pg_env(), **({"PGOPTIONS": wl.options} if wl.options else {})}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(scratch))
    deadline = time.monotonic() + seconds + 90
    while steady and cpu0 is None and proc.poll() is None and time.monotonic() < deadline:
        if established(target.port) >= wl.clients:
            cpu0, since = target.cpu(), time.time()
        else:
            time.sleep(0.02)
    try:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, rc = f"pgbench timed out after {seconds + 90:.0f}s\n{proc.communicate()[0]}", -1
    cpu1 = target.cpu() if target.is_pooler else None
    parsed = parse_pgbench(out)
    lat, ends = read_latency_logs(prefix)
    row.transactions, row.failed, row.tps = parsed["transactions"], parsed["failed"], parsed["tps"]
    row.read_transactions = parsed["select_only"]
    if parsed["lat_avg_ms"] is not None:
        row.lat_avg_us = round(parsed["lat_avg_ms"] * 1000, 1)
    if lat:
        row.lat_p50_us, row.lat_p99_us = percentile(lat, 50), percentile(lat, 99)
    counted = sum(1 for end in ends if end >= since) if steady else row.transactions
    if cpu0 is not None and cpu1 is not None:
        spent = cpu1.total - cpu0.total
        row.pooler_cpu_s = round(spent, 3)
        if counted:
            row.cpu_us_per_tx = round(spent / counted * 1e6, 2)
            row.sys_us_per_tx = round((cpu1.system - cpu0.system) / counted * 1e6, 2)
    problems = []
    if rc != 0:
        problems.append(f"pgbench exit {rc}")
    if row.failed:
        problems.append(f"{row.failed} failed tx")
    if "aborted" in out:
        problems.append("clients aborted")
    if not row.transactions:
        problems.append("no transactions completed")
    if problems or not row.transactions:
        row.status = "error"
        detail = " / ".join(line.strip() for line in out.splitlines()
                            if "error" in line.lower() or "abort" in line.lower() or "timed out" in line)
        detail = detail or " / ".join(out.strip().splitlines()[-2:])
        row.note = "; ".join(problems) + (": " + detail[:300] if detail else "")
        if target.is_pooler and not target.alive():
            row.note += f" | {target.name} died: {target.log_tail()[-300:]}"
    return row


def run_rtt(target: Target, queries: int, row: Row) -> Row:
    row.clients = 1
    cpu0 = target.cpu() if target.is_pooler else None
    t0 = time.perf_counter()
    try:
        samples = pgwire.round_trips("127.0.0.1", target.port, USER, PASSWORD, target.database, queries)
    except (OSError, pgwire.WireError, Exception) as exc:  # noqa: BLE001 - recorded, not fatal
        row.status, row.note = "error", f"{type(exc).__name__}: {exc}"[:300]
        return row
    elapsed = time.perf_counter() - t0
    cpu1 = target.cpu() if target.is_pooler else None
    samples.sort()
    row.duration_s = round(elapsed, 2)
    row.transactions = len(samples)
    row.tps = round(len(samples) / (sum(samples) / 1e9), 1)
    row.lat_avg_us = round(sum(samples) / len(samples) / 1000, 1)
    row.lat_p50_us = round(percentile(samples, 50) / 1000, 1)
    row.lat_p99_us = round(percentile(samples, 99) / 1000, 1)
    if cpu0 is not None and cpu1 is not None:
        spent = cpu1.total - cpu0.total
        row.pooler_cpu_s = round(spent, 3)
        row.cpu_us_per_tx = round(spent / (len(samples) + 200) * 1e6, 2)
    return row


def run_memory(target: Target, clients: int, row: Row) -> Row:
    """RSS of a freshly started pooler before and with ``clients`` idle logged-in connections."""
    row.clients = clients
    time.sleep(1.0)
    try:
        # one connection + query first, so the server pool and lazy imports are warm
        pgwire.round_trips("127.0.0.1", target.port, USER, PASSWORD, target.database, 10, warmup=0)
    except Exception as exc:  # noqa: BLE001
        row.status, row.note = "error", f"first query failed: {exc}"[:300]
        return row
    time.sleep(0.5)
    row.rss_idle_kib = target.rss()

    async def go() -> tuple[int, list[str], int | None, float]:
        t0 = time.perf_counter()
        writers, errors = await pgwire.open_idle_connections(
            "127.0.0.1", target.port, USER, PASSWORD, target.database, clients)
        took = time.perf_counter() - t0
        await asyncio.sleep(2.0)
        rss = target.rss()
        n = len(writers)
        await pgwire.close_connections(writers)
        return n, errors, rss, took

    opened, errors, rss, took = asyncio.run(go())
    row.connections, row.rss_kib, row.duration_s = opened, rss, round(took, 1)
    if errors:
        kinds = sorted(set(errors))[:3]
        row.note = f"{len(errors)} of {clients} connections failed: {'; '.join(kinds)}"[:300]
        row.status = "error" if opened < clients else "ok"
    if rss is not None and row.rss_idle_kib is not None and opened:
        row.note = (row.note + " " if row.note else "") + \
            f"{(rss - row.rss_idle_kib) / opened:.2f} KiB per idle client; login {opened / took:.0f} conn/s"
    return row


# --------------------------------------------------------------------------
# orchestration


@dataclass
class Options:
    rounds: int
    duration: float
    warmup: float
    targets: list[str]
    workloads: list[str]
    scale: int
    database: str
    pool_size: int
    rtt_queries: int
    memory_clients: int
    results_dir: Path
    chart: bool
    quick: bool
    pypool_src: Path
    baseline_src: Path | None
    compiled: bool


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round, 3 s runs, fewer round trips")
    p.add_argument("--rounds", type=int, help="rounds of the whole matrix, targets interleaved (default 3)")
    p.add_argument("--duration", type=float, help="seconds per pgbench run (default 10, --quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of pgbench -S through each pooler after it starts (default 2)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated subset of {', '.join(ALL_TARGETS)} (pgcat* only if a binary is found)")
    p.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS),
                   help=f"comma-separated subset of {', '.join(BY_NAME)}")
    p.add_argument("--scale", type=int, default=10, help="pgbench scale factor (default 10)")
    p.add_argument("--database", help="database for the pgbench tables (default pypool_bench_s<scale>)")
    p.add_argument("--pool-size", type=int, default=20, help="server connections per pool (default 20)")
    p.add_argument("--rtt-queries", type=int, help="timed SELECT 1 round trips per target per round (default 20000)")
    p.add_argument("--memory-clients", type=int, default=10000, help="idle client connections for the RSS figure")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help=f"where to write results (default {RESULTS_DIR})")
    p.add_argument("--no-chart", action="store_true", help="skip latest.png")
    p.add_argument("--pypool-src", type=Path, default=REPO,
                   help="directory holding the pypool package to benchmark (default: this checkout's working "
                        "tree); it is copied at start so edits made during the run do not leak in")
    p.add_argument("--baseline-src", type=Path,
                   help="a second pypool tree (e.g. a worktree of the previous main) run as target "
                        "pypool-base next to pypool in every workload pypool runs, interleaved in the same rounds")
    p.add_argument("--compiled", action="store_true",
                   help="also run the --pypool-src tree with its hot path compiled (setup.py, needs mypy) as target "
                        "pypool-compiled next to pypool in every workload pypool runs, interleaved in the same rounds")
    a = p.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for t in targets:
        if t not in ALL_TARGETS:
            p.error(f"unknown target {t!r} (choose from {', '.join(ALL_TARGETS)})")
    for w in workloads:
        if w not in BY_NAME:
            p.error(f"unknown workload {w!r} (choose from {', '.join(BY_NAME)})")
    return Options(
        rounds=a.rounds or (1 if a.quick else 3),
        duration=a.duration or (3.0 if a.quick else 10.0),
        warmup=a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0),
        targets=targets, workloads=workloads, scale=a.scale,
        database=a.database or f"pypool_bench_s{a.scale}",
        pool_size=a.pool_size,
        rtt_queries=a.rtt_queries or (3000 if a.quick else 20000),
        memory_clients=a.memory_clients, results_dir=a.results_dir,
        chart=not a.no_chart, quick=a.quick, pypool_src=a.pypool_src.resolve(),
        baseline_src=a.baseline_src.resolve() if a.baseline_src else None, compiled=a.compiled,
    )


def scram_verifier(primary: cluster.Node) -> str:
    v = cluster.run_sql(primary, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'")
    if not v.startswith("SCRAM-SHA-256$"):
        raise TargetError(f"role {USER} has no SCRAM verifier in pg_authid (got {v[:12]!r}...)")
    return v


def build_targets(opts: Options, primary: cluster.Node, replicas: list[cluster.Node],
                  unavailable: dict[str, str], pypool_path: Path,
                  baseline_path: Path | None = None, compiled_path: Path | None = None) -> dict[str, Target]:
    wanted = set(opts.targets)
    needed = {t for w in opts.workloads for t in BY_NAME[w].targets} & wanted
    cfg_args = dict(user=USER, password=PASSWORD, pool_size=opts.pool_size,
                    primary=("127.0.0.1", primary.port), replicas=[("127.0.0.1", r.port) for r in replicas])
    out: dict[str, Target] = {}
    if "direct" in needed:
        out["direct"] = direct_target(primary.port, opts.database)
    if "floor" in needed:
        out["floor"] = floor_target(("127.0.0.1", primary.port), opts.database)
    pypools = {"pypool", "pypool-auto", "pypool-rw", "pypool-rw-auto", "pypool-rw-causal"}
    broken = check_importable(pypool_path) if needed & pypools else None
    if broken:
        for name in needed & pypools:
            unavailable[name] = f"pypool from {opts.pypool_src} does not import: {broken}"
    if "pypool" in needed and not broken:
        out["pypool"] = pypool_target("pypool", "pypool", database=opts.database, split=False, cfg_args=cfg_args,
                                      pypool_path=pypool_path)
    if "pypool-auto" in needed and not broken:
        out["pypool-auto"] = pypool_target("pypool-auto", 'pypool (workers = "auto")', database=opts.database,
                                           split=False, cfg_args=cfg_args, pypool_path=pypool_path, workers="auto")
    for name, causal, workers, label in (("pypool-rw", "off", 1, "pypool (R/W split)"),
                                         ("pypool-rw-auto", "off", "auto", 'pypool (R/W split, workers = "auto")'),
                                         ("pypool-rw-causal", "session", 1, "pypool (R/W split, causal reads)")):
        if name not in needed or broken:
            continue
        if len(replicas) < 2:
            unavailable[name] = f"only {len(replicas)} streaming replica(s)"
        else:
            out[name] = pypool_target(name, label, database=opts.database, split=True, cfg_args=cfg_args,
                                      pypool_path=pypool_path, causal_reads=causal, workers=workers)
    if "pgbouncer" in needed:
        try:
            install_pgbouncer(log)
            out["pgbouncer"] = pgbouncer_target(database=opts.database, user=USER,
                                                scram_verifier=scram_verifier(primary),
                                                primary=("127.0.0.1", primary.port), pool_size=opts.pool_size,
                                                max_client_conn=max(2000, opts.memory_clients + 1000))
        except TargetError as exc:
            unavailable["pgbouncer"] = str(exc)
    for name, split in (("pgcat", False), ("pgcat-rw", True)):
        if name in needed:
            binary = pgcat_binary()
            if binary is None:
                unavailable[name] = "not available here: no `pgcat` on PATH and PGCAT_BIN unset"
            else:
                out[name] = pypool_target(name, "PgCat" + (" (R/W split)" if split else ""),
                                          database=opts.database, split=split, cfg_args=cfg_args,
                                          kind="pgcat", binary=binary)
    for name, path, label in (("pypool-base", baseline_path, f"pypool (baseline {opts.baseline_src})"),
                              ("pypool-compiled", compiled_path, "pypool (compiled hot path)")):
        if path is None or "pypool" not in needed:
            continue
        broken = check_importable(path)
        if broken:
            unavailable[name] = f"{label} does not import: {broken}"
        else:
            out[name] = pypool_target(name, label, database=opts.database, split=False, cfg_args=cfg_args,
                                      pypool_path=path)
    return out


def warm_up(target: Target, seconds: float) -> None:
    if seconds <= 0 or not target.is_pooler:
        return
    subprocess.run(["pgbench", "-n", "-S", "-h", "127.0.0.1", "-p", str(target.port), "-U", USER,
                    "-c", "20", "-j", "2", "-T", str(max(1, int(seconds))), target.database],
                   env=pg_env(), capture_output=True, timeout=seconds + 60)


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    meta = {"python": platform.python_version(), "pgbench": first_line(["pgbench", "--version"])}
    bouncer = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if os.path.exists(bouncer):
        meta["pgbouncer"] = first_line([bouncer, "--version"])
    pgcat = pgcat_binary()
    if pgcat:
        meta["pgcat"] = first_line([pgcat, "--version"])
    try:
        meta["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pypool"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
        dirty = [d.strip() for d in dirty if d.strip()]
        if dirty:
            meta["git"] += f" + uncommitted changes in {len(dirty)} pypool/ file(s): " + \
                ", ".join(d.split()[-1] for d in dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    meta["cpus"] = str(os.cpu_count())
    return meta


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    nofile = raise_nofile()
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    started = time.monotonic()
    log(f"run {run_id}: rounds={opts.rounds} duration={opts.duration}s workloads={','.join(opts.workloads)} "
        f"targets={','.join(opts.targets)} (RLIMIT_NOFILE {nofile[0]})")

    cluster.up()
    primary, replicas = find_roles()
    log(f"cluster: primary {primary.name}:{primary.port}, replicas "
        f"{', '.join(f'{r.name}:{r.port}' for r in replicas) or 'none'}")
    prepare_database(primary, replicas, opts.database, opts.scale)

    unavailable: dict[str, str] = {}
    scratch = Path(tempfile.mkdtemp(prefix="bench-scratch-"))
    pypool_path, pypool_hash = snapshot_pypool(opts.pypool_src, scratch / "src")
    baseline_path = None
    if opts.baseline_src is not None:
        baseline_path, baseline_hash = snapshot_pypool(opts.baseline_src, scratch / "baseline")
    compiled_path = None
    if opts.compiled:
        try:
            compiled_path = compiled_snapshot(opts.pypool_src, scratch / "compiled")
        except TargetError as exc:
            unavailable["pypool-compiled"] = str(exc)
    targets = build_targets(opts, primary, replicas, unavailable, pypool_path, baseline_path, compiled_path)
    meta = versions()
    meta["pypool"] = f"{opts.pypool_src}/pypool, snapshot sha256 {pypool_hash} (of its .py files)"
    if baseline_path is not None:
        meta["pypool-base"] = f"{opts.baseline_src}/pypool, snapshot sha256 {baseline_hash}"
    if compiled_path is not None:
        meta["pypool-compiled"] = f"the pypool snapshot {pypool_hash}, setup.py's COMPILED_MODULES built with mypyc"
    default_matrix = set(opts.workloads) == set(BY_NAME) and set(opts.targets) == set(ALL_TARGETS)
    mode = ("quick" if opts.quick else "full") if default_matrix else "partial matrix"
    meta.update(run_id=run_id, mode=mode, rounds=str(opts.rounds),
                duration_s=f"{opts.duration:g}", scale=str(opts.scale), pool_size=str(opts.pool_size),
                database=opts.database, loadavg_start=" ".join(open("/proc/loadavg").read().split()[:3]))
    rows: list[Row] = []
    try:
        for t in list(targets.values()):
            if not t.is_pooler:
                continue
            try:
                t.start()
                log(f"started {t.label} on 127.0.0.1:{t.port} (pid {t.root_pid()})")
                warm_up(t, opts.warmup)
            except TargetError as exc:
                unavailable[t.name] = f"failed to start: {exc}"[:500]
                log(f"{t.name}: {unavailable[t.name]}")
                t.cleanup()
                del targets[t.name]

        pgbench_wls = [BY_NAME[w] for w in opts.workloads if BY_NAME[w].kind == "pgbench"]
        for rnd in range(1, opts.rounds + 1):
            load = open("/proc/loadavg").read().split()[:3]
            log(f"=== round {rnd}/{opts.rounds} (loadavg {' '.join(load)})")
            for wl in pgbench_wls:
                names = [n for n in wl.targets if n in opts.targets]
                if "pypool" in names:
                    names += [n for n in ("pypool-base", "pypool-compiled") if n in targets or n in unavailable]
                shift = (rnd - 1) % max(1, len(names))
                for name in names[shift:] + names[:shift]:
                    row = Row(run_id, rnd, wl.name, name, started_at=now_iso(), clients=wl.clients)
                    rows.append(row)
                    if name not in targets:
                        row.status, row.note = "not-available", unavailable.get(name, "not started")
                        continue
                    t = targets[name]
                    if t.is_pooler and t.ensure_running():
                        log(f"{name} had died; restarted (restart #{t.restarts})")
                        warm_up(t, opts.warmup)
                    if not t.is_pooler:
                        room = connection_headroom(primary)
                        if room < wl.clients + 8:
                            row.status = "skipped"
                            row.note = (f"needs {wl.clients} backends; the primary has room for {room} "
                                        f"(max_connections minus open connections, incl. the poolers' pools)")
                            log(f"  {wl.name:<20} {name:<10} skipped: {row.note}")
                            continue
                    split = "-rw" in name
                    # Mixed: -S reads counted by their index scans, divided by the -S transactions only.
                    counter = replica_account_reads if wl.name.startswith("mixed") else replica_commits
                    before = settled_replica_commits(replicas, opts.database, counter=counter) if split else 0
                    run_pgbench(t, wl, opts.duration, scratch, row)
                    reads = row.read_transactions if wl.name.startswith("mixed") else row.transactions
                    if split and reads:
                        after = settled_replica_commits(replicas, opts.database, counter=counter)
                        row.replica_share = round(min(1.0, (after - before) / reads), 3)
                    log(f"  {wl.name:<20} {name:<10} {report.fmt_row(row)}")
            if "rtt" in opts.workloads:
                names = [n for n in BY_NAME["rtt"].targets if n in opts.targets]
                shift = (rnd - 1) % max(1, len(names))
                for name in names[shift:] + names[:shift]:
                    row = Row(run_id, rnd, "rtt", name, started_at=now_iso())
                    rows.append(row)
                    if name not in targets:
                        row.status, row.note = "not-available", unavailable.get(name, "not started")
                        continue
                    targets[name].ensure_running()
                    run_rtt(targets[name], opts.rtt_queries, row)
                    log(f"  {'rtt':<20} {name:<10} {report.fmt_row(row)}")
            # keep partial results if a later round breaks
            report.write_csv(rows, opts.results_dir / f"{run_id}.csv")

        if "memory" in opts.workloads:
            log(f"=== memory: {opts.memory_clients} idle clients, fresh pooler instances")
            for name in BY_NAME["memory"].targets:
                if name not in opts.targets:
                    continue
                row = Row(run_id, 0, "memory", name, started_at=now_iso())
                rows.append(row)
                if name not in targets:
                    row.status, row.note = "not-available", unavailable.get(name, "not started")
                    continue
                t = targets[name]
                t.stop()  # a fresh process: the figure is per idle client, not history
                try:
                    t.start()
                    run_memory(t, opts.memory_clients, row)
                except TargetError as exc:
                    row.status, row.note = "error", str(exc)[:300]
                log(f"  {'memory':<20} {name:<10} {report.fmt_row(row)}")
    finally:
        for t in targets.values():
            t.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)

    meta["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    meta["elapsed_min"] = f"{(time.monotonic() - started) / 60:.1f}"
    meta["unavailable"] = "; ".join(f"{k}: {v}" for k, v in unavailable.items())
    csv_path = opts.results_dir / f"{run_id}.csv"
    report.write_csv(rows, csv_path)
    md = report.markdown(rows, meta, WORKLOADS, csv_path.name)
    (opts.results_dir / "latest.md").write_text(md)
    log(f"wrote {csv_path} and {opts.results_dir / 'latest.md'}")
    if opts.chart:
        png = opts.results_dir / "latest.png"
        err = report.chart(rows, meta, WORKLOADS, png)
        log(f"chart: {err}" if err else f"wrote {png}")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
