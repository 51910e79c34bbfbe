#!/usr/bin/env bash
# Set up everything on a fresh machine and run pypool in front of a local cluster:
# installs pypool into a virtual environment (.venv, see scripts/venv.sh) and PostgreSQL 15
# from apt when its binaries are missing, starts a primary on 127.0.0.1:5433 with streaming
# replicas on 5434 and 5435, then runs pypool on 127.0.0.1:6432 with config/pgcat.local.toml
# (Ctrl-C stops it). Extra arguments are passed to pypool (e.g. --log-level debug).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh ""
"$PYTHON" -m pypool cluster up
exec "$PYTHON" -m pypool config/pgcat.local.toml "$@"
