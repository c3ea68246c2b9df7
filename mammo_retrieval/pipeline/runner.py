"""The ingest pipeline: header screen -> prepare (in an executor's workers) -> embed in batches -> sink.

Each stage takes only what it needs: the screen a catalog and the reader config; prepare plain values (a
path, the reader config, the preprocessing settings), so an executor can ship it to another process or
machine; embed an encoder; the sink a catalog, an index and a cache. ``run_pipeline`` only schedules.

Consistency: each batch is committed to the catalog first, then added to the index; the index is saved
atomically every few batches and at the end (by the caller). If the process dies in between, the catalog
is ahead of the index and the next open adds the missing vectors from the catalog.

A worker process that dies (a segfault in a C decoder, the OOM killer) breaks its pool and every future in
it. The scheduler then starts a fresh pool and retries the files that were in flight one at a time: a file
whose worker dies alone is the culprit, rejected as ``worker_died``; the others go on as usual.
"""
from __future__ import annotations

import functools
import logging
import time
from collections import deque
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mammo_retrieval.core.config import ReaderConfig
from mammo_retrieval.core.errors import RejectionCode, display_path
from mammo_retrieval.dicom.reader import InMemoryDicom
from mammo_retrieval.pipeline.executors import Restartable, WorkersKeepDying
from mammo_retrieval.pipeline.prepare import Prepared, Rejected, prepare_file
from mammo_retrieval.pipeline.screen import Copies, crash_fingerprint, decoding_environment, screen
from mammo_retrieval.preprocess import PreprocessSettings
from mammo_retrieval.storage.catalog import repository as repo

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mammo_retrieval.encoders import Encoder
    from mammo_retrieval.pipeline.threads import EncoderThreads
    from mammo_retrieval.storage.cache import ImageCache
    from mammo_retrieval.storage.catalog import Database
    from mammo_retrieval.storage.index import VectorIndex

HEADER_CHUNK = 256
WORKER_DIED_REASON = "the decoding process died while reading this file (a crash in a decoder, or out of memory)"
Progress = Callable[[int, int], None]


def worker_died(path: "Path | InMemoryDicom", fingerprint: str | None) -> Rejected:
    """The rejection of a file whose worker died when it was tried alone (local pool or Dask), with the
    fingerprint taken before that trial, so later folder ingests skip it while it is unchanged."""
    return Rejected.of(str(path), RejectionCode.WORKER_DIED, WORKER_DIED_REASON, fingerprint)


@dataclass
class IngestReport:
    root: str
    files_seen: int = 0
    ingested: int = 0
    already_present: int = 0
    fetched: int = 0  # instances retrieved from a PACS (WADO-RS); 0 for a folder
    skipped: int = 0  # never read: plainly not DICOM by extension (a folder), not an image by SOP class (a PACS)
    rejected: list[Rejected] = field(default_factory=list)
    model_key: str = ""
    random_weights: bool = False
    index_type: str = ""
    index_ntotal: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "root": self.root, "files_seen": self.files_seen, "ingested": self.ingested,
            "already_present": self.already_present, "fetched": self.fetched, "skipped": self.skipped, "rejected": len(self.rejected),
            "rejections": [{"path": r.path, "code": r.code, "reason": r.reason} for r in self.rejected],
            "model_version": self.model_key, "random_weights": self.random_weights,
            "index_type": self.index_type, "index_ntotal": self.index_ntotal, "seconds": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class PrepareJob:
    """What the prepare stage needs, as plain values that pickle: how to read and how to preprocess."""

    reader: ReaderConfig
    settings: PreprocessSettings
    options: dict  # fast / sampled / reduced_j2k / downscale_early (Workspace.prepare_options)

    def submit(self, executor: Executor, path: "Path | InMemoryDicom") -> Future:
        source = path if isinstance(path, InMemoryDicom) else str(path)  # a retrieved instance stays in memory
        return executor.submit(prepare_file, source, self.reader, self.settings, **self.options)


def embed_batch(encoder: "Encoder", batch: list[Prepared]) -> np.ndarray:
    """The embed stage: uint8 model-size images (a volume's frames mean-pooled) -> unit vectors."""
    from mammo_retrieval.encoders.pooling import embed_pictures
    return embed_pictures(encoder, [p.model_input for p in batch])


