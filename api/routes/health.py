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
    """Ready to serve: the database answers, the job manager runs and, with a supervised reconciler
    (``MAML_RAY_PROCESS=child``), it is alive and its Ray cluster answers."""
    services = getattr(request.app.state, "services", None)
    checks: dict[str, bool] = {"database": False, "jobs": False}
    details: dict[str, object] = {}
    if services is not None:
        try:
            with services.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["database"] = True
        except Exception:
            logger.exception("readiness: the database does not answer")
        checks["jobs"] = services.manager.started
        if services.ray_child is not None:
            checks["ray"], details = services.ray_child.ready()
    ready = all(checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks, **details},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    services = getattr(request.app.state, "services", None)
    body = services.metrics.render() if services is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
