"""Issue #9: fuzz the reader through a real ingest. A seeded generator makes a few hundred mutants (byte flips,
truncations, absurd Rows/Columns/BitsAllocated/SamplesPerPixel/NumberOfFrames, a wrong transfer syntax, bad
VRs) of synthetic files of every transfer syntax and, when ../shared holds them, of two MIAS files. They are
ingested beside good files by the real CLI in a subprocess (so the workers' stderr is seen too).

Asserted: the ingest finishes; every good file is indexed; every mutant is indexed with pixels that decode,
or rejected with a code from the one list; no traceback, panic or warning on stderr; and a query with a
rejected mutant is refused with a DicomRejected (a one-line error and exit 3 through the CLI)."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.app.cli import cli
from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.dicom.reader import read_stored
from mammo_retrieval.core.errors import DicomRejected, RejectionCode
from tests.conftest import MIAS_DIR, make_config
from tests.factory import SYNTAXES, breast_phantom, make_dataset, write

SEED = 9
MUTANTS_PER_BASE = 32
CODES = {c.value for c in RejectionCode}
CONFIG = "encoder:\n  name: resnet18\n  input_size: 64\n  batch_size: 16\n"
HEADER_EDITS = [
    ("Rows", [0, 1, 65535, "+1", "-1"]), ("Columns", [0, 1, 65535, "+1", "-1"]),
    ("BitsAllocated", [0, 1, 12, 32, 64]), ("BitsStored", [0, 17, 40]), ("HighBit", [0, 30]),
    ("SamplesPerPixel", [0, 3, 65535]), ("NumberOfFrames", [0, 2, 1000, 99999]),
    ("PixelRepresentation", [1, 7]), ("RescaleSlope", ["NaN", "1e308", "0"]), ("RescaleIntercept", ["-inf"]),
]
BAD_VRS = [b"ZZ", b"\x00\x00", b"SQ", b"OB", b"DS"]


def _fresh(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A new SOPInstanceUID for each mutant, so that no mutant is 'already present' by identity."""
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _to_bytes(ds: pydicom.Dataset, path: Path) -> bytes:
    write(ds, path)
    return path.read_bytes()


def _mutate(rng: np.random.Generator, make_base, tmp: Path) -> bytes:
    """One mutant of a freshly generated base dataset."""
    ds = _fresh(make_base())
    kind = rng.integers(0, 5)
    if kind == 0:  # header edits that lie about the pixel data
        for _ in range(rng.integers(1, 3)):
            keyword, values = HEADER_EDITS[rng.integers(len(HEADER_EDITS))]
            value = values[rng.integers(len(values))]
            if isinstance(value, str) and value[0] in "+-" and value[1:].isdigit():
                value = int(ds.get(keyword, 64)) + int(value)
            setattr(ds, keyword, value)
        return _to_bytes(ds, tmp)
    data = bytearray(_to_bytes(ds, tmp))
    if kind == 1:  # a wrong transfer syntax in the file meta (pydicom will not write one: patch the bytes)
        padded = lambda uid: uid.encode() + b"\0" * (len(uid) % 2)  # noqa: E731
        old = padded(ds.file_meta.TransferSyntaxUID)
        others = [padded(u) for u in SYNTAXES.values() if len(padded(u)) == len(old) and padded(u) != old]
        if others and old in data:
            at = data.index(old)
            data[at:at + len(old)] = others[rng.integers(len(others))]
        return bytes(data)
    if kind == 2:  # byte flips anywhere after the preamble
        for pos in rng.integers(132, len(data), rng.integers(1, 40)):
            data[pos] ^= int(rng.integers(1, 256))
    elif kind == 3:  # truncation
        data = data[: int(rng.integers(0, len(data)))]
    else:  # a bad VR on an explicit-VR element of the image pixel module
        starts = [i for i in range(132, min(len(data), 4096) - 6)
                  if data[i:i + 2] == b"\x28\x00" and data[i + 4:i + 6] in (b"US", b"DS", b"IS", b"CS")]
        if starts:
            i = starts[rng.integers(len(starts))]
            data[i + 4:i + 6] = BAD_VRS[rng.integers(len(BAD_VRS))]
    return bytes(data)


