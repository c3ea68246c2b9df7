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


def test_health_turns_ok_once_an_ingest_gives_the_server_something_to_serve(tmp_path):
    """Started on an empty home, the server is 503 error; after an ingest it is ok, without a restart
    (a failed warm-up is tried again, at most every warm_up_retry_s)."""
    from tests.app.http.conftest import TINY
    from tests.conftest import make_config
    cfg = make_config(tmp_path / "state", encoder=TINY)
    for i in range(3):
        make_file(tmp_path / "archive" / f"{i}.dcm", breast_phantom(128, 96, side="L", seed=i))
    ws = Workspace(cfg)
    with TestClient(create_app(ws)) as client:
        failed = wait_healthy(client)
        assert failed["status"] == "error" and "no database" in failed["message"]
        client.app.state.server.warm_up_retry_s = 3600.0
        Workspace(cfg).ingest(tmp_path / "archive", workers=0)
        assert client.get("/healthz").json()["status"] == "error"  # not retried yet: at most every retry_s
        client.app.state.server.warm_up_retry_s = 0.0
        healthy = client.get("/healthz")
        assert healthy.status_code == 200 and healthy.json()["status"] == "ok"
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


@pytest.mark.parametrize("query", ["k=0", "k=abc", "laterality=X", "view=XX", "k=100000"])
def test_bad_parameters_are_422_json(client, archive, query):
    _, files, _ = archive
    sop = client.post("/api/v1/query?k=1", content=files[0].read_bytes(), headers=DICOM).json()["query"]["sop_instance_uid"]
    response = client.get(f"/api/v1/images/{sop}/similar?{query}")
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"


@pytest.mark.parametrize("route", ["query", "similar", "similar.kos"])
def test_an_unknown_view_or_laterality_is_422_naming_the_parameter_and_its_values_on_every_filtered_route(
        client, archive, route):
    _, files, _ = archive
    data = files[0].read_bytes()
    sop = client.post("/api/v1/query?k=1", content=data, headers=DICOM).json()["query"]["sop_instance_uid"]

    def ask(query):
        if route == "query":
            return client.post(f"/api/v1/query?{query}", content=data, headers=DICOM)
        return client.get(f"/api/v1/images/{sop}/{route}?{query}")

    for query, parameter, allowed in [("view=XX", "view", ["CC", "MLO", "ML", "LM", "XCCL"]),
                                      ("laterality=X", "laterality", ["L", "R"])]:
        response = ask(query)
        assert response.status_code == 422, (query, response.text)
        body = response.json()
        assert body["error"] == "invalid_request" and f"query.{parameter}" in body["message"], body
        assert all(f"'{value}'" in body["message"] for value in allowed), body["message"]
    assert ask("view=CC&laterality=L").status_code == 200


def test_view_and_laterality_filters_take_any_case_and_empty_is_no_filter_as_on_the_cli(client, archive):
    _, files, _ = archive
    upload = client.post("/api/v1/query?k=1", content=files[0].read_bytes(), headers=DICOM).json()
    sop = upload["query"]["sop_instance_uid"]
    every = client.get(f"/api/v1/images/{sop}/similar?k=20").json()["hits"]
    assert len(every) == 9 and all(h["view"] == "CC" for h in every)  # phantoms are CC
    assert client.get(f"/api/v1/images/{sop}/similar?k=20&view=cc").json()["hits"] == every
    assert client.get(f"/api/v1/images/{sop}/similar?k=20&view=&laterality=").json()["hits"] == every
    left = [h["sop_instance_uid"] for h in client.get(f"/api/v1/images/{sop}/similar?k=20&laterality=l").json()["hits"]]
    assert left and left == [h["sop_instance_uid"] for h in every if h["laterality"] == "L"] and len(left) < len(every)


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
    client.get("/api/v1/studies/ACC0001/similar?k=1")
    text = client.get("/metrics").text  # a route's template, as the README writes it (no convertor)
    assert 'mretrieve_requests_total{method="GET",route="/api/v1/studies/{study_key}/similar",status="200"}' in text
    client.get("/openapi.json")
    client.get("/docs")
    client.get("/no/such/page")
    text = client.get("/metrics").text  # FastAPI's own routes leave none in the scope: counted by their path
    assert 'mretrieve_requests_total{method="GET",route="/openapi.json",status="200"}' in text
    assert 'mretrieve_requests_total{method="GET",route="/docs",status="200"}' in text
    assert 'mretrieve_requests_total{method="GET",route="unmatched",status="404"}' in text


