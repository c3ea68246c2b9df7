"""Re-embedding for a reindex: every stored image's preprocessed picture through another encoder, its
vectors written under that model version. Nothing is decoded unless a cache entry is missing (``picture``
rebuilds it from the DICOM, or raises when the file is gone). Re-running after an interruption continues
where it stopped: vectors already written are kept. Building the new index and switching live is the
caller's (``Workspace.reindex``), so that an incomplete run never switches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from mammo_retrieval.core.errors import MammoRetrievalError
from mammo_retrieval.encoders.pooling import embed_pictures
from mammo_retrieval.storage.catalog import repository as repo

if TYPE_CHECKING:
    from mammo_retrieval.encoders import Encoder
    from mammo_retrieval.storage.catalog import Database


@dataclass
class Reembedded:
    images: int = 0            # stored images
    already_embedded: int = 0  # had a vector of this model version before this run
    embedded: int = 0          # embedded by this run
    mapped: int = 0            # of already_embedded: mapped by this run from the base's vectors (an adapter)
    failures: list[dict] = field(default_factory=list)  # {sop_instance_uid, path, reason}


def reembed(db: "Database", encoder: "Encoder", model_version_id: int, picture: Callable[[str, object], np.ndarray],
            *, batch_size: int, on_progress: Callable[[int, int], None] | None = None) -> Reembedded:
    """Embed every stored image that has no vector of ``model_version_id`` yet; an image whose picture
    cannot be had is listed in ``failures`` and the run goes on."""
    with db.session() as s:
        images = repo.images_with_paths(s)
        done = repo.embedded_sops(s, [sop for _, sop, _ in images], model_version_id)
    todo = [(image_id, sop, path) for image_id, sop, path in images if sop not in done]
    result = Reembedded(images=len(images), already_embedded=len(done))
    for start in range(0, len(todo), batch_size):
        ids, pictures = [], []
        for image_id, sop, path in todo[start:start + batch_size]:
            try:
                pictures.append(picture(sop, encoder.settings))
                ids.append(image_id)
            except MammoRetrievalError as exc:  # the DICOM is gone or changed: report, keep going
                result.failures.append({"sop_instance_uid": sop, "path": path,
                                        "reason": getattr(exc, "reason", None) or exc.message})
        if ids:
            vectors = embed_pictures(encoder, pictures)
            with db.session() as s:
                repo.add_embeddings(s, zip(ids, vectors), model_version_id)
            result.embedded += len(ids)
        if on_progress:
            on_progress(min(start + batch_size, len(todo)), len(todo))
    return result


def remap(db: "Database", project: Callable[[np.ndarray], np.ndarray], source_mv_id: int, target_mv_id: int,
          dim: int, *, batch_size: int = 4096) -> int:
    """Vectors of ``target_mv_id`` made from the stored vectors of ``source_mv_id`` (an adapter's base):
    nothing is decoded. Resumable: images already mapped are skipped. Returns how many were mapped."""
    mapped = 0
    while True:
        with db.session() as s:
            chunk = next(repo.iter_image_vectors_missing_from(s, source_mv_id, target_mv_id, dim, batch_size), None)
        if chunk is None:
            return mapped
        image_ids, vectors = chunk
        with db.session() as s:
            repo.add_embeddings(s, zip(image_ids.tolist(), project(vectors)), target_mv_id)
        mapped += len(image_ids)
