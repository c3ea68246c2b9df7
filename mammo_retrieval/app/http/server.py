"""Run the app under uvicorn: refuse an open bind without a token, print the URL as soon as the socket
listens (the model warms up behind /healthz), and log no request line (a URL may carry a token)."""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from mammo_retrieval.core.errors import ConfigError
from mammo_retrieval.core.netaddr import BACKLOG, bind, display_address, is_loopback

logger = logging.getLogger(__name__)

TOKEN_ENV = "MRETRIEVE_TOKEN"
MIN_TOKEN_LENGTH = 16


def resolve_token(token_file: str | os.PathLike | None, environ: dict | None = None) -> str | None:
    """The token from ``--token-file`` (first line), else ``$MRETRIEVE_TOKEN``, else None."""
    environ = os.environ if environ is None else environ
    if token_file is not None:
        path = Path(token_file)
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the token file ({exc})") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(f"{path}: the token file is empty")
    else:
        token = environ.get(TOKEN_ENV, "").strip() or None
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"the token is {len(token)} characters long; use at least {MIN_TOKEN_LENGTH}",
                          hint="e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt")
    return token


def check_bind(host: str, token: str | None) -> None:
    """Mammograms and their headers are patient data: only loopback may be served without a token."""
    if token is None and not is_loopback(host):
        where = host or "* (every address)"  # '' as `display_address` shows it
        raise ConfigError(f"refusing to serve on {where} without a token: any host that can reach it could read "
                          "patient data",
                          hint=f"pass --token-file FILE or set ${TOKEN_ENV}, or bind 127.0.0.1")


def display_url(host: str, port: int) -> str:
    return f"http://{display_address(host, port)}/"


def run(app, host: str, port: int, *, on_listening: Callable[[str], None]) -> None:
    """Serve until interrupted; ``on_listening(url)`` as soon as the socket accepts connections. A port
    or host that cannot be bound is refused (``bind``) before anything starts."""
    import uvicorn
    sockets = bind(host, port)
    bound = sockets[0].getsockname()[1]  # read now: a quick shutdown may close the socket before announce runs
    try:
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None,
                                              timeout_graceful_shutdown=5, backlog=BACKLOG))

        def announce() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.01)
            if server.started:
                on_listening(display_url(host, bound))
        threading.Thread(target=announce, name="announce", daemon=True).start()
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
