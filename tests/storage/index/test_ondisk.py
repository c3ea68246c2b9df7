"""The on-disk OPQ + IVF-PQ layout: built shard by shard, merged, memory-mapped, grown through a delta and
compacted, each step against exact search and against a crash."""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from mammo_retrieval.core.errors import ConfigError
from mammo_retrieval.storage.index import VectorIndex
from mammo_retrieval.storage.index.lifecycle import LayoutRequest
from mammo_retrieval.storage.index.manifest import Manifest
from mammo_retrieval.storage.index.store import Layout
from tests.storage.index.test_store import CFG, IDENTITY, clustered

PQ_CFG = dataclasses.replace(CFG, type="ivf_pq", pq_m=16, nprobe=16, rerank=10, opq_iterations=8)
LAYOUT = Layout("ivf_pq", 64, opq=True, on_disk=True)


class Corpus:
    """Vectors with database-like ids (not positions), and their exact copy for re-ranking."""

    def __init__(self, vectors: np.ndarray, first_id: int = 7) -> None:
        self.vectors = vectors
        self.ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64) * 2
        self.row = {int(i): r for r, i in enumerate(self.ids)}

    def chunks(self, size: int = 3000):
        return lambda: ((self.ids[s:s + size], self.vectors[s:s + size]) for s in range(0, len(self.ids), size))

    def exact(self, wanted: np.ndarray):
        known = np.array([i for i in wanted if int(i) in self.row], dtype=np.int64)
        return known, self.vectors[[self.row[int(i)] for i in known]].reshape(len(known), -1)

    def extend(self, vectors: np.ndarray) -> np.ndarray:
        new_ids = np.arange(len(self.ids), len(self.ids) + len(vectors), dtype=np.int64) * 2 + 10_001
        self.vectors = np.concatenate([self.vectors, vectors])
        self.ids = np.concatenate([self.ids, new_ids])
        self.row = {int(i): r for r, i in enumerate(self.ids)}
        return new_ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def exact_search(corpus: Corpus, queries: np.ndarray, k: int = 10) -> np.ndarray:
    return corpus.ids[np.argsort(-(queries @ corpus.vectors.T), axis=1)[:, :k]]


@pytest.fixture(scope="module")
def template(tmp_path_factory, corpus) -> Path:
    """One build in 4 shards (training OPQ takes most of a minute), copied by each test."""
    directory = tmp_path_factory.mktemp("ondisk") / "index"
    index = VectorIndex.open_or_create(directory, IDENTITY, PQ_CFG)
    index.rebuild(LAYOUT, corpus.vectors[::2], corpus.chunks(), shard_size=6000)
    index.save()
    return directory


@pytest.fixture
def built(template):
    def copy(directory: Path) -> VectorIndex:
        shutil.copytree(template, directory)
        return VectorIndex.open_or_create(directory, IDENTITY, PQ_CFG)
    return copy


def coarse_centroids(index: VectorIndex) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index.delta)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus():
    return Corpus(clustered(20_000))


def test_built_in_shards_memory_mapped_and_reranked_to_exact(template, corpus):
    queries = clustered(200, seed=1)
    tmp_path = template
    names = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert names == ["delta", "index", "lists", "manifest.json"]  # the 4 shard files are gone
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["on_disk"] and manifest["opq"] and manifest["ntotal"] == 20_000
    assert manifest["format_version"] == 2

    reopened = VectorIndex.open_or_create(tmp_path, IDENTITY, PQ_CFG)
    lists = faiss.extract_index_ivf(reopened.index).invlists
    assert reopened.ntotal == 20_000 and reopened.list_sizes().sum() == 20_000
    assert "OnDisk" in type(faiss.downcast_InvertedLists(lists)).__name__
    truth = exact_search(corpus, queries)
    codes_only = recall(reopened.search(queries, 10)[1], truth)
    reopened.exact_vectors = corpus.exact
    scores, found = reopened.search(queries, 10)
    assert recall(found, truth) >= 0.95 > codes_only
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    same = found[:, 0] == truth[:, 0]
    assert same.mean() >= 0.9  # and where the first hit is the exact one, so is its score (re-ranked)
    np.testing.assert_allclose(scores[same, 0], np.max(queries @ corpus.vectors.T, axis=1)[same], atol=1e-5)
    again = VectorIndex.open_or_create(tmp_path, IDENTITY, PQ_CFG)
    again.exact_vectors = corpus.exact
    assert np.array_equal(again.search(queries, 10)[1], found)  # deterministic across openings


