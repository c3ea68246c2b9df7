"""Index search at scale on synthetic embedding-like vectors: p50/p99 latency, recall@10 against exact
search, bytes per vector; and the peak memory of building a 1M index from the database.

    .venv/bin/python bench/bench_index.py search --dim 512 --sizes 10000,100000,1000000
    .venv/bin/python bench/bench_index.py memory --dim 512 --n 1000000 --home /tmp/bench-mem

Search runs one query at a time (interactive use) with faiss on all cores (2 here).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import EmbeddingStream  # noqa: E402


def exact_truth(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(data.shape[1])
    flat.add(data)
    return flat.search(queries, k)[1]


def measure(index, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> dict:
    latencies, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(index.search(q[None], k)[1][0])
        latencies.append(time.perf_counter() - t)
    recall = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)])
    return {"recall@10": round(float(recall), 4), "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 3)}


def bytes_per_vector(index) -> float:
    try:
        ivf = faiss.extract_index_ivf(index)
        return ivf.code_size + 8  # code + 64-bit id in the inverted list
    except RuntimeError:
        return index.d * 4 + 8  # IndexIDMap over flat


def search_bench(dim: int, sizes: list[int], n_queries: int, nprobes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        world = EmbeddingStream(dim, clusters=50, seed=1)
        data = world.rows(0, n)
        queries = world.rows(0, n_queries, stream=1)  # the same world (centres, basis), not in the index
        t = time.perf_counter()
        truth = exact_truth(data, queries, 10)
        rows.append({"n": n, "dim": dim, "index": "flat (exact)", "nprobe": None, "build_s": 0.0,
                     "bytes_per_vector": dim * 4 + 8, **measure_flat(data, queries, truth),
                     "truth_s": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
        nlist = max(16, 2 ** round(math.log2(4 * math.sqrt(n))))
        for codec in ("Flat", "SQ8"):
            t = time.perf_counter()
            index = faiss.index_factory(dim, f"IVF{nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            train = data[np.sort(rng.choice(n, size=min(n, 50 * nlist), replace=False))]  # as the workspace does
            index.train(train)
            index.add(data)
            build = time.perf_counter() - t
            for nprobe in nprobes:
                if nprobe > nlist:
                    continue
                faiss.extract_index_ivf(index).nprobe = nprobe
                rows.append({"n": n, "dim": dim, "index": f"IVF{nlist},{codec}", "nprobe": nprobe,
                             "build_s": round(build, 1), "bytes_per_vector": bytes_per_vector(index),
                             **measure(index, queries, truth)})
                print(json.dumps(rows[-1]), flush=True)
            del index
        del data
    return rows


def measure_flat(data, queries, truth) -> dict:
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(data.shape[1]))
    flat.add_with_ids(data, np.arange(len(data), dtype=np.int64))
    return measure(flat, queries, truth)


def memory_bench(dim: int, n: int, home: Path) -> dict:
    """Populate a workspace database with n vectors (made a batch at a time), then build the index from
    it as ingest and `index rebuild` do. Peak RSS against the raw size of the vectors."""
    from mammo_retrieval.app.workspace import Workspace
    from mammo_retrieval.core.config import load_config
    from synthetic import populate_world
    name = {512: "resnet18", 2048: "resnet50", 1024: "densenet121"}[dim]
    cfg = load_config(env={"MRETRIEVE_HOME": str(home)}).replace("encoder", name=name)
    ws = Workspace(cfg)
    ws.encoder
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    populate_world(ws, n, EmbeddingStream(dim))
    populate_s = time.perf_counter() - t
    after_populate = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    index = ws.rebuild_index()
    build_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    raw = n * dim * 4 / 2 ** 20
    return {"n": n, "dim": dim, "index": f"{index.manifest.index_type} nlist {index.manifest.nlist}",
            "raw_vectors_mib": round(raw), "rss_before_mib": round(base), "peak_rss_after_populate_mib": round(after_populate),
            "peak_rss_mib": round(peak), "peak_over_raw": round(peak / raw, 2), "populate_s": round(populate_s, 1),
            "build_s": round(build_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("search")
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--sizes", default="10000,100000,1000000")
    s.add_argument("--queries", type=int, default=500)
    s.add_argument("--nprobes", default="4,8,16,32,64")
    m = sub.add_parser("memory")
    m.add_argument("--dim", type=int, default=512)
    m.add_argument("--n", type=int, default=1_000_000)
    m.add_argument("--home", type=Path, default=Path("/tmp/bench-mem"))
    a = ap.parse_args()
    if a.what == "search":
        rows = search_bench(a.dim, [int(x) for x in a.sizes.split(",")], a.queries,
                            [int(x) for x in a.nprobes.split(",")])
        print(json.dumps(rows, indent=1))
    else:
        print(json.dumps(memory_bench(a.dim, a.n, a.home), indent=1))


if __name__ == "__main__":
    main()
