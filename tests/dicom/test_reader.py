import dataclasses

import numpy as np
import pytest

from mammo_retrieval.core.config import load_config
from mammo_retrieval.dicom.reader import read_header, read_image
from mammo_retrieval.core.errors import DicomRejected
from tests.factory import LOSSY, MG_FOR_PROCESSING, SYNTAXES, breast_phantom, make_dataset, make_file, write

READER = load_config(env={}).reader


def expect_rejection(path, code, match=None):
    with pytest.raises(DicomRejected) as info:
        read_image(path, READER)
    assert info.value.code == code
    assert str(path) in str(info.value)
    if match:
        assert match in info.value.reason
    return info.value


@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_every_transfer_syntax_decodes(tmp_path, syntax):
    pixels = breast_phantom()
    if syntax == "jpeg_baseline":
        pixels = (pixels >> 4).astype(np.uint8)
    path = make_file(tmp_path / "x", pixels, syntax=syntax)  # no .dcm suffix on purpose
    image = read_image(path, READER)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == pixels.shape
    error = np.abs(image.pixels - pixels.astype(np.float32)).max()
    assert error <= (12 if syntax in LOSSY else 0)
    assert image.header.transfer_syntax == str(SYNTAXES[syntax])


def test_monochrome1_is_inverted_to_match_monochrome2(tmp_path):
    pixels = breast_phantom()
    m2 = read_image(make_file(tmp_path / "m2.dcm", pixels, photometric="MONOCHROME2"), READER).pixels
    inverted = (4095 - pixels).astype(np.uint16)
    m1 = read_image(make_file(tmp_path / "m1.dcm", inverted, photometric="MONOCHROME1", syntax="rle"), READER).pixels
    # max - (4095 - x) = x + (max(inverted) - 4095): the same image up to an offset, removed by min-max later
    np.testing.assert_array_equal(m1 - m1.min(), m2 - m2.min())


def test_voi_window_is_an_option(tmp_path):
    pixels = breast_phantom()
    path = make_file(tmp_path / "w.dcm", pixels, WindowCenter=1000, WindowWidth=500)
    plain = read_image(path, READER, voi_window=False).pixels
    windowed = read_image(path, READER, voi_window=True).pixels
    np.testing.assert_array_equal(plain, pixels.astype(np.float32))
    assert windowed.max() == 4095.0 and (windowed == 4095.0).mean() > (pixels >= 1250).mean() - 0.01


def test_rescale_applied(tmp_path):
    pixels = breast_phantom()
    path = make_file(tmp_path / "r.dcm", pixels, RescaleSlope=2, RescaleIntercept=10)
    np.testing.assert_array_equal(read_image(path, READER).pixels, pixels.astype(np.float32) * 2 + 10)


def test_header_fallbacks_from_a_file(tmp_path):
    path = make_file(tmp_path / "f.dcm", accession="", laterality="R", laterality_tag="Laterality", view=None,
                     SeriesDescription="R MLO")
    h = read_header(path, READER)
    assert (h.laterality, h.laterality_source, h.view, h.view_source) == ("R", "Laterality", "MLO", "SeriesDescription")
    assert h.study_key_source == "study_uid" and h.accession_number is None


def test_empty_file(tmp_path):
    (tmp_path / "e.dcm").write_bytes(b"")
    expect_rejection(tmp_path / "e.dcm", "empty_file")


def test_non_dicom_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a mammogram\n" * 20)
    rejected = expect_rejection(tmp_path / "notes.txt", "not_dicom", "not a DICOM file (")
    assert "force" not in rejected.reason  # pydicom's advice names an argument no user of ours has


