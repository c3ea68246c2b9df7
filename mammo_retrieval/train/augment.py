"""The card's training augmentations as batched tensor operations on the training device.

One affine warp per image composes the flips, the rotation (+-15 deg, p=0.5) and shift-scale-rotate
(shift 0.1, scale 0.1, rotate 15 deg, p=0.5); then brightness/contrast (+-0.2, p=0.5). Areas moved in
from outside the image are black, like a mammogram's background.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    hflip_p: float = 0.5
    vflip_p: float = 0.3
    rotate_p: float = 0.5
    rotate_deg: float = 15.0
    ssr_p: float = 0.5
    shift: float = 0.1
    scale: float = 0.1
    ssr_rotate_deg: float = 15.0
    brightness_contrast_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def _chance(n: int, p: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def augment(images: torch.Tensor, cfg: AugmentConfig = AugmentConfig(),
            generator: torch.Generator | None = None) -> torch.Tensor:
    """float (N, 1, H, W) in [0, 1] -> augmented float (N, 1, H, W) in [0, 1], on the same device."""
    n, device = images.shape[0], images.device
    flip_x = torch.where(_chance(n, cfg.hflip_p, generator, device), -1.0, 1.0)
    flip_y = torch.where(_chance(n, cfg.vflip_p, generator, device), -1.0, 1.0)
    angle = torch.zeros(n, device=device)
    angle += torch.where(_chance(n, cfg.rotate_p, generator, device),
                         _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, generator, device), 0.0)
    ssr = _chance(n, cfg.ssr_p, generator, device)
    angle += torch.where(ssr, _uniform(n, -cfg.ssr_rotate_deg, cfg.ssr_rotate_deg, generator, device), 0.0)
    scale = torch.where(ssr, 1.0 + _uniform(n, -cfg.scale, cfg.scale, generator, device), 1.0)
    # normalised coordinates span 2, so a shift of 0.1 of the size is 0.2
    tx = torch.where(ssr, _uniform(n, -cfg.shift, cfg.shift, generator, device) * 2, 0.0)
    ty = torch.where(ssr, _uniform(n, -cfg.shift, cfg.shift, generator, device) * 2, 0.0)
    radians = angle * math.pi / 180
    cos, sin = torch.cos(radians) / scale, torch.sin(radians) / scale
    theta = torch.stack([torch.stack([cos * flip_x, -sin * flip_y, tx], dim=1),
                         torch.stack([sin * flip_x, cos * flip_y, ty], dim=1)], dim=1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bc = _chance(n, cfg.brightness_contrast_p, generator, device)
    alpha = torch.where(bc, 1.0 + _uniform(n, -cfg.contrast, cfg.contrast, generator, device), 1.0)
    beta = torch.where(bc, _uniform(n, -cfg.brightness, cfg.brightness, generator, device), 0.0)
    out = out * alpha.view(n, 1, 1, 1) + beta.view(n, 1, 1, 1)
    return out.clamp_(0.0, 1.0)


def to_model_input(grey: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> (N, 3, H, W) normalised, as the card's steps 5 and 8."""
    m = torch.tensor(mean, device=grey.device, dtype=grey.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=grey.device, dtype=grey.dtype).view(1, 3, 1, 1)
    return (grey.expand(-1, 3, -1, -1) - m) / s
