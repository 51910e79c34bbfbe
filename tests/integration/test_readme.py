"""The README's two set-up commands are true: CI runs the test one, this runs the other."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DATABASE, PASSWORD, USER

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", text, re.S)
    assert block, "README has no Quick start command block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_ci_runs_the_readme_test_command():
    run_cmd, test_cmd = readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci, f"{test_cmd!r} is not what .ci/run calls"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_readme_run_command_serves_psql_on_6432(pg_cluster):
    run_cmd = readme_commands()[0]
    if not _port_free(6432):
        pytest.skip("something already listens on 127.0.0.1:6432 (a developer's pypool?)")
    proc = subprocess.Popen(run_cmd, shell=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while _port_free(6432):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "pypool did not come up on 6432"
            time.sleep(0.2)
        result = subprocess.run(["psql", "-h", "127.0.0.1", "-p", "6432", "-U", USER, DATABASE, "-At",
                                 "-c", "SELECT 40 + 2"], env={**os.environ, "PGPASSWORD": PASSWORD},
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "42"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
