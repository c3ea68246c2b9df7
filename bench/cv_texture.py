"""Texture statistics beside v2's network and histogram: chosen by cross-validation, without the held-out
women (how the built-in v3 was fixed).

    .venv/bin/python bench/cv_texture.py --mias ../shared/data/mias --fold-vectors DIR --out bench/results/builtins/cv_texture.json

Why: tissue type is a texture more than a brightness. The descriptor is ``encoders.texture`` (uniform local
binary patterns at radii 1, 2, 4, 8 and the local standard deviation in 3, 7 and 15 px windows, over the
breast), standardised by the training folds' means and deviations. The same 4 folds by woman of the 71
women v1 did not hold out as ``bench/cv_builtin.py``; the network vectors are v2's recipe rerun per fold,
as ``bench/cv_adapter_fusion.py`` writes them to its ``--out`` folder (``fold<k>.npz``; made here when
missing, about 25 minutes). Each fold is ranked in [t x texture, b x network, h x centred histogram] for
epochs 20-60 and the weights below; the rule v2's settings were chosen by picks one (the largest
contralateral@5 + tissue P@10 whose contralateral@5 is above the histogram's). The held-out women are not
read.

It also measures what supervision could add (``supervised``): tissue classifiers trained on the training
folds' labels (shrinkage LDA, logistic regression) on the texture, the epoch-60 network features or both;
their out-of-fold accuracy, and the tissue P@10 of ranking by the LDA projection or the log-probabilities.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cv_adapter_fusion import write_fold_vectors  # noqa: E402
from cv_builtin import (FOLDS, add_recipe_arguments, folds_by_woman, pooled_figures, pooled_scores,  # noqa: E402
                        training_data)

from mammo_retrieval.analysis.evaluate import l2_rows  # noqa: E402
from mammo_retrieval.encoders.texture import LBP_CODES, LBP_RADII, texture_features  # noqa: E402

EPOCHS = (20, 40, 60)
TEXTURE_WEIGHTS = (0.0, 0.5, 1.0)
BACKBONE_WEIGHTS = (0.5, 1.0)
HISTOGRAM_WEIGHTS = (0.0, 0.3, 0.5)


def standardised(features: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Unit rows of ``features`` standardised by the training rows' means and deviations (as v3 stores them)."""
    return l2_rows((features - features[fit_rows].mean(axis=0)) / (features[fit_rows].std(axis=0) + 1e-6))


def scored(parts, folds, labels) -> dict:
    """Pooled out-of-fold contralateral@5 and tissue P@10 of the vectors ``parts(k, fit_rows)`` makes."""
    totals = np.zeros(3)
    for k, (fit_rows, held_rows) in enumerate(folds):
        totals += pooled_scores(parts(k, fit_rows), labels, held_rows)
    return pooled_figures(totals)


def supervised(texture: np.ndarray, networks: dict, codes: np.ndarray, folds, labels) -> dict:
    """Out-of-fold tissue classifiers (fit on the training folds' labels) and their spaces' tissue P@10."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    inputs = {"texture": lambda k: texture, "network (epoch 60)": lambda k: networks[k, 60],
              "texture + network": lambda k: np.hstack([texture, networks[k, 60]])}
    out = {}
    for name, features in inputs.items():
        for model in ("LDA (shrinkage)", "logistic regression (C 0.1)"):
            totals, correct = np.zeros(3), 0
            for k, (fit_rows, held_rows) in enumerate(folds):
                x = features(k)
                x = (x - x[fit_rows].mean(axis=0)) / (x[fit_rows].std(axis=0) + 1e-6)
                if model.startswith("LDA"):
                    fitted = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(x[fit_rows], codes[fit_rows])
                    space = fitted.transform(x)
                else:
                    fitted = LogisticRegression(C=0.1, max_iter=2000).fit(x[fit_rows], codes[fit_rows])
                    space = np.log(fitted.predict_proba(x) + 1e-3)
                correct += int((fitted.predict(x[held_rows]) == codes[held_rows]).sum())
                totals += pooled_scores(space, labels, held_rows)
            out[f"{model} on {name}"] = {"accuracy": round(correct / totals[2], 4),
                                         "tissue P@10": round(totals[1] / totals[2], 4)}
            print(f"{model} on {name}", out[f"{model} on {name}"], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fold-vectors", type=Path, required=True, help="bench/cv_adapter_fusion.py's --out folder")
    parser.add_argument("--out", type=Path, required=True, help="the JSON summary")
    add_recipe_arguments(parser)
    args = parser.parse_args()
    labels, _, rows, tissue, grey, counts = training_data(args.mias)
    folds = folds_by_woman(labels, rows)
    write_fold_vectors(args.fold_vectors, folds, grey, tissue, labels, rows, args)
    with torch.inference_mode():
        texture = texture_features(torch.floor(grey[:, 0] * 255.0 + 0.5)).numpy()
    lbp = len(LBP_RADII) * LBP_CODES
    networks = {}
    for k in range(FOLDS):
        data = np.load(args.fold_vectors / f"fold{k}.npz")
        for epoch in EPOCHS:
            full = np.zeros((len(counts), data[f"epoch{epoch}"].shape[1]), np.float32)
            full[data["rows"]] = data[f"epoch{epoch}"]
            networks[k, epoch] = l2_rows(full)

    def histogram(fit_rows):
        return l2_rows(counts - counts[fit_rows].mean(axis=0))

    summary = {"histogram alone": scored(lambda k, fit: histogram(fit), folds, labels),
               "texture alone": scored(lambda k, fit: standardised(texture, fit), folds, labels),
               "local binary patterns alone": scored(lambda k, fit: standardised(texture[:, :lbp], fit), folds, labels),
               "local standard deviation alone": scored(lambda k, fit: standardised(texture[:, lbp:], fit), folds, labels),
               "settings": {}}
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=1), flush=True)
    for epoch in EPOCHS:
        for t in TEXTURE_WEIGHTS:
            for b in BACKBONE_WEIGHTS:
                for h in HISTOGRAM_WEIGHTS:
                    key = f"epoch {epoch}, texture {t}, network {b}, histogram {h}"
                    summary["settings"][key] = scored(
                        lambda k, fit: np.hstack([t * standardised(texture, fit), b * networks[k, epoch],
                                                  h * histogram(fit)]), folds, labels)
                    print(key, summary["settings"][key], flush=True)
    floor = summary["histogram alone"]["contralateral@5"]
    candidates = [(m["contralateral@5"] + m["tissue P@10"], key) for key, m in summary["settings"].items()
                  if m["contralateral@5"] > floor]
    summary["choice"] = max(candidates)[1] if candidates else None
    summary["v2's setting"] = "epoch 60, texture 0.0, network 1.0, histogram 0.3"
    summary["supervised"] = supervised(texture, networks, tissue.numpy(), folds, labels)
    args.out.write_text(json.dumps(summary, indent=1))
    print("chosen:", summary["choice"], summary["settings"].get(summary["choice"]))


if __name__ == "__main__":
    main()
