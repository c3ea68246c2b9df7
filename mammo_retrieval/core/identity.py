"""Model identity, kept free of torch so that status and index code can use it cheaply."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelIdentity:
    """What must match between an index and a query: encoder, weights and preprocessing."""

    encoder: str
    weights_sha256: str
    preprocess_digest: str
    dim: int
    random_weights: bool
    weights_path: str | None

    @classmethod
    def from_record(cls, record) -> "ModelIdentity":
        """The identity a catalog row (a ``model_versions`` record, or anything with its attributes) stores."""
        return cls(record.encoder, record.weights_sha256, record.preprocess_digest, record.dim,
                   record.random_weights, record.weights_path)

    @property
    def key(self) -> str:
        """Short stable name of this model version (also the index directory's name)."""
        encoder = self.encoder.replace(":", "-")  # timm:<arch> names: the key is also a folder name
        return f"{encoder}-{self.weights_sha256[:12]}-{self.preprocess_digest[:8]}"
