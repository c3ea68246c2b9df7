"""Image preprocessing: presentation-ready pixels -> model input."""
from mammo_retrieval.preprocess.primer import PreprocessSettings, normalise, preprocess, to_display_uint8

__all__ = ["PreprocessSettings", "normalise", "preprocess", "to_display_uint8"]
