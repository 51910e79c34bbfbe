"""PgCat-compatible configuration: TOML in, frozen dataclasses out.

pypool reads PgCat's ``pgcat.toml`` format unchanged, so a user can replace
PgCat with pypool without touching their file.  The file is parsed with
:mod:`tomllib` and every value is checked by hand: a wrong type, a missing
required key or an impossible value raises :class:`ConfigError`, whose
message names the file, the dotted key, what was expected and what was given
(never the value of a password).

Defaults are PgCat's *code* defaults (the ``#[serde(default = ...)]``
functions in PgCat's ``src/config.rs``), not the example values shown in its
``pgcat.toml`` / ``CONFIG.md``, because the code defaults are what PgCat does
when a key is absent.  Settings that pypool adds are marked "pypool addition".

Every key is declared once in :mod:`pypool.config_keys` (where it lives, the
field it sets, how a reload applies it).  Keys are handled in three ways:

* keys pypool implements are type-checked and land in the dataclasses;
* PgCat keys pypool does not use (sharding, plugins, auth_query, ...) are
  type-checked and produce one warning each that says why pypool ignores them;
* keys nobody knows produce a warning "unknown key in [table], ignored" with
  the nearest known key, as PgCat silently ignores unknown keys; with
  ``strict`` (``pypool config check --strict``) or ``general.reject_unknown_keys``
  they are errors.

Warnings are collected in :attr:`Config.warnings`; the caller decides whether
to log them or (``pypool config check``) print them.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import types
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import tomli_w

from pypool import config_env, config_keys
from pypool import hba as _hba
from pypool.config_keys import Section
from pypool.routing.sharding import DEFAULT_REGEX_SEARCH_LIMIT, Sharding, parse_default_shard

__all__ = [
    "ConfigError",
    "ServerAddress",
    "Shard",
    "User",
    "Pool",
    "General",
    "Config",
    "load_config",
    "parse_config",
    "dump_config",
    "default_config_dict",
    "POOL_MODES",
    "ROLES",
    "DEFAULT_ROLES",
    "LOAD_BALANCING_MODES",
    "CLIENT_AUTH_METHODS",
    "AUTH_TYPES",
    "CLIENT_TLS_MODES",
    "CAUSAL_READS_MODES",
]


# --------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------
# PgCat code defaults (src/config.rs, General::default_* / Pool::default_*).
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 5432  # General::default_port(); PgCat's docs/example file say 6432
DEFAULT_CONNECT_TIMEOUT_MS = 1000
DEFAULT_IDLE_TIMEOUT_MS = 600_000  # 10 minutes
DEFAULT_SERVER_LIFETIME_MS = 3_600_000  # 1 hour
DEFAULT_HEALTHCHECK_TIMEOUT_MS = 1000
DEFAULT_HEALTHCHECK_DELAY_MS = 30_000
DEFAULT_BAN_TIME_S = 60  # seconds, like PgCat
DEFAULT_SHUTDOWN_TIMEOUT_MS = 60_000
DEFAULT_AUTORELOAD_MS = 15_000  # PgCat's interval for the old `autoreload = true`
DEFAULT_IDLE_CLIENT_IN_TRANSACTION_TIMEOUT_MS = 0  # 0 = off
DEFAULT_PROMETHEUS_EXPORTER_PORT = 9930
DEFAULT_POOL_MODE = "transaction"
DEFAULT_DEFAULT_ROLE = "any"
DEFAULT_LOAD_BALANCING_MODE = "random"
DEFAULT_PREPARED_STATEMENTS_CACHE_SIZE = 0
# PgCat turns TCP keepalives on for every socket: a dead peer is noticed within about 30 s.
DEFAULT_TCP_KEEPALIVES_IDLE_S = 5
DEFAULT_TCP_KEEPALIVES_COUNT = 5
DEFAULT_TCP_KEEPALIVES_INTERVAL_S = 5
DEFAULT_TCP_USER_TIMEOUT_MS = 10_000

# pypool additions (PgCat has no equivalent).
# How long a client waits for a free server connection before it gets an
# error.  PgCat waits connect_timeout (default 1 s) for this too; pypool keeps
# the two apart (README, "Waiting for a server connection").
DEFAULT_CHECKOUT_TIMEOUT_MS = 5000
DEFAULT_CLIENT_AUTH_METHOD = "scram-sha-256"
DEFAULT_CLIENT_TLS_MODE = "allow"
DEFAULT_MAX_CLIENT_CONN = 0  # 0 = unlimited
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024  # bytes; larger messages are refused
# Worker processes sharing the listen port (SO_REUSEPORT).  One process unless
# asked: PgCat's worker_threads (default 4) counts threads, not processes.
DEFAULT_WORKERS = 1
MAX_WORKERS = 64
WORKERS_AUTO = "auto"  # one worker per usable core
DEFAULT_CLIENT_LOGIN_TIMEOUT_MS = 60_000  # a client must finish logging in within this
# Causal reads (pypool addition): "session" whenever read/write splitting is on, else "off".
# A read waits at most this long for a replica to replay the write it must see. Healthy
# streaming replicas replay within milliseconds; a replica a second behind is in trouble,
# and an interactive read-after-write should not hang longer: past it the read goes to the
# primary (primary reads on) or fails with a message naming the lag. It also matches
# connect_timeout and healthcheck_timeout, the other waits a client meets per request.
DEFAULT_CAUSAL_READS_TIMEOUT_MS = 1000

# Accepted spellings -> canonical value.  Matching is case-insensitive
# (PgCat accepts e.g. "transaction" and "Transaction").
POOL_MODES: Mapping[str, str] = types.MappingProxyType(
    {"transaction": "transaction", "session": "session"}
)
ROLES: Mapping[str, str] = types.MappingProxyType({"primary": "primary", "replica": "replica"})
DEFAULT_ROLES: Mapping[str, str] = types.MappingProxyType(
    {"any": "any", "replica": "replica", "primary": "primary"}
)
# Transaction mode, a client whose transaction leaves state on its server connection (temporary
# tables, WITH HOLD cursors, session advisory locks, SQL PREPARE): keep it on that connection, or refuse.
SESSION_PINNING_MODES: Mapping[str, str] = types.MappingProxyType({"auto": "auto", "refuse": "refuse"})
DEFAULT_SESSION_PINNING = "auto"
LOAD_BALANCING_MODES: Mapping[str, str] = types.MappingProxyType(
    {
        "random": "random",
        "loc": "loc",
        "least_outstanding_connections": "loc",  # PgCat's long spelling
        "round_robin": "round_robin",  # pypool addition
    }
)
CLIENT_AUTH_METHODS: Mapping[str, str] = types.MappingProxyType(
    {"scram-sha-256": "scram-sha-256", "md5": "md5"}
)
# PgCat's auth_type / admin_auth_type ("md5" or "trust"), plus pypool's scram-sha-256.
AUTH_TYPES: Mapping[str, str] = types.MappingProxyType(
    {"trust": "trust", "md5": "md5", "scram-sha-256": "scram-sha-256"}
)
CLIENT_TLS_MODES: Mapping[str, str] = types.MappingProxyType(
    {"disable": "disable", "allow": "allow", "require": "require"}
)
CAUSAL_READS_MODES: Mapping[str, str] = types.MappingProxyType(
    {"off": "off", "session": "session", "global": "global"}
)

# Values of these keys are never echoed in an error or a warning.
_SECRET_KEYS = frozenset({"password", "server_password", "admin_password", "auth_query_password"})


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
class ConfigError(Exception):
    """A configuration file that cannot be used.

    ``str(e)`` is ``"<file>: <dotted.key>: <what was expected, what was given>"``
    (or ``"<file>: <reason>"`` when no single key is at fault).  The parts are
    also available as :attr:`path`, :attr:`key` and :attr:`reason`.
    """

    # Not a PoolerError: it names a file and key, not an SQLSTATE; RELOAD on the console
    # turns it into an AdminError with CONFIG_FILE_ERROR.

    def __init__(self, path: str, key: str | None, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        text = f"{path}: {key}: {reason}" if key else f"{path}: {reason}"
        super().__init__(text)


# --------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int
    role: str  # "primary" | "replica"


@dataclass(frozen=True)
class Shard:
    database: str
    servers: tuple[ServerAddress, ...]


@dataclass(frozen=True)
class User:
    username: str
    password: str = field(repr=False)
    pool_size: int
    min_pool_size: int = 0
    pool_mode: str | None = None  # overrides the pool's mode when set
    statement_timeout: int = 0  # ms, 0 = off
    server_username: str | None = None  # towards PostgreSQL, if different
    server_password: str | None = field(default=None, repr=False)
    connect_timeout: int | None = None  # ms overrides of the pool's values
    idle_timeout: int | None = None
    server_lifetime: int | None = None
    max_client_connections: int = 0  # pypool addition: clients of this user in this pool, 0 = unlimited
    auth_type: str | None = None  # how this user logs in; None = general.client_auth_method (or hba)


@dataclass(frozen=True)
class Pool:
    name: str
    pool_mode: str = DEFAULT_POOL_MODE
    default_role: str = DEFAULT_DEFAULT_ROLE
    query_parser_enabled: bool = False
    query_parser_read_write_splitting: bool = False
    query_parser_max_length: int | None = None
    primary_reads_enabled: bool = False
    load_balancing_mode: str = DEFAULT_LOAD_BALANCING_MODE
    # ms; the pool's own value when set, otherwise general's
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_MS
    idle_timeout: int = DEFAULT_IDLE_TIMEOUT_MS
    server_lifetime: int = DEFAULT_SERVER_LIFETIME_MS
    checkout_timeout: int = DEFAULT_CHECKOUT_TIMEOUT_MS
    max_replica_lag_ms: int | None = None  # pypool addition, None = off
    read_only_functions: tuple[str, ...] = ()  # pypool addition, lower-case names
    prepared_statements_cache_size: int = DEFAULT_PREPARED_STATEMENTS_CACHE_SIZE
    session_pinning: str = DEFAULT_SESSION_PINNING  # pypool addition: "auto" | "refuse"
    # pypool addition: server connections of one pool user that may be pinned; None = half of pool_size
    max_pinned_connections: int | None = None
    causal_reads: str = "off"  # pypool addition: "off" | "session" | "global"
    causal_reads_timeout: int = DEFAULT_CAUSAL_READS_TIMEOUT_MS  # pypool addition, ms
    users: Mapping[str, User] = field(
        default_factory=lambda: types.MappingProxyType({}), hash=False
    )
    shards: tuple[Shard, ...] = ()
    sharding: Sharding = Sharding()

    def primary(self) -> ServerAddress | None:
        """The primary of shard 0, or None if that shard has only replicas."""
        if not self.shards:
            return None
        for server in self.shards[0].servers:
            if server.role == "primary":
                return server
        return None

    def replicas(self) -> tuple[ServerAddress, ...]:
        """The replicas of shard 0, in file order."""
        if not self.shards:
            return ()
        return tuple(s for s in self.shards[0].servers if s.role == "replica")


@dataclass(frozen=True)
class General:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = DEFAULT_WORKERS  # pypool addition: processes (PgCat's worker_threads is read, not used)
    workers_auto: bool = False  # `workers = "auto"`: `workers` is the count it resolved to
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_MS
    idle_timeout: int = DEFAULT_IDLE_TIMEOUT_MS
    server_lifetime: int = DEFAULT_SERVER_LIFETIME_MS
    checkout_timeout: int = DEFAULT_CHECKOUT_TIMEOUT_MS  # pypool addition
    healthcheck_timeout: int = DEFAULT_HEALTHCHECK_TIMEOUT_MS
    healthcheck_delay: int = DEFAULT_HEALTHCHECK_DELAY_MS
    ban_time: int = DEFAULT_BAN_TIME_S  # seconds
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT_MS
    idle_client_in_transaction_timeout: int = DEFAULT_IDLE_CLIENT_IN_TRANSACTION_TIMEOUT_MS
    enable_prometheus_exporter: bool = False
    prometheus_exporter_port: int = DEFAULT_PROMETHEUS_EXPORTER_PORT
    admin_username: str = "admin"
    admin_password: str = field(default="admin", repr=False)
    client_auth_method: str = DEFAULT_CLIENT_AUTH_METHOD  # pypool addition
    log_client_connections: bool = False
    log_client_disconnections: bool = False
    tls_certificate: str | None = None
    tls_private_key: str | None = None
    client_tls_mode: str = DEFAULT_CLIENT_TLS_MODE  # pypool addition
    server_tls: bool = False
    verify_server_certificate: bool = False
    max_client_conn: int = DEFAULT_MAX_CLIENT_CONN  # pypool addition, 0 = unlimited
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE  # pypool addition, bytes
    server_tls_ca_file: str | None = None  # pypool addition: CAs for verify_server_certificate
    client_login_timeout: int = DEFAULT_CLIENT_LOGIN_TIMEOUT_MS  # pypool addition, ms
    # pypool addition: host-based access rules (general.hba or general.hba_file); None = no rules
    hba: tuple[_hba.HbaRule, ...] | None = None
    reject_unknown_keys: bool = False  # pypool addition: an unknown key is an error, not a warning
    admin_auth_type: str | None = None  # how the admin logs in; None = client_auth_method
    tcp_keepalives_idle: int = DEFAULT_TCP_KEEPALIVES_IDLE_S  # s; 0 = no keepalives (a pypool reading)
    tcp_keepalives_count: int = DEFAULT_TCP_KEEPALIVES_COUNT
    tcp_keepalives_interval: int = DEFAULT_TCP_KEEPALIVES_INTERVAL_S  # s
    tcp_user_timeout: int = DEFAULT_TCP_USER_TIMEOUT_MS  # ms; 0 = the kernel's default
    autoreload: int | None = None  # ms between looks at the config file (pypool.autoreload); None = off
    shutdown_delay: int = 0  # pypool addition, ms: serve on with /readyz failing before the drain


@dataclass(frozen=True)
class Config:
    path: str
    general: General
    pools: Mapping[str, Pool] = field(hash=False)
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------
def load_config(path: str | os.PathLike, *, strict: bool = False) -> Config:
    """Read and parse a PgCat-format TOML file.

    Raises :class:`ConfigError` for an unreadable file, a TOML syntax error
    (with its line and column) or an invalid setting; with ``strict`` (or
    ``general.reject_unknown_keys = true`` in the file) also for a key
    nobody knows, which is otherwise a warning.
    """
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(spath, None, f"cannot read config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            spath, None, f"config file is not valid UTF-8 (byte offset {exc.start})"
        ) from None
    return parse_config(text, spath, strict=strict)


def parse_config(text: str, path: str = "<string>", *, strict: bool = False,
                 environ: Mapping[str, str] | None = None) -> Config:
    """Parse PgCat-format TOML text; ``path`` is only used in messages. ``strict``: see :func:`load_config`.
    ``"${NAME}"`` values come from ``environ`` (default: the process environment)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages carry "(at line L, column C)" and never echo the
        # offending text, so no secret can leak through here.
        raise ConfigError(path, None, f"invalid TOML: {exc}") from None
    try:
        data = config_env.expand(data, environ)  # "${NAME}" values from the environment (secrets)
    except config_env.MissingVariable as exc:
        raise ConfigError(path, exc.key, str(exc)) from None
    return _build(_Ctx(path), data, strict)


