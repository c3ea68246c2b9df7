"""`config show`: the effective config as YAML, which layer set each value, and no password."""
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mammo_retrieval.app.cli import cli
from mammo_retrieval.core.config import ENV_OVERRIDES, default_config_file, load_config


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MRETRIEVE_HOME", str(tmp_path / "home"))
    for var in ["MRETRIEVE_CONFIG", *ENV_OVERRIDES]:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def show(*args):
    result = CliRunner().invoke(cli, [*map(str, args), "config", "show"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_defaults_only(env, tmp_path):
    out = show()
    shown = yaml.safe_load(out)
    cfg = load_config()
    assert shown["paths"]["index_dir"] == str(tmp_path / "home" / "indexes") == str(cfg.index_dir)
    assert shown["encoder"]["name"] == cfg.encoder.name and shown["index"]["nprobe"] == cfg.index.nprobe
    assert shown["preprocess"]["percentiles"] == list(cfg.preprocess.percentiles)
    assert "#   1. defaults" in out and "#   2." not in out and f"{tmp_path / 'home'} (env $MRETRIEVE_HOME)" in out
    assert "# file" not in out and "# env" not in out
    defaults = default_config_file()  # the file this install reads, named as it is (a checkout or a wheel)
    assert f"#   1. defaults ({defaults})" in out and Path(str(defaults)).is_file()


def test_each_value_names_its_layer_and_the_password_is_masked(env, tmp_path):
    file = tmp_path / "site.yaml"
    file.write_text("encoder:\n  batch_size: 3\nindex:\n  nprobe: 9\n")
    env.setenv("MRETRIEVE_DATABASE_URL", "postgresql+psycopg://alice:hunter2@db.example:5432/mammo")
    env.setenv("MRETRIEVE_CACHE_DIR", str(tmp_path / "elsewhere"))
    out = show("--config", file)
    assert "hunter2" not in out
    shown = yaml.safe_load(out)
    assert shown["paths"]["database_url"] == "postgresql+psycopg://alice:***@db.example:5432/mammo"
    assert (shown["encoder"]["batch_size"], shown["index"]["nprobe"]) == (3, 9)
    lines = out.splitlines()
    assert f"#   2. file {file}" in lines and "#   3. env $MRETRIEVE_DATABASE_URL" in lines
    assert f"  batch_size: 3  # file {file}" in lines and f"  nprobe: 9  # file {file}" in lines
    assert f"  cache_dir: {tmp_path / 'elsewhere'}  # env $MRETRIEVE_CACHE_DIR" in lines
    assert any(line.startswith("  database_url:") and line.endswith("# env $MRETRIEVE_DATABASE_URL")
               for line in lines)
    assert any(line.startswith("  name: ") and "#" not in line for line in lines)  # still the default


def test_an_env_var_wins_over_the_file(env, tmp_path):
    file = tmp_path / "site.yaml"
    file.write_text(f"paths:\n  index_dir: {tmp_path / 'from_file'}\n")
    env.setenv("MRETRIEVE_INDEX_DIR", str(tmp_path / "from_env"))
    lines = show("--config", file).splitlines()
    assert f"  index_dir: {tmp_path / 'from_env'}  # env $MRETRIEVE_INDEX_DIR" in lines


def test_config_show_writes_nothing(env, tmp_path):
    show()
    assert not (tmp_path / "home").exists()
