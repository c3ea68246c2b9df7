"""Wires the ingest stages: walk -> header check (skip known SOPInstanceUIDs) -> prepare in workers
-> embed in batches -> write DB rows then index vectors.

Consistency: each batch is committed to the database first, then added to the index; the index is saved
atomically every few batches and at the end. If the process dies in between, the database is ahead of the
index and the next open adds the missing vectors from the database (``Workspace.sync_index``).
"""
from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from sqlalchemy.engine import make_url

from ..db import repository as repo
from ..dicom.reader import read_header
from ..errors import FATAL_EXCEPTIONS, DicomRejected, NotFoundError, RejectionCode
from ..preprocess import normalise
from .stages import Prepared, Rejected, prepare_file
from .threads import EncoderThreads
from .walker import Walk, absolute_root, walk
from .worker import prepare_worker_process

if TYPE_CHECKING:
    from ..api import Workspace
    from ..dicom.header import HeaderFields
    from ..config import IngestConfig

HEADER_CHUNK = 256


@dataclass
class IngestReport:
    root: str
    files_seen: int = 0
    ingested: int = 0
    already_present: int = 0
    skipped: int = 0  # plainly not DICOM by extension (sidecars), never read
    rejected: list[Rejected] = field(default_factory=list)
    model_key: str = ""
    random_weights: bool = False
    index_type: str = ""
    index_ntotal: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "root": self.root, "files_seen": self.files_seen, "ingested": self.ingested,
            "already_present": self.already_present, "skipped": self.skipped, "rejected": len(self.rejected),
            "rejections": [{"path": r.path, "code": r.code, "reason": r.reason} for r in self.rejected],
            "model_version": self.model_key, "random_weights": self.random_weights,
            "index_type": self.index_type, "index_ntotal": self.index_ntotal, "seconds": round(self.seconds, 2),
        }


class _InlineExecutor(Executor):
    """workers=0: run stages in this process (debugging, tiny archives)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _executor(workers: int, cfg: "IngestConfig") -> Executor:
    if workers <= 0:
        return _InlineExecutor()
    # fork, as torch's DataLoader does: workers never touch torch, and unlike spawn, fork does not
    # re-import the caller's __main__ (a plain script calling the API would otherwise break)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                               initializer=prepare_worker_process,
                               initargs=(cfg.heap_reuse, cfg.fast_path and cfg.sampled_clahe, os.getpid()))


class Copies:
    """SOPInstanceUIDs of this run: those embedded, and those being decoded with the other copies that wait
    on each. A copy counts as already present only once a copy with its UID is embedded, so a corrupt copy
    that is read first never hides a good one: when it is rejected, the next copy is decoded instead."""

    def __init__(self) -> None:
        self.embedded: set[str] = set()
        self.waiting: dict[str, list[Path]] = {}

    def claim(self, uid: str, path: Path) -> str:
        """'decode' (the first copy seen), 'wait' (another copy is being decoded) or 'present'."""
        if uid in self.embedded:
            return "present"
        if uid in self.waiting:
            self.waiting[uid].append(path)
            return "wait"
        self.waiting[uid] = []
        return "decode"

    def decoded(self, uid: str) -> list[Path]:
        """A copy was embedded: the copies that waited on it are already present."""
        self.embedded.add(uid)
        return self.waiting.pop(uid, [])

    def failed(self, uid: str) -> Path | None:
        """A copy was rejected: the next waiting copy to decode, if any."""
        waiting = self.waiting.get(uid)
        if waiting:
            return waiting.pop(0)
        self.waiting.pop(uid, None)
        return None


def _unencodable(path: Path) -> Rejected | None:
    """A name that is not valid UTF-8 cannot be stored (nor shown) as text: refuse it, naming its bytes."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return Rejected.of(str(path), RejectionCode.UNENCODABLE_PATH,
                           f"file name is not valid UTF-8: {os.fsencode(path)!r}; rename it to ingest it")
    return None


