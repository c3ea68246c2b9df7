"""Read and validate one mammography DICOM.

Two entry points: :func:`read_header` (cheap; used to skip files already ingested) and
:func:`read_image` (validated decode to a presentation-ready float32 image). Every refusal is a
:class:`~mammo_retrieval.core.errors.DicomRejected` with a stable ``code``; nothing here returns None on error.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from mammo_retrieval.core.config import ReaderConfig
from mammo_retrieval.core.errors import FATAL_EXCEPTIONS, DicomRejected
from mammo_retrieval.core.errors import RejectionCode as C
from mammo_retrieval.core.fileio import sha256_file
from mammo_retrieval.dicom.codestream import j2k_dimensions, jpeg_dimensions, power_of_two_reduction
from mammo_retrieval.dicom.header import HeaderFields, HeaderValueError, read_header_fields
from mammo_retrieval.dicom.pixels import to_presentation

FOR_PROCESSING_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image - For Processing
}
DEFLATED_TRANSFER_SYNTAXES = (b"1.2.840.10008.1.2.1.99", b"1.2.840.10008.1.2.4.95")  # deflated; JPIP deflated
HEADER_ALLOWANCE = 64 * 2 ** 20  # bytes a deflated dataset may hold beyond one maximal 16-bit frame
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
# Rescale values whose products stay far inside float32 (3.4e38): larger ones make inf or a constant image.
MAX_RESCALED = 1e30


@dataclass(frozen=True)
class StoredImage:
    """Decoded stored values before any transform; ``reduction`` > 1 when decoded at reduced resolution."""

    path: str
    header: HeaderFields
    stored: np.ndarray
    sha256: str
    frame_index: int
    slope: float
    intercept: float
    window: tuple[float, float, str] | None
    reduction: int = 1

    def presentation(self, voi_window: bool) -> np.ndarray:
        """Modality LUT -> VOI (optional) -> presentation, as float32."""
        try:
            return to_presentation(self.stored, self.header.photometric, slope=self.slope, intercept=self.intercept,
                                   window=self.window if voi_window else None)
        except ValueError as exc:
            raise _reject(self.path, C.UNREADABLE_HEADER, f"invalid rescale/window values: {exc}") from None


@dataclass(frozen=True)
class DicomImage:
    """A decoded image, ready for preprocessing: float32, brighter = denser, one 2-D frame."""

    path: str
    header: HeaderFields
    pixels: np.ndarray
    sha256: str
    frame_index: int


@dataclass(frozen=True)
class InMemoryDicom:
    """A DICOM file held in memory (an upload): read and validated exactly as a file on disk, and never
    written anywhere. ``name`` is what errors and results show in place of a path."""

    name: str
    data: bytes

    def __fspath__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


def _as_source(path: "str | os.PathLike | InMemoryDicom") -> "Path | InMemoryDicom":
    return path if isinstance(path, InMemoryDicom) else Path(path)


def _size(src: "Path | InMemoryDicom") -> int:
    return len(src.data) if isinstance(src, InMemoryDicom) else src.stat().st_size


def _sha256(src: "Path | InMemoryDicom") -> str:
    return hashlib.sha256(src.data).hexdigest() if isinstance(src, InMemoryDicom) else sha256_file(src)


def _reject(path: str | os.PathLike, code: C, reason: str, hint: str | None = None) -> DicomRejected:
    return DicomRejected(path, code, reason, hint=hint)


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns about every odd element (thousands on a large archive). Keep its warnings off stderr,
    per file, and when the file is then refused, add the first one to the reason: it often says why."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except DicomRejected as exc:
            # pydicom quotes the offending value, which may be a PatientName or PatientID: keep the words
            notes = list(dict.fromkeys(_QUOTED.sub("'...'", str(w.message)).strip() for w in caught))
            if not notes:
                raise
            note = notes[0] if len(notes[0]) <= 200 else notes[0][:197] + "..."
            more = f" and {len(notes) - 1} more" if len(notes) > 1 else ""
            raise DicomRejected(exc.path, exc.code, f"{exc.reason} (pydicom warned: {note}{more})",
                                hint=exc.hint) from None


def _head(src: "Path | InMemoryDicom", n: int) -> bytes:
    if isinstance(src, InMemoryDicom):
        return src.data[:n]
    with open(src, "rb") as fh:
        return fh.read(n)


def _chunks(src: "Path | InMemoryDicom", start: int, size: int = 2 ** 20) -> Iterator[bytes]:
    if isinstance(src, InMemoryDicom):
        yield from (src.data[i:i + size] for i in range(start, len(src.data), size))
        return
    with open(src, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(size):
            yield chunk


META_LIMIT = 2 ** 20  # a File Meta group is a few hundred bytes; past this it is not one to trust
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _meta_transfer_syntax(meta: bytes) -> bytes | None:
    """(0002,0010) read from the File Meta group's bytes (explicit VR little endian), or None."""
    at = 0
    while at + 8 <= len(meta):
        group, element = struct.unpack("<HH", meta[at:at + 4])
        vr = meta[at + 4:at + 6]
        if vr in _LONG_LENGTH_VRS:
            if at + 12 > len(meta):
                return None
            length, start = struct.unpack("<I", meta[at + 8:at + 12])[0], at + 12
        else:
            length, start = struct.unpack("<H", meta[at + 6:at + 8])[0], at + 8
        if (group, element) == (0x0002, 0x0010):
            return meta[start:start + length].rstrip(b"\0 ")
        at = start + length
    return None


