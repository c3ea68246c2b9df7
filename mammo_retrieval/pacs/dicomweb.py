"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) through dicomweb-client, with the robustness an archive pull needs.

- Authentication (basic or bearer) comes from the config or the environment (``PacsConfig``), never from
  the command line, and never appears in a log or an error message.
- Every request is retried with exponential backoff on 5xx, 429, timeouts, refused connections and
  transfers broken mid-body; a 4xx other than 429 is final at once. What still fails raises
  :class:`TransferFailed` (one study or instance: the caller records it and goes on) or
  :class:`~mammo_retrieval.core.errors.PacsError` (the search itself: nothing can be done).
- An instance is retrieved in its stored transfer syntax (``application/dicom; transfer-syntax=*``), so a
  pull decodes exactly the pixels a folder ingest of the same files would.
"""
from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from mammo_retrieval.core.errors import ConfigError, CredentialsRefused, NotFoundError, PacsError

if TYPE_CHECKING:
    from pydicom import Dataset

    from mammo_retrieval.core.config import PacsConfig
    from mammo_retrieval.dicom.reader import InMemoryDicom

logger = logging.getLogger(__name__)

T = TypeVar("T")
QIDO_PAGE = 1000  # results asked for per QIDO-RS request
RETRIABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
CREDENTIALS_HINT = "set pacs.dicomweb_username/password or dicomweb_token ($MRETRIEVE_DICOMWEB_*)"
REFUSED_STATUSES = frozenset({401, 403})
_UIDS = {"study": "0020000D", "series": "0020000E", "sop": "00080018", "sop_class": "00080016"}
# SOP classes that are never an image to embed: structured reports and key object selections (ours among
# them, once STOWed back), presentation states, encapsulated documents. Skipped before any retrieval.
NOT_IMAGE_CLASS_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.",
                            "1.2.840.10008.5.1.4.1.1.104.")


def is_dicomweb_url(source: str) -> bool:
    """A DICOMweb base URL (or an instance's WADO URL) rather than a folder."""
    return str(source).lower().startswith(("http://", "https://"))


def redact(url: str) -> str:
    """A URL without any user:password part, for messages and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class TransferFailed(Exception):
    """One study or instance the PACS kept failing to send, after every retry; ``status`` is the last HTTP
    status, None where there was none (a timeout, a refused connection, a body cut short)."""

    def __init__(self, what: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"{what}: {reason}")
        self.what, self.reason, self.status = what, reason, status


@dataclass(frozen=True)
class RemoteInstance:
    """One instance found by QIDO-RS; ``url`` is its WADO-RS address, the path stored for it."""

    base_url: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str = ""  # "" where the server did not say

    @property
    def is_image(self) -> bool:
        return not self.sop_class_uid.startswith(NOT_IMAGE_CLASS_PREFIXES)

    @property
    def url(self) -> str:
        return f"{self.base_url}/studies/{self.study_uid}/series/{self.series_uid}/instances/{self.sop_uid}"


def parse_instance_url(url: str) -> RemoteInstance:
    """The inverse of ``RemoteInstance.url``; a URL of any other shape is a ConfigError naming it."""
    head, sep, tail = url.rstrip("/").rpartition("/studies/")
    parts = tail.split("/")
    if not sep or len(parts) != 5 or parts[1] != "series" or parts[3] != "instances":
        raise ConfigError(f"not a WADO-RS instance URL: {redact(url)}",
                          hint="expected BASE/studies/UID/series/UID/instances/UID")
    return RemoteInstance(head, parts[0], parts[2], parts[4])


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _retriable(exc: BaseException) -> bool:
    """5xx/429, and any failure without a status (timeout, refused or reset connection, a body cut short,
    a multipart message that does not parse); a 4xx is the server's final word."""
    status = _status_of(exc)
    return status is None or status in RETRIABLE_STATUSES


DESCRIBED_CHARS = 300  # of an exception's text (requests nests whole reprs of its connection objects)


def _describe(exc: BaseException) -> str:
    status = _status_of(exc)
    if status is not None:
        reason = getattr(getattr(exc, "response", None), "reason", "") or ""
        return f"HTTP {status} {reason}".strip()
    text = f"{type(exc).__name__}: {redact(str(exc))}"
    if len(text) <= DESCRIBED_CHARS:
        return text
    half = DESCRIBED_CHARS // 2  # the head names the failure, the tail its cause ("[Errno 111] Connection refused")
    return f"{text[:half].rsplit(' ', 1)[0]} ... {text[-half:].split(' ', 1)[-1]}"


def _credentials_refused(what: str, reason: str) -> CredentialsRefused:
    return CredentialsRefused(f"{what}: the PACS refused our credentials ({reason})", hint=CREDENTIALS_HINT)


def with_retries(call: Callable[[], T], what: str, *, retries: int, backoff_s: float,
                 sleep: Callable[[float], None] = time.sleep, refusal_is_fatal: bool = True) -> T:
    """``call()``, retried ``retries`` more times with backoff doubling from ``backoff_s``; raises
    TransferFailed naming ``what`` and the last failure. A 401/403 is a PacsError (wrong credentials stop
    everything) where ``refusal_is_fatal``, else one more TransferFailed (one instance we may not read)."""
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return call()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - requests, urllib3 and multipart parsing raise many kinds
            final = attempt == retries or not _retriable(exc)
            logger.log(logging.WARNING if final else logging.INFO, "%s failed (attempt %d of %d): %s",
                       what, attempt + 1, retries + 1, _describe(exc))
            if final:
                if refusal_is_fatal and _status_of(exc) in REFUSED_STATUSES:
                    raise _credentials_refused(what, _describe(exc)) from None
                raise TransferFailed(what, f"{_describe(exc)} after {attempt + 1} attempt(s)",
                                     _status_of(exc)) from None
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # the loop always returns or raises


def _session(cfg: "PacsConfig"):
    import requests
    session = requests.Session()
    if cfg.dicomweb_token:
        session.headers["Authorization"] = f"Bearer {cfg.dicomweb_token}"
    elif cfg.dicomweb_username:
        session.auth = (cfg.dicomweb_username, cfg.dicomweb_password or "")
    return session


def _first(item: dict, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


class DicomWebClient:
    """One PACS's DICOMweb service: search, retrieve and store, each with retries (see module doc)."""

    def __init__(self, base_url: str, cfg: "PacsConfig") -> None:
        from dicomweb_client.api import DICOMwebClient
        if not is_dicomweb_url(base_url):
            raise ConfigError(f"not a DICOMweb URL: {base_url}", hint="it starts with http:// or https://")
        if "@" in urlsplit(base_url).netloc:
            raise ConfigError(f"credentials in the URL {redact(base_url)}: they would be stored with every image and "
                              "shown in logs", hint="give them as $MRETRIEVE_DICOMWEB_USERNAME/_PASSWORD or "
                                                    "_TOKEN (or pacs.* in the config)")
        self.base_url = base_url.rstrip("/")
        self.cfg = cfg
        self._session = _session(cfg)
        self._client = DICOMwebClient(self.base_url, session=self._session, timeout=cfg.timeout_s)
        self._client.set_http_retry_params(retry=False)  # one retry policy, ours, for statuses and exceptions

    def close(self) -> None:
        """Close the pooled connections (a server reads instances back for years: none may leak)."""
        self._session.close()

    def __enter__(self) -> "DicomWebClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retrying(self, call: Callable[[], T], what: str, *, refusal_is_fatal: bool = True) -> T:
        return with_retries(call, what, retries=self.cfg.retries, backoff_s=self.cfg.backoff_s,
                            refusal_is_fatal=refusal_is_fatal)

    def _paged(self, search: Callable[[int, int], list[dict]], key: str, what: str) -> list[dict]:
        """Every result of a QIDO-RS search, a page at a time, until a page comes back empty (a server may
        cap pages below the limit asked for). dicomweb-client's ``get_remaining`` loops for ever on a
        server that ignores ``offset`` (Orthanc 1.10 does: it answers everything at once); here a page
        that brings nothing new ends the search, unless it was full, which means results we cannot
        reach: that is a PacsError, never a silent truncation."""
        results: dict[str, dict] = {}
        offset = 0
        while True:
            page = self._retrying(lambda: search(QIDO_PAGE, offset), what)
            new = {_first(item, key): item for item in page if _first(item, key) not in results}
            results.update(new)
            if not page:
                return list(results.values())
            if not new:
                if len(page) >= QIDO_PAGE:
                    raise TransferFailed(what, f"the server ignores QIDO-RS offset and caps results at "
                                               f"{len(page)}: the rest cannot be listed")
                return list(results.values())
            offset += len(page)

    def search_studies(self, *, studies: Iterable[str] = (), since: str | None = None,
                       modality: str | None = "MG") -> list[str]:
        """StudyInstanceUIDs that QIDO-RS finds: those of ``studies`` that exist (named studies are not
        filtered by modality; the caller reports the missing), or every study with ``modality`` among its
        modalities; from ``since`` (YYYYMMDD) on. A failing search is a PacsError."""
        filters: dict[str, str] = {}
        if modality and not studies:
            filters["ModalitiesInStudy"] = modality
        if since:
            if not (len(since) == 8 and since.isdigit()):
                raise ConfigError(f"--since {since!r} is not a date YYYYMMDD")
            filters["StudyDate"] = f"{since}-"
        wanted = list(studies)
        found: list[str] = []
        for study in wanted or [None]:
            query = dict(filters, **({"StudyInstanceUID": study} if study else {}))
            try:
                items = self._paged(lambda limit, offset, q=query: self._client.search_for_studies(
                    search_filters=q, fields=["StudyInstanceUID"], limit=limit, offset=offset),
                    _UIDS["study"], f"QIDO-RS study search at {redact(self.base_url)}")
            except TransferFailed as exc:
                raise PacsError(f"cannot search {redact(self.base_url)}: {exc.reason}",
                                hint="check the URL (the DICOMweb root, e.g. http://host:8042/dicom-web) "
                                     "and that the PACS is up") from None
            found += [_first(item, _UIDS["study"]) for item in items]
        return sorted(set(uid for uid in found if uid))

    def study_url(self, study_uid: str) -> str:
        return f"{self.base_url}/studies/{study_uid}"

    def search_instances(self, study_uid: str) -> list[RemoteInstance]:
        """Every instance of one study (raises TransferFailed for the study)."""
        items = self._paged(lambda limit, offset: self._client.search_for_instances(
            study_instance_uid=study_uid, fields=["SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"],
            limit=limit, offset=offset), _UIDS["sop"], f"QIDO-RS instance search of {self.study_url(study_uid)}")
        out = [RemoteInstance(self.base_url, study_uid, _first(i, _UIDS["series"]), _first(i, _UIDS["sop"]),
                              _first(i, _UIDS["sop_class"])) for i in items]
        return sorted((i for i in out if i.series_uid and i.sop_uid), key=lambda i: (i.series_uid, i.sop_uid))

    def retrieve(self, instance: RemoteInstance) -> "InMemoryDicom":
        """One instance in its stored transfer syntax, as the bytes of a DICOM file named by its URL."""
        from mammo_retrieval.dicom.reader import InMemoryDicom

        def fetch() -> bytes:
            ds = self._client.retrieve_instance(instance.study_uid, instance.series_uid, instance.sop_uid,
                                                media_types=(("application/dicom", "*"),))
            return to_file_bytes(ds)

        return InMemoryDicom(instance.url, self._retrying(fetch, f"WADO-RS {instance.url}", refusal_is_fatal=False))

    def retrieve_header(self, instance: RemoteInstance) -> "Dataset":
        """One instance's header from WADO-RS metadata: no pixel data crosses the network."""
        from pydicom import Dataset

        def fetch() -> "Dataset":
            meta = self._client.retrieve_instance_metadata(instance.study_uid, instance.series_uid,
                                                           instance.sop_uid)
            if isinstance(meta, list):  # the DICOM JSON array itself, as dicomweb-client before 0.60 gave it
                [meta] = meta
            # bulk data (pixels, large private values) stays on the PACS: a header needs none of it
            return Dataset.from_json(meta, bulk_data_uri_handler=lambda tag, vr, uri: None)

        return self._retrying(fetch, f"WADO-RS metadata {instance.url}", refusal_is_fatal=False)

    def store(self, datasets: list["Dataset"]) -> None:
        """STOW-RS; a refusal (or a response listing failed instances) is a PacsError."""
        try:
            response = self._retrying(lambda: self._client.store_instances(datasets),
                                      f"STOW-RS to {redact(self.base_url)}")
        except TransferFailed as exc:
            raise PacsError(f"STOW-RS to {redact(self.base_url)} failed: {exc.reason}") from None
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = ", ".join(str(item.get("FailureReason", "?")) for item in failed)
            raise PacsError(f"STOW-RS to {redact(self.base_url)}: {len(failed)} instance(s) refused "
                            f"(failure reason {reasons})")


def to_file_bytes(ds: "Dataset") -> bytes:
    """A dataset (as dicomweb-client returns it) written as a DICOM file, in its own transfer syntax."""
    import pydicom
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def retrieve_url(url: str, cfg: "PacsConfig", *, header_only: bool = False) -> "InMemoryDicom | Dataset":
    """The instance at a stored WADO-RS URL (a cache rebuild, a reindex), or only its header (a KOS)."""
    instance = parse_instance_url(url)
    try:
        with DicomWebClient(instance.base_url, cfg) as client:
            return client.retrieve_header(instance) if header_only else client.retrieve(instance)
    except TransferFailed as exc:
        raise _retrieval_error(url, exc) from None


def _retrieval_error(url: str, failed: TransferFailed) -> Exception:
    """What a failed read-back of a stored instance means: the PACS no longer holds it (404, 410: not
    found), refuses our credentials (401, 403), or is down or failing (anything else): both PacsErrors."""
    what = f"cannot retrieve {redact(url)}"
    if failed.status in (404, 410):
        return NotFoundError(f"{what}: {failed.reason}",
                             hint="the PACS no longer holds the instance: re-ingest from where it is now")
    if failed.status in REFUSED_STATUSES:
        return _credentials_refused(what, failed.reason)
    return PacsError(f"{what}: {failed.reason}",
                     hint="is the PACS up? the instance is read back from it (its stored WADO-RS URL)")
