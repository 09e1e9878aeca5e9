"""Typed dependencies: handlers read like their signature (``session: SessionDep, key: CurrentKey``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service import runs
from service.adaptation import Adapter
from service.config import Settings
from service.db import RunState
from service.errors import Forbidden, Unavailable
from service.events import StreamSlots
from service.keys import Authenticator, Principal
from service.manager import JobManager, SweepManager
from service.metrics import ServiceMetrics
from service.supervisor import RayChild


@dataclass
class Services:
    """What the lifespan starts, shared by every request of one app."""

    engine: Engine
    session_factory: sessionmaker[Session]
    manager: JobManager
    adapter: Adapter
    sweeps: SweepManager
    authenticator: Authenticator
    metrics: ServiceMetrics
    streams: StreamSlots | None = None  # event streams open per tenant
    ray_child: RayChild | None = None  # the supervised reconciler (MAML_RAY_PROCESS=child)


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise Unavailable("the service is starting or stopping")
    return services


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(services: Annotated[Services, Depends(get_services)]) -> Iterator[Session]:
    with services.session_factory() as session:
        yield session


def get_manager(services: Annotated[Services, Depends(get_services)]) -> JobManager:
    return services.manager


def get_sweep_manager(services: Annotated[Services, Depends(get_services)]) -> SweepManager:
    return services.sweeps


def get_adapter(services: Annotated[Services, Depends(get_services)]) -> Adapter:
    return services.adapter


_bearer = HTTPBearer(auto_error=False, description="an API key: the admin token or a tenant key from POST /keys")


async def get_current_key(
    services: Annotated[Services, Depends(get_services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    secret = credentials.credentials if credentials is not None else None
    principal = services.authenticator.cached(secret) if secret else None
    if principal is not None:  # the common case stays on the event loop, no thread hop
        return principal
    return await run_in_threadpool(services.authenticator.authenticate, secret)


async def check_run(services: Services, table: type[RunState], run_id: str, key: Principal) -> None:
    """NotFound unless the caller may see the run: for async handlers, which hold no session."""

    def check() -> None:
        with services.session_factory() as session:
            runs.get_run(session=session, table=table, run_id=run_id, scope=key.scope)

    await run_in_threadpool(check)


def require_admin(key: Annotated[Principal, Depends(get_current_key)]) -> Principal:
    if not key.is_admin:
        raise Forbidden("this endpoint needs the admin key")
    return key


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_db)]
ManagerDep = Annotated[JobManager, Depends(get_manager)]
SweepManagerDep = Annotated[SweepManager, Depends(get_sweep_manager)]
AdapterDep = Annotated[Adapter, Depends(get_adapter)]
CurrentKey = Annotated[Principal, Depends(get_current_key)]
AdminKey = Annotated[Principal, Depends(require_admin)]
PageLimit = Annotated[int, Query(ge=1, le=500)]
PageOffset = Annotated[int, Query(ge=0, le=2**31)]
