"""Which model version serves queries: ``live.json`` in the index folder, switched atomically.

Each entry names what is needed to rebuild the encoder (registry name, weights file, input size) and its
model key (= index folder). Older entries stay listed, with their index folders, for rollback.

Weights are not referenced where the user keeps them (a ``ckpt.pt`` that may be overwritten or deleted)
but copied into ``<index_dir>/weights/<sha256><suffix>``; the entry records the hash, which is checked
whenever the encoder is rebuilt from it and on rollback.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from mammo_retrieval.core.config import EncoderConfig
from mammo_retrieval.core.errors import IndexCorruptError, NotFoundError, WeightsError, Remedy
from mammo_retrieval.core.fileio import write_bytes_atomic
from mammo_retrieval.core.private import make_private_dir

LIVE_NAME = "live.json"
WEIGHTS_DIR = "weights"


@dataclass(frozen=True)
class ServingModel:
    key: str
    encoder: str
    weights: str | None
    input_size: int | None
    switched_at: str = ""
    weights_sha256: str | None = None  # set when ``weights`` is a stored, content-addressed copy
    rolled_back_from: str | None = None  # the live key a rollback replaced with this one
    reported: bool = True  # False from a rollback's switch until its caller has said so (a rerun's guide)


def weights_store(index_dir: Path) -> Path:
    return index_dir / WEIGHTS_DIR


def store_model_weights(index_dir: Path, weights: str | None) -> tuple[str | None, str | None]:
    """Copy ``weights`` into the index folder's store; returns (stored path, sha256), or (None, None)."""
    if not weights:
        return None, None
    from mammo_retrieval.encoders.weights import store_weights
    path, sha = store_weights(Path(weights).expanduser(), weights_store(index_dir))
    return str(path), sha


def weights_in_use(index_dir: Path, stored: str) -> bool:
    """Whether the live model or one kept for rollback serves the stored copy ``stored``."""
    live, previous = read_live(index_dir)
    target = Path(stored).resolve()
    return any(m.weights and Path(m.weights).resolve() == target for m in ([live] if live else []) + previous)


def verify_model_weights(model: ServingModel) -> None:
    """Raise WeightsError when a stored weights copy is missing or no longer has its recorded hash."""
    if model.weights and model.weights_sha256:
        from mammo_retrieval.encoders.weights import verify_weights
        verify_weights(model.weights, model.weights_sha256)


def _adopt(index_dir: Path, model: ServingModel) -> ServingModel:
    """Store the weights of an entry that still points at a user's file (written by ingest or an older
    version), while that file still holds the weights its index was built with, so rollback survives
    the file being overwritten later. Otherwise the entry is kept as it is."""
    if not model.weights or model.weights_sha256:
        return model
    source = Path(model.weights)
    try:
        from mammo_retrieval.core.fileio import sha256_file
        if not source.is_file() or f"-{sha256_file(source)[:12]}-" not in model.key:
            return model
        path, sha = store_model_weights(index_dir, str(source))
    except (OSError, WeightsError):
        return model
    return ServingModel(**{**asdict(model), "weights": path, "weights_sha256": sha})


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


def serving_encoder_config(configured: EncoderConfig, index_dir: Path) -> EncoderConfig:
    """The configured encoder, unless a reindex made another model live and the config pins no weights.

    The live model's weights are the copy stored in the index folder; its hash is checked here, so a
    modified copy is refused with WeightsError instead of serving vectors of an unknown model."""
    live, _ = read_live(index_dir)
    if live is None or configured.weights:
        return configured
    verify_model_weights(live)
    return model_encoder_config(configured, live)


def model_encoder_config(configured: EncoderConfig, model: ServingModel) -> EncoderConfig:
    """``configured`` (runtime, batch size, ...) building a recorded model: its architecture, its stored
    weights and its input size."""
    return replace(configured, name=model.encoder, weights=model.weights, input_size=model.input_size)


def live_model_differs(configured: EncoderConfig, index_dir: Path, serving_key: str) -> bool:
    """Whether another process switched the live model away from ``serving_key`` (reindex, rollback).
    A config that pins its weights is never switched."""
    if configured.weights:
        return False
    live, _ = read_live(index_dir)
    return live is not None and live.key != serving_key


def _write(index_dir: Path, live: ServingModel, previous: list[ServingModel]) -> None:
    make_private_dir(index_dir)
    payload = {"live": _entry(live), "previous": [_entry(m) for m in previous]}
    write_bytes_atomic(index_dir / LIVE_NAME, json.dumps(payload, indent=2).encode())


def _entry(model: ServingModel) -> dict:
    """The model as live.json holds it; the rollback marks only while a rollback is unreported, so that a
    live.json an older version of this package reads has no key it does not know."""
    entry = asdict(model)
    if model.reported:
        del entry["rolled_back_from"], entry["reported"]
    return entry


def switch_live(index_dir: Path, new: ServingModel) -> ServingModel | None:
    """Make ``new`` live; the one it replaces is kept for rollback. Returns the replaced one."""
    live, previous = read_live(index_dir)
    new = ServingModel(**{**asdict(new), "switched_at": datetime.now(timezone.utc).isoformat()})
    if live is not None and live.key != new.key:
        previous = [m for m in previous if m.key not in (live.key, new.key)] + [_adopt(index_dir, _settled(live))]
    _write(index_dir, new, previous)
    return live if live is not None and live.key != new.key else None


def rollback_target(index_dir: Path) -> ServingModel:
    """The version ``rollback`` would make live (the newest kept one), its stored weights checked."""
    live, previous = read_live(index_dir)
    candidates = [m for m in previous if (index_dir / m.key / "manifest.json").exists()]
    if live is None or not candidates:
        raise NotFoundError("no earlier index version to roll back to",
                            remedies=[Remedy("the status lists the kept versions", "status")])
    verify_model_weights(candidates[-1])
    return candidates[-1]


def rollback(index_dir: Path, reported: bool = True) -> ServingModel:
    """Make the newest kept version live again, after checking its stored weights are intact. With
    ``reported=False`` the switch stays marked until ``rollback_reported``: a rerun of a rollback killed
    between its switch and its report then finds it done (``unreported_rollback``) instead of switching
    back."""
    live, previous = read_live(index_dir)
    target = rollback_target(index_dir)
    remaining = [m for m in previous if m.key != target.key] + [_settled(live)]
    now_live = ServingModel(**{**asdict(target), "switched_at": datetime.now(timezone.utc).isoformat(),
                               "rolled_back_from": live.key, "reported": reported})
    _write(index_dir, now_live, remaining)
    return now_live


def _settled(model: ServingModel) -> ServingModel:
    return ServingModel(**{**asdict(model), "rolled_back_from": None, "reported": True})


def unreported_rollback(index_dir: Path) -> ServingModel | None:
    """The live version, where a rollback made it live and its caller has not reported it yet."""
    live, _ = read_live(index_dir)
    return live if live is not None and live.rolled_back_from and not live.reported else None


def rollback_reported(index_dir: Path, key: str) -> None:
    """The caller of a rollback to ``key`` has told its user: a later rollback is a new one (it switches
    back). Nothing changes if another switch has made another version live since."""
    live, previous = read_live(index_dir)
    if live is not None and live.key == key and not live.reported:
        _write(index_dir, ServingModel(**{**asdict(live), "reported": True}), previous)
