from pathlib import Path

import pytest
import yaml

from mammo_retrieval.core.config import default_config_text, load_config
from mammo_retrieval.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_packaged_defaults_are_the_repository_file():
    assert default_config_text() == (REPO / "configs" / "default.yaml").read_text()


def test_home_and_env_overrides(tmp_path):
    cfg = load_config(env={"MRETRIEVE_HOME": str(tmp_path), "MRETRIEVE_WEIGHTS": "/w.pt"})
    assert cfg.database_url == f"sqlite:///{tmp_path}/mretrieve.db"
    assert cfg.index_dir == tmp_path / "indexes"
    assert cfg.encoder.weights == "/w.pt"
    assert cfg.preprocess.percentiles == (2.0, 98.0)


def test_user_file_overrides_a_subset(tmp_path):
    user = tmp_path / "c.yaml"
    user.write_text(yaml.safe_dump({"index": {"nprobe": 32}, "encoder": {"name": "densenet121"}}))
    cfg = load_config(user, env={"MRETRIEVE_HOME": str(tmp_path)})
    assert (cfg.index.nprobe, cfg.encoder.name, cfg.index.type) == (32, "densenet121", "ivf_flat")


@pytest.mark.parametrize("content, message", [
    ({"indx": {}}, "unknown section 'indx'"),
    ({"index": {"nprob": 3}}, "unknown key 'index.nprob'"),
    ({"index": {"type": "hnsw"}}, "index.type: 'hnsw' is not one of"),
])
def test_bad_config_names_the_problem(tmp_path, content, message):
    user = tmp_path / "c.yaml"
    user.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=message):
        load_config(user, env={})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", env={})
