"""TCP keepalives on pypool's client and server sockets, as the kernel reports them (`ss`)."""

from __future__ import annotations

import re
import subprocess
import time

import psycopg
import pytest

from tests.integration._support import PRIMARY_ONLY

pytestmark = pytest.mark.integration

_TIMER = re.compile(r"timer:\(keepalive,([0-9.]+)(ms|sec|min)")


def keepalive_timers(pid: int, port: int) -> list[float]:
    """Seconds left until the next keepalive probe, for each of ``pid``'s TCP connections to or from ``port``."""
    out = subprocess.run(["ss", "-tnopH", "state", "established"], capture_output=True, text=True,
                         check=True).stdout
    timers = []
    for line in out.splitlines():
        fields = line.split()
        if f"pid={pid}," not in line or not any(f.endswith(f":{port}") for f in fields[2:4]):
            continue
        found = _TIMER.search(line)
        value, unit = (float(found.group(1)), found.group(2)) if found else (float("inf"), "sec")
        timers.append(value * {"ms": 0.001, "sec": 1, "min": 60}[unit])
    return timers


def test_client_and_server_sockets_have_pgcats_keepalives(start_pypool, pg_cluster):
    pypool = start_pypool(PRIMARY_ONLY)  # PgCat's defaults: the first probe after 5 idle seconds
    with psycopg.connect(pypool.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        deadline = time.monotonic() + 10
        while True:  # a socket with data in flight shows its retransmit timer instead
            client_side = keepalive_timers(pypool.proc.pid, pypool.port)
            server_side = keepalive_timers(pypool.proc.pid, pg_cluster[0].port)
            if (client_side and server_side and max(client_side + server_side) <= 5) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert client_side and max(client_side) <= 5, f"client socket keepalive timers: {client_side}"
    assert server_side and max(server_side) <= 5, f"server socket keepalive timers: {server_side}"
