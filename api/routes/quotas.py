"""Quotas (admin only): a tenant's quotas in force and what it holds, every tenant's use, and the
overrides that change a tenant's quotas (``service.quotas``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from sqlalchemy.orm import Session

from api.deps import AdminKey, PageLimit, PageOffset, SessionDep, SettingsDep
from service import quotas
from service.config import Settings
from service.quotas import AdaptationShares
from service.schemas import QuotaOverrides, TenantQuotaPublic, TenantQuotasPublic

router = APIRouter(prefix="/quotas", tags=["quotas"])
Tenant = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                             description="the tenant, as its API keys name it")]


async def get_adaptation_shares(request: Request) -> AdaptationShares:
    """The app's per-tenant adaptation counts, made on first use (async: on the event loop, so once)."""
    shares: AdaptationShares | None = getattr(request.app.state, "adaptation_shares", None)
    if shares is None:
        shares = request.app.state.adaptation_shares = AdaptationShares(request.app.state.settings)
    return shares


AdaptationSharesDep = Annotated[AdaptationShares, Depends(get_adaptation_shares)]


def _override(session: Session, settings: Settings, shares: AdaptationShares, tenant: str,
              values: dict[str, int | None], *, replace: bool) -> TenantQuotaPublic:
    quotas.set_overrides(session=session, tenant=tenant, values=values, replace=replace)
    shares.forget(tenant)  # this replica sees the new adaptations quota at once
    return quotas.describe(session=session, settings=settings, tenants=[tenant], adaptations=shares.by_tenant())[0]


@router.get("", response_model=TenantQuotasPublic)
def list_quotas(session: SessionDep, settings: SettingsDep, shares: AdaptationSharesDep, _admin: AdminKey,
                limit: PageLimit = 100, offset: PageOffset = 0) -> TenantQuotasPublic:
    """Every tenant's quotas and use, by tenant name (tenants with a key, overrides, a run or a model)."""
    tenants, count = quotas.list_tenants(session=session, limit=limit, offset=offset)
    return TenantQuotasPublic(data=quotas.describe(session=session, settings=settings, tenants=tenants,
                                                    adaptations=shares.by_tenant()), count=count)


@router.get("/{tenant}", response_model=TenantQuotaPublic)
def get_quota(tenant: Tenant, session: SessionDep, settings: SettingsDep, shares: AdaptationSharesDep,
              _admin: AdminKey) -> TenantQuotaPublic:
    """The tenant's quotas in force (its overrides, else the defaults) and what it holds now."""
    return quotas.describe(session=session, settings=settings, tenants=[tenant], adaptations=shares.by_tenant())[0]


@router.put("/{tenant}", response_model=TenantQuotaPublic)
def replace_quota(tenant: Tenant, body: QuotaOverrides, session: SessionDep, settings: SettingsDep,
                  shares: AdaptationSharesDep, _admin: AdminKey) -> TenantQuotaPublic:
    """Set the tenant's overrides: those given; every other quota back to its default."""
    return _override(session, settings, shares, tenant, body.model_dump(exclude_none=True), replace=True)


@router.patch("/{tenant}", response_model=TenantQuotaPublic)
def update_quota(tenant: Tenant, body: QuotaOverrides, session: SessionDep, settings: SettingsDep,
                 shares: AdaptationSharesDep, _admin: AdminKey) -> TenantQuotaPublic:
    """Change the given overrides only (``null``: that quota back to its default)."""
    return _override(session, settings, shares, tenant, body.model_dump(exclude_unset=True), replace=False)


@router.delete("/{tenant}", status_code=204)
def reset_quota(tenant: Tenant, session: SessionDep, shares: AdaptationSharesDep, _admin: AdminKey) -> Response:
    """Every quota of the tenant back to its default."""
    quotas.clear_overrides(session=session, tenant=tenant)
    shares.forget(tenant)
    return Response(status_code=204)
