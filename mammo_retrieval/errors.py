"""A small exception hierarchy. Each error says what went wrong and, where it can, how to fix it.

Exit codes are mapped once, at the CLI boundary (``mammo_retrieval.cli``).
"""
from __future__ import annotations


class MammoRetrievalError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(MammoRetrievalError):
    exit_code = 2


class DicomRejected(MammoRetrievalError):
    """A file that cannot be ingested. ``code`` is a stable machine-readable reason."""

    exit_code = 3

    def __init__(self, path: str, code: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {reason}", hint=hint)
        self.path = str(path)
        self.code = code
        self.reason = reason


class WeightsError(MammoRetrievalError):
    exit_code = 4


class IndexMismatchError(MammoRetrievalError):
    """The index was built by another encoder or preprocessing than the one asked for."""

    exit_code = 5


class IndexCorruptError(MammoRetrievalError):
    exit_code = 6


class NotFoundError(MammoRetrievalError):
    exit_code = 7


class DatabaseError(MammoRetrievalError):
    exit_code = 8


class BusyError(MammoRetrievalError):
    """Another process holds the write lock."""

    exit_code = 9


class ReindexIncompleteError(MammoRetrievalError):
    """``reindex`` embedded only part of the archive, so it did not switch the live index."""

    exit_code = 10

    def __init__(self, message: str, failures: list[dict], *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.failures = failures
