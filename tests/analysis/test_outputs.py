"""What the analysis outputs say about hostile or missing header values, on a small synthetic archive."""
import csv
import json

import numpy as np
import pandas as pd
import pytest

from mammo_retrieval.analysis.clusters import parse_plots, report_clusters
from mammo_retrieval.analysis.evaluate import evaluate
from mammo_retrieval.analysis.export import export_table
from mammo_retrieval.analysis.labels import LabelsError, label_columns
from mammo_retrieval.analysis.qc import run_qc, write_outputs
from mammo_retrieval.analysis.vectors import EmbeddingTable, load_embeddings
from mammo_retrieval.app.cli._common import format_csv
from mammo_retrieval.core.csv_safety import neutralise, neutralise_frame
from mammo_retrieval.core.errors import ConfigError
from tests.analysis.small import FORMULA, small_workspace


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """8 images: #0 has a formula AccessionNumber, #1 none at all, #2 an empty one; #3 and its copy
    (a near-duplicate pair) carry a formula PatientID."""
    return small_workspace(tmp_path_factory.mktemp("hostile"), overrides={
        0: {"accession": FORMULA}, 1: {"accession": None}, 2: {"accession": ""},
        3: {"patient_id": "@SUM(1+1)*cmd|' /C calc'!A0"}}, duplicate_of=3)


def cells(path):
    with open(path, newline="") as fh:
        return [cell for row in csv.reader(fh) for cell in row]


def assert_no_formula(path):
    starts = [c for c in cells(path) if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and not is_number(c))]
    assert not starts, starts


def is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_neutralise_text_only():
    assert [neutralise(v) for v in ("=1+2", "+1", "-x", "@a", "\tx", "\rx", "ok", "", -1.5, 3, None)] == \
        ["'=1+2", "'+1", "'-x", "'@a", "'\tx", "'\rx", "ok", "", -1.5, 3, None]
    frame = pd.DataFrame({"score": [-0.25, 0.5], "rank": [1, 2], "name": ["=cmd", None]})
    out = neutralise_frame(frame)
    assert out.score.tolist() == [-0.25, 0.5] and out["rank"].tolist() == [1, 2]
    assert out.name.iloc[0] == "'=cmd" and pd.isna(out.name.iloc[1])
    assert frame.name.iloc[0] == "=cmd"  # the caller's frame is left alone


def test_qc_csvs_neutralise_formulas(hostile, tmp_path):
    result = run_qc(hostile.corpus(), k=3)
    assert len(result.duplicates) == 1
    paths = write_outputs(hostile.cached_image, result, tmp_path, top=9)
    scores = pd.read_csv(paths["scores"], dtype=str, keep_default_na=False)
    assert "'" + FORMULA in set(scores.AccessionNumber)
    assert_no_formula(paths["scores"])
    duplicates = pd.read_csv(paths["duplicates"], dtype=str)
    assert duplicates.patient_id_a.iloc[0] == "'@SUM(1+1)*cmd|' /C calc'!A0"
    assert_no_formula(paths["duplicates"])
    # scores stay numbers: a negative one is written as a number, not as text
    result.scores.loc[0, "score"] = -0.5
    write_outputs(hostile.cached_image, result, tmp_path, top=9)
    assert pd.read_csv(paths["scores"]).score.iloc[0] == -0.5


def test_export_csv_neutralises_formulas(hostile, tmp_path):
    paths = export_table(load_embeddings(hostile.corpus()), tmp_path)
    joined = pd.read_csv(paths["joined"], dtype=str, keep_default_na=False)
    assert "'" + FORMULA in set(joined.AccessionNumber)
    assert_no_formula(paths["joined"])


def test_format_csv_neutralises_formulas(tmp_path):
    text = format_csv([{"accession": FORMULA, "score": -0.5, "path": "-x"}], ["accession", "score", "path"])
    path = tmp_path / "q.csv"
    path.write_text(text)
    assert cells(path)[3:] == ["'" + FORMULA, "-0.5", "'-x"]


