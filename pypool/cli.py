"""Command line: `pypool [CONFIG]`, `pypool cluster ...`, `pypool config check|init`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from pypool import __version__
from pypool.logs import FORMATS, LEVELS, setup_logging

DEFAULT_CONFIG = "pgcat.toml"  # PgCat's default path


def run_pooler(config_path: str, worker_slot: tuple[int, int, str] | None = None,
               worker_args: list[str] | None = None) -> int:
    """Run pypool: one process, or with ``workers = N`` a supervisor (``worker_slot`` is None) of N
    worker processes (each started with its ``worker_slot``: index, count, control directory)."""
    from pypool.app import Application
    from pypool.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        logging.getLogger("pypool").error("%s", exc)
        return 2
    if worker_slot is None:
        for warning in config.warnings:
            logging.getLogger("pypool.config").warning("%s", warning)
    if worker_slot is None and config.general.workers > 1:
        from pypool.workers import Supervisor

        return Supervisor(config_path, config, worker_args or []).run()
    worker = None
    if worker_slot is not None:
        from pypool.instance import Worker

        _exit_with_parent()
        worker = Worker(*worker_slot)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay usable without it
        uvloop = None

    async def main() -> None:
        app = Application(config, worker)
        await app.start()
        app.install_signal_handlers()
        if worker is not None:
            await worker.start(app)  # after the listener: a worker that answers is ready
        await app.wait_stopped()
        if worker is not None:
            worker.close()

    try:
        if uvloop is not None:
            uvloop.run(main())
        else:
            asyncio.run(main())
    except ConfigError as exc:  # e.g. a TLS certificate that cannot be loaded
        logging.getLogger("pypool").error("%s", exc)
        return 2
    return 0


def _exit_with_parent() -> None:
    """A worker must not outlive its supervisor (even one killed with SIGKILL): ask Linux for a SIGTERM."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor still stops its workers on every signal
        pass
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        raise SystemExit(1)


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of a Compose ``.env`` file (comments, blank lines and quotes as Compose reads them)."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            out[key.strip()] = value
    return out


def config_command(argv: list[str]) -> int:
    from pypool.config import ConfigError, default_config_dict, dump_config, load_config

    parser = argparse.ArgumentParser(prog="pypool config")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("path")
    check.add_argument("--instances", type=int, default=1,
                       help="how many pypool instances run this config (warns when they may open more "
                            "connections than --max-connections)")
    check.add_argument("--max-connections", type=int, default=None,
                       help="the servers' max_connections (default: PostgreSQL's 100)")
    init = sub.add_parser("init", help="write a config from the Compose .env variables")
    init.add_argument("--env-file", help="read the variables from this .env file too (e.g. docker/.env); "
                                         "the process environment wins, as with Docker Compose")
    init.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    if args.action == "check":
        try:
            config = load_config(args.path)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for warning in config.warnings + tuple(_capacity_warnings(config, args)):
            print(f"warning: {warning}", file=sys.stderr)
        users = sum(len(p.users) for p in config.pools.values())
        print(f"{args.path}: OK ({len(config.pools)} pool(s), {users} user(s))")
        return 0
    env: dict[str, str] = {}
    try:
        if args.env_file:
            env.update(read_env_file(args.env_file))
        env.update(os.environ)
        text = dump_config(default_config_dict(env))
    except OSError as exc:
        print(f"error: {args.env_file}: {exc.strerror}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


def _capacity_warnings(config, args: argparse.Namespace) -> list[str]:  # type: ignore[no-untyped-def]
    from pypool import capacity

    if args.instances == 1 and args.max_connections is None:
        return []
    return capacity.instance_warnings(config, args.instances,
                                      args.max_connections or capacity.POSTGRES_MAX_CONNECTIONS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cluster":
        from pypool import cluster

        return cluster.main(argv[1:])
    if argv and argv[0] == "config":
        return config_command(argv[1:])
    parser = argparse.ArgumentParser(prog="pypool", description="PostgreSQL connection pooler (PgCat-compatible config)")
    parser.add_argument("config", nargs="?", default=os.environ.get("CONFIG_FILE", DEFAULT_CONFIG),
                        help="path to the PgCat-format TOML config (default: $CONFIG_FILE or pgcat.toml)")
    parser.add_argument("--log-level", default=os.environ.get("PYPOOL_LOG_LEVEL", "info"), choices=LEVELS)
    parser.add_argument("--log-format", default=os.environ.get("PYPOOL_LOG_FORMAT", "text"), choices=FORMATS,
                        help="text, or one JSON object a line with the client's address in a 'client' field")
    parser.add_argument("--version", action="version", version=f"pypool {__version__}")
    # Set by the supervisor of a multi-process pypool for each worker it starts (pypool.workers).
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format, args.worker_index)
    slot = None
    if args.worker_index is not None:
        if args.worker_count is None or args.worker_dir is None:
            parser.error("--worker-index needs --worker-count and --worker-dir")
        slot = (args.worker_index, args.worker_count, args.worker_dir)
    return run_pooler(args.config, slot, ["--log-level", args.log_level, "--log-format", args.log_format])


if __name__ == "__main__":
    raise SystemExit(main())
