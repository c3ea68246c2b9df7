"""The SimCLR training loop: AdamW, cosine schedule with warm-up, AMP on CUDA, gradient clipping,
early stopping on validation loss, patient-level splits, resumable after an interruption.

Without a validation loss (fewer than two validation images after the patient split) the best epoch and
early stopping go by the training loss instead, and the record says so: ``selected_by`` is "train_loss" and
``best_val_loss`` is None, never the training loss under the validation loss's name.

Images come from the preprocessed cache (uint8, model size); no DICOM is decoded here.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from mammo_retrieval.core.errors import MammoRetrievalError
from mammo_retrieval.core.fileio import write_atomic
from mammo_retrieval.train.augment import AugmentConfig, augment, to_model_input
from mammo_retrieval.train.losses import nt_xent
from mammo_retrieval.train.model import SimCLRModel

if TYPE_CHECKING:
    from mammo_retrieval.encoders import Encoder, EncoderRegistry

CHECKPOINT_FORMAT = "mammo_retrieval.simclr/1"


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the PRIMER card's (primer-model-card.txt, "Hyperparameters")."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-5
    temperature: float = 0.07
    warmup_epochs: int = 10
    patience: int = 15
    grad_clip: float = 1.0
    val_fraction: float = 0.15
    holdout_fraction: float = 0.0
    seed: int = 0
    image_size: int | None = None  # None: the cache's (the encoder's) input size
    amp: bool = True               # used on CUDA only


VAL_LOSS, TRAIN_LOSS = "val_loss", "train_loss"  # which loss chose the best epoch (`selected_by`)
LOSS_WORDS = {VAL_LOSS: "validation", TRAIN_LOSS: "training"}


@dataclass
class TrainResult:
    path: Path
    epochs_run: int
    best_epoch: int                    # 1-based; 0 when no epoch ran
    best_val_loss: float | None        # the best epoch's validation loss; None without a validation loss
    history: list[dict] = field(default_factory=list)
    best_train_loss: float | None = None  # the best epoch's (mean) training loss
    selected_by: str = VAL_LOSS        # VAL_LOSS, or TRAIN_LOSS when there was no validation loss

    def record(self) -> dict:
        """The best epoch as the checkpoint and the CLI state it."""
        return {"best_epoch": self.best_epoch, "selected_by": self.selected_by,
                "best_val_loss": self.best_val_loss, "best_train_loss": self.best_train_loss}


def patient_fraction(patient_id: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per patient, so splits never depend on file order."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def split_by_patient(patients: list[str], cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, held-out) row indices; a woman is in exactly one of them."""
    fractions = np.array([patient_fraction(p, cfg.seed) for p in patients])
    held = fractions < cfg.holdout_fraction
    val = ~held & (fractions < cfg.holdout_fraction + cfg.val_fraction)
    train = ~held & ~val
    return np.nonzero(train)[0], np.nonzero(val)[0], np.nonzero(held)[0]


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _save_atomic(obj: dict, path: Path) -> None:
    """A checkpoint is written whole or not at all (fsync'd, then renamed over the old one)."""
    write_atomic(path, lambda fh: torch.save(obj, fh))


def own_backbone(encoder: "Encoder", registry: "EncoderRegistry | None" = None) -> torch.nn.Module:
    """A fresh backbone of the encoder's architecture, built through the registry, holding a copy of its
    weights: training never changes the serving encoder's model in place. An ONNX Runtime encoder trains the
    torch model it was exported from."""
    from mammo_retrieval.core.errors import ConfigError
    from mammo_retrieval.encoders import DEFAULT_REGISTRY
    from mammo_retrieval.encoders.model import create_backbone
    from mammo_retrieval.encoders.registry import TORCH_TRAINABLE_FAMILIES
    from mammo_retrieval.encoders.onnx_runtime import OnnxEncoder
    encoder = encoder.source if isinstance(encoder, OnnxEncoder) else encoder  # (built again on demand)
    if not hasattr(encoder, "model") or getattr(encoder.spec, "family", "timm") not in TORCH_TRAINABLE_FAMILIES:
        raise ConfigError(f"`train` finetunes a timm encoder run by torch; the serving model "
                          f"{encoder.identity.key} is {type(encoder).__name__} ({getattr(encoder.spec, 'family', '?')})",
                          hint="serve a timm encoder (not an adapter or rad-dino) to train")
    backbone = create_backbone(encoder.spec, registry or DEFAULT_REGISTRY)
    backbone.load_state_dict(encoder.model.state_dict())
    return backbone


