"""Errors in OpenAI's shape, and the handlers that make every failure one of them.

Every error response is ``{"error": {"message", "type", "param", "code"}}`` with the status the
official client maps to its exception classes (400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 429 ``RateLimitError``, 500
``InternalServerError``). No response carries a Python traceback: an unexpected exception is
logged on the server and answered with a 500 that says only that something failed.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["OpenAIError", "error_body", "install_error_handlers", "validation_param"]

log = logging.getLogger("jaxlab.serving")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "internal_server_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``status`` and the body's ``message``, ``type``,
    ``param`` (the request field at fault, or None) and ``code``; ``headers`` are added to the
    response (``Retry-After`` on a 429)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_param(loc) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return exc.response()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return OpenAIError(
            400, f"the request body is not valid JSON: {first.get('msg')}"
        ).response()
    param = validation_param(first.get("loc", ()))
    if first.get("type") == "missing":
        message = f"missing required parameter {param!r}"
    else:
        got = first.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        message = f"invalid value for {param!r}: {first.get('msg')} (got {shown})"
    return OpenAIError(400, message, param=param, code="invalid_value").response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if status == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return OpenAIError(status, message, headers=dict(exc.headers or {})).response()


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error while serving %s %s", request.method, request.url.path)
    return OpenAIError(
        500, f"the server failed to handle the request ({type(exc).__name__}); see its log"
    ).response()


def install_error_handlers(app: FastAPI) -> None:
    """Every error an endpoint raises or FastAPI detects becomes an OpenAI-shaped response:
    pydantic validation errors (and malformed JSON) a 400 naming ``param``, unknown routes a 404,
    anything unexpected a 500 without its traceback (which goes to the server's log)."""
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
