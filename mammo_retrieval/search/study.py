"""Study-level search: "show me cases like this one", where a case is a study of several views.

Two steps. A shortlist: every query image's nearest images (the index), grouped by study. Then an exact,
view-aware fusion over every image of each shortlisted study (the stored vectors):

- ``mean_pooled`` (the default): the cosine of the two studies' mean-pooled, L2-normalised vectors
  (MaMA-style), each pooled over the views both studies have (over all their images when they share
  none). It measured at least as well as ``view_best_mean`` on tissue precision@10 in every evaluation
  of this project (README, "Study-level search"), hence the default.
- ``view_best_mean``: each query image is matched against the candidate's images of the same laterality
  and view, taking the best cosine; the study score is the mean over the views both studies have. A
  candidate sharing no view with the query is scored over all its images instead.

Under either rule a hit lists the views both studies have (``views_matched``; empty: none in common) and
each of its images' best cosine against the query image of the same view (or any view, without one).

The query's own study is never a hit; ``exclude_same_patient`` drops the patient's other studies too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from mammo_retrieval.core.errors import ConfigError

RULES = ("mean_pooled", "view_best_mean")
DEFAULT_RULE = "mean_pooled"


@dataclass(frozen=True)
class StudyImage:
    sop_instance_uid: str
    laterality: str | None
    view: str | None
    path: str
    vector: np.ndarray = field(repr=False, compare=False)

    @property
    def view_key(self) -> str:
        return f"{self.laterality or '?'} {(self.view or '?').upper()}"


@dataclass(frozen=True)
class Study:
    study_key: str
    accession_number: str | None
    study_instance_uid: str | None
    patient_id: str | None
    images: tuple[StudyImage, ...]


@dataclass(frozen=True)
class StudyHitImage:
    sop_instance_uid: str
    laterality: str | None
    view: str | None
    path: str
    score: float  # its best cosine against the query image of the same view (or any, without one)


@dataclass(frozen=True)
class StudyHit:
    rank: int
    score: float
    study_key: str
    accession_number: str | None
    study_instance_uid: str | None
    patient_id: str | None
    views_matched: list[str]
    images: list[StudyHitImage]


@dataclass
class StudyResult:
    query: dict
    hits: list[StudyHit]
    rule: str

    def as_dict(self) -> dict:
        return {"query": self.query, "rule": self.rule, "hits": [asdict(h) for h in self.hits]}


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ConfigError(f"unknown study fusion rule '{rule}'", hint=f"choose one of {', '.join(RULES)}")
    return rule


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm else v


def fuse(query: Study, candidate: Study, rule: str) -> tuple[float, list[str], list[StudyHitImage]]:
    """(score, views matched, the candidate's images with their scores) of one candidate study."""
    q = np.stack([i.vector for i in query.images]).astype(np.float32)
    c = np.stack([i.vector for i in candidate.images]).astype(np.float32)
    sims = q @ c.T  # (query images, candidate images)
    q_keys = [i.view_key for i in query.images]
    c_keys = [i.view_key for i in candidate.images]
    same = np.array([[a == b for b in c_keys] for a in q_keys])
    common = sorted({k for k in q_keys if k in c_keys})
    # each candidate image's score: best against the query images of its view (or any, without one)
    per_image = [float(np.max(np.where(same[:, j], sims[:, j], -np.inf))) if same[:, j].any()
                 else float(sims[:, j].max()) for j in range(len(c_keys))]
    images = [StudyHitImage(i.sop_instance_uid, i.laterality, i.view, i.path, round(s, 6))
              for i, s in zip(candidate.images, per_image)]
    if rule == "mean_pooled":
        # pooled over the views both studies have, so a two-view query compares like with like
        q_rows = [i for i, key in enumerate(q_keys) if key in common] or list(range(len(q_keys)))
        c_rows = [j for j, key in enumerate(c_keys) if key in common] or list(range(len(c_keys)))
        score = float(_unit(q[q_rows].mean(axis=0)) @ _unit(c[c_rows].mean(axis=0)))
    elif common:
        per_view = [float(np.max(np.where(same[i], sims[i], -np.inf))) for i in range(len(q_keys)) if same[i].any()]
        score = float(np.mean(per_view))
    else:
        score = float(sims.max(axis=1).mean())
    return score, common, images


def rank_studies(query: Study, candidates: list[Study], k: int, *, rule: str = DEFAULT_RULE,
                 exclude_same_patient: bool = False) -> StudyResult:
    """The k best candidate studies under ``rule``; the query's own study is never one."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, not {k}")
    check_rule(rule)
    scored = []
    for candidate in candidates:
        if candidate.study_key == query.study_key or not candidate.images:
            continue
        if exclude_same_patient and query.patient_id and candidate.patient_id == query.patient_id:
            continue
        score, views, images = fuse(query, candidate, rule)
        scored.append((score, candidate, views, images))
    scored.sort(key=lambda t: (-t[0], t[1].study_key))
    hits = [StudyHit(rank, round(score, 6), c.study_key, c.accession_number, c.study_instance_uid, c.patient_id,
                     views, images) for rank, (score, c, views, images) in enumerate(scored[:k], start=1)]
    return StudyResult(query=describe(query), hits=hits, rule=rule)


def describe(study: Study) -> dict:
    return {"study_key": study.study_key, "accession_number": study.accession_number,
            "study_instance_uid": study.study_instance_uid, "patient_id": study.patient_id,
            "images": [{"sop_instance_uid": i.sop_instance_uid, "laterality": i.laterality, "view": i.view,
                        "path": i.path} for i in study.images]}
