"""Evaluation gates on reindex, against known answers: the same weights in another file measure exactly
the same and pass; random weights against the built-in (trained on these women) fail tissue p@10 on
MIAS, do not switch and exit 13; --force switches and reports the comparison."""
from __future__ import annotations


import pytest
import torch
from click.testing import CliRunner

from mammo_retrieval.analysis.gate import GateFailed, GateMetric, GateResult
from mammo_retrieval.app.cli import cli
from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.errors import ConfigError
from tests.conftest import builtin_as_state_dict, cbis_pathology_labels, link_mias, make_config, torch_model


def test_metric_parsing_and_the_verdict():
    assert GateMetric.parse("tissue:p@10") == GateMetric("tissue:p@10", "tissue", 10, "precision")
    assert GateMetric.parse("abnormality:mAP").kind == "map"
    assert GateMetric.parse("contralateral@5") == GateMetric("contralateral@5", None, 5, "contralateral")
    for bad in ("tissue", "p@10", "tissue:p@0", "contralateral@x"):
        with pytest.raises(ConfigError, match="not understood"):
            GateMetric.parse(bad)
    assert GateResult("m", live=0.60, new=0.595, tolerance=0.01, images=10).passed
    assert not GateResult("m", live=0.60, new=0.585, tolerance=0.01, images=10).passed


def test_the_same_model_in_another_file_measures_the_same_and_switches(tmp_path, cbis_files):
    ws = Workspace(make_config(tmp_path / "state"))
    ws.ingest(cbis_files[0].parent.parent, workers=1)
    labels = cbis_pathology_labels(ws, tmp_path / "labels.csv")
    result = ws.reindex(str(builtin_as_state_dict(tmp_path / "same.pt")), gate_labels=str(labels),
                        tolerance=0.0)
    gate = result["gate"]
    assert gate["metric"] == "pathology:p@10" and gate["live"] == gate["new"] and gate["passed"]
    assert result["previous"] is not None  # it switched


def test_random_weights_fail_the_gate_on_mias_then_force_switches(mias_dir, tmp_path):
    archive = link_mias(mias_dir, tmp_path / "archive")
    home = tmp_path / "state"
    ws = Workspace(make_config(home))
    assert ws.ingest(archive, workers=1).ingested == 200
    live = ws.search.info().model_key
    random_weights = tmp_path / "random.pt"
    import timm
    torch.manual_seed(3)
    # the default encoder's layout (v3: a ResNet-18 beside the histogram and texture), its network's weights random
    shipped = torch_model(ws.encoder).state_dict()
    torch.save({**{f"backbone.{k}": v for k, v in timm.create_model("resnet18", num_classes=0).state_dict().items()},
                **{k: v for k, v in shipped.items() if not k.startswith("backbone.")}}, random_weights)
    with pytest.raises(GateFailed) as info:
        ws.reindex(str(random_weights), gate_labels=str(mias_dir / "labels.csv"), gate_metric="tissue:p@10")
    assert info.value.result.new < info.value.result.live - 0.01 and info.value.exit_code == 13
    assert Workspace(ws.config).search.info().model_key == live, "a failed gate does not switch"

    runner = CliRunner()
    env = {"MRETRIEVE_HOME": str(home)}
    refused = runner.invoke(cli, ["reindex", "--model", str(random_weights), "--gate", str(mias_dir / "labels.csv"),
                                  "--no-progress"], env=env)
    assert refused.exit_code == 13 and "gate tissue:p@10 on 200 labelled images" in refused.output
    forced = runner.invoke(cli, ["reindex", "--model", str(random_weights), "--gate", str(mias_dir / "labels.csv"),
                                 "--force", "--no-progress"], env=env)
    assert forced.exit_code == 0, forced.output
    assert "FAILED, switched with --force" in forced.output and "embedded 0, already embedded 200" in forced.output
    assert Workspace(ws.config).search.info().model_key != live
