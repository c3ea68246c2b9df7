"""The PRIMER preprocessing pipeline (primer-model-card.txt), split into pure steps.

``to_display_uint8`` does steps 3-6 (percentile clip, min-max to uint8, CLAHE, resize) and yields the
uint8 image a cache can keep; ``normalise`` does steps 5 and 8 (grey to RGB, ImageNet mean/std).
MONOCHROME1 inversion (step 2) is a presentation transform and lives in ``dicom.pixels``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from mammo_retrieval.core.config import PreprocessConfig

CV2_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA,
                     "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes the model input. Its digest is recorded with every vector."""

    percentiles: tuple[float, float] = (2.0, 98.0)
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: tuple[int, int] = (8, 8)
    size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    voi_window: bool = False
    flip_to_side: str | None = None
    crop_to_breast: bool = False
    interpolation: str = "bilinear"  # the model's own resize (its registry entry)

    @classmethod
    def from_config(cls, cfg: PreprocessConfig, *, size: tuple[int, int], mean: tuple[float, ...],
                    std: tuple[float, ...], interpolation: str = "bilinear") -> "PreprocessSettings":
        """User preprocessing options plus the encoder's own input size and normalisation."""
        return cls(percentiles=tuple(float(p) for p in cfg.percentiles),
                   clahe_clip_limit=float(cfg.clahe_clip_limit),
                   clahe_tile_grid=tuple(int(g) for g in cfg.clahe_tile_grid),
                   size=tuple(size), mean=tuple(mean), std=tuple(std), voi_window=bool(cfg.voi_window),
                   flip_to_side=cfg.flip_to_side, crop_to_breast=bool(cfg.crop_to_breast),
                   interpolation=interpolation)

    def as_dict(self) -> dict:
        """The settings as stored with every model version. The bilinear default is left out, so the
        digests of indexes made before interpolation was a setting stay valid."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if out["interpolation"] == "bilinear":
            del out["interpolation"]
        return out

    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def percentile_scale_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to the [low, high] percentiles and min-max scale to uint8, with the card's exact arithmetic."""
    image = image.astype(np.float32, copy=False)
    p_lo, p_hi = np.percentile(image, (low, high))
    image = np.clip(image, p_lo, p_hi)
    lo, hi = image.min(), image.max()
    return ((image - lo) / (hi - lo + 1e-8) * 255).astype(np.uint8)


def breast_bounding_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the largest bright component (Otsu threshold)."""
    _, mask = cv2.threshold(image, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return 0, image.shape[0], 0, image.shape[1]
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[largest, :4])
    return y, y + h, x, x + w


def side_margin(image: np.ndarray) -> float:
    """(left - right) / (left + right) signal: near +-1 when the breast clearly lies against one edge."""
    half = image.shape[1] // 2
    left, right = float(image[:, :half].sum()), float(image[:, half:].sum())
    return (left - right) / (left + right) if left + right else 0.0


def breast_side(image: np.ndarray) -> str:
    """'L' or 'R': the half of the image holding more signal (the breast lies against one edge)."""
    return "L" if side_margin(image) >= 0 else "R"


def to_display_uint8(pixels: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """Steps 3, 4 and 6 of the card (and the optional crop/flip): float image -> uint8 (H, W)."""
    return finish_display(percentile_scale_uint8(pixels, *settings.percentiles), settings)


def finish_display(image: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """After intensity scaling: optional crop/flip, CLAHE, resize to the model size (the model's interpolation)."""
    if settings.crop_to_breast:
        top, bottom, left, right = breast_bounding_box(image)
        image = np.ascontiguousarray(image[top:bottom, left:right])
    if settings.flip_to_side:
        # judged from the pixels, so a missing or wrong laterality tag cannot mirror the wrong way
        side = breast_side(image)
        if side != settings.flip_to_side:
            image = np.ascontiguousarray(image[:, ::-1])
    clahe = cv2.createCLAHE(clipLimit=settings.clahe_clip_limit, tileGridSize=tuple(settings.clahe_tile_grid))
    image = clahe.apply(image)
    height, width = settings.size
    # resizing one channel then replicating equals resizing the RGB copy (channels are independent)
    return cv2.resize(image, (width, height), interpolation=CV2_INTERPOLATION[settings.interpolation])


def normalise(display: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """uint8 (H, W) or (N, H, W) -> float32 (3, H, W) or (N, 3, H, W), ImageNet-normalised."""
    grey = display.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(settings.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(settings.std, dtype=np.float32).reshape(3, 1, 1)
    out = (grey[..., None, :, :] - mean) / std
    return out.astype(np.float32, copy=False)


def preprocess(pixels: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """The whole pipeline: presentation-ready float image -> float32 (3, H, W) model input."""
    return normalise(to_display_uint8(pixels, settings), settings)
