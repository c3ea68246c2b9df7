"""ONNX Runtime inference: the torch encoder exported once to ONNX, cached under ``<index_dir>/onnx/`` by
its identity (weights hash, preprocessing digest, input size), then run by onnxruntime on the CPU.

``encoder.runtime: auto`` (the default) picks it where it was measured faster than torch fp32 and agreeing
(``ONNX_FASTER``; bench/bench_onnx.py), ``onnx`` always, ``torch`` never. It is the same model version as the
torch encoder it came from (same identity, same index): the export is an execution detail. Every export is
checked against torch on a fixed input before it is used (cosine >= ``AGREEMENT`` per image) and a cached
file against the sha256 recorded beside it; a mismatch is exported again.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import logging
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mammo_retrieval.core.errors import ConfigError
from mammo_retrieval.core.fileio import sha256_file, write_atomic, write_bytes_atomic
from mammo_retrieval.core.private import make_private_dir
from mammo_retrieval.encoders.model import TorchEncoder

if TYPE_CHECKING:
    import torch

    from mammo_retrieval.core.config import EncoderConfig
    from mammo_retrieval.encoders.base import Encoder

logger = logging.getLogger(__name__)

OPSET = 18
AGREEMENT = 0.999  # the least per-image cosine between an export and its torch model

#: timm architectures that ran faster under onnxruntime than under torch fp32 on the CPU, with vectors that
#: agree (bench/bench_onnx.py on mini-MIAS; README "ONNX Runtime against torch"). ``runtime: auto`` exports
#: these; everything else (ViTs, rad-dino, GPUs, bf16, channels_last) stays with torch.
ONNX_FASTER = frozenset({"resnet18", "resnet50", "densenet121", "inception_v3"})
ONNX_FAMILIES = ("timm", "intensity-fusion")


class OnnxUnavailable(ConfigError):
    """The ONNX twin cannot be made or trusted here (no onnxruntime, a failed export, disagreement)."""


def _cpu():
    import torch
    return torch.device("cpu")


def onnx_path(cache_dir: Path, encoder: TorchEncoder) -> Path:
    identity, (h, w) = encoder.identity, encoder.settings.size
    return Path(cache_dir) / f"{identity.key}-{h}x{w}.onnx"


def _cached(path: Path) -> bool:
    """A file exported and checked by this version of the exporter, unchanged since (its sha256)."""
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        return False
    try:
        record = json.loads(meta.read_text())
        return (record["sha256"] == sha256_file(path) and record.get("opset") == OPSET
                and record.get("check_min_cosine", -1.0) >= AGREEMENT)
    except (ValueError, KeyError, TypeError, OSError):
        return False


def _exported_bytes(model: "torch.nn.Module", size: tuple[int, int]) -> bytes:
    """``model`` as ONNX (batch dimension dynamic), with torch's exporter."""
    import torch
    example = torch.zeros(2, 3, *size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory(prefix="mretrieve-onnx-") as scratch:
        tmp = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), input_names=["pixels"], output_names=["features"],
                                        dynamic_shapes=({0: batch},), dynamo=True, opset_version=OPSET,
                                        external_data=False)
        program.save(str(tmp))
        return tmp.read_bytes()


def _agreement(model: "torch.nn.Module", data: bytes, size: tuple[int, int]) -> float:
    """The least per-image cosine between the export and ``model`` (fp32, CPU) on a fixed input (3 images)."""
    import onnxruntime as ort
    import torch
    x = np.random.default_rng(0).standard_normal((3, 3, *size)).astype(np.float32)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {"pixels": x})
    with torch.inference_mode():
        theirs = torch.nn.functional.normalize(model(torch.from_numpy(x)).float(), dim=1).numpy()
    ours = ours / np.maximum(np.linalg.norm(ours, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(ours * theirs, axis=1)))


def _make_checked(encoder: TorchEncoder) -> tuple[bytes, float]:
    """Export an fp32 CPU copy of the model and check it against that copy (the serving model, perhaps on a
    GPU, is left as it is)."""
    model = copy.deepcopy(encoder.model).float().cpu().eval()
    try:
        data = _exported_bytes(model, encoder.settings.size)
        return data, _agreement(model, data, encoder.settings.size)
    except Exception as exc:  # the exporter and onnxruntime raise many kinds; all mean "no ONNX twin"
        raise OnnxUnavailable(f"{encoder.identity.key}: the export to ONNX failed: {type(exc).__name__}: "
                              f"{str(exc)[:300]}", hint="set encoder.runtime: torch") from exc


# What this process learnt about each (model version, input size, opset): small values, never model bytes.
_checks: dict[tuple, float] = {}   # the export's least cosine against torch
_written: dict[tuple, Path] = {}   # a checked file it wrote: a second home copies it instead of exporting
_failures: dict[tuple, str] = {}   # an export that failed: not tried again by this process
_lock = threading.Lock()