def test_an_unexpected_error_is_a_500_counted_in_the_metrics(archive, monkeypatch):
    """A bug in a route answers 500 in our error shape, and the request counter has it (the 500 handler runs
    outside the measuring middleware, which let such requests go uncounted)."""
    cfg, _, _ = archive
    ws = Workspace(cfg)

    def broken():
        raise RuntimeError("a bug")

    with TestClient(create_app(ws), raise_server_exceptions=False) as client:
        assert wait_healthy(client)["status"] == "ok"
        monkeypatch.setattr(ws.search, "info", broken)
        response = client.get("/api/v1/info")
        assert response.status_code == 500 and response.json()["message"] == "RuntimeError (see the server log)"
        text = client.get("/metrics").text
    ws.close()
    assert 'mretrieve_requests_total{method="GET",route="/api/v1/info",status="500"} 1.0' in text
    assert 'mretrieve_request_seconds_count{route="/api/v1/info"} 1.0' in text


def test_a_home_without_a_database_or_an_index_is_503_saying_which_while_an_unknown_image_stays_404(tmp_path):
    from tests.app.http.conftest import TINY
    from tests.conftest import make_config
    upload = make_file(tmp_path / "q.dcm", breast_phantom(128, 96, side="L", seed=0)).read_bytes()
    ws = Workspace(make_config(tmp_path / "state", encoder=TINY))
    requests = [("GET", "/api/v1/info"), ("POST", "/api/v1/query"), ("GET", "/api/v1/status"),
                ("GET", "/api/v1/images/1.2.3.404"), ("GET", "/api/v1/images/1.2.3.404/similar"),
                ("GET", "/api/v1/images/1.2.3.404/thumbnail.png"), ("GET", "/api/v1/images/1.2.3.404/similar.kos"),
                ("GET", "/api/v1/studies/NO-SUCH-ACC/similar"), ("GET", "/api/v1/qc/latest")]
    with TestClient(create_app(ws, warm_up=False)) as client:
        for method, path in requests:  # nothing ingested yet: no database
            response = client.request(method, path, content=upload, headers=DICOM)
            assert response.status_code == 503, (path, response.text)
            body = response.json()
            assert body["error"] == "no_database" and body["message"].startswith("no database at"), body
            assert body["remedies"][0]["action"] == "ingest"
        ws.ensure_database()  # a database (as `mretrieve db upgrade` makes), still nothing ingested: no index
        for method, path in [("GET", "/api/v1/info"), ("POST", "/api/v1/query"),
                             ("GET", "/api/v1/images/1.2.3.404/similar")]:
            response = client.request(method, path, content=upload, headers=DICOM)
            assert response.status_code == 503 and response.json()["error"] == "no_index", (path, response.text)
        unknown = client.get("/api/v1/images/1.2.3.404")
        assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    ws.close()


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


# --- the boundary: path parameters, upload size, redirects, missing sources -------------------------------

def pydicom_sop(path) -> str:
    import pydicom
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture
def served(database_url, tmp_path):
    """Four phantoms (two studies) ingested into SQLite or a real PostgreSQL, served in-process."""
    from tests.conftest import make_config
    from tests.pipeline.test_runner import synthetic_archive
    files = synthetic_archive(tmp_path / "archive", 4)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 64, "batch_size": 4},
                      paths={"database_url": database_url})
    ws = Workspace(cfg)
    assert ws.ingest(tmp_path / "archive", workers=0).ingested == 4
    with TestClient(create_app(ws, warm_up=False), raise_server_exceptions=False) as client:  # a 500 is a status
        yield client, files
    ws.close()


