"""What a newcomer installs: one version, the licence, bounded dependencies, sqlglotc optional, a venv."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import pypool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_one_source_for_the_version(project):
    assert "version" not in project and "version" in project["dynamic"]
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["dynamic"]["version"] == {"attr": "pypool.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", pypool.__version__)


def test_the_declared_licence_is_shipped(project):
    assert project["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_api_breaking_majors_are_bounded_and_sqlglotc_is_optional(project):
    deps = {re.split(r"[<>=;\[ ]", d, 1)[0]: d for d in project["dependencies"]}
    assert re.search(r"<\d+", deps["sqlglot"]), deps["sqlglot"]
    assert "sqlglotc" not in deps, "sqlglotc has no wheel on some platforms: it must not be required"
    assert any(d.startswith("sqlglotc") for d in project["optional-dependencies"]["speedups"])


def test_classification_works_with_plain_sqlglot(tmp_path):
    """Without sqlglotc (its compiled modules) pypool imports and uses the pure-Python sqlglot."""
    import sqlglot

    source = Path(sqlglot.__file__).parent
    shutil.copytree(source, tmp_path / "sqlglot", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    probe = ("import sqlglot.parser; from pypool.routing.classify import classify; "
             "print(sqlglot.parser.__file__); "
             "print(classify('SELECT a FROM t WHERE b IN (SELECT c FROM u)').writes, "
             "classify('WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x').writes)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    parser_file, result = out.stdout.splitlines()
    assert parser_file == str(tmp_path / "sqlglot" / "parser.py")
    assert result == "False True"


@pytest.mark.parametrize("script, extras", [("run-local.sh", '""'), ("test.sh", "test")])
def test_scripts_install_into_a_virtual_environment(script, extras):
    text = (ROOT / "scripts" / script).read_text()
    assert f"source scripts/venv.sh {extras}\n" in text
    assert "pip install" not in text, "install through scripts/venv.sh only (PEP 668 refuses it outside a venv)"
    venv = (ROOT / "scripts" / "venv.sh").read_text()
    assert '-m venv "$venv_dir"' in venv and "PYTHON=$venv_dir/bin/python" in venv
    assert '"$PYTHON" -m pypool' in text
