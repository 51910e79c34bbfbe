"""Command line: `pypool [CONFIG]`, `pypool cluster ...`, `pypool config check|init`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from pypool import __version__, process_signals
from pypool.logs import format_name, level_name, setup_logging

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
    if worker_slot is None:  # the supervisor of several workers, or the only process
        from pypool import startup

        startup.log_startup(config)
        for warning in config.warnings:
            logging.getLogger("pypool.config").warning("%s", warning)
        startup.probe_in_background(config)
    if worker_slot is None and config.general.workers > 1:
        from pypool.workers import Supervisor

        try:
            return Supervisor(config_path, config, worker_args or []).run()
        finally:
            process_signals.ignore()  # every worker has stopped: a late signal must not kill the supervisor
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
        app.install_signal_handlers()  # before the port accepts clients: from then on a signal drains
        await app.start()
        if worker is not None:
            await worker.start(app)  # after the listener: a worker that answers is ready
        await app.wait_stopped()
        process_signals.ignore()  # "pypool stopped": from here to the exit a signal must not kill the process
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
    finally:
        process_signals.ignore()  # again: asyncio's loop.close() puts back the default action of its signals
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


def config_command(args: argparse.Namespace) -> int:
    from pypool import compose_env
    from pypool.config import ConfigError, default_config_dict, dump_config, load_config

    if args.action == "check":
        try:
            config = load_config(args.path, strict=args.strict)
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
            env.update(compose_env.read_env_file(args.env_file))
        env.update(os.environ)
        if args.base:
            text = dump_config(compose_env.with_credentials(compose_env.read_toml(args.base), env, args.base))
        else:
            text = dump_config(default_config_dict(env))
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
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


def _add_config_command(commands: "argparse._SubParsersAction") -> None:
    parser = commands.add_parser("config", help="check a config file, or write one from the Compose .env",
                                 description="Work with PgCat-format TOML config files.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="validate a config file (exit status 0 if it loads, 1 if not)",
                               description="Load a config file as the pooler would. Prints OK with the number of "
                                           "pools and users, or an error naming the file and the key; exit status "
                                           "0 or 1. Warnings (e.g. keys pypool ignores) go to stderr.")
    check.add_argument("path", metavar="CONFIG", help="the PgCat-format TOML file to check, e.g. pgcat.toml")
    check.add_argument("--instances", type=int, default=1,
                       help="how many pypool instances run this config (warns when they may open more "
                            "connections than --max-connections)")
    check.add_argument("--max-connections", type=int, default=None,
                       help="the servers' max_connections (default: PostgreSQL's 100)")
    check.add_argument("--strict", action="store_true",
                       help="unknown keys are errors, not warnings (as [general] reject_unknown_keys = true makes "
                            "them for the pooler)")
    init = actions.add_parser("init", help="write a config from the Compose .env variables",
                              description="Write a config from the Compose .env variables: the local cluster "
                                          "(pg1 primary, pg2/pg3 replicas on 127.0.0.1) from POSTGRESQL_* and "
                                          "*_PORT, or, with --from, the given config with its credentials from "
                                          "POSTGRESQL_USERNAME, POSTGRESQL_PASSWORD and POSTGRESQL_DATABASE.")
    init.add_argument("--from", dest="base", metavar="CONFIG",
                      help="start from this config (e.g. config/pgcat.simple.toml) and set every user's name "
                           "and password and every shard's database from the variables that are set; the pool "
                           "is named after the database (Docker Compose starts pypool this way)")
    init.add_argument("--env-file", help="read the variables from this .env file too (e.g. docker/.env); "
                                         "the process environment wins, as with Docker Compose")
    init.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    parser.set_defaults(run=config_command)


def _env_choice(names: tuple[str, ...], parse, default: str) -> str:
    """The first of the environment variables ``names`` that is set, parsed; ``default`` when none is."""
    for name in names:
        value = os.environ.get(name)
        if value:
            try:
                return parse(value)
            except ValueError:
                raise SystemExit(f"pypool: error: ${name}: invalid value {value!r}") from None
    return default


def _typed(parse, what: str):
    def convert(value: str) -> str:
        try:
            return parse(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what}: {value!r}") from None
    return convert


def _pooler_options() -> argparse.ArgumentParser:
    """The options of `pypool [CONFIG]`: pypool's own, with PgCat's short flags, values and variables."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "-l", "--log-level", type=_typed(level_name, "log level"),
        help="debug, info, warning or error; PgCat's trace and warn are accepted "
             "(default: $PYPOOL_LOG_LEVEL, $LOG_LEVEL, or info)")
    options.add_argument(
        "-F", "--log-format", type=_typed(format_name, "log format"),
        help="text; json (one object a line, the client's address in a 'client' field; PgCat's "
             "'structured' means json); debug (text with the source line) "
             "(default: $PYPOOL_LOG_FORMAT, $LOG_FORMAT, or text)")
    options.add_argument("-n", "--no-color", action="store_true",
                         help="accepted for PgCat's command lines: pypool never colours its log")
    options.add_argument("-V", "--version", action="version", version=f"pypool {__version__}")
    return options


