"""Domain errors of the control plane.

The service raises these; ``api/errors.py`` maps each one to an HTTP status in one place, so no
route decides a status code for a failure by itself.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of the errors that the API turns into a client-facing answer."""


class Unauthorized(ServiceError):
    """No API key, or one that is unknown or revoked (401)."""


class Forbidden(ServiceError):
    """A valid key that may not do this (403): e.g. a tenant key on an admin endpoint."""


class NotFound(ServiceError):
    """No such resource for this tenant (404); another tenant's ids answer the same."""

    def __init__(self, resource: str, id: str) -> None:
        super().__init__(f"{resource} '{id}' not found")
        self.resource, self.id = resource, id


class Conflict(ServiceError):
    """The resource is in a state that refuses the request (409): cancelling a finished job."""


class InvalidInput(ServiceError):
    """A request value the schema cannot catch (422): ``field`` is a dotted path like ``support.x[3]``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class Saturated(ServiceError):
    """Too much work in flight (429); the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class QuotaExceeded(ServiceError):
    """A tenant's quota refuses the request (``service.quotas``): 429 with Retry-After for a quota that
    frees up as the tenant's work ends (concurrent jobs, sweeps, workers, CPUs, GPUs, adaptations),
    403 for a size limit that waiting does not lift (iterations, trials, stored models and bytes).

    ``used`` is what the tenant holds now (for a per-run limit, what this run asks for), ``requested``
    what the request would add (None where that is not known before it runs: a model's bytes).
    """

    def __init__(self, quota: str, *, limit: float, used: float, requested: float | None, status: int,
                 retry_after: int | None = None) -> None:
        if status not in (403, 429):
            raise ValueError(f"a quota answers 403 or 429, not {status}")
        asked = f", requested {_number(requested)}" if requested is not None else ""
        super().__init__(f"quota '{quota}' exceeded: limit {_number(limit)}, in use {_number(used)}{asked}")
        self.quota, self.limit, self.used, self.requested, self.status = quota, limit, used, requested, status
        self.retry_after = max(1, int(retry_after)) if status == 429 and retry_after is not None else None


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class PayloadTooLarge(ServiceError):
    """The request body is over the configured limit (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over the limit of {limit} bytes")
        self.limit = limit


class Unavailable(ServiceError):
    """The service cannot take the request now (503): starting up or shutting down."""
