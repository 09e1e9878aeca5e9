"""Hyperparameter sweeps on Ray Tune: a search space over ``JobSpec`` field paths, early stopping.

A sweep is a base ``JobSpec`` plus a search space keyed by field path (``"inner.lr"``,
``"inner.steps"``, ``"model"``), a metric the trainer reports, a scheduler (ASHA or the median
stopping rule) and a number of samples. ``SweepSpec`` validates all of it against ``JobSpec``
itself: every range bound and every choice is applied to the base spec and validated, so a value
the job API would refuse is refused here, naming the field.

Execution follows the Ray 2.60 pattern for Tune over Train V2: ``Tuner`` runs a *function
trainable* (``_trial``) per configuration, and the function launches the trial's trainer. A
one-worker trial runs ``workers.training.Trainer`` in the trial's own actor ("in_process"); a
trial whose spec asks for several workers drives ``workers.distributed.RayExecutor`` shard
actors placed in the trial's placement group ("distributed"). ``benchmarks/sweep.py`` measures
both: a trial's start is dominated by starting a Python process that imports torch and builds
the trainer (the first optimizer imports ``torch._dynamo``), which the distributed launch pays
twice (the trial actor and its shard actor). So ``launch="auto"`` runs one-worker trials in
process, and Tune's ``reuse_actors`` (on by default) hands a finished or stopped trial's warm
actor to the next trial, which then starts in a fraction of a second.

Each trial reports at every evaluation (``eval.every`` meta-iterations) with a Tune checkpoint
holding its training checkpoint; the final report also holds the exported model
(``model/model.safetensors`` + ``model/model.json``, as ``Trainer.export`` writes). Schedulers
compare trials on the meta-iteration (``iteration``), so ``grace_period`` is in meta-iterations.

Example::

    sweep = SweepSpec.model_validate({
        "base": {"outer": {"iterations": 200}, "eval": {"every": 20, "tasks": 20}},
        "space": {"inner.lr": {"loguniform": [0.001, 0.5]}, "inner.steps": {"choice": [1, 3, 5]}},
        "scheduler": {"type": "asha", "grace_period": 20},
        "num_samples": 8,
    })
    result = run_sweep(sweep, storage_dir=Path("runs/sweep-1"), on_trial_update=print)
    result.best_model_dir   # runs/sweep-1/tune/trial_<id>/checkpoint_<n>/model
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import torch
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

from workers.errors import WorkerLost
from workers.spec import JobSpec
from workers.training import Trainer

__all__ = [
    "Domain",
    "SchedulerSpec",
    "SweepError",
    "SweepInterrupted",
    "SweepResult",
    "SweepSpec",
    "TrialInfo",
    "TrialStatus",
    "apply_config",
    "run_sweep",
    "sweep_metrics",
    "trial_count",
]

logger = logging.getLogger(__name__)

EXPERIMENT_DIR = "tune"  # the Tune experiment folder under a sweep's storage_dir
_DOMAINS = ("loguniform", "uniform", "randint", "choice", "grid")
# Metrics present in every report (reports happen at evaluations), by task kind.
_REGRESSION_METRICS = ("eval/loss", "eval/loss_before", "meta/loss", "meta/loss_before", "inner/loss_before")
_CLASSIFICATION_METRICS = ("eval/accuracy", "eval/accuracy_before", "meta/accuracy", "meta/accuracy_before")
_MAX_TRIALS = 10_000
_POLL_S = 0.5  # how often should_stop() is asked


class SweepError(RuntimeError):
    """A sweep could not run (bad storage state, Tune failure); trial failures are not raised."""


class SweepInterrupted(SweepError):
    """``should_interrupt()`` turned true: the sweep stopped as a crash would, minus the crash.

    Tune's experiment state is left as its last checkpoint saved it (unfinished trials still
    unfinished, unlike a cancel, which ends them), and the trials' actors are stopped; a later
    ``run_sweep(..., resume=True)`` on the same folder continues it. A service's clean shutdown.
    """


class _Interrupt(Exception):
    """Raised inside Tune's loop (from a callback) to leave it through Tune's own clean-up."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


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

    name: str = Field("sweep", min_length=1, max_length=200, description="a human-readable name")
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
            self.metric = "eval/accuracy" if self.base.is_classification else "eval/loss"
        if self.mode is None:
            self.mode = "max" if "accuracy" in self.metric else "min"
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
    """The metrics in every trial report of ``spec``: those a sweep may optimise."""
    return _REGRESSION_METRICS + (_CLASSIFICATION_METRICS if spec.is_classification else ())


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
            reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {_message(e)}"
                                for e in exc.errors())
            problems.append(f"{where}: {json.dumps(candidate, default=str)} is refused: {reasons}")
    return problems


