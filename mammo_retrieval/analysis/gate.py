"""Evaluation gates for a reindex: the live and the new model version measured on the same labelled
images, with the same metric, in one run; the switch is refused when the new one is worse by more than a
tolerance. This is what makes "finetune, then reindex" safe to run on a schedule."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from mammo_retrieval.analysis.evaluate import RankedLists, contralateral_hit_rate, l2_rows, retrieval_metrics
from mammo_retrieval.analysis.labels import LabelsError
from mammo_retrieval.core.errors import ConfigError, MammoRetrievalError
from mammo_retrieval.storage.catalog.corpus import Corpus

_METRIC = re.compile(r"^(?:(?P<column>[^:]+):(?:p@(?P<k>\d+)|(?P<map>map))|contralateral@(?P<ck>\d+))$", re.I)


@dataclass(frozen=True)
class GateMetric:
    """``<label column>:p@<k>``, ``<label column>:map`` or ``contralateral@<k>``."""

    text: str
    column: str | None
    k: int | None
    kind: str  # precision | map | contralateral

    @classmethod
    def parse(cls, text: str) -> "GateMetric":
        m = _METRIC.match(text.strip())
        if not m or (m["k"] is not None and int(m["k"]) < 1) or (m["ck"] is not None and int(m["ck"]) < 1):
            raise ConfigError(f"gate metric {text!r} is not understood",
                              hint="use <label column>:p@<k> (e.g. tissue:p@10), <label column>:map, "
                                   "or contralateral@<k>")
        if m["ck"]:
            return cls(text, None, int(m["ck"]), "contralateral")
        if m["map"]:
            return cls(text, m["column"], None, "map")
        return cls(text, m["column"], int(m["k"]), "precision")


@dataclass(frozen=True)
class GateResult:
    metric: str
    live: float
    new: float
    tolerance: float
    images: int

    @property
    def passed(self) -> bool:
        return self.new >= self.live - self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "difference": round(self.new - self.live, 6), "passed": self.passed}

    def describe(self) -> str:
        verdict = "passes" if self.passed else "fails"
        return (f"gate {self.metric} on {self.images} labelled images: live {self.live:.4f}, new {self.new:.4f} "
                f"({self.new - self.live:+.4f}; tolerance {self.tolerance}) -> {verdict}")


class GateFailed(MammoRetrievalError):
    """The new model version measured worse than the live one by more than the tolerance: not switched."""

    code = "gate_failed"
    exit_code = 13

    def __init__(self, result: GateResult) -> None:
        super().__init__(f"reindex did not switch: {result.describe()}",
                         hint="the new vectors are kept; pass --force to switch anyway")
        self.result = result


def measure(corpus: Corpus, labels: pd.DataFrame, metric: GateMetric, sops: list[str]) -> float:
    """The metric of one model version's vectors over the images ``sops`` (in that order)."""
    from mammo_retrieval.analysis.vectors import load_embeddings
    table = load_embeddings(corpus)
    rows, missing = table.rows_of(sops)
    if missing:
        raise MammoRetrievalError(f"{missing} labelled images have no vector of {corpus.identity.key}",
                                  hint="the reindex must embed every image before it is gated")
    ranked = RankedLists.build(l2_rows(table.vectors[rows]))
    meta = table.meta.iloc[rows]
    patients = meta.patient_id.fillna("").to_numpy(dtype=object)
    if metric.kind == "contralateral":
        value = contralateral_hit_rate(ranked, patients, meta.laterality.fillna("").to_numpy(dtype=object),
                                       [metric.k])[f"contralateral@{metric.k}"]
        if value is None:
            raise MammoRetrievalError("no woman has both breasts among the labelled images: contralateral@k "
                                      "cannot be measured")
        return float(value)
    values = labels[metric.column].to_numpy(dtype=object)
    scores = retrieval_metrics(ranked, values, patients, [metric.k or 10])
    return float(scores["mAP"] if metric.kind == "map" else scores[f"precision@{metric.k}"])


def check_gate(labels_csv: str, metric_text: str | None, tolerance: float) -> GateMetric:
    """The gate's arguments, checked before any work: the tolerance, the metric, and its label column."""
    from mammo_retrieval.analysis.labels import label_columns, read_labels
    if tolerance < 0:
        raise ConfigError(f"--tolerance must be 0 or more, got {tolerance}")
    raw = read_labels(labels_csv)
    columns = label_columns(raw, None, labels_csv)
    metric = GateMetric.parse(metric_text or f"{columns[0]}:p@10")
    if metric.column is not None and metric.column not in columns:
        raise ConfigError(f"gate metric {metric.text!r}: {labels_csv} has no label column {metric.column!r}",
                          hint=f"label columns: {', '.join(columns)}")
    return metric


def gate(live: Corpus, new: Corpus, labels_csv: str, metric_text: str | None, tolerance: float) -> GateResult:
    """Both versions on the images the labels describe; the default metric is the first label column's p@10."""
    from mammo_retrieval.analysis.labels import join_labels, label_columns, read_labels
    from mammo_retrieval.analysis.vectors import load_embeddings
    metric = check_gate(labels_csv, metric_text, tolerance)
    raw = read_labels(labels_csv)
    columns = label_columns(raw, None, labels_csv)
    table = load_embeddings(live)
    aligned, _ = join_labels(table.meta, raw)
    wanted = columns if metric.column is None else [metric.column]
    labelled = aligned[wanted].replace("", pd.NA).notna().any(axis=1).to_numpy()
    if labelled.sum() < 4:
        raise LabelsError(f"only {int(labelled.sum())} indexed images have labels in {labels_csv}",
                          hint="check that the labels CSV describes the ingested archive")
    sops = list(table.meta.sop_instance_uid[labelled])
    labels = aligned[labelled].reset_index(drop=True)
    return GateResult(metric.text, measure(live, labels, metric, sops), measure(new, labels, metric, sops),
                      tolerance, int(np.sum(labelled)))
