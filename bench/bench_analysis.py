"""Benchmark: `qc` and `report clusters` on N synthetic embedding-like vectors (default 100k x 2048).

    .venv/bin/python bench/bench_analysis.py --n 100000 --encoder resnet50   # 2048-d (mammo-simclr: 512-d)

Times each stage end to end through the library (database load included). Target: each command within
a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import synthetic_workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--home", type=Path, default=Path("/tmp/bench-analysis"))
    ap.add_argument("--plots", default="pca,tsne,umap")
    ap.add_argument("--encoder", default="mammo-simclr", help="sets the vector width: mammo-simclr 512, resnet50 2048")
    a = ap.parse_args()
    from mammo_retrieval.analysis.clusters import report_clusters
    from mammo_retrieval.analysis.qc import run_qc, write_outputs
    from mammo_retrieval.analysis.vectors import load_embeddings

    t = time.perf_counter()
    ws = synthetic_workspace(a.home / f"n{a.n}-{a.encoder}", a.n, encoder=a.encoder)
    setup = time.perf_counter() - t
    results = {"n": a.n, "dim": ws.encoder.identity.dim, "cpus": os.cpu_count(), "machine": platform.machine(),
               "setup_s": round(setup, 1)}
    for method in ("knn", "lof", "iforest"):
        t = time.perf_counter()
        result = run_qc(ws.corpus(), method=method, header_checks=False, min_pixel_correlation=None)
        write_outputs(ws.cached_image, result, a.home / f"qc-{method}", top=50)
        results[f"qc_{method}_s"] = round(time.perf_counter() - t, 1)
        results["qc_neighbours"] = result.neighbours_method
    t = time.perf_counter()
    table = load_embeddings(ws.corpus())
    results["load_s"] = round(time.perf_counter() - t, 1)
    plots = tuple(p for p in a.plots.split(",") if p)
    t = time.perf_counter()
    report = report_clusters(table, a.home / "clusters", k=10, plots=plots)
    results["report_clusters_s"] = round(time.perf_counter() - t + results["load_s"], 1)
    results["silhouette_sample"] = report.metrics["silhouette_sample_size"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
