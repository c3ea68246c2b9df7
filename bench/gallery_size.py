"""How much the size of the evaluated set moves contralateral@k and tissue precision@10.

    .venv/bin/python bench/gallery_size.py --mias ../shared/data/mias --out bench/results/builtins/gallery_size.json

Why: our held-out check ranks 58 images (29 women); the issue's figures were measured on 122 images of
61 other women. Precision@10 rises with the number of candidates (more same-tissue images near each query),
and contralateral@k falls (more look-alikes beside a woman's other breast). Only spaces that learnt
nothing from ``labels.csv`` or from these women are measured here, so every one of the 100 women can be
drawn: the 64-bin histogram and raw 32x32 pixels (exactly as ``mretrieve evaluate`` computes them, centred
on each drawn set), raw pixels with left breasts mirrored, and v3's texture statistics standardised on each
drawn set. For each set size, random sets of women are drawn (seeded) and the metrics averaged; tissue
precision@10 is given with same-woman images excluded (``mretrieve evaluate``'s rule) and counted. The
same spaces are also measured on the 29 women the built-ins hold out, to place that set among random ones.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from build_builtin_v2 import V1, read_mias
from mammo_retrieval.analysis.evaluate import (RankedLists, contralateral_hit_rate, histogram_features, l2_rows,
                                               raw_pixel_features, retrieval_metrics)
from mammo_retrieval.analysis.evaluate import heldout_patients
from mammo_retrieval.encoders.model import packaged_weights
from mammo_retrieval.encoders.texture import texture_features

ISSUE = {"histogram_64": {"contralateral@5": 0.615, "tissue P@10": 0.477},
         "raw_pixels_32x32": {"contralateral@5": 0.500, "tissue P@10": 0.452}}  # issue #15, 61 women


def spaces(pictures: np.ndarray, lateralities: np.ndarray, texture: np.ndarray) -> dict[str, np.ndarray]:
    images = list(pictures)
    mirrored = [im[:, ::-1] if side == "L" else im for im, side in zip(images, lateralities)]
    z = (texture - texture.mean(0)) / (texture.std(0) + 1e-6)
    return {"histogram_64": histogram_features(images), "raw_pixels_32x32": raw_pixel_features(images),
            "raw_pixels_32x32, left mirrored": raw_pixel_features(mirrored), "texture (v3's statistics)": l2_rows(z)}


def measure(pictures, texture, labels, women: np.ndarray) -> dict[str, dict[str, float]]:
    rows = np.nonzero(labels.PatientID.isin(women).to_numpy())[0]
    patients = labels.PatientID.to_numpy()[rows]
    sides = labels.laterality.to_numpy()[rows]
    tissue = labels.tissue.to_numpy()[rows]
    result = {}
    for name, vectors in spaces(pictures[rows], sides, texture[rows]).items():
        ranked = RankedLists.build(vectors)
        label_hits = retrieval_metrics(ranked, tissue, patients, [10])
        result[name] = {
            "contralateral@5": contralateral_hit_rate(ranked, patients, sides, [5])["contralateral@5"],
            "tissue P@10": label_hits["precision@10"],
            "tissue P@10, same woman counted": label_hits["precision@10, same patient counted"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mias", type=Path, default=Path("../shared/data/mias"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--women", type=int, nargs="+", default=[29, 61, 100])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    labels, pictures = read_mias(args.mias, 128)
    texture = texture_features(torch.from_numpy(pictures).float()).numpy()
    everyone = np.unique(labels.PatientID.to_numpy())
    rng = np.random.default_rng(args.seed)
    report = {"images": len(labels), "women": len(everyone), "draws": args.draws, "seed": args.seed,
              "issue_figures_61_women": ISSUE, "by_women": {}}
    for count in args.women:
        draws = 1 if count >= len(everyone) else args.draws
        runs = [measure(pictures, texture, labels, rng.choice(everyone, count, replace=False)) for _ in range(draws)]
        report["by_women"][str(count)] = {
            space: {metric: {"mean": float(np.mean([r[space][metric] for r in runs])),
                             "p5": float(np.percentile([r[space][metric] for r in runs], 5)),
                             "p95": float(np.percentile([r[space][metric] for r in runs], 95))}
                    for metric in runs[0][space]} for space in runs[0]}
        print(f"{count} women ({draws} draws):")
        for space, metrics in report["by_women"][str(count)].items():
            print(f"  {space:34s} " + "  ".join(f"{m} {v['mean']:.3f}" for m, v in metrics.items()))
    heldout = np.array(sorted(heldout_patients(str(packaged_weights(V1)))))
    report["heldout_29_women"] = measure(pictures, texture, labels, heldout)
    print("the 29 held-out women:")
    for space, metrics in report["heldout_29_women"].items():
        print(f"  {space:34s} " + "  ".join(f"{m} {v:.3f}" for m, v in metrics.items()))
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
