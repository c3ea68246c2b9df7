"""The stages of ingest, each testable alone. ``prepare_file`` runs in worker processes, so this module
must not import torch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mammo_retrieval.core.config import ReaderConfig
from mammo_retrieval.dicom.header import HeaderFields
from mammo_retrieval.dicom.reader import InMemoryDicom, read_stored_frames
from mammo_retrieval.core.errors import FATAL_EXCEPTIONS, DicomRejected, RejectionCode, display_path
from mammo_retrieval.preprocess import PreprocessSettings, to_display_uint8
from mammo_retrieval.preprocess.fast import display_from_stored
from mammo_retrieval.preprocess.fast import downscale_early as early_downscale


@dataclass(frozen=True)
class Prepared:
    """A decoded, preprocessed image: the uint8 display image is small to pass between processes."""

    path: str
    header: HeaderFields
    sha256: str
    frame_index: int
    display: np.ndarray  # (H, W): the picture cached and shown (a volume's most central pooled frame)
    frames: tuple[int, ...] = ()  # a volume's frames pooled into its vector
    inputs: np.ndarray | None = None  # (K, H, W) model inputs of those frames; None: ``display`` alone

    @property
    def model_input(self) -> np.ndarray:
        """What the encoder embeds: (H, W), or (K, H, W) frames to mean-pool."""
        return self.display if self.inputs is None else self.inputs


@dataclass(frozen=True)
class Rejected:
    """A refused file. ``path`` is printable and storable text (see ``errors.display_path``); ``code`` is a
    RejectionCode value."""

    path: str
    code: str
    reason: str
    fingerprint: str | None = None  # core.fileio.file_fingerprint, where a rerun should know the file again

    @classmethod
    def of(cls, path: str, code: RejectionCode, reason: str, fingerprint: str | None = None) -> "Rejected":
        return cls(display_path(path), RejectionCode(code).value, reason, fingerprint)


def prepare_file(path: "str | InMemoryDicom", reader_cfg: ReaderConfig, settings: PreprocessSettings, *, fast: bool = True,
                 sampled: bool = True, reduced_j2k: bool = True,
                 downscale_early: bool = False) -> Prepared | Rejected:
    """Reader + preprocessor for one file. Never raises for a bad file: one file never kills a batch.

    ``fast``: integer lookup-table scaling (same output); ``sampled``: with it, CLAHE evaluated only
    where the final resize reads (same output); ``reduced_j2k``: decode JPEG 2000 at the
    smallest power-of-two reduction that keeps the model size; ``downscale_early``: the same reduction by
    area averaging right after decoding, for the other codecs. The last two only approximate the exact
    path (on MIAS they miss the agreement bar: bench/bench_ingest.py, README), hence off by default.
    """
    try:
        target = max(settings.size)
        frames = read_stored_frames(path, reader_cfg, reduce_to=target if (fast and reduced_j2k) else None)
        displays = []
        for image in frames:  # one frame at a time; a 2-D image is one "frame"
            if not fast:
                displays.append(to_display_uint8(image.presentation(settings.voi_window), settings))
                continue
            if downscale_early:
                image = early_downscale(image, target)
            displays.append(display_from_stored(image, settings, sampled=sampled))
        middle = len(frames) // 2
        first = frames[middle]
        if len(frames) == 1:
            return Prepared(path=str(path), header=first.header, sha256=first.sha256, frame_index=first.frame_index,
                            display=displays[0])
        return Prepared(path=str(path), header=first.header, sha256=first.sha256, frame_index=first.frame_index,
                        display=displays[middle], frames=tuple(f.frame_index for f in frames),
                        inputs=np.stack(displays))
    except DicomRejected as exc:
        return Rejected(exc.path, exc.code, exc.reason)
    except MemoryError:
        return Rejected.of(path, RejectionCode.TOO_LARGE, "not enough memory to decode this image")
    except FATAL_EXCEPTIONS:
        raise
    except BaseException as exc:  # noqa: BLE001 - a decoder bug (even a Rust panic) must not stop the archive
        return Rejected.of(path, RejectionCode.UNDECODABLE_PIXEL_DATA, f"unexpected {type(exc).__name__}: {exc}")
