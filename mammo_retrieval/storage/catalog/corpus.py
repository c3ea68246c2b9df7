"""One model version's corpus as the analyses and training read it: the catalog (vectors and metadata),
the model's identity, and a way to get each image's preprocessed picture.

It lets ``analysis`` and ``train`` take exactly what they need instead of a whole workspace."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mammo_retrieval.core.errors import NotFoundError
from mammo_retrieval.core.identity import ModelIdentity
from mammo_retrieval.storage.catalog.database import Database

Picture = Callable[[str], np.ndarray]  # SOPInstanceUID -> uint8 model-size image (from the cache, or rebuilt)


@dataclass(frozen=True)
class Corpus:
    db: Database
    identity: ModelIdentity
    model_version_id: int | None  # None: this model has no vectors in the database yet
    picture: Picture

    def require_vectors(self) -> int:
        """The model version id, or a clear error when this model has embedded nothing."""
        if self.model_version_id is None:
            raise NotFoundError("no vectors for the configured model", hint="ingest an archive first")
        return self.model_version_id
