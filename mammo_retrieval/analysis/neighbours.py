"""k nearest neighbours of every vector among all the others (cosine on unit vectors).

Exact (BLAS) up to ``exact_limit`` vectors; above it, approximate: PCA to ``pca_dim`` then IVF-Flat,
which keeps a 100k x 2048 sweep within a minute on 2 cores. The method used is returned for reports.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from mammo_retrieval.storage.index.store import auto_nlist


@dataclass
class Neighbours:
    similarities: np.ndarray  # (N, k) cosine, descending
    positions: np.ndarray     # (N, k) row positions, -1 where missing
    method: str


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    return x


def knn(vectors: np.ndarray, k: int, *, exact_limit: int = 20_000, pca_dim: int = 128, nprobe: int = 16,
        seed: int = 0) -> Neighbours:
    n, dim = vectors.shape
    k = min(k, n - 1)
    if k < 1:
        raise ValueError("need at least two vectors for neighbours")
    if n <= exact_limit:
        index = faiss.IndexFlatIP(dim)
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        sims, pos = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k + 1)
        method = f"exact (flat inner product, {dim}-d)"
        x = None
    else:
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(n, size=min(n, 20_000), replace=False))]
        pca = faiss.PCAMatrix(dim, min(pca_dim, dim))
        pca.train(np.ascontiguousarray(sample, dtype=np.float32))
        x = _normalise(pca.apply(np.ascontiguousarray(vectors, dtype=np.float32)))
        nlist = auto_nlist(n)
        quantiser = faiss.IndexFlatIP(x.shape[1])
        index = faiss.IndexIVFFlat(quantiser, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))])
        index.add(x)
        index.nprobe = nprobe
        sims, pos = index.search(x, k + 1)
        method = f"approximate (PCA to {x.shape[1]}-d, IVF{nlist} nprobe {nprobe})"
    # drop each row's own entry (wherever it ranks; duplicates may tie with it)
    own = pos == np.arange(n)[:, None]
    keep = ~own
    keep[own.sum(axis=1) == 0, -1] = False  # self not found: drop the last instead
    sims = sims[keep].reshape(n, k)
    pos = pos[keep].reshape(n, k)
    return Neighbours(similarities=sims, positions=pos, method=method)
