"""The card's steps 3-6 for integer images, evaluated only where the final resize looks.

The card applies CLAHE to the full-resolution image (12.7 MP on CBIS-DDSM) and then shrinks it to 224 x 224
with a bilinear resize, which reads just two source rows and two source columns per output pixel. CLAHE at a
pixel depends only on that pixel and on the lookup tables of its neighbouring tiles, and those tables depend
only on each tile's histogram. So the same uint8 result comes from:

1. one pass of per-tile histograms of the stored integers (OpenCV's tiling and reflect-101 padding);
2. the global histogram from the tile histograms -> percentiles -> the card's clip/min-max lookup table
   (``fast.percentile_scale_uint8_integer``'s arithmetic);
3. each tile's uint8 histogram by summing its stored-value histogram over the table's runs;
4. OpenCV's clip/redistribute/cumulate tile tables, and its bilinear tile interpolation, in float32, at
   the ~(2 x 224)^2 pixels the resize reads; the resize itself is still ``cv2.resize``.

No full-size uint8 image is built and CLAHE never runs on 12.7 MP. Tests hold the output bit-identical to
``cv2.createCLAHE(...).apply`` + ``cv2.resize`` on random and real images.
"""
from __future__ import annotations

import cv2
import numpy as np

from mammo_retrieval.preprocess.fast import scaling_lut
from mammo_retrieval.preprocess.primer import PreprocessSettings


def applies(stored: np.ndarray, settings: PreprocessSettings) -> bool:
    """Whether the sampled path reproduces the full one for this image and these settings."""
    if stored.dtype not in (np.uint8, np.uint16) or stored.ndim != 2:
        return False
    if settings.crop_to_breast or settings.flip_to_side:
        return False  # both look at the whole uint8 image
    if settings.interpolation != "bilinear":
        return False  # the tap arithmetic below is cv2.INTER_LINEAR's
    height, width = settings.size
    # shrinking at least 2x: the resize then reads a small subset of pixels (and never extrapolates)
    return stored.shape[0] >= 2 * height and stored.shape[1] >= 2 * width


