"""API keys (admin only): create a tenant key (its secret is shown once), list and revoke keys."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import AdminKey, PageLimit, PageOffset, ServicesDep, SessionDep
from service import keys
from service.schemas import KeyCreate, KeyCreated, KeyPublic, KeysPublic

router = APIRouter(prefix="/keys", tags=["keys"])


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, session: SessionDep, _admin: AdminKey) -> KeyCreated:
    key, secret = keys.create_key(session=session, tenant=body.tenant, name=body.name)
    return KeyCreated(**KeyPublic.from_row(key).model_dump(), secret=secret)


@router.get("", response_model=KeysPublic)
def list_keys(session: SessionDep, _admin: AdminKey, limit: PageLimit = 100,
              offset: PageOffset = 0) -> KeysPublic:
    rows, count = keys.list_keys(session=session, limit=limit, offset=offset)
    return KeysPublic(data=[KeyPublic.from_row(k) for k in rows], count=count)


@router.delete("/{key_id}", status_code=204)
def revoke_key(key_id: str, session: SessionDep, _admin: AdminKey, services: ServicesDep) -> Response:
    keys.revoke_key(session=session, key_id=key_id)
    services.authenticator.forget(key_id)
    return Response(status_code=204)
