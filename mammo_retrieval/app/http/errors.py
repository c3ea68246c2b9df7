"""Our exception hierarchy mapped to HTTP statuses, once, at the HTTP boundary (as the CLI maps exit codes)."""
from __future__ import annotations

from mammo_retrieval.core import errors as e
from mammo_retrieval.storage.cache import CacheCorruptError

# most specific first; the base class (an error we raise on purpose but did not classify) is a 500
STATUS: list[tuple[type[e.MammoRetrievalError], int]] = [
    (e.DicomRejected, 422),          # the upload is not a usable mammogram: the rejection code says why
    (e.ConfigError, 400),            # a bad parameter (k < 1, an unknown laterality...)
    (e.NoDatabaseError, 503),        # nothing ingested yet: no request can be answered (the CLI's not found)
    (e.NoIndexError, 503),
    (e.NotFoundError, 404),          # what the request named (an image, a study, a QC sweep) does not exist
    (e.IndexMismatchError, 409),     # the index was built by another model than the one serving
    (e.BusyError, 503),
    (e.StorageFullError, 507),
    (e.WeightsError, 503),
    (e.IndexCorruptError, 503),
    (CacheCorruptError, 503),
    (e.DatabaseError, 503),
    (e.ReindexIncompleteError, 409),
    (e.PacsError, 502),              # the PACS behind us failed
]


def http_status(exc: e.MammoRetrievalError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: e.MammoRetrievalError) -> dict:
    """``{"error": code, "message", "hint", "remedies"}``; a rejection also names its reason."""
    body = exc.as_dict()
    if isinstance(exc, e.DicomRejected):
        body["reason"] = exc.reason
    return body
