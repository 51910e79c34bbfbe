"""Every configuration key in one table: where it lives, what it sets, how a change applies.

One row per key a file may contain, PgCat's keys and pypool's additions alike.
The parser (:mod:`pypool.config`) reads the type and default of an implemented
key from the dataclass field the row names; everything else that has to know
about keys reads this table:

* config reload: which changes keep a pool, rebuild it, or wait for a restart
  (:func:`group_signature`, :func:`restart_changes`);
* SHOW CONFIG: the PgCat name of a field and whether it is changeable;
* the parser's warnings: PgCat keys pypool accepts and ignores (with the
  reason), unknown keys and the nearest known key.

A unit test checks that every dataclass field has a row and every row a field,
so a new key cannot be forgotten in one of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from dataclasses import dataclass
from typing import Any, Iterable

# The config dataclasses (pypool.config) are passed in, not imported: config imports this table.


class Applies(enum.Enum):
    """What a reload does when the key's value changed."""

    LIVE = "live"  # the running pooler uses the new value at once
    REBUILD = "rebuild"  # the pools built from it are rebuilt; old connections drain
    RESTART = "restart"  # read once at start; a reload warns and keeps the old value
    IGNORED = "ignored"  # a PgCat key pypool accepts and does not use


class Section(enum.Enum):
    """Where a key is written in the file."""

    TOP = "top level"
    GENERAL = "general"
    POOL = "pools.<name>"
    USER = "pools.<name>.users.<n>"
    SHARD = "pools.<name>.shards.<n>"


@dataclass(frozen=True)
class Key:
    section: Section
    name: str  # as written in the file (PgCat's spelling where PgCat has the key)
    applies: Applies
    # The dataclass field it sets, "General.connect_timeout"; None for ignored keys.
    # Several keys may set one field (hba and hba_file; a legacy spelling).
    sets: str | None = None
    pgcat: bool = True  # False: a pypool addition
    # For IGNORED keys: why pypool does not use it (shown by `pypool config check`);
    # the TOML types it accepts, so a PgCat file with a wrong type still fails as in PgCat.
    reason: str = ""
    accepts: tuple[type, ...] = ()
    quiet: bool = False  # ignored without a word: a key PgCat writes itself

    @property
    def field(self) -> str | None:
        return None if self.sets is None else self.sets.split(".", 1)[1]

    @property
    def restart_only(self) -> bool:
        return self.applies is Applies.RESTART


G, P, U, S, T = Section.GENERAL, Section.POOL, Section.USER, Section.SHARD, Section.TOP
LIVE, REBUILD, RESTART, IGNORED = Applies.LIVE, Applies.REBUILD, Applies.RESTART, Applies.IGNORED

_NO_AUTH_QUERY = "pypool takes every password from the file; it does not look them up on the server"
_NO_ACTIVITY_ROUTING = ("PgCat's experimental write-tracking routing is not implemented; pypool keeps a "
                        "transaction on one server, and max_replica_lag_ms keeps reads off lagging replicas")


def _ignored(section: Section, name: str, reason: str, *accepts: type, quiet: bool = False) -> Key:
    return Key(section, name, IGNORED, reason=reason, accepts=accepts, quiet=quiet)


# Fields that are not keys: the pool's name is its table name; workers_auto says `workers = "auto"` was written.
STRUCTURAL_FIELDS = frozenset({"Pool.name", "General.workers_auto"})

