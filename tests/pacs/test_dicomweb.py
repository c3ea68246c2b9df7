"""Ingest from a real Orthanc over DICOMweb: the same vectors as a folder ingest of the same files, a re-pull
that retrieves nothing, a study broken mid-transfer recorded while the rest is ingested, bearer
authentication, and a cache rebuilt from the stored WADO-RS URL."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mammo_retrieval.app.cli import cli as main
from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.errors import PacsError
from mammo_retrieval.analysis.qc import run_qc
from mammo_retrieval.core.errors import CredentialsRefused, NotFoundError
from mammo_retrieval.pacs.dicomweb import parse_instance_url, redact, with_retries, TransferFailed
from mammo_retrieval.pacs.kos import referenced_sops
from tests.conftest import MIAS_DIR, make_config
from tests.httpproxy import Proxy

TINY = {"name": "resnet18", "input_size": 64, "batch_size": 4}
FAST_RETRIES = {"retries": 1, "backoff_s": 0.01, "timeout_s": 20}


def _archive_files(cbis_files) -> list[Path]:
    """Six MIAS mammograms of three women (three studies) and two CBIS-DDSM ones; six CBIS-DDSM ones
    (several studies) where ../shared is absent."""
    if MIAS_DIR.exists():
        return sorted(MIAS_DIR.glob("P000[1-3]/*.dcm")) + list(cbis_files[:2])
    return list(cbis_files[:6])


@pytest.fixture
def loaded(orthanc, cbis_files, tmp_path):
    """The files uploaded to Orthanc through its REST API, and the same files in a folder."""
    files = _archive_files(cbis_files)
    folder = tmp_path / "folder"
    for i, path in enumerate(files):
        (folder / str(i)).mkdir(parents=True)
        shutil.copy(path, folder / str(i) / path.name)  # a temporary copy, deleted with tmp_path
        orthanc.upload(path)
    return orthanc, folder, files


def _vectors(ws) -> dict[str, np.ndarray]:
    from mammo_retrieval.analysis.vectors import load_embeddings
    table = load_embeddings(ws.corpus())
    return dict(zip(table.meta.sop_instance_uid, table.vectors))


def _paths(ws) -> dict[str, str]:
    from mammo_retrieval.analysis.vectors import load_embeddings
    table = load_embeddings(ws.corpus())
    return dict(zip(table.meta.sop_instance_uid, table.meta.path))


def test_a_pull_equals_a_folder_ingest_and_a_repull_fetches_nothing(loaded, tmp_path, monkeypatch):
    orthanc, folder, files = loaded
    local = Workspace(make_config(tmp_path / "local", encoder=TINY))
    assert local.ingest(folder, workers=1).ingested == len(files)
    with Proxy(orthanc.url) as proxy:
        ws = Workspace(make_config(tmp_path / "pulled", encoder=TINY, pacs=FAST_RETRIES))
        report = ws.ingest(f"{proxy.url}/dicom-web", workers=1)
        assert (report.ingested, report.fetched, report.already_present, report.rejected) == \
            (len(files), len(files), 0, [])
        a, b = _vectors(local), _vectors(ws)
        assert a.keys() == b.keys() and len(a) == len(files)
        # the same pixels in, the same picture out; vectors equal up to the batch's float summation order
        assert all(np.array_equal(local.cached_image(k), ws.cached_image(k)) for k in a), \
            "a pull must decode exactly what a folder ingest does"
        assert min(float(a[k] @ b[k]) for k in a) > 0.99999
        for sop, path in _paths(ws).items():  # the stored path is the instance's WADO-RS URL
            assert path.startswith(f"{proxy.url}/dicom-web/studies/") and parse_instance_url(path).sop_uid == sop
        assert proxy.count("GET /dicom-web/studies/") >= len(files)

        instance_gets = sum(n for key, n in proxy.requests.items() if "/series/" in key and "/instances/" in key)
        assert instance_gets == len(files)  # each instance retrieved exactly once
        again = ws.ingest(f"{proxy.url}/dicom-web", workers=1)
        assert (again.ingested, again.fetched, again.already_present) == (0, 0, len(files))
        assert sum(n for key, n in proxy.requests.items() if "/series/" in key and "/instances/" in key) == \
            instance_gets, "a re-pull must not retrieve a single instance"

        # a lost cache entry is rebuilt from the stored WADO-RS URL (each read-back closes its connections:
        # a server does this for years)
        import mammo_retrieval.pacs.dicomweb as dicomweb
        opened, real_session = [], dicomweb._session

        def recorded_session(cfg):
            session = real_session(cfg)
            session.closed, real_close = False, session.close
            session.close = lambda: (setattr(session, "closed", True), real_close())
            opened.append(session)
            return session

        monkeypatch.setattr(dicomweb, "_session", recorded_session)
        sop = next(iter(b))
        shutil.rmtree(ws.config.cache_dir)
        ws._caches.clear()
        assert ws.cached_image(sop).dtype == np.uint8
        assert sum(n for key, n in proxy.requests.items() if key.endswith(f"/instances/{sop}")) == 2

        # Key Object Selection documents of pulled images read their headers back as WADO-RS metadata
        _, document = ws.similar_kos(sop_instance_uid=sop, k=2)
        assert referenced_sops(document)[0] == sop and len(referenced_sops(document)) == 3
        assert document.StudyInstanceUID == parse_instance_url(_paths(ws)[sop]).study_uid
        assert proxy.count("GET /dicom-web/studies/") and \
            sum(n for key, n in proxy.requests.items() if key.endswith(f"/instances/{sop}/metadata")) >= 1
        assert len(opened) >= 2 and all(session.closed for session in opened)
        run_qc(ws.corpus(), method="knn", k=3, header_checks=False, min_pixel_correlation=None)
        documents = ws.qc_kos(top=3)
        assert documents and sum(len(referenced_sops(d)) for d in documents) >= 3

        with pytest.raises(NotFoundError, match="lists none of the 1 studies asked .--study 1.2.3.404.") as none:
            ws.ingest(f"{proxy.url}/dicom-web", studies=["1.2.3.404"])
        assert "modality" not in none.value.message  # named studies are not filtered by modality


def test_a_study_broken_mid_transfer_is_recorded_and_the_rest_ingested(loaded, tmp_path):
    orthanc, _, files = loaded
    studies = sorted({s["MainDicomTags"]["StudyInstanceUID"] for s in orthanc.get("/studies?expand")})
    broken = studies[0]
    home = tmp_path / "state"
    with Proxy(orthanc.url) as proxy:
        proxy.break_when = f"/studies/{broken}/series/"  # every WADO-RS retrieval of that study: half a body
        ws = Workspace(make_config(home, encoder=TINY, pacs=FAST_RETRIES))
        report = ws.ingest(f"{proxy.url}/dicom-web", workers=1)
        failed = [r for r in report.rejected if r.code == "transfer_failed"]
        assert failed and all(f"/studies/{broken}/" in r.path for r in failed)
        assert all("2 attempt(s)" in r.reason for r in failed)
        assert report.ingested == len(files) - len(failed) and report.ingested > 0
        assert sum(n for key, n in proxy.requests.items() if "/instances/" in key and broken in key) == \
            2 * len(failed), "each broken instance is tried once and retried once"
        recorded = {r["path"] for r in ws.status()["rejected"]}
        assert {r.path for r in failed} <= recorded

        proxy.break_when = None  # the PACS recovers: a rerun takes only what failed, and clears its rejections
        again = ws.ingest(f"{proxy.url}/dicom-web", workers=1)
        assert (again.ingested, again.already_present, again.rejected) == (len(failed), report.ingested, [])
        assert not ws.status()["rejected"]


def test_bearer_token_from_the_environment_and_refusal(loaded, tmp_path, monkeypatch):
    orthanc, _, files = loaded
    home = tmp_path / "state"
    with Proxy(orthanc.url) as proxy:
        proxy.required_token = "s3cret-token"
        runner = CliRunner()
        env = {"MRETRIEVE_HOME": str(home)}
        config = tmp_path / "config.yaml"
        config.write_text("encoder: {name: resnet18, input_size: 64, batch_size: 4}\n"
                          "pacs: {retries: 0, backoff_s: 0.01}\n")
        refused = runner.invoke(main, ["--config", str(config), "ingest", f"{proxy.url}/dicom-web", "--workers", "1",
                                       "--no-progress"], env=env)
        assert refused.exit_code == 12, refused.output
        assert "refused our credentials" in refused.output and "s3cret" not in refused.output
        ok = runner.invoke(main, ["--config", str(config), "ingest", f"{proxy.url}/dicom-web", "--workers", "1",
                                  "--no-progress", "--format", "json"],
                           env=dict(env, MRETRIEVE_DICOMWEB_TOKEN="s3cret-token"))
        assert ok.exit_code == 0, ok.output
        assert f'"ingested": {len(files)}' in ok.output and "s3cret" not in ok.output

        # reading a stored instance back: refused credentials are the PACS's answer (exit 12, HTTP 502) with
        # the credentials hint, not "not found"; an instance the PACS no longer holds is not found
        ws = Workspace(make_config(home, encoder=TINY, pacs={"retries": 0, "backoff_s": 0.01}))
        sop = next(iter(_paths(ws)))
        shutil.rmtree(ws.config.cache_dir)
        with pytest.raises(PacsError, match="HTTP 401") as refused_back:
            ws.cached_image(sop)
        assert "refused our credentials" in str(refused_back.value) and "s3cret" not in str(refused_back.value)
        assert "dicomweb_token" in refused_back.value.hint
        run_qc(ws.corpus(), method="knn", k=3, header_checks=False, min_pixel_correlation=None)
        with pytest.raises(CredentialsRefused):  # not "every flagged image is gone": no document, and why
            ws.qc_kos(top=3)
        proxy.required_token = None
        assert ws.header_of(sop).SOPInstanceUID == sop  # allowed again: read back
        orthanc.delete_instance(sop)
        with pytest.raises(NotFoundError, match="HTTP 404") as gone:
            ws.header_of(sop)
        assert "no longer holds" in gone.value.hint


def test_a_pacs_that_is_down_is_a_clear_error_and_folder_options_are_refused(tmp_path):
    ws = Workspace(make_config(tmp_path / "state", encoder=TINY, pacs=FAST_RETRIES))
    with pytest.raises(PacsError, match="cannot search http://127.0.0.1:9/dicom-web"):
        ws.ingest("http://127.0.0.1:9/dicom-web")
    from mammo_retrieval.core.errors import ConfigError
    with pytest.raises(ConfigError, match="credentials in the URL http://127.0.0.1:9/dicom-web") as info:
        ws.ingest("http://user:pw@127.0.0.1:9/dicom-web")
    assert "pw" not in str(info.value)
    with pytest.raises(ConfigError, match="--study and --since"):
        ws.ingest(tmp_path, since="20200101")
    with pytest.raises(ConfigError, match="--retry-rejected applies to folders"):
        ws.ingest("http://127.0.0.1:9/dicom-web", retry_rejected=True)


def test_retries_back_off_then_give_up_and_a_4xx_is_final():
    import requests
    waits, calls = [], []

    def flaky():
        calls.append(1)
        raise requests.ConnectionError("connection reset")

    with pytest.raises(TransferFailed, match="after 4 attempt"):
        with_retries(flaky, "WADO-RS x", retries=3, backoff_s=0.5, sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0] and len(calls) == 4

    response = requests.Response()
    response.status_code, response.reason = 404, "Not Found"
    gone = requests.HTTPError(response=response)
    calls.clear()

    def missing():
        calls.append(1)
        raise gone

    with pytest.raises(TransferFailed, match="HTTP 404") as final:
        with_retries(missing, "WADO-RS y", retries=3, backoff_s=0.5, sleep=waits.append)
    assert len(calls) == 1 and final.value.status == 404

    def wordy():  # requests nests whole reprs of its connection objects in the message
        raise requests.ConnectionError("Max retries exceeded with url: /dicom-web/studies (Caused by "
                                       "NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f>: "
                                       + "Failed to establish a new connection: " * 10
                                       + "[Errno 111] Connection refused'))")
    with pytest.raises(TransferFailed) as long_one:
        with_retries(wordy, "QIDO-RS z", retries=0, backoff_s=0.5, sleep=waits.append)
    reason = long_one.value.reason
    assert reason.startswith("ConnectionError: Max retries exceeded") and " ... " in reason
    assert reason.endswith("[Errno 111] Connection refused')) after 1 attempt(s)") and len(reason) < 330
    assert redact("http://bob:pw@pacs:8042/dicom-web") == "http://pacs:8042/dicom-web"
    assert redact("http://bob:pw@[::1]:8042/x") == "http://[::1]:8042/x"


def test_qido_paging_reads_until_an_empty_page_and_never_truncates_silently():
    from mammo_retrieval.core.config import load_config
    from mammo_retrieval.pacs import dicomweb
    client = dicomweb.DicomWebClient("http://127.0.0.1:9/dicom-web", load_config(env={}).pacs)
    rows = [{"00080018": {"Value": [f"1.2.{i}"]}} for i in range(25)]

    def capped(limit, offset):  # a server that caps pages at 10, whatever the limit
        return rows[offset:offset + min(limit, 10)]

    assert len(client._paged(capped, "00080018", "search")) == 25

    def ignores_offset(limit, offset):  # everything at once (Orthanc 1.10): a short page, repeated
        return rows

    assert len(client._paged(ignores_offset, "00080018", "search")) == 25
    full = [{"00080018": {"Value": [f"9.{i}"]}} for i in range(dicomweb.QIDO_PAGE)]
    with pytest.raises(TransferFailed, match="ignores QIDO-RS offset"):
        client._paged(lambda limit, offset: full, "00080018", "search")
