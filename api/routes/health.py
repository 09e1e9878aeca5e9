"""Probes and Prometheus metrics, at the root (not under /api/v1), without authentication."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Ready to serve: the database answers and the job manager runs."""
    services = getattr(request.app.state, "services", None)
    checks = {"database": False, "jobs": False}
    if services is not None:
        try:
            with services.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["database"] = True
        except Exception:
            logger.exception("readiness: the database does not answer")
        checks["jobs"] = services.manager.started
    ready = all(checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    services = getattr(request.app.state, "services", None)
    body = services.metrics.render() if services is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
