import dataclasses
import json

import faiss
import numpy as np
import pytest

from mammo_retrieval.core.config import load_config
from mammo_retrieval.core.errors import IndexCorruptError, IndexMismatchError
from mammo_retrieval.core.identity import ModelIdentity
from mammo_retrieval.storage.index import VectorIndex, plan_layout
from mammo_retrieval.storage.index.manifest import Manifest
from mammo_retrieval.storage.index.store import Layout, auto_nlist

DIM = 64
IDENTITY = ModelIdentity("resnet50", "a" * 64, "p" * 16, DIM, False, "/w.pt")
CFG = load_config(env={}).index


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 centres, shaped like real embeddings (clustered, not uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, DIM))
    x = centres[rng.integers(0, 50, n)] + 0.4 * rng.standard_normal((n, DIM))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_layout_policy():
    assert auto_nlist(10_000) == 512 and auto_nlist(1_000_000) == 4096 and auto_nlist(10) == 16
    assert plan_layout(100, CFG) == Layout("flat", None)
    assert plan_layout(39 * 512 - 1, CFG).index_type == "flat"
    assert plan_layout(1_000_000, CFG) == Layout("ivf_flat", 4096)
    fixed = CFG.__class__(**{**CFG.__dict__, "nlist": 64, "type": "ivf_sq8"})
    assert plan_layout(39 * 64, fixed) == Layout("ivf_sq8", 64)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_sq8", "ivf_pq"])
def test_ivf_recall_against_exact_search(tmp_path, kind):
    data, queries = clustered(20_000), clustered(200, seed=1)
    ids = np.arange(1, len(data) + 1) * 3  # database keys, not positions
    cfg = CFG.__class__(**{**CFG.__dict__, "type": kind, "nlist": 128, "nprobe": 16, "pq_m": 16})
    exact = VectorIndex.open_or_create(tmp_path / "exact", IDENTITY, cfg)
    exact.add(ids, data)
    ivf = VectorIndex.open_or_create(tmp_path / "ivf", IDENTITY, cfg)
    ivf.rebuild(plan_layout(len(data), cfg), data[::2], lambda: [(ids, data)])
    assert ivf.layout == Layout(kind, 128)
    _, truth = exact.search(queries, 10)
    _, found = ivf.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
    assert recall >= {"ivf_flat": 0.95, "ivf_sq8": 0.93, "ivf_pq": 0.5}[kind]
    assert set(found.ravel()) <= set(ids)


def test_save_and_reopen_round_trip(tmp_path):
    index = VectorIndex.open_or_create(tmp_path, IDENTITY, CFG)
    data = clustered(100)
    index.add(np.arange(10, 110), data)
    index.save()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["ntotal"] == 100 and manifest["max_vector_id"] == 109 and manifest["dim"] == DIM
    assert manifest["metric"] == "inner_product" and manifest["encoder"] == "resnet50"
    again = VectorIndex.open_or_create(tmp_path, IDENTITY, CFG)
    scores, found = again.search(data[:1], 1)
    assert found[0, 0] == 10 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_mismatched_query_is_refused_with_what_differs(tmp_path):
    VectorIndex.open_or_create(tmp_path, IDENTITY, CFG).save()
    other = ModelIdentity("resnet50", "b" * 64, "q" * 16, DIM, False, None)
    with pytest.raises(IndexMismatchError) as info:
        VectorIndex.open_or_create(tmp_path, other, CFG)
    assert "weights sha256" in str(info.value) and "preprocessing" in str(info.value)
    assert "encoder:" not in str(info.value)


def test_crash_during_save_leaves_the_previous_index(tmp_path, monkeypatch):
    index = VectorIndex.open_or_create(tmp_path, IDENTITY, CFG)
    index.add(np.arange(1, 51), clustered(50))
    index.save()
    index.add(np.arange(51, 101), clustered(50, seed=2))

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(Manifest, "write_atomic", crash)
    with pytest.raises(OSError):
        index.save()
    monkeypatch.undo()
    reopened = VectorIndex.open_or_create(tmp_path, IDENTITY, CFG)
    assert reopened.ntotal == 50
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("index-")]) == 1


def test_crash_while_writing_the_index_file(tmp_path, monkeypatch):
    index = VectorIndex.open_or_create(tmp_path, IDENTITY, CFG)
    index.add(np.arange(1, 11), clustered(10))
    index.save()
    monkeypatch.setattr(faiss, "write_index", lambda idx, path: open(path, "wb").write(b"half") and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        index.save()
    monkeypatch.undo()
    assert VectorIndex.open_or_create(tmp_path, IDENTITY, CFG).ntotal == 10


def test_corrupt_index_file_is_reported(tmp_path):
    index = VectorIndex.open_or_create(tmp_path, IDENTITY, CFG)
    index.add(np.arange(1, 11), clustered(10))
    index.save()
    (tmp_path / index.manifest.index_file).write_bytes(b"garbage")
    with pytest.raises(IndexCorruptError, match="cannot read index") as info:
        VectorIndex.open_or_create(tmp_path, IDENTITY, CFG)
    assert [r.action for r in info.value.remedies] == ["index_rebuild"]


def test_a_pq_m_that_does_not_divide_the_dimension_is_a_configuration_error():
    from mammo_retrieval.core.errors import ConfigError
    from mammo_retrieval.storage.index.store import Layout, new_faiss_index
    with pytest.raises(ConfigError, match="pq_m=7 does not divide dim 512"):
        new_faiss_index(Layout("ivf_pq", 16), dataclasses.replace(CFG, pq_m=7), 512)
