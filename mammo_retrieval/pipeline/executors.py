"""Where the prepare stage runs. ``local_executor``: forked worker processes on this machine (or inline
with workers=0). Any ``concurrent.futures.Executor`` whose workers can import this package will do:
the prepare stage is a function of plain values (a path, the reader config, the preprocessing settings).

A worker process can die under a file (a segfault in a C decoder, the OOM killer); a process pool is then
broken for good. ``local_executor`` therefore hands out a :class:`WorkerPool`, which the runner can
``restart`` with a fresh pool and go on (see ``runner._Scheduler``)."""
from __future__ import annotations

import gc
import logging
import multiprocessing
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Protocol, runtime_checkable

from mammo_retrieval.core.config import IngestConfig
from mammo_retrieval.core.errors import MammoRetrievalError
from mammo_retrieval.pipeline.worker import prepare_worker_process

logger = logging.getLogger(__name__)

START_ATTEMPTS = 3  # fresh pools tried in a row before giving up: a pool that cannot run a no-op is not a file's fault


class WorkersKeepDying(MammoRetrievalError):
    """The decoding worker processes die with no file to blame (they cannot even start), or none is left
    running (a Dask scheduler's no-workers-timeout): stop, don't loop."""

    code = "workers_died"


@runtime_checkable
class Restartable(Protocol):
    """An executor that can replace itself after a worker died (a broken process pool)."""

    def restart(self) -> None: ...


class _InlineExecutor(Executor):
    """workers=0: run stages in this process (debugging, tiny archives)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class WorkerPool(Executor):
    """A process pool that can be replaced: a ProcessPoolExecutor whose worker died refuses all further
    work, so ``restart`` shuts it down and builds a fresh one from ``make``, checked to run a no-op."""

    def __init__(self, make: Callable[[], ProcessPoolExecutor]) -> None:
        self._make = make
        self.restarts = -1  # fresh pools started after a death (for logs and tests)
        self._pool = self._start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    def restart(self) -> None:
        """Replace the (broken) pool. Raises WorkersKeepDying when ``START_ATTEMPTS`` fresh pools in a row
        cannot run a no-op: then the workers themselves die, not a file, and retrying would loop."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        for attempt in range(1, START_ATTEMPTS + 1):
            pool = self._make()
            try:
                _fork_workers(pool)
            except BrokenProcessPool:
                logger.warning("a fresh decoding pool died before running anything (attempt %d of %d)",
                               attempt, START_ATTEMPTS)
                pool.shutdown(wait=True, cancel_futures=True)
                continue
            self.restarts += 1
            return pool
        raise WorkersKeepDying(
            f"the decoding worker processes keep dying: {START_ATTEMPTS} fresh pools in a row died before "
            "running anything, so no file is to blame",
            hint="look for the cause in the system log (out of memory? a broken decoder library?); "
                 "--workers 0 decodes in this process")


def _fork_workers(pool: ProcessPoolExecutor) -> None:
    """Start the pool's processes now (a fork pool starts them all at its first task), with this process's
    objects frozen out of the garbage collector meanwhile. A forked child's collector would otherwise run
    the destructors of the parent's uncollected garbage: an ONNX Runtime session's waits on condition
    variables of threads that do not exist in the child, and the worker hangs for ever (seen in tests)."""
    if gc.get_freeze_count():  # the host program froze its own objects already: leave its choice alone
        pool.submit(os.getpid).result()
        return
    gc.collect()
    gc.freeze()
    try:
        pool.submit(os.getpid).result()
    finally:
        gc.unfreeze()


def local_executor(workers: int, cfg: IngestConfig) -> Executor:
    """``workers`` forked processes (inline for 0), each set up once: heap reuse, the compiled kernels."""
    if workers <= 0:
        return _InlineExecutor()
    # fork, as torch's DataLoader does: workers never touch torch, and unlike spawn, fork does not
    # re-import the caller's __main__ (a plain script calling the API would otherwise break)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"

    def make() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                                   initializer=prepare_worker_process,
                                   initargs=(cfg.heap_reuse, cfg.fast_path and cfg.sampled_clahe, os.getpid()))
    return WorkerPool(make)
