"""SimCLR network in PRIMER's layout: ``encoder.encoder.*`` is the timm backbone, then a projection head
(dim -> 512 -> 128, BatchNorm + ReLU) used only for training. A PRIMER checkpoint loads into it, and the
checkpoints it writes load wherever a PRIMER checkpoint does."""
from __future__ import annotations

import torch
from torch import nn


class BackboneWrapper(nn.Module):
    """PRIMER's RadImageNetEncoder: holds the timm model as ``.encoder``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.encoder = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a fused encoder (encoders.fusion) trains its network only; its histogram has nothing to learn
        learned = getattr(self.encoder, "learned", None)
        return learned(x) if callable(learned) else self.encoder(x)


class SimCLRModel(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int = 512, projection_dim: int = 128) -> None:
        super().__init__()
        self.encoder = BackboneWrapper(backbone)
        self.projection_head = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.encoder(x))