def test_report_shows_no_nan_for_missing_accessions(hostile, tmp_path):
    result = run_qc(hostile.corpus(), k=3)
    page = write_outputs(hostile.cached_image, result, tmp_path, top=9)["report"].read_text()
    assert "nan" not in page.lower().replace("nan-", "")
    assert page.count("\u2014 · PAT") == 2  # accession absent, accession empty


def test_previous_rank_is_an_integer_and_shown(hostile, tmp_path):
    first = run_qc(hostile.corpus(), method="iforest", k=3)
    paths = write_outputs(hostile.cached_image, first, tmp_path / "first", top=3)
    assert set(pd.read_csv(paths["scores"], dtype=str, keep_default_na=False).previous_rank) <= {""}
    second = run_qc(hostile.corpus(), method="iforest", k=3)
    paths = write_outputs(hostile.cached_image, second, tmp_path / "second", top=3)
    written = pd.read_csv(paths["scores"], dtype=str).previous_rank
    assert all(v.isdigit() for v in written), list(written)  # "4", not "4.0"
    page = paths["report"].read_text()
    for r in second.scores.head(3).itertuples():
        assert f"<b>#{r.rank}</b> score {r.score:.4f} · was #{r.previous_rank}" in page


def test_label_names_are_kept_in_clustering_metrics(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 8)).astype(np.float32)
    labels = np.array(["fatty", "dense", "glandular"] * 10, dtype=object)
    meta = pd.DataFrame({"sop_instance_uid": [str(i) for i in range(30)]})
    report_clusters(EmbeddingTable(x, meta), tmp_path, labels=labels, label_name="tissue", plots=())
    saved = json.loads((tmp_path / "clustering_metrics.json").read_text())
    assert saved["label_column"] == "tissue"
    assert saved["cluster_names"] == {"0": "dense", "1": "fatty", "2": "glandular"}
    assert saved["cluster_sizes_by_name"] == {"dense": 10, "fatty": 10, "glandular": 10}