# One scalar as tomli-w writes it: a basic string, a number or a boolean.
_TOML_SCALAR = r'(?:"(?:[^"\\\n]|\\.)*"|[-+0-9.eE_xob]+|true|false)'
# A multi-line array whose elements are all scalars, e.g. one server entry.
_MULTILINE_SCALAR_ARRAY = re.compile(
    r"\[\n((?:[ \t]+" + _TOML_SCALAR + r",\n)+)[ \t]*\]"
)


def dump_config(cfg_dict: dict) -> str:
    """Serialise a PgCat-format config dict (e.g. from :func:`default_config_dict`) to TOML.

    tomli-w writes every nested array over several lines; arrays of plain
    scalars (the ``[host, port, role]`` server entries) are folded back onto
    one line so the output reads like a hand-written pgcat.toml.
    """
    text = tomli_w.dumps(cfg_dict)

    def fold(match: re.Match[str]) -> str:
        items = [line.strip().rstrip(",") for line in match.group(1).splitlines()]
        return "[" + ", ".join(items) + "]"

    return _MULTILINE_SCALAR_ARRAY.sub(fold, text)


def default_config_dict(env: Mapping[str, str]) -> dict:
    """A PgCat-format config dict for the local cluster, from Compose ``.env`` names.

    Used by ``pypool config init``.  Variables (default in brackets):
    POSTGRESQL_USERNAME (postgres), POSTGRESQL_PASSWORD (mysecretpassword),
    POSTGRESQL_DATABASE (postgres), PGCAT_PORT (6432) and PG1_PORT / PG2_PORT /
    PG3_PORT (5433 / 5434 / 5435) for the primary and two replicas, all on
    127.0.0.1.
    """
    username = env.get("POSTGRESQL_USERNAME") or "postgres"
    password = env.get("POSTGRESQL_PASSWORD") or "mysecretpassword"
    database = env.get("POSTGRESQL_DATABASE") or "postgres"
    listen_port = _env_port(env, "PGCAT_PORT", 6432)
    ports = [
        _env_port(env, "PG1_PORT", 5433),
        _env_port(env, "PG2_PORT", 5434),
        _env_port(env, "PG3_PORT", 5435),
    ]
    host = "127.0.0.1"
    return {
        "general": {
            "host": host,
            "port": listen_port,
            "enable_prometheus_exporter": True,
            "prometheus_exporter_port": DEFAULT_PROMETHEUS_EXPORTER_PORT,
            "admin_username": "admin_user",
            "admin_password": "admin_pass",
        },
        "pools": {
            database: {
                "pool_mode": "transaction",
                "default_role": "any",
                "query_parser_enabled": True,
                "query_parser_read_write_splitting": True,
                "primary_reads_enabled": False,
                "users": {
                    "0": {
                        "username": username,
                        "password": password,
                        "pool_size": 10,
                        "min_pool_size": 0,
                    }
                },
                "shards": {
                    "0": {
                        "database": database,
                        "servers": [
                            [host, ports[0], "primary"],
                            [host, ports[1], "replica"],
                            [host, ports[2], "replica"],
                        ],
                    }
                },
            }
        },
    }


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    if not re.fullmatch(r"[0-9]+", text) or not 1 <= int(text) <= 65535:
        raise ConfigError("environment", name, f"expected a port number 1..65535, got {_quote(text)}")
    return int(text)


