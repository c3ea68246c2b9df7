"""A/B ingest timing of two installations (e.g. before and after a refactor) on the same full-size CBIS
corpus, interleaved in one run so that both see the same machine state.

    .venv/bin/python bench/bench_ab_ingest.py --a OTHER/.venv/bin/mretrieve --b .venv/bin/mretrieve \
        --copies 200 --repeat 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import cbis_corpus  # noqa: E402


def ingest_seconds(mretrieve: str, archive: Path, home: Path) -> float:
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "MRETRIEVE_HOME": str(home)}
    started = time.perf_counter()
    done = subprocess.run([mretrieve, "ingest", str(archive), "--no-progress", "--format", "json"], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{mretrieve} failed: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    assert report["ingested"] == len(list(archive.iterdir())), report
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="mretrieve of installation A (the baseline)")
    ap.add_argument("--b", required=True, help="mretrieve of installation B")
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_ab_ingest")
    a = ap.parse_args()
    archive = a.work / "archive"
    cbis_corpus(archive, a.copies)
    times = {"a": [], "b": []}
    for _ in range(a.repeat):
        for name in ("a", "b"):
            times[name].append(round(ingest_seconds(getattr(a, name), archive, a.work / f"home-{name}"), 2))
    ma, mb = statistics.median(times["a"]), statistics.median(times["b"])
    print(json.dumps({"files": a.copies, "a": a.a, "b": a.b, "seconds_a": times["a"], "seconds_b": times["b"],
                      "median_a": ma, "median_b": mb, "b_over_a": round(mb / ma, 3)}, indent=2))


if __name__ == "__main__":
    main()