def test_cluster_count_and_plots_are_checked(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    table = EmbeddingTable(x, pd.DataFrame({"sop_instance_uid": [str(i) for i in range(20)]}))
    for k in (20, 500, 1):
        with pytest.raises(ConfigError, match=f"k={k} clusters of 20 images"):
            report_clusters(table, tmp_path / "k", k=k, plots=())
    assert not (tmp_path / "k").exists()
    with pytest.raises(ConfigError, match="unknown plot.*foo") as info:
        parse_plots("pca,foo")
    assert "pca, tsne, umap" in str(info.value)
    assert parse_plots("none") == () and parse_plots("umap, pca") == ("umap", "pca")


def test_bad_label_column_is_one_config_error():
    labels = pd.DataFrame({"SOPInstanceUID": ["a", "b"], "tissue": ["F", "G"]})
    with pytest.raises(LabelsError, match="nope") as info:
        label_columns(labels, ["nope"], "labels.csv")
    assert isinstance(info.value, ConfigError) and info.value.exit_code == 2 and "tissue" in info.value.hint
    with pytest.raises(LabelsError, match="no categorical label column"):
        label_columns(labels[["SOPInstanceUID"]])


def labels_csv(ws, path):
    meta = load_embeddings(ws.corpus()).meta
    pd.DataFrame({"SOPInstanceUID": meta.sop_instance_uid,
                  "tissue": ["F", "G"] * (len(meta) // 2) + ["F"] * (len(meta) % 2)}).to_csv(path, index=False)
    return path


def test_evaluate_checks_k(hostile, tmp_path):
    labels = labels_csv(hostile, tmp_path / "labels.csv")
    with pytest.raises(ConfigError, match="at least 1"):
        evaluate(hostile.corpus(), str(labels), ks=(0, 5))
    with pytest.raises(ConfigError, match="k=9 is more than the 8 other images each of the 9"):
        evaluate(hostile.corpus(), str(labels), ks=(1, 9))
    with pytest.raises(LabelsError, match="nope"):
        evaluate(hostile.corpus(), str(labels), columns=["nope"])


def test_progress_is_reported(hostile, tmp_path):
    seen = []
    result = run_qc(hostile.corpus(), k=3, on_progress=lambda step, done, total: seen.append((step, done, total)))
    write_outputs(hostile.cached_image, result, tmp_path, top=3, on_progress=lambda *a: seen.append(a))
    steps = list(dict.fromkeys(s for s, _, _ in seen))
    assert steps[:3] == ["loading vectors", "nearest neighbours of 9 images", "knn outlier scores"]
    assert ("header checks on the cached images", 8, 9) in seen and steps[-1].startswith("writing")


def test_a_killed_re_export_never_leaves_rows_beside_another_exports_vectors(hostile, tmp_path, monkeypatch):
    """joined.csv row i must be features.npy row i: a re-export into the same folder that dies while
    writing the vectors leaves the old vectors whole and no joined.csv, not the old rows beside new
    vectors (or torn files); rerun, it writes the three files and nothing else."""
    import mammo_retrieval.analysis.export as export_module
    table = load_embeddings(hostile.corpus())
    first = export_table(table, tmp_path)
    old_vectors = np.load(first["features"])

    def killed(fh, array):
        fh.write(b"\x93NUMPY half")
        raise KeyboardInterrupt("killed while writing the vectors")

    monkeypatch.setattr(export_module.np, "save", killed)
    shifted = EmbeddingTable(table.vectors[::-1].copy(), table.meta.iloc[::-1].reset_index(drop=True))
    with pytest.raises(KeyboardInterrupt):
        export_table(shifted, tmp_path)
    assert not (tmp_path / "joined.csv").exists()
    np.testing.assert_array_equal(np.load(first["features"]), old_vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.parquet", "features.npy"]
    monkeypatch.undo()
    paths = export_table(shifted, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.parquet", "features.npy", "joined.csv"]
    joined = pd.read_csv(paths["joined"])
    np.testing.assert_array_equal(np.load(paths["features"]), shifted.vectors)
    assert list(joined.SOPInstanceUID) == list(shifted.meta.sop_instance_uid)


def test_qc_and_cluster_outputs_are_written_whole(hostile, tmp_path, monkeypatch):
    """A QC or cluster report that dies at its last file leaves the earlier run's file as it was, and no
    temporary file, in the output folder."""
    import mammo_retrieval.core.fileio as fileio
    out = tmp_path / "qc"
    write_outputs(hostile.cached_image, run_qc(hostile.corpus(), k=3), out, top=9)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"scores.csv", "duplicates.csv", "report.html", "qc_summary.json"}
    real_replace = fileio.os.replace

    def refuse_summary(src, dst):
        if str(dst).endswith("qc_summary.json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", refuse_summary)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(hostile.cached_image, run_qc(hostile.corpus(), k=3), out, top=9)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert json.loads((out / "qc_summary.json").read_text())["run_id"] == json.loads(before["qc_summary.json"])["run_id"]
    monkeypatch.undo()
    clusters = tmp_path / "clusters"
    report_clusters(load_embeddings(hostile.corpus()), clusters, k=2, plots=("pca",))
    assert all(not p.name.startswith(".") for p in clusters.iterdir())
    assert len(json.loads((clusters / "clustering_metrics.json").read_text())["cluster_names"]) == 2
    assert (clusters / "pca_2d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clusters_of_a_small_archive_print_nothing_to_stderr(capfd):
    """faiss warned on stderr ("please provide at least 117 training points") past --no-progress."""
    from mammo_retrieval.analysis.clusters import kmeans_assignments
    x = np.random.default_rng(0).standard_normal((28, 8)).astype(np.float32)
    assignments = kmeans_assignments(x, 3)
    assert sorted(set(assignments.tolist())) == [0, 1, 2]
    assert "WARNING" not in capfd.readouterr().err
