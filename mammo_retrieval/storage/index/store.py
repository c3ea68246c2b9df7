"""A FAISS index over inner product of unit vectors, whose ids are database primary keys.

Layout policy: exact search (IDMap2 over FlatIP) until the corpus can train IVF (``min_points_per_list``
x nlist vectors), then IVF-Flat (or SQ8/PQ by config), rebuilt from the database as the corpus grows.
Saves are atomic: a new index file is written beside the old one, then the manifest (the commit point)
is replaced, then the old file is removed. A crash at any step leaves a readable index.
"""
from __future__ import annotations

import logging

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import faiss
import numpy as np

from mammo_retrieval.core.config import IndexConfig
from mammo_retrieval.core.errors import ConfigError, IndexCorruptError, Remedy
from mammo_retrieval.core.fileio import fsync_dir
from mammo_retrieval.core.private import make_private_dir
from mammo_retrieval.storage.index.manifest import Manifest

logger = logging.getLogger(__name__)

FLAT = "flat"


@dataclass(frozen=True)
class Layout:
    index_type: str
    nlist: int | None


def auto_nlist(n: int) -> int:
    """A power of two near 4*sqrt(n) (the usual FAISS guidance), at least 16."""
    return max(16, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(n, 1))))))


def plan_layout(n: int, cfg: IndexConfig) -> Layout:
    nlist = auto_nlist(n) if cfg.nlist == "auto" else int(cfg.nlist)
    if n < cfg.min_points_per_list * nlist:
        return Layout(FLAT, None)
    return Layout(cfg.type, nlist)


def _factory_string(layout: Layout, cfg: IndexConfig, dim: int) -> str:
    codec = {"ivf_flat": "Flat", "ivf_sq8": "SQ8", "ivf_pq": f"PQ{cfg.pq_m}"}[layout.index_type]
    if layout.index_type == "ivf_pq" and dim % cfg.pq_m:
        raise ConfigError(f"index.pq_m={cfg.pq_m} does not divide dim {dim}",
                          hint="choose a pq_m that divides the encoder's dimension (e.g. 16, 32 or 64 for 512)")
    return f"IVF{layout.nlist},{codec}"


def new_faiss_index(layout: Layout, cfg: IndexConfig, dim: int) -> faiss.Index:
    if layout.index_type == FLAT:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    return faiss.index_factory(dim, _factory_string(layout, cfg, dim), faiss.METRIC_INNER_PRODUCT)


VectorChunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


