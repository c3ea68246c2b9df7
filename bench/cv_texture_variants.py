"""Levers on v3's texture part that did not move tissue precision@10: measured out of fold, without the
held-out women.

    .venv/bin/python bench/cv_texture_variants.py --mias ../shared/data/mias --out bench/results/builtins/cv_texture_variants.json

Why: #15's second goal (tissue P@10 >= 0.60 on held-out women) is not met by v3 (0.512 on ours), and its
texture statistics alone rank tissue about as well as v3 does. This measures, on the same 4 folds by
woman of the 71 women v1 did not hold out (``bench/cv_builtin.py``), every descriptor standardised on the
training folds and ranked among the fold's own images (``pooled_scores``: same-woman images never count
as tissue hits), whether any cheap change to that part lifts it:

- the breast's own intensity distribution (density: a histogram, cumulative distribution or percentiles
  of the pixels above the background, also after a Gaussian blur), alone and beside the texture;
- where the texture is counted: the breast eroded (away from the skin line), the top rows or the
  chest-wall corner left out (the pectoral muscle of these MLO views, after side canonicalisation);
- more LBP radii and local-deviation windows;
- pictures of 256 px (``--size``, repeatable, for others) instead of 128, radii and windows as at 128
  and scaled;
- query expansion with database-side augmentation: every image of the fold, query and gallery alike,
  replaced by the weighted mean of itself and its k nearest (weights: the similarity to the power alpha);
- PCA whitening of the standardised texture, fit on the training folds (a known lift in instance
  retrieval), with and without shrinkage of the smallest variances, and PCA alone;
- oriented texture, which rotation-invariant patterns ignore (a fatty breast's ligaments are lines, dense
  tissue is blobs): Gabor energy at wavelengths 4, 8 and 16 px over 4 orientations (its level and its
  anisotropy) and the structure tensor's coherence and energy at scales 1, 2 and 4 px, as histograms over
  the breast, alone and beside the texture;
- the levers with a gain clear of zero, together (more radii and windows, the breast eroded by 2 px,
  query expansion).

No network is trained; nothing here reads the held-out women.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_builtin_v2 import read_mias  # noqa: E402
from cv_builtin import (add_recipe_arguments, folds_by_woman, pooled_figures, pooled_scores,  # noqa: E402
                        training_data)
from cv_texture import standardised  # noqa: E402

from mammo_retrieval.analysis.evaluate import RankedLists, l2_rows  # noqa: E402
from mammo_retrieval.encoders.texture import (LBP_RADII, STD_WINDOWS, breast_pixels, lbp_histograms,  # noqa: E402
                                              local_std_histograms)

BLUR_SIGMA = 4.0
DENSITY_WEIGHTS = (0.3, 0.5, 1.0)
EXPANSIONS = ((1, 1.0), (3, 1.0), (3, 3.0), (5, 3.0), (8, 3.0))  # (k nearest, alpha)


class Pictures(NamedTuple):
    labels: object            # the labels table of the 200 images
    folds: list               # (training rows, held rows) of the 4 folds by woman
    pictures: np.ndarray      # (N, 128, 128) uint8, as v3's texture reads them
    levels: torch.Tensor      # the same as float
    grey: torch.Tensor        # the model inputs, 0..1
    counts: np.ndarray        # the 64-bin histograms


def training_pictures(mias: Path) -> Pictures:
    """The training women's folds and their pictures as v3's texture reads them."""
    labels, _, rows, _, grey, counts = training_data(mias)
    pictures = (grey[:, 0].numpy() * 255.0 + 0.5).astype(np.uint8)
    return Pictures(labels, folds_by_woman(labels, rows), pictures, torch.from_numpy(pictures).float(), grey,
                    counts)


def texture(levels: torch.Tensor, breast: torch.Tensor | None = None, radii=LBP_RADII, windows=STD_WINDOWS) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([lbp_histograms(levels, radii, breast), local_std_histograms(levels, windows, breast)],
                         dim=1).numpy()


def eroded(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """The mask shrunk by ``radius`` pixels (a min filter)."""
    m = mask[:, None].float()
    return (-torch.nn.functional.max_pool2d(-m, 2 * radius + 1, 1, radius))[:, 0] > 0.5


def pca(features: np.ndarray, fit_rows: np.ndarray, dims: int, shrink: float | None) -> np.ndarray:
    """The standardised ``features`` on the training rows' first ``dims`` principal axes, whitened
    (each axis divided by the square root of its variance plus ``shrink`` times the largest) unless
    ``shrink`` is None."""
    z = standardised(features, fit_rows)
    mean = z[fit_rows].mean(axis=0)
    _, singular, axes = np.linalg.svd(z[fit_rows] - mean, full_matrices=False)
    projected = (z - mean) @ axes[:dims].T
    if shrink is None:
        return projected
    variance = singular ** 2 / len(fit_rows)
    return projected / np.sqrt(variance[:dims] + shrink * variance[0])


def _breast_histogram(values: np.ndarray, mask: np.ndarray, bins: int, low: float, high: float) -> np.ndarray:
    counts = np.histogram(np.clip(values[mask], low, high), bins=bins, range=(low, high))[0].astype(np.float64)
    return counts / max(1.0, counts.sum())


def coherence(picture: np.ndarray, breast: np.ndarray) -> np.ndarray:
    """Histograms of the structure tensor's coherence (how line-like) and log energy at 3 scales."""
    import cv2
    f = picture.astype(np.float32)
    gx, gy = cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)
    out = []
    for sigma in (1.0, 2.0, 4.0):
        jxx, jyy, jxy = (cv2.GaussianBlur(g, (0, 0), sigma) for g in (gx * gx, gy * gy, gx * gy))
        trace = jxx + jyy
        out += [_breast_histogram(np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (trace + 1e-3), breast, 10, 0, 1),
                _breast_histogram(np.log1p(trace), breast, 10, 0, 12)]
    return np.concatenate(out)


