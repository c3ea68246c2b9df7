"""Synthetic vectors shaped like real embeddings, and a workspace that holds them (for benchmarks)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.storage.catalog.models import Embedding, Image, Study


def embedding_like(n: int, dim: int = 2048, latent: int = 64, clusters: int = 50, seed: int = 0,
                   chunk: int = 20_000) -> np.ndarray:
    """Clustered low-rank structure with a decaying spectrum plus isotropic noise, unit length, float32.

    Real encoder outputs are like this (a few dozen directions carry most variance); isotropic Gaussian
    vectors would make every ANN method look worse and every clustering look meaningless.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, latent)) * np.linspace(2.0, 0.2, latent)
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = centres[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, latent)) * np.linspace(1, 0.3, latent)
        x = z.astype(np.float32) @ basis + 0.02 * rng.standard_normal((m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


class EmbeddingStream:
    """embedding_like's distribution as a stream: one world (centres, basis) from ``seed``, any row range
    made on demand and always the same (its noise is seeded by the range's start), so that a 10M corpus
    never has to be in memory and exact neighbours can be computed by streaming it again. Queries drawn
    with another ``stream`` number come from the same world but are not in the corpus."""

    def __init__(self, dim: int, latent: int = 64, clusters: int = 200, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.latent, self.clusters, self.seed = dim, latent, clusters, seed
        self.centres = rng.standard_normal((clusters, latent)) * np.linspace(2.0, 0.2, latent)
        self.basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)

    BLOCK = 10_000  # rows are made in blocks, each seeded by its number: any range, same rows

    def _block(self, number: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, number])
        m = self.BLOCK
        z = (self.centres[rng.integers(0, self.clusters, m)]
             + 0.6 * rng.standard_normal((m, self.latent)) * np.linspace(1, 0.3, self.latent))
        x = z.astype(np.float32) @ self.basis + 0.02 * rng.standard_normal((m, self.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def rows(self, start: int, stop: int, stream: int = 0) -> np.ndarray:
        first, last = start // self.BLOCK, (stop - 1) // self.BLOCK
        blocks = [self._block(b, stream) for b in range(first, last + 1)]
        joined = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return joined[start - first * self.BLOCK:stop - first * self.BLOCK]

    def chunks(self, n: int, chunk: int = 50_000):
        """(ids, vectors) of rows 0..n-1 as populate_world stores them (id = row + 1)."""
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            yield np.arange(start + 1, stop + 1, dtype=np.int64), self.rows(start, stop)


def populate_world(ws: Workspace, n: int, stream: EmbeddingStream, batch: int = 10_000,
                   on_batch=None) -> float:
    """Images, studies (two images each) and embeddings for rows 0..n-1 of ``stream``, a batch at a time
    (memory: one batch). Returns seconds."""
    started = time.perf_counter()
    mv_id = ws.model_version_id()
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        vectors = stream.rows(start, stop)
        with ws.db.session() as s:
            s.execute(insert(Study), [{"id": j + 1, "study_key": f"SYN{j:08d}", "key_source": "accession",
                                       "accession_number": f"SYN{j:08d}", "patient_id": f"P{j:08d}"}
                                      for j in range(start // 2, (stop + 1) // 2)])
            s.execute(insert(Image), [{"id": i + 1, "sop_instance_uid": f"2.25.{i}", "study_id": i // 2 + 1,
                                       "patient_id": f"P{i // 2:08d}", "laterality": "LR"[i % 2], "view": "MLO",
                                       "path": f"/synthetic/{i}.dcm", "sha256": "0" * 64, "rows": 1, "columns": 1,
                                       "number_of_frames": 1, "frame_index": 0} for i in range(start, stop)])
            s.execute(insert(Embedding), [{"id": i + 1, "image_id": i + 1, "model_version_id": mv_id,
                                           "vector": vectors[i - start].tobytes()} for i in range(start, stop)])
        if on_batch:
            on_batch(stop)
    return time.perf_counter() - started


def populate(ws: Workspace, vectors: np.ndarray, batch: int = 5_000) -> float:
    """Insert images and embeddings rows for these vectors (Core bulk inserts). Returns seconds."""
    return populate_stream(ws, len(vectors), lambda start, stop: vectors[start:stop], batch)


def populate_stream(ws: Workspace, n: int, vectors_for, batch: int = 5_000) -> float:
    """Like populate, with vectors made a batch at a time (never all in memory)."""
    started = time.perf_counter()
    mv_id = ws.model_version_id()
    with ws.db.session() as s:
        s.execute(insert(Study), [{"id": i + 1, "study_key": f"SYN{i:07d}", "key_source": "accession",
                                   "accession_number": f"SYN{i:07d}", "patient_id": f"P{i:07d}"}
                                  for i in range(n // 2 + 1)])
    for start in range(0, n, batch):
        rows = range(start, min(n, start + batch))
        vectors = vectors_for(start, min(n, start + batch))
        with ws.db.session() as s:
            s.execute(insert(Image), [{"id": i + 1, "sop_instance_uid": f"2.25.{i}", "study_id": i // 2 + 1,
                                       "patient_id": f"P{i // 2:07d}", "laterality": "LR"[i % 2], "view": "MLO",
                                       "path": f"/synthetic/{i}.dcm", "sha256": "0" * 64, "rows": 1, "columns": 1,
                                       "number_of_frames": 1, "frame_index": 0} for i in rows])
            s.execute(insert(Embedding), [{"image_id": i + 1, "model_version_id": mv_id,
                                           "vector": vectors[i - start].tobytes()} for i in rows])
    return time.perf_counter() - started


def synthetic_workspace(home: Path, n: int, seed: int = 0, encoder: str = "mammo-simclr") -> Workspace:
    from mammo_retrieval.core.config import load_config
    ws = Workspace(load_config(env={"MRETRIEVE_HOME": str(home)}).replace("encoder", name=encoder))
    with ws.db.session() as s:
        count = repo.counts(s)["embeddings"]
    if count != n:
        if count:
            raise SystemExit(f"{home} holds {count} vectors, not {n}: use an empty folder")
        populate(ws, embedding_like(n, ws.encoder.identity.dim, seed=seed))
    return ws
