import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mammo_retrieval.core.config import load_config
from mammo_retrieval.encoders import build_encoder
from mammo_retrieval.core.fileio import sha256_file
from mammo_retrieval.core.errors import WeightsError

CFG = load_config(env={})
ENC = CFG.encoder.__class__(name="resnet18", weights=None, allow_random_weights=True, input_size=None, batch_size=4,
                            device="cpu", precision="fp32", channels_last=False)
BATCH = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)


def trained_state() -> dict:
    """Weights unlike the seeded initialisation, as a finetuned checkpoint would hold."""
    model = build_encoder(ENC, CFG.preprocess).model
    gen = torch.Generator().manual_seed(7)
    return {k: (v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
            for k, v in model.state_dict().items()}


def encoder_with(path):
    return build_encoder(ENC.__class__(**{**ENC.__dict__, "weights": str(path)}), CFG.preprocess)


def test_primer_plain_and_safetensors_checkpoints_load_the_same_weights(tmp_path):
    state = trained_state()
    primer = {"model_state_dict": {**{f"encoder.encoder.{k}": v for k, v in state.items()},
                                   "projection_head.0.weight": torch.zeros(512, 512)}, "epoch": 3}
    torch.save(primer, tmp_path / "primer.bin")
    torch.save({**state, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, tmp_path / "plain.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    outputs = []
    for name in ("primer.bin", "plain.pt", "w.safetensors"):
        enc = encoder_with(tmp_path / name)
        assert enc.identity.weights_sha256 == sha256_file(tmp_path / name)
        assert not enc.identity.random_weights
        outputs.append(enc.embed(BATCH))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)
    np.testing.assert_allclose(outputs[0], outputs[2], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(outputs[0], axis=1), 1.0, atol=1e-5)
    random_out = build_encoder(ENC, CFG.preprocess).embed(BATCH)
    assert np.abs(random_out - outputs[0]).max() > 1e-3  # the weights really were loaded


def test_missing_weights_file_names_the_path(tmp_path):
    with pytest.raises(WeightsError, match=str(tmp_path / "nope.pt")):
        encoder_with(tmp_path / "nope.pt")


def test_wrong_architecture_is_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(3, 3)}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="do not fit this encoder"):
        encoder_with(tmp_path / "w.pt")


def test_primer_checkpoint_without_encoder_keys(tmp_path):
    torch.save({"model_state_dict": {"head.weight": torch.zeros(2)}}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="encoder.encoder"):
        encoder_with(tmp_path / "w.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "w.pt").write_text("hello")
    with pytest.raises(WeightsError, match="w.pt: not a checkpoint.*starts with b'hello'"):
        encoder_with(tmp_path / "w.pt")
    (tmp_path / "w.pt").write_bytes(b"\x80\x02 truncated pickle")
    with pytest.raises(WeightsError, match="cannot read weights"):
        encoder_with(tmp_path / "w.pt")


def test_random_weights_are_seeded_and_flagged():
    a, b = build_encoder(ENC, CFG.preprocess), build_encoder(ENC, CFG.preprocess)
    assert a.identity == b.identity and a.identity.random_weights
    np.testing.assert_array_equal(a.embed(BATCH), b.embed(BATCH))


def test_random_weights_can_be_forbidden():
    with pytest.raises(WeightsError, match="no encoder weights"):
        build_encoder(ENC.__class__(**{**ENC.__dict__, "allow_random_weights": False}), CFG.preprocess)


def test_preprocessing_comes_from_the_model():
    enc = build_encoder(ENC.__class__(**{**ENC.__dict__, "name": "inception_v3"}), CFG.preprocess)
    assert enc.settings.size == (299, 299) and enc.settings.mean == (0.5, 0.5, 0.5)


def test_input_size_override_changes_the_preprocessing_digest():
    small = build_encoder(ENC.__class__(**{**ENC.__dict__, "input_size": 128}), CFG.preprocess)
    assert small.settings.size == (128, 128)
    assert small.identity.preprocess_digest != build_encoder(ENC, CFG.preprocess).identity.preprocess_digest
    assert small.embed(BATCH[:, :, :128, :128]).shape == (2, 512)


def test_bf16_and_channels_last_agree_with_fp32():
    exact = build_encoder(ENC, CFG.preprocess).embed(BATCH)
    fast = build_encoder(ENC.__class__(**{**ENC.__dict__, "precision": "bf16", "channels_last": True}),
                         CFG.preprocess).embed(BATCH)
    assert (exact * fast).sum(axis=1).min() > 0.99