def _screen_one(path: Path, cfg) -> "HeaderFields | Rejected":
    """One file's header check; never raises for a bad file."""
    if (bad_name := _unencodable(path)) is not None:
        return bad_name
    try:
        return read_header(path, cfg)
    except DicomRejected as exc:
        return Rejected(exc.path, exc.code, exc.reason)
    except FATAL_EXCEPTIONS:
        raise
    except BaseException as exc:  # noqa: BLE001 - last resort: one file's surprise must not lose the batch
        return Rejected.of(str(path), RejectionCode.UNREADABLE_HEADER,
                           f"header unreadable: unexpected {type(exc).__name__}: {exc}")


def _screen(ws: "Workspace", paths: list[Path], mv_id: int,
            copies: Copies) -> tuple[list[tuple[Path, str]], list[Rejected], int]:
    """Header pass: reject what the header already condemns, skip SOPInstanceUIDs already embedded.

    Returns ((path, SOPInstanceUID) to decode, rejections, number already present). Identity is
    SOPInstanceUID, so a copy of an embedded file under another path counts as already present; a copy of a
    file still being decoded waits in ``copies`` (see :class:`Copies`).
    """
    headers, rejected = {}, []
    for path in paths:
        result = _screen_one(path, ws.config.reader)
        if isinstance(result, Rejected):
            rejected.append(result)
        else:
            headers[path] = result
    with ws.db.session() as s:
        known = repo.embedded_sops(s, (h.sop_instance_uid for h in headers.values()), mv_id)
    copies.embedded.update(known)
    todo, present = [], []
    for path, header in headers.items():
        claim = copies.claim(header.sop_instance_uid, path)
        if claim == "present":
            present.append(str(path))
        elif claim == "decode":
            todo.append((path, header.sop_instance_uid))
    if present:
        with ws.db.session() as s:
            repo.clear_rejections(s, present)
    return todo, rejected, len(present)


def _record_first_live_model(ws: "Workspace") -> None:
    """The first model to fill an index becomes the live one (reindex switches from it later)."""
    from ..versions import ServingModel, read_live, switch_live
    live, _ = read_live(ws.config.index_dir)
    if live is None:
        cfg = ws.serving_encoder_config()
        switch_live(ws.config.index_dir, ServingModel(ws.encoder.identity.key, cfg.name, cfg.weights, cfg.input_size))