def _check_inflated_size(path: "Path | InMemoryDicom", limit: int) -> None:
    """pydicom inflates a deflated dataset whole, in memory, before anything can be checked: a 1 MB file
    can hold gigabytes of zeros. Count what it inflates to first, as a stream, and refuse past ``limit``."""
    head = _head(path, 8192)  # the File Meta group too, unless it is unusually long
    # group 0002 is explicit VR little endian and starts with its own length (UL, Type 1)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        return  # no File Meta group length: pydicom reads such a file, and a deflated one needs it
    meta_length = struct.unpack("<I", head[140:144])[0]
    if meta_length > META_LIMIT:
        raise _reject(path, C.UNREADABLE_HEADER, f"File Meta group claims {meta_length} bytes "
                      f"(more than {META_LIMIT}): not a DICOM file meta header")
    start = 144 + meta_length
    meta = head[144:start] if start <= len(head) else _head(path, start)[144:]
    if _meta_transfer_syntax(meta) not in DEFLATED_TRANSFER_SYNTAXES:
        return
    inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        for chunk in _chunks(path, start):
            while chunk and not inflater.eof:
                inflated += len(inflater.decompress(chunk, 2 ** 22))
                chunk = inflater.unconsumed_tail
                if inflated > limit:
                    raise _reject(path, C.TOO_LARGE, f"the deflated dataset inflates to more than {limit // 2 ** 20} "
                                  "MB (one frame of reader.max_pixels at 2 bytes a pixel, plus 64 MB)",
                                  hint="raise reader.max_pixels if such images are real")
    except zlib.error as exc:
        raise _reject(path, C.UNREADABLE_HEADER, f"corrupt deflated dataset: {exc}") from None


def _check_complete(path: "Path | InMemoryDicom", ds: Dataset, size: int) -> None:
    """pydicom reads a value cut short by the end of the file without a word (a PhotometricInterpretation
    'MONOCHROME2' cut to 'MO' would be refused as a colour image): compare the last element's declared
    length with what the file holds."""
    if not len(ds):
        raise _reject(path, C.UNREADABLE_HEADER, "no data set after the File Meta Information (a truncated copy "
                      "or an interrupted transfer)")
    last = ds.get_item(max(ds.keys()))
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return
    end = tell + length
    if end > size:
        what = "pixel data truncated: element" if last.tag == 0x7FE00010 else "file ends inside element"
        raise _reject(path, C.TRUNCATED_PIXEL_DATA if last.tag == 0x7FE00010 else C.UNREADABLE_HEADER,
                      f"{what} {last.tag} declares {length} bytes, the file holds {size - tell} "
                      "(a truncated copy or an interrupted transfer)")
    if 0 < size - end < 8 and _starts_an_element_after(_tail(path, size - end), int(last.tag)):
        raise _reject(path, C.UNREADABLE_HEADER, f"file ends inside the header of the element after {last.tag} "
                      "(a truncated copy or an interrupted transfer)")


