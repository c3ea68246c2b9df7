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
# MoCo v3 / CLEAR (LeCL) main_moco.py: the query encoder, then the momentum one (used only when alone)
MOCO_PREFIXES = ("module.base_encoder.", "base_encoder.", "module.momentum_encoder.", "momentum_encoder.")
# keys a classification checkpoint carries that a headless (num_classes=0) encoder does not have
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "AuxLogits.", "last_linear.")
WRAPPER_PREFIXES = ("module.", "model.", "encoder.")


def store_weights(source: str | Path, store_dir: Path) -> tuple[Path, str]:
    """Copy a weights file into ``store_dir`` as ``<sha256><suffix>``; return that path and the hash.

    A model version must not depend on a file the user may overwrite or delete later, so it points at
    this copy. Written atomically (temp file, fsync, rename); skipped when a copy with that hash exists.
    """
    source = Path(source)
    if source.is_dir():
        return _store_folder(source, store_dir)
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


def _store_folder(source: Path, store_dir: Path) -> tuple[Path, str]:
    """A Hugging Face model folder copied as ``store_dir/<sha256>/`` (its model files only), atomically:
    into a temporary folder, each file fsynced, then renamed into place."""
    import os
    import shutil

    from mammo_retrieval.encoders.hf import FOLDER_FILES, check_folder, folder_sha256
    check_folder(source)
    sha = folder_sha256(source)
    target = store_dir / sha
    if target.is_dir() and folder_sha256(target) == sha:
        return target, sha
    store_dir.mkdir(parents=True, exist_ok=True)
    tmp = store_dir / f".{sha}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name in FOLDER_FILES:
            if (source / name).is_file():
                data = (source / name).read_bytes()
                write_atomic(tmp / name, lambda fh, d=data: fh.write(d))
        if folder_sha256(tmp) != sha:
            raise WeightsError(f"{source} changed while it was being copied to {store_dir}",
                               hint="run the command again once the folder is no longer being written")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as exc:
        raise WeightsError(f"cannot copy {source} to {target}: {exc}",
                           hint="free disk space or fix the permissions of the index folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, sha


def verify_weights(path: str | Path, expected_sha256: str) -> None:
    """Refuse a stored weights file (or model folder) whose content is not the one a model version was
    built with."""
    path = Path(path)
    if path.is_dir():
        from mammo_retrieval.encoders.hf import folder_sha256
        if (actual := folder_sha256(path)) != expected_sha256:
            raise WeightsError(f"{path}: stored model folder was modified: sha256 is {actual}, expected "
                               f"{expected_sha256}", remedies=[Remedy("restore it, or reindex with the original "
                                                                      "folder", "reindex")])
        return
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
    hint = "expected a PRIMER checkpoint, a torch state dict (.pt/.pth/.bin) or .safetensors"
    if path.suffix != ".safetensors" and (head := _not_torch_saved(path)) is not None:
        raise WeightsError(f"{path}: not a checkpoint: torch saves a zip archive or a pickle, and this file "
                           f"starts with {head!r}", hint=hint)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read weights: {_short_reason(exc)}", hint=hint) from None


def _not_torch_saved(path: Path) -> bytes | None:
    """The file's first bytes when it is neither a zip archive (torch.save) nor a pickle (its legacy
    format, which starts with the PROTO opcode 0x80); None when it may be either."""
    import zipfile
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return None  # torch.load says why
    return None if head[:1] == b"\x80" or zipfile.is_zipfile(path) else head


def _short_reason(exc: Exception) -> str:
    """torch's reason without its advice to load with weights_only=False (which can run the file's code)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = next((line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), "")
        return (f"it holds objects other than tensors and plain containers ({detail}); it is not loaded "
                "with weights_only=False, which could run code from the file")
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _tensors(checkpoint: Mapping) -> dict:
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _moco_prefix(keys) -> str | None:
    for prefix in MOCO_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return None


def describe_layout(checkpoint: Mapping) -> str:
    """The checkpoint layout, in words for errors: PRIMER, MoCo/LeCL (which encoder), or a plain state dict."""
    if "model_state_dict" in checkpoint:
        return "PRIMER checkpoint (model_state_dict, encoder.encoder.*)"
    prefix = _moco_prefix(_tensors(checkpoint))
    if prefix:
        return f"MoCo/LeCL checkpoint ({prefix}*)"
    return "plain state dict"


def extract_encoder_state(checkpoint: Mapping, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Find the backbone's tensors in any supported layout and strip wrapper prefixes: PRIMER
    (``model_state_dict`` / ``encoder.encoder.``), MoCo v3 / LeCL (``module.base_encoder.``, else
    ``module.momentum_encoder.``; the predictor and projection head are left out), a state dict under
    ``state_dict`` or ``model``, a plain state dict, or safetensors."""
    if "model_state_dict" in checkpoint:  # PRIMER layout
        state = checkpoint["model_state_dict"]
        encoder = {k[len(PRIMER_PREFIX):]: v for k, v in state.items() if k.startswith(PRIMER_PREFIX)}
        if not encoder:
            raise WeightsError(f"{path}: model_state_dict has no '{PRIMER_PREFIX}*' keys",
                               hint="a PRIMER checkpoint stores the backbone under encoder.encoder.")
        return encoder
    state = _tensors(checkpoint)
    if not state:
        raise WeightsError(f"{path}: no tensors found in the checkpoint")
    if (prefix := _moco_prefix(state)) is not None:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path,
              layout: str = "plain state dict") -> None:
    """Strict load that tolerates only a classification (or projection) head; any other mismatch is an
    error naming the checkpoint's layout and the keys this encoder expects."""
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
        expected = ", ".join(list(own)[:3])
        found = ", ".join(list(state)[:3]) or "none"
        raise WeightsError(f"{path} ({layout}): weights do not fit this encoder: " + "; ".join(parts)
                           + f"; it expects keys like {expected}, the checkpoint has {found}",
                           hint="check encoder.name matches the architecture the weights were trained for; "
                                "known layouts: PRIMER, MoCo/LeCL (module.base_encoder.*), a timm or torch "
                                "state dict (optionally under state_dict/model, with module./model./encoder. "
                                "prefixes), safetensors")
    model.load_state_dict(state, strict=True)
