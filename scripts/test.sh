#!/usr/bin/env bash
# Install what the tests need and run the whole default suite (unit + integration
# against a local primary + 2 replicas that the tests start themselves).
# Long benchmarks are not part of it: see the README, "Benchmarks".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[test]'
"$PYTHON" -m pypool cluster up
exec "$PYTHON" -m pytest -q "$@"
