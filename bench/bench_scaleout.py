"""Scale-out, side by side in one run (issue #12): ingest of a full-size CBIS-DDSM corpus with the local
executor and with Dask (LocalCluster) at the same worker counts, and on SQLite against PostgreSQL; then
bulk catalog writes in rows/s on both databases.

    .venv/bin/python bench/bench_scaleout.py --copies 64 --out bench/results/scaleout.json
    .venv/bin/python bench/bench_scaleout.py --copies 320 --only "2 workers" --runtimes torch,auto [--keep-exports]

PostgreSQL is started here the way the tests start it (tests/pg.py: Debian's binaries, a temp folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import emit  # noqa: E402
sys.path.insert(0, str(REPO / "bench"))
from bench_ab_ingest import fresh_home  # noqa: E402
from bench_ingest import cbis_corpus  # noqa: E402

BIN = Path(sys.executable).parent


def ingest(archive: Path, home: Path, *args: str, database_url: str | None = None,
           config: Path | None = None, keep_exports: bool = False) -> float:
    fresh_home(home, keep_exports)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRETRIEVE_")}
    env["MRETRIEVE_HOME"] = str(home)
    if config:
        env["MRETRIEVE_CONFIG"] = str(config)
    if database_url:
        env["MRETRIEVE_DATABASE_URL"] = database_url
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "mretrieve"), "ingest", str(archive), "--no-progress", "--format", "json",
                           *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ingest {args} failed: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    assert report["ingested"] == len(list(archive.iterdir())), report
    return seconds


def bulk_rows_per_second(url: str, n: int, batch: int) -> float:
    from mammo_retrieval.core.identity import ModelIdentity
    from mammo_retrieval.storage.catalog import Database
    from mammo_retrieval.storage.catalog import repository as repo
    from tests.storage.catalog.test_repository import BASE
    db = Database(url)
    db.ensure_schema()
    with db.session() as s:
        mv = repo.get_or_create_model_version(s, ModelIdentity("resnet18", "a" * 64, "b" * 16, 512, False, None),
                                              {}).id
    rng = np.random.default_rng(0)
    vector = rng.normal(size=512).astype(np.float32)
    started = time.perf_counter()
    for start in range(0, n, batch):
        items = [repo.NewImage(dataclasses.replace(BASE, sop_instance_uid=f"1.2.{i}", study_key=f"S{i // 4}",
                                                   accession_number=f"S{i // 4}"), f"/a/{i}.dcm", "0" * 64, 0, vector)
                 for i in range(start, min(n, start + batch))]
        with db.session() as s:
            repo.write_images(s, items, mv)
    seconds = time.perf_counter() - started
    db.dispose()
    return n / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=64, help="full-size CBIS-DDSM files (copies of the 8)")
    ap.add_argument("--rows", type=int, default=20000, help="rows for the bulk-write figure")
    ap.add_argument("--only", default=None, help="run only the ingest runs whose name contains this")
    ap.add_argument("--runtimes", default=None,
                    help="comma-separated encoder.runtime values (e.g. torch,auto, or torch,auto,torch,auto to "
                         "repeat): every run once per value, interleaved; default: the shipped config alone")
    ap.add_argument("--encoder", default=None, help="encoder.name for the --runtimes runs (default: the shipped one)")
    ap.add_argument("--keep-exports", action="store_true",
                    help="keep the home's ONNX export between runs (made by one unmeasured run first), so that "
                         "no measured run pays it")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from tests import pg
    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    archive = work / "cbis"
    cbis_corpus(archive, args.copies)
    server = pg.PostgresServer().start()
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "images": args.copies, "ingest_s": {}}
    try:
        runs = [("local, 1 worker", ["--workers", "1"], None), ("dask, 1 worker", ["--executor", "dask", "--workers", "1"], None),
                ("local, 2 workers", ["--workers", "2"], None), ("dask, 2 workers", ["--executor", "dask", "--workers", "2"], None),
                ("local, 2 workers, PostgreSQL", ["--workers", "2"], "pg")]
        runs = [r for r in runs if args.only is None or args.only in r[0]]
        runtimes = args.runtimes.split(",") if args.runtimes else [None]
        configs = {}
        for runtime in runtimes:
            if runtime:
                configs[runtime] = work / f"runtime-{runtime}.yaml"
                name = f"  name: {args.encoder}\n" if args.encoder else ""
                configs[runtime].write_text(f"encoder:\n{name}  runtime: {runtime}\n")
        if args.keep_exports:  # one unmeasured run per runtime leaves its export in the home
            for runtime in runtimes:
                ingest(archive, work / "home", "--workers", "2", config=configs.get(runtime), keep_exports=True)
        for name, extra, db in runs:
            for runtime in runtimes:
                url = server.new_database() if db else None
                seconds = ingest(archive, work / "home", *extra, database_url=url, config=configs.get(runtime),
                                 keep_exports=args.keep_exports)
                label = f"{name} [{runtime}]" if runtime else name
                if label in result["ingest_s"]:  # a runtime named twice: its runs interleave, each kept
                    label += f" #{sum(key.startswith(label) for key in result['ingest_s']) + 1}"
                result["ingest_s"][label] = round(seconds, 1)
                print(f"{label}: {seconds:.1f} s ({args.copies / seconds:.2f} images/s)", flush=True)
        s = result["ingest_s"]
        if args.runtimes:
            result["runtimes"], result["keep_exports"] = runtimes, args.keep_exports
            result["encoder"] = args.encoder or "shipped default"
            emit(result, args.out)
            return
        result["dask_overhead"] = {w: round(s[f"dask, {w}"] / s[f"local, {w}"] - 1, 3)
                                   for w in ("1 worker", "2 workers") if f"dask, {w}" in s and f"local, {w}" in s}
        if "local, 2 workers, PostgreSQL" in s and "local, 2 workers" in s:
            result["postgres_vs_sqlite"] = round(s["local, 2 workers, PostgreSQL"] / s["local, 2 workers"], 3)
        if args.only:
            emit(result, args.out)
            return
        result["bulk_rows_per_s"] = {
            "sqlite": round(bulk_rows_per_second(f"sqlite:///{work / 'bulk.db'}", args.rows, 256)),
            "postgresql": round(bulk_rows_per_second(server.new_database(), args.rows, 256))}
        print(result["bulk_rows_per_s"], flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