def test_truncated_native_pixel_data(tmp_path):
    path = make_file(tmp_path / "t.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    expect_rejection(path, "truncated_pixel_data")


def test_truncated_compressed_pixel_data(tmp_path):
    path = make_file(tmp_path / "t.dcm", breast_phantom(512, 512), syntax="jpeg2000")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    expect_rejection(path, "truncated_pixel_data", "file ends before")


def test_header_larger_than_native_pixel_data(tmp_path):
    ds = make_dataset(breast_phantom(96, 64))
    ds.Rows = 200  # claims more than the data holds: refused before any allocation
    expect_rejection(write(ds, tmp_path / "m.dcm"), "size_mismatch", "header claims 200 x 64")


@pytest.mark.parametrize("syntax", ["jpeg2000", "jpegls", "jpeg_lossless"])
def test_header_disagrees_with_compressed_frame(tmp_path, syntax):
    ds = make_dataset(breast_phantom(96, 64), syntax=syntax)
    ds.Rows = 4000
    expect_rejection(write(ds, tmp_path / "m.dcm"), "size_mismatch", "compressed frame is 96 x 64")


def test_rle_header_claims_huge_image(tmp_path):
    ds = make_dataset(np.zeros((96, 64), np.uint16), syntax="rle")
    ds.Rows, ds.Columns = 10000, 10000
    expect_rejection(write(ds, tmp_path / "m.dcm"), "size_mismatch", "RLE frame holds only")


def test_undecodable_pixel_data(tmp_path):
    ds = make_dataset(breast_phantom(96, 64), syntax="jpeg2000")
    from pydicom.encaps import encapsulate
    ds.PixelData = encapsulate([b"\x00" * 40 + b"garbage" * 30])
    expect_rejection(write(ds, tmp_path / "u.dcm"), "undecodable_pixel_data")


def test_wrong_modality(tmp_path):
    err = expect_rejection(make_file(tmp_path / "ct.dcm", modality="CT"), "wrong_modality")
    assert "accepted_modalities" in err.hint


def test_modality_is_configurable(tmp_path):
    path = make_file(tmp_path / "ct.dcm", modality="DX")
    read_image(path, READER.__class__(("MG", "DX"), True, "reject", 10**8))


def test_colour_image(tmp_path):
    ds = make_dataset(breast_phantom(96, 64))
    rgb = np.zeros((96, 64, 3), np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    expect_rejection(write(ds, tmp_path / "rgb.dcm"), "colour_image")


def test_no_pixel_data(tmp_path):
    ds = make_dataset()
    del ds.PixelData
    expect_rejection(write(ds, tmp_path / "np.dcm"), "no_pixel_data")


def test_for_processing_skipped_by_default(tmp_path):
    expect_rejection(make_file(tmp_path / "fp.dcm", sop_class=MG_FOR_PROCESSING), "for_processing")
    expect_rejection(make_file(tmp_path / "fp2.dcm", PresentationIntentType="FOR PROCESSING"), "for_processing")
    read_image(tmp_path / "fp.dcm", READER.__class__(("MG",), False, "reject", 10**8))


def test_multiframe_aggregated_by_default_or_middle_frame_or_rejected(tmp_path):
    from mammo_retrieval.dicom.reader import aggregate_frame_indices, read_stored_frames
    frames = np.stack([np.full((32, 32), i * 100, np.uint16) for i in range(5)])
    path = make_file(tmp_path / "tomo.dcm", frames, frames=5, syntax="rle")
    rejecting = dataclasses.replace(READER, multiframe="reject")
    with pytest.raises(DicomRejected, match="5 frames") as info:
        read_image(path, rejecting)
    assert info.value.code == "multiframe"
    image = read_image(path, dataclasses.replace(READER, multiframe="middle"))
    assert image.frame_index == 2 and image.pixels.max() == 200.0
    assert READER.multiframe == "aggregate"  # the default
    decoded = read_stored_frames(path, READER)
    assert [d.frame_index for d in decoded] == [0, 1, 2, 3, 4] == list(aggregate_frame_indices(5, 8))
    assert [int(d.stored.max()) for d in decoded] == [0, 100, 200, 300, 400]  # each frame decoded alone


def test_aggregate_frames_cover_the_central_80_percent():
    from mammo_retrieval.dicom.reader import aggregate_frame_indices
    assert aggregate_frame_indices(1, 8) == (0,)
    picked = aggregate_frame_indices(60, 8)  # central 80%: frames 6 to 53
    assert len(picked) == 8 and picked[0] == 6 and picked[-1] == 53
    assert set(np.diff(picked)) <= {6, 7}  # evenly spread
    assert aggregate_frame_indices(100, 4) == (10, 36, 63, 89)
    assert aggregate_frame_indices(3, 8) == (0, 1, 2)


def test_too_large_header(tmp_path):
    ds = make_dataset()
    ds.Rows, ds.Columns = 65535, 65535
    expect_rejection(write(ds, tmp_path / "big.dcm"), "too_large")


def test_a_full_size_tomosynthesis_header_is_not_too_large(tmp_path):
    """2500 x 1800 x 70 frames is 315M pixels, over max_pixels as a whole, but decoded a frame at a time."""
    from mammo_retrieval.core.config import load_config
    ds = make_dataset(frames=1)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 2500, 1800, 70
    header = read_header(write(ds, tmp_path / "dbt.dcm"), load_config(env={}).reader)
    assert header.number_of_frames == 70


def test_missing_sop_uid(tmp_path):
    ds = make_dataset()
    del ds.SOPInstanceUID
    expect_rejection(write(ds, tmp_path / "nouid.dcm"), "missing_uid")


def test_cbis_ddsm_headers(cbis_files):
    for path in cbis_files:
        h = read_header(path, READER)
        words = h.patient_id.upper().split("_")
        assert h.laterality == ("R" if "RIGHT" in words else "L") and h.laterality_source == "Laterality"
        assert h.view == words[-1] and h.view_source == "PatientOrientation"
        assert h.accession_number is None and h.study_key_source == "study_uid"


def test_cbis_ddsm_full_size_decode(cbis_files):
    image = read_image(cbis_files[0], READER)
    assert image.pixels.shape == (image.header.rows, image.header.columns) and image.pixels.shape[0] > 4000


def test_mias_headers_match_labels(mias_dir, mias_labels):
    by_file = {row["file"]: row for row in mias_labels}
    assert len(by_file) == 200
    for rel, row in by_file.items():
        h = read_header(mias_dir / rel, READER)
        assert h.sop_instance_uid == row["SOPInstanceUID"]
        assert (h.laterality, h.view) == (row["laterality"], row["view"])
        assert h.accession_number == (row["AccessionNumber"] or None)
        assert h.study_key_source == ("accession" if row["AccessionNumber"] else "study_uid")
