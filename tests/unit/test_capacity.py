"""How many server connections N instances may open (pypool.capacity, `config check --instances`)."""

from __future__ import annotations

from pypool.capacity import connections_per_server, instance_warnings
from pypool.cli import main
from pypool.config import parse_config

TEXT = """
[general]
admin_username = "a"
admin_password = "b"
workers = {workers}

[pools.app.users.0]
username = "app"
password = "x"
pool_size = 30

[pools.app.users.1]
username = "report"
password = "y"
pool_size = 5

[pools.app.shards.0]
database = "appdb"
servers = [["db1", 5432, "primary"], ["db2", 5432, "replica"]]

[pools.other.users.0]
username = "app"
password = "x"
pool_size = 10

[pools.other.shards.0]
database = "other"
servers = [["db1", 5432, "primary"]]
"""


def test_every_instance_adds_its_pool_sizes_and_monitors_per_server() -> None:
    config = parse_config(TEXT.format(workers=2), "f.toml")
    # db1: (30 + 2) + (5 + 2) for app, (10 + 2) for other; db2 serves only app.
    assert connections_per_server(config, 1) == {("db1", 5432): 51, ("db2", 5432): 39}
    assert connections_per_server(config, 3) == {("db1", 5432): 153, ("db2", 5432): 117}


def test_warns_only_for_servers_whose_max_connections_would_be_reached() -> None:
    config = parse_config(TEXT.format(workers=1), "f.toml")  # db1: 48 per instance, db2: 37
    assert instance_warnings(config, 2) == []  # 96 and 74 under 100 - 3
    warnings = instance_warnings(config, 3)  # 144 and 111
    assert len(warnings) == 2 and warnings[0].startswith("3 instance(s) may open up to 144 connections to db1:5432")
    assert instance_warnings(config, 3, max_connections=200) == []


def test_config_check_prints_the_warning(tmp_path, capsys) -> None:
    path = tmp_path / "pgcat.toml"
    path.write_text(TEXT.format(workers=1))
    assert main(["config", "check", str(path), "--instances", "3"]) == 0
    err = capsys.readouterr().err
    assert "may open up to 144 connections to db1:5432" in err and "max_connections 100 - 3 reserved = 97" in err
    assert main(["config", "check", str(path), "--instances", "3", "--max-connections", "300"]) == 0
    assert "may open" not in capsys.readouterr().err
