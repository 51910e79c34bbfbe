"""Unit tests for pypool.config: PgCat-format TOML -> frozen dataclasses."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit._minimal_config import minimal_config
from pypool.config import (
    Config,
    ConfigError,
    General,
    Pool,
    ServerAddress,
    default_config_dict,
    dump_config,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]
SIMPLE = REPO / "config" / "pgcat.simple.toml"
LOCAL = REPO / "config" / "pgcat.local.toml"

SECRET = "s3cr3t-Pa55word"
ADMIN_SECRET = "adm1n-Pa55word"
FILE = "test/pgcat.toml"

GENERAL = f"""
[general]
admin_username = "admin_user"
admin_password = "{ADMIN_SECRET}"
"""

POOL = f"""
[pools.app]

[pools.app.users.0]
username = "alice"
password = "{SECRET}"
pool_size = 5

[pools.app.shards.0]
database = "appdb"
servers = [["db1", 5432, "primary"], ["db2", 5432, "replica"]]
"""

MINIMAL = GENERAL + POOL


def parse(text: str) -> Config:
    return parse_config(text, FILE)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    err = info.value
    message = str(err)
    # No error message may ever carry a password.
    assert SECRET not in message
    assert ADMIN_SECRET not in message
    assert message.startswith(FILE + ": ")
    return err


def assert_error(text: str, key: str, *fragments: str) -> ConfigError:
    err = error_of(text)
    message = str(err)
    assert err.path == FILE
    assert err.key == key
    assert f"{FILE}: {key}: " in message
    assert "expected" in message or "missing" in message
    for fragment in fragments:
        assert fragment in message, message
    return err


def with_pool(pool_body: str = "", user_body: str = "", shard_body: str | None = None) -> str:
    """MINIMAL with extra pool/user keys or a replacement shard body."""
    shard = (
        'database = "appdb"\nservers = [["db1", 5432, "primary"], ["db2", 5432, "replica"]]'
        if shard_body is None
        else shard_body
    )
    return (
        GENERAL
        + f"\n[pools.app]\n{pool_body}\n"
        + f'\n[pools.app.users.0]\nusername = "alice"\npassword = "{SECRET}"\npool_size = 5\n{user_body}\n'
        + f"\n[pools.app.shards.0]\n{shard}\n"
    )


# ---------------------------------------------------------------------------
# The shipped files
# ---------------------------------------------------------------------------
def test_simple_file_has_the_compose_topology() -> None:
    cfg = load_config(SIMPLE)
    assert cfg.path == str(SIMPLE)
    assert cfg.warnings == ()
    g = cfg.general
    assert (g.host, g.port) == ("0.0.0.0", 6432)
    assert (g.admin_username, g.admin_password) == ("admin_user", "admin_pass")
    assert g.enable_prometheus_exporter is True
    assert g.prometheus_exporter_port == 9930

    assert list(cfg.pools) == ["postgres"]
    pool = cfg.pools["postgres"]
    assert pool.name == "postgres"
    assert pool.pool_mode == "transaction"
    assert pool.query_parser_enabled is True
    assert pool.query_parser_read_write_splitting is True
    assert pool.primary_reads_enabled is False
    assert pool.default_role == "any"

    assert list(pool.users) == ["postgres"]
    user = pool.users["postgres"]
    assert user.password == "mysecretpassword"
    assert (user.pool_size, user.min_pool_size) == (10, 0)
    assert user.pool_mode is None

    assert len(pool.shards) == 1
    assert pool.shards[0].database == "postgres"
    assert pool.shards[0].servers == (
        ServerAddress("pg1", 5432, "primary"),
        ServerAddress("pg2", 5432, "replica"),
        ServerAddress("pg3", 5432, "replica"),
    )
    assert pool.primary() == ServerAddress("pg1", 5432, "primary")
    assert pool.replicas() == (
        ServerAddress("pg2", 5432, "replica"),
        ServerAddress("pg3", 5432, "replica"),
    )


def test_local_file_is_the_same_topology_on_local_ports() -> None:
    simple = load_config(SIMPLE)
    local = load_config(LOCAL)
    assert local.warnings == ()
    assert local.general.host == "127.0.0.1"
    assert local.general.port == 6432
    pool = local.pools["postgres"]
    assert pool.primary() == ServerAddress("127.0.0.1", 5433, "primary")
    assert pool.replicas() == (
        ServerAddress("127.0.0.1", 5434, "replica"),
        ServerAddress("127.0.0.1", 5435, "replica"),
    )
    # Everything but the addresses is identical.
    assert dataclasses.replace(local.general, host="0.0.0.0") == simple.general
    assert dataclasses.replace(pool, shards=()) == dataclasses.replace(
        simple.pools["postgres"], shards=()
    )


def test_shipped_files_are_commented() -> None:
    for path in (SIMPLE, LOCAL):
        text = path.read_text()
        assert text.count("#") >= 20, path


# ---------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------
def test_general_defaults_are_pgcat_code_defaults() -> None:
    g = parse(MINIMAL).general
    assert g.host == "0.0.0.0"
    assert g.port == 5432  # PgCat's General::default_port(), not the 6432 of its docs
    assert g.workers == 1  # not PgCat's worker_threads default of 4: processes, not threads
    assert g.connect_timeout == 1000
    assert g.idle_timeout == 600_000
    assert g.server_lifetime == 3_600_000
    assert g.healthcheck_timeout == 1000
    assert g.healthcheck_delay == 30_000
    assert g.ban_time == 60
    assert g.shutdown_timeout == 60_000
    assert g.idle_client_in_transaction_timeout == 0
    assert g.enable_prometheus_exporter is False
    assert g.prometheus_exporter_port == 9930
    assert g.log_client_connections is False
    assert g.log_client_disconnections is False
    assert g.tls_certificate is None and g.tls_private_key is None
    assert g.server_tls is False and g.verify_server_certificate is False
    # pypool additions
    assert g.checkout_timeout == 5000
    assert g.client_auth_method == "scram-sha-256"
    assert g.client_tls_mode == "allow"
    assert g.max_client_conn == 0
    assert g.max_message_size == 64 * 1024 * 1024


def test_pool_and_user_defaults() -> None:
    cfg = parse(MINIMAL)
    assert cfg.warnings == ()
    pool = cfg.pools["app"]
    assert pool.pool_mode == "transaction"
    assert pool.default_role == "any"
    assert pool.query_parser_enabled is False
    assert pool.query_parser_read_write_splitting is False
    assert pool.query_parser_max_length is None
    assert pool.primary_reads_enabled is False
    assert pool.load_balancing_mode == "random"
    assert pool.connect_timeout == 1000
    assert pool.idle_timeout == 600_000
    assert pool.server_lifetime == 3_600_000
    assert pool.checkout_timeout == 5000
    assert pool.max_replica_lag_ms is None
    assert pool.read_only_functions == ()
    assert pool.prepared_statements_cache_size == 0

    user = pool.users["alice"]
    assert user.username == "alice"
    assert user.password == SECRET
    assert user.pool_size == 5
    assert user.min_pool_size == 0
    assert user.pool_mode is None
    assert user.statement_timeout == 0
    assert user.server_username is None and user.server_password is None
    assert user.connect_timeout is None
    assert user.idle_timeout is None
    assert user.server_lifetime is None


def test_pool_values_override_general_ones() -> None:
    text = (
        GENERAL
        + "connect_timeout = 2000\nidle_timeout = 3000\nserver_lifetime = 4000\ncheckout_timeout = 6000\n"
        + "\n[pools.other]\n"
        + '[pools.other.users.0]\nusername = "bob"\npassword = "pw"\npool_size = 1\n'
        + '[pools.other.shards.0]\ndatabase = "x"\nservers = [["h", 1, "primary"]]\n'
        + POOL.replace(
            "[pools.app]\n",
            "[pools.app]\nconnect_timeout = 20\nidle_timeout = 30\nserver_lifetime = 40\ncheckout_timeout = 60\n",
        )
    )
    cfg = parse(text)
    app, other = cfg.pools["app"], cfg.pools["other"]
    assert (app.connect_timeout, app.idle_timeout, app.server_lifetime, app.checkout_timeout) == (20, 30, 40, 60)
    assert (other.connect_timeout, other.idle_timeout, other.server_lifetime, other.checkout_timeout) == (
        2000,
        3000,
        4000,
        6000,
    )


def test_all_settable_values_are_read() -> None:
    text = (
        """
