"""Preprocessed-image cache: the uint8 model-size image of every ingested DICOM, keyed by SOPInstanceUID.

Training, re-indexing, QC thumbnails and the classical baselines read it instead of decoding DICOM again.
Pixels live in fixed-size memory-mapped shards; the key -> slot map and a CRC32 of each image live in a
small SQLite file beside them (the cache is derived data: it never goes in the main database).
One folder per preprocessing digest, so images made with other settings are never mixed.
"""
from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from mammo_retrieval.core.errors import MammoRetrievalError

SHARD_CAPACITY = 4096


class CacheCorruptError(MammoRetrievalError):
    exit_code = 6


class ImageCache:
    def __init__(self, root: Path, digest: str, size: tuple[int, int]) -> None:
        self.directory = Path(root) / digest
        self.directory.mkdir(parents=True, exist_ok=True)
        self.size = tuple(size)
        self._slot_bytes = self.size[0] * self.size[1]
        self._db = sqlite3.connect(self.directory / "entries.sqlite", timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS entries (sop TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE, "
                         "crc32 INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        stored = self._db.execute("SELECT value FROM meta WHERE key='size'").fetchone()
        if stored is None:
            self._db.execute("INSERT INTO meta VALUES ('size', ?)", (f"{self.size[0]}x{self.size[1]}",))
            self._db.commit()
        elif stored[0] != f"{self.size[0]}x{self.size[1]}":
            raise CacheCorruptError(f"{self.directory}: cache holds {stored[0]} images, expected "
                                    f"{self.size[0]}x{self.size[1]}", hint="delete the folder; ingest refills it")
        self._maps: dict[int, np.memmap] = {}

    def _shard(self, index: int) -> np.memmap:
        if index not in self._maps:
            path = self.directory / f"shard-{index:05d}.u8"
            if not path.exists() or path.stat().st_size < SHARD_CAPACITY * self._slot_bytes:
                with open(path, "ab") as fh:  # sparse: only written slots take disk space
                    fh.truncate(SHARD_CAPACITY * self._slot_bytes)
            self._maps[index] = np.memmap(path, dtype=np.uint8, mode="r+",
                                          shape=(SHARD_CAPACITY, *self.size))
        return self._maps[index]

    def _view(self, slot: int) -> np.ndarray:
        return self._shard(slot // SHARD_CAPACITY)[slot % SHARD_CAPACITY]

    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        """Pixels first (flushed), then the entry rows in one transaction: a crash leaves no bad entry."""
        items = list(items)
        if not items:
            return
        existing = dict(self._db.execute(
            f"SELECT sop, slot FROM entries WHERE sop IN ({','.join('?' * len(items))})",
            [sop for sop, _ in items]).fetchall())
        next_slot = (self._db.execute("SELECT MAX(slot) FROM entries").fetchone()[0] or -1) + 1
        rows, touched = [], set()
        for sop, image in items:
            if image.shape != self.size or image.dtype != np.uint8:
                raise ValueError(f"cache expects uint8 {self.size}, got {image.dtype} {image.shape}")
            slot = existing.get(sop)
            if slot is None:
                slot, next_slot = next_slot, next_slot + 1
                existing[sop] = slot
            self._view(slot)[:] = image
            touched.add(slot // SHARD_CAPACITY)
            rows.append((sop, slot, zlib.crc32(image.tobytes())))
        for shard in touched:
            self._maps[shard].flush()
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO entries (sop, slot, crc32) VALUES (?, ?, ?)", rows)

    def get(self, sop: str) -> np.ndarray | None:
        """The cached image, or None if absent. Raises CacheCorruptError if its checksum fails."""
        row = self._db.execute("SELECT slot, crc32 FROM entries WHERE sop=?", (sop,)).fetchone()
        if row is None:
            return None
        image = np.array(self._view(row[0]))
        if zlib.crc32(image.tobytes()) != row[1]:
            raise CacheCorruptError(f"cache entry for {sop} in {self.directory} fails its checksum")
        return image

    def discard(self, sop: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM entries WHERE sop=?", (sop,))

    def __contains__(self, sop: str) -> bool:
        return self._db.execute("SELECT 1 FROM entries WHERE sop=?", (sop,)).fetchone() is not None

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        for m in self._maps.values():
            m.flush()
        self._maps.clear()
        self._db.close()