def _message(error: Any) -> str:
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def _plain(value: Any) -> Any:
    """Tune samples numpy scalars; specs and JSON want Python ones."""
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
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
        node[leaf] = _plain(value)
    return JobSpec.model_validate(data)


# -- trial state -----------------------------------------------------------------------------------

TrialStatus = Literal["pending", "running", "paused", "completed", "stopped_early", "failed", "cancelled"]
_TUNE_STATUS: dict[str, TrialStatus] = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused",
                                        "ERROR": "failed"}


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
    error: str | None = Field(None, description="why a failed trial failed")
    model_dir: str | None = Field(None, description="completed trials: the exported model folder")
    start_s: float | None = Field(None, description="seconds from the trial's actor start to its first report")
    run_s: float | None = Field(None, description="seconds from the trial's actor start to its last report")


class SweepResult(BaseModel):
    trials: list[TrialInfo] = Field(description="every trial, in creation order")
    best: TrialInfo | None = Field(description="the completed trial with the best last metric")
    best_model_dir: Path | None = Field(description="its exported model (model.safetensors + model.json)")
    metric: str
    mode: Literal["min", "max"]
    cancelled: bool = Field(description="the sweep was cancelled through should_stop")
    experiment_path: Path = Field(description="Tune's experiment folder (what resume restores from)")
    wall_s: float = Field(description="seconds run_sweep took")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.status] = out.get(t.status, 0) + 1
        return out


# -- the trial ---------------------------------------------------------------------------------------


class _TuneReporter:
    """The trainer's reporter inside a trial: ``tune.report`` at every evaluation, with a Tune
    checkpoint when ``checkpoint.every`` iterations have passed since the last one, and always at
    the end (that one also holds the exported model)."""

    def __init__(self, spec: JobSpec, run_dir: Path, entered: float) -> None:
        self.spec, self.run_dir, self.entered = spec, run_dir, entered
        self.trainer: Trainer | None = None
        self.setup_s = 0.0
        self.train_s = 0.0
        self.since = time.perf_counter()
        self.checkpointed = 0  # iteration of the last Tune checkpoint

    def ready(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.checkpointed = trainer.iteration
        self.setup_s = time.perf_counter() - self.entered
        self.since = time.perf_counter()

    def __call__(self, iteration: int, metrics: dict[str, float]) -> None:
        from ray import tune

        if self.trainer is None:
            raise RuntimeError("the reporter was called before its trainer was ready")
        self.train_s += time.perf_counter() - self.since
        result = {**metrics, "iteration": iteration, "perf/setup_s": self.setup_s, "perf/train_s": self.train_s}
        final = iteration >= self.spec.outer.iterations
        if not final and iteration - self.checkpointed < self.spec.checkpoint.every:
            tune.report(result)
        else:
            saved = self.trainer.checkpoint()
            out = self.run_dir / f"report-{iteration:08d}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(saved, out / "checkpoints" / saved.name)
            if final:
                # A scheduler's STOP at max_t may end the trial before Trainer.run's own export.
                self.trainer.export(out / "model")
            # Tune copies the folder to the sweep's storage before this returns; it then blocks until
            # the driver asks for the next result (and ends this thread if the trial was stopped).
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(out)))
            shutil.rmtree(out, ignore_errors=True)
            self.checkpointed = iteration
        self.since = time.perf_counter()


