"""``"${NAME}"`` values in the config file: taken from the environment.

A string value that is exactly ``${NAME}`` is replaced by the environment
variable ``NAME``; nothing else is touched, so a password that merely contains
a ``$`` stays as written. This keeps secrets out of the file: in Kubernetes the
TOML lives in a ConfigMap and ``password = "${POSTGRES_PASSWORD}"`` comes from
a Secret through the container's environment (``deploy/kubernetes/``).
A variable that is not set is an error naming the file, the key and the
variable, never a value.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class MissingVariable(Exception):
    def __init__(self, key: str, name: str) -> None:
        super().__init__(f"environment variable {name} is not set")
        self.key = key
        self.name = name


def expand(data: Any, environ: Mapping[str, str] | None = None, key: str = "") -> Any:
    """``data`` (parsed TOML) with every ``"${NAME}"`` string replaced; raises MissingVariable."""
    env = os.environ if environ is None else environ
    if isinstance(data, dict):
        return {k: expand(v, env, f"{key}.{k}" if key else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand(v, env, f"{key}.{i}") for i, v in enumerate(data)]
    if isinstance(data, str):
        match = _REFERENCE.fullmatch(data)
        if match is not None:
            name = match.group(1)
            if name not in env:
                raise MissingVariable(key, name)
            return env[name]
    return data
