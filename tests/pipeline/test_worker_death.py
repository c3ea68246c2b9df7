"""A decoding worker process that dies (a segfault in a C decoder, the OOM killer) costs one file, not the
ingest: the pool is replaced, the files in flight are retried one at a time, and the file whose worker
dies alone is rejected (``worker_died``) while the rest are ingested. Every death here is real: a worker
process killed with SIGKILL, by the test or by itself."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import psutil
import pydicom
import pytest

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.pacs.dicomweb import DicomWebClient
from mammo_retrieval.pipeline import executors, runner
from mammo_retrieval.pipeline.executors import WorkerPool, WorkersKeepDying
from mammo_retrieval.pipeline.prepare import prepare_file
from tests.conftest import make_config

DIES_ON = "MRETRIEVE_TEST_WORKER_DIES_ON"  # read in the worker: the environment crosses the fork


def prepare_or_die(source, *args, **kwargs):
    """The real prepare stage, except that the worker process kills itself (SIGKILL, as the OOM killer
    does) on the file named in $MRETRIEVE_TEST_WORKER_DIES_ON, as a segfaulting decoder would."""
    if os.fspath(source) == os.environ.get(DIES_ON):
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare_file(source, *args, **kwargs)


def die_at_start(*_args) -> None:
    """A worker set-up that kills its process: a pool that can never run anything."""
    os.kill(os.getpid(), signal.SIGKILL)


def archive_of(cbis_files: list[Path], folder: Path) -> list[Path]:
    """The 8 CBIS-DDSM files linked into ``folder`` (not copied: they are large)."""
    folder.mkdir(parents=True)
    links = []
    for i, path in enumerate(cbis_files):
        links.append(folder / f"{i}_{path.name}")
        links[-1].symlink_to(path)
    return links


def counts(ws: Workspace) -> tuple[int, int, int]:
    c = ws.status()["counts"]
    return c["images"], c["embeddings"], c["rejected_files"]


def test_a_file_that_kills_its_worker_is_rejected_and_the_rest_ingested(tmp_path, cbis_files, monkeypatch):
    files = archive_of(cbis_files, tmp_path / "archive")
    culprit = files[3]
    monkeypatch.setenv(DIES_ON, str(culprit))
    monkeypatch.setattr(runner, "prepare_file", prepare_or_die)  # what PrepareJob.submit ships to the workers
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "batch_size": 4}))

    report = ws.ingest(tmp_path / "archive", workers=2)
    assert (report.ingested, report.files_seen) == (7, 8)
    assert [(r.path, r.code) for r in report.rejected] == [(str(culprit), "worker_died")]
    assert "decoding process died while reading this file" in report.rejected[0].reason
    assert counts(ws) == (7, 7, 1)
    assert [(r["path"], r["code"]) for r in ws.status()["rejected"]] == [(str(culprit), "worker_died")]

    again = ws.ingest(tmp_path / "archive", workers=2, retry_rejected=True)  # it still crashes: rejected
    assert (again.ingested, again.already_present, [r.path for r in again.rejected]) == (0, 7, [str(culprit)])
    assert counts(ws) == (7, 7, 1)                                         # again, nothing doubled

    monkeypatch.delenv(DIES_ON)  # the decoder is fixed: the file goes in and its rejection goes away
    fixed = ws.ingest(tmp_path / "archive", workers=1, retry_rejected=True)
    assert (fixed.ingested, fixed.already_present, fixed.rejected) == (1, 7, [])
    assert counts(ws) == (8, 8, 0)


def test_a_file_that_killed_its_worker_on_two_runs_is_not_decoded_again_until_it_changes(tmp_path, cbis_files,
                                                                                        monkeypatch):
    """Each rerun used to decode it again, at the cost of a worker's death and restart. Now a file that
    died on two runs is rejected again without decoding while it is unchanged (size, modification and
    change times, inode; the decoders and read options too); a changed one, or --retry-rejected, decodes
    it again. Through the CLI, in this process (its forked workers die)."""
    from click.testing import CliRunner

    from mammo_retrieval.app.cli import cli
    files = archive_of(cbis_files[:3], tmp_path / "archive")
    culprit = files[1]
    monkeypatch.setenv("MRETRIEVE_HOME", str(tmp_path / "state"))
    config = tmp_path / "resnet.yaml"
    config.write_text("encoder:\n  name: resnet18\n")
    monkeypatch.setenv(DIES_ON, str(culprit))
    monkeypatch.setattr(runner, "prepare_file", prepare_or_die)

    def ingest(*options: str) -> dict:
        result = CliRunner().invoke(cli, ["--config", str(config), "ingest", str(tmp_path / "archive"),
                                          "--workers", "1", "--format", "json", "--no-progress", *options],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.output[result.output.index("{"):])

    died = "decoding process died while reading this file"
    first = ingest()
    assert (first["ingested"], [(r["path"], r["code"]) for r in first["rejections"]]) == \
        (2, [(str(culprit), "worker_died")])
    second = ingest()  # one death may be the machine's: decoded again, and it dies again
    assert (second["ingested"], [r["path"] for r in second["rejections"]]) == (0, [str(culprit)])
    assert died in second["rejections"][0]["reason"]

    monkeypatch.delenv(DIES_ON)  # it would decode now: only the record keeps it out
    again = ingest()
    assert (again["ingested"], again["already_present"]) == (0, 2)
    assert [(r["path"], r["code"]) for r in again["rejections"]] == [(str(culprit), "worker_died")]
    assert "so it was not decoded again" in again["rejections"][0]["reason"] and "--retry-rejected" in again["rejections"][0]["reason"]
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18"}))
    assert counts(ws) == (2, 2, 1)
    assert ingest()["rejections"][0]["reason"] == again["rejections"][0]["reason"]  # and on every run after

    monkeypatch.setenv(DIES_ON, str(culprit))  # retried on demand: it dies again, recorded again
    retried = ingest("--retry-rejected")
    assert died in retried["rejections"][0]["reason"]
    monkeypatch.delenv(DIES_ON)

    culprit.unlink()  # replaced by a copy: another file now, decoded
    culprit.write_bytes(cbis_files[1].read_bytes())
    changed = ingest()
    assert (changed["ingested"], changed["rejections"]) == (1, [])
    assert counts(ws) == (3, 3, 0)


def test_one_death_is_not_enough_to_skip_a_file_and_a_crasher_with_an_embedded_copy_is_present(
        tmp_path, cbis_files, monkeypatch):
    """A worker can die for the machine's reasons (the OOM killer acting on another process's memory): after
    one death the next run decodes the file again. And a file that died twice but whose image is embedded
    under another path is counted present, its rejection cleared, instead of listed as a crasher forever."""
    files = archive_of(cbis_files[:2], tmp_path / "archive")
    monkeypatch.setattr(runner, "prepare_file", prepare_or_die)
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18"}))
    monkeypatch.setenv(DIES_ON, str(files[1]))
    assert [r.path for r in ws.ingest(tmp_path / "archive", workers=1).rejected] == [str(files[1])]
    monkeypatch.delenv(DIES_ON)
    recovered = ws.ingest(tmp_path / "archive", workers=1)
    assert (recovered.ingested, recovered.already_present, recovered.rejected) == (1, 1, [])
    assert counts(ws) == (2, 2, 0)

    late = tmp_path / "archive" / "2_late.dcm"  # dies on two runs: skipped from then on
    late.symlink_to(cbis_files[2])
    monkeypatch.setenv(DIES_ON, str(late))
    for _ in range(2):
        assert [r.path for r in ws.ingest(tmp_path / "archive", workers=1).rejected] == [str(late)]
    good = tmp_path / "archive" / "3_good_copy.dcm"  # then a good copy of its image arrives
    good.write_bytes(cbis_files[2].read_bytes())
    with_copy = ws.ingest(tmp_path / "archive", workers=1)
    assert (with_copy.ingested, [r.path for r in with_copy.rejected]) == (1, [str(late)])
    assert "so it was not decoded again" in with_copy.rejected[0].reason
    after = ws.ingest(tmp_path / "archive", workers=1)  # its image is embedded now: present, not a crasher
    assert (after.ingested, after.already_present, after.rejected) == (0, 4, [])
    assert counts(ws) == (3, 3, 0)


def test_a_pool_that_cannot_start_stops_the_ingest_with_a_clear_error(tmp_path, cbis_files, monkeypatch):
    """Workers that die before running anything: no file is to blame, so none is rejected; the ingest
    stops after a bounded number of fresh pools, saying so, instead of looping."""
    archive_of(cbis_files[:2], tmp_path / "archive")
    monkeypatch.setattr(executors, "prepare_worker_process", die_at_start)
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18"}))
    with pytest.raises(WorkersKeepDying, match="decoding worker processes keep dying") as info:
        ws.ingest(tmp_path / "archive", workers=1)
    assert info.value.hint and "--workers 0" in info.value.hint
    assert counts(ws) == (0, 0, 0)  # nothing blamed


def test_worker_pool_replaces_a_broken_pool(tmp_path):
    pool = WorkerPool(lambda: ProcessPoolExecutor(1))
    with pool:
        assert pool.submit(os.getpid).result() > 0
        with pytest.raises(BrokenProcessPool):
            pool.submit(os.kill, pool.submit(os.getpid).result(), signal.SIGKILL).result()
        pool.restart()
        assert pool.submit(sum, [1, 2]).result() == 3
        assert pool.restarts == 1

    with pytest.raises(WorkersKeepDying, match="3 fresh pools"):  # its processes start with it, and die
        WorkerPool(lambda: ProcessPoolExecutor(1, initializer=die_at_start))


def _workers_of(parent: psutil.Process) -> list[psutil.Process]:
    """The pool's forked workers: children running the parent's own command line."""
    try:
        own = parent.cmdline()
        return [c for c in parent.children() if c.cmdline() == own]
    except psutil.NoSuchProcess:
        return []


def test_kill_9_of_the_worker_during_a_cli_ingest(tmp_path, cbis_files):
    """The audit's reproduction: `mretrieve ingest --workers 1`, the pool's worker killed while it works
    (once the first file is prepared, as -vv logs it, with 7 still to go). It used to end with a
    BrokenProcessPool traceback (exit 1); now every file is ingested, the killed one retried alone, and a
    rerun adds nothing. (A fixed 0.4 s wait raced the worker's own start-up on a slower machine.)"""
    import threading
    archive_of(cbis_files, tmp_path / "archive")
    config = tmp_path / "small.yaml"
    config.write_text("encoder:\n  name: resnet18\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRETRIEVE_")}
    env["MRETRIEVE_HOME"] = str(tmp_path / "state")
    command = [str(Path(sys.executable).with_name("mretrieve")), "--config", str(config), "ingest",
               str(tmp_path / "archive"), "--workers", "1", "--no-progress", "--format", "json"]
    verbose = [command[0], "-vv", *command[1:]]
    report_file = (tmp_path / "report.json").open("w+")
    ingest = subprocess.Popen(verbose, env=env, stdout=report_file, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    first_prepared = threading.Event()

    def read_log() -> None:
        for line in ingest.stderr:
            lines.append(line)
            if " prepared " in line:
                first_prepared.set()
    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert first_prepared.wait(120), "the ingest never prepared a file:\n" + "".join(lines)
        workers = _workers_of(psutil.Process(ingest.pid))
        assert workers, "the ingest has no worker process"
        workers[0].send_signal(signal.SIGKILL)
        ingest.wait(timeout=300)
        reader.join(timeout=10)
        err = "".join(lines)
        report_file.seek(0)
        out = report_file.read()
    finally:
        if ingest.poll() is None:
            ingest.kill()
            ingest.wait()
        report_file.close()
    assert ingest.returncode == 0, err
    assert "BrokenProcessPool" not in err
    assert "a decoding worker process died; retrying" in err  # the kill hit a live pool
    report = json.loads(out)
    assert (report["ingested"], report["rejected"]) == (8, 0)

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["ingested"], report["already_present"], report["rejected"]) == (0, 8, 0)
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18"}))
    assert counts(ws) == (8, 8, 0)


