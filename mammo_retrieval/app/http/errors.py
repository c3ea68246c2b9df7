"""Our exception hierarchy mapped to HTTP statuses, once, at the HTTP boundary (as the CLI maps exit codes)."""
from __future__ import annotations

from mammo_retrieval.core import errors as e
from mammo_retrieval.storage.cache import CacheCorruptError


class NotReady(e.MammoRetrievalError):
    """What every answer is read from is missing: no database yet (``no_database``), or no index for the live
    model (``no_index``). The library raises a NotFoundError for it (the CLI's exit 7); over HTTP that would be
    a 404, which says the request named something that does not exist, so the routes' readiness checks
    (``api.catalog_ready``, ``api.index_ready``) re-raise it as this: 503, the service cannot answer yet."""

    def __init__(self, code: str, cause: e.NotFoundError) -> None:
        super().__init__(cause.message, remedies=cause.remedies)
        self.code = code


# most specific first; the base class (an error we raise on purpose but did not classify) is a 500
STATUS: list[tuple[type[e.MammoRetrievalError], int]] = [
    (e.DicomRejected, 422),          # the upload is not a usable mammogram: the rejection code says why
    (e.ConfigError, 400),            # a bad parameter (k < 1, an unknown laterality...)
    (NotReady, 503),                 # no database or no index yet: nothing can be answered
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
