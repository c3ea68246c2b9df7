"""Labelled evaluation of an embedding space against two classical references computed in the same run:
raw pixels of the preprocessed image at 32x32, and a 64-bin intensity histogram.

Retrieval metrics exclude the query image and, for label metrics, every image of the same patient (a
woman's other breast shares her tissue type; counting it would flatter any encoder). Classifiers are
cross-validated with folds split by patient.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score
from sklearn.model_selection import GroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from mammo_retrieval.core.errors import ConfigError, MammoRetrievalError
from mammo_retrieval.core.fileio import write_bytes_atomic

# on_progress(step, done, total): the library reports, the CLI renders
Progress = Callable[[str, int, int], None]

from mammo_retrieval.analysis.labels import LabelsError, present

if TYPE_CHECKING:
    from mammo_retrieval.storage.catalog.corpus import Corpus


def l2_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def raw_pixel_features(images: list[np.ndarray]) -> np.ndarray:
    """The preprocessed image, area-downsampled to 32x32, centred on the corpus mean, unit length."""
    x = np.stack([cv2.resize(im, (32, 32), interpolation=cv2.INTER_AREA).ravel() for im in images]).astype(np.float32)
    return l2_rows(x - x.mean(axis=0))


def histogram_features(images: list[np.ndarray]) -> np.ndarray:
    x = np.stack([np.histogram(im, bins=64, range=(0, 256))[0] for im in images]).astype(np.float32)
    x /= x.sum(axis=1, keepdims=True)
    return l2_rows(x - x.mean(axis=0))


@dataclass
class RankedLists:
    """For every query row, all other rows ordered by cosine similarity (exact; N x N is fine to 20k)."""

    order: np.ndarray

    @classmethod
    def build(cls, vectors: np.ndarray) -> "RankedLists":
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        return cls(order=np.argsort(-sims, axis=1, kind="stable")[:, :-1])


def retrieval_metrics(ranked: RankedLists, labels: np.ndarray, patients: np.ndarray, ks: list[int]) -> dict:
    """precision@k and mAP for one label column, same-patient images excluded; and precision@k with them
    counted like anyone's (``precision@k, same patient counted``), the rule of some published figures: a
    woman's other breast is usually her nearest image and shares her tissue, so it inflates label hits."""
    valid = present(labels)
    precision = {k: [] for k in ks}
    counted = {k: [] for k in ks}
    average_precisions = []
    for q in np.nonzero(valid)[0]:
        others = ranked.order[q][valid[ranked.order[q]]]
        candidates = others[patients[others] != patients[q]]
        relevant = labels[candidates] == labels[q]
        for k in ks:
            precision[k].append(relevant[:k].mean() if len(relevant) >= 1 else 0.0)
            counted[k].append((labels[others[:k]] == labels[q]).mean() if len(others) >= 1 else 0.0)
        if relevant.any():
            hits = np.cumsum(relevant)
            average_precisions.append(float((hits[relevant] / (np.nonzero(relevant)[0] + 1)).mean()))
        else:
            average_precisions.append(0.0)
    return {**{f"precision@{k}": float(np.mean(v)) for k, v in precision.items()},
            "mAP": float(np.mean(average_precisions)), "queries": int(valid.sum()),
            **{f"precision@{k}, same patient counted": float(np.mean(v)) for k, v in counted.items()}}


def contralateral_hit_rate(ranked: RankedLists, patients: np.ndarray, lateralities: np.ndarray,
                           ks: list[int]) -> dict:
    """How often the same woman's other breast is among the top k (only the query itself is excluded)."""
    result = {}
    queries = [q for q in range(len(patients)) if lateralities[q] in ("L", "R") and np.any(
        (patients == patients[q]) & (lateralities != lateralities[q]) & np.isin(lateralities, ["L", "R"]))]
    for k in ks:
        hits = [np.any((patients[ranked.order[q, :k]] == patients[q])
                       & (lateralities[ranked.order[q, :k]] != lateralities[q])) for q in queries]
        result[f"contralateral@{k}"] = float(np.mean(hits)) if hits else None
    result["queries"] = len(queries)
    return result


