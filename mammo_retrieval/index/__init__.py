"""FAISS vector index with a manifest, atomic saves and an exact-to-IVF layout policy."""
from .manifest import Manifest
from .store import VectorIndex, plan_layout

__all__ = ["Manifest", "VectorIndex", "plan_layout"]
