"""Fast path for integer images: the same result as the card's float pipeline, computed cheaply.

* Percentiles from a histogram (``np.bincount``) instead of a partial sort of the float image, using
  numpy's own linear interpolation between order statistics.
* The clip + min-max + uint8 step is a function of the stored integer value alone, so it becomes a
  lookup table built with the card's float32 arithmetic, applied with one ``take``.
This gives the same uint8 image as the float path (tests hold it on random and real images) at a
fraction of the cost; ``display_from_stored`` falls back to the float path where it would not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mammo_retrieval.dicom.codestream import power_of_two_reduction
from mammo_retrieval.preprocess.primer import PreprocessSettings, finish_display, to_display_uint8

if TYPE_CHECKING:
    from mammo_retrieval.dicom.reader import StoredImage


def histogram_percentiles(counts: np.ndarray, offset: int, qs: tuple[float, ...],
                          dtype=np.float64) -> list[float]:
    """np.percentile(x.astype(dtype), qs) (method 'linear') from the histogram of integer x
    (counts[v - offset]), interpolating in ``dtype`` as numpy does, so the values are bit-identical."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    out = []
    for q in qs:
        h = (n - 1) * q / 100.0
        below = int(np.floor(h))
        t = dtype(h - below)
        a = dtype(int(np.searchsorted(cumulative, below + 1)) + offset)  # the order statistic `below`
        b = dtype(int(np.searchsorted(cumulative, min(below + 1, n - 1) + 1)) + offset)
        diff = b - a
        # numpy's _lerp: a + (b - a) * t, or b - (b - a) * (1 - t) when t >= 0.5
        out.append(b - diff * (dtype(1) - t) if t >= 0.5 else a + diff * t)
    return out


def scaling_lut(counts: np.ndarray, offset: int, low: float, high: float) -> np.ndarray:
    """The card's percentile clip + min-max to uint8 as a table over the values offset ..
    offset + len(counts) - 1 of an integer image whose histogram is ``counts`` (integer counts)."""
    p_lo, p_hi = histogram_percentiles(counts, offset, (low, high))
    # np.percentile returns float64 even for a float32 image, so the card's clip and scaling run in float64
    values = np.arange(offset, offset + len(counts), dtype=np.float64)
    clipped = np.clip(values, p_lo, p_hi)
    lo, hi = clipped.min(), clipped.max()
    return ((clipped - lo) / (hi - lo + 1e-8) * 255).astype(np.uint8)


def percentile_scale_uint8_integer(stored: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 image equal to ``percentile_scale_uint8(stored.astype(float32), low, high)``."""
    if stored.dtype.kind not in "ui":
        raise TypeError("fast path needs an integer image")
    smallest, largest = int(stored.min()), int(stored.max())
    shifted = stored.astype(np.int64, copy=False) - smallest if smallest else stored
    counts = np.bincount(shifted.ravel(), minlength=largest - smallest + 1)
    lut = scaling_lut(counts, smallest, low, high)
    return lut[shifted] if smallest else lut[stored]


def downscale_early(image: "StoredImage", target: int) -> "StoredImage":
    """Area-average the decoded image down to the power-of-two reduction that keeps the model size, so
    that scaling and CLAHE run on ~1/r^2 of the pixels (what a reduced JPEG 2000 decode gives for free)."""
    import dataclasses

    import cv2
    if image.reduction > 1 or image.stored.dtype.kind not in "ui" or image.stored.itemsize > 2:
        return image
    rows, columns = image.stored.shape
    r = power_of_two_reduction(rows, columns, target)
    if r == 1:
        return image
    size = (-(-columns // r), -(-rows // r))
    return dataclasses.replace(image, stored=cv2.resize(image.stored, size, interpolation=cv2.INTER_AREA),
                               reduction=r)


def display_from_stored(image: "StoredImage", settings: PreprocessSettings, *, sampled: bool = True) -> np.ndarray:
    """uint8 model-size image by the integer path where it is exact (integer pixels, identity modality
    LUT, no VOI window), by the card's float path otherwise. ``sampled``: on a large enough uint8/uint16
    image, evaluate CLAHE only where the resize reads (``preprocess.sampled``; the same output)."""
    from mammo_retrieval.preprocess import sampled as sampled_path
    stored = image.stored
    if (stored.dtype.kind in "ui" and image.slope == 1.0 and image.intercept == 0.0
            and not (settings.voi_window and image.window)):
        monochrome1 = image.header.photometric == "MONOCHROME1"
        if sampled and sampled_path.applies(stored, settings):
            return sampled_path.display_sampled(stored, settings, monochrome1=monochrome1)
        if monochrome1:
            stored = stored.max() - stored  # the card's max - x, still exact in integers
        return finish_display(percentile_scale_uint8_integer(stored, *settings.percentiles), settings)
    return to_display_uint8(image.presentation(settings.voi_window), settings)
