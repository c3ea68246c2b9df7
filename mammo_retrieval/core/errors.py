"""A small exception hierarchy. Each error has a stable ``code``, a message, and remedies.

A remedy says how to fix the problem in words and, where an operation of ours does it, names that
operation by a stable ``action`` (e.g. ``index_rebuild``). Front ends render actions their own way: the
CLI as a command line, the HTTP layer as JSON. Nothing here speaks CLI. Exit codes and HTTP statuses are
mapped once, at each boundary.
"""
from __future__ import annotations

import errno
import os
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Iterable, Iterator


@dataclass(frozen=True)
class Remedy:
    text: str
    action: str | None = None  # an operation that fixes it: ingest, index_rebuild, db_upgrade, status, ...


class MammoRetrievalError(Exception):
    """Base of every error this package raises on purpose."""

    code = "error"
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, remedies: Iterable[Remedy] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.remedies: tuple[Remedy, ...] = tuple(remedies) + ((Remedy(hint),) if hint else ())

    @property
    def hint(self) -> str | None:
        """The remedies in words, one line (what a plain-text caller shows)."""
        return "; ".join(r.text for r in self.remedies) or None

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.remedies else self.message

    def as_dict(self) -> dict:
        """The JSON body of an HTTP error: {"error": code, "message", "hint", "remedies"}."""
        return {"error": self.code, "message": self.message, "hint": self.hint,
                "remedies": [asdict(r) for r in self.remedies]}


class ConfigError(MammoRetrievalError):
    code = "config_error"
    exit_code = 2


class RejectionCode(StrEnum):
    """Every reason a file can be refused: the one list (stored in ``rejected_files.code``)."""

    EMPTY_FILE = "empty_file"
    NOT_DICOM = "not_dicom"
    UNREADABLE_FILE = "unreadable_file"
    UNENCODABLE_PATH = "unencodable_path"
    UNREADABLE_HEADER = "unreadable_header"
    MISSING_UID = "missing_uid"
    WRONG_MODALITY = "wrong_modality"
    FOR_PROCESSING = "for_processing"
    COLOUR_IMAGE = "colour_image"
    NO_PIXEL_DATA = "no_pixel_data"
    INVALID_PIXEL_MODULE = "invalid_pixel_module"
    MULTIFRAME = "multiframe"
    TOO_LARGE = "too_large"
    SIZE_MISMATCH = "size_mismatch"
    TRUNCATED_PIXEL_DATA = "truncated_pixel_data"
    UNDECODABLE_PIXEL_DATA = "undecodable_pixel_data"
    UNREADABLE_FOLDER = "unreadable_folder"  # a folder the walk cannot list
    BROKEN_LINK = "broken_link"  # a symbolic link to nothing, or to itself (a loop)
    WORKER_DIED = "worker_died"  # its decoding process died on it, alone (a decoder crash, out of memory)
    TRANSFER_FAILED = "transfer_failed"  # a PACS kept failing to list or send it (after retries)


