"""Only the CLI configures logging; -v shows our INFO records, --log-format json makes them parseable."""
import json
import logging

from click.testing import CliRunner

from mammo_retrieval.cli import cli
from mammo_retrieval.cli.logs import JsonFormatter, configure_logging


def test_library_never_configures_logging():
    import mammo_retrieval.api  # noqa: F401  (importing the library adds no handler)
    assert not logging.getLogger("mammo_retrieval").handlers


def test_verbosity_levels_and_json_lines(capsys):
    configure_logging(0)
    assert logging.getLogger("mammo_retrieval").getEffectiveLevel() == logging.WARNING
    configure_logging(2)
    assert logging.getLogger("mammo_retrieval").getEffectiveLevel() == logging.DEBUG
    configure_logging(1, "json")
    logging.getLogger("mammo_retrieval.test").info("indexed %d images", 3)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    entry = json.loads(line)
    assert entry["message"] == "indexed 3 images" and entry["level"] == "info"
    assert entry["logger"] == "mammo_retrieval.test"
    logging.getLogger().handlers.clear()


def test_cli_accepts_the_options(tmp_path):
    result = CliRunner().invoke(cli, ["-v", "--log-format", "json", "config", "show"],
                                env={"MRETRIEVE_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)
    logging.getLogger().handlers.clear()
