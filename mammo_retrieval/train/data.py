"""Training images from the corpus: every stored image's cached uint8 picture and its patient."""
from __future__ import annotations

import numpy as np

from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.storage.catalog.corpus import Corpus


def load_training_images(corpus: Corpus, size: tuple[int, int]) -> tuple[np.ndarray, list[str], list[str]]:
    """(uint8 N x H x W, patient ids, SOPInstanceUIDs) at the encoder's input ``size``, from the cache
    (``corpus.picture`` rebuilds a missing entry)."""
    with corpus.db.session() as s:
        rows = [(sop, patient) for _, sop, patient in repo.images_with_patients(s)]
    height, width = size
    images = np.empty((len(rows), height, width), dtype=np.uint8)
    for i, (sop, _) in enumerate(rows):
        images[i] = corpus.picture(sop)
    # an image without a PatientID is its own patient: it can never leak across the split
    patients = [patient or f"no-patient:{sop}" for sop, patient in rows]
    return images, patients, [sop for sop, _ in rows]
