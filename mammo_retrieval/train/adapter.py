"""Training a label adapter on stored vectors (what MedImageInsight's examples do with a small adapter).

The encoder stays frozen: its vectors, already in the catalog, are the inputs, so training takes seconds
on a CPU. Women are split by a stable hash, so that none is both trained on and measured; the loss is the
supervised contrastive loss (Khosla et al. 2020) of each label column, averaged. Held-out precision@10 and
mAP are measured before (the base vectors) and after (the adapted ones) on the held-out women only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mammo_retrieval.analysis.evaluate import RankedLists, l2_rows, retrieval_metrics
from mammo_retrieval.analysis.labels import LabelsError
from mammo_retrieval.core.errors import ConfigError
from mammo_retrieval.encoders.adapter import KINDS, Projection
from mammo_retrieval.train.trainer import patient_fraction


@dataclass(frozen=True)
class AdaptConfig:
    kind: str = "linear"
    out_dim: int = 128
    hidden: int = 512
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    heldout_fraction: float = 0.2
    seed: int = 0


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon over one label column; ``labels`` < 0 marks a missing label (neither anchor nor positive).
    Each anchor's positives are the other images with its label; every other image is in the denominator."""
    n = z.shape[0]
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(n, dtype=torch.bool)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    known = labels >= 0
    positives = (labels[:, None] == labels[None, :]) & known[:, None] & known[None, :] & ~self_mask
    counts = positives.sum(dim=1)
    anchors = counts > 0
    if not anchors.any():
        return z.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(dim=1)[anchors] / counts[anchors])
    return per_anchor.mean()


def _codes(values: np.ndarray) -> np.ndarray:
    """Label strings -> integer codes, -1 for missing."""
    out = np.full(len(values), -1, dtype=np.int64)
    present = np.array([v is not None and v == v and str(v) != "" for v in values])
    _, codes = np.unique(np.asarray(values[present], dtype=str), return_inverse=True)
    out[present] = codes
    return out


def _heldout_metrics(vectors: np.ndarray, labels: dict[str, np.ndarray], patients: np.ndarray) -> dict:
    ranked = RankedLists.build(l2_rows(vectors))
    out = {}
    for column, values in labels.items():
        m = retrieval_metrics(ranked, values, patients, [10])
        out[column] = {"precision@10": round(m["precision@10"], 4), "mAP": round(m["mAP"], 4), "queries": m["queries"]}
    return out


def fit_projection(x: np.ndarray, codes: list[np.ndarray], cfg: AdaptConfig,
                   weights: Sequence[float] | None = None) -> tuple[Projection, list[float]]:
    """A projection trained on every row of ``x``: one supervised contrastive term per label column
    (integer codes, < 0 for missing), averaged, or summed with ``weights``. Returns it in eval mode, with the
    loss of each epoch. Its own function so that experiments (bench/) train exactly what `adapt` trains."""
    torch.manual_seed(cfg.seed)
    projection = Projection(cfg.kind, x.shape[1], cfg.out_dim, cfg.hidden)
    optimiser = torch.optim.AdamW(projection.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    targets = [torch.from_numpy(c) for c in codes]
    losses = []
    projection.train()
    for _ in range(cfg.epochs):
        optimiser.zero_grad()
        z = projection(inputs)
        terms = [supervised_contrastive(z, t, cfg.temperature) for t in targets]
        loss = torch.stack(terms).mean() if weights is None else sum(w * t for w, t in zip(weights, terms))
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return projection.eval(), losses


def train_adapter(vectors: np.ndarray, labels: dict[str, np.ndarray], patients: np.ndarray,
                  cfg: AdaptConfig) -> tuple[Projection, dict]:
    """A projection trained on the women outside the held-out fraction; the report holds the split and
    the held-out metrics before and after."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"adapter kind {cfg.kind!r} is not one of {', '.join(KINDS)}")
    if not labels:
        raise ConfigError("an adapter needs at least one --label-column")
    fractions = np.array([patient_fraction(str(p), cfg.seed) for p in patients])
    held = fractions < cfg.heldout_fraction
    train = ~held
    if len(set(patients[held])) < 2 or train.sum() < 4:
        raise LabelsError(f"{int(train.sum())} labelled training images and {len(set(patients[held]))} held-out "
                          f"women: too few to train and measure an adapter (at least 4 and 2)",
                          hint="label more images, or change --heldout-fraction")
    projection, losses = fit_projection(vectors[train], [_codes(values[train]) for values in labels.values()], cfg)
    with torch.inference_mode():
        adapted = projection(torch.from_numpy(np.ascontiguousarray(vectors[held], dtype=np.float32))).numpy()
    held_labels = {c: v[held] for c, v in labels.items()}
    report = {
        "train_images": int(train.sum()), "heldout_images": int(held.sum()),
        "train_patients": int(len(set(patients[train]))), "heldout_patients": sorted(set(map(str, patients[held]))),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "before": _heldout_metrics(vectors[held], held_labels, patients[held]),
        "after": _heldout_metrics(adapted, held_labels, patients[held]),
    }
    return projection, report