def classifier_metrics(features: np.ndarray, labels: np.ndarray, patients: np.ndarray, seed: int = 0) -> dict:
    """Balanced accuracy and Cohen's kappa of four classifiers, out-of-fold, folds split by patient."""
    valid = present(labels)
    x, y, groups = features[valid], np.asarray(labels[valid]).astype(str), patients[valid]
    classes, counts = np.unique(y, return_counts=True)
    n_groups = len(np.unique(groups))
    if len(classes) < 2 or n_groups < 3:
        return {"skipped": f"{len(classes)} classes over {n_groups} patients: too few to cross-validate"}
    folds = list(GroupKFold(n_splits=min(5, n_groups)).split(x, y, groups))
    if any(len(np.unique(y[train])) < 2 for train, _ in folds):
        return {"skipped": f"{len(classes)} classes over {n_groups} patients: a training fold would hold one "
                           "class only, too few to cross-validate"}
    smallest_fold = min(len(train) for train, _ in folds)  # kNN cannot ask for more neighbours than that
    models = {
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=min(5, smallest_fold),
                                                                    metric="cosine")),
        "logistic_regression": make_pipeline(StandardScaler(), LogisticRegression(
            max_iter=2000, class_weight="balanced", C=0.1)),
        "svm": make_pipeline(StandardScaler(), SVC(kernel="rbf", class_weight="balanced", random_state=seed)),
        "random_forest": RandomForestClassifier(n_estimators=200, class_weight="balanced", random_state=seed,
                                                n_jobs=-1),
    }
    out = {}
    for name, model in models.items():
        predicted = np.empty(len(y), dtype=object)
        for train, test in folds:
            model.fit(x[train], y[train])
            predicted[test] = model.predict(x[test])
        out[name] = {"balanced_accuracy": float(balanced_accuracy_score(y, predicted.astype(str))),
                     "cohen_kappa": float(cohen_kappa_score(y, predicted.astype(str)))}
    out["class_counts"] = {str(c): int(n) for c, n in zip(classes, counts)}
    return out


def evaluate_space(features: np.ndarray, labels: pd.DataFrame, columns: list[str], patients: np.ndarray,
                   lateralities: np.ndarray, ks: list[int]) -> dict:
    ranked = RankedLists.build(l2_rows(features))
    result = {"contralateral": contralateral_hit_rate(ranked, patients, lateralities, ks), "labels": {}}
    for column in columns:
        values = labels[column].to_numpy(dtype=object)
        result["labels"][column] = {"retrieval": retrieval_metrics(ranked, values, patients, ks),
                                    "classifiers": classifier_metrics(features, values, patients)}
    return result


def heldout_patients(checkpoint: str) -> set[str]:
    """The women a checkpoint from `mretrieve train` never saw (recorded in its metadata); a
    .safetensors file (the shipped built-in weights) records them as JSON in its header."""
    try:
        if str(checkpoint).endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(str(checkpoint), "pt") as fh:
                recorded = (fh.metadata() or {}).get("heldout_patients")
            data = {"heldout_patients": json.loads(recorded)} if recorded else {}
        else:
            import torch
            data = torch.load(checkpoint, map_location="cpu", weights_only=True).get("data") or {}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise MammoRetrievalError(f"{checkpoint}: cannot read its held-out women: {type(exc).__name__}: {exc}",
                                  hint="give a checkpoint of `mretrieve train` or a built-in's .safetensors") from None
    hint = ("give a checkpoint of `mretrieve train --holdout-fraction 0.2` (the default holds none out) or a "
            "built-in's .safetensors (an adapter's held-out women are in its training report)")
    if not isinstance(data, dict) or "heldout_patients" not in data:
        raise ConfigError(f"{checkpoint} records no held-out patients", hint=hint)
    if not data["heldout_patients"]:
        raise ConfigError(f"{checkpoint} holds no woman out: its training saw every woman it could be "
                          "evaluated on", hint=hint)
    return set(data["heldout_patients"])


