"""Texture descriptors of the model input, for the built-in v3 (``encoders.fusion.TextureFusion``).

Why: a woman's tissue type (fatty, glandular, dense) is a texture more than a brightness, and classical
texture statistics rank it about as well as our finetuned network does on women it never saw (README,
"The built-in encoders"): rotation-invariant uniform local binary patterns at four radii (a square-ring
variant: the 8 neighbours at the ring's corners and mid-sides, not interpolated on a circle) and the
distribution of local standard deviation at three window sizes, counted over the breast (pixels brighter
than the background). Plain tensor operations (comparisons, box filters, a scatter-add), so the exported
ONNX model computes the same counts.
"""
from __future__ import annotations

import torch
from torch import nn

LBP_RADII = (1, 2, 4, 8)
LBP_CODES = 10                  # rotation-invariant uniform codes of 8 neighbours: 0..8 ones, 9 = not uniform
STD_WINDOWS = (3, 7, 15)
STD_BINS, STD_RANGE = 16, 40.0  # local standard deviation in grey levels, bins of 2.5 over [0, 40)
BREAST_LEVEL = 20.0             # pixels above this grey level count (the background is near 0 after CLAHE)
TEXTURE_DIM = len(LBP_RADII) * LBP_CODES + len(STD_WINDOWS) * STD_BINS


def weighted_histogram(index: torch.Tensor, weight: torch.Tensor, bins: int) -> torch.Tensor:
    """(N, P) bin indices and (N, P) weights -> (N, bins) weighted counts as fractions of the total weight
    (all zero where nothing counted)."""
    counts = torch.zeros(index.shape[0], bins, dtype=torch.float32, device=index.device)
    counts = counts.scatter_add(1, index.flatten(1).to(torch.int64).clamp(0, bins - 1), weight.flatten(1))
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)


def _neighbour_offsets(radius: int) -> list[tuple[int, int]]:
    """The 8 neighbours at ``radius`` pixels (square ring), in circular order."""
    r = radius
    return [(-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r)]


def breast_pixels(levels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) grey levels -> the (N, H, W) boolean mask of the pixels the texture counts."""
    return levels > BREAST_LEVEL


def lbp_histograms(levels: torch.Tensor, radii: tuple[int, ...] = LBP_RADII,
                   breast: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H, W) grey levels -> (N, len(radii) * 10) histograms of rotation-invariant uniform LBP codes
    (the number of neighbours at least as bright as the centre when the ring has at most two 0/1
    transitions, else 9), over breast pixels (``breast_pixels`` unless a mask is given) whose ring lies
    inside the picture."""
    height, width = levels.shape[-2:]
    breast = breast_pixels(levels) if breast is None else breast
    out = []
    for r in radii:
        centre = levels[:, r:height - r, r:width - r]
        bits = [(levels[:, r + dy:height - r + dy, r + dx:width - r + dx] >= centre).to(torch.float32)
                for dy, dx in _neighbour_offsets(r)]
        ones = torch.stack(bits).sum(dim=0)
        transitions = torch.stack([(bits[k] - bits[(k + 1) % 8]).abs() for k in range(8)]).sum(dim=0)
        code = torch.where(transitions <= 2, ones, torch.full_like(ones, LBP_CODES - 1))
        out.append(weighted_histogram(code, breast[:, r:height - r, r:width - r].to(torch.float32), LBP_CODES))
    return torch.cat(out, dim=1)


def local_std_histograms(levels: torch.Tensor, windows: tuple[int, ...] = STD_WINDOWS,
                         breast: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H, W) grey levels -> (N, len(windows) * 16) histograms of the standard deviation in a square
    window (borders mirrored) around each breast pixel (``breast_pixels`` unless a mask is given), over
    [0, 40) grey levels."""
    image = levels[:, None].to(torch.float32)
    breast = breast_pixels(levels) if breast is None else breast
    out = []
    for k in windows:
        padded = nn.functional.pad(image, (k // 2,) * 4, mode="reflect")
        mean = nn.functional.avg_pool2d(padded, k, stride=1)
        square = nn.functional.avg_pool2d(padded * padded, k, stride=1)
        std = (square - mean * mean).clamp_min(0.0).sqrt()[:, 0]
        counted = (breast & (std < STD_RANGE)).to(torch.float32)
        out.append(weighted_histogram(torch.floor(std * (STD_BINS / STD_RANGE)), counted, STD_BINS))
    return torch.cat(out, dim=1)


def texture_features(levels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) grey levels 0..255 -> (N, TEXTURE_DIM) texture descriptor: LBP then local std."""
    return torch.cat([lbp_histograms(levels), local_std_histograms(levels)], dim=1)
