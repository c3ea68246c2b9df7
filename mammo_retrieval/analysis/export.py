"""Export vectors and metadata as mammography-pipelines lays them out: features.npy + joined.csv (+ Parquet)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mammo_retrieval.core.csv_safety import write_frame
from mammo_retrieval.analysis.vectors import EmbeddingTable

JOINED_COLUMNS = {"sop_instance_uid": "SOPInstanceUID", "accession_number": "AccessionNumber",
                  "patient_id": "PatientID", "study_instance_uid": "StudyInstanceUID",
                  "series_instance_uid": "SeriesInstanceUID", "laterality": "laterality", "view": "view",
                  "manufacturer": "Manufacturer", "path": "ImagePath", "rows": "Rows", "columns": "Columns",
                  "vector_id": "VectorId"}


def export_table(table: EmbeddingTable, out: Path) -> dict[str, Path]:
    """features.npy row i is joined.csv row i (EmbeddingIndex = i); the Parquet file holds both."""
    out.mkdir(parents=True, exist_ok=True)
    joined = table.meta[list(JOINED_COLUMNS)].rename(columns=JOINED_COLUMNS)
    joined.insert(len(joined.columns), "EmbeddingIndex", np.arange(len(joined)))
    np.save(out / "features.npy", np.ascontiguousarray(table.vectors, dtype=np.float32))
    write_frame(joined, out / "joined.csv")
    frame = joined.copy()
    frame["embedding"] = list(table.vectors.astype(np.float32))
    frame.to_parquet(out / "embeddings.parquet", index=False)
    return {"features": out / "features.npy", "joined": out / "joined.csv", "parquet": out / "embeddings.parquet"}
