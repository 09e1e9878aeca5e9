"""The job manager and the sweep manager: :class:`service.runs.RunQueue` specialised to run a job, or a sweep.

A job runner (``workers.run.run_training`` by default) blocks until the job ends, resumes
from ``run_dir/checkpoints`` on its own, reports ``(iteration, metrics)`` and polls
``should_stop``. :class:`JobManager` buffers the reports and writes them at most every
``metrics_flush_s`` (and at every evaluation and the last iteration), with the progress and an ETA.

A sweep is driven by ``workers.sweep.run_sweep`` on the service's Ray cluster (Ray Tune).
:class:`SweepManager` writes the trial snapshot (at once when a trial's status changes, otherwise
at most every ``metrics_flush_s``); ``should_stop`` reads the cancel flag, so a cancel through any
process reaches the sweep within a second. A sweep that ends with a completed trial registers that
best trial's model; one with no completed trial is failed with the trials' errors (a failing trial
is only shown failed: the sweep goes on). A shutdown interrupts the sweep resumably (Tune's state
stays in ``storage/sweeps/<id>``, see ``run_sweep(should_interrupt=...)``), and every sweep that has
Tune state continues with ``resume=True``; a resume that fails marks the sweep failed with the reason.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service import jobs, registry, runs, sweeps, tracking
from service.config import Settings
from service.db import Job, Model, Sweep
from service.metrics import ServiceMetrics
from service.runs import Outcome, RunQueue
from service.schemas import finite_metrics
from workers.run import TrainResult
from workers.spec import JobSpec
from workers.sweep import EXPERIMENT_DIR, SweepInterrupted, run_sweep
from workers.sweep_spec import SweepSpec, TrialInfo

logger = logging.getLogger(__name__)


class RunFn(Protocol):
    """The runner contract (``workers.run.run_training``)."""

    def __call__(self, spec: JobSpec, *, run_dir: Path, reporter: Callable[[int, dict[str, float]], None],
                 should_stop: Callable[[], bool], data_root: Path | None = None, cache_dir: Path | None = None,
                 allowed_modules: Iterable[str] | None = None, report_every: int = 1,
                 checkpoint_dir: str | Path | None = None, use_ray: bool = True) -> TrainResult: ...


def default_run_fn(settings: Settings) -> RunFn:
    """``workers.run.run_training`` on the connected Ray cluster, with the settings' start-up timeout."""
    from workers.run import run_training

    return functools.partial(run_training, worker_start_timeout_s=settings.worker_start_timeout_s)


def _flush_quietly(run: _JobRun | _SweepRun, kind: str) -> None:
    try:
        run.flush(force=True)
    except Exception:
        logger.exception("%s %s: could not write its last reports", kind, run.run_id)


# --------------------------------------------------------------------------------------------- jobs


