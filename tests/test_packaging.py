"""The wheel's package list comes from discovery: no subpackage may be left out (analysis/ and train/ once
were, and every command that needs them failed after `pip install`). Checked without building a wheel;
`.ci/wheel_check.sh` builds and installs one and runs every command."""
import importlib.util
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("_mammo_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only under __main__
    return module


def _packages_on_disk(folder: Path, name: str) -> set[str]:
    """Every folder holding an __init__.py, as the dotted name it has once installed."""
    return {".".join([name, *init.parent.relative_to(folder).parts]) for init in folder.rglob("__init__.py")
            if "__pycache__" not in init.parts}


def test_discovery_includes_every_subpackage():
    packages, package_dir = _setup_module().discover()
    expected = (_packages_on_disk(REPO / "mammo_retrieval", "mammo_retrieval")
                | _packages_on_disk(REPO / "migrations", "mammo_retrieval._migrations")
                | _packages_on_disk(REPO / "configs", "mammo_retrieval._configs"))
    assert {"mammo_retrieval.analysis", "mammo_retrieval.train", "mammo_retrieval._migrations.versions",
            "mammo_retrieval.weights"} <= expected
    assert set(packages) == expected
    assert package_dir["mammo_retrieval._migrations"] == "migrations"
    assert package_dir["mammo_retrieval._configs"] == "configs"


def test_pyproject_lists_no_packages_by_hand_and_ships_data():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    tool = project["tool"]["setuptools"]
    assert "packages" not in tool, "packages listed by hand go stale: setup.py discovers them"
    data = tool["package-data"]
    weights = [p for pattern in data["mammo_retrieval.weights"]
               for p in (REPO / "mammo_retrieval" / "weights").glob(pattern)]
    assert weights, "the built-in encoder's weights must ship in the wheel"
    assert list((REPO / "configs").glob(data["mammo_retrieval._configs"][0]))
    assert all((REPO / "migrations" / f).exists() for f in data["mammo_retrieval._migrations"])
    assert isinstance(project["project"]["license"], str)  # SPDX string; the table form is deprecated
    assert project["project"]["optional-dependencies"]["postgres"] == ["psycopg[binary]>=3.1"]


def test_passing_tests_leave_no_folders_behind(pytestconfig):
    # the suite writes about 8 GB of models, checkpoints and indexes; kept, they filled CI's disk once
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
