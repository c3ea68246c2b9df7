"""Checkpoints in the seeds' own layouts, made tiny here: a RAD-DINO-style Hugging Face folder (a 2-layer
DINOv2 saved with save_pretrained), a MoCo v3 / LeCL checkpoint of a timm MambaOut, and a checkpoint that
fits no layout. Each encoder's embeddings must equal the reference library's own forward pass."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.config import load_config
from mammo_retrieval.core.errors import ConfigError, WeightsError
from mammo_retrieval.encoders import build_encoder
from tests.conftest import make_config

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _encoder_cfg(**changes):
    cfg = load_config(env={"MRETRIEVE_HOME": "/nonexistent"})
    return cfg.replace("encoder", **changes)


def _reference(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features.float(), dim=1).detach().numpy()


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    """A tiny DINOv2 in Hugging Face format, with RAD-DINO's kind of preprocessor_config.json."""
    folder = tmp_path_factory.mktemp("rad-dino-tiny")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=56)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 56, "width": 56}, "do_center_crop": True, "size": {"shortest_edge": 56},
        "image_mean": [0.5307, 0.5307, 0.5307], "image_std": [0.2583, 0.2583, 0.2583], "resample": 3}))
    return folder


def test_rad_dino_folder_matches_transformers_forward(dino_folder):
    cfg = _encoder_cfg(name="rad-dino", weights=str(dino_folder))
    encoder = build_encoder(cfg.encoder, cfg.preprocess)
    assert encoder.dim == 32 and encoder.settings.size == (56, 56)
    assert encoder.settings.interpolation == "bicubic" and encoder.settings.mean == (0.5307,) * 3
    x = np.random.default_rng(0).standard_normal((3, 3, 56, 56)).astype(np.float32)
    reference = transformers.AutoModel.from_pretrained(dino_folder, local_files_only=True).eval()
    with torch.inference_mode():
        expected = _reference(reference(pixel_values=torch.from_numpy(x)).pooler_output)
    np.testing.assert_allclose(encoder.embed(x), expected, atol=1e-5)
    assert not encoder.identity.random_weights and encoder.identity.weights_path == str(dino_folder)


def test_a_folder_missing_weights_of_its_architecture_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=28)
    transformers.Dinov2Model(config).save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("layernorm.")}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = _encoder_cfg(name="rad-dino", weights=str(tmp_path))
    with pytest.raises(WeightsError, match="lack 2 tensor"):
        build_encoder(cfg.encoder, cfg.preprocess)


def test_rad_dino_needs_a_folder_and_names_what_it_lacks(tmp_path, dino_folder):
    with pytest.raises(WeightsError, match="Hugging Face folder"):
        cfg = _encoder_cfg(name="rad-dino", weights=None)
        build_encoder(cfg.encoder, cfg.preprocess)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="needs config.json and one of model.safetensors"):
        cfg = _encoder_cfg(name="rad-dino", weights=str(tmp_path))
        build_encoder(cfg.encoder, cfg.preprocess)


def test_rad_dino_ingests_and_queries_real_mammograms(dino_folder, cbis_files, tmp_path):
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "rad-dino", "weights": str(dino_folder),
                                                            "batch_size": 4}))
    report = ws.ingest(cbis_files[0].parent.parent, workers=1)
    assert report.ingested == len(cbis_files) and not report.rejected
    hits = ws.query_dicom(cbis_files[0], 3).hits
    assert len(hits) == 3 and ws.search.info().ntotal == len(cbis_files)
    assert ws.searchable_index().manifest.dim == 32


def _moco_checkpoint(model: torch.nn.Module) -> dict:
    """What CLEAR's main_moco.py saves: DDP-wrapped base and momentum encoders, a predictor, and a projection
    head in place of the classifier."""
    state = {}
    for name, tensor in model.state_dict().items():
        state[f"module.base_encoder.{name}"] = tensor
        state[f"module.momentum_encoder.{name}"] = torch.zeros_like(tensor)
    state["module.base_encoder.head.fc1.weight"] = torch.zeros(8, 8)  # the projection MLP: not a backbone weight
    state["module.predictor.0.weight"] = torch.zeros(8, 8)
    return {"epoch": 3, "arch": "mambaout_femto", "state_dict": state, "optimizer": {}}


def test_moco_checkpoint_of_a_timm_mambaout_matches_timm_forward(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("mambaout_femto", pretrained=False, num_classes=0).eval()
    path = tmp_path / "checkpoint_0003.pth.tar"
    torch.save(_moco_checkpoint(reference), path)
    cfg = _encoder_cfg(name="timm:mambaout_femto", weights=str(path))
    encoder = build_encoder(cfg.encoder, cfg.preprocess)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.inference_mode():
        expected = _reference(reference(torch.from_numpy(x)))
    np.testing.assert_allclose(encoder.embed(x), expected, atol=1e-5)
    assert encoder.dim == encoder.embed(x).shape[1] == expected.shape[1]  # not timm's num_features (288)
    assert ":" not in encoder.identity.key  # also a folder name


def test_a_checkpoint_that_fits_no_layout_names_its_layout_and_the_expected_keys(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "weird.pt"
    torch.save({f"backbone.net.{k}": v for k, v in model.state_dict().items()} | {"other.x": torch.zeros(1)}, path)
    cfg = _encoder_cfg(name="resnet18", weights=str(path))
    with pytest.raises(WeightsError) as info:
        build_encoder(cfg.encoder, cfg.preprocess)
    message = str(info.value)
    assert "(plain state dict)" in message and "expects keys like conv1.weight" in message
    assert "backbone.net." in message and "MoCo/LeCL" in message


def test_unknown_timm_architecture_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown timm architecture 'mambaout_tiny_nope'"):
        cfg = _encoder_cfg(name="timm:mambaout_tiny_nope")
        build_encoder(cfg.encoder, cfg.preprocess)


def test_reindex_to_another_rad_dino_folder_stores_a_copy_and_rolls_back(dino_folder, cbis_files, tmp_path):
    import shutil
    second = tmp_path / "rad-dino-2"
    config = transformers.Dinov2Config.from_pretrained(dino_folder)
    torch.manual_seed(7)
    transformers.Dinov2Model(config).save_pretrained(second, safe_serialization=True)
    shutil.copy(dino_folder / "preprocessor_config.json", second)
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "rad-dino", "weights": str(dino_folder),
                                                            "batch_size": 4}))
    ws.ingest(cbis_files[0].parent.parent, workers=1)
    first_key = ws.search.info().model_key
    ws = Workspace(ws.config.replace("encoder", weights=None))  # serve what live.json names
    result = ws.reindex(str(second))
    stored = [p for p in (ws.config.index_dir / "weights").iterdir() if p.is_dir()]
    assert any((p / "config.json").is_file() and (p / "model.safetensors").is_file() for p in stored)
    shutil.rmtree(second)  # the live version no longer depends on the user's folder
    fresh = Workspace(ws.config)
    assert fresh.search.info().model_key == result["live"] != first_key
    assert fresh.search.info().ntotal == len(cbis_files) and fresh.query_dicom(cbis_files[1], 2).hits
    fresh.rollback()
    assert Workspace(ws.config).search.info().model_key == first_key
