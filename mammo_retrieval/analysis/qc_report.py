"""A self-contained HTML page of the top outliers and duplicate pairs, with thumbnails (inline PNG)."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd

from mammo_retrieval.core.fileio import write_bytes_atomic

if TYPE_CHECKING:
    from mammo_retrieval.storage.catalog.corpus import Picture
    from mammo_retrieval.analysis.qc import QcResult

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:200px;font-size:12px}
.card img{width:184px;height:184px;object-fit:contain;background:#000;display:block;margin-bottom:4px}
.pair{display:flex;gap:8px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;margin:6px 0}
.pair img{width:160px;height:160px;object-fit:contain;background:#000}
.flag{color:#b00;font-weight:600;overflow-wrap:anywhere}.new{color:#06a;font-weight:600}.path{color:#666;word-break:break-all}
"""


def text(value: object, missing: str = "—") -> str:
    """A header value for the page: absent values (None, NaN, pandas NA, empty) show as a dash, never "nan"."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value) or str(value) == "":
        return missing
    return html.escape(str(value))


def previous_rank(value: object, top: int) -> str:
    """Where the last sweep put this image: "was #N", and NEW when it was not among that sweep's top."""
    if value is None or pd.isna(value):
        return ' · <span class=new>NEW</span> (not in the last sweep)'
    badge = " <span class=new>NEW</span>" if int(value) > top else ""
    return f" · was #{int(value)}{badge}"


def _correlation(pair) -> str:
    value = getattr(pair, "pixel_correlation", None)
    return "not checked" if value is None or pd.isna(value) else f"{value:.4f}"


def thumbnail(picture: "Picture", sop: str) -> str:
    try:
        image = picture(sop)
    except Exception as exc:  # a vanished file must not cost the whole report
        return f'<div class="flag">no thumbnail: {html.escape(str(exc))}</div>'
    ok, png = cv2.imencode(".png", np.ascontiguousarray(image))
    return f'<img alt="{html.escape(sop)}" src="data:image/png;base64,{base64.b64encode(png.tobytes()).decode()}">'


def write_html(picture: "Picture", result: "QcResult", path: Path, top: int) -> None:
    """The report; ``picture`` gives each thumbnail's preprocessed image by SOPInstanceUID."""
    e = html.escape
    parts = [f"<!doctype html><meta charset=utf-8><title>mretrieve QC</title><style>{STYLE}</style>",
             f"<h1>QC sweep: {e(result.method)}</h1>",
             f"<p>{len(result.scores)} images; neighbours: {e(result.neighbours_method)}; "
             f"k={result.params.get('k')}; duplicate threshold {result.params.get('dup_threshold')}</p>",
             f"<h2>Top {min(top, len(result.scores))} outliers</h2><div class=grid>"]
    if result.previous_run_id is not None:
        parts.insert(-1, f"<p>Compared with the previous {e(result.method)} sweep (run {result.previous_run_id}): "
                         f"each card says the image's rank then; NEW marks one that was not in its top {top}.</p>")
    for r in result.scores.head(top).itertuples():
        was = previous_rank(getattr(r, "previous_rank", None), top) if result.previous_run_id is not None else ""
        parts.append(
            f'<div class=card>{thumbnail(picture, r.sop_instance_uid)}<b>#{r.rank}</b> score {r.score:.4f}'
            f'{was}<br>{text(r.accession_number)} · '
            f'{text(r.patient_id)} · {text(r.laterality, "?")} {text(r.view, "?")}'
            f'{"<br><span class=flag>" + e(r.flags.replace(";", ", ")) + "</span>" if r.flags else ""}'
            f'<div class=path>{e(r.path)}</div></div>')
    parts.append("</div>")
    flagged = result.scores[result.scores["flags"] != ""]
    parts.append(f"<h2>Header-versus-content flags ({len(flagged)})</h2><div class=grid>")
    for r in flagged.head(top).itertuples():
        parts.append(f'<div class=card>{thumbnail(picture, r.sop_instance_uid)}<span class=flag>{e(r.flags.replace(";", ", "))}</span>'
                     f'<br>rank {r.rank}<div class=path>{e(r.path)}</div></div>')
    parts.append(f"</div><h2>Near-duplicate pairs ({len(result.duplicates)})</h2>")
    for r in result.duplicates.head(top).itertuples():
        parts.append(f'<div class=pair>{thumbnail(picture, r.sop_instance_uid_a)}{thumbnail(picture, r.sop_instance_uid_b)}'
                     f'<div>cosine {r.similarity:.5f}<br>pixel correlation {_correlation(r)}<div class=path>{e(r.path_a)}<br>{e(r.path_b)}</div>'
                     f'</div></div>')
    write_bytes_atomic(path, "\n".join(parts).encode("utf-8"))
