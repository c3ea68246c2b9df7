"""A small archive of phantom mammograms, ingested once, served in-process by a TestClient."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
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


MRETRIEVE = Path(sys.executable).parent / "mretrieve"


@contextmanager
def running_server(home: Path, *args: str, config: Path | None = None, env: dict | None = None,
                   wait_ready: bool = True):
    """A real `mretrieve serve` process on a free loopback port; yields (process, url). Its stderr (the log)
    is collected in process.log_lines."""
    command = [str(MRETRIEVE), "-vv"] + (["--config", str(config)] if config else []) + ["serve", "--port", "0", *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MRETRIEVE_")}
    full_env.update({"MRETRIEVE_HOME": str(home), **(env or {})})
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    proc.log_lines = []
    threading.Thread(target=lambda: proc.log_lines.extend(proc.stderr), daemon=True).start()
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving on (http://\S+/)", line)
        assert match, f"no URL printed: {line!r}; log: {''.join(proc.log_lines)}"
        url = match.group(1)
        if wait_ready:
            end = time.monotonic() + 120
            while time.monotonic() < end:
                try:
                    status = httpx.get(url + "healthz", timeout=5).json()["status"]
                except httpx.HTTPError:
                    status = "unreachable"
                if status == "ok":
                    break
                assert status in ("loading", "unreachable"), f"warm-up failed: {status}; {''.join(proc.log_lines)}"
                time.sleep(0.1)
            else:
                raise AssertionError("the server never became healthy")
        yield proc, url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_config(path: Path, encoder: dict) -> Path:
    import yaml
    path.write_text(yaml.safe_dump({"encoder": encoder}))
    return path
