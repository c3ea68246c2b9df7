"""ONNX Runtime inference: the torch encoder exported once to ONNX, cached under ``<index_dir>/onnx/`` by
its identity (weights hash, preprocessing digest, input size), then run by onnxruntime on the CPU.

``encoder.runtime: auto`` (the default) picks it where it was measured faster than torch fp32 and agreeing
(``ONNX_FASTER``; bench/bench_onnx.py), ``onnx`` always, ``torch`` never. It is the same model version as the
torch encoder it came from (same identity, same index): the export is an execution detail. Every export is
checked against torch on fixed inputs (noise and two mammogram-like pictures; ``check_inputs``) before it is
used (cosine >= ``AGREEMENT`` per input) and a cached file against the sha256 recorded beside it; a mismatch
is exported again.
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
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import torch

from mammo_retrieval.core.errors import ConfigError
from mammo_retrieval.core.fileio import sha256_file, write_atomic, write_bytes_atomic
from mammo_retrieval.core.private import make_private_dir
from mammo_retrieval.encoders.model import TorchEncoder
from mammo_retrieval.encoders.registry import FUSED_FAMILIES
from mammo_retrieval.preprocess import PreprocessSettings, normalise

if TYPE_CHECKING:
    from mammo_retrieval.core.config import EncoderConfig
    from mammo_retrieval.encoders.base import Encoder

logger = logging.getLogger(__name__)

OPSET = 18
CHECK_INPUTS = 2  # recorded with each export: 1 was noise alone; raise it whenever check_inputs changes
AGREEMENT = 0.999  # the least per-image cosine between an export and its torch model

#: timm architectures that ran faster under onnxruntime than under torch fp32 on the CPU, with vectors that
#: agree (bench/bench_onnx.py on mini-MIAS; README "ONNX Runtime against torch"). ``runtime: auto`` exports
#: these; everything else (ViTs, rad-dino, GPUs, bf16, channels_last) stays with torch.
ONNX_FASTER = frozenset({"resnet18", "resnet50", "densenet121", "inception_v3"})
ONNX_FAMILIES = ("timm", *FUSED_FAMILIES)


TORCH_HINT = "set encoder.runtime: torch"


class OnnxUnavailable(ConfigError):
    """The ONNX twin cannot be made or trusted here (no onnxruntime, a failed export, disagreement)."""


def onnx_path(cache_dir: Path, encoder: TorchEncoder) -> Path:
    """Where ``encoder``'s export lives: one file per model version and input size."""
    identity, (h, w) = encoder.identity, encoder.settings.size
    return Path(cache_dir) / f"{identity.key}-{h}x{w}.onnx"


def _record(path: Path) -> dict | None:
    """The JSON record beside an export, or None where it is missing or unreadable."""
    try:
        record = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _cached(path: Path) -> bool:
    """An export checked against torch at this opset, on today's ``check_inputs``, and unchanged since (the
    sha256 in its record). One checked on older inputs (noise alone) is exported and checked again."""
    record = _record(path)
    if record is None or record.get("opset") != OPSET or record.get("check_inputs") != CHECK_INPUTS:
        return False
    cosine = record.get("check_min_cosine")
    try:
        return (isinstance(cosine, (int, float)) and cosine >= AGREEMENT
                and record.get("sha256") == sha256_file(path))
    except OSError:
        return False


def _exported_bytes(model: torch.nn.Module, size: tuple[int, int]) -> bytes:
    """``model`` as ONNX (batch dimension dynamic), with torch's exporter."""
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


def check_inputs(settings: PreprocessSettings) -> np.ndarray:
    """Three fixed model inputs, (3, 3, H, W) float32: random noise (any tensor at all), and two
    mammogram-like pictures normalised as the pipeline does (``normalise``): a textured breast on a black
    background, bright on the left and darker on the right. Noise alone left a fused encoder's histogram
    and texture branches at grey levels no real image has."""
    rng = np.random.default_rng(0)
    h, w = settings.size
    rows, cols = np.mgrid[0:h, 0:w] / np.array([h, w], dtype=np.float64)[:, None, None]
    pictures = []
    for edge, level in ((0.0, 150.0), (1.0, 90.0)):
        coarse = rng.random((h // 8 + 1, w // 8 + 1))
        blobs = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w]  # tissue-sized patches
        tissue = level + 60.0 * (blobs - 0.5) + 12.0 * rng.standard_normal((h, w))
        breast = (cols - edge) ** 2 + 0.6 * (rows - 0.5) ** 2 < 0.36
        pictures.append(np.where(breast, np.clip(tissue, 1, 255), 0).round().astype(np.uint8))
    noise = rng.standard_normal((1, 3, h, w)).astype(np.float32)
    return np.concatenate([noise, normalise(np.stack(pictures), settings)])


def _agreement(model: torch.nn.Module, data: bytes, inputs: np.ndarray) -> float:
    """The least per-row cosine between the export and ``model`` (fp32, CPU) on ``check_inputs``: a
    numerical check of the translation, not of retrieval quality."""
    import onnxruntime as ort
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {"pixels": inputs})
    with torch.inference_mode():
        theirs = torch.nn.functional.normalize(model(torch.from_numpy(inputs)).float(), dim=1).numpy()
    ours = ours / np.maximum(np.linalg.norm(ours, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(ours * theirs, axis=1)))