def _state_paths(ws: "Workspace") -> tuple[Path, ...]:
    """The home's own state, never part of an archive: index and cache folders, and the SQLite database
    with its side files (a home inside the archive folder would otherwise list them as rejections)."""
    paths = [ws.config.index_dir, ws.config.cache_dir]
    url = make_url(ws.config.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db = Path(url.database)
        paths += [db, *(db.with_name(db.name + end) for end in ("-wal", "-shm", "-journal"))]
    return tuple(paths)


def _nothing_to_ingest(root: Path, found: Walk) -> NotFoundError:
    """An archive without a single candidate file is a mistake (wrong folder, unmounted share), not a success."""
    details = []
    if found.skipped:
        details.append(f"{len(found.skipped)} file(s) skipped as not DICOM by extension")
    if found.errors:
        details.append(f"{len(found.errors)} folder(s) unreadable, e.g. {found.errors[0].path}: "
                       f"{found.errors[0].reason}")
    return NotFoundError(f"no file to ingest under {root}" + (f" ({'; '.join(details)})" if details else ""),
                         hint="check the folder (is the share mounted?); files named "
                              "*.csv, *.txt, *.png, ... are skipped by extension")


def run_ingest(ws: "Workspace", root: str | Path, *, workers: int | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> IngestReport:
    """Ingest every candidate file under root. Paths are stored absolute (symlinks kept as typed).

    Raises NotFoundError, before touching the database or loading the model, when the walk finds no
    candidate file at all.
    """
    started = time.perf_counter()
    root = absolute_root(root)
    report = IngestReport(root=str(root))
    found = walk(root, exclude=_state_paths(ws))
    if not found.files:
        raise _nothing_to_ingest(root, found)
    paths = found.files
    report.files_seen = len(paths)
    report.skipped = len(found.skipped)
    folder_rejections = [Rejected(e.path, e.code, e.reason) for e in found.errors]
    report.rejected.extend(folder_rejections)
    done = 0

    with ws.write_lock():  # before the model loads: a second writer hears "busy" at once
        encoder = ws.encoder
        settings = encoder.settings
        batch_size = ws.config.encoder.batch_size
        workers = ws.config.workers() if workers is None else workers
        mv_id = ws.model_version_id()
        index = ws.open_index(create=True)
        ws.sync_index(index, mv_id)
        with ws.db.session() as s:  # a folder that lists again is no longer rejected
            repo.clear_rejections(s, [str(f) for f in found.folders])
        pending_rejections: list[Rejected] = list(folder_rejections)
        batch: list[Prepared] = []
        batches_since_save = 0

        def flush() -> None:
            nonlocal batches_since_save
            if batch:
                embedding = time.perf_counter()
                vectors = encoder.embed(normalise(np.stack([p.display for p in batch]), settings))
                threads.embedded(time.perf_counter() - embedding)
                items = [repo.NewImage(p.header, p.path, p.sha256, p.frame_index, v) for p, v in zip(batch, vectors)]
                # the cache before the database: if the disk fills, the batch is not committed and a rerun
                # redoes it (its cache slots are reused), so no image ends up in the database but not the cache
                ws.image_cache.put_many((p.header.sop_instance_uid, p.display) for p in batch)
                with ws.db.session() as s:
                    ids = repo.write_images(s, items, mv_id)
                index.add(np.asarray(ids), vectors)
                report.ingested += len(batch)
                batch.clear()
                batches_since_save += 1
            if present_paths:
                with ws.db.session() as s:
                    repo.clear_rejections(s, present_paths)
                present_paths.clear()
            if pending_rejections:
                with ws.db.session() as s:
                    repo.record_rejections(s, ((r.path, r.code, r.reason) for r in pending_rejections))
                pending_rejections.clear()
            if batches_since_save >= ws.config.index.save_every_batches:
                index.save()
                batches_since_save = 0

        copies = Copies()
        present_paths: list[str] = []
        max_in_flight = max(2, workers) * 4 + batch_size
        threads = EncoderThreads(encoder, ws.config.ingest.encoder_threads, workers)
        with _executor(workers, ws.config.ingest) as pool, threads:
            in_flight: deque[tuple[Future, str]] = deque()

            def submit(path: Path, uid: str) -> None:
                in_flight.append((pool.submit(prepare_file, str(path), ws.config.reader, settings,
                                              **ws.prepare_options()), uid))

            def collect(item: tuple[Future, str]) -> None:
                nonlocal done
                future, uid = item
                waiting = time.perf_counter()
                result = future.result()
                threads.waited(time.perf_counter() - waiting)
                if isinstance(result, Rejected):
                    report.rejected.append(result)
                    pending_rejections.append(result)
                    if (next_copy := copies.failed(uid)) is not None:
                        submit(next_copy, uid)  # a rejected copy must not hide a good one
                else:
                    batch.append(result)
                    others = copies.decoded(uid)
                    report.already_present += len(others)
                    present_paths.extend(str(p) for p in others)
                    done += len(others)
                done += 1
                if len(batch) >= batch_size:
                    flush()

            for start in range(0, len(paths), HEADER_CHUNK):
                todo, header_rejected, n_present = _screen(ws, paths[start:start + HEADER_CHUNK], mv_id, copies)
                report.rejected.extend(header_rejected)
                pending_rejections.extend(header_rejected)
                report.already_present += n_present
                done += len(header_rejected) + n_present
                for path, uid in todo:
                    submit(path, uid)
                    while len(in_flight) >= max_in_flight:
                        collect(in_flight.popleft())
                if on_progress:
                    on_progress(done, len(paths))
            while in_flight:
                collect(in_flight.popleft())
                if on_progress:
                    on_progress(done, len(paths))
        flush()
        ws.maybe_relayout(index, mv_id)
        index.save()
        _record_first_live_model(ws)
        report.model_key = encoder.identity.key
        report.random_weights = encoder.identity.random_weights
        report.index_type = index.manifest.index_type
        report.index_ntotal = index.ntotal
    report.seconds = time.perf_counter() - started
    return report
