"""Ingest on a Dask cluster: the workers read, preprocess *and* embed, in batches of paths; the results
stream back to the one writer, the caller's CatalogSink (a catalog transaction, then the index).

Each worker builds its encoder once (per worker process, not per task) from plain values: the encoder
and preprocessing config (with torch, or under ``runtime: onnx`` with ONNX Runtime, loading the client's
checked export where it can read it). So the weights file must be readable at the same path on
every worker (a shared filesystem), as must the DICOM files. A worker whose encoder comes out with another identity than the
client's (different weights at that path) refuses the batch, rather than mixing two models in one index.

Restart safety is the local executor's: nothing is written by the workers, the writer commits batch by
batch, and a rerun skips every SOPInstanceUID already embedded. A worker that dies has its tasks rerun by
the scheduler on another worker. A batch that keeps killing its workers (the scheduler gives up with
KilledWorker: a decoder crash, or out of memory) makes its files suspects; once nothing else runs, each
is tried alone, and the one that kills its workers alone is rejected (``worker_died``, as with the local
executor) while the rest are ingested. Alone, because the scheduler also blames the tasks that were
waiting on a worker when it died.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mammo_retrieval.core.config import EncoderConfig, PreprocessConfig
from mammo_retrieval.core.errors import ConfigError, RejectionCode, WeightsError, display_path
from mammo_retrieval.pipeline.executors import WorkersKeepDying
from mammo_retrieval.pipeline.prepare import Prepared, Rejected, prepare_file
from mammo_retrieval.pipeline.runner import HEADER_CHUNK, IngestReport, PrepareJob, embed_batch, worker_died
from mammo_retrieval.pipeline.screen import Copies, crash_fingerprint, decoding_environment, screen

if TYPE_CHECKING:
    from mammo_retrieval.encoders import Encoder
    from mammo_retrieval.pipeline.runner import CatalogSink

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EmbedJob:
    """Everything a worker needs, as plain values that pickle."""
    prepare: PrepareJob
    encoder: EncoderConfig
    preprocess: PreprocessConfig
    model_key: str  # the client's model: a worker building another one refuses
    heap_reuse: bool = True  # as the local workers: large decode buffers reused (half the decode time on CBIS)
    onnx_dir: str = ""  # the client's ONNX exports: a worker that can read it loads the checked file


@dataclass
class BatchResult:
    prepared: list[Prepared]
    rejected: list[Rejected]
    vectors: np.ndarray
    worker: str = ""


_encoders: dict[tuple, "Encoder"] = {}
_encoders_lock = threading.Lock()


def worker_encoder(job: EmbedJob) -> "Encoder":
    """This worker process's encoder for ``job``, built on first use and kept."""
    key = (job.encoder, job.preprocess)
    with _encoders_lock:
        if key not in _encoders:
            from mammo_retrieval.pipeline.worker import keep_freed_buffers, warm_kernels
            if job.heap_reuse:
                keep_freed_buffers()
            if job.prepare.options.get("fast") and job.prepare.options.get("sampled"):
                warm_kernels()

            _encoders[key] = _build(job)
        encoder = _encoders[key]
    if encoder.identity.key != job.model_key:
        raise WeightsError(f"this worker built model {encoder.identity.key}, the client {job.model_key}: the "
                           f"weights at {job.encoder.weights} differ between machines",
                           hint="give every worker the same weights file at the same path")
    return encoder


def _build(job: EmbedJob) -> "Encoder":
    """The job's encoder with the worker's thread count: torch, unless the config says ``runtime: onnx``.
    ``auto`` keeps workers on torch: whole Dask ingests were not faster on ONNX Runtime (README, "Scale-out").
    Under ``onnx`` the export is the client's where this worker can read its folder (same machine, or a
    shared filesystem); otherwise the worker exports and checks its own copy there."""
    import functools

    import torch

    from mammo_retrieval.encoders import DEFAULT_REGISTRY, build_encoder
    from mammo_retrieval.encoders.onnx_runtime import with_runtime
    try:
        from distributed import get_worker
        threads = max(1, get_worker().state.nthreads)
    except (ImportError, ValueError):
        threads = None
    if threads:
        torch.set_num_threads(threads)
    build = functools.partial(build_encoder, job.encoder, job.preprocess, DEFAULT_REGISTRY)
    encoder = (with_runtime(build, job.encoder, Path(job.onnx_dir))
               if job.onnx_dir and job.encoder.runtime == "onnx" else build())
    if threads and getattr(encoder, "runtime", "torch") == "onnx":
        encoder.threads = threads  # onnxruntime's own pool: the worker's share, not every core
    return encoder