def _other_version(corpus: Corpus, sops: list[str]) -> np.ndarray | str:
    """Another model version's vectors for ``sops`` (in that order), or why it cannot be compared."""
    from mammo_retrieval.analysis.vectors import load_embeddings
    if corpus.model_version_id is None:
        return "no vectors of this version in the catalog"
    table = load_embeddings(corpus)
    rows, missing = table.rows_of(sops)
    if missing:
        return f"{missing} of the {len(sops)} evaluated images have no vector of this version"
    return table.vectors[rows]


def space_name(corpus: Corpus, live: bool = False) -> str:
    """``encoder:<model version key>``; `` (serving)`` marks the version this process serves (the live one,
    unless the config pins weights) among several."""
    return f"encoder:{corpus.identity.key}" + (" (serving)" if live else "")


def evaluate(corpus: Corpus, labels_csv: str, *, columns: list[str] | None = None,
             ks: tuple[int, ...] = (1, 5, 10), patients: set[str] | None = None,
             others: list[Corpus] = (), on_progress: Progress | None = None) -> dict:
    """The serving encoder and the two references, on the labelled images (of ``patients`` only, if given).

    ``others``: more model versions of the same catalog (e.g. every version a reindex kept), measured on
    exactly the same images in the same run; a version lacking some of them is listed as skipped."""
    from mammo_retrieval.analysis.labels import join_labels, label_columns, read_labels
    from mammo_retrieval.analysis.vectors import load_embeddings
    progress = on_progress or (lambda step, done, total: None)
    if not ks or min(ks) < 1:
        raise ConfigError(f"k must be at least 1 for precision@k, got {', '.join(map(str, ks)) or 'nothing'}",
                          hint="e.g. --k 1,5,10")
    raw_labels = read_labels(labels_csv)
    columns = label_columns(raw_labels, columns, labels_csv)
    progress("loading vectors", 0, 1)
    table = load_embeddings(corpus)
    aligned, join = join_labels(table.meta, raw_labels)
    labelled = aligned[columns].replace("", pd.NA).notna().any(axis=1).to_numpy()
    keep = labelled if patients is None else labelled & table.meta.patient_id.isin(patients).to_numpy()
    if keep.sum() < 4:
        raise LabelsError(f"only {int(keep.sum())} indexed images have labels (joined on {join})",
                          hint="check that the labels CSV describes the ingested archive")
    if max(ks) > keep.sum() - 1:
        raise ConfigError(f"k={max(ks)} is more than the {int(keep.sum()) - 1} other images each of the "
                          f"{int(keep.sum())} labelled images can retrieve",
                          hint=f"choose k between 1 and {int(keep.sum()) - 1}")
    meta = table.meta[keep].reset_index(drop=True)
    aligned = aligned[keep].reset_index(drop=True)
    patient_ids = meta.patient_id.fillna("").to_numpy(dtype=object)
    lateralities = meta.laterality.fillna("").to_numpy(dtype=object)
    images = []
    for i, sop in enumerate(meta.sop_instance_uid):
        progress("reading the cached images for the references", i, len(meta))
        images.append(corpus.picture(sop))
    spaces = {space_name(corpus, live=bool(others)): table.vectors[keep]}
    skipped = {}
    for other in others:
        progress(f"loading the vectors of {other.identity.key}", 0, 1)
        vectors = _other_version(other, list(meta.sop_instance_uid))
        if isinstance(vectors, str):
            skipped[space_name(other)] = vectors
        else:
            spaces[space_name(other)] = vectors
    spaces |= {"raw_pixels_32x32": raw_pixel_features(images), "histogram_64": histogram_features(images)}
    ks = sorted(set(ks))
    report = {"labels_csv": str(labels_csv), "joined_on": join, "images": int(keep.sum()),
              "patients": int(len(set(patient_ids))), "label_columns": columns, "k": ks,
              "restricted_to_patients": None if patients is None else len(patients),
              "random_weights": corpus.identity.random_weights, "spaces": {}, "skipped_versions": skipped}
    for i, (name, features) in enumerate(spaces.items()):
        progress(f"retrieval and classifier metrics for {name} ({i + 1} of {len(spaces)})", 0, 1)
        report["spaces"][name] = evaluate_space(features, aligned, columns, patient_ids, lateralities, ks)
    return report