class CatalogSink:
    """The write stage: a batch's rows and vectors in one catalog transaction, then the index, then the
    preprocessed-image cache; rejections recorded; the index saved every ``save_every`` batches."""

    def __init__(self, db: "Database", index: "VectorIndex", cache: "ImageCache", model_version_id: int,
                 save_every: int) -> None:
        self.db, self.index, self.cache = db, index, cache
        self.model_version_id = model_version_id
        self.save_every = save_every
        self._unsaved_batches = 0

    def write(self, batch: list[Prepared], vectors: np.ndarray) -> None:
        items = [repo.NewImage(p.header, p.path, p.sha256, p.frame_index, v, p.frames) for p, v in zip(batch, vectors)]
        # the cache before the catalog: if the disk fills, the batch is not committed and a rerun redoes it
        # (its cache slots are reused), so no image ends up in the catalog but not in the cache
        self.cache.put_many((p.header.sop_instance_uid, p.display) for p in batch)
        with self.db.session() as s:
            ids = repo.write_images(s, items, self.model_version_id)
        self.index.add(np.asarray(ids), vectors)
        self._unsaved_batches += 1
        if self._unsaved_batches >= self.save_every:
            self.index.save()
            self._unsaved_batches = 0

    def reject(self, rejections: list[Rejected]) -> None:
        if rejections:
            with self.db.session() as s:
                repo.record_rejections(s, ((r.path, r.code, r.reason, r.fingerprint) for r in rejections))

    def clear_rejections(self, paths: list[str]) -> None:
        """Files (or folders) that are fine now: a copy of an embedded image, a folder that lists again."""
        if paths:
            with self.db.session() as s:
                repo.clear_rejections(s, paths)


