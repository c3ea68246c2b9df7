import numpy as np

from mammo_retrieval.dicom.pixels import apply_linear_window, apply_rescale, invert_monochrome1, to_presentation


def test_identity_rescale_keeps_values_exact():
    x = np.array([[0, 4095]], dtype=np.uint16)
    out = apply_rescale(x)
    assert out.dtype == np.float32 and out.tolist() == [[0.0, 4095.0]]


def test_rescale_slope_intercept():
    assert apply_rescale(np.array([10], np.uint16), 2.0, -5.0).tolist() == [15.0]


def test_linear_window_matches_the_standard_formula():
    # PS3.3 C.11.2.1.2.1: c=2048, w=4096 -> x <= c-0.5-(w-1)/2 gives ymin, x > c-0.5+(w-1)/2 gives ymax
    y = apply_linear_window(np.array([0.0, 2047.5, 4096.0]), 2048, 4096, 0.0, 1.0)
    assert y[0] == 0.0 and abs(y[1] - 0.5) < 1e-6 and y[2] == 1.0


def test_monochrome1_inverts_against_the_image_max():
    x = np.array([[0.0, 100.0, 400.0]], np.float32)
    assert invert_monochrome1(x).tolist() == [[400.0, 300.0, 0.0]]


def test_order_is_modality_then_voi_then_presentation():
    x = np.array([[0, 1000, 2000]], np.uint16)
    out = to_presentation(x, "MONOCHROME1", slope=2.0, intercept=0.0, window=(2000, 4000, "LINEAR"))
    windowed = apply_linear_window(apply_rescale(x, 2.0, 0.0), 2000, 4000, 0.0, 4095.0)
    np.testing.assert_allclose(out, windowed.max() - windowed)