class VectorIndex:
    """One model version's index in one directory."""

    def __init__(self, directory: Path, manifest: Manifest, index: faiss.Index, cfg: IndexConfig) -> None:
        self.directory = directory
        self.manifest = manifest
        self.index = index
        self.cfg = cfg
        self._apply_nprobe()

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, directory: Path, identity, cfg: IndexConfig) -> "VectorIndex":
        make_private_dir(directory)  # 0700 whatever the umask: the index describes patient images
        manifest = Manifest.read(directory)
        if manifest is None:
            manifest = Manifest.for_identity(identity)
            return cls(directory, manifest, new_faiss_index(Layout(FLAT, None), cfg, identity.dim), cfg)
        manifest.check_matches(identity)
        for _ in range(10):
            try:
                return cls(directory, manifest, cls._read_index_file(directory, manifest, cfg), cfg)
            except IndexCorruptError:
                # a writer may have saved between our reading the manifest and its index file, removing the
                # file we were told to read: that is no corruption, read the new manifest's file instead
                again = Manifest.read(directory)
                if again is None or again.index_file == manifest.index_file:
                    raise
                manifest = again
                manifest.check_matches(identity)
        return cls(directory, manifest, cls._read_index_file(directory, manifest, cfg), cfg)

    @classmethod
    def open_existing(cls, directory: Path, identity, cfg: IndexConfig) -> "VectorIndex | None":
        if Manifest.read(directory) is None:
            return None
        return cls.open_or_create(directory, identity, cfg)

    @staticmethod
    def _read_index_file(directory: Path, manifest: Manifest, cfg: IndexConfig) -> faiss.Index:
        if manifest.index_file is None:
            return new_faiss_index(Layout(FLAT, None), cfg, manifest.dim)
        path = directory / manifest.index_file
        try:
            index = faiss.read_index(str(path))
        except Exception as exc:
            raise IndexCorruptError(f"{path}: cannot read index: {exc}",
                                    remedies=[Remedy("rebuild it from the database", "index_rebuild")]) from None
        if index.ntotal != manifest.ntotal or index.d != manifest.dim:
            raise IndexCorruptError(f"{path}: holds {index.ntotal} x {index.d}, manifest says "
                                    f"{manifest.ntotal} x {manifest.dim}",
                                    remedies=[Remedy("rebuild it from the database", "index_rebuild")])
        return index

    # --- reading -------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def layout(self) -> Layout:
        return Layout(self.manifest.index_type, self.manifest.nlist)

    def _apply_nprobe(self) -> None:
        if self.manifest.index_type != FLAT:
            nprobe = self.manifest.nprobe or self.cfg.nprobe
            faiss.extract_index_ivf(self.index).nprobe = nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), both (n, k); missing neighbours have id -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.manifest.dim)
        k = max(1, min(k, max(self.ntotal, 1)))
        return self.index.search(queries, k)

    # --- writing -------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.manifest.dim)
        self.index.add_with_ids(vectors, ids)
        self.manifest.ntotal = self.ntotal
        self.manifest.max_vector_id = max(self.manifest.max_vector_id, int(ids.max()))

    def wants_rebuild(self, n: int) -> Layout | None:
        """The layout to move to at corpus size n, or None to keep the current one."""
        target = plan_layout(n, self.cfg)
        current = self.layout
        if target.index_type == FLAT:
            return None  # an IVF index is never shrunk back automatically
        if current.index_type == FLAT or current.index_type != target.index_type:
            return target
        if self.cfg.nlist == "auto" and target.nlist >= 4 * (current.nlist or 1):
            return target  # the corpus outgrew its coarse quantiser
        return None

    def rebuild(self, layout: Layout, training_sample: np.ndarray, chunks: VectorChunks) -> None:
        """Train a new index on a sample and stream every vector into it (memory: one chunk at a time).

        The old in-memory index is dropped first so that the vectors are never held twice; the copy on
        disk stays the live one until ``save``."""
        logger.info("building %s index (nlist %s) in %s", layout.index_type, layout.nlist, self.directory)
        self.index = None
        index = new_faiss_index(layout, self.cfg, self.manifest.dim)
        if not index.is_trained:
            index.train(np.ascontiguousarray(training_sample, dtype=np.float32))
        max_id = 0
        for ids, vectors in chunks():
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64))
            max_id = max(max_id, int(ids.max()))
        self.index = index
        self.manifest.index_type = layout.index_type
        self.manifest.nlist = layout.nlist
        self.manifest.nprobe = (None if layout.index_type == FLAT
                                else min(self.manifest.nprobe or self.cfg.nprobe, layout.nlist))
        self.manifest.ntotal = self.ntotal
        self.manifest.max_vector_id = max_id
        self._apply_nprobe()

    def set_nprobe(self, nprobe: int) -> None:
        self.manifest.nprobe = nprobe
        self._apply_nprobe()

    def save(self) -> None:
        """Atomic: new index file, fsync, then replace the manifest (the commit point), then drop the old file."""
        logger.debug("saving %d vectors to %s", self.ntotal, self.directory)
        name = f"index-{uuid.uuid4().hex[:12]}.faiss"
        tmp = self.directory / f".{name}.tmp"
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.directory / name)
        fsync_dir(self.directory)
        old = self.manifest.index_file
        self.manifest.index_file = name
        try:
            self.manifest.write_atomic(self.directory)
        except BaseException:
            self.manifest.index_file = old
            (self.directory / name).unlink(missing_ok=True)
            raise
        self.remove_orphans()

    def remove_orphans(self) -> None:
        """Index files no manifest points to (left by a crash mid-save)."""
        for path in self.directory.iterdir():
            stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
            stale_index = path.name.startswith("index-") and path.name != self.manifest.index_file
            if stale_tmp or stale_index:
                path.unlink(missing_ok=True)
