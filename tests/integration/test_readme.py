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

from pypool import __version__
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


def _stock_debian_python() -> str | None:
    """/usr/bin/python3 when it is Debian's, which refuses `pip install` outside a venv (PEP 668)."""
    python = Path("/usr/bin/python3")
    if not python.exists():
        return None
    marker = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                            capture_output=True, text=True).stdout.strip()
    return str(python) if (Path(marker) / "EXTERNALLY-MANAGED").exists() else None


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYPOOL_LONG") != "1", reason="a fresh venv from the package index (about a "
                    "minute): PYPOOL_LONG=1 runs it")
def test_run_command_installs_into_a_venv_on_an_externally_managed_python(pg_cluster, tmp_path):
    """The README's first command on Debian 12's own Python, with no sqlglotc wheel to be had."""
    python = _stock_debian_python()
    if python is None:
        pytest.skip("no externally managed (PEP 668) /usr/bin/python3 here")
    refused = subprocess.run([python, "-m", "pip", "install", "--dry-run", "tomli-w"], capture_output=True, text=True)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr
    venv = tmp_path / "venv"
    constraints = tmp_path / "no-sqlglotc.txt"
    constraints.write_text("sqlglotc==0.0.0\n")  # as on a platform without a wheel: no version can be installed
    env = {**os.environ, "PYTHON": python, "PYPOOL_VENV": str(venv), "PIP_CONSTRAINT": str(constraints)}
    out = subprocess.run([readme_commands()[0].split()[0], "--version"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == f"pypool {__version__}"
    assert "installing without it" in out.stdout
    # The venv runs this checkout's pypool, and plain sqlglot classifies statements without sqlglotc.
    probe = ("import importlib.util, pypool, sqlglot.parser; from pypool.routing.classify import classify; "
             "print(pypool.__file__, importlib.util.find_spec('sqlglotc') is None, sqlglot.parser.__file__, "
             "classify('SELECT a FROM t WHERE b IN (SELECT c FROM u)').writes, "
             "classify('WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x').writes)")
    ran = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    init, no_sqlglotc, parser_file, read, write = ran.stdout.split()
    assert Path(init) == ROOT / "pypool" / "__init__.py"
    assert no_sqlglotc == "True" and parser_file.endswith(".py")
    assert (read, write) == ("False", "True")
    # Run again: the venv is reused, nothing is installed.
    again = subprocess.run([readme_commands()[0].split()[0], "--version"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "venv:" not in again.stdout
