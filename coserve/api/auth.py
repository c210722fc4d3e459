"""Bearer-key auth for /v1 routes and the dashboard's data (on when the server has an API key)."""
from __future__ import annotations

import secrets

from fastapi import Request

from coserve.api.errors import APIError


def require_api_key(request: Request) -> None:
    expected = request.app.state.coserve.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
