"""encoder.runtime: onnx: the same model version as torch, exported once, agreeing per image on real
mammograms, and serving an ingest and a query."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mammo_retrieval.app.workspace import Workspace
from tests.conftest import MIAS_DIR, make_config

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def _real_files(cbis_files):
    mias = sorted(MIAS_DIR.glob("P00[0-1]?/*.dcm"))[:12] if MIAS_DIR.exists() else []
    return mias + list(cbis_files[:4])


def test_onnx_agrees_with_torch_per_image_and_is_exported_once(tmp_path, cbis_files):
    files = _real_files(cbis_files)
    from mammo_retrieval.encoders.model import TorchEncoder
    torch_ws = Workspace(make_config(tmp_path / "state", encoder={"runtime": "torch", "device": "cpu"}))
    onnx_ws = Workspace(make_config(tmp_path / "state", encoder={"runtime": "onnx"}))
    assert isinstance(torch_ws.encoder, TorchEncoder)
    assert onnx_ws.encoder.identity == torch_ws.encoder.identity  # one model version, one index
    pictures = np.stack([torch_ws.prepare(f, torch_ws.encoder.settings).display for f in files])
    from mammo_retrieval.encoders.pooling import embed_pictures
    a, b = embed_pictures(torch_ws.encoder, list(pictures)), embed_pictures(onnx_ws.encoder, list(pictures))
    cosines = np.sum(a * b, axis=1)
    assert cosines.min() >= 0.999, cosines
    exported = list((tmp_path / "state" / "indexes" / "onnx").glob("*.onnx"))
    assert len(exported) == 1
    stamp = exported[0].stat().st_mtime_ns
    assert Workspace(onnx_ws.config).encoder.model_path == exported[0]
    assert exported[0].stat().st_mtime_ns == stamp, "a cached export is reused"
    exported[0].write_bytes(b"corrupt")  # a damaged cache file is exported again, not trusted
    again = Workspace(onnx_ws.config).encoder
    assert np.allclose(embed_pictures(again, list(pictures[:2])), b[:2], atol=1e-6)


def test_onnx_runtime_ingests_and_queries(tmp_path, cbis_files):
    ws = Workspace(make_config(tmp_path / "state", encoder={"runtime": "onnx", "batch_size": 4}))
    report = ws.ingest(cbis_files[0].parent.parent, workers=1)
    assert report.ingested == len(cbis_files)
    hits = ws.query_dicom(cbis_files[0], 3).hits
    torch_hits = Workspace(make_config(tmp_path / "state", encoder={"runtime": "torch"})).query_dicom(
        cbis_files[0], 3).hits
    assert [h.sop_instance_uid for h in hits] == [h.sop_instance_uid for h in torch_hits]


def test_auto_runs_the_measured_architectures_with_onnxruntime_and_the_rest_with_torch(tmp_path):
    from mammo_retrieval.encoders.model import TorchEncoder
    from mammo_retrieval.encoders.onnx_runtime import OnnxEncoder
    default = make_config(tmp_path / "state")
    assert default.encoder.runtime == "auto"  # the shipped default
    encoder = Workspace(default.replace("encoder", device="cpu")).encoder  # (auto keeps a GPU on torch)
    assert isinstance(encoder, OnnxEncoder) and encoder.identity == encoder.source.identity
    record = json.loads(encoder.model_path.with_suffix(".json").read_text())
    assert record["check_min_cosine"] >= 0.999  # checked against torch before it was kept
    for torch_only in ({"name": "timm:vit_tiny_patch16_224"}, {"precision": "bf16"}, {"channels_last": True},
                       {"runtime": "torch"}):
        chosen = Workspace(make_config(tmp_path / "other", encoder=torch_only)).encoder
        assert isinstance(chosen, TorchEncoder), torch_only


def test_auto_falls_back_to_torch_when_the_export_disagrees_and_onnx_refuses(tmp_path, monkeypatch):
    import logging

    from mammo_retrieval.encoders import onnx_runtime
    from mammo_retrieval.encoders.model import TorchEncoder
    monkeypatch.setattr(onnx_runtime, "AGREEMENT", 1.5)  # no export can reach it
    monkeypatch.setattr(onnx_runtime, "_memo", onnx_runtime._ExportMemo())  # what it learns stays here
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger(onnx_runtime.__name__).addHandler(handler)
    try:
        encoder = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "device": "cpu"})).encoder
    finally:
        logging.getLogger(onnx_runtime.__name__).removeHandler(handler)
    assert isinstance(encoder, TorchEncoder)
    assert any("disagrees with torch" in w and "running it with torch" in w for w in warnings), warnings
    assert not list((tmp_path / "state" / "indexes" / "onnx").glob("*.onnx")), "nothing unchecked is kept"
    with pytest.raises(onnx_runtime.OnnxUnavailable, match=r"resnet18-[0-9a-f]+-[0-9a-f]+: the ONNX export disagrees with torch"):
        Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "runtime": "onnx"})).encoder


def test_a_model_the_exporter_cannot_trace_is_a_clear_error_under_onnx(tmp_path):
    import torch

    from mammo_retrieval.encoders.onnx_runtime import OnnxUnavailable
    from mammo_retrieval.encoders.registry import EncoderRegistry, EncoderSpec

    class DataDependent(torch.nn.Module):  # Python control flow on a tensor's value: not exportable
        def forward(self, x):
            pooled = x.mean(dim=(2, 3))
            return pooled if float(pooled.sum()) > 0 else -pooled  # a traced branch would disagree

    registry = EncoderRegistry([EncoderSpec("branchy", "branchy", 3, input_size=(32, 32), family="branchy")],
                               families={"branchy": lambda spec: DataDependent()})
    cfg = make_config(tmp_path / "state", encoder={"name": "branchy", "runtime": "onnx"})
    with pytest.raises(OnnxUnavailable, match=r"branchy.*(export to ONNX failed|disagrees with torch)"):
        Workspace(cfg, registry=registry).encoder


def test_an_export_failure_says_where_it_was_raised():
    from mammo_retrieval.encoders.onnx_runtime import _raised_at

    def deep():
        return open(3.5)  # TypeError, raised inside the call
    try:
        deep()
    except TypeError as exc:
        where = _raised_at(exc)
    assert where == f"at test_onnx.py:{deep.__code__.co_firstlineno + 1}"


def test_train_finetunes_the_torch_model_behind_an_onnx_encoder(tmp_path):
    import torch

    from mammo_retrieval.train.trainer import own_backbone
    encoder = Workspace(make_config(tmp_path / "state", encoder={"runtime": "onnx"})).encoder
    assert encoder._source is None  # a server does not hold the torch weights beside the export
    backbone = own_backbone(encoder)  # built again for `train`
    served = Workspace(make_config(tmp_path / "state", encoder={"runtime": "torch"})).encoder.model.state_dict()
    assert backbone.state_dict().keys() == served.keys()
    assert all(torch.equal(value, served[key]) for key, value in backbone.state_dict().items())


def test_the_torch_model_is_refused_when_its_weights_file_changed_after_the_export(tmp_path):
    from safetensors.torch import load_file, save_file

    from mammo_retrieval.core.errors import WeightsError
    from mammo_retrieval.encoders.model import packaged_weights
    from mammo_retrieval.encoders.registry import BUILTIN, DEFAULT_REGISTRY
    weights = tmp_path / "mine.safetensors"
    weights.write_bytes(packaged_weights(DEFAULT_REGISTRY.get(BUILTIN).weights_file).read_bytes())
    encoder = Workspace(make_config(tmp_path / "state", encoder={"runtime": "onnx", "weights": str(weights)})).encoder
    tensors = load_file(str(weights))
    tensors["histogram_weight"] = tensors["histogram_weight"] * 2  # someone overwrites the file in place
    save_file(tensors, str(weights))
    with pytest.raises(WeightsError, match="weights file changed since it was loaded"):
        encoder.source


def test_an_ingest_tunes_the_threads_of_an_onnx_base_behind_an_adapter(tmp_path):
    from mammo_retrieval.encoders.adapter import AdaptedEncoder, AdapterInfo, Projection
    from mammo_retrieval.pipeline.threads import EncoderThreads
    base = Workspace(make_config(tmp_path / "state", encoder={"runtime": "onnx"})).encoder
    info = AdapterInfo("linear", base.dim, 8, 0, base.identity.key, base.identity.encoder, None, "", None, ("tissue",))
    path = tmp_path / "adapter.bin"
    path.write_bytes(b"an adapter's bytes: hashed for its identity")
    adapted = AdaptedEncoder(base, Projection("linear", base.dim, 8), info, path)
    assert adapted.runtime == "onnx" and adapted.threads == 0  # 0: onnxruntime's default
    with EncoderThreads(adapted, "auto", workers=1, cores=2):
        assert base.threads == 1  # the workers get the other core
    assert base.threads == 0  # restored
    torch_base = Workspace(make_config(tmp_path / "state", encoder={"runtime": "torch"})).encoder
    assert not hasattr(AdaptedEncoder(torch_base, Projection("linear", base.dim, 8), info, path), "threads")


@pytest.mark.parametrize("damage", ["no check (written before exports were checked)", "another opset",
                                    "a failed check", "checked on older inputs (noise alone)",
                                    "not a JSON object"])
def test_a_cached_export_whose_record_does_not_vouch_for_it_is_replaced(tmp_path, damage):
    tiny = {"name": "resnet18", "input_size": 64, "device": "cpu"}  # the record's checks, not the model, matter
    encoder = Workspace(make_config(tmp_path / "state", encoder={**tiny, "runtime": "onnx"})).encoder
    record_path = encoder.model_path.with_suffix(".json")
    record = json.loads(record_path.read_text())
    if damage.startswith("no check"):
        del record["check_min_cosine"]
    elif damage == "another opset":
        record["opset"] = 17
    elif damage == "a failed check":
        record["check_min_cosine"] = 0.5
    elif damage.startswith("checked on older inputs"):
        del record["check_inputs"]
    else:
        record = [record]
    record_path.write_text(json.dumps(record))
    again = Workspace(make_config(tmp_path / "state", encoder={**tiny, "runtime": "auto"})).encoder
    assert again.runtime == "onnx"
    rewritten = json.loads(record_path.read_text())
    assert rewritten["check_min_cosine"] >= 0.999 and rewritten["opset"] == 18 and rewritten["check_inputs"] == 2


def test_an_export_that_cannot_be_written_runs_torch_and_is_tried_again_once_it_can(tmp_path):
    onnx_dir = tmp_path / "state" / "indexes" / "onnx"
    onnx_dir.parent.mkdir(parents=True)
    onnx_dir.write_text("a file where the export folder should be")
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 64, "device": "cpu"})
    assert Workspace(cfg).encoder.runtime == "torch"  # auto: a warning, and torch
    with pytest.raises(OSError):
        Workspace(cfg.replace("encoder", runtime="onnx")).encoder
    onnx_dir.unlink()
    assert Workspace(cfg).encoder.runtime == "onnx"  # nothing remembered the failure