def _bases() -> dict[str, callable]:
    rng = np.random.default_rng(SEED)
    bases = {}
    for syntax in SYNTAXES:
        rows, cols = (int(v) for v in rng.integers(64, 129, 2))
        pixels = breast_phantom(rows, cols, seed=int(rng.integers(100)))
        bases[syntax] = lambda syntax=syntax, pixels=pixels: make_dataset(pixels, syntax=syntax)
    mias = sorted(MIAS_DIR.rglob("*.dcm"))[:2] if MIAS_DIR.is_dir() else []
    for path in mias:
        bases[f"mias_{path.stem}"] = lambda path=path: pydicom.dcmread(path)
    return bases


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    archive, scratch = root / "archive", root / "scratch.dcm"
    good = []
    for i, syntax in enumerate(SYNTAXES):
        good.append(write(make_dataset(breast_phantom(96, 80, seed=i), syntax=syntax), archive / f"good_{syntax}.dcm"))
    for path in sorted(MIAS_DIR.rglob("*.dcm"))[:2] if MIAS_DIR.is_dir() else []:
        os.symlink(path, archive / f"good_{path.name}")  # linked, never copied
        good.append(archive / f"good_{path.name}")
    rng = np.random.default_rng(SEED)
    mutants = []
    for name, make_base in _bases().items():
        count = MUTANTS_PER_BASE if not name.startswith("mias") else MUTANTS_PER_BASE // 2
        for j in range(count):
            path = archive / "mutants" / f"{name}_{j:03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():  # pydicom warns while writing the absurd values on purpose
                warnings.simplefilter("ignore")
                path.write_bytes(_mutate(rng, make_base, scratch))
            mutants.append(path)
    scratch.unlink()
    (root / "config.yaml").write_text(CONFIG)
    home = root / "state"
    env = {**os.environ, "MRETRIEVE_HOME": str(home), "MRETRIEVE_CONFIG": str(root / "config.yaml")}
    for var in ("MRETRIEVE_DATABASE_URL", "MRETRIEVE_INDEX_DIR", "MRETRIEVE_CACHE_DIR", "MRETRIEVE_WEIGHTS"):
        env.pop(var, None)
    run = subprocess.run([sys.executable, "-c", "from mammo_retrieval.app.cli import main; main()", "ingest",
                          str(archive), "--workers", "1", "--format", "json", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    return {"good": good, "mutants": mutants, "run": run, "home": home, "root": root, "env": env}


def test_the_ingest_of_mutants_finishes_without_a_traceback(fuzzed):
    run = fuzzed["run"]
    assert len(fuzzed["mutants"]) >= 200
    assert run.returncode == 0, run.stderr[-3000:]
    for word in ("Traceback", "panicked", "Warning:", "Error:"):
        assert word not in run.stderr, run.stderr[-3000:]


def test_every_good_file_is_indexed_and_every_mutant_accounted_for(fuzzed):
    report = json.loads(fuzzed["run"].stdout)
    ws = Workspace(make_config(fuzzed["home"], encoder={"name": "resnet18", "input_size": 64}))
    with ws.db.session() as s:
        indexed = {r.path for r in _indexed_images(s)}
        rejected = {r.path: r.code for r in repo.rejected_files(s)}
    assert {str(p) for p in fuzzed["good"]} <= indexed
    assert report["already_present"] == 0 and report["files_seen"] == len(fuzzed["good"]) + len(fuzzed["mutants"])
    assert set(rejected.values()) <= CODES
    reader_cfg = ws.config.reader
    for mutant in fuzzed["mutants"]:
        if str(mutant) in indexed:
            assert np.isfinite(read_stored(mutant, reader_cfg).stored).all()
        else:
            assert str(mutant) in rejected, f"{mutant.name} neither indexed nor rejected"
    codes = set(rejected.values())
    assert len(codes) >= 5, codes  # the generator reaches many kinds of refusal
    assert len(indexed) > len(fuzzed["good"])  # and some harmless mutants (a flip in the pixels) still index


def _indexed_images(session):
    from sqlalchemy import select

    from mammo_retrieval.storage.catalog.models import Image
    return session.scalars(select(Image)).all()


def test_a_query_with_a_rejected_mutant_is_a_one_line_error(fuzzed, monkeypatch):
    home = fuzzed["home"]
    ws = Workspace(make_config(home, encoder={"name": "resnet18", "input_size": 64}))
    with ws.db.session() as s:
        rejected = sorted(r.path for r in repo.rejected_files(s))
    sample = [rejected[i] for i in np.random.default_rng(SEED).choice(len(rejected), min(30, len(rejected)),
                                                                      replace=False)]
    for path in sample:
        with pytest.raises(DicomRejected) as info:
            ws.query_dicom(path, k=3)
        assert info.value.code in CODES and "\n" not in info.value.reason
    for var in ("MRETRIEVE_DATABASE_URL", "MRETRIEVE_INDEX_DIR", "MRETRIEVE_CACHE_DIR", "MRETRIEVE_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MRETRIEVE_HOME", str(home))
    monkeypatch.setenv("MRETRIEVE_CONFIG", str(fuzzed["root"] / "config.yaml"))
    for path in sample[:4]:
        result = CliRunner().invoke(cli, ["query", "--dicom", path])
        assert result.exit_code == 3, result.output
        lines = result.output.strip().splitlines()
        assert lines[0].startswith("error: ") and len(lines) <= 2 and "Traceback" not in result.output
