"""The key table (pypool.config_keys): complete, and what reload, SHOW CONFIG and the warnings read from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pypool import config_keys
from pypool.config import ConfigError, General, Pool, Shard, User, parse_config
from pypool.config_keys import Applies, Section
from tests.unit.test_config import ADMIN_SECRET, FILE, MINIMAL, parse

PGCAT_CONFIGS = Path(__file__).parent / "pgcat_configs"

# Every key of PgCat's src/config.rs (General, Pool, User, Shard, Config), and CONFIG.md's other spellings
# (verify_config, db_activity_based_ms_init_delay).
PGCAT_KEYS = {
    Section.TOP: ["path", "general", "pools", "plugins"],
    Section.GENERAL: [
        "host", "port", "enable_prometheus_exporter", "prometheus_exporter_port", "connect_timeout",
        "idle_timeout", "tcp_keepalives_idle", "tcp_keepalives_count", "tcp_keepalives_interval",
        "tcp_user_timeout", "log_client_connections", "log_client_disconnections", "dns_cache_enabled",
        "dns_max_ttl", "shutdown_timeout", "healthcheck_timeout", "healthcheck_delay", "ban_time",
        "idle_client_in_transaction_timeout", "server_lifetime", "server_round_robin", "worker_threads",
        "autoreload", "tls_certificate", "tls_private_key", "server_tls", "verify_server_certificate",
        "admin_username", "admin_password", "admin_auth_type", "validate_config", "auth_query",
        "auth_query_user", "auth_query_password", "prepared_statements", "prepared_statements_cache_size",
        "verify_config",
    ],
    Section.POOL: [
        "pool_mode", "load_balancing_mode", "default_role", "query_parser_enabled", "query_parser_max_length",
        "query_parser_read_write_splitting", "primary_reads_enabled", "db_activity_based_routing",
        "db_activity_init_delay", "db_activity_ttl", "table_mutation_cache_ms_ttl", "connect_timeout",
        "idle_timeout", "server_lifetime", "sharding_function", "automatic_sharding_key", "sharding_key_regex",
        "shard_id_regex", "regex_search_limit", "default_shard", "auth_query", "auth_query_user",
        "auth_query_password", "cleanup_server_connections", "log_client_parameter_status_changes",
        "prepared_statements_cache_size", "checkout_failure_limit", "plugins", "shards", "users",
        "db_activity_based_ms_init_delay",
    ],
    Section.USER: [
        "username", "password", "server_username", "server_password", "pool_size", "min_pool_size",
        "pool_mode", "server_lifetime", "statement_timeout", "connect_timeout", "idle_timeout", "auth_type",
    ],
    Section.SHARD: ["database", "servers", "mirrors"],
}


# ------------------------------------------------------------------ the table is complete

def test_every_dataclass_field_has_a_key_and_every_key_a_field() -> None:
    fields = set(config_keys.dataclass_fields(General, Pool, User, Shard))
    targets = {key.sets for key in config_keys.KEYS if key.sets is not None}
    assert fields - targets - config_keys.STRUCTURAL_FIELDS == set(), "fields without a key in config_keys.KEYS"
    assert targets - fields == set(), "keys that set no dataclass field"


def test_every_key_is_declared_once_per_section() -> None:
    seen = [(key.section, key.name) for key in config_keys.KEYS]
    assert len(seen) == len(set(seen))


def test_ignored_keys_say_why_and_implemented_keys_set_a_field() -> None:
    for key in config_keys.KEYS:
        if key.applies is Applies.IGNORED:
            assert key.reason and key.sets is None and key.pgcat, key
        elif key.section is not Section.TOP:
            assert key.sets is not None, key


@pytest.mark.parametrize("section", list(PGCAT_KEYS))
def test_every_pgcat_key_is_recognised(section: Section) -> None:
    assert [name for name in PGCAT_KEYS[section] if config_keys.lookup(section, name) is None] == []


# ------------------------------------------------------------------ PgCat's own files

@pytest.mark.parametrize("path", sorted(PGCAT_CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_pgcat_example_configs_pass(path: Path) -> None:
    cfg = parse_config(path.read_text(), str(path))
    assert cfg.pools
    unknown = [w for w in cfg.warnings if "unknown key" in w]
    # pgcat.minimal.toml carries a [query_cache] table that PgCat's config.rs does not read either.
    assert unknown == ([] if path.name != "pgcat.minimal.toml" else [
        f"{path}: query_cache: unknown key in the top level, ignored"])


def test_worker_threads_is_reported_and_points_to_workers() -> None:
    cfg = parse_config((PGCAT_CONFIGS / "pgcat.toml").read_text(), FILE)
    assert cfg.general.workers == 1
    [note] = [w for w in cfg.warnings if "worker_threads" in w]
    assert "not used by pypool" in note and "`workers`" in note


def test_docker_example_lists_one_server_as_primary_and_replica() -> None:
    cfg = parse_config((PGCAT_CONFIGS / "examples_docker_pgcat.toml").read_text(), FILE)
    servers = cfg.pools["postgres"].shards[0].servers
    assert [(s.host, s.port, s.role) for s in servers] == [("postgres", 5432, "primary"),
                                                           ("postgres", 5432, "replica")]


@pytest.mark.parametrize("key, value", [
    ("checkout_failure_limit", "3"), ("db_activity_based_routing", "true"), ("db_activity_init_delay", "100"),
    ("db_activity_ttl", "900"), ("table_mutation_cache_ms_ttl", "50"),
])
def test_pgcat_pool_keys_are_accepted_with_the_reason(key: str, value: str) -> None:
    cfg = parse(MINIMAL.replace("[pools.app]\n", f"[pools.app]\n{key} = {value}\n"))
    [note] = cfg.warnings
    assert note.startswith(f"{FILE}: pools.app.{key}: PgCat setting accepted, not used by pypool: ")
    assert config_keys.lookup(Section.POOL, key).reason in note


def test_an_ignored_key_with_the_wrong_type_is_an_error_as_in_pgcat() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse(MINIMAL.replace("[pools.app]\n", '[pools.app]\ncheckout_failure_limit = "many"\n'))
    assert excinfo.value.key == "pools.app.checkout_failure_limit"
    assert "an integer" in excinfo.value.reason


# ------------------------------------------------------------------ unknown keys

@pytest.mark.parametrize("table, typo, meant", [
    ("[pools.app]\n", 'pool_mod = "session"', "pool_mode"),
    ("[general]\n", "healthcheck_dealy = 5", "healthcheck_delay"),
    ("[pools.app.users.0]\n", "pool_sise = 3", "pool_size"),
])
def test_a_misspelt_key_suggests_the_nearest(table: str, typo: str, meant: str) -> None:
    cfg = parse(MINIMAL.replace(table, table + typo + "\n"))
    [warning] = cfg.warnings
    assert f"did you mean `{meant}`?" in warning
    assert warning.startswith(f"{FILE}: {table.strip('[]' + chr(10))}.{typo.split()[0]}: unknown key in ")


def test_a_key_in_the_wrong_table_says_where_it_belongs() -> None:
    cfg = parse(MINIMAL.replace("[pools.app]\n", "[pools.app]\nstatement_timeout = 5\n"))
    [warning] = cfg.warnings
    assert warning.endswith("unknown key in [pools.app], ignored; `statement_timeout` belongs in "
                            "[pools.<name>.users.<n>]")


def test_strict_makes_unknown_keys_errors_naming_each() -> None:
    text = MINIMAL.replace("[pools.app]\n", '[pools.app]\npool_mod = "session"\n').replace(
        "[general]\n", "[general]\nfrobnicate = 1\n")
    assert len(parse(text).warnings) == 2  # without strict: warnings
    with pytest.raises(ConfigError) as excinfo:
        parse_config(text, FILE, strict=True)
    err = excinfo.value
    assert err.key == "general.frobnicate"
    assert err.reason == "unknown key in [general], an error with --strict; also unknown: pools.app.pool_mod"


def test_reject_unknown_keys_in_the_file_makes_them_errors() -> None:
    text = MINIMAL.replace("[general]\n", "[general]\nreject_unknown_keys = true\n")
    assert parse(text).general.reject_unknown_keys is True
    with pytest.raises(ConfigError) as excinfo:
        parse(text.replace("[pools.app]\n", '[pools.app]\npool_mod = "session"\n'))
    assert excinfo.value.key == "pools.app.pool_mod"
    assert excinfo.value.reason == ("unknown key in [pools.app], an error because general.reject_unknown_keys "
                                    "is true; did you mean `pool_mode`?")


def test_strict_accepts_pgcat_keys_pypool_ignores() -> None:
    cfg = parse_config((PGCAT_CONFIGS / "pgcat.toml").read_text(), FILE, strict=True)
    assert cfg.warnings


# ------------------------------------------------------------------ checkout wait

def test_a_pgcat_connect_timeout_above_the_checkout_wait_is_pointed_out() -> None:
    cfg = parse(MINIMAL.replace("[general]\n", "[general]\nconnect_timeout = 30000\n"))
    [note] = cfg.warnings
    assert note.startswith(f"{FILE}: general.connect_timeout: PgCat also waits connect_timeout (30000 ms)")
    assert "set checkout_timeout = 30000" in note
    explicit = parse(MINIMAL.replace("[general]\n", "[general]\nconnect_timeout = 30000\ncheckout_timeout = 100\n"))
    assert explicit.warnings == ()


# ------------------------------------------------------------------ reload and SHOW CONFIG

def _group(text: str):
    cfg = parse(text)
    pool = cfg.pools["app"]
    return config_keys.group_signature(pool, pool.users["alice"], cfg.general)


@pytest.mark.parametrize("setting, rebuilds", [
    ("healthcheck_delay = 5", True), ("healthcheck_timeout = 5", True), ("connect_timeout = 5", True),
    ("ban_time = 5", False), ("log_client_connections = true", False), ("shutdown_timeout = 5", False),
])
def test_general_changes_rebuild_only_when_the_table_says_so(setting: str, rebuilds: bool) -> None:
    changed = MINIMAL.replace("[general]\n", f"[general]\n{setting}\n")
    assert (_group(MINIMAL) != _group(changed)) is rebuilds


def test_restart_only_changes_are_named_and_kept() -> None:
    old = parse(MINIMAL).general
    new = parse(MINIMAL.replace("[general]\n", "[general]\nport = 7777\nban_time = 5\n")).general
    assert config_keys.restart_changes(old, new) == ["port"]
    kept = config_keys.keep_restart_values(old, new)
    assert (kept.port, kept.ban_time) == (old.port, 5)


def test_show_config_names_and_changeability_come_from_the_table() -> None:
    from pypool.admin.tables import config_table

    _, rows = config_table(parse(MINIMAL))
    changeable = {row[0]: row[3] for row in rows}
    for f in dataclasses.fields(General):
        if "password" in f.name or f"General.{f.name}" in config_keys.STRUCTURAL_FIELDS:
            continue
        key = config_keys.file_key(General, f.name)
        assert changeable[key] == ("no" if config_keys.needs_restart(General, f.name) else "yes")
    assert changeable["port"] == "no" and changeable["healthcheck_delay"] == "yes"
    auto = parse(MINIMAL.replace("[general]\n", '[general]\nworkers = "auto"\n'))
    values = {row[0]: row[1] for row in config_table(auto)[1]}
    assert values["workers"] == f"auto ({auto.general.workers})" and "workers_auto" not in values


# ------------------------------------------------------------------ trust

def test_pgcat_trust_example_sets_trust_for_the_user_and_the_admin() -> None:
    cfg = parse_config((PGCAT_CONFIGS / "circleci_pgcat_trust.toml").read_text(), FILE, strict=True)
    assert cfg.general.admin_auth_type == "trust" and cfg.general.admin_password == ""
    assert cfg.pools["sharded_db"].users["sharding_user"].auth_type == "trust"


def test_auth_type_values_and_the_empty_admin_password() -> None:
    assert parse(MINIMAL.replace("pool_size = 5\n", 'pool_size = 5\nauth_type = "MD5"\n')) \
        .pools["app"].users["alice"].auth_type == "md5"
    with pytest.raises(ConfigError) as excinfo:
        parse(MINIMAL.replace("pool_size = 5\n", 'pool_size = 5\nauth_type = "ldap"\n'))
    assert excinfo.value.key == "pools.app.users.0.auth_type" and '"trust"' in excinfo.value.reason
    empty = MINIMAL.replace(f'admin_password = "{ADMIN_SECRET}"', 'admin_password = ""')
    with pytest.raises(ConfigError) as excinfo:
        parse(empty)
    assert excinfo.value.key == "general.admin_password"
    assert parse(empty.replace("[general]\n", '[general]\nadmin_auth_type = "trust"\n')).general.admin_password == ""


def test_reload_plan_rebuilds_for_healthcheck_delay_and_names_restart_keys() -> None:
    from pypool.reload import plan_reload

    old = parse(MINIMAL)
    assert plan_reload(old, parse(MINIMAL.replace("[general]\n", "[general]\nhealthcheck_delay = 5\n"))) \
        .new_groups == {("app", "alice")}
    plan = plan_reload(old, parse(MINIMAL.replace("[general]\n", "[general]\nban_time = 5\nport = 7777\n")))
    assert (plan.new_groups, plan.restart_needed) == (set(), ["port"])
