"""``"${NAME}"`` config values from the environment (pypool.config_env), through parse_config."""

from __future__ import annotations

import pytest

from pypool.config import ConfigError, parse_config
from tests.unit._minimal_config import MINIMAL

# admin_password and the user's password as references (or whatever a test writes there)
TEXT = MINIMAL.format(general="").replace('admin_password = "b"', 'admin_password = "${ADMIN_PASSWORD}"') \
    .replace('password = "p"', 'password = "{password}"')


def test_whole_value_references_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ADMIN_PASSWORD", "s3cret-admin")
    monkeypatch.setenv("APP_PASSWORD", "s3cret-app")
    config = parse_config(TEXT.replace("{password}", "${APP_PASSWORD}"), "k8s.toml")
    assert config.general.admin_password == "s3cret-admin"
    assert config.pools["app"].users["u"].password == "s3cret-app"


@pytest.mark.parametrize("written", ["pa$$word", "x${APP_PASSWORD}", "${not a name}", "$APP_PASSWORD"])
def test_anything_but_a_whole_reference_stays_as_written(monkeypatch, written: str) -> None:
    monkeypatch.setenv("ADMIN_PASSWORD", "a")
    monkeypatch.setenv("APP_PASSWORD", "expanded")
    config = parse_config(TEXT.replace("{password}", written), "k8s.toml")
    assert config.pools["app"].users["u"].password == written


def test_a_missing_variable_names_file_key_and_variable(monkeypatch) -> None:
    monkeypatch.setenv("ADMIN_PASSWORD", "a")
    monkeypatch.delenv("APP_PASSWORD", raising=False)
    with pytest.raises(ConfigError) as err:
        parse_config(TEXT.replace("{password}", "${APP_PASSWORD}"), "k8s.toml")
    assert str(err.value) == "k8s.toml: pools.app.users.0.password: environment variable APP_PASSWORD is not set"
