import numpy as np

from mammo_retrieval.core.config import load_config
from mammo_retrieval.encoders import DEFAULT_REGISTRY, build_encoder
from mammo_retrieval.encoders.model import packaged_weights
import pytest

from mammo_retrieval.encoders.registry import BUILTIN, BUILTIN_V1
from mammo_retrieval.core.fileio import sha256_file


def test_v2_is_the_default():
    assert load_config(env={}).encoder.name == BUILTIN == "mammo-simclr-v2"


@pytest.mark.parametrize("name, dim", [(BUILTIN, 512 + 64), (BUILTIN_V1, 512)])
def test_builtin_encoders_are_shipped_and_load_without_network(name, dim):
    spec = DEFAULT_REGISTRY.get(name)
    path = packaged_weights(spec.weights_file)
    assert path.is_file() and path.stat().st_size < 30e6  # fp16 ResNet-18
    cfg = load_config(env={}).encoder
    enc = build_encoder(cfg.__class__(**{**cfg.__dict__, "name": name}), load_config(env={}).preprocess)
    assert not enc.identity.random_weights and enc.identity.weights_sha256 == sha256_file(path)
    assert enc.settings.size == (128, 128) and enc.dim == dim
    x = np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(enc.embed(x), axis=1), 1.0, atol=1e-5)
