"""One model's index kept in step with the catalog: opened (or explained when missing), caught up after a
crash, moved to a bigger layout as the corpus grows, rebuilt from the catalog and tuned.

The catalog is the source of truth and the index a derived copy: writers commit vectors to the catalog
before they save the index, so a catalog read after the index is never behind it. A catalog with *fewer*
vectors than its index was truncated or replaced, and is refused rather than trusted.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mammo_retrieval.core.config import IndexConfig
from mammo_retrieval.core.errors import (ConfigError, DatabaseError, IndexCorruptError, IndexMismatchError,
                                         NoIndexError, Remedy)
from mammo_retrieval.core.identity import ModelIdentity
from mammo_retrieval.storage.catalog import Database
from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.storage.index.manifest import Manifest
from mammo_retrieval.storage.index.store import (FLAT, PQ_CENTROIDS, Layout, VectorIndex, auto_nlist,
                                                 new_faiss_index, plan_layout, vectors_to_train)
from mammo_retrieval.storage.index.tune import TuneResult, exact_neighbours, tune_nprobe

logger = logging.getLogger(__name__)

TRAINING_POINTS_PER_LIST = 50  # FAISS wants >= 39 per centroid
SHARD_VECTORS = 1_000_000      # an on-disk build holds one shard's codes at a time (72 MB at PQ64)


@dataclass(frozen=True)
class LayoutRequest:
    """What ``index rebuild`` was asked for; None fields follow the config. A request with any field set
    pins the layout (ingest no longer moves it to the config's) until a rebuild without one."""
    index_type: str | None = None
    nlist: int | None = None
    opq: bool | None = None
    on_disk: bool | None = None
    shards: int | None = None

    @property
    def pins(self) -> bool:
        return any(v is not None for v in (self.index_type, self.nlist, self.opq, self.on_disk))

    def layout(self, count: int, config: IndexConfig) -> Layout:
        if not self.pins:
            return plan_layout(count, config)
        index_type = self.index_type or config.type
        on_disk = self.on_disk if self.on_disk is not None else config.on_disk
        if self.shards and (index_type == FLAT or not on_disk):
            raise ConfigError("--shards splits an on-disk build; this layout is built in memory",
                              hint="add --on-disk (or set index.on_disk), or drop --shards")
        if index_type == FLAT:
            return Layout(FLAT, None, opq=bool(self.opq))
        nlist = self.nlist or (auto_nlist(count) if config.nlist == "auto" else int(config.nlist))
        opq = self.opq if self.opq is not None else (config.opq and index_type == "ivf_pq")
        layout = Layout(index_type, nlist, opq=opq, on_disk=on_disk)   # refuses OPQ without PQ first
        needed = vectors_to_train(index_type, nlist, config.min_points_per_list)
        if count < needed:
            rule = f"{config.min_points_per_list} a list" + (f", and {PQ_CENTROIDS} for the product quantiser"
                                                              if index_type == "ivf_pq" else "")
            raise ConfigError(f"an {index_type} index of {nlist} lists needs at least {needed} vectors to train "
                              f"({rule}); the database holds {count}",
                              hint="choose a smaller --nlist, or keep the exact (flat) index until the archive grows")
        return layout

    def shard_size(self, count: int) -> int:
        return math.ceil(max(count, 1) / self.shards) if self.shards else SHARD_VECTORS


class IndexLifecycle:
    """The index operations that need the catalog. Holds no index itself: callers pass the one they opened."""

    def __init__(self, db: Database, index_dir: Path, config: IndexConfig) -> None:
        self.db = db
        self.index_dir = index_dir
        self.config = config

    def directory(self, identity: ModelIdentity) -> Path:
        return self.index_dir / identity.key

    # --- opening -----------------------------------------------------------------------------------
    def open(self, identity: ModelIdentity, *, create: bool = False,
             model_version_id: int | None = None) -> VectorIndex:
        """The model's index; without ``create`` a missing one raises an error that says why it is missing."""
        directory = self.directory(identity)
        if create:
            index = VectorIndex.open_or_create(directory, identity, self.config)
        else:
            index = VectorIndex.open_existing(directory, identity, self.config)
            if index is None:
                self._explain_missing(identity, model_version_id)
        if model_version_id is not None:
            index.exact_vectors = self.exact_vectors(model_version_id, identity.dim)
        return index

    def exact_vectors(self, model_version_id: int, dim: int):
        """The catalog's float vectors by id (PQ candidates are re-scored with them)."""
        def lookup(ids):
            with self.db.session() as s:
                return repo.vectors_by_ids(s, model_version_id, ids, dim)
        return lookup

    def _explain_missing(self, identity: ModelIdentity, model_version_id: int | None) -> None:
        newest = self._newest_manifest()
        if newest is not None:
            try:
                newest.check_matches(identity)
            except IndexMismatchError as exc:
                raise IndexMismatchError(f"no index in {self.index_dir} matches this query's model; "
                                         f"against the newest, {exc.message}", remedies=exc.remedies) from None
        if model_version_id is not None:
            with self.db.session() as s:
                count, _ = repo.embedding_stats(s, model_version_id)
            if count:
                raise IndexCorruptError(f"no index in {self.directory(identity)}, but the database holds {count} "
                                        "vectors of this model (an ingest stopped before its first save, or the "
                                        "index was deleted)",
                                        remedies=[Remedy("rebuild it from the database, or re-run the ingest",
                                                         "index_rebuild")])
        raise NoIndexError(f"no index for model {identity.key} in {self.index_dir}",
                           remedies=[Remedy("ingest an archive first, with the same config", "ingest")])

    def _newest_manifest(self) -> Manifest | None:
        manifests = []
        for directory in self.index_dir.glob("*/"):
            try:
                manifest = Manifest.read(directory)
            except IndexCorruptError:
                continue
            if manifest is not None:
                manifests.append(manifest)
        return max(manifests, key=lambda m: m.updated_at) if manifests else None

    def largest_stored(self) -> tuple[Path, Manifest] | None:
        """The fullest index folder and its manifest (a database lost beside it is then detectable)."""
        best = None
        for directory in sorted(self.index_dir.glob("*/")):
            try:
                manifest = Manifest.read(directory)
            except IndexCorruptError:
                continue
            if manifest is not None and (best is None or manifest.ntotal > best[1].ntotal):
                best = (directory, manifest)
        return best

    # --- keeping it in step ------------------------------------------------------------------------
    def database_behind(self, index: VectorIndex, count: int) -> DatabaseError:
        """The database holds fewer vectors than the index built from it: it was truncated or replaced."""
        return DatabaseError(
            f"the database {self.db.display_url} holds {count} vectors of model {index.directory.name}, "
            f"but the index {index.directory} holds {index.ntotal}: the database looks replaced or truncated "
            "(it is younger than its index)",
            remedies=[Remedy("restore the database from its backup, or point paths.database_url at the right one"),
                      Remedy("or rebuild the index from this database, dropping the vectors it lacks",
                             "index_rebuild_force")])

    def sync(self, index: VectorIndex, model_version_id: int, *, relayout: bool = True) -> int:
        """Add vectors the database has and the index lacks (after a crash mid-ingest). Returns how many.

        The index must have been read before this call (see the module docstring). The count and the
        vectors come from one snapshot, so a commit landing between them cannot make the two disagree."""
        dim = index.manifest.dim
        with self.db.snapshot() as s:
            count, max_id = repo.embedding_stats(s, model_version_id)
            if index.ntotal > count:
                raise self.database_behind(index, count)
            added = 0
            if max_id > index.manifest.max_vector_id:
                for ids, vectors in repo.iter_vectors(s, model_version_id, dim,
                                                      after_id=index.manifest.max_vector_id):
                    index.add(ids, vectors)
                    added += len(ids)
        if index.ntotal != count:
            raise IndexCorruptError(f"the index in {index.directory} holds {index.ntotal} vectors, "
                                    f"the database {count}",
                                    remedies=[Remedy("rebuild it from the database", "index_rebuild")])
        if relayout:
            self.maybe_relayout(index, model_version_id)
        return added

    def maybe_relayout(self, index: VectorIndex, model_version_id: int) -> bool:
        """Move from exact search to IVF (or to a bigger nlist) once the corpus is large enough; merge an
        on-disk index's delta into a new lists file once it has grown (no retraining)."""
        target = index.wants_rebuild(index.ntotal)
        if target is None:
            if index.wants_compaction():
                index.compact()
                return True
            return False
        logger.info("index %s: %d vectors, moving to %s", index.directory.name, index.ntotal, target.describe())
        m = index.manifest
        self._refill(index, model_version_id, target, source=m.layout_source, nlist_auto=m.nlist_auto)
        return True

    def _refill(self, index: VectorIndex, model_version_id: int, layout: Layout,
                on_progress: Callable[[int, int], None] | None = None, *, shard_size: int = SHARD_VECTORS,
                source: str = "config", nlist_auto: bool = True) -> None:
        dim = index.manifest.dim
        index.rebuild(layout, self._training_sample(model_version_id, dim, layout),
                      self.vector_chunks(model_version_id, dim, on_progress),
                      shard_size=shard_size, source=source, nlist_auto=nlist_auto)

    def _training_sample(self, model_version_id: int, dim: int, layout: Layout):
        """50 per centroid (at least PQ_CENTROIDS for PQ): at 1M vectors and nlist 4096 a 20% sample, never all."""
        if not layout.nlist:
            return None
        wanted = vectors_to_train(layout.index_type, layout.nlist, TRAINING_POINTS_PER_LIST)
        with self.db.session() as s:
            return repo.sample_vectors(s, model_version_id, dim, n=wanted)

    def vector_chunks(self, model_version_id: int, dim: int,
                      on_progress: Callable[[int, int], None] | None = None) -> Callable[[], Iterator]:
        """A re-iterable stream of (ids, vectors) of one model version, a chunk at a time, from one snapshot;
        ``on_progress(done, total)`` after each chunk."""
        def chunks():
            with self.db.snapshot() as s:
                total = repo.embedding_stats(s, model_version_id)[0] if on_progress else 0
                done = 0
                for ids, vectors in repo.iter_vectors(s, model_version_id, dim):
                    yield ids, vectors
                    done += len(ids)
                    if on_progress:
                        on_progress(done, total)
        return chunks

    # --- repair and tuning -------------------------------------------------------------------------
    def catalog_count(self, model_version_id: int | None) -> int:
        if model_version_id is None:
            return 0
        with self.db.session() as s:
            return repo.embedding_stats(s, model_version_id)[0]

    def check_rebuild_allowed(self, identity: ModelIdentity, count: int, *, force: bool) -> Manifest | None:
        """Never shrink an index (to nothing, or below its manifest's count) without ``force``: a database
        with fewer vectors than the index was truncated or replaced, and the index is the better copy.
        Returns the old manifest (None when unreadable or absent)."""
        directory = self.directory(identity)
        try:
            old = Manifest.read(directory)
        except IndexCorruptError:
            old = None
        floor = old.ntotal if old else 0
        if not force and (count == 0 or count < floor):
            raise DatabaseError(
                f"refusing to rebuild: the database {self.db.display_url} holds {count} vectors of model "
                f"{identity.key}, the index in {directory} {floor}; a rebuild would "
                + ("leave an empty index" if count == 0 else f"drop {floor - count} vectors"),
                remedies=[Remedy("if the database was replaced or truncated, restore it from its backup"),
                          Remedy("or rebuild from this database anyway", "index_rebuild_force")])
        return old

    def rebuild(self, identity: ModelIdentity, model_version_id: int, old: Manifest | None, count: int,
                on_progress: Callable[[int, int], None] | None = None,
                request: LayoutRequest = LayoutRequest()) -> VectorIndex:
        """A fresh index of every catalog vector of this model, saved in place of the old one (which stays
        the live one until the new manifest is written)."""
        layout = request.layout(count, self.config)
        directory = self.directory(identity)
        directory.mkdir(parents=True, exist_ok=True)
        fresh = Manifest.for_identity(identity, nprobe=old.nprobe if old else None)
        index = VectorIndex(directory, fresh, new_faiss_index(Layout(FLAT, None), self.config, identity.dim),
                            self.config)
        self._refill(index, model_version_id, layout, on_progress, shard_size=request.shard_size(count),
                     source="rebuild" if request.pins else "config",
                     nlist_auto=request.nlist is None and self.config.nlist == "auto")
        index.save()
        return index

    def tune(self, index: VectorIndex, model_version_id: int, target: float, *, queries: int, k: int,
             seed: int) -> TuneResult:
        """Choose nprobe for ``target`` recall@k against exact search on this corpus; saved in the manifest."""
        self.sync(index, model_version_id, relayout=False)
        dim = index.manifest.dim
        with self.db.session() as s:
            sample = repo.sample_vectors(s, model_version_id, dim, n=queries, seed=seed)
        truth = exact_neighbours(sample, self.vector_chunks(model_version_id, dim), k)
        result = tune_nprobe(index, sample, truth, target, k)
        index.save()
        return result
