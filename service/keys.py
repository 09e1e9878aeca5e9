"""API keys: bearer secrets stored as SHA-256, tenants, and the admin key from the settings.

A secret is ``maml_`` plus 32 random bytes (URL-safe base64): with that much entropy one SHA-256
is as good as a slow password hash. The first characters (``prefix``) find the row; the hash is
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import ApiKey, utcnow
from service.errors import InvalidInput, NotFound, Unauthorized

SECRET_PREFIX = "maml_"
PREFIX_LENGTH = len(SECRET_PREFIX) + 8
ADMIN_TENANT = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant key, or the admin (``tenant`` "admin", sees every tenant)."""

    tenant: str
    key_id: str | None
    is_admin: bool = False

    @property
    def scope(self) -> str | None:
        """The tenant to filter by; None for the admin, who sees everything."""
        return None if self.is_admin else self.tenant


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(*, session: Session, tenant: str, name: str) -> tuple[ApiKey, str]:
    """A new tenant key; returns the row and the secret (which is not stored)."""
    if tenant == ADMIN_TENANT:
        raise InvalidInput("tenant", f"'{ADMIN_TENANT}' is reserved for the admin key")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(tenant=tenant, name=name, prefix=secret[:PREFIX_LENGTH], hashed_secret=hash_secret(secret))
    session.add(key)
    session.commit()
    return key, secret


def list_keys(*, session: Session, limit: int, offset: int) -> tuple[list[ApiKey], int]:
    count = session.scalar(select(func.count()).select_from(ApiKey)) or 0
    rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id)
                           .limit(limit).offset(offset)).all()
    return list(rows), count


def revoke_key(*, session: Session, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound("key", key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()
    return key


def find_key(*, session: Session, secret: str) -> ApiKey | None:
    """The live key whose secret this is, or None."""
    if not secret.startswith(SECRET_PREFIX) or len(secret) < PREFIX_LENGTH:
        return None
    digest = hash_secret(secret)
    for key in session.scalars(select(ApiKey).where(ApiKey.prefix == secret[:PREFIX_LENGTH])):
        if key.revoked_at is None and hmac.compare_digest(key.hashed_secret, digest):
            return key
    return None


class Authenticator:
    """Turns a bearer secret into a :class:`Principal`; remembers verified keys for ``auth_cache_s``.

    The short memory keeps a database round trip off every request (adaptation latency); a key
    revoked through this process is forgotten at once, one revoked elsewhere within the TTL.
    """

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        admin = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
        self._admin = admin.encode() if admin else None
        self._ttl = settings.auth_cache_s
        self._session_factory = session_factory
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def cached(self, secret: str) -> Principal | None:
        """The principal if known without the database (the admin key, or a remembered key)."""
        if self._admin is not None and hmac.compare_digest(secret.encode(), self._admin):
            return Principal(tenant=ADMIN_TENANT, key_id=None, is_admin=True)
        entry = self._cache.get(hash_secret(secret))
        if entry is not None and entry[1] > time.monotonic():
            return entry[0]
        return None

    def authenticate(self, secret: str | None) -> Principal:
        if not secret:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        principal = self.cached(secret)
        if principal is not None:
            return principal
        with self._session_factory() as session:
            key = find_key(session=session, secret=secret)
        if key is None:
            raise Unauthorized("unknown or revoked API key")
        principal = Principal(tenant=key.tenant, key_id=key.id, is_admin=key.is_admin)
        if self._ttl > 0:
            with self._lock:
                if len(self._cache) > 10_000:  # bound the memory; entries come back on their next use
                    self._cache.clear()
                self._cache[hash_secret(secret)] = (principal, time.monotonic() + self._ttl)
        return principal

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._cache = {h: e for h, e in self._cache.items() if e[0].key_id != key_id}
