"""Training images from a workspace: every indexed image's cached uint8 picture and its patient."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select

from ..db.models import Image

if TYPE_CHECKING:
    from ..api import Workspace


def load_training_images(ws: "Workspace") -> tuple[np.ndarray, list[str], list[str]]:
    """(uint8 N x H x W, patient ids, SOPInstanceUIDs), from the cache; missing entries are rebuilt."""
    with ws.db.session() as s:
        rows = s.execute(select(Image.sop_instance_uid, Image.patient_id).order_by(Image.id)).all()
    height, width = ws.encoder.settings.size
    images = np.empty((len(rows), height, width), dtype=np.uint8)
    for i, (sop, _) in enumerate(rows):
        images[i] = ws.cached_image(sop)
    # an image without a PatientID is its own patient: it can never leak across the split
    patients = [patient or f"no-patient:{sop}" for sop, patient in rows]
    return images, patients, [sop for sop, _ in rows]
