"""The header screen: cheap checks on each file's header before any pixel is decoded. It rejects what the
header already condemns and skips SOPInstanceUIDs that are embedded already (identity is the UID, so a
copy of a file under another path is "already present"). Runs in the process that owns the catalog."""
from __future__ import annotations

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


UNCHANGED_CRASHER_REASON = ("its decoding process died on an earlier run (a crash in a decoder, or out of memory) and "
                            "the file has not changed since (same size, modification time, inode and change time), "
                            "so it was not decoded again; `mretrieve ingest --retry-rejected` tries it again")


def unchanged_crashers(db: "Database", paths: list[Path]) -> tuple[list[Path], list[Rejected]]:
    """Split off the files whose decoding process died on an earlier run and that have not changed since.

    Why: each such file costs a worker's death and restart on every rerun (an out-of-memory one can stall
    the machine first), and decoding it again gives the same death. Returns (paths to go on with,
    rejections of the others, their fingerprint kept so the next run knows them too)."""
    names = [display_path(p) for p in paths]  # as rejections are stored: any name can be text
    with db.session() as s:
        recorded = repo.rejection_fingerprints(s, names, RejectionCode.WORKER_DIED.value)
    if not recorded:
        return paths, []
    keep, rejected = [], []
    for path, name in zip(paths, names):
        before = recorded.get(name)
        if before is not None and before == file_fingerprint(path):
            rejected.append(Rejected.of(str(path), RejectionCode.WORKER_DIED, UNCHANGED_CRASHER_REASON, before))
        else:
            keep.append(path)
    return keep, rejected


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
