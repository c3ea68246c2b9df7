"""The warm read path: a stored image's neighbours equal those of its file (same vector, nothing decoded),
uploads held in memory answer as paths do, the live model is followed, and threads share one model."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.errors import NotFoundError
from mammo_retrieval.dicom.reader import InMemoryDicom
from mammo_retrieval.encoders import Encoder
from mammo_retrieval.search.query import QueryFilters
from tests.conftest import make_config
from tests.pipeline.test_runner import synthetic_archive

TINY = {"name": "resnet18", "input_size": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    files = synthetic_archive(root / "archive", 8)
    cfg = make_config(root / "state", encoder=TINY)
    Workspace(cfg).ingest(root / "archive", workers=0)
    ws = Workspace(cfg)
    yield ws, files
    ws.close()


def _ranked(result):
    return [(h.sop_instance_uid, h.score) for h in result.hits]


def test_the_serving_encoder_meets_the_protocol(served):
    ws, _ = served
    assert isinstance(ws.search.encoder, Encoder)


def test_similar_from_the_stored_vector_equals_the_file_query(served):
    ws, files = served
    by_file = ws.search.query_file(files[0], k=5)
    by_sop = ws.search.similar(by_file.query.sop_instance_uid, k=5)
    assert by_sop.query.sop_instance_uid == by_file.query.sop_instance_uid
    assert [s for s, _ in _ranked(by_sop)] == [s for s, _ in _ranked(by_file)]
    assert np.allclose([x for _, x in _ranked(by_sop)], [x for _, x in _ranked(by_file)], atol=1e-4)
    assert by_file.query.sop_instance_uid not in [s for s, _ in _ranked(by_sop)]


def test_an_upload_in_memory_answers_as_its_path(served):
    ws, files = served
    upload = InMemoryDicom("upload.dcm", files[1].read_bytes())
    assert _ranked(ws.search.query_file(upload, k=3)) == _ranked(ws.search.query_file(files[1], k=3))
    assert ws.search.query_file(upload, k=3).query.path == "upload.dcm"


def test_filters_apply_to_stored_queries(served):
    ws, files = served
    sop = ws.search.query_file(files[0], k=1).query.sop_instance_uid
    hits = ws.search.similar(sop, k=10, filters=QueryFilters(laterality="L")).hits
    assert hits and all(h.laterality == "L" for h in hits)


def test_unknown_image_is_not_found(served):
    ws, _ = served
    with pytest.raises(NotFoundError, match="1.2.3.404"):
        ws.search.similar("1.2.3.404")


def test_concurrent_queries_share_one_model_and_all_succeed(served):
    ws, files = served
    expected = {str(f): _ranked(ws.search.query_file(f, k=3)) for f in files[:4]}
    sops = [ws.search.query_file(f, k=1).query.sop_instance_uid for f in files[:4]]
    encoder = ws.search.encoder
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait()
        if i % 2:
            return "sop", ws.search.similar(sops[i % 4], k=3)
        return str(files[i % 4]), ws.search.query_file(files[i % 4], k=3)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for key, result in results:
        if key != "sop":
            assert _ranked(result) == expected[key]
    assert ws.search.encoder is encoder


def test_a_query_reads_the_live_pointer_once(served, monkeypatch):
    """The warm path checks for a model switch once per query, timed as the model's load, not again when
    it opens the index."""
    import mammo_retrieval.search.service as service_module
    ws, files = served
    sop = ws.search.query_file(files[0], k=1).query.sop_instance_uid
    calls = []
    real = service_module.live_model_differs

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "live_model_differs", counted)
    ws.search.similar(sop, k=3)
    assert len(calls) == 1
    ws.search.query_file(files[0], k=3)
    assert len(calls) == 2
    ws.search.index()
    assert len(calls) == 3


def test_a_model_switch_picked_up_mid_query_does_not_mix_models(served, monkeypatch):
    """Another request may notice a reindex (and drop the model) while this query is decoding: every
    image of this query is still embedded by the model whose index it searches."""
    import mammo_retrieval.search.service as service_module
    ws, files = served
    search_service = ws.search
    search_service.query_file(files[0], k=1)
    warm_encoder = search_service.encoder
    real_prepare, real_embed = search_service._prepare, service_module.embed_pictures
    used = []

    def prepare_while_another_request_switches(source, settings):
        search_service.forget_model()
        return real_prepare(source, settings)

    monkeypatch.setattr(search_service, "_prepare", prepare_while_another_request_switches)
    monkeypatch.setattr(service_module, "embed_pictures",
                        lambda encoder, pictures: used.append(encoder) or real_embed(encoder, pictures))
    search_service.query_study_files([files[0], files[0]], k=2)
    assert used == [warm_encoder, warm_encoder]


def test_a_result_names_the_model_that_ranked_it(served):
    """A KOS document records the model of its results: taken from the query's own snapshot, not read
    again afterwards (a switch in between would name another model)."""
    ws, files = served
    key = ws.search.encoder.identity.key
    by_file = ws.search.query_file(files[0], k=2)
    assert by_file.model_key == key
    assert ws.search.similar(by_file.query.sop_instance_uid, k=2).model_key == key
    assert ws.search.info().model_key == key
