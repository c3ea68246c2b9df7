"""`mretrieve listen`, run as users run it (a process), fed by a pynetdicom C-STORE SCU: C-ECHO, a real
mammogram in every transfer syntax the reader decodes, a refusal with its reason, the calling-AE allow
list, and kill -9 between receiving and indexing (nothing lost: the spool is indexed on restart)."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE

from mammo_retrieval.app.workspace import Workspace
from tests.conftest import MIAS_DIR, REPO, make_config
from tests.factory import SYNTAXES, make_dataset

MRETRIEVE = Path(sys.executable).parent / "mretrieve"
TINY_CONFIG = "encoder: {name: resnet18, input_size: 64, batch_size: 4}\n"


def _real_pixels(cbis_files) -> np.ndarray:
    """An 8-bit real mammogram: a MIAS image, or a CBIS-DDSM one reduced, where ../shared is absent."""
    if MIAS_DIR.exists():
        return pydicom.dcmread(sorted(MIAS_DIR.glob("P0001/*.dcm"))[0]).pixel_array.astype(np.uint8)
    image = pydicom.dcmread(cbis_files[0]).pixel_array[::4, ::4]
    return (image >> 8).astype(np.uint8)


def _dataset(pixels8: np.ndarray, syntax: str, **kwargs):
    """A file as a modality would hold it (written and read back, so it carries its own encoding)."""
    if syntax == "jpeg_baseline":
        ds = make_dataset(pixels8, syntax=syntax, bits_stored=8, **kwargs)
    else:
        ds = make_dataset(pixels8.astype(np.uint16) << 4, syntax=syntax, bits_stored=12, **kwargs)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


class Listening:
    """``mretrieve listen`` in a subprocess, on a free port, with its home under ``home``."""

    def __init__(self, home: Path, *args: str) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.yaml").write_text(TINY_CONFIG)
        env = dict(os.environ, MRETRIEVE_HOME=str(home), MRETRIEVE_CONFIG=str(home / "config.yaml"),
                   PYTHONPATH=str(REPO))
        self.process = subprocess.Popen([str(MRETRIEVE), "-v", "listen", "--port", "0", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, cwd=home)
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("listen exited:\n" + "".join(self.lines))
            self.lines.append(line)
            if m := re.search(r"listening for C-STORE on 127\.0\.0\.1:(\d+)", line):
                self.port = int(m.group(1))
                return
        raise RuntimeError("listen did not start:\n" + "".join(self.lines))

    def stop(self, sig=signal.SIGTERM) -> str:
        self.process.send_signal(sig)
        out, _ = self.process.communicate(timeout=120)
        return "".join(self.lines) + (out or "")


def _store(port: int, datasets, calling: str = "MODALITY"):
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MRETRIEVE")
    if not assoc.is_established:
        return None
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def _echo(port: int) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="MRETRIEVE")
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def _indexed(home: Path) -> tuple[int, int]:
    ws = Workspace(make_config(home, encoder={"name": "resnet18", "input_size": 64, "batch_size": 4}))
    if not (home / "mretrieve.db").exists():
        return 0, 0
    status = ws.status()
    index = ws.searchable_index().ntotal if status["counts"]["embeddings"] else 0
    return status["counts"]["embeddings"], index


def _wait_indexed(home: Path, n: int, timeout: float = 90) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := _indexed(home)) == (n, n):
            return got
        time.sleep(0.3)
    return _indexed(home)


def test_listen_echoes_receives_every_syntax_refuses_with_reason_and_indexes(tmp_path, cbis_files):
    pixels = _real_pixels(cbis_files)
    sent = [_dataset(pixels, syntax, accession=f"A{i}") for i, syntax in enumerate(SYNTAXES)]
    ct = _dataset(pixels, "explicit", modality="CT")
    home = tmp_path / "home"
    listening = Listening(home, "--batch-seconds", "0.5", "--allow", "MODALITY")
    try:
        assert _echo(listening.port) == 0x0000
        statuses = _store(listening.port, sent)
        assert [s.Status for s in statuses] == [0x0000] * len(SYNTAXES), [str(s) for s in statuses]
        refused = _store(listening.port, [ct])[0]
        assert refused.Status == 0xC000 and refused.ErrorComment.startswith("wrong_modality")
        assert _store(listening.port, sent[:1], calling="STRANGER") is None, "an AE not allowed is refused"
        assert _wait_indexed(home, len(SYNTAXES)) == (len(SYNTAXES), len(SYNTAXES))
        # resent: acknowledged, not doubled, the spooled file left as it is
        first_spooled = home / "spool" / sent[0].StudyInstanceUID / f"{sent[0].SOPInstanceUID}.dcm"
        inode = first_spooled.stat().st_ino
        assert [s.Status for s in _store(listening.port, sent[:2])] == [0, 0]
        assert first_spooled.stat().st_ino == inode
        # the same SOPInstanceUID with other pixels: the instance stored first stays (as Orthanc keeps it),
        # so the file on disk is still the one the catalog's hash and vector describe
        first = sent[0]
        spooled_first = home / "spool" / first.StudyInstanceUID / f"{first.SOPInstanceUID}.dcm"
        kept = spooled_first.read_bytes()
        other = _dataset(pixels[::-1].copy(), next(iter(SYNTAXES)), accession="A0", sop_uid=first.SOPInstanceUID,
                         study_uid=first.StudyInstanceUID)
        assert [s.Status for s in _store(listening.port, [other])] == [0]
        assert spooled_first.read_bytes() == kept
        time.sleep(1.5)
    finally:
        out = listening.stop()
    assert "spooled already" in out and "the stored instance is kept" in out
    assert _indexed(home) == (len(SYNTAXES), len(SYNTAXES)), out
    ws = Workspace(make_config(home, encoder={"name": "resnet18", "input_size": 64, "batch_size": 4}))
    status = ws.status()
    assert [r["code"] for r in status["rejected"]] == ["wrong_modality"]
    assert status["rejected"][0]["path"].startswith("dicom://MODALITY/")
    # every received file is kept in the spool as its stored path; a query with one finds them all
    # (one image in eight syntaxes: only the two lossy ones differ at all)
    from mammo_retrieval.analysis.vectors import load_embeddings
    spooled = sorted(str(p) for p in (home / "spool").rglob("*.dcm"))
    assert sorted(load_embeddings(ws.corpus()).meta.path) == spooled and len(spooled) == len(SYNTAXES)
    hits = ws.query_dicom(spooled[0], len(SYNTAXES)).hits
    assert len(hits) == len(SYNTAXES) - 1 and min(h.score for h in hits) > 0.99  # the query itself is no hit
    assert "stopped: received 11, refused 1" in out


def test_kill_9_after_receiving_and_before_indexing_loses_nothing(tmp_path, cbis_files):
    pixels = _real_pixels(cbis_files)
    sent = [_dataset(pixels[i * 7:], "explicit", accession=f"ACC{i}") for i in range(3)]
    home = tmp_path / "home"
    listening = Listening(home, "--batch-seconds", "3600", "--batch-images", "100")
    try:
        assert [s.Status for s in _store(listening.port, sent)] == [0, 0, 0]
    finally:
        listening.process.kill()  # SIGKILL: no flush, no goodbye
        listening.process.wait(30)
    assert _indexed(home) == (0, 0)
    assert len(list((home / "spool").rglob("*.dcm"))) == 3
    again = Listening(home, "--batch-seconds", "0.5")
    try:
        assert any("spool: indexed 3 received earlier" in line for line in again.lines), again.lines
        assert _indexed(home) == (3, 3)
    finally:
        again.stop()
    third = Listening(home)  # nothing left to recover: the spool is skipped by UID, nothing doubles
    try:
        assert any("spool: indexed 0 received earlier, 3 already indexed" in line for line in third.lines)
    finally:
        third.stop()
    assert _indexed(home) == (3, 3)


def test_listening_off_loopback_needs_an_allow_list(tmp_path):
    from mammo_retrieval.core.errors import ConfigError
    ws = Workspace(make_config(tmp_path / "state"))
    with pytest.raises(ConfigError, match="--allow"):
        ws.listener(host="0.0.0.0", port=0)


def test_a_port_in_use_is_exit_12_and_a_host_not_of_this_machine_exit_2_as_for_serve(tmp_path):
    """The listener and `serve` share one error for a socket that cannot listen (core/netaddr.py)."""
    import socket

    from mammo_retrieval.core.errors import ConfigError, PacsError
    ws = Workspace(make_config(tmp_path / "state"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = ws.listener(host="127.0.0.1", port=port)
        with pytest.raises(PacsError, match=f"cannot listen on 127.0.0.1:{port}: ") as raised:
            busy.start()
    assert raised.value.exit_code == 12 and "--port" in raised.value.hint
    foreign = ws.listener(host="192.0.2.1", port=0, allowed=("SCU",))  # TEST-NET-1: not an address of ours
    with pytest.raises(ConfigError, match="cannot listen on 192.0.2.1:0: ") as raised:
        foreign.start()
    assert raised.value.exit_code == 2 and "--host" in raised.value.hint


def test_listen_checks_its_options_and_port_before_recovering_the_spool(tmp_path, cbis_files):
    """A wrong option or a busy port is said at once, not after the spool is ingested and the model loaded."""
    import socket

    from click.testing import CliRunner

    from mammo_retrieval.app.cli import cli
    home = tmp_path / "home"
    (home / "spool").mkdir(parents=True)
    (home / "spool" / "received.dcm").write_bytes(Path(cbis_files[0]).read_bytes())
    env = {"MRETRIEVE_HOME": str(home)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = CliRunner().invoke(cli, ["listen", "--port", str(taken.getsockname()[1])], env=env)
    assert busy.exit_code == 12 and "cannot listen on 127.0.0.1:" in busy.output, busy.output
    long_title = CliRunner().invoke(cli, ["listen", "--port", "0", "--ae-title", "ABCDEFGHIJKLMNOPQRS"], env=env)
    assert long_title.exit_code == 2 and "1 to 16 characters" in long_title.output, long_title.output
    for result in (busy, long_title):
        assert "spool:" not in result.output
    assert Workspace(make_config(home)).status()["counts"]["images"] == 0  # nothing was ingested first


def test_a_received_uid_that_is_not_plain_never_leaves_the_spool_folder(tmp_path):
    """".." matches digits-and-dots but is no UID: the study folder would be the spool's parent."""
    from types import SimpleNamespace

    from mammo_retrieval.pacs.listener import spool_path
    spool = tmp_path / "spool"
    for study, sop in (("..", "1.2.3"), ("1.2.3", ".."), ("1.2/../..", "../../x"), ("1.2.3", "4.5.6")):
        received = SimpleNamespace(header=SimpleNamespace(study_instance_uid=study, sop_instance_uid=sop),
                                   sha256="ab" * 32)
        path = spool_path(spool, received)
        assert path.resolve().parent.parent == spool.resolve(), (study, sop, path)
    assert spool_path(spool, received) == spool / "1.2.3" / "4.5.6.dcm"
