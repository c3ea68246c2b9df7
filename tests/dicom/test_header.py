import pytest
from pydicom.dataset import Dataset

from mammo_retrieval.dicom.header import laterality_from_text, read_header_fields, read_laterality, read_view


def ds(**kw) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


@pytest.mark.parametrize("kw, expected", [
    ({"ImageLaterality": "R", "Laterality": "L"}, ("R", "ImageLaterality")),
    ({"Laterality": "L"}, ("L", "Laterality")),
    ({"SeriesDescription": "LEFT CC"}, ("L", "SeriesDescription")),
    ({"ProtocolName": "RMLO tomo"}, ("R", "ProtocolName")),
    ({"SeriesDescription": "L and R"}, (None, None)),
    ({"ImageLaterality": "B", "SeriesDescription": "R_CC"}, ("R", "SeriesDescription")),
    ({}, (None, None)),
])
def test_laterality_fallbacks(kw, expected):
    assert read_laterality(ds(**kw)) == expected


def test_laterality_words():
    assert laterality_from_text("Mass-Test_P_00820_RIGHT_CC") == "R"
    assert laterality_from_text("craniocaudal") is None


def test_view_fallbacks():
    assert read_view(ds(ViewPosition="MLO")) == ("MLO", "ViewPosition")
    code = ds(CodeValue="399162004", CodeMeaning="cranio-caudal")
    assert read_view(ds(ViewCodeSequence=[code])) == ("CC", "ViewCodeSequence")
    old = ds(CodeValue="R-10226", CodeMeaning="")
    assert read_view(ds(ViewCodeSequence=[old])) == ("MLO", "ViewCodeSequence")
    assert read_view(ds(PatientOrientation="CC")) == ("CC", "PatientOrientation")
    assert read_view(ds(PatientOrientation=["A", "R"], SeriesDescription="L MLO")) == ("MLO", "SeriesDescription")
    assert read_view(ds()) == (None, None)


def test_empty_accession_keys_study_by_uid():
    d = ds(SOPInstanceUID="1.2", StudyInstanceUID="1.2.3", AccessionNumber="", Modality="MG")
    f = read_header_fields(d)
    assert (f.accession_number, f.study_key, f.study_key_source) == (None, "1.2.3", "study_uid")
    f = read_header_fields(ds(SOPInstanceUID="1.2", StudyInstanceUID="1.2.3", AccessionNumber=" A12 "))
    assert (f.accession_number, f.study_key, f.study_key_source) == ("A12", "A12", "accession")


def test_missing_identity_is_named():
    with pytest.raises(KeyError, match="SOPInstanceUID"):
        read_header_fields(ds(StudyInstanceUID="1"))
    with pytest.raises(KeyError, match="AccessionNumber and StudyInstanceUID"):
        read_header_fields(ds(SOPInstanceUID="1"))
