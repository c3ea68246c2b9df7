"""Study-level search against known answers: the fusion rules on hand-made vectors, and on an archive of
four-view phantom studies where one study is a copy of another with new UIDs (it must come first)."""
import numpy as np
import pytest

from mammo_retrieval.app.cli._common import render_error
from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.errors import ConfigError, NotFoundError
from mammo_retrieval.search.study import Study, StudyImage, fuse, rank_studies
from tests.conftest import make_config
from tests.factory import breast_phantom, make_file


def unit(*values):
    v = np.array(values, np.float32)
    return v / np.linalg.norm(v)


def study(key, patient, *views):
    return Study(key, key, f"uid-{key}", patient,
                 tuple(StudyImage(f"{key}-{i}", lat, view, f"/{key}/{i}.dcm", vec)
                       for i, (lat, view, vec) in enumerate(views)))


QUERY = study("Q", "P1", ("L", "CC", unit(1, 0, 0)), ("R", "CC", unit(0, 1, 0)))


def test_view_best_mean_matches_views_and_averages_them():
    same_views = study("A", "P2", ("L", "CC", unit(1, 0.1, 0)), ("R", "CC", unit(0, 1, 0.2)))
    score, views, images = fuse(QUERY, same_views, "view_best_mean")
    expected = (float(unit(1, 0, 0) @ unit(1, 0.1, 0)) + float(unit(0, 1, 0) @ unit(0, 1, 0.2))) / 2
    assert score == pytest.approx(expected, abs=1e-6) and views == ["L CC", "R CC"]
    assert [i.score for i in images] == pytest.approx([float(unit(1, 0, 0) @ unit(1, 0.1, 0)),
                                                       float(unit(0, 1, 0) @ unit(0, 1, 0.2))], abs=1e-5)


def test_a_missing_view_is_left_out_and_said():
    one_view = study("B", "P3", ("L", "CC", unit(1, 0, 0)))
    score, views, _ = fuse(QUERY, one_view, "view_best_mean")
    assert score == pytest.approx(1.0, abs=1e-6) and views == ["L CC"]
    no_common = study("C", "P4", ("L", "MLO", unit(0, 1, 0)))
    score, views, _ = fuse(QUERY, no_common, "view_best_mean")
    assert views == [] and score == pytest.approx((0.0 + 1.0) / 2, abs=1e-6)  # each query image's best, any view


def test_mean_pooled_is_the_cosine_of_the_mean_vectors():
    other = study("D", "P5", ("L", "CC", unit(1, 1, 0)), ("R", "CC", unit(0, 0, 1)))
    score, _, _ = fuse(QUERY, other, "mean_pooled")
    expected = float(unit(*(unit(1, 0, 0) + unit(0, 1, 0))) @ unit(*(unit(1, 1, 0) + unit(0, 0, 1))))
    assert score == pytest.approx(expected, abs=1e-6)


def test_mean_pooled_pools_the_views_both_studies_have():
    four = study("G", "P7", ("L", "CC", unit(1, 0, 0)), ("R", "CC", unit(0, 1, 0)),
                 ("L", "MLO", unit(0, 0, 1)), ("R", "MLO", unit(0, 0, 1)))
    score, views, _ = fuse(QUERY, four, "mean_pooled")  # the query has the CC views only
    assert views == ["L CC", "R CC"] and score == pytest.approx(1.0, abs=1e-6)
    no_common = study("H", "P8", ("L", "MLO", unit(1, 1, 0)))
    score, views, _ = fuse(QUERY, no_common, "mean_pooled")  # nothing shared: every image pooled
    assert views == [] and score == pytest.approx(1.0, abs=1e-6)


def test_ranking_excludes_the_query_study_and_optionally_the_patient():
    candidates = [QUERY, study("E", "P1", ("L", "CC", unit(1, 0, 0))), study("F", "P6", ("L", "CC", unit(0.9, 0.1, 0)))]
    assert [h.study_key for h in rank_studies(QUERY, candidates, 5, rule="view_best_mean").hits] == ["E", "F"]
    assert [h.study_key for h in rank_studies(QUERY, candidates, 5, exclude_same_patient=True).hits] == ["F"]
    # the default rule is mean_pooled (README: it measured at least as well), pooled over the shared view
    default = rank_studies(QUERY, candidates, 5)
    assert default.rule == "mean_pooled" and [h.study_key for h in default.hits] == ["E", "F"]
    assert default.hits[0].score == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ConfigError):
        rank_studies(QUERY, candidates, 5, rule="max")


@pytest.fixture(scope="module")
def four_view_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    files = {}
    for s in range(6):
        for j, (lat, view) in enumerate([("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")]):
            seed = 100 * s + j
            pixels = breast_phantom(128, 96, side=lat, seed=seed)
            files[(s, j)] = make_file(root / "archive" / f"s{s}_{j}.dcm", pixels, accession=f"ST{s}",
                                      patient_id=f"P{s}", laterality=lat, view=view)
            if s == 2:  # study 6 is a copy of study 2 (same pictures, new UIDs, another patient)
                files[(6, j)] = make_file(root / "archive" / f"s6_{j}.dcm", pixels, accession="ST6",
                                          patient_id="P6", laterality=lat, view=view)
    cfg = make_config(root / "state", encoder={"name": "resnet18", "input_size": 64, "batch_size": 8})
    Workspace(cfg).ingest(root / "archive", workers=0)
    ws = Workspace(cfg)
    yield ws, files
    ws.close()


@pytest.mark.parametrize("rule", ["view_best_mean", "mean_pooled"])
def test_a_copied_study_is_found_first(four_view_archive, rule):
    ws, _ = four_view_archive
    result = ws.search.similar_studies("ST2", k=3, rule=rule)
    assert result.hits[0].study_key == "ST6" and result.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert "ST2" not in [h.study_key for h in result.hits] and len(result.hits) == 3
    assert result.hits[0].views_matched == ["L CC", "L MLO", "R CC", "R MLO"]
    assert all(i.score == pytest.approx(1.0, abs=1e-4) for i in result.hits[0].images)


def test_a_study_query_from_files_equals_the_stored_one(four_view_archive):
    ws, files = four_view_archive
    by_files = ws.search.query_study_files([files[(2, j)] for j in range(4)], k=3)
    stored = ws.search.similar_studies("ST2", k=3)
    assert [(h.study_key, round(h.score, 4)) for h in by_files.hits] == \
        [(h.study_key, round(h.score, 4)) for h in stored.hits]
    two_views = ws.search.query_study_files([files[(2, 0)], files[(2, 2)]], k=1)
    assert two_views.hits[0].study_key == "ST6" and two_views.hits[0].views_matched == ["L CC", "L MLO"]


def test_a_study_query_from_files_of_two_studies_is_refused_naming_them(four_view_archive):
    ws, files = four_view_archive  # else study 3's own image would come back as a hit of "study 2"
    with pytest.raises(ConfigError, match="belong to 2 studies") as raised:
        ws.search.query_study_files([files[(2, 0)], files[(3, 1)]], k=3)
    assert "study ST2" in raised.value.message and "study ST3" in raised.value.message
    assert str(files[(3, 1)]) in raised.value.message and "--level image" in raised.value.hint


def test_unknown_study_is_not_found(four_view_archive):
    ws, _ = four_view_archive
    with pytest.raises(NotFoundError, match="NOPE") as raised:
        ws.search.similar_studies("NOPE")
    assert "joined.csv" in raised.value.hint and raised.value.remedies[0].action == "export"  # where keys are listed
    assert "mretrieve export --out DIR" in render_error(raised.value)
