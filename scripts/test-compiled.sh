#!/usr/bin/env bash
# The compiled hot path (setup.py's COMPILED_MODULES built with mypyc, PYPOOL_COMPILE=1) under the
# tests that exercise it: the unit suite and the integration files that relay through real drivers,
# LISTEN, sharding and reloads.
# The build goes into a copy of the tree, so this checkout stays pure Python.
# Arguments go to pytest instead of the default selection (e.g. tests/unit/test_frames.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh test
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
"$PYTHON" -c "import mypyc" 2>/dev/null || "$PYTHON" -m pip install --quiet --disable-pip-version-check "mypy>=1.15,<3"  # setup.py's MYPY

tree=$(mktemp -d "${TMPDIR:-/tmp}/pypool-compiled.XXXXXX")
trap 'rm -rf "$tree"' EXIT
tar -c --exclude=./.venv --exclude=./.git --exclude=./.cluster --exclude=./build --exclude='*.so' \
    --exclude=__pycache__ --exclude=./.mypy_cache . | tar -x -C "$tree"
cd "$tree"
echo "compiled: building in $tree"
PYPOOL_COMPILE=1 "$PYTHON" setup.py --quiet build_ext --inplace >build.log 2>&1 || { cat build.log; exit 1; }
# Fail loudly rather than test pure Python by mistake.
"$PYTHON" -c 'from pypool.about import hot_path; assert hot_path() == "compiled hot path", hot_path()' \
    || { echo "compiled: the build did not take" >&2; exit 1; }
"$PYTHON" -m pypool cluster up
if [ $# -eq 0 ]; then
    set -- tests/unit tests/integration/test_drivers.py tests/integration/test_session_state.py \
        tests/integration/test_pinning.py tests/integration/test_schema_changes.py \
        tests/integration/test_causal_reads.py tests/integration/test_benchmark_smoke.py \
        tests/integration/test_listen.py tests/integration/test_sharding.py tests/integration/test_reload.py
fi
exec "$PYTHON" -m pytest -q -p no:cacheprovider "$@"
