"""The supervisor of a multi-process pypool (``[general] workers = N``, N > 1).

One Python process runs one event loop on one core; to use more cores pypool
runs N worker processes (``pypool.instance``), each binding the listen port
with SO_REUSEPORT so the kernel spreads new clients over them. This parent
process does no pooling itself. It

* starts the workers (as ``python -m pypool CONFIG --worker-index i ...``, so a
  worker is a fresh interpreter, not a fork of a process with threads) and
  waits until each answers on its control socket;
* restarts a worker that dies, with a growing delay if it keeps dying;
* passes SIGHUP (reload), SIGINT and SIGTERM (graceful drain, asked on each
  worker's control socket; a second one stops at once, as SIGTERM) on to every
  worker and exits when they have all stopped (status 1 if one did not exit 0);
* creates the table through which workers share commit positions (global
  causal reads, ``pypool.causal.shared``) in its private run directory;
* serves ``/metrics`` for the whole instance: it merges every worker's
  statistics snapshot (``pypool.snapshot``) and renders the merged one;
* answers ``/healthz`` and ``/readyz`` for the whole instance (``pypool.probes``);
* with ``autoreload``, watches the config file and, when it changed and is
  valid, reloads every worker as SIGHUP does (``pypool.autoreload``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, PlatformCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pypool import probes, process_signals, snapshot
from pypool.autoreload import SupervisorAutoreload
from pypool.causal import shared as causal_shared
from pypool.httpd import HttpEndpoint
from pypool.instance import ask_control_socket, control_socket_path
from pypool.metrics import render_families

if TYPE_CHECKING:
    from pypool.config import Config

log = logging.getLogger("pypool.workers")

READY_TIMEOUT = 30.0  # seconds a new worker has to start answering
RESTART_DELAY_MIN = 0.5  # seconds; doubled for each quick successive death, up to the max
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 30.0  # a worker that lived this long resets the restart delay
POLL_INTERVAL = 0.2
STALLED_AFTER = 5.0  # seconds without a supervision round: /healthz fails


class WorkerProcess:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restart_delay = RESTART_DELAY_MIN
        self.restart_at: float | None = None
        self.ready = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, config_path: str, config: "Config", worker_args: list[str]) -> None:
        self.config_path = config_path
        self.config = config
        self.count = config.general.workers
        self.worker_args = worker_args  # logging options passed on to every worker
        self.rundir = ""
        self.workers = [WorkerProcess(i) for i in range(self.count)]
        self.stopping = False
        self._signals: list[int] = []
        self._http: HttpEndpoint | None = None
        self._last_round = time.monotonic()  # the supervision loop's heartbeat, read by /healthz
        self._autoreload = SupervisorAutoreload(config_path, config, self._reload_workers)

    # ---------------------------------------------------------- lifecycle

    def run(self) -> int:
        self.rundir = tempfile.mkdtemp(prefix="pypool-workers-")  # mode 0700: cancel keys pass through here
        causal_shared.create_table(causal_shared.table_path(self.rundir), self.count)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._signals.extend(process_signals.take_pending())  # sent while pypool imported and read its config
        try:
            for worker in self.workers:
                self._spawn(worker)
            if not self._wait_all_ready():
                self._stop_all(signal.SIGTERM)
                self._reap_all(10.0)
                return 0 if self.stopping else 1  # asked to stop, or a worker could not start
            log.info("pypool: all %d workers ready (pids %s) on %s:%s", self.count,
                     ", ".join(str(w.pid) for w in self.workers), self.config.general.host,
                     self.config.general.port)
            self._start_metrics()
            return self._supervise()
        finally:
            if self._http is not None:
                self._http.close()
            shutil.rmtree(self.rundir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # handled by the loop in _supervise, outside the signal handler

    def _spawn(self, worker: WorkerProcess) -> None:
        cmd = [sys.executable, "-m", "pypool", self.config_path, *self.worker_args,
               "--worker-index", str(worker.index), "--worker-count", str(self.count), "--worker-dir", self.rundir]
        # Its own session: a Ctrl-C in the terminal reaches the supervisor only, which forwards it once.
        worker.proc = subprocess.Popen(cmd, start_new_session=True)
        worker.started_at = time.monotonic()
        worker.restart_at = None
        worker.ready = False
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def _ping(self, worker: WorkerProcess) -> dict | None:
        path = control_socket_path(self.rundir, worker.index)
        if not os.path.exists(path):
            return None
        try:
            return asyncio.run(ask_control_socket(path, {"op": "ping"}, timeout=2.0))
        except (OSError, asyncio.TimeoutError, ValueError):
            return None

    def _check_ready(self, worker: WorkerProcess) -> bool:
        answer = self._ping(worker)
        if answer is not None and answer.get("pid") == worker.pid:
            worker.ready = True
            log.info("worker %d ready (pid %d)", worker.index, worker.pid)
        return worker.ready

    def _wait_all_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(self.workers)
        while pending:
            if self._signals and any(s != signal.SIGHUP for s in self._signals):
                log.info("pypool: stopping during startup")
                self.stopping = True
                return False
            for worker in list(pending):
                if not worker.alive():
                    log.error("worker %d exited during startup with code %s; stopping", worker.index,
                              worker.proc.returncode if worker.proc else None)
                    return False
                if self._check_ready(worker):
                    pending.remove(worker)
            if time.monotonic() > deadline:
                log.error("worker(s) %s did not become ready within %.0f s; stopping",
                          ", ".join(str(w.index) for w in pending), READY_TIMEOUT)
                return False
            time.sleep(0.05)
        return True

    def _supervise(self) -> int:
        interrupts = 0
        while True:
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    self._reload_workers("SIGHUP")
                    continue
                interrupts += 1
                self.stopping = True
                name = signal.Signals(signum).name
                if interrupts == 1:
                    log.info("%s: draining every worker", name)
                    self._drain_all(name)
                else:
                    log.warning("%s again: every worker closes its connections now", name)
                    self._stop_all(signal.SIGTERM)  # to a draining worker, a second signal
            now = self._last_round = time.monotonic()
            if not self.stopping:
                self._autoreload.poll(now)
            for worker in self.workers:
                if worker.alive():
                    if not worker.ready and not self.stopping:
                        self._check_ready(worker)
                    continue
                if self.stopping:
                    continue
                if worker.restart_at is None:
                    self._schedule_restart(worker, now)
                elif now >= worker.restart_at:
                    self._spawn(worker)
            if self.stopping and not any(w.alive() for w in self.workers):
                return self._stopped_status()
            time.sleep(POLL_INTERVAL)

    def _reload_workers(self, reason: str) -> None:
        log.info("%s: reloading the config in every worker", reason)
        self._stop_all(signal.SIGHUP)

    def _schedule_restart(self, worker: WorkerProcess, now: float) -> None:
        code = worker.proc.returncode if worker.proc else None
        if now - worker.started_at > STABLE_AFTER:
            worker.restart_delay = RESTART_DELAY_MIN
        log.error("worker %d (pid %s) died with code %s; restarting it in %.1f s", worker.index, worker.pid,
                  code, worker.restart_delay)
        worker.restart_at = now + worker.restart_delay
        worker.restart_delay = min(worker.restart_delay * 2, RESTART_DELAY_MAX)

    def _stopped_status(self) -> int:
        """The supervisor's exit status once every worker is gone: 0 if each drained and exited 0, else 1."""
        # A worker waiting to be restarted died before the stop; its death was logged then.
        unclean = [w for w in self.workers if w.proc is not None and w.restart_at is None and w.proc.returncode != 0]
        for worker in unclean:
            log.error("worker %d (pid %s) ended with status %s during the shutdown", worker.index, worker.pid,
                      worker.proc.returncode)  # type: ignore[union-attr]
        log.info("pypool: all workers stopped")
        return 1 if unclean else 0

    def _drain_all(self, reason: str) -> None:
        """Ask every worker to drain on its control socket, not with a signal.

        systemd's default KillMode=control-group sends SIGTERM to every process of the unit, the
        workers too: a SIGTERM from here would then be each worker's second signal, which closes
        its connections at once instead of draining them. A worker that does not answer (still
        starting up) gets SIGTERM, which ends it without a traceback.
        """
        alive = [w for w in self.workers if w.alive()]

        async def ask(worker: WorkerProcess) -> bool:
            try:
                await ask_control_socket(control_socket_path(self.rundir, worker.index),
                                         {"op": "drain", "reason": reason}, timeout=2.0)
            except (OSError, asyncio.TimeoutError, ValueError):
                return False
            return True

        async def ask_all() -> list[bool]:
            return await asyncio.gather(*(ask(w) for w in alive))

        for worker, asked in zip(alive, asyncio.run(ask_all())):
            if not asked and worker.alive():
                worker.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    def _stop_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.alive():
                try:
                    worker.proc.send_signal(signum)  # type: ignore[union-attr]
                except ProcessLookupError:
                    pass

    def _reap_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.proc is None:
                continue
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()

    # ------------------------------------------------------------ metrics

    def _start_metrics(self) -> None:
        general = self.config.general
        if not general.enable_prometheus_exporter:
            return
        registry = CollectorRegistry(auto_describe=False)
        registry.register(InstanceCollector(self))
        PlatformCollector(registry=registry)
        try:
            self._http = HttpEndpoint(general.host, general.prometheus_exporter_port, registry,
                                      self.liveness, self.readiness)
        except OSError as exc:
            log.error("cannot serve Prometheus metrics on %s:%s: %s", general.host,
                      general.prometheus_exporter_port, exc)
        else:
            log.info("Prometheus metrics for all workers on http://%s:%s/metrics", general.host,
                     general.prometheus_exporter_port)

    def _ping_all(self) -> list[dict | None]:
        async def gather() -> list:
            return await asyncio.gather(*(ask_control_socket(control_socket_path(self.rundir, w.index), {"op": "ping"},
                                                             timeout=probes.LOOP_ANSWER_TIMEOUT)
                                          for w in self.workers), return_exceptions=True)

        return [None if isinstance(a, BaseException) else a for a in asyncio.run(gather())]

    def liveness(self) -> probes.Verdict:
        """The supervision loop runs and a worker's event loop answers (called from the HTTP thread)."""
        if time.monotonic() - self._last_round > STALLED_AFTER:
            return probes.Verdict(False, f"the supervisor has not run for {STALLED_AFTER:.0f} s")
        if not any(self._ping_all()):
            return probes.Verdict(False, "no worker answered")
        return probes.Verdict(True, "alive")

    def readiness(self) -> probes.Verdict:
        if self.stopping:  # before asking anyone: a drain fails readiness at once
            return probes.combine_workers(True, [])
        answers = [probes.Verdict(*a["ready"]) if a and "ready" in a else None for a in self._ping_all()]
        return probes.combine_workers(self.stopping, answers)

    def collect_snapshots(self) -> tuple[snapshot.Snapshot, dict[tuple, dict[str, float]]]:
        """Every live worker's snapshot merged, and the SHOW STATS averages one worker computed.

        Each worker rolls its averages over the instance-wide snapshot, so any
        one of them holds the averages of the whole instance.
        """

        async def gather() -> list:
            return await asyncio.gather(*(ask_control_socket(control_socket_path(self.rundir, w.index),
                                                             {"op": "snapshot"}) for w in self.workers),
                                        return_exceptions=True)

        snapshots = []
        averages: dict[tuple, dict[str, float]] = {}
        for worker, answer in zip(self.workers, asyncio.run(gather())):
            if isinstance(answer, BaseException) or "snapshot" not in answer:
                log.warning("metrics: worker %d did not answer: %s", worker.index, answer)
                continue
            snapshots.append(snapshot.Snapshot.from_dict(answer["snapshot"]))
            if not averages:
                averages = {tuple(key): value for key, value in answer["averages"]}
        return snapshot.merge(snapshots), averages

    def process_figures(self) -> tuple[float, int]:
        """CPU seconds and resident bytes of the supervisor and every live worker, summed."""
        tick = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        cpu, rss = 0.0, 0
        for pid in [os.getpid(), *(w.pid for w in self.workers if w.alive())]:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/statm") as fh:
                    rss += int(fh.read().split()[1]) * page
            except (OSError, IndexError, ValueError):
                continue  # a worker that just exited
            cpu += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        return cpu, rss


class InstanceCollector:
    """prometheus-client collector: the merged families of all workers, fetched at scrape time."""

    _lock = threading.Lock()  # one scrape at a time: each asks every worker

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            merged, averages = self.supervisor.collect_snapshots()
            cpu, rss = self.supervisor.process_figures()
        yield from render_families(merged, averages)
        yield CounterMetricFamily("process_cpu_seconds", "User and system CPU time of all pypool processes.",
                                  value=cpu)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of all pypool processes.",
                                value=rss)
