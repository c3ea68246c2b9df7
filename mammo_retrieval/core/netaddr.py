"""Network addresses, for the HTTP server and the DICOM listener alike: what counts as loopback, how an
address is shown, and the one error for a socket that cannot listen."""
from __future__ import annotations

import errno
import ipaddress
import socket

from mammo_retrieval.core.errors import ConfigError, MammoRetrievalError, PacsError

PORT_HINT = "choose another --port, or stop what holds it"
PRIVILEGED_PORT_HINT = "ports below 1024 need privileges: choose another --port (e.g. 11112 for DICOM, 8000 for HTTP)"
HOST_HINT = "--host must be a name or an address of this machine (default 127.0.0.1)"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; a server bound elsewhere needs a token (HTTP) or an
    allow-list of calling AE titles (DICOM)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def display_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets and every address ('') as ``*``."""
    shown = f"[{host}]" if ":" in host else (host or "*")
    return f"{shown}:{port}"


def cannot_listen(host: str, port: int, reason: OSError | str) -> MammoRetrievalError:
    """The error for a server that cannot listen on ``host:port``: a port in use is a PacsError (exit 12:
    uvicorn's own exit 3 means "rejected DICOM" to us), a privileged port or anything about the host a
    ConfigError (exit 2). Each names the option to change."""
    detail = reason if isinstance(reason, str) else (reason.strerror or str(reason))
    message = f"cannot listen on {display_address(host, port)}: {detail}"
    number = None if isinstance(reason, (str, socket.gaierror)) else reason.errno
    if number == errno.EADDRINUSE:
        return PacsError(message, hint=PORT_HINT)
    if number == errno.EACCES:
        return ConfigError(message, hint=PRIVILEGED_PORT_HINT)
    return ConfigError(message, hint=HOST_HINT)


BACKLOG = 2048  # uvicorn's


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to, as asyncio would open them (for uvicorn), but
    opened here, so that failures name what to change (``cannot_listen``). An address family the kernel
    lacks is skipped, as asyncio does; with port 0 every address gets the first one's port."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise cannot_listen(host, port, exc) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue
            if sockets and port == 0:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise cannot_listen(host, port, exc) from None
    if not sockets:
        raise cannot_listen(host, port, "no address family of it is available here")
    return sockets