def _trial(config: dict[str, Any], *, base: dict[str, Any], launch: str, scratch_dir: str, data_root: str | None,
           cache_dir: str | None, allowed_modules: list[str] | None, max_restarts: int = 3) -> None:
    """The function trainable: one configuration, trained to its end (or until Tune stops it)."""
    from ray import tune

    entered = time.perf_counter()
    spec = apply_config(JobSpec.model_validate(base), config)
    torch.set_num_threads(spec.resources.threads_per_worker)
    # The trainer's own folder is scratch, outside Tune's trial folder (Tune syncs that one while the
    # trainer rotates checkpoints in it); Tune's checkpoints are what a resume starts from.
    run_dir = Path(scratch_dir) / tune.get_context().get_trial_id()
    shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of a crash are not what Tune resumes from
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            shutil.copytree(Path(folder) / "checkpoints", run_dir / "checkpoints")
    root = Path(data_root) if data_root else None
    cache = Path(cache_dir) if cache_dir else None
    factory = None
    device = None
    if _launch_for(spec, launch) == "distributed":
        from workers.distributed import RayExecutor

        def factory(s: JobSpec, family: Any, model: Any) -> RayExecutor:
            # Shard actors land in this trial's placement group (Tune captures child actors).
            return RayExecutor(s, data_root=root, cache_dir=cache, allowed_modules=allowed_modules)
    elif spec.resources.gpus_per_worker > 0 and torch.cuda.is_available():
        device = torch.device("cuda")
    reporter = _TuneReporter(spec, run_dir, entered)
    restarts = 0
    while True:
        # Only evaluations report (every report must carry the sweep metric); the last iteration
        # always evaluates.
        trainer = Trainer(spec, run_dir=run_dir, reporter=reporter, executor_factory=factory,
                          allowed_modules=allowed_modules, report_every=spec.outer.iterations + 1,
                          device=device, data_root=root, cache_dir=cache)
        reporter.ready(trainer)
        try:
            trainer.run()
            break
        except WorkerLost as exc:  # a shard actor died: restart the group from the last checkpoint
            restarts += 1
            if restarts > max_restarts:
                raise
            logger.warning("trial %s: %s; restarting its workers (%d/%d)", tune.get_context().get_trial_id(),
                           exc, restarts, max_restarts)
    shutil.rmtree(run_dir, ignore_errors=True)  # the model and checkpoints now live in Tune's checkpoints


def _launch_for(spec: JobSpec, launch: str) -> str:
    if launch == "auto":
        return "in_process" if spec.resources.workers == 1 else "distributed"
    return launch


def _resources(base: dict[str, Any], launch: str) -> Callable[[dict[str, Any]], Any]:
    def request(config: dict[str, Any]) -> Any:
        from ray.tune import PlacementGroupFactory

        spec = apply_config(JobSpec.model_validate(base), config)
        res = spec.resources
        bundle = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
        if _launch_for(spec, launch) == "in_process":
            return PlacementGroupFactory([bundle])
        # An empty head bundle for the trial's driver thread, one bundle per shard actor.
        return PlacementGroupFactory([{}] + [bundle] * res.workers)

    return request


# -- the driver ------------------------------------------------------------------------------------


@dataclass
class _Hooks:
    """What a sweep's Tune callback and stopper call. Kept out of them, because Tune pickles its
    run config into the experiment folder: a restored sweep finds the live hooks here by key."""

    sweep: SweepSpec
    on_trial_update: Callable[[list[TrialInfo]], None] | None
    should_stop: Callable[[], bool] | None
    path: Path
    cancelled_at: float | None = None
    live_at_cancel: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    first_report: dict[str, float] = field(default_factory=dict)
    last_report: dict[str, float] = field(default_factory=dict)
    last_sent: list[TrialInfo] | None = None
    statuses: tuple = ()
    trials: list = field(default_factory=list)  # Tune's Trial objects, as last seen
    polled_at: float = float("-inf")
    should_interrupt: Callable[[], bool] | None = None
    interrupted: bool = False


_LIVE: dict[str, _Hooks] = {}
_LIVE_LOCK = threading.Lock()


def _hooks(key: str) -> _Hooks | None:
    with _LIVE_LOCK:
        return _LIVE.get(key)


