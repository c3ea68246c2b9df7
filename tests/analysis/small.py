"""A small synthetic workspace (seconds to build) for analysis tests that need odd header values."""
from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import make_config
from tests.factory import breast_phantom, make_file

FORMULA = '=HYPERLINK("http://x","y")'
ENCODER = {"name": "resnet18", "input_size": 64, "batch_size": 8}


def small_workspace(root: Path, n: int = 8, overrides: dict[int, dict] | None = None, duplicate_of: int | None = None):
    """``n`` phantoms of ``n // 2`` women (L and R each), ingested with a tiny ResNet-18 at 64 px.

    ``overrides[i]`` are make_file keywords for image i (e.g. ``accession=None``: the tag is absent);
    ``duplicate_of=i`` adds image i's pixels once more under a new SOPInstanceUID, with the same overrides.
    """
    from mammo_retrieval.app.workspace import Workspace
    overrides = overrides or {}
    archive = root / "archive"

    def kwargs(i: int) -> dict:
        side = "LR"[i % 2]
        return {"accession": f"ACC{i // 2:04d}", "patient_id": f"PAT{i // 2:04d}", "laterality": side,
                "view": "CC" if i % 4 < 2 else "MLO", **overrides.get(i, {})}

    for i in range(n):
        make_file(archive / f"img{i:02d}.dcm", breast_phantom(side="LR"[i % 2], seed=i), **kwargs(i))
    if duplicate_of is not None:
        i = duplicate_of
        make_file(archive / "copy.dcm", breast_phantom(side="LR"[i % 2], seed=i), **kwargs(i))
    ws = Workspace(make_config(root / "state", encoder=ENCODER))
    report = ws.ingest(archive, workers=0)
    assert report.ingested == n + (duplicate_of is not None), report.as_dict()
    return ws


def cli_env(ws, tmp_path: Path) -> dict:
    """Environment that points `mretrieve` at ``ws`` (its home and encoder)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"encoder": ENCODER}))
    return {"MRETRIEVE_HOME": str(ws.config.index_dir.parent), "MRETRIEVE_CONFIG": str(config)}
