"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure a request can cause ends here, so no request crashes the server
and every client (the `openai` package included) gets an error it understands:
APIError (raised by routes), body validation (malformed JSON, wrong types:
400 naming the field), unknown routes and methods, and anything unexpected (500).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """Raise from a route to answer with an OpenAI error object (status, message, param, code)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def model_not_found(model: str, available: list[str] | None = None) -> APIError:
    listed = f"; available: {', '.join(available)}" if available else ""
    return APIError(404, f"The model {model!r} does not exist{listed}", param="model", code="model_not_found")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _validation_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def _validation_response(errors) -> JSONResponse:
    """400 for a body FastAPI could not parse or validate, naming the first bad field."""
    for err in errors:
        if err.get("type") == "json_invalid":
            # NOTE: FastAPI reports malformed JSON as a validation error at ("body", offset).
            ctx = err.get("ctx") or {}
            detail = ctx.get("error") or err.get("msg")
            return error_response(400, f"malformed JSON body: {detail}", code="invalid_json")
    problems, param = [], None
    for err in errors:
        # loc is ("body", field, index/subfield...); union members add their type names, drop those.
        parts = [str(p) for p in err.get("loc", ()) if p != "body"]
        parts = [p for p in parts if not _is_type_tag(p)]
        location = ".".join(parts)
        param = param or location or None
        if err.get("type") == "missing":
            problems.append(f"{location or 'body'}: required field missing")
        else:
            problems.append(f"{location or 'body'}: {err.get('msg')}")
    # Union types yield one error per member for the same field; show each message once.
    unique = list(dict.fromkeys(problems))
    return error_response(400, "invalid request: " + "; ".join(unique[:5]), param=param)


def _is_type_tag(part: str) -> bool:
    # pydantic names union members in loc, e.g. "str", "list[int]", "function-after[...]".
    return part in ("str", "int", "float", "bool", "dict", "list") or "[" in part
