"""`mretrieve serve` as a user runs it: a real uvicorn process, the URL printed while the model warms up,
no open bind without a token, and no PatientID or PatientName in its log."""
import socket
import time

import httpx
import pytest
from click.testing import CliRunner

from mammo_retrieval.app.cli import cli
from mammo_retrieval.app.http.server import check_bind, is_loopback, resolve_token
from mammo_retrieval.core.errors import ConfigError, PacsError
from mammo_retrieval.core.netaddr import bind
from tests.app.http.conftest import TINY, running_server, write_config
from tests.conftest import make_config
from tests.factory import breast_phantom, make_file

TOKEN = "tok-0123456789abcdef-xyz"


def _serve(tmp_path, *args, env=None):
    return CliRunner().invoke(cli, ["serve", *args], env={"MRETRIEVE_HOME": str(tmp_path), **(env or {})},
                              catch_exceptions=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_an_open_bind_without_a_token_exits_2_and_says_why(tmp_path, host, monkeypatch):
    monkeypatch.delenv("MRETRIEVE_TOKEN", raising=False)
    result = _serve(tmp_path, "--host", host)
    assert result.exit_code == 2
    assert f"refusing to serve on {host} without a token" in result.output and "--token-file" in result.output


def test_every_address_without_a_token_is_refused_as_every_address(tmp_path, monkeypatch):
    monkeypatch.delenv("MRETRIEVE_TOKEN", raising=False)
    result = _serve(tmp_path, "--host", "")
    assert result.exit_code == 2 and "refusing to serve on * (every address) without a token" in result.output


def test_bad_token_files_exit_2(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    assert "empty" in _serve(tmp_path, "--host", "0.0.0.0", "--token-file", str(empty)).output
    result = _serve(tmp_path, "--host", "0.0.0.0", "--token-file", str(short))
    assert result.exit_code == 2 and "at least 16" in result.output
    assert _serve(tmp_path, "--token-file", str(tmp_path / "missing.txt")).exit_code == 2


def test_serve_on_a_port_in_use_exits_12_naming_the_address_with_a_hint(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PacsError):  # checked first, so that a bind that succeeds fails here, not serves
            bind("127.0.0.1", port)
        result = _serve(tmp_path, "--port", str(port))
    assert result.exit_code == 12, result.output  # as `mretrieve listen`; not 3, which is "rejected DICOM"
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in result.output
    assert "hint: choose another --port, or stop what holds it" in result.output


def test_a_host_not_of_this_machine_is_a_usage_error_and_port_0_is_one_port_for_every_address():
    with pytest.raises(ConfigError, match="cannot listen on 192.0.2.1:") as raised:  # TEST-NET-1: not ours
        bind("192.0.2.1", 0)
    assert "--host must be" in raised.value.hint
    with pytest.raises(ConfigError, match="--host|no-such-host"):
        bind("no-such-host.invalid", 0)
    sockets = bind("localhost", 0)  # one address or two (127.0.0.1, ::1): the same port on each
    try:
        assert len({sock.getsockname()[1] for sock in sockets}) == 1
    finally:
        for sock in sockets:
            sock.close()


def test_cannot_listen_names_the_option_to_change():
    import errno

    from mammo_retrieval.core.netaddr import cannot_listen
    busy = cannot_listen("127.0.0.1", 8000, OSError(errno.EADDRINUSE, "Address already in use"))
    assert isinstance(busy, PacsError) and "--port" in busy.hint
    privileged = cannot_listen("0.0.0.0", 104, OSError(errno.EACCES, "Permission denied"))
    assert isinstance(privileged, ConfigError) and "below 1024" in privileged.hint  # not a --host problem
    foreign = cannot_listen("", 8000, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    assert "--host" in foreign.hint and foreign.message.startswith("cannot listen on *:8000: ")


def test_token_resolution_and_bind_rules(tmp_path):
    file = tmp_path / "t.txt"
    file.write_text(TOKEN + "\nsecond line ignored\n")
    assert resolve_token(file, {}) == TOKEN
    assert resolve_token(None, {"MRETRIEVE_TOKEN": TOKEN}) == TOKEN
    assert resolve_token(None, {}) is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(ConfigError):
        check_bind("0.0.0.0", None)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Phantoms whose headers carry a distinctive PatientName and PatientID, ingested by the CLI."""
    from mammo_retrieval.app.workspace import Workspace
    root = tmp_path_factory.mktemp("served")
    for i in range(6):
        make_file(root / "archive" / f"{i}.dcm", breast_phantom(128, 96, side="LR"[i % 2], seed=i),
                  laterality="LR"[i % 2], accession=f"ACC{i}", patient_id=f"SECRETPID{i // 2}",
                  PatientName=f"Doe^Secretname{i // 2}")
    config = write_config(root / "config.yaml", TINY)
    ws = Workspace(make_config(root, encoder=TINY))
    ws.ingest(root / "archive", workers=0)
    ws.close()
    return root, config


def test_a_real_server_prints_its_url_serves_and_logs_no_patient_identity(home):
    root, config = home
    with running_server(root, config=config) as (proc, url):
        assert url.startswith("http://127.0.0.1:")
        upload = httpx.post(url + "api/v1/query?k=3", content=(root / "archive" / "0.dcm").read_bytes(),
                            headers={"Content-Type": "application/dicom"}, timeout=60)
        assert upload.status_code == 200 and upload.json()["query"]["patient_id"] == "SECRETPID0"
        sop = upload.json()["hits"][0]["sop_instance_uid"]
        assert httpx.get(url + f"api/v1/images/{sop}/similar", timeout=30).status_code == 200
        assert httpx.post(url + "api/v1/query", content=b"not a dicom", timeout=30,
                          headers={"Content-Type": "application/dicom"}).status_code == 422
        assert httpx.get(url + "metrics", timeout=30).status_code == 200
    log = "".join(proc.log_lines)
    assert "index" in log and "serving encoder" in log  # -vv did log
    assert "SECRETPID" not in log and "Secretname" not in log


def test_a_real_server_with_a_token_on_an_open_bind(home, tmp_path):
    root, config = home
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN)
    with running_server(root, "--host", "0.0.0.0", "--token-file", str(token_file), config=config) as (proc, url):
        local = url.replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(local + "api/v1/status", timeout=30).status_code == 401
        assert httpx.get(local + "api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=30).status_code == 200
    assert TOKEN not in "".join(proc.log_lines)


def test_the_server_starts_on_an_empty_home_and_says_why_it_cannot_answer(tmp_path):
    with running_server(tmp_path, wait_ready=False) as (proc, url):
        for _ in range(600):
            health = httpx.get(url + "healthz", timeout=30).json()
            if health["status"] != "loading":
                break
            time.sleep(0.05)
        assert health["status"] == "error" and "database" in health["message"]
        response = httpx.get(url + "api/v1/info", timeout=30)
        assert response.status_code == 503 and response.json()["error"] == "no_database"


def test_a_client_that_hangs_up_mid_upload_is_no_server_error(home):
    """A caller that declares more bytes than it sends, then closes, is counted as 499 (its own doing),
    with no traceback in the log."""
    root, config = home
    with running_server(root, config=config) as (proc, url):
        host, port = url.split("//")[1].rstrip("/").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"POST /api/v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000)
            time.sleep(0.5)
        metrics = ""
        for _ in range(50):  # the server notices the closed connection on its next read
            metrics = httpx.get(url + "metrics", timeout=30).text
            if 'route="/api/v1/query",status="499"' in metrics:
                break
            time.sleep(0.2)
        assert 'route="/api/v1/query",status="499"' in metrics
        assert 'status="500"' not in metrics
    log = "".join(proc.log_lines)
    assert "Traceback" not in log and "ClientDisconnect" not in log and "ERROR" not in log, log[-3000:]