@pytest.fixture
def crashing_pacs(orthanc, cbis_files):
    """Three CBIS-DDSM files in a real Orthanc."""
    for path in cbis_files[:3]:
        orthanc.upload(path)
    return orthanc


def test_a_pull_survives_an_instance_that_kills_its_worker(tmp_path, cbis_files, crashing_pacs, monkeypatch):
    """The DICOMweb pull goes through the same pipeline and pool: same protection, the URL named."""
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "batch_size": 2}))
    victim = pydicom.dcmread(cbis_files[1], stop_before_pixels=True).SOPInstanceUID
    url = crashing_pacs.dicomweb
    client = DicomWebClient(url, ws.config.pacs)
    urls = [i.url for study in client.search_studies(modality=None) for i in client.search_instances(study)
            if i.sop_uid == victim]
    assert len(urls) == 1
    monkeypatch.setenv(DIES_ON, urls[0])
    monkeypatch.setattr(runner, "prepare_file", prepare_or_die)
    report = ws.ingest(url, workers=1, modality=None)
    assert (report.ingested, report.fetched) == (2, 3)
    assert [(r.path, r.code) for r in report.rejected] == [(urls[0], "worker_died")]
    again = ws.ingest(url, workers=1, modality=None)
    assert (again.ingested, again.already_present, len(again.rejected)) == (0, 2, 1)
    assert counts(ws) == (2, 2, 1)
