"""Issue #9, items 8, 9 and 11: the reader refuses lying or corrupt files with a code from the one list,
never lets an exception (even a decoder's panic) escape, and keeps pydicom's warnings off stderr."""
import ast
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from mammo_retrieval.core.config import load_config
from mammo_retrieval.dicom import reader
from mammo_retrieval.dicom.reader import read_header, read_image, read_stored
from mammo_retrieval.core.errors import DicomRejected, RejectionCode
from mammo_retrieval.pipeline.prepare import Rejected, prepare_file
from mammo_retrieval.preprocess import PreprocessSettings
from tests.factory import breast_phantom, make_dataset, make_file, write

PACKAGE = Path(reader.__file__).resolve().parents[1]


@pytest.fixture
def cfg():
    return load_config(env={}).reader


def rejected_code(path, cfg, read=read_stored) -> str:
    with pytest.raises(DicomRejected) as info:
        read(path, cfg)
    assert str(path) in str(info.value)
    return info.value.code


# ---- item 9: header values that pydicom cannot parse --------------------------------------------------------

def patched(tmp_path, old: bytes, new: bytes, name: str) -> Path:
    data = make_file(tmp_path / "source.dcm").read_bytes()
    assert data.count(old) == 1
    out = tmp_path / name
    out.write_bytes(data.replace(old, new))
    return out


def test_three_byte_samples_per_pixel_is_an_unreadable_header(tmp_path, cfg):
    path = patched(tmp_path, b"\x28\x00\x02\x00US\x02\x00\x01\x00", b"\x28\x00\x02\x00US\x03\x00\x01\x00\x00",
                   "spp3.dcm")
    assert rejected_code(path, cfg, read_header) == "unreadable_header"


def test_unknown_vr_is_an_unreadable_header(tmp_path, cfg):
    path = patched(tmp_path, b"\x28\x00\x02\x00US", b"\x28\x00\x02\x00ZZ", "vr.dcm")
    assert rejected_code(path, cfg, read_header) == "unreadable_header"


# ---- item 8: an RLE file whose Rows lie, and decoder panics ----------------------------------------------------

@pytest.mark.parametrize("rows, columns", [(100, 30), (128, 30), (63, 64), (64, 100)])
def test_rle_with_lying_dimensions_is_a_size_mismatch(tmp_path, cfg, rows, columns):
    """(100, 30) made pylibjpeg-rle panic; (128, 30) decoded to a sheared image without complaint."""
    ds = make_dataset(np.random.default_rng(0).integers(0, 4096, (64, 64), dtype=np.uint16), syntax="rle")
    ds.Rows, ds.Columns = rows, columns
    assert rejected_code(write(ds, tmp_path / "rle.dcm"), cfg) == "size_mismatch"


class FakePanic(BaseException):
    """What pyo3 raises on a Rust panic: a BaseException, not an Exception."""


def test_decoder_panic_becomes_a_rejection(tmp_path, cfg, monkeypatch):
    path = make_file(tmp_path / "ok.dcm", syntax="rle")

    def panic(*args, **kwargs):
        raise FakePanic("called `Result::unwrap()` on an `Err` value")
    monkeypatch.setattr(reader.pydicom.dataset.Dataset, "pixel_array", property(panic))
    assert rejected_code(path, cfg) == "undecodable_pixel_data"


def test_prepare_file_turns_any_base_exception_into_a_rejection(tmp_path, cfg, monkeypatch):
    path = make_file(tmp_path / "ok.dcm")

    def panic(*args, **kwargs):
        raise FakePanic("boom")
    monkeypatch.setattr("mammo_retrieval.pipeline.prepare.read_stored_frames", panic)
    result = prepare_file(str(path), cfg, PreprocessSettings(size=(64, 64)))
    assert isinstance(result, Rejected) and result.code == "undecodable_pixel_data" and "FakePanic" in result.reason

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("mammo_retrieval.pipeline.prepare.read_stored_frames", interrupt)
    with pytest.raises(KeyboardInterrupt):  # the user's Ctrl-C is never swallowed
        prepare_file(str(path), cfg, PreprocessSettings(size=(64, 64)))


# ---- item 11: garbage that was silently accepted ----------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # written on purpose
@pytest.mark.parametrize("slope, intercept", [("NaN", "0"), ("1", "inf"), ("1e308", "0"), ("1", "-1e308"),
                                              ("0", "0"), ("1e-300", "0")])
