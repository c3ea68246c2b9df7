"""What the index and database hold, for `mretrieve status` and a server's health page."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.storage.catalog.database import mask_url
from mammo_retrieval.core.errors import IndexCorruptError
from mammo_retrieval.storage.index.manifest import Manifest

if TYPE_CHECKING:
    from mammo_retrieval.app.workspace import Workspace
    from mammo_retrieval.core.config import IndexConfig

RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: the encoder has no trained weights, so similarity reflects only "
                          "coarse intensity structure. Set encoder.weights (or $MRETRIEVE_WEIGHTS).")


def collect_status(ws: "Workspace", *, rejected_limit: int | None = None) -> dict:
    """Reads the database and the manifests only: no model is built, so this is fast."""
    cfg = ws.config
    with ws.db.session() as s:
        counts = repo.counts(s)
        versions = repo.model_versions(s)
        rejected = repo.rejected_files(s, rejected_limit)
        rejected_rows = [{"path": r.path, "code": r.code, "reason": r.reason} for r in rejected]
    from mammo_retrieval.storage.index.versions import read_live
    errors = []
    try:
        live, previous = read_live(cfg.index_dir)
    except IndexCorruptError as exc:  # a broken live pointer must not hide everything else status can tell
        live, previous = None, []
        errors.append(str(exc))
    kept_keys = {m.key for m in previous}
    models = []
    for mv, n_vectors in versions:
        entry = {"key": mv.key, "encoder": mv.encoder, "weights_sha256": mv.weights_sha256,
                 "weights_path": mv.weights_path, "random_weights": mv.random_weights,
                 "preprocess_digest": mv.preprocess_digest, "dim": mv.dim, "vectors": n_vectors,
                 "live": live is not None and live.key == mv.key, "kept_for_rollback": mv.key in kept_keys}
        directory = cfg.index_dir / mv.key
        try:
            manifest = Manifest.read(directory)
        except IndexCorruptError as exc:
            manifest, entry["index_error"] = None, str(exc)
        if manifest is not None and (problem := _index_file_problem(directory, manifest, cfg.index)):
            entry["index_error"] = problem
        # what a query would refuse (a version that is not live may lack its index: a reindex that stopped)
        if manifest is None and n_vectors and (entry["live"] or live is None) and "index_error" not in entry:
            entry["index_error"] = (f"no index in {directory}, but the database holds {n_vectors} vectors of "
                                    "this model (an ingest stopped before its first save, or the index was "
                                    "deleted; one running now saves it soon): re-run the ingest, or "
                                    "`mretrieve index rebuild`")
        if manifest is not None:
            entry["index"] = {"path": str(directory), "type": manifest.index_type, "metric": manifest.metric,
                              "nlist": manifest.nlist, "nprobe": manifest.nprobe, "ntotal": manifest.ntotal,
                              "opq": manifest.opq, "on_disk": manifest.on_disk,
                              "layout_source": manifest.layout_source, "updated_at": manifest.updated_at}
        models.append(entry)
    warnings = [RANDOM_WEIGHTS_WARNING] if any(m["random_weights"] for m in models) else []
    return {
        "database": mask_url(cfg.database_url),
        "index_dir": str(cfg.index_dir),
        "configured_encoder": {"name": cfg.encoder.name, "weights": cfg.encoder.weights},
        "live_model": live.key if live else None,
        "counts": counts,
        "model_versions": models,
        "rejected": rejected_rows,
        "warnings": warnings,
        "errors": errors + [f"model {m['key']}: {m['index_error']}" for m in models if m.get("index_error")],
    }


def _index_file_problem(directory: Path, manifest: Manifest, index_cfg: "IndexConfig") -> str | None:
    """Why the manifest's index file cannot serve, or None. Cheap: the file is memory-mapped, not loaded."""
    if manifest.index_file is None:
        return None if manifest.ntotal == 0 else f"the manifest lists {manifest.ntotal} vectors but no index file"
    path = directory / manifest.index_file
    if not path.is_file():
        return f"{path}: index file missing"
    if path.stat().st_size == 0:
        return f"{path}: index file is empty"
    from mammo_retrieval.storage.index import VectorIndex
    try:
        VectorIndex.read_index_files(directory, manifest, index_cfg, mmap=True)
    except IndexCorruptError as exc:
        return exc.message
    return None
