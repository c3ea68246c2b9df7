"""Results back as DICOM: a Key Object Selection (KOS) document, built with highdicom, that a PACS files
with the study it belongs to and a radiologist's viewer shows as a selection of images.

The document belongs to the study of its first reference (the query image; a flagged study's first
image), whose patient and study header it copies, so it is filed with that patient. The title is the
standard code (113000, DCM, "Of Interest"); what the selection means, ranks and scores, is in its text.
"Rejected for Quality Reasons" (113001) is deliberately not used: PACSes act on it by hiding images.

highdicom (0.28) refuses a KOS whose references span more than two studies. DICOM does not (PS3.3
C.17.6.2.1: the Current Requested Procedure Evidence Sequence lists every referenced instance, by study),
and similar cases are other patients' studies by nature; so the document is built by highdicom with the
references of its own study, then given the whole content and the whole evidence, grouped by study by
highdicom's own ``collect_evidence``.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom import Dataset

MAX_TEXT = 10240  # the description (a UT text item) stays readable in a viewer
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                          "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName")
UTF8 = "ISO_IR 192"  # every document's character set

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    """One referenced image, as the document names it."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    rows: int = 0
    columns: int = 0


def _copyable(keyword: str, value):
    """``value`` as the document can carry it (the first of several, where the attribute takes one), or None
    where highdicom would refuse it: ingest keeps images whose birth date, study date or time (a range, a
    typo) or sex is malformed. Over-long names and identifiers are copied as they are: they file the
    document with its patient."""
    from highdicom.enum import PatientSexValues
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DA, TM
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if keyword == "PatientSex":
        return value if value in {v.value for v in PatientSexValues} else None
    parse = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}.get(keyword)
    if parse is not None:
        try:
            with warnings.catch_warnings():  # pydicom's note on a non-conformant value quotes it
                warnings.simplefilter("ignore")
                parse(str(value))  # as highdicom converts it
        except ValueError:
            return None
    return value


def _evidence(ref: Reference, header: "Dataset | None" = None) -> "Dataset":
    from pydicom import Dataset
    ds = Dataset()
    if header is not None:  # the document's own study: its patient and study module
        refused = []
        with warnings.catch_warnings():  # pydicom's note on a malformed value quotes it: patient data
            warnings.simplefilter("ignore")
            values = {keyword: header.get(keyword, None) for keyword in PATIENT_STUDY_KEYWORDS}
        for keyword, value in values.items():
            copied = None if value in (None, "") else _copyable(keyword, value)
            if value not in (None, "") and copied is None:
                refused.append(keyword)
            setattr(ds, keyword, copied)  # None: present and empty (type 2), as highdicom reads them
        # pydicom hands the values over decoded, whatever the source's character set (one highdicom may
        # refuse, or one that cannot hold the text's own characters): the document is written in UTF-8
        ds.SpecificCharacterSet = UTF8
        if refused:  # the fields' names only: their values are patient data
            logger.warning("image %s: %s not valid DICOM in its header: left empty in the document",
                           ref.sop_instance_uid, ", ".join(refused))
    ds.SOPClassUID, ds.SOPInstanceUID = ref.sop_class_uid, ref.sop_instance_uid
    ds.SeriesInstanceUID, ds.StudyInstanceUID = ref.series_instance_uid, ref.study_instance_uid
    if ref.rows and ref.columns:
        ds.Rows, ds.Columns = ref.rows, ref.columns
    return ds


def key_object_selection(header: "Dataset", references: list[Reference], text: str, *,
                         series_number: int = 990, instance_number: int = 1) -> "Dataset":
    """A KOS document selecting ``references`` (the first one is the document's own study and patient,
    whose header fields are copied from ``header``), with ``text`` as its description."""
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
    from highdicom.sr.utils import collect_evidence
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid
    if not references:
        raise ValueError("a Key Object Selection needs at least one reference")
    unique = list({r.sop_instance_uid: r for r in references}.values())
    evidence = [_evidence(unique[0], header)] + [_evidence(r) for r in unique[1:]]
    own_study = unique[0].study_instance_uid
    text = text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"

    def content(items):
        return KeyObjectSelection(document_title=codes.DCM.OfInterest, referenced_objects=items, description=text)

    own = [e for e in evidence if e.StudyInstanceUID == own_study]
    with warnings.catch_warnings():  # highdicom's warning about a one-part PatientName quotes the name: never
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        document = KeyObjectSelectionDocument(
            evidence=own, content=content(own), series_instance_uid=generate_uid(), series_number=series_number,
            sop_instance_uid=generate_uid(), instance_number=instance_number, manufacturer="mammo_retrieval",
            series_description="mammo_retrieval results")
    full = content(evidence)
    for tag, value in full[0].items():
        document[tag] = value
    same, other = collect_evidence(evidence, full[0], study_instance_uid=own_study)
    document.CurrentRequestedProcedureEvidenceSequence = list(same) + list(other)
    return document


def referenced_sops(document: "Dataset") -> list[str]:
    """The SOPInstanceUIDs a KOS selects, in content order (reading a document back)."""
    out = []
    for item in document.ContentSequence:
        for ref in item.get("ReferencedSOPSequence", []):
            out.append(str(ref.ReferencedSOPInstanceUID))
    return out
