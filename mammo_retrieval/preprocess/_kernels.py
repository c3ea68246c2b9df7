"""Compiled loops that numpy cannot express without a full-size temporary. numba is already in the
dependency tree (umap-learn); the kernels compile on first use and are cached beside this file."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def tile_histograms_kernel(image: np.ndarray, tile_h: int, tile_w: int, tiles_y: int, tiles_x: int,
                           bins: int) -> np.ndarray:  # pragma: no cover - compiled
    """Histogram of each tile of ``image`` (tiles in row-major order), one pass over the pixels.

    np.bincount per tile costs twice as much (a copy and an intp cast of every tile), and cv2.calcHist is
    3x slower again under OpenCV's default thread count."""
    out = np.zeros((tiles_y * tiles_x, bins), np.int32)
    for ty in range(tiles_y):
        for y in range(ty * tile_h, (ty + 1) * tile_h):
            row = image[y]
            for tx in range(tiles_x):
                hist = out[ty * tiles_x + tx]
                for x in range(tx * tile_w, (tx + 1) * tile_w):
                    hist[row[x]] += 1
    return out
