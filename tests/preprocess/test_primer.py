import numpy as np

from mammo_retrieval.core.config import load_config
from mammo_retrieval.dicom.reader import read_image
from mammo_retrieval.preprocess import PreprocessSettings, preprocess, to_display_uint8
from mammo_retrieval.preprocess.primer import breast_bounding_box, breast_side
from tests.factory import breast_phantom
from bench.seed_pipeline import DICOMProcessor  # the card's code, verbatim

READER = load_config(env={}).reader
PRIMER = PreprocessSettings()


def max_difference(path) -> float:
    ours = preprocess(read_image(path, READER).pixels, PRIMER)
    reference = DICOMProcessor().preprocess(str(path))
    assert ours.shape == reference.shape == (3, 224, 224) and ours.dtype == np.float32
    return float(np.abs(ours - reference).max())


def test_matches_the_model_card_on_mias(mias_dir, mias_labels):
    # every syntax and photometric of the corpus: rows rotate RLE / JPEG 2000 / uncompressed, 1 in 5 MONOCHROME1
    files = sorted({row["file"] for row in mias_labels})[::5] + ["P0002/mdb003.dcm", "P0010/mdb020.dcm"]
    worst = max(max_difference(mias_dir / f) for f in files)
    assert worst <= 1e-5


def test_matches_the_model_card_on_full_size_cbis(cbis_files):
    assert max(max_difference(p) for p in cbis_files[:2]) <= 1e-5


def test_display_image_is_uint8_at_model_size():
    display = to_display_uint8(breast_phantom(300, 200).astype(np.float32), PRIMER)
    assert display.dtype == np.uint8 and display.shape == (224, 224) and display.max() > 200


def test_settings_digest_tracks_every_option():
    digests = {PRIMER.digest(), PreprocessSettings(flip_to_side="L").digest(),
               PreprocessSettings(crop_to_breast=True).digest(), PreprocessSettings(size=(299, 299)).digest(),
               PreprocessSettings(percentiles=(1.0, 99.0)).digest()}
    assert len(digests) == 5 and PRIMER.digest() == PreprocessSettings().digest()


def test_flip_to_canonical_side():
    right = breast_phantom(side="R").astype(np.float32)
    left = breast_phantom(side="L").astype(np.float32)
    settings = PreprocessSettings(flip_to_side="L", size=(96, 64))
    assert breast_side(to_display_uint8(right, settings)) == "L"
    assert breast_side(to_display_uint8(left, settings)) == "L"


def test_crop_to_breast_bounds_the_tissue():
    image = np.zeros((200, 100), np.uint8)
    image[50:150, 0:40] = 200
    assert breast_bounding_box(image) == (50, 150, 0, 40)
