"""qc, report clusters, evaluate and export through the CLI, on the ingested MIAS workspace."""
import json

import yaml
from click.testing import CliRunner

from mammo_retrieval.app.cli import cli


def invoke(ws, tmp_path, *args):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"encoder": {"name": "resnet18"}}))
    env = {"MRETRIEVE_HOME": str(ws.config.index_dir.parent), "MRETRIEVE_CONFIG": str(config)}
    result = CliRunner(env=env).invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout  # what a pipe reads: a warning on stderr (say, ONNX falling back to torch) is not in it


def test_qc_report_evaluate_export(mias_workspace, mias_dir, tmp_path):
    out = invoke(mias_workspace, tmp_path, "qc", "--out", tmp_path / "qc", "--top", "5", "--method", "lof")
    assert "scored 204 images (lof" in out and "1 near-duplicate pairs" in out
    assert {p.name for p in (tmp_path / "qc").iterdir()} == {"scores.csv", "duplicates.csv", "report.html",
                                                            "qc_summary.json"}
    out = invoke(mias_workspace, tmp_path, "report", "clusters", "--out", tmp_path / "cl", "--k", "3",
                 "--plots", "pca")
    assert "faiss k-means, k=3: silhouette" in out
    assert json.loads((tmp_path / "cl" / "clustering_metrics.json").read_text())["num_clusters"] == 3
    out = invoke(mias_workspace, tmp_path, "evaluate", "--labels", mias_dir / "labels.csv", "--label-column",
                 "tissue", "--k", "5,10", "--out", tmp_path / "ev")
    assert "| raw_pixels_32x32 |" in out and (tmp_path / "ev" / "evaluation.json").exists()
    # a built-in's name stands for its shipped weights (whose path depends on where the package lies)
    invoke(mias_workspace, tmp_path, "evaluate", "--labels", mias_dir / "labels.csv", "--label-column",
           "tissue", "--k", "5", "--heldout-from", "mammo-simclr-v3", "--out", tmp_path / "held")
    assert json.loads((tmp_path / "held" / "evaluation.json").read_text())["images"] == 58
    out = invoke(mias_workspace, tmp_path, "export", "--out", tmp_path / "ex")
    assert json.loads(out)["rows"] == 204


def test_too_many_clusters_is_a_usage_error(mias_workspace, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"encoder": {"name": "resnet18"}}))
    env = {"MRETRIEVE_HOME": str(mias_workspace.config.index_dir.parent), "MRETRIEVE_CONFIG": str(config)}
    result = CliRunner(env=env).invoke(cli, ["report", "clusters", "--out", str(tmp_path / "cl"), "--k", "500"])
    assert result.exit_code == 2, result.output
    assert "k=500 clusters of 204 images" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "cl").exists()
    result = CliRunner(env=env).invoke(cli, ["evaluate", "--labels", str(config), "--heldout-from", "mammo-v9"])
    assert result.exit_code == 2 and "'mammo-v9' is neither a file nor a built-in encoder" in result.stderr
    assert "mammo-simclr-v3" in result.stderr


# --- on a small synthetic archive: formulas in headers, usage errors, progress ---

import csv  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tests.analysis.small import FORMULA, cli_env, small_workspace  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_cli")
    ws = small_workspace(root, overrides={0: {"accession": FORMULA}})
    env = cli_env(ws, root)
    from mammo_retrieval.analysis.vectors import load_embeddings
    sops = load_embeddings(ws.corpus()).meta.sop_instance_uid
    labels = root / "labels.csv"
    pd.DataFrame({"SOPInstanceUID": sops, "tissue": ["F", "G"] * 4}).to_csv(labels, index=False)
    return ws, env, labels


def run_cli(env, *args, code=0):
    result = CliRunner(env=env).invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def test_bad_label_column_exits_2_everywhere(small, tmp_path):
    _, env, labels = small
    errors = [run_cli(env, "report", "clusters", "--out", tmp_path / "cl", "--labels", labels, "--label-column",
                      "nope", code=2).stderr,
              run_cli(env, "evaluate", "--labels", labels, "--label-column", "nope", code=2).stderr]
    assert all("label column(s) nope not in" in e and "tissue" in e for e in errors), errors


