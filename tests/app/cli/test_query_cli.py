"""`query`: a bad query file fails before the model loads; --timings keeps the model apart from the index;
the table says what its score is."""
import json
import time

import pytest

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.app.cli.query import SCORE_NOTE
from tests.factory import make_file


@pytest.fixture
def indexed(run, tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    for i in range(3):
        make_file(tmp_path / "archive" / f"{i}.dcm", rng.integers(0, 4096, (96, 80), dtype=np.uint16))
    run("ingest", tmp_path / "archive", "--no-progress", "--workers", "0")
    return tmp_path / "archive" / "0.dcm"


@pytest.fixture
def encoder_builds(monkeypatch):
    """Every encoder the Workspace builds, recorded (the build itself still happens)."""
    built = []
    original = Workspace.build_encoder

    def recording(self, encoder_cfg):
        built.append(encoder_cfg.name)
        return original(self, encoder_cfg)
    monkeypatch.setattr(Workspace, "build_encoder", recording)
    return built


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + bytes(200), b"just some text\n" * 20])
def test_non_dicom_query_fails_before_the_encoder_is_built(run, indexed, tmp_path, encoder_builds, content):
    bad = tmp_path / "photo.png"
    bad.write_bytes(content)
    result = run("query", "--dicom", bad, code=3)
    assert encoder_builds == []
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "not a DICOM file" in lines[0]


def test_header_rejection_before_the_encoder_even_with_nothing_indexed(run, tmp_path, encoder_builds):
    bad = make_file(tmp_path / "ct.dcm", modality="CT")
    result = run("query", "--dicom", bad, code=3)
    assert "Modality is 'CT'" in result.output and encoder_builds == []


def test_timings_keep_the_encoder_load_out_of_the_index_load(run, indexed, monkeypatch):
    slow = 0.6
    original = Workspace.build_encoder

    def slow_build(self, encoder_cfg):
        time.sleep(slow)
        return original(self, encoder_cfg)
    monkeypatch.setattr(Workspace, "build_encoder", slow_build)
    result = run("query", "--dicom", indexed, "-k", "2", "--timings")
    stages = json.loads(result.stderr)["stages_ms"]
    assert set(stages) == {"workspace_open", "header_check", "encoder_load", "index_load", "decode_preprocess",
                           "embed", "search"}  # README's list
    assert stages["encoder_load"] >= slow * 1e3
    assert stages["index_load"] < slow * 1e3


def test_table_says_what_the_score_is(run, indexed):
    out = run("query", "--dicom", indexed, "-k", "2").output
    assert out.rstrip().splitlines()[-1] == SCORE_NOTE and "cosine similarity" in SCORE_NOTE
    assert SCORE_NOTE not in run("query", "--dicom", indexed, "--format", "csv").output


def test_timings_at_study_level_and_by_accession(run, indexed):
    """--timings on every kind of query: a study's files embed (every stage), stored vectors only search."""
    import pydicom
    accession = str(pydicom.dcmread(indexed, stop_before_pixels=True).AccessionNumber)
    files = run("query", "--dicom", indexed, "--level", "study", "-k", "1", "--timings")
    assert set(json.loads(files.stderr)["stages_ms"]) == {"workspace_open", "header_check", "encoder_load",
                                                          "index_load", "decode_preprocess", "embed", "search"}
    for level in ("study", "image"):
        stored = run("query", "--accession", accession, "--level", level, "-k", "1", "--timings")
        assert set(json.loads(stored.stderr)["stages_ms"]) == {"workspace_open", "encoder_load", "index_load",
                                                               "search"}, level