@functools.cache
def _tune_classes() -> tuple[type, type]:
    """Tune's callback and stopper for sweeps. Their methods only forward to module functions:
    Tune pickles them into the experiment folder, and a restored sweep should run current code."""
    from ray import tune

    class SweepCallback(tune.Callback):
        def __init__(self, key: str) -> None:
            self.key = key

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _on_event(self.key, "start", trials, trial)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            _on_event(self.key, "result", trials, trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _on_event(self.key, "error", trials, trial)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _on_event(self.key, "complete", trials, trial)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            _on_event(self.key, "step", trials, None)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            _on_event(self.key, "end", trials, None)

    class CancelStopper(tune.Stopper):
        """Stops every trial once ``should_stop()`` says so (Tune polls ``stop_all`` every step)."""

        def __init__(self, key: str) -> None:
            self.key = key

        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            return _stop_all(self.key)

    return SweepCallback, CancelStopper


def _on_event(key: str, event: str, trials: list, trial: Any) -> None:
    """Tune's trial events -> ``on_trial_update(list[TrialInfo])`` when anything changed."""
    hooks = _hooks(key)
    if hooks is None or hooks.interrupted:
        return  # after an interrupt, Tune's clean-up ends trials that the resumed sweep continues
    if event == "step" and hooks.should_interrupt is not None and _ask(hooks.should_interrupt, "should_interrupt"):
        # Raised at the end of Tune's step, after its experiment checkpoint: ``tune.run`` cleans up
        # the trials' actors and re-raises, without the final checkpoint that would mark them ended.
        hooks.interrupted = True
        logger.info("sweep %s: interrupted; resume=True continues it", hooks.sweep.name)
        raise _Interrupt(f"sweep {hooks.sweep.name} interrupted")
    now = time.monotonic()
    if event == "start":
        hooks.started[trial.trial_id] = now
        hooks.first_report.pop(trial.trial_id, None)
    elif event == "result":
        hooks.first_report.setdefault(trial.trial_id, now)
        hooks.last_report[trial.trial_id] = now
    elif event == "error":
        hooks.errors[trial.trial_id] = _trial_error(trial)
    statuses = tuple((t.trial_id, str(t.status)) for t in trials)
    if event == "step" and statuses == hooks.statuses:
        return  # the common case: nothing happened this step
    # A cancel ends trials without a per-trial event: the step check above catches it.
    hooks.statuses, hooks.trials = statuses, list(trials)
    infos = [_trial_info(t, hooks) for t in trials]
    if infos == hooks.last_sent or hooks.on_trial_update is None:
        return
    hooks.last_sent = infos
    try:
        hooks.on_trial_update(infos)
    except Exception:  # a broken listener must not end the sweep
        logger.exception("on_trial_update failed")


def _stop_all(key: str) -> bool:
    hooks = _hooks(key)
    if hooks is None or hooks.should_stop is None:
        return False
    if hooks.cancelled_at is not None:
        return True
    now = time.monotonic()
    if now - hooks.polled_at < _POLL_S:  # Tune asks every loop step; should_stop may be a database read
        return False
    hooks.polled_at = now
    try:
        stop = bool(hooks.should_stop())
    except Exception:
        logger.exception("should_stop failed; the sweep goes on")
        return False
    if stop:
        hooks.cancelled_at = time.monotonic()
        hooks.live_at_cancel = {tid for tid, status in hooks.statuses if status in ("PENDING", "RUNNING", "PAUSED")}
        logger.info("sweep %s: cancelled", hooks.sweep.name)
    return stop


def _ask(fn: Callable[[], bool], name: str) -> bool:
    try:
        return bool(fn())
    except Exception:
        logger.exception("%s failed; the sweep goes on", name)
        return False


def _trial_error(trial: Any) -> str:
    """``Type: message`` of the exception that ended a trial (Tune wraps it in a RayTaskError)."""
    exc: Any = None
    try:
        # The driver's staging copy exists as soon as Tune handled the error; storage gets it later.
        local = trial.pickled_error_file
        if local and Path(local).is_file():
            from ray import cloudpickle

            exc = cloudpickle.loads(Path(local).read_bytes())
        else:
            exc = trial.get_pickled_error()
    except Exception:  # unpicklable or unreadable: fall back to the text trace
        exc = None
    if exc is not None:
        cause = getattr(exc, "cause", None) or exc
        return f"{type(cause).__name__}: {cause}"[:4000]
    text = ""
    try:
        local = trial.error_file
        text = Path(local).read_text() if local and Path(local).is_file() else (trial.get_error() or "")
    except Exception:
        pass
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "the trial failed (no error recorded)")[:4000]


