import json
from pathlib import Path

import pydicom
import pytest
import torch

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.errors import NotFoundError
from mammo_retrieval.storage.index.versions import read_live
from tests.conftest import make_config, torch_model
from tests.pipeline.test_runner import synthetic_archive


def finetuned_weights(ws, path):
    """A checkpoint in PRIMER layout with weights unlike the seeded initialisation."""
    gen = torch.Generator().manual_seed(3)
    state = {f"encoder.encoder.{k}": (v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
             for k, v in torch_model(ws.encoder).state_dict().items()}
    torch.save({"model_state_dict": state}, path)
    return path


def test_reindex_switches_atomically_and_rolls_back(tmp_path, monkeypatch):
    files = synthetic_archive(tmp_path / "archive", 10)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96})
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    old_key = ws.encoder.identity.key
    assert read_live(cfg.index_dir)[0].key == old_key
    before = ws.query_dicom(files[0], k=3)
    ckpt = finetuned_weights(ws, tmp_path / "new.pt")

    # queries keep working on the old version while the new one is built
    server = Workspace(cfg)
    server.query_dicom(files[0], k=3)
    from mammo_retrieval.storage.index import versions
    real_switch = versions.switch_live

    def check_then_switch(index_dir, new):
        assert server.query_dicom(files[0], k=3).hits == before.hits
        assert server.encoder.identity.key == old_key
        return real_switch(index_dir, new)
    monkeypatch.setattr(versions, "switch_live", check_then_switch)
    result = Workspace(cfg).reindex(str(ckpt))
    monkeypatch.undo()
    assert result["embedded"] == 10 and result["previous"] == old_key and result["live"] != old_key

    # the warm server picks up the switch on its next query; vectors of two models never mix
    after = server.query_dicom(files[0], k=3)
    assert server.encoder.identity.key == result["live"] and not server.encoder.identity.random_weights
    assert [h.score for h in after.hits] != [h.score for h in before.hits]
    status = Workspace(cfg).status()
    roles = {m["key"]: (m["live"], m["kept_for_rollback"], m["vectors"]) for m in status["model_versions"]}
    assert roles == {old_key: (False, True, 10), result["live"]: (True, False, 10)}
    assert json.loads((cfg.index_dir / result["live"] / "manifest.json").read_text())["ntotal"] == 10

    # re-running adds nothing; rollback restores the old answers
    assert Workspace(cfg).reindex(str(ckpt))["embedded"] == 0
    assert Workspace(cfg).rollback()["live"] == old_key
    assert Workspace(cfg).query_dicom(files[0], k=3).hits == before.hits
    assert Workspace(cfg).rollback()["live"] == result["live"]  # and forward again


def test_rollback_without_history(tmp_path):
    synthetic_archive(tmp_path / "archive", 3)
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96}))
    ws.ingest(tmp_path / "archive", workers=0)
    with pytest.raises(NotFoundError, match="no earlier index version"):
        ws.rollback()


def test_rollback_embeds_the_images_ingested_since_and_reports_those_it_cannot(tmp_path):
    """They dropped out of search silently: a rollback now catches the old version up before it switches."""
    synthetic_archive(tmp_path / "archive", 6)
    made = synthetic_archive(tmp_path / "late", 10)
    late = made[6:]  # four more women's images (pictures unlike the first six)
    for path in made[:6]:
        path.unlink()
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96})
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    old_key = ws.encoder.identity.key
    new_key = Workspace(cfg).reindex(str(finetuned_weights(ws, tmp_path / "new.pt")))["live"]
    Workspace(cfg).ingest(tmp_path / "late", workers=0)  # with the new model only
    gone = str(pydicom.dcmread(late[3], stop_before_pixels=True).SOPInstanceUID)
    late[3].unlink()  # neither its file nor its cached picture is left to embed it with the old model
    Workspace(cfg).image_cache.discard(gone)
    result = Workspace(cfg).rollback()
    assert result["live"] == old_key and result["embedded"] == 3 and result["ntotal"] == 9
    assert [(f["sop_instance_uid"], f["path"]) for f in result["failed"]] == [(gone, str(late[3]))]
    assert result["random_weights"]  # this test's resnet18 has seeded random weights, and says so
    for path in late[:3]:
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert Workspace(cfg).similar(sop, k=2).hits  # it has a vector in the live version again
    status = Workspace(cfg).status()
    vectors = {m["key"]: m["vectors"] for m in status["model_versions"]}
    assert vectors[old_key] == 9 and vectors[new_key] == 10
    again = Workspace(cfg).rollback()  # forward again: the new version had them all
    assert again["live"] == new_key and again["embedded"] == 0 and again["failed"] == []


