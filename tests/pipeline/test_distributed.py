"""Ingest on Dask: the same vectors as the local executor, one encoder per worker, batches of paths, and
restart safety when a worker or the client is killed (nothing lost, nothing doubled)."""
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")

from mammo_retrieval.app.workspace import Workspace  # noqa: E402
from mammo_retrieval.pipeline import distributed as dist  # noqa: E402
from mammo_retrieval.pipeline.runner import PrepareJob  # noqa: E402
from tests.conftest import REPO, make_config  # noqa: E402
from tests.factory import make_file  # noqa: E402
from tests.pipeline.test_runner import synthetic_archive  # noqa: E402

TINY = {"name": "resnet18", "input_size": 64, "batch_size": 4}


def _vectors(ws) -> dict[str, np.ndarray]:
    from mammo_retrieval.analysis.vectors import load_embeddings
    table = load_embeddings(ws.corpus())
    return dict(zip(table.meta.sop_instance_uid, table.vectors))


def _counts(cfg) -> tuple[int, int, int]:
    ws = Workspace(cfg)
    status = ws.status()
    return status["counts"]["images"], status["counts"]["embeddings"], ws.searchable_index().ntotal


@contextlib.contextmanager
def local_cluster(n_workers: int, **config):
    """A LocalCluster started beside mretrieve, as a user would, keeping its nannies as the README says
    (``distributed.deploy.lost-worker-timeout``: see dist.NANNY_KEPT_FOR), with ``config`` in effect
    while it runs (Dask reads some of it at the moment it acts)."""
    import dask
    with dask.config.set({"distributed.deploy.lost-worker-timeout": dist.NANNY_KEPT_FOR, **config}):
        with distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                      dashboard_address=":0", host="127.0.0.1") as cluster:
            yield cluster


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(2) as cluster:
        yield cluster


def test_dask_gives_the_local_executors_vectors_rejections_and_copies(tmp_path, cluster):
    synthetic_archive(tmp_path / "archive", 10)
    (tmp_path / "archive" / "broken.dcm").write_bytes(b"DICM" + bytes(300))
    copy = tmp_path / "archive" / "copy_of_img000.dcm"
    copy.write_bytes((tmp_path / "archive" / "img000.dcm").read_bytes())
    local = Workspace(make_config(tmp_path / "local", encoder=TINY))
    local_report = local.ingest(tmp_path / "archive", workers=0)
    remote = Workspace(make_config(tmp_path / "dask", encoder=TINY))
    report = remote.ingest(tmp_path / "archive", executor="dask", scheduler=cluster.scheduler_address)
    assert (report.ingested, report.already_present, len(report.rejected)) == \
        (local_report.ingested, local_report.already_present, len(local_report.rejected)) == (10, 1, 1)
    a, b = _vectors(local), _vectors(remote)
    assert a.keys() == b.keys() and len(a) == 10
    assert min(float(a[k] @ b[k]) for k in a) >= 0.9999
    assert _counts(remote.config) == (10, 10, 10)
    # each worker built the encoder once, whatever the number of batches it ran
    with distributed.Client(cluster.scheduler_address) as client:
        built = client.run(lambda: len(dist._encoders))
        runtimes = client.run(lambda: sorted({e.runtime for e in dist._encoders.values()}))
        exported = client.run(lambda: len(__import__("mammo_retrieval.encoders.onnx_runtime",
                                                     fromlist=["_memo"])._memo.written))
    assert set(built.values()) <= {0, 1} and sum(built.values()) >= 1
    # under auto the workers run torch (whole Dask ingests were not faster on ONNX Runtime), and export nothing
    assert {r for rs in runtimes.values() for r in rs} == {"torch"}
    assert set(exported.values()) == {0}


def test_under_runtime_onnx_the_workers_load_the_clients_checked_export(tmp_path, cluster):
    synthetic_archive(tmp_path / "archive", 6)
    remote = Workspace(make_config(tmp_path / "dask", encoder={**TINY, "runtime": "onnx"}))
    remote.ingest(tmp_path / "archive", executor="dask", scheduler=cluster.scheduler_address)
    assert remote.encoder.runtime == "onnx" and _counts(remote.config) == (6, 6, 6)
    key = (remote.config.encoder, remote.config.preprocess)

    def worker_side():
        from mammo_retrieval.encoders import onnx_runtime
        encoder = dist._encoders.get(key)
        return None if encoder is None else (encoder.runtime, encoder.threads, len(onnx_runtime._memo.written))

    with distributed.Client(cluster.scheduler_address) as client:
        seen = [v for v in client.run(worker_side).values() if v is not None]
    # one thread each, as the worker has; none exported: each loaded the client's checked file
    assert seen and set(seen) == {("onnx", 1, 0)}


