"""`mretrieve evaluate --level study`: study labels retrieved by study-level search under each fusion rule,
beside the per-image baseline on the same labelled images, in one run.

A study's label for a column is the value its images share (the most common); for a finding column, a study
takes its images' finding as soon as one has one (any value but NORM/normal/none), normal otherwise. Retrieval is exact (every
study against every other), same-patient studies excluded, as the image-level metrics exclude same-patient
images.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from mammo_retrieval.analysis.evaluate import RankedLists, l2_rows, retrieval_metrics
from mammo_retrieval.analysis.labels import LabelsError, present
from mammo_retrieval.core.errors import ConfigError
from mammo_retrieval.search.study import RULES, Study, StudyImage, fuse
from mammo_retrieval.storage.catalog.corpus import Corpus

NORMAL = {"", "NORM", "NORMAL", "NONE", "BENIGN_WITHOUT_CALLBACK"}


def study_label(values: list) -> object:
    """The study's label from its images' labels: a finding wins over normal, else the most common value."""
    given = [str(v) for v in values if v is not None and not pd.isna(v) and str(v) != ""]
    if not given:
        return pd.NA
    findings = [v for v in given if v.upper() not in NORMAL]
    return Counter(findings or given).most_common(1)[0][0]


def study_ranked_lists(studies: list[Study], rule: str) -> RankedLists:
    n = len(studies)
    scores = np.full((n, n), -np.inf)
    for i, query in enumerate(studies):
        for j, candidate in enumerate(studies):
            if i != j:
                scores[i, j] = fuse(query, candidate, rule)[0]
    return RankedLists(order=np.argsort(-scores, axis=1, kind="stable")[:, :-1])


def evaluate_studies(corpus: Corpus, labels_csv: str, *, columns: list[str] | None = None,
                     ks: tuple[int, ...] = (1, 5, 10), patients: set[str] | None = None) -> dict:
    """Every fusion rule and the per-image baseline on the labelled images (of ``patients`` only, if given:
    e.g. the women a model never saw in training)."""
    from mammo_retrieval.analysis.labels import join_labels, label_columns, read_labels
    from mammo_retrieval.analysis.vectors import load_embeddings
    if not ks or min(ks) < 1:
        raise ConfigError("k must be at least 1 for precision@k", hint="e.g. --k 1,5,10")
    raw = read_labels(labels_csv)
    columns = label_columns(raw, columns, labels_csv)
    table = load_embeddings(corpus)
    aligned, join = join_labels(table.meta, raw)
    labelled = aligned[columns].replace("", pd.NA).notna().any(axis=1).to_numpy()
    if patients is not None:
        labelled = labelled & table.meta.patient_id.isin(patients).to_numpy()
    meta = table.meta[labelled].reset_index(drop=True)
    aligned = aligned[labelled].reset_index(drop=True)
    vectors = table.vectors[labelled]
    keys = list(dict.fromkeys(meta.study_key))
    if len(keys) < 3:
        raise LabelsError(f"only {len(keys)} labelled studies (joined on {join})",
                          hint="check that the labels CSV describes the ingested archive")
    if max(ks) > len(keys) - 1:
        raise ConfigError(f"k={max(ks)} is more than the {len(keys) - 1} other studies",
                          hint=f"choose k between 1 and {len(keys) - 1}")
    rows_of = {key: np.nonzero(meta.study_key.to_numpy() == key)[0] for key in keys}
    studies = [Study(key, None, None, meta.patient_id.iat[rows[0]],
                     tuple(StudyImage(meta.sop_instance_uid.iat[r], meta.laterality.iat[r], meta.view.iat[r],
                                      meta.path.iat[r], vectors[r]) for r in rows)) for key, rows in rows_of.items()]
    study_patients = np.array([s.patient_id or f"study:{s.study_key}" for s in studies], dtype=object)
    image_patients = meta.patient_id.fillna("").to_numpy(dtype=object)
    ks = sorted(set(ks))
    image_ranked = RankedLists.build(l2_rows(vectors))
    report = {"level": "study", "labels_csv": str(labels_csv), "joined_on": join, "label_columns": columns,
              "k": ks, "studies": len(studies), "images": len(meta),
              "restricted_to_patients": None if patients is None else len(patients),
              "patients_found": len(set(meta.patient_id)), "image_level": {}, "rules": {}}
    for column in columns:
        values = aligned[column].to_numpy(dtype=object)
        report["image_level"][column] = retrieval_metrics(image_ranked, values, image_patients, ks)
    for rule in RULES:
        ranked = study_ranked_lists(studies, rule)
        report["rules"][rule] = {}
        for column in columns:
            labels = np.array([study_label(list(aligned[column].to_numpy(dtype=object)[rows_of[s.study_key]]))
                               for s in studies], dtype=object)
            report["rules"][rule][column] = retrieval_metrics(ranked, labels, study_patients, ks) \
                if present(labels).sum() >= 2 else {"skipped": "fewer than two labelled studies"}
    return report


def to_markdown(report: dict) -> str:
    lines = [f"Study-level evaluation: {report['studies']} studies ({report['images']} images), labels "
             f"joined on {report['joined_on']}; same-patient studies (images) excluded"
             + (f"; only the studies of the given patients ({report['patients_found']} of the "
                f"{report['restricted_to_patients']} found)" if report.get("restricted_to_patients") else "") + ".", ""]
    ks = report["k"]
    header = "| level | label | " + " | ".join(f"precision@{k}" for k in ks) + " | mAP |"
    lines += [header, "|" + "---|" * (len(ks) + 3)]
    rows = [("image", c, m) for c, m in report["image_level"].items()]
    rows += [(f"study ({rule})", c, m) for rule, per in report["rules"].items() for c, m in per.items()]
    for level, column, m in rows:
        if "skipped" in m:
            lines.append(f"| {level} | {column} | " + " | ".join("n/a" for _ in ks) + " | n/a |")
            continue
        lines.append(f"| {level} | {column} | " + " | ".join(f"{m[f'precision@{k}']:.3f}" for k in ks)
                     + f" | {m['mAP']:.3f} |")
    return "\n".join(lines)
