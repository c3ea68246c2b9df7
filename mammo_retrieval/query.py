"""k-NN search with metadata filters. The query image is never its own hit."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .db import repository as repo
from .errors import MammoRetrievalError

if TYPE_CHECKING:
    from .index import VectorIndex
    from .db import Database


@dataclass(frozen=True)
class QueryFilters:
    view: str | None = None
    laterality: str | None = None
    exclude_same_patient: bool = False

    def __post_init__(self) -> None:
        if self.laterality not in (None, "L", "R"):
            raise MammoRetrievalError(f"laterality filter must be L or R, not '{self.laterality}'")


@dataclass(frozen=True)
class QueryImage:
    sop_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    laterality: str | None
    view: str | None
    path: str


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    accession_number: str | None
    patient_id: str | None
    laterality: str | None
    view: str | None
    sop_instance_uid: str
    path: str


@dataclass
class QueryResult:
    query: QueryImage
    hits: list[Hit] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"query": asdict(self.query), "hits": [asdict(h) for h in self.hits]}


def _keep(record: repo.ImageRecord, query: QueryImage, filters: QueryFilters) -> bool:
    if record.sop_instance_uid == query.sop_instance_uid:
        return False
    if filters.exclude_same_patient and query.patient_id and record.patient_id == query.patient_id:
        return False
    if filters.view and (record.view or "").upper() != filters.view.upper():
        return False
    if filters.laterality and record.laterality != filters.laterality:
        return False
    return True


def search(db: "Database", index: "VectorIndex", vector: np.ndarray, query: QueryImage, k: int,
           filters: QueryFilters) -> QueryResult:
    """Over-fetch and filter, doubling the fetch until k hits pass or the index is exhausted."""
    if k < 1:
        raise MammoRetrievalError(f"k must be at least 1, not {k}")
    result = QueryResult(query=query)
    fetch = k + 8
    while True:
        scores, ids = index.search(vector, fetch)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        with db.session() as s:
            records = repo.records_by_vector_ids(s, [i for _, i in pairs])
        hits = []
        for score, vid in pairs:
            record = records.get(vid)
            if record is None or not _keep(record, query, filters):
                continue
            hits.append(Hit(rank=len(hits) + 1, score=round(score, 6), accession_number=record.accession_number,
                            patient_id=record.patient_id, laterality=record.laterality, view=record.view,
                            sop_instance_uid=record.sop_instance_uid, path=record.path))
            if len(hits) == k:
                break
        if len(hits) == k or fetch >= index.ntotal:
            result.hits = hits
            return result
        fetch = min(index.ntotal, fetch * 4)
