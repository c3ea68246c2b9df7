"""A DICOM C-STORE listener (pynetdicom SCP) that indexes what it receives, in batches.

Each received instance is read and preprocessed at once, exactly as ingest does, so a file that ingest
would reject gets a failure status naming the reason (and is recorded as a rejection). An accepted file
is written to the spool (fsynced, renamed into place) *before* the success status goes back: from then on
a crash loses nothing, because the spool is ingested again on the next start. Accepted images wait in a
batch that is indexed when it holds ``batch_images`` or its first image is ``batch_seconds`` old.

The listener knows nothing of the catalog or the index: it is given three callables (``prepare``,
``index_batch``, ``record_rejection``), which the application wires to a Workspace.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mammo_retrieval.core.errors import FATAL_EXCEPTIONS, BusyError, ConfigError
from mammo_retrieval.core.fileio import sha256_file, write_bytes_atomic
from mammo_retrieval.core.netaddr import bind, cannot_listen
from mammo_retrieval.dicom.header import plain_uid
from mammo_retrieval.dicom.reader import InMemoryDicom
from mammo_retrieval.pipeline.prepare import Prepared, Rejected

if TYPE_CHECKING:
    from pynetdicom.events import Event

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700   # Storage: refused, out of resources (spool write failed, or index busy)
STATUS_CANNOT_UNDERSTAND = 0xC000  # Storage: error, cannot understand (the file would be rejected by ingest)

# What the listener accepts: every storage SOP class, in the transfer syntaxes the reader decodes.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",         # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",       # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",    # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",       # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",    # JPEG Baseline
    "1.2.840.10008.1.2.4.51",    # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57",    # JPEG Lossless
    "1.2.840.10008.1.2.4.70",    # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",    # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",    # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",    # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",    # JPEG 2000
    "1.2.840.10008.1.2.5",       # RLE Lossless
)


@dataclass(frozen=True)
class ListenSettings:
    host: str
    port: int
    ae_title: str
    allowed: tuple[str, ...]
    batch_images: int
    batch_seconds: float
    spool_dir: Path


def spool_path(spool_dir: Path, prepared: Prepared) -> Path:
    """Where a received instance is kept: ``spool/<StudyInstanceUID>/<SOPInstanceUID>.dcm``; a UID that is
    not a plain UID (a hand-made file) never becomes a path component."""
    study, sop = prepared.header.study_instance_uid, prepared.header.sop_instance_uid
    study = study if plain_uid(study) else "unknown-study"
    name = sop if plain_uid(sop) else f"sha256-{prepared.sha256}"
    return spool_dir / study / f"{name}.dcm"


def _spooled(path: Path, sha256: str) -> str | None:
    """None when ``path`` holds nothing yet; else "same bytes" or "other bytes" than those whose SHA-256
    is ``sha256`` (the received instance's, computed when it was prepared)."""
    if not path.is_file():
        return None
    return "same bytes" if sha256_file(path) == sha256 else "other bytes"


class Batcher:
    """Images accepted but not yet indexed. A background thread indexes a batch when it is full or old
    enough; a batch that fails (another writer holds the lock, the disk is full) stays and is tried again."""

    def __init__(self, index_batch: Callable[[list[Prepared]], int], batch_images: int, batch_seconds: float,
                 retry_seconds: float = 1.0) -> None:
        self.index_batch = index_batch
        self.batch_images, self.batch_seconds, self.retry_seconds = max(1, batch_images), batch_seconds, retry_seconds
        self._items: list[Prepared] = []
        self._first_at: float | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self.indexed = 0
        self._thread = threading.Thread(target=self._run, name="listen-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, prepared: Prepared) -> None:
        with self._cond:
            self._items.append(prepared)
            if self._first_at is None:
                self._first_at = time.monotonic()
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._items)

    def _due(self) -> float | None:
        """Seconds until the batch is due (0: now); None when it is empty."""
        if not self._items:
            return None
        if self._stopping or len(self._items) >= self.batch_images:
            return 0.0
        return max(0.0, self._first_at + self.batch_seconds - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                while (wait := self._due()) != 0.0:
                    if wait is None and self._stopping:
                        return
                    self._cond.wait(timeout=wait)
                batch, self._items, self._first_at = self._items[:self.batch_images], self._items[self.batch_images:], None
                if self._items:
                    self._first_at = time.monotonic()
            if not self._flush(batch):
                with self._cond:  # put it back in front, and wait before trying again
                    self._items[:0] = batch
                    self._first_at = self._first_at or time.monotonic()
                    if self._stopping:
                        return
                    self._cond.wait(timeout=self.retry_seconds)

    def _flush(self, batch: list[Prepared]) -> bool:
        try:
            written = self.index_batch(batch)
        except BusyError as exc:
            logger.info("batch of %d waits: %s", len(batch), exc.message)
            return False
        except FATAL_EXCEPTIONS:
            raise
        except Exception:  # noqa: BLE001 - the files are safe in the spool; the next start indexes them
            logger.exception("indexing a batch of %d received images failed; they stay in the spool", len(batch))
            return False
        self.indexed += written
        logger.info("indexed a batch of %d received images (%d new)", len(batch), written)
        return True

    def stop(self, timeout: float = 60.0) -> None:
        """Index what is pending (one attempt per batch), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)


class StoreHandler:
    """The C-STORE handler: validate as ingest does, spool durably, queue for indexing, answer."""

    def __init__(self, prepare: Callable[[InMemoryDicom], "Prepared | Rejected"],
                 record_rejection: Callable[[Rejected], None], batcher: Batcher, spool_dir: Path) -> None:
        self.prepare, self.record_rejection = prepare, record_rejection
        self.batcher, self.spool_dir = batcher, spool_dir
        # images held in memory while the index is busy (another writer holds the lock); past this, senders
        # are told "out of resources" and retry, as a PACS does when a destination is slow
        self.max_pending = max(64, 8 * batcher.batch_images)
        self.received = self.refused = 0
        self._count = threading.Lock()

    def __call__(self, event: "Event"):
        from pydicom.dataset import Dataset
        calling = event.assoc.requestor.ae_title.strip() if event.assoc else "?"
        sop = str(event.request.AffectedSOPInstanceUID or "unknown")
        name = f"dicom://{calling}/{sop}"
        status = Dataset()
        if (waiting := self.batcher.pending()) >= self.max_pending:  # the index is busy: memory stays bounded
            status.Status = STATUS_OUT_OF_RESOURCES
            status.ErrorComment = f"busy: {waiting} images wait for the index; retry"[:64]
            return status
        data = event.encoded_dataset(include_meta=True)  # encoded once: prepared, hashed and spooled as is
        result = self.prepare(InMemoryDicom(name, data))
        if isinstance(result, Rejected):
            self.record_rejection(result)
            self._counted(refused=1)
            logger.info("refused C-STORE of %s: [%s] %s", name, result.code, result.reason)
            status.Status = STATUS_CANNOT_UNDERSTAND
            status.ErrorComment = f"{result.code}: {result.reason}"[:64]  # LO: 64 characters at most
            return status
        path = spool_path(self.spool_dir, result)
        try:
            spooled = _spooled(path, result.sha256)
            if spooled is not None:
                # as Orthanc does by default (OverwriteInstances false): the instance stored first stays, so
                # the catalog's hash and vector keep describing the file on disk; it is queued already
                if spooled == "other bytes":
                    logger.warning("C-STORE of %s: this SOPInstanceUID is spooled already (%s) with other bytes; "
                                   "the stored instance is kept", name, path)
                self._counted(received=1)
                status.Status = STATUS_SUCCESS
                return status
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, data)
        except OSError as exc:
            logger.error("cannot spool %s to %s: %s", name, path, exc)
            status.Status = STATUS_OUT_OF_RESOURCES
            status.ErrorComment = f"spool write failed: {exc.strerror or exc}"[:64]
            return status
        self.batcher.add(dataclasses.replace(result, path=str(path)))
        self._counted(received=1)
        status.Status = STATUS_SUCCESS
        return status

    def _counted(self, received: int = 0, refused: int = 0) -> None:
        with self._count:
            self.received += received
            self.refused += refused


def build_ae(settings: ListenSettings):
    """A pynetdicom AE that accepts every storage SOP class in the syntaxes we decode, and C-ECHO."""
    from pynetdicom import AE, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification
    ae = AE(ae_title=settings.ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = 0  # no limit: mammograms are large
    if settings.allowed:
        ae.require_calling_aet = list(settings.allowed)
    return ae


class Listener:
    """The SCP and its batcher; ``start`` returns once the port listens, ``stop`` indexes what is pending."""

    def __init__(self, settings: ListenSettings, prepare: Callable[[InMemoryDicom], "Prepared | Rejected"],
                 index_batch: Callable[[list[Prepared]], int], record_rejection: Callable[[Rejected], None]) -> None:
        if not 0 < len(settings.ae_title) <= 16:
            raise ConfigError(f"AE title {settings.ae_title!r} must be 1 to 16 characters")
        self.settings = settings
        self.batcher = Batcher(index_batch, settings.batch_images, settings.batch_seconds)
        self.handler = StoreHandler(prepare, record_rejection, self.batcher, settings.spool_dir)
        self._server = None

    def check_address(self) -> None:
        """Refuse an address that cannot be listened on now, before a spool recovery and the model load take
        their time (``start`` still reports one taken in between). Only the address pynetdicom will listen
        on: a host's first IPv4 address, else its first IPv6 one."""
        from pynetdicom.transport import AddressInformation
        host, port = self.settings.host, self.settings.port
        try:
            address = AddressInformation(host, port).address
        except OSError as exc:
            raise cannot_listen(host, port, exc) from None
        for sock in bind(address, port):
            sock.close()

    def start(self) -> None:
        from pynetdicom import evt
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        ae = build_ae(self.settings)
        try:
            self._server = ae.start_server((self.settings.host, self.settings.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self.handler)])
        except OSError as exc:
            raise cannot_listen(self.settings.host, self.settings.port, exc) from None
        self.batcher.start()
        logger.info("listening for C-STORE on %s:%d as %s", self.settings.host, self.port, self.settings.ae_title)

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.settings.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        self.batcher.stop()

