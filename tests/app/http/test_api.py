"""Every route and every error status of the HTTP API, in-process, against a real ingested archive."""
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from mammo_retrieval.analysis.qc import run_qc
from mammo_retrieval.app.http.api import create_app
from mammo_retrieval.app.workspace import Workspace
from tests.app.http.conftest import wait_healthy
from tests.factory import breast_phantom, make_file

HIT_FIELDS = {"rank", "score", "sop_instance_uid", "accession_number", "patient_id", "laterality", "view", "path"}
DICOM = {"Content-Type": "application/dicom"}


def _hits(body):
    return [(h["sop_instance_uid"], h["rank"]) for h in body["hits"]]


def test_health_reports_loading_then_ok(archive):
    cfg, _, _ = archive
    gate = threading.Event()
    ws = Workspace(cfg)
    real = ws.build_encoder
    ws.build_encoder = lambda c: (gate.wait(30), real(c))[1]  # hold the warm-up until the test has looked
    with TestClient(create_app(ws)) as client:
        loading = client.get("/healthz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        gate.set()
        assert wait_healthy(client)["status"] == "ok"
        assert client.get("/healthz").status_code == 200
    ws.close()


def test_upload_query_matches_the_library_and_the_cli_fields(client, archive):
    cfg, files, _ = archive
    body = client.post("/api/v1/query?k=4", content=files[0].read_bytes(), headers=DICOM).json()
    expected = Workspace(cfg).query_dicom(files[0], k=4).as_dict()
    assert set(body) >= {"query", "hits"} and all(set(h) == HIT_FIELDS for h in body["hits"])
    assert _hits(body) == [(h["sop_instance_uid"], h["rank"]) for h in expected["hits"]]
    assert body["query"]["sop_instance_uid"] == expected["query"]["sop_instance_uid"]
    assert body["query"]["path"] == "upload.dcm"  # the upload's own name, no server path


def test_multipart_upload_is_accepted(client, archive):
    _, files, _ = archive
    raw = client.post("/api/v1/query?k=3", content=files[1].read_bytes(), headers=DICOM).json()
    form = client.post("/api/v1/query?k=3", files={"file": ("mine.dcm", files[1].read_bytes(), "application/dicom")})
    assert form.status_code == 200 and _hits(form.json()) == _hits(raw)
    assert form.json()["query"]["path"] == "mine.dcm"


def test_query_thumbnail_is_returned_inline_only_when_asked(client, archive):
    _, files, _ = archive
    plain = client.post("/api/v1/query?k=1", content=files[2].read_bytes(), headers=DICOM).json()
    shown = client.post("/api/v1/query?k=1&thumbnail=true", content=files[2].read_bytes(), headers=DICOM).json()
    assert "query_thumbnail" not in plain and shown["query_thumbnail"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("content, code", [(b"\x89PNG\r\n\x1a\n" + bytes(300), "not_dicom"),
                                           (b"just text\n" * 40, "not_dicom")])
def test_a_bad_upload_is_422_with_the_ingest_rejection(client, content, code):
    response = client.post("/api/v1/query", content=content, headers=DICOM)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == code and body["reason"] and "upload.dcm" in body["message"]


def test_a_wrong_modality_upload_is_422(client, tmp_path):
    ct = make_file(tmp_path / "ct.dcm", breast_phantom(64, 48), modality="CT")
    body = client.post("/api/v1/query", content=ct.read_bytes(), headers=DICOM).json()
    assert body["error"] == "wrong_modality" and "CT" in body["reason"]


def test_upload_errors_have_their_own_statuses(client, archive):
    _, files, _ = archive
    assert client.post("/api/v1/query", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.post("/api/v1/query", content=b"", headers=DICOM).status_code == 400
    assert client.post("/api/v1/query", files={"note": (None, "no file here")}).status_code == 400


def test_upload_larger_than_the_limit_is_413(archive):
    cfg, files, _ = archive
    ws = Workspace(cfg)
    with TestClient(create_app(ws, max_upload=1000, warm_up=False)) as small:
        response = small.post("/api/v1/query", content=files[0].read_bytes(), headers=DICOM)
        assert response.status_code == 413 and response.json()["error"] == "bad_upload"
    ws.close()


def test_similar_uses_the_stored_vector_and_matches_the_upload(client, archive):
    _, files, _ = archive
    upload = client.post("/api/v1/query?k=5", content=files[3].read_bytes(), headers=DICOM).json()
    sop = upload["query"]["sop_instance_uid"]
    similar = client.get(f"/api/v1/images/{sop}/similar?k=5").json()
    assert _hits(similar) == _hits(upload)
    assert "decode_preprocess" not in similar["timings_ms"] and "embed" not in similar["timings_ms"]


def test_filters_apply(client, archive):
    _, files, _ = archive
    upload = client.post("/api/v1/query?k=1", content=files[0].read_bytes(), headers=DICOM).json()
    sop, patient = upload["query"]["sop_instance_uid"], upload["query"]["patient_id"]
    left = client.get(f"/api/v1/images/{sop}/similar?k=20&laterality=L").json()["hits"]
    assert left and all(h["laterality"] == "L" for h in left)
    others = client.get(f"/api/v1/images/{sop}/similar?k=20&exclude_same_patient=true").json()["hits"]
    assert len(others) == 8 and all(h["patient_id"] != patient for h in others)
    assert client.get(f"/api/v1/images/{sop}/similar?k=20&view=MLO").json()["hits"] == []  # phantoms are CC


@pytest.mark.parametrize("query", ["k=0", "k=abc", "laterality=X", "k=100000"])
def test_bad_parameters_are_422_json(client, archive, query):
    _, files, _ = archive
    sop = client.post("/api/v1/query?k=1", content=files[0].read_bytes(), headers=DICOM).json()["query"]["sop_instance_uid"]
    response = client.get(f"/api/v1/images/{sop}/similar?{query}")
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"


def test_unknown_image_is_404_everywhere(client):
    for path in ("/api/v1/images/1.2.3.404", "/api/v1/images/1.2.3.404/similar",
                 "/api/v1/images/1.2.3.404/thumbnail.png"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"] == "not_found" and "1.2.3.404" in response.json()["message"]


def test_image_metadata(client, archive):
    _, files, _ = archive
    query = client.post("/api/v1/query?k=1", content=files[4].read_bytes(), headers=DICOM).json()["query"]
    body = client.get(f"/api/v1/images/{query['sop_instance_uid']}").json()
    assert body["path"] == str(files[4]) and body["accession_number"] == query["accession_number"]
    assert body["thumbnail"].endswith("/thumbnail.png") and "vector_id" not in body


def test_thumbnails_are_png_of_the_size_asked_and_cached(client, archive):
    _, files, _ = archive
    sop = client.post("/api/v1/query?k=1", content=files[5].read_bytes(), headers=DICOM).json()["query"]["sop_instance_uid"]
    for size in (48, 64, 300):  # smaller than, equal to and larger than the model's 64 px input
        response = client.get(f"/api/v1/images/{sop}/thumbnail.png?size={size}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED)
        assert max(image.shape) == size and image.std() > 5  # a real picture, not a blank
        assert "private" in response.headers["cache-control"] and response.headers["etag"]
        again = client.get(f"/api/v1/images/{sop}/thumbnail.png?size={size}",
                           headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304 and not again.content
    assert client.get(f"/api/v1/images/{sop}/thumbnail.png?size=5000").status_code == 422


def test_status_and_info(client, archive):
    cfg, _, _ = archive
    status = client.get("/api/v1/status").json()
    assert status == Workspace(cfg).status()
    info = client.get("/api/v1/info").json()
    assert info["ntotal"] == 10 and info["model_key"] == status["model_versions"][0]["key"]
    import torch
    assert info["runtime"] == ("torch" if torch.cuda.is_available() else "onnx")  # auto: a ResNet on the CPU


def test_docs_and_pages_are_served(client):
    assert "/api/v1/query" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    for page in ("/", "/qc"):
        html = client.get(page).text
        assert "<script" in html and "/static/common.js" in html
    assert "searchBySop" in client.get("/static/app.js").text


def test_metrics_count_routes_stages_and_index(client, archive):
    _, files, _ = archive
    client.post("/api/v1/query?k=2", content=files[0].read_bytes(), headers=DICOM)
    client.get("/api/v1/info")
    text = client.get("/metrics").text
    assert 'mretrieve_requests_total{method="POST",route="/api/v1/query",status="200"}' in text
    assert 'mretrieve_stage_seconds_count{stage="embed"}' in text
    assert 'mretrieve_stage_seconds_count{stage="search"}' in text
    assert "mretrieve_index_vectors 10.0" in text and "mretrieve_live_model_info" in text


def test_qc_latest_is_404_before_a_sweep_then_shows_it(tmp_path):
    from tests.conftest import make_config
    from tests.pipeline.test_runner import synthetic_archive
    files = synthetic_archive(tmp_path / "archive", 8)
    copy = make_file(tmp_path / "archive" / "copy.dcm", breast_phantom(128, 96, side="L", seed=0),
                     accession="ACC9999", patient_id="P9999", laterality="L", syntax="explicit")
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 64, "batch_size": 4})
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    with TestClient(create_app(ws, warm_up=False)) as client:
        response = client.get("/api/v1/qc/latest")
        assert response.status_code == 404 and response.json()["remedies"][0]["action"] == "qc"
        run_qc(ws.corpus(), k=3)
        run_qc(ws.corpus(), k=3)
        sweep = client.get("/api/v1/qc/latest?top=5").json()
    assert sweep["n_images"] == 9 and sweep["previous_run_id"] == sweep["run_id"] - 1
    assert [r["rank"] for r in sweep["scores"][:5]] == [1, 2, 3, 4, 5]
    assert all(r["previous_rank"] is not None and r["new"] is False for r in sweep["scores"][:5])
    pair = {sweep["duplicates"][0]["a"]["path"], sweep["duplicates"][0]["b"]["path"]}
    assert pair == {str(files[0]), str(copy)}  # the planted copy is the first duplicate pair
    ws.close()


def test_token_guards_everything_but_healthz(archive):
    cfg, _, _ = archive
    token = "s3cret-token-0123456789"
    ws = Workspace(cfg)
    with TestClient(create_app(ws, token=token, warm_up=False)) as client:
        assert client.get("/healthz").status_code in (200, 503)
        for path in ("/api/v1/status", "/metrics", "/", "/docs", "/static/app.js"):
            denied = client.get(path)
            assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer", path
        assert client.get("/api/v1/status", headers={"Authorization": "Bearer wrong-token-0123456"}).status_code == 401
        assert client.get("/api/v1/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        opened = client.get(f"/?token={token}", follow_redirects=False)
        assert opened.status_code == 303 and "token" not in opened.headers["location"]
        assert "httponly" in opened.headers["set-cookie"].lower()
        assert client.get("/api/v1/status").status_code == 200  # the cookie now stands in for the header
    ws.close()


def test_concurrent_requests_all_succeed(client, archive):
    _, files, _ = archive
    expected = {}
    for f in files[:4]:
        body = client.post("/api/v1/query?k=3", content=f.read_bytes(), headers=DICOM).json()
        expected[f] = body
    barrier = threading.Barrier(12)

    def one(i):
        f = files[i % 4]
        barrier.wait()
        if i % 3 == 0:
            return f, client.get(f"/api/v1/images/{expected[f]['query']['sop_instance_uid']}/similar?k=3")
        if i % 3 == 1:
            return f, client.get(f"/api/v1/images/{expected[f]['hits'][0]['sop_instance_uid']}/thumbnail.png")
        return f, client.post("/api/v1/query?k=3", content=f.read_bytes(), headers=DICOM)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    assert [r.status_code for _, r in results] == [200] * 24
    for f, r in results:
        if r.headers["content-type"] == "application/json":
            assert _hits(r.json()) == _hits(expected[f])


def test_another_process_ingest_and_reindex_are_picked_up_while_serving(tmp_path):
    from tests.conftest import make_config
    from tests.pipeline.test_reindex import finetuned_weights
    from tests.pipeline.test_runner import synthetic_archive
    files = synthetic_archive(tmp_path / "first", 6)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 64, "batch_size": 4})
    Workspace(cfg).ingest(tmp_path / "first", workers=0)
    ws = Workspace(cfg)
    with TestClient(create_app(ws)) as client:
        wait_healthy(client)
        before = client.get("/api/v1/info").json()
        assert before["ntotal"] == 6
        synthetic_archive(tmp_path / "second", 4)
        Workspace(cfg).ingest(tmp_path / "second", workers=0)  # another writer
        assert client.get("/api/v1/info").json()["ntotal"] == 10
        other = Workspace(cfg)
        switched = other.reindex(str(finetuned_weights(other, tmp_path / "new.pt")))
        after = client.get("/api/v1/info").json()
        assert after["model_key"] == switched["live"] != before["model_key"] and after["ntotal"] == 10
        upload = client.post("/api/v1/query?k=3", content=files[0].read_bytes(), headers=DICOM)
        assert upload.status_code == 200 and len(upload.json()["hits"]) == 3
        Workspace(cfg).rollback()
        assert client.get("/api/v1/info").json()["model_key"] == before["model_key"]
    ws.close()
