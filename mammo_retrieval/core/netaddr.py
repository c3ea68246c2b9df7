"""Network addresses: the one rule for what counts as loopback (the HTTP server and the DICOM listener)."""
from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; a server bound elsewhere needs a token (HTTP) or an
    allow-list of calling AE titles (DICOM)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
