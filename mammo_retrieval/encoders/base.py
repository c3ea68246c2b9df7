"""What the rest of the package needs from an encoder, whatever builds it (timm today; transformers and
ONNX Runtime families plug in behind the same surface)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mammo_retrieval.core.identity import ModelIdentity
from mammo_retrieval.preprocess import PreprocessSettings


@runtime_checkable
class Encoder(Protocol):
    """Batch of normalised images in, unit vectors out. ``settings`` is the model's own preprocessing
    (size, mean/std, interpolation), so callers prepare pixels exactly as the model was trained on;
    ``identity`` keys its index and catalog rows."""

    settings: PreprocessSettings
    identity: ModelIdentity

    @property
    def dim(self) -> int: ...

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, dim), each row of unit length."""
        ...