MALFORMED = [("/api/v1/images/%00", "sop_instance_uid"),
             ("/api/v1/images/a%00b/similar", "sop_instance_uid"),
             ("/api/v1/images/%00/thumbnail.png", "sop_instance_uid"),
             ("/api/v1/images/a%00b/similar.kos", "sop_instance_uid"),
             ("/api/v1/images/" + "1." * 40 + "1/similar", "sop_instance_uid"),  # 81 characters
             ("/api/v1/studies/%00/similar", "study_key"),
             ("/api/v1/studies/ACC%0A0000/similar", "study_key"),
             ("/api/v1/studies/" + "A" * 129 + "/similar", "study_key"),
             ("/api/v1/qc/kos/1.2%003", "study_instance_uid")]


def test_malformed_path_parameters_are_422_naming_them_on_both_databases(served):
    client, files = served
    for path, parameter in MALFORMED:
        response = client.get(path)
        assert response.status_code == 422, (path, response.status_code, response.text)
        body = response.json()
        assert body["error"] == "invalid_request" and f"path.{parameter}" in body["message"], path
    # well-formed ones still reach the catalog: unknown is 404, indexed is 200
    sop = pydicom_sop(files[0])
    assert client.get("/api/v1/images/1.2.3.404").status_code == 404
    assert client.get("/api/v1/images/1.2.840.abc").status_code == 404  # off the standard, as archives have
    assert client.get("/api/v1/studies/NO-SUCH-ACC/similar").status_code == 404
    assert client.get(f"/api/v1/images/{sop}").status_code == 200
    assert client.get(f"/api/v1/images/{sop}/similar?k=2").status_code == 200
    assert client.get("/api/v1/studies/ACC0000/similar?k=1").status_code == 200


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "mretrieve-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/dicom\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _chunked(data: bytes, size: int = 1024):
    for start in range(0, len(data), size):  # a generator body: httpx sends it chunked, no Content-Length
        yield data[start:start + size]


def test_uploads_over_the_limit_are_413_in_every_form(archive):
    cfg, files, _ = archive
    data = files[0].read_bytes()
    limit = len(data) // 2
    multipart, kind = _multipart("big.dcm", data)
    ws = Workspace(cfg)
    with TestClient(create_app(ws, max_upload=limit, warm_up=False)) as small:
        for label, response in [
            ("multipart", small.post("/api/v1/query", files={"file": ("big.dcm", data, "application/dicom")})),
            ("raw, chunked", small.post("/api/v1/query", content=_chunked(data), headers=DICOM)),
            ("multipart, chunked", small.post("/api/v1/query", content=_chunked(multipart),
                                              headers={"Content-Type": kind}))]:
            assert response.status_code == 413, (label, response.status_code, response.text)
            body = response.json()
            assert body["error"] == "bad_upload" and f"limit of {limit} bytes" in body["message"], label
    ws.close()


def test_uploads_under_the_limit_are_served_in_every_form(archive):
    cfg, files, _ = archive
    data = files[1].read_bytes()
    multipart, kind = _multipart("mine.dcm", data)
    ws = Workspace(cfg)
    with TestClient(create_app(ws, max_upload=len(data) + 1024, warm_up=False)) as exact:  # room for the framing
        expected = _hits(exact.post("/api/v1/query?k=3", content=data, headers=DICOM).json())
        for label, response in [
            ("multipart", exact.post("/api/v1/query?k=3", files={"file": ("mine.dcm", data, "application/dicom")})),
            ("raw, chunked", exact.post("/api/v1/query?k=3", content=_chunked(data), headers=DICOM)),
            ("multipart, chunked", exact.post("/api/v1/query?k=3", content=_chunked(multipart),
                                              headers={"Content-Type": kind}))]:
            assert response.status_code == 200, (label, response.text)
            assert _hits(response.json()) == expected, label
    ws.close()


