"""A FAISS index over inner product of unit vectors, whose ids are database primary keys.

Layout policy: exact search (IDMap2 over FlatIP) until the corpus can train IVF (``min_points_per_list``
x nlist vectors), then IVF-Flat (or SQ8/PQ, with an optional OPQ rotation, by config), rebuilt from the
database as the corpus grows. With ``on_disk`` the inverted lists live in a memory-mapped file, built
shard by shard (see ondisk.py), and new vectors go to an in-memory delta until a compaction.
Saves are atomic: new files are written beside the old ones, then the manifest (the commit point)
is replaced, then files no manifest names are removed. A crash at any step leaves a readable index.
"""
from __future__ import annotations

import dataclasses
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
from mammo_retrieval.core.fileio import fsync_dir, fsync_path
from mammo_retrieval.core.private import make_private_dir
from mammo_retrieval.storage.index import ondisk
from mammo_retrieval.storage.index.manifest import Manifest

logger = logging.getLogger(__name__)

FLAT = "flat"
# An on-disk index merges its delta into a new lists file once the delta holds COMPACT_FRACTION of the
# lists file's vectors, at least COMPACT_MIN and at most COMPACT_MAX (every save rewrites the delta: at
# PQ64 200k vectors are 14 MB; a compaction rewrites the lists file, 720 MB at 10M)
COMPACT_MIN, COMPACT_FRACTION, COMPACT_MAX = 10_000, 0.2, 200_000
RERANK_MAX = 4096  # candidates re-scored per query at most (more only when k itself is larger)


@dataclass(frozen=True)
class Layout:
    index_type: str
    nlist: int | None
    opq: bool = False
    on_disk: bool = False

    def __post_init__(self) -> None:
        # the one place this rule lives: config, `index rebuild` and manifests all make a Layout
        if self.opq and self.index_type != "ivf_pq":
            raise ConfigError(f"OPQ rotates vectors for product quantisation; it does not apply to {self.index_type}",
                              hint="use index type ivf_pq with OPQ (index rebuild --type ivf_pq --opq), or drop OPQ")

    def describe(self) -> str:
        if self.index_type == FLAT:
            return "flat (exact)"
        return (("OPQ + " if self.opq else "") + f"{self.index_type} nlist {self.nlist}"
                + (", lists on disk" if self.on_disk else ""))


def auto_nlist(n: int) -> int:
    """A power of two near 4*sqrt(n) (the usual FAISS guidance), at least 16."""
    return max(16, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(n, 1))))))


PQ_CENTROIDS = 256  # each product quantiser codebook (8 bits a code): FAISS cannot train one on fewer vectors


def vectors_to_train(index_type: str, nlist: int, per_list: int) -> int:
    """Vectors that train this IVF layout: ``per_list`` a list, and for PQ at least one a codebook centroid."""
    needed = per_list * nlist
    return max(needed, PQ_CENTROIDS) if index_type == "ivf_pq" else needed


def plan_layout(n: int, cfg: IndexConfig) -> Layout:
    nlist = auto_nlist(n) if cfg.nlist == "auto" else int(cfg.nlist)
    if n < vectors_to_train(cfg.type, nlist, cfg.min_points_per_list):
        return Layout(FLAT, None)
    return Layout(cfg.type, nlist, opq=cfg.opq and cfg.type == "ivf_pq", on_disk=cfg.on_disk)


def _factory_string(layout: Layout, cfg: IndexConfig, dim: int) -> str:
    codec = {"ivf_flat": "Flat", "ivf_sq8": "SQ8", "ivf_pq": f"PQ{cfg.pq_m}"}[layout.index_type]
    if layout.index_type == "ivf_pq" and dim % cfg.pq_m:
        raise ConfigError(f"index.pq_m={cfg.pq_m} does not divide dim {dim}",
                          hint="choose a pq_m that divides the encoder's dimension (e.g. 16, 32 or 64 for 512)")
    return ("OPQ{m},".format(m=cfg.pq_m) if layout.opq else "") + f"IVF{layout.nlist},{codec}"


def new_faiss_index(layout: Layout, cfg: IndexConfig, dim: int) -> faiss.Index:
    if layout.index_type == FLAT:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index = faiss.index_factory(dim, _factory_string(layout, cfg, dim), faiss.METRIC_INNER_PRODUCT)
    if layout.index_type == "ivf_pq":
        # the factory turns on polysemous training (centroid reordering for Hamming filtering, which we do
        # not use): 48 of the 57 s of training PQ64 on 12,800 vectors here
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    if layout.opq:
        faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = cfg.opq_iterations
    return index


VectorChunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
# ids -> (the ids found, their exact float vectors): the catalog's copy, for re-ranking PQ candidates
ExactVectors = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class VectorIndex:
    """One model version's index in one directory.

    ``index`` holds the vectors (for an on-disk layout: the memory-mapped lists file) and ``delta`` the
    vectors added to an on-disk layout since it was built or compacted (None otherwise). ``exact_vectors``,
    when set, re-scores PQ candidates with their stored float vectors (``index.rerank`` times k of them)."""

    def __init__(self, directory: Path, manifest: Manifest, index: faiss.Index, cfg: IndexConfig,
                 delta: faiss.Index | None = None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.index = index
        self.delta = delta
        self.cfg = cfg
        self.exact_vectors: ExactVectors | None = None
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
                index, delta = cls.read_index_files(directory, manifest, cfg)
                return cls(directory, manifest, index, cfg, delta)
            except IndexCorruptError:
                # a writer may have saved between our reading the manifest and its index file, removing the
                # file we were told to read: that is no corruption, read the new manifest's file instead
                again = Manifest.read(directory)
                if again is None or again.files() == manifest.files():
                    raise
                manifest = again
                manifest.check_matches(identity)
        index, delta = cls.read_index_files(directory, manifest, cfg)
        return cls(directory, manifest, index, cfg, delta)

    @classmethod
    def open_existing(cls, directory: Path, identity, cfg: IndexConfig) -> "VectorIndex | None":
        if Manifest.read(directory) is None:
            return None
        return cls.open_or_create(directory, identity, cfg)

    @staticmethod
    def read_index_files(directory: Path, manifest: Manifest, cfg: IndexConfig, *,
                         mmap: bool = False) -> tuple[faiss.Index, faiss.Index | None]:
        """The manifest's faiss files (index, and an on-disk layout's delta), checked against its counts.
        ``mmap``: memory-mapped read-only, for a check that must not load a large index (status)."""
        if manifest.index_file is None:
            return new_faiss_index(Layout(FLAT, None), cfg, manifest.dim), None
        path = directory / manifest.index_file
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        delta = None
        try:
            if manifest.on_disk:
                if not manifest.lists_file or not (directory / manifest.lists_file).exists():
                    raise FileNotFoundError(f"its lists file {manifest.lists_file} is missing")
                index = ondisk.read_on_disk(path)
                path = directory / str(manifest.delta_file)
                delta = faiss.read_index(str(path), flags)
            else:
                index = faiss.read_index(str(path), flags)
        except Exception as exc:  # faiss raises RuntimeError with a multi-line C++ message
            raise IndexCorruptError(f"{path}: cannot read index ({' '.join(str(exc).split())[:200]})",
                                    remedies=[Remedy("rebuild it from the database", "index_rebuild")]) from None
        held = index.ntotal + (delta.ntotal if delta is not None else 0)
        if held != manifest.ntotal or index.d != manifest.dim:
            raise IndexCorruptError(f"{path}: holds {held} x {index.d}, manifest says "
                                    f"{manifest.ntotal} x {manifest.dim}",
                                    remedies=[Remedy("rebuild it from the database", "index_rebuild")])
        return index, delta

    # --- reading -------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) + (int(self.delta.ntotal) if self.delta is not None else 0)

    @property
    def layout(self) -> Layout:
        m = self.manifest
        return Layout(m.index_type, m.nlist, opq=m.opq, on_disk=m.on_disk)

    def _parts(self) -> list[faiss.Index]:
        return [self.index] if self.delta is None else [self.index, self.delta]

    def _apply_nprobe(self) -> None:
        if self.manifest.index_type != FLAT:
            nprobe = self.manifest.nprobe or self.cfg.nprobe
            for part in self._parts():
                faiss.extract_index_ivf(part).nprobe = nprobe

    def list_sizes(self) -> np.ndarray:
        """Vectors per inverted list (lists file and delta together)."""
        return sum(ondisk.list_sizes(part) for part in self._parts())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), both (n, k), best first; missing neighbours have id -1.

        PQ codes only approximate the scores: with ``index.rerank`` > 1 and the exact vectors at hand,
        ``rerank`` x k candidates are re-scored with their exact vectors and the best k kept."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.manifest.dim)
        k = max(1, min(k, max(self.ntotal, 1)))
        if self.manifest.index_type == "ivf_pq" and self.cfg.rerank > 1 and self.exact_vectors is not None:
            candidates = min(self.ntotal, max(k, min(k * self.cfg.rerank, RERANK_MAX)))
            scores, ids = self._search_codes(queries, candidates)
            return self._rerank(queries, ids, k)
        return self._search_codes(queries, k)

    def _search_codes(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.delta is None or self.delta.ntotal == 0:
            return self.index.search(queries, k)
        parts = [part.search(queries, k) for part in self._parts() if part.ntotal]
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        scores = np.where(ids >= 0, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1).astype(np.float32), np.take_along_axis(ids, order, 1)

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        wanted = np.unique(candidates[candidates >= 0])
        found, vectors = self.exact_vectors(wanted)
        row = {int(i): r for r, i in enumerate(found)}
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        for q, (query, cands) in enumerate(zip(queries, candidates)):
            known = [int(c) for c in dict.fromkeys(cands.tolist()) if c >= 0 and int(c) in row]
            if not known:
                continue
            exact = vectors[[row[c] for c in known]] @ query
            best = np.argsort(-exact, kind="stable")[:k]
            out_scores[q, :len(best)] = exact[best]
            out_ids[q, :len(best)] = np.asarray(known, dtype=np.int64)[best]
        return out_scores, out_ids

    # --- writing -------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add to the trained index as it is (never retrains): on disk, to the delta."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.manifest.dim)
        (self.delta if self.delta is not None else self.index).add_with_ids(vectors, ids)
        self.manifest.ntotal = self.ntotal
        self.manifest.max_vector_id = max(self.manifest.max_vector_id, int(ids.max()))

    def wants_rebuild(self, n: int) -> Layout | None:
        """The layout to move to at corpus size n, or None to keep the current one.

        A layout chosen by ``index rebuild`` is kept (its nlist still grows when it was left automatic);
        otherwise the config's policy applies."""
        current = self.layout
        if self.manifest.layout_source == "rebuild":
            if current.index_type == FLAT or not self.manifest.nlist_auto:
                return None
            grown = Layout(current.index_type, auto_nlist(n), current.opq, current.on_disk)
            return grown if grown.nlist >= 4 * (current.nlist or 1) else None
        target = plan_layout(n, self.cfg)
        if target.index_type == FLAT:
            return None  # an IVF index is never shrunk back automatically
        if current.index_type == FLAT or (current.index_type, current.opq, current.on_disk) != (
                target.index_type, target.opq, target.on_disk):
            return target
        if self.cfg.nlist == "auto" and target.nlist >= 4 * (current.nlist or 1):
            return target  # the corpus outgrew its coarse quantiser
        return None

    def wants_compaction(self) -> bool:
        """An on-disk index whose delta has grown (see COMPACT_FRACTION)."""
        if self.delta is None:
            return False
        return self.delta.ntotal >= max(COMPACT_MIN, min(COMPACT_FRACTION * self.index.ntotal, COMPACT_MAX))

    def rebuild(self, layout: Layout, training_sample: np.ndarray | None, chunks: VectorChunks, *,
                shard_size: int | None = None, source: str = "config", nlist_auto: bool = True) -> None:
        """Train a new index on a sample and stream every vector into it (memory: one chunk at a time, or
        for an on-disk layout one shard of codes at a time).

        The old in-memory index is dropped first so that the vectors are never held twice; the copy on
        disk stays the live one until ``save``."""
        logger.info("building %s in %s", layout.describe(), self.directory)
        self.index = self.delta = None
        index = new_faiss_index(layout, self.cfg, self.manifest.dim)
        if not index.is_trained:
            index.train(np.ascontiguousarray(training_sample, dtype=np.float32))
        del training_sample  # the caller passes it without keeping it: not held through the build
        m = self.manifest
        m.lists_file = m.delta_file = None
        if layout.on_disk:
            self.index, self.delta, max_id = self._build_on_disk(index, chunks, shard_size or 1_000_000)
        else:
            max_id = 0
            for ids, vectors in chunks():
                index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                   np.ascontiguousarray(ids, np.int64))
                max_id = max(max_id, int(ids.max()))
            self.index = index
        m.index_type, m.nlist, m.opq, m.on_disk = layout.index_type, layout.nlist, layout.opq, layout.on_disk
        m.layout_source, m.nlist_auto = source, nlist_auto
        m.nprobe = None if layout.index_type == FLAT else min(m.nprobe or self.cfg.nprobe, layout.nlist)
        m.ntotal = self.ntotal
        m.max_vector_id = max_id
        self._apply_nprobe()

    def _build_on_disk(self, trained: faiss.Index, chunks: VectorChunks,
                       shard_size: int) -> tuple[faiss.Index, faiss.Index, int]:
        """Shards of at most shard_size vectors, merged into one lists file; returns (lists index, an
        empty delta, largest id). The new files are named in the manifest only by ``save``."""
        prefix = uuid.uuid4().hex[:12]
        try:
            shards, max_id = ondisk.build_shards(trained, chunks(), shard_size, self.directory, prefix)
            base = self._write_lists(trained, lambda lists: ondisk.merge_shard_files(trained, shards, lists), prefix)
        finally:
            ondisk.remove_quietly(self.directory.glob(f".{prefix}-shard*.tmp"), self.directory)
        return base, trained, max_id

    def _write_lists(self, trained: faiss.Index, merge: Callable[[Path], faiss.Index], prefix: str) -> faiss.Index:
        """merge(lists path) -> the merged index; written beside its lists file, read back mapped read-only."""
        lists_name, index_name = f"lists-{prefix}.ivfdata", f"index-{prefix}.faiss"
        merged = merge(self.directory / lists_name)
        with ondisk.stdout_to_stderr():
            ondisk.write_index_file(merged, self.directory / index_name)
        del merged
        fsync_dir(self.directory)
        self.manifest.index_file, self.manifest.lists_file = index_name, lists_name
        return ondisk.read_on_disk(self.directory / index_name)

    def compact(self) -> None:
        """Merge the delta into a new lists file (no retraining; the old files stay live until ``save``)."""
        if self.delta is None:
            return
        logger.info("compacting %s: %d + %d vectors into a new lists file", self.directory.name,
                    self.index.ntotal, self.delta.ntotal)
        empty = ondisk.empty_copy(self.delta)
        sources = [faiss.extract_index_ivf(self.index).invlists, faiss.extract_index_ivf(self.delta).invlists]
        prefix = uuid.uuid4().hex[:12]
        self.index = self._write_lists(empty, lambda lists: ondisk.merge_into_file(empty, sources, lists), prefix)
        self.delta = empty
        self.manifest.delta_file = None
        self._apply_nprobe()

    def set_nprobe(self, nprobe: int) -> None:
        self.manifest.nprobe = nprobe
        self._apply_nprobe()

    def save(self) -> None:
        """Atomic: new files, fsync, then replace the manifest (the commit point), then drop files no
        manifest names. An on-disk layout writes only its delta (its lists file is never rewritten)."""
        logger.debug("saving %d vectors to %s", self.ntotal, self.directory)
        if self.wants_compaction():  # bounds the delta (and what every save rewrites) during a long ingest
            self.compact()
        before = dataclasses.replace(self.manifest)
        if self.delta is not None:
            self.manifest.delta_file = self._write_new("delta", self.delta)
        else:
            self.manifest.index_file = self._write_new("index", self.index)
        try:
            self.manifest.write_atomic(self.directory)
        except BaseException:
            if not self._committed():
                for name in self.manifest.files() - before.files():
                    (self.directory / name).unlink(missing_ok=True)
                self.manifest = before
            raise
        self.remove_orphans()

    def _committed(self) -> bool:
        """Whether the manifest on disk already names our files (the failure came after the rename)."""
        try:
            on_disk = Manifest.read(self.directory)
        except Exception:
            return False
        return on_disk is not None and on_disk.files() == self.manifest.files()

    def _write_new(self, kind: str, index: faiss.Index) -> str:
        name = f"{kind}-{uuid.uuid4().hex[:12]}.faiss"
        tmp = self.directory / f".{name}.tmp"
        faiss.write_index(index, str(tmp))
        fsync_path(tmp)
        os.replace(tmp, self.directory / name)
        fsync_dir(self.directory)
        return name

    def remove_orphans(self) -> None:
        """Index, lists and delta files no manifest points to (left by a crash mid-save, or replaced)."""
        keep = self.manifest.files()
        for path in self.directory.iterdir():
            stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
            stale = path.name.startswith(("index-", "lists-", "delta-")) and path.name not in keep
            if stale_tmp or stale:
                path.unlink(missing_ok=True)
