"""The Python API that the CLI (and a future server) call. A Workspace is one configured archive:
database, encoder and index. It holds no global state; build as many as you like."""
from __future__ import annotations

import logging

import dataclasses
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from mammo_retrieval.core.config import Config, load_config
from mammo_retrieval.storage.catalog import Database
from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.core.errors import DatabaseError, IndexCorruptError, IndexMismatchError, NotFoundError, Remedy
from mammo_retrieval.storage.index.manifest import Manifest
from mammo_retrieval.search.query import QueryFilters, QueryImage, QueryResult, search

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import numpy as np

    from mammo_retrieval.storage.catalog.corpus import Corpus
    from mammo_retrieval.storage.cache import ImageCache
    from mammo_retrieval.pipeline.prepare import Prepared
    from mammo_retrieval.core.timing import Stopwatch
    from mammo_retrieval.encoders import Encoder, EncoderRegistry
    from mammo_retrieval.storage.index import VectorIndex
    from mammo_retrieval.pipeline.runner import IngestReport


TRAINING_POINTS_PER_LIST = 50


class Workspace:
    def __init__(self, config: Config | None = None, *, registry: "EncoderRegistry | None" = None) -> None:
        self.config = config or load_config()
        self._db = Database(self.config.database_url)
        self._db_ready = False
        if self._db.has_schema():  # an outdated schema is refused at once; a missing one only on first use
            self._db.ensure_schema(create=False)
            self._db_ready = True
        self._registry = registry
        self._encoder: "Encoder | None" = None
        self._index: "VectorIndex | None" = None
        self._mv_id: int | None = None
        self._caches: dict[str, "ImageCache"] = {}
        self._index_signature: tuple[int, int] | None = None
        self._lazy = threading.RLock()  # one encoder, index and cache per workspace, whatever the threads

    # --- the database: read-only use never creates it, writers do ---------------------------------
    @property
    def db(self) -> Database:
        """The database, which must exist: read-only commands never create one (NotFoundError instead)."""
        if not self._db_ready:
            self._check_database_not_lost()
            self._db.ensure_schema(create=False)
            self._db_ready = True
        return self._db

    def ensure_database(self) -> Database:
        """The database, set up if it does not exist yet (writers: ingest, reindex, train, `db upgrade`).

        Refuses to set up a database beside an index that holds vectors: that database was deleted, truncated
        or replaced, and an empty one in its place would make a rebuild wipe the index."""
        if not self._db_ready:
            if not self._db.has_schema():
                self._check_database_not_lost()
            self._db.ensure_schema(create=True)
            self._db_ready = True
        return self._db

    def _check_database_not_lost(self) -> None:
        if self._db.has_schema():
            return
        for directory in sorted(self.config.index_dir.glob("*/")):
            try:
                manifest = Manifest.read(directory)
            except IndexCorruptError:
                continue
            if manifest is not None and manifest.ntotal > 0:
                state = "is missing" if not self._db.file_exists() else "is empty"
                raise DatabaseError(
                    f"the database {self._db.display_url} {state}, but the index {directory} holds "
                    f"{manifest.ntotal} vectors: the database looks deleted, truncated or replaced "
                    f"(database 0 vectors, index manifest {manifest.ntotal})",
                    hint="restore the database from its backup, or point paths.database_url at the right one; "
                         f"to start over on purpose, move {self.config.index_dir} aside and re-ingest")

    def _database_behind(self, index: "VectorIndex", count: int) -> DatabaseError:
        """The database holds fewer vectors than the index built from it: it was truncated or replaced."""
        return DatabaseError(
            f"the database {self._db.display_url} holds {count} vectors of model {index.directory.name}, "
            f"but the index {index.directory} holds {index.ntotal}: the database looks replaced or truncated "
            "(it is younger than its index)",
            hint="restore the database from its backup, or point paths.database_url at the right one; "
                 "`mretrieve index rebuild --force` rebuilds the index from this database, dropping the "
                 "vectors it lacks")

    # --- components, built lazily (torch and faiss are slow to import) ---------------------------
    def serving_encoder_config(self):
        """The config's encoder, unless a reindex made another model live and the config pins no weights.

        The live model's weights are the copy stored in the index folder; its hash is checked here, so a
        modified copy is refused with WeightsError instead of serving vectors of an unknown model."""
        from mammo_retrieval.storage.index.versions import read_live, verify_model_weights
        cfg = self.config.encoder
        live, _ = read_live(self.config.index_dir)
        if live is None or cfg.weights:
            return cfg
        verify_model_weights(live)
        return dataclasses.replace(cfg, name=live.encoder, weights=live.weights, input_size=live.input_size)

    def build_encoder(self, encoder_cfg) -> "Encoder":
        from mammo_retrieval.encoders import DEFAULT_REGISTRY, build_encoder
        return build_encoder(encoder_cfg, self.config.preprocess, self._registry or DEFAULT_REGISTRY)

    @property
    def encoder(self) -> "Encoder":
        with self._lazy:
            if self._encoder is None:
                self._encoder = self.build_encoder(self.serving_encoder_config())
            return self._encoder

    @property
    def image_cache(self) -> "ImageCache":
        """uint8 model-size images of the serving preprocessing, keyed by SOPInstanceUID."""
        return self.cache_for(self.encoder.settings)

    def cache_for(self, settings) -> "ImageCache":
        from mammo_retrieval.storage.cache import ImageCache
        digest = settings.digest()
        with self._lazy:
            if digest not in self._caches:
                self._caches[digest] = ImageCache(self.config.cache_dir, digest, settings.size)
            return self._caches[digest]

    def prepare_options(self) -> dict:
        """How this workspace reads and preprocesses a file (ingest, queries and cache rebuilds alike)."""
        cfg = self.config.ingest
        return {"fast": cfg.fast_path, "sampled": cfg.sampled_clahe, "reduced_j2k": cfg.reduced_j2k,
                "downscale_early": cfg.downscale_early}

    def prepare(self, path: str | os.PathLike, settings) -> "Prepared":
        """Read and preprocess one file as ingest does; a bad file raises DicomRejected with its reason."""
        from mammo_retrieval.core.errors import DicomRejected
        from mammo_retrieval.pipeline.prepare import Rejected, prepare_file
        from mammo_retrieval.dicom.reader import InMemoryDicom
        source = path if isinstance(path, InMemoryDicom) else str(path)  # an upload stays in memory
        prepared = prepare_file(source, self.config.reader, settings, **self.prepare_options())
        if isinstance(prepared, Rejected):
            raise DicomRejected(prepared.path, prepared.code, prepared.reason)
        return prepared

    def cached_image(self, sop_instance_uid: str, settings=None) -> "np.ndarray":
        """The preprocessed image; a missing or corrupt entry is rebuilt from its DICOM file."""
        from mammo_retrieval.storage.cache import CacheCorruptError
        settings = settings or self.encoder.settings
        cache = self.cache_for(settings)
        try:
            image = cache.get(sop_instance_uid)
        except CacheCorruptError:
            image = None
        if image is not None:
            return image
        with self.db.session() as s:
            record = repo.image_by_sop(s, sop_instance_uid)
            path = record.path if record else None
        if path is None:
            raise NotFoundError(f"no indexed image with SOPInstanceUID {sop_instance_uid}")
        prepared = self.prepare(path, settings)
        if prepared.header.sop_instance_uid != sop_instance_uid:
            raise NotFoundError(f"{path} now holds SOPInstanceUID {prepared.header.sop_instance_uid}, "
                                f"not {sop_instance_uid}", hint="re-ingest the archive")
        cache.put_many([(sop_instance_uid, prepared.display)])
        return prepared.display

    def model_version_id(self) -> int:
        """The database row of the configured model, created on first use (writers only)."""
        if self._mv_id is None:
            with self.ensure_database().session() as s:
                mv = repo.get_or_create_model_version(s, self.encoder.identity, self.encoder.settings.as_dict())
                self._mv_id = mv.id
        return self._mv_id

    def _existing_model_version_id(self) -> int | None:
        """Like model_version_id, but a read-only query never creates the row."""
        if self._mv_id is None:
            with self.db.session() as s:
                self._mv_id = repo.model_version_id_by_key(s, self.encoder.identity.key)
        return self._mv_id

    def index_directory(self, key: str | None = None) -> Path:
        return self.config.index_dir / (key or self.encoder.identity.key)

    def open_index(self, *, create: bool = False) -> "VectorIndex":
        from mammo_retrieval.storage.index import VectorIndex
        directory = self.index_directory()
        if create:
            return VectorIndex.open_or_create(directory, self.encoder.identity, self.config.index)
        index = VectorIndex.open_existing(directory, self.encoder.identity, self.config.index)
        if index is None:
            self._explain_missing_index()
            mv_id = self._existing_model_version_id() if self._db.has_schema() else None
            if mv_id is not None:
                with self.db.session() as s:
                    count, _ = repo.embedding_stats(s, mv_id)
                if count:
                    raise IndexCorruptError(f"no index in {directory}, but the database holds {count} vectors "
                                            "of this model (an ingest stopped before its first save, or the "
                                            "index was deleted)",
                                            remedies=[Remedy("rebuild it from the database, or re-run the ingest", "index_rebuild")])
            raise NotFoundError(f"no index for model {self.encoder.identity.key} in {self.config.index_dir}",
                                remedies=[Remedy("ingest an archive first, with the same config", "ingest")])
        return index

    def _forget_model(self) -> None:
        """Drop the encoder, index and model-version id, to be rebuilt for whichever model is live."""
        self._encoder, self._index, self._mv_id = None, None, None

    def _live_changed(self) -> bool:
        from mammo_retrieval.storage.index.versions import read_live
        if self.config.encoder.weights:
            return False
        live, _ = read_live(self.config.index_dir)
        return live is not None and live.key != self.encoder.identity.key

    def _explain_missing_index(self) -> None:
        """If indexes of other models exist, say how this query's model differs from the newest one."""
        manifests = []
        for directory in self.config.index_dir.glob("*/"):
            try:
                manifest = Manifest.read(directory)
            except IndexCorruptError:
                continue
            if manifest is not None:
                manifests.append(manifest)
        if manifests:
            newest = max(manifests, key=lambda m: m.updated_at)
            try:
                newest.check_matches(self.encoder.identity)
            except IndexMismatchError as exc:
                raise IndexMismatchError(f"no index in {self.config.index_dir} matches this query's model; "
                                         f"against the newest, {exc.message}", remedies=exc.remedies) from None

    def searchable_index(self) -> "VectorIndex":
        """The index, caught up in memory with the database (a warm server keeps this one and
        picks up a reindex switch on its next query)."""
        with self._lazy:
            return self._searchable_index()

    def _searchable_index(self) -> "VectorIndex":
        if self._index is not None and self._live_changed():
            self._forget_model()
        if self._index is not None and Manifest.signature(self._index.directory) != self._index_signature:
            self._index = None  # another process saved this index (an ingest): reopen and catch up
        if self._index is None:
            signature = Manifest.signature(self.index_directory())
            index = self.open_index()
            mv_id = self._existing_model_version_id()
            if mv_id is None:
                if index.ntotal:
                    raise self._database_behind(index, 0)
                raise IndexCorruptError(f"the index in {index.directory} has no model version in the database",
                                        remedies=[Remedy("rebuild the index from the database", "index_rebuild"), Remedy("or check paths.database_url")])
            self.sync_index(index, mv_id, relayout=False)
            self._index, self._index_signature = index, signature
        return self._index

    @contextmanager
    def write_lock(self, *, create_database: bool = True) -> Iterator[None]:
        """One writer at a time per index folder; readers are never blocked. A second writer fails at once
        with BusyError naming the holder's pid (see ``writelock``); the same thread may nest. With
        ``create_database`` the database is set up under the lock if it does not exist yet."""
        from mammo_retrieval.storage.locks import write_lock
        with write_lock(self.config.index_dir):
            if create_database:
                self.ensure_database()
            yield

    # --- index <-> database consistency ---------------------------------------------------------
    def sync_index(self, index: "VectorIndex", mv_id: int, *, relayout: bool = True) -> int:
        """Add vectors the database has and the index lacks (after a crash mid-ingest). Returns how many.

        The index must have been read before this call: writers commit to the database before they save the
        index, so a database read after the index is never behind it. The count and the vectors come from
        one snapshot, so a commit landing between them cannot make the two disagree."""
        dim = index.manifest.dim
        with self.db.snapshot() as s:
            count, max_id = repo.embedding_stats(s, mv_id)
            if index.ntotal > count:
                raise self._database_behind(index, count)
            added = 0
            if max_id > index.manifest.max_vector_id:
                for ids, vectors in repo.iter_vectors(s, mv_id, dim, after_id=index.manifest.max_vector_id):
                    index.add(ids, vectors)
                    added += len(ids)
        if index.ntotal != count:
            raise IndexCorruptError(f"the index in {index.directory} holds {index.ntotal} vectors, "
                                    f"the database {count}",
                                    remedies=[Remedy("rebuild it from the database", "index_rebuild")])
        if relayout:
            self.maybe_relayout(index, mv_id)
        return added

    def maybe_relayout(self, index: "VectorIndex", mv_id: int) -> bool:
        """Move from exact search to IVF (or to a bigger nlist) once the corpus is large enough."""
        target = index.wants_rebuild(index.ntotal)
        if target is None:
            return False
        self._rebuild(index, mv_id, target)
        return True

    def _rebuild(self, index: "VectorIndex", mv_id: int, layout,
                 on_progress: Callable[[int, int], None] | None = None) -> None:
        dim = index.manifest.dim
        with self.db.session() as s:
            # 50 per centroid (FAISS wants >= 39): at 1M vectors and nlist 4096 a 20% sample, never all of them
            sample = (repo.sample_vectors(s, mv_id, dim, n=TRAINING_POINTS_PER_LIST * layout.nlist)
                      if layout.nlist else None)
        index.rebuild(layout, sample, self._vector_chunks(mv_id, dim, on_progress))

    def _vector_chunks(self, mv_id: int, dim: int,
                       on_progress: Callable[[int, int], None] | None = None) -> Callable[[], Iterator]:
        """A re-iterable stream of (ids, vectors) of one model version, a chunk at a time, from one snapshot;
        ``on_progress(done, total)`` after each chunk."""
        def chunks():
            with self.db.snapshot() as s:
                total = repo.embedding_stats(s, mv_id)[0] if on_progress else 0
                done = 0
                for ids, vectors in repo.iter_vectors(s, mv_id, dim):
                    yield ids, vectors
                    done += len(ids)
                    if on_progress:
                        on_progress(done, total)
        return chunks

    def rebuild_index(self, *, force: bool = False,
                      on_progress: Callable[[int, int], None] | None = None) -> "VectorIndex":
        """Rebuild this model's index from the database (repairs a lost or corrupt index).

        Never shrinks an index (to nothing, or below its manifest's count) without ``force``: a database
        with fewer vectors than the index was truncated or replaced, and the index is the better copy."""
        from mammo_retrieval.storage.index import VectorIndex
        from mammo_retrieval.storage.index.store import FLAT, Layout, new_faiss_index, plan_layout
        with self.write_lock(create_database=False):
            directory = self.index_directory()
            try:
                old = Manifest.read(directory)
            except IndexCorruptError:
                old = None
            mv_id = self._existing_model_version_id()
            count = 0
            if mv_id is not None:
                with self.db.session() as s:
                    count, _ = repo.embedding_stats(s, mv_id)
            floor = old.ntotal if old else 0
            if not force and (count == 0 or count < floor):
                raise DatabaseError(
                    f"refusing to rebuild: the database {self._db.display_url} holds {count} vectors of model "
                    f"{self.encoder.identity.key}, the index in {directory} {floor}; a rebuild would "
                    + ("leave an empty index" if count == 0 else f"drop {floor - count} vectors"),
                    hint="if the database was replaced or truncated, restore it from its backup; to rebuild "
                         "from this database anyway, run `mretrieve index rebuild --force`")
            mv_id = self.model_version_id()
            directory.mkdir(parents=True, exist_ok=True)
            ident = self.encoder.identity
            fresh = Manifest.for_identity(ident, nprobe=old.nprobe if old else None)
            index = VectorIndex(directory, fresh, new_faiss_index(Layout(FLAT, None), self.config.index, ident.dim),
                                self.config.index)
            self._rebuild(index, mv_id, plan_layout(count, self.config.index), on_progress)
            index.save()
            self._index = None
            return index

    def tune_index(self, target: float = 0.95, *, queries: int = 1000, k: int = 10, seed: int = 0):
        """Choose nprobe for ``target`` recall@k against exact search on this corpus; saved in the manifest."""
        from mammo_retrieval.storage.index.tune import exact_neighbours, tune_nprobe
        with self.write_lock(create_database=False):
            mv_id = self.model_version_id()
            index = self.open_index()
            self.sync_index(index, mv_id, relayout=False)
            dim = index.manifest.dim
            with self.db.session() as s:
                sample = repo.sample_vectors(s, mv_id, dim, n=queries, seed=seed)
            truth = exact_neighbours(sample, self._vector_chunks(mv_id, dim), k)
            result = tune_nprobe(index, sample, truth, target, k)
            index.save()
            self._index = None
            return result

    # --- the verbs ------------------------------------------------------------------------------
    def ingest(self, root: str | os.PathLike, *, workers: int | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> "IngestReport":
        """Walk the archive, then (under the write lock, before the model loads, so a second writer hears
        "busy" at once) screen, prepare, embed and write every file. Paths are stored absolute, symlinks
        kept as typed. An archive without a single candidate file raises NotFoundError and touches nothing."""
        import time

        from mammo_retrieval.pipeline.executors import local_executor
        from mammo_retrieval.pipeline.prepare import Rejected
        from mammo_retrieval.pipeline.runner import CatalogSink, IngestReport, PrepareJob, run_pipeline
        from mammo_retrieval.pipeline.source import absolute_root, nothing_to_ingest, state_paths, walk
        from mammo_retrieval.pipeline.threads import EncoderThreads
        started = time.perf_counter()
        root = absolute_root(root)
        cfg = self.config
        found = walk(root, exclude=state_paths(cfg.database_url, cfg.index_dir, cfg.cache_dir))
        if not found.files:
            raise nothing_to_ingest(root, found)
        report = IngestReport(root=str(root), files_seen=len(found.files), skipped=len(found.skipped))
        folder_rejections = [Rejected(e.path, e.code, e.reason) for e in found.errors]
        report.rejected.extend(folder_rejections)
        workers = cfg.workers() if workers is None else workers
        with self.write_lock():
            encoder = self.encoder
            mv_id = self.model_version_id()
            index = self.open_index(create=True)
            self.sync_index(index, mv_id)
            sink = CatalogSink(self.db, index, self.image_cache, mv_id, cfg.index.save_every_batches)
            sink.clear_rejections([str(f) for f in found.folders])  # a folder that lists again is fine now
            job = PrepareJob(cfg.reader, encoder.settings, self.prepare_options())
            threads = EncoderThreads(encoder, cfg.ingest.encoder_threads, workers)
            with local_executor(workers, cfg.ingest) as executor, threads:
                run_pipeline(found.files, job, executor, encoder, sink, threads, report,
                             batch_size=cfg.encoder.batch_size, workers=workers, preceding=folder_rejections,
                             on_progress=on_progress)
            self.maybe_relayout(index, mv_id)
            index.save()
            self._record_first_live_model()
            report.model_key = encoder.identity.key
            report.random_weights = encoder.identity.random_weights
            report.index_type = index.manifest.index_type
            report.index_ntotal = index.ntotal
        self._index = None
        report.seconds = time.perf_counter() - started
        logger.info("ingested %d, already present %d, rejected %d of %d files in %.1f s (model %s, %s index of %d)",
                    report.ingested, report.already_present, len(report.rejected), report.files_seen,
                    report.seconds, report.model_key, report.index_type, report.index_ntotal)
        return report

    def _record_first_live_model(self) -> None:
        """The first model to fill an index becomes the live one (reindex switches from it later)."""
        from mammo_retrieval.storage.index.versions import ServingModel, read_live, switch_live
        live, _ = read_live(self.config.index_dir)
        if live is None:
            cfg = self.serving_encoder_config()
            switch_live(self.config.index_dir,
                        ServingModel(self.encoder.identity.key, cfg.name, cfg.weights, cfg.input_size))

    def reindex(self, weights: str | None = None, *, allow_missing: bool = False,
                on_progress: Callable[[int, int], None] | None = None) -> dict:
        """Re-embed every image with ``weights`` (default: the serving ones) beside the live version, then
        switch live atomically. Queries keep using the old index until that moment; the old one stays for
        ``rollback``. It switches only when every image embedded (an unreadable image would otherwise
        vanish from search), unless ``allow_missing``; the failures are listed either way. The weights are
        copied into the index folder first, so the live version never depends on the user's checkpoint."""
        import time

        from mammo_retrieval.core.errors import ReindexIncompleteError
        from mammo_retrieval.pipeline.reindex import reembed
        from mammo_retrieval.storage.index import VectorIndex
        from mammo_retrieval.storage.index.versions import ServingModel, read_live, store_model_weights, switch_live
        started = time.perf_counter()
        base = self.serving_encoder_config()
        weights = str(Path(weights).expanduser().resolve()) if weights else base.weights
        with self.write_lock():
            stored, sha = store_model_weights(self.config.index_dir, weights)
            new_cfg = dataclasses.replace(base, weights=stored)
            encoder = self.build_encoder(new_cfg)
            identity = encoder.identity
            live, _ = read_live(self.config.index_dir)
            old_key = live.key if live else self.encoder.identity.key
            with self.db.session() as s:
                mv_id = repo.get_or_create_model_version(s, identity, encoder.settings.as_dict()).id
            result = reembed(self.db, encoder, mv_id, self.cached_image, batch_size=self.config.encoder.batch_size,
                             on_progress=on_progress)
            if result.failures and not allow_missing:
                # the vectors written so far stay stored, so a rerun (or --allow-missing) resumes from here
                listing = "\n".join(f"  {f['sop_instance_uid']}  {f['path']}: {f['reason']}" for f in result.failures)
                raise ReindexIncompleteError(
                    f"reindex did not switch: {len(result.failures)} of {result.images} images could not be "
                    f"embedded with {identity.key}; {old_key} stays live:\n{listing}", result.failures,
                    hint="restore these files and run reindex again (the vectors embedded so far are kept), "
                         "or pass --allow-missing to switch without them")
            index = VectorIndex.open_or_create(self.config.index_dir / identity.key, identity, self.config.index)
            self.sync_index(index, mv_id)
            index.save()
            switch_live(self.config.index_dir, ServingModel(identity.key, new_cfg.name, stored, new_cfg.input_size,
                                                            weights_sha256=sha))
            logger.info("reindex: %s is live (was %s), %d vectors", identity.key, old_key, index.ntotal)
        self._forget_model()
        return {"live": identity.key, "previous": old_key if old_key != identity.key else None,
                "embedded": result.embedded, "already_embedded": result.already_embedded,
                "failed": result.failures, "index_type": index.manifest.index_type, "ntotal": index.ntotal,
                "weights": stored, "weights_sha256": sha, "random_weights": identity.random_weights,
                "seconds": round(time.perf_counter() - started, 1)}

    def rollback(self) -> dict:
        from mammo_retrieval.storage.index.versions import rollback
        with self.write_lock():
            target = rollback(self.config.index_dir)
        self._forget_model()
        return {"live": target.key, "encoder": target.encoder, "weights": target.weights,
                "weights_sha256": target.weights_sha256}

    def embed_file(self, path: str | os.PathLike, watch: "Stopwatch | None" = None) -> tuple[QueryImage, "object"]:
        """Read, preprocess and embed one DICOM (raises DicomRejected with the reason), as ingest does."""
        from mammo_retrieval.preprocess import normalise
        from mammo_retrieval.core.timing import Stopwatch
        watch = watch or Stopwatch()
        with watch.stage("encoder_load"):
            encoder = self.encoder
        with watch.stage("decode_preprocess"):
            prepared = self.prepare(path, encoder.settings)
        with watch.stage("embed"):
            vector = encoder.embed(normalise(prepared.display, encoder.settings)[None])
        h = prepared.header
        return QueryImage(h.sop_instance_uid, h.accession_number, h.patient_id, h.laterality, h.view, str(path)), vector

    def query_dicom(self, path: str | os.PathLike, k: int = 10, filters: QueryFilters = QueryFilters(),
                    watch: "Stopwatch | None" = None) -> QueryResult:
        """Search with one DICOM file. Its header is checked first, so a file that is not a usable DICOM
        is refused at once (DicomRejected) instead of after the model loads."""
        from mammo_retrieval.dicom.reader import read_header
        from mammo_retrieval.core.timing import Stopwatch
        watch = watch or Stopwatch()
        with watch.stage("header_check"):
            read_header(path, self.config.reader)
        with watch.stage("encoder_load"):  # its own stage: the model, not the index, dominates a cold query
            if self._index is not None and self._live_changed():
                self._forget_model()
            _ = self.encoder
        with watch.stage("index_load"):
            index = self.searchable_index()
        query, vector = self.embed_file(path, watch)
        with watch.stage("search"):
            return search(self.db, index, vector, query, k, filters)

    def query_accession(self, accession: str, k: int = 10,
                        filters: QueryFilters = QueryFilters()) -> list[QueryResult]:
        """One result per image of the study, using the stored vectors (nothing is decoded)."""
        index = self.searchable_index()
        with self.db.session() as s:
            records = repo.records_for_study(s, accession, self._existing_model_version_id())
            vectors = [repo.vector_of(s, r.vector_id, index.manifest.dim) for r in records]
        if not records:
            raise NotFoundError(f"no indexed images for accession '{accession}'",
                                hint="check `mretrieve status`; studies without an AccessionNumber are keyed "
                                     "by StudyInstanceUID")
        results = []
        for record, vector in zip(records, vectors):
            query = QueryImage(record.sop_instance_uid, record.accession_number, record.patient_id,
                               record.laterality, record.view, record.path)
            results.append(search(self.db, index, vector, query, k, filters))
        return results

    def corpus(self) -> "Corpus":
        """The serving model's vectors, metadata and cached pictures, as analyses and training take them."""
        from mammo_retrieval.storage.catalog.corpus import Corpus
        return Corpus(self.db, self.encoder.identity, self._existing_model_version_id(), self.cached_image)

    def status(self, *, rejected_limit: int | None = None) -> dict:
        from mammo_retrieval.app.status import collect_status
        return collect_status(self, rejected_limit=rejected_limit)

    def close(self) -> None:
        for cache in self._caches.values():
            cache.close()
        self.db.dispose()