def test_a_cluster_without_workers_stops_the_ingest_with_a_clear_error_then_a_rerun_ingests(tmp_path, cluster):
    """Dask waits for workers that may still join (a SLURM queue); a scheduler told to give up
    (``no-workers-timeout``) fails the tasks: NoWorkerError, or NoValidWorkerError with task queuing off
    (``worker-saturation: inf``). Either way the ingest says the cluster has no running worker, rather than
    ending in a bare scheduler error, and a rerun on a cluster with workers ingests every file once."""
    import dask

    from mammo_retrieval.pipeline.executors import WorkersKeepDying
    synthetic_archive(tmp_path / "archive", 4)
    cfg = make_config(tmp_path / "state", encoder={**TINY, "runtime": "torch"})
    for queuing in ({}, {"distributed.scheduler.worker-saturation": float("inf")}):
        with dask.config.set({"distributed.scheduler.no-workers-timeout": "1s", **queuing}):
            with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=":0",
                                          host="127.0.0.1") as empty:
                with pytest.raises(WorkersKeepDying, match="no running worker for this ingest's tasks") as stopped:
                    Workspace(cfg).ingest(tmp_path / "archive", executor="dask",
                                          scheduler=empty.scheduler_address)
        assert "rerun" in stopped.value.hint
    report = Workspace(cfg).ingest(tmp_path / "archive", executor="dask", scheduler=cluster.scheduler_address)
    assert (report.ingested, len(report.rejected)) == (4, 0)
    assert _counts(cfg) == (4, 4, 4)


def test_an_ingest_waiting_on_a_cluster_without_workers_says_so_and_goes_on_when_one_joins(tmp_path, monkeypatch,
                                                                                         caplog):
    """Dask waits silently for a worker that may still join (and, on a user's LocalCluster whose nanny it
    closed, forever): the ingest says it is waiting for one, and finishes once a worker joins."""
    import logging
    synthetic_archive(tmp_path / "archive", 3)
    cfg = make_config(tmp_path / "state", encoder={**TINY, "runtime": "torch"})
    monkeypatch.setattr(dist, "NO_WORKER_WARNING_S", 0.5)
    said = threading.Event()

    class Noticed(logging.Handler):
        def emit(self, record):
            if "waiting for a Dask worker" in record.getMessage():
                said.set()
    noticed = Noticed()
    logging.getLogger(dist.__name__).addHandler(noticed)
    try:
        with local_cluster(0) as empty:
            def join_once_told() -> None:
                said.wait(60)  # a worker joins even if nothing was said, so the test fails rather than hangs
                empty.scale(1)
            joiner = threading.Thread(target=join_once_told, daemon=True)
            joiner.start()
            with caplog.at_level(logging.WARNING, logger=dist.__name__):
                report = Workspace(cfg).ingest(tmp_path / "archive", executor="dask",
                                               scheduler=empty.scheduler_address)
            joiner.join(60)
    finally:
        logging.getLogger(dist.__name__).removeHandler(noticed)
    assert said.is_set() and (report.ingested, len(report.rejected)) == (3, 0)
    assert any("no running worker" in r.getMessage() and "rerun" in r.getMessage() for r in caplog.records)
    assert _counts(cfg) == (3, 3, 3)


def test_a_tasks_own_timeout_error_is_its_error_not_a_wait(cluster):
    """A task that raises TimeoutError (a weights file on a slow share) fails the wait's caller at once: only
    the wait's own timeout means "still waiting" (it used to loop, silently, for ever)."""
    def times_out():
        raise TimeoutError("weights share did not answer")
    with distributed.Client(cluster.scheduler_address) as client:
        future = client.submit(times_out, pure=False)
        started = time.monotonic()
        assert dist._first_done(client, [future]) == {future}
        with pytest.raises(TimeoutError, match="weights share"):
            future.result()
        assert time.monotonic() - started < 30
        assert dist._running_workers(client) == 2


