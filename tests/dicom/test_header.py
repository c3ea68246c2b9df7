import pytest
from pydicom.dataset import Dataset

from mammo_retrieval.dicom.header import (laterality_from_text, plain_uid, read_header_fields, read_laterality,
                                          read_view)


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


@pytest.mark.parametrize("uid, plain", [
    ("1.2.840.10008.5.1.4.1.1.1.2", True), ("0", True), ("1." * 31 + "12", True),
    ("1." * 32 + "1", False),  # 65 characters
    ("..", False), (".", False), ("1..2", False), ("1.2.", False), (".1.2", False), ("1.2/../x", False),
    ("<script>alert(4)</script>", False), ("1.2 ", False), ("1.2.3\n", False), ("", False), (None, False),
])
def test_only_a_plain_uid_may_name_a_file(uid, plain):
    assert plain_uid(uid) is plain
