"""Cheap header-versus-content checks on the cached model-size image (no DICOM decoding).

Thresholds were set on the MIAS and CBIS-DDSM corpora, where they flag nothing (tests hold that).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from mammo_retrieval.preprocess.primer import breast_side, side_margin

DARK, BRIGHT = 16, 239
# below this margin the breast fills the frame and the side is a guess (MIAS mdb151/152: 0.07, 0.11)
CLEAR_SIDE_MARGIN = 0.15


def looks_blank(image: np.ndarray) -> bool:
    """Nothing but a flat field: a failed or empty exposure."""
    return float(image.std()) < 4.0


def looks_inverted(image: np.ndarray) -> bool:
    """Mammogram backgrounds are black; a white background means a wrong photometric tag."""
    dark = float((image <= DARK).mean())
    bright = float((image >= BRIGHT).mean())
    return bright > 0.2 and bright > 3 * dark


def side_convention(pairs: list[tuple[str | None, str]]) -> dict[str, str]:
    """The archive's own majority mapping laterality -> side of the image the breast lies on."""
    convention = {}
    for laterality in ("L", "R"):
        sides = Counter(side for lat, side in pairs if lat == laterality)
        if sides:
            convention[laterality] = sides.most_common(1)[0][0]
    return convention


def header_flags(image: np.ndarray, laterality: str | None, view: str | None,
                 convention: dict[str, str]) -> list[str]:
    flags = []
    if looks_blank(image):
        flags.append("blank_image")
        return flags
    if looks_inverted(image):
        flags.append("looks_inverted")
    if laterality is None:
        flags.append("missing_laterality")
    elif (laterality in convention and abs(side_margin(image)) >= CLEAR_SIDE_MARGIN
          and breast_side(image) != convention[laterality]):
        flags.append("laterality_disagrees_with_image")
    if view is None:
        flags.append("missing_view")
    return flags