def test_a_batch_is_one_task_of_many_paths(tmp_path):
    files = synthetic_archive(tmp_path / "archive", 5) + [make_file(tmp_path / "archive" / "ct.dcm", modality="CT")]
    cfg = make_config(tmp_path / "state", encoder=TINY)
    ws = Workspace(cfg)
    job = dist.EmbedJob(PrepareJob(cfg.reader, ws.encoder.settings, ws.prepare_options()), cfg.encoder,
                        cfg.preprocess, ws.encoder.identity.key)
    result = dist.prepare_and_embed([str(f) for f in files], job)
    assert len(result.prepared) == 5 and [r.code for r in result.rejected] == ["wrong_modality"]
    assert result.vectors.shape == (5, ws.encoder.dim)
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1, atol=1e-5)
    wrong = dist.EmbedJob(job.prepare, job.encoder, job.preprocess, "another-model")
    from mammo_retrieval.core.errors import WeightsError
    with pytest.raises(WeightsError, match="another-model"):
        dist.prepare_and_embed([str(files[0])], wrong)


def test_a_killed_worker_loses_and_doubles_nothing(tmp_path):
    n = 48
    synthetic_archive(tmp_path / "archive", n)
    cfg = make_config(tmp_path / "state", encoder=TINY)
    with local_cluster(2) as cluster:
        with distributed.Client(cluster) as client:  # closed before the ingest opens its own: one client a time
            pids = list(client.run(os.getpid).values())
        killed = threading.Event()

        def kill_one(done, total):
            if done >= 8 and not killed.is_set():
                killed.set()
                os.kill(pids[0], signal.SIGKILL)  # the nanny restarts it; its tasks run elsewhere
        report = Workspace(cfg).ingest(tmp_path / "archive", executor="dask", scheduler=cluster.scheduler_address,
                                       on_progress=kill_one)
    assert killed.is_set()
    assert report.ingested == n and not report.rejected
    assert _counts(cfg) == (n, n, n)


