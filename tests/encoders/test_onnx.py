"""encoder.runtime: onnx: the same model version as torch, exported once, agreeing per image on real
mammograms, and serving an ingest and a query."""
from __future__ import annotations

import numpy as np
import pytest

from mammo_retrieval.app.workspace import Workspace
from tests.conftest import MIAS_DIR, make_config

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def _real_files(cbis_files):
    mias = sorted(MIAS_DIR.glob("P00[0-1]?/*.dcm"))[:12] if MIAS_DIR.exists() else []
    return mias + list(cbis_files[:4])


def test_onnx_agrees_with_torch_per_image_and_is_exported_once(tmp_path, cbis_files):
    files = _real_files(cbis_files)
    torch_ws = Workspace(make_config(tmp_path / "state"))
    onnx_ws = Workspace(make_config(tmp_path / "state", encoder={"runtime": "onnx"}))
    assert onnx_ws.encoder.identity == torch_ws.encoder.identity  # one model version, one index
    pictures = np.stack([torch_ws.prepare(f, torch_ws.encoder.settings).display for f in files])
    from mammo_retrieval.encoders.pooling import embed_pictures
    a, b = embed_pictures(torch_ws.encoder, list(pictures)), embed_pictures(onnx_ws.encoder, list(pictures))
    cosines = np.sum(a * b, axis=1)
    assert cosines.min() >= 0.999, cosines
    exported = list((tmp_path / "state" / "indexes" / "onnx").glob("*.onnx"))
    assert len(exported) == 1
    stamp = exported[0].stat().st_mtime_ns
    assert Workspace(onnx_ws.config).encoder.model_path == exported[0]
    assert exported[0].stat().st_mtime_ns == stamp, "a cached export is reused"
    exported[0].write_bytes(b"corrupt")  # a damaged cache file is exported again, not trusted
    again = Workspace(onnx_ws.config).encoder
    assert np.allclose(embed_pictures(again, list(pictures[:2])), b[:2], atol=1e-6)


def test_onnx_runtime_ingests_and_queries(tmp_path, cbis_files):
    ws = Workspace(make_config(tmp_path / "state", encoder={"runtime": "onnx", "batch_size": 4}))
    report = ws.ingest(cbis_files[0].parent.parent, workers=1)
    assert report.ingested == len(cbis_files)
    hits = ws.query_dicom(cbis_files[0], 3).hits
    torch_hits = Workspace(make_config(tmp_path / "state")).query_dicom(cbis_files[0], 3).hits
    assert [h.sop_instance_uid for h in hits] == [h.sop_instance_uid for h in torch_hits]
