import numpy as np
import pytest

from mammo_retrieval.core.config import load_config
from mammo_retrieval.dicom.reader import read_image, read_stored, reduction_for
from mammo_retrieval.preprocess import PreprocessSettings, to_display_uint8
from mammo_retrieval.preprocess.fast import display_from_stored, histogram_percentiles, percentile_scale_uint8_integer
from mammo_retrieval.preprocess.primer import percentile_scale_uint8
from tests.factory import breast_phantom, make_file

READER = load_config(env={}).reader
PRIMER = PreprocessSettings()


def test_integer_path_equals_the_float_path_on_random_images():
    rng = np.random.default_rng(0)
    for _ in range(200):
        low = int(rng.integers(0, 3)) * 10
        x = rng.integers(low, low + rng.choice([16, 4096, 65000]), size=rng.integers(5, 3000)).astype(np.uint16)
        np.testing.assert_array_equal(percentile_scale_uint8_integer(x, 2, 98),
                                      percentile_scale_uint8(x.astype(np.float32), 2, 98))
        p = np.percentile(x.astype(np.float32), (2, 98))
        assert np.allclose(histogram_percentiles(np.bincount(x - x.min()), int(x.min()), (2, 98)), p, rtol=1e-15)


def fast_and_exact(path, reduce_to=None):
    fast = display_from_stored(read_stored(path, READER, reduce_to=reduce_to), PRIMER)
    exact = to_display_uint8(read_image(path, READER).pixels, PRIMER)
    return fast, exact


def test_fast_path_is_identical_on_real_mias_images(mias_dir):
    for path in [mias_dir / "P0002" / "mdb003.dcm", mias_dir / "P0001" / "mdb001.dcm",
                 mias_dir / "P0010" / "mdb020.dcm"]:  # MONOCHROME1, J2K, RLE, uncompressed
        fast, exact = fast_and_exact(path)
        np.testing.assert_array_equal(fast, exact)


def test_fast_path_is_identical_on_full_size_cbis(cbis_files):
    fast, exact = fast_and_exact(cbis_files[0])  # 16-bit RLE, 4.4k x 2.8k
    np.testing.assert_array_equal(fast, exact)


def test_float_fallback_for_rescaled_images(tmp_path):
    path = make_file(tmp_path / "r.dcm", breast_phantom(), RescaleSlope=2, RescaleIntercept=-7)
    fast, exact = fast_and_exact(path)
    np.testing.assert_array_equal(fast, exact)


def test_reduced_jpeg2000_decode_agrees(mias_dir):
    path = mias_dir / "P0001" / "mdb001.dcm"  # JPEG 2000, 1024 x 1024
    stored = read_stored(path, READER, reduce_to=224)
    if stored.reduction == 1:
        pytest.skip("glymur with the system libopenjp2 is not installed: JPEG 2000 decodes at full size")
    assert stored.reduction == 4 and stored.stored.shape == (256, 256)
    fast = display_from_stored(stored, PRIMER).astype(np.float32)
    exact = to_display_uint8(read_image(path, READER).pixels, PRIMER).astype(np.float32)
    assert np.corrcoef(fast.ravel(), exact.ravel())[0, 1] > 0.97


def test_reduction_keeps_the_model_size():
    from mammo_retrieval.dicom.header import HeaderFields
    fields = dict(sop_instance_uid="1", study_instance_uid="1", series_instance_uid="1", accession_number=None,
                  study_key="1", study_key_source="study_uid", patient_id="", laterality=None,
                  laterality_source=None, view=None, view_source=None, manufacturer=None, modality="MG",
                  number_of_frames=1, photometric="MONOCHROME2")
    j2k = HeaderFields(rows=1024, columns=1024, transfer_syntax="1.2.840.10008.1.2.4.90", **fields)
    rle = HeaderFields(rows=4096, columns=3000, transfer_syntax="1.2.840.10008.1.2.5", **fields)
    assert reduction_for(rle, 224) == 1 and reduction_for(j2k, None) == 1
    try:  # reduced decoding needs glymur over the system libopenjp2; without it every image decodes fully
        import glymur
        reducible = bool(glymur.version.openjpeg_version)
    except Exception:
        reducible = False
    assert (reduction_for(j2k, 224), reduction_for(j2k, 299)) == ((4, 2) if reducible else (1, 1))


def test_early_downscale_agrees_on_full_size_mammograms(cbis_files):
    from mammo_retrieval.preprocess.fast import downscale_early
    stored = read_stored(cbis_files[0], READER)
    small = downscale_early(stored, 224)
    assert small.reduction == 8 and small.stored.shape == tuple(-(-d // 8) for d in stored.stored.shape)
    fast = display_from_stored(small, PRIMER).astype(np.float32)
    exact = to_display_uint8(read_image(cbis_files[0], READER).pixels, PRIMER).astype(np.float32)
    assert np.corrcoef(fast.ravel(), exact.ravel())[0, 1] > 0.95