[general]
host = "127.0.0.1"
port = 7432
workers = 2
reject_unknown_keys = true
healthcheck_timeout = 11
healthcheck_delay = 12
ban_time = 13
shutdown_timeout = 14
idle_client_in_transaction_timeout = 15
enable_prometheus_exporter = true
prometheus_exporter_port = 9999
admin_username = "a"
admin_password = "b"
client_auth_method = "MD5"
log_client_connections = true
log_client_disconnections = true
tls_certificate = "server.crt"
tls_private_key = "server.key"
client_tls_mode = "require"
server_tls = true
verify_server_certificate = true
max_client_conn = 500
max_message_size = 1048576
"""
        + POOL.replace(
            "[pools.app]\n",
            """[pools.app]
pool_mode = "Session"
default_role = "replica"
query_parser_enabled = true
query_parser_read_write_splitting = true
query_parser_max_length = 4096
primary_reads_enabled = true
load_balancing_mode = "least_outstanding_connections"
max_replica_lag_ms = 250
read_only_functions = ["My_Func", "other_func", "my_func"]
prepared_statements_cache_size = 100
""",
        ).replace(
            "pool_size = 5\n",
            """pool_size = 5
min_pool_size = 2
pool_mode = "transaction"
statement_timeout = 100
server_username = "alice_srv"
server_password = "other"
connect_timeout = 1
idle_timeout = 2
server_lifetime = 3
""",
        )
    )
    cfg = parse(text)
    assert cfg.warnings == ()
    assert cfg.general == General(
        host="127.0.0.1",
        port=7432,
        workers=2,
        healthcheck_timeout=11,
        healthcheck_delay=12,
        ban_time=13,
        shutdown_timeout=14,
        idle_client_in_transaction_timeout=15,
        enable_prometheus_exporter=True,
        prometheus_exporter_port=9999,
        admin_username="a",
        admin_password="b",
        client_auth_method="md5",
        log_client_connections=True,
        log_client_disconnections=True,
        tls_certificate="server.crt",
        tls_private_key="server.key",
        client_tls_mode="require",
        server_tls=True,
        verify_server_certificate=True,
        max_client_conn=500,
        max_message_size=1048576,
        reject_unknown_keys=True,
    )
    pool = cfg.pools["app"]
    assert pool.pool_mode == "session"
    assert pool.default_role == "replica"
    assert pool.query_parser_max_length == 4096
    assert pool.primary_reads_enabled is True
    assert pool.load_balancing_mode == "loc"
    assert pool.max_replica_lag_ms == 250
    assert pool.read_only_functions == ("my_func", "other_func")
    assert pool.prepared_statements_cache_size == 100
    user = pool.users["alice"]
    assert (user.min_pool_size, user.pool_mode, user.statement_timeout) == (2, "transaction", 100)
    assert (user.server_username, user.server_password) == ("alice_srv", "other")
    assert (user.connect_timeout, user.idle_timeout, user.server_lifetime) == (1, 2, 3)


def test_round_robin_is_accepted() -> None:
    pool = parse(with_pool('load_balancing_mode = "round_robin"')).pools["app"]
    assert pool.load_balancing_mode == "round_robin"


def test_legacy_general_prepared_statements_settings() -> None:
    on = GENERAL + "prepared_statements = true\nprepared_statements_cache_size = 77\n" + POOL
    assert parse(on).pools["app"].prepared_statements_cache_size == 77
    off = GENERAL + "prepared_statements = false\nprepared_statements_cache_size = 77\n" + POOL
    assert parse(off).pools["app"].prepared_statements_cache_size == 0
    assert parse(on).warnings == ()


# ---------------------------------------------------------------------------
# Structure of the result
# ---------------------------------------------------------------------------
def test_users_rekeyed_by_username_and_immutable() -> None:
    text = MINIMAL + f'\n[pools.app.users.1]\nusername = "bob"\npassword = "{SECRET}"\npool_size = 2\n'
    pool = parse(text).pools["app"]
    assert list(pool.users) == ["alice", "bob"]
    with pytest.raises(TypeError):
        pool.users["carol"] = pool.users["bob"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pool.pool_mode = "session"  # type: ignore[misc]
    cfg = parse(text)
    with pytest.raises(TypeError):
        cfg.pools["x"] = pool  # type: ignore[index]


def test_shards_are_ordered_by_number() -> None:
    text = MINIMAL.replace("[pools.app.shards.0]", "[pools.app.shards.10]") + (
        '\n[pools.app.shards.2]\ndatabase = "two"\nservers = [["d", 5432, "primary"]]\n'
        '\n[pools.app.shards.0]\ndatabase = "zero"\nservers = [["z", 5432, "replica"]]\n'
    )
    cfg = parse(text)
    pool = cfg.pools["app"]
    assert [s.database for s in pool.shards] == ["zero", "two", "appdb"]
    # Shard 0 has only a replica: no primary.
    assert pool.primary() is None
    assert pool.replicas() == (ServerAddress("z", 5432, "replica"),)
    assert not any("not supported" in w for w in cfg.warnings)  # every shard is served
    assert any("0, 1, 2" in w for w in cfg.warnings)


def test_roles_are_case_insensitive_like_pgcat() -> None:
    pool = parse(with_pool(shard_body='database = "d"\nservers = [["a", 1, "Primary"], ["b", 2, "REPLICA"]]')).pools[
        "app"
    ]
    assert [s.role for s in pool.shards[0].servers] == ["primary", "replica"]


def test_pool_and_config_are_hashable_and_comparable() -> None:
    a, b = parse(MINIMAL), parse(MINIMAL)
    assert a == b
    assert hash(a.pools["app"]) == hash(b.pools["app"])


def test_repr_hides_passwords() -> None:
    cfg = parse(MINIMAL)
    assert SECRET not in repr(cfg)
    assert ADMIN_SECRET not in repr(cfg)


# ---------------------------------------------------------------------------
# Unknown and unsupported keys: warnings, not errors
# ---------------------------------------------------------------------------
def test_unknown_keys_warn_at_every_level() -> None:
    text = (
        "top_level_thing = 1\n"
        + GENERAL
        + "frobnicate = true\n"
        + POOL.replace("[pools.app]\n", "[pools.app]\nwhatever = 3\n")
        .replace("pool_size = 5\n", 'pool_size = 5\npassword_hint = "not shown"\n')
        .replace('database = "appdb"\n', 'database = "appdb"\nweight = 2\n')
    )
    cfg = parse(text)
    assert cfg.pools["app"].users["alice"].pool_size == 5
    for key, section in (
        ("top_level_thing", "the top level"),
        ("general.frobnicate", "[general]"),
        ("pools.app.whatever", "[pools.app]"),
        ("pools.app.users.0.password_hint", "[pools.app.users.0]"),
        ("pools.app.shards.0.weight", "[pools.app.shards.0]"),
    ):
        prefix = f"{FILE}: {key}: unknown key in {section}, ignored"
        assert any(w.startswith(prefix) for w in cfg.warnings), cfg.warnings
    assert f"{FILE}: pools.app.users.0.password_hint: unknown key in [pools.app.users.0], ignored; " \
           "did you mean `password`?" in cfg.warnings
    assert len(cfg.warnings) == 5
    assert all("not shown" not in w for w in cfg.warnings)


def test_unsupported_pgcat_keys_warn_consistently() -> None:
    text = (
        GENERAL
        + "worker_threads = 4\nserver_round_robin = true\n"
        + POOL.replace(
            "[pools.app]\n",
            '[pools.app]\nauth_query = "SELECT 1"\n',
        ).replace('database = "appdb"\n', 'database = "appdb"\nmirrors = [["m", 5432, 0]]\n')
        + '\n[pools.app.plugins.query_logger]\nenabled = true\n'
        + '\n[plugins.prewarmer]\nenabled = false\n'
    )
    cfg = parse(text)
    expected = {
        "general.worker_threads",
        "general.server_round_robin",
        "pools.app.auth_query",
        "pools.app.shards.0.mirrors",
        "pools.app.plugins",
        "plugins",
    }
    got = {w.split(": ")[1] for w in cfg.warnings}
    assert got == expected, cfg.warnings
    assert all("PgCat setting accepted, not used by pypool: " in w for w in cfg.warnings)
    assert all(w.startswith(FILE + ": ") for w in cfg.warnings)


def test_mirror_role_server_is_ignored_with_a_warning() -> None:
    cfg = parse(
        with_pool(shard_body='database = "d"\nservers = [["a", 1, "primary"], ["m", 2, "mirror"]]')
    )
    assert cfg.pools["app"].shards[0].servers == (ServerAddress("a", 1, "primary"),)
    assert any("pools.app.shards.0.servers.1" in w and "mirror" in w for w in cfg.warnings)


def test_quoted_pool_name_in_keys() -> None:
    text = MINIMAL.replace("pools.app", 'pools."my.db"') + ""
    cfg = parse(text)
    assert "my.db" in cfg.pools
    err = assert_error(
        text.replace("pool_size = 5", "pool_size = 0"),
        'pools."my.db".users.0.pool_size',
        "positive integer",
    )
    assert "got 0" in str(err)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
def test_error_message_format_matches_the_contract() -> None:
    err = error_of(MINIMAL.replace("pool_size = 5", "pool_size = -3"))
    assert str(err) == f"{FILE}: pools.app.users.0.pool_size: expected a positive integer, got -3"


@pytest.mark.parametrize(
    "old, new, key, fragments",
    [
        # wrong types
        ("pool_size = 5", 'pool_size = "5"', "pools.app.users.0.pool_size", ['"5" (a string)']),
        ("pool_size = 5", "pool_size = true", "pools.app.users.0.pool_size", ["true (a boolean)"]),
        ("pool_size = 5", "pool_size = 5.0", "pools.app.users.0.pool_size", ["a float"]),
        ('username = "alice"', "username = 7", "pools.app.users.0.username", ["string", "got 7"]),
        ('database = "appdb"', "database = []", "pools.app.shards.0.database", ["an array"]),
        ("[pools.app]\n", '[pools.app]\nquery_parser_enabled = "true"\n', "pools.app.query_parser_enabled",
         ["true or false", '"true" (a string)']),
        ("[pools.app]\n", "[pools.app]\nprimary_reads_enabled = 1\n", "pools.app.primary_reads_enabled",
         ["true or false", "got 1"]),
        ("[pools.app]\n", "[pools.app]\nidle_timeout = true\n", "pools.app.idle_timeout",
         ["non-negative integer", "true (a boolean)"]),
        ("[pools.app]\n", '[pools.app]\nread_only_functions = "f"\n', "pools.app.read_only_functions",
         ["array of function names"]),
        ("[pools.app]\n", "[pools.app]\nread_only_functions = [1]\n", "pools.app.read_only_functions.0",
         ["function name", "got 1"]),
        # impossible values
        ("pool_size = 5", "pool_size = 0", "pools.app.users.0.pool_size", ["positive integer", "got 0"]),
        ("pool_size = 5", "pool_size = 5\nmin_pool_size = 6", "pools.app.users.0.min_pool_size",
         ["0..5", "got 6"]),
        ("pool_size = 5", "pool_size = 5\nstatement_timeout = -1", "pools.app.users.0.statement_timeout",
         ["non-negative", "got -1"]),
        ("pool_size = 5", 'pool_size = 5\npool_mode = "statement"', "pools.app.users.0.pool_mode",
         ['"transaction", "session"', '"statement"']),
        ("[pools.app]\n", '[pools.app]\npool_mode = "statement"\n', "pools.app.pool_mode",
         ['"transaction", "session"', '"statement"']),
        ("[pools.app]\n", '[pools.app]\nload_balancing_mode = "fastest"\n', "pools.app.load_balancing_mode",
         ['"random", "loc"', '"round_robin"', '"fastest"']),
        ("[pools.app]\n", '[pools.app]\ndefault_role = "mirror"\n', "pools.app.default_role",
         ['"any", "replica", "primary"', '"mirror"']),
        ("[pools.app]\n", "[pools.app]\nquery_parser_read_write_splitting = true\n",
         "pools.app.query_parser_read_write_splitting", ["query_parser_enabled"]),
        ("[pools.app]\n", "[pools.app]\nmax_replica_lag_ms = 0\n", "pools.app.max_replica_lag_ms",
         ["positive integer", "got 0"]),
    ],
)
def test_bad_values_name_file_key_expectation_and_value(old: str, new: str, key: str, fragments: list[str]) -> None:
    assert old in MINIMAL
    assert_error(MINIMAL.replace(old, new, 1), key, *fragments)


def test_workers_auto_is_one_per_usable_core_and_never_above_the_smallest_pool_size() -> None:
    from pypool.config import usable_cores

    auto = MINIMAL.replace("[general]\n", '[general]\nworkers = "auto"\n')
    g = parse(auto.replace("pool_size = 5", "pool_size = 64")).general
    assert (g.workers, g.workers_auto) == (usable_cores(), True)
    # Each worker needs a share of at least one connection: a pool of 1 means one worker, on any machine.
    assert parse(auto.replace("pool_size = 5", "pool_size = 1")).general.workers == 1
    assert parse(MINIMAL.replace("[general]\n", '[general]\nworkers = "AUTO"\n')).general.workers_auto
    assert not parse(MINIMAL).general.workers_auto


@pytest.mark.parametrize(
    "general_extra, key, fragments",
    [
        ("port = 0", "general.port", ["1..65535", "got 0"]),
        ("port = 70000", "general.port", ["1..65535", "got 70000"]),
        ('port = "6432"', "general.port", ["1..65535", '"6432" (a string)']),
        ("prometheus_exporter_port = 65536", "general.prometheus_exporter_port", ["1..65535"]),
        ('enable_prometheus_exporter = "yes"', "general.enable_prometheus_exporter", ["true or false"]),
        ("log_client_connections = 0", "general.log_client_connections", ["true or false", "got 0"]),
        ("ban_time = -5", "general.ban_time", ["non-negative", "got -5"]),
        ('worker_threads = "four"', "general.worker_threads", ["an integer", '"four"']),
        ("workers = 0", "general.workers", ["1..64", "got 0"]),
        ('workers = "all"', "general.workers", ['1..64 or "auto"', '"all" (a string)']),
        ('client_auth_method = "trust"', "general.client_auth_method", ['"scram-sha-256", "md5"']),
        ('client_tls_mode = "prefer"', "general.client_tls_mode", ['"disable", "allow", "require"']),
        ('client_tls_mode = "require"', "general.client_tls_mode", ["tls_certificate"]),
        ('tls_certificate = "c.pem"', "general.tls_private_key", ["tls_certificate is set"]),
        ("max_client_conn = -1", "general.max_client_conn", ["non-negative"]),
        ("max_message_size = 10", "general.max_message_size", ["got 10"]),
    ],
)
def test_bad_general_values(general_extra: str, key: str, fragments: list[str]) -> None:
    assert_error(GENERAL + general_extra + "\n" + POOL, key, *fragments)


@pytest.mark.parametrize(
    "text, key",
    [
        (MINIMAL.replace('username = "alice"\n', ""), "pools.app.users.0.username"),
        (MINIMAL.replace(f'password = "{SECRET}"\n', ""), "pools.app.users.0.password"),
        (MINIMAL.replace("pool_size = 5\n", ""), "pools.app.users.0.pool_size"),
        (MINIMAL.replace('database = "appdb"\n', ""), "pools.app.shards.0.database"),
        (MINIMAL.replace('servers = [["db1", 5432, "primary"], ["db2", 5432, "replica"]]\n', ""),
         "pools.app.shards.0.servers"),
        (MINIMAL.replace('admin_username = "admin_user"\n', ""), "general.admin_username"),
        (MINIMAL.replace(f'admin_password = "{ADMIN_SECRET}"\n', ""), "general.admin_password"),
        (POOL, "general"),
        (GENERAL, "pools"),
    ],
)
def test_missing_required_keys(text: str, key: str) -> None:
    err = assert_error(text, key, "required key is missing")
    assert "expected" in str(err)


def test_pool_without_users_or_shards_tables() -> None:
    no_users = GENERAL + '[pools.app]\n[pools.app.shards.0]\ndatabase = "d"\nservers = [["h", 1, "primary"]]\n'
    assert_error(no_users, "pools.app.users", "required key is missing", "a table")
    no_shards = GENERAL + f'[pools.app.users.0]\nusername = "u"\npassword = "{SECRET}"\npool_size = 1\n'
    assert_error(no_shards, "pools.app.shards", "required key is missing", "a table")


@pytest.mark.parametrize(
    "shard_body, key, fragments",
    [
        # a pool with no servers
        ('database = "d"\nservers = []', "pools.app.shards.0.servers", ["at least one", "got none"]),
        # only a mirror left: still no servers
        ('database = "d"\nservers = [["m", 1, "mirror"]]', "pools.app.shards.0.servers", ["at least one"]),
        ('database = "d"\nservers = "db1:5432"', "pools.app.shards.0.servers", ["[host, port, role]", "a string"]),
        # two primaries
        ('database = "d"\nservers = [["a", 1, "primary"], ["b", 2, "primary"]]', "pools.app.shards.0.servers",
         ["at most one primary", "got 2", "a:1, b:2"]),
        # entries that are not [host, port, role]
        ('database = "d"\nservers = [["a", 1]]', "pools.app.shards.0.servers.0",
         ["[host, port, role]", "array of 2 elements"]),
        ('database = "d"\nservers = [["a", 1, "primary", 4]]', "pools.app.shards.0.servers.0",
         ["array of 4 elements"]),
        ('database = "d"\nservers = ["a:1:primary"]', "pools.app.shards.0.servers.0",
         ["[host, port, role]", '"a:1:primary" (a string)']),
        ('database = "d"\nservers = [[1, 5432, "primary"]]', "pools.app.shards.0.servers.0",
         ["host (1st element)", "got 1"]),
        ('database = "d"\nservers = [["a", "5432", "primary"]]', "pools.app.shards.0.servers.0",
         ["port (2nd element)", "1..65535", '"5432" (a string)']),
        ('database = "d"\nservers = [["a", 0, "primary"]]', "pools.app.shards.0.servers.0",
         ["port (2nd element)", "got 0"]),
        ('database = "d"\nservers = [["a", true, "primary"]]', "pools.app.shards.0.servers.0",
         ["port (2nd element)", "true (a boolean)"]),
        # unknown role
        ('database = "d"\nservers = [["a", 1, "primary"], ["b", 2, "standby"]]', "pools.app.shards.0.servers.1",
         ['"primary" or "replica"', '"standby"']),
        # PgCat's rule is one server per (host, port, role): the same one twice as replica is refused.
        ('database = "d"\nservers = [["a", 1, "primary"], ["a", 1, "replica"], ["a", 1, "replica"]]',
         "pools.app.shards.0.servers.2", ["each server once per role", "a:1 (replica)"]),
    ],
)
def test_bad_shards(shard_body: str, key: str, fragments: list[str]) -> None:
    assert_error(with_pool(shard_body=shard_body), key, *fragments)


def test_bad_shard_keys() -> None:
    text = MINIMAL.replace("[pools.app.shards.0]", "[pools.app.shards.primary]")
    assert_error(text, "pools.app.shards.primary", "shard number", '"primary"')
    empty = with_pool().split("[pools.app.shards.0]")[0] + "[pools.app.shards]\n"
    assert_error(empty, "pools.app.shards", "at least one shard")
    colliding = MINIMAL + '\n[pools.app.shards.00]\ndatabase = "d"\nservers = [["h", 1, "primary"]]\n'
    assert_error(colliding, "pools.app.shards", "each shard number once")


def test_duplicate_usernames_in_a_pool_keep_the_last_as_pgcat_does() -> None:
    # PgCat's Docker example lists the same username twice; PgCat keeps the last one in key order.
    text = MINIMAL + f'\n[pools.app.users.1]\nusername = "alice"\npassword = "{SECRET}"\npool_size = 1\n'
    cfg = parse(text)
    assert cfg.pools["app"].users["alice"].pool_size == 1
    assert any("pools.app.users.1.username" in w and "only users.1 is used" in w for w in cfg.warnings)
    assert all(SECRET not in w for w in cfg.warnings)
    # Key order, not file order: users.2 comes after users.1.
    later_first = text.replace("[pools.app.users.0]", "[pools.app.users.2]")
    assert parse(later_first).pools["app"].users["alice"].pool_size == 5


def test_non_table_sections() -> None:
    assert_error('general = 3\n' + POOL, "general", "a table", "got 3")
    assert_error(GENERAL + "pools = 1\n", "pools", "a table")
    assert_error(GENERAL + "[pools]\napp = 1\n", "pools.app", "a table")
    text = GENERAL + '[pools.app]\nusers = { "0" = 5 }\n'
    assert_error(text, "pools.app.users.0", "a table", "got 5")


# ---------------------------------------------------------------------------
# Passwords never leak
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        MINIMAL.replace(f'password = "{SECRET}"', "password = 123456789"),
        MINIMAL.replace(f'password = "{SECRET}"', 'password = ""'),
        MINIMAL.replace(f'admin_password = "{ADMIN_SECRET}"', "admin_password = true"),
        MINIMAL.replace("pool_size = 5", "pool_size = 5\nserver_password = 987654321"),
        MINIMAL.replace("pool_size = 5", f'pool_size = 5\nserver_password = ["{SECRET}"]'),
        MINIMAL.replace("pool_size = 5", "pool_size = 0"),
    ],
)
def test_passwords_never_appear_in_errors(text: str) -> None:
    err = error_of(text)  # error_of asserts the secrets are absent
    assert "123456789" not in str(err)
    assert "987654321" not in str(err)
    if "password" in (err.key or ""):
        assert "got a" in str(err) or "got an" in str(err)


def test_toml_syntax_error_names_file_and_line_without_secret() -> None:
    text = MINIMAL.replace(f'password = "{SECRET}"', f'password = "{SECRET}')
    err = error_of(text)
    assert "invalid TOML" in str(err)
    assert "line" in str(err)
    assert err.key is None


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value).startswith(f"{missing}: cannot read config file")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[general]\n")
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert "UTF-8" in str(info.value)


def test_load_config_accepts_pathlike_and_reports_its_path(tmp_path: Path) -> None:
    f = tmp_path / "pgcat.toml"
    f.write_text(MINIMAL.replace("pool_size = 5", "pool_size = -3"))
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert str(info.value) == f"{f}: pools.app.users.0.pool_size: expected a positive integer, got -3"


# ---------------------------------------------------------------------------
# default_config_dict / dump_config
# ---------------------------------------------------------------------------
def test_default_config_dict_defaults_round_trip() -> None:
    d = default_config_dict({})
    text = dump_config(d)
    assert tomllib.loads(text) == d
    cfg = parse_config(text, "generated.toml")
    assert cfg.warnings == ()
    assert cfg.general.port == 6432
    pool = cfg.pools["postgres"]
    assert pool.users["postgres"].password == "mysecretpassword"
    assert pool.shards[0].database == "postgres"
    assert pool.primary() == ServerAddress("127.0.0.1", 5433, "primary")
    assert pool.replicas() == (
        ServerAddress("127.0.0.1", 5434, "replica"),
        ServerAddress("127.0.0.1", 5435, "replica"),
    )
    # Server entries are written one per line, like a hand-written file.
    assert '["127.0.0.1", 5433, "primary"],' in text
    # Same topology and settings as the shipped local file.
    local = load_config(LOCAL)
    assert cfg.pools["postgres"] == local.pools["postgres"]
    assert cfg.general == local.general


def test_default_config_dict_uses_env() -> None:
    env = {
        "POSTGRESQL_USERNAME": "app",
        "POSTGRESQL_PASSWORD": "pw",
        "POSTGRESQL_DATABASE": "appdb",
        "PGCAT_PORT": "7000",
        "PG1_PORT": "6001",
        "PG2_PORT": "6002",
        "PG3_PORT": "6003",
        "UNRELATED": "x",
    }
    cfg = parse_config(dump_config(default_config_dict(env)))
    assert cfg.general.port == 7000
    pool = cfg.pools["appdb"]
    assert pool.users["app"].password == "pw"
    assert pool.shards[0].database == "appdb"
    assert [s.port for s in pool.shards[0].servers] == [6001, 6002, 6003]


@pytest.mark.parametrize("value", ["abc", "0", "70000", "-1", "1.5"])
def test_default_config_dict_rejects_bad_ports(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        default_config_dict({"PG2_PORT": value})
    assert "PG2_PORT" in str(info.value)
    assert "1..65535" in str(info.value)


_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20
)


@settings(max_examples=60, deadline=None)
@given(
    username=_text,
    password=_text,
    database=_text,
    ports=st.lists(st.integers(1, 65535), min_size=4, max_size=4),
)
def test_dump_parse_round_trip_property(username: str, password: str, database: str, ports: list[int]) -> None:
    env = {
        "POSTGRESQL_USERNAME": username,
        "POSTGRESQL_PASSWORD": password,
        "POSTGRESQL_DATABASE": database,
        "PGCAT_PORT": str(ports[0]),
        "PG1_PORT": str(ports[1]),
        "PG2_PORT": str(ports[2]),
        "PG3_PORT": str(ports[3]),
    }
    d = default_config_dict(env)
    text = dump_config(d)
    assert tomllib.loads(text) == d
    if len({ports[1], ports[2], ports[3]}) < 3:
        return  # same server twice in a shard is (rightly) an error
    cfg = parse_config(text)
    pool = cfg.pools[database]
    assert isinstance(pool, Pool)
    assert pool.users[username].password == password
    assert pool.primary() == ServerAddress("127.0.0.1", ports[1], "primary")
    assert cfg.general.port == ports[0]


# ------------------------------------------------------------- causal reads (pypool keys)

_CAUSAL_SERVERS = '[["db1", 5432, "primary"], ["db2", 5432, "replica"]]'


def _causal_config(pool: str) -> str:
    return minimal_config(pool=pool, servers=_CAUSAL_SERVERS)


def test_causal_reads_defaults_to_session_only_with_read_write_splitting() -> None:
    split = parse_config(_causal_config("query_parser_enabled = true\n"
                                                  "query_parser_read_write_splitting = true"))
    assert split.pools["app"].causal_reads == "session"
    assert split.pools["app"].causal_reads_timeout == 1000
    plain = parse_config(_causal_config(""))
    assert plain.pools["app"].causal_reads == "off"
    assert not any("causal" in w for w in split.warnings + plain.warnings)


def test_causal_reads_keys_are_read_and_checked() -> None:
    cfg = parse_config(_causal_config('causal_reads = "Global"\ncausal_reads_timeout = 250'))
    assert (cfg.pools["app"].causal_reads, cfg.pools["app"].causal_reads_timeout) == ("global", 250)
    with pytest.raises(ConfigError, match=r'pools\.app\.causal_reads: expected one of "off", "session", '
                                          r'"global", got "always"'):
        parse_config(_causal_config('causal_reads = "always"'), "f.toml")
    with pytest.raises(ConfigError, match=r"f\.toml: pools\.app\.causal_reads_timeout: expected a positive "
                                          r"integer, got 0"):
        parse_config(_causal_config("causal_reads_timeout = 0"), "f.toml")