# --------------------------------------------------------------------------
# Parsing machinery
# --------------------------------------------------------------------------
_MISSING: Any = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_text(parts: Iterable[str]) -> str:
    """Dotted key as TOML would write it: ``pools."my.db".users.0``."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else json.dumps(p) for p in parts)


def _quote(text: str, limit: int = 80) -> str:
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "an empty string" if value == "" else "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _describe(value: Any, secret: bool = False) -> str:
    """What was given, for an error message.  Secrets are described by type only."""
    kind = _kind(value)
    if secret or isinstance(value, (list, dict)) or value == "":
        return kind
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} ({kind})"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return f"{_quote(value)} ({kind})"
    return f"{value!r} ({kind})"


class _Ctx:
    """Per-parse state: the file name (for messages), the warnings and the unknown keys so far."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.warnings: list[str] = []
        self.unknown: list[tuple[tuple[str, ...], str, str]] = []  # (key, "[table]", "; did you mean ...")

    def error(self, parts: Iterable[str], reason: str) -> ConfigError:
        return ConfigError(self.path, _key_text(parts) or None, reason)

    def warn(self, parts: Iterable[str], reason: str) -> None:
        self.warnings.append(f"{self.path}: {_key_text(parts)}: {reason}")


class _Table:
    """A TOML table being read: typed getters plus unknown-key bookkeeping."""

    def __init__(self, ctx: _Ctx, parts: tuple[str, ...], data: dict, section: Section) -> None:
        self.ctx = ctx
        self.parts = parts
        self.data = data
        self.section = section
        self.seen: set[str] = set()

    def key(self, name: str) -> tuple[str, ...]:
        return self.parts + (name,)

    def error(self, name: str, reason: str) -> ConfigError:
        return self.ctx.error(self.key(name), reason)

    def raw(self, name: str) -> Any:
        self.seen.add(name)
        return self.data.get(name, _MISSING)

    def has(self, name: str) -> bool:
        return name in self.data

    def _missing(self, name: str, what: str) -> ConfigError:
        return self.error(name, f"required key is missing (expected {what})")

    def _wrong(self, name: str, what: str, value: Any) -> ConfigError:
        return self.error(name, f"expected {what}, got {_describe(value, name in _SECRET_KEYS)}")

    # -- scalar getters --------------------------------------------------
    def string(self, name: str, default: Any = _MISSING, *, nonempty: bool = True) -> Any:
        what = "a non-empty string" if nonempty else "a string"
        value = self.raw(name)
        if value is _MISSING:
            if default is _MISSING:
                raise self._missing(name, what)
            return default
        if not isinstance(value, str) or (nonempty and value == ""):
            raise self._wrong(name, what, value)
        return value

    def integer(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        minimum: int = 0,
        maximum: int | None = None,
    ) -> Any:
        if maximum is not None:
            what = f"an integer {minimum}..{maximum}"
        elif minimum == 1:
            what = "a positive integer"
        elif minimum == 0:
            what = "a non-negative integer"
        else:
            what = f"an integer >= {minimum}"
        value = self.raw(name)
        if value is _MISSING:
            if default is _MISSING:
                raise self._missing(name, what)
            return default
        # bool is a subclass of int in Python; TOML true/false is not a number.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(name, what, value)
        if value < minimum or (maximum is not None and value > maximum):
            raise self._wrong(name, what, value)
        return value

    def port(self, name: str, default: Any = _MISSING) -> Any:
        return self.integer(name, default, minimum=1, maximum=65535)

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        value = self.raw(name)
        if value is _MISSING:
            if default is _MISSING:
                raise self._missing(name, "true or false")
            return default
        if not isinstance(value, bool):
            raise self._wrong(name, "true or false (a TOML boolean, unquoted)", value)
        return value

    def choice(self, name: str, choices: Mapping[str, str], default: Any = _MISSING) -> Any:
        what = "one of " + ", ".join(_quote(c) for c in dict.fromkeys(choices.values()))
        value = self.raw(name)
        if value is _MISSING:
            if default is _MISSING:
                raise self._missing(name, what)
            return default
        if not isinstance(value, str) or value.lower() not in choices:
            raise self._wrong(name, what, value)
        return choices[value.lower()]

    def table(self, name: str, *, required: bool = True) -> dict | None:
        value = self.raw(name)
        if value is _MISSING:
            if required:
                raise self._missing(name, "a table")
            return None
        if not isinstance(value, dict):
            raise self._wrong(name, "a table", value)
        return value

    # -- bookkeeping -----------------------------------------------------
    def finish(self) -> None:
        """Check the PgCat keys pypool ignores, and note every key nobody knows."""
        for name, value in self.data.items():
            if name in self.seen:
                continue
            key = config_keys.lookup(self.section, name)
            if key is None:
                where = f"[{_key_text(self.parts)}]" if self.parts else "the top level"
                hint = _nearest_key_hint(self.section, name)
                self.ctx.unknown.append((self.key(name), where, hint))
                self.ctx.warn(self.key(name), f"unknown key in {where}, ignored{hint}")
                continue
            if key.accepts and not _accepted(value, key.accepts):
                raise self._wrong(name, " or ".join(_TYPE_NAMES[t] for t in key.accepts), value)
            if not key.quiet:
                self.ctx.warn(self.key(name), f"PgCat setting accepted, not used by pypool: {key.reason}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", str: "a string", list: "an array", dict: "a table"}