class _JobRun:
    """One running job: its cancel flag and its buffered reports."""

    def __init__(self, manager: JobManager, job: Job, cancel: threading.Event,
                 tracker: tracking.RunTracker | None = None) -> None:
        self.manager, self.run_id, self.total, self.cancel = manager, job.id, job.total, cancel
        self.tracker = tracker  # TensorBoard / MLflow (service.tracking): fed the points each flush stores
        self.lock = threading.Lock()
        self.buffer: list[tuple[int, dict[str, float]]] = []
        self.first: tuple[int, float] | None = None  # (iteration, time) of this run's first report
        # Stored points from here on are replaced at the next flush: those an interrupted run reported
        # after the checkpoint this one resumed from, or a restarted worker group replays.
        self.replace_from: int | None = None
        self.last_flush = time.monotonic()
        self.last_iteration = job.iteration  # the last progress stored, to count new iterations
        # Past settings.max_metric_points the series keeps every stride-th iteration (and every
        # evaluation and the last one): a long job's series, and the SSE replay of it, stay bounded.
        self.stride = max(1, math.ceil(job.total / manager.settings.max_metric_points))
        # Reports are written before each checkpoint is: a driver that dies after a checkpoint has
        # stored every point up to it (a resume from it does not report them again).
        self.checkpoint_every = int(job.spec.get("checkpoint", {}).get("every", 0)) or None

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.manager.stopping

    def report(self, iteration: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        with self.lock:
            if self.first is None:
                self.first = (iteration, now)
                self.replace_from = iteration
            elif iteration <= self.last_iteration:  # the worker group restarted from a checkpoint
                self.buffer = [point for point in self.buffer if point[0] < iteration]
                self.replace_from = min(iteration, self.replace_from or iteration)
            if (iteration % self.stride == 0 or iteration >= self.total
                    or any(name.startswith("eval/") for name in metrics)):
                self.buffer.append((iteration, dict(metrics)))
            self.manager.metrics.iterations.inc(max(0, iteration - self.last_iteration))
            self.last_iteration = iteration
            due = (now - self.last_flush >= self.manager.settings.metrics_flush_s
                   or "eval/loss" in metrics or iteration >= self.total
                   or (self.checkpoint_every is not None and iteration % self.checkpoint_every == 0))
        if due:
            self.flush()

    def eta_s(self) -> float | None:
        if self.first is None or self.last_iteration <= self.first[0]:
            return None
        rate = (self.last_iteration - self.first[0]) / max(time.monotonic() - self.first[1], 1e-9)
        return max(0.0, (self.total - self.last_iteration) / rate)

    def flush(self, *, force: bool = False) -> None:
        with self.lock:
            points, self.buffer = self.buffer, []
            replace_from, self.replace_from = self.replace_from, None
            self.last_flush = time.monotonic()
            eta = self.eta_s()
        if not points and replace_from is None:
            return
        with self.manager.session_factory() as session:
            try:
                jobs.record_progress(session=session, job_id=self.run_id, points=points, eta_s=eta,
                                     replace_from=replace_from)
            except jobs.ProgressNotRecorded as exc:
                # Nothing was written (the database locked or unreachable for longer than the retries):
                # a failed write never fails the job; the points wait in front of the buffer for the next flush.
                logger.warning("job %s: %s; kept for the next flush", self.run_id, exc)
                with self.lock:
                    self.buffer[:0] = [point for point in points  # (less what a replay since replaces)
                                       if self.replace_from is None or point[0] < self.replace_from]
                    if replace_from is not None:
                        self.replace_from = min(replace_from, self.replace_from or replace_from)
                return
            if self.tracker is not None:
                self.tracker.log(points)  # never raises: a tracking failure is a warning
            try:  # a cancel requested through another process reaches us here, at most one flush late
                if runs.is_cancel_requested(session=session, table=Job, run_id=self.run_id):
                    self.cancel.set()
            except SQLAlchemyError:
                logger.warning("job %s: the cancel flag was not read; asked again at the next flush", self.run_id,
                               exc_info=True)


class JobManager(RunQueue[Job]):
    """Runs queued jobs on ``settings.max_concurrent_jobs`` threads (see :class:`service.runs.RunQueue`).

    >>> manager = JobManager(settings=settings, session_factory=factory)   # runner: Ray
    """

    table = Job

    def __init__(self, *, settings: Settings, session_factory: sessionmaker[Session], run_fn: RunFn | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        super().__init__(settings=settings, session_factory=session_factory, slots=settings.max_concurrent_jobs,
                         max_attempts=settings.max_job_attempts)
        self.run_fn = run_fn
        self.in_driver = False  # a driver actor's queue (for_driver), which reserved a one-worker job's CPUs
        self.metrics = metrics or ServiceMetrics()
        self.trackers: dict[str, tracking.RunTracker] = {}  # succeeded jobs' trackers, until their model is registered

    @classmethod
    def for_driver(cls, *, settings: Settings, session_factory: sessionmaker[Session]) -> JobManager:
        queue = cls(settings=settings, session_factory=session_factory, run_fn=default_run_fn(settings))
        queue.in_driver = True
        return queue

    @staticmethod
    def trains_in_driver(spec: JobSpec) -> bool:
        """A one-worker CPU job trains in its driver actor, which reserves the worker's CPUs: no second
        process to start (a Ray worker's start and imports: seconds) and nothing to send between two."""
        return spec.resources.workers == 1 and spec.resources.gpus_per_worker == 0

    @classmethod
    def driver_cpus(cls, spec: dict[str, Any], settings: Settings) -> float:
        job = JobSpec.model_validate(spec)
        if cls.trains_in_driver(job):
            return max(settings.driver_cpus, job.resources.cpus_per_worker)
        return settings.driver_cpus

    def start(self) -> None:
        if self.run_fn is None and not self._threads:
            self.run_fn = default_run_fn(self.settings)
        super().start()

    def interrupted_detail(self, row: Job) -> str:
        return f"; last progress at iteration {row.iteration}"

    def register(self, session: Session, row: Job, export_dir: Path) -> Model:
        tracker = self.trackers.pop(row.id, None)
        try:
            model = registry.register_model(session=session, job=row, export_dir=export_dir,
                                            storage=self.settings.storage_path)
            if tracker is not None:
                tracker.log_model(Path(model.path), model.id)
        finally:
            if tracker is not None:
                tracker.close("succeeded")
        return model

    def ended(self, outcome: str) -> None:
        if outcome != "queued":
            self.metrics.jobs_finished.labels(outcome).inc()

    def execute(self, row: Job, cancel: threading.Event) -> Outcome:
        settings = self.settings
        if self.run_fn is None:
            raise RuntimeError("the job manager runs jobs only after start()")
        tracker = tracking.open_job(settings, job_id=row.id, tenant=row.tenant, name=row.name, spec=row.spec)
        status = "failed"
        try:
            outcome = self._train(row, cancel, _JobRun(self, row, cancel, tracker))
            status = outcome[0]
            return outcome
        finally:
            if tracker is not None and status == "succeeded":
                self.trackers[row.id] = tracker  # closed once its model is registered
            elif tracker is not None:
                tracker.close(status)

    def _train(self, row: Job, cancel: threading.Event, run: _JobRun) -> Outcome:
        settings = self.settings
        assert self.run_fn is not None
        try:
            spec = JobSpec.model_validate(row.spec)
            local = {"use_ray": False} if self.in_driver and self.trains_in_driver(spec) else {}
            result = self.run_fn(
                spec, run_dir=settings.storage_path / "jobs" / row.id, reporter=run.report,
                should_stop=run.should_stop, data_root=settings.data_root, cache_dir=settings.cache_path,
                allowed_modules=settings.model_allowlist, report_every=settings.report_every,
                checkpoint_dir=settings.job_checkpoint_dir(row.id), **local)
        except Exception as exc:
            _flush_quietly(run, "job")
            return self.failed(row, exc, cancel)
        _flush_quietly(run, "job")
        final = {"iteration": result.iteration, "metrics": finite_metrics({**result.metrics, **result.eval_metrics})}
        if result.cancelled:
            return ("cancelled", final) if cancel.is_set() else ("queued", {})
        if result.model_dir is None:
            return "failed", {"error": "RuntimeError: the runner returned no exported model", **final}
        return "succeeded", {"export_dir": Path(result.model_dir), **final}


# ------------------------------------------------------------------------------------------- sweeps


class _SweepRun:
    """One running sweep: its cancel flag and its latest, not yet written, trial snapshot."""

    def __init__(self, manager: SweepManager, sweep_id: str, cancel: threading.Event,
                 tracker: tracking.SweepTracker | None = None) -> None:
        self.manager, self.run_id, self.cancel = manager, sweep_id, cancel
        self.tracker = tracker  # TensorBoard / MLflow per trial (service.tracking), fed every snapshot
        self.lock = threading.Lock()
        self.pending: list[TrialInfo] | None = None
        self.written: list[tuple[str, str]] = []  # (trial id, status) as last written
        self.rows: list[dict[str, Any]] | None = None  # the trials as last written
        self.last_write = float("-inf")

    def update(self, trials: list[TrialInfo]) -> None:
        """``run_sweep``'s on_trial_update: write status changes at once, progress throttled."""
        with self.lock:
            self.pending = trials
        if self.tracker is not None:
            self.tracker.update(trials)  # never raises: a tracking failure is a warning
        self.flush()

    def should_stop(self) -> bool:
        """``run_sweep``'s should_stop (asked every half second): a good moment for throttled writes too."""
        if not self.cancel.is_set():
            self.flush()
        return self.cancel.is_set()

    def flush(self, *, force: bool = False) -> None:
        """Write the latest snapshot if it differs from the one written: at once when a trial's status
        changed, otherwise at most every ``metrics_flush_s``; an unchanged snapshot is never rewritten."""
        now = time.monotonic()
        with self.lock:
            trials = self.pending
            statuses: list[tuple[str, str]] = ([(t.trial_id, t.status) for t in trials] if trials is not None
                                               else self.written)
            due = trials is not None and (force or statuses != self.written
                                          or now - self.last_write >= self.manager.settings.metrics_flush_s)
            rows = sweeps.trial_rows(trials) if due and trials is not None else None
            if rows is not None:
                self.pending, self.written, self.last_write = None, statuses, now
                if rows == self.rows:  # nothing moved since the last write
                    rows = None
                else:
                    self.rows = rows
        with self.manager.session_factory() as session:
            if rows is not None:
                sweeps.record_trials(session=session, sweep_id=self.run_id, trials=rows)
            if runs.is_cancel_requested(session=session, table=Sweep, run_id=self.run_id):  # from any process
                self.cancel.set()


class SweepManager(RunQueue[Sweep]):
    """Runs queued sweeps on ``settings.max_concurrent_sweeps`` threads, on the service's Ray cluster
    (started on first use); see :class:`service.runs.RunQueue`.

    >>> manager = SweepManager(settings=settings, session_factory=factory)
    """

    table = Sweep
    model_label = "the best model"

    def __init__(self, *, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        super().__init__(settings=settings, session_factory=session_factory, slots=settings.max_concurrent_sweeps,
                         max_attempts=settings.max_sweep_attempts)
        # Succeeded sweeps' trackers and best trials, until the best trial's model is registered.
        self.trackers: dict[str, tuple[tracking.SweepTracker, str]] = {}

    def storage_dir(self, sweep_id: str) -> Path:
        return self.settings.storage_path / "sweeps" / sweep_id

    def register(self, session: Session, row: Sweep, export_dir: Path) -> Model:
        tracker, best = self.trackers.pop(row.id, (None, ""))
        try:
            model = registry.register_export(session=session, tenant=row.tenant, name=row.name,
                                             export_dir=export_dir, storage=self.settings.storage_path, sweep_id=row.id)
            if tracker is not None:
                tracker.log_model(best, Path(model.path), model.id)
        finally:
            if tracker is not None:
                tracker.close("cancelled")  # trials still open when their sweep ended
        return model

    def execute(self, row: Sweep, cancel: threading.Event) -> Outcome:
        settings = self.settings
        storage_dir = self.storage_dir(row.id)
        resume = (storage_dir / EXPERIMENT_DIR).exists()  # a restart: continue from Tune's state
        tracker = tracking.open_sweep(settings, sweep_id=row.id, tenant=row.tenant, name=row.name,
                                      base=row.spec.get("base") or {})
        status = "failed"
        try:
            outcome = self._sweep(row, cancel, _SweepRun(self, row.id, cancel, tracker), resume)
            status = outcome[0]
            return outcome
        finally:
            if tracker is not None and status == "succeeded":
                self.trackers[row.id] = (tracker, outcome[1].get("best_trial_id") or "")
            elif tracker is not None:
                tracker.close(status)

    def _sweep(self, row: Sweep, cancel: threading.Event, run: _SweepRun, resume: bool) -> Outcome:
        settings = self.settings
        storage_dir = self.storage_dir(row.id)
        try:
            spec = SweepSpec.model_validate(row.spec)
            from workers.raygroup import ensure_ray

            ensure_ray(settings.ray_address, num_cpus=settings.ray_num_cpus)  # no-op when the job backend did
            result = run_sweep(
                spec, storage_dir=storage_dir, on_trial_update=run.update, should_stop=run.should_stop,
                should_interrupt=lambda: self.stopping, resume=resume, data_root=settings.data_root,
                cache_dir=settings.cache_path, allowed_modules=settings.model_allowlist)
        except SweepInterrupted:
            _flush_quietly(run, "sweep")
            logger.info("sweep %s: interrupted by the shutdown; it resumes on the next start", row.id)
            return "queued", {}
        except Exception as exc:
            _flush_quietly(run, "sweep")
            return self.failed(row, exc, cancel, prefix="resuming the sweep failed: " if resume else "")
        if run.tracker is not None:
            run.tracker.update(result.trials)  # the trials' final reports and statuses
        trials = sweeps.trial_rows(result.trials)
        if result.cancelled:
            return "cancelled", {"trials": trials}
        if result.best is None or result.best_model_dir is None:
            return "failed", {"trials": trials, "error": sweeps.no_best(result)}
        return "succeeded", {"trials": trials, "best_trial_id": result.best.trial_id,
                             "export_dir": result.best_model_dir}
