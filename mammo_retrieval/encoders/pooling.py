"""Embedding pictures that may be volumes: a 2-D picture is one model input; a (K, H, W) stack (frames of a
tomosynthesis volume) is K inputs whose embeddings are mean-pooled, then L2-normalised, into one vector.
All inputs of a batch go through the model together."""
from __future__ import annotations

import numpy as np

from mammo_retrieval.encoders.base import Encoder
from mammo_retrieval.preprocess import normalise


def embed_pictures(encoder: Encoder, pictures: list[np.ndarray]) -> np.ndarray:
    """uint8 pictures, each (H, W) or (K, H, W) -> float32 (len(pictures), dim), unit rows.

    An adapter (an encoder with ``base`` and ``project``) pools its base's vectors, then projects: the way
    a reindex maps stored vectors, so a volume gets one vector whichever path made it."""
    if hasattr(encoder, "project") and hasattr(encoder, "base"):
        return encoder.project(embed_pictures(encoder.base, pictures))
    stacks = [p[None] if p.ndim == 2 else p for p in pictures]
    counts = [len(s) for s in stacks]
    vectors = encoder.embed(normalise(np.concatenate(stacks), encoder.settings))
    if all(c == 1 for c in counts):
        return vectors
    bounds = np.cumsum([0, *counts])
    pooled = np.stack([vectors[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
    return (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float32)