def test_usage_errors_name_the_numbers(small, tmp_path):
    _, env, labels = small
    err = run_cli(env, "report", "clusters", "--out", tmp_path / "cl", "--plots", "pca,foo", code=2).stderr
    assert "foo" in err and "pca, tsne, umap" in err
    err = run_cli(env, "report", "clusters", "--out", tmp_path / "cl", "--k", "8", code=2).stderr
    assert "k=8 clusters of 8 images" in err
    for ks in ("0", "1,0", "-1"):
        result = run_cli(env, "evaluate", "--labels", labels, "--k", ks, code=2)
        assert "at least 1" in result.stderr and "@0" not in result.output
    err = run_cli(env, "evaluate", "--labels", labels, "--k", "1,8", code=2).stderr
    assert "k=8 is more than the 7 other images each of the 8" in err


def test_progress_on_stderr_and_csv_formulas(small, tmp_path):
    ws, env, labels = small
    result = run_cli(env, "qc", "--out", tmp_path / "qc", "-k", "3", "--top", "3")
    assert "qc: nearest neighbours of 8 images..." in result.stderr
    assert "qc:" not in result.stdout
    with open(tmp_path / "qc" / "scores.csv", newline="") as fh:
        assert "'" + FORMULA in {row["AccessionNumber"] for row in csv.DictReader(fh)}
    quiet = run_cli(env, "qc", "--out", tmp_path / "qc2", "-k", "3", "--no-progress")
    assert quiet.stderr == ""
    result = run_cli(env, "report", "clusters", "--out", tmp_path / "cl", "--labels", labels, "--plots", "pca")
    assert "report clusters: cluster metrics..." in result.stderr
    saved = json.loads((tmp_path / "cl" / "clustering_metrics.json").read_text())
    assert saved["label_column"] == "tissue" and saved["cluster_names"] == {"0": "F", "1": "G"}
    bare = run_cli(env, "report", "clusters", "--out", tmp_path / "cl2", "--labels", labels, "--plots", "none")
    assert bare.stdout.rstrip().splitlines()[-1] == f"wrote {tmp_path / 'cl2' / 'clustering_metrics.json'}"
    run_cli(env, "export", "--out", tmp_path / "ex")
    with open(tmp_path / "ex" / "joined.csv", newline="") as fh:
        assert "'" + FORMULA in {row["AccessionNumber"] for row in csv.DictReader(fh)}
    # query --format csv goes through the same neutralising writer
    path = ws.config.index_dir.parent.parent / "archive" / "img02.dcm"
    out = run_cli(env, "query", "--dicom", path, "-k", "7", "--format", "csv").stdout
    assert "'" + FORMULA in {c for row in csv.reader(out.splitlines()) for c in row}, out
    assert not any(c.startswith("=") for row in csv.reader(out.splitlines()) for c in row), out


def test_a_qc_run_that_dies_before_its_report_is_whole_stores_no_sweep(small, tmp_path, monkeypatch):
    """The sweep is stored once its report is written: the rerun of a `qc` killed while writing compares
    itself with the sweep before it, not with one that nobody saw (which would hide what is new)."""
    from sqlalchemy import func, select

    from mammo_retrieval.analysis import qc_report
    from mammo_retrieval.storage.catalog.models import QcRun
    ws, env, _ = small
    run_cli(env, "qc", "--out", tmp_path / "first", "-k", "3", "--no-progress")
    first = json.loads((tmp_path / "first" / "qc_summary.json").read_text())["run_id"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(qc_report, "write_html", disk_full)
        died = CliRunner(env=env).invoke(cli, ["qc", "--out", str(tmp_path / "died"), "-k", "3", "--no-progress"])
    assert died.exit_code != 0 and not (tmp_path / "died" / "qc_summary.json").exists()
    with ws.db.session() as s:
        assert s.scalar(select(func.max(QcRun.id))) == first  # nothing stored
    run_cli(env, "qc", "--out", tmp_path / "rerun", "-k", "3", "--no-progress")
    summary = json.loads((tmp_path / "rerun" / "qc_summary.json").read_text())
    assert summary["previous_run_id"] == first and summary["run_id"] > first
    with ws.db.session() as s:
        assert s.scalar(select(func.max(QcRun.id))) == summary["run_id"]
