"""Load encoder weights from a PRIMER checkpoint, a plain timm/torch state dict, or safetensors.

No network: the file must be on disk. The SHA-256 of the file is the model version.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import torch

from mammo_retrieval.core.errors import WeightsError, Remedy
from mammo_retrieval.core.fileio import sha256_file, write_atomic

PRIMER_PREFIX = "encoder.encoder."
# keys a classification checkpoint carries that a headless (num_classes=0) encoder does not have
HEAD_PREFIXES = ("fc.", "classifier.", "head.fc.", "AuxLogits.", "last_linear.")
WRAPPER_PREFIXES = ("module.", "model.", "encoder.")


def store_weights(source: str | Path, store_dir: Path) -> tuple[Path, str]:
    """Copy a weights file into ``store_dir`` as ``<sha256><suffix>``; return that path and the hash.

    A model version must not depend on a file the user may overwrite or delete later, so it points at
    this copy. Written atomically (temp file, fsync, rename); skipped when a copy with that hash exists.
    """
    source = Path(source)
    if not source.is_file():
        raise WeightsError(f"weights file not found: {source}", hint="give an existing checkpoint file")
    sha = sha256_file(source)
    target = store_dir / f"{sha}{source.suffix}"
    if target.is_file() and sha256_file(target) == sha:
        return target, sha
    store_dir.mkdir(parents=True, exist_ok=True)
    copied = hashlib.sha256()

    def copy(dst) -> None:
        with open(source, "rb") as src:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                copied.update(chunk)
                dst.write(chunk)
        if copied.hexdigest() != sha:
            raise WeightsError(f"{source} changed while it was being copied to {store_dir}",
                               hint="run the command again once the file is no longer being written")

    try:
        write_atomic(target, copy)
    except OSError as exc:
        raise WeightsError(f"cannot copy {source} to {target}: {exc}",
                           hint="free disk space or fix the permissions of the index folder") from None
    return target, sha


def verify_weights(path: str | Path, expected_sha256: str) -> None:
    """Refuse a stored weights file whose content is not the one a model version was built with."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"stored weights file is missing: {path} (expected sha256 {expected_sha256})",
                           remedies=[Remedy("restore it, or reindex with the original checkpoint", "reindex")])
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise WeightsError(f"{path}: stored weights were modified: sha256 is {actual}, expected {expected_sha256}",
                           remedies=[Remedy("restore the file, or reindex with the original checkpoint", "reindex")])


def sha256_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of tensors, for weights that never touched a file (seeded random init)."""
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}",
                           hint="set encoder.weights (or $MRETRIEVE_WEIGHTS) to an existing file; nothing is downloaded")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read weights: {type(exc).__name__}: {exc}",
                           hint="expected a PRIMER checkpoint, a torch state dict (.pt/.pth/.bin) or .safetensors") from None


def extract_encoder_state(checkpoint: Mapping, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Find the backbone's tensors in any supported layout and strip wrapper prefixes."""
    if "model_state_dict" in checkpoint:  # PRIMER layout
        state = checkpoint["model_state_dict"]
        encoder = {k[len(PRIMER_PREFIX):]: v for k, v in state.items() if k.startswith(PRIMER_PREFIX)}
        if not encoder:
            raise WeightsError(f"{path}: model_state_dict has no '{PRIMER_PREFIX}*' keys",
                               hint="a PRIMER checkpoint stores the backbone under encoder.encoder.")
        return encoder
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{path}: no tensors found in the checkpoint")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Strict load that tolerates only a classification head; any other mismatch is an error."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} with wrong shape (e.g. {wrong_shape[0]})")
        raise WeightsError(f"{path}: weights do not fit this encoder: " + "; ".join(parts),
                           hint="check encoder.name matches the architecture the weights were trained for")
    model.load_state_dict(state, strict=True)
