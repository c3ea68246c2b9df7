"""Join a labels CSV to the indexed images: on SOPInstanceUID, on file path, or on AccessionNumber."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mammo_retrieval.core.errors import ConfigError


class LabelsError(ConfigError):
    """A labels CSV that cannot be used as given: unreadable, nothing to join on, or a wrong label column.

    One class (a usage error, exit 2) for every command that reads labels, so the same mistake always
    exits the same way.
    """

ID_COLUMNS = {"file", "path", "imagepath", "accessionnumber", "patientid", "sopinstanceuid", "studyinstanceuid",
              "laterality", "view", "x", "y", "radius", "sha256", "split"}


def read_labels(path: str | Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise LabelsError(f"labels file not found: {path}") from None
    except Exception as exc:
        raise LabelsError(f"{path}: cannot read labels CSV: {exc}") from None


def _find(labels: pd.DataFrame, *names: str) -> str | None:
    lowered = {c.lower().replace("_", ""): c for c in labels.columns}
    return next((lowered[n] for n in names if n in lowered), None)


def join_labels(meta: pd.DataFrame, labels: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Label rows aligned with ``meta`` (NaN where an image has no label) and the join used.

    Several rows for one image (MIAS: two lesions) keep the first, as the image-level label.
    """
    if (col := _find(labels, "sopinstanceuid")) is not None:
        by = labels.drop_duplicates(col).set_index(col)
        return by.reindex(meta.sop_instance_uid.values).reset_index(drop=True), f"SOPInstanceUID ({col})"
    if (col := _find(labels, "file", "path", "imagepath")) is not None:
        by = labels.drop_duplicates(col)
        keys = {k.replace("\\", "/").lstrip("./"): i for i, k in enumerate(by[col])}
        positions = []
        for path in meta.path:
            parts = Path(path).as_posix().split("/")
            hit = next((keys[s] for s in ("/".join(parts[i:]) for i in range(len(parts))) if s in keys), None)
            positions.append(hit)
        rows = [by.iloc[p] if p is not None else pd.Series(dtype=object) for p in positions]
        return pd.DataFrame(rows).reset_index(drop=True), f"file path ({col}, matched as a path suffix)"
    if (col := _find(labels, "accessionnumber")) is not None:
        by = labels.drop_duplicates(col).set_index(col)
        return by.reindex(meta.accession_number.values).reset_index(drop=True), f"AccessionNumber ({col})"
    raise LabelsError("labels CSV has no SOPInstanceUID, file/path or AccessionNumber column to join on",
                      hint=f"its columns: {', '.join(map(str, labels.columns))}")


def label_columns(labels: pd.DataFrame, requested: list[str] | None = None, source: str | Path = "the labels CSV"
                  ) -> list[str]:
    """The requested label columns (each must exist), else every categorical column that is not an id."""
    if requested:
        missing = [c for c in requested if c not in labels.columns]
        if missing:
            raise LabelsError(f"label column(s) {', '.join(missing)} not in {source}",
                              hint=f"its columns: {', '.join(map(str, labels.columns))}")
        return list(requested)
    found = [c for c in labels.columns if c.lower().replace("_", "") not in ID_COLUMNS
             and 1 < labels[c].replace("", pd.NA).dropna().nunique() <= 50]
    if not found:
        raise LabelsError(f"{source} has no categorical label column (2 to 50 distinct values besides ids)",
                          hint=f"name one with --label-column; its columns: {', '.join(map(str, labels.columns))}")
    return found


def present(values) -> np.ndarray:
    """Which label values are real: not missing, not an empty string (the one rule every analysis uses)."""
    series = pd.Series(values)
    return (series.notna() & (series.astype(str) != "")).to_numpy(dtype=bool) if len(series) else np.zeros(0, bool)
