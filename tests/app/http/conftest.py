"""A small archive of phantom mammograms, ingested once, served in-process by a TestClient."""
import time

import pytest
from fastapi.testclient import TestClient

from mammo_retrieval.app.http.api import create_app
from mammo_retrieval.app.workspace import Workspace
from tests.conftest import make_config
from tests.pipeline.test_runner import synthetic_archive

TINY = {"name": "resnet18", "input_size": 64, "batch_size": 4}


def wait_healthy(client: TestClient, seconds: float = 60) -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        response = client.get("/healthz")
        if response.json()["status"] != "loading":
            return response.json()
        time.sleep(0.05)
    raise AssertionError("the server never finished warming up")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    files = synthetic_archive(root / "archive", 10)
    cfg = make_config(root / "state", encoder=TINY)
    Workspace(cfg).ingest(root / "archive", workers=0)
    return cfg, files, root


@pytest.fixture(scope="module")
def client(archive):
    cfg, _, _ = archive
    ws = Workspace(cfg)
    with TestClient(create_app(ws)) as client:
        assert wait_healthy(client)["status"] == "ok"
        yield client
    ws.close()
