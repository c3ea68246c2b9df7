import numpy as np

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.storage.index.tune import exact_neighbours, recall_at_k
from tests.conftest import make_config
from tests.storage.index.test_store import clustered


def test_streamed_exact_neighbours_match_brute_force():
    data = clustered(3000)
    ids = np.arange(3000) * 7 + 1
    queries = data[:50]
    truth = exact_neighbours(queries, lambda: [(ids[i:i + 700], data[i:i + 700]) for i in range(0, 3000, 700)], 10)
    brute = ids[np.argsort(-(queries @ data.T), axis=1)[:, :10]]
    assert recall_at_k(truth, brute) == 1.0



def test_tune_on_a_populated_workspace(tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    from synthetic import embedding_like, populate
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18"},
                      index={"nlist": 64, "min_points_per_list": 39, "nprobe": 1})
    ws = Workspace(cfg)
    populate(ws, embedding_like(6000, dim=ws.encoder.identity.dim, latent=32, clusters=30))
    index = ws.rebuild_index()
    assert index.manifest.index_type == "ivf_flat" and index.manifest.nlist == 64
    result = ws.tune_index(0.95, queries=200)
    assert result.nprobe is not None and result.recall >= 0.95
    recalls = [row["recall"] for row in result.table]
    assert recalls == sorted(recalls) and (len(recalls) == 1 or recalls[-2] < 0.95)
    reopened = Workspace(cfg).searchable_index()
    assert reopened.manifest.nprobe == result.nprobe