def _cell(value: float | None) -> str:
    """A metric for the table; None (nothing to measure, e.g. no woman with both breasts) is 'n/a'."""
    return "n/a" if value is None else f"{value:.3f}"


def to_markdown(report: dict) -> str:
    ks = report["k"]
    lines = ["# Embedding evaluation", "",
             f"{report['images']} images of {report['patients']} patients; labels joined on {report['joined_on']}."
             + (" **The encoder has random weights.**" if report["random_weights"] else ""),
             "Label retrieval excludes the query patient's own images; classifiers are 5-fold by patient.", "",
             "## Retrieval", "",
             "| space | " + " | ".join(f"contralateral@{k}" for k in ks) + " | "
             + " | ".join(f"{c} P@{k}" for c in report["label_columns"] for k in ks) + " | "
             + " | ".join(f"{c} mAP" for c in report["label_columns"]) + " |"]
    lines.append("|" + "---|" * (1 + len(ks) + len(ks) * len(report["label_columns"]) + len(report["label_columns"])))
    for name, space in report["spaces"].items():
        cells = [_cell(space["contralateral"][f"contralateral@{k}"]) for k in ks]
        cells += [_cell(space["labels"][c]["retrieval"][f"precision@{k}"]) for c in report["label_columns"] for k in ks]
        cells += [_cell(space["labels"][c]["retrieval"]["mAP"]) for c in report["label_columns"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, reason in report.get("skipped_versions", {}).items():
        lines.append(f"\nNot compared: {name}: {reason}.")
    lines += _same_patient_counted(report)
    lines += ["", "## Classifiers (balanced accuracy / Cohen's kappa)", ""]
    for column in report["label_columns"]:
        lines += [f"### {column}", "", "| space | knn | logistic_regression | svm | random_forest |", "|---|---|---|---|---|"]
        for name, space in report["spaces"].items():
            clf = space["labels"][column]["classifiers"]
            if "skipped" in clf:
                lines.append(f"| {name} | {clf['skipped']} | | | |")
                continue
            cells = [f"{clf[m]['balanced_accuracy']:.3f} / {clf[m]['cohen_kappa']:.3f}"
                     for m in ("knn", "logistic_regression", "svm", "random_forest")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _same_patient_counted(report: dict) -> list[str]:
    """The label precision with the query patient's own other images counted, for comparing with figures
    measured that way (reports written before this metric existed lack it: no section)."""
    ks, columns = report["k"], report["label_columns"]
    key = "precision@{k}, same patient counted"
    spaces = {name: space for name, space in report["spaces"].items()
              if all(key.format(k=k) in space["labels"][c]["retrieval"] for c in columns for k in ks)}
    if not spaces:
        return []
    lines = ["", "Label precision with the query patient's own other images counted like anyone's (the rule of "
             "some published figures; higher, since a woman's other images usually share her labels):", "",
             "| space | " + " | ".join(f"{c} P@{k}" for c in columns for k in ks) + " |",
             "|" + "---|" * (1 + len(ks) * len(columns))]
    for name, space in spaces.items():
        cells = [_cell(space["labels"][c]["retrieval"][key.format(k=k)]) for c in columns for k in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _plain(value: object) -> object:
    """A numpy number as the number it is; anything else JSON cannot take as its text."""
    return value.item() if isinstance(value, np.generic) else str(value)


def write_evaluation(report: dict, out_json: str | os.PathLike, out_md: str | os.PathLike,
                     markdown: Callable[[dict], str] = to_markdown) -> None:
    """The report as JSON and as Markdown (``markdown``: the study-level one renders its own), each written
    whole or not at all."""
    write_bytes_atomic(Path(out_json), (json.dumps(report, indent=2, default=_plain) + "\n").encode())
    write_bytes_atomic(Path(out_md), (markdown(report) + "\n").encode())
