from __future__ import annotations

import click

from mammo_retrieval.app.cli._common import dumps, workspace

FEW_HELDOUT_WOMEN = 10  # below this, held-out precision@10 ranks a handful of other women's images


@click.command()
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Labels CSV (joined on SOPInstanceUID, or file/AccessionNumber as for evaluate).")
@click.option("--label-column", "columns", multiple=True, required=True,
              help="A label to pull same-label images together (repeatable: the losses are averaged).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The adapter file to write (.safetensors); `reindex --model` serves it.")
@click.option("--kind", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True)
@click.option("--dim", "out_dim", type=click.IntRange(2, 4096), default=128, show_default=True)
@click.option("--epochs", type=click.IntRange(1, 100000), default=300, show_default=True)
@click.option("--heldout-fraction", type=click.FloatRange(0.05, 0.9), default=0.2, show_default=True,
              help="Share of women kept out of training, on whom before/after is measured.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def adapt(ctx: click.Context, labels_csv: str, columns: tuple[str, ...], out_path: str, kind: str, out_dim: int,
          epochs: int, heldout_fraction: float, seed: int, fmt: str) -> None:
    """Train a small projection (label adapter) on the serving model's stored vectors; nothing is decoded.

    Women are split so that none is both trained on and measured; held-out precision@10 and mAP are
    printed before and after. `mretrieve reindex --model ADAPTER` then serves it as a model version
    (mapping the stored vectors), and `--rollback` undoes that.
    """
    from mammo_retrieval.train.adapter import AdaptConfig
    if not out_path.endswith(".safetensors"):
        raise click.BadParameter("the adapter file must end in .safetensors", param_hint="--out")
    report = workspace(ctx).adapt(labels_csv, list(columns), out_path, AdaptConfig(
        kind=kind, out_dim=out_dim, epochs=epochs, heldout_fraction=heldout_fraction, seed=seed))
    if fmt == "json":
        click.echo(dumps(report))
        return
    click.echo(f"adapter {report['kind']} {report['dim']}-d on {report['base_model']}: trained on "
               f"{report['train_images']} images of {report['train_patients']} women, measured on "
               f"{report['heldout_images']} images of {len(report['heldout_patients'])} held-out women")
    for column in report["columns"]:
        b, a = report["before"][column], report["after"][column]
        click.echo(f"  {column}: precision@10 {b['precision@10']:.3f} -> {a['precision@10']:.3f}, "
                   f"mAP {b['mAP']:.3f} -> {a['mAP']:.3f} ({a['queries']} held-out queries)")
    if (held := len(report["heldout_patients"])) < FEW_HELDOUT_WOMEN:
        click.echo(f"  note: measured on {held} held-out women only, so these figures say little (label more "
                   "women, or raise --heldout-fraction)")
    click.echo(f"written: {report['adapter']}; serve it with `mretrieve reindex --model {report['adapter']}`")
