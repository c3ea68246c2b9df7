"""Image encoders: a name-keyed registry of timm backbones and real weight loading."""
from mammo_retrieval.encoders.registry import DEFAULT_REGISTRY, EncoderRegistry, EncoderSpec
from mammo_retrieval.encoders.model import Encoder, build_encoder

__all__ = ["DEFAULT_REGISTRY", "Encoder", "EncoderRegistry", "EncoderSpec", "build_encoder"]
