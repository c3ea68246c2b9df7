"""The manifest beside every index: what built it, so that a mismatched query can be refused."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mammo_retrieval.core.errors import IndexCorruptError, IndexMismatchError, Remedy
from mammo_retrieval.core.fileio import write_bytes_atomic

FORMAT_VERSION = 2  # 2: inverted lists on disk with a delta (older versions cannot read those)
MANIFEST_NAME = "manifest.json"


@dataclass
class Manifest:
    encoder: str
    weights_sha256: str
    preprocess_digest: str
    dim: int
    random_weights: bool = False
    metric: str = "inner_product"
    index_type: str = "flat"          # flat (exact) | ivf_flat | ivf_sq8 | ivf_pq
    nlist: int | None = None
    nprobe: int | None = None
    opq: bool = False                 # an OPQ rotation before the IVF (ivf_pq)
    on_disk: bool = False             # lists in lists_file (memory-mapped), new vectors in delta_file
    layout_source: str = "config"     # config: follows the config's policy | rebuild: chosen by `index rebuild`
    nlist_auto: bool = True           # with layout_source rebuild: nlist still grows with the corpus
    ntotal: int = 0
    max_vector_id: int = 0
    index_file: str | None = None
    lists_file: str | None = None
    delta_file: str | None = None
    format_version: int = 1
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    updated_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @classmethod
    def for_identity(cls, identity, **fields) -> "Manifest":
        """A new manifest for an index of this model (encoder, weights, preprocessing, dim)."""
        return cls(encoder=identity.encoder, weights_sha256=identity.weights_sha256,
                   preprocess_digest=identity.preprocess_digest, dim=identity.dim,
                   random_weights=identity.random_weights, **fields)

    def check_matches(self, identity) -> None:
        """Refuse a query or write whose encoder, weights or preprocessing differ; say what differs."""
        diffs = []
        if self.encoder != identity.encoder:
            diffs.append(f"encoder: index has '{self.encoder}', query uses '{identity.encoder}'")
        if self.weights_sha256 != identity.weights_sha256:
            diffs.append(f"weights sha256: index has {self.weights_sha256[:12]}, query uses "
                         f"{identity.weights_sha256[:12]}")
        if self.preprocess_digest != identity.preprocess_digest:
            diffs.append(f"preprocessing: index has {self.preprocess_digest}, query uses {identity.preprocess_digest}")
        if self.dim != identity.dim:
            diffs.append(f"dim: index has {self.dim}, query uses {identity.dim}")
        if diffs:
            raise IndexMismatchError("the index was built by another model: " + "; ".join(diffs),
                                     hint="use the config the index was built with, or re-ingest with this one")

    def files(self) -> set[str]:
        """The files of the folder this manifest names (everything else there is an orphan)."""
        return {name for name in (self.index_file, self.lists_file, self.delta_file) if name}

    def write_atomic(self, directory: Path) -> None:
        """A layout format 1 can describe is written as format 1, without the newer fields, so that an
        older mammo_retrieval (a server not yet upgraded) still reads it; any other as format 2."""
        self.updated_at = datetime.now(timezone.utc).isoformat()
        data = asdict(self)
        if all(data[name] == value for name, value in _FORMAT_2_DEFAULTS.items()):
            for name in _FORMAT_2_DEFAULTS:
                del data[name]
            data["format_version"] = self.format_version = 1
        else:
            data["format_version"] = self.format_version = 2
        write_bytes_atomic(directory / MANIFEST_NAME, json.dumps(data, indent=2, sort_keys=True).encode())

    @classmethod
    def read(cls, directory: Path) -> "Manifest | None":
        path = directory / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (ValueError, TypeError) as exc:
            raise IndexCorruptError(f"{path}: unreadable manifest: {exc}",
                                    remedies=[Remedy("rebuild it from the database", "index_rebuild")]) from None
        if not isinstance(manifest.format_version, int) or manifest.format_version > FORMAT_VERSION:
            raise IndexMismatchError(f"{path}: manifest format {manifest.format_version!r}, this version of "
                                     f"mammo_retrieval reads format {FORMAT_VERSION} and older",
                                     hint="upgrade mammo_retrieval, or rebuild the index with this version")
        return manifest

    @staticmethod
    def signature(directory: Path) -> tuple[int, int] | None:
        """(mtime, size) of the manifest file: it changes at every save, so a warm reader can tell cheaply
        that another process wrote the index (a stat, no read)."""
        try:
            st = (directory / MANIFEST_NAME).stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size


_FORMAT_2_DEFAULTS = {"opq": False, "on_disk": False, "layout_source": "config", "nlist_auto": True,
                      "lists_file": None, "delta_file": None}  # fields format 1 does not have
