"""Label adapters: a small projection trained on a frozen encoder's stored vectors (``mretrieve adapt``),
served as a model version of its own.

An adapter file is a safetensors file whose metadata says what it adapts: the base encoder (name,
weights and their hash, input size) and the projection (linear, or a two-layer MLP). Built as an encoder,
it embeds a new image with the base encoder, then projects; a reindex to it maps the base version's stored
vectors, decoding nothing.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mammo_retrieval.core.errors import WeightsError
from mammo_retrieval.core.fileio import sha256_file
from mammo_retrieval.core.identity import ModelIdentity

FORMAT = "mretrieve-adapter/1"
KINDS = ("linear", "mlp")


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter adapts and how, as stored in its file's metadata."""

    kind: str
    in_dim: int
    out_dim: int
    hidden: int
    base_key: str               # the base model version whose vectors it was trained on
    base_encoder: str           # registry name
    base_weights: str | None    # the base weights (a stored copy), None for the packaged/random ones
    base_weights_sha256: str
    base_input_size: int | None
    columns: tuple[str, ...]
    heldout_patients: tuple[str, ...] = ()
    metrics: str = "{}"         # JSON: held-out metrics before and after

    def to_metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "info": json.dumps(dataclasses.asdict(self))}


class Projection(torch.nn.Module):
    """Linear, or Linear-ReLU-Linear; outputs are L2-normalised by the caller."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, hidden: int = 0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"adapter kind must be one of {', '.join(KINDS)}")
        if kind == "linear":
            self.net = torch.nn.Linear(in_dim, out_dim)
        else:
            self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.ReLU(),
                                           torch.nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.net(x), dim=1)


def is_adapter_file(path: str | Path | None) -> bool:
    if not path or not str(path).endswith(".safetensors") or not Path(path).is_file():
        return False
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not an adapter
        return False


def save_adapter(path: Path, projection: Projection, info: AdapterInfo) -> None:
    from safetensors.torch import save_file

    from mammo_retrieval.core.fileio import write_atomic
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in projection.state_dict().items()}
    tmp = path.with_name(f".{path.name}.partial.safetensors")
    try:
        save_file(state, str(tmp), metadata=info.to_metadata())
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(path, lambda fh: fh.write(data))


def load_adapter(path: str | Path) -> tuple[Projection, AdapterInfo]:
    from safetensors import safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        raw = json.loads(meta["info"])
        info = AdapterInfo(**{**raw, "columns": tuple(raw["columns"]),
                              "heldout_patients": tuple(raw.get("heldout_patients", ()))})
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise WeightsError(f"{path}: not a readable adapter file ({type(exc).__name__}: {exc})",
                           hint="make one with `mretrieve adapt`") from None
    projection = Projection(info.kind, info.in_dim, info.out_dim, info.hidden)
    projection.load_state_dict(state)
    return projection.eval(), info


class AdaptedEncoder:
    """An ``Encoder``: the base encoder, then the projection. Its own model version (identity), the base's
    preprocessing."""

    def __init__(self, base, projection: Projection, info: AdapterInfo, path: Path) -> None:
        if base.identity.key != info.base_key:
            raise WeightsError(f"{path} adapts {info.base_key}, but the base encoder built is {base.identity.key}",
                               hint="the base weights changed since the adapter was trained: adapt again")
        self.base, self.projection, self.info = base, projection, info
        self.settings = base.settings
        self.device = getattr(base, "device", torch.device("cpu"))
        self.spec = dataclasses.replace(base.spec, dim=info.out_dim)
        self.identity = ModelIdentity(encoder=f"{base.identity.encoder}+adapter", weights_sha256=sha256_file(path),
                                      preprocess_digest=base.identity.preprocess_digest, dim=info.out_dim,
                                      random_weights=base.identity.random_weights, weights_path=str(path))

    @property
    def dim(self) -> int:
        return self.info.out_dim

    @property
    def runtime(self) -> str:
        return getattr(self.base, "runtime", "torch")

    @property
    def threads(self) -> int:
        """The base's own thread count (ONNX Runtime); an AttributeError for a torch base, whose count is
        torch's process-wide one (EncoderThreads asks with hasattr)."""
        return self.base.threads

    @threads.setter
    def threads(self, n: int) -> None:
        self.base.threads = n

    @torch.inference_mode()
    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Base vectors (N, in_dim) -> adapted unit vectors (N, out_dim)."""
        x = torch.tensor(np.asarray(vectors, dtype=np.float32))  # a copy: stored vectors are read-only buffers
        return self.projection(x).numpy()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.project(self.base.embed(batch))
