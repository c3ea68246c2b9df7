import json

import numpy as np
import pandas as pd
from sklearn import metrics

from mammo_retrieval.analysis.clusters import cluster_metrics, kmeans_assignments, report_clusters
from mammo_retrieval.analysis.vectors import EmbeddingTable


def blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, 16)) * 3
    labels = np.repeat(np.arange(4), 50)
    return (centres[labels] + rng.standard_normal((200, 16))).astype(np.float32), labels


def test_metrics_agree_with_scikit_learn():
    x, labels = blobs()
    m = cluster_metrics(x, labels)
    assert m["silhouette_score"] == metrics.silhouette_score(x, labels)
    assert m["davies_bouldin_index"] == metrics.davies_bouldin_score(x, labels)
    assert m["calinski_harabasz_score"] == metrics.calinski_harabasz_score(x, labels)
    assert m["embedding_variance"] == float(x.var(axis=0).mean())
    centroids = np.stack([x[labels == c].mean(0) for c in range(4)])
    assert abs(m["intra_cluster_distance"] - np.linalg.norm(x - centroids[labels], axis=1).mean()) < 1e-5
    assert m["inter_cluster_distance"] > m["intra_cluster_distance"] and not m["silhouette_sampled"]


def test_kmeans_finds_separated_blobs():
    x, labels = blobs()
    found = kmeans_assignments(x, 4)
    assert metrics.adjusted_rand_score(labels, found) > 0.95


def test_report_writes_metrics_and_plots(tmp_path):
    x, labels = blobs()
    meta = pd.DataFrame({"sop_instance_uid": [str(i) for i in range(200)]})
    result = report_clusters(EmbeddingTable(x, meta), tmp_path, k=4, plots=("pca", "tsne", "umap"))
    saved = json.loads((tmp_path / "clustering_metrics.json").read_text())
    assert saved["num_samples"] == 200 and saved["num_features"] == 16 and saved["clusters_from"].endswith("k=4")
    assert {"silhouette_score", "davies_bouldin_index", "calinski_harabasz_score", "timestamp"} <= set(saved)
    for name in ("pca_2d.png", "tsne_2d.png", "umap_2d.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert result.metrics["ivf_list_balance"]["index_type"] is None


def test_report_on_mias_tissue_labels(mias_workspace, mias_dir, tmp_path):
    from mammo_retrieval.analysis.labels import join_labels, read_labels
    from mammo_retrieval.analysis.vectors import load_embeddings
    table = load_embeddings(mias_workspace.corpus())
    aligned, join = join_labels(table.meta, read_labels(mias_dir / "labels.csv"))
    assert join.startswith("SOPInstanceUID") and aligned.tissue.notna().sum() == 200
    result = report_clusters(table, tmp_path, labels=aligned.tissue.to_numpy(dtype=object), label_name="tissue",
                             index=mias_workspace.searchable_index(), plots=("pca",))
    assert result.names == ["D", "F", "G"] and result.metrics["num_samples"] == 200
    assert result.metrics["ivf_list_balance"]["index_type"] == "flat"
