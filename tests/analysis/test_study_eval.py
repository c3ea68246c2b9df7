"""evaluate --level study against a known answer: seven four-view studies, one a copy of another (another
patient); the pair shares a label no other study has, so study precision@1 is exactly 2/7 under both rules."""
import csv

import pytest

from mammo_retrieval.analysis.study_eval import evaluate_studies, study_label, to_markdown
from mammo_retrieval.app.workspace import Workspace
from tests.conftest import make_config
from tests.factory import breast_phantom, make_file

VIEWS = [("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")]


def test_study_labels_prefer_a_finding():
    assert study_label(["NORM", "CIRC"]) == "CIRC" and study_label(["NORM", "NORM"]) == "NORM"
    assert study_label(["G", "G"]) == "G" and study_label(["", None]) is pytest.importorskip("pandas").NA


def test_a_copied_study_pair_gives_the_known_precision(tmp_path):
    rows = []
    for s in range(6):
        for j, (lat, view) in enumerate(VIEWS):
            pixels = breast_phantom(128, 96, side=lat, seed=100 * s + j)
            for key, patient in ([(f"ST{s}", f"P{s}")] + ([("ST6", "P6")] if s == 2 else [])):
                path = make_file(tmp_path / "archive" / f"{key}_{j}.dcm", pixels, accession=key, patient_id=patient,
                                 laterality=lat, view=view)
                rows.append({"file": path.name, "AccessionNumber": key,
                             "group": "A" if key in ("ST2", "ST6") else f"solo{s}"})
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["AccessionNumber", "group"])
        writer.writeheader()
        writer.writerows({"AccessionNumber": r["AccessionNumber"], "group": r["group"]} for r in rows)
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 64, "batch_size": 8}))
    ws.ingest(tmp_path / "archive", workers=0)
    report = evaluate_studies(ws.corpus(), str(labels), columns=["group"], ks=(1, 3))
    assert report["studies"] == 7 and report["images"] == 28
    for rule in ("view_best_mean", "mean_pooled"):
        assert report["rules"][rule]["group"]["precision@1"] == pytest.approx(2 / 7)
    # per image, every view of ST2 finds its copy in ST6 first (and back): 8 of 28 images
    assert report["image_level"]["group"]["precision@1"] == pytest.approx(8 / 28)
    assert "| study (view_best_mean) | group |" in to_markdown(report)
    # only some women (as --heldout-from does): the copied pair and one other study
    some = evaluate_studies(ws.corpus(), str(labels), columns=["group"], ks=(1,), patients={"P0", "P2", "P6"})
    assert some["studies"] == 3 and some["images"] == 12
    assert some["rules"]["view_best_mean"]["group"]["precision@1"] == pytest.approx(2 / 3)
    assert "only the studies of the given patients (3 of the 3 found)" in to_markdown(some)
    ws.close()
