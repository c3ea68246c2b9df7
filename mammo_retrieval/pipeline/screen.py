"""The header screen: cheap checks on each file's header before any pixel is decoded. It rejects what the
header already condemns and skips SOPInstanceUIDs that are embedded already (identity is the UID, so a
copy of a file under another path is "already present"). Runs in the process that owns the catalog."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mammo_retrieval.core.config import ReaderConfig
from mammo_retrieval.core.errors import FATAL_EXCEPTIONS, DicomRejected, RejectionCode, display_path
from mammo_retrieval.core.fileio import file_fingerprint
from mammo_retrieval.dicom.reader import read_header
from mammo_retrieval.pipeline.prepare import Rejected
from mammo_retrieval.storage.catalog import repository as repo

if TYPE_CHECKING:
    from mammo_retrieval.dicom.header import HeaderFields
    from mammo_retrieval.pipeline.runner import PrepareJob
    from mammo_retrieval.storage.catalog import Database


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


def _screen_one(path: Path, cfg: ReaderConfig) -> "HeaderFields | Rejected":
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


UNCHANGED_CRASHER_REASON = ("its decoding process died on two runs (a crash in a decoder, or out of memory) and "
                            "neither the file (size, modification time, inode, change time) nor the decoders' "
                            "versions and read options have changed since, so it was not decoded again; "
                            "`mretrieve ingest --retry-rejected` tries it again")
DEATHS_BEFORE_SKIP = 2  # one death may be the machine's (another process's memory); two on two runs are the file's
DECODING_PACKAGES = ("mammo_retrieval", "pydicom", "numpy", "opencv-python-headless", "pylibjpeg",
                     "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pylibjpeg-rle", "pyjpegls", "glymur", "pillow",
                     "python-gdcm")  # pydicom may pick pillow or gdcm where installed
READER_SOURCES = ("dicom", "preprocess", "pipeline/prepare.py", "pipeline/worker.py")  # the code decoding runs


def decoding_environment(prepare_job: object) -> str:
    """What besides the file decides whether decoding it crashes: the decoders' versions and the read and
    preprocessing options (``prepare_job``'s repr: plain values). A crash recorded under another
    environment (a decoder upgrade, another option) is not a reason to skip the file. It is this process's
    environment: remote Dask workers' packages, and memory limits, are not in it."""
    from importlib.metadata import PackageNotFoundError, version
    versions = []
    for name in DECODING_PACKAGES:
        try:
            versions.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name}=-")
    try:
        from glymur.version import openjpeg_version  # the system's libopenjp2, for reduced JPEG 2000 decoding
    except ImportError:
        openjpeg_version = "-"
    facts = [*versions, f"libopenjp2={openjpeg_version}", f"reader={reader_source_digest()}", repr(prepare_job)]
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:16]


def reader_source_digest(package: Path | None = None) -> str:
    """The decoding code's own source (READER_SOURCES under ``package``, this one by default): a fix to the
    reader changes it while the package's version stays, and gets every crasher decoded again."""
    package = package or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for entry in READER_SOURCES:
        target = package / entry
        for source in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            digest.update(source.relative_to(package).as_posix().encode())
            digest.update(source.read_bytes() if source.is_file() else b"-")
    return digest.hexdigest()[:16]


def crash_fingerprint(path: "Path | object", environment: str) -> str | None:
    """The file's fingerprint (core.fileio) within a decoding environment, hashed to fit the catalog's
    column; None for what is not a file (an instance pulled from a PACS: always decoded again)."""
    if not isinstance(path, Path) or (stat := file_fingerprint(path)) is None:
        return None
    return hashlib.sha256(f"{stat}|{environment}".encode()).hexdigest()[:40]


def unchanged_crashers(db: "Database", paths: list[Path], prepare_job: "PrepareJob",
                       model_version_id: int) -> tuple[list[Path], list[Rejected]]:
    """Split off the files whose decoding process died on two runs and that have not changed since, in the
    same decoding environment (``prepare_job``'s: see decoding_environment).

    Why: each such file costs a worker's death and restart on every rerun (an out-of-memory one can stall
    the machine first), and decoding it again gives the same death. A crasher whose image is embedded
    already (a good copy under another path) goes on, so that the screen counts it present and clears
    its rejection. Returns (paths to go on with, rejections of the others, their fingerprint kept)."""
    names = [display_path(p) for p in paths]  # as rejections are stored: any name can be text
    with db.session() as s:
        recorded = repo.rejection_fingerprints(s, names, RejectionCode.WORKER_DIED.value, DEATHS_BEFORE_SKIP)
    if not recorded:
        return paths, []
    environment = decoding_environment(prepare_job)  # only with crashes on record: it reads package metadata
    keep, rejected = [], []
    for path, name in zip(paths, names):
        before = recorded.get(name)
        if before is not None and before == crash_fingerprint(path, environment) \
                and not _embedded_already(db, path, prepare_job.reader, model_version_id):
            rejected.append(Rejected.of(str(path), RejectionCode.WORKER_DIED, UNCHANGED_CRASHER_REASON, before))
        else:
            keep.append(path)
    return keep, rejected


def _embedded_already(db: "Database", path: Path, reader: ReaderConfig, model_version_id: int) -> bool:
    """Whether the file's SOPInstanceUID is embedded (its header only: a crash is in the pixel decoding)."""
    header = _screen_one(path, reader)
    if isinstance(header, Rejected):
        return False
    with db.session() as s:
        return bool(repo.embedded_sops(s, [header.sop_instance_uid], model_version_id))


def screen(db: "Database", reader: ReaderConfig, paths: list[Path], mv_id: int,
           copies: Copies) -> tuple[list[tuple[Path, str]], list[Rejected], int]:
    """Header pass: reject what the header already condemns, skip SOPInstanceUIDs already embedded.

    Returns ((path, SOPInstanceUID) to decode, rejections, number already present). Identity is
    SOPInstanceUID, so a copy of an embedded file under another path counts as already present; a copy of a
    file still being decoded waits in ``copies`` (see :class:`Copies`).
    """
    headers, rejected = {}, []
    for path in paths:
        result = _screen_one(path, reader)
        if isinstance(result, Rejected):
            rejected.append(result)
        else:
            headers[path] = result
    with db.session() as s:
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
        with db.session() as s:
            repo.clear_rejections(s, present)
    return todo, rejected, len(present)
