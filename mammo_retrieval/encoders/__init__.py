"""Image encoders: the Encoder protocol, a name-keyed registry of builder families, real weight loading."""
from mammo_retrieval.encoders.base import Encoder
from mammo_retrieval.encoders.registry import DEFAULT_REGISTRY, EncoderRegistry, EncoderSpec
from mammo_retrieval.encoders.model import TorchEncoder, build_encoder

__all__ = ["DEFAULT_REGISTRY", "Encoder", "EncoderRegistry", "EncoderSpec", "TorchEncoder", "build_encoder"]