def prepare_and_embed(paths: list[str], job: EmbedJob) -> BatchResult:
    """The worker's task: read, preprocess and embed one batch. A bad file is a rejection, never an error."""
    encoder = worker_encoder(job)
    results = [prepare_file(p, job.prepare.reader, job.prepare.settings, **job.prepare.options) for p in paths]
    prepared = [r for r in results if isinstance(r, Prepared)]
    rejected = [r for r in results if isinstance(r, Rejected)]
    vectors = embed_batch(encoder, prepared) if prepared else np.zeros((0, encoder.dim), np.float32)
    try:
        from distributed import get_worker
        worker = get_worker().address
    except (ImportError, ValueError):
        worker = ""
    return BatchResult(prepared, rejected, vectors, worker)


@dataclass
class _Run:
    sink: "CatalogSink"
    report: IngestReport
    copies: Copies = field(default_factory=Copies)
    uid_of: dict[str, str] = field(default_factory=dict)
    done: int = 0


# Dask's cluster object closes a worker's nanny for good when, lost-worker-timeout (15 s) after a worker
# died, no worker of that name is registered at that moment. Meant for batch jobs, it also closed the nanny
# of a LocalCluster still restarting its worker (a slow machine, or a file that kills each fresh worker),
# and the ingest then waited for a worker forever. Our nannies restart their own workers: never close them.
NANNY_KEPT_FOR = "36500 days"
_kept = {"clusters": 0, "setting": None}  # the setting is process-wide: held while any of our clusters runs
_kept_lock = threading.Lock()


@contextlib.contextmanager
def _nannies_kept():
    """lost-worker-timeout at NANNY_KEPT_FOR from the first of our clusters to start until the last closes
    (Dask reads it whenever a worker dies), then the caller's setting back."""
    import dask
    with _kept_lock:
        if _kept["clusters"] == 0:
            _kept["setting"] = dask.config.set({"distributed.deploy.lost-worker-timeout": NANNY_KEPT_FOR})
        _kept["clusters"] += 1
    try:
        yield
    finally:
        with _kept_lock:
            _kept["clusters"] -= 1
            if _kept["clusters"] == 0:
                _kept["setting"].__exit__(None, None, None)


def connect(scheduler: str | None, workers: int):
    """A client of the cluster at ``scheduler``, or of a new LocalCluster of ``workers`` processes."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("the Dask executor needs dask.distributed",
                          hint="pip install 'mammo_retrieval[dask]'") from None
    if scheduler:
        try:
            return Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    with contextlib.ExitStack() as started:
        started.enter_context(_nannies_kept())
        cluster = started.enter_context(LocalCluster(n_workers=max(1, workers), threads_per_worker=1,
                                                     processes=True, dashboard_address=":0", host="127.0.0.1"))
        client = Client(cluster)
        client._mretrieve_started = started.pop_all()  # the cluster, then the config: closed with the client
    return client


def close(client) -> None:
    """Close the client, then the LocalCluster ``connect`` started (and its setting), even if that fails."""
    started = getattr(client, "_mretrieve_started", None)
    try:
        client.close()
    finally:
        if started is not None:
            started.close()


NO_WORKER_WARNING_S = 60.0  # how often a wait on a cluster without workers says so


def _running_workers(client) -> int:
    """Workers able to run a task now (a paused one, at its memory limit, is not)."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # distributed before 2025.1 takes no argument and lists every worker
        info = client.scheduler_info()
    return sum(1 for w in info.get("workers", {}).values() if w.get("status", "running") == "running")


def _first_done(client, futures: list) -> set:
    """The futures done once one is (their results are read by the caller: a task's own TimeoutError is
    its error, not ours). Dask waits silently for workers that may still join (a SLURM queue; a
    LocalCluster of the user's whose nanny Dask closed never gets one): each NO_WORKER_WARNING_S spent
    waiting while the scheduler has no running worker is said, so a stalled ingest is not a silent one."""
    from distributed import wait
    waited = 0.0
    while True:
        try:
            return wait(futures, timeout=NO_WORKER_WARNING_S, return_when="FIRST_COMPLETED").done
        except TimeoutError:
            waited += NO_WORKER_WARNING_S
            if not _running_workers(client):
                logger.warning("waiting for a Dask worker (%.0f s so far): the scheduler has no running worker. "
                               "Start workers, or stop the ingest (Ctrl+C) and rerun it later: it resumes where "
                               "it stopped", waited)


