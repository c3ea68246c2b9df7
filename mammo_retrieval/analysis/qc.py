"""QC sweep: an outlier score for every indexed image, near-duplicate pairs and header checks."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from mammo_retrieval.core.csv_safety import write_frame
from mammo_retrieval.core.fileio import write_bytes_atomic
from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.storage.catalog.corpus import Corpus, Picture
from mammo_retrieval.core.errors import ConfigError, MammoRetrievalError
from mammo_retrieval.analysis.content_checks import header_flags, side_convention
from mammo_retrieval.analysis.neighbours import Neighbours, knn
from mammo_retrieval.analysis.vectors import EmbeddingTable, load_embeddings

METHODS = ("knn", "lof", "iforest")

# on_progress(step, done, total): the library reports, the CLI renders (a bar on a terminal, lines elsewhere)
Progress = Callable[[str, int, int], None]


def _quiet(step: str, done: int, total: int) -> None:
    pass


@dataclass
class QcResult:
    scores: pd.DataFrame      # one row per image, rank 1 = most outlying
    duplicates: pd.DataFrame  # one row per pair
    neighbours_method: str
    method: str
    params: dict = field(default_factory=dict)
    run_id: int | None = None
    previous_run_id: int | None = None


def outlier_scores(vectors: np.ndarray, neighbours: Neighbours, method: str, k: int, seed: int = 0) -> np.ndarray:
    """Higher = more outlying, for every row."""
    if method == "knn":
        return 1.0 - neighbours.similarities[:, :k].mean(axis=1)
    if method == "lof":
        from scipy.sparse import csr_matrix
        from sklearn.neighbors import LocalOutlierFactor
        n, m = neighbours.similarities.shape
        distances = np.sqrt(np.clip(2.0 - 2.0 * neighbours.similarities, 0.0, None))
        graph = csr_matrix((distances.ravel(), neighbours.positions.ravel(), np.arange(0, n * m + 1, m)),
                           shape=(n, n))
        # sklearn wants one entry more than n_neighbors in a precomputed graph
        lof = LocalOutlierFactor(n_neighbors=min(k, m - 1), metric="precomputed")
        lof.fit(graph)
        return -lof.negative_outlier_factor_
    if method == "iforest":
        from sklearn.decomposition import PCA
        from sklearn.ensemble import IsolationForest
        reduced = PCA(n_components=min(32, *vectors.shape), random_state=seed).fit_transform(vectors)
        forest = IsolationForest(n_estimators=200, random_state=seed).fit(reduced)
        return -forest.score_samples(reduced)
    raise ConfigError(f"unknown QC method '{method}'", hint=f"choose one of {', '.join(METHODS)}")


def duplicate_pairs(table: EmbeddingTable, neighbours: Neighbours, threshold: float) -> pd.DataFrame:
    """Neighbour pairs at or above ``threshold`` cosine with different SOPInstanceUIDs, each pair once."""
    best: dict[tuple[int, int], float] = {}
    for i, j in zip(*np.nonzero(neighbours.similarities >= threshold)):
        b = int(neighbours.positions[i, j])
        if b >= 0:
            pair = (min(int(i), b), max(int(i), b))
            best[pair] = max(best.get(pair, -1.0), float(neighbours.similarities[i, j]))
    meta = table.meta
    rows = [{"sop_instance_uid_a": meta.sop_instance_uid.iat[a], "sop_instance_uid_b": meta.sop_instance_uid.iat[b],
             "similarity": round(sim, 6), "path_a": meta.path.iat[a], "path_b": meta.path.iat[b],
             "patient_id_a": meta.patient_id.iat[a], "patient_id_b": meta.patient_id.iat[b]}
            for (a, b), sim in best.items() if meta.sop_instance_uid.iat[a] != meta.sop_instance_uid.iat[b]]
    frame = pd.DataFrame(rows, columns=["sop_instance_uid_a", "sop_instance_uid_b", "similarity", "path_a",
                                        "path_b", "patient_id_a", "patient_id_b"])
    return frame.sort_values("similarity", ascending=False, ignore_index=True)


def pixel_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two cached images: near 1 for the same picture whatever the encoder."""
    a, b = a.astype(np.float32).ravel(), b.astype(np.float32).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator else 1.0


