"""Re-embed every image with another model, side by side, then switch atomically.

Reads preprocessed images from the cache (a missing or corrupt entry is rebuilt from its DICOM, or
reported when the file is gone), writes the new model's vectors under their own model version, builds
that version's index in its own folder, and only then points ``live.json`` at it. Queries keep using
the old index until that moment; the old one stays on disk for ``--rollback``. Re-running after an
interruption continues where it stopped (vectors already written are kept).

It switches only when every image is embedded: an image that cannot be read (its DICOM is gone or
changed) would otherwise vanish from search. ``allow_missing`` switches anyway; either way the
failures are listed. The new weights are copied into the index folder (``versions.store_model_weights``)
so the live version never depends on the checkpoint the user passed.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from sqlalchemy import select

from .db import repository as repo
from .db.models import Image
from .errors import MammoRetrievalError, ReindexIncompleteError
from .preprocess import normalise
from .versions import ServingModel, read_live, store_model_weights, switch_live

if TYPE_CHECKING:
    from .api import Workspace


def run_reindex(ws: "Workspace", weights: str | None, *, allow_missing: bool = False,
                on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Embed every image with ``weights`` (default: the serving ones) and switch live to that version."""
    from .index import VectorIndex
    started = time.perf_counter()
    base = ws.serving_encoder_config()
    weights = str(Path(weights).expanduser().resolve()) if weights else base.weights
    with ws.write_lock():
        stored, sha = store_model_weights(ws.config.index_dir, weights)
        new_cfg = dataclasses.replace(base, weights=stored)
        encoder = ws.build_encoder(new_cfg)
        identity = encoder.identity
        failures: list[dict] = []
        live, _ = read_live(ws.config.index_dir)
        old_key = live.key if live else ws.encoder.identity.key
        with ws.db.session() as s:
            mv_id = repo.get_or_create_model_version(s, identity, encoder.settings.as_dict()).id
            images = s.execute(select(Image.id, Image.sop_instance_uid, Image.path).order_by(Image.id)).all()
            done = repo.embedded_sops(s, [sop for _, sop, _ in images], mv_id)
        todo = [(image_id, sop, path) for image_id, sop, path in images if sop not in done]
        batch_size = ws.config.encoder.batch_size
        for start in range(0, len(todo), batch_size):
            chunk, pictures = [], []
            for image_id, sop, path in todo[start:start + batch_size]:
                try:
                    pictures.append(ws.cached_image(sop, encoder.settings))
                    chunk.append(image_id)
                except MammoRetrievalError as exc:  # the DICOM is gone or changed: report, keep going
                    failures.append({"sop_instance_uid": sop, "path": path,
                                     "reason": getattr(exc, "reason", None) or exc.message})
            if chunk:
                vectors = encoder.embed(normalise(np.stack(pictures), encoder.settings))
                with ws.db.session() as s:
                    repo.add_embeddings(s, zip(chunk, vectors), mv_id)
            if on_progress:
                on_progress(min(start + batch_size, len(todo)), len(todo))
        if failures and not allow_missing:
            # the vectors written so far stay stored, so a rerun (or --allow-missing) resumes from here
            listing = "\n".join(f"  {f['sop_instance_uid']}  {f['path']}: {f['reason']}" for f in failures)
            raise ReindexIncompleteError(
                f"reindex did not switch: {len(failures)} of {len(images)} images could not be embedded "
                f"with {identity.key}; {old_key} stays live:\n{listing}", failures,
                hint="restore these files and run reindex again (the vectors embedded so far are kept), "
                     "or pass --allow-missing to switch without them")
        directory = ws.config.index_dir / identity.key
        index = VectorIndex.open_or_create(directory, identity, ws.config.index)
        ws.sync_index(index, mv_id)
        index.save()
        switch_live(ws.config.index_dir, ServingModel(identity.key, new_cfg.name, stored, new_cfg.input_size,
                                                      weights_sha256=sha))
    return {"live": identity.key, "previous": old_key if old_key != identity.key else None,
            "embedded": len(todo) - len(failures), "already_embedded": len(done), "failed": failures,
            "index_type": index.manifest.index_type, "ntotal": index.ntotal, "weights": stored,
            "weights_sha256": sha, "random_weights": identity.random_weights,
            "seconds": round(time.perf_counter() - started, 1)}
