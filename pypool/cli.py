"""Command line: `pypool [CONFIG]`, `pypool cluster ...`, `pypool config check|init`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from pypool import __version__

DEFAULT_CONFIG = "pgcat.toml"  # PgCat's default path


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def run_pooler(config_path: str) -> int:
    from pypool.app import Application
    from pypool.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        logging.getLogger("pypool").error("%s", exc)
        return 2
    for warning in config.warnings:
        logging.getLogger("pypool.config").warning("%s", warning)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay usable without it
        uvloop = None

    async def main() -> None:
        app = Application(config)
        await app.start()
        app.install_signal_handlers()
        await app.wait_stopped()

    try:
        if uvloop is not None:
            uvloop.run(main())
        else:
            asyncio.run(main())
    except ConfigError as exc:  # e.g. a TLS certificate that cannot be loaded
        logging.getLogger("pypool").error("%s", exc)
        return 2
    return 0


def config_command(argv: list[str]) -> int:
    from pypool.config import ConfigError, default_config_dict, dump_config, load_config

    parser = argparse.ArgumentParser(prog="pypool config")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("path")
    init = sub.add_parser("init", help="write a config from the Compose .env variables")
    init.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    if args.action == "check":
        try:
            config = load_config(args.path)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        users = sum(len(p.users) for p in config.pools.values())
        print(f"{args.path}: OK ({len(config.pools)} pool(s), {users} user(s))")
        return 0
    try:
        text = dump_config(default_config_dict(os.environ))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


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
    parser.add_argument("--log-level", default=os.environ.get("PYPOOL_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--version", action="version", version=f"pypool {__version__}")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    return run_pooler(args.config)


if __name__ == "__main__":
    raise SystemExit(main())
