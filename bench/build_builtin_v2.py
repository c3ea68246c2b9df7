"""How the built-in v2 encoder (``mammo-simclr-v2``) was made: the recipe, runnable (CPU, minutes).

    .venv/bin/python bench/build_builtin_v2.py --mias ../shared/data/mias --out /tmp/builtin-v2 [--install]

(the defaults are the shipped recipe: 60 epochs, lr 5e-4, supervised-contrastive weight 2.0)

1. The 200 mini-MIAS images are read and preprocessed exactly as ingest does (PRIMER pipeline, 128 px).
2. The women v1 held out of its training (recorded in v1's weights) stay out of everything here. Of the
   others, one in five (a stable hash of PatientID) is a validation set, used only to pick the epoch.
3. Starting from v1's ResNet-18, training continues on the training women with two losses: SimCLR's
   NT-Xent on two augmented views (the card's augmentations *without* brightness/contrast, so the network
   may keep exposure as a cue), plus a supervised contrastive loss on the BI-RADS-like tissue label of
   the training women (``labels.csv``) on the backbone's own pooled features.
4. The 64-bin intensity histogram's reference is the mean histogram of the training and validation
   images; its weight is chosen first, among 0, 0.3 and 0.5, by 4-fold cross-validation by woman on the
   training and validation women with v1's network (contralateral@5: 0.880, 0.930, 0.887), never on
   held-out women.
5. The epoch with the best validation contralateral@5 + tissue P@10 of the fused vector is written as
   ``mammo_retrieval/weights/mammo-simclr-v2-r18-128.safetensors`` (backbone fp16, histogram fp32), with
   the recipe, the chosen epoch and the held-out women in its metadata.

Then: ``mretrieve evaluate --labels ../shared/data/mias/labels.csv --all-versions --heldout-from
mammo_retrieval/weights/mammo-simclr-v2-r18-128.safetensors`` (README, "The built-in encoders").
"""
from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mammo_retrieval.analysis.evaluate import RankedLists, contralateral_hit_rate, l2_rows, retrieval_metrics
from mammo_retrieval.core.config import load_config
from mammo_retrieval.encoders.fusion import HISTOGRAM_BINS, IntensityFusion
from mammo_retrieval.encoders.model import packaged_weights
from mammo_retrieval.pipeline.prepare import Prepared, prepare_file
from mammo_retrieval.preprocess import PreprocessSettings
from mammo_retrieval.train.adapter import supervised_contrastive
from mammo_retrieval.train.augment import AugmentConfig, augment, to_model_input
from mammo_retrieval.train.losses import nt_xent

ROOT = Path(__file__).resolve().parents[1]
V1 = "mammo-simclr-r18-128.safetensors"
OUT_NAME = "mammo-simclr-v2-r18-128.safetensors"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HISTOGRAM_WEIGHTS = (0.0, 0.3, 0.5)


def preprocessed(paths: list[Path], size: int) -> np.ndarray:
    """The uint8 pictures ingest would cache for ``paths`` (default settings, ``size`` px square)."""
    cfg = load_config(env={})
    settings = PreprocessSettings.from_config(cfg.preprocess, size=(size, size), mean=MEAN, std=STD)
    pictures = []
    for path in paths:
        prepared = prepare_file(str(path), cfg.reader, settings, reduced_j2k=False)
        if not isinstance(prepared, Prepared):
            raise SystemExit(f"{path}: {prepared.reason}")
        pictures.append(prepared.display)
    return np.stack(pictures)


def read_mias(mias: Path, size: int) -> tuple[pd.DataFrame, np.ndarray]:
    """labels.csv (one row per image) and the uint8 pictures ingest would cache."""
    labels = pd.read_csv(mias / "labels.csv")
    labels = labels[~labels.file.duplicated()].reset_index(drop=True)  # one row per image
    return labels, preprocessed([mias / name for name in labels.file], size)


def build_v1_backbone() -> tuple[torch.nn.Module, list[str]]:
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = str(packaged_weights(V1))
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    backbone.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    with safe_open(path, "pt") as fh:
        heldout = json.loads(fh.metadata()["heldout_patients"])
    return backbone, heldout


def scores(vectors: np.ndarray, labels: pd.DataFrame, rows: np.ndarray) -> tuple[float, float]:
    """(contralateral@5, tissue P@10) among ``rows``, same-woman images excluded from tissue hits."""
    ranked = RankedLists.build(l2_rows(vectors[rows]))
    patients = labels.PatientID.to_numpy(object)[rows]
    contra = contralateral_hit_rate(ranked, patients, labels.laterality.to_numpy(object)[rows], [5])
    tissue = retrieval_metrics(ranked, labels.tissue.to_numpy(object)[rows], patients, [10])
    return float(contra["contralateral@5"]), float(tissue["precision@10"])


def train_step(backbone: torch.nn.Module, head: torch.nn.Module, optimizer: torch.optim.Optimizer,
               grey: torch.Tensor, tissue: torch.Tensor, pair: tuple[np.ndarray, np.ndarray],
               augmentation: AugmentConfig, generator: torch.Generator, supcon_weight: float) -> None:
    """One step of the recipe: NT-Xent between an augmented view of each image of ``pair[0]`` and one of the
    image at the same place in ``pair[1]`` (the same image for v2), plus ``supcon_weight`` x supervised
    contrastive on tissue over the backbone's pooled features."""
    first, second = pair
    views = [to_model_input(augment(grey[rows], augmentation, generator), MEAN, STD) for rows in pair]
    features = backbone(torch.cat(views))
    z = torch.nn.functional.normalize(head(features), dim=1)
    loss = nt_xent(z[:len(first)], z[len(first):], 0.07)
    loss = loss + supcon_weight * supervised_contrastive(
        torch.nn.functional.normalize(features, dim=1), torch.cat([tissue[first], tissue[second]]), 0.1)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(backbone.parameters()) + list(head.parameters()), 1.0)
    optimizer.step()