def test_unusable_rescale_is_refused(tmp_path, cfg, slope, intercept):
    path = make_file(tmp_path / "rescale.dcm", RescaleSlope=slope, RescaleIntercept=intercept)
    assert rejected_code(path, cfg) == "invalid_pixel_module"
    assert rejected_code(path, cfg, read_header) == "invalid_pixel_module"  # a query refuses it before the model


def test_ordinary_rescale_still_applies(tmp_path, cfg):
    path = make_file(tmp_path / "rescale.dcm", RescaleSlope="2", RescaleIntercept="-10")
    image = read_image(path, cfg)
    assert math.isfinite(float(image.pixels.max())) and image.pixels.min() == -10


def test_native_data_longer_than_the_header_says_is_a_size_mismatch(tmp_path, cfg):
    """Columns smaller than the data gave a sheared image; only shorter data was refused."""
    ds = make_dataset(breast_phantom(96, 64))
    ds.Columns = 60
    assert rejected_code(write(ds, tmp_path / "sheared.dcm"), cfg) == "size_mismatch"


def test_one_pad_byte_is_accepted(tmp_path, cfg):
    ds = make_dataset(breast_phantom(3, 3), BitsAllocated=8, BitsStored=8, HighBit=7)
    ds.PixelData = np.arange(9, dtype=np.uint8).tobytes() + b"\x00"  # 9 bytes padded to an even 10
    assert read_stored(write(ds, tmp_path / "odd.dcm"), cfg).stored.shape == (3, 3)


@pytest.mark.parametrize("changes, words", [
    ({"BitsAllocated": 12}, "BitsAllocated=12"),
    ({"BitsAllocated": 32}, "BitsAllocated=32"),
    ({"BitsStored": 17}, "BitsStored=17"),
    ({"BitsStored": 0}, "BitsStored=0"),
    ({"HighBit": 15}, "HighBit=15"),
    ({"PixelRepresentation": 2}, "PixelRepresentation=2"),
    ({"PixelRepresentation": 1}, "unsigned"),
])
def test_inconsistent_pixel_module_is_refused_with_its_reason(tmp_path, cfg, changes, words):
    ds = make_dataset()
    for key, value in changes.items():
        setattr(ds, key, value)
    with pytest.raises(DicomRejected) as info:
        read_header(write(ds, tmp_path / "module.dcm"), cfg)
    assert info.value.code == "invalid_pixel_module" and words in info.value.reason


def test_signed_pixels_stay_allowed_for_a_modality_that_has_them(tmp_path, cfg):
    cfg = dataclasses.replace(cfg, accepted_modalities=("MG", "CT"))
    path = make_file(tmp_path / "ct.dcm", modality="CT", PixelRepresentation=1)
    assert read_stored(path, cfg).stored.shape == (96, 64)


# ---- pydicom's warnings ----------------------------------------------------------------------------------------

def test_pydicom_warnings_never_reach_stderr_but_explain_a_rejection(tmp_path, cfg, recwarn, monkeypatch):
    import warnings
    good = make_file(tmp_path / "good.dcm")
    ct = make_file(tmp_path / "ct.dcm", modality="CT")
    original = reader.pydicom.dcmread

    def warning_dcmread(*args, **kwargs):  # as pydicom does for an odd element (thousands on an archive)
        warnings.warn("Expected explicit VR, but found implicit VR", UserWarning)
        return original(*args, **kwargs)
    monkeypatch.setattr(reader.pydicom, "dcmread", warning_dcmread)
    recwarn.clear()
    assert read_stored(good, cfg).stored.shape == (96, 64)
    with pytest.raises(DicomRejected) as info:
        read_header(ct, cfg)
    assert not recwarn.list  # caught per file, never printed
    assert info.value.code == "wrong_modality"
    assert "pydicom warned: Expected explicit VR, but found implicit VR" in info.value.reason


# ---- one list of codes -------------------------------------------------------------------------------------------

def codes_used_in_package() -> set[str]:
    """Every RejectionCode.X named and every string literal passed as a code, across the package."""
    used = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in ("C", "RejectionCode") and node.attr.isupper():
                used.add(RejectionCode[node.attr].value)
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in ("_reject", "DicomRejected", "Rejected", "of") and len(node.args) >= 2:
                    arg = node.args[1]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        used.add(arg.value)
    return used


def test_every_code_the_package_uses_is_in_the_one_list():
    used = codes_used_in_package()
    assert used, "the scan found no codes: it is broken"
    assert {"size_mismatch", "unencodable_path", "invalid_pixel_module"} <= used
    assert used <= {c.value for c in RejectionCode}


def test_an_unknown_code_is_a_bug_not_a_row():
    with pytest.raises(ValueError):
        DicomRejected("x.dcm", "made_up_code", "reason")
