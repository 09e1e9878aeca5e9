"""Domain errors to HTTP answers: the one place where a ``service.errors`` type gets its status code."""

from __future__ import annotations

import re
from typing import cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    Saturated,
    ServiceError,
    Unauthorized,
    Unavailable,
)

STATUS_CODES: dict[type[ServiceError], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    InvalidInput: 422,
    Saturated: 429,
    Unavailable: 503,
}
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def field_loc(field: str) -> list[str | int]:
    """``support.x[3]`` as pydantic's location ``["body", "support", "x", 3]``."""
    return ["body", *(int(index) if index else name for name, index in _PART.findall(field))]


def status_code_of(exc: ServiceError) -> int:
    if isinstance(exc, QuotaExceeded):  # 403 or 429, by the kind of quota
        return exc.status
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return 400


def error_response(exc: ServiceError) -> JSONResponse:
    status = status_code_of(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, InvalidInput):
        # The shape of FastAPI's own validation errors, so clients parse one format.
        body: dict = {"detail": [{"type": "value_error", "loc": field_loc(exc.field), "msg": exc.reason}]}
    elif isinstance(exc, QuotaExceeded):
        body = {"detail": str(exc), "quota": exc.quota, "limit": exc.limit, "used": exc.used,
                "requested": exc.requested}
    else:
        body = {"detail": str(exc)}
    if isinstance(exc, Saturated | QuotaExceeded) and exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


async def _handle(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(cast(ServiceError, exc))  # registered for ServiceError only


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _handle)
