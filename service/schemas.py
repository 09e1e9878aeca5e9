"""Public schemas of the API, by resource: ``XCreate`` (input), ``XPublic`` (output), ``XsPublic(data, count)``.

``JobCreate`` *is* ``workers.spec.JobSpec``: the job specification has one definition, shared by the
API, the CLI and the workers.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.db import ApiKey, Job, Model
from workers.spec import JobSpec

JobCreate = JobSpec
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
MetricValue = float | None  # non-finite values (a NaN confidence interval) travel as null


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """Metrics as JSON can carry them: NaN and infinities become None."""
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        number = float(value) if value is not None else None
        out[key] = number if number is not None and math.isfinite(number) else None
    return out


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------- jobs


class Progress(_Out):
    iteration: int = Field(description="meta-iterations done")
    total: int = Field(description="meta-iterations of the job (outer.iterations)")
    eta_s: float | None = Field(None, description="estimated seconds to the end, while running")


class JobPublic(_Out):
    id: str
    name: str
    tenant: str
    status: JobStatus
    spec: JobSpec
    progress: Progress
    metrics: dict[str, MetricValue] = Field(description="the latest reported metrics")
    error: str | None = Field(None, description="the cause, when failed")
    model_id: str | None = Field(None, description="the registered model, when succeeded")
    attempts: int = Field(description="times the job was started (a restart resumes it)")
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, job: Job) -> JobPublic:
        return cls(
            id=job.id, name=job.name, tenant=job.tenant, status=job.status,  # type: ignore[arg-type]
            spec=JobSpec.model_validate(job.spec),
            progress=Progress(iteration=job.iteration, total=job.total,
                              eta_s=job.eta_s if job.status == "running" else None),
            metrics=job.metrics or {}, error=job.error, model_id=job.model_id, attempts=job.attempts,
            cancel_requested=job.cancel_requested, created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="jobs matching the filters, all pages together")


class MetricPoint(_Out):
    iteration: int
    metrics: dict[str, MetricValue]


class MetricsPublic(BaseModel):
    data: list[MetricPoint]
    count: int


# ------------------------------------------------------------------------------------------- models


class ModelPublic(_Out):
    id: str
    name: str
    tenant: str
    job_id: str = Field(description="the job that trained it")
    spec: JobSpec
    input_shape: list[int] = Field(description="one input without the batch dimension, e.g. [1] or [1, 28, 28]")
    output_dim: int = Field(description="regression outputs, or classes")
    loss: str
    kind: Literal["regression", "classification"]
    iteration: int
    eval_metrics: dict[str, MetricValue] = Field(description="meta-test metrics at the end of training")
    created_at: datetime

    @classmethod
    def from_row(cls, model: Model) -> ModelPublic:
        return cls(id=model.id, name=model.name, tenant=model.tenant, job_id=model.job_id,
                   spec=JobSpec.model_validate(model.spec), input_shape=model.input_shape,
                   output_dim=model.output_dim, loss=model.loss,
                   kind="classification" if model.loss == "cross_entropy" else "regression",
                   iteration=model.iteration, eval_metrics=model.eval_metrics or {},
                   created_at=model.created_at)


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class SupportSet(_In):
    x: list[Any] = Field(min_length=1, description="inputs: arrays of the model's input shape, or base64 "
                         "PNG/JPEG strings for image models")
    y: list[Any] = Field(min_length=1, description="targets: arrays of output_dim values (regression) or "
                         "integer labels 0..N-1 (classification)")


class QuerySet(_In):
    x: list[Any] = Field(default_factory=list, description="inputs to predict after adaptation")


class AdaptRequest(_In):
    support: SupportSet
    query: QuerySet = Field(default_factory=QuerySet)
    steps: int | None = Field(None, ge=0, le=100_000, description="adaptation steps (default: the model's "
                              "eval.steps)")
    lr: float | None = Field(None, gt=0, le=100, description="adaptation learning rate (default: inner.lr)")
    return_weights: bool = Field(False, description="store the adapted weights and return their id")


class AdaptResponse(BaseModel):
    model_id: str
    kind: Literal["regression", "classification"]
    predictions: list[list[float]] | list[int] = Field(
        description="regression: one array of output_dim values per query item; classification: class indices")
    probabilities: list[list[float]] | None = Field(None, description="classification: softmax per query item")
    support_loss_before: float
    support_loss_after: float
    steps: int
    lr: float
    adapted_id: str | None = Field(None, description="with return_weights: GET /adapted/{id}/weights")


class AdaptedPublic(_Out):
    id: str
    model_id: str
    steps: int
    lr: float
    created_at: datetime


# --------------------------------------------------------------------------------------------- keys


class KeyCreate(_In):
    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                        description="the tenant the key acts for")
    name: str = Field("key", min_length=1, max_length=200, description="a label for the key")


class KeyPublic(_Out):
    id: str
    tenant: str
    name: str
    prefix: str = Field(description="the first characters of the secret, to recognise it")
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, key: ApiKey) -> KeyPublic:
        return cls.model_validate(key)


class KeyCreated(KeyPublic):
    secret: str = Field(description="the bearer key; shown this once, only its hash is stored")


class KeysPublic(BaseModel):
    data: list[KeyPublic]
    count: int
