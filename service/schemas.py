"""Public schemas of the API, by resource: ``XCreate`` (input), ``XPublic`` (output), ``XsPublic(data, count)``.

``JobCreate`` *is* ``workers.spec.JobSpec`` and ``SweepCreate`` *is* ``workers.sweep_spec.SweepSpec``: each
specification has one definition, shared by the API, the CLI and the workers.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.db import ApiKey, Job, Model, RunState, Sweep
from workers.spec import NAME_PATTERN, JobSpec
from workers.sweep_spec import SweepSpec, TrialStatus

JobCreate = JobSpec
ModelKind = Literal["regression", "classification", "rl_policy"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
SweepCreate = SweepSpec
SweepStatus = JobStatus
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
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # Infinity/NaN in a body: 422


class _RunPublic(_Out):
    """What jobs and sweeps show alike: their run state (``service.db.RunState``)."""

    id: str
    name: str
    tenant: str
    status: JobStatus
    error: str | None = Field(None, description="the cause, when failed")
    model_id: str | None = Field(None, description="the registered model, when succeeded")
    attempts: int = Field(description="times it was started (a restart resumes it)")
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @staticmethod
    def run_state(row: RunState) -> dict[str, Any]:
        return {name: getattr(row, name) for name in _RunPublic.model_fields}


# --------------------------------------------------------------------------------------------- jobs


class Progress(_Out):
    iteration: int = Field(description="meta-iterations done")
    total: int = Field(description="meta-iterations of the job (outer.iterations)")
    eta_s: float | None = Field(None, description="estimated seconds to the end, while running")


class JobPublic(_RunPublic):
    spec: JobSpec
    progress: Progress
    metrics: dict[str, MetricValue] = Field(description="the latest reported metrics")

    @classmethod
    def from_row(cls, job: Job) -> JobPublic:
        progress = Progress(iteration=job.iteration, total=job.total,
                            eta_s=job.eta_s if job.status == "running" else None)
        return cls(**cls.run_state(job), spec=JobSpec.model_validate(job.spec), progress=progress,
                   metrics=job.metrics or {})


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="jobs matching the filters, all pages together")


class MetricPoint(_Out):
    iteration: int
    metrics: dict[str, MetricValue]


class MetricsPublic(BaseModel):
    data: list[MetricPoint]
    count: int


# ------------------------------------------------------------------------------------------- sweeps


class TrialPublic(BaseModel):
    """One trial of a sweep (``workers.sweep_spec.TrialInfo`` without the server's paths)."""

    trial_id: str
    status: TrialStatus = Field(description="pending, running, paused, completed, stopped_early (by the "
                                "scheduler), failed or cancelled")
    config: dict[str, Any] = Field(description="the sampled value of each field path of the space")
    iteration: int = Field(description="meta-iterations done at the last report")
    total_iterations: int = Field(description="meta-iterations the trial runs if not stopped")
    metric: MetricValue = Field(None, description="the sweep metric at the last report")
    best_metric: MetricValue = Field(None, description="the best value of the sweep metric over its reports")
    metrics: dict[str, MetricValue] = Field(default_factory=dict, description="the last report's metrics")
    history: list[tuple[int, MetricValue]] = Field(
        default_factory=list, description="(iteration, sweep metric) at each report, oldest first; null where "
        "not finite; at most 200 points: a long trial's older points are thinned, its newest always kept")
    error: str | None = Field(None, description="why a failed trial failed")


class SweepPublic(_RunPublic):
    status: SweepStatus = Field(description="succeeded: ended with a best trial, whose model is registered")
    model_id: str | None = Field(None, description="the best trial's registered model, when succeeded")
    spec: SweepSpec
    trials: list[TrialPublic] = Field(description="every trial so far, in creation order")
    counts: dict[str, int] = Field(description="trials by status")
    best: TrialPublic | None = Field(None, description="the completed trial with the best last metric")

    @classmethod
    def from_row(cls, sweep: Sweep) -> SweepPublic:
        trials = [TrialPublic.model_validate(t) for t in sweep.trials or []]
        best = next((t for t in trials if t.trial_id == sweep.best_trial_id), None)
        return cls(**cls.run_state(sweep), spec=SweepSpec.model_validate(sweep.spec), trials=trials,
                   counts=Counter(t.status for t in trials), best=best)


class SweepsPublic(BaseModel):
    data: list[SweepPublic]
    count: int = Field(description="sweeps matching the filters, all pages together")


# ------------------------------------------------------------------------------------------- models


class ModelPublic(_Out):
    id: str
    name: str
    tenant: str
    job_id: str | None = Field(None, description="the job that trained it (null for a sweep's model)")
    sweep_id: str | None = Field(None, description="the sweep whose best trial it is (null for a job's model)")
    spec: JobSpec
    input_shape: list[int] = Field(description="one input without the batch dimension, e.g. [1] or [1, 28, 28]")
    output_dim: int = Field(description="regression outputs, or classes")
    loss: str
    kind: ModelKind
    iteration: int
    eval_metrics: dict[str, MetricValue] = Field(description="meta-test metrics at the end of training")
    created_at: datetime

    @classmethod
    def from_row(cls, model: Model) -> ModelPublic:
        return cls(id=model.id, name=model.name, tenant=model.tenant, job_id=model.job_id, sweep_id=model.sweep_id,
                   spec=JobSpec.model_validate(model.spec), input_shape=model.input_shape,
                   output_dim=model.output_dim, loss=model.loss,
                   kind=model_kind(model.loss),
                   iteration=model.iteration, eval_metrics=model.eval_metrics or {},
                   created_at=model.created_at)


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


RL_LOSS = "policy_gradient"  # the registry's ``loss`` of an RL policy


def model_kind(loss: str) -> ModelKind:
    if loss == RL_LOSS:
        return "rl_policy"
    return "classification" if loss == "cross_entropy" else "regression"


class SupportSet(_In):
    x: list[Any] = Field(min_length=1, description="inputs: arrays of the model's input shape, or base64 "
                         "PNG/JPEG strings for image models")
    y: list[Any] = Field(min_length=1, description="targets: arrays of output_dim values (regression) or "
                         "integer labels 0..N-1 (classification)")


class QuerySet(_In):
    x: list[Any] = Field(default_factory=list, description="inputs to predict after adaptation")


class AdaptRequest(_In):
    support: SupportSet | None = Field(None, description="supervised models: the K labelled examples")
    query: QuerySet = Field(default_factory=QuerySet)
    task: dict[str, Any] | None = Field(
        None, description='RL policies: the new task, {"goal": [x, y]} (nav2d), {"velocity": v} '
        '(halfcheetah_vel) or {"direction": 1 | -1} (halfcheetah_dir); the server collects the rollouts')
    rollouts: int | None = Field(None, ge=1, le=200, description="RL policies: K rollouts per adaptation step "
                                 "(default: the training value)")
    horizon: int | None = Field(None, ge=1, le=1000, description="RL policies: episode length (default: the "
                                "training value)")
    steps: int | None = Field(None, ge=0, le=100_000, description="adaptation steps (default: the model's "
                              "eval.steps; RL: its inner.steps)")
    lr: float | None = Field(None, gt=0, le=100, description="adaptation learning rate (default: inner.lr)")
    return_weights: bool = Field(False, description="store the adapted weights and return their id")
    every_step: bool = Field(False, description="supervised models: also answer the query predictions and the "
                             "support loss after 0, 1, ..., steps steps (step_predictions, step_support_losses), "
                             "from the same adaptation; (steps + 1) x query items x outputs is capped")
    trajectories: int = Field(0, ge=0, le=10, description="nav2d policies: also answer this many of the sampled "
                              "rollouts' positions after 0, 1, ..., steps updates (and the goal)")


class AdaptResponse(BaseModel):
    model_id: str
    kind: ModelKind
    predictions: list[list[float]] | list[int] = Field(
        default_factory=list,
        description="regression: one array of output_dim values per query item; classification: class indices")
    probabilities: list[list[float]] | None = Field(None, description="classification: softmax per query item")
    support_loss_before: float | None = Field(None, description="supervised: the support loss before adapting")
    support_loss_after: float | None = Field(None, description="supervised: the support loss after adapting")
    return_before: float | None = Field(None, description="RL: average return of K rollouts before adapting")
    return_after: float | None = Field(None, description="RL: average return after the adaptation steps")
    returns: list[float] | None = Field(None, description="RL: average return after 0, 1, ..., steps updates")
    step_predictions: list[list[list[float]]] | list[list[int]] | None = Field(
        None, description="with every_step: the predictions (as in predictions) after 0, 1, ..., steps steps")
    step_support_losses: list[float] | None = Field(
        None, description="with every_step: the support loss after 0, 1, ..., steps steps")
    trajectories: list[list[list[list[float]]]] | None = Field(
        None, description="nav2d with trajectories=k: per step count 0..steps, k sampled rollouts, each the "
        "positions [x, y] from the start to where the episode ended")
    goal: list[float] | None = Field(None, description="nav2d with trajectories: the goal [x, y]")
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
    name: str = Field("key", min_length=1, max_length=200, pattern=NAME_PATTERN, description="a label for the key")


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


# ------------------------------------------------------------------------------------------- quotas

_INT32 = 2**31 - 1  # the quota columns are 32-bit integers, but for bytes


class QuotaLimits(BaseModel):
    """A tenant's quotas: each one its override, else the setting's default (``MAML_QUOTA_<NAME>``).

    Over a concurrency quota (jobs, sweeps, workers, cpus, gpus, adaptations) a request answers 429
    with Retry-After; over a size limit (iterations, trials, models, model_bytes), 403.
    """

    jobs: int = Field(description="jobs queued or running at once")
    sweeps: int = Field(description="sweeps queued or running at once")
    workers: int = Field(description="Ray workers of queued and running jobs, plus each sweep's concurrent trials "
                         "(max_concurrent_trials, else all its trials) x workers per trial")
    cpus: int = Field(description="CPUs of those workers (workers x resources.cpus_per_worker)")
    gpus: int = Field(description="GPUs of those workers (workers x resources.gpus_per_worker)")
    iterations: int = Field(description="outer.iterations of one job, or of one trial of a sweep")
    trials: int = Field(description="trials of one sweep (num_samples x grid points)")
    models: int = Field(description="stored models, each queued or running job and sweep counting as one more")
    model_bytes: int = Field(description="bytes of the stored models' files")
    adaptations: int = Field(description="adaptation queries in flight (per API replica)")


class QuotaOverrides(_In):
    """Overrides of a tenant's quotas (non-negative integers). PUT: the given ones, the others back to
    their defaults; PATCH: the given ones only, ``null`` putting one back to its default."""

    jobs: int | None = Field(None, ge=0, le=_INT32)
    sweeps: int | None = Field(None, ge=0, le=_INT32)
    workers: int | None = Field(None, ge=0, le=_INT32)
    cpus: int | None = Field(None, ge=0, le=_INT32)
    gpus: int | None = Field(None, ge=0, le=_INT32)
    iterations: int | None = Field(None, ge=0, le=_INT32)
    trials: int | None = Field(None, ge=0, le=_INT32)
    models: int | None = Field(None, ge=0, le=_INT32)
    model_bytes: int | None = Field(None, ge=0, le=2**62)
    adaptations: int | None = Field(None, ge=0, le=_INT32)


class QuotaUse(BaseModel):
    """What a tenant holds now, in the units of its quotas (iterations and trials are per run: no use)."""

    jobs: int = Field(description="jobs queued or running")
    sweeps: int = Field(description="sweeps queued or running")
    workers: int
    cpus: float
    gpus: float
    models: int = Field(description="stored models plus the queued and running jobs and sweeps")
    model_bytes: int
    adaptations: int = Field(description="adaptation queries in flight on this API replica")


class TenantQuotaPublic(BaseModel):
    tenant: str
    limits: QuotaLimits = Field(description="the quotas in force")
    overrides: dict[str, int] = Field(description="the quotas an admin set for this tenant (the others: defaults)")
    use: QuotaUse


class TenantQuotasPublic(BaseModel):
    data: list[TenantQuotaPublic]
    count: int = Field(description="tenants in all (with a key, a quota row, a run or a model)")
