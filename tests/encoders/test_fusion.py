"""The built-ins' intensity branch (v2, v3) against known answers: the histogram it counts from the normalised
model input equals numpy's histogram of the uint8 picture; the fused vector is the backbone's unit vector
beside the weighted, centred histogram; ONNX Runtime computes the same thing."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from mammo_retrieval.core.config import load_config
from mammo_retrieval.encoders.fusion import HISTOGRAM_BINS, IntensityFusion, grey_picture, histogram
from mammo_retrieval.preprocess import PreprocessSettings, normalise

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pictures(n: int = 3, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    pictures[0, :8] = 0      # the bin edges' neighbours on purpose
    pictures[1, :8] = 255
    pictures[2, :8] = 4
    return pictures


def _textured(n: int, size: int) -> np.ndarray:
    """Breast-like pictures (smooth to rough texture beside a black background), so every texture
    statistic counts pixels (uniform noise leaves most local-deviation bins empty)."""
    rng = np.random.default_rng(2)
    base = np.cumsum(rng.integers(-3, 4, size=(n, size, size)), axis=2) + 120
    rough = np.linspace(2, 40, n).astype(int)[:, None, None]
    pictures = np.clip(base + rng.integers(0, 1 + rough, size=(n, size, size)), 0, 255)
    pictures[:, :, : size // 4] = 0
    return pictures.astype(np.uint8)


def test_histogram_of_the_model_input_is_numpys_of_the_picture():
    pictures = _pictures()
    x = torch.from_numpy(normalise(pictures, PreprocessSettings(mean=MEAN, std=STD)))
    levels = grey_picture(x, MEAN[0], STD[0]).flatten(1)
    assert torch.equal(levels, torch.from_numpy(pictures.reshape(3, -1).astype(np.float32)))
    expected = np.stack([np.histogram(p, bins=HISTOGRAM_BINS, range=(0, 256))[0] for p in pictures]) / pictures[0].size
    np.testing.assert_allclose(histogram(levels).numpy(), expected, atol=1e-7)


def test_fused_vector_is_backbone_beside_weighted_centred_histogram():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    fused = IntensityFusion(backbone, MEAN[0], STD[0]).eval()
    reference = torch.rand(HISTOGRAM_BINS)
    fused.histogram_reference.copy_(reference / reference.sum())
    fused.histogram_weight.fill_(0.5)
    pictures = _pictures()
    x = torch.from_numpy(normalise(pictures, PreprocessSettings(mean=MEAN, std=STD)))
    with torch.inference_mode():
        out = fused(x).numpy()
        learned = torch.nn.functional.normalize(backbone(x), dim=1).numpy()
    counts = np.stack([np.histogram(p, bins=HISTOGRAM_BINS, range=(0, 256))[0] for p in pictures]) / pictures[0].size
    centred = counts - fused.histogram_reference.numpy()
    expected = np.hstack([learned, 0.5 * centred / np.linalg.norm(centred, axis=1, keepdims=True)])
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out.shape == (3, 512 + HISTOGRAM_BINS)
    # the state dict is what the shipped file holds: the backbone and both histogram buffers
    assert {"histogram_reference", "histogram_weight", "backbone.conv1.weight"} <= set(fused.state_dict())


@pytest.mark.parametrize("name, dim", [("mammo-simclr-v3", 704), ("mammo-simclr-v2", 576)])
def test_the_shipped_fused_builtins_run_the_same_under_onnx_runtime(tmp_path, name, dim):
    pytest.importorskip("onnxruntime")
    from mammo_retrieval.encoders.model import build_encoder
    from mammo_retrieval.encoders.onnx_runtime import onnx_encoder
    cfg = load_config(env={})
    torch_encoder = build_encoder(cfg.encoder.__class__(**{**cfg.encoder.__dict__, "name": name}), cfg.preprocess)
    assert torch_encoder.identity.encoder == name and torch_encoder.dim == dim
    onnx = onnx_encoder(torch_encoder, tmp_path)
    batch = normalise(np.concatenate([_pictures(4, 128), _textured(4, 128)]), torch_encoder.settings)
    a, b = torch_encoder.embed(batch), onnx.embed(batch)
    assert np.min(np.sum(a * b, axis=1)) > 0.9999
    # the statistics beside the network (histogram, v3's texture) are counts: they agree far more tightly
    np.testing.assert_allclose(a[:, 512:], b[:, 512:], atol=1e-5)
    if name == "mammo-simclr-v3":
        assert np.abs(a[:, 576:664]).min(axis=1).max() > 0  # real texture values on the textured pictures


def test_the_export_check_feeds_fused_encoders_real_grey_levels():
    """The export check ran noise only, which a fused encoder turns into grey levels no image has (all
    clipped): two of its three inputs are now mammogram-like pictures, normalised as the pipeline does."""
    from mammo_retrieval.encoders.model import build_encoder
    from mammo_retrieval.encoders.onnx_runtime import check_inputs
    cfg = load_config(env={})
    encoder = build_encoder(cfg.encoder, cfg.preprocess)
    settings = encoder.settings
    inputs = check_inputs(settings)
    assert inputs.shape == (3, 3, *settings.size) and inputs.dtype == np.float32
    grey = (inputs[1:, 0] * settings.std[0] + settings.mean[0]) * 255
    np.testing.assert_allclose(grey, np.round(grey), atol=1e-3)  # whole grey levels, as from a uint8 picture
    assert 0.2 < (grey > 20).mean() < 0.8 and grey.max() <= 255.001  # a breast on a black background
    with torch.inference_mode():
        texture = encoder.model(torch.from_numpy(inputs))[1:, 576:664].numpy()
    assert np.abs(texture).min(axis=1).max() > 0 and not np.allclose(texture[0], texture[1])
    np.testing.assert_array_equal(inputs, check_inputs(settings))  # fixed
