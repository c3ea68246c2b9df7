"""ORM models. Keep in step with migrations/versions (a test compares them)."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ModelVersion(Base):
    """An encoder + weights + preprocessing combination; vectors of different versions never mix."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("key", name="uq_model_versions_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64))
    encoder: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    weights_path: Mapped[str | None] = mapped_column(Text)
    random_weights: Mapped[bool] = mapped_column(Boolean)
    preprocess_digest: Mapped[str] = mapped_column(String(32))
    preprocess_json: Mapped[str] = mapped_column(Text)
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Study(Base):
    """Keyed by AccessionNumber; by StudyInstanceUID (flagged) where the accession is empty."""

    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("study_key", name="uq_studies_study_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_key: Mapped[str] = mapped_column(String(128))
    key_source: Mapped[str] = mapped_column(String(16))  # accession | study_uid
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    images: Mapped[list["Image"]] = relationship(back_populates="study")


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("sop_instance_uid", name="uq_images_sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))  # None: ingested before migration 0005
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(128), index=True)
    laterality: Mapped[str | None] = mapped_column(String(1))
    laterality_source: Mapped[str | None] = mapped_column(String(64))
    view: Mapped[str | None] = mapped_column(String(8))
    view_source: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[int] = mapped_column(Integer)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    frame_index: Mapped[int] = mapped_column(Integer, default=0)
    frames_used: Mapped[str | None] = mapped_column(Text)  # JSON list, for a volume whose frames were pooled
    photometric: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="images")


class Embedding(Base):
    """One vector per (image, model version). ``id`` is the FAISS vector id; the vector is kept
    here too so that an index can always be rebuilt or repaired from the database."""

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("image_id", "model_version_id", name="uq_embeddings_image_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RejectedFile(Base):
    __tablename__ = "rejected_files"
    __table_args__ = (UniqueConstraint("path", name="uq_rejected_files_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    code: Mapped[str] = mapped_column(String(32), index=True)
    reason: Mapped[str] = mapped_column(Text)
    rejected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    fingerprint: Mapped[str | None] = mapped_column(String(80))  # pipeline.screen.crash_fingerprint; 0006
    repeats: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # in a row, same code and
    # fingerprint (migration 0007): a worker_died file is skipped only after two deaths


class QcRun(Base):
    """One QC sweep; its scores let a later sweep show what is new."""

    __tablename__ = "qc_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    method: Mapped[str] = mapped_column(String(16))
    params_json: Mapped[str] = mapped_column(Text)
    n_images: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class QcScore(Base):
    __tablename__ = "qc_scores"
    __table_args__ = (UniqueConstraint("run_id", "image_id", name="uq_qc_scores_run_image"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("qc_runs.id"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    score: Mapped[float] = mapped_column(Float)
    rank: Mapped[int] = mapped_column(Integer)
    flags: Mapped[str | None] = mapped_column(Text)


class QcDuplicate(Base):
    """A near-duplicate pair found by a QC sweep (image a has the lower id)."""

    __tablename__ = "qc_duplicates"
    __table_args__ = (UniqueConstraint("run_id", "image_a_id", "image_b_id", name="uq_qc_duplicates_run_pair"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("qc_runs.id"), index=True)
    image_a_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    image_b_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    similarity: Mapped[float] = mapped_column(Float)
    pixel_correlation: Mapped[float | None] = mapped_column(Float)
