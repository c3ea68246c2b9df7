"""Only the CLI configures logging; -v shows our INFO records, --log-format json makes them parseable."""
import json
import logging

from click.testing import CliRunner

from mammo_retrieval.app.cli import cli
from mammo_retrieval.app.cli.logs import JsonFormatter, configure_logging


def test_library_never_configures_logging():
    """Importing every module of the package (the CLI aside) adds no handler anywhere."""
    import subprocess
    import sys
    code = ("import importlib, logging, pkgutil, mammo_retrieval\n"
            "for m in pkgutil.walk_packages(mammo_retrieval.__path__, 'mammo_retrieval.'):\n"
            "    if '.cli' not in m.name:\n"
            "        importlib.import_module(m.name)\n"
            "print(len(logging.getLogger().handlers), len(logging.getLogger('mammo_retrieval').handlers))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["0", "0"], done.stderr[-2000:]


def test_verbosity_levels_and_json_lines(capsys):
    configure_logging(0)
    assert logging.getLogger("mammo_retrieval").getEffectiveLevel() == logging.WARNING
    configure_logging(2)
    assert logging.getLogger("mammo_retrieval").getEffectiveLevel() == logging.DEBUG
    configure_logging(1, "json")
    logging.getLogger("mammo_retrieval.test").info("indexed %d images", 3)
    logging.getLogger("pydicom").error("a decoder failure the reader turns into a rejection")
    lines = capsys.readouterr().err.strip().splitlines()
    entry = json.loads(lines[-1])
    assert entry["message"] == "indexed 3 images" and entry["level"] == "info"
    assert entry["logger"] == "mammo_retrieval.test"
    assert not any("decoder failure" in line for line in lines)  # third-party loggers stay quiet
    logging.getLogger("mammo_retrieval").handlers.clear()


def test_cli_accepts_the_options(tmp_path):
    result = CliRunner().invoke(cli, ["-v", "--log-format", "json", "config", "show"],
                                env={"MRETRIEVE_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)
    logging.getLogger("mammo_retrieval").handlers.clear()


def test_warnings_and_the_http_servers_errors_are_json_lines(capsys):
    """`--log-format json` holds for Python warnings and uvicorn's "Exception in ASGI application" too."""
    import warnings
    try:
        configure_logging(0, "json")
        warnings.warn("a library's own warning")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        logging.getLogger("uvicorn.error").info("Started server process")  # below WARNING: not shown
        lines = capsys.readouterr().err.strip().splitlines()
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        assert [e["logger"] for e in entries] == ["py.warnings", "uvicorn.error"]
        assert "a library's own warning" in entries[0]["message"]
        assert "RuntimeError: boom" in entries[1]["exception"]
    finally:
        logging.captureWarnings(False)
        for name in ("mammo_retrieval", "py.warnings", "uvicorn"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