def _trial_info(trial: Any, hooks: _Hooks) -> TrialInfo:
    sweep = hooks.sweep
    config = {k: _plain(v) for k, v in trial.config.items()}
    try:
        total = apply_config(sweep.base, config).outer.iterations
    except ValidationError:
        total = sweep.base.outer.iterations
    result = trial.run_metadata.last_result or {}
    iteration = int(result.get("iteration", 0) or 0)
    analysis = trial.metric_analysis.get(sweep.metric, {})
    status = str(trial.status)
    if status == "TERMINATED":
        if iteration >= total:
            state: TrialStatus = "completed"
        elif hooks.cancelled_at is not None and trial.trial_id in hooks.live_at_cancel:
            state = "cancelled"
        else:
            state = "stopped_early"
    else:
        state = _TUNE_STATUS.get(status, "pending")
    error = None
    if state == "failed":
        error = hooks.errors.get(trial.trial_id)
        if error is None:
            error = hooks.errors[trial.trial_id] = _trial_error(trial)
    model_dir = None
    if state == "completed" and trial.checkpoint is not None:
        candidate = Path(trial.checkpoint.path) / "model"
        model_dir = str(candidate) if (candidate / "model.safetensors").is_file() else None
    started = hooks.started.get(trial.trial_id)
    first, last = hooks.first_report.get(trial.trial_id), hooks.last_report.get(trial.trial_id)
    metrics = {k: float(v) for k, v in result.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and "/" in k}
    return TrialInfo(
        trial_id=trial.trial_id, status=state, config=config, iteration=iteration, total_iterations=total,
        reports=int(result.get("training_iteration", 0) or 0),
        metric=_finite(result.get(sweep.metric)),
        best_metric=_finite(analysis.get(sweep.mode)),
        metrics=metrics, error=error, model_dir=model_dir,
        start_s=round(first - started, 3) if started is not None and first is not None and first >= started else None,
        run_s=round(last - started, 3) if started is not None and last is not None and last >= started else None,
    )


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _param_space(sweep: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for path, domain in sweep.space.items():
        kind, value = domain.kind, domain.value
        if kind == "loguniform":
            space[path] = tune.loguniform(*value)
        elif kind == "uniform":
            space[path] = tune.uniform(*value)
        elif kind == "randint":
            space[path] = tune.randint(value[0], value[1] + 1)  # Tune excludes the upper bound
        elif kind == "choice":
            space[path] = tune.choice(list(value))
        else:
            space[path] = tune.grid_search(list(value))
    return space


def _max_iterations(sweep: SweepSpec) -> int:
    domain = sweep.space.get("outer.iterations")
    if domain is None:
        return sweep.base.outer.iterations
    return int(max(domain.value))


def _scheduler(sweep: SweepSpec) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    s = sweep.scheduler
    if s.type == "asha":
        max_t = _max_iterations(sweep)
        return AsyncHyperBandScheduler(time_attr="iteration", max_t=max_t, grace_period=min(s.grace_period, max_t),
                                       reduction_factor=s.reduction_factor)
    if s.type == "median":
        return MedianStoppingRule(time_attr="iteration", grace_period=s.grace_period,
                                  min_samples_required=s.min_samples_required)
    return FIFOScheduler()


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def run_sweep(
    sweep: SweepSpec,
    *,
    storage_dir: Path,
    on_trial_update: Callable[[list[TrialInfo]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    data_root: Path | None = None,
    cache_dir: Path | None = None,
    allowed_modules: Iterable[str] | None = None,
    resume: bool = False,
    launch: Literal["auto", "in_process", "distributed"] = "auto",
    reuse_actors: bool = True,
    should_interrupt: Callable[[], bool] | None = None,
) -> SweepResult:
    """Run ``sweep`` on Ray Tune to its end and return every trial and the best one.

    Blocks until every trial ended or ``should_stop()`` turned true (then running and pending
    trials end as cancelled). Failing trials are marked failed and the sweep goes on.
    ``on_trial_update(trials)`` gets the full trial list whenever something changed, on the
    calling thread. Tune's state and every trial's checkpoints live under
    ``storage_dir/tune``; with ``resume=True`` a sweep interrupted there (a service restart) is
    restored: unfinished and errored trials continue from their last report's checkpoint,
    finished ones are kept. ``storage_dir`` must be on storage every Ray node sees.
    ``should_interrupt()`` (asked at every step of Tune's loop: keep it cheap) stops the sweep
    resumably and raises ``SweepInterrupted``: what a service does on shutdown.
    """
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from workers.distributed import ensure_ray

    ensure_ray()
    start = time.perf_counter()
    storage_dir = Path(storage_dir).resolve()
    storage_dir.mkdir(parents=True, exist_ok=True)
    experiment = storage_dir / EXPERIMENT_DIR
    scratch = storage_dir / "scratch"  # trials' working folders; removed when the sweep ends
    # The callback and stopper find this call's hooks by a key that Tune pickles with them, so a
    # restored sweep (even from a moved folder) reaches the live hooks of the resuming call.
    key_file = storage_dir / ".sweep-key"
    key = key_file.read_text().strip() if resume and key_file.is_file() else uuid.uuid4().hex
    base = sweep.base.model_dump(mode="json")
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial, base=base, launch=launch, scratch_dir=str(scratch),
            data_root=str(Path(data_root).resolve()) if data_root else None,
            cache_dir=str(Path(cache_dir).resolve()) if cache_dir else None,
            allowed_modules=list(allowed_modules) if allowed_modules is not None else None),
        _resources(base, launch))
    param_space = _param_space(sweep)
    hooks = _Hooks(sweep=sweep, on_trial_update=on_trial_update, should_stop=should_stop, path=experiment,
                   should_interrupt=should_interrupt)
    with _LIVE_LOCK:
        if key in _LIVE or any(h.path == experiment for h in _LIVE.values()):
            raise SweepError(f"a sweep is already running in {storage_dir}")
        _LIVE[key] = hooks
    try:
        restorable = tune.Tuner.can_restore(str(experiment))
        if resume and restorable:
            logger.info("sweep %s: restoring from %s", sweep.name, experiment)
            # Errored trials are resumed too: a crash of the service can leave trials errored by
            # their actors dying; a trial that fails on its own fails again, quickly.
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, param_space=param_space)
        else:
            if restorable:
                raise SweepError(f"{experiment} already holds a sweep: pass resume=True to continue it")
            if resume:
                logger.warning("sweep %s: nothing to resume in %s; starting it", sweep.name, experiment)
            (storage_dir / "sweep.json").write_text(sweep.model_dump_json(indent=2))
            key_file.write_text(key)
            callback_cls, stopper_cls = _tune_classes()
            callback, stopper = callback_cls(key), stopper_cls(key)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                    scheduler=_scheduler(sweep), reuse_actors=reuse_actors,
                    search_alg=BasicVariantGenerator(max_concurrent=sweep.max_concurrent_trials or 0,
                                                     random_state=sweep.seed),
                    trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=EXPERIMENT_DIR, storage_path=str(storage_dir), stop=stopper, callbacks=[callback],
                    # A failing trial is marked failed; the others go on (fail_fast=False is also
                    # Tune's default). No retries: most failures here are the configuration's own.
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.base.checkpoint.keep),
                    verbose=0),
            )
        try:
            grid = tuner.fit()
        except Exception as exc:
            if hooks.interrupted:
                raise SweepInterrupted(f"sweep {sweep.name} was interrupted; resume=True continues it") from exc
            raise SweepError(f"sweep {sweep.name} failed: {type(exc).__name__}: {exc}") from exc
        if grid.num_errors:
            logger.warning("sweep %s: %d trial(s) failed", sweep.name, grid.num_errors)
        trials = [_trial_info(t, hooks) for t in hooks.trials]
    finally:
        with _LIVE_LOCK:
            _LIVE.pop(key, None)
    shutil.rmtree(scratch, ignore_errors=True)  # what stopped trials' threads left behind
    best = _best(trials, sweep.mode or "min")
    best_dir = Path(best.model_dir) if best is not None and best.model_dir else None
    result = SweepResult(trials=trials, best=best, best_model_dir=best_dir,
                         metric=sweep.metric or "eval/loss", mode=sweep.mode or "min",
                         cancelled=hooks.cancelled_at is not None, experiment_path=experiment,
                         wall_s=time.perf_counter() - start)
    logger.info("sweep %s: %s in %.1fs; best %s", sweep.name, result.counts(), result.wall_s,
                f"{best.trial_id} ({sweep.metric}={best.metric})" if best else "none")
    return result


def _best(trials: list[TrialInfo], mode: str) -> TrialInfo | None:
    done = [t for t in trials if t.status == "completed" and t.model_dir is not None and t.metric is not None]
    if not done:
        return None
    pick = min if mode == "min" else max
    return pick(done, key=lambda t: t.metric)  # type: ignore[arg-type, return-value]
