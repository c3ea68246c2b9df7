"""Header fields with the fallbacks real archives need (empty AccessionNumber, view in odd places)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

VIEWS = {"CC", "MLO", "ML", "LM", "LMO", "XCCL", "XCCM", "FB", "SIO", "AT", "CV", "RL", "RM", "ID", "SPOT", "MAG"}
# SNOMED codes of ViewCodeSequence (PS3.16 CID 4014), old SRT and SCT forms.
VIEW_CODES = {
    "R-10242": "CC", "399162004": "CC", "R-10226": "MLO", "399368009": "MLO",
    "R-10224": "ML", "399260004": "ML", "R-10228": "LM", "399352003": "LM",
    "R-1024A": "XCCL", "399099002": "XCCL", "R-1024B": "XCCM", "399192003": "XCCM",
    "R-102D0": "FB", "399196000": "FB", "R-40AAA": "SIO", "399188001": "SIO",
}
VIEW_MEANINGS = {
    "cranio-caudal": "CC", "craniocaudal": "CC", "medio-lateral oblique": "MLO", "mediolateral oblique": "MLO",
    "medio-lateral": "ML", "mediolateral": "ML", "latero-medial": "LM", "lateromedial": "LM",
    "exaggerated cranio-caudal": "XCCL", "cranio-caudal exaggerated laterally": "XCCL",
    "cranio-caudal exaggerated medially": "XCCM", "caudo-cranial (from below)": "FB",
}
LATERALITY_WORDS = {"L": "L", "LEFT": "L", "LT": "L", "R": "R", "RIGHT": "R", "RT": "R"}
TEXT_FIELDS = ("SeriesDescription", "ProtocolName", "StudyDescription", "ImageComments",
               "PerformedProcedureStepDescription", "RequestedProcedureDescription")
_TOKEN = re.compile(r"[A-Za-z]+")
CONTROL_CHARACTERS = r"\x00-\x1f\x7f"  # a regex class body: C0 controls and DEL (Latin-1 keeps 0x80-0x9f)
_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")
# Identity fields kept in the catalog, with the longest value its columns hold (the DICOM VR's own limit,
# or twice it where archives are known to overrun). A longer value, or one with a control character, is
# a broken header: the file is refused, never stored cut short (two studies could then share a key).
IDENTITY_LIMITS = {"sop_instance_uid": 64, "study_instance_uid": 64, "series_instance_uid": 64,
                   "sop_class_uid": 64, "accession_number": 64, "study_key": 128, "patient_id": 128,
                   "transfer_syntax": 64}
KEYWORDS = {"sop_instance_uid": "SOPInstanceUID", "study_instance_uid": "StudyInstanceUID",
            "series_instance_uid": "SeriesInstanceUID", "sop_class_uid": "SOPClassUID",
            "accession_number": "AccessionNumber", "study_key": "AccessionNumber or StudyInstanceUID",
            "patient_id": "PatientID", "transfer_syntax": "TransferSyntaxUID"}
DESCRIPTION_LIMIT = 128  # Manufacturer (LO, 64): descriptive only, so it is cleaned and cut instead
_PLAIN_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def plain_uid(uid: str | None) -> bool:
    """Whether ``uid`` is a UID as the standard writes them (digits in dot-separated parts, at most 64
    characters): only such a UID may become a file or folder name. Ingest keeps images whose UIDs break
    the rule (a hand-made "1.2/../x" or ".."), so a path made from any other UID would leave its folder."""
    return bool(uid) and len(uid) <= 64 and _PLAIN_UID.fullmatch(uid) is not None


class HeaderValueError(ValueError):
    """An identity field the catalog cannot store as it is. The message names the field, never its value
    (it may be the PatientID)."""
_COMBINED = re.compile(r"^(L|R)(CC|MLO|ML|LM|XCCL|XCCM)$")


@dataclass(frozen=True)
class HeaderFields:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str | None
    study_key: str
    study_key_source: str  # "accession" or "study_uid"
    patient_id: str
    laterality: str | None
    laterality_source: str | None
    view: str | None
    view_source: str | None
    manufacturer: str | None
    modality: str
    rows: int
    columns: int
    number_of_frames: int
    photometric: str
    transfer_syntax: str
    sop_class_uid: str = ""


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()


def _tokens(text: str) -> list[str]:
    return [t.upper() for t in _TOKEN.findall(text.replace("_", " "))]


def laterality_from_text(text: str) -> str | None:
    """'R MLO', 'LEFT_CC', 'RCC' -> R/L; None when absent or contradictory."""
    found = set()
    for token in _tokens(text):
        if token in LATERALITY_WORDS:
            found.add(LATERALITY_WORDS[token])
        elif m := _COMBINED.match(token):
            found.add(m.group(1))
    return found.pop() if len(found) == 1 else None


def view_from_text(text: str) -> str | None:
    found = set()
    for token in _tokens(text):
        if token in VIEWS:
            found.add(token)
        elif m := _COMBINED.match(token):
            found.add(m.group(2))
    return found.pop() if len(found) == 1 else None


def read_laterality(ds: Dataset) -> tuple[str | None, str | None]:
    """ImageLaterality, then Laterality, then hints in free-text fields. Returns (value, source)."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = _text(ds, keyword).upper()
        if value in ("L", "R"):
            return value, keyword
    for keyword in TEXT_FIELDS:
        value = laterality_from_text(_text(ds, keyword))
        if value:
            return value, keyword
    return None, None


