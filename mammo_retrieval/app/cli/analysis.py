"""report clusters, evaluate, export."""
from __future__ import annotations

import json
from pathlib import Path

import click

from mammo_retrieval.app.cli._common import StepProgress, no_progress_option, workspace


@click.group()
def report() -> None:
    """Reports on the embedding space."""


@report.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--k", "k", type=click.IntRange(min=2), default=None, help="k-means clusters (default ~sqrt(N/2)).")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False), help="Use labels as clusters.")
@click.option("--label-column", default=None, help="Column of --labels to colour and score by.")
@click.option("--plots", default="pca,tsne,umap", show_default=True, help="Comma list of pca, tsne, umap (or none).")
@no_progress_option
@click.pass_context
def clusters(ctx: click.Context, out_dir: str, k: int | None, labels_csv: str | None, label_column: str | None,
             plots: str, no_progress: bool) -> None:
    """Silhouette, Davies-Bouldin, Calinski-Harabasz, distances, IVF balance, 2-D plots, clustering_metrics.json."""
    from mammo_retrieval.analysis.clusters import parse_plots, report_clusters
    from mammo_retrieval.analysis.labels import join_labels, label_columns, read_labels
    from mammo_retrieval.analysis.vectors import load_embeddings
    from mammo_retrieval.core.errors import NotFoundError
    if labels_csv and k:
        raise click.UsageError("give --k or --labels, not both")
    if label_column and not labels_csv:
        raise click.UsageError("--label-column needs --labels")
    chosen = parse_plots(plots)  # before any work: a typo must not cost a k-means run
    name = labels = raw = None
    if labels_csv:
        raw = read_labels(labels_csv)
        name = label_columns(raw, [label_column] if label_column else None, labels_csv)[0]
    ws = workspace(ctx)
    with StepProgress("report clusters", enabled=not no_progress) as progress:
        progress("loading vectors", 0, 1)
        table = load_embeddings(ws.corpus())
        if raw is not None:
            aligned, _ = join_labels(table.meta, raw)
            labels = aligned[name].to_numpy(dtype=object)
        try:
            index = ws.searchable_index()
        except NotFoundError:
            index = None
        result = report_clusters(table, Path(out_dir), k=k, labels=labels, label_name=name, index=index,
                                 plots=chosen, on_progress=progress)
    m = result.metrics
    click.echo(f"{m['clusters_from']}: silhouette {m['silhouette_score']:.4f}, Davies-Bouldin "
               f"{m['davies_bouldin_index']:.4f}, Calinski-Harabasz {m['calinski_harabasz_score']:.1f}")
    written = [str(Path(out_dir) / "clustering_metrics.json"), *m["plots"]]
    click.echo(f"wrote {', '.join(written)}")


def _weights_of(given: str) -> str:
    """A checkpoint file as given, or the weights a built-in encoder ships (wherever the package lies)."""
    if Path(given).expanduser().is_file():
        return str(Path(given).expanduser())
    from mammo_retrieval.encoders import DEFAULT_REGISTRY
    from mammo_retrieval.encoders.model import packaged_weights
    shipped = {spec.name: spec.weights_file for spec in DEFAULT_REGISTRY if spec.weights_file}
    if given in shipped:
        return str(packaged_weights(shipped[given]))
    raise click.BadParameter(f"'{given}' is neither a file nor a built-in encoder ({', '.join(sorted(shipped))})",
                             param_hint="--heldout-from")


@click.command()
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--k", "ks", default="1,5,10", show_default=True, help="Comma list of k for precision@k.")
@click.option("--label-column", "columns", multiple=True, help="Columns to evaluate (default: categorical ones).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Also write evaluation.json and evaluation.md here (study_evaluation.* with --level study); "
                   "the Markdown is printed either way.")
@click.option("--heldout-from", "heldout_ckpt", default=None, metavar="CKPT|BUILT-IN",
              help="Only the women these weights never trained on: a `mretrieve train` checkpoint, a "
                   "built-in's .safetensors, or a built-in encoder's name (mammo-simclr-v3, -v2 or mammo-simclr).")
@click.option("--level", type=click.Choice(["image", "study"]), default="image", show_default=True,
              help="study: study labels by study-level search (every fusion rule), beside the per-image baseline.")
@click.option("--all-versions", is_flag=True,
              help="Also every other model version kept in the catalog (e.g. by reindex), on the same images.")
@no_progress_option
@click.pass_context
def evaluate(ctx: click.Context, labels_csv: str, ks: str, columns: tuple[str, ...], out_dir: str | None,
             heldout_ckpt: str | None, level: str, all_versions: bool, no_progress: bool) -> None:
    """precision@k, mAP, contralateral hit rate and classifier scores, against two classical references."""
    from mammo_retrieval.analysis.evaluate import evaluate as run, heldout_patients, to_markdown, write_evaluation
    try:
        k_values = tuple(int(k) for k in ks.split(","))
    except ValueError:
        raise click.UsageError(f"--k must be a comma list of integers, not '{ks}'") from None
    if min(k_values) < 1:
        raise click.UsageError(f"--k values must be at least 1, not '{ks}'")
    if level == "study" and all_versions:
        raise click.UsageError("--all-versions applies to --level image only")
    patients = heldout_patients(_weights_of(heldout_ckpt)) if heldout_ckpt else None
    if level == "study":
        from mammo_retrieval.analysis.study_eval import evaluate_studies, to_markdown as study_markdown
        report = evaluate_studies(workspace(ctx).corpus(), labels_csv, columns=list(columns) or None, ks=k_values,
                                  patients=patients)
        if out_dir:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_evaluation(report, out / "study_evaluation.json", out / "study_evaluation.md", study_markdown)
            click.echo(f"wrote {out / 'study_evaluation.json'} and {out / 'study_evaluation.md'}")
        click.echo(study_markdown(report))
        return
    ws = workspace(ctx)
    others = ws.other_version_corpora() if all_versions else []
    with StepProgress("evaluate", enabled=not no_progress) as progress:
        report = run(ws.corpus(), labels_csv, columns=list(columns) or None, ks=k_values, patients=patients,
                     others=others, on_progress=progress)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_evaluation(report, out / "evaluation.json", out / "evaluation.md")
        click.echo(f"wrote {out / 'evaluation.json'} and {out / 'evaluation.md'}")
    click.echo(to_markdown(report))


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.pass_context
def export(ctx: click.Context, out_dir: str) -> None:
    """features.npy (N x D float32), joined.csv (with EmbeddingIndex) and embeddings.parquet."""
    from mammo_retrieval.analysis.export import export_table
    from mammo_retrieval.analysis.vectors import load_embeddings
    table = load_embeddings(workspace(ctx).corpus())
    paths = export_table(table, Path(out_dir))
    click.echo(json.dumps({k: str(v) for k, v in paths.items()} | {"rows": len(table)}, indent=2))
