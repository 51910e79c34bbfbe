"""Host-based access rules: pg_hba-style parsing, matching, config errors, and the login decision."""

from __future__ import annotations

import pytest

from pypool import hba, limits
from pypool.config import ConfigError, parse_config
from pypool.errors import LoginRefused
from tests.unit._minimal_config import MINIMAL

BASE = MINIMAL


def rules(*lines: str) -> tuple[hba.HbaRule, ...]:
    return tuple(hba.parse_rule(line) for line in lines)


def test_first_matching_rule_decides():
    rs = rules("host app alice 10.0.0.0/8 reject", "host all all 10.0.0.0/8 md5", "host all all all scram-sha-256")
    assert limits.access_method(rs, "scram-sha-256", "10.1.2.3", "app", "bob", False) == "md5"
    assert limits.access_method(rs, "scram-sha-256", "192.168.1.1", "app", "bob", False) == "scram-sha-256"
    with pytest.raises(LoginRefused) as excinfo:
        limits.access_method(rs, "scram-sha-256", "10.1.2.3", "app", "alice", False)
    assert excinfo.value.sqlstate == "28000"
    assert 'rejects connection for host "10.1.2.3", user "alice", database "app", no encryption' in str(excinfo.value)


def test_no_rule_means_refused_and_no_rules_at_all_means_the_default_method():
    rs = rules("host app u 127.0.0.1/32 trust")
    with pytest.raises(LoginRefused, match='no pypool hba entry for host "127.0.0.2", user "u", database "app"'):
        limits.access_method(rs, "md5", "127.0.0.2", "app", "u", False)
    assert limits.access_method(None, "md5", "127.0.0.2", "app", "u", False) == "md5"


@pytest.mark.parametrize(("kind", "tls", "matches"), [
    ("host", False, True), ("host", True, True), ("hostssl", False, False), ("hostssl", True, True),
    ("hostnossl", False, True), ("hostnossl", True, False)])
def test_connection_types_follow_tls(kind, tls, matches):
    assert hba.parse_rule(f"{kind} all all all trust").matches("1.2.3.4", "d", "u", tls) is matches


def test_lists_of_names_addresses_and_ipv6():
    rule = hba.parse_rule("host app,reports alice,bob 192.168.0.0/16 md5")
    assert rule.matches("192.168.44.5", "reports", "bob", False)
    assert not rule.matches("192.168.44.5", "other", "bob", False)
    assert not rule.matches("192.168.44.5", "app", "carol", False)
    assert not rule.matches("192.169.0.1", "app", "alice", False)
    assert hba.parse_rule("host all all 127.0.0.1 trust").matches("127.0.0.1", "d", "u", False)  # bare IP = /32
    v6 = hba.parse_rule("host all all ::1/128 trust")
    assert v6.matches("::1", "d", "u", False) and not v6.matches("127.0.0.1", "d", "u", False)
    # An IPv4 client seen on a dual-stack socket still matches IPv4 rules.
    assert hba.parse_rule("host all all 127.0.0.0/8 trust").matches("::ffff:127.0.0.1", "d", "u", False)


@pytest.mark.parametrize(("line", "message"), [
    ("host all all", "expected 5 fields"),
    ("local all all all trust", "pypool listens on TCP only"),
    ("host all all 10.0.0.0/8 password", "method 'password' is not one of"),
    ("host all all 10.0.0.1/8 trust", "has host bits set"),
    ("host all all banana trust", "is not \"all\", an IP address or a CIDR block"),
    ("host all,app all all trust", '"all" cannot be combined'),
    ("host all +admins all trust", "groups, files and keywords"),
    ("host ,app all all trust", "empty database name"),
])
def test_bad_rules_say_what_is_wrong(line, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        hba.parse_rule(line)


def test_config_hba_list_and_errors_name_the_entry():
    cfg = parse_config(BASE.format(general='hba = ["host all all 127.0.0.1/32 trust", "host all all all reject"]'))
    assert [r.method for r in cfg.general.hba] == ["trust", "reject"]
    with pytest.raises(ConfigError) as excinfo:
        parse_config(BASE.format(general='hba = ["host all all all trust", "host all all all maybe"]'), "f.toml")
    assert str(excinfo.value).startswith("f.toml: general.hba[1]: method 'maybe'")
    with pytest.raises(ConfigError, match="general.hba: expected an array of pg_hba lines"):
        parse_config(BASE.format(general='hba = "host all all all trust"'))
    assert parse_config(BASE.format(general="")).general.hba is None


def test_config_hba_file_relative_to_the_config_file(tmp_path):
    (tmp_path / "clients.hba").write_text("# who may connect\n\nhost  app  u  10.0.0.0/8  md5  # office\n"
                                          "hostssl all all all scram-sha-256\n")
    config = tmp_path / "pgcat.toml"
    config.write_text(BASE.format(general='hba_file = "clients.hba"'))
    from pypool.config import load_config

    rules_ = load_config(config).general.hba
    assert [r.text for r in rules_] == ["host app u 10.0.0.0/8 md5", "hostssl all all all scram-sha-256"]
    (tmp_path / "clients.hba").write_text("host all all all trust\nhost all all all nope\n")
    with pytest.raises(ConfigError, match=r"general.hba_file\[line 2\]: method 'nope'"):
        load_config(config)
    config.write_text(BASE.format(general='hba_file = "missing.hba"'))
    with pytest.raises(ConfigError, match=r"general.hba_file: cannot read .*missing.hba"):
        load_config(config)
    config.write_text(BASE.format(general='hba_file = "clients.hba"\nhba = []'))
    with pytest.raises(ConfigError, match="general.hba_file: expected either hba or hba_file, not both"):
        load_config(config)


def test_limit_keys_are_validated():
    cfg = parse_config(BASE.format(general="client_login_timeout = 2500"))
    assert cfg.general.client_login_timeout == 2500
    with pytest.raises(ConfigError, match="general.client_login_timeout: expected a positive integer, got 0"):
        parse_config(BASE.format(general="client_login_timeout = 0"))
    with_user_limit = BASE.format(general="").replace("pool_size = 2", "pool_size = 2\nmax_client_connections = 3")
    assert parse_config(with_user_limit).pools["app"].users["u"].max_client_connections == 3
    bad = with_user_limit.replace("max_client_connections = 3", 'max_client_connections = "3"')
    with pytest.raises(ConfigError, match="pools.app.users.0.max_client_connections: expected a non-negative"):
        parse_config(bad)


def test_user_connection_counts():
    counts = limits.UserConnectionCounts()
    counts.admit(("app", "u"), 2)
    counts.admit(("app", "u"), 2)
    with pytest.raises(LoginRefused) as excinfo:
        counts.admit(("app", "u"), 2)
    assert excinfo.value.sqlstate == "53300" and "max_client_connections is 2" in str(excinfo.value)
    counts.admit(("other", "u"), 2)  # counted per pool
    counts.release(("app", "u"))
    counts.admit(("app", "u"), 2)
    assert counts[("app", "u")] == 2
    counts.admit(("app", "v"), 0)  # 0 = unlimited