def gabor(picture: np.ndarray, breast: np.ndarray) -> np.ndarray:
    """Histograms of Gabor energy (summed over 4 orientations) and of its anisotropy, at 3 wavelengths."""
    import cv2
    f = picture.astype(np.float32) / 255.0
    out = []
    for wavelength in (4.0, 8.0, 16.0):
        energies = []
        for theta in np.arange(4) * np.pi / 4:
            even = cv2.getGaborKernel((0, 0), 0.56 * wavelength, theta, wavelength, 0.5, 0)
            odd = cv2.getGaborKernel((0, 0), 0.56 * wavelength, theta, wavelength, 0.5, np.pi / 2)
            energies.append(np.hypot(cv2.filter2D(f, -1, even - even.mean()), cv2.filter2D(f, -1, odd)))
        e = np.stack(energies)
        total = e.sum(axis=0)
        out += [_breast_histogram(np.log1p(total * 10), breast, 10, 0, 4),
                _breast_histogram((e.max(axis=0) - e.min(axis=0)) / (total + 1e-6), breast, 10, 0, 1)]
    return np.concatenate(out)


def density(pictures: np.ndarray) -> dict[str, np.ndarray]:
    """The breast's own intensity distribution (pixels above the background), as four descriptors."""
    import cv2
    blurred = np.stack([cv2.GaussianBlur(p.astype(np.float32), (0, 0), BLUR_SIGMA) for p in pictures])
    breast = breast_pixels(torch.from_numpy(pictures).float()).numpy()

    def histograms(images):
        out = [np.histogram(p[m], bins=32, range=(20, 256))[0] for p, m in zip(images, breast)]
        return np.array([h / max(1, h.sum()) for h in out])
    percentiles = np.array([np.percentile(p[m], np.arange(5, 100, 5)) for p, m in zip(pictures, breast)])
    return {"breast histogram": histograms(pictures), "breast cumulative": np.cumsum(histograms(pictures), 1),
            "breast percentiles": percentiles, f"blurred (sigma {BLUR_SIGMA}) breast histogram": histograms(blurred)}


