# Sourced by run-local.sh and test.sh: make a virtual environment (.venv in the repository, or
# $PYPOOL_VENV) with pypool installed editable plus the extras named in $1, and point PYTHON at it.
# A virtual environment because Debian 12's Python refuses `pip install` outside one (PEP 668).
# Reused when present; pip runs again only when pyproject.toml or the extras changed.
# $PYTHON, when set, is the interpreter the environment is made from (default python3).

venv_dir=${PYPOOL_VENV:-.venv}
extras=$1
if [ ! -x "$venv_dir/bin/python" ]; then
    echo "venv: creating $venv_dir with ${PYTHON:-python3}"
    if ! "${PYTHON:-python3}" -m venv "$venv_dir"; then
        rm -rf "$venv_dir"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            # Debian ships venv's pip bootstrap separately.
            echo "venv: installing python3-venv with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
            "${PYTHON:-python3}" -m venv "$venv_dir"
        else
            echo "venv: cannot create $venv_dir; install python3-venv (apt-get install python3-venv) and retry" >&2
            exit 1
        fi
    fi
fi
PYTHON=$venv_dir/bin/python
stamp="$venv_dir/.pypool-installed${extras:+-$extras}"
wanted="$(cat pyproject.toml) [$extras]"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "venv: installing pypool${extras:+ [$extras]} into $venv_dir"
    pip_install=("$PYTHON" -m pip install --quiet --disable-pip-version-check)
    # sqlglotc (compiled sqlglot) only from a wheel; where there is none, plain sqlglot does the same work.
    if ! "${pip_install[@]}" --only-binary sqlglotc -e ".[${extras:+$extras,}speedups]"; then
        echo "venv: no sqlglotc wheel for this platform; installing without it (query classification is slower)"
        "${pip_install[@]}" -e ".${extras:+[$extras]}"
    fi
    printf '%s' "$wanted" > "$stamp"
fi
