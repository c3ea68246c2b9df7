import numpy as np
import pandas as pd

from mammo_retrieval.analysis.export import export_table
from mammo_retrieval.analysis.vectors import load_embeddings


def test_export_rows_line_up(mias_workspace, tmp_path):
    table = load_embeddings(mias_workspace.corpus())
    paths = export_table(table, tmp_path)
    features = np.load(paths["features"])
    joined = pd.read_csv(paths["joined"])
    assert features.shape == (204, 512) and features.dtype == np.float32
    assert list(joined.EmbeddingIndex) == list(range(204))
    assert {"SOPInstanceUID", "AccessionNumber", "PatientID", "laterality", "view", "ImagePath"} <= set(joined.columns)
    parquet = pd.read_parquet(paths["parquet"])
    np.testing.assert_array_equal(np.stack(parquet.embedding.to_numpy()), features)
    # the exported vector of an image is the one the index searches with
    row = joined.iloc[17]
    result = mias_workspace.query_dicom(row.ImagePath, k=1)
    assert result.query.sop_instance_uid == row.SOPInstanceUID
