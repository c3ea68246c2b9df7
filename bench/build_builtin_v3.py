"""How the built-in v3 encoder (``mammo-simclr-v3``) was made: v2's weights plus texture statistics.

    .venv/bin/python bench/build_builtin_v3.py --mias ../shared/data/mias --out /tmp/builtin-v3 [--install]

1. v2's network and histogram are kept as shipped (``mammo-simclr-v2-r18-128.safetensors``): nothing is
   trained here.
2. The 200 mini-MIAS images are preprocessed as ingest does (128 px); the texture statistics
   (``encoders.texture``) of the 142 images of the 71 women v1 did not hold out give each statistic's mean
   and standard deviation (+1e-6), stored as ``texture_mean`` and ``texture_std``. No labels are read.
3. The texture's weight, 0.5, beside the network (1.0) and the histogram (0.3, v2's), and v2's network at
   its epoch 60, were chosen out of fold on those 71 women by ``bench/cv_texture.py``, never on the
   held-out women; the held-out women were then measured once, with a rule fixed beforehand (README).

A rerun writes bit-identical tensors and metadata (checked 2026-12-01); the file's bytes may still differ,
as safetensors writes the metadata's keys in hash order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_builtin_v2 import OUT_NAME as V2_NAME, ROOT, build_v1_backbone, read_mias  # noqa: E402

from mammo_retrieval.encoders.model import packaged_weights  # noqa: E402
from mammo_retrieval.encoders.texture import texture_features  # noqa: E402

OUT_NAME = "mammo-simclr-v3-r18-128.safetensors"
TEXTURE_WEIGHT = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mias", type=Path, default=ROOT.parent / "shared" / "data" / "mias")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--install", action="store_true", help="also copy the weights into mammo_retrieval/weights/")
    args = parser.parse_args()
    labels, pictures = read_mias(args.mias, 128)
    _, heldout = build_v1_backbone()
    fitted = ~np.isin(labels.PatientID.to_numpy(object), heldout)
    with torch.inference_mode():
        texture = texture_features(torch.from_numpy(pictures[fitted]).float()).double()
    v2_path = packaged_weights(V2_NAME)
    tensors = load_file(str(v2_path))
    tensors["texture_mean"] = texture.mean(dim=0).float()
    tensors["texture_std"] = (texture.std(dim=0, unbiased=False) + 1e-6).float()
    tensors["texture_weight"] = torch.tensor(TEXTURE_WEIGHT)
    with safe_open(str(v2_path), "pt") as fh:
        metadata = dict(fh.metadata())
    metadata["recipe_v3"] = json.dumps({"start": V2_NAME, "texture": "encoders.texture, standardised over the 142 "
                                        "pictures of the 71 women v1 did not hold out", "texture_weight": TEXTURE_WEIGHT,
                                        "chosen_by": "bench/cv_texture.py (4 folds by woman, out of fold)",
                                        "images": int(fitted.sum())})
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / OUT_NAME
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata=metadata)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) from {int(fitted.sum())} pictures")
    if args.install:
        (ROOT / "mammo_retrieval" / "weights" / OUT_NAME).write_bytes(target.read_bytes())


if __name__ == "__main__":
    main()
