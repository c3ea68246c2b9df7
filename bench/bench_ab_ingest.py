"""A/B ingest timing of two installations (e.g. before and after a refactor), or of two configurations of
one, on the same full-size CBIS corpus, interleaved in one run so that both see the same machine state.

    .venv/bin/python bench/bench_ab_ingest.py --a OTHER/.venv/bin/mretrieve --b .venv/bin/mretrieve \
        --copies 200 --repeat 2
    .venv/bin/python bench/bench_ab_ingest.py --a .venv/bin/mretrieve --b .venv/bin/mretrieve \
        --a-config torch.yaml --b-config auto.yaml [--keep-exports]

Each run ingests into a fresh home; ``--keep-exports`` keeps the home's ONNX exports (``indexes/onnx``)
from one run to the next, so that only the first run of a side pays its export.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_ingest import cbis_corpus  # noqa: E402

from bench.report import emit  # noqa: E402


def fresh_home(home: Path, keep_exports: bool) -> None:
    exports, aside = home / "indexes" / "onnx", home.with_name(home.name + "-onnx")
    if keep_exports and exports.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
        exports.rename(aside)
    shutil.rmtree(home, ignore_errors=True)
    if keep_exports and aside.is_dir():
        exports.parent.mkdir(parents=True)
        aside.rename(exports)


def ingest_seconds(mretrieve: str, archive: Path, home: Path, config: Path | None = None,
                   keep_exports: bool = False) -> float:
    fresh_home(home, keep_exports)
    env = {**os.environ, "MRETRIEVE_HOME": str(home)}
    if config:
        env["MRETRIEVE_CONFIG"] = str(config)
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
    ap.add_argument("--a-config", type=Path, help="a config file for A ($MRETRIEVE_CONFIG)")
    ap.add_argument("--b-config", type=Path, help="a config file for B")
    ap.add_argument("--keep-exports", action="store_true", help="keep each home's ONNX exports between runs")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_ab_ingest")
    a = ap.parse_args()
    archive = a.work / "archive"
    for side in ("a", "b"):  # an export left by an interrupted earlier run must not spare a first run its own
        shutil.rmtree(a.work / f"home-{side}-onnx", ignore_errors=True)
    cbis_corpus(archive, a.copies)
    times = {"a": [], "b": []}
    for _ in range(a.repeat):
        for name in ("a", "b"):
            times[name].append(round(ingest_seconds(getattr(a, name), archive, a.work / f"home-{name}",
                                                    getattr(a, f"{name}_config"), a.keep_exports), 2))
    ma, mb = statistics.median(times["a"]), statistics.median(times["b"])
    emit({"files": a.copies, "a": a.a, "b": a.b, "a_config": str(a.a_config or ""),
          "b_config": str(a.b_config or ""), "keep_exports": a.keep_exports, "seconds_a": times["a"],
          "seconds_b": times["b"], "median_a": ma, "median_b": mb, "b_over_a": round(mb / ma, 3)}, a.out)


if __name__ == "__main__":
    main()
