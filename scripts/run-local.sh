#!/usr/bin/env bash
# Set up everything on a fresh machine and run pypool in front of a local cluster:
# installs the package (and PostgreSQL 15 from apt when its binaries are missing),
# starts a primary on 127.0.0.1:5433 with streaming replicas on 5434 and 5435,
# then runs pypool on 127.0.0.1:6432 with config/pgcat.local.toml (Ctrl-C stops it).
# Extra arguments are passed to pypool (e.g. --log-level debug).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e .
"$PYTHON" -m pypool cluster up
"$PYTHON" -m pypool cluster status
exec "$PYTHON" -m pypool config/pgcat.local.toml "$@"
