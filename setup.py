"""Build hook: pyproject.toml holds the metadata; this file only adds the optional compiled hot path.

``PYPOOL_COMPILE=1`` compiles the modules every relayed message passes through with mypyc (as
sqlglotc does for sqlglot): the same source, run as C extension modules. Without it pypool installs
as pure Python and behaves the same. See the README, "The compiled hot path".
"""

import os

from setuptools import setup

# The relay's hot path. A module listed here must type-check cleanly (mypyc checks declared types at
# run time: a bytearray where bytes is declared is a TypeError) and its classes' instances must not be
# weakly referenced (mypyc releases a compiled class's weakref slot as if it held an object: the
# interpreter crashes later). Exceptions live elsewhere: a compiled subclass of an exception loses the
# class-level attributes it sets (PoolerError's ``sqlstate``). A Python subclass of a compiled class
# cannot be instantiated (TypeError), and a compiled method cannot be patched: hooks, not overrides.
# A narrowed ``x.attr`` (after ``is not None``) is read again as the narrowed type even after ``x``
# changed in a loop (pypool/pool/group.py's latest_group).
COMPILED_MODULES = [
    "pypool/protocol/frames.py",
    "pypool/session/tracker.py",
    "pypool/pool/server.py",
    "pypool/pool/pool.py",
    "pypool/protocol/messages.py",
    "pypool/flow.py",
    "pypool/session/session_state.py",
    "pypool/session/prepared.py",
    "pypool/routing/router.py",
    # The session, one class built as a chain (pypool/session/base.py), and the pool group it checks out from.
    "pypool/session/base.py",
    "pypool/session/effects.py",
    "pypool/session/pinning.py",
    "pypool/session/checkout.py",
    "pypool/session/shards.py",
    "pypool/session/relay.py",
    "pypool/session/session.py",
    "pypool/pool/group.py",
    "pypool/pool/balancer.py",
]


MYPY = "mypy>=1.15,<3"


def compiled_extensions() -> list | None:
    """The extension modules to build; None when mypyc must be installed first."""
    if os.environ.get("PYPOOL_COMPILE", "") not in ("1", "yes", "true"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return None  # pip's isolated build environment: asked for below, then setup.py runs again
    # --strict-bytes: bytearray is not bytes (as at run time in compiled code). Only the compiled
    # modules must type-check; the rest stays Python and is read for its types.
    return mypycify(["--strict-bytes", "--follow-imports=silent", *COMPILED_MODULES], opt_level="3")


extensions = compiled_extensions()
setup(ext_modules=extensions or [], setup_requires=[MYPY] if extensions is None else [])
