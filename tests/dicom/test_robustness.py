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


# ---- cut files, deflate bombs, and identity values the catalog cannot store ------------------------------------

def test_a_file_cut_anywhere_in_its_header_is_refused_as_cut(tmp_path, cfg):
    """pydicom reads a value cut short by the end of the file without a word: 'MONOCHROME2' cut to 'MO' was
    refused as a colour image, a cut before the UIDs as a missing UID."""
    data = make_file(tmp_path / "whole.dcm").read_bytes()
    pixel_start = data.index(b"\xe0\x7f\x10\x00")
    codes, cut_reasons = {}, 0
    for cut in range(132, pixel_start + 8, 3):
        path = tmp_path / "cut.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(DicomRejected) as info:
            read_stored(path, cfg)
        codes[cut] = info.value.code
        cut_reasons += "truncated copy" in info.value.reason
    assert "colour_image" not in codes.values()
    # a cut exactly between two elements (or one byte past) cannot be seen as one: the file lacks what follows
    assert cut_reasons >= 0.8 * len(codes), codes


def test_a_cut_within_pixel_data_says_so(tmp_path, cfg):
    data = make_file(tmp_path / "whole.dcm").read_bytes()
    path = tmp_path / "short.dcm"
    path.write_bytes(data[:-100])
    with pytest.raises(DicomRejected) as info:
        read_stored(path, cfg)
    assert info.value.code == "truncated_pixel_data" and "(7FE0,0010)" in info.value.reason


def deflated(ds, path: Path, pad_zeros: int = 0) -> Path:
    """``ds`` written in Deflated Explicit VR Little Endian, with ``pad_zeros`` zero bytes of a private
    element appended before deflating (a file of a few kB that inflates to that many bytes)."""
    import struct
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as out:
        out.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        out.write(deflate.compress(body.getvalue()))
        if pad_zeros:  # (FFFC,FFFC) Data Set Trailing Padding, OB
            out.write(deflate.compress(struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, pad_zeros)))
            block = b"\0" * 2 ** 20
            for start in range(0, pad_zeros, len(block)):
                out.write(deflate.compress(block[:min(len(block), pad_zeros - start)]))
        out.write(deflate.flush())
    return path


def test_a_deflated_file_is_read_and_a_deflate_bomb_refused_before_pydicom_inflates_it(tmp_path, cfg):
    ds = make_dataset()
    plain = read_stored(write(ds, tmp_path / "plain.dcm"), cfg).stored
    assert np.array_equal(read_stored(deflated(make_dataset(), tmp_path / "deflated.dcm"), cfg).stored, plain)
    small = dataclasses.replace(cfg, max_pixels=1000)  # the limit is one frame of max_pixels, plus 64 MB
    bombed = make_dataset()
    bomb = deflated(bombed, tmp_path / "bomb.dcm", pad_zeros=80 * 2 ** 20)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(DicomRejected) as info:
        read_header(bomb, small)
    assert info.value.code == "too_large" and "inflates to more than 64 MB" in info.value.reason
    assert read_header(bomb, cfg).sop_instance_uid == bombed.SOPInstanceUID  # under the default limit: read
    # the transfer syntax is read from the File Meta group itself, however long: past the first 8 kB read
    import warnings
    long_meta = make_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        long_meta.file_meta.MediaStorageSOPInstanceUID = "1." * 5000  # pushes (0002,0010) past 8 kB
        hidden = deflated(long_meta, tmp_path / "hidden-bomb.dcm", pad_zeros=80 * 2 ** 20)
    with pytest.raises(DicomRejected) as info:
        read_header(hidden, small)
    assert info.value.code == "too_large" and "inflates to more than" in info.value.reason


@pytest.mark.parametrize("junk", [b"\n", b"\x1a", b"  ", b"\x00\x00\x00"])
def test_a_whole_file_with_junk_after_its_last_element_is_read(tmp_path, cfg, junk):
    """Some writers append a newline or a DOS Ctrl-Z: junk, not the start of a cut element."""
    path = make_file(tmp_path / "whole.dcm")
    path.write_bytes(path.read_bytes() + junk)
    assert read_stored(path, cfg).stored.shape == (96, 64)


@pytest.mark.parametrize("keyword, value, words", [
    ("PatientID", "SECRET\x00PID", "PatientID contains a control character"),
    ("AccessionNumber", "A" * 65, "AccessionNumber is 65 characters long; at most 64"),
    ("SOPInstanceUID", "1." * 40, "SOPInstanceUID is 80 characters long"),
])
def test_an_identity_value_the_catalog_cannot_store_is_refused_without_quoting_it(tmp_path, cfg, keyword,
                                                                                   value, words):
    """A NUL inside a PatientID made PostgreSQL refuse the whole batch, and its error quoted the value."""
    import warnings
    ds = make_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the very values under test
        setattr(ds, keyword, value)
        path = write(ds, tmp_path / "bad.dcm")
    with pytest.raises(DicomRejected) as info:
        read_header(path, cfg)
    assert info.value.code == "unreadable_header" and words in info.value.reason
    assert "SECRET" not in str(info.value) and "AAAA" not in str(info.value)


def test_a_long_manufacturer_is_cut_not_refused(tmp_path, cfg):
    path = make_file(tmp_path / "maker.dcm", Manufacturer="Vendor\x01" + "x" * 200)
    assert read_header(path, cfg).manufacturer == "Vendor" + "x" * 122


def test_pydicom_warnings_quoted_in_a_reason_lose_their_values(tmp_path, cfg, monkeypatch):
    import warnings
    ct = make_file(tmp_path / "ct.dcm", modality="CT")
    original = reader.pydicom.dcmread

    def warning_dcmread(*args, **kwargs):
        warnings.warn("Invalid value for VR UI: 'SECRETPID01'. Please see the standard", UserWarning)
        return original(*args, **kwargs)
    monkeypatch.setattr(reader.pydicom, "dcmread", warning_dcmread)
    with pytest.raises(DicomRejected) as info:
        read_header(ct, cfg)
    assert "Invalid value for VR UI: '...'" in info.value.reason and "SECRET" not in info.value.reason
