#!/usr/bin/env bash
# Install what the tests need into the virtual environment (.venv, see scripts/venv.sh) and run
# the whole default suite (unit + integration against a local primary + 2 replicas that the
# tests start themselves). Long benchmarks are not part of it: see the README, "Benchmarks".
# Arguments go to pytest (e.g. ./scripts/test.sh tests/unit).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh test
"$PYTHON" -m pypool cluster up
exec "$PYTHON" -m pytest -q "$@"
