"""Opt-in outside oracle: asyncpg's own test suite, through pypool and directly.

Not part of the pytest suite (this directory has no test_*.py files). Run from the worktree root:

    pip download --no-binary :all: --no-deps asyncpg==0.32.0 -d /tmp/apg   # sdist of the installed version
    pip install distro                                                      # test_connect.py imports it
    python tests/oracles/run_asyncpg_suite.py --sdist /tmp/apg/asyncpg-0.32.0.tar.gz [--only test_pool.py ...]

It unpacks the sdist's tests/ (the installed asyncpg wheel supplies asyncpg._testbase and the compiled
driver), then runs them twice with pytest, each run under a wall-clock limit (--timeout, default 600 s):

  * direct:  PGHOST/PGPORT point at the primary (127.0.0.1:5433, user postgres, a superuser);
  * pypool:  `python -m pypool` started here on a free 127.0.0.1 port from config/pgcat.local.toml with
             read/write splitting off and default_role "primary", so every difference is the pooler's
             (transaction mode), not replica lag.

With PGHOST set, asyncpg's _testbase uses the existing server (cluster.RunningCluster), so tests that need
a managed cluster (pg_hba edits, restarts, SSL set-up) skip or fail identically both ways; it never stops or
reconfigures the server. It prints both outcome counts and the tests that fail through pypool but pass
directly, with the first line of each error, and writes JUnit XML to --out.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRIMARY = ("127.0.0.1", 5433)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unpack_tests(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if re.match(r"[^/]+/tests/", m.name)]
        tar.extractall(into, members=members)
    return next(into.glob("*/tests")).parent


def pypool_config(port: int, path: Path) -> None:
    text = (ROOT / "config" / "pgcat.local.toml").read_text()
    text = re.sub(r"(?m)^port = \d+", f"port = {port}", text, count=1)
    text = re.sub(r"(?m)^enable_prometheus_exporter = true", "enable_prometheus_exporter = false", text)
    text = re.sub(r'(?m)^default_role = "any"', 'default_role = "primary"', text)
    text = re.sub(r"(?m)^query_parser_read_write_splitting = true", "query_parser_read_write_splitting = false", text)
    path.write_text(text)


def wait_listening(port: int, proc: subprocess.Popen, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pypool exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("pypool did not start listening")


def run_suite(src: Path, port: int, junit: Path, only: list[str], timeout: int) -> None:
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(port), PGUSER="postgres",
               PGPASSWORD="mysecretpassword", PGDATABASE="postgres")
    targets = [f"tests/{name}" for name in only] or ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--continue-on-collection-errors",
           f"--junitxml={junit}", *targets]
    try:
        subprocess.run(cmd, cwd=src, env=env, timeout=timeout, stdout=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print(f"  run on port {port} hit the {timeout} s limit; counts cover what finished", file=sys.stderr)


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (passed|failed|error|skipped, first line of the message)."""
    if not junit.exists():
        return {}
    result = {}
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname')}.{case.get('name')}"
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "").splitlines()[0][:160] if child.get("message") else ""
                break
        result[name] = (status, message)
    return result


def counts(result: dict[str, tuple[str, str]]) -> str:
    tally = {k: 0 for k in ("passed", "failed", "error", "skipped")}
    for status, _ in result.values():
        tally[status] += 1
    return ", ".join(f"{v} {k}" for k, v in tally.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=[], help="test files under tests/ (default: all)")
    parser.add_argument("--timeout", type=int, default=600, help="wall-clock limit per run, seconds")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "asyncpg-oracle")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    src = unpack_tests(args.sdist, args.out)

    port = free_port()
    config = args.out / "pypool.toml"
    pypool_config(port, config)
    log = open(args.out / "pypool.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pypool", str(config)], cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_listening(port, proc)
        run_suite(src, PRIMARY[1], args.out / "direct.xml", args.only, args.timeout)
        run_suite(src, port, args.out / "pypool.xml", args.only, args.timeout)
    finally:
        proc.terminate()
        proc.wait(10)
    direct, pooled = outcomes(args.out / "direct.xml"), outcomes(args.out / "pypool.xml")
    print(f"direct: {counts(direct)}")
    print(f"pypool: {counts(pooled)}")
    print("fail through pypool, pass directly:")
    for name, (status, message) in sorted(pooled.items()):
        if status in ("failed", "error") and direct.get(name, ("",))[0] == "passed":
            print(f"  {name}: {message}")


if __name__ == "__main__":
    main()