def test_reindex_after_a_first_ingest_killed_before_it_recorded_its_model_can_roll_back(tmp_path):
    """kill -9 at the end of a first ingest left no live record; reindex then kept nothing to roll back to."""
    synthetic_archive(tmp_path / "archive", 4)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96})
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    old_key = ws.encoder.identity.key
    (cfg.index_dir / "live.json").unlink()  # the state such a kill leaves (before the first index save, too)
    (cfg.index_dir / old_key / "manifest.json").unlink()
    result = Workspace(cfg).reindex(str(finetuned_weights(ws, tmp_path / "new.pt")))
    assert result["previous"] == old_key
    assert Workspace(cfg).rollback()["live"] == old_key


def test_reindex_rebuilds_a_lost_cache_entry_and_reports_a_vanished_file(tmp_path):
    files = synthetic_archive(tmp_path / "archive", 4)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96})
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    from mammo_retrieval.dicom.reader import read_header
    first, second = (read_header(f, cfg.reader).sop_instance_uid for f in files[:2])
    ws.image_cache.discard(first)   # lost from the cache: rebuilt from the DICOM
    ws.image_cache.discard(second)  # lost from the cache and the file is gone: reported
    files[1].unlink()
    result = Workspace(cfg).reindex(str(finetuned_weights(ws, tmp_path / "w.pt")), allow_missing=True)
    assert result["embedded"] == 3 and [f["sop_instance_uid"] for f in result["failed"]] == [second]
    assert result["failed"][0]["path"].endswith(files[1].name)
    assert "not found" in result["failed"][0]["reason"] or "No such file" in result["failed"][0]["reason"]


def cli_reindex(cfg, config_file, *args):
    from click.testing import CliRunner

    from mammo_retrieval.app.cli import cli
    env = {"MRETRIEVE_HOME": str(cfg.index_dir.parent), "MRETRIEVE_CONFIG": str(config_file)}
    return CliRunner(env=env).invoke(cli, ["reindex", "--no-progress", *map(str, args)])


def test_reindex_refuses_to_switch_while_images_fail_unless_allow_missing(tmp_path):
    import yaml

    from mammo_retrieval.dicom.reader import read_header
    from mammo_retrieval.core.errors import ReindexIncompleteError
    files = synthetic_archive(tmp_path / "archive", 6)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"encoder": {"name": "resnet18", "input_size": 96}}))
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    old_key = ws.encoder.identity.key
    lost = {read_header(f, cfg.reader).sop_instance_uid: f for f in files[1:3]}
    for sop, f in lost.items():
        ws.image_cache.discard(sop)
        f.unlink()
    ckpt = finetuned_weights(ws, tmp_path / "w.pt")

    with pytest.raises(ReindexIncompleteError) as caught:
        Workspace(cfg).reindex(str(ckpt))
    assert {f["sop_instance_uid"] for f in caught.value.failures} == set(lost)
    assert read_live(cfg.index_dir)[0].key == old_key

    result = cli_reindex(cfg, config_file, "--model", ckpt)
    assert result.exit_code == ReindexIncompleteError.exit_code == 10, result.output
    assert "did not switch" in result.output and f"{old_key} stays live" in result.output
    for sop, f in lost.items():  # each failure: SOPInstanceUID, path and reason
        assert any(sop in line and str(f.resolve()) in line and "no such file" in line.lower()
                   for line in result.output.splitlines()), result.output
    assert read_live(cfg.index_dir)[0].key == old_key
    assert Workspace(cfg).query_dicom(files[0], k=3).hits  # the old index still serves

    result = cli_reindex(cfg, config_file, "--model", ckpt, "--allow-missing")
    assert result.exit_code == 0, result.output
    live = read_live(cfg.index_dir)[0]
    assert live.key != old_key and f"live: {live.key} (previous {old_key}" in result.output
    # the four vectors of the refused runs were kept: nothing is embedded twice
    assert "embedded 0, already embedded 4, failed 2" in result.output
    assert all(sop in result.output for sop in lost) and "index flat with 4 vectors" in result.output.lower()


