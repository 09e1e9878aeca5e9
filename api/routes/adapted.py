"""Adapted weights: parameters stored by an adaptation query with ``return_weights``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import CurrentKey, SessionDep, SettingsDep
from service import registry
from service.schemas import AdaptedPublic

router = APIRouter(prefix="/adapted", tags=["adapted"])


@router.get("/{adapted_id}", response_model=AdaptedPublic)
def get_adapted(adapted_id: str, session: SessionDep, key: CurrentKey, settings: SettingsDep) -> AdaptedPublic:
    """Kept ``MAML_ADAPTED_WEIGHTS_TTL_S`` after the query; 404 after that."""
    return AdaptedPublic.model_validate(registry.get_adapted(session=session, adapted_id=adapted_id, scope=key.scope,
                                                             ttl_s=settings.adapted_weights_ttl_s))


@router.get("/{adapted_id}/weights", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}})
def get_adapted_weights(adapted_id: str, session: SessionDep, key: CurrentKey, settings: SettingsDep) -> FileResponse:
    row = registry.get_adapted(session=session, adapted_id=adapted_id, scope=key.scope,
                               ttl_s=settings.adapted_weights_ttl_s)
    return FileResponse(Path(row.path), media_type="application/octet-stream", filename=f"{adapted_id}.safetensors")
