"""Would a tissue adapter fused with the histogram meet both of #15's goals? Cross-validated, without the
held-out women.

    .venv/bin/python bench/cv_adapter_fusion.py --mias ../shared/data/mias --out DIR

Why: a tissue adapter on v2 lifts tissue precision@10 (README: 0.474 -> 0.571 on the held-out women) but
loses the woman's other breast (0.828 -> 0.414), while the histogram finds her other breast best. A
woman's two breasts share her tissue type, so an adapter's tissue space and the histogram need not pull
against each other: the fused vector may keep both. This measures it out of fold, as
``bench/cv_builtin.py`` measured v2's recipe: the 71 women v1 did not hold out, 4 folds by woman; for
each fold v2's recipe (finetuning v1 on the other three folds) is run again and *every* image of the 71
women is embedded at epochs 0, 20, 40 and 60 (cv_builtin kept only the fold's own images, and an adapter
needs the training folds' vectors); an adapter is trained on the training folds' vectors and tissue
labels only (and, for the joint adapters, a second term whose positive is the woman's other breast), then
the fold's images are ranked in [adapter, weight x centred histogram] (and with the backbone's own unit
vector beside them). The held-out women are not read.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_builtin_v2 import MEAN, STD  # noqa: E402
from cv_builtin import (FOLDS, add_recipe_arguments, finetune, folds_by_woman, pooled_figures, pooled_scores,  # noqa: E402
                        training_data)

from mammo_retrieval.analysis.evaluate import l2_rows  # noqa: E402
from mammo_retrieval.encoders.adapter import Projection  # noqa: E402
from mammo_retrieval.train.adapter import AdaptConfig, fit_projection  # noqa: E402
from mammo_retrieval.train.augment import to_model_input  # noqa: E402

EPOCHS = (0, 20, 40, 60)
HISTOGRAM_WEIGHTS = (0.0, 0.3, 0.5, 0.7, 1.0)
BACKBONE_WEIGHTS = (0.0, 0.5, 1.0)
# name: (kind, output dimension, hidden units, weight of a second SupCon term whose label is the woman)
ADAPTERS = {"linear-32": ("linear", 32, 0, 0.0), "linear-128": ("linear", 128, 0, 0.0), "mlp-32": ("mlp", 32, 256, 0.0),
            "linear-32 + woman x2": ("linear", 32, 0, 2.0), "linear-128 + woman x1": ("linear", 128, 0, 1.0),
            "linear-128 + woman x2": ("linear", 128, 0, 2.0)}


def embed_all(grey, tissue, labels, fit_rows, all_rows, args) -> dict[int, np.ndarray]:
    out = {}

    def embed(epoch: int, backbone: torch.nn.Module) -> None:
        if epoch in EPOCHS:
            with torch.inference_mode():
                out[epoch] = backbone(to_model_input(grey[all_rows], MEAN, STD)).numpy()

    finetune("views", grey, tissue, labels, fit_rows, args, max(EPOCHS), embed)
    return out


def write_fold_vectors(out: Path, folds, grey, tissue, labels, rows: np.ndarray, args) -> None:
    """``out/fold<k>.npz``: every row's features at each epoch of EPOCHS, finetuned on fold k's training
    rows; folds already written are kept (an interrupted run continues)."""
    out.mkdir(parents=True, exist_ok=True)
    for k, (fit_rows, _) in enumerate(folds):
        target = out / f"fold{k}.npz"
        if target.exists():
            continue
        started = time.time()
        vectors = embed_all(grey, tissue, labels, fit_rows, rows, args)
        partial = out / f"fold{k}.partial.npz"
        np.savez(partial, **{f"epoch{e}": v for e, v in vectors.items()}, rows=rows)
        partial.replace(target)
        print(f"fold {k}: {time.time() - started:.0f} s", flush=True)


def train_projection(x: np.ndarray, codes: np.ndarray, women: np.ndarray, kind: str, out_dim: int, hidden: int,
                     woman_weight: float) -> Projection:
    """The product's adapter training (``fit_projection``, ``mretrieve adapt``'s defaults otherwise) on every
    given vector; with ``woman_weight``, plus that times a SupCon whose positive is the woman's other
    breast, so that the adapter keeps what finds her (a joint adapter)."""
    cfg = AdaptConfig(kind=kind, out_dim=out_dim, hidden=hidden)
    if not woman_weight:
        return fit_projection(x, [codes], cfg)[0]
    return fit_projection(x, [codes, women], cfg, weights=(1.0, woman_weight))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    add_recipe_arguments(parser)
    args = parser.parse_args()
    labels, _, rows, tissue, grey, counts = training_data(args.mias)
    patients = labels.PatientID.to_numpy(object)
    folds = folds_by_woman(labels, rows)
    write_fold_vectors(args.out, folds, grey, tissue, labels, rows, args)
    codes = tissue.numpy()
    woman_codes = np.unique(patients, return_inverse=True)[1].astype(np.int64)
    position = {r: i for i, r in enumerate(rows)}
    table = {}
    stored = [np.load(args.out / f"fold{k}.npz") for k in range(FOLDS)]
    for epoch in EPOCHS:
        for name, (kind, out_dim, hidden, woman_weight) in ADAPTERS.items():
            adapted = []
            for (fit_rows, held_rows), data in zip(folds, stored):
                features = data[f"epoch{epoch}"]
                fit_i, held_i = [position[r] for r in fit_rows], [position[r] for r in held_rows]
                projection = train_projection(features[fit_i], codes[fit_rows], woman_codes[fit_rows], kind,
                                              out_dim, hidden, woman_weight)
                with torch.inference_mode():
                    adapted.append(projection(torch.from_numpy(features[held_i])).numpy())
            for bw in BACKBONE_WEIGHTS:
                for hw in HISTOGRAM_WEIGHTS:
                    totals = np.zeros(3)
                    for (fit_rows, held_rows), data, z in zip(folds, stored, adapted):
                        features = data[f"epoch{epoch}"][[position[r] for r in held_rows]]
                        fused = np.zeros((len(counts), z.shape[1] + features.shape[1] + counts.shape[1]), np.float32)
                        centred = l2_rows(counts[held_rows] - counts[fit_rows].mean(axis=0))
                        fused[held_rows] = np.hstack([z, bw * l2_rows(features), hw * centred])
                        totals += pooled_scores(fused, labels, held_rows)
                    key = f"epoch {epoch}, {name}, backbone {bw}, histogram {hw}"
                    table[key] = pooled_figures(totals)
                    print(key, table[key], flush=True)
    (args.out / "summary.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