def test_added_vectors_go_to_a_delta_without_retraining_then_compact(tmp_path, built, corpus):
    tmp_path = tmp_path / 'index'
    index = built(tmp_path)
    lists_file = tmp_path / index.manifest.lists_file
    before = sha(lists_file)
    centroids = coarse_centroids(index)
    grown = Corpus(corpus.vectors.copy())
    fresh = clustered(300, seed=5)
    new_ids = grown.extend(fresh)
    index.add(new_ids, fresh)
    assert index.delta.ntotal == 300 and index.ntotal == 20_300
    index.exact_vectors = grown.exact
    assert np.array_equal(index.search(fresh[:20], 1)[1][:, 0], new_ids[:20])  # a copy is found first
    index.save()
    assert sha(lists_file) == before  # the lists file is never written again

    again = VectorIndex.open_or_create(tmp_path, IDENTITY, PQ_CFG)
    again.exact_vectors = grown.exact
    assert again.ntotal == 20_300
    queries = clustered(100, seed=9)
    answer = again.search(queries, 10)[1]
    again.compact()
    again.save()
    assert again.delta.ntotal == 0 and again.index.ntotal == 20_300
    assert not lists_file.exists()  # replaced by the compacted one
    assert np.array_equal(again.search(queries, 10)[1], answer)
    assert np.array_equal(coarse_centroids(again), centroids)  # no retraining
    assert recall(answer, exact_search(grown, queries)) >= 0.9


def test_a_crash_before_the_manifest_keeps_the_previous_files(tmp_path, built, corpus, monkeypatch):
    tmp_path = tmp_path / 'index'
    index = built(tmp_path)
    index.add(np.array([1, 3, 5]), clustered(3, seed=3))
    index.save()
    committed = Manifest.read(tmp_path).files()
    index.compact()
    compacted = {index.manifest.index_file, index.manifest.lists_file}
    assert not compacted & committed
    monkeypatch.setattr(Manifest, "write_atomic", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        index.save()
    monkeypatch.undo()
    reopened = VectorIndex.open_or_create(tmp_path, IDENTITY, PQ_CFG)
    assert reopened.ntotal == 20_003 and reopened.delta.ntotal == 3
    assert Manifest.read(tmp_path).files() == committed
    # the failed save removed its new delta; the compaction's two files wait for the next writer
    assert {p.name for p in tmp_path.iterdir()} == committed | compacted | {"manifest.json"}
    reopened.save()  # the next writer's save removes what the crash left behind
    assert {p.name for p in tmp_path.iterdir()} == Manifest.read(tmp_path).files() | {"manifest.json"}


def test_a_moved_folder_still_finds_its_lists_file(tmp_path, built, corpus):
    built(tmp_path / "before")
    os.rename(tmp_path / "before", tmp_path / "after")
    moved = VectorIndex.open_or_create(tmp_path / "after", IDENTITY, PQ_CFG)
    assert moved.ntotal == 20_000
    assert moved.search(corpus.vectors[:1], 1)[1][0, 0] >= 0


def test_a_missing_lists_file_is_reported_as_corrupt(tmp_path, built, corpus):
    from mammo_retrieval.core.errors import IndexCorruptError
    tmp_path = tmp_path / 'index'
    index = built(tmp_path)
    (tmp_path / index.manifest.lists_file).unlink()
    with pytest.raises(IndexCorruptError, match="lists file"):
        VectorIndex.open_or_create(tmp_path, IDENTITY, PQ_CFG)


def test_layout_requests():
    request = LayoutRequest("ivf_pq", 64, True, True, 4)
    assert request.pins and request.layout(10_000, PQ_CFG) == LAYOUT and request.shard_size(10_000) == 2500
    assert not LayoutRequest().pins
    with pytest.raises(ConfigError, match="needs at least 2496 vectors"):
        request.layout(1000, PQ_CFG)
    with pytest.raises(ConfigError, match="OPQ .* does not apply to ivf_flat"):
        Layout("ivf_flat", 16, opq=True)
    with pytest.raises(ConfigError, match="does not apply to ivf_sq8"):
        LayoutRequest("ivf_sq8", 16, True).layout(0, PQ_CFG)    # before the count check: the request is wrong


def test_a_small_pq_layout_asks_for_the_product_quantisers_256_vectors():
    """39 a list is not enough for PQ: each codebook has 256 centroids, and FAISS cannot train one on fewer
    (it raised from C++). Refused with the rule when pinned, exact when planned; 256 vectors train it."""
    from mammo_retrieval.storage.index.store import PQ_CENTROIDS, new_faiss_index, plan_layout
    with pytest.raises(ConfigError, match=r"needs at least 256 vectors to train \(39 a list, and 256 for the "
                                          r"product quantiser\); the database holds 200"):
        LayoutRequest("ivf_pq", 4).layout(200, PQ_CFG)
    assert LayoutRequest("ivf_flat", 4).layout(200, PQ_CFG).index_type == "ivf_flat"  # 156 are enough there
    small = dataclasses.replace(PQ_CFG, nlist=4, opq=False)
    assert plan_layout(200, small).index_type == "flat" and plan_layout(PQ_CENTROIDS, small).index_type == "ivf_pq"
    index = new_faiss_index(Layout("ivf_pq", 4), small, 64)
    index.train(clustered(PQ_CENTROIDS))
    assert index.is_trained


def test_rebuild_pins_a_layout_that_ingest_keeps(tmp_path, database_url):
    """From the catalog (SQLite and PostgreSQL) to an on-disk index, re-ranked from the catalog."""
    from mammo_retrieval.app.workspace import Workspace
    from tests.conftest import make_config
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    from synthetic import embedding_like, populate
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18"}, paths={"database_url": database_url},
                      index={"pq_m": 16, "nprobe": 8, "opq_iterations": 4})
    ws = Workspace(cfg)
    populate(ws, embedding_like(4000, dim=ws.encoder.identity.dim, latent=32, clusters=30))
    index = ws.rebuild_index(request=LayoutRequest("ivf_pq", 32, True, True, 3))
    m = index.manifest
    assert (m.index_type, m.nlist, m.opq, m.on_disk, m.layout_source) == ("ivf_pq", 32, True, True, "rebuild")
    from mammo_retrieval.app.status import collect_status
    (model,) = collect_status(Workspace(cfg))["model_versions"]
    assert "index_error" not in model and model["index"]["on_disk"] and model["index"]["ntotal"] == 4000
    served = Workspace(cfg).searchable_index()
    assert served.exact_vectors is not None and served.wants_rebuild(served.ntotal) is None
    assert Workspace(cfg).tune_index(0.9, queries=100).recall >= 0.9  # re-ranked from the catalog
    back = ws.rebuild_index()  # no layout options: the config's policy again
    assert back.manifest.layout_source == "config" and not back.manifest.on_disk


