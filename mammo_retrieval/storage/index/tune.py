"""Pick nprobe for a target recall@k on the actual corpus, and measure what it costs."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import faiss
import numpy as np

from mammo_retrieval.storage.index.store import VectorIndex


@dataclass
class TuneResult:
    nprobe: int | None
    recall: float
    target: float
    table: list[dict]
    queries: int


def exact_neighbours(queries: np.ndarray, chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                     k: int) -> np.ndarray:
    """Ids of the exact top-k by inner product, streaming the corpus a chunk at a time (faiss's own
    block-wise ground truth; only the ids, 8 bytes a vector, are kept to map its positions back)."""
    from faiss.contrib.exhaustive_search import knn_ground_truth
    id_blocks: list[np.ndarray] = []

    def blocks():
        for ids, vectors in chunks():
            id_blocks.append(np.asarray(ids, dtype=np.int64))
            yield np.ascontiguousarray(vectors, dtype=np.float32)

    _, positions = knn_ground_truth(np.ascontiguousarray(queries, dtype=np.float32), blocks(), k,
                                    metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
    all_ids = np.concatenate(id_blocks) if id_blocks else np.empty(0, np.int64)
    return np.where(positions >= 0, all_ids[np.clip(positions, 0, None)], -1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))


def tune_nprobe(index: VectorIndex, queries: np.ndarray, truth: np.ndarray, target: float, k: int = 10) -> TuneResult:
    """Smallest power-of-two nprobe whose recall@k meets the target (each measured with its latency)."""
    if index.manifest.index_type == "flat":
        return TuneResult(None, 1.0, target, [{"nprobe": None, "recall": 1.0}], len(queries))
    nlist = int(index.manifest.nlist)
    table, chosen = [], None
    nprobe = 1
    while True:
        index.set_nprobe(min(nprobe, nlist))
        started = time.perf_counter()
        latencies = []
        found = np.empty((len(queries), k), dtype=np.int64)
        for i, q in enumerate(queries):
            t = time.perf_counter()
            found[i] = index.search(q[None], k)[1][0]  # as a query sees it (re-ranked where configured)
            latencies.append(time.perf_counter() - t)
        recall = recall_at_k(found, truth)
        table.append({"nprobe": index.manifest.nprobe, "recall": round(recall, 4),
                      "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 3),
                      "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 3),
                      "seconds": round(time.perf_counter() - started, 2)})
        if recall >= target and chosen is None:
            chosen = index.manifest.nprobe
            break
        if index.manifest.nprobe >= nlist:
            break
        nprobe *= 2
    best = chosen if chosen is not None else nlist
    index.set_nprobe(best)
    return TuneResult(chosen, next(r["recall"] for r in table if r["nprobe"] == best), target, table, len(queries))
