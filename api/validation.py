"""422 answers to request validation errors that can always be written as JSON.

FastAPI's own handler echoes each error's ``input``; a body with ``Infinity`` or ``NaN`` (JSON
parsers accept them, pydantic refuses them) made that echo unencodable, and the answer a 500.
Here non-finite numbers are echoed as the strings ``"Infinity"``, ``"-Infinity"`` and ``"NaN"``.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its JSON-ish name."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(status_code=422, content={"detail": finite(jsonable_encoder(exc.errors()))})


def install_validation_handler(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _handle)