def test_reindex_prints_a_summary_or_json(tmp_path):
    import yaml
    synthetic_archive(tmp_path / "archive", 3)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"encoder": {"name": "resnet18", "input_size": 96}}))
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    ckpt = finetuned_weights(ws, tmp_path / "w.pt")
    text = cli_reindex(cfg, config_file, "--model", ckpt)
    assert text.exit_code == 0 and not text.output.lstrip().startswith("{"), text.output
    assert "embedded 3, already embedded 0, failed 0" in text.output
    as_json = cli_reindex(cfg, config_file, "--model", ckpt, "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["already_embedded"] == 3
    back = cli_reindex(cfg, config_file, "--rollback")
    assert back.exit_code == 0 and back.output.startswith(f"live: {ws.encoder.identity.key}"), back.output


def test_live_model_uses_a_stored_copy_of_its_weights(tmp_path):
    from mammo_retrieval.core.fileio import sha256_file
    from mammo_retrieval.core.errors import WeightsError
    files = synthetic_archive(tmp_path / "archive", 6)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96})
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    old_key = ws.encoder.identity.key
    ckpt = finetuned_weights(ws, tmp_path / "ckpt.pt")
    sha = sha256_file(ckpt)
    result = Workspace(cfg).reindex(str(ckpt))
    live = read_live(cfg.index_dir)[0]
    stored = cfg.index_dir / "weights" / f"{sha}.pt"
    assert live.weights == str(stored) and live.weights_sha256 == sha and stored.is_file()
    by_dicom = Workspace(cfg).query_dicom(files[0], k=3).hits
    by_accession = [r.hits for r in Workspace(cfg).query_accession("ACC0001", k=3)]
    assert by_dicom and len(by_accession) == 2 and all(by_accession)

    ckpt.unlink()  # the original is deleted ...
    assert Workspace(cfg).query_dicom(files[0], k=3).hits == by_dicom
    assert [r.hits for r in Workspace(cfg).query_accession("ACC0001", k=3)] == by_accession
    torch.save({"junk": torch.zeros(3)}, ckpt)  # ... then overwritten with something else
    assert Workspace(cfg).query_dicom(files[0], k=3).hits == by_dicom
    assert [r.hits for r in Workspace(cfg).query_accession("ACC0001", k=3)] == by_accession

    assert Workspace(cfg).rollback()["live"] == old_key
    assert Workspace(cfg).rollback()["live"] == result["live"]
    assert Workspace(cfg).query_dicom(files[0], k=3).hits == by_dicom

    # a second reindex with the same weights reuses the stored copy (and its hash is what is recorded)
    assert Workspace(cfg).reindex(str(stored))["weights"] == str(stored)

    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))  # tampered: refused, naming the file and both hashes
    with pytest.raises(WeightsError, match=f"{stored}.*{sha}") as caught:
        Workspace(cfg).query_accession("ACC0001", k=3)
    assert sha256_file(stored) in str(caught.value)
    from mammo_retrieval.app.cli._common import render_error
    assert "run `mretrieve reindex --model CKPT`" in render_error(caught.value)  # a plain reindex keeps the model
    Workspace(cfg).rollback()  # the old (random-weights) version has nothing stored to check
    with pytest.raises(WeightsError, match="modified"):
        Workspace(cfg).rollback()  # rolling forward onto the tampered copy is refused
    assert read_live(cfg.index_dir)[0].key == old_key