def expanded(vectors: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """Each unit row replaced by the similarity**alpha-weighted mean of itself and its k nearest rows."""
    x = l2_rows(vectors)
    similarity = x @ x.T
    nearest = np.argsort(-similarity, axis=1)[:, :k + 1]
    weights = np.take_along_axis(similarity, nearest, 1).clip(0) ** alpha
    return l2_rows(np.einsum("nk,nkd->nd", weights, x[nearest]))


def tissue_precision_per_query(vectors: np.ndarray, labels, rows: np.ndarray) -> np.ndarray:
    """Each of ``rows``' tissue precision@10 among ``rows``, same-woman images excluded (as
    ``retrieval_metrics`` counts it, one value per query)."""
    ranked = RankedLists.build(l2_rows(vectors[rows]))
    patients = labels.PatientID.to_numpy(object)[rows]
    tissue = labels.tissue.to_numpy(object)[rows]
    out = []
    for q in range(len(rows)):
        others = ranked.order[q][patients[ranked.order[q]] != patients[q]]
        out.append((tissue[others[:10]] == tissue[q]).mean())
    return np.array(out)


def scored(vectors_for, folds, labels, expansion: tuple[int, float] | None = None) -> tuple[dict, np.ndarray]:
    """Pooled out-of-fold contralateral@5 and tissue P@10, and the per-query tissue P@10 (queries in fold
    order); ``vectors_for(fit_rows)`` makes each fold's space."""
    totals, per_query = np.zeros(3), []
    for fit_rows, held_rows in folds:
        vectors = vectors_for(fit_rows)
        if expansion:
            vectors = vectors.copy()
            vectors[held_rows] = expanded(vectors[held_rows], *expansion)
        totals += pooled_scores(vectors, labels, held_rows)
        per_query.append(tissue_precision_per_query(vectors, labels, held_rows))
    if not np.isclose(np.concatenate(per_query).sum(), totals[1]):  # the two counts must be one rule
        raise RuntimeError("per-query tissue precision disagrees with pooled_scores")
    return pooled_figures(totals), np.concatenate(per_query)


def paired_interval(gain: np.ndarray, women: np.ndarray, draws: int = 2000) -> list[float]:
    """95% bootstrap interval (women resampled, seeded) of the mean per-query gain."""
    names, index = np.unique(women, return_inverse=True)
    sums, counts = np.bincount(index, gain), np.bincount(index)
    generator = np.random.default_rng(0)
    picks = generator.integers(0, len(names), size=(draws, len(names)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    return [round(float(v), 4) for v in np.percentile(means, [2.5, 97.5])]


class Measurements:
    """Every variant's pooled figures, and its tissue P@10 gain over the first one measured (v3's texture
    unless named otherwise) with a paired interval."""

    def __init__(self, folds, labels, baseline_name: str = "v3's texture") -> None:
        self.folds, self.labels, self.summary, self.baseline_name = folds, labels, {}, baseline_name
        self.women = np.concatenate([labels.PatientID.to_numpy(object)[held] for _, held in folds])
        self.baseline: np.ndarray | None = None

    def measure(self, name: str, vectors_for, **kw) -> None:
        figures, per_query = scored(vectors_for, self.folds, self.labels, **kw)
        if self.baseline is None:
            self.baseline = per_query
        else:
            gain = per_query - self.baseline
            figures[f"tissue P@10 gain over {self.baseline_name}"] = round(float(gain.mean()), 4)
            figures["gain, 95% interval (women resampled)"] = paired_interval(gain, self.women)
        self.summary[name] = figures
        print(f"{name}: {figures}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON summary")
    parser.add_argument("--size", type=int, action="append", default=None,
                        help="a larger picture size to measure besides 128 (repeatable; default 256)")
    add_recipe_arguments(parser)
    args = parser.parse_args()
    started = time.time()
    labels, folds, pictures, levels, _, _ = training_pictures(args.mias)
    base = texture(levels)
    runs = Measurements(folds, labels)
    runs.measure("v3's texture (128 px)", lambda fit: standardised(base, fit))
    for name, features in density(pictures).items():
        runs.measure(f"{name} alone", lambda fit: standardised(features, fit))
        for w in DENSITY_WEIGHTS:
            runs.measure(f"texture + {w} x {name}",
                         lambda fit: np.hstack([standardised(base, fit), w * standardised(features, fit)]))
    breast = breast_pixels(levels)
    rows_idx = torch.arange(128)[:, None].expand(128, 128)
    cols_idx = torch.arange(128)[None, :].expand(128, 128)
    masks = {f"breast eroded by {r} px": eroded(breast, r) for r in (2, 4, 8)}
    masks["top 35% of rows left out"] = breast & (rows_idx >= 45)[None]
    masks["chest-wall top corner left out (x - y > 0.5 x 128)"] = breast & ~((cols_idx - rows_idx) > 64)[None]
    for name, mask in masks.items():
        features = texture(levels, mask)
        runs.measure(f"texture, {name}", lambda fit: standardised(features, fit))
    wider = texture(levels, None, (1, 2, 3, 4, 6, 8, 12), (3, 5, 7, 11, 15, 21, 31))
    runs.measure("texture, radii 1-12 and windows 3-31 (7 each)", lambda fit: standardised(wider, fit))
    for size in args.size or [256]:
        _, larger = read_mias(args.mias, size)
        larger = torch.from_numpy(larger).float()
        scale = size // 128
        for radii, windows, how in ((LBP_RADII, STD_WINDOWS, "128 px's radii and windows"),
                                    (tuple(r * scale for r in LBP_RADII),
                                     tuple(w * scale + (w * scale + 1) % 2 for w in STD_WINDOWS), "scaled")):
            features = texture(larger, None, radii, windows)
            runs.measure(f"texture at {size} px, {how}", lambda fit: standardised(features, fit))
    for k, alpha in EXPANSIONS:
        runs.measure(f"v3's texture, query expansion k {k} alpha {alpha}",
                     lambda fit: standardised(base, fit), expansion=(k, alpha))
    for dims in (16, 32, 64, base.shape[1]):
        for shrink in (0.0, 0.01, 0.1):
            runs.measure(f"v3's texture, PCA-whitened to {dims} dims, shrinkage {shrink}",
                         lambda fit: pca(base, fit, dims, shrink))
        runs.measure(f"v3's texture, PCA to {dims} dims (not whitened)", lambda fit: pca(base, fit, dims, None))
    masks_np = breast.numpy()
    oriented = {"structure-tensor coherence": np.stack([coherence(p, m) for p, m in zip(pictures, masks_np)]),
                "Gabor energy": np.stack([gabor(p, m) for p, m in zip(pictures, masks_np)])}
    for name, features in oriented.items():
        runs.measure(f"{name} alone", lambda fit: standardised(features, fit))
        for w in (0.5, 1.0):
            runs.measure(f"texture + {w} x {name}",
                         lambda fit: np.hstack([standardised(base, fit), w * standardised(features, fit)]))
    together = texture(levels, eroded(breast, 2), (1, 2, 3, 4, 6, 8, 12), (3, 5, 7, 11, 15, 21, 31))
    runs.measure("texture, radii 1-12 and windows 3-31, breast eroded by 2 px",
                 lambda fit: standardised(together, fit))
    runs.measure("texture, radii 1-12 and windows 3-31, breast eroded by 2 px, query expansion k 5 alpha 3.0",
                 lambda fit: standardised(together, fit), expansion=(5, 3.0))
    runs.summary["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(runs.summary, indent=1))


if __name__ == "__main__":
    main()
