"""Inverted lists on disk: an IVF index whose lists live in one ``.ivfdata`` file, memory-mapped read-only.

Built shard by shard (each shard's codes in memory, then written as a small index file) and merged into
one file with ``faiss.contrib.ondisk.merge_ondisk``, so a build holds one shard's codes at a time, never
the corpus. The merged file is never written again: vectors added later go to a small in-memory delta
(same trained quantiser), and a compaction merges base and delta into a *new* file. So every file a
manifest names is immutable, and a crash at any moment leaves the previous manifest's files intact.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import faiss
import numpy as np

from mammo_retrieval.core.fileio import fsync_dir, fsync_path

logger = logging.getLogger(__name__)

_LIBC = ctypes.CDLL(None)
_REDIRECT = threading.Lock()  # fd 1 is one per process: two threads switching it would lose the original


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """faiss's on-disk lists printf progress lines to stdout; send them to stderr so that a command's
    stdout (JSON, CSV) stays clean. The C buffers are flushed on both sides of the switch; one thread at a
    time (a server's threads may open indexes together). Not reentrant."""
    with _REDIRECT:
        sys.stdout.flush()
        _LIBC.fflush(None)
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
            yield
        finally:
            _LIBC.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def write_index_file(index: faiss.Index, path: Path) -> None:
    """Write and fsync (the caller renames or commits it)."""
    faiss.write_index(index, str(path))
    fsync_path(path)


def build_shards(trained: faiss.Index, chunks: Iterable[tuple[np.ndarray, np.ndarray]], shard_size: int,
                 directory: Path, prefix: str) -> tuple[list[Path], int]:
    """Add the streamed vectors to copies of the trained empty index, ``shard_size`` at a time, each copy
    written to its own file as soon as it is full. Returns the shard files and the largest id."""
    paths: list[Path] = []
    shard, max_id = None, 0

    def flush() -> None:
        nonlocal shard
        if shard is not None and shard.ntotal:
            path = directory / f".{prefix}-shard{len(paths):04d}.tmp"
            write_lists(shard, path)
            paths.append(path)
            logger.info("shard %d: %d vectors written to %s", len(paths), shard.ntotal, path.name)
        shard = None

    for ids, vectors in chunks:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        start = 0
        while start < len(ids):
            if shard is None:
                shard = faiss.clone_index(trained)
            take = min(len(ids) - start, shard_size - shard.ntotal)
            shard.add_with_ids(vectors[start:start + take], ids[start:start + take])
            start += take
            if shard.ntotal >= shard_size:
                flush()
        if len(ids):
            max_id = max(max_id, int(ids.max()))
    flush()
    return paths, max_id


def merge_into_file(trained: faiss.Index, sources: list, lists_path: Path) -> faiss.Index:
    """A copy of the trained empty index whose lists are the union of ``sources`` (inverted lists of
    indexes sharing its quantiser), stored in ``lists_path``. The file is fsynced."""
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    with stdout_to_stderr():
        invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_path))
        vector = faiss.InvertedListsPtrVector()
        for source in sources:
            vector.push_back(source)
        ntotal = invlists.merge_from_multiple(vector.data(), vector.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    fsync_path(lists_path)
    return index


def write_lists(index: faiss.Index, path: Path) -> None:
    """A shard: its inverted lists only (the quantisers are the trained index's, kept once)."""
    writer = faiss.FileIOWriter(str(path))
    faiss.write_InvertedLists(faiss.extract_index_ivf(index).invlists, writer)
    del writer  # closes the file


def merge_shard_files(trained: faiss.Index, shard_paths: list[Path], lists_path: Path) -> faiss.Index:
    """merge_ondisk's work, with the shards' lists memory-mapped (their codes are never all in memory)."""
    sources = []
    for path in shard_paths:
        reader = faiss.FileIOReader(str(path))
        sources.append(faiss.read_InvertedLists(reader, faiss.IO_FLAG_MMAP))
        del reader
    merged = merge_into_file(trained, sources, lists_path)
    del sources
    return merged


def read_on_disk(path: Path) -> faiss.Index:
    """An index whose lists file sits beside it, mapped read-only (found in the same folder even when
    the folder was moved since it was written)."""
    with stdout_to_stderr():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


def empty_copy(in_memory: faiss.Index) -> faiss.Index:
    """The trained quantiser and codec of an index with in-memory lists, without its vectors."""
    copy = faiss.clone_index(in_memory)
    ivf = faiss.extract_index_ivf(copy)
    ivf.invlists.reset()
    copy.ntotal = ivf.ntotal = 0
    return copy


def remove_quietly(paths: Iterable[Path], directory: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    fsync_dir(directory)


def list_sizes(index: faiss.Index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index)
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
