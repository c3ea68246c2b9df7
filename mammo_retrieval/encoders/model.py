"""The embedding model: a headless torch backbone (built by its registry family) whose outputs are
L2-normalised."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from mammo_retrieval.core.config import EncoderConfig, PreprocessConfig
from mammo_retrieval.core.errors import ConfigError, WeightsError
from mammo_retrieval.preprocess import PreprocessSettings
from mammo_retrieval.core.identity import ModelIdentity
from mammo_retrieval.encoders.fusion import require_fused_layout
from mammo_retrieval.encoders.registry import DEFAULT_REGISTRY, FUSED_FAMILIES, EncoderRegistry, EncoderSpec
from mammo_retrieval.core.fileio import sha256_file
from mammo_retrieval.encoders.weights import (describe_layout, extract_encoder_state, load_into, read_checkpoint,
                                              sha256_state_dict)

RANDOM_SEED = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("encoder.device is 'cuda' but no CUDA device is available", hint="use device: auto or cpu")
    return torch.device(name)


class TorchEncoder:
    """An ``Encoder`` (see ``base``) over a torch backbone: wraps it with its preprocessing settings and identity; ``embed`` is batch in, vectors out."""

    runtime = "torch"

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, settings: PreprocessSettings,
                 identity: ModelIdentity, device: torch.device, *, precision: str = "fp32",
                 channels_last: bool = False) -> None:
        self.spec = spec
        self.model = model.eval().to(device)
        self.settings = settings
        self.identity = identity
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def dim(self) -> int:
        return self.spec.dim

    @torch.inference_mode()
    def embed(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, D), unit length."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            features = self.model(x)
        return torch.nn.functional.normalize(features.float(), p=2, dim=1).cpu().numpy()


def packaged_weights(name: str) -> Path:
    """A weights file shipped in mammo_retrieval/weights/ (never downloaded)."""
    from importlib import resources
    return Path(str(resources.files("mammo_retrieval") / "weights" / name))


def create_backbone(spec: EncoderSpec, registry: EncoderRegistry = DEFAULT_REGISTRY) -> torch.nn.Module:
    """The spec's backbone, built by its family, with seeded initialisation so random weights are reproducible."""
    builder = registry.builder(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return builder(spec)


def _build_hf(spec: EncoderSpec, cfg: EncoderConfig) -> tuple[EncoderSpec, torch.nn.Module, str, str]:
    """A transformers encoder from its folder: the spec completed by the folder (dim, size, mean/std)."""
    from mammo_retrieval.encoders import hf
    if not cfg.weights:
        raise WeightsError(f"encoder '{spec.name}' is built from a Hugging Face folder, and none is configured",
                           hint="set encoder.weights (or $MRETRIEVE_WEIGHTS) to the model's folder "
                                "(config.json + model.safetensors); nothing is downloaded")
    path = hf.check_folder(cfg.weights)
    model, dim = hf.load_hf_backbone(path)
    pre = hf.folder_preprocessing(path)
    spec = dataclasses.replace(spec, dim=dim, input_size=pre.size or spec.input_size, mean=pre.mean or spec.mean,
                               std=pre.std or spec.std, interpolation=pre.interpolation or spec.interpolation)
    return spec, model, hf.folder_sha256(path), str(path)


def _output_dim(model: torch.nn.Module, size: tuple[int, int]) -> int:
    """The embedding size a headless model really outputs (timm's ``num_features`` is not always it:
    MambaOut's pre-logits head makes 1152 of 288)."""
    with torch.inference_mode():
        return int(model.eval()(torch.zeros(1, 3, *size)).shape[1])


def _build_timm(spec: EncoderSpec, cfg: EncoderConfig,
                registry: EncoderRegistry) -> tuple[EncoderSpec, torch.nn.Module, str, bool, str | None]:
    """A timm backbone with its weights (any supported checkpoint layout), or seeded random weights."""
    model = create_backbone(spec, registry)
    if not spec.dim:  # a timm:<arch> spec learns its dimension from what the built model outputs
        spec = dataclasses.replace(spec, dim=_output_dim(model, spec.input_size))
    weights = cfg.weights or (str(packaged_weights(spec.weights_file)) if spec.weights_file else None)
    if weights:
        path = Path(weights).expanduser()
        checkpoint = read_checkpoint(path)
        state = extract_encoder_state(checkpoint, path)
        if spec.family in FUSED_FAMILIES:
            require_fused_layout(state, path, spec.name, texture=spec.family == "texture-fusion")
        load_into(model, state, path, layout=describe_layout(checkpoint))
        return spec, model, sha256_file(path), False, str(path)
    if cfg.allow_random_weights:
        return spec, model, sha256_state_dict(model.state_dict()), True, None
    raise WeightsError("no encoder weights configured and encoder.allow_random_weights is false",
                       hint="set encoder.weights or $MRETRIEVE_WEIGHTS to a checkpoint file")


def _build_adapted(cfg: EncoderConfig, preprocess_cfg: PreprocessConfig, registry: EncoderRegistry):
    """An adapter file as encoder.weights: its recorded base encoder, then its projection."""
    from mammo_retrieval.encoders.adapter import AdaptedEncoder, load_adapter
    path = Path(cfg.weights).expanduser()
    projection, info = load_adapter(path)
    base_cfg = dataclasses.replace(cfg, name=info.base_encoder, weights=info.base_weights,
                                   input_size=info.base_input_size, allow_random_weights=True)
    return AdaptedEncoder(build_encoder(base_cfg, preprocess_cfg, registry), projection, info, path)


def build_encoder(cfg: EncoderConfig, preprocess_cfg: PreprocessConfig,
                  registry: EncoderRegistry = DEFAULT_REGISTRY) -> TorchEncoder:
    from mammo_retrieval.encoders.adapter import is_adapter_file
    if is_adapter_file(cfg.weights):
        return _build_adapted(cfg, preprocess_cfg, registry)
    spec = registry.get(cfg.name)
    if spec.family == "transformers":
        spec, model, weights_sha, weights_path = _build_hf(spec, cfg)
        random_weights = False
    else:
        spec, model, weights_sha, random_weights, weights_path = _build_timm(spec, cfg, registry)
    size = (cfg.input_size, cfg.input_size) if cfg.input_size else spec.input_size
    if spec.family == "texture-fusion" and tuple(size) != tuple(spec.input_size):
        raise ConfigError(f"encoder {spec.name} takes {spec.input_size[0]}x{spec.input_size[1]} pictures, not "
                          f"{size[0]}x{size[1]}: its texture statistics are counted in pixels and standardised "
                          f"at that size", hint="remove encoder.input_size")
    settings = PreprocessSettings.from_config(preprocess_cfg, size=size, mean=spec.mean, std=spec.std,
                                              interpolation=spec.interpolation)
    identity = ModelIdentity(encoder=spec.name, weights_sha256=weights_sha, preprocess_digest=settings.digest(),
                             dim=spec.dim, random_weights=random_weights, weights_path=weights_path)
    return TorchEncoder(spec, model, settings, identity, resolve_device(cfg.device), precision=cfg.precision,
                   channels_last=cfg.channels_last)