def resize_taps(source: int, target: int) -> np.ndarray:
    """Source indices that ``cv2.resize(..., INTER_LINEAR)`` reads along one axis (OpenCV's coordinate
    mapping: centre-aligned, clamped at the borders), sorted and unique."""
    scale = 1.0 / (target / source)  # OpenCV: scale = 1 / inv_scale with inv_scale = dsize / ssize
    positions = ((np.arange(target) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(positions).astype(np.int64)
    taps = np.concatenate([first, first + 1])
    return np.unique(np.clip(taps, 0, source - 1))


def _padding(shape: tuple[int, int], tiles: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns OpenCV's CLAHE appends (reflect-101) so that the tiles divide the image.

    It pads both axes as soon as either does not divide, and then a dividing axis gets a whole extra tile
    row's worth (tiles - 0); reproduced as written."""
    rows, cols = shape
    tiles_y, tiles_x = tiles
    if rows % tiles_y == 0 and cols % tiles_x == 0:
        return 0, 0
    return tiles_y - rows % tiles_y, tiles_x - cols % tiles_x


def tile_histograms(stored: np.ndarray, tiles: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(per-tile histograms (tiles_y * tiles_x, max + 1), global histogram of the unpadded image, tile size)."""
    bins = int(stored.max()) + 1
    pad_y, pad_x = _padding(stored.shape, tiles)
    padded = cv2.copyMakeBorder(stored, 0, pad_y, 0, pad_x, cv2.BORDER_REFLECT_101) if pad_y or pad_x else stored
    tiles_y, tiles_x = tiles
    tile_h, tile_w = padded.shape[0] // tiles_y, padded.shape[1] // tiles_x

    from mammo_retrieval.preprocess._kernels import tile_histograms_kernel

    def hist(region: np.ndarray) -> np.ndarray:
        return np.bincount(region.ravel(), minlength=bins)

    per_tile = tile_histograms_kernel(padded, tile_h, tile_w, tiles_y, tiles_x, bins)
    total = per_tile.sum(axis=0, dtype=np.int64)
    rows, cols = stored.shape
    if pad_y:
        total -= hist(padded[rows:, :])
    if pad_x:
        total -= hist(padded[:rows, cols:])
    return per_tile, total, (tile_h, tile_w)


def scaling_table(counts: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 lookup table over 0..len(counts)-1: ``fast.scaling_lut`` over the values that occur (the
    table of ``fast.percentile_scale_uint8_integer``, hence of the float path)."""
    present = np.flatnonzero(counts)
    smallest, largest = int(present[0]), int(present[-1])
    table = np.empty(len(counts), dtype=np.uint8)
    table[smallest:largest + 1] = scaling_lut(counts[smallest:largest + 1].astype(np.int64), smallest, low, high)
    table[:smallest], table[largest + 1:] = table[smallest], table[largest]  # values that do not occur
    return table


def mapped_histograms(per_tile: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Per-tile histograms of ``table[value]`` (256 bins) from per-tile histograms of value."""
    change = np.diff(table.astype(np.int16))
    if np.all(change >= 0):  # monotone: each output level is one run of values
        starts = np.concatenate([[0], np.flatnonzero(change) + 1])
        out = np.zeros((per_tile.shape[0], 256), dtype=np.int64)
        out[:, table[starts]] = np.add.reduceat(per_tile, starts, axis=1)
        return out
    return np.rint(np.stack([np.bincount(table, weights=h, minlength=256) for h in per_tile])).astype(np.int64)


def clahe_tables(hist8: np.ndarray, tile_area: int, clip_limit: float) -> np.ndarray:
    """OpenCV's CLAHE tile tables (uint8, one row per tile) from the tiles' uint8 histograms."""
    bins = hist8.shape[1]
    hist = hist8.copy()
    if clip_limit > 0:
        limit = max(int(clip_limit * tile_area / bins), 1)
        clipped = np.maximum(hist - limit, 0).sum(axis=1)
        np.minimum(hist, limit, out=hist)
        batch = clipped // bins
        hist += batch[:, None]
        for row, residual in enumerate(clipped - batch * bins):
            if residual:
                step = max(bins // int(residual), 1)
                hist[row, np.arange(0, bins, step)[:int(residual)]] += 1
    scale = np.float32(bins - 1) / np.float32(tile_area)
    cumulative = np.cumsum(hist, axis=1).astype(np.float32)
    return np.clip(np.rint(cumulative * scale), 0, 255).astype(np.uint8)


def _tile_weights(positions: np.ndarray, tile: int, tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's (first tile, second tile, weight of first, weight of second) per position, in float32."""
    inverse = np.float32(1.0) / np.float32(tile)
    coordinate = positions.astype(np.float32) * inverse - np.float32(0.5)
    first = np.floor(coordinate).astype(np.int64)
    second_weight = coordinate - first.astype(np.float32)
    first_weight = np.float32(1.0) - second_weight
    return np.maximum(first, 0), np.minimum(first + 1, tiles - 1), first_weight, second_weight


def clahe_at(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, tables: np.ndarray,
             tile_size: tuple[int, int], tiles: tuple[int, int]) -> np.ndarray:
    """CLAHE output at the grid ``rows`` x ``cols`` of a uint8 image whose values there are ``values``."""
    tiles_y, tiles_x = tiles
    ty1, ty2, ya1, ya = _tile_weights(rows, tile_size[0], tiles_y)
    tx1, tx2, xa1, xa = _tile_weights(cols, tile_size[1], tiles_x)
    flat, bins = tables.ravel(), tables.shape[1]
    v = values.astype(np.intp)

    def lookup(ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
        return flat.take((ty[:, None] * (tiles_x * bins) + tx[None, :] * bins) + v).astype(np.float32)

    upper = lookup(ty1, tx1) * xa1[None, :] + lookup(ty1, tx2) * xa[None, :]
    lower = lookup(ty2, tx1) * xa1[None, :] + lookup(ty2, tx2) * xa[None, :]
    result = upper * ya1[:, None] + lower * ya[:, None]
    return np.clip(np.rint(result), 0, 255).astype(np.uint8)


def display_sampled(stored: np.ndarray, settings: PreprocessSettings, *, monochrome1: bool = False) -> np.ndarray:
    """uint8 model-size image equal to ``finish_display(percentile_scale_uint8_integer(x), settings)`` with
    x = stored (or max - stored for MONOCHROME1). Call only where :func:`applies` holds."""
    tiles = (int(settings.clahe_tile_grid[1]), int(settings.clahe_tile_grid[0]))  # OpenCV's Size is (x, y)
    per_tile, counts, tile_size = tile_histograms(stored, tiles)
    top = len(counts) - 1  # the image's maximum
    if monochrome1:  # work on u = max - v: reverse the value axis
        per_tile, counts = per_tile[:, top::-1], counts[top::-1]
    table = scaling_table(counts, *settings.percentiles)
    tables = clahe_tables(mapped_histograms(per_tile, table), tile_size[0] * tile_size[1],
                          settings.clahe_clip_limit)
    height, width = settings.size
    rows, cols = resize_taps(stored.shape[0], height), resize_taps(stored.shape[1], width)
    grid = stored[np.ix_(rows, cols)].astype(np.int64)
    if monochrome1:
        grid = top - grid
    canvas = np.zeros(stored.shape, dtype=np.uint8)  # pixels off the taps are never read by the resize
    canvas[np.ix_(rows, cols)] = clahe_at(table[grid], rows, cols, tables, tile_size, tiles)
    return cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LINEAR)
