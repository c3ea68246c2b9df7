"""FAISS vector index with a manifest, atomic saves and an exact-to-IVF layout policy."""
from mammo_retrieval.storage.index.manifest import Manifest
from mammo_retrieval.storage.index.store import VectorIndex, plan_layout

__all__ = ["Manifest", "VectorIndex", "plan_layout"]
