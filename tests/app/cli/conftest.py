"""The CLI run in-process against a fresh home, with no $MRETRIEVE_* setting of the caller leaking in."""
import pytest
from click.testing import CliRunner

from mammo_retrieval.app.cli import cli


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("MRETRIEVE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("MRETRIEVE_CONFIG", raising=False)
    for var in ("MRETRIEVE_DATABASE_URL", "MRETRIEVE_INDEX_DIR", "MRETRIEVE_CACHE_DIR", "MRETRIEVE_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()

    def invoke(*args, code=0):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result
    return invoke
