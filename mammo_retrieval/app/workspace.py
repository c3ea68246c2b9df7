"""The composition root the CLI and the server call. A Workspace is one configured archive: database,
encoder, index and image cache, wired to the pipeline (writes), the search service (reads) and the index
lifecycle (repairs). It holds no global state; build as many as you like."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from mammo_retrieval.core.config import Config, load_config
from mammo_retrieval.core.errors import (ConfigError, DatabaseError, MammoRetrievalError, NotFoundError,
                                         WeightsError)
from mammo_retrieval.search.query import QueryFilters, QueryImage, QueryResult
from mammo_retrieval.search.service import SearchService
from mammo_retrieval.storage.catalog import Database
from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.storage.index.lifecycle import IndexLifecycle

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import numpy as np
    import pydicom

    from mammo_retrieval.core.config import EncoderConfig
    from mammo_retrieval.core.timing import Stopwatch
    from mammo_retrieval.dicom.reader import InMemoryDicom
    from mammo_retrieval.encoders import Encoder, EncoderRegistry
    from mammo_retrieval.pacs.listener import Listener
    from mammo_retrieval.pipeline.prepare import Prepared, Rejected
    from mammo_retrieval.pipeline.reindex import Reembedded
    from mammo_retrieval.pipeline.runner import IngestReport
    from mammo_retrieval.storage.cache import ImageCache
    from mammo_retrieval.storage.catalog.corpus import Corpus
    from mammo_retrieval.storage.index import VectorIndex
    from mammo_retrieval.storage.index.lifecycle import LayoutRequest
    from mammo_retrieval.storage.index.tune import TuneResult
    from mammo_retrieval.train.adapter import AdaptConfig


class Workspace:
    def __init__(self, config: Config | None = None, *, registry: "EncoderRegistry | None" = None) -> None:
        self.config = config or load_config()
        self._db = Database(self.config.database_url)
        self._db_ready = False
        if self._db.has_schema():  # an outdated schema is refused at once; a missing one only on first use
            self._db.ensure_schema(create=False)
            self._db_ready = True
        self._registry = registry
        self._caches: dict[str, "ImageCache"] = {}
        self._lazy = threading.RLock()  # one cache per preprocessing, whatever the threads
        self.search = SearchService(lambda: self.db, self.config, lambda cfg: self.build_encoder(cfg), self.prepare)

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
        stored = IndexLifecycle(self._db, self.config.index_dir, self.config.index).largest_stored()
        if stored is not None and stored[1].ntotal > 0:
            directory, manifest = stored
            state = "is missing" if not self._db.file_exists() else "is empty"
            raise DatabaseError(
                f"the database {self._db.display_url} {state}, but the index {directory} "
                f"holds {manifest.ntotal} vectors: the database looks deleted, truncated or replaced "
                f"(database 0 vectors, index manifest {manifest.ntotal})",
                hint="restore the database from its backup, or point paths.database_url at the right one; "
                     f"to start over on purpose, move {self.config.index_dir} aside and re-ingest")

    @property
    def lifecycle(self) -> IndexLifecycle:
        return IndexLifecycle(self.db, self.config.index_dir, self.config.index)

    # --- components, built lazily (torch and faiss are slow to import) ---------------------------
    def build_encoder(self, encoder_cfg) -> "Encoder":
        """The encoder of this config, run as ``encoder.runtime`` says (auto: ONNX Runtime where measured
        faster; the same model version either way), exported once into ``<index_dir>/onnx/``."""
        from mammo_retrieval.encoders import DEFAULT_REGISTRY, build_encoder
        from mammo_retrieval.encoders.onnx_runtime import with_runtime
        configured = self.config.encoder.name
        if encoder_cfg.name != configured:  # the live model serves: a typo in the config would go unnoticed
            try:
                (self._registry or DEFAULT_REGISTRY).get(configured)
            except ConfigError as exc:
                raise ConfigError(f"encoder.name in the config: {exc.message} (the live model "
                                  f"{encoder_cfg.name} serves this home, but the config must still be valid)",
                                  hint=exc.hint) from None
        build = functools.partial(build_encoder, encoder_cfg, self.config.preprocess,
                                  self._registry or DEFAULT_REGISTRY)
        return with_runtime(build, encoder_cfg, self.config.index_dir / "onnx")

    @property
    def encoder(self) -> "Encoder":
        """The serving encoder: the config's, or the live one after a reindex (see SearchService)."""
        return self.search.encoder

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

    def prepare(self, path: "str | os.PathLike | InMemoryDicom", settings) -> "Prepared":
        """Read and preprocess one file as ingest does; a bad file raises DicomRejected with its reason."""
        from mammo_retrieval.core.errors import DicomRejected
        from mammo_retrieval.dicom.reader import InMemoryDicom
        from mammo_retrieval.pipeline.prepare import Rejected, prepare_file
        from mammo_retrieval.pacs.dicomweb import is_dicomweb_url, retrieve_url
        source = path if isinstance(path, InMemoryDicom) else str(path)  # an upload stays in memory
        if isinstance(source, str) and is_dicomweb_url(source):  # pulled from a PACS: its WADO-RS URL
            source = retrieve_url(source, self.config.pacs)
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

    def model_input(self, sop_instance_uid: str, settings=None) -> "np.ndarray":
        """What the encoder embeds for a stored image: its cached picture, or, for a volume whose frames
        were pooled, those frames prepared again from its file (the cache keeps only one of them)."""
        settings = settings or self.encoder.settings
        with self.db.session() as s:
            record = repo.image_by_sop(s, sop_instance_uid)
            volume = record is not None and bool(record.frames_used)
            path = record.path if record else None
        if not volume:
            return self.cached_image(sop_instance_uid, settings)
        prepared = self.prepare(path, settings)
        return prepared.model_input

    def model_version_id(self) -> int:
        """The database row of the serving model, created on first use (writers only)."""
        with self.ensure_database().session() as s:
            return repo.get_or_create_model_version(s, self.encoder.identity, self.encoder.settings.as_dict()).id

    def index_directory(self, key: str | None = None) -> Path:
        return self.config.index_dir / (key or self.encoder.identity.key)

    def open_index(self, *, create: bool = False) -> "VectorIndex":
        mv_id = None if create else self.search.model_version_id()
        return self.lifecycle.open(self.encoder.identity, create=create, model_version_id=mv_id)

    def searchable_index(self) -> "VectorIndex":
        """The index, caught up in memory with the database (a warm server keeps this one and picks up
        another process's ingest, reindex or rollback on its next query)."""
        return self.search.index()

    @contextmanager
    def write_lock(self, *, create_database: bool = True) -> Iterator[None]:
        """One writer at a time per index folder; readers are never blocked. A second writer fails at once
        with BusyError naming the holder's pid (see ``storage.locks``), as does a second writer to the same
        PostgreSQL database from elsewhere (``Database.writer_lock``); the same thread may nest. With
        ``create_database`` the database is set up under the lock if it does not exist yet."""
        from mammo_retrieval.storage.locks import write_lock
        with write_lock(self.config.index_dir), self._db.writer_lock():
            if create_database:
                self.ensure_database()
            yield

    # --- repairs ------------------------------------------------------------------------------------
    def rebuild_index(self, *, force: bool = False, on_progress: Callable[[int, int], None] | None = None,
                      request: "LayoutRequest | None" = None) -> "VectorIndex":
        """Rebuild this model's index from the database (repairs a lost or corrupt index, or moves it to
        the layout ``request`` names); never shrinks one without ``force`` (see
        IndexLifecycle.check_rebuild_allowed)."""
        from mammo_retrieval.storage.index.lifecycle import LayoutRequest
        with self.write_lock(create_database=False):
            lifecycle, identity = self.lifecycle, self.encoder.identity
            count = lifecycle.catalog_count(self.search.model_version_id())
            old = lifecycle.check_rebuild_allowed(identity, count, force=force)
            index = lifecycle.rebuild(identity, self.model_version_id(), old, count, on_progress,
                                      request or LayoutRequest())
        self.search.forget_index()
        return index

    def tune_index(self, target: float = 0.95, *, queries: int = 1000, k: int = 10, seed: int = 0) -> "TuneResult":
        """Choose nprobe for ``target`` recall@k against exact search on this corpus; saved in the manifest."""
        with self.write_lock(create_database=False):
            mv_id = self.model_version_id()
            result = self.lifecycle.tune(self.open_index(), mv_id, target, queries=queries, k=k, seed=seed)
        self.search.forget_index()
        return result

    # --- the verbs ------------------------------------------------------------------------------
    def ingest(self, source: str | os.PathLike, *, workers: int | None = None, executor: str = "local",
               scheduler: str | None = None, studies: tuple[str, ...] = (), since: str | None = None,
               modality: str | None = "MG", retry_rejected: bool = False,
               on_progress: Callable[[int, int], None] | None = None) -> "IngestReport":
        """Ingest a folder (any file name, any depth) or a DICOMweb PACS (an http(s):// base URL).

        Folder: walk it, then (under the write lock, before the model loads, so a second writer hears
        "busy" at once) screen, prepare, embed and write every file. Paths are stored absolute, symlinks
        kept as typed. A folder without a single candidate file raises NotFoundError and touches nothing.
        ``executor``: "local" (forked prepare workers here, embedding in this process) or "dask" (workers of
        the cluster at ``scheduler``, or of a new LocalCluster of ``workers`` processes, prepare and embed;
        this process writes). A file whose decoding process died on two runs is rejected again without
        decoding while it is unchanged (same size, modification time, inode and change time) and so are the
        decoders' versions and the read options, unless ``retry_rejected``.

        DICOMweb: QIDO-RS finds ``studies`` (default: every study with ``modality``, from ``since``
        YYYYMMDD on); instances already embedded are skipped before retrieval; the rest are retrieved by
        WADO-RS and stored with their URL as path (see ``pacs.pull``)."""
        import time

        from mammo_retrieval.pacs.dicomweb import is_dicomweb_url
        started = time.perf_counter()
        if is_dicomweb_url(str(source)) and retry_rejected:
            raise ConfigError("--retry-rejected applies to folders: instances pulled from a PACS are always "
                              "decoded again", hint="leave --retry-rejected out")
        if is_dicomweb_url(str(source)):
            report = self._ingest_dicomweb(str(source), workers=workers, executor=executor, studies=studies,
                                           since=since, modality=modality, on_progress=on_progress)
        elif studies or since:
            raise ConfigError("--study and --since select studies of a DICOMweb PACS, not of a folder",
                              hint="give an http(s):// DICOMweb URL, or leave them out")
        else:
            report = self._ingest_folder(source, workers=workers, executor=executor, scheduler=scheduler,
                                         retry_rejected=retry_rejected, on_progress=on_progress)
        report.seconds = time.perf_counter() - started
        logger.info("ingested %d, already present %d, rejected %d of %d files in %.1f s (model %s, %s index of %d)",
                    report.ingested, report.already_present, len(report.rejected), report.files_seen,
                    report.seconds, report.model_key, report.index_type, report.index_ntotal)
        return report

    def _ingest_folder(self, root, *, workers, executor, scheduler, retry_rejected, on_progress) -> "IngestReport":
        from mammo_retrieval.pipeline.executors import local_executor
        from mammo_retrieval.pipeline.prepare import Rejected
        from mammo_retrieval.pipeline.runner import IngestReport, run_pipeline
        from mammo_retrieval.pipeline.screen import unchanged_crashers
        from mammo_retrieval.pipeline.source import absolute_root, nothing_to_ingest, state_paths, walk
        from mammo_retrieval.pipeline.threads import EncoderThreads
        root = absolute_root(root)
        cfg = self.config
        found = walk(root, exclude=state_paths(cfg.database_url, cfg.index_dir, cfg.cache_dir))
        if not found.files:
            raise nothing_to_ingest(root, found)
        report = IngestReport(root=str(root), files_seen=len(found.files), skipped=len(found.skipped))
        preceding = [Rejected(e.path, e.code, e.reason) for e in found.errors]
        report.rejected.extend(preceding)
        workers = cfg.workers() if workers is None else workers
        if executor not in ("local", "dask"):
            raise ConfigError(f"unknown executor '{executor}'", hint="choose local or dask")
        with self._writing(report) as (encoder, sink, job):
            sink.clear_rejections([str(f) for f in found.folders])  # a folder that lists again is fine now
            files, crashers = (found.files, []) if retry_rejected else unchanged_crashers(
                sink.db, found.files, job, sink.model_version_id)
            report.rejected.extend(crashers)
            preceding += crashers
            if executor == "dask":
                self._run_on_dask(files, job, sink, report, preceding, workers, scheduler, on_progress)
            else:
                threads = EncoderThreads(encoder, cfg.ingest.encoder_threads, workers)
                with local_executor(workers, cfg.ingest) as pool, threads:
                    run_pipeline(files, job, pool, encoder, sink, threads, report,
                                 batch_size=cfg.encoder.batch_size, workers=workers, preceding=preceding,
                                 on_progress=on_progress)
        return report

    def _ingest_dicomweb(self, url: str, *, workers, executor, studies, since, modality,
                         on_progress) -> "IngestReport":
        from mammo_retrieval.pacs.dicomweb import DicomWebClient
        if executor != "local":
            raise ConfigError("a DICOMweb pull runs with the local executor",
                              hint="leave out --executor (the PACS, not the decoding, is the limit)")
        with DicomWebClient(url, self.config.pacs) as client:
            return self._pull_from(client, workers=workers, studies=studies, since=since, modality=modality,
                                   on_progress=on_progress)

    def _pull_from(self, client, *, workers, studies, since, modality, on_progress) -> "IngestReport":
        from mammo_retrieval.pacs.dicomweb import redact
        from mammo_retrieval.pacs.pull import pull
        from mammo_retrieval.pipeline.executors import local_executor
        from mammo_retrieval.pipeline.runner import IngestReport
        from mammo_retrieval.pipeline.threads import EncoderThreads
        cfg = self.config
        found = client.search_studies(studies=studies, since=since, modality=modality)
        report = IngestReport(root=redact(client.base_url))
        from mammo_retrieval.core.errors import RejectionCode
        from mammo_retrieval.pipeline.prepare import Rejected
        missing = [Rejected.of(client.study_url(uid), RejectionCode.TRANSFER_FAILED,  # named, not listed: said
                               "the PACS does not list this study (QIDO-RS)") for uid in sorted(set(studies) - set(found))]
        report.rejected.extend(missing)
        if not found and studies:  # named studies are not filtered by modality
            raise NotFoundError(f"{redact(client.base_url)} lists none of the {len(studies)} studies asked "
                                f"(--study {', '.join(sorted(set(studies))[:3])}{', ...' if len(set(studies)) > 3 else ''})"
                                + (f" since {since}" if since else ""),
                                hint="check the StudyInstanceUIDs, and that this is the PACS that holds them")
        if not found:
            raise NotFoundError(f"no study found at {redact(client.base_url)}"
                                + (f" with modality {modality}" if modality else "") + (f" since {since}" if since else ""),
                                hint="check --since/--modality (ModalitiesInStudy must be filled by the PACS)")
        workers = cfg.workers() if workers is None else workers
        with self._writing(report) as (encoder, sink, job):
            sink.reject(missing)
            threads = EncoderThreads(encoder, cfg.ingest.encoder_threads, workers)
            with local_executor(workers, cfg.ingest) as pool, threads:
                pull(client, found, job, pool, encoder, sink, threads, report, batch_size=cfg.encoder.batch_size,
                     workers=workers, on_progress=on_progress)
        return report

    @contextmanager
    def _writing(self, report: "IngestReport") -> Iterator[tuple]:
        """The write side of an ingest: the lock (taken before the model loads, so a second writer hears
        "busy" at once), the encoder, the index caught up with the catalog and a sink; afterwards the
        index's layout checked, the index saved, and the report completed."""
        from mammo_retrieval.pipeline.runner import CatalogSink, PrepareJob
        cfg = self.config
        with self.write_lock():
            encoder = self.encoder
            mv_id = self.model_version_id()
            index = self.open_index(create=True)
            self.lifecycle.sync(index, mv_id)
            sink = CatalogSink(self.db, index, self.image_cache, mv_id, cfg.index.save_every_batches)
            yield encoder, sink, PrepareJob(cfg.reader, encoder.settings, self.prepare_options())
            self.lifecycle.maybe_relayout(index, mv_id)
            index.save()
            self._record_first_live_model()
            report.model_key = encoder.identity.key
            report.random_weights = encoder.identity.random_weights
            report.index_type = index.manifest.index_type
            report.index_ntotal = index.ntotal
        self.search.forget_index()

    # --- results as DICOM -------------------------------------------------------------------------------
    def header_of(self, sop_instance_uid: str) -> "pydicom.Dataset":
        """An indexed image's DICOM header, read from its stored path (a file, or its WADO-RS URL)."""
        with self.db.session() as s:
            record = repo.image_by_sop(s, sop_instance_uid)
            path = record.path if record else None
        if path is None:
            raise NotFoundError(f"no indexed image with SOPInstanceUID {sop_instance_uid}")
        return self._header(path)

    def _header(self, source: "str | os.PathLike | InMemoryDicom") -> "pydicom.Dataset":
        import io

        import pydicom

        from mammo_retrieval.dicom.reader import InMemoryDicom
        from mammo_retrieval.pacs.dicomweb import is_dicomweb_url, retrieve_url
        if isinstance(source, str) and is_dicomweb_url(source):  # its metadata: no pixels cross the network
            return retrieve_url(source, self.config.pacs, header_only=True)
        try:
            if isinstance(source, InMemoryDicom):
                return pydicom.dcmread(io.BytesIO(source.data), stop_before_pixels=True)
            return pydicom.dcmread(source, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise NotFoundError(f"{source}: cannot read its DICOM header ({exc})",
                                hint="was the file moved? re-ingest it") from None

    def similar_kos(self, source: "str | os.PathLike | InMemoryDicom | None" = None, k: int = 10, *,
                    sop_instance_uid: str | None = None, filters: QueryFilters = QueryFilters()
                    ) -> tuple[QueryResult, "pydicom.Dataset"]:
        """A query (a DICOM file or upload, or an indexed image by SOPInstanceUID) and its results as a
        Key Object Selection document in the query image's study (see ``pacs.results``)."""
        from mammo_retrieval.pacs.results import similar_cases_document
        if (source is None) == (sop_instance_uid is None):
            raise ConfigError("give a DICOM file or an indexed image's SOPInstanceUID, not both")
        if sop_instance_uid is not None:
            result, header = self.search.similar(sop_instance_uid, k, filters), self.header_of(sop_instance_uid)
        else:
            result, header = self.query_dicom(source, k, filters), self._header(source)
        return result, similar_cases_document(self.db, header, result, result.model_key, self.header_of)

    def qc_kos(self, top: int = 50, study: str | None = None) -> list["pydicom.Dataset"]:
        """The latest QC sweep's flagged images as Key Object Selection documents, one per study (or only
        ``study``'s, by StudyInstanceUID)."""
        from mammo_retrieval.pacs.results import qc_documents
        return qc_documents(self.db, self.header_of, top=top, study=study)

    def stow(self, url: str, documents: list["pydicom.Dataset"]) -> None:
        """Send documents to a PACS by STOW-RS (credentials as for a DICOMweb ingest)."""
        from mammo_retrieval.pacs.dicomweb import DicomWebClient
        with DicomWebClient(url, self.config.pacs) as client:
            client.store(documents)

    # --- the C-STORE listener ---------------------------------------------------------------------------
    def listener(self, *, host: str = "127.0.0.1", port: int = 11112, ae_title: str | None = None,
                 allowed: tuple[str, ...] = (), batch_images: int | None = None,
                 batch_seconds: float | None = None) -> "Listener":
        """A C-STORE listener wired to this workspace (see ``pacs.listener``). Off loopback, calling AE
        titles must be restricted with ``allowed``: DIMSE has no token."""
        from mammo_retrieval.core.netaddr import is_loopback
        from mammo_retrieval.pacs.listener import Listener, ListenSettings
        if not is_loopback(host) and not allowed:
            raise ConfigError(f"listening on {host} (off loopback) needs --allow AE ...",
                              hint="name the AE titles that may send, or listen on 127.0.0.1")
        self.ensure_database()  # set up now, before handler threads and the batcher may race to do it
        cfg = self.config.pacs
        settings = ListenSettings(host, port, ae_title or cfg.listen_ae_title, tuple(allowed),
                                  batch_images or cfg.listen_batch_images,
                                  cfg.listen_batch_seconds if batch_seconds is None else batch_seconds,
                                  Path(cfg.spool_dir))
        return Listener(settings, self._prepare_received, self.index_prepared, self.record_rejection)

    def recover_spool(self, *, workers: int | None = None) -> "IngestReport | None":
        """Ingest what the listener received but had not indexed when it stopped (a crash, a kill -9):
        files already indexed are skipped by their UID. None when the spool holds nothing."""
        spool = Path(self.config.pacs.spool_dir)
        if not spool.is_dir() or not any(p.is_file() for p in spool.rglob("*.dcm")):
            return None
        return self.ingest(spool, workers=workers)

    def _prepare_received(self, source: "InMemoryDicom") -> "Prepared | Rejected":
        from mammo_retrieval.pipeline.prepare import prepare_file
        return prepare_file(source, self.config.reader, self.encoder.settings, **self.prepare_options())

    def record_rejection(self, rejected: "Rejected") -> None:
        with self.ensure_database().session() as s:
            repo.record_rejections(s, [(rejected.path, rejected.code, rejected.reason, rejected.fingerprint)])

    def index_prepared(self, batch: list["Prepared"]) -> int:
        """Embed and index prepared images (the listener's batches) on an ingest's write side (``_writing``);
        an image whose SOPInstanceUID is embedded already (sent twice) is skipped. Returns how many were new."""
        from mammo_retrieval.pipeline.runner import IngestReport, embed_batch
        unique = {p.header.sop_instance_uid: p for p in batch}  # the last copy of a UID sent twice wins
        with self._writing(IngestReport(root=self.config.pacs.spool_dir)) as (encoder, sink, _):
            with self.db.session() as s:
                known = repo.embedded_sops(s, list(unique), sink.model_version_id)
            todo = [p for sop, p in unique.items() if sop not in known]
            if todo:
                sink.write(todo, embed_batch(encoder, todo))
        return len(todo)

    def _run_on_dask(self, files, job, sink, report, preceding, workers: int, scheduler: str | None,
                     on_progress) -> None:
        from mammo_retrieval.encoders import DEFAULT_REGISTRY
        from mammo_retrieval.pipeline import distributed
        from mammo_retrieval.storage.index.versions import serving_encoder_config
        if self._registry not in (None, DEFAULT_REGISTRY):
            raise ConfigError("the Dask executor builds encoders from the default registry only: a custom "
                              "registry cannot be shipped to the workers", hint="use --executor local")
        embed_job = distributed.EmbedJob(job, serving_encoder_config(self.config.encoder, self.config.index_dir),
                                         self.config.preprocess, self.encoder.identity.key,
                                         heap_reuse=self.config.ingest.heap_reuse,
                                         onnx_dir=str(self.config.index_dir / "onnx"))
        client = distributed.connect(scheduler, max(1, workers))
        try:
            distributed.run_distributed(files, embed_job, client, sink, report,
                                        batch_size=self.config.encoder.batch_size, preceding=preceding,
                                        on_progress=on_progress)
        finally:
            distributed.close(client)

    def _record_first_live_model(self) -> None:
        """The first model to fill an index becomes the live one (reindex switches from it later)."""
        from mammo_retrieval.storage.index.versions import (ServingModel, read_live, serving_encoder_config,
                                                            switch_live)
        live, _ = read_live(self.config.index_dir)
        if live is None:
            cfg = serving_encoder_config(self.config.encoder, self.config.index_dir)
            switch_live(self.config.index_dir,
                        ServingModel(self.encoder.identity.key, cfg.name, cfg.weights, cfg.input_size))

    def reindex(self, weights: str | None = None, *, encoder_name: str | None = None, allow_missing: bool = False,
                gate_labels: str | None = None, gate_metric: str | None = None, tolerance: float = 0.01,
                force: bool = False, on_progress: Callable[[int, int], None] | None = None) -> dict:
        """Re-embed every image with ``weights`` (default: the serving ones) beside the live version, then
        switch live atomically. Queries keep using the old index until that moment; the old one stays for
        ``rollback``. It switches only when every image embedded (an unreadable image would otherwise
        vanish from search), unless ``allow_missing``; the failures are listed either way. The weights are
        copied into the index folder first, so the live version never depends on the user's checkpoint.

        With ``gate_labels`` (a labels CSV), both versions are measured on the labelled images with
        ``gate_metric`` (default: the first label column's p@10), and the switch is refused (GateFailed,
        the new vectors kept) when the new one is worse than the live one by more than ``tolerance``,
        unless ``force``.

        ``encoder_name`` changes the architecture too (e.g. from built-in v2 to v3): with no ``weights``, that
        encoder's shipped weights (one that ships none needs ``weights``)."""
        import time

        from mammo_retrieval.core.errors import ReindexIncompleteError
        from mammo_retrieval.storage.index import VectorIndex
        from mammo_retrieval.storage.index.versions import (ServingModel, read_live, serving_encoder_config,
                                                            store_model_weights, switch_live)
        started = time.perf_counter()
        if gate_labels:  # a typo in the gate's metric or labels is said now, not after a whole re-embed
            from mammo_retrieval.analysis.gate import check_gate
            check_gate(gate_labels, gate_metric, tolerance)
        base = serving_encoder_config(self.config.encoder, self.config.index_dir)
        if encoder_name:
            base = self._other_architecture(base, encoder_name, weights)
        weights = str(Path(weights).expanduser().resolve()) if weights else base.weights
        with self.write_lock():
            stored, sha = store_model_weights(self.config.index_dir, weights)
            new_cfg = dataclasses.replace(base, weights=stored)
            encoder = self._build_stored(new_cfg, weights)
            identity = encoder.identity
            live, _ = read_live(self.config.index_dir)
            if live is None:  # a first ingest killed before it recorded its model: record it, to roll back to
                old_index = self.open_index(create=True)  # and its index, caught up with the catalog and saved
                self.lifecycle.sync(old_index, self.model_version_id())
                old_index.save()
                self._record_first_live_model()
                live, _ = read_live(self.config.index_dir)
            old_key = live.key if live else self.encoder.identity.key
            mv_id, result = self._embed_missing(encoder, on_progress)
            if result.failures and not allow_missing:
                # the vectors written so far stay stored, so a rerun (or --allow-missing) resumes from here
                listing = "\n".join(f"  {f['sop_instance_uid']}  {f['path']}: {f['reason']}" for f in result.failures)
                raise ReindexIncompleteError(
                    f"reindex did not switch: {len(result.failures)} of {result.images} images could not be "
                    f"embedded with {identity.key}; {old_key} stays live:\n{listing}", result.failures,
                    hint="restore these files and run reindex again (the vectors embedded so far are kept), "
                         "or pass --allow-missing to switch without them")
            gate_result = None
            if gate_labels and old_key != identity.key:
                gate_result = self._gate(old_key, identity, mv_id, gate_labels, gate_metric, tolerance)
                logger.info("reindex: %s", gate_result.describe())
                if not gate_result.passed and not force:
                    from mammo_retrieval.analysis.gate import GateFailed
                    raise GateFailed(gate_result)
            index = VectorIndex.open_or_create(self.config.index_dir / identity.key, identity, self.config.index)
            self.lifecycle.sync(index, mv_id)
            index.save()
            switch_live(self.config.index_dir, ServingModel(identity.key, new_cfg.name, stored, new_cfg.input_size,
                                                            weights_sha256=sha))
            logger.info("reindex: %s is live (was %s), %d vectors", identity.key, old_key, index.ntotal)
        self.search.forget_model()
        return {"live": identity.key, "previous": old_key if old_key != identity.key else None,
                "embedded": result.embedded, "already_embedded": result.already_embedded, "mapped": result.mapped,
                "failed": result.failures, "index_type": index.manifest.index_type, "ntotal": index.ntotal,
                "weights": stored, "weights_sha256": sha, "random_weights": identity.random_weights,
                "gate": gate_result.as_dict() if gate_result else None,
                "seconds": round(time.perf_counter() - started, 1)}

    def _build_stored(self, cfg: "EncoderConfig", given: str | None) -> "Encoder":
        """The encoder of weights just copied into the index folder. When they cannot be built, the error
        names the file the user gave, not the copy, and a copy no model version uses is removed."""
        from mammo_retrieval.storage.index.versions import weights_in_use
        try:
            return self.build_encoder(cfg)
        except MammoRetrievalError as exc:
            if cfg.weights and given and cfg.weights != given:
                exc.message = exc.message.replace(cfg.weights, given)
                if not weights_in_use(self.config.index_dir, cfg.weights):
                    _remove_path(Path(cfg.weights))
            raise

    def _other_architecture(self, base: "EncoderConfig", name: str, weights: str | None) -> "EncoderConfig":
        """reindex --encoder: the serving config with another registry entry, checked before any work."""
        from mammo_retrieval.encoders import DEFAULT_REGISTRY
        from mammo_retrieval.encoders.adapter import is_adapter_file
        from mammo_retrieval.encoders.model import packaged_weights
        spec = (self._registry or DEFAULT_REGISTRY).get(name)  # an unknown name is said now
        if weights and is_adapter_file(weights):
            raise ConfigError(f"--encoder {name} with an adapter: an adapter names its own base encoder",
                              hint="reindex --model ADAPTER alone")
        if not weights and not spec.weights_file:
            raise ConfigError(f"encoder '{name}' ships no weights: reindex --encoder {name} needs --model",
                              hint="give its checkpoint (or Hugging Face folder) with --model; nothing is "
                                   "downloaded, and an archive is not re-embedded with random weights")
        if self.config.encoder.weights:
            logger.warning("reindex: the config pins encoder.weights, so this process keeps serving them after "
                           "the switch; remove encoder.weights from the config to serve the live model")
        shipped = str(packaged_weights(spec.weights_file)) if spec.weights_file else None
        # the size is the new architecture's own (a configured input_size belonged to the old one)
        return dataclasses.replace(base, name=name, weights=shipped, input_size=None)

    def _embed_missing(self, encoder: "Encoder", on_progress) -> tuple[int, "Reembedded"]:
        """Give ``encoder``'s model version a vector for every stored image that lacks one (an adapter maps
        its base's stored vectors, nothing decoded); resumable, as the vectors are stored batch by batch."""
        from mammo_retrieval.pipeline.reindex import reembed
        with self.db.session() as s:
            mv_id = repo.get_or_create_model_version(s, encoder.identity, encoder.settings.as_dict()).id
        mapped = self._map_adapter_base(encoder, mv_id)
        result = reembed(self.db, encoder, mv_id, self.model_input, batch_size=self.config.encoder.batch_size,
                         on_progress=on_progress)
        result.mapped = mapped
        return mv_id, result

    def _map_adapter_base(self, encoder, mv_id: int) -> int:
        """An adapter's vectors mapped from its base's stored ones (nothing decoded); how many were mapped."""
        from mammo_retrieval.encoders.adapter import AdaptedEncoder
        from mammo_retrieval.pipeline.reindex import remap
        if not isinstance(encoder, AdaptedEncoder):
            return 0
        with self.db.session() as s:
            base_mv = repo.model_version_id_by_key(s, encoder.info.base_key)
        if base_mv is None:
            logger.warning("reindex: the adapter's base %s has no stored vectors: every image is decoded and "
                           "embedded again", encoder.info.base_key)
            return 0
        mapped = remap(self.db, encoder.project, base_mv, mv_id, encoder.info.in_dim)
        logger.info("reindex: %d vectors mapped from %s through the adapter", mapped, encoder.info.base_key)
        return mapped

    def adapt(self, labels_csv: str, columns: list[str], out: str | os.PathLike, cfg: "AdaptConfig") -> dict:
        """Train a label adapter on the serving model's stored vectors (see ``train.adapter``) and write it
        to ``out``; ``reindex --model out`` then serves it. Returns the report (held-out before/after)."""
        from mammo_retrieval.analysis.labels import join_labels, label_columns, read_labels
        from mammo_retrieval.analysis.vectors import load_embeddings
        from mammo_retrieval.encoders.adapter import AdapterInfo, save_adapter
        from mammo_retrieval.storage.index.versions import serving_encoder_config
        from mammo_retrieval.train.adapter import train_adapter
        raw = read_labels(labels_csv)
        columns = label_columns(raw, columns, labels_csv)
        table = load_embeddings(self.corpus())
        aligned, _ = join_labels(table.meta, raw)
        labelled = aligned[columns].replace("", None).notna().any(axis=1).to_numpy()
        labels = {c: aligned[c].to_numpy(dtype=object)[labelled] for c in columns}
        patients = table.meta.patient_id.fillna("").to_numpy(dtype=object)[labelled]
        projection, report = train_adapter(table.vectors[labelled], labels, patients, cfg)
        base_cfg = serving_encoder_config(self.config.encoder, self.config.index_dir)
        identity = self.encoder.identity
        import json
        info = AdapterInfo(cfg.kind, identity.dim, cfg.out_dim, cfg.hidden, identity.key, base_cfg.name,
                           base_cfg.weights, identity.weights_sha256, base_cfg.input_size, tuple(columns),
                           tuple(report["heldout_patients"]), json.dumps({"before": report["before"],
                                                                          "after": report["after"]}))
        save_adapter(Path(out), projection, info)
        return {**report, "adapter": str(out), "base_model": identity.key, "columns": columns,
                "kind": cfg.kind, "dim": cfg.out_dim}

    def _gate(self, live_key: str, identity, mv_id: int, labels_csv: str, metric: str | None, tolerance: float):
        """The live version (the one live.json names) against the new one, on the same labelled images."""
        from mammo_retrieval.analysis.gate import gate
        from mammo_retrieval.core.identity import ModelIdentity
        from mammo_retrieval.storage.catalog.corpus import Corpus
        from mammo_retrieval.storage.catalog.models import ModelVersion
        with self.db.session() as s:
            row = s.query(ModelVersion).filter(ModelVersion.key == live_key).one_or_none()
            if row is None:
                raise NotFoundError(f"the live model {live_key} has no vectors in the database to gate against")
            live = ModelIdentity.from_record(row)
            live_mv = row.id
        return gate(Corpus(self.db, live, live_mv, self.cached_image),
                    Corpus(self.db, identity, mv_id, self.cached_image), labels_csv, metric, tolerance)

    def rollback(self, on_progress: Callable[[int, int], None] | None = None, reported: bool = True) -> dict:
        """Make the previous version live again. Images ingested since it was live are embedded with it
        first (only those: the others kept their vectors), so none drops out of search; one that cannot be
        embedded any more (its file gone) is listed in ``failed``, and the switch happens anyway: a
        rollback is what one reaches for when the live model is wrong.

        A caller that reports the result (the CLI) passes ``reported=False`` and calls
        ``rollback_reported`` once it has: a rollback killed between its switch and that report is then
        found done by the rerun (``unchanged``), instead of switching back to the model it left."""
        from mammo_retrieval.storage.index import VectorIndex
        from mammo_retrieval.storage.index.versions import (model_encoder_config, rollback, rollback_reported,
                                                            rollback_target, unreported_rollback)
        with self.write_lock():
            done = unreported_rollback(self.config.index_dir)
            if done is not None:
                encoder = self.build_encoder(model_encoder_config(self.config.encoder, done))
                index = VectorIndex.open_or_create(self.config.index_dir / done.key, encoder.identity,
                                                   self.config.index)
                if reported:
                    rollback_reported(self.config.index_dir, done.key)
                return {"live": done.key, "encoder": done.encoder, "weights": encoder.identity.weights_path,
                        "weights_sha256": done.weights_sha256, "random_weights": encoder.identity.random_weights,
                        "embedded": 0, "failed": [], "ntotal": index.ntotal, "unchanged": True,
                        "rolled_back_from": done.rolled_back_from}
            target = rollback_target(self.config.index_dir)
            encoder = self.build_encoder(model_encoder_config(self.config.encoder, target))
            if encoder.identity.key != target.key:
                raise WeightsError(f"the kept version {target.key} builds as {encoder.identity.key} with this "
                                   "installation: rolling back would serve vectors of another model",
                                   hint="reindex with the weights you want instead")
            mv_id, result = self._embed_missing(encoder, on_progress)
            index = VectorIndex.open_or_create(self.config.index_dir / target.key, encoder.identity,
                                               self.config.index)
            self.lifecycle.sync(index, mv_id)
            index.save()
            replaced = rollback(self.config.index_dir, reported=reported).rolled_back_from
        self.search.forget_model()
        return {"live": target.key, "encoder": target.encoder, "weights": encoder.identity.weights_path,
                "weights_sha256": target.weights_sha256, "random_weights": encoder.identity.random_weights,
                "embedded": result.embedded, "failed": result.failures, "ntotal": index.ntotal,
                "unchanged": False, "rolled_back_from": replaced}

    def rollback_reported(self, key: str) -> None:
        """The caller of ``rollback(reported=False)``, which made ``key`` live, has told its user: the next
        rollback switches back."""
        from mammo_retrieval.storage.index.versions import rollback_reported
        with self.write_lock():
            rollback_reported(self.config.index_dir, key)

    def embed_file(self, path: "str | os.PathLike | InMemoryDicom",
                   watch: "Stopwatch | None" = None) -> tuple[QueryImage, "np.ndarray"]:
        """Read, preprocess and embed one DICOM (raises DicomRejected with the reason), as ingest does."""
        return self.search.embed_file(path, watch)

    def query_dicom(self, path: "str | os.PathLike | InMemoryDicom", k: int = 10,
                    filters: QueryFilters = QueryFilters(), watch: "Stopwatch | None" = None) -> QueryResult:
        """Search with one DICOM file or upload (see SearchService.query_file)."""
        return self.search.query_file(path, k, filters, watch)

    def query_accession(self, accession: str, k: int = 10, filters: QueryFilters = QueryFilters(),
                        watch: "Stopwatch | None" = None) -> list[QueryResult]:
        """One result per image of the study, using the stored vectors (nothing is decoded)."""
        return self.search.query_study(accession, k, filters, watch)

    def similar(self, sop_instance_uid: str, k: int = 10, filters: QueryFilters = QueryFilters()) -> QueryResult:
        """Neighbours of a stored image, from its stored vector."""
        return self.search.similar(sop_instance_uid, k, filters)

    def corpus(self) -> "Corpus":
        """The serving model's vectors, metadata and cached pictures, as analyses and training take them."""
        from mammo_retrieval.storage.catalog.corpus import Corpus
        return Corpus(self.db, self.encoder.identity, self.search.model_version_id(), self.cached_image)

    def other_version_corpora(self) -> list["Corpus"]:
        """Every other model version with vectors in the catalog (kept by reindex), oldest first: what
        ``evaluate --all-versions`` measures beside the serving one."""
        from mammo_retrieval.core.identity import ModelIdentity
        from mammo_retrieval.storage.catalog.corpus import Corpus
        serving = self.search.model_version_id()
        with self.db.session() as s:
            rows = [(mv.id, ModelIdentity.from_record(mv)) for mv, count in repo.model_versions(s)
                    if count and mv.id != serving]
        return [Corpus(self.db, identity, mv_id, self.cached_image) for mv_id, identity in rows]

    def status(self, *, rejected_limit: int | None = None) -> dict:
        from mammo_retrieval.app.status import collect_status
        return collect_status(self, rejected_limit=rejected_limit)

    def close(self) -> None:
        for cache in self._caches.values():
            cache.close()
        self._db.dispose()


def _remove_path(path: Path) -> None:
    """Delete a stored weights file or model folder (a folder is a Hugging Face model)."""
    import shutil
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
