"""Export vectors and metadata as mammography-pipelines lays them out: features.npy + joined.csv (+ Parquet)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mammo_retrieval.core.csv_safety import write_frame
from mammo_retrieval.core.fileio import write_atomic
from mammo_retrieval.analysis.vectors import EmbeddingTable

JOINED_COLUMNS = {"sop_instance_uid": "SOPInstanceUID", "accession_number": "AccessionNumber",
                  "patient_id": "PatientID", "study_instance_uid": "StudyInstanceUID",
                  "series_instance_uid": "SeriesInstanceUID", "laterality": "laterality", "view": "view",
                  "manufacturer": "Manufacturer", "path": "ImagePath", "rows": "Rows", "columns": "Columns",
                  "vector_id": "VectorId"}


def export_table(table: EmbeddingTable, out: Path) -> dict[str, Path]:
    """features.npy row i is joined.csv row i (EmbeddingIndex = i); the Parquet file holds both.

    Each file is written whole or not at all. The pair is kept in step over a rewrite of the folder:
    joined.csv is removed before features.npy is replaced and written back last, so a kill in between
    leaves features.npy without joined.csv (rerun the export), never beside another export's rows."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"features": out / "features.npy", "joined": out / "joined.csv", "parquet": out / "embeddings.parquet"}
    joined = table.meta[list(JOINED_COLUMNS)].rename(columns=JOINED_COLUMNS)
    joined.insert(len(joined.columns), "EmbeddingIndex", np.arange(len(joined)))
    vectors = np.ascontiguousarray(table.vectors, dtype=np.float32)
    frame = joined.copy()
    frame["embedding"] = list(vectors)
    write_atomic(paths["parquet"], lambda fh: frame.to_parquet(fh, index=False))
    paths["joined"].unlink(missing_ok=True)
    write_atomic(paths["features"], lambda fh: np.save(fh, vectors))
    write_frame(joined, paths["joined"])
    return paths
