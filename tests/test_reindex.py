import json

import numpy as np
import pytest
import torch

from mammo_retrieval.api import Workspace
from mammo_retrieval.errors import NotFoundError
from mammo_retrieval.versions import read_live
from tests.conftest import make_config
from tests.ingest.test_runner import synthetic_archive


def finetuned_weights(ws, path):
    """A checkpoint in PRIMER layout with weights unlike the seeded initialisation."""
    gen = torch.Generator().manual_seed(3)
    state = {f"encoder.encoder.{k}": (v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
             for k, v in ws.encoder.model.state_dict().items()}
    torch.save({"model_state_dict": state}, path)
    return path


def test_reindex_switches_atomically_and_rolls_back(tmp_path, monkeypatch):
    files = synthetic_archive(tmp_path / "archive", 10)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96})
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    old_key = ws.encoder.identity.key
    assert read_live(cfg.index_dir)[0].key == old_key
    before = ws.query_dicom(files[0], k=3)
    ckpt = finetuned_weights(ws, tmp_path / "new.pt")

    # queries keep working on the old version while the new one is built
    server = Workspace(cfg)
    server.query_dicom(files[0], k=3)
    from mammo_retrieval import reindex as reindex_module
    real_switch = reindex_module.switch_live

    def check_then_switch(index_dir, new):
        assert server.query_dicom(files[0], k=3).hits == before.hits
        assert server.encoder.identity.key == old_key
        return real_switch(index_dir, new)
    monkeypatch.setattr(reindex_module, "switch_live", check_then_switch)
    result = Workspace(cfg).reindex(str(ckpt))
    monkeypatch.undo()
    assert result["embedded"] == 10 and result["previous"] == old_key and result["live"] != old_key

    # the warm server picks up the switch on its next query; vectors of two models never mix
    after = server.query_dicom(files[0], k=3)
    assert server.encoder.identity.key == result["live"] and not server.encoder.identity.random_weights
    assert [h.score for h in after.hits] != [h.score for h in before.hits]
    status = Workspace(cfg).status()
    roles = {m["key"]: (m["live"], m["kept_for_rollback"], m["vectors"]) for m in status["model_versions"]}
    assert roles == {old_key: (False, True, 10), result["live"]: (True, False, 10)}
    assert json.loads((cfg.index_dir / result["live"] / "manifest.json").read_text())["ntotal"] == 10

    # re-running adds nothing; rollback restores the old answers
    assert Workspace(cfg).reindex(str(ckpt))["embedded"] == 0
    assert Workspace(cfg).rollback()["live"] == old_key
    assert Workspace(cfg).query_dicom(files[0], k=3).hits == before.hits
    assert Workspace(cfg).rollback()["live"] == result["live"]  # and forward again


def test_rollback_without_history(tmp_path):
    synthetic_archive(tmp_path / "archive", 3)
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96}))
    ws.ingest(tmp_path / "archive", workers=0)
    with pytest.raises(NotFoundError, match="no earlier index version"):
        ws.rollback()


def test_reindex_rebuilds_a_lost_cache_entry_and_reports_a_vanished_file(tmp_path):
    files = synthetic_archive(tmp_path / "archive", 4)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96})
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    from mammo_retrieval.dicom.reader import read_header
    first, second = (read_header(f, cfg.reader).sop_instance_uid for f in files[:2])
    ws.image_cache.discard(first)   # lost from the cache: rebuilt from the DICOM
    ws.image_cache.discard(second)  # lost from the cache and the file is gone: reported
    files[1].unlink()
    result = Workspace(cfg).reindex(str(finetuned_weights(ws, tmp_path / "w.pt")))
    assert result["embedded"] == 3 and [f["sop_instance_uid"] for f in result["failed"]] == [second]
    assert "not found" in result["failed"][0]["reason"] or "No such file" in result["failed"][0]["reason"]
