"""The sampled path must give the card's uint8 image bit for bit: CLAHE on the full image, then the resize."""
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from mammo_retrieval.core.config import load_config
from mammo_retrieval.dicom.reader import read_image, read_stored
from mammo_retrieval.preprocess import PreprocessSettings, to_display_uint8
from mammo_retrieval.preprocess.fast import display_from_stored, percentile_scale_uint8_integer
from mammo_retrieval.preprocess.primer import finish_display
from mammo_retrieval.preprocess.sampled import applies, display_sampled, mapped_histograms, resize_taps

PRIMER = PreprocessSettings()
READER = load_config(env={}).reader


def full_path(stored: np.ndarray, monochrome1: bool, settings: PreprocessSettings = PRIMER) -> np.ndarray:
    """What the card computes: scale the whole image, CLAHE the whole image, resize."""
    values = stored.max() - stored if monochrome1 else stored
    return finish_display(percentile_scale_uint8_integer(values, *settings.percentiles), settings)


def mammogram_like(rng: np.random.Generator, shape: tuple[int, int], dtype, top: int) -> np.ndarray:
    """Smooth structure plus noise, a flat background, and a saturated label: the histogram shapes of a
    real mammogram (long empty tails, spikes at the ends)."""
    base = cv2.resize(rng.uniform(0, top, (6, 6)).astype(np.float32), shape[::-1], interpolation=cv2.INTER_CUBIC)
    image = np.clip(base + rng.normal(0, top * 0.03, shape), 0, top)
    image[:, : shape[1] // 3] = rng.integers(0, 4)  # background
    image[10:30, -60:-20] = top  # burnt-in label
    return image.astype(dtype)


@pytest.mark.parametrize("shape", [(448, 448), (449, 451), (448, 456), (896, 672), (1024, 1024), (2050, 1333),
                                   (3000, 460), (460, 3000)])
@pytest.mark.parametrize("dtype,top", [(np.uint8, 255), (np.uint16, 4095), (np.uint16, 65535)])
def test_identical_to_full_clahe_then_resize(shape, dtype, top):
    rng = np.random.default_rng(hash((shape, top)) % 2**32)
    stored = mammogram_like(rng, shape, dtype, top)
    for monochrome1 in (False, True):
        np.testing.assert_array_equal(display_sampled(stored, PRIMER, monochrome1=monochrome1),
                                      full_path(stored, monochrome1))


def test_identical_with_other_clahe_and_model_settings():
    rng = np.random.default_rng(7)
    stored = mammogram_like(rng, (1500, 1100), np.uint16, 16383)
    for settings in [PreprocessSettings(clahe_clip_limit=4.0, clahe_tile_grid=(4, 6), size=(128, 128)),
                     PreprocessSettings(clahe_clip_limit=0.0, percentiles=(0.5, 99.5), size=(300, 256))]:
        np.testing.assert_array_equal(display_sampled(stored, settings), full_path(stored, False, settings))


def test_resize_reads_only_the_taps():
    """Pixels off the tap grid may hold anything: the bilinear resize never looks at them."""
    rng = np.random.default_rng(3)
    for shape in [(4432, 2864), (1024, 1024), (517, 999)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        rows, cols = resize_taps(shape[0], 224), resize_taps(shape[1], 224)
        scrambled = rng.integers(0, 256, shape, dtype=np.uint8)
        scrambled[np.ix_(rows, cols)] = image[np.ix_(rows, cols)]
        np.testing.assert_array_equal(cv2.resize(scrambled, (224, 224), interpolation=cv2.INTER_LINEAR),
                                      cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR))
        assert len(rows) <= 448 and len(cols) <= 448


def test_mapped_histograms_also_for_a_table_that_is_not_monotone():
    rng = np.random.default_rng(5)
    per_tile = rng.integers(0, 50, (4, 300)).astype(np.float32)
    table = rng.integers(0, 256, 300).astype(np.uint8)
    expected = np.stack([np.bincount(table, weights=h, minlength=256) for h in per_tile])
    np.testing.assert_array_equal(mapped_histograms(per_tile, table), expected)
    ramp = np.sort(table)
    np.testing.assert_array_equal(mapped_histograms(per_tile, ramp),
                                  np.stack([np.bincount(ramp, weights=h, minlength=256) for h in per_tile]))


def test_applies_only_where_it_is_exact():
    big = np.zeros((1000, 800), np.uint16)
    assert applies(big, PRIMER)
    assert not applies(big[:447], PRIMER)  # shrinking less than 2x: the resize reads most pixels anyway
    assert not applies(big.astype(np.int16), PRIMER)
    assert not applies(big.astype(np.float32), PRIMER)
    assert not applies(big, PreprocessSettings(crop_to_breast=True))
    assert not applies(big, PreprocessSettings(flip_to_side="L"))


def assert_sampled_matches_the_float_path(paths) -> None:
    for path in paths:
        image = read_stored(path, READER)
        assert applies(image.stored, PRIMER)
        sampled = display_from_stored(image, PRIMER, sampled=True)
        np.testing.assert_array_equal(sampled, display_from_stored(image, PRIMER, sampled=False), err_msg=str(path))
        np.testing.assert_array_equal(sampled, to_display_uint8(read_image(path, READER).pixels, PRIMER),
                                      err_msg=str(path))


def test_real_cbis_images_match_the_float_path(cbis_files):
    """Every CBIS-DDSM file (16-bit RLE, 4.4k x 2.8k)."""
    assert_sampled_matches_the_float_path(cbis_files)


def test_real_mias_images_match_the_float_path(mias_dir):
    """MIAS files of each kind (MONOCHROME1, JPEG 2000, RLE, uncompressed)."""
    assert_sampled_matches_the_float_path([mias_dir / "P0001" / "mdb001.dcm", mias_dir / "P0002" / "mdb003.dcm",
                                           mias_dir / "P0010" / "mdb020.dcm"])


def test_digest_of_the_bilinear_default_is_unchanged():
    """Indexes made before interpolation became a setting keep their model key."""
    assert "interpolation" not in PRIMER.as_dict()
    assert PRIMER.digest() == "639f5a5c2ba1cf65"  # the digest before the setting existed


def test_sampled_path_is_refused_for_another_interpolation():
    import dataclasses
    stored = np.zeros((1000, 800), np.uint16)
    assert applies(stored, PRIMER)
    cubic = dataclasses.replace(PRIMER, interpolation="bicubic")
    assert not applies(stored, cubic)
    rng = np.random.default_rng(3)
    image = mammogram_like(rng, (900, 700), np.uint16, 4095)
    stored = SimpleNamespace(stored=image, slope=1.0, intercept=0.0, window=None,
                             header=SimpleNamespace(photometric="MONOCHROME2"))
    out = display_from_stored(stored, cubic)
    np.testing.assert_array_equal(out, full_path(image, False, cubic))
    assert not np.array_equal(out, full_path(image, False))  # the interpolation really changed the image
