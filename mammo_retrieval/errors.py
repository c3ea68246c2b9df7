"""A small exception hierarchy. Each error has a stable ``code``, a message, and remedies.

A remedy says how to fix the problem in words and, where an operation of ours does it, names that
operation by a stable ``action`` (e.g. ``index_rebuild``). Front ends render actions their own way: the
CLI as a command line, the HTTP layer as JSON. Nothing here speaks CLI. Exit codes and HTTP statuses are
mapped once, at each boundary.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable


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


class DicomRejected(MammoRetrievalError):
    """A file that cannot be ingested. ``code`` is a stable machine-readable reason."""

    exit_code = 3

    def __init__(self, path: str, code: str, reason: str, *, hint: str | None = None,
                 remedies: Iterable[Remedy] = ()) -> None:
        super().__init__(f"{path}: {reason}", hint=hint, remedies=remedies)
        self.path = str(path)
        self.code = code
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
