"""Log set-up: ``--log-level`` and ``--log-format text|json`` (PgCat's names accepted too).

Lines about one client say so the same way everywhere: their message starts
with ``client <peer>`` (or ``admin <peer>`` on the admin console), where
``<peer>`` is the client's ``address:port``. The JSON format lifts that tag
into a ``client`` field so log pipelines can follow one client without
parsing text. Passwords and SCRAM secrets are never passed to a log call.
"""

from __future__ import annotations

import json
import logging
import time

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json", "debug")
# PgCat's values (Rust tracing levels, clap's LogFormat) and what they mean here. Python logging
# has no level below debug, so PgCat's `trace` logs what `debug` does.
LEVEL_ALIASES = {"trace": "debug", "warn": "warning"}
FORMAT_ALIASES = {"structured": "json"}


def _canonical(value: str, names: tuple[str, ...], aliases: dict[str, str]) -> str:
    name = value.strip().lower()
    name = aliases.get(name, name)
    if name not in names:
        raise ValueError(value)
    return name


def level_name(value: str) -> str:
    """A log level as pypool or PgCat spell it (any case) -> one of LEVELS; ValueError otherwise."""
    return _canonical(value, LEVELS, LEVEL_ALIASES)


def format_name(value: str) -> str:
    """A log format as pypool or PgCat spell it (any case) -> one of FORMATS; ValueError otherwise."""
    return _canonical(value, FORMATS, FORMAT_ALIASES)

# Message formats whose first argument is the client's peer address.
_CLIENT_TAGGED = ("client %s", "admin %s", "admin console: %s")


def client_tag(record: logging.LogRecord) -> str | None:
    msg = record.msg
    if isinstance(msg, str) and msg.startswith(_CLIENT_TAGGED) and isinstance(record.args, tuple) and record.args:
        return str(record.args[0])
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC), level, logger, msg, and client when the line is about one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        client = client_tag(record)
        if client is not None:
            entry["client"] = client
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str, worker: int | None = None) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "debug":  # PgCat's `debug` format: text with where each line was logged from
        where = f" [worker {worker}]" if worker is not None else ""
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s{where} %(name)s %(filename)s:%(lineno)d: %(message)s"))
    elif worker is not None:  # several processes write to the same stream: say which one
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [worker {worker}] %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
