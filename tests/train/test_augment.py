import torch

from mammo_retrieval.train.augment import AugmentConfig, augment, to_model_input

OFF = AugmentConfig(hflip_p=0, vflip_p=0, rotate_p=0, ssr_p=0, brightness_contrast_p=0)


def batch():
    return torch.rand(4, 1, 32, 24, generator=torch.Generator().manual_seed(0))


def test_all_off_is_identity():
    x = batch()
    torch.testing.assert_close(augment(x, OFF), x, atol=1e-5, rtol=0)


def test_flips_are_exact():
    x = batch()
    torch.testing.assert_close(augment(x, AugmentConfig(**{**OFF.__dict__, "hflip_p": 1.0})), x.flip(-1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(augment(x, AugmentConfig(**{**OFF.__dict__, "vflip_p": 1.0})), x.flip(-2),
                               atol=1e-5, rtol=0)


def test_full_augmentation_is_batched_bounded_and_varied():
    x = batch().repeat(8, 1, 1, 1)
    out = augment(x, AugmentConfig(), torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert len({round(float(o.sum()), 3) for o in out}) > 20  # each image drew its own transform


def test_model_input_is_imagenet_normalised_rgb():
    x = torch.full((1, 1, 2, 2), 0.5)
    out = to_model_input(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert out.shape == (1, 3, 2, 2)
    assert abs(float(out[0, 0, 0, 0]) - (0.5 - 0.485) / 0.229) < 1e-6
