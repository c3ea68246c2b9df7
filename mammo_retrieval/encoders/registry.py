"""Name-keyed registry of encoder specs (after timm's _registry): what to build and how to feed it.

A spec names its *family*: the builder that makes its backbone (``timm``; others plug in with
``register_family``). The ``transformers`` family (rad-dino) has no builder here: its folder is both
architecture and weights, so ``build_encoder`` loads it whole. The spec carries the model's own input
config (size, mean/std, resize interpolation), so preprocessing follows the model, not the caller."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch

from mammo_retrieval.core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest")


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    timm_name: str
    dim: int
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""
    weights_file: str | None = None  # shipped inside the package (mammo_retrieval/weights/); used when none is configured
    family: str = "timm"             # which builder makes the backbone (EncoderRegistry.families)
    interpolation: str = "bilinear"  # the resize to input_size the model was trained with


BackboneBuilder = Callable[[EncoderSpec], "torch.nn.Module"]


def timm_backbone(spec: EncoderSpec) -> "torch.nn.Module":
    """A headless timm model (num_classes=0: pooled features out), randomly initialised; weights load later."""
    import timm
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0)


def intensity_fusion_backbone(spec: EncoderSpec) -> "torch.nn.Module":
    """The spec's timm network fused with its input's intensity histogram (``encoders.fusion``): the
    built-in v2. Its dimension is the network's plus the histogram's bins."""
    from mammo_retrieval.encoders.fusion import IntensityFusion
    return IntensityFusion(timm_backbone(spec), mean=spec.mean[0], std=spec.std[0])


def texture_fusion_backbone(spec: EncoderSpec) -> "torch.nn.Module":
    """``intensity_fusion_backbone`` plus texture statistics of the input (``encoders.texture``): the
    built-in v3. Its dimension adds ``TEXTURE_DIM``, then zeros to a multiple of 64 (``fusion.TextureFusion``)."""
    from mammo_retrieval.encoders.fusion import TextureFusion
    return TextureFusion(timm_backbone(spec), mean=spec.mean[0], std=spec.std[0])


TIMM_PREFIX = "timm:"


def timm_spec(name: str) -> EncoderSpec:
    """Any timm architecture by name (``timm:mambaout_femto``), with the input config timm publishes for it;
    its dimension is the built model's ``num_features`` (0 here until then)."""
    import timm
    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ConfigError(f"unknown timm architecture '{arch}'",
                          hint=f"similar names: {', '.join(close)}" if close else "see timm.list_models()")
    cfg = timm.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    interpolation = cfg.get("interpolation", "bilinear")
    return EncoderSpec(name, arch, 0, input_size=size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                       std=tuple(cfg.get("std", IMAGENET_STD)), description=f"timm {arch}",
                       interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic")


FUSED_FAMILIES = ("intensity-fusion", "texture-fusion")  # a network beside statistics of its input (built-ins v2, v3)
DEFAULT_FAMILIES: dict[str, BackboneBuilder] = {"timm": timm_backbone, "intensity-fusion": intensity_fusion_backbone,
                                                "texture-fusion": texture_fusion_backbone}
TORCH_TRAINABLE_FAMILIES = ("timm", *FUSED_FAMILIES)  # whole torch modules `mretrieve train` can finetune


class EncoderRegistry:
    """A registry instance (not module state): tests and plugins can make their own."""

    def __init__(self, specs: list[EncoderSpec] | None = None,
                 families: dict[str, BackboneBuilder] | None = None) -> None:
        self._specs: dict[str, EncoderSpec] = {}
        self._families: dict[str, BackboneBuilder] = dict(families if families is not None else DEFAULT_FAMILIES)
        for spec in specs or []:
            self.register(spec)

    def register_family(self, name: str, builder: BackboneBuilder) -> None:
        if name in self._families:
            raise ValueError(f"encoder family '{name}' is already registered")
        self._families[name] = builder

    def builder(self, spec: EncoderSpec) -> BackboneBuilder:
        """The function that makes this spec's backbone; a clear error for a family nobody registered."""
        try:
            return self._families[spec.family]
        except KeyError:
            raise ConfigError(f"encoder '{spec.name}' belongs to the unknown family '{spec.family}'",
                              hint=f"registered families: {', '.join(sorted(self._families))}") from None

    def register(self, spec: EncoderSpec) -> None:
        if spec.interpolation not in INTERPOLATIONS:
            raise ValueError(f"encoder '{spec.name}': interpolation must be one of {', '.join(INTERPOLATIONS)}")
        if spec.name in self._specs:
            raise ValueError(f"encoder '{spec.name}' is already registered")
        self._specs[spec.name] = spec

    def get(self, name: str) -> EncoderSpec:
        if name.startswith(TIMM_PREFIX) and name not in self._specs:
            return timm_spec(name)
        try:
            return self._specs[name]
        except KeyError:
            raise ConfigError(f"unknown encoder '{name}'",
                              hint=f"choose one of: {', '.join(sorted(self._specs))}, or timm:<architecture> "
                                   f"(e.g. timm:mambaout_femto)") from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __iter__(self) -> Iterator[EncoderSpec]:
        return iter(self._specs.values())


BUILTIN_V1 = "mammo-simclr"
BUILTIN_V2 = "mammo-simclr-v2"
BUILTIN = "mammo-simclr-v3"  # the default (configs/default.yaml)

DEFAULT_REGISTRY = EncoderRegistry([
    EncoderSpec(BUILTIN, "resnet18", 704, input_size=(128, 128),  # 512 + 64 + 88, zero-padded
                weights_file="mammo-simclr-v3-r18-128.safetensors", family="texture-fusion",
                description="built-in v3 (default): v2's network and histogram beside the picture's texture "
                            "statistics (local binary patterns, local standard deviation; README), shipped as fp16"),
    EncoderSpec(BUILTIN_V2, "resnet18", 512 + 64, input_size=(128, 128),
                weights_file="mammo-simclr-v2-r18-128.safetensors", family="intensity-fusion",
                description="built-in v2: ResNet-18 finetuned on mini-MIAS at 128 px, fused with the "
                            "picture's 64-bin intensity histogram (CPU recipe, README), shipped as fp16"),
    EncoderSpec(BUILTIN_V1, "resnet18", 512, input_size=(128, 128), weights_file="mammo-simclr-r18-128.safetensors",
                description="built-in v1: ResNet-18, SimCLR-trained by `mretrieve train` on mini-MIAS at 128 px "
                            "(CPU recipe, README), shipped as fp16"),
    EncoderSpec("resnet50", "resnet50", 2048, description="ResNet-50, the PRIMER backbone (default)"),
    EncoderSpec("densenet121", "densenet121", 1024, description="DenseNet-121"),
    EncoderSpec("inception_v3", "inception_v3", 2048, input_size=(299, 299),
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), description="Inception-V3 (299x299, Inception norm)"),
    EncoderSpec("resnet18", "resnet18", 512, description="ResNet-18, a light model for CPUs and tests"),
    EncoderSpec("rad-dino", "", 768, input_size=(518, 518), mean=(0.5307, 0.5307, 0.5307), std=(0.2583, 0.2583, 0.2583),
                family="transformers", interpolation="bicubic",
                description="RAD-DINO (DINOv2 ViT-B in Hugging Face format): encoder.weights is its folder; its "
                            "preprocessor_config.json, where present, sets size, mean and std"),
])
