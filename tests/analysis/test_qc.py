import numpy as np
import pytest

from mammo_retrieval.analysis.content_checks import looks_blank, looks_inverted
from mammo_retrieval.analysis.neighbours import knn
from mammo_retrieval.analysis.qc import outlier_scores, run_qc, write_outputs


def clustered(n, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, dim))[rng.integers(0, 8, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("method", ["knn", "lof", "iforest"])
def test_a_planted_outlier_ranks_first(method):
    x = clustered(300)
    x[:, -1] = 0  # the clusters leave the last axis empty ...
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    far = np.zeros((1, 32), np.float32)
    far[0, -1] = 1  # ... and the outlier lies along it, orthogonal to everything else
    x = np.vstack([x, far])
    scores = outlier_scores(x, knn(x, 11), method, 10)
    assert int(np.argmax(scores)) == 300


def embedding_like(n, dim=256, latent=24, seed=0):
    """Low-rank structure plus a little isotropic noise: a decaying spectrum, as real embeddings have."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((8, latent))[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, latent))
    x = z @ rng.standard_normal((latent, dim)) + 0.05 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_neighbours_agree_with_exact():
    x = embedding_like(3000)
    exact = knn(x, 10)
    approx = knn(x, 10, exact_limit=1000, pca_dim=64, nprobe=16)
    assert exact.method.startswith("exact") and approx.method.startswith("approximate")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.positions, approx.positions)])
    assert recall >= 0.8
    assert not np.any(exact.positions == np.arange(3000)[:, None])  # never its own neighbour


def test_content_checks_are_quiet_on_real_mammograms(mias_workspace):
    ws = mias_workspace
    from mammo_retrieval.analysis.vectors import load_embeddings
    meta = load_embeddings(ws.corpus()).meta
    real = meta[~meta.path.str.contains("/planted/")]
    images = [ws.cached_image(s) for s in real.sop_instance_uid]
    assert len(images) == 200
    assert not any(looks_inverted(im) or looks_blank(im) for im in images)


def test_planted_outliers_rank_at_the_top(mias_workspace, tmp_path):
    ws = mias_workspace
    result = run_qc(ws.corpus(), method="knn")
    ranks = {name: int(result.scores.loc[result.scores.path == str(p), "rank"].iloc[0])
             for name, p in ws.planted.items()}
    assert max(ranks["ct"], ranks["blank"], ranks["inverted"]) <= 5, ranks  # of 204
    flags = dict(zip(result.scores.path, result.scores["flags"]))
    assert "looks_inverted" in flags[str(ws.planted["inverted"])]
    assert "blank_image" in flags[str(ws.planted["blank"])]
    assert sum(bool(f) for f in result.scores["flags"]) == 2  # nothing else flagged
    # the duplicate under a new UID, and only it
    assert len(result.duplicates) == 1
    pair = result.duplicates.iloc[0]
    assert str(ws.planted["duplicate"]) in (pair.path_a, pair.path_b) and pair.similarity >= 0.999

    paths = write_outputs(ws.cached_image, result, tmp_path / "qc", top=10)
    scores = paths["scores"].read_text().splitlines()
    assert scores[0].startswith("SOPInstanceUID,AccessionNumber,path,score,rank") and len(scores) == 205
    html = paths["report"].read_text()
    assert html.count("data:image/png;base64,") >= 10 + 2  # top-10 thumbnails and the duplicate pair
    # a second sweep remembers the first: ranks of the previous run come along
    again = run_qc(ws.corpus(), method="knn")
    assert again.previous_run_id == result.run_id
    assert again.scores.previous_rank.notna().all()
