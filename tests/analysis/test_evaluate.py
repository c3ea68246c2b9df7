import csv
import json

import numpy as np
import pytest

from mammo_retrieval.analysis.evaluate import (RankedLists, contralateral_hit_rate, evaluate, retrieval_metrics,
                                               to_markdown)
from mammo_retrieval.analysis.labels import LabelsError


def test_retrieval_metrics_known_answer():
    # 4 images on a line; patients A,A,B,C; labels x,x,x,y
    v = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ranked = RankedLists.build(v)
    labels = np.array(["x", "x", "x", "y"], dtype=object)
    patients = np.array(["A", "A", "B", "C"], dtype=object)
    m = retrieval_metrics(ranked, labels, patients, [1])
    # q0: candidates (B, C) -> x hit first: P@1=1, AP=1. q1: same. q2: (A0? order 1,0,3) -> 1 hit: AP=1.
    # q3: candidates 2,1,0 all x -> P@1=0, AP=0
    assert m["precision@1"] == 0.75 and m["mAP"] == 0.75 and m["queries"] == 4


def test_precision_with_the_same_patient_counted_known_answer():
    """The rule of some published figures: a patient's own other images count as label hits."""
    v = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ranked = RankedLists.build(v)  # neighbours: q0 -> 1, 2, 3; q1 -> 0, 2, 3; q2 -> 1, 0, 3; q3 -> 2, 1, 0
    labels = np.array(["x", "x", "x", "y"], dtype=object)
    patients = np.array(["A", "A", "B", "C"], dtype=object)
    m = retrieval_metrics(ranked, labels, patients, [2])
    # excluded: q0 (2, 3) 1/2, q1 (2, 3) 1/2, q2 (1, 0) 1, q3 (2, 1) 0 -> 0.5
    # counted:  q0 (1, 2) 1,   q1 (0, 2) 1,   q2 (1, 0) 1, q3 (2, 1) 0 -> 0.75
    assert m["precision@2"] == 0.5 and m["precision@2, same patient counted"] == 0.75
    unlabelled = retrieval_metrics(ranked, np.array(["x", "x", "", "y"], dtype=object), patients, [1])
    # an unlabelled image is no candidate either way: q0 -> 1 (x), q1 -> 0 (x), q3 -> 1 (x)
    assert unlabelled["queries"] == 3 and unlabelled["precision@1, same patient counted"] == 2 / 3


def test_contralateral_known_answer():
    v = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.5, 0.5]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ranked = RankedLists.build(v)
    patients = np.array(["A", "A", "B", "B"], dtype=object)
    sides = np.array(["L", "R", "L", "R"], dtype=object)
    # q0 -> 1 (A R): hit; q1 -> 0: hit; q2 -> 3 (B R): hit; q3 -> nearest is 1 (A): miss at k=1
    assert contralateral_hit_rate(ranked, patients, sides, [1])["contralateral@1"] == 0.75


def test_evaluate_on_mias_labels(mias_workspace, mias_dir, tmp_path):
    report = evaluate(mias_workspace.corpus(), str(mias_dir / "labels.csv"), columns=["tissue", "abnormality"], ks=(1, 5, 10))
    assert report["images"] == 200 and report["patients"] == 100 and report["joined_on"].startswith("SOPInstanceUID")
    assert set(report["spaces"]) == {f"encoder:{mias_workspace.encoder.identity.key}", "raw_pixels_32x32",
                                     "histogram_64"}
    for space in report["spaces"].values():
        assert space["contralateral"]["queries"] == 200
        tissue = space["labels"]["tissue"]
        assert tissue["retrieval"]["queries"] == 200
        assert set(tissue["classifiers"]) >= {"knn", "logistic_regression", "svm", "random_forest"}
    # the encoder's tissue precision@10, recomputed here by brute force from the stored vectors
    from mammo_retrieval.analysis.vectors import load_embeddings
    table = load_embeddings(mias_workspace.corpus())
    truth = {row["SOPInstanceUID"]: (row["tissue"], row["PatientID"]) for row in csv.DictReader(
        open(mias_dir / "labels.csv", newline=""))}
    rows = [i for i, sop in enumerate(table.meta.sop_instance_uid) if sop in truth]
    tissue = np.array([truth[table.meta.sop_instance_uid.iat[i]][0] for i in rows])
    patient = np.array([truth[table.meta.sop_instance_uid.iat[i]][1] for i in rows])
    sims = table.vectors[rows] @ table.vectors[rows].T
    np.fill_diagonal(sims, -np.inf)
    hits = []
    for q in range(len(rows)):
        order = [j for j in np.argsort(-sims[q], kind="stable") if patient[j] != patient[q]][:10]
        hits.append(np.mean(tissue[order] == tissue[q]))
    reported = report["spaces"][f"encoder:{mias_workspace.encoder.identity.key}"]["labels"]["tissue"]
    assert reported["retrieval"]["precision@10"] == pytest.approx(float(np.mean(hits)), abs=1e-9)
    markdown = to_markdown(report)
    assert "| histogram_64 |" in markdown and "tissue P@10" in markdown
    json.dumps(report)