class SimCLRTrainer:
    def __init__(self, encoder: "Encoder", images: np.ndarray, patients: list[str], cfg: TrainConfig,
                 out: Path, *, init_checkpoint: str | None = None, log: Callable[[str], None] = print,
                 device: torch.device | None = None, registry: "EncoderRegistry | None" = None) -> None:
        if len(images) != len(patients):
            raise ValueError("one patient id per image")
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.encoder = encoder
        self.device = device or encoder.device
        self.settings = encoder.settings
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 (N, H, W), stays on the CPU
        self.patients = list(patients)
        self.train_idx, self.val_idx, self.held_idx = split_by_patient(self.patients, cfg)
        if len(self.train_idx) < 2:
            raise MammoRetrievalError(f"only {len(self.train_idx)} training images after the patient split",
                                      hint="ingest more images or lower --val-fraction/--holdout-fraction")
        # the loss that picks the best epoch and stops early: a validation loss needs two validation images
        self.selected_by = VAL_LOSS if len(self.val_idx) >= 2 else TRAIN_LOSS
        torch.manual_seed(cfg.seed)
        backbone = own_backbone(encoder, registry)
        learned_dim = getattr(backbone, "learned_dim", None) or encoder.dim  # a fused encoder: its network's
        self.model = SimCLRModel(backbone, learned_dim).to(self.device)
        if init_checkpoint:
            self._load_init(init_checkpoint)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = len(self.batches(self.train_idx))
        total = self.steps_per_epoch * cfg.epochs
        warmup = self.steps_per_epoch * min(cfg.warmup_epochs, max(0, cfg.epochs - 1))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, warmup, total))
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.size = cfg.image_size or self.images.shape[-1]
        self.history: list[dict] = []
        self.start_epoch = 0
        self.best_epoch = -1  # 0-based; -1 before any epoch ran
        self.best_losses: dict = {TRAIN_LOSS: None, VAL_LOSS: None}  # both losses of the best epoch
        self.best_state: dict | None = None

    # --- checkpoints -----------------------------------------------------------------------------
    def _load_init(self, path: str) -> None:
        """Start from a PRIMER checkpoint or one of ours (the projection head too, when it fits)."""
        from mammo_retrieval.encoders.weights import read_checkpoint
        checkpoint = read_checkpoint(path)
        state = checkpoint.get("model_state_dict", checkpoint)
        own = self.model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not any(k.startswith("encoder.encoder.") for k in usable):
            raise MammoRetrievalError(f"{path}: no encoder.encoder.* weights fit this {self.encoder.spec.name}")
        self.model.load_state_dict({**own, **usable})
        self.log(f"initialised {len(usable)} of {len(own)} tensors from {path}")

    def resume_path(self) -> Path:
        return self.out.with_name(self.out.name + ".resume")

    def _state(self, epoch: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model_state_dict": self.model.state_dict(),
                "best_state_dict": self.best_state, "best_epoch": self.best_epoch, "best_losses": self.best_losses,
                "selected_by": self.selected_by,
                "optimizer_state_dict": self.optimizer.state_dict(),
                "scheduler_state_dict": self.scheduler.state_dict(), "scaler_state_dict": self.scaler.state_dict(),
                "history": self.history, "recipe": asdict(self.cfg), "torch_rng": torch.get_rng_state()}

    def _losses_from_history(self, epoch: int) -> dict:
        """A .resume written before `best_losses` was kept: the best epoch's (rounded) losses from the history."""
        row = next((h for h in self.history if h["epoch"] == epoch + 1), {})
        return {TRAIN_LOSS: row.get(TRAIN_LOSS), VAL_LOSS: row.get(VAL_LOSS)}

    def try_resume(self) -> bool:
        path = self.resume_path()
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written above
        if state.get("recipe") != asdict(self.cfg):
            raise MammoRetrievalError(f"{path} was written with another recipe",
                                      hint="use the same options to resume, or delete the .resume file")
        self.model.load_state_dict(state["model_state_dict"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        self.scheduler.load_state_dict(state["scheduler_state_dict"])
        self.scaler.load_state_dict(state["scaler_state_dict"])
        self.history, self.best_state = state["history"], state["best_state_dict"]
        # a .resume of an earlier release kept "best": [monitored loss, epoch] instead of "best_epoch"
        self.best_epoch = state["best_epoch"] if "best_epoch" in state else int(state["best"][1])
        self.best_losses = state.get("best_losses") or self._losses_from_history(self.best_epoch)
        if state.get("selected_by", self.selected_by) != self.selected_by:  # the split crossed 2 validation images
            self.log(f"the best epoch so far was chosen by the {LOSS_WORDS[state['selected_by']]} loss, and this run "
                     f"has {'a' if self.selected_by == VAL_LOSS else 'no'} validation loss: the best epoch is chosen "
                     "again from here on")
            self.best_epoch, self.best_state = -1, None
            self.best_losses = {TRAIN_LOSS: None, VAL_LOSS: None}
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch = state["epoch"] + 1
        self.log(f"resumed from {path} after epoch {state['epoch'] + 1}")
        return True

    # --- one pass --------------------------------------------------------------------------------
    def _views(self, rows: np.ndarray, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.images[torch.from_numpy(rows)].to(self.device, non_blocking=True)
        grey = batch.unsqueeze(1).float().div_(255.0)
        if grey.shape[-1] != self.size:
            grey = F.interpolate(grey, size=(self.size, self.size), mode="bilinear", antialias=True,
                                 align_corners=False)
        v1 = augment(grey, AugmentConfig(), generator)
        v2 = augment(grey, AugmentConfig(), generator)
        return (to_model_input(v1, self.settings.mean, self.settings.std),
                to_model_input(v2, self.settings.mean, self.settings.std))

    def _loss(self, rows: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        v1, v2 = self._views(rows, generator)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            z = self.model(torch.cat([v1, v2]))  # one batch: BatchNorm sees both views
        return nt_xent(z[: len(rows)], z[len(rows):], self.cfg.temperature)

    def batches(self, rows: np.ndarray) -> list[np.ndarray]:
        """Every row once per epoch; a trailing batch of one (no negatives) joins the one before."""
        size = self.cfg.batch_size
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        if len(chunks) > 1 and len(chunks[-1]) < 2:
            chunks[-2:] = [np.concatenate(chunks[-2:])]
        return chunks

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        rng = np.random.default_rng(self.cfg.seed + epoch)
        losses = []
        for rows in self.batches(rng.permutation(self.train_idx)):
            loss = self._loss(rows)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Loss on the validation women with fixed augmentations, so epochs are comparable."""
        if self.selected_by != VAL_LOSS:
            return None
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 12345)
        return float(np.mean([float(self._loss(rows, generator)) for rows in self.batches(self.val_idx)]))

    # --- the run ---------------------------------------------------------------------------------
    def fit(self, data_info: dict | None = None) -> TrainResult:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.try_resume()
        monitor = LOSS_WORDS[self.selected_by]
        if self.selected_by == TRAIN_LOSS:
            self.log(f"no validation loss ({len(self.val_idx)} validation images, 2 needed): the best epoch and "
                     f"early stopping go by the training loss")
        epoch = self.start_epoch - 1
        for epoch in range(self.start_epoch, self.cfg.epochs):
            started = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            val_loss = self.validation_loss()
            losses = {TRAIN_LOSS: train_loss, VAL_LOSS: val_loss}
            best = self.best_losses[self.selected_by]
            if losses[self.selected_by] < (math.inf if best is None else best):  # a NaN loss is never the best
                self.best_epoch, self.best_losses = epoch, losses
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.history.append({"epoch": epoch + 1, "train_loss": round(train_loss, 5),
                                 "val_loss": None if val_loss is None else round(val_loss, 5),
                                 "lr": self.scheduler.get_last_lr()[0],
                                 "seconds": round(time.perf_counter() - started, 2)})
            self.log(f"epoch {epoch + 1}/{self.cfg.epochs} train {train_loss:.4f} "
                     f"val {'-' if val_loss is None else f'{val_loss:.4f}'} ({self.history[-1]['seconds']} s)")
            _save_atomic(self._state(epoch), self.resume_path())
            if epoch - self.best_epoch >= self.cfg.patience:
                self.log(f"early stop: no better {monitor} loss for {self.cfg.patience} epochs")
                break
        ran = self.best_epoch >= 0
        result = TrainResult(self.out, len(self.history), self.best_epoch + 1,
                             self.best_losses[VAL_LOSS] if ran and self.selected_by == VAL_LOSS else None,
                             self.history, self.best_losses[TRAIN_LOSS] if ran else None, self.selected_by)
        final = {
            "format": CHECKPOINT_FORMAT,
            "model_state_dict": self.best_state or self.model.state_dict(),
            "encoder_name": self.encoder.spec.name,
            "recipe": asdict(self.cfg) | {"augmentations": asdict(AugmentConfig()),
                                          "preprocess": self.settings.as_dict(), "image_size": self.size},
            "data": (data_info or {}) | {
                "train_images": int(len(self.train_idx)), "val_images": int(len(self.val_idx)),
                "heldout_images": int(len(self.held_idx)),
                "heldout_patients": sorted({self.patients[i] for i in self.held_idx}),
                "val_patients": sorted({self.patients[i] for i in self.val_idx})},
            "epochs": len(self.history), **result.record(),
            "losses": self.history,
        }
        _save_atomic(final, self.out)
        self.resume_path().unlink(missing_ok=True)
        if ran:
            best_loss = result.best_val_loss if self.selected_by == VAL_LOSS else result.best_train_loss
            shown = "-" if best_loss is None else f"{best_loss:.4f}"
            self.log(f"best epoch {result.best_epoch}/{result.epochs_run} chosen by the {monitor} loss "
                     f"({shown})" + ("" if self.selected_by == VAL_LOSS else "; no validation loss"))
        return result