def _accepted(value: Any, types_: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # a TOML boolean is no number
        return bool in types_
    return isinstance(value, types_)


def _nearest_key_hint(section: Section, name: str) -> str:
    """"; did you mean `pool_mode`?" for a misspelt key, or where a misplaced one belongs, or ""."""
    guess = config_keys.nearest(section, name)
    if guess is not None:
        return f"; did you mean `{guess}`?"
    other = config_keys.elsewhere(section, name)
    if other is not None:
        return f"; `{name}` belongs in [{other.value}]"
    return ""


def _build(ctx: _Ctx, data: dict, strict: bool) -> Config:
    top = _Table(ctx, (), data, Section.TOP)
    general_data = top.table("general")
    general_tbl = _Table(ctx, ("general",), general_data, Section.GENERAL)
    general = _parse_general(general_tbl)
    if general.workers_auto:
        general = _resolve_auto_workers(general, top.raw("pools"))
    legacy_ps_size = _legacy_prepared_statements_size(general_tbl)
    general_tbl.finish()

    pools_data = top.table("pools")
    pools: dict[str, Pool] = {}
    for name, pool_data in pools_data.items():
        parts = ("pools", name)
        if not isinstance(pool_data, dict):
            raise ctx.error(parts, f"expected a table, got {_describe(pool_data)}")
        if name == "":
            raise ctx.error(parts, "expected a non-empty pool name")
        pools[name] = _parse_pool(_Table(ctx, parts, pool_data, Section.POOL), name, general, legacy_ps_size)
    if not pools:
        ctx.warn(("pools",), "no pools configured; no client can connect")
    _note_pgcat_checkout_wait(ctx, general, general_data, pools, pools_data)
    top.finish()
    if ctx.unknown and (strict or general.reject_unknown_keys):
        raise _unknown_keys_error(ctx, "with --strict" if strict else "because general.reject_unknown_keys is true")
    return Config(
        path=ctx.path,
        general=general,
        pools=types.MappingProxyType(pools),
        warnings=tuple(ctx.warnings),
    )


def _note_pgcat_checkout_wait(ctx: _Ctx, general: General, general_data: dict, pools: Mapping[str, Pool],
                              pools_data: dict) -> None:
    """PgCat waits connect_timeout for a free server connection, pypool checkout_timeout: say so where a
    PgCat file raised connect_timeout above the wait pypool would use."""
    if "checkout_timeout" in general_data:
        return
    where: list[tuple[tuple[str, ...], int, int]] = []
    if general.connect_timeout > general.checkout_timeout:
        where.append((("general", "connect_timeout"), general.connect_timeout, general.checkout_timeout))
    for name, pool in pools.items():
        own = pools_data[name]
        if "connect_timeout" in own and "checkout_timeout" not in own and pool.connect_timeout > pool.checkout_timeout:
            where.append((("pools", name, "connect_timeout"), pool.connect_timeout, pool.checkout_timeout))
    for parts, connect, checkout in where:
        ctx.warn(parts, f"PgCat also waits connect_timeout ({connect} ms) for a free server connection; pypool "
                        f"waits checkout_timeout ({checkout} ms): set checkout_timeout = {connect} to wait as long")


def _unknown_keys_error(ctx: _Ctx, why: str) -> ConfigError:
    (first, where, hint), rest = ctx.unknown[0], ctx.unknown[1:]
    reason = f"unknown key in {where}, an error {why}{hint}"
    if rest:
        reason += f"; also unknown: {', '.join(_key_text(parts) for parts, _, _ in rest)}"
    return ctx.error(first, reason)


def _parse_general(t: _Table) -> General:
    general = General(
        host=t.string("host", DEFAULT_HOST),
        port=t.port("port", DEFAULT_PORT),
        workers=_parse_workers(t),
        workers_auto=_is_auto(t.raw("workers")),
        connect_timeout=t.integer("connect_timeout", DEFAULT_CONNECT_TIMEOUT_MS),
        idle_timeout=t.integer("idle_timeout", DEFAULT_IDLE_TIMEOUT_MS),
        server_lifetime=t.integer("server_lifetime", DEFAULT_SERVER_LIFETIME_MS),
        checkout_timeout=t.integer("checkout_timeout", DEFAULT_CHECKOUT_TIMEOUT_MS),
        healthcheck_timeout=t.integer("healthcheck_timeout", DEFAULT_HEALTHCHECK_TIMEOUT_MS),
        healthcheck_delay=t.integer("healthcheck_delay", DEFAULT_HEALTHCHECK_DELAY_MS),
        ban_time=t.integer("ban_time", DEFAULT_BAN_TIME_S),
        shutdown_timeout=t.integer("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT_MS),
        idle_client_in_transaction_timeout=t.integer(
            "idle_client_in_transaction_timeout", DEFAULT_IDLE_CLIENT_IN_TRANSACTION_TIMEOUT_MS
        ),
        enable_prometheus_exporter=t.boolean("enable_prometheus_exporter", False),
        prometheus_exporter_port=t.port("prometheus_exporter_port", DEFAULT_PROMETHEUS_EXPORTER_PORT),
        # PgCat has no default for these two: the keys are required.
        admin_username=t.string("admin_username"),
        # Empty only where no password is asked (PgCat's trust example has admin_password = "").
        admin_password=t.string("admin_password", nonempty=str(t.raw("admin_auth_type")).lower() != "trust"),
        client_auth_method=t.choice(
            "client_auth_method", CLIENT_AUTH_METHODS, DEFAULT_CLIENT_AUTH_METHOD
        ),
        log_client_connections=t.boolean("log_client_connections", False),
        log_client_disconnections=t.boolean("log_client_disconnections", False),
        tls_certificate=t.string("tls_certificate", None),
        tls_private_key=t.string("tls_private_key", None),
        client_tls_mode=t.choice("client_tls_mode", CLIENT_TLS_MODES, DEFAULT_CLIENT_TLS_MODE),
        server_tls=t.boolean("server_tls", False),
        verify_server_certificate=t.boolean("verify_server_certificate", False),
        max_client_conn=t.integer("max_client_conn", DEFAULT_MAX_CLIENT_CONN),
        max_message_size=t.integer("max_message_size", DEFAULT_MAX_MESSAGE_SIZE, minimum=1024),
        server_tls_ca_file=t.string("server_tls_ca_file", None),
        client_login_timeout=t.integer("client_login_timeout", DEFAULT_CLIENT_LOGIN_TIMEOUT_MS, minimum=1),
        hba=_parse_hba(t),
        reject_unknown_keys=t.boolean("reject_unknown_keys", False),
        admin_auth_type=t.choice("admin_auth_type", AUTH_TYPES, None),
        tcp_keepalives_idle=t.integer("tcp_keepalives_idle", DEFAULT_TCP_KEEPALIVES_IDLE_S, maximum=32767),
        tcp_keepalives_count=t.integer("tcp_keepalives_count", DEFAULT_TCP_KEEPALIVES_COUNT, minimum=1,
                                       maximum=127),
        tcp_keepalives_interval=t.integer("tcp_keepalives_interval", DEFAULT_TCP_KEEPALIVES_INTERVAL_S,
                                          minimum=1, maximum=32767),
        tcp_user_timeout=t.integer("tcp_user_timeout", DEFAULT_TCP_USER_TIMEOUT_MS, maximum=2**31 - 1),
        autoreload=_parse_autoreload(t),
        shutdown_delay=t.integer("shutdown_delay", 0),
    )
    if general.tls_certificate is not None and general.tls_private_key is None:
        raise t.error(
            "tls_private_key",
            "required key is missing (expected a file path, because tls_certificate is set)",
        )
    if general.tls_private_key is not None and general.tls_certificate is None:
        t.ctx.warn(t.key("tls_private_key"), "ignored, because tls_certificate is not set")
    if general.client_tls_mode == "require" and general.tls_certificate is None:
        raise t.error(
            "client_tls_mode",
            'expected "disable" or "allow" when tls_certificate is not set, got "require"',
        )
    return general


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == WORKERS_AUTO


def _parse_workers(t: _Table) -> int:
    """``workers`` (pypool) sets the process count, or ``"auto"`` one per usable core; PgCat's
    ``worker_threads`` counts Tokio threads and is reported as ignored (config_keys), so a PgCat file
    does not silently start four processes."""
    value = t.raw("workers")
    if _is_auto(value):
        return min(usable_cores(), MAX_WORKERS)  # lowered to the smallest pool_size by _resolve_auto_workers
    if isinstance(value, str):
        raise t.error("workers", f'expected an integer 1..{MAX_WORKERS} or "{WORKERS_AUTO}", got {_describe(value)}')
    return t.integer("workers", DEFAULT_WORKERS, minimum=1, maximum=MAX_WORKERS)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _resolve_auto_workers(general: General, pools_data: Any) -> General:
    """``workers = "auto"`` never asks for more workers than the smallest ``pool_size``: each worker needs
    a share of at least one connection per pool, and the same file must load on a machine with more cores."""
    sizes = [user.get("pool_size") for pool in (pools_data.values() if isinstance(pools_data, dict) else ())
             if isinstance(pool, dict) and isinstance(pool.get("users"), dict)
             for user in pool["users"].values() if isinstance(user, dict)]
    sizes = [s for s in sizes if isinstance(s, int) and not isinstance(s, bool) and s >= 1]
    return replace(general, workers=min([general.workers, *sizes]))


def _parse_autoreload(t: _Table) -> int | None:
    """PgCat's ``autoreload``: milliseconds between looks at the file; PgCat before 1.0 took
    true (every 15 s) or false, which pypool reads too."""
    value = t.raw("autoreload")
    if value is _MISSING or value is False:
        return None
    if value is True:
        return DEFAULT_AUTORELOAD_MS
    if isinstance(value, int) and value >= 1:
        return value
    raise t.error("autoreload", f"expected milliseconds (a positive integer), or true/false, got {_describe(value)}")


def _parse_hba(t: _Table) -> tuple[_hba.HbaRule, ...] | None:
    """``hba`` (a list of pg_hba lines) or ``hba_file`` (a pg_hba-format file), not both."""
    inline = t.raw("hba")
    path = t.string("hba_file", None)
    if inline is not _MISSING and path is not None:
        raise t.error("hba_file", "expected either hba or hba_file, not both")
    entries: list[tuple[tuple[str, ...], str]] = []
    if inline is not _MISSING:
        if not isinstance(inline, list):
            raise t._wrong("hba", 'an array of pg_hba lines like "host all all 10.0.0.0/8 scram-sha-256"', inline)
        for i, item in enumerate(inline):
            if not isinstance(item, str):
                raise t.ctx.error(t.key("hba") + (str(i),), f"expected a pg_hba line, got {_describe(item)}")
            entries.append((t.key("hba") + (str(i),), item))
    elif path is not None:
        full = os.path.join(os.path.dirname(t.ctx.path), path) if t.ctx.path != "<string>" else path
        try:
            with open(full, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise t.error("hba_file", f"cannot read {_quote(full)}: {getattr(exc, 'strerror', None) or exc}") from None
        entries = [(t.key("hba_file") + (f"line {n}",), line) for n, line in _hba.parse_file_text(text)]
    else:
        return None
    rules = []
    for parts, line in entries:
        try:
            rules.append(_hba.parse_rule(line))
        except ValueError as exc:
            raise ConfigError(t.ctx.path, _key_text(parts[:-1]) + f"[{parts[-1]}]", str(exc)) from None
    return tuple(rules)


def _legacy_prepared_statements_size(t: _Table) -> int | None:
    """Older PgCat releases configured prepared statements in [general].

    ``general.prepared_statements`` (bool) and
    ``general.prepared_statements_cache_size`` are honoured as the default for
    pools that do not set ``prepared_statements_cache_size`` themselves.
    """
    enabled = t.boolean("prepared_statements", None)
    size = t.integer("prepared_statements_cache_size", None)
    if enabled is False:
        return 0
    return size


def _parse_pool(t: _Table, name: str, general: General, legacy_ps_size: int | None) -> Pool:
    query_parser_enabled = t.boolean("query_parser_enabled", False)
    rw_splitting = t.boolean("query_parser_read_write_splitting", False)
    if rw_splitting and not query_parser_enabled:
        # PgCat refuses this combination too.
        raise t.error(
            "query_parser_read_write_splitting",
            "expected false unless query_parser_enabled is true, got true",
        )
    ps_default = legacy_ps_size if legacy_ps_size is not None else DEFAULT_PREPARED_STATEMENTS_CACHE_SIZE
    users = _parse_users(t, general.workers)
    shards = _parse_shards(t)

    functions_raw = t.raw("read_only_functions")
    read_only_functions: tuple[str, ...] = ()
    if functions_raw is not _MISSING:
        if not isinstance(functions_raw, list):
            raise t._wrong("read_only_functions", "an array of function names", functions_raw)
        names: list[str] = []
        for i, item in enumerate(functions_raw):
            if not isinstance(item, str) or not item.strip():
                raise t.ctx.error(
                    t.key("read_only_functions") + (str(i),),
                    f"expected a non-empty function name, got {_describe(item)}",
                )
            names.append(item.strip().lower())
        read_only_functions = tuple(dict.fromkeys(names))

    pool = Pool(
        name=name,
        pool_mode=t.choice("pool_mode", POOL_MODES, DEFAULT_POOL_MODE),
        default_role=t.choice("default_role", DEFAULT_ROLES, DEFAULT_DEFAULT_ROLE),
        query_parser_enabled=query_parser_enabled,
        query_parser_read_write_splitting=rw_splitting,
        query_parser_max_length=t.integer("query_parser_max_length", None, minimum=1),
        primary_reads_enabled=t.boolean("primary_reads_enabled", False),
        load_balancing_mode=t.choice(
            "load_balancing_mode", LOAD_BALANCING_MODES, DEFAULT_LOAD_BALANCING_MODE
        ),
        # PgCat lets a pool override these general values.
        connect_timeout=t.integer("connect_timeout", general.connect_timeout),
        idle_timeout=t.integer("idle_timeout", general.idle_timeout),
        server_lifetime=t.integer("server_lifetime", general.server_lifetime),
        checkout_timeout=t.integer("checkout_timeout", general.checkout_timeout),
        max_replica_lag_ms=t.integer("max_replica_lag_ms", None, minimum=1),
        read_only_functions=read_only_functions,
        prepared_statements_cache_size=t.integer(
            "prepared_statements_cache_size", t.integer("max_prepared_statements", ps_default)
        ),
        session_pinning=t.choice("session_pinning", SESSION_PINNING_MODES, DEFAULT_SESSION_PINNING),
        max_pinned_connections=t.integer("max_pinned_connections", None),
        causal_reads=t.choice("causal_reads", CAUSAL_READS_MODES, "session" if rw_splitting else "off"),
        causal_reads_timeout=t.integer("causal_reads_timeout", DEFAULT_CAUSAL_READS_TIMEOUT_MS, minimum=1),
        users=users,
        shards=shards,
        sharding=_parse_sharding(t, len(shards), query_parser_enabled),
    )
    t.finish()
    return pool


def _parse_users(pool: _Table, workers: int) -> Mapping[str, User]:
    users_data = pool.table("users")
    users: dict[str, User] = {}
    owners: dict[str, str] = {}  # username -> its users.<index>
    for index, user_data in users_data.items():
        parts = pool.key("users") + (index,)
        if not isinstance(user_data, dict):
            raise pool.ctx.error(parts, f"expected a table, got {_describe(user_data)}")
        u = _Table(pool.ctx, parts, user_data, Section.USER)
        username = u.string("username")
        password = u.string("password")
        pool_size = u.integer("pool_size", minimum=1)
        if pool_size < workers:
            # Each worker process gets a share of pool_size, and each share needs a connection.
            raise u.error("pool_size", f"expected at least general.workers ({workers}), because each worker "
                                       f"process gets a share of one connection or more, got {pool_size}")
        min_pool_size = u.integer("min_pool_size", 0)
        if min_pool_size > pool_size:
            raise u.error(
                "min_pool_size",
                f"expected an integer 0..{pool_size} (at most pool_size), got {min_pool_size}",
            )
        user = User(
            username=username,
            password=password,
            pool_size=pool_size,
            min_pool_size=min_pool_size,
            pool_mode=u.choice("pool_mode", POOL_MODES, None),
            statement_timeout=u.integer("statement_timeout", 0),
            server_username=u.string("server_username", None),
            server_password=u.string("server_password", None),
            connect_timeout=u.integer("connect_timeout", None),
            idle_timeout=u.integer("idle_timeout", None),
            server_lifetime=u.integer("server_lifetime", None),
            max_client_connections=u.integer("max_client_connections", 0),
            auth_type=u.choice("auth_type", AUTH_TYPES, None),
        )
        u.finish()
        if username in users:
            # PgCat keeps one pool per username: the user listed last in key order wins.
            earlier = owners[username]
            # (PgCat's users are a BTreeMap<String, _>: string order, "10" < "2")
            kept, dropped = (index, earlier) if index > earlier else (earlier, index)
            u.ctx.warn(u.key("username"), f"{_quote(username)} is also users.{earlier}; as in PgCat, only "
                                          f"users.{kept} is used and users.{dropped} is ignored")
            if kept == earlier:
                continue
        users[username] = user
        owners[username] = index
    if not users:
        pool.ctx.warn(pool.key("users"), "no users configured; no client can log in to this pool")
    return types.MappingProxyType(users)


def _parse_shards(pool: _Table) -> tuple[Shard, ...]:
    shards_data = pool.table("shards")
    numbered: list[tuple[int, Shard]] = []
    for index, shard_data in shards_data.items():
        parts = pool.key("shards") + (index,)
        if not re.fullmatch(r"[0-9]+", index):
            raise pool.ctx.error(parts, f"expected a shard number (0, 1, ...) as the key, got {_quote(index)}")
        if not isinstance(shard_data, dict):
            raise pool.ctx.error(parts, f"expected a table, got {_describe(shard_data)}")
        s = _Table(pool.ctx, parts, shard_data, Section.SHARD)
        database = s.string("database")
        servers = _parse_servers(s)
        s.finish()
        numbered.append((int(index), Shard(database=database, servers=servers)))

    if not numbered:
        raise pool.error("shards", "expected at least one shard with servers, got an empty table")
    numbered.sort(key=lambda item: item[0])
    numbers = [n for n, _ in numbered]
    if len(set(numbers)) != len(numbers):
        raise pool.error("shards", "expected each shard number once (e.g. \"0\" and \"00\" collide)")
    if numbers != list(range(len(numbers))):
        pool.ctx.warn(
            pool.key("shards"),
            f"shard numbers should be 0, 1, 2, ... in order; got {numbers}, used in that order",
        )
    return tuple(shard for _, shard in numbered)


_SHARDING_FUNCTIONS = {"pg_bigint_hash": "pg_bigint_hash", "pgbiginthash": "pg_bigint_hash", "sha1": "sha1"}


def _parse_sharding(pool: _Table, shards: int, query_parser_enabled: bool) -> Sharding:
    """PgCat's sharding keys of a pool, validated as PgCat does."""
    key = pool.string("automatic_sharding_key", None)
    if key is not None:
        # PgCat drops quotes so that quoted and unquoted names compare alike.
        parts = key.replace('"', "").split(".")
        if len(parts) != 2 or not all(parts):
            raise pool.error("automatic_sharding_key",
                             f'expected "table.column" or "*.column", got {_quote(key)}')
        key = ".".join(parts).lower()
        if not query_parser_enabled:
            pool.ctx.warn(pool.key("automatic_sharding_key"),
                          "needs query_parser_enabled = true to read keys from queries; ignored")
            key = None
    regexes = {name: _regex(pool, name) for name in ("sharding_key_regex", "shard_id_regex")}
    default = pool.string("default_shard", None)
    try:
        default_shard = parse_default_shard(default, shards) if default is not None else Sharding().default_shard
    except ValueError as exc:
        raise pool.error("default_shard", str(exc)) from None
    if default_shard.kind == "all" and not query_parser_enabled:
        # A statement runs on every shard only when the parser has shown it is a read.
        raise pool.error("default_shard", 'expected query_parser_enabled = true with "all" (pypool must tell '
                                          'reads, which run on every shard, from writes, which need a key)')
    return Sharding(
        shards=shards,
        function=pool.choice("sharding_function", _SHARDING_FUNCTIONS, "pg_bigint_hash"),
        default_shard=default_shard,
        automatic_sharding_key=key,
        sharding_key_regex=regexes["sharding_key_regex"],
        shard_id_regex=regexes["shard_id_regex"],
        regex_search_limit=pool.integer("regex_search_limit", DEFAULT_REGEX_SEARCH_LIMIT, minimum=1),
    )


def _regex(pool: _Table, name: str) -> re.Pattern[str] | None:
    text = pool.string(name, None)
    if text is None:
        return None
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise pool.error(name, f"expected a regular expression, got {_quote(text)} ({exc})") from None
    if pattern.groups < 1:
        # PgCat accepts it too, but reads the shard from group 1: this one never routes.
        pool.ctx.warn(pool.key(name), "has no capture group (...) for the shard number or key; it never matches")
    return pattern


def _parse_servers(s: _Table) -> tuple[ServerAddress, ...]:
    raw = s.raw("servers")
    what = 'an array of [host, port, role] entries, e.g. [["127.0.0.1", 5432, "primary"]]'
    if raw is _MISSING:
        raise s._missing("servers", what)
    if not isinstance(raw, list):
        raise s._wrong("servers", what, raw)
    servers: list[ServerAddress] = []
    seen: set[tuple[str, int, str]] = set()
    for i, entry in enumerate(raw):
        key = s.key("servers") + (str(i),)
        if not isinstance(entry, list) or len(entry) != 3:
            got = f"an array of {len(entry)} elements" if isinstance(entry, list) else _describe(entry)
            raise s.ctx.error(key, f'expected [host, port, role], e.g. ["127.0.0.1", 5432, "primary"], got {got}')
        host, port, role = entry
        if not isinstance(host, str) or not host:
            raise s.ctx.error(key, f"expected the host (1st element) to be a non-empty string, got {_describe(host)}")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise s.ctx.error(key, f"expected the port (2nd element) to be an integer 1..65535, got {_describe(port)}")
        if isinstance(role, str) and role.lower() == "mirror":
            s.ctx.warn(key, "role \"mirror\": PgCat setting not supported by pypool, server ignored")
            continue
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise s.ctx.error(
                key, f'expected the role (3rd element) to be "primary" or "replica", got {_describe(role)}'
            )
        role = ROLES[role.lower()]
        # PgCat's rule: one entry per (host, port, role); one server may be listed as primary and replica.
        if (host, port, role) in seen:
            raise s.ctx.error(key, f"expected each server once per role in a shard, got {host}:{port} "
                                   f"({role}) twice")
        seen.add((host, port, role))
        servers.append(ServerAddress(host=host, port=port, role=role))
    if not servers:
        raise s.error("servers", "expected at least one primary or replica server, got none")
    primaries = [srv for srv in servers if srv.role == "primary"]
    if len(primaries) > 1:
        listed = ", ".join(f"{p.host}:{p.port}" for p in primaries)
        raise s.error("servers", f"expected at most one primary per shard, got {len(primaries)} ({listed})")
    return tuple(servers)