KEYS: tuple[Key, ...] = (
    # ---------------------------------------------------------------- top level
    Key(T, "general", LIVE),  # the tables themselves; their keys follow
    Key(T, "pools", REBUILD),
    _ignored(T, "path", "PgCat writes the file's own path here", str, quiet=True),
    _ignored(T, "plugins", "PgCat's plugins (intercept, table_access, query_logger, prewarmer) are not "
                           "implemented", dict),
    # ---------------------------------------------------------------- [general]
    Key(G, "host", RESTART, "General.host"),
    Key(G, "port", RESTART, "General.port"),
    Key(G, "workers", RESTART, "General.workers", pgcat=False),
    _ignored(G, "worker_threads", "PgCat's Tokio thread count; pypool does not start processes from it "
                                  "(set `workers` for several processes)", int),
    Key(G, "connect_timeout", REBUILD, "General.connect_timeout"),
    Key(G, "idle_timeout", REBUILD, "General.idle_timeout"),
    Key(G, "server_lifetime", REBUILD, "General.server_lifetime"),
    Key(G, "checkout_timeout", REBUILD, "General.checkout_timeout", pgcat=False),
    Key(G, "healthcheck_timeout", REBUILD, "General.healthcheck_timeout"),
    Key(G, "healthcheck_delay", REBUILD, "General.healthcheck_delay"),
    Key(G, "ban_time", LIVE, "General.ban_time"),
    Key(G, "shutdown_timeout", LIVE, "General.shutdown_timeout"),
    Key(G, "idle_client_in_transaction_timeout", LIVE, "General.idle_client_in_transaction_timeout"),
    Key(G, "enable_prometheus_exporter", RESTART, "General.enable_prometheus_exporter"),
    Key(G, "prometheus_exporter_port", RESTART, "General.prometheus_exporter_port"),
    Key(G, "admin_username", LIVE, "General.admin_username"),
    Key(G, "admin_password", LIVE, "General.admin_password"),
    Key(G, "client_auth_method", LIVE, "General.client_auth_method", pgcat=False),
    Key(G, "log_client_connections", LIVE, "General.log_client_connections"),
    Key(G, "log_client_disconnections", LIVE, "General.log_client_disconnections"),
    Key(G, "tls_certificate", RESTART, "General.tls_certificate"),
    Key(G, "tls_private_key", RESTART, "General.tls_private_key"),
    Key(G, "client_tls_mode", RESTART, "General.client_tls_mode", pgcat=False),
    Key(G, "server_tls", RESTART, "General.server_tls"),
    Key(G, "verify_server_certificate", RESTART, "General.verify_server_certificate"),
    Key(G, "server_tls_ca_file", RESTART, "General.server_tls_ca_file", pgcat=False),
    Key(G, "max_client_conn", LIVE, "General.max_client_conn", pgcat=False),
    Key(G, "max_message_size", LIVE, "General.max_message_size", pgcat=False),
    Key(G, "client_login_timeout", LIVE, "General.client_login_timeout", pgcat=False),
    Key(G, "hba", LIVE, "General.hba", pgcat=False),
    Key(G, "hba_file", LIVE, "General.hba", pgcat=False),
    Key(G, "reject_unknown_keys", LIVE, "General.reject_unknown_keys", pgcat=False),
    Key(G, "admin_auth_type", LIVE, "General.admin_auth_type"),
    # Older PgCat releases set prepared statements here: the default of every pool's size.
    Key(G, "prepared_statements", REBUILD, "Pool.prepared_statements_cache_size"),
    Key(G, "prepared_statements_cache_size", REBUILD, "Pool.prepared_statements_cache_size"),
    Key(G, "autoreload", RESTART, "General.autoreload"),  # read at start, as in PgCat
    Key(G, "shutdown_delay", LIVE, "General.shutdown_delay", pgcat=False),
    Key(G, "tcp_keepalives_idle", RESTART, "General.tcp_keepalives_idle"),
    Key(G, "tcp_keepalives_count", RESTART, "General.tcp_keepalives_count"),
    Key(G, "tcp_keepalives_interval", RESTART, "General.tcp_keepalives_interval"),
    Key(G, "tcp_user_timeout", RESTART, "General.tcp_user_timeout"),
    _ignored(G, "dns_cache_enabled", "pypool resolves a server's host name at each new connection, so a "
                                     "changed address is used at once", bool),
    _ignored(G, "dns_max_ttl", "pypool resolves a server's host name at each new connection", int),
    _ignored(G, "server_round_robin", "load_balancing_mode chooses the server, and `round_robin` is one of its "
                                      "values)", bool),
    _ignored(G, "validate_config", "pypool always validates the whole file, at start and at every reload",
             bool),
    _ignored(G, "verify_config", "pypool always validates the whole file, at start and at every reload",
             bool),  # CONFIG.md's spelling of validate_config
    _ignored(G, "auth_query", _NO_AUTH_QUERY, str),
    _ignored(G, "auth_query_user", _NO_AUTH_QUERY, str),
    _ignored(G, "auth_query_password", _NO_AUTH_QUERY, str),
    # --------------------------------------------------------- [pools.<name>]
    # A pool is rebuilt by any change of its own keys: its servers, settings and router are built from them.
    Key(P, "pool_mode", REBUILD, "Pool.pool_mode"),
    Key(P, "default_role", REBUILD, "Pool.default_role"),
    Key(P, "query_parser_enabled", REBUILD, "Pool.query_parser_enabled"),
    Key(P, "query_parser_read_write_splitting", REBUILD, "Pool.query_parser_read_write_splitting"),
    Key(P, "query_parser_max_length", REBUILD, "Pool.query_parser_max_length"),
    Key(P, "primary_reads_enabled", REBUILD, "Pool.primary_reads_enabled"),
    Key(P, "load_balancing_mode", REBUILD, "Pool.load_balancing_mode"),
    Key(P, "connect_timeout", REBUILD, "Pool.connect_timeout"),
    Key(P, "idle_timeout", REBUILD, "Pool.idle_timeout"),
    Key(P, "server_lifetime", REBUILD, "Pool.server_lifetime"),
    Key(P, "checkout_timeout", REBUILD, "Pool.checkout_timeout", pgcat=False),
    Key(P, "max_replica_lag_ms", REBUILD, "Pool.max_replica_lag_ms", pgcat=False),
    Key(P, "read_only_functions", REBUILD, "Pool.read_only_functions", pgcat=False),
    Key(P, "causal_reads", REBUILD, "Pool.causal_reads", pgcat=False),
    Key(P, "causal_reads_timeout", REBUILD, "Pool.causal_reads_timeout", pgcat=False),
    Key(P, "prepared_statements_cache_size", REBUILD, "Pool.prepared_statements_cache_size"),
    Key(P, "max_prepared_statements", REBUILD, "Pool.prepared_statements_cache_size", pgcat=False),
    Key(P, "session_pinning", REBUILD, "Pool.session_pinning", pgcat=False),
    Key(P, "max_pinned_connections", REBUILD, "Pool.max_pinned_connections", pgcat=False),
    Key(P, "users", REBUILD, "Pool.users"),
    Key(P, "shards", REBUILD, "Pool.shards"),
    # PgCat's sharding keys, read together into one Sharding (pypool.routing.sharding).
    Key(P, "sharding_function", REBUILD, "Pool.sharding"),
    Key(P, "automatic_sharding_key", REBUILD, "Pool.sharding"),
    Key(P, "sharding_key_regex", REBUILD, "Pool.sharding"),
    Key(P, "shard_id_regex", REBUILD, "Pool.sharding"),
    Key(P, "regex_search_limit", REBUILD, "Pool.sharding"),
    Key(P, "default_shard", REBUILD, "Pool.sharding"),
    _ignored(P, "auth_query", _NO_AUTH_QUERY, str),
    _ignored(P, "auth_query_user", _NO_AUTH_QUERY, str),
    _ignored(P, "auth_query_password", _NO_AUTH_QUERY, str),
    _ignored(P, "cleanup_server_connections", "pypool always resets a session-mode server connection "
                                              "(DISCARD ALL) before another client gets it", bool),
    _ignored(P, "log_client_parameter_status_changes", "pypool does not log ParameterStatus changes", bool),
    _ignored(P, "checkout_failure_limit", "pypool never disconnects a client for failed checkouts; each one "
                                          "gets an error (53300) and may retry", int),
    _ignored(P, "db_activity_based_routing", _NO_ACTIVITY_ROUTING, bool),
    _ignored(P, "db_activity_init_delay", _NO_ACTIVITY_ROUTING, int),
    _ignored(P, "db_activity_based_ms_init_delay", _NO_ACTIVITY_ROUTING, int),  # CONFIG.md's spelling
    _ignored(P, "db_activity_ttl", _NO_ACTIVITY_ROUTING, int),
    _ignored(P, "table_mutation_cache_ms_ttl", _NO_ACTIVITY_ROUTING, int),
    _ignored(P, "plugins", "PgCat's plugins (intercept, table_access, query_logger, prewarmer) are not "
                           "implemented", dict),
    # ---------------------------------------------------- [pools.<name>.users.<n>]
    Key(U, "username", REBUILD, "User.username"),
    Key(U, "password", REBUILD, "User.password"),
    Key(U, "pool_size", REBUILD, "User.pool_size"),
    Key(U, "min_pool_size", REBUILD, "User.min_pool_size"),
    Key(U, "pool_mode", REBUILD, "User.pool_mode"),
    Key(U, "statement_timeout", REBUILD, "User.statement_timeout"),
    Key(U, "server_username", REBUILD, "User.server_username"),
    Key(U, "server_password", REBUILD, "User.server_password"),
    Key(U, "connect_timeout", REBUILD, "User.connect_timeout"),
    Key(U, "idle_timeout", REBUILD, "User.idle_timeout"),
    Key(U, "server_lifetime", REBUILD, "User.server_lifetime"),
    Key(U, "max_client_connections", REBUILD, "User.max_client_connections", pgcat=False),
    Key(U, "auth_type", REBUILD, "User.auth_type"),
    # --------------------------------------------------- [pools.<name>.shards.<n>]
    Key(S, "database", REBUILD, "Shard.database"),
    Key(S, "servers", REBUILD, "Shard.servers"),
    _ignored(S, "mirrors", "mirroring is not implemented", list),
)

