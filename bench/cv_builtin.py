"""Choosing the built-in's finetuning recipe by cross-validation, without the held-out women.

    .venv/bin/python bench/cv_builtin.py --mias ../shared/data/mias --out bench/results/builtins/cv

Why: v2's recipe was chosen on 13 validation women, with the 29 held-out women's figures printed beside
them (README, "The built-in encoders"). Here every choice is made on out-of-fold figures of the 71
women v1 did not hold out: they are split into 4 folds by woman; for each recipe and fold, v1's ResNet-18
is finetuned on the other three folds and the fold's images are embedded at epochs 0 (v1 as is), 20,
40, 60 and 80. The histogram's weight is then varied after the fact (its reference is the mean histogram
of the fold's training images). Each fold is ranked on its own (vectors of different folds come from
different networks), and the hits of all folds are pooled. The held-out women are not read by this
script at all.

Recipes:
- ``views``: v2's (NT-Xent between two augmented views of an image, plus 2 x supervised contrastive on
  tissue on the pooled features; the card's augmentations without brightness/contrast; AdamW 5e-4).
- ``bilateral``: the same, except that NT-Xent's positive pair is a woman's two breasts (each augmented),
  as multi-view pretraining (MaMA, CLEAR) pairs views of one woman: the network is taught directly what a
  woman's breasts share, instead of leaving it to the histogram.

Each (recipe, fold) is written to ``<out>/<recipe>-fold<k>.npz`` and skipped when present, so an
interrupted run continues; ``<out>/summary.json`` holds the pooled figures and the setting chosen
(``choose``), which ``bench/build_builtin_from_cv.py`` then trains on all 71 women.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_builtin_v2 import MEAN, STD, build_v1_backbone, read_mias, train_step  # noqa: E402

from mammo_retrieval.analysis.evaluate import RankedLists, contralateral_hit_rate, l2_rows, retrieval_metrics  # noqa: E402
from mammo_retrieval.encoders.fusion import HISTOGRAM_BINS  # noqa: E402
from mammo_retrieval.train.augment import AugmentConfig, to_model_input  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("views", "bilateral")
CHECKPOINTS = (0, 20, 40, 60, 80)
HISTOGRAM_WEIGHTS = (0.0, 0.3, 0.5, 0.7, 1.0)
FOLDS = 4


class TrainingData(NamedTuple):
    labels: pd.DataFrame        # labels.csv, one row per image
    heldout: list[str]          # the women v1 held out (never trained on or chosen by)
    rows: np.ndarray            # the other women's images
    tissue: torch.Tensor        # tissue label codes, one per image
    grey: torch.Tensor          # (N, 1, 128, 128) pictures in [0, 1], as ingest preprocesses them
    counts: np.ndarray          # (N, 64) histograms of the pictures, fractions of pixels


def training_data(mias: Path) -> TrainingData:
    """The 200 MIAS images as the recipes see them; the held-out women's rows are left out of ``rows``."""
    labels, pictures = read_mias(mias, 128)
    _, heldout = build_v1_backbone()
    rows = np.nonzero(~np.isin(labels.PatientID.to_numpy(object), heldout))[0]
    codes = {c: i for i, c in enumerate(sorted(set(labels.tissue)))}
    counts = np.stack([np.histogram(p, bins=HISTOGRAM_BINS, range=(0, 256))[0] for p in pictures]) / pictures[0].size
    return TrainingData(labels, heldout, rows, torch.tensor([codes[t] for t in labels.tissue]),
                        torch.from_numpy(pictures).float().div(255)[:, None], counts)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The finetuning's own settings, v2's by default."""
    parser.add_argument("--mias", type=Path, default=ROOT.parent / "shared" / "data" / "mias")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--supcon-weight", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=64)


def folds_by_woman(labels, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``rows`` split into FOLDS (training rows, fold rows) pairs by woman (GroupKFold), as every
    cross-validation bench here splits them."""
    from sklearn.model_selection import GroupKFold
    patients = labels.PatientID.to_numpy(object)
    women = np.unique(patients[rows])
    return [tuple(rows[np.isin(patients[rows], women[f])] for f in split)
            for split in GroupKFold(n_splits=FOLDS).split(women, groups=women)]


def pooled_scores(vectors: np.ndarray, labels, rows: np.ndarray) -> tuple[float, float, int]:
    """(contralateral hits at 5, summed tissue precision@10, queries) among ``rows``; same-woman images
    never count as tissue hits."""
    ranked = RankedLists.build(l2_rows(vectors[rows]))
    patients = labels.PatientID.to_numpy(object)[rows]
    contra = contralateral_hit_rate(ranked, patients, labels.laterality.to_numpy(object)[rows], [5])
    tissue = retrieval_metrics(ranked, labels.tissue.to_numpy(object)[rows], patients, [10])
    n = len(rows)
    return float(contra["contralateral@5"]) * n, float(tissue["precision@10"]) * n, n


def pooled_figures(totals: np.ndarray) -> dict:
    """Summed ``pooled_scores`` over folds as the pooled rates, rounded as every cv_* JSON stores them."""
    return {"contralateral@5": round(float(totals[0] / totals[2]), 4),
            "tissue P@10": round(float(totals[1] / totals[2]), 4)}