def build_parser() -> argparse.ArgumentParser:
    """`pypool --help`: the pooler's options and the `config` and `cluster` commands."""
    from pypool import cluster

    parser = argparse.ArgumentParser(
        prog="pypool", parents=[_pooler_options()],
        usage="pypool [options] [CONFIG]\n       pypool {config,cluster} ...",
        description="PostgreSQL connection pooler that reads PgCat's TOML config. Without a command it runs "
                    "the pooler on CONFIG.",
        epilog="`pypool COMMAND --help` explains a command.")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="{config,cluster}", prog="pypool")
    _add_config_command(commands)
    cluster.add_command(commands)
    parser.add_argument("config", metavar="CONFIG", nargs="?", help=_CONFIG_HELP)
    return parser


_CONFIG_HELP = "path to the PgCat-format TOML config (default: $CONFIG_FILE or pgcat.toml)"
_COMMANDS = ("config", "cluster")


def _pooler_parser(help_parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Parses `pypool [options] [CONFIG]`; its --help is the whole program's."""
    parser = argparse.ArgumentParser(prog="pypool", parents=[_pooler_options()], add_help=False)
    parser.add_argument("config", metavar="CONFIG", nargs="?", default=os.environ.get("CONFIG_FILE", DEFAULT_CONFIG),
                        help=_CONFIG_HELP)
    parser.add_argument("-h", "--help", action="store_true")
    # Set by the supervisor of a multi-process pypool for each worker it starts (pypool.workers).
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    help_parser = build_parser()
    if argv and argv[0] in _COMMANDS:
        process_signals.restore()  # `python -m pypool` deferred them for the pooler
        args = help_parser.parse_args(argv)
        return args.run(args)
    process_signals.defer()  # the `pypool` script: from here on, as `python -m pypool` does from its first line
    parser = _pooler_parser(help_parser)
    args = parser.parse_args(argv)
    if args.help:
        help_parser.print_help()
        return 0
    level = args.log_level or _env_choice(("PYPOOL_LOG_LEVEL", "LOG_LEVEL"), level_name, "info")
    fmt = args.log_format or _env_choice(("PYPOOL_LOG_FORMAT", "LOG_FORMAT"), format_name, "text")
    setup_logging(level, fmt, args.worker_index)
    slot = None
    if args.worker_index is not None:
        if args.worker_count is None or args.worker_dir is None:
            parser.error("--worker-index needs --worker-count and --worker-dir")
        slot = (args.worker_index, args.worker_count, args.worker_dir)
    return run_pooler(args.config, slot, ["--log-level", level, "--log-format", fmt])


if __name__ == "__main__":
    raise SystemExit(main())
