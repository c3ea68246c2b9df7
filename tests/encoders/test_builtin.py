import numpy as np

from mammo_retrieval.core.config import load_config
from mammo_retrieval.encoders import DEFAULT_REGISTRY, build_encoder
from mammo_retrieval.encoders.model import packaged_weights
import pytest

from mammo_retrieval.encoders.registry import BUILTIN, BUILTIN_V1, BUILTIN_V2
from mammo_retrieval.core.errors import WeightsError
from mammo_retrieval.core.fileio import sha256_file


def test_v3_is_the_default():
    assert load_config(env={}).encoder.name == BUILTIN == "mammo-simclr-v3"


@pytest.mark.parametrize("name, dim", [(BUILTIN, 704), (BUILTIN_V2, 512 + 64), (BUILTIN_V1, 512)])
def test_builtin_encoders_are_shipped_and_load_without_network(name, dim):
    spec = DEFAULT_REGISTRY.get(name)
    path = packaged_weights(spec.weights_file)
    assert path.is_file() and path.stat().st_size < 30e6  # fp16 ResNet-18
    cfg = load_config(env={}).encoder
    enc = build_encoder(cfg.__class__(**{**cfg.__dict__, "name": name}), load_config(env={}).preprocess)
    assert not enc.identity.random_weights and enc.identity.weights_sha256 == sha256_file(path)
    assert enc.settings.size == (128, 128) and enc.dim == dim
    x = np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)
    vectors = enc.embed(x)
    assert vectors.shape == (2, dim)  # what the model outputs, not only what the registry says
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("older, name", [(BUILTIN_V2, "mammo-simclr-v2"), (BUILTIN_V1, "mammo-simclr")])
def test_an_older_builtins_weights_under_the_default_name_are_refused_with_the_name_to_set(older, name):
    """A config that pins v1's or v2's weights file and relied on that being the default encoder's name."""
    cfg = load_config(env={})
    weights = str(packaged_weights(DEFAULT_REGISTRY.get(older).weights_file))
    with pytest.raises(WeightsError, match="these are") as info:
        build_encoder(cfg.encoder.__class__(**{**cfg.encoder.__dict__, "weights": weights}), cfg.preprocess)
    assert f"encoder.name: {name} (" in info.value.hint


def test_v3s_weights_under_v2s_name_are_refused_with_the_name_to_set():
    cfg = load_config(env={})
    weights = str(packaged_weights(DEFAULT_REGISTRY.get(BUILTIN).weights_file))
    with pytest.raises(WeightsError, match="the built-in v3's layout") as info:
        build_encoder(cfg.encoder.__class__(**{**cfg.encoder.__dict__, "name": BUILTIN_V2, "weights": weights}),
                      cfg.preprocess)
    assert "encoder.name: mammo-simclr-v3" in info.value.hint


def test_v3_refuses_another_input_size_its_texture_was_not_fitted_at():
    from mammo_retrieval.core.errors import ConfigError
    cfg = load_config(env={})
    with pytest.raises(ConfigError, match="takes 128x128 pictures, not 224x224"):
        build_encoder(cfg.encoder.__class__(**{**cfg.encoder.__dict__, "input_size": 224}), cfg.preprocess)


def test_the_shipped_v3_embeds_one_picture_and_a_blank_one_without_nan():
    cfg = load_config(env={})
    enc = build_encoder(cfg.encoder, cfg.preprocess)
    from mammo_retrieval.preprocess import normalise
    blank = normalise(np.zeros((1, 128, 128), np.uint8), enc.settings)
    textured = normalise(np.random.default_rng(0).integers(30, 200, (1, 128, 128)).astype(np.uint8), enc.settings)
    for batch in (blank, textured):
        vector = enc.embed(batch)
        assert vector.shape == (1, 704) and np.isfinite(vector).all()
        np.testing.assert_allclose(np.linalg.norm(vector), 1.0, atol=1e-5)
        assert not vector[0, 664:].any()  # the padding
    assert np.abs(enc.embed(textured)[0, 576:664]).sum() > 0