def test_all_versions_are_measured_on_the_same_images(tmp_path, cbis_files):
    """evaluate --all-versions: the live version and one a reindex kept (the same model in another file, so
    the same numbers), side by side; a version without vectors is listed as not compared."""
    import dataclasses

    from mammo_retrieval.app.workspace import Workspace
    from tests.conftest import builtin_as_state_dict, cbis_pathology_labels, make_config
    ws = Workspace(make_config(tmp_path / "state"))
    ws.ingest(cbis_files[0].parent.parent, workers=1)
    first = ws.corpus()
    ws.reindex(str(builtin_as_state_dict(tmp_path / "same.pt")))
    ws = Workspace(ws.config)
    others = ws.other_version_corpora()
    assert [o.identity.key for o in others] == [first.identity.key]
    assert ws.corpus().identity.key != first.identity.key
    labels = cbis_pathology_labels(ws, tmp_path / "labels.csv")
    empty = dataclasses.replace(others[0], model_version_id=None)
    report = evaluate(ws.corpus(), str(labels), ks=(1, 3), others=[*others, empty])
    live_name, kept_name = f"encoder:{ws.corpus().identity.key} (serving)", f"encoder:{first.identity.key}"
    assert list(report["spaces"]) == [live_name, kept_name, "raw_pixels_32x32", "histogram_64"]
    assert report["spaces"][live_name]["labels"] == report["spaces"][kept_name]["labels"]
    assert report["skipped_versions"] == {kept_name: "no vectors of this version in the catalog"}
    assert f"Not compared: {kept_name}: no vectors of this version in the catalog." in to_markdown(report)
    other_archive = tmp_path / "other.csv"  # labels of another archive: a usage error (exit 2), as everywhere
    other_archive.write_text("SOPInstanceUID,pathology\n" + "".join(f"1.2.3.{i},{('BENIGN', 'MALIGNANT')[i % 2]}\n"
                                                                  for i in range(8)))
    with pytest.raises(LabelsError, match="only 0 indexed images have labels") as raised:
        evaluate(ws.corpus(), str(other_archive), ks=(1, 3))
    assert raised.value.exit_code == 2


def test_heldout_women_come_from_the_checkpoint_and_an_empty_hold_out_is_said_as_such(tmp_path):
    """`mretrieve train` holds no woman out by default: evaluating on its held-out women is refused naming
    that, not with a labels error about zero images."""
    import torch

    from mammo_retrieval.analysis.evaluate import heldout_patients
    from mammo_retrieval.core.errors import MammoRetrievalError
    torch.save({"data": {"heldout_patients": ["P0001", "P0002"]}}, tmp_path / "held.pt")
    assert heldout_patients(str(tmp_path / "held.pt")) == {"P0001", "P0002"}
    torch.save({"data": {"heldout_patients": []}}, tmp_path / "none.pt")
    with pytest.raises(MammoRetrievalError, match="holds no woman out") as none:
        heldout_patients(str(tmp_path / "none.pt"))
    assert "--holdout-fraction" in none.value.hint
    torch.save({"data": {}}, tmp_path / "unrecorded.pt")
    with pytest.raises(MammoRetrievalError, match="records no held-out patients"):
        heldout_patients(str(tmp_path / "unrecorded.pt"))


def test_write_evaluation_writes_both_files_whole_with_the_levels_markdown(tmp_path):
    from mammo_retrieval.analysis.evaluate import write_evaluation
    report = {"images": 4, "score": np.float32(0.5)}
    write_evaluation(report, tmp_path / "e.json", tmp_path / "e.md", lambda r: f"# {r['images']} images")
    assert json.loads((tmp_path / "e.json").read_text()) == {"images": 4, "score": 0.5}  # a number, not text
    assert (tmp_path / "e.md").read_text() == "# 4 images\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.md"]  # no temporary file left


def test_classifiers_on_a_few_women_are_measured_or_skipped_with_the_reason():
    """Three women of two images each: kNN asks for no more neighbours than a training fold holds (it
    asked for 5 of 4 and raised); a fold whose training part holds one class only is a stated skip."""
    from mammo_retrieval.analysis.evaluate import classifier_metrics
    rng = np.random.default_rng(0)
    features = rng.standard_normal((6, 8)).astype(np.float32)
    patients = np.array(["a", "a", "b", "b", "c", "c"], dtype=object)
    mixed = np.array(["F", "G", "G", "F", "F", "G"], dtype=object)
    measured = classifier_metrics(features, mixed, patients)
    assert set(measured) == {"knn", "logistic_regression", "svm", "random_forest", "class_counts"}
    assert 0.0 <= measured["knn"]["balanced_accuracy"] <= 1.0
    one_class_left = np.array(["F", "F", "F", "F", "G", "G"], dtype=object)  # training on a, b holds F only
    assert "one class only" in classifier_metrics(features, one_class_left, patients)["skipped"]
