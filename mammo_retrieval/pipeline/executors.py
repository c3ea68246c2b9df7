"""Where the prepare stage runs. ``local_executor``: forked worker processes on this machine (or inline
with workers=0). Any ``concurrent.futures.Executor`` whose workers can import this package will do:
the prepare stage is a function of plain values (a path, the reader config, the preprocessing settings)."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor

from mammo_retrieval.core.config import IngestConfig
from mammo_retrieval.pipeline.worker import prepare_worker_process


class _InlineExecutor(Executor):
    """workers=0: run stages in this process (debugging, tiny archives)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def local_executor(workers: int, cfg: IngestConfig) -> Executor:
    """``workers`` forked processes (inline for 0), each set up once: heap reuse, the compiled kernels."""
    if workers <= 0:
        return _InlineExecutor()
    # fork, as torch's DataLoader does: workers never touch torch, and unlike spawn, fork does not
    # re-import the caller's __main__ (a plain script calling the API would otherwise break)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                               initializer=prepare_worker_process,
                               initargs=(cfg.heap_reuse, cfg.fast_path and cfg.sampled_clahe, os.getpid()))