BATCH_DEATHS_BEFORE_PROBING = 3  # batches that killed their workers, none surviving: are the workers to blame?
PROBE_ATTEMPTS = 2  # a probe's first death may be a worker still dying or restarting under it (seen under load)


def run_distributed(paths: list[Path], job: EmbedJob, client, sink: "CatalogSink", report: IngestReport, *,
                    batch_size: int, in_flight: int | None = None, preceding: list[Rejected] | None = None,
                    on_progress: Progress | None = None) -> None:
    """_run_batches (``in_flight`` by default two batches per worker thread), with a cluster left without
    running workers named as such. Dask waits for workers that may still join (a SLURM queue); a
    scheduler with ``distributed.scheduler.no-workers-timeout`` set fails the tasks instead (NoWorkerError,
    or NoValidWorkerError with task queuing off: this ingest restricts no task to a worker, so both mean no
    running worker), and the batches written so far stay: a rerun resumes."""
    from distributed.scheduler import NoValidWorkerError, NoWorkerError  # distributed >= 2024.8
    try:
        _run_batches(paths, job, client, sink, report, batch_size=batch_size, in_flight=in_flight,
                     preceding=preceding or [], on_progress=on_progress)
    except (NoWorkerError, NoValidWorkerError) as exc:
        raise WorkersKeepDying(f"the Dask scheduler has had no running worker for this ingest's tasks: {exc}",
                               hint="start workers (or check why they stopped: their logs), then rerun the "
                                    "ingest, which resumes where it stopped") from None


