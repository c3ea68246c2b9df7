"""Load one model version's vectors and their image metadata, side by side, in one pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sqlalchemy import select

from ..db import repository as repo
from ..db.models import Embedding, Image, Study
from ..errors import NotFoundError

if TYPE_CHECKING:
    from ..api import Workspace

META_COLUMNS = ["vector_id", "image_id", "sop_instance_uid", "accession_number", "study_key",
                "study_instance_uid", "series_instance_uid", "patient_id", "laterality", "view", "manufacturer",
                "path", "rows", "columns", "photometric", "transfer_syntax"]


@dataclass
class EmbeddingTable:
    """Row i of ``vectors`` belongs to row i of ``meta`` (ordered by vector id)."""

    vectors: np.ndarray
    meta: pd.DataFrame

    def __len__(self) -> int:
        return len(self.meta)


def load_embeddings(ws: "Workspace") -> EmbeddingTable:
    """All vectors of the configured model, filled into one preallocated array (held once in memory)."""
    mv_id = ws._existing_model_version_id()
    if mv_id is None:
        raise NotFoundError("no vectors for the configured model", hint="run `mretrieve ingest ARCHIVE_DIR` first")
    dim = ws.encoder.identity.dim
    with ws.db.session() as s:
        count, _ = repo.embedding_stats(s, mv_id)
        if count == 0:
            raise NotFoundError("no vectors for the configured model", hint="run `mretrieve ingest` first")
        rows = s.execute(
            select(Embedding.id, Image.id, Image.sop_instance_uid, Study.accession_number, Study.study_key,
                   Image.study_instance_uid, Image.series_instance_uid, Image.patient_id, Image.laterality,
                   Image.view, Image.manufacturer, Image.path, Image.rows, Image.columns, Image.photometric,
                   Image.transfer_syntax)
            .join(Image, Image.id == Embedding.image_id).join(Study, Study.id == Image.study_id)
            .where(Embedding.model_version_id == mv_id).order_by(Embedding.id)).all()
        vectors = np.empty((count, dim), dtype=np.float32)
        position = 0
        for ids, chunk in repo.iter_vectors(s, mv_id, dim):
            vectors[position:position + len(ids)] = chunk
            position += len(ids)
    meta = pd.DataFrame(rows, columns=META_COLUMNS)
    return EmbeddingTable(vectors=vectors, meta=meta)