def test_rollback_target_from_a_user_file_is_stored_when_replaced(tmp_path):
    """A version whose weights were the user's file (ingest with encoder.weights) keeps working after
    that file is deleted: the reindex that replaces it stores a copy for rollback."""
    files = synthetic_archive(tmp_path / "archive", 4)
    seed = Workspace(make_config(tmp_path / "seed", encoder={"name": "resnet18", "input_size": 96}))
    first = finetuned_weights(seed, tmp_path / "first.pt")
    pinned = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96, "weights": str(first)})
    ws = Workspace(pinned)
    ws.ingest(tmp_path / "archive", workers=0)
    first_key, before = ws.encoder.identity.key, ws.query_dicom(files[0], k=3).hits
    second = tmp_path / "second.pt"
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in torch_model(ws.encoder).state_dict().items()},
               second)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 96})
    assert Workspace(cfg).reindex(str(second))["previous"] == first_key
    first.unlink()
    assert Workspace(cfg).rollback()["live"] == first_key
    assert Workspace(cfg).query_dicom(files[0], k=3).hits == before


def test_a_v2_home_moves_to_the_built_in_v3_and_back(tmp_path, cbis_files):
    """An archive ingested with the built-in v2 keeps serving it after the default became v3 (its live
    entry names v2); `reindex --encoder mammo-simclr-v3` moves it, and --rollback returns to v2."""
    from click.testing import CliRunner

    from mammo_retrieval.app.cli import cli
    from mammo_retrieval.core.errors import ConfigError
    home = tmp_path / "state"
    v2 = Workspace(make_config(home, encoder={"name": "mammo-simclr-v2"}))
    v2.ingest(cbis_files[0].parents[1], workers=0)
    v2_key = v2.encoder.identity.key
    ws = Workspace(make_config(home))  # today's defaults: v3 configured, v2 live
    assert ws.search.info().model_key == v2_key and ws.encoder.identity.encoder == "mammo-simclr-v2"
    with pytest.raises(ConfigError, match="unknown encoder 'mammo-simclr-v9'"):
        ws.reindex(encoder_name="mammo-simclr-v9")
    with pytest.raises(ConfigError, match="ships no weights: reindex --encoder resnet50 needs --model"):
        ws.reindex(encoder_name="resnet50")  # never a whole archive silently re-embedded with random weights
    env = {"MRETRIEVE_HOME": str(home)}
    moved = CliRunner().invoke(cli, ["reindex", "--encoder", "mammo-simclr-v3", "--format", "json", "--no-progress"],
                               env=env)
    assert moved.exit_code == 0, moved.output
    result = json.loads(moved.stdout)
    assert result["previous"] == v2_key and result["live"].startswith("mammo-simclr-v3-") and result["embedded"] == 8
    assert result["weights_sha256"] and not result["random_weights"]
    served = Workspace(make_config(home))
    assert served.encoder.identity.encoder == "mammo-simclr-v3" and served.encoder.dim == 704
    assert len(served.query_dicom(cbis_files[0], k=3).hits) == 3
    back = CliRunner().invoke(cli, ["reindex", "--rollback"], env=env)
    assert back.exit_code == 0 and f"live: {v2_key} (encoder mammo-simclr-v2, weights " in back.output
    assert Workspace(make_config(home)).search.info().model_key == v2_key


