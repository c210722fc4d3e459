"""A size cap on request bodies that are not uploads, enforced while the body arrives.

FastAPI reads a whole body into memory before any route code runs, so a
client could otherwise make the server buffer gigabytes. Multipart bodies (the
files routes' uploads) get the upload limit plus room for the form's own
fields; the files routes still check the file itself.
"""
from __future__ import annotations

from starlette.exceptions import HTTPException

from coserve.api.errors import error_response


MULTIPART_OVERHEAD_BYTES = 1024 * 1024


class BodyLimit:
    """ASGI middleware: 413 for a body over the limit (declared or as it streams in)."""

    def __init__(self, app, max_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_json_bytes = max_bytes
        self.max_multipart_bytes = max_upload_bytes + MULTIPART_OVERHEAD_BYTES

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_multipart_bytes if _is_multipart(scope) else self.max_json_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(limit, scope, receive, send)
        num_received = 0

        async def counted_receive():
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > limit:
                    # NOTE: raised inside the body read, so FastAPI passes it on (it re-raises HTTPException)
                    # and the app's handler answers with the error object.
                    raise HTTPException(413, _message(limit))
            return message

        await self.app(scope, counted_receive, send)

    @staticmethod
    async def _too_large(limit: int, scope, receive, send):
        response = error_response(413, _message(limit), code="request_too_large")
        await response(scope, receive, send)


def _message(limit: int) -> str:
    return f"request body too large: the limit is {limit} bytes"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _is_multipart(scope) -> bool:
    return (_header(scope, b"content-type") or "").lower().startswith("multipart/")
