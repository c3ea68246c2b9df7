"""The warm read path: one serving encoder and one in-memory index per process, shared by every thread.

Built for a long-lived server as much as for a one-shot CLI query:
- another process's ingest saves the index (its manifest signature changes): the next query reopens it
  and catches up from the catalog;
- another process's ``reindex`` or ``rollback`` switches the live model: the next query rebuilds the
  encoder and opens that model's index;
- inference is serialised by a lock (torch already uses every core for one batch), while index searches
  and catalog reads run concurrently. A reload publishes a fully built index, so a query never sees a
  half-loaded one.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mammo_retrieval.core.config import Config, EncoderConfig
from mammo_retrieval.core.errors import ConfigError, IndexCorruptError, NotFoundError, Remedy, display_path
from mammo_retrieval.core.timing import Stopwatch
from mammo_retrieval.dicom.reader import InMemoryDicom, read_header
from mammo_retrieval.encoders.pooling import embed_pictures
from mammo_retrieval.search.query import QueryFilters, QueryImage, QueryResult, records, search
from mammo_retrieval.search.study import DEFAULT_RULE, Study, StudyImage, StudyResult, check_rule, rank_studies
from mammo_retrieval.storage.catalog import Database
from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.storage.index.lifecycle import IndexLifecycle
from mammo_retrieval.storage.index.manifest import Manifest
from mammo_retrieval.storage.index.versions import live_model_differs, serving_encoder_config

if TYPE_CHECKING:
    from mammo_retrieval.encoders import Encoder
    from mammo_retrieval.preprocess import PreprocessSettings
    from mammo_retrieval.storage.index import VectorIndex

logger = logging.getLogger(__name__)

Source = "str | Path | InMemoryDicom"  # a path, or an upload held in memory
STUDY_KEYS_REMEDY = Remedy("a study is keyed by its AccessionNumber, else its StudyInstanceUID; the export lists "
                           "both for every indexed image (joined.csv)", "export")
PrepareFn = Callable[["str | Path | InMemoryDicom", "PreprocessSettings"], object]  # -> Prepared


@dataclass(frozen=True)
class _Serving:
    """One query's model, its index and its catalog row, taken together: a model switch picked up by
    another thread mid-query cannot embed with one model and search another's index."""
    encoder: "Encoder"
    index: "VectorIndex"
    model_version_id: int


@dataclass(frozen=True)
class ServingInfo:
    """What is serving right now (a footer, /metrics, /healthz)."""
    model_key: str
    encoder: str
    random_weights: bool
    index_type: str
    ntotal: int
    runtime: str = "torch"  # what runs the encoder: torch or onnx (encoder.runtime)


