"""Set-up of an ingest worker process. The runner starts these processes itself, so process-wide settings
made here touch nobody else's (the main process, which may be a user's program, is left alone)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_freed_buffers(threshold: int = 1 << 30) -> bool:
    """Ask glibc to serve large allocations from the heap and not to give freed memory back at once.

    By default every buffer over a few MB is a fresh mmap, so each 25 MB decoded frame is page-faulted and
    zeroed by the kernel again; reusing the heap halves the read+decode time of a CBIS file. Returns False
    where the C library is not glibc (nothing changes there)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded; no ldconfig subprocess
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * threshold))


def warm_kernels() -> None:
    """Load the compiled preprocessing kernels (about 0.9 s: numba's import and its on-disk cache) while
    the main process is still reading the first headers, not on the first image."""
    import numpy as np

    from mammo_retrieval.preprocess._kernels import tile_histograms_kernel
    for dtype in (np.uint8, np.uint16):
        tile_histograms_kernel(np.zeros((2, 2), dtype), 1, 1, 2, 2, 1)


def die_with_parent(parent_pid: int | None) -> bool:
    """Have the kernel SIGKILL this worker when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Without it, workers of an ingest killed with SIGKILL (or by the OOM killer) lived on under PID 1 for
    good. The parent may already have died between the fork and this call, so the parent's pid is checked
    right after the request; the worker exits at once if it was orphaned. Returns False where the request
    is unsupported (not Linux): there the worker relies on its pool's pipes closing."""
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    ok = prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # orphaned before the request took effect
    return ok


def prepare_worker_process(heap_reuse: bool = True, sampled: bool = True, parent_pid: int | None = None) -> None:
    """Die with the parent, heap reuse for the large image buffers, and the kernels of the sampled path loaded.

    OpenCV's thread count is deliberately left alone: ``cv2.setNumThreads`` in a child forked from a
    process whose OpenCV thread pool has run deadlocks (it destroys condition variables that the parent's
    threads were waiting on), and the preprocessing avoids OpenCV calls that parallelise badly instead.

    ``parent_pid`` is the ingest process's pid, passed by the runner; None (a caller that cannot know it)
    still sets the death signal, without the orphan check."""
    die_with_parent(parent_pid)
    if heap_reuse:
        keep_freed_buffers()
    if sampled:
        warm_kernels()