def run_qc(corpus: Corpus, *, method: str = "knn", k: int = 10, dup_threshold: float = 0.999,
           min_pixel_correlation: float | None = 0.98, header_checks: bool = True,
           record: bool = True, on_progress: Progress | None = None) -> QcResult:
    """Score every indexed image. Near-duplicates need cosine >= dup_threshold and, unless
    min_pixel_correlation is None, cached-image correlation >= it (a weak encoder cannot flood the list)."""
    progress = on_progress or _quiet
    if method not in METHODS:
        raise ConfigError(f"unknown QC method '{method}'", hint=f"choose one of {', '.join(METHODS)}")
    progress("loading vectors", 0, 1)
    table = load_embeddings(corpus)
    if len(table) < 3:
        raise MammoRetrievalError(f"QC needs at least 3 indexed images, found {len(table)}")
    k = min(k, len(table) - 1)
    progress(f"nearest neighbours of {len(table)} images", 0, 1)
    neighbours = knn(table.vectors, k + 1)
    progress(f"{method} outlier scores", 0, 1)
    scores = outlier_scores(table.vectors, neighbours, method, k)
    frame = table.meta[["image_id", "sop_instance_uid", "accession_number", "patient_id", "laterality", "view",
                        "path"]].copy()
    frame["score"] = np.round(scores.astype(float), 6)
    frame["flags"] = ""
    if header_checks:
        frame["flags"] = _header_flags(corpus.picture, table, progress)
    frame = frame.sort_values("score", ascending=False, kind="stable", ignore_index=True)
    frame["rank"] = np.arange(1, len(frame) + 1)
    duplicates = duplicate_pairs(table, neighbours, dup_threshold)
    if min_pixel_correlation is not None:
        correlations = []
        for i, (a, b) in enumerate(zip(duplicates.sop_instance_uid_a, duplicates.sop_instance_uid_b)):
            progress("pixel check of near-duplicate candidates", i, len(duplicates))
            correlations.append(round(pixel_correlation(corpus.picture(a), corpus.picture(b)), 4))
        duplicates["pixel_correlation"] = correlations
        duplicates = duplicates[duplicates.pixel_correlation >= min_pixel_correlation].reset_index(drop=True)
    result = QcResult(scores=frame, duplicates=duplicates,
                      neighbours_method=neighbours.method, method=method,
                      params={"k": k, "dup_threshold": dup_threshold, "min_pixel_correlation": min_pixel_correlation,
                              "neighbours": neighbours.method})
    if record:
        record_sweep(corpus, result)
    else:
        with corpus.db.session() as s:
            result.previous_run_id, previous_ranks = repo.previous_qc_ranks(s, corpus.model_version_id, method)
        _set_previous_ranks(result, previous_ranks)
    return result


def _header_flags(picture: Picture, table: EmbeddingTable, progress: Progress = _quiet) -> list[str]:
    from mammo_retrieval.preprocess.primer import breast_side
    images = []
    for i, sop in enumerate(table.meta.sop_instance_uid):
        progress("header checks on the cached images", i, len(table))
        images.append(picture(sop))
    convention = side_convention([(lat, breast_side(img)) for lat, img in zip(table.meta.laterality, images)])
    return [";".join(header_flags(img, lat, view, convention))
            for img, lat, view in zip(images, table.meta.laterality, table.meta.view)]


def record_sweep(corpus: Corpus, result: QcResult) -> None:
    """Store this run's scores (the next sweep compares itself with them), and each image's rank in the
    sweep stored before it, unless a run with ``record=False`` read them already (its report shows those)."""
    with corpus.db.session() as s:
        result.run_id, previous_run_id, previous_ranks = repo.record_qc_run(
            s, corpus.model_version_id, result.method, json.dumps(result.params),
            ((int(r.image_id), float(r.score), int(r.rank), r.flags or None) for r in result.scores.itertuples()),
            _duplicate_ids(result))
    if "previous_rank" not in result.scores:
        result.previous_run_id = previous_run_id
        _set_previous_ranks(result, previous_ranks)


def _set_previous_ranks(result: QcResult, previous_ranks: dict[int, int]) -> None:
    # integers, empty where the image was not in the previous run (a list with None would become floats)
    result.scores["previous_rank"] = pd.array([previous_ranks.get(int(i)) for i in result.scores.image_id],
                                              dtype="Int64")


def _duplicate_ids(result: QcResult) -> list[tuple[int, int, float, float | None]]:
    ids = dict(zip(result.scores.sop_instance_uid, result.scores.image_id))
    has_correlation = "pixel_correlation" in result.duplicates
    return [(int(ids[r.sop_instance_uid_a]), int(ids[r.sop_instance_uid_b]), float(r.similarity),
             float(r.pixel_correlation) if has_correlation else None) for r in result.duplicates.itertuples()]


def write_outputs(picture: Picture, result: QcResult, out: Path, top: int,
                  on_progress: Progress | None = None, record_in: Corpus | None = None) -> dict[str, Path]:
    """scores.csv, duplicates.csv, report.html, then qc_summary.json. With ``record_in``, the sweep (run
    with ``record=False``) is stored once its report is written and before its summary: a run killed
    before then stores nothing, so its rerun compares itself with the sweep before, not with one that
    nobody saw."""
    from mammo_retrieval.analysis.qc_report import write_html
    progress = on_progress or _quiet
    progress("writing the outputs and report thumbnails", 0, 1)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["sop_instance_uid", "accession_number", "path", "score", "rank", "flags"]
    if "previous_rank" in result.scores:
        columns.append("previous_rank")
    scores = result.scores[columns].rename(columns={"sop_instance_uid": "SOPInstanceUID",
                                                    "accession_number": "AccessionNumber"})
    write_frame(scores, out / "scores.csv")
    write_frame(result.duplicates.rename(columns={"sop_instance_uid_a": "SOPInstanceUID_a",
                                                  "sop_instance_uid_b": "SOPInstanceUID_b"}),
                out / "duplicates.csv")
    write_html(picture, result, out / "report.html", top)
    if record_in is not None and result.run_id is None:
        record_sweep(record_in, result)
    summary = {"created_at": datetime.now(timezone.utc).isoformat(), "method": result.method, **result.params,
               "images": len(result.scores), "duplicate_pairs": len(result.duplicates), "run_id": result.run_id,
               "previous_run_id": result.previous_run_id,
               "flagged": int((result.scores["flags"] != "").sum())}
    write_bytes_atomic(out / "qc_summary.json", json.dumps(summary, indent=2).encode())
    return {"scores": out / "scores.csv", "duplicates": out / "duplicates.csv", "report": out / "report.html",
            "summary": out / "qc_summary.json"}
