"""What an ONNX Runtime encoder saves by not keeping its torch model (README, "ONNX Runtime against torch").

    .venv/bin/python bench/bench_encoder_memory.py --name mammo-simclr-v2 --home /tmp/memhome

Builds the serving encoder of a home (the first call in a new home exports the model; run it twice and
read the second line), then asks it for its torch model, as `mretrieve train` does. Both readings of the resident set
are taken after ``malloc_trim`` (glibc otherwise keeps freed pages, the first build's and the second's
temporary buffers, which would blur both); the torch model's tensor bytes are printed as a cross-check.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
from pathlib import Path

import psutil

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="mammo-simclr-v2", help="encoder.name")
    parser.add_argument("--home", type=Path, required=True, help="MRETRIEVE_HOME (the export is kept there)")
    args = parser.parse_args()
    cfg = load_config(env={"MRETRIEVE_HOME": str(args.home)})
    encoder = Workspace(cfg.replace("encoder", name=args.name, device="cpu", allow_random_weights=True)).encoder
    process = psutil.Process()

    def resident() -> int:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return process.memory_info().rss

    serving = resident()
    weights = sum(t.numel() * t.element_size() for t in encoder.source.model.state_dict().values())  # built again
    with_torch = resident()
    print(f"{args.name}: {type(encoder).__name__}; RSS {serving / 1e6:.0f} MB serving, {with_torch / 1e6:.0f} MB "
          f"with its torch model built again (+{(with_torch - serving) / 1e6:.0f} MB; its tensors "
          f"{weights / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