_BY_SECTION: dict[Section, dict[str, Key]] = {section: {} for section in Section}
for _key in KEYS:
    _BY_SECTION[_key.section][_key.name] = _key
del _key


# ------------------------------------------------------------------ lookups

def lookup(section: Section, name: str) -> Key | None:
    return _BY_SECTION[section].get(name)


def names(section: Section) -> list[str]:
    return list(_BY_SECTION[section])


def nearest(section: Section, name: str) -> str | None:
    """The known key of ``section`` a misspelt ``name`` most likely meant, or None."""
    matches = difflib.get_close_matches(name, names(section), n=1, cutoff=0.75)
    return matches[0] if matches else None


def elsewhere(section: Section, name: str) -> Section | None:
    """Another section where ``name`` is a key (e.g. pool_size written in a pool instead of a user)."""
    for other in Section:
        if other is not section and name in _BY_SECTION[other] and \
                _BY_SECTION[other][name].applies is not IGNORED:
            return other
    return None


def keys_setting(qualified_field: str) -> list[Key]:
    """The keys that set ``"General.hba"`` (say), in table order."""
    return [k for k in KEYS if k.sets == qualified_field]


def file_key(cls: type, field_name: str) -> str:
    """The key a user writes for a dataclass field (its first key in the table)."""
    found = keys_setting(f"{cls.__name__}.{field_name}")
    return found[0].name if found else field_name


