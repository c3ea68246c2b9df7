import pytest

from mammo_retrieval.encoders import DEFAULT_REGISTRY, EncoderRegistry, EncoderSpec
from mammo_retrieval.errors import ConfigError


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
