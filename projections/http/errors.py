"""Every error the HTTP API answers is JSON `{"error": "..."}`: one sentence saying what to do."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cairn.events import error_lines

log = logging.getLogger("cairn.http")


class ErrorReply(BaseModel):
    """The body of every error response."""

    error: str


class ApiError(Exception):
    """An answer other than success: an HTTP status and the sentence for `error`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class LoginRequired(Exception):
    """A dashboard page was asked for without a valid token: send the browser to log in."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, {"WWW-Authenticate": 'Bearer realm="cairn"'})


# Shown in the OpenAPI document for the endpoints that can answer them.
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorReply, "description": "no token, or one that is not configured"},
    403: {"model": ErrorReply, "description": "the token's role may not do this"},
    422: {"model": ErrorReply, "description": "the request's parameters or body are invalid"},
}
VIEWS_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    503: {"model": ErrorReply, "description": "the views are not built yet"},
}
NATS_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    503: {"model": ErrorReply, "description": "NATS or the coordinator cannot be reached"},
}
COMMAND_ERRORS: dict[int | str, dict[str, Any]] = {
    **NATS_ERRORS,
    404: {"model": ErrorReply, "description": "no run matches the id or prefix"},
    409: {"model": ErrorReply, "description": "the coordinator refused the command"},
}


START_REFUSED: dict[str, Any] = {
    "model": ErrorReply,
    "description": "the input does not fit the workflow, or the workflow is unknown or broken",
}


def _json(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """The request's problems in one sentence: where, and what is wrong there."""
    problems = error_lines(exc.errors(), root="the body", skip={"body"})
    return "invalid request: " + "; ".join(problems)


PageError = Callable[[Request, int, str], Response]


def install(app: FastAPI, page_error: PageError) -> None:
    """Answer every API error as `{"error": ...}`, a dashboard page's as an HTML page; a page
    asked for without a login redirects to /login."""

    def is_api(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        if not is_api(request):
            return page_error(request, exc.status, exc.message)
        return _json(exc.status, exc.message, exc.headers)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        from urllib.parse import quote

        return RedirectResponse(f"/login?next={quote(exc.next_path, safe='/')}", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        if not is_api(request):
            return page_error(request, 422, validation_message(exc))
        return _json(422, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such path: {request.url.path} (the API is described at /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        if not is_api(request) and request.method == "GET":
            return page_error(request, exc.status_code, message)
        return _json(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return _json(
            500,
            f"the server failed on {request.method} {request.url.path} "
            f"({type(exc).__name__}: {exc}); see the server's log",
        )
