"""Hugging Face vision encoders (the RAD-DINO family: a DINOv2 ViT in transformers format), loaded from a
local folder, never downloaded.

The folder is both architecture and weights: ``config.json`` plus ``model.safetensors`` (or
``pytorch_model.bin``), and optionally ``preprocessor_config.json``, whose resize, crop, mean and std then
replace the registry entry's. Images reach the model as the PRIMER pipeline's square uint8 picture; the
folder's "resize the shortest edge, then centre-crop" of a square picture is a resize to the crop size,
which is what the settings ask for. The embedding is the pooler output (DINOv2: the CLS token after the
final layer norm, as RAD-DINO's model card uses it), or the CLS token where a model has no pooler.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mammo_retrieval.core.errors import WeightsError
from mammo_retrieval.core.fileio import sha256_file

FAMILY = "transformers"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FOLDER_FILES = ("config.json", "preprocessor_config.json", *WEIGHT_FILES)
# PIL resample codes (what preprocessor_config.json stores) -> our interpolation names
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 4: "area"}  # 1 Lanczos and 5 Hamming: refused


@dataclass(frozen=True)
class FolderPreprocessing:
    size: tuple[int, int] | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    interpolation: str | None


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def check_folder(path: str | Path) -> Path:
    """The folder, or a WeightsError saying what a Hugging Face folder must hold."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise WeightsError(f"{path}: not a folder; this encoder loads a Hugging Face folder",
                           hint="set encoder.weights to a folder with config.json and model.safetensors "
                                "(nothing is downloaded)")
    if not (path / "config.json").is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
        present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise WeightsError(f"{path}: a Hugging Face folder needs config.json and one of {', '.join(WEIGHT_FILES)}; "
                           f"it holds {present}", hint="save the model with save_pretrained()")
    return path


def folder_sha256(path: str | Path) -> str:
    """The content hash of a model folder: the files that make the model, by name and content."""
    path = Path(path)
    h = hashlib.sha256()
    for name in FOLDER_FILES:
        if (path / name).is_file():
            h.update(f"{name}\0{sha256_file(path / name)}\0".encode())
    return h.hexdigest()


def folder_preprocessing(path: str | Path) -> FolderPreprocessing:
    """What preprocessor_config.json says about size, mean, std and resampling (None where it is silent)."""
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return FolderPreprocessing(None, None, None, None)
    try:
        cfg = json.loads(file.read_text())
    except ValueError as exc:
        raise WeightsError(f"{file}: not valid JSON: {exc}") from None

    def edge(value) -> tuple[int, int] | None:
        if isinstance(value, int):
            return value, value
        if isinstance(value, dict):
            if "height" in value and "width" in value:
                return int(value["height"]), int(value["width"])
            if "shortest_edge" in value:
                return int(value["shortest_edge"]), int(value["shortest_edge"])
        return None

    size = edge(cfg.get("crop_size")) if cfg.get("do_center_crop") else None
    size = size or edge(cfg.get("size"))
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    resample = cfg.get("resample")
    if resample is not None and resample not in RESAMPLE:
        raise WeightsError(f"{file}: resample {resample} (PIL's Lanczos or Hamming) is not a resize we do",
                           hint="the models we load use nearest (0), bilinear (2), bicubic (3) or box (4)")
    return FolderPreprocessing(size, tuple(mean) if mean else None, tuple(std) if std else None,
                               RESAMPLE.get(resample))


class HFVisionBackbone(torch.nn.Module):
    """A transformers vision model as a backbone: pixel batch in, pooled embedding out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


def load_hf_backbone(path: str | Path) -> tuple[HFVisionBackbone, int]:
    """The folder's model (local files only) and its embedding size (the config's hidden size)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a library prints no progress bar of its own on our stderr
    path = check_folder(path)
    try:
        model, loading = AutoModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a broken folder
        raise WeightsError(f"{path}: transformers cannot load this folder: {type(exc).__name__}: {exc}",
                           hint="a folder written by save_pretrained() of a vision model (e.g. Dinov2Model)") from None
    if loading.get("missing_keys") or loading.get("mismatched_keys"):
        missing = list(loading.get("missing_keys") or []) + [str(k) for k in loading.get("mismatched_keys") or []]
        raise WeightsError(f"{path}: the weights lack {len(missing)} tensor(s) of this architecture (e.g. "
                           f"{', '.join(missing[:3])}); transformers would fill them with random values",
                           hint="save the complete model with save_pretrained(), pooler included")
    dim = int(getattr(model.config, "hidden_size", 0) or 0)
    if not dim:
        raise WeightsError(f"{path}: config.json has no hidden_size; cannot tell the embedding size")
    return HFVisionBackbone(model), dim
