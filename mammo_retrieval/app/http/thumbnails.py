"""PNG thumbnails of indexed images, made from the preprocessed cache and kept in a small in-memory LRU.

Sizes up to the model's input come from the model's own cache. A larger view (a side-by-side comparison)
is prepared once at a display size of 256, 512 or 1024 px with the same PRIMER transforms, stored in the
image cache under that preprocessing's digest, and scaled from there. A picture that is in no cache is
prepared from the image's stored file; when that file is gone or unreadable, the image is not found (the
server's archive is at fault, not the request)."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from typing import Callable

import cv2
import numpy as np

from mammo_retrieval.core.errors import ConfigError, DicomRejected, NotFoundError
from mammo_retrieval.preprocess import PreprocessSettings

logger = logging.getLogger(__name__)

MIN_SIZE, MAX_SIZE = 32, 1024
DISPLAY_SIZES = (256, 512, 1024)


def encode_png(image: np.ndarray, size: int) -> bytes:
    """uint8 (H, W) scaled so that its longer side is ``size`` px, as PNG bytes."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    if scale != 1.0:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interpolation)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(image, dtype=np.uint8))
    if not ok:
        raise ValueError("PNG encoding failed")
    return png.tobytes()


def source_settings(model: PreprocessSettings, size: int) -> PreprocessSettings:
    """The preprocessing a thumbnail of ``size`` px is scaled from: the model's, or a larger display one."""
    if size < MIN_SIZE or size > MAX_SIZE:
        raise ConfigError(f"thumbnail size must be {MIN_SIZE} to {MAX_SIZE} px, not {size}")
    if size <= max(model.size):
        return model
    side = next(s for s in DISPLAY_SIZES if s >= size)
    return dataclasses.replace(model, size=(side, side))


class ThumbnailCache:
    """(preprocessing digest, SOPInstanceUID, size) -> PNG bytes, least recently used first out."""

    def __init__(self, picture: Callable[[str, PreprocessSettings], np.ndarray], entries: int = 1024) -> None:
        self._picture = picture
        self._entries = entries
        self._cache: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def etag(model: PreprocessSettings, sop_instance_uid: str, size: int) -> str:
        key = f"{model.digest()}:{sop_instance_uid}:{size}".encode()
        return '"' + hashlib.sha256(key).hexdigest()[:32] + '"'

    def png(self, model: PreprocessSettings, sop_instance_uid: str, size: int) -> bytes:
        settings = source_settings(model, size)
        key = (model.digest(), sop_instance_uid, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            picture = self._picture(sop_instance_uid, settings)
        except DicomRejected as exc:  # the indexed image's own file, rejected: no fault of the request
            logger.warning("thumbnail of %s: its stored file cannot be prepared: %s", sop_instance_uid, exc.message)
            raise NotFoundError(f"indexed image {sop_instance_uid} has no cached picture at {size} px and its "
                                f"stored file cannot be read ({exc.code})",
                                hint="was the archive's file moved or deleted? restore it, or ingest it again "
                                     "from where it is now") from None
        png = encode_png(picture, size)
        with self._lock:
            self._cache[key] = png
            while len(self._cache) > self._entries:
                self._cache.popitem(last=False)
        return png
