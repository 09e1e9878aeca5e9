"""Hyperparameter sweeps on Ray Tune: the driver.

``run_sweep`` runs a ``workers.sweep_spec.SweepSpec`` on Ray Tune: ``Tuner`` runs
``workers.sweep_trial.run_trial`` per configuration with the sweep's scheduler (ASHA or the median
stopping rule), turns Tune's trial events into ``TrialInfo`` snapshots for the control plane,
stops every trial on a cancel, and interrupts resumably on a service shutdown.

Example::

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
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from workers.sweep_spec import SweepSpec, TrialInfo, TrialStatus, apply_config, plain
from workers.sweep_trial import run_trial, trial_resources

__all__ = ["EXPERIMENT_DIR", "SweepError", "SweepInterrupted", "SweepResult", "run_sweep"]

logger = logging.getLogger(__name__)

EXPERIMENT_DIR = "tune"  # the Tune experiment folder under a sweep's storage_dir
_POLL_S = 0.5  # how often should_stop() is asked
HISTORY_POINTS = 200  # a trial's history keeps at most this many (iteration, metric) points
_TUNE_STATUS: dict[str, TrialStatus] = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused",
                                        "ERROR": "failed"}


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
        """Trials by status, in the order the statuses first appear."""
        return dict(Counter(t.status for t in self.trials))


# -- the driver ------------------------------------------------------------------------------------


@dataclass
class _Hooks:
    """What a sweep's Tune callback and stopper call, and what they track. Kept out of them, because
    Tune pickles its run config into the experiment folder: a restored sweep finds the live hooks
    here by key."""

    sweep: SweepSpec
    path: Path  # the experiment folder: one live sweep per folder
    on_trial_update: Callable[[list[TrialInfo]], None] | None
    should_stop: Callable[[], bool] | None
    should_interrupt: Callable[[], bool] | None
    polled_at: float = float("-inf")  # when should_stop was last asked
    cancelled: set[str] | None = None  # once cancelled: the trials that were pending, running or paused
    interrupted: bool = False
    started: dict[str, float] = field(default_factory=dict)  # trial id -> its (re)start
    report_s: dict[str, tuple[float, float]] = field(default_factory=dict)  # trial id -> (start_s, run_s)
    errors: dict[str, str] = field(default_factory=dict)  # failed trials' errors, read once
    history: dict[str, list[tuple[int, float | None]]] = field(default_factory=dict)  # trial id -> its curve
    restored: bool = False  # a resumed sweep: its trials' earlier histories are read from Tune's result files
    trials: list = field(default_factory=list)  # Tune's own list of its trials (from any event)
    seen: tuple = ()  # (trial id, Tune status, time of its last result) of every trial, as last published
    infos: list[TrialInfo] | None = None  # every trial, as last published (the end's is the result)


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

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            _on_event(self.key, "begin", trials, None)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _on_event(self.key, "start", trials, trial)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            _on_event(self.key, "result", trials, trial, result)

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


def _on_event(key: str, event: str, trials: list, trial: Any, result: dict | None = None) -> None:
    """Tune's events -> ``on_trial_update(list[TrialInfo])`` when anything changed.

    Tune calls ``on_trial_start`` and ``on_trial_result`` before it applies the new status or
    result to the trial, so those two only time the trial; the change shows at the end of the
    step, which is also when trials ended by a cancel, an error or a scheduler show. The step's
    begin hands over Tune's trial list before the stopper can cancel, so a cancel sees trials
    created in that step. (Callbacks pickled by older code also send "error" and "complete":
    nothing to do for those.) Each result adds a point to its trial's history here: several
    results can arrive between two published snapshots. (Callbacks pickled by older code send no
    result: their sweeps' trials keep no history.)
    """
    hooks = _hooks(key)
    if hooks is None or hooks.interrupted:
        return  # after an interrupt, Tune's clean-up ends trials that the resumed sweep continues
    hooks.trials = trials
    now = time.monotonic()
    if event == "start":
        hooks.started[trial.trial_id] = now
        hooks.report_s.pop(trial.trial_id, None)
    elif event == "result":
        if trial.trial_id in hooks.started:
            # Seconds from the trial's (re)start to its first and to its latest report.
            run_s = round(now - hooks.started[trial.trial_id], 3)
            start_s, _ = hooks.report_s.get(trial.trial_id, (run_s, run_s))
            hooks.report_s[trial.trial_id] = (start_s, run_s)
        if result is not None:
            _add_result(_history(hooks, trial), result, hooks.sweep.metric)
    elif event == "step" and hooks.should_interrupt is not None and _ask(hooks.should_interrupt, "should_interrupt"):
        # Raised at the end of Tune's step, after its experiment checkpoint: ``tune.run`` cleans up
        # the trials' actors and re-raises, without the final checkpoint that would mark them ended.
        hooks.interrupted = True
        logger.info("sweep %s: interrupted; resume=True continues it", hooks.sweep.name)
        raise _Interrupt(f"sweep {hooks.sweep.name} interrupted")
    if event not in ("step", "end"):
        return
    seen = tuple((t.trial_id, str(t.status), t.run_metadata.last_result_time) for t in trials)
    if event == "step" and seen == hooks.seen:
        return  # the common case: nothing happened this step
    hooks.seen = seen
    infos = [_trial_info(t, hooks) for t in trials]
    changed, hooks.infos = infos != hooks.infos, infos
    if not changed or hooks.on_trial_update is None:
        return
    try:
        hooks.on_trial_update(infos)
    except Exception:  # a broken listener must not end the sweep
        logger.exception("on_trial_update failed")


def _stop_all(key: str) -> bool:
    hooks = _hooks(key)
    if hooks is None or hooks.should_stop is None:
        return False
    if hooks.cancelled is not None:
        return True
    now = time.monotonic()
    if now - hooks.polled_at < _POLL_S:  # Tune asks every loop step; should_stop may be a database read
        return False
    hooks.polled_at = now
    if not _ask(hooks.should_stop, "should_stop"):
        return False
    hooks.cancelled = {t.trial_id for t in hooks.trials if str(t.status) in ("PENDING", "RUNNING", "PAUSED")}
    logger.info("sweep %s: cancelled", hooks.sweep.name)
    return True


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
    config = {k: plain(v) for k, v in trial.config.items()}
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
        elif hooks.cancelled is not None and trial.trial_id in hooks.cancelled:
            state = "cancelled"
        else:
            state = "stopped_early"
    else:
        state = _TUNE_STATUS.get(status, "pending")
    if state == "failed" and trial.trial_id not in hooks.errors:
        hooks.errors[trial.trial_id] = _trial_error(trial)  # read once: a failed trial stays failed
    model_dir = None
    if state == "completed" and trial.checkpoint is not None:
        candidate = Path(trial.checkpoint.path) / "model"
        model_dir = str(candidate) if (candidate / "model.safetensors").is_file() else None
    start_s, run_s = hooks.report_s.get(trial.trial_id, (None, None))
    metrics = {k: float(v) for k, v in result.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and "/" in k}
    return TrialInfo(
        trial_id=trial.trial_id, status=state, config=config, iteration=iteration, total_iterations=total,
        reports=int(result.get("training_iteration", 0) or 0),
        metric=_finite(result.get(sweep.metric)),
        best_metric=_finite(analysis.get(sweep.mode)),
        metrics=metrics, history=list(_history(hooks, trial)),
        error=hooks.errors.get(trial.trial_id) if state == "failed" else None, model_dir=model_dir,
        start_s=start_s, run_s=run_s,
    )


def _history(hooks: _Hooks, trial: Any) -> list[tuple[int, float | None]]:
    """A trial's history. In a restored sweep, a trial first seen gets the reports it made before the
    restart from Tune's ``result.json`` in its folder (one JSON result a line)."""
    history = hooks.history.get(trial.trial_id)
    if history is None:
        history = hooks.history[trial.trial_id] = []
        results = hooks.path / _trial_dirname(trial) / "result.json"
        if hooks.restored and results.is_file():
            try:
                for line in results.read_text().splitlines():
                    _add_result(history, json.loads(line) if line.strip() else {}, hooks.sweep.metric)
            except (OSError, ValueError):
                logger.warning("sweep %s: trial %s: its earlier history could not be read from %s",
                               hooks.sweep.name, trial.trial_id, results, exc_info=True)
    return history


def _add_result(history: list[tuple[int, float | None]], result: dict, metric: str) -> None:
    """A Tune result's point, if it reports the sweep metric."""
    if metric in result:
        add_point(history, int(result.get("iteration", 0) or 0), _finite(result[metric]))


def add_point(history: list[tuple[int, float | None]], iteration: int, value: float | None) -> None:
    """Append ``(iteration, value)`` to a trial's history, in place, keeping it bounded.

    A trial restarted from a checkpoint reports iterations again: the points from there on are
    replaced. Past ``HISTORY_POINTS`` points, every other one is dropped, the newest always kept,
    so a long trial's curve keeps its shape and its end.
    """
    while history and history[-1][0] >= iteration:
        history.pop()
    history.append((iteration, value))
    if len(history) > HISTORY_POINTS:
        history[:] = [*history[:-1:2], history[-1]]


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


def _scheduler(sweep: SweepSpec) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    s = sweep.scheduler
    if s.type == "asha":
        domain = sweep.space.get("outer.iterations")  # the longest trial's iterations
        max_t = int(max(domain.value)) if domain is not None else sweep.base.outer.iterations
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

    from workers.raygroup import ensure_ray

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
            run_trial, base=base, launch=launch, scratch_dir=str(scratch),
            data_root=str(Path(data_root).resolve()) if data_root else None,
            cache_dir=str(Path(cache_dir).resolve()) if cache_dir else None,
            allowed_modules=list(allowed_modules) if allowed_modules is not None else None),
        trial_resources(base, launch))
    param_space = _param_space(sweep)
    hooks = _Hooks(sweep=sweep, path=experiment, on_trial_update=on_trial_update, should_stop=should_stop,
                   should_interrupt=should_interrupt)
    with _LIVE_LOCK:
        if key in _LIVE or any(h.path == experiment for h in _LIVE.values()):
            raise SweepError(f"a sweep is already running in {storage_dir}")
        _LIVE[key] = hooks
    try:
        restorable = tune.Tuner.can_restore(str(experiment))
        if resume and restorable:
            logger.info("sweep %s: restoring from %s", sweep.name, experiment)
            hooks.restored = True
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
        trials = hooks.infos or []  # published by Tune's on_experiment_end
    finally:
        with _LIVE_LOCK:
            _LIVE.pop(key, None)
    shutil.rmtree(scratch, ignore_errors=True)  # what stopped trials' threads left behind
    best = _best(trials, sweep.mode or "min")
    best_dir = Path(best.model_dir) if best is not None and best.model_dir else None
    result = SweepResult(trials=trials, best=best, best_model_dir=best_dir,
                         metric=sweep.metric or "eval/loss", mode=sweep.mode or "min",
                         cancelled=hooks.cancelled is not None, experiment_path=experiment,
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
