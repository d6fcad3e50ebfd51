"""A request header read straight from the ASGI scope: Starlette's Headers.get goes through Mapping.get, which
raises and catches a KeyError for every header the caller did not send (~2 us each on the request path)."""

from __future__ import annotations

from starlette.requests import Request


def header(request: Request, name: bytes) -> str | None:
    """The first value of a header (`name` lowercase, as ASGI servers give them), as Headers.get returns it."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
