"""Typed service errors and the one place that turns them into OpenAI error bodies.

Domain code raises these; `install_error_handlers` maps each to its HTTP status and
the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error type and code."""

    status_code = 500
    error_type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(ServiceError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class SessionNotFound(ServiceError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "session_not_found"


class StateConflict(ServiceError):
    """A compare-and-set commit found a newer version than the one it read."""

    status_code = 409
    error_type = "conflict_error"
    code = "state_conflict"


class StateInvalid(ServiceError):
    """A stored record cannot be used (corrupt, NaN/Inf, or from another checkpoint)."""

    status_code = 409
    error_type = "conflict_error"
    code = "state_invalid"


class IdempotencyKeyReused(ServiceError):
    """An Idempotency-Key came back with a different conversation than its first use."""

    status_code = 422
    error_type = "invalid_request_error"
    code = "idempotency_key_reused"


class PayloadTooLarge(ServiceError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class QueueFull(ServiceError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class RequestTimeout(ServiceError):
    status_code = 504
    error_type = "server_error"
    code = "timeout"


class StoreUnavailable(ServiceError):
    status_code = 503
    error_type = "server_error"
    code = "store_unavailable"


class ModelUnavailable(ServiceError):
    status_code = 503
    error_type = "server_error"
    code = "model_unavailable"


def log_service_error(request_id: str, exc: ServiceError, session_id: str | None = None) -> None:
    """Log the error that ended one request: client errors at INFO, server errors at WARNING.
    An unreachable store is logged at DEBUG here because the store itself logs one warning
    per interval while the outage lasts."""
    if isinstance(exc, StoreUnavailable):
        level = logging.DEBUG
    else:
        level = logging.WARNING if exc.status_code >= 500 else logging.INFO
    logger.log(level, "request %s (session %s) failed: %s (%s)", request_id, session_id or "-", exc.code,
               exc.message)


def error_body(message: str, error_type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def service_error_body(exc: ServiceError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, exc.param, exc.code)


_LOCATIONS = {"body", "query", "path", "header"}
FASTAPI_BODY_ERROR = "There was an error parsing the body"


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    # Drop the request location and pydantic's union-branch tags ("str", "list[str]",
    # "function-after[...]") so the param reads like OpenAI's, e.g. "messages.0.role".
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in _LOCATIONS else [str(p) for p in loc]
    parts = [p for p in parts if not (p in {"str", "int", "float", "bool"} or "[" in p)]
    return ".".join(parts) or None


def _session_for_log(request: Request) -> str | None:
    """Return the session id the request names (header or path), if it is a valid one.

    An invalid id stays out of the log: it is client input and may contain line breaks.
    """
    from app.protocol import check_session_id  # app.protocol imports this module

    session_id = request.path_params.get("session_id") or request.headers.get("x-session-id")
    if not isinstance(session_id, str):
        return None
    try:
        return check_session_id(session_id)
    except InvalidRequest:
        return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        log_service_error(_request_id(request), exc, _session_for_log(request))
        return JSONResponse(service_error_body(exc), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        param = _validation_param(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            message = f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}. Send a JSON object."
            param = None
        elif param is None:
            message = f"Invalid request body: {first.get('msg')}. Send a JSON object with Content-Type: application/json."
        else:
            message = f"Invalid value for '{param}': {first.get('msg')}"
            if "input" in first and not isinstance(first["input"], (dict, list)):
                message += f" (got {_shorten(repr(first['input']))})"
            message += "."
            if len(errors) > 1:
                message += f" ({len(errors) - 1} more error(s) in the request.)"
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
                413: "payload_too_large"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if message == FASTAPI_BODY_ERROR:
            # FastAPI's text for a body it cannot decode (invalid UTF-8, nesting too deep).
            message = ("The request body could not be parsed: send one JSON object in UTF-8 with "
                       "Content-Type: application/json.")
        logger.info("request %s: HTTP %d: %s", _request_id(request), exc.status_code, message)
        return JSONResponse(error_body(message, "invalid_request_error", None, code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request %s failed with an unexpected error", _request_id(request))
        return JSONResponse(error_body("Internal server error; see the server log.", "server_error",
                                       None, "internal_error"), status_code=500)


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")
