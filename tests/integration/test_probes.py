"""``/healthz``, ``/readyz`` and ``autoreload`` of a real pypool (one process, and ``workers = 2``).

What a kubelet or HAProxy sees on the metrics port: the status codes and the
one-line reasons; a drain fails readiness at once while the listener still
answers; an edited config file is applied without a signal, and a broken one
is reported with its file and key while the running config stays.
"""

from __future__ import annotations

import signal
import urllib.error
import urllib.request

import psycopg
import pytest

from pypool.config import dump_config
from tests.conftest import DATABASE, free_port, user_overrides
from tests.integration._ops import admin, login_error, show, wait_for_log
from tests.integration._support import PRIMARY_ONLY, merge, wait_for

pytestmark = pytest.mark.integration

EXPORTER = {"general": {"enable_prometheus_exporter": True}}


def http_get(pypool, path: str) -> tuple[int, str]:
    port = pypool.config["general"]["prometheus_exporter_port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def probe_ready(pypool) -> tuple[int, str]:
    """/readyz once the HTTP port answers (it opens just after the listener)."""
    def attempt():
        try:
            return http_get(pypool, "/readyz")
        except OSError:
            return None
    return wait_for(attempt, what="the HTTP port")


def rewrite(pypool, *overrides: dict) -> None:
    pypool.config = merge(pypool.config, *overrides)
    pypool.config_path.write_text(dump_config(pypool.config))


def pool_sizes(pypool) -> set[int]:
    with admin(pypool) as conn:
        return {d["pool_size"] for d in show(conn, "DATABASES")}


def test_probes_answer_beside_metrics(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, EXPORTER))
    wait_for(lambda: probe_ready(pypool) == (200, "ready\n"), what="ready")
    assert http_get(pypool, "/healthz") == (200, "alive\n")
    status, body = http_get(pypool, "/metrics")
    assert status == 200 and "pypool_info" in body
    status, body = http_get(pypool, "/nothing")
    assert status == 404 and "/readyz" in body


def test_readiness_fails_at_once_on_drain_while_the_listener_still_answers(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, EXPORTER, {"general": {"shutdown_timeout": 20000}}))
    wait_for(lambda: probe_ready(pypool)[0] == 200, what="ready")
    holder = psycopg.connect(pypool.dsn())
    holder.execute("SELECT 1")  # a transaction in flight keeps the drain going
    pypool.proc.send_signal(signal.SIGTERM)
    wait_for_log(pypool, "shutting down")
    assert http_get(pypool, "/readyz") == (503, "shutting down: send new clients elsewhere\n")
    assert http_get(pypool, "/healthz") == (200, "alive\n")  # draining is not dead: no kubelet restart
    assert login_error(pypool)[0] == "57P01"  # the listener is still open and says why
    holder.commit()
    holder.close()
    assert pypool.proc.wait(30) == 0


def test_shutdown_delay_serves_new_clients_while_readiness_already_fails(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, EXPORTER, {"general": {"shutdown_delay": 600000}}))
    wait_for(lambda: probe_ready(pypool)[0] == 200, what="ready")
    busy = psycopg.connect(pypool.dsn())
    busy.execute("SELECT 1")  # a transaction open when the signal comes
    pypool.proc.send_signal(signal.SIGTERM)
    wait_for_log(pypool, "(shutdown_delay) before the drain")
    assert http_get(pypool, "/readyz") == (503, "shutting down: send new clients elsewhere\n")
    with psycopg.connect(pypool.dsn(), autocommit=True) as late:  # a load balancer's late client is served
        assert late.execute("SELECT 2").fetchone() == (2,)
    busy.commit()
    assert busy.execute("SELECT 3").fetchone() == (3,)  # and clients go on with new transactions
    busy.rollback()
    assert "shutting down (" not in pypool.log()  # no drain yet
    pypool.proc.send_signal(signal.SIGTERM)  # a second signal cuts the delay short and stops at once
    assert pypool.proc.wait(30) == 0
    assert "closing every connection now" in pypool.log()
    busy.close()


def test_readiness_follows_the_servers(start_pypool, pg_cluster):
    dead = free_port()  # nothing listens here
    replica_only_up = {"pools": {DATABASE: {"shards": {"0": {"servers": [
        ["127.0.0.1", dead, "primary"], ["127.0.0.1", pg_cluster[1].port, "replica"]]}}}}}
    pypool = start_pypool(merge(EXPORTER, replica_only_up))
    reads_only = f"ready; pool {DATABASE} (user postgres): primary 127.0.0.1:{dead} unreachable, reads only\n"
    wait_for(lambda: probe_ready(pypool) == (200, reads_only), what="ready for reads only")

    nothing_up = {"pools": {DATABASE: {"shards": {"0": {"servers": [["127.0.0.1", dead, "primary"]]}}}}}
    down = start_pypool(merge(EXPORTER, nothing_up))
    expected = f"pool {DATABASE} (user postgres): primary 127.0.0.1:{dead} unreachable and no replica reachable\n"
    wait_for(lambda: probe_ready(down) == (503, expected), what="not ready")
    assert http_get(down, "/healthz") == (200, "alive\n")


def test_two_workers_answer_as_one_instance(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, EXPORTER, {"general": {"workers": 2, "shutdown_timeout": 20000}}))
    wait_for(lambda: probe_ready(pypool) == (200, "ready (2/2 workers ready)\n"), what="both workers ready")
    assert http_get(pypool, "/healthz") == (200, "alive\n")
    holder = psycopg.connect(pypool.dsn())
    holder.execute("SELECT 1")
    pypool.proc.send_signal(signal.SIGTERM)
    wait_for_log(pypool, "draining every worker")
    assert http_get(pypool, "/readyz") == (503, "shutting down: send new clients elsewhere\n")
    holder.commit()
    holder.close()
    assert pypool.proc.wait(30) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_autoreload_applies_an_edited_file_and_keeps_the_config_on_a_broken_one(start_pypool, workers):
    pypool = start_pypool(merge(PRIMARY_ONLY, {"general": {"autoreload": 200, "workers": workers}}))
    if workers > 1:
        wait_for_log(pypool, "all 2 workers ready")
    assert pool_sizes(pypool) == {10}
    rewrite(pypool, user_overrides(pool_size=4))  # no signal: the file change is enough
    wait_for(lambda: pool_sizes(pypool) == {4}, what="pool_size 4 after autoreload")
    # One process logs its own reload; a supervisor logs that it reloads every worker.
    assert "(autoreload)" in pypool.log() or "autoreload: reloading the config in every worker" in pypool.log()

    rewrite(pypool, user_overrides(pool_size=-5))
    log = wait_for_log(pypool, "rejected, the running config stays")
    line = next(line for line in log.splitlines() if "rejected, the running config stays" in line)
    assert f"{pypool.config_path}: pools.{DATABASE}.users.0.pool_size: expected" in line, line
    assert pool_sizes(pypool) == {4}
    with psycopg.connect(pypool.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    rewrite(pypool, user_overrides(pool_size=6))  # the next good edit applies
    wait_for(lambda: pool_sizes(pypool) == {6}, what="pool_size 6 after the fix")
    assert pypool.log().count("rejected, the running config stays") == 1  # the same broken bytes are reported once