def test_a_multipart_upload_is_never_spilled_to_disk(archive, tmp_path, monkeypatch):
    import tempfile
    cfg, _, _ = archive
    big = make_file(tmp_path / "big.dcm", breast_phantom(1024, 768, seed=3))  # ~1.5 MB: past Starlette's 1 MiB spool
    assert big.stat().st_size > 1024 * 1024

    def spill(self):
        raise AssertionError("the upload was written to a temporary file")
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", spill)
    ws = Workspace(cfg)
    with TestClient(create_app(ws, warm_up=False)) as client:
        response = client.post("/api/v1/query?k=1", files={"file": ("big.dcm", big.read_bytes(), "application/dicom")})
        assert response.status_code == 200, response.text
        assert response.json()["query"]["path"] == "big.dcm"
    ws.close()


def test_a_malformed_multipart_upload_is_400(client):
    response = client.post("/api/v1/query", content=b"--x\r\nnot a part",
                           headers={"Content-Type": "multipart/form-data"})  # no boundary
    assert response.status_code == 400 and response.json()["error"] == "bad_upload"
    assert "multipart" in response.json()["message"]


def _raw_get(app, path: str, query: str) -> tuple[int, dict[str, str]]:
    """One GET straight through ASGI, ``path`` as a server hands it on (percent-decoded, unnormalised)."""
    import asyncio
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"mretrieve.example")], "server": ("mretrieve.example", 80),
             "client": ("127.0.0.1", 5000)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}


@pytest.mark.parametrize("path, expected", [
    ("//evil.example/x", "/evil.example/x"), ("///evil.example/x", "/evil.example/x"),
    ("/\\evil.example/x", "/%5Cevil.example/x"), ("//\\evil.example/x", "/%5Cevil.example/x"),  # a path: %5C
    ("/\\/evil.example/x", "/%5C/evil.example/x")])
def test_the_token_redirect_stays_on_this_origin(archive, path, expected):
    cfg, _, _ = archive
    token = "s3cret-token-0123456789"
    ws = Workspace(cfg)
    app = create_app(ws, token=token, warm_up=False)
    status, headers = _raw_get(app, path, f"token={token}&k=2")
    assert status == 303 and headers["location"] == f"{expected}?k=2", headers["location"]
    status, headers = _raw_get(app, "/", f"token={token}")
    assert status == 303 and headers["location"] == "/" and "httponly" in headers["set-cookie"].lower()
    ws.close()


def test_a_thumbnail_whose_source_is_gone_is_404_without_blaming_the_request(tmp_path):
    from tests.conftest import make_config
    from tests.pipeline.test_runner import synthetic_archive
    files = synthetic_archive(tmp_path / "archive", 2)
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 64, "batch_size": 4}))
    ws.ingest(tmp_path / "archive", workers=0)
    sop = pydicom_sop(files[0])
    files[0].rename(tmp_path / "moved.dcm")
    with TestClient(create_app(ws, warm_up=False)) as client:
        assert client.get(f"/api/v1/images/{sop}/thumbnail.png?size=64").status_code == 200  # the model's cache
        response = client.get(f"/api/v1/images/{sop}/thumbnail.png?size=512")  # never prepared: needs the file
        assert response.status_code == 404, response.text
        body = response.json()
        assert body["error"] == "not_found" and sop in body["message"]
        assert str(tmp_path) not in body["message"] + str(body["hint"])
    ws.close()


