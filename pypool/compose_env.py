"""The Compose ``.env`` file as pypool reads it, and credentials from it applied to a config.

Docker Compose keeps the database credentials in ``docker/.env``; PostgreSQL's
containers take them from there, and so does pypool's: Compose starts it with
``pypool config init --from <config>``, which writes the config with every
user's name and password and every shard's database replaced by the
``POSTGRESQL_*`` variables. The config file itself keeps PgCat's format, so it
still loads unchanged in PgCat and in ``pypool config check``.
"""

from __future__ import annotations

import tomllib
from typing import Mapping

from pypool.config import ConfigError

USERNAME, PASSWORD, DATABASE = "POSTGRESQL_USERNAME", "POSTGRESQL_PASSWORD", "POSTGRESQL_DATABASE"


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of a Compose ``.env`` file (comments, blank lines and quotes as Compose reads them)."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            out[key.strip()] = value
    return out


def read_toml(path: str) -> dict:
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, None, f"not valid TOML: {exc}") from None


def with_credentials(raw: dict, env: Mapping[str, str], path: str) -> dict:
    """``raw`` (a parsed PgCat-format file) with the credentials of ``env``'s POSTGRESQL_* variables that are set.

    Every user of every pool gets the user name and password, every shard the
    database; a single pool is renamed after the database (clients name it to
    connect). Several pools cannot all take one name: that is an error.
    """
    username, password, database = (env.get(name) or None for name in (USERNAME, PASSWORD, DATABASE))
    pools = raw.get("pools")
    if not isinstance(pools, dict) or not pools:
        raise ConfigError(path, "pools", "expected at least one pool to set the credentials of")
    if database is not None and len(pools) > 1:
        raise ConfigError(path, "pools", f"{DATABASE} names one pool, but the file has {len(pools)}: {sorted(pools)}")
    renamed = {}
    for name, pool in pools.items():
        for user in (pool.get("users") or {}).values():
            if username is not None:
                user["username"] = username
            if password is not None:
                user["password"] = password
        for shard in (pool.get("shards") or {}).values():
            if database is not None:
                shard["database"] = database
        renamed[database or name] = pool
    return {**raw, "pools": renamed}