class _Scheduler:
    """Keeps the executor's queue full and the batches flowing; counts what happened to every file."""

    def __init__(self, job: PrepareJob, executor: Executor, encoder: "Encoder", sink: CatalogSink,
                 threads: "EncoderThreads", report: IngestReport, batch_size: int, max_in_flight: int) -> None:
        self.job, self.executor, self.encoder, self.sink = job, executor, encoder, sink
        self.threads, self.report = threads, report
        self.batch_size, self.max_in_flight = batch_size, max_in_flight
        self.copies = Copies()
        self.in_flight: deque[tuple[Future, "Path | InMemoryDicom", str]] = deque()
        self.batch: list[Prepared] = []
        self.rejections: list[Rejected] = []
        self.present: list[str] = []
        self.done = 0

    @functools.cached_property
    def environment(self) -> str:
        """What a crash's fingerprint is recorded within; read on the first trial (package metadata)."""
        return decoding_environment(self.job)

    def submit(self, path: "Path | InMemoryDicom", uid: str) -> None:
        self.in_flight.append((self._start(path), path, uid))

    def _start(self, path: "Path | InMemoryDicom") -> Future:
        """The prepare stage of one file; a pool already broken gives a failed future, handled in collect."""
        try:
            return self.job.submit(self.executor, path)
        except BrokenProcessPool as exc:
            future: Future = Future()
            future.set_exception(exc)
            return future

    def drain_to(self, limit: int) -> None:
        """Collect results until fewer than ``limit`` are in flight (back-pressure on the workers)."""
        while len(self.in_flight) >= max(limit, 1):
            self.collect()

    def collect(self) -> None:
        future, path, uid = self.in_flight.popleft()
        waiting = time.perf_counter()
        try:
            result = future.result()
        except BrokenProcessPool:
            self.threads.waited(time.perf_counter() - waiting)
            self._recover((future, path, uid))
            return
        self.threads.waited(time.perf_counter() - waiting)
        self._handle(result, uid)

    def _recover(self, broken: tuple[Future, "Path | InMemoryDicom", str]) -> None:
        """A worker died: keep the results that came back, start a fresh pool, retry the rest one at a time.

        Every unfinished future of a broken pool fails, so the files in flight are all suspects; alone in
        a fresh pool, the one that kills its worker again is the culprit. All retries finish before any
        result is handled, since handling can submit (the next copy of a rejected file), and only one file
        may be in the pool while it is on trial."""
        flying = [broken, *self.in_flight]
        self.in_flight.clear()
        finished: list[tuple[Prepared | Rejected, str]] = []
        suspects: list[tuple["Path | InMemoryDicom", str]] = []
        for future, path, uid in flying:
            if future.exception() is None:  # waits: a broken pool fails every unfinished future at once
                finished.append((future.result(), uid))
            elif isinstance(future.exception(), BrokenProcessPool):
                suspects.append((path, uid))
            else:
                raise future.exception()  # a bug in the stage itself (prepare_file never raises for a file)
        logger.warning("a decoding worker process died; retrying the %d file(s) in flight one at a time",
                       len(suspects))
        self._restart(suspects)
        finished += [(self._on_trial(path), uid) for path, uid in suspects]
        for result, uid in finished:
            self._handle(result, uid)

    def _on_trial(self, path: "Path | InMemoryDicom") -> Prepared | Rejected:
        """Prepare one file alone in the pool; if its worker dies, it is the culprit. Its fingerprint is
        taken first: a file still being copied in must not be recorded as the finished file."""
        fingerprint = crash_fingerprint(path, self.environment)
        try:
            return self._start(path).result()
        except BrokenProcessPool:
            logger.warning("rejected [%s] %s: its decoding process died", RejectionCode.WORKER_DIED.value,
                           display_path(path))
            self._restart([])
            return worker_died(path, fingerprint)

    def _restart(self, suspects: list[tuple["Path | InMemoryDicom", str]]) -> None:
        """A fresh pool (WorkerPool.restart gives up, with a clear error, when fresh pools die on their own)."""
        if isinstance(self.executor, Restartable):
            self.executor.restart()
            return
        named = ", ".join(display_path(p) for p, _ in suspects[:3]) + (" ..." if len(suspects) > 3 else "")
        raise WorkersKeepDying(f"a decoding worker process died while reading one of: {named or 'no file'}; "
                               f"this executor ({type(self.executor).__name__}) cannot be restarted",
                               hint="use pipeline.executors.local_executor, which replaces a dead pool")

    def _handle(self, result: Prepared | Rejected, uid: str) -> None:
        """One file's outcome: into the batch, or a rejection (then the next copy of its UID, if any)."""
        if isinstance(result, Rejected):
            self.rejected([result])
            if (next_copy := self.copies.failed(uid)) is not None:
                self.submit(next_copy, uid)  # a rejected copy must not hide a good one
        else:
            logger.debug("prepared %s", result.path)
            self.batch.append(result)
            self.already_present([str(p) for p in self.copies.decoded(uid)])
        self.done += 1
        if len(self.batch) >= self.batch_size:
            self.flush()

    def rejected(self, rejections: list[Rejected]) -> None:
        for r in rejections:
            logger.info("rejected [%s] %s", r.code, r.path)
        self.report.rejected.extend(rejections)
        self.rejections.extend(rejections)

    def already_present(self, paths: list[str]) -> None:
        self.report.already_present += len(paths)
        self.present.extend(paths)
        self.done += len(paths)

    def flush(self) -> None:
        if self.batch:
            started = time.perf_counter()
            vectors = embed_batch(self.encoder, self.batch)
            self.threads.embedded(time.perf_counter() - started)
            self.sink.write(self.batch, vectors)
            self.report.ingested += len(self.batch)
            logger.debug("wrote a batch of %d images (%d so far)", len(self.batch), self.report.ingested)
            self.batch = []
        self.sink.clear_rejections(self.present)
        self.present = []
        self.sink.reject(self.rejections)
        self.rejections = []


def run_pipeline(paths: list[Path], job: PrepareJob, executor: Executor, encoder: "Encoder", sink: CatalogSink,
                 threads: "EncoderThreads", report: IngestReport, *, batch_size: int, workers: int,
                 preceding: list[Rejected] = (), on_progress: Progress | None = None) -> None:
    """Screen, prepare, embed and write every path; ``preceding`` rejections (unreadable folders) are
    recorded with the first batch. One bad file never stops the run: it becomes a rejection."""
    run = _Scheduler(job, executor, encoder, sink, threads, report, batch_size,
                     max_in_flight=max(2, workers) * 4 + batch_size)
    run.rejections.extend(preceding)
    for start in range(0, len(paths), HEADER_CHUNK):
        todo, header_rejected, present = screen(sink.db, job.reader, paths[start:start + HEADER_CHUNK],
                                                sink.model_version_id, run.copies)
        run.rejected(header_rejected)
        report.already_present += present
        run.done += len(header_rejected) + present
        for path, uid in todo:
            run.submit(path, uid)
            run.drain_to(run.max_in_flight)
        if on_progress:
            on_progress(run.done, len(paths))
    while run.in_flight:
        run.collect()
        if on_progress:
            on_progress(run.done, len(paths))
    run.flush()