class SearchService:
    """Queries by file, by stored image and by study, against whichever model is live."""

    def __init__(self, catalog: Callable[[], Database], config: Config,
                 build_encoder: Callable[[EncoderConfig], "Encoder"], prepare: PrepareFn) -> None:
        """``catalog`` returns the ready database (NotFoundError when there is none): it is called only
        when needed, so a query's file is checked before anything else is touched."""
        self._catalog = catalog
        self.config = config
        self._build_encoder = build_encoder
        self._prepare = prepare
        self._encoder: "Encoder | None" = None
        self._mv_id: int | None = None
        self._index: "VectorIndex | None" = None
        self._signature: tuple[int, int] | None = None
        self._state = threading.RLock()  # guards the three fields above
        self._inference = threading.Lock()

    @property
    def db(self) -> Database:
        return self._catalog()

    @property
    def lifecycle(self) -> IndexLifecycle:
        return IndexLifecycle(self.db, self.config.index_dir, self.config.index)

    # --- the serving model -------------------------------------------------------------------------
    @property
    def encoder(self) -> "Encoder":
        with self._state:
            if self._encoder is None:
                self._encoder = self._build_encoder(serving_encoder_config(self.config.encoder,
                                                                           self.config.index_dir))
                logger.info("serving encoder %s", self._encoder.identity.key)
            return self._encoder

    def model_version_id(self) -> int | None:
        """The serving model's catalog row, or None before anything was embedded with it."""
        with self._state:
            if self._mv_id is None:
                with self.db.session() as s:
                    self._mv_id = repo.model_version_id_by_key(s, self.encoder.identity.key)
            return self._mv_id

    def forget_model(self) -> None:
        """Drop encoder and index, to be rebuilt for whichever model is live (after reindex/rollback)."""
        with self._state:
            self._encoder, self._mv_id, self._index, self._signature = None, None, None, None

    def forget_index(self) -> None:
        """Drop the in-memory index (after this process wrote to it); the next query reopens it."""
        with self._state:
            self._index = None

    def follow_live(self) -> None:
        """Switch to the live model if another process changed it since this one was built."""
        with self._state:
            if self._encoder is not None and live_model_differs(self.config.encoder, self.config.index_dir,
                                                                self._encoder.identity.key):
                logger.info("live model changed from %s; reloading", self._encoder.identity.key)
                self.forget_model()

    def index(self) -> "VectorIndex":
        """The serving index, caught up in memory with the catalog."""
        with self._state:
            self.follow_live()
            return self._caught_up_index()

    def _caught_up_index(self) -> "VectorIndex":
        """The index of the model this service holds now (the caller has followed the live model)."""
        with self._state:
            if self._index is not None and Manifest.signature(self._index.directory) != self._signature:
                self._index = None  # another process saved this index (an ingest): reopen and catch up
            if self._index is None:
                self._index, self._signature = self._load_index()
            return self._index

    def _load_index(self) -> tuple["VectorIndex", tuple[int, int] | None]:
        identity = self.encoder.identity
        signature = Manifest.signature(self.lifecycle.directory(identity))
        mv_id = self.model_version_id()
        index = self.lifecycle.open(identity, model_version_id=mv_id)
        if mv_id is None:
            if index.ntotal:
                raise self.lifecycle.database_behind(index, 0)
            raise IndexCorruptError(f"the index in {index.directory} has no model version in the database",
                                    remedies=[Remedy("rebuild the index from the database", "index_rebuild"),
                                              Remedy("or check paths.database_url")])
        self.lifecycle.sync(index, mv_id, relayout=False)
        logger.info("index %s loaded: %d vectors (%s)", identity.key, index.ntotal, index.manifest.index_type)
        return index, signature

    def info(self) -> ServingInfo:
        serving = self._warm(Stopwatch())  # one model's identity beside its own index
        identity = serving.encoder.identity
        return ServingInfo(identity.key, identity.encoder, identity.random_weights, serving.index.manifest.index_type,
                           serving.index.ntotal, getattr(serving.encoder, "runtime", "torch"))

    # --- embedding -----------------------------------------------------------------------------------
    def embed_file(self, source: Source, watch: Stopwatch | None = None) -> tuple[QueryImage, np.ndarray]:
        """Read, preprocess and embed one DICOM as ingest does (DicomRejected with the reason if unusable)."""
        watch = watch or Stopwatch()
        with watch.stage("encoder_load"):
            encoder = self.encoder
        query, vector, _ = self._embed(source, encoder, watch)
        return query, vector

    def _embed(self, source: Source, encoder: "Encoder", watch: Stopwatch) -> tuple[QueryImage, np.ndarray, np.ndarray]:
        with watch.stage("decode_preprocess"):
            prepared = self._prepare(source, encoder.settings)
        with watch.stage("embed"):
            with self._inference:
                vector = embed_pictures(encoder, [prepared.model_input])
        h = prepared.header
        path = source.name if isinstance(source, InMemoryDicom) else str(source)
        query = QueryImage(h.sop_instance_uid, h.accession_number, h.patient_id, h.laterality, h.view, path,
                           h.study_key)
        return query, vector, prepared.display

    # --- queries -------------------------------------------------------------------------------------
    def query_file(self, source: Source, k: int = 10, filters: QueryFilters = QueryFilters(),
                   watch: Stopwatch | None = None, *, keep_picture: bool = False) -> QueryResult:
        """Search with one DICOM (a path or an upload held in memory). Its header is checked first, so a
        file that is not a usable DICOM is refused at once, not after the model loads. ``keep_picture``
        keeps the preprocessed query image on the result (a page shows it; nothing is written)."""
        watch = watch or Stopwatch()
        with watch.stage("header_check"):
            read_header(source, self.config.reader)
        serving = self._warm(watch)
        query, vector, picture = self._embed(source, serving.encoder, watch)
        with watch.stage("search"):
            result = search(self.db, serving.index, vector, query, k, filters)
        result.model_key = serving.encoder.identity.key
        if keep_picture:
            result.picture = picture
        return result

    def _warm(self, watch: Stopwatch) -> _Serving:
        """The serving model, then its index, timed apart: the model, not the index, dominates a cold query
        (and the index needs the model's identity, so it would otherwise be timed as the index's). Taken
        under one lock, so the three belong to one model."""
        with self._state:
            with watch.stage("encoder_load"):
                self.follow_live()
                encoder = self.encoder
            with watch.stage("index_load"):
                index = self._caught_up_index()
            mv_id = self.model_version_id()
        if mv_id is None:  # only a guard: loading the index already refuses one without a catalog row
            raise IndexCorruptError(f"the index in {index.directory} has no model version in the database")
        return _Serving(encoder, index, mv_id)

    def record(self, sop_instance_uid: str, mv_id: int | None = None) -> repo.ImageRecord:
        """A stored image of ``mv_id`` (by default the serving model's), or NotFoundError."""
        mv_id = self.model_version_id() if mv_id is None else mv_id
        with self.db.session() as s:
            record = repo.record_by_sop(s, sop_instance_uid, mv_id) if mv_id is not None else None
        if record is None:
            raise NotFoundError(f"no indexed image with SOPInstanceUID {sop_instance_uid}")
        return record

    def similar(self, sop_instance_uid: str, k: int = 10, filters: QueryFilters = QueryFilters(),
                watch: Stopwatch | None = None) -> QueryResult:
        """Neighbours of a stored image, from its stored vector: nothing is decoded or embedded."""
        watch = watch or Stopwatch()
        serving = self._warm(watch)
        record = self.record(sop_instance_uid, serving.model_version_id)
        with self.db.session() as s:
            vector = repo.vector_of(s, record.vector_id, serving.index.manifest.dim)
        with watch.stage("search"):
            result = search(self.db, serving.index, vector, _as_query(record), k, filters)
        result.model_key = serving.encoder.identity.key
        return result

    def query_study(self, accession: str, k: int = 10, filters: QueryFilters = QueryFilters(),
                    watch: Stopwatch | None = None) -> list[QueryResult]:
        """One result per image of the study, using the stored vectors (nothing is decoded)."""
        watch = watch or Stopwatch()
        serving = self._warm(watch)
        index = serving.index
        with self.db.session() as s:
            records = repo.records_for_study(s, accession, serving.model_version_id)
            vectors = [repo.vector_of(s, r.vector_id, index.manifest.dim) for r in records]
        if not records:
            raise NotFoundError(f"no indexed images for accession '{accession}'",
                                remedies=[STUDY_KEYS_REMEDY])
        with watch.stage("search"):
            return [search(self.db, index, vector, _as_query(record), k, filters)
                    for record, vector in zip(records, vectors)]

    # --- studies ---------------------------------------------------------------------------------------
    def similar_studies(self, key: str, k: int = 10, *, rule: str = DEFAULT_RULE, exclude_same_patient: bool = False,
                        watch: Stopwatch | None = None) -> StudyResult:
        """The k studies most like an indexed study (by study key or AccessionNumber), from stored vectors."""
        check_rule(rule)
        watch = watch or Stopwatch()
        serving = self._warm(watch)
        studies = self._studies([key], serving)
        if not studies:
            raise NotFoundError(f"no indexed images for study '{key}'",
                                remedies=[STUDY_KEYS_REMEDY])
        with watch.stage("search"):
            return self._rank(studies[0], serving, k, rule, exclude_same_patient)

    def query_study_files(self, sources: list[Source], k: int = 10, *, rule: str = DEFAULT_RULE,
                          exclude_same_patient: bool = False, watch: Stopwatch | None = None) -> StudyResult:
        """The k studies most like the study these DICOM files (its views) make up."""
        check_rule(rule)
        watch = watch or Stopwatch()
        with watch.stage("header_check"):  # refused before the model loads
            headers = [read_header(source, self.config.reader) for source in sources]
        studies = {header.study_key for header in headers}
        if len(studies) > 1:  # else the other studies' own images would come back as hits
            raise ConfigError(
                f"a study query is one study's views, and these files belong to {len(studies)} studies: "
                + "; ".join(f"{display_path(source)} (study {header.study_key})" for source, header in zip(sources, headers)),
                hint="pass the files of one study (the same AccessionNumber, else StudyInstanceUID), or query each "
                     "image on its own with --level image")
        serving = self._warm(watch)
        images = []
        for source in sources:
            query, vector, _ = self._embed(source, serving.encoder, watch)
            images.append(StudyImage(query.sop_instance_uid, query.laterality, query.view, query.path, vector[0]))
        first = headers[0]
        study = Study(first.study_key, first.accession_number, first.study_instance_uid or None,
                      first.patient_id or None, tuple(images))
        with watch.stage("search"):
            return self._rank(study, serving, k, rule, exclude_same_patient)

    def _studies(self, keys: list[str], serving: _Serving) -> list[Study]:
        with self.db.session() as s:
            rows = repo.studies_with_vectors(s, keys, serving.model_version_id, serving.index.manifest.dim)
        grouped: dict[str, list[tuple]] = {}
        for row in rows:
            grouped.setdefault(row[0], []).append(row)
        return [Study(key, rs[0][1], rs[0][2], rs[0][3],
                      tuple(StudyImage(r[4], r[5], r[6], r[7], r[8]) for r in rs)) for key, rs in grouped.items()]

    def _rank(self, query: Study, serving: _Serving, k: int, rule: str, exclude_same_patient: bool) -> StudyResult:
        """Shortlist the studies of every query image's nearest images, widening until k remain, then fuse."""
        index = serving.index
        fetch = max(64, 16 * k)
        while True:
            keys: set[str] = set()
            for image in query.images:
                scores, ids = index.search(image.vector[None], fetch)
                keys |= {r.study_key for r in records(self.db, [int(i) for i in ids[0] if i >= 0]).values()}
            keys.discard(query.study_key)
            result = rank_studies(query, self._studies(sorted(keys), serving), k, rule=rule,
                                  exclude_same_patient=exclude_same_patient)
            if len(result.hits) >= k or fetch >= index.ntotal:
                return result
            fetch = min(index.ntotal, fetch * 4)


def _as_query(record: repo.ImageRecord) -> QueryImage:
    return QueryImage(record.sop_instance_uid, record.accession_number, record.patient_id, record.laterality,
                      record.view, record.path, record.study_key)
