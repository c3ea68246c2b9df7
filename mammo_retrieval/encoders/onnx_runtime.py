"""ONNX Runtime inference (``encoder.runtime: onnx``): the torch encoder exported once to ONNX, cached under
``<index_dir>/onnx/`` by its identity (weights hash, preprocessing digest, input size), then run by
onnxruntime on the CPU.

It is the same model version as the torch encoder it came from (same identity, same index): the export
is an execution detail, and agreement is a tested property (cosine >= 0.999 per image). A cached file is
checked against the sha256 recorded beside it; a mismatch is exported again.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from mammo_retrieval.core.errors import ConfigError
from mammo_retrieval.core.fileio import sha256_file, write_atomic, write_bytes_atomic
from mammo_retrieval.encoders.model import TorchEncoder

logger = logging.getLogger(__name__)

OPSET = 18


def _cpu():
    import torch
    return torch.device("cpu")


def onnx_path(cache_dir: Path, encoder: TorchEncoder) -> Path:
    identity, (h, w) = encoder.identity, encoder.settings.size
    return Path(cache_dir) / f"{identity.key}-{h}x{w}.onnx"


def _cached(path: Path) -> bool:
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text())["sha256"] == sha256_file(path)
    except (ValueError, KeyError, OSError):
        return False


def export(encoder: TorchEncoder, path: Path) -> Path:
    """Export the backbone (batch dimension dynamic) with torch's exporter; written atomically."""
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = encoder.settings.size
    example = torch.zeros(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=4096)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.export")
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):  # the exporter narrates on stdout
            warnings.simplefilter("ignore")
            program = torch.onnx.export(encoder.model.float().cpu().eval(), (example,), input_names=["pixels"],
                                        output_names=["features"], dynamic_shapes=({0: batch},), dynamo=True,
                                        opset_version=OPSET, external_data=False)
        program.save(str(tmp))
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    write_bytes_atomic(path, data)
    import hashlib
    write_atomic(path.with_suffix(".json"), lambda fh: fh.write(json.dumps({
        "sha256": hashlib.sha256(data).hexdigest(), "model_version": encoder.identity.key,
        "input_size": [h, w], "opset": OPSET}).encode()))
    logger.info("exported %s to %s (%.1f MB)", encoder.identity.key, path, len(data) / 1e6)
    return path


class OnnxEncoder:
    """An ``Encoder`` running an exported model with onnxruntime; identity and settings are the torch
    encoder's (the same model version)."""

    def __init__(self, source: TorchEncoder, model_path: Path, threads: int | None = None) -> None:
        self.model_path = model_path
        self.device = source.device if source.device.type == "cpu" else _cpu()  # onnxruntime runs on the CPU
        self._threads = threads or 0  # 0: onnxruntime's default (every core)
        self.session = self._session()
        self.settings = source.settings
        self.identity = source.identity
        self.spec = source.spec
        self._dim = source.dim

    def _session(self):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.log_severity_level = 3  # errors only: its warnings go to stderr on their own
        return ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def threads(self) -> int:
        """Intra-op threads (what an ingest's EncoderThreads tunes); setting it rebuilds the session."""
        return self._threads or (os.cpu_count() or 1)

    @threads.setter
    def threads(self, n: int) -> None:
        if n != self._threads:
            self._threads = n
            self.session = self._session()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, D), unit length."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        (features,) = self.session.run(None, {"pixels": x})
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return (features / np.maximum(norms, 1e-12)).astype(np.float32)


def onnx_encoder(source: TorchEncoder, cache_dir: Path) -> OnnxEncoder:
    """The ONNX Runtime twin of ``source``, exported into ``cache_dir`` on first use."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError("encoder.runtime is onnx but onnxruntime is not installed",
                          hint="pip install onnxruntime onnxscript, or set encoder.runtime: torch") from None
    path = onnx_path(cache_dir, source)
    if not _cached(path):
        export(source, path)
    return OnnxEncoder(source, path)
