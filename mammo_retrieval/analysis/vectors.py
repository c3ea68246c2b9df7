"""Load one model version's vectors and their image metadata, side by side, in one pass."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.storage.catalog.corpus import Corpus
from mammo_retrieval.core.errors import NotFoundError

META_COLUMNS = repo.EMBEDDING_TABLE_COLUMNS


@dataclass
class EmbeddingTable:
    """Row i of ``vectors`` belongs to row i of ``meta`` (ordered by vector id)."""

    vectors: np.ndarray
    meta: pd.DataFrame

    def __len__(self) -> int:
        return len(self.meta)

    def rows_of(self, sops: list[str]) -> tuple[list[int], int]:
        """The rows holding ``sops`` (in that order; absent ones left out) and how many are absent: to
        compare two model versions on exactly the same images."""
        position = {sop: i for i, sop in enumerate(self.meta.sop_instance_uid)}
        rows = [position[sop] for sop in sops if sop in position]
        return rows, len(sops) - len(rows)


def load_embeddings(corpus: Corpus) -> EmbeddingTable:
    """All vectors of the corpus's model, filled into one preallocated array (held once in memory)."""
    mv_id = corpus.require_vectors()
    dim = corpus.identity.dim
    with corpus.db.session() as s:
        count, _ = repo.embedding_stats(s, mv_id)
        if count == 0:
            raise NotFoundError("no vectors for the configured model", hint="ingest an archive first")
        rows = repo.embedding_table_rows(s, mv_id)
        vectors = np.empty((count, dim), dtype=np.float32)
        position = 0
        for ids, chunk in repo.iter_vectors(s, mv_id, dim):
            vectors[position:position + len(ids)] = chunk
            position += len(ids)
    meta = pd.DataFrame(rows, columns=META_COLUMNS)
    return EmbeddingTable(vectors=vectors, meta=meta)
