"""Which model version serves queries: ``live.json`` in the index folder, switched atomically.

Each entry names what is needed to rebuild the encoder (registry name, weights file, input size) and its
model key (= index folder). Older entries stay listed, with their index folders, for rollback.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import IndexCorruptError, NotFoundError
from .fileio import write_bytes_atomic

LIVE_NAME = "live.json"


@dataclass(frozen=True)
class ServingModel:
    key: str
    encoder: str
    weights: str | None
    input_size: int | None
    switched_at: str = ""


def read_live(index_dir: Path) -> tuple[ServingModel | None, list[ServingModel]]:
    path = index_dir / LIVE_NAME
    if not path.exists():
        return None, []
    try:
        data = json.loads(path.read_text())
        return ServingModel(**data["live"]), [ServingModel(**m) for m in data.get("previous", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexCorruptError(f"{path}: unreadable live pointer: {exc}",
                                hint="fix or delete it; the config's encoder then serves") from None


def _write(index_dir: Path, live: ServingModel, previous: list[ServingModel]) -> None:
    index_dir.mkdir(parents=True, exist_ok=True)
    payload = {"live": asdict(live), "previous": [asdict(m) for m in previous]}
    write_bytes_atomic(index_dir / LIVE_NAME, json.dumps(payload, indent=2).encode())


def switch_live(index_dir: Path, new: ServingModel) -> ServingModel | None:
    """Make ``new`` live; the one it replaces is kept for rollback. Returns the replaced one."""
    live, previous = read_live(index_dir)
    new = ServingModel(**{**asdict(new), "switched_at": datetime.now(timezone.utc).isoformat()})
    if live is not None and live.key != new.key:
        previous = [m for m in previous if m.key not in (live.key, new.key)] + [live]
    _write(index_dir, new, previous)
    return live if live is not None and live.key != new.key else None


def rollback(index_dir: Path) -> ServingModel:
    live, previous = read_live(index_dir)
    candidates = [m for m in previous if (index_dir / m.key / "manifest.json").exists()]
    if live is None or not candidates:
        raise NotFoundError("no earlier index version to roll back to",
                            hint="`mretrieve status` lists the kept versions")
    target = candidates[-1]
    remaining = [m for m in previous if m.key != target.key] + [live]
    _write(index_dir, ServingModel(**{**asdict(target), "switched_at": datetime.now(timezone.utc).isoformat()}),
           remaining)
    return target
