"""What pypool runs on: its version, and Python's, sqlglot's and OpenSSL's (SHOW VERSION, the start-up log)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import ssl

from pypool import __version__


def runtime() -> str:
    """``pure Python, Python 3.11.7, sqlglot 30.30.0 + sqlglotc, OpenSSL 3.0.19``: what a bug report needs beside the version."""
    try:
        sqlglot = importlib.metadata.version("sqlglot")
    except importlib.metadata.PackageNotFoundError:
        sqlglot = "unknown"
    # sqlglotc (mypyc-compiled sqlglot) is optional: without it statements are classified more slowly.
    compiled = " + sqlglotc" if importlib.util.find_spec("sqlglotc") is not None else ""
    openssl = " ".join(ssl.OPENSSL_VERSION.split()[:2])
    return f"{hot_path()}, Python {platform.python_version()}, sqlglot {sqlglot}{compiled}, {openssl}"


def hot_path() -> str:
    """Whether the relay's modules run compiled (setup.py, ``PYPOOL_COMPILE=1``) or as Python source."""
    spec = importlib.util.find_spec("pypool.pool.server")
    origin = spec.origin if spec is not None else None
    return "pure Python" if origin is None or origin.endswith(".py") else "compiled hot path"


def version_line() -> str:
    """PgCat's and PgBouncer's form, ``<name> <version>``, that tools parse; then the runtime in parentheses."""
    return f"pypool {__version__} ({runtime()})"
