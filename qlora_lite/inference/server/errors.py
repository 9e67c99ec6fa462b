"""Errors in OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, and nothing else.

Every way a request can fail ends here: our own `APIError`, a body that does not parse or validate, an
unknown route, a `UserError` from the model layer, and any bug. A bug is logged with its traceback on the
server and answered as a one-line 500: a stack trace never reaches a client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qlora_lite.errors import UserError

log = logging.getLogger(__name__)

# The `type` OpenAI (and vLLM) give each status, so clients that branch on it keep working.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_overloaded",
    504: "timeout_error",
}


class APIError(Exception):
    """A request the server will not or cannot answer; `status` is the HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_user_error(exc: UserError) -> APIError:
    """A mistake the model layer found in the request (an adapter that is not there, a bad prompt)."""
    return APIError(400, str(exc).splitlines()[0] if str(exc) else "bad request")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's error list -> one line naming the first bad field and what it wants, and the field."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON: send a JSON object", None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    return (f"{field}: {message}{more}" if field else f"{message}{more}"), field


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure to one OpenAI-shaped JSON answer."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return from_user_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers bad parameters with 400, not FastAPI's default 422.
        message, field = validation_message(list(exc.errors()))
        return APIError(400, message, param=field).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see GET /v1/models and the README"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal server error (the server log has the details)").response()
