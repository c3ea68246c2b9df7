"""Cluster quality of the embedding space, as PRIMER and mammography-pipelines report it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import faiss
import numpy as np
from sklearn import metrics

from mammo_retrieval.core.errors import ConfigError, MammoRetrievalError
from mammo_retrieval.core.fileio import write_atomic, write_bytes_atomic
from mammo_retrieval.analysis.labels import present as label_present
from mammo_retrieval.analysis.vectors import EmbeddingTable

if TYPE_CHECKING:
    from mammo_retrieval.storage.index import VectorIndex

SILHOUETTE_SAMPLE = 10_000   # silhouette is quadratic: sampled above this
PROJECTION_SAMPLE = 5_000    # t-SNE and UMAP: sampled above this
PLOTS = ("pca", "tsne", "umap")

# on_progress(step, done, total): the library reports, the CLI renders
Progress = Callable[[str, int, int], None]


def parse_plots(text: str) -> tuple[str, ...]:
    """``"pca,umap"`` -> ("pca", "umap"); ``"none"`` or ``""`` -> (); an unknown name is a usage error."""
    chosen = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    if chosen == ("none",):
        return ()
    unknown = [p for p in chosen if p not in PLOTS]
    if unknown:
        raise ConfigError(f"unknown plot(s) {', '.join(unknown)} in --plots '{text}'",
                          hint=f"choose from {', '.join(PLOTS)} (comma separated), or none")
    return chosen


def check_k(k: int, n: int) -> None:
    """k-means needs 2 <= k < n; faiss itself would fail with a C++ traceback."""
    if not 2 <= k < n:
        raise ConfigError(f"cannot make k={k} clusters of {n} images: k must be at least 2 and below the "
                          f"number of images ({n})",
                          hint=f"choose k between 2 and {n - 1}" if n > 2 else "ingest more images first")


@dataclass
class ClusterReport:
    metrics: dict
    assignments: np.ndarray
    names: list[str]


def kmeans_assignments(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    check_k(k, len(vectors))
    # min_points_per_centroid 1: faiss would print a warning to stderr (past --no-progress) for any archive
    # under 39 images a cluster; a report on a small archive is still what was asked (check_k bounds k)
    km = faiss.Kmeans(vectors.shape[1], k, niter=20, seed=seed, spherical=False, verbose=False,
                      max_points_per_centroid=512, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(vectors, dtype=np.float32))
    _, assignment = km.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return assignment.ravel()


def ivf_balance(index: "VectorIndex | None") -> dict:
    if index is None or index.manifest.index_type == "flat":
        return {"index_type": index.manifest.index_type if index else None,
                "note": "exact (flat) index: no inverted lists to balance"}
    sizes = index.list_sizes()
    total = float(sizes.sum())
    return {"index_type": index.manifest.index_type, "nlist": len(sizes), "min": int(sizes.min()),
            "max": int(sizes.max()), "mean": float(sizes.mean()), "empty_lists": int((sizes == 0).sum()),
            "coefficient_of_variation": float(sizes.std() / sizes.mean()) if sizes.mean() else None,
            # faiss's InvertedLists.imbalance_factor: 1.0 when every list is the same size
            "imbalance_factor": float(len(sizes) * (sizes.astype(float) ** 2).sum() / total ** 2) if total else None}


def cluster_metrics(vectors: np.ndarray, assignments: np.ndarray, seed: int = 0) -> dict:
    n = len(vectors)
    clusters = np.unique(assignments)
    if len(clusters) < 2 or len(clusters) >= n:
        raise MammoRetrievalError(f"need between 2 and {n - 1} clusters, got {len(clusters)}")
    sample = min(n, SILHOUETTE_SAMPLE)
    silhouette = metrics.silhouette_score(vectors, assignments, sample_size=sample if sample < n else None,
                                          random_state=seed)
    centroids = np.stack([vectors[assignments == c].mean(axis=0) for c in clusters])
    intra = float(np.mean(np.linalg.norm(vectors - centroids[np.searchsorted(clusters, assignments)], axis=1)))
    pairwise = np.linalg.norm(centroids[:, None, :] - centroids[None, :, :], axis=2)
    inter = float(pairwise[np.triu_indices(len(clusters), 1)].mean())
    return {
        "silhouette_score": float(silhouette),
        "silhouette_sample_size": int(sample),
        "silhouette_sampled": bool(sample < n),
        "davies_bouldin_index": float(metrics.davies_bouldin_score(vectors, assignments)),
        "calinski_harabasz_score": float(metrics.calinski_harabasz_score(vectors, assignments)),
        "embedding_variance": float(vectors.var(axis=0).mean()),
        "intra_cluster_distance": intra,
        "inter_cluster_distance": inter,
        "num_clusters": int(len(clusters)),
        "cluster_sizes": {str(c): int((assignments == c).sum()) for c in clusters},
        "num_samples": int(n),
        "num_features": int(vectors.shape[1]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def projections(vectors: np.ndarray, which: tuple[str, ...], seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """2-D coordinates and the rows they belong to, per method (t-SNE/UMAP on a sample, after PCA-50)."""
    from sklearn.decomposition import PCA
    out = {}
    n = len(vectors)
    if "pca" in which:
        out["pca"] = (PCA(n_components=2, random_state=seed).fit_transform(vectors), np.arange(n))
    if "tsne" not in which and "umap" not in which:
        return out
    rows = np.arange(n)
    if n > PROJECTION_SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(n, PROJECTION_SAMPLE, replace=False))
    reduced = PCA(n_components=min(50, len(rows) - 1, vectors.shape[1]), random_state=seed).fit_transform(vectors[rows])
    if "tsne" in which:
        from sklearn.manifold import TSNE
        perplexity = min(30.0, (len(rows) - 1) / 3)
        out["tsne"] = (TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
                       .fit_transform(reduced), rows)
    if "umap" in which:
        import umap
        # not seeded: a seed makes UMAP single-threaded (measured 30 s vs 4 s for 5,000 points on 2 cores)
        out["umap"] = (umap.UMAP(n_neighbors=min(15, len(rows) - 1), min_dist=0.1, n_jobs=-1)
                       .fit_transform(reduced), rows)
    return out


def plot_projections(coords: dict[str, tuple[np.ndarray, np.ndarray]], assignments: np.ndarray,
                     names: list[str], out: Path, title: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for method, (xy, rows) in coords.items():
        fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
        labels = assignments[rows]
        for i, name in enumerate(names):
            mask = labels == i
            ax.scatter(xy[mask, 0], xy[mask, 1], s=8, color=colours(i % colours.N), label=f"{name} ({mask.sum()})")
        sampled = f", {len(rows)} sampled" if len(rows) < len(assignments) else ""
        ax.set_title(f"{method.upper()} of {len(assignments)} embeddings{sampled}\n{title}", fontsize=9)
        ax.legend(fontsize=7, markerscale=2, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
        path = out / f"{method}_2d.png"
        try:
            fig.tight_layout()
            write_atomic(path, lambda fh, f=fig: f.savefig(fh, format="png"))
        finally:
            plt.close(fig)
        written.append(path)
    return written


def report_clusters(table: EmbeddingTable, out: Path, *, k: int | None = None, labels: np.ndarray | None = None,
                    label_name: str | None = None, index: "VectorIndex | None" = None,
                    plots: tuple[str, ...] = PLOTS, seed: int = 0, on_progress: Progress | None = None
                    ) -> ClusterReport:
    """Metrics and plots of k-means clusters, or of ``labels`` (column ``label_name``) when given."""
    progress = on_progress or (lambda step, done, total: None)
    unknown = [p for p in plots if p not in PLOTS]
    if unknown:
        raise ConfigError(f"unknown plot(s) {', '.join(unknown)}", hint=f"choose from {', '.join(PLOTS)}")
    if labels is None and k is not None:
        check_k(k, len(table.vectors))
    out.mkdir(parents=True, exist_ok=True)
    vectors = table.vectors
    if labels is not None:
        present = label_present(labels)
        names = sorted({str(v) for v in labels[present]})
        assignments_all = np.array([names.index(str(v)) if ok else -1 for v, ok in zip(labels, present)])
        keep = assignments_all >= 0
        vectors, assignments = vectors[keep], assignments_all[keep]
        source = f"labels: {label_name} ({int(keep.sum())} of {len(keep)} images labelled)"
        if not 2 <= len(names) < len(vectors):
            raise ConfigError(f"label column {label_name} has {len(names)} distinct values on {len(vectors)} "
                              "labelled images: need at least 2, and fewer than the images",
                              hint="choose another --label-column")
    else:
        k = k or max(2, min(10, int(np.sqrt(len(vectors) / 2))))
        progress(f"k-means (k={k}) on {len(vectors)} embeddings", 0, 1)
        assignments = kmeans_assignments(vectors, k, seed)
        names = [f"cluster {i}" for i in range(k)]
        source = f"faiss k-means, k={k}"
    progress("cluster metrics", 0, 1)
    result = cluster_metrics(vectors, assignments, seed)
    result["clusters_from"] = source
    # which column the clusters are, and each cluster id's label value (cluster_sizes is keyed by id)
    result["label_column"] = label_name if labels is not None else None
    result["cluster_names"] = {str(i): name for i, name in enumerate(names)}
    result["cluster_sizes_by_name"] = {names[int(c)]: n for c, n in result["cluster_sizes"].items()}
    result["ivf_list_balance"] = ivf_balance(index)
    result["notes"] = [f"silhouette computed on a random sample of {SILHOUETTE_SAMPLE} (quadratic cost)"
                       if result["silhouette_sampled"] else "silhouette computed on all samples",
                       f"t-SNE/UMAP on at most {PROJECTION_SAMPLE} sampled points after PCA to 50-d; the UMAP layout is "
                       "not seeded (seeding makes it single-threaded)"]
    if plots:
        progress(f"2-D projections ({', '.join(plots)})", 0, 1)
    coords = projections(vectors, plots, seed)
    result["plots"] = [p.name for p in plot_projections(coords, assignments, names, out, source)]
    write_bytes_atomic(out / "clustering_metrics.json", json.dumps(result, indent=2).encode())
    return ClusterReport(metrics=result, assignments=assignments, names=names)
