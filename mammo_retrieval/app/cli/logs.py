"""Logging set-up: only the command line configures logging; the library just logs to its own loggers
(``logging.getLogger(__name__)``) and never names a patient."""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

LEVELS = {0: logging.WARNING, 1: logging.INFO}  # -v: INFO, -vv and more: DEBUG
OTHER_LOGGERS = ("py.warnings", "uvicorn")  # Python warnings (logging.captureWarnings) and the HTTP server


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(verbosity: int, fmt: str = "text") -> None:
    """Our loggers to stderr at WARNING (INFO with -v, DEBUG with -vv). Only the package's own logger gets
    the handler: third-party libraries (pydicom logs every decoder failure it then raises) stay quiet,
    since each failure already reaches the user once, as a rejection with its reason. Python warnings and
    the server's own errors (uvicorn's loggers) go through the same handler at WARNING, so that
    ``--log-format json`` stays one object a line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("mammo_retrieval")
    ours.handlers[:] = [handler]
    ours.propagate = False
    ours.setLevel(LEVELS.get(verbosity, logging.DEBUG))
    logging.captureWarnings(True)
    for name in OTHER_LOGGERS:
        other = logging.getLogger(name)
        other.handlers[:] = [handler]
        other.propagate = False
        other.setLevel(logging.WARNING)