def test_a_study_key_with_a_slash_is_served_and_every_refusal_has_the_error_shape(tmp_path):
    """An AccessionNumber such as 2023/0001 reaches the study route (%2F arrives decoded); the framework's
    own 404 and 405 answer in the API's error shape, without echoing the path (it may hold an accession)."""
    from mammo_retrieval.analysis.vectors import load_embeddings
    from tests.app.http.conftest import TINY
    from tests.conftest import make_config
    for i, accession in enumerate(["2023/0001", "2023/0001", "2023/0002", "2023/0002"]):
        make_file(tmp_path / "archive" / f"img{i}.dcm", breast_phantom(128, 96, side="LR"[i % 2], seed=i),
                  accession=accession, patient_id=f"P{i // 2}", laterality="LR"[i % 2])
    ws = Workspace(make_config(tmp_path / "state", encoder=TINY))
    assert ws.ingest(tmp_path / "archive", workers=0).ingested == 4
    table = load_embeddings(ws.corpus()).meta
    with TestClient(create_app(ws, warm_up=False)) as client:
        response = client.get("/api/v1/studies/2023%2F0001/similar?k=1")
        assert response.status_code == 200, response.text
        assert [h["study_key"] for h in response.json()["hits"]] == ["2023/0002"]
        missing = client.get("/api/v1/studies/2023%2F0009/similar")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        # an image query names its study's key: the page links it to the study search
        for sop, accession in zip(table.sop_instance_uid, table.accession_number):
            assert client.get(f"/api/v1/images/{sop}/similar?k=1").json()["query"]["study_key"] == accession
        for method, path, status in (("GET", "/api/v1/no-such-route/2023/0001", 404),
                                     ("POST", "/api/v1/info", 405)):
            refused = client.request(method, path)
            body = refused.json()
            assert refused.status_code == status and set(body) == {"error", "message", "hint", "remedies"}
            assert "2023" not in body["message"] and body["error"] in ("not_found", "method_not_allowed")
        assert client.request("POST", "/api/v1/info").headers["allow"] == "GET"
    ws.close()


def test_an_image_or_study_whose_uid_is_not_plain_is_reachable_by_every_route(tmp_path):
    """Ingest keeps hand-made UIDs ("1.2/../../etc/passwd", "?", "#", "&"); each route reaches them when the
    caller percent-encodes them, and every link the API hands out is encoded. (A UID ending in "/similar"
    stays ambiguous: a server reads the path decoded.)"""
    from urllib.parse import quote

    from tests.app.http.conftest import TINY
    from tests.conftest import make_config
    uids = ["1.2/../../etc/passwd", "1.2.3?x=1#y", "1.2.3&x;y/z", "1.2.840.5"]
    studies = ["<script>alert(4)</script>", "9.8/7", "9.8/7", "9.8.7.6"]
    for i, (sop, study) in enumerate(zip(uids, studies)):
        make_file(tmp_path / "archive" / f"img{i}.dcm", breast_phantom(128, 96, side="LR"[i % 2], seed=i),
                  sop_uid=sop, study_uid=study, accession=f"ACC{i}", patient_id=f"P{i}", laterality="LR"[i % 2])
    ws = Workspace(make_config(tmp_path / "state", encoder=TINY))
    assert ws.ingest(tmp_path / "archive", workers=0).ingested == 4
    with TestClient(create_app(ws, warm_up=False)) as client:
        for sop in uids:
            path = f"/api/v1/images/{quote(sop, safe='')}"
            record = client.get(path)
            assert record.status_code == 200 and record.json()["sop_instance_uid"] == sop, record.text
            thumbnail = client.get(record.json()["thumbnail"])
            assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"
            similar = client.get(f"{path}/similar", params={"k": 3})
            assert similar.status_code == 200 and similar.json()["query"]["sop_instance_uid"] == sop
            assert set(h["sop_instance_uid"] for h in similar.json()["hits"]) == set(uids) - {sop}
            assert client.get(f"{path}/similar.kos", params={"k": 2}).status_code == 200
        run_qc(ws.corpus(), method="knn", k=2, header_checks=False, min_pixel_correlation=None)
        listing = client.get("/api/v1/qc/kos", params={"top": 4})
        assert listing.status_code == 200
        documents = listing.json()["documents"]
        assert {d["study_instance_uid"] for d in documents} == set(studies)
        for d in documents:
            assert client.get(d["url"]).status_code == 200, d
    ws.close()
