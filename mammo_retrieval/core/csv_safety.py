"""CSV cells that a spreadsheet would run as formulas are neutralised, in every CSV this package writes.

DICOM header fields (AccessionNumber, PatientID, ...) and file paths come from the archive, so anyone who
can place a file there controls them. A cell such as ``=HYPERLINK("http://x","y")`` opened in Excel or
LibreOffice is a formula. OWASP's advice: prefix a single quote to text cells that begin with ``= + - @``,
a tab or a carriage return. Only text is touched: numbers (negative scores included) stay numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammo_retrieval.core.fileio import write_bytes_atomic

if TYPE_CHECKING:
    import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: Any) -> Any:
    """``value`` with a leading ``'`` if it is text a spreadsheet would evaluate; anything else unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def neutralise_row(row: dict) -> dict:
    return {key: neutralise(value) for key, value in row.items()}


def neutralise_frame(frame: "pd.DataFrame") -> "pd.DataFrame":
    """A copy with every text column neutralised (numeric columns are left as they are)."""
    import pandas as pd
    out = frame.copy()
    for column in out.columns:
        series = out[column]
        if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
            out[column] = series.map(neutralise, na_action="ignore")
    return out


def write_frame(frame: "pd.DataFrame", path: str | Path) -> None:
    """``frame.to_csv(path, index=False)``, formula-safe, and all or nothing (a kill leaves the old file or
    the new one, never a torn one)."""
    write_bytes_atomic(Path(path), neutralise_frame(frame).to_csv(index=False).encode("utf-8"))
