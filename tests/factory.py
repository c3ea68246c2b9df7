"""Synthetic mammography DICOMs in every common transfer syntax, for tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid)

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"

SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "jpeg_lossless": JPEGLosslessSV1,
    "jpeg_baseline": JPEGBaseline8Bit,
    "jpeg_extended": JPEGExtended12Bit,
}
LOSSY = {"jpeg_baseline", "jpeg_extended"}


def breast_phantom(rows: int = 96, cols: int = 64, side: str = "L", seed: int = 0, bits: int = 12) -> np.ndarray:
    """A half-ellipse of 'tissue' against one edge with texture, like a mammogram at low resolution."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    x = xx if side == "L" else cols - 1 - xx
    inside = ((yy - rows / 2) / (rows * 0.45)) ** 2 + (x / (cols * 0.8)) ** 2 < 1
    maxval = (1 << bits) - 1
    tissue = 0.5 + 0.3 * np.sin(yy / (3 + seed % 5)) * np.cos(xx / 4) + 0.1 * rng.standard_normal((rows, cols))
    image = np.where(inside, np.clip(tissue, 0.05, 1.0) * maxval, rng.integers(0, maxval // 50, (rows, cols)))
    return image.astype(np.uint16)


def make_dataset(pixels: np.ndarray | None = None, *, syntax: str = "explicit", photometric: str = "MONOCHROME2",
                 modality: str = "MG", accession: str | None = "ACC0001", patient_id: str = "PAT0001",
                 laterality: str | None = "L", laterality_tag: str = "ImageLaterality", view: str | None = "CC",
                 sop_uid: str | None = None, study_uid: str | None = None, bits_stored: int = 12,
                 sop_class: str = MG_FOR_PRESENTATION, frames: int = 1, **extra) -> FileDataset:
    if pixels is None:
        pixels = breast_phantom(side=laterality or "L", bits=bits_stored)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = patient_id
    if accession is not None:
        ds.AccessionNumber = accession
    if laterality:
        setattr(ds, laterality_tag, laterality)
    if view:
        ds.ViewPosition = view
    ds.Manufacturer = "SYNTHETIC"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    shape = pixels.shape[-2:]
    ds.Rows, ds.Columns = shape
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = 8 if syntax == "jpeg_baseline" else 16
    ds.BitsStored = 8 if syntax == "jpeg_baseline" else bits_stored
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in extra.items():
        setattr(ds, key, value)
    data = pixels.astype(np.uint8 if syntax == "jpeg_baseline" else np.uint16)
    _encode(ds, data, syntax)
    return ds


def _encode(ds: FileDataset, data: np.ndarray, syntax: str) -> None:
    uid = SYNTAXES[syntax]
    if syntax in ("explicit", "implicit"):
        ds.PixelData = data.tobytes()
        ds.file_meta.TransferSyntaxUID = uid
        return
    if syntax in ("rle", "jpeg2000", "jpegls"):
        ds.PixelData = data.tobytes()
        ds.compress(uid, data, generate_instance_uid=False)
        return
    import imagecodecs
    frames = data if data.ndim == 3 else data[None]
    if syntax == "jpeg_lossless":
        streams = [imagecodecs.jpeg8_encode(f, lossless=True, predictor=1, bitspersample=int(ds.BitsStored))
                   for f in frames]
    elif syntax == "jpeg_extended":
        streams = [imagecodecs.jpeg8_encode(f, level=95, bitspersample=12) for f in frames]
    else:
        streams = [imagecodecs.jpeg8_encode(f, level=95) for f in frames]
    ds.PixelData = encapsulate(streams)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid
    if syntax in LOSSY:
        ds.LossyImageCompression = "01"


def write(ds: FileDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_file(path: Path, pixels: np.ndarray | None = None, **kwargs) -> Path:
    return write(make_dataset(pixels, **kwargs), path)
