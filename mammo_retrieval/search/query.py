"""k-NN search with metadata filters, in separate steps: nearest vectors (the index), their records
(the catalog), filtering, and hits. A study-level ranker can reuse the first two and fuse instead of
filtering image by image. The query image is never its own hit."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.core.errors import ConfigError
from mammo_retrieval.search.filters import LATERALITIES

if TYPE_CHECKING:
    from mammo_retrieval.storage.catalog import Database
    from mammo_retrieval.storage.index import VectorIndex

OVERFETCH = 8  # extra neighbours fetched so that filtered-out ones rarely force a second search


@dataclass(frozen=True)
class QueryFilters:
    view: str | None = None
    laterality: str | None = None
    exclude_same_patient: bool = False

    def __post_init__(self) -> None:
        if self.laterality not in (None, *LATERALITIES):
            raise ConfigError(f"laterality filter must be L or R, not '{self.laterality}'")


@dataclass(frozen=True)
class QueryImage:
    sop_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    laterality: str | None
    view: str | None
    path: str
    study_key: str | None = None  # its study's key (AccessionNumber, else StudyInstanceUID), for a study query


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
    picture: np.ndarray | None = field(default=None, repr=False, compare=False)  # the query's model input
    model_key: str | None = field(default=None, compare=False)  # the model that ranked it (a KOS names it)

    def as_dict(self) -> dict:
        return {"query": asdict(self.query), "hits": [asdict(h) for h in self.hits]}


def keep(record: repo.ImageRecord, query: QueryImage, filters: QueryFilters) -> bool:
    """Whether a candidate may be shown for this query under these filters."""
    if record.sop_instance_uid == query.sop_instance_uid:
        return False
    if filters.exclude_same_patient and query.patient_id and record.patient_id == query.patient_id:
        return False
    if filters.view and (record.view or "").upper() != filters.view.upper():
        return False
    if filters.laterality and record.laterality != filters.laterality:
        return False
    return True


def nearest(index: "VectorIndex", vector: np.ndarray, fetch: int) -> list[tuple[float, int]]:
    """(score, vector id) of the ``fetch`` nearest vectors, best first."""
    scores, ids = index.search(vector, fetch)
    return [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]


def records(db: "Database", vector_ids: list[int]) -> dict[int, repo.ImageRecord]:
    """What the catalog knows of these vectors' images (a vector the catalog lost is simply absent)."""
    with db.session() as s:
        return repo.records_by_vector_ids(s, vector_ids)


def candidates(db: "Database", index: "VectorIndex", vector: np.ndarray,
               first_fetch: int) -> Iterator[list[tuple[float, repo.ImageRecord]]]:
    """Ever larger neighbour lists with their records, the fetch growing fourfold until the index is exhausted."""
    fetch = min(first_fetch, max(index.ntotal, 1))
    known: dict[int, repo.ImageRecord] = {}
    looked_up: set[int] = set()
    while True:
        pairs = nearest(index, vector, fetch)
        new_ids = [i for _, i in pairs if i not in looked_up]  # a wider round reads only the new ones
        known.update(records(db, new_ids))
        looked_up.update(new_ids)
        yield [(score, known[vid]) for score, vid in pairs if vid in known]
        if fetch >= index.ntotal:
            return
        fetch = min(index.ntotal, fetch * 4)


def to_hit(rank: int, score: float, record: repo.ImageRecord) -> Hit:
    return Hit(rank=rank, score=round(score, 6), accession_number=record.accession_number,
               patient_id=record.patient_id, laterality=record.laterality, view=record.view,
               sop_instance_uid=record.sop_instance_uid, path=record.path)


def search(db: "Database", index: "VectorIndex", vector: np.ndarray, query: QueryImage, k: int,
           filters: QueryFilters) -> QueryResult:
    """The k best neighbours that pass the filters (over-fetching until k pass or the index is exhausted)."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, not {k}")
    hits: list[Hit] = []
    for found in candidates(db, index, vector, k + OVERFETCH):
        kept = [(score, record) for score, record in found if keep(record, query, filters)][:k]
        hits = [to_hit(rank, score, record) for rank, (score, record) in enumerate(kept, start=1)]
        if len(hits) == k:
            break
    return QueryResult(query=query, hits=hits)