def _copy_of_written(key: tuple) -> bytes | None:
    """The bytes of a checked export this process wrote, if that file is still there and unchanged."""
    path = _written.get(key)
    try:
        record = json.loads(path.with_suffix(".json").read_text()) if path else None
        data = path.read_bytes() if record else None
    except (OSError, ValueError):
        return None
    return data if data and hashlib.sha256(data).hexdigest() == record.get("sha256") else None


def export(encoder: TorchEncoder, path: Path) -> Path:
    """Export, check against torch, then write atomically (the model, then its record): a file that is
    there with a matching record is one that agreed. Once per process and model version."""
    key, name = (encoder.identity.key, encoder.settings.size, OPSET), encoder.identity.key
    with _lock:
        if key in _failures:
            raise OnnxUnavailable(_failures[key], hint="set encoder.runtime: torch")
        data = _copy_of_written(key) if _checks.get(key, -1.0) >= AGREEMENT else None
        if data is None:
            try:
                data, _checks[key] = _make_checked(encoder)
            except OnnxUnavailable as exc:
                _failures[key] = exc.message
                raise
        cosine = _checks[key]
        if not cosine >= AGREEMENT:
            raise OnnxUnavailable(f"{name}: the ONNX export disagrees with torch (least cosine {cosine:.6f} "
                                  f"< {AGREEMENT})", hint="set encoder.runtime: torch")
        make_private_dir(path.parent)  # beside the index, as private as it
        write_bytes_atomic(path, data)
        h, w = encoder.settings.size
        write_atomic(path.with_suffix(".json"), lambda fh: fh.write(json.dumps({
            "sha256": hashlib.sha256(data).hexdigest(), "model_version": name, "input_size": [h, w],
            "opset": OPSET, "check_min_cosine": round(cosine, 6)}).encode()))
        _written[key] = path
    logger.info("exported %s to %s (%.1f MB; least cosine against torch %.6f)", name, path, len(data) / 1e6,
                cosine)
    return path


class OnnxEncoder:
    """An ``Encoder`` running an exported model with onnxruntime; identity and settings are the torch
    encoder's (the same model version)."""

    runtime = "onnx"

    def __init__(self, source: TorchEncoder, model_path: Path, threads: int | None = None) -> None:
        self.source = source  # the torch model it was exported from: what `train` finetunes
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
        """Intra-op threads (what an ingest's EncoderThreads tunes; 0: onnxruntime's default, every
        physical core); setting it rebuilds the session."""
        return self._threads

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
    if importlib.util.find_spec("onnxruntime") is None:
        raise OnnxUnavailable("encoder.runtime is onnx but onnxruntime is not installed",
                              hint="pip install onnxruntime onnxscript, or set encoder.runtime: torch")
    path = onnx_path(cache_dir, source)
    if not _cached(path):
        export(source, path)
    try:
        return OnnxEncoder(source, path)
    except Exception as exc:  # onnxruntime's own errors (Fail, InvalidGraph, ...) derive from Exception
        raise OnnxUnavailable(f"{source.identity.key}: onnxruntime cannot load {path}: {type(exc).__name__}: "
                              f"{str(exc)[:300]}", hint="set encoder.runtime: torch") from exc


def auto_runtime(cfg: "EncoderConfig", encoder: TorchEncoder) -> str:
    """``runtime: auto``: onnx where it was measured faster and agreeing and nothing asks for torch."""
    spec = getattr(encoder, "spec", None)
    if (not isinstance(encoder, TorchEncoder) or spec is None or spec.family not in ONNX_FAMILIES
            or spec.timm_name not in ONNX_FASTER or encoder.device.type != "cpu" or cfg.precision != "fp32"
            or cfg.channels_last or importlib.util.find_spec("onnxruntime") is None):
        return "torch"
    return "onnx"


def with_runtime(encoder: "Encoder", cfg: "EncoderConfig", cache_dir: Path) -> "Encoder":
    """``encoder`` run as ``cfg.runtime`` says. Under ``auto`` a model that cannot be exported, does not
    agree or cannot be written (a full disk) runs with torch, with a warning: the export only makes it
    faster. Under ``onnx`` each is an error. An adapter's base runs on onnxruntime, its projection in torch."""
    from mammo_retrieval.encoders.adapter import AdaptedEncoder
    base = encoder.base if isinstance(encoder, AdaptedEncoder) else encoder
    runtime = auto_runtime(cfg, base) if cfg.runtime == "auto" else cfg.runtime
    if runtime != "onnx":
        return encoder
    try:
        twin = onnx_encoder(base, cache_dir)
    except (OnnxUnavailable, OSError) as exc:
        if cfg.runtime == "onnx":
            raise
        reason = (exc.message if isinstance(exc, OnnxUnavailable)
                  else f"{base.identity.key}: cannot write its ONNX export ({exc})")
        logger.warning("encoder.runtime auto: %s; running it with torch", reason)
        return encoder
    if isinstance(encoder, AdaptedEncoder):
        return AdaptedEncoder(twin, encoder.projection, encoder.info, Path(encoder.identity.weights_path))
    return twin
