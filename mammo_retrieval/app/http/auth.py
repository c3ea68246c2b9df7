"""Bearer-token access. Loopback binds may run without a token; any other bind must have one (server.py).

A browser cannot add an Authorization header to a page load or an <img>, so opening any page once with
``?token=...`` stores the token in an HttpOnly, SameSite=Strict cookie and redirects to the same URL
without it (as Jupyter does). API clients send ``Authorization: Bearer <token>``."""
from __future__ import annotations

import secrets

COOKIE = "mretrieve_token"
OPEN_PATHS = ("/healthz",)


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def token_matches(expected: str, given: str | None) -> bool:
    return given is not None and secrets.compare_digest(expected.encode(), given.encode())