def test_a_killed_client_then_a_rerun_loses_and_doubles_nothing(tmp_path):
    n = 64
    synthetic_archive(tmp_path / "archive", n)
    home = tmp_path / "state"
    (tmp_path / "config.yaml").write_text("encoder: {name: resnet18, input_size: 64, batch_size: 4}\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MRETRIEVE_")}, "MRETRIEVE_HOME": str(home),
           "MRETRIEVE_CONFIG": str(tmp_path / "config.yaml")}
    command = [sys.executable, "-c", "from mammo_retrieval.app.cli import main; main()", "ingest",
               str(tmp_path / "archive"), "--executor", "dask", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    db = home / "mretrieve.db"
    deadline = time.monotonic() + 240
    written = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(db, timeout=1) as conn:
                written = conn.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        except sqlite3.Error:
            written = 0
        if written >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the client and the LocalCluster it started, mid-run
    proc.wait()
    assert 8 <= written < n
    rerun = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _counts(make_config(home, encoder=TINY)) == (n, n, n)


class DieOnFile(distributed.WorkerPlugin):
    """Every worker, the nanny's fresh ones included, kills itself (SIGKILL, as the OOM killer does) on
    one file, as a segfaulting decoder would; the rest is the real prepare stage."""

    def __init__(self, path: str) -> None:
        self.path = path

    def setup(self, worker) -> None:
        real, culprit = dist.prepare_file, self.path

        def prepare_or_die(source, *args, **kwargs):
            if os.fspath(source) == culprit:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(source, *args, **kwargs)
        dist.prepare_file = prepare_or_die


def test_a_file_that_keeps_killing_its_workers_is_rejected_and_the_rest_ingested(tmp_path):
    """The scheduler gives up on a task that killed its workers (KilledWorker); that used to end the whole
    ingest. Now each file of that batch is tried alone once the other batches are done, the one that kills
    its workers alone is rejected (worker_died), the others of its batch and every other batch are
    ingested; after its second death a rerun neither decodes it again nor doubles anything."""
    files = synthetic_archive(tmp_path / "archive", 10)
    culprit = files[5]
    cfg = make_config(tmp_path / "state", encoder={**TINY, "runtime": "torch"})  # no client-side export: 11 s
    with local_cluster(1, **{"distributed.scheduler.allowed-failures": 0}) as cluster:  # give up at once: quick
        with distributed.Client(cluster) as client:
            client.register_plugin(DieOnFile(str(culprit)))
        report = Workspace(cfg).ingest(tmp_path / "archive", executor="dask", scheduler=cluster.scheduler_address)
        assert (report.ingested, [(r.path, r.code) for r in report.rejected]) == \
            (9, [(str(culprit), "worker_died")])
        assert _counts(cfg) == (9, 9, 9)
        second = Workspace(cfg).ingest(tmp_path / "archive", executor="dask", scheduler=cluster.scheduler_address)
        again = Workspace(cfg).ingest(tmp_path / "archive", executor="dask", scheduler=cluster.scheduler_address)
    assert (second.ingested, second.already_present, [r.path for r in second.rejected]) == (0, 9, [str(culprit)])
    assert "died while reading" in second.rejected[0].reason  # one death is not enough: it was tried again
    assert (again.ingested, again.already_present, [r.path for r in again.rejected]) == (0, 9, [str(culprit)])
    assert "so it was not decoded again" in again.rejected[0].reason
    assert _counts(cfg) == (9, 9, 9)


class DieOnModelLoad(distributed.WorkerPlugin):
    """Every worker kills itself when it builds its encoder (as one whose memory limit cannot hold the model)."""

    def setup(self, worker) -> None:
        def die(*_args, **_kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        dist.worker_encoder = die


def test_workers_that_die_on_every_batch_stop_the_ingest_instead_of_rejecting_every_file(tmp_path):
    """When the workers themselves fail (one that cannot load the model), trying each file alone would
    reject the whole archive as worker_died, one worker death at a time. After three batch deaths with no
    survivor, a task that reads no file probes the workers; when it kills its worker too, the ingest stops
    with a clear error, nothing rejected. A small archive (one batch) likewise, when the trials would start.
    (A rerun whose only files are crashers is not mistaken for it: see the test above.)"""
    from mammo_retrieval.pipeline.executors import WorkersKeepDying
    synthetic_archive(tmp_path / "archive", 10)  # 3 batches of 4
    synthetic_archive(tmp_path / "small", 2)
    cfg = make_config(tmp_path / "state", encoder={**TINY, "runtime": "torch"})
    with local_cluster(1, **{"distributed.scheduler.allowed-failures": 0}) as cluster:
        with distributed.Client(cluster) as client:
            client.register_plugin(DieOnModelLoad())
        for archive, batches in (("archive", 3), ("small", 1)):
            with pytest.raises(WorkersKeepDying, match=rf"only load the model.*each of the {batches} batch") as info:
                Workspace(cfg).ingest(tmp_path / archive, executor="dask", scheduler=cluster.scheduler_address)
            assert "--executor local" in info.value.hint
    counts = Workspace(cfg).status()["counts"]
    assert (counts["images"], counts["rejected_files"]) == (0, 0)  # nothing written, no file blamed


def _kill_the_worker(client) -> str:
    ((address, pid),) = client.run(os.getpid).items()
    os.kill(pid, signal.SIGKILL)
    return address


def _nanny_outcome(cluster, client, dead: str) -> str:
    """'closed' once the cluster object has closed the nanny, 'back' once a fresh worker has registered."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not cluster.workers:
            return "closed"
        if set(client.scheduler_info()["workers"]) - {dead}:
            return "back"
        time.sleep(0.1)
    return "neither, after 120 s"


def test_the_cluster_mretrieve_starts_keeps_its_nanny_while_a_killed_worker_restarts():
    """Dask's cluster object closes a nanny whose worker is not back ``lost-worker-timeout`` after it died
    (15 s; meant for batch jobs). A one-worker LocalCluster restarting a worker that a file had killed
    was so left with no worker, and the ingest waited forever (the project's CI hung there). The control:
    with a 0.2 s timeout, a plain LocalCluster loses its nanny; the one mretrieve starts keeps it, and
    gives the setting back when the last of its clusters closes."""
    import dask
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0.2s"}):
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                      host="127.0.0.1") as plain, distributed.Client(plain) as client:
            assert _nanny_outcome(plain, client, _kill_the_worker(client)) == "closed"
        first, second = dist.connect(None, 1), dist.connect(None, 1)
        try:
            assert _nanny_outcome(first.cluster, first, _kill_the_worker(first)) == "back"
            assert first.submit(os.getpid, pure=False).result(timeout=60) > 0
        finally:
            dist.close(first)
        try:  # closed out of order: the setting holds while the second cluster runs
            assert dask.config.get("distributed.deploy.lost-worker-timeout") == dist.NANNY_KEPT_FOR
        finally:
            dist.close(second)
        assert dask.config.get("distributed.deploy.lost-worker-timeout") == "0.2s"
