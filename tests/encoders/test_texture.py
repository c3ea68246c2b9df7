"""The built-in v3's texture statistics against known answers and an independent numpy reference
(pixel by pixel loops, float64), and the fused vector against its definition."""
from __future__ import annotations

import numpy as np
import timm
import torch

from mammo_retrieval.encoders.fusion import IntensityFusion, TextureFusion
from mammo_retrieval.encoders.texture import (BREAST_LEVEL, LBP_CODES, LBP_RADII, STD_BINS, STD_RANGE, STD_WINDOWS,
                                              TEXTURE_DIM, breast_pixels, lbp_histograms, local_std_histograms,
                                              texture_features)
from mammo_retrieval.preprocess import PreprocessSettings, normalise

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RING = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]  # circular order


def reference_lbp(picture: np.ndarray, radius: int) -> np.ndarray:
    """Rotation-invariant uniform LBP histogram, one pixel at a time."""
    counts = np.zeros(LBP_CODES)
    h, w = picture.shape
    for y in range(radius, h - radius):
        for x in range(radius, w - radius):
            centre = int(picture[y, x])
            if centre <= BREAST_LEVEL:
                continue
            bits = [int(picture[y + dy * radius, x + dx * radius]) >= centre for dy, dx in RING]
            transitions = sum(bits[k] != bits[(k + 1) % 8] for k in range(8))
            counts[sum(bits) if transitions <= 2 else LBP_CODES - 1] += 1
    return counts / max(counts.sum(), 1)


def reference_local_std(picture: np.ndarray, window: int) -> np.ndarray:
    """Histogram of each breast pixel's window standard deviation (mirrored borders), float64."""
    half = window // 2
    padded = np.pad(picture.astype(np.float64), half, mode="reflect")
    counts = np.zeros(STD_BINS)
    for y, x in zip(*np.nonzero(picture > BREAST_LEVEL)):
        std = padded[y:y + window, x:x + window].std()
        if std < STD_RANGE:
            counts[int(std // (STD_RANGE / STD_BINS))] += 1
    return counts / max(counts.sum(), 1)


def _pictures() -> np.ndarray:
    rng = np.random.default_rng(1)
    smooth = np.cumsum(rng.integers(-3, 4, size=(3, 40, 40)), axis=2) + 120  # textures from smooth to rough
    pictures = np.clip(smooth + rng.integers(0, 1 + np.array([2, 20, 60])[:, None, None], size=(3, 40, 40)), 0, 255)
    pictures[:, :, :12] = 0  # background beside the breast: never counted
    return pictures.astype(np.uint8)


def test_texture_statistics_equal_the_pixel_by_pixel_reference():
    pictures = _pictures()
    got = texture_features(torch.from_numpy(pictures).float()).numpy()
    assert got.shape == (3, TEXTURE_DIM)
    expected = np.stack([np.concatenate([reference_lbp(p, r) for r in LBP_RADII]
                                        + [reference_local_std(p, k) for k in STD_WINDOWS]) for p in pictures])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got[0], got[2], atol=0.05)  # smooth and rough textures differ


def test_known_answers_flat_picture_spike_and_no_breast():
    flat = torch.full((1, 20, 20), 100.0)
    lbp = lbp_histograms(flat).view(len(LBP_RADII), LBP_CODES)
    assert torch.equal(lbp[:, 8], torch.ones(len(LBP_RADII)))  # every neighbour ties the centre: 8 ones
    assert local_std_histograms(flat)[0, 0::STD_BINS].tolist() == [1.0] * len(STD_WINDOWS)  # no spread at all
    spike = flat.clone()
    spike[0, 10, 10] = 200.0
    ring = lbp_histograms(spike, radii=(1,))[0]  # 18 x 18 centres: the spike (code 0) and 8 pixels seeing it
    assert ring[0] * 324 == 1 and abs(ring[8] * 324 - 323) < 1e-3
    empty = texture_features(torch.zeros(1, 20, 20))
    assert torch.equal(empty, torch.zeros_like(empty))  # nothing above the background level: no counts, no NaN


def test_a_given_breast_mask_restricts_the_counts_to_it():
    spike = torch.full((1, 20, 20), 100.0)
    spike[0, 10, 10] = 200.0
    default = torch.cat([lbp_histograms(spike), local_std_histograms(spike)], dim=1)
    mask = breast_pixels(spike)
    assert torch.equal(torch.cat([lbp_histograms(spike, breast=mask), local_std_histograms(spike, breast=mask)], 1),
                       default)  # the default mask, given explicitly: the same counts
    only_spike = torch.zeros_like(mask)
    only_spike[0, 10, 10] = True
    assert lbp_histograms(spike, radii=(1,), breast=only_spike)[0, 0] == 1  # the spike alone: code 0
    none = local_std_histograms(spike, breast=torch.zeros_like(mask))
    assert torch.equal(none, torch.zeros_like(none))


def test_v3_vector_is_v2s_beside_the_weighted_standardised_texture():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    fused = TextureFusion(backbone, MEAN[0], STD[0]).eval()
    fused.texture_mean.copy_(torch.rand(TEXTURE_DIM) * 0.1)
    fused.texture_std.copy_(torch.rand(TEXTURE_DIM) + 0.5)
    fused.texture_weight.fill_(0.7)
    intensity = IntensityFusion(backbone, MEAN[0], STD[0]).eval()
    intensity.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith("texture_")})
    pictures = np.concatenate([_pictures()] * 2, axis=1)[:, :, :40]  # 80 x 40
    x = torch.from_numpy(normalise(pictures, PreprocessSettings(mean=MEAN, std=STD)))
    with torch.inference_mode():
        out, v2 = fused(x).numpy(), intensity(x).numpy()
    standard = (texture_features(torch.from_numpy(pictures).float()).numpy() - fused.texture_mean.numpy()) \
        / fused.texture_std.numpy()
    expected = np.hstack([v2, 0.7 * standard / np.linalg.norm(standard, axis=1, keepdims=True)])
    np.testing.assert_allclose(out[:, :expected.shape[1]], expected, atol=1e-5)
    assert out.shape[1] == 704 and not out[:, expected.shape[1]:].any()  # zeros to a multiple of 64 (for PQ)
    assert {"texture_mean", "texture_std", "texture_weight", "histogram_reference"} <= set(fused.state_dict())