def _export_and_check(encoder: TorchEncoder) -> tuple[bytes, float]:
    """Export an fp32 CPU copy of the model and check it against that copy (the serving model, perhaps on a
    GPU, is left as it is). The exporter's and onnxruntime's errors become OnnxUnavailable; running out of
    disk or memory does not (it may pass)."""
    try:
        model = copy.deepcopy(encoder.model).float().cpu().eval()
        data = _exported_bytes(model, encoder.settings.size)
        return data, _agreement(model, data, check_inputs(encoder.settings))
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # the exporter and onnxruntime raise many kinds; all mean "no ONNX twin"
        raise OnnxUnavailable(f"{encoder.identity.key}: the export to ONNX failed: {type(exc).__name__}: "
                              f"{str(exc)[:300]} ({_raised_at(exc)})", hint=TORCH_HINT) from exc


def _raised_at(exc: BaseException) -> str:
    """Where an exception was raised, as ``file.py:line``: the exporter's errors are terse ("expected str,
    bytes or os.PathLike object, not int") and a warning carries no traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "at an unknown place"


class ExportKey(NamedTuple):
    model_version: str
    size: tuple[int, int]
    opset: int


class _ExportMemo:
    """What this process learnt per model version, so that a second home (tests, a server's reindex and
    rollback) neither exports again nor retries what cannot work: the least cosine of a checked export,
    the file it was written to, and exports that failed for good (the exporter's errors, disagreement).
    Small values only, never model bytes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cosine: dict[ExportKey, float] = {}
        self.written: dict[ExportKey, Path] = {}
        self.failed: dict[ExportKey, str] = {}

    def copy_of_written(self, key: ExportKey) -> bytes | None:
        """The bytes of a checked export this process wrote, if that file still passes ``_cached``."""
        path = self.written.get(key)
        try:
            return path.read_bytes() if path and _cached(path) else None
        except OSError:
            return None


_memo = _ExportMemo()


def _checked_bytes(encoder: TorchEncoder, key: ExportKey) -> tuple[bytes, float]:
    """A checked export of ``encoder`` (copied from one this process wrote, or made now) and its cosine;
    OnnxUnavailable, remembered, when it cannot be made or disagrees. Called under the memo's lock."""
    if key in _memo.failed:
        raise OnnxUnavailable(f"{_memo.failed[key]} (not tried again by this process)",
                              hint=TORCH_HINT)
    data = _memo.copy_of_written(key) if key in _memo.cosine else None
    if data is None:
        try:
            data, _memo.cosine[key] = _export_and_check(encoder)
        except OnnxUnavailable as exc:
            _memo.failed[key] = exc.message
            raise
    cosine = _memo.cosine[key]
    if not cosine >= AGREEMENT:
        _memo.failed[key] = (f"{key.model_version}: the ONNX export disagrees with torch (least cosine "
                             f"{cosine:.6f} < {AGREEMENT})")
        raise OnnxUnavailable(_memo.failed[key], hint=TORCH_HINT)
    return data, cosine


def _write_with_record(path: Path, data: bytes, cosine: float, key: ExportKey) -> None:
    """The model, then its record, each atomically: a file with a matching record is one that agreed."""
    make_private_dir(path.parent)  # beside the index, as private as it
    write_bytes_atomic(path, data)
    record = {"sha256": hashlib.sha256(data).hexdigest(), "model_version": key.model_version,
              "input_size": list(key.size), "opset": key.opset, "check_min_cosine": round(cosine, 6),
              "check_inputs": CHECK_INPUTS}
    write_atomic(path.with_suffix(".json"), lambda fh: fh.write(json.dumps(record).encode()))


def export(encoder: TorchEncoder, path: Path) -> Path:
    """Export ``encoder`` to ``path``, checked against torch: once per process and model version, unless
    writing it failed (then the next call exports again: disk space may have come back)."""
    key = ExportKey(encoder.identity.key, tuple(encoder.settings.size), OPSET)
    with _memo.lock:
        data, cosine = _checked_bytes(encoder, key)
        _write_with_record(path, data, cosine, key)
        _memo.written[key] = path
    logger.info("exported %s to %s (%.1f MB; least cosine against torch %.6f)", key.model_version, path,
                len(data) / 1e6, cosine)
    return path


class OnnxEncoder:
    """An ``Encoder`` running an exported model with onnxruntime; identity and settings are the torch
    encoder's (the same model version)."""

    runtime = "onnx"

    def __init__(self, source: TorchEncoder, model_path: Path, threads: int | None = None,
                 rebuild: "Callable[[], TorchEncoder] | None" = None) -> None:
        # the torch model it was exported from (what `train` finetunes); with ``rebuild`` it is let go and
        # built again only when asked for, so a server does not hold the weights twice
        self._source, self._rebuild = (None, rebuild) if rebuild else (source, None)
        self._source_lock = threading.Lock()
        self.model_path = model_path
        self.device = torch.device("cpu")  # onnxruntime runs on the CPU
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
    def source(self) -> TorchEncoder:
        """The torch encoder this was exported from; refused if its weights are no longer the served ones."""
        with self._source_lock:
            if self._source is None:
                rebuilt = self._rebuild()
                if rebuilt.identity.key != self.identity.key:
                    from mammo_retrieval.core.errors import WeightsError
                    raise WeightsError(f"{self.identity.key}: the torch model built again for it is "
                                       f"{rebuilt.identity.key} (its weights file changed since it was loaded)",
                                       hint="restart the process to serve the weights as they are now")
                self._source = rebuilt
            return self._source

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


def onnx_encoder(source: TorchEncoder, cache_dir: Path,
                 rebuild: "Callable[[], TorchEncoder] | None" = None) -> OnnxEncoder:
    """The ONNX Runtime twin of ``source``, exported into ``cache_dir`` on first use; with ``rebuild`` (a
    function building ``source`` again) the twin does not keep ``source`` alive."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise OnnxUnavailable("encoder.runtime is onnx but onnxruntime is not installed",
                              hint="pip install onnxruntime onnxscript, or set encoder.runtime: torch")
    path = onnx_path(cache_dir, source)
    if not _cached(path):
        export(source, path)
    try:
        return OnnxEncoder(source, path, rebuild=rebuild)
    except Exception as exc:  # onnxruntime's own errors (Fail, InvalidGraph, ...) derive from Exception
        raise OnnxUnavailable(f"{source.identity.key}: onnxruntime cannot load {path}: {type(exc).__name__}: "
                              f"{str(exc)[:300]}", hint=TORCH_HINT) from exc


def auto_runtime(cfg: "EncoderConfig", encoder: "Encoder") -> str:
    """``runtime: auto``: onnx where it was measured faster and agreeing and nothing asks for torch."""
    spec = getattr(encoder, "spec", None)
    if (not isinstance(encoder, TorchEncoder) or spec is None or spec.family not in ONNX_FAMILIES
            or spec.timm_name not in ONNX_FASTER or encoder.device.type != "cpu" or cfg.precision != "fp32"
            or cfg.channels_last or importlib.util.find_spec("onnxruntime") is None):
        return "torch"
    return "onnx"


def with_runtime(build: "Callable[[], Encoder]", cfg: "EncoderConfig", cache_dir: Path) -> "Encoder":
    """The encoder ``build()`` makes, run as ``cfg.runtime`` says. Under ``auto`` a model that cannot be
    exported, does not agree or cannot be written (a full disk) runs with torch, with a warning: the export
    only makes it faster (a later process tries again). Under ``onnx`` each is an error. An adapter's base
    runs on onnxruntime, its projection in torch. An ONNX twin lets the torch weights go: ``build`` makes
    them again only if `train` asks for them."""
    from mammo_retrieval.encoders.adapter import AdaptedEncoder
    encoder = build()
    base = encoder.base if isinstance(encoder, AdaptedEncoder) else encoder
    runtime = auto_runtime(cfg, base) if cfg.runtime == "auto" else cfg.runtime
    if runtime != "onnx":
        return encoder
    try:
        twin = onnx_encoder(base, cache_dir, (lambda: build().base) if isinstance(encoder, AdaptedEncoder) else build)
    except (OnnxUnavailable, OSError, MemoryError) as exc:
        if cfg.runtime == "onnx":
            raise
        reason = (exc.message if isinstance(exc, OnnxUnavailable)
                  else f"{base.identity.key}: no ONNX export ({type(exc).__name__}: {exc})")
        logger.warning("encoder.runtime auto: %s; running it with torch", reason)
        return encoder
    if isinstance(encoder, AdaptedEncoder):
        return AdaptedEncoder(twin, encoder.projection, encoder.info, Path(encoder.identity.weights_path))
    return twin