def finetune(recipe: str, grey: torch.Tensor, tissue: torch.Tensor, labels, train_rows: np.ndarray, args,
             epochs: int, at_checkpoint) -> None:
    """Finetune v1's ResNet-18 on ``train_rows`` with ``recipe`` for ``epochs``, calling
    ``at_checkpoint(epoch, backbone)`` (in eval mode) at each epoch of CHECKPOINTS up to ``epochs``."""
    torch.manual_seed(0)
    backbone, _ = build_v1_backbone()
    head = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 128))
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-5)
    augmentation = AugmentConfig(brightness_contrast_p=0.0)
    generator = torch.Generator().manual_seed(0)
    patients = labels.PatientID.to_numpy(object)
    sides = labels.laterality.to_numpy(object)
    women = sorted(set(patients[train_rows]))
    pair_of = {w: (np.nonzero((patients == w) & (sides == "R"))[0][0],
                   np.nonzero((patients == w) & (sides == "L"))[0][0]) for w in women}
    for epoch in range(epochs + 1):
        if epoch in CHECKPOINTS or epoch == epochs:
            backbone.eval()
            at_checkpoint(epoch, backbone)
        if epoch == epochs:
            break
        backbone.train()
        head.train()
        rng = np.random.default_rng(epoch)
        if recipe == "views":
            order = rng.permutation(train_rows)
            batches = [(b, b) for b in (order[s:s + args.batch_size] for s in range(0, len(order), args.batch_size))]
        else:
            order = rng.permutation(len(women))
            half = args.batch_size // 2
            batches = []
            for s in range(0, len(order), half):
                chosen = [pair_of[women[i]] for i in order[s:s + half]]
                batches.append((np.array([r for r, _ in chosen]), np.array([left for _, left in chosen])))
        for pair in batches:
            if len(pair[0]) >= 4:
                train_step(backbone, head, optimizer, grey, tissue, pair, augmentation, generator, args.supcon_weight)


def finetune_fold(recipe: str, grey: torch.Tensor, tissue: torch.Tensor, labels, train_rows: np.ndarray,
                  embed_rows: np.ndarray, args) -> dict[int, np.ndarray]:
    """The 512-d features of ``embed_rows`` at each checkpoint of a finetuning on ``train_rows``."""
    out = {}

    def embed(epoch: int, backbone: torch.nn.Module) -> None:
        with torch.inference_mode():
            out[epoch] = backbone(to_model_input(grey[embed_rows], MEAN, STD)).numpy()

    finetune(recipe, grey, tissue, labels, train_rows, args, max(CHECKPOINTS), embed)
    return out


def summarise(out: Path, labels, counts: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Pooled out-of-fold contralateral@5 and tissue P@10 per recipe, epoch and histogram weight."""
    summary: dict = {"histogram alone": None, "recipes": {}}
    hist_totals = np.zeros(3)
    for fit_rows, held_rows in folds:
        centred = l2_rows(counts - counts[fit_rows].mean(axis=0))
        hist_totals += pooled_scores(centred, labels, held_rows)
    summary["histogram alone"] = pooled_figures(hist_totals) | {"queries": int(hist_totals[2])}
    for recipe in RECIPES:
        files = [out / f"{recipe}-fold{k}.npz" for k in range(len(folds))]
        if not all(f.exists() for f in files):
            continue
        stored = [np.load(f) for f in files]
        table = {}
        for epoch in CHECKPOINTS:
            for weight in HISTOGRAM_WEIGHTS:
                totals = np.zeros(3)
                for (fit_rows, held_rows), data in zip(folds, stored):
                    learned = np.zeros((len(counts), 512), np.float32)
                    learned[held_rows] = data[f"epoch{epoch}"]
                    centred = l2_rows(counts - counts[fit_rows].mean(axis=0))
                    fused = np.hstack([l2_rows(learned), weight * centred])
                    totals += pooled_scores(fused, labels, held_rows)
                table[f"epoch {epoch}, histogram {weight}"] = pooled_figures(totals)
        summary["recipes"][recipe] = table
    summary["choice"] = choose(summary)
    return summary


def choose(summary: dict) -> dict | None:
    """The rule v2's epoch was chosen by, applied to the out-of-fold figures: the largest contralateral@5 +
    tissue P@10 among the settings whose contralateral@5 is above the histogram's. Epoch 0 (v1's network
    unchanged) is a reference, not a candidate."""
    floor = summary["histogram alone"]["contralateral@5"]
    candidates = [(m["contralateral@5"] + m["tissue P@10"], recipe, key, m)
                  for recipe, table in summary["recipes"].items() for key, m in table.items()
                  if not key.startswith("epoch 0,") and m["contralateral@5"] > floor]
    if not candidates:
        return None
    _, recipe, key, measured = max(candidates, key=lambda c: c[0])
    return {"recipe": recipe, "setting": key, **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    add_recipe_arguments(parser)
    args = parser.parse_args()
    labels, heldout, rows, tissue, grey, counts = training_data(args.mias)
    patients = labels.PatientID.to_numpy(object)
    women = np.unique(patients[rows])  # the held-out women are never touched
    folds = folds_by_woman(labels, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{len(women)} women, {len(rows)} images in {FOLDS} folds; "
          f"{len(set(heldout) & set(patients))} held-out MIAS women untouched")
    for recipe in args.recipes:
        for k, (fit_rows, held_rows) in enumerate(folds):
            target = args.out / f"{recipe}-fold{k}.npz"
            if target.exists():
                continue
            started = time.time()
            vectors = finetune_fold(recipe, grey, tissue, labels, fit_rows, held_rows, args)
            partial = target.with_suffix(".partial.npz")
            np.savez(partial, **{f"epoch{e}": v for e, v in vectors.items()}, rows=held_rows)
            partial.replace(target)
            print(f"{recipe} fold {k}: {time.time() - started:.0f} s", flush=True)
    summary = summarise(args.out, labels, counts, folds)
    summary["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("histogram alone", json.dumps(summary["histogram alone"]))
    print("chosen", json.dumps(summary["choice"]))
    for recipe, table in summary["recipes"].items():
        for key, value in table.items():
            print(recipe, key, value)


if __name__ == "__main__":
    main()