def read_view(ds: Dataset) -> tuple[str | None, str | None]:
    """ViewPosition, then ViewCodeSequence, then PatientOrientation or SeriesDescription."""
    value = _text(ds, "ViewPosition").upper()
    if value in VIEWS:
        return value, "ViewPosition"
    for item in ds.get("ViewCodeSequence") or []:
        code = VIEW_CODES.get(_text(item, "CodeValue"))
        meaning = VIEW_MEANINGS.get(_text(item, "CodeMeaning").lower())
        if code or meaning:
            return code or meaning, "ViewCodeSequence"
    for keyword in ("PatientOrientation", "SeriesDescription", "ProtocolName"):
        value = view_from_text(_text(ds, keyword))
        if value:
            return value, keyword
    return None, None


def check_storable(fields: HeaderFields) -> None:
    """Raise HeaderValueError when an identity field is too long or holds a control character (a NUL
    inside a PatientID makes PostgreSQL refuse the row, and with it a whole batch)."""
    for name, limit in IDENTITY_LIMITS.items():
        value = getattr(fields, name) or ""
        if name == "study_key" and fields.study_key_source == "study_uid":
            continue  # the StudyInstanceUID itself, checked above
        if len(value) > limit:
            raise HeaderValueError(f"{KEYWORDS[name]} is {len(value)} characters long; at most {limit} can be "
                                   "stored (the DICOM standard allows 64)")
        if _CONTROL.search(value):
            raise HeaderValueError(f"{KEYWORDS[name]} contains a control character (a NUL byte or similar), "
                                   "which no DICOM string value may hold")


def _description(text: str) -> str | None:
    return _CONTROL.sub("", text)[:DESCRIPTION_LIMIT].strip() or None


def read_header_fields(ds: Dataset) -> HeaderFields:
    """Extract identity and description fields. Raises KeyError naming a missing identity UID, and
    HeaderValueError for an identity field the catalog cannot store (see ``check_storable``)."""
    sop = _text(ds, "SOPInstanceUID")
    if not sop:
        raise KeyError("SOPInstanceUID")
    study_uid = _text(ds, "StudyInstanceUID")
    accession = _text(ds, "AccessionNumber") or None
    if accession:
        study_key, key_source = accession, "accession"
    elif study_uid:
        study_key, key_source = study_uid, "study_uid"
    else:
        raise KeyError("AccessionNumber and StudyInstanceUID")
    laterality, lat_source = read_laterality(ds)
    view, view_source = read_view(ds)
    meta = getattr(ds, "file_meta", None)
    fields = HeaderFields(
        sop_instance_uid=sop,
        study_instance_uid=study_uid,
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        accession_number=accession,
        study_key=study_key,
        study_key_source=key_source,
        patient_id=_text(ds, "PatientID"),
        laterality=laterality,
        laterality_source=lat_source,
        view=view,
        view_source=view_source,
        manufacturer=_description(_text(ds, "Manufacturer")),
        modality=_text(ds, "Modality").upper(),
        rows=int(ds.get("Rows") or 0),
        columns=int(ds.get("Columns") or 0),
        number_of_frames=int(ds.get("NumberOfFrames") or 1),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
        sop_class_uid=_text(ds, "SOPClassUID"),
    )
    check_storable(fields)
    return fields
