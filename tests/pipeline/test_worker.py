import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from mammo_retrieval.pipeline.threads import EncoderThreads
from mammo_retrieval.pipeline.worker import keep_freed_buffers
from tests.conftest import REPO


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_heap_settings():
    assert keep_freed_buffers() is True


def test_worker_set_up_runs_in_a_fresh_process():
    code = "from mammo_retrieval.pipeline.worker import prepare_worker_process as p; p(True, True); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.stdout.strip() == "ok", done.stderr


class FakeEncoder:
    device = torch.device("cpu")


def test_a_worker_bound_ingest_keeps_one_encoder_thread_and_is_restored():
    before = torch.get_num_threads()
    with EncoderThreads(FakeEncoder(), "auto", workers=2, cores=2) as threads:
        assert torch.get_num_threads() == 1
        for _ in range(4):  # the workers are the bottleneck: the main process waits as long as it embeds
            threads.embedded(0.5)
            threads.waited(0.5)
        assert threads.decided and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_an_encoder_bound_ingest_gets_every_core_after_the_probe():
    with EncoderThreads(FakeEncoder(), "auto", workers=2, cores=2, probe_batches=2) as threads:
        threads.waited(5.0)  # start-up wait before the first batch does not count
        for _ in range(2):
            threads.embedded(1.0)
            threads.waited(0.01)
        assert not threads.decided and torch.get_num_threads() == 1  # still probing
        threads.embedded(1.0)
        assert threads.decided and torch.get_num_threads() == 2


def test_encoder_threads_without_workers_or_fixed():
    before = torch.get_num_threads()
    with EncoderThreads(FakeEncoder(), "auto", workers=0):
        assert torch.get_num_threads() == before
    with EncoderThreads(FakeEncoder(), 1, workers=0):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_forked_workers_after_opencv_threads_ran_in_the_parent(tmp_path):
    """Regression: cv2.setNumThreads in a worker forked from a process whose OpenCV pool had run hung
    forever. The parent here runs a multi-threaded OpenCV call first, then ingests with 2 workers."""
    script = textwrap.dedent(f"""
        import cv2, numpy as np
        from pathlib import Path
        from mammo_retrieval.app.workspace import Workspace
        from tests.conftest import make_config
        from tests.factory import breast_phantom, make_file
        cv2.setNumThreads(2)
        cv2.createCLAHE(2.0, (8, 8)).apply(np.random.default_rng(0).integers(0, 255, (2000, 2000), np.uint8))
        archive = Path({str(tmp_path / 'archive')!r})
        archive.mkdir()
        for i in range(4):
            make_file(archive / f"{{i}}.dcm", breast_phantom(rows=600, cols=500, seed=i))
        cfg = make_config(Path({str(tmp_path / 'state')!r}), encoder={{"name": "resnet18", "batch_size": 2}})
        print(Workspace(cfg).ingest(archive, workers=2).ingested)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.stdout.strip().splitlines()[-1:] == ["4"], done.stderr[-2000:]


def test_worker_set_up_does_only_what_it_is_asked(monkeypatch):
    import mammo_retrieval.pipeline.worker as worker
    calls = []
    monkeypatch.setattr(worker, "keep_freed_buffers", lambda *a: calls.append("heap"))
    monkeypatch.setattr(worker, "warm_kernels", lambda: calls.append("kernels"))
    worker.prepare_worker_process(heap_reuse=False, sampled=False)
    assert calls == []
    worker.prepare_worker_process(heap_reuse=True, sampled=True)
    assert calls == ["heap", "kernels"]