def test_commands_keep_stdout_clean_with_an_on_disk_index(tmp_path):
    """faiss printf()s to stdout when it maps lists files; a JSON answer must still parse."""
    from mammo_retrieval.app.workspace import Workspace
    from tests.conftest import make_config
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    from synthetic import embedding_like, populate
    home = tmp_path / "state"
    home.mkdir()
    (home / "config.yaml").write_text("index:\n  pq_m: 16\n")
    ws = Workspace(make_config(home, index={"pq_m": 16}))
    populate(ws, embedding_like(3000, dim=ws.encoder.identity.dim, latent=32, clusters=30))
    env = {**os.environ, "MRETRIEVE_HOME": str(home)}
    env["MRETRIEVE_CONFIG"] = str(home / "config.yaml")
    mretrieve = str(Path(sys.executable).parent / "mretrieve")
    build = subprocess.run([mretrieve, "index", "rebuild", "--type", "ivf_pq", "--nlist", "16", "--no-opq",
                            "--on-disk", "--shards", "2", "--no-progress"], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert build.stdout.startswith("rebuilt ") and "lists on disk" in build.stdout
    # kill -9 a second build part-way (whatever it was doing): the first one's index still answers
    rebuild = [mretrieve, "index", "rebuild", "--type", "ivf_pq", "--nlist", "32", "--on-disk", "--shards", "3",
               "--no-progress"]
    victim = subprocess.Popen(rebuild, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4.0)
    victim.kill()
    victim.wait()
    query = subprocess.run([mretrieve, "query", "--accession", "SYN0000001", "--format", "json", "-k", "5"],
                           env=env, capture_output=True, text=True)
    assert query.returncode == 0, query.stderr
    answer = json.loads(query.stdout)  # one result per image of the study
    assert len(answer) == 2 and all(len(result["hits"]) == 5 for result in answer)
    assert "IO_FLAG" in query.stderr  # faiss did print: to stderr
    again = subprocess.run(rebuild, env=env, capture_output=True, text=True)  # the rerun completes and cleans up
    assert again.returncode == 0 and "nlist 32" in again.stdout, again.stderr
    (folder,) = [d for d in (home / "indexes").iterdir() if d.is_dir() and d.name != "onnx"]
    assert {p.name for p in folder.iterdir()} == Manifest.read(folder).files() | {"manifest.json"}


def test_a_build_that_dies_midway_leaves_the_live_index(tmp_path, built, corpus, monkeypatch):
    from mammo_retrieval.storage.index import ondisk
    directory = tmp_path / "index"
    index = built(directory)
    live = Manifest.read(directory).files()

    def die_after_writing_half(trained, shards, lists_path):
        lists_path.write_bytes(b"\0" * 1000)
        raise MemoryError("killed")
    monkeypatch.setattr(ondisk, "merge_shard_files", die_after_writing_half)
    with pytest.raises(MemoryError):
        index.rebuild(LAYOUT, corpus.vectors[::2], corpus.chunks(), shard_size=6000)
    assert not [p for p in directory.iterdir() if "shard" in p.name]  # the shards are removed on the way out
    monkeypatch.undo()
    survivor = VectorIndex.open_or_create(directory, IDENTITY, PQ_CFG)
    assert survivor.ntotal == 20_000 and Manifest.read(directory).files() == live
    survivor.save()  # a writer's next save clears the half-written lists file
    assert {p.name for p in directory.iterdir()} == Manifest.read(directory).files() | {"manifest.json"}


def test_a_grown_delta_is_compacted_by_the_lifecycle(tmp_path, built, monkeypatch):
    from mammo_retrieval.storage.index import store
    from mammo_retrieval.storage.index.lifecycle import IndexLifecycle
    index = built(tmp_path / "index")
    index.cfg = dataclasses.replace(PQ_CFG, nlist=64, opq=True, on_disk=True)  # the layout the config asks for
    index.add(np.arange(1, 2001, 2), clustered(1000, seed=4))
    lifecycle = IndexLifecycle(db=None, index_dir=tmp_path, config=index.cfg)
    assert not index.wants_compaction() and not lifecycle.maybe_relayout(index, model_version_id=1)
    monkeypatch.setattr(store, "COMPACT_MIN", 500)  # 1000 >= 5% of 20,000 with the floor lowered
    monkeypatch.setattr(store, "COMPACT_FRACTION", 0.05)
    assert index.wants_compaction() and lifecycle.maybe_relayout(index, model_version_id=1)
    assert index.delta.ntotal == 0 and index.index.ntotal == 21_000 and index.layout == LAYOUT


def test_a_reader_racing_a_delta_save_reads_the_new_manifest(tmp_path, built, monkeypatch):
    """A save that only replaces the delta removes the old delta file: a reader holding the old manifest
    must read the new one, not report a corrupt index."""
    directory = tmp_path / "index"
    writer = built(directory)
    stale = Manifest.read(directory)
    writer.add(np.array([1, 3]), clustered(2, seed=8))
    writer.save()
    assert stale.index_file == writer.manifest.index_file and stale.delta_file != writer.manifest.delta_file
    reads = iter([stale])
    real_read = Manifest.read.__func__
    monkeypatch.setattr(Manifest, "read", classmethod(lambda cls, d: next(reads, None) or real_read(cls, d)))
    assert VectorIndex.open_or_create(directory, IDENTITY, PQ_CFG).ntotal == 20_002


def test_in_memory_layouts_keep_the_manifest_older_versions_read(tmp_path):
    index = VectorIndex.open_or_create(tmp_path, IDENTITY, CFG)
    index.add(np.arange(1, 11), clustered(10))
    index.save()
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format_version"] == 1 and not {"on_disk", "delta_file", "layout_source"} & set(data)


def test_the_stdout_switch_survives_threads():
    import threading
    import time
    from mammo_retrieval.storage.index.ondisk import stdout_to_stderr
    original = os.fstat(1)

    def switch():
        with stdout_to_stderr():
            time.sleep(0.05)
    threads = [threading.Thread(target=switch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (original.st_dev, original.st_ino)


def test_reranking_is_bounded_and_batched(tmp_path, built, corpus):
    index = built(tmp_path / "index")
    asked = []

    def exact(ids):
        asked.append(len(ids))
        return corpus.exact(ids)
    index.exact_vectors = exact
    scores, ids = index.search(clustered(1, seed=2), 5000)  # a filtered query widening its fetch
    found = ids[0] >= 0  # (nprobe 16 of 64 lists reaches fewer than 5000 vectors)
    assert 4096 < asked[0] <= 5000 and found.sum() == asked[0] and not found[asked[0]:].any()
    assert np.all(np.diff(scores[0][found]) <= 1e-6)
    index.search(clustered(1, seed=2), 1000)
    assert 1000 < asked[-1] <= 4096  # k x rerank = 10,000 capped at RERANK_MAX
