"""qc, report clusters, evaluate and export through the CLI, on the ingested MIAS workspace."""
import json

import yaml
from click.testing import CliRunner

from mammo_retrieval.cli import cli


def invoke(ws, tmp_path, *args):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"encoder": {"name": "resnet18"}}))
    env = {"MRETRIEVE_HOME": str(ws.config.index_dir.parent), "MRETRIEVE_CONFIG": str(config)}
    result = CliRunner(env=env).invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


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
    out = invoke(mias_workspace, tmp_path, "export", "--out", tmp_path / "ex")
    assert json.loads(out)["rows"] == 204