def _starts_an_element_after(stray: bytes, last_tag: int) -> bool:
    """Whether a few bytes left after the last element are the start of a later one (pydicom drops a cut
    element header without a word), rather than junk some writers append (a newline, a DOS Ctrl-Z, zeros)."""
    if len(stray) >= 4:
        group, element = struct.unpack("<HH", stray[:4])
        return (group << 16 | element) > last_tag
    if len(stray) >= 2:
        group = struct.unpack("<H", stray[:2])[0]
        return group >= last_tag >> 16  # the same group or a later one
    return False


def _tail(src: "Path | InMemoryDicom", n: int) -> bytes:
    if n <= 0:
        return b""
    if isinstance(src, InMemoryDicom):
        return src.data[-n:]
    with open(src, "rb") as fh:
        fh.seek(-n, os.SEEK_END)
        return fh.read(n)


def _dcmread(path: Path, cfg: ReaderConfig) -> Dataset:
    try:
        size = _size(path)
    except OSError as exc:
        raise _reject(path, C.UNREADABLE_FILE, f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise _reject(path, C.EMPTY_FILE, "empty file (0 bytes)")
    try:
        _check_inflated_size(path, cfg.max_pixels * 2 + HEADER_ALLOWANCE)
    except OSError as exc:
        raise _reject(path, C.UNREADABLE_FILE, f"cannot read file: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # defer_size keeps PixelData on disk until it is validated against the header
            ds = (pydicom.dcmread(io.BytesIO(path.data)) if isinstance(path, InMemoryDicom)
                  else pydicom.dcmread(path, defer_size="64 KB"))
    except InvalidDicomError as exc:
        reason = str(exc).replace(" Use force=True to force reading.", "")  # pydicom's advice: no option of ours
        raise _reject(path, C.NOT_DICOM, f"not a DICOM file ({reason})") from None
    except PermissionError as exc:
        raise _reject(path, C.UNREADABLE_FILE, f"cannot read file: {exc.strerror}") from None
    except Exception as exc:  # pydicom raises many types on a corrupt header
        raise _reject(path, C.UNREADABLE_HEADER, f"corrupt DICOM header: {type(exc).__name__}: {exc}") from None
    for w in caught:  # passed on to the caller's capture (_quiet_pydicom), which may quote them
        warnings.warn(w.message)
    # pydicom only warns when a file ends inside an undefined-length element (and may drop the dataset)
    if any("End of file reached" in str(w.message) for w in caught):
        raise _reject(path, C.TRUNCATED_PIXEL_DATA, "file ends before its encapsulated pixel data does "
                      "(truncated copy or interrupted transfer)")
    if not _is_deflated(ds):  # a deflated dataset's offsets are in the inflated stream
        _check_complete(path, ds, size)
    return ds


def _is_deflated(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return ts.encode() in DEFLATED_TRANSFER_SYNTAXES


def _fields(path: Path, ds: Dataset) -> HeaderFields:
    try:
        return read_header_fields(ds)
    except KeyError as exc:
        raise _reject(path, C.MISSING_UID, f"missing {exc.args[0]}") from None
    except HeaderValueError as exc:
        raise _reject(path, C.UNREADABLE_HEADER, str(exc)) from None
    except Exception as exc:
        raise _reject(path, C.UNREADABLE_HEADER, f"corrupt header value: {type(exc).__name__}: {exc}") from None


def _int_value(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    return None if value is None or value == "" else int(value)


def _check_pixel_module(path: Path, ds: Dataset, f: HeaderFields) -> None:
    """The Image Pixel module must be self-consistent before a decoder trusts it."""
    bits, stored = _int_value(ds, "BitsAllocated"), _int_value(ds, "BitsStored")
    high, signed = _int_value(ds, "HighBit"), _int_value(ds, "PixelRepresentation")
    if bits not in (8, 16):
        problem = f"BitsAllocated={bits}: a greyscale mammogram is stored in 8 or 16 bits"
    elif stored is None or not 1 <= stored <= bits:
        problem = f"BitsStored={stored} is not between 1 and BitsAllocated={bits}"
    elif high is not None and high != stored - 1:
        problem = f"HighBit={high} but BitsStored={stored} (HighBit must be BitsStored - 1)"
    elif signed not in (0, 1):
        problem = f"PixelRepresentation={signed} (0 unsigned or 1 signed)"
    elif signed == 1 and f.modality == "MG":
        problem = ("PixelRepresentation=1 (signed), but mammography pixels are unsigned "
                   "(the DX/MG image module allows only 0)")
    else:
        return
    raise _reject(path, C.INVALID_PIXEL_MODULE, f"inconsistent pixel module: {problem}")


def _rescale(path: Path, ds: Dataset) -> tuple[float, float]:
    """RescaleSlope/Intercept, refused when NaN, infinite, zero or so large that the image becomes constant."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    try:
        slope = 1.0 if slope is None or slope == "" else float(slope)
        intercept = 0.0 if intercept is None or intercept == "" else float(intercept)
    except (TypeError, ValueError) as exc:
        raise _reject(path, C.UNREADABLE_HEADER, f"invalid rescale values: {exc}") from None
    stored = _int_value(ds, "BitsStored") or 16
    if not (math.isfinite(slope) and math.isfinite(intercept)) or np.float32(slope) == 0 \
            or abs(slope) * 2.0 ** stored + abs(intercept) >= MAX_RESCALED:
        raise _reject(path, C.INVALID_PIXEL_MODULE, f"unusable RescaleSlope={slope!r} / RescaleIntercept="
                      f"{intercept!r} (the rescaled image would be constant or overflow)")
    return slope, intercept


def _check_header(path: Path, ds: Dataset, f: HeaderFields, cfg: ReaderConfig) -> None:
    """Header checks; any exception from reading a corrupt value becomes an ``unreadable_header`` rejection."""
    try:
        _check_header_values(path, ds, f, cfg)
    except DicomRejected:
        raise
    except Exception as exc:  # pydicom raises many types on a corrupt value (BytesLengthException, ...)
        raise _reject(path, C.UNREADABLE_HEADER, f"corrupt header value: {type(exc).__name__}: {exc}") from None


def _check_header_values(path: Path, ds: Dataset, f: HeaderFields, cfg: ReaderConfig) -> None:
    accepted = {m.upper() for m in cfg.accepted_modalities}
    if accepted and f.modality not in accepted:
        raise _reject(path, C.WRONG_MODALITY, f"Modality is '{f.modality or 'missing'}', expected one of "
                      f"{sorted(accepted)}", hint="set reader.accepted_modalities in the config to accept it")
    intent = str(ds.get("PresentationIntentType", "")).upper()
    if cfg.skip_for_processing and (intent == "FOR PROCESSING" or str(ds.get("SOPClassUID", "")) in FOR_PROCESSING_SOP_CLASSES):
        raise _reject(path, C.FOR_PROCESSING, "FOR PROCESSING (raw detector) image, skipped by configuration",
                      hint="set reader.skip_for_processing: false to ingest it")
    spp = int(ds.get("SamplesPerPixel") or 1)
    if not f.photometric:  # Type 1: a file without it is cut short or broken, not a colour image
        raise _reject(path, C.INVALID_PIXEL_MODULE, "PhotometricInterpretation is missing (Type 1 in the Image "
                      "Pixel module; a file cut short between two elements looks like this)")
    if spp != 1 or f.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _reject(path, C.COLOUR_IMAGE, f"colour image (SamplesPerPixel={spp}, "
                      f"PhotometricInterpretation={f.photometric or 'missing'}); mammograms are greyscale")
    if "PixelData" not in ds:
        raise _reject(path, C.NO_PIXEL_DATA, "no PixelData element (not an image, or header only)")
    _check_pixel_module(path, ds, f)
    if f.rows <= 0 or f.columns <= 0:
        raise _reject(path, C.SIZE_MISMATCH, f"invalid Rows x Columns {f.rows} x {f.columns}")
    if f.number_of_frames < 1:
        raise _reject(path, C.SIZE_MISMATCH, f"invalid NumberOfFrames {f.number_of_frames}")
    if f.number_of_frames > 1 and cfg.multiframe == "reject":
        raise _reject(path, C.MULTIFRAME, f"multi-frame image ({f.number_of_frames} frames, e.g. tomosynthesis)",
                      hint="set reader.multiframe: aggregate (pool several frames) or middle (the middle one)")
    # frames are decoded one at a time, so the bound is per frame, plus a ceiling on the frame count: a
    # 2500 x 1800 x 70 tomosynthesis volume (315M pixels) is an ordinary study, not an absurd header
    if f.rows * f.columns > cfg.max_pixels:
        raise _reject(path, C.TOO_LARGE, f"header claims {f.rows} x {f.columns} pixels per frame, "
                      f"over reader.max_pixels={cfg.max_pixels}")
    if f.number_of_frames > cfg.max_frames:
        raise _reject(path, C.TOO_LARGE, f"header claims {f.number_of_frames} frames, over "
                      f"reader.max_frames={cfg.max_frames}")
    _rescale(path, ds)


def read_header(path: "str | os.PathLike | InMemoryDicom", cfg: ReaderConfig) -> HeaderFields:
    """Identity and validity from the header alone (pixels are not read)."""
    path = _as_source(path)
    with _quiet_pydicom():
        ds = _dcmread(path, cfg)
        fields = _fields(path, ds)
        _check_header(path, ds, fields, cfg)
        return fields


def _check_pixel_data(path: Path, ds: Dataset, f: HeaderFields) -> None:
    """Compare what the header claims with what the pixel data holds, before decoding allocates it."""
    tsyntax = UID(f.transfer_syntax) if f.transfer_syntax else UID("1.2.840.10008.1.2")
    bits = int(ds.get("BitsAllocated") or 16)
    elem = ds.get_item("PixelData", keep_deferred=True)  # a deferred value stays on disk
    if not tsyntax.is_encapsulated:  # a file ending inside the pixel data was refused by _check_complete
        expected = (f.rows * f.columns * f.number_of_frames * bits + 7) // 8
        length = getattr(elem, "length", None)
        deferred = getattr(elem, "value", None) is None and length not in (None, 0xFFFFFFFF)
        actual = length if deferred else len(ds.PixelData)  # a deferred volume is never loaded to be measured
        if actual > expected + 1:  # one pad byte makes an odd length even
            raise _reject(path, C.SIZE_MISMATCH, f"header claims {f.rows} x {f.columns} x {f.number_of_frames} "
                          f"at {bits} bits ({expected} bytes) but pixel data holds {actual} bytes: Rows or "
                          "Columns do not match the image (it would be sheared)")
        if actual < expected:
            raise _reject(path, C.SIZE_MISMATCH if length == actual else C.TRUNCATED_PIXEL_DATA,
                          f"header claims {f.rows} x {f.columns} x {f.number_of_frames} at {bits} bits "
                          f"({expected} bytes) but pixel data holds {actual} bytes")
        return
    try:
        frames = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=f.number_of_frames)
        first = next(frames)
    except Exception as exc:
        raise _reject(path, C.TRUNCATED_PIXEL_DATA, f"encapsulated pixel data unreadable: {exc}") from None
    dims = None
    if tsyntax.name.startswith("JPEG 2000"):
        dims = j2k_dimensions(first)
    elif "JPEG" in tsyntax.name:
        dims = jpeg_dimensions(first)
    elif tsyntax == pydicom.uid.RLELossless:
        # an RLE byte run expands at most 128:2, so a tiny stream cannot hold a huge image
        if f.rows * f.columns * (bits // 8) > 64 * len(first) + 64:
            raise _reject(path, C.SIZE_MISMATCH, f"header claims {f.rows} x {f.columns} but the RLE frame "
                          f"holds only {len(first)} bytes")
        _check_rle_frame(path, first, f, bits)
    if dims is not None and dims != (f.rows, f.columns):
        raise _reject(path, C.SIZE_MISMATCH, f"header claims {f.rows} x {f.columns} but the compressed frame "
                      f"is {dims[0]} x {dims[1]}")


def _check_rle_frame(path: Path, frame: bytes, f: HeaderFields, bits: int) -> None:
    """Each RLE segment (one per byte of a sample) must expand to exactly Rows x Columns bytes. Checked
    segment by segment first because pylibjpeg-rle's frame decoder panics (a Rust panic that also prints a
    backtrace) or shears the image when the header lies about Rows or Columns."""
    try:
        from rle.rle import decode_segment
    except ImportError:  # another RLE plugin decodes: it checks lengths itself
        return
    if len(frame) < 64:
        raise _reject(path, C.TRUNCATED_PIXEL_DATA, f"RLE frame of {len(frame)} bytes is shorter than its header")
    count, *offsets = struct.unpack("<16I", frame[:64])
    if count != bits // 8:
        raise _reject(path, C.SIZE_MISMATCH, f"RLE frame has {count} segments; BitsAllocated={bits} needs {bits // 8}")
    bounds = [*offsets[:count], len(frame)]
    if bounds[0] != 64 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise _reject(path, C.UNDECODABLE_PIXEL_DATA, f"RLE segment offsets {offsets[:count]} are out of order "
                      "or out of the frame")
    expected = f.rows * f.columns
    for start, end in zip(bounds, bounds[1:]):
        try:
            n = len(decode_segment(frame[start:end]))
        except FATAL_EXCEPTIONS:
            raise
        except BaseException as exc:  # noqa: BLE001 - a Rust panic is a BaseException
            raise _reject(path, C.UNDECODABLE_PIXEL_DATA, f"RLE segment cannot be decoded: "
                          f"{type(exc).__name__}: {exc}") from None
        if n not in (expected, expected + 1):  # one pad byte may decode to one more value
            raise _reject(path, C.SIZE_MISMATCH, f"header claims {f.rows} x {f.columns} ({expected} values) but "
                          f"an RLE segment holds {n}")


def reduction_for(f: HeaderFields, target: int | None) -> int:
    """Largest power-of-two reduction of a JPEG 2000 image that stays at least ``target`` on its short side."""
    if not target or not f.transfer_syntax.startswith("1.2.840.10008.1.2.4.9") or f.number_of_frames > 1:
        return 1
    try:
        import glymur  # noqa: F401  (needs the system libopenjp2)
        if not glymur.version.openjpeg_version:
            return 1
    except Exception:
        return 1
    return power_of_two_reduction(f.rows, f.columns, target)


def _decode_j2k_reduced(path: Path, ds: Dataset, f: HeaderFields, reduction: int) -> np.ndarray:
    """JPEG 2000 decoded at 1/reduction size by OpenJPEG (glymur): the wavelet levels above are skipped."""
    import tempfile

    import glymur
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    with tempfile.NamedTemporaryFile(suffix=".j2k", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as fh:
        fh.write(frame)
        fh.flush()
        arr = glymur.Jp2k(fh.name)[::reduction, ::reduction]
    expected = (-(-f.rows // reduction), -(-f.columns // reduction))
    if arr.shape != expected:
        raise ValueError(f"reduced decode gave {arr.shape}, expected {expected}")
    return arr


def _decode(path: Path, ds: Dataset, f: HeaderFields, frame: int, reduction: int = 1) -> np.ndarray:
    try:
        if reduction > 1:
            return _decode_j2k_reduced(path, ds, f, reduction)
        if f.number_of_frames > 1:
            # from the file itself: pydicom then reads only this frame's bytes (by offset when native, its
            # fragments when encapsulated), never the whole volume
            source = io.BytesIO(path.data) if isinstance(path, InMemoryDicom) else str(path)
            arr = pydicom.pixels.pixel_array(source, index=frame)
        else:
            arr = ds.pixel_array
    except FATAL_EXCEPTIONS:
        raise
    except BaseException as exc:  # noqa: BLE001 - a Rust decoder's panic (pyo3 PanicException) is a BaseException
        raise _reject(path, C.UNDECODABLE_PIXEL_DATA, f"pixel data cannot be decoded "
                      f"({UID(f.transfer_syntax).name if f.transfer_syntax else 'no transfer syntax'}): "
                      f"{type(exc).__name__}: {exc}") from None
    if arr.shape != (f.rows, f.columns):
        raise _reject(path, C.SIZE_MISMATCH, f"decoded frame is {arr.shape}, header claims {f.rows} x {f.columns}")
    return arr


def _window(ds: Dataset) -> tuple[float, float, str] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    first = lambda v: float(v[0] if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else v)  # noqa: E731
    return first(center), first(width), str(ds.get("VOILUTFunction") or "LINEAR").upper()


def aggregate_frame_indices(n_frames: int, k: int) -> tuple[int, ...]:
    """Up to ``k`` frames spread evenly over the central 80% of a volume of ``n_frames`` (the outer slices
    of a tomosynthesis volume hold little breast)."""
    if n_frames <= 1:
        return (0,)
    first, last = int(n_frames * 0.1), max(int(n_frames * 0.1), int(math.ceil(n_frames * 0.9)) - 1)
    return tuple(sorted({int(round(x)) for x in np.linspace(first, last, max(1, min(k, last - first + 1)))}))


def read_stored(path: "str | os.PathLike | InMemoryDicom", cfg: ReaderConfig, *,
                reduce_to: int | None = None) -> StoredImage:
    """Validated decode of the stored values: header checks, size checks, decode (JPEG 2000 at reduced
    resolution when ``reduce_to`` allows it and glymur/libopenjp2 are present). ``path`` may be an
    InMemoryDicom: nothing then touches the disk. A multi-frame image gives its middle frame."""
    path = _as_source(path)
    with _quiet_pydicom():
        return next(_read_stored(path, cfg, reduce_to, None))


def read_stored_frames(path: "str | os.PathLike | InMemoryDicom", cfg: ReaderConfig, *,
                       reduce_to: int | None = None) -> list[StoredImage]:
    """As ``read_stored``, but a multi-frame image under ``reader.multiframe: aggregate`` gives the frames
    of ``aggregate_frame_indices``, each decoded alone (never the whole volume at once)."""
    path = _as_source(path)
    with _quiet_pydicom():
        return list(_read_stored(path, cfg, reduce_to, "aggregate"))


def _read_stored(path: Path, cfg: ReaderConfig, reduce_to: int | None, mode: str | None):
    ds = _dcmread(path, cfg)
    fields = _fields(path, ds)
    _check_header(path, ds, fields, cfg)
    try:
        _check_pixel_data(path, ds, fields)
    except DicomRejected:
        raise
    except Exception as exc:
        raise _reject(path, C.UNREADABLE_HEADER, f"pixel data element unreadable: {type(exc).__name__}: "
                      f"{exc}") from None
    slope, intercept = _rescale(path, ds)
    try:
        window = _window(ds)
    except Exception as exc:  # a corrupt DS value raises more than ValueError
        raise _reject(path, C.UNREADABLE_HEADER, f"invalid window values: {exc}") from None
    if window is not None and not all(math.isfinite(v) and abs(v) < MAX_RESCALED for v in window[:2]):
        raise _reject(path, C.INVALID_PIXEL_MODULE, f"unusable WindowCenter/WindowWidth {window[0]!r}/{window[1]!r}")
    if mode == "aggregate" and fields.number_of_frames > 1 and cfg.multiframe == "aggregate":
        frames = aggregate_frame_indices(fields.number_of_frames, cfg.aggregate_frames)
    else:
        frames = (fields.number_of_frames // 2 if fields.number_of_frames > 1 else 0,)
    sha256 = _sha256(path)
    reduction = reduction_for(fields, reduce_to)
    for frame in frames:
        try:
            stored = _decode(path, ds, fields, frame, reduction)
        except DicomRejected:
            if reduction == 1:
                raise
            reduction, stored = 1, _decode(path, ds, fields, frame)  # the reduced decoder failed: decode fully
        yield StoredImage(path=str(path), header=fields, stored=stored, sha256=sha256, frame_index=frame,
                          slope=slope, intercept=intercept, window=window, reduction=reduction)


def read_image(path: str | os.PathLike, cfg: ReaderConfig, *, voi_window: bool = False) -> DicomImage:
    """Validated full-resolution decode, then modality LUT -> VOI -> presentation (float32)."""
    stored = read_stored(path, cfg)
    return DicomImage(path=stored.path, header=stored.header, pixels=stored.presentation(voi_window),
                      sha256=stored.sha256, frame_index=stored.frame_index)
