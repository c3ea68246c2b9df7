"""Search against known answers: exact neighbours, the query never its own hit, filters that force the
over-fetch to grow, and usage errors of the right class."""
import sys
from pathlib import Path

import numpy as np
import pytest

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.errors import ConfigError
from mammo_retrieval.search.query import QueryFilters, QueryImage, search
from tests.conftest import make_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from synthetic import embedding_like, populate  # noqa: E402


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    ws = Workspace(make_config(tmp_path_factory.mktemp("query") / "state", encoder={"name": "resnet18"}))
    vectors = embedding_like(400, dim=512, latent=16, clusters=8, seed=1)
    populate(ws, vectors)  # image i: SOP 2.25.i, patient i // 2, laterality "LR"[i % 2]
    ws.rebuild_index()
    return ws, vectors


def test_hits_are_the_exact_neighbours_without_the_query_itself(populated):
    ws, vectors = populated
    query = QueryImage("2.25.10", None, "P0000005", "L", "MLO", "/q")
    result = search(ws.db, ws.searchable_index(), vectors[10:11], query, 5, QueryFilters())
    expected = [f"2.25.{i}" for i in np.argsort(-(vectors @ vectors[10]), kind="stable") if i != 10][:5]
    assert [h.sop_instance_uid for h in result.hits] == expected
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
    assert result.hits[0].score == pytest.approx(float(vectors[int(expected[0][5:])] @ vectors[10]), abs=1e-5)


def test_filters_that_reject_most_neighbours_still_fill_k(populated):
    """Only right breasts of other women: the first fetch of k+8 cannot hold 30 of them."""
    ws, vectors = populated
    query = QueryImage("2.25.11", None, "P0000005", "R", "MLO", "/q")
    filters = QueryFilters(laterality="R", exclude_same_patient=True)
    result = search(ws.db, ws.searchable_index(), vectors[11:12], query, 30, filters)
    order = [i for i in np.argsort(-(vectors @ vectors[11]), kind="stable") if i % 2 == 1 and i // 2 != 5]
    assert [h.sop_instance_uid for h in result.hits] == [f"2.25.{i}" for i in order[:30]]


def test_asking_for_more_than_exists_returns_everything_that_passes(populated):
    ws, vectors = populated
    query = QueryImage("2.25.0", None, "P0000000", "R", "MLO", "/q")
    result = search(ws.db, ws.searchable_index(), vectors[:1], query, 1000, QueryFilters(laterality="L"))
    assert len(result.hits) == 199  # 200 left breasts, less the query woman's own


def test_usage_errors_are_configuration_errors():
    with pytest.raises(ConfigError, match="laterality"):
        QueryFilters(laterality="X")
    with pytest.raises(ConfigError, match="k must be at least 1"):
        search(None, None, np.zeros((1, 4), np.float32), QueryImage("1", None, None, None, None, ""), 0,
               QueryFilters())
