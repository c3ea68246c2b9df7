"""Pure pixel transforms, applied in DICOM order: modality LUT, then VOI, then presentation.

Each takes explicit parameters instead of a dataset so that it can be tested alone.
"""
from __future__ import annotations

import numpy as np


def apply_rescale(pixels: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Modality LUT by RescaleSlope/Intercept, as float32. Identity skips arithmetic (keeps values exact)."""
    out = pixels.astype(np.float32, copy=False)
    if slope == 1.0 and intercept == 0.0:
        return out
    return (out * np.float32(slope) + np.float32(intercept)).astype(np.float32, copy=False)


def apply_linear_window(pixels: np.ndarray, center: float, width: float,
                        out_min: float = 0.0, out_max: float = 1.0, function: str = "LINEAR") -> np.ndarray:
    """VOI windowing (PS3.3 C.11.2.1.2): LINEAR, LINEAR_EXACT or SIGMOID, into [out_min, out_max]."""
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise ValueError(f"invalid WindowWidth {width}")
    x = pixels.astype(np.float64, copy=False)
    span = out_max - out_min
    if function == "SIGMOID":
        y = span / (1.0 + np.exp(-4.0 * (x - center) / width)) + out_min
    elif function == "LINEAR_EXACT":
        y = np.clip((x - center) / width + 0.5, 0.0, 1.0) * span + out_min
    else:  # LINEAR
        y = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * span + out_min
    return y.astype(np.float32)


def invert_monochrome1(pixels: np.ndarray) -> np.ndarray:
    """Presentation: MONOCHROME1 stores dark as high; invert as the PRIMER card does (max - x)."""
    return np.max(pixels) - pixels


def to_presentation(pixels: np.ndarray, photometric: str, *, slope: float = 1.0, intercept: float = 0.0,
                    window: tuple[float, float, str] | None = None) -> np.ndarray:
    """Stored values -> float32 image where brighter means denser tissue."""
    out = apply_rescale(pixels, slope, intercept)
    if window is not None:
        center, width, function = window
        out = apply_linear_window(out, center, width, 0.0, 4095.0, function)
    if photometric == "MONOCHROME1":
        out = invert_monochrome1(out)
    return out
