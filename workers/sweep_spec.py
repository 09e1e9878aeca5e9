"""Hyperparameter sweep specifications: a search space over ``JobSpec`` field paths, early stopping.

A sweep is a base ``JobSpec`` plus a search space keyed by field path (``"inner.lr"``,
``"inner.steps"``, ``"model"``), a metric the trainer reports, a scheduler (ASHA or the median
stopping rule) and a number of samples. ``SweepSpec`` validates all of it against ``JobSpec``
itself: every range bound and every choice is applied to the base spec and validated, so a value
the job API would refuse is refused here, naming the field.

This module imports neither torch nor Ray: the control plane validates sweeps with it. The trial
function is ``workers.sweep_trial``; the Tune driver is ``workers.sweep``.

Example::

    sweep = SweepSpec.model_validate({
        "base": {"outer": {"iterations": 200}, "eval": {"every": 20, "tasks": 20}},
        "space": {"inner.lr": {"loguniform": [0.001, 0.5]}, "inner.steps": {"choice": [1, 3, 5]}},
        "scheduler": {"type": "asha", "grace_period": 20},
        "num_samples": 8,
    })
"""

from __future__ import annotations

import json
import math
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from workers.spec import NAME_PATTERN, JobSpec

_DOMAINS = ("loguniform", "uniform", "randint", "choice", "grid")
# Metrics present in every report (reports happen at evaluations), by task kind.
_REGRESSION_METRICS = ("eval/loss", "eval/loss_before", "meta/loss", "meta/loss_before", "inner/loss_before")
_CLASSIFICATION_METRICS = ("eval/accuracy", "eval/accuracy_before", "meta/accuracy", "meta/accuracy_before")
_MAX_TRIALS = 10_000


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as workers.spec: finite numbers only


