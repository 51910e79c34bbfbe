"""The README a newcomer reads: its contents links lead somewhere, the chart is embedded, and the
"Coming from PgCat / PgBouncer" section names every PgCat key and admin command a migrating user has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

# PgCat's settings (src/config.rs) and admin commands, PgBouncer's admin commands.
PGCAT_KEYS = """
host port enable_prometheus_exporter prometheus_exporter_port connect_timeout idle_timeout server_lifetime
healthcheck_timeout healthcheck_delay ban_time shutdown_timeout idle_client_in_transaction_timeout
log_client_connections log_client_disconnections admin_username admin_password admin_auth_type tls_certificate
tls_private_key server_tls verify_server_certificate worker_threads autoreload dns_cache_enabled dns_max_ttl
tcp_keepalives_idle tcp_keepalives_count tcp_keepalives_interval tcp_user_timeout server_round_robin
validate_config auth_query auth_query_user auth_query_password prepared_statements prepared_statements_cache_size
checkout_failure_limit db_activity_based_routing db_activity_init_delay db_activity_ttl table_mutation_cache_ms_ttl
pool_mode load_balancing_mode default_role query_parser_enabled query_parser_read_write_splitting
query_parser_max_length primary_reads_enabled sharding_function automatic_sharding_key sharding_key_regex
shard_id_regex regex_search_limit default_shard cleanup_server_connections log_client_parameter_status_changes
plugins username password server_username server_password pool_size min_pool_size statement_timeout auth_type
database servers mirrors
""".split()
ADMIN_COMMANDS = """
POOLS STATS SERVERS CLIENTS DATABASES CONFIG LISTS USERS VERSION BANS HELP STATS_TOTALS STATS_AVERAGES RELOAD
PAUSE RESUME BAN UNBAN SHUTDOWN SET KILL KILL_CLIENT SUSPEND DISABLE ENABLE RECONNECT WAIT_CLOSE FDS SOCKETS
ACTIVE_SOCKETS MEM STATE DNS_HOSTS DNS_ZONES PEERS PEER_POOLS TOTALS PREPARED_STATEMENTS
""".split()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_contents_links_lead_to_headings():
    anchors = {github_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", README, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", section("Contents"))
    assert len(links) >= 10
    missing = [link for link in links if link not in anchors]
    assert not missing, f"contents links without a heading: {missing}"
    top_level = [github_anchor(h) for h in re.findall(r"^## (.+)$", README, re.M) if h != "Contents"]
    assert not [a for a in top_level if a not in links], "a section is missing from the contents"


def test_migration_section_names_every_pgcat_key_and_admin_command():
    text = section("Coming from PgCat / PgBouncer")
    missing_keys = [k for k in PGCAT_KEYS if f"`{k}`" not in text and not re.search(rf"`{k} ?=", text)]
    assert not missing_keys, f"PgCat keys the migration tables do not mention: {missing_keys}"
    missing_commands = [c for c in ADMIN_COMMANDS if not re.search(rf"\b{c}\b", text)]
    assert not missing_commands, f"admin commands the migration tables do not mention: {missing_commands}"
    # Every row says what pypool does.
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    verdict = re.compile(r"\b(yes|no|differently|in progress|accepted|pypool's own)\b|^`\w", re.I)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[-1] == "pypool":
            continue  # a header row
        assert verdict.search(cells[-1]), f"row without a verdict: {row}"


def test_sharding_rows_say_it_works():
    text = section("Coming from PgCat / PgBouncer")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "shard" in line.lower()
            and "mirrors" not in line and not line.rstrip().endswith("| pypool |")]
    assert len(rows) >= 4, rows  # the keys, the client commands, "all", the feature row
    for row in rows:
        verdict = row.strip("|").split("|")[-1]
        assert "in progress" not in verdict and re.search(r"\b(yes|pypool's own|differently)\b", verdict), row


def test_benchmark_chart_is_embedded_with_absolute_tps():
    results = section("Benchmarks")
    image = re.search(r"!\[[^\]]+\]\((benchmarks/results/latest\.png)\)", results)
    assert image and (ROOT / image.group(1)).is_file()
    header = next(line for line in results.splitlines() if line.startswith("| workload"))
    assert "pypool TPS" in header and "PgBouncer TPS" in header and "pypool / PgBouncer" in header


def test_benchmark_commands_in_the_readme_parse():
    """Every `python -m benchmarks.run ...` the README shows names targets and workloads the harness has."""
    import shlex

    from benchmarks.run import parse_args

    commands = re.findall(r"^python -m benchmarks\.run((?:[^\n]*\\\n)*[^\n]*)", section("Benchmarks"), re.M)
    assert len(commands) >= 3
    for command in commands:
        args = shlex.split(command.replace("\\\n", " "), comments=True)
        opts = parse_args(args)  # exits with the harness's own message on an unknown target or workload
        assert opts.rounds >= 1
