from __future__ import annotations

import json

import click

from mammo_retrieval.app.cli._common import workspace


@click.command()
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="simclr.pt", show_default=True,
              help="Checkpoint to write (PRIMER layout plus our metadata); <out>.resume holds the state to resume.")
@click.option("--init", "init_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from a PRIMER checkpoint or one of ours.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--val-fraction", type=float, default=0.15, show_default=True,
              help="Share of women for validation; under 2 validation images the training loss picks the best "
                   "epoch (the output's selected_by says which).")
@click.option("--holdout-fraction", type=float, default=0.0, show_default=True,
              help="Share of women kept out of training and validation entirely (recorded in the checkpoint).")
@click.option("--image-size", type=int, default=None, help="Train at this size (default: the encoder's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA (with AMP) when present, else the CPU.")
@click.pass_context
def train(ctx: click.Context, epochs: int, batch_size: int, out_path: str, init_path: str | None, lr: float,
          warmup_epochs: int, patience: int, val_fraction: float, holdout_fraction: float, image_size: int | None,
          seed: int, device: str) -> None:
    """SimCLR finetuning of the configured encoder on the ingested archive (CUDA when present).

    Resumes by itself when <out>.resume exists (same options)."""
    from mammo_retrieval.encoders.model import resolve_device
    from mammo_retrieval.train.data import load_training_images
    from mammo_retrieval.train.trainer import SimCLRTrainer, TrainConfig
    ws = workspace(ctx)
    images, patients, _ = load_training_images(ws.corpus(), ws.encoder.settings.size)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs, patience=patience,
                      val_fraction=val_fraction, holdout_fraction=holdout_fraction, seed=seed, image_size=image_size)
    trainer = SimCLRTrainer(ws.encoder, images, patients, cfg, out_path, init_checkpoint=init_path,
                            log=lambda line: click.echo(line, err=True), device=resolve_device(device))
    click.echo(f"training {ws.encoder.spec.name} on {len(trainer.train_idx)} images "
               f"({len(trainer.val_idx)} validation, {len(trainer.held_idx)} held out) on {trainer.device}", err=True)
    result = trainer.fit({"database": ws.status()["database"], "images": len(images),
                          "patients": len(set(patients))})
    # selected_by says which loss chose best_epoch: "val_loss", or "train_loss" when there was no validation
    # split (best_val_loss is then null, never the training loss)
    click.echo(json.dumps({"checkpoint": str(result.path), "epochs": result.epochs_run, **result.record()},
                          indent=2))
