"""A learned embedding fused with the picture's intensity distribution (built-in v2) and texture (v3).

Why: self-supervised training with the card's brightness/contrast augmentation teaches a network to ignore
exposure, yet exposure is what a woman's two breasts share most (a 64-bin histogram finds her other breast
better than the v1 network does; README). The fused vector is the backbone's unit vector beside the
picture's 64-bin histogram, centred on a reference histogram and scaled to unit length, times a weight
(both stored with the weights); the encoder then L2-normalises the whole. The histogram is counted from
the model input itself, so the module stays one function of one tensor (torch, ONNX, a Dask worker).
v3 (``TextureFusion``) adds a third part the same way: texture statistics of the picture
(``encoders.texture``), standardised by means and deviations stored with the weights, scaled to unit
length times their own weight, then zeros up to a multiple of 64 dimensions (704), so that IVF-PQ's usual
sub-quantiser counts (16, 32, 64) divide the vector; zeros change no distance.
"""
from __future__ import annotations

import torch
from torch import nn

from mammo_retrieval.core.errors import WeightsError
from mammo_retrieval.encoders.texture import TEXTURE_DIM, texture_features

HISTOGRAM_BINS = 64
DIMENSION_MULTIPLE = 64  # v3 pads its vector with zeros to a multiple of this (product quantisation)


def grey_picture(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(N, 3, H, W) normalised model input -> (N, H, W) integer grey levels 0..255 (float32) of channel 0:
    the uint8 picture the preprocessing made, recovered exactly (round half up)."""
    grey = x[:, 0] * std + mean
    return torch.floor(grey * 255.0 + 0.5).clamp(0.0, 255.0)


def histogram(levels: torch.Tensor, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """(N, P) grey levels -> (N, bins) fraction of pixels per bin of equal width over 0..255.

    A scatter-add into a fixed (N, bins) tensor: one pass over the pixels, and an operation ONNX has
    (ScatterElements with add), so the exported model counts the same way."""
    index = torch.div(levels, 256.0 / bins, rounding_mode="floor").to(torch.int64).clamp(0, bins - 1)
    counts = torch.zeros(levels.shape[0], bins, dtype=torch.float32, device=levels.device)
    counts = counts.scatter_add(1, index, torch.ones_like(levels, dtype=torch.float32))
    return counts / levels.shape[1]


class IntensityFusion(nn.Module):
    """``backbone`` (a headless network) plus the intensity histogram of its input; see the module doc."""

    def __init__(self, backbone: nn.Module, mean: float, std: float, bins: int = HISTOGRAM_BINS) -> None:
        super().__init__()
        self.backbone = backbone
        self.learned_dim = int(getattr(backbone, "num_features", 0))  # timm's; the fused vector adds ``bins``
        self.mean, self.std, self.bins = float(mean), float(std), bins
        # learnt from training images and stored with the weights; these defaults are placeholders
        self.register_buffer("histogram_reference", torch.full((bins,), 1.0 / bins))
        self.register_buffer("histogram_weight", torch.tensor(0.3))

    def learned(self, x: torch.Tensor) -> torch.Tensor:
        """The network's features alone: what `mretrieve train` trains (the histogram has nothing to learn,
        and a projection head given it could match two views by their histograms)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(x, grey_picture(x.float(), self.mean, self.std))

    def fuse(self, x: torch.Tensor, picture: torch.Tensor) -> torch.Tensor:
        """The fused vector of input ``x`` whose uint8 picture (``grey_picture``) is ``picture``: recovered
        once by ``forward`` and shared by every part that counts from it."""
        learned = nn.functional.normalize(self.learned(x).float(), p=2, dim=1)
        counts = histogram(picture.flatten(1), self.bins) - self.histogram_reference
        intensity = nn.functional.normalize(counts, p=2, dim=1) * self.histogram_weight
        return torch.cat([learned, intensity], dim=1)


class TextureFusion(IntensityFusion):
    """``IntensityFusion`` plus the texture of its input (the built-in v3); see the module doc."""

    def __init__(self, backbone: nn.Module, mean: float, std: float, bins: int = HISTOGRAM_BINS) -> None:
        super().__init__(backbone, mean, std, bins)
        # standardisation of each texture statistic over training pictures, stored with the weights
        self.register_buffer("texture_mean", torch.zeros(TEXTURE_DIM))
        self.register_buffer("texture_std", torch.ones(TEXTURE_DIM))
        self.register_buffer("texture_weight", torch.tensor(0.5))
        self.padding = -(self.learned_dim + bins + TEXTURE_DIM) % DIMENSION_MULTIPLE

    def fuse(self, x: torch.Tensor, picture: torch.Tensor) -> torch.Tensor:
        standard = (texture_features(picture) - self.texture_mean) / self.texture_std
        texture = nn.functional.normalize(standard, p=2, dim=1) * self.texture_weight
        zeros = torch.zeros(x.shape[0], self.padding, dtype=texture.dtype, device=texture.device)
        return torch.cat([super().fuse(x, picture), texture, zeros], dim=1)


def require_fused_layout(state: dict, path, encoder: str, texture: bool) -> None:
    """A clear error for weights of an older built-in given to a fused encoder: most likely v1 or v2 (or a
    checkpoint trained from one) pinned in a config that relied on that being the default name."""
    if not any(k.startswith("backbone.") for k in state) and any(k.startswith("conv1.") for k in state):
        raise WeightsError(f"{path}: these are a plain network's weights (conv1.*, no backbone.* or histogram_* "
                           f"keys), and the encoder is {encoder}, a network fused with an intensity histogram",
                           hint="for the built-in v1 or a checkpoint trained from it, set encoder.name: mammo-simclr "
                                "(the default encoder was mammo-simclr before v2)")
    if not texture and "texture_mean" in state:
        raise WeightsError(f"{path}: these are the built-in v3's layout (texture_* keys beside the histogram), "
                           f"and the encoder is {encoder}, which fuses no texture",
                           hint="for the built-in v3 or a checkpoint trained from it, set encoder.name: "
                                "mammo-simclr-v3")
    if texture and "histogram_reference" in state and "texture_mean" not in state:
        raise WeightsError(f"{path}: these are the built-in v2's layout (a network and a histogram, no texture_* "
                           f"keys), and the encoder is {encoder}, which also fuses texture statistics",
                           hint="for the built-in v2 or a checkpoint trained from it, set encoder.name: "
                                "mammo-simclr-v2 (the default encoder was mammo-simclr-v2 before v3)")