def choose_histogram_weight(learned: np.ndarray, counts: np.ndarray, labels: pd.DataFrame,
                            rows: np.ndarray) -> tuple[float, dict]:
    """The weight with the best mean contralateral@5 over 4 folds of women (``rows`` only), each fold's
    reference histogram fitted on the other three."""
    from sklearn.model_selection import GroupKFold
    patients = labels.PatientID.to_numpy(object)
    women = np.unique(patients[rows])
    by_weight = {}
    for weight in HISTOGRAM_WEIGHTS:
        folds = []
        for fit, held in GroupKFold(n_splits=4).split(women, groups=women):
            fit_rows, held_rows = (rows[np.isin(patients[rows], women[f])] for f in (fit, held))
            centred = l2_rows(counts - counts[fit_rows].mean(axis=0))
            fused = np.hstack([l2_rows(learned), weight * centred])
            folds.append(scores(fused, labels, held_rows)[0])
        by_weight[weight] = round(float(np.mean(folds)), 4)
    return max(by_weight, key=by_weight.get), by_weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mias", type=Path, default=ROOT.parent / "shared" / "data" / "mias")
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights and the training log")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--supcon-weight", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--install", action="store_true", help="also copy the weights into mammo_retrieval/weights/")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    labels, pictures = read_mias(args.mias, args.size)
    backbone, heldout = build_v1_backbone()
    patients = labels.PatientID.to_numpy(object)
    held = np.isin(patients, heldout)
    val = ~held & np.array([zlib.crc32(p.encode()) % 5 == 0 for p in patients])
    train = ~held & ~val
    print(f"train {train.sum()} images, validation {val.sum()}, held out {held.sum()} (never used here)")
    codes = {c: i for i, c in enumerate(sorted(set(labels.tissue)))}
    tissue = torch.tensor([codes[t] for t in labels.tissue])
    grey = torch.from_numpy(pictures).float().div(255)[:, None]
    counts = np.stack([np.histogram(p, bins=HISTOGRAM_BINS, range=(0, 256))[0] for p in pictures]) / pictures[0].size
    backbone.eval()
    with torch.inference_mode():
        v1_vectors = torch.cat([backbone(to_model_input(grey[i:i + 64], MEAN, STD))
                                for i in range(0, len(grey), 64)]).numpy()
    weight, cv = choose_histogram_weight(v1_vectors, counts, labels, np.nonzero(~held)[0])
    print(f"histogram weight {weight} (4-fold contralateral@5 by weight: {cv})")
    fused = IntensityFusion(backbone, mean=MEAN[0], std=STD[0])
    fused.histogram_reference.copy_(torch.from_numpy(counts[~held].mean(axis=0)).float())
    fused.histogram_weight.fill_(weight)
    head = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 128))
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-5)
    augmentation = AugmentConfig(brightness_contrast_p=0.0)
    generator = torch.Generator().manual_seed(0)
    rows = np.nonzero(train)[0]
    args.out.mkdir(parents=True, exist_ok=True)
    best, log, started = None, [], time.time()

    def embed() -> np.ndarray:
        fused.eval()
        with torch.inference_mode():
            return torch.cat([fused(to_model_input(grey[i:i + 64], MEAN, STD))
                              for i in range(0, len(grey), 64)]).numpy()

    for epoch in range(args.epochs + 1):
        if epoch % 10 == 0:
            vectors = embed()
            entry = {"epoch": epoch, "validation": scores(vectors, labels, np.nonzero(val)[0]),
                     "seconds": round(time.time() - started)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if best is None or sum(entry["validation"]) > sum(best[0]["validation"]):
                best = (entry, {k: v.detach().clone() for k, v in fused.state_dict().items()})
        if epoch == args.epochs:
            break
        backbone.train()
        head.train()
        order = np.random.default_rng(epoch).permutation(rows)
        for start in range(0, len(order), args.batch_size):
            batch = order[start:start + args.batch_size]
            if len(batch) < 8:
                continue
            train_step(backbone, head, optimizer, grey, tissue, (batch, batch), augmentation, generator,
                       args.supcon_weight)
    entry, state = best
    from safetensors.torch import save_file
    tensors = {k: (v.half() if k.startswith("backbone.") and v.is_floating_point() else v.float()).contiguous()
               for k, v in state.items()}
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "install"}
    metadata = {"recipe": json.dumps({**recipe, "start": V1, "augment": "card's, without brightness/contrast",
                                      "losses": "NT-Xent (tau 0.07) + supervised contrastive on tissue (tau 0.1)",
                                      "histogram_weight": weight, "histogram_weight_cv": cv}),
                "chosen_epoch": str(entry["epoch"]), "validation": json.dumps(entry["validation"]),
                "heldout_patients": json.dumps(sorted(heldout)), "log": json.dumps(log)}
    target = args.out / OUT_NAME
    save_file(tensors, str(target), metadata=metadata)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB), epoch {entry['epoch']}, "
          f"validation contralateral@5 / tissue P@10 {entry['validation']}")
    if args.install:
        (ROOT / "mammo_retrieval" / "weights" / OUT_NAME).write_bytes(target.read_bytes())


if __name__ == "__main__":
    main()