# Never swallowed by a "one bad file" catch: the user or the interpreter asked to stop.
FATAL_EXCEPTIONS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def display_path(path: str | os.PathLike) -> str:
    """A path as text that can always be printed and stored: bytes that are not UTF-8 (kept by Python
    as surrogates) become backslash escapes such as ``\\xff``."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate that no file name could have produced
        raw = os.fspath(path).encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


class DicomRejected(MammoRetrievalError):
    """A file that cannot be ingested. ``code`` is a stable machine-readable reason (a RejectionCode)."""

    exit_code = 3

    def __init__(self, path: str | os.PathLike, code: RejectionCode | str, reason: str, *,
                 hint: str | None = None, remedies: Iterable[Remedy] = ()) -> None:
        shown = display_path(path)
        reason = " ".join(str(reason).split())  # one line: a decoder's message may hold newlines
        super().__init__(f"{shown}: {reason}", hint=hint, remedies=remedies)
        self.path = shown
        self.code = RejectionCode(code).value  # an unknown code is a bug: ValueError here, not a silent row
        self.reason = reason


class WeightsError(MammoRetrievalError):
    code = "weights_error"
    exit_code = 4


class IndexMismatchError(MammoRetrievalError):
    """The index was built by another encoder or preprocessing than the one asked for."""

    code = "index_mismatch"
    exit_code = 5


class IndexCorruptError(MammoRetrievalError):
    code = "index_corrupt"
    exit_code = 6


class NotFoundError(MammoRetrievalError):
    code = "not_found"
    exit_code = 7


class NoDatabaseError(NotFoundError):
    """Nothing ingested yet: no database, or one without our schema. Not found to the CLI (exit 7); a service
    that cannot answer anything yet (503) over HTTP, where 404 says the request named something unknown."""
    code = "no_database"


class NoIndexError(NotFoundError):
    """No index for the live model (nothing ingested with it); as NoDatabaseError for the CLI and HTTP."""
    code = "no_index"


class DatabaseError(MammoRetrievalError):
    code = "database_error"
    exit_code = 8


class BusyError(MammoRetrievalError):
    """Another process holds the write lock."""

    code = "busy"
    exit_code = 9


class ReindexIncompleteError(MammoRetrievalError):
    """``reindex`` embedded only part of the archive, so it did not switch the live index."""

    exit_code = 10

    def __init__(self, message: str, failures: list[dict], *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.failures = failures


class StorageFullError(MammoRetrievalError):
    """The disk (or quota) under the home is full. Every write commits atomically, so nothing stored is lost:
    free space and rerun the command, which picks up where it stopped."""

    exit_code = 11


class PacsError(MammoRetrievalError):
    """A PACS (DICOMweb or DIMSE peer) refused or kept failing a request that the whole operation needs:
    the search of an ingest, a STOW-RS, the listener's port. One instance that fails is a rejection instead."""

    code = "pacs_error"
    exit_code = 12


class CredentialsRefused(PacsError):
    """The PACS refused our credentials (401/403): every later request would be refused too."""


_SQLITE_FULL, _SQLITE_CORRUPT, _SQLITE_NOTADB = 13, 11, 26


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what it wraps (SQLAlchemy's ``orig``) and its chain, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([getattr(e, "orig", None), e.__cause__, e.__context__])


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from a file write, SQLite's "database or disk is full" (also inside SQLAlchemy's
    OperationalError), or a faiss write error caused by either."""
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(e, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        text = str(e)
        if "database or disk is full" in text or "No space left on device" in text or "Disk quota exceeded" in text:
            return True
    return False


def is_database_corrupt(exc: BaseException) -> bool:
    """SQLite's "database disk image is malformed" or "file is not a database"."""
    for e in _causes(exc):
        if getattr(e, "sqlite_errorcode", None) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return True
        if "database disk image is malformed" in str(e) or "file is not a database" in str(e):
            return True
    return False


def _reason(exc: BaseException) -> str:
    """The driver's or the OS's own words, never SQLAlchemy's text: that holds the statement's parameters,
    which may be patient data."""
    for e in _causes(exc):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        if getattr(e, "sqlite_errorcode", None) is not None or type(e).__module__ == "sqlite3":
            return " ".join(str(e).split())
    return type(exc).__name__


def storage_full(path: str | os.PathLike, exc: BaseException | None = None) -> StorageFullError:
    """The one error for a full disk, naming where it happened."""
    detail = f" ({_reason(exc)})" if exc is not None else ""
    return StorageFullError(f"no space left on the disk holding {display_path(path)}{detail}",
                            hint="free space (or raise the quota) and rerun the command: what was committed is "
                                 "kept, and the rerun adds only what is missing")


def database_corrupt(path: str | os.PathLike, exc: BaseException | None = None) -> DatabaseError:
    """A damaged SQLite file ("database disk image is malformed"), with the two ways back."""
    shown = display_path(path)
    detail = f" ({_reason(exc)})" if exc is not None else ""
    return DatabaseError(f"{shown}: the database file is damaged{detail}",
                         remedies=[Remedy(f"restore it from a backup, or salvage what it holds with `sqlite3 {shown} "
                                           "'.recover' | sqlite3 recovered.db` and point paths.database_url "
                                           "at recovered.db"),
                                    Remedy("then rebuild the index from it", "index_rebuild")])