def test_reindex_with_a_file_that_is_no_checkpoint_names_it_and_leaves_nothing_behind(tmp_path):
    """``reindex --model labels.csv``: the error names the user's file (not its copy in the index folder)
    and what it is, without torch's advice to load it with weights_only=False; the refused copy is removed,
    a stored copy the live model uses is kept, and the live model stays."""
    from mammo_retrieval.core.errors import WeightsError
    synthetic_archive(tmp_path / "archive", 4)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 64})
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    live = read_live(cfg.index_dir)[0]
    labels = tmp_path / "labels.csv"
    labels.write_text("SOPInstanceUID,tissue\n1.2.3,F\n")
    with pytest.raises(WeightsError) as caught:
        Workspace(cfg).reindex(str(labels))
    message = str(caught.value)
    assert str(labels) in message and "not a checkpoint" in message and "b'SOPInstanceUID,t'" in message
    assert "weights_only set to False" not in message and str(cfg.index_dir) not in message
    assert not list((cfg.index_dir / "weights").glob("*.csv"))
    pickled = tmp_path / "objects.pt"
    torch.save({"state": torch.nn.Linear(2, 2)}, pickled)  # a pickle of a module, not of tensors
    with pytest.raises(WeightsError, match="objects other than tensors") as caught:
        Workspace(cfg).reindex(str(pickled))
    assert "Please file an issue" not in str(caught.value)
    assert read_live(cfg.index_dir)[0] == live
    good = finetuned_weights(ws, tmp_path / "good.pt")
    Workspace(cfg).reindex(str(good))
    stored = read_live(cfg.index_dir)[0].weights
    # the same weights refused for another architecture: their stored copy serves the live model, so it stays
    with pytest.raises(WeightsError):
        Workspace(cfg).reindex(str(good), encoder_name="resnet50")
    assert Path(stored).is_file() and read_live(cfg.index_dir)[0].weights == stored


def test_a_typo_in_the_configured_encoder_is_refused_even_where_the_live_model_serves(tmp_path):
    """In a home with a live model the configured encoder.name does not choose the model, but an unknown
    name is a mistake to say (it was silently ignored); another valid name is accepted as before."""
    import dataclasses
    from mammo_retrieval.core.errors import ConfigError
    files = synthetic_archive(tmp_path / "archive", 4)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 64})
    Workspace(cfg).ingest(tmp_path / "archive", workers=0)
    typo = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, name="resnet-18"))
    with pytest.raises(ConfigError, match="encoder.name in the config: unknown encoder 'resnet-18'") as caught:
        Workspace(typo).query_dicom(files[0], k=2)
    assert "resnet18" in caught.value.hint
    other = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, name="mammo-simclr-v2"))
    assert Workspace(other).query_dicom(files[0], k=2).hits


def test_a_rerun_of_a_rollback_killed_after_its_switch_does_not_switch_back(tmp_path, monkeypatch):
    """`reindex --rollback` killed between its switch and its report (the state a kill there leaves: the
    switch made and not reported) then rerun, as a user who saw no result would: the rerun finds it done
    and says so; a rollback after a reported one still switches back."""
    import yaml
    from click.testing import CliRunner

    from mammo_retrieval.app.cli import cli
    synthetic_archive(tmp_path / "archive", 4)
    encoder = {"name": "resnet18", "input_size": 96}
    cfg = make_config(tmp_path / "state", encoder=encoder)
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    old_key = ws.encoder.identity.key
    new_key = Workspace(cfg).reindex(str(finetuned_weights(ws, tmp_path / "new.pt")))["live"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"encoder": encoder}))
    env = {"MRETRIEVE_HOME": str(tmp_path / "state"), "MRETRIEVE_CONFIG": str(config)}

    def rollback(*args):
        result = CliRunner(env=env).invoke(cli, ["reindex", "--rollback", "--no-progress", *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    Workspace(cfg).rollback(reported=False)  # killed here: switched, nothing said
    assert read_live(cfg.index_dir)[0].key == old_key
    marked = json.loads((cfg.index_dir / "live.json").read_text())["live"]
    assert marked["rolled_back_from"] == new_key and marked["reported"] is False
    again = Workspace(cfg).rollback(reported=False)  # a rerun killed before its report: still marked
    assert again["unchanged"] and again["live"] == old_key and not read_live(cfg.index_dir)[0].reported
    out = rollback()
    assert f"live: {old_key}" in out and f"unchanged: a rollback from {new_key} had already switched" in out
    assert read_live(cfg.index_dir)[0].key == old_key
    assert "reported" not in json.loads((cfg.index_dir / "live.json").read_text())["live"]  # as older versions
    out = json.loads(rollback("--format", "json"))  # reported now: a rollback is a new one
    assert out["live"] == new_key and out["unchanged"] is False and out["rolled_back_from"] == old_key
    live, previous = read_live(cfg.index_dir)
    assert live.key == new_key and live.reported and [m.key for m in previous] == [old_key]
    assert all(m.rolled_back_from is None for m in previous)
