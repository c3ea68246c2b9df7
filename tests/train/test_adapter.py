"""Label adapters: the supervised contrastive loss against its closed form, training that keeps women
apart, and an adapter served as a model version (stored vectors mapped, nothing decoded; a new query
embedded as base + projection gives the mapped vector; rollback)."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mammo_retrieval.app.cli import cli
from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.encoders.adapter import AdaptedEncoder, is_adapter_file, load_adapter
from mammo_retrieval.train.adapter import AdaptConfig, supervised_contrastive
from tests.conftest import link_mias, make_config


def test_supervised_contrastive_equals_its_closed_form():
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]]), dim=1)
    labels = torch.tensor([0, 0, 1, -1])  # the last one has no label: neither anchor nor positive
    tau = 0.5
    s = (z @ z.T).numpy() / tau
    expected = []
    for i, p in ((0, 1), (1, 0)):  # only 0 and 1 have a positive (each other); 2 has none
        denominator = sum(math.exp(s[i, a]) for a in range(4) if a != i)
        expected.append(-(s[i, p] - math.log(denominator)))
    assert float(supervised_contrastive(z, labels, tau)) == pytest.approx(np.mean(expected), rel=1e-6)


def _ingest_cbis(tmp_path, cbis_files):
    ws = Workspace(make_config(tmp_path / "state"))
    ws.ingest(cbis_files[0].parent.parent, workers=1)
    labels = tmp_path / "labels.csv"
    from mammo_retrieval.storage.catalog import repository as repo
    with ws.db.session() as s:
        rows = repo.images_with_paths(s)
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["SOPInstanceUID", "pathology"])
        writer.writerows((sop, "malignant" if "malign" in path else "benign") for _, sop, path in rows)
    return ws, labels


def test_an_adapter_is_a_model_version_mapped_from_stored_vectors(tmp_path, cbis_files):
    ws, labels = _ingest_cbis(tmp_path, cbis_files)
    base_key = ws.search.info().model_key
    out = tmp_path / "adapter.safetensors"
    report = ws.adapt(str(labels), ["pathology"], out, AdaptConfig(out_dim=16, epochs=50, heldout_fraction=0.5))
    assert is_adapter_file(out) and report["base_model"] == base_key
    with ws.db.session() as s:
        from mammo_retrieval.storage.catalog import repository as repo
        women = {repo.image_by_sop(s, sop).patient_id for _, sop, _ in repo.images_with_paths(s)}
    assert report["train_patients"] + len(report["heldout_patients"]) == len(women)  # each woman on one side
    projection, info = load_adapter(out)
    assert info.base_key == base_key and info.columns == ("pathology",) and info.out_dim == 16

    result = ws.reindex(str(out))
    assert result["embedded"] == 0, "an adapter maps stored vectors: nothing is decoded or embedded"
    assert result["mapped"] == result["already_embedded"] == len(cbis_files)
    from mammo_retrieval.app.cli.reindex import format_summary
    assert f"({len(cbis_files)} of them mapped through the adapter" in format_summary(result)
    fresh = Workspace(ws.config)
    assert isinstance(fresh.encoder, AdaptedEncoder) and fresh.search.info().ntotal == len(cbis_files)
    assert fresh.searchable_index().manifest.dim == 16
    from mammo_retrieval.encoders.onnx_runtime import OnnxEncoder
    if isinstance(fresh.encoder.base, OnnxEncoder):  # (auto keeps a GPU on torch)
        assert fresh.encoder.base._source is None  # the base's torch weights are not held twice
        assert fresh.encoder.base.source.identity == fresh.encoder.base.identity  # built again, the same model
    # a new query goes through base + projection, and lands on the mapped vector of the same image
    from mammo_retrieval.analysis.vectors import load_embeddings
    table = load_embeddings(fresh.corpus())
    stored = dict(zip(table.meta.sop_instance_uid, table.vectors))
    query, vector = fresh.embed_file(cbis_files[0])
    assert float(vector[0] @ stored[query.sop_instance_uid]) > 0.9999
    assert fresh.query_dicom(cbis_files[0], 3).hits
    fresh.rollback()
    assert Workspace(ws.config).search.info().model_key == base_key


def test_adapt_cli_refuses_too_few_women_and_names_the_split(tmp_path, cbis_files):
    ws, labels = _ingest_cbis(tmp_path, cbis_files)
    runner = CliRunner()
    result = runner.invoke(cli, ["adapt", "--labels", str(labels), "--label-column", "pathology", "--out",
                                 str(tmp_path / "a.safetensors"), "--heldout-fraction", "0.05"],
                           env={"MRETRIEVE_HOME": str(tmp_path / "state")})
    assert result.exit_code == 2 and "too few to train and measure an adapter" in result.output  # a LabelsError
    result = runner.invoke(cli, ["adapt", "--labels", str(labels), "--label-column", "pathology", "--out",
                                 str(tmp_path / "a.safetensors"), "--epochs", "2", "--heldout-fraction", "0.4"],
                           env={"MRETRIEVE_HOME": str(tmp_path / "state")})
    assert result.exit_code == 0, result.output
    assert "note: measured on 3 held-out women only, so these figures say little" in result.output


def test_a_tissue_adapter_improves_held_out_women_on_mias(mias_dir, tmp_path):
    archive = link_mias(mias_dir, tmp_path / "archive")
    ws = Workspace(make_config(tmp_path / "state"))
    ws.ingest(archive, workers=1)
    report = ws.adapt(str(mias_dir / "labels.csv"), ["tissue"], tmp_path / "tissue.safetensors", AdaptConfig())
    before, after = report["before"]["tissue"], report["after"]["tissue"]
    assert report["heldout_images"] >= 20
    assert after["precision@10"] > before["precision@10"] and after["mAP"] > before["mAP"], report
