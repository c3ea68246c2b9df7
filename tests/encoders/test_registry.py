import pytest

from mammo_retrieval.encoders import DEFAULT_REGISTRY, EncoderRegistry, EncoderSpec
from mammo_retrieval.core.errors import ConfigError


def test_default_registry_holds_the_card_backbones():
    assert {"resnet50", "densenet121", "inception_v3"} <= set(DEFAULT_REGISTRY.names())
    assert DEFAULT_REGISTRY.get("resnet50").dim == 2048
    assert DEFAULT_REGISTRY.get("inception_v3").input_size == (299, 299)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown encoder 'vit'") as info:
        DEFAULT_REGISTRY.get("vit")
    assert "resnet50" in info.value.hint


def test_registries_are_independent():
    mine = EncoderRegistry([EncoderSpec("tiny", "resnet18", 512)])
    assert mine.names() == ["tiny"] and "tiny" not in DEFAULT_REGISTRY.names()
    with pytest.raises(ValueError, match="already registered"):
        mine.register(EncoderSpec("tiny", "resnet18", 512))


def test_a_spec_of_an_unregistered_family_is_refused_by_name():
    mine = EncoderRegistry([EncoderSpec("keras-vit", "vit", 768, family="keras")])
    with pytest.raises(ConfigError, match="unknown family 'keras'") as info:
        mine.builder(mine.get("keras-vit"))
    assert "timm" in info.value.hint


def test_a_registered_family_builds_the_backbone():
    import torch

    from mammo_retrieval.encoders.model import create_backbone
    calls = []

    def tiny(spec):
        calls.append(spec.name)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(spec.dim))

    mine = EncoderRegistry([EncoderSpec("toy", "toy", 4, family="toy")], families={"toy": tiny})
    model = create_backbone(mine.get("toy"), mine)
    assert calls == ["toy"] and model(torch.zeros(2, 3, 8, 8)).shape == (2, 4)


def test_unknown_interpolation_is_refused_at_registration():
    with pytest.raises(ValueError, match="interpolation"):
        EncoderRegistry([EncoderSpec("odd", "resnet18", 512, interpolation="lanczos9")])


def test_the_model_interpolation_reaches_the_preprocessing():
    from mammo_retrieval.core.config import load_config
    from mammo_retrieval.encoders import build_encoder
    cfg = load_config(env={})
    mine = EncoderRegistry([EncoderSpec("cubic18", "resnet18", 512, input_size=(64, 64), interpolation="bicubic")])
    enc = build_encoder(cfg.encoder.__class__(**{**cfg.encoder.__dict__, "name": "cubic18", "weights": None,
                                                 "allow_random_weights": True}), cfg.preprocess, mine)
    assert enc.settings.interpolation == "bicubic"
    plain = build_encoder(cfg.encoder.__class__(**{**cfg.encoder.__dict__, "name": "resnet18", "weights": None,
                                                   "allow_random_weights": True, "input_size": 64}),
                          cfg.preprocess)
    assert enc.identity.preprocess_digest != plain.identity.preprocess_digest