def _run_batches(paths: list[Path], job: EmbedJob, client, sink: "CatalogSink", report: IngestReport, *,
                 batch_size: int, in_flight: int | None, preceding: list[Rejected],
                 on_progress: Progress | None) -> None:
    """Screen here, then prepare and embed on the cluster in batches of ``batch_size`` paths, at most
    ``in_flight`` batches at a time (None: two per worker thread), writing each result as it arrives.

    A batch that keeps killing its workers (KilledWorker) has its files tried alone once nothing else runs;
    the one that still kills its worker is rejected (worker_died). While no batch has survived, a task
    that reads no file probes the workers first: if it kills its worker too, twice (PROBE_ATTEMPTS), the
    workers fail (the model cannot load, a memory limit too low), and the ingest stops with
    WorkersKeepDying, no file blamed."""
    from distributed import KilledWorker
    run = _Run(sink, report)
    environment = functools.cache(lambda: decoding_environment(job.prepare))  # read on the first trial only
    if preceding:
        sink.reject(list(preceding))
    limit = in_flight or max(2, 2 * sum(client.nthreads().values()))
    pending: dict = {}  # future -> its batch of (path, SOPInstanceUID)
    dead: list[list[tuple[Path, str]]] = []  # batches that kept killing their workers, files not yet tried alone
    state = {"survived": False, "probed": False}
    total = len(paths)

    def submit(batch: list[tuple[Path, str]]) -> None:
        for path, uid in batch:
            run.uid_of[str(path)] = uid
        pending[client.submit(prepare_and_embed, [str(p) for p, _ in batch], job, pure=False)] = batch

    def outcome(future) -> BatchResult | None:
        """The batch's result; None when it kept killing its workers (its files are then suspects)."""
        batch = pending.pop(future)
        try:
            result = future.result()
            state["survived"] = True
            return result
        except KilledWorker:
            logger.warning("a batch of %d file(s) kept killing its Dask workers (%s%s); each will be tried "
                           "alone", len(batch), ", ".join(display_path(p) for p, _ in batch[:3]),
                           ", ..." if len(batch) > 3 else "")
            dead.append(list(batch))
            return None

    def on_trial(path: Path, uid: str) -> BatchResult:
        """One suspect alone on the cluster: if its workers die now, it is the culprit (fingerprinted first,
        as the local runner does)."""
        run.uid_of[str(path)] = uid
        fingerprint = crash_fingerprint(path, environment())
        try:
            trial = client.submit(prepare_and_embed, [str(path)], job, pure=False)
            _first_done(client, [trial])
            return trial.result()
        except KilledWorker:
            logger.warning("rejected [%s] %s: it kills its Dask workers", RejectionCode.WORKER_DIED.value,
                           display_path(path))
            return BatchResult([], [worker_died(path, fingerprint)], np.zeros((0, 0), np.float32))

    def collect(block: bool) -> None:
        if not pending:
            return
        if block:
            finished = _first_done(client, list(pending))
        else:
            finished = {f for f in pending if f.done()}
        for future in finished:
            if (result := outcome(future)) is not None and (retry := _write(run, result)):
                submit(retry)
        if on_progress:
            on_progress(run.done, total)

    def probe_unless_a_batch_survived() -> None:
        """Batches died and none has survived yet: are the files to blame, or the workers? With nothing else
        running, one task that only builds the worker's encoder (no file read). If it kills its worker too,
        PROBE_ATTEMPTS times (once may be a worker still dying or restarting under it), the workers fail
        (the model cannot load, a memory limit too low): stop, rejecting nothing. Once an ingest."""
        if state["probed"] or state["survived"]:
            return
        while pending:
            collect(block=True)
        state["probed"] = True
        if state["survived"]:
            return
        for attempt in range(1, PROBE_ATTEMPTS + 1):
            try:
                probe = client.submit(prepare_and_embed, [], job, pure=False)
                _first_done(client, [probe])
                probe.result()
                break
            except KilledWorker:
                logger.warning("the probe (the model alone, no file) lost its Dask worker (%d of %d)",
                               attempt, PROBE_ATTEMPTS)
        else:
            first = [display_path(p) for batch in dead for p, _ in batch][:3]
            raise WorkersKeepDying(
                f"the Dask workers die even when they only load the model, reading no file, and each of the "
                f"{len(dead)} batch(es) sent killed its workers (first files: {', '.join(first)}): the workers "
                "fail, not the files, so none is rejected", hint="read the workers' logs: the model loads "
                "there (memory limit, the weights' path); or ingest with --executor local")
        state["survived"] = True

    for start in range(0, total, HEADER_CHUNK):
        todo, header_rejected, present = screen(sink.db, job.prepare.reader, paths[start:start + HEADER_CHUNK],
                                                sink.model_version_id, run.copies)
        _rejected(run, header_rejected)
        report.already_present += present
        run.done += len(header_rejected) + present
        for i in range(0, len(todo), batch_size):
            submit(todo[i:i + batch_size])
            while len(pending) >= limit:
                collect(block=True)
            if len(dead) >= BATCH_DEATHS_BEFORE_PROBING:
                probe_unless_a_batch_survived()
        collect(block=False)
    while pending or any(dead):
        while pending:
            collect(block=True)
        if any(dead):
            probe_unless_a_batch_survived()  # also a small archive: fewer dead batches than BATCH_DEATHS_...
        later = []  # copies to decode instead of a rejected one: after the trials, which must run alone
        for path, uid in [path_uid for batch in dead for path_uid in batch]:
            later += _write(run, on_trial(path, uid))
            if on_progress:
                on_progress(run.done, total)
        dead.clear()
        for i in range(0, len(later), batch_size):
            submit(later[i:i + batch_size])


def _rejected(run: _Run, rejections: list[Rejected]) -> None:
    for r in rejections:
        logger.info("rejected [%s] %s", r.code, r.path)
    run.report.rejected.extend(rejections)
    if rejections:
        run.sink.reject(rejections)


def _write(run: _Run, result: BatchResult) -> list[tuple[Path, str]]:
    """Write one batch's images (catalog, then index, then cache); returns copies to try instead of rejected ones."""
    if result.prepared:
        run.sink.write(result.prepared, result.vectors)
        run.report.ingested += len(result.prepared)
        present = [str(p) for item in result.prepared for p in run.copies.decoded(run.uid_of.pop(item.path, ""))]
        run.report.already_present += len(present)
        run.done += len(result.prepared) + len(present)
        run.sink.clear_rejections(present)
    _rejected(run, result.rejected)
    retry = []
    for r in result.rejected:
        run.done += 1
        uid = run.uid_of.pop(r.path, None)
        if uid is not None and (next_copy := run.copies.failed(uid)) is not None:
            retry.append((next_copy, uid))
    logger.debug("batch from %s: %d written, %d rejected", result.worker, len(result.prepared), len(result.rejected))
    return retry