class Domain(_Spec):
    """Where one field's values come from: exactly one of the five keys."""

    loguniform: tuple[FiniteFloat, FiniteFloat] | None = Field(
        None, description="[low, high]: log-uniform floats, 0 < low <= high")
    uniform: tuple[FiniteFloat, FiniteFloat] | None = Field(None, description="[low, high]: uniform floats")
    randint: tuple[StrictInt | FiniteFloat, StrictInt | FiniteFloat] | None = Field(
        None, description="[low, high]: uniform integers, both bounds included")
    choice: list[Any] | None = Field(
        None, min_length=1, max_length=1000, description="values drawn uniformly at random, one per sample")
    grid: list[Any] | None = Field(
        None, min_length=1, max_length=1000,
        description="every value is run (grid axes multiply; each grid point runs num_samples times)")

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        given = [k for k in _DOMAINS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_DOMAINS)} (got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _DOMAINS if getattr(self, k) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    @model_serializer(mode="plain")
    def _dump(self) -> dict[str, Any]:
        # {"loguniform": [0.001, 0.5]}: the form the API accepts, not five keys with four nulls.
        value = self.value
        return {self.kind: list(value) if isinstance(value, tuple) else value}


class SchedulerSpec(_Spec):
    """Early stopping: ASHA (Li et al., 2020), the median stopping rule (Golovin et al., 2017), or none."""

    type: Literal["asha", "median", "none"] = Field(
        "asha", description="asha: successive halving at rungs; median: stop below the running median; none")
    grace_period: int = Field(
        1, ge=1, le=10_000_000,
        description="meta-iterations a trial runs before it can be stopped (compared at evaluations)")
    reduction_factor: float = Field(
        2.0, gt=1, le=100, description="asha: keep the best 1/reduction_factor of trials at each rung")
    min_samples_required: int = Field(
        3, ge=1, le=10_000, description="median: trials needed at an iteration before one is compared")


class SweepSpec(_Spec):
    """A hyperparameter sweep. ``SweepSpec.model_validate(json)`` validates the space against ``base``."""

    name: str = Field("sweep", min_length=1, max_length=200, pattern=NAME_PATTERN, description="a human-readable name")
    base: JobSpec = Field(default_factory=lambda: JobSpec.model_validate({}),
                          description="the job every trial starts from")
    space: dict[str, Domain] = Field(
        description="field path ('inner.lr', 'inner.steps', 'model') -> its domain; must not be empty")
    metric: str | None = Field(
        None, max_length=100,
        description="reported metric to optimise (default: eval/loss for regression, eval/accuracy for "
                    "classification)")
    mode: Literal["min", "max"] | None = Field(
        None, description="min or max (default: max for accuracies, min otherwise)")
    scheduler: SchedulerSpec = Field(default_factory=lambda: SchedulerSpec.model_validate({}),
                                     description="early stopping")
    num_samples: int = Field(
        4, ge=1, le=_MAX_TRIALS, description="samples drawn from the space (each grid point runs this many)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, le=1024, description="trials run at once (default: as many as the cluster's CPUs allow)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds the sampling of the space")

    @field_validator("space")
    @classmethod
    def _check_space(cls, space: dict[str, Domain], info: ValidationInfo) -> dict[str, Domain]:
        if not space:
            raise ValueError("space: must not be empty")
        base = info.data.get("base")
        if base is None:  # base itself is invalid: its own error names it
            return space
        problems = [p for path, domain in space.items() for p in _check_domain(base, path, domain)]
        for path in space:
            # "model" and "model.kwargs.mode" would both set the same value: which wins is arbitrary.
            problems += [f"space.{path}: overlaps space.{other}" for other in space
                         if path.startswith(other + ".")]
        if problems:
            raise ValueError("; ".join(problems))
        return space

    @field_validator("metric")
    @classmethod
    def _check_metric(cls, metric: str | None, info: ValidationInfo) -> str | None:
        base = info.data.get("base")
        if metric is not None and base is not None and metric not in sweep_metrics(base):
            raise ValueError(f"metric: {metric!r} is not reported; choose one of {', '.join(sweep_metrics(base))}")
        return metric

    @model_validator(mode="after")
    def _resolve(self) -> SweepSpec:
        if self.metric is None:
            self.metric = sweep_metrics(self.base)[0]
        if self.mode is None:
            self.mode = "max" if "accuracy" in self.metric or "return" in self.metric else "min"
        if self.scheduler.type != "none" and "outer.iterations" not in self.space:
            total = self.base.outer.iterations
            if self.scheduler.grace_period >= total:
                raise ValueError(f"scheduler.grace_period: {self.scheduler.grace_period} is not below "
                                 f"outer.iterations ({total}): no trial could be stopped early")
        if trial_count(self) > _MAX_TRIALS:
            raise ValueError(f"num_samples: {trial_count(self)} trials (num_samples x grid points) is above "
                             f"{_MAX_TRIALS}")
        return self


def sweep_metrics(spec: JobSpec) -> tuple[str, ...]:
    """The metrics in every trial report of ``spec`` (reports come at evaluations): those a sweep may
    optimise, the default first (accuracy; loss for regression; meta-RL: the return after the
    evaluation's adaptation steps)."""
    if spec.is_rl:
        steps = spec.eval.steps
        return (f"eval/return_step_{steps}", *(f"eval/return_step_{k}" for k in range(steps)),
                "rl/return_before", "rl/return_after")
    if spec.is_classification:
        return _CLASSIFICATION_METRICS + _REGRESSION_METRICS
    return _REGRESSION_METRICS


def trial_count(sweep: SweepSpec) -> int:
    """How many trials the sweep runs: num_samples times the number of grid points."""
    return sweep.num_samples * math.prod(len(d.grid) for d in sweep.space.values() if d.grid is not None)


# -- field paths ---------------------------------------------------------------------------------


def _field_at(base: JobSpec, path: str) -> tuple[bool, bool]:
    """Does ``path`` address a field of ``base``, and is it an integer field (``int`` or ``int | None``)?

    Walks the spec's actual values, so ``task.ways`` resolves against the base's task family; a
    free-form dict field (``model.kwargs``) accepts any key one level below it.
    """
    node: Any = base
    annotation: Any = None
    for part in path.split("."):
        if isinstance(node, BaseModel):
            fields = type(node).model_fields
            if part not in fields:
                return False, False
            annotation, node = fields[part].annotation, getattr(node, part)
        elif isinstance(node, dict):
            annotation, node = None, node.get(part)
        else:
            return False, False
    args = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    return True, bool(args) and args <= {int, type(None)} and int in args


def _check_domain(base: JobSpec, path: str, domain: Domain) -> list[str]:
    where = f"space.{path}"
    known, is_int = _field_at(base, path) if path else (False, False)
    if not known:
        return [f"{where}: unknown field"]
    kind, value = domain.kind, domain.value
    problems = []
    if kind in ("loguniform", "uniform", "randint"):
        low, high = value
        if low > high:
            problems.append(f"{where}: low {low} above high {high}")
        if kind == "randint" and not all(isinstance(b, int) for b in value):
            problems.append(f"{where}: randint bounds must be integers, got {low} and {high}")
        if kind == "loguniform" and low <= 0:
            problems.append(f"{where}: loguniform needs low > 0, got {low}")
        if kind != "randint" and is_int:
            problems.append(f"{where}: {kind} samples floats but the field takes integers; use randint")
        candidates = [low, high]
    else:
        candidates = list(value)
    if problems:
        return problems
    for candidate in candidates:
        try:
            apply_config(base, {path: candidate})
        except ValidationError as exc:
            reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: "
                                f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
            problems.append(f"{where}: {json.dumps(candidate, default=str)} is refused: {reasons}")
    return problems


def plain(value: Any) -> Any:
    """Tune samples numpy scalars; specs and JSON want Python ones."""
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def apply_config(base: JobSpec, config: dict[str, Any]) -> JobSpec:
    """``base`` with each field path of ``config`` set to its value, validated as a new ``JobSpec``.

    Raises ``pydantic.ValidationError`` when the result is not a valid spec (the location names
    the field). A sub-model path (``"model"``) replaces that whole section.
    """
    data = base.model_dump(mode="python")
    for path, value in config.items():
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = plain(value)
    return JobSpec.model_validate(data)


# -- trial state -----------------------------------------------------------------------------------

TrialStatus = Literal["pending", "running", "paused", "completed", "stopped_early", "failed", "cancelled"]


class TrialInfo(BaseModel):
    """One trial as the control plane shows it.

    Status from Tune's: PENDING -> pending, RUNNING -> running, PAUSED -> paused, ERROR -> failed,
    TERMINATED -> completed (ran all its iterations), stopped_early (the scheduler stopped it) or
    cancelled (the sweep was cancelled while it ran or waited).
    """

    trial_id: str = Field(description="Tune's trial id")
    status: TrialStatus = Field(description="see the class docstring")
    config: dict[str, Any] = Field(description="the sampled value of each field path of the space")
    iteration: int = Field(0, description="meta-iterations done at the last report")
    total_iterations: int = Field(description="meta-iterations the trial runs if not stopped")
    reports: int = Field(0, description="reports received (one per evaluation)")
    metric: float | None = Field(None, description="the sweep metric at the last report")
    best_metric: float | None = Field(None, description="the best value of the sweep metric over all reports")
    metrics: dict[str, float] = Field(default_factory=dict, description="the last report's metrics")
    # Rows stored before the history existed have none: the default keeps them valid.
    history: list[tuple[int, float | None]] = Field(
        default_factory=list,
        description="(iteration, sweep metric) at each report, oldest first; null where the metric was not "
                    "finite; at most 200 points (workers.sweep.HISTORY_POINTS): when full, every other point "
                    "and the newest are kept")
    error: str | None = Field(None, description="why a failed trial failed")
    model_dir: str | None = Field(None, description="completed trials: the exported model folder")
    start_s: float | None = Field(None, description="seconds from the trial's actor start to its first report")
    run_s: float | None = Field(None, description="seconds from the trial's actor start to its last report")

