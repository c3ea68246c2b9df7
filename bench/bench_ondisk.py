"""An index past memory: N synthetic 512-d vectors in the catalog, an on-disk OPQ + IVF-PQ index built
from it by `mretrieve index rebuild`, then searched memory-mapped with re-ranking from the catalog.

    .venv/bin/python bench/bench_ondisk.py populate --n 10000000 --home /tmp/bench-10m
    .venv/bin/python bench/bench_ondisk.py build --home /tmp/bench-10m --nlist 4096 --shards 10
    .venv/bin/python bench/bench_ondisk.py search --home /tmp/bench-10m --n 10000000

Each step is its own process, so that each peak RSS is its own. The vectors come from one clustered,
low-rank world (bench/synthetic.py EmbeddingStream); the queries are drawn from the same world and are
not in the corpus; exact neighbours are computed by streaming the corpus again. Search runs one query at
a time (interactive use), faiss on both cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402
from synthetic import EmbeddingStream, populate_world  # noqa: E402

DIM = 512


def workspace(home: Path):
    from mammo_retrieval.app.workspace import Workspace
    from mammo_retrieval.core.config import load_config
    return Workspace(load_config(env={"MRETRIEVE_HOME": str(home)}))


def peak_rss_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def populate(home: Path, n: int) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    ws = workspace(home)
    if ws.encoder.identity.dim != DIM:
        raise SystemExit(f"the default encoder is {ws.encoder.identity.dim}-d, this bench needs {DIM}")
    last = [time.perf_counter()]

    def progress(done: int) -> None:
        if done % 500_000 == 0 or done == n:
            print(f"{done} rows, {time.perf_counter() - last[0]:.0f} s", file=sys.stderr, flush=True)
    seconds = populate_world(ws, n, EmbeddingStream(DIM), on_batch=progress)
    db = home / "mretrieve.db"
    return {"step": "populate", "n": n, "seconds": round(seconds, 1), "rows_per_s": round(n / seconds),
            "database_gib": round(db.stat().st_size / 2 ** 30, 2) if db.exists() else None,
            "peak_rss_mib": round(peak_rss_mib())}


def build(home: Path, nlist: int, shards: int, opq: bool) -> dict:
    """The real command, in a child process: its wall time and peak RSS."""
    command = [str(Path(sys.executable).parent / "mretrieve"), "index", "rebuild", "--type", "ivf_pq",
               "--nlist", str(nlist), "--shards", str(shards), "--on-disk", "--no-progress",
               "--opq" if opq else "--no-opq"]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "MRETRIEVE_HOME": str(home)}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"rebuild failed ({done.returncode}): {done.stderr[-2000:]}")
    files = {p.name: p.stat().st_size for d in (home / "indexes").iterdir() if d.is_dir() for p in d.iterdir()}
    return {"step": "build", "command": "mretrieve " + " ".join(command[1:]), "seconds": round(seconds, 1),
            "peak_rss_mib": round(peak_rss_mib(resource.RUSAGE_CHILDREN)), "output": done.stdout.strip(),
            "index_files_mib": {k: round(v / 2 ** 20, 1) for k, v in files.items()}}


def exact_truth(stream: EmbeddingStream, n: int, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss
    from faiss.contrib.exhaustive_search import knn_ground_truth
    _, positions = knn_ground_truth(queries, (v for _, v in stream.chunks(n)), k,
                                    metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
    return positions + 1  # ids are row + 1


def search(home: Path, n: int, n_queries: int, nprobes: list[int], reranks: list[int], k: int = 10) -> dict:
    stream = EmbeddingStream(DIM)
    queries = stream.rows(0, n_queries, stream=1)
    started = time.perf_counter()
    truth = exact_truth(stream, n, queries, k)
    truth_s = time.perf_counter() - started
    rss_before_open = peak_rss_mib()
    ws = workspace(home)
    started = time.perf_counter()
    index = ws.searchable_index()
    open_s = time.perf_counter() - started
    rows = []
    for rerank in reranks:
        index.cfg = dataclasses.replace(index.cfg, rerank=rerank)
        for nprobe in nprobes:
            index.set_nprobe(nprobe)
            index.search(queries[:5], k)  # warm the lists this probe touches first
            latencies, found = [], []
            for q in queries:
                t = time.perf_counter()
                found.append(index.search(q[None], k)[1][0])
                latencies.append(time.perf_counter() - t)
            recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
            rows.append({"nprobe": nprobe, "rerank": rerank, "recall@10": round(recall, 4),
                         "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
                         "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2)})
            print(rows[-1], file=sys.stderr, flush=True)
    m = index.manifest
    return {"step": "search", "n": n, "queries": n_queries, "layout": index.layout.describe(), "ntotal": m.ntotal,
            "truth_s": round(truth_s, 1), "open_s": round(open_s, 2), "rss_before_open_mib": round(rss_before_open),
            "peak_rss_mib": round(peak_rss_mib()), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("populate")
    p.add_argument("--n", type=int, default=10_000_000)
    b = sub.add_parser("build")
    b.add_argument("--nlist", type=int, default=4096)
    b.add_argument("--shards", type=int, default=10)
    b.add_argument("--no-opq", action="store_true")
    s = sub.add_parser("search")
    s.add_argument("--n", type=int, default=10_000_000)
    s.add_argument("--queries", type=int, default=300)
    s.add_argument("--nprobes", default="32,64,128")
    s.add_argument("--reranks", default="1,10")
    for parser in (p, b, s):
        parser.add_argument("--home", type=Path, default=Path("/tmp/bench-10m"))
        parser.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.step == "populate":
        result = populate(a.home, a.n)
    elif a.step == "build":
        result = build(a.home, a.nlist, a.shards, not a.no_opq)
    else:
        result = search(a.home, a.n, a.queries, [int(x) for x in a.nprobes.split(",")],
                        [int(x) for x in a.reranks.split(",")])
    emit(result, a.out)


if __name__ == "__main__":
    main()