def needs_restart(cls: type, field_name: str) -> bool:
    return any(k.restart_only for k in keys_setting(f"{cls.__name__}.{field_name}"))


# ------------------------------------------------------------------ reload

def _fields(section: Section, applies: Applies, cls_name: str) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for key in _BY_SECTION[section].values():
        if key.applies is applies and key.sets is not None and key.sets.startswith(cls_name + "."):
            out[key.field] = None  # type: ignore[index]
    return tuple(out)


_REBUILD_GENERAL = _fields(G, REBUILD, "General")
# A pool's users are compared one by one (each has its own group), not as the pool's key.
_REBUILD_POOL = tuple(f for f in _fields(P, REBUILD, "Pool") if f != "users")
_REBUILD_USER = _fields(U, REBUILD, "User")
_RESTART_GENERAL = _fields(G, RESTART, "General")


def group_signature(pool: Any, user: Any, general: Any) -> tuple[Any, ...]:
    """What a pool group is built from: a reload keeps a running group whose signature is unchanged."""
    return (tuple(getattr(general, f) for f in _REBUILD_GENERAL),
            tuple(getattr(pool, f) for f in _REBUILD_POOL),
            tuple(getattr(user, f) for f in _REBUILD_USER))


def restart_changes(old: Any, new: Any) -> list[str]:
    """Keys whose change a reload cannot apply: they take effect when pypool restarts."""
    return [file_key(type(new), f) for f in _RESTART_GENERAL if getattr(old, f) != getattr(new, f)]


def keep_restart_values(running: Any, new: Any) -> Any:
    """``new`` with the running values of the restart-only keys: what a reload may apply."""
    return dataclasses.replace(new, **{f: getattr(running, f) for f in _RESTART_GENERAL})


def dataclass_fields(*classes: type) -> Iterable[str]:
    """``"General.host"``, ... for every field of the given config dataclasses."""
    for cls in classes:
        for f in dataclasses.fields(cls):
            yield f"{cls.__name__}.{f.name}"
