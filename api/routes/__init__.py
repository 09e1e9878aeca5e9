"""The routers, one per resource, gathered here and mounted under ``/api/v1`` by ``api.main``."""

from fastapi import APIRouter

from api.routes import adapted, health, jobs, keys, models, quotas, sweeps, ui

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(sweeps.router)
api_router.include_router(models.router)
api_router.include_router(adapted.router)
api_router.include_router(keys.router)
api_router.include_router(quotas.router)

__all__ = ["api_router", "health", "ui"]  # health and ui: outside /api/v1 (api.main)
