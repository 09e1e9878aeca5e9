"""Models: the registry of trained models, their weights, and adaptation queries."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from api.deps import AdapterDep, CurrentKey, PageLimit, PageOffset, ServicesDep, SessionDep
from api.routes.quotas import AdaptationSharesDep
from service import registry
from service.schemas import AdaptRequest, AdaptResponse, ModelPublic, ModelsPublic

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
def list_models(session: SessionDep, key: CurrentKey, limit: PageLimit = 100,
                offset: PageOffset = 0) -> ModelsPublic:
    rows, count = registry.list_models(session=session, scope=key.scope, limit=limit, offset=offset)
    return ModelsPublic(data=[ModelPublic.from_row(m) for m in rows], count=count)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, session: SessionDep, key: CurrentKey) -> ModelPublic:
    return ModelPublic.from_row(registry.get_model(session=session, model_id=model_id, scope=key.scope))


@router.get("/{model_id}/weights", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}})
def get_model_weights(model_id: str, session: SessionDep, key: CurrentKey) -> FileResponse:
    model = registry.get_model(session=session, model_id=model_id, scope=key.scope)
    return FileResponse(registry.weights_path(model), media_type="application/octet-stream",
                        filename=f"{model_id}.safetensors")


@router.post("/{model_id}/adapt", response_model=AdaptResponse)
async def adapt_model(model_id: str, body: AdaptRequest, request: Request, key: CurrentKey, adapter: AdapterDep,
                      services: ServicesDep, shares: AdaptationSharesDep) -> AdaptResponse:
    """Adapt the model to a support set and predict the query inputs.

    Inputs of the wrong shape, labels out of range and non-finite values answer 422 naming the
    item (``support.x[3]``); when the tenant has its ``adaptations`` quota of queries in flight, or
    the adaptation pool is saturated, 429 with Retry-After. A query whose client leaves is stopped.
    """
    tenant = key.tenant
    limit = shares.cached_limit(tenant)
    if limit is None:
        limit = await run_in_threadpool(shares.limit, tenant, services.session_factory)
    shares.acquire(tenant, limit)
    query = asyncio.ensure_future(adapter.adapt(model_id=model_id, principal=key, request=body,
                                                is_disconnected=request.is_disconnected))

    def release(done: asyncio.Future[AdaptResponse]) -> None:
        shares.release(tenant)
        if not done.cancelled():
            done.exception()  # retrieved here too: a query whose client left has no one awaiting it

    query.add_done_callback(release)
    # Shielded: were this handler cancelled, the query would still hold its pool slot until it stops (the
    # adapter stops it at its next step once the client is gone), and so it keeps its count until then.
    return await asyncio.shield(query)
