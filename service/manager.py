"""The job manager: a queue and a bounded pool of threads, each driving one job's runner to its end.

A runner (``workers.distributed.run_training`` by default) blocks until the job ends, resumes
from ``run_dir/checkpoints`` on its own, reports ``(iteration, metrics)`` and polls
``should_stop``. The manager turns that into database state:

* reports are buffered and written at most every ``metrics_flush_s`` (and at every evaluation
  and the last iteration), with the progress and an ETA;
* success registers the exported model and sets ``model_id``; an exception marks the job
  ``failed`` with its type and message; a cancel stops the runner and marks it ``cancelled``;
* a shutdown stops running jobs (the runner checkpoints) and leaves them ``queued``; on the next
  start, :func:`service.jobs.recover_jobs` requeues whatever a crash left ``running``. No job is
  lost or left running.

One manager per database: two processes sharing a database would recover each other's jobs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from service import jobs, registry
from service.config import Settings
from service.db import Job
from service.metrics import ServiceMetrics
from workers.errors import TrainingError
from workers.spec import JobSpec
from workers.training import TrainResult

logger = logging.getLogger(__name__)
_MAX_ERROR_CHARS = 4000


class RunFn(Protocol):
    """The runner contract (``workers.distributed.run_training``)."""

    def __call__(self, spec: JobSpec, *, run_dir: Path, reporter: Callable[[int, dict[str, float]], None],
                 should_stop: Callable[[], bool], data_root: Path | None = None, cache_dir: Path | None = None,
                 allowed_modules: Iterable[str] | None = None, report_every: int = 1,
                 checkpoint_dir: str | Path | None = None) -> TrainResult: ...


def describe_error(exc: BaseException) -> str:
    """The cause of a failure as one line: type, message, iteration, and the underlying cause."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TrainingError) and f"iteration {exc.iteration}" not in text:
        text += f" (at iteration {exc.iteration})"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f"; caused by {type(cause).__name__}: {cause}"
    return text[:_MAX_ERROR_CHARS]


class _Run:
    """One running job: its cancel flag and its buffered reports."""

    def __init__(self, manager: JobManager, job_id: str, total: int, start_iteration: int) -> None:
        self.manager, self.job_id, self.total = manager, job_id, total
        self.cancel = threading.Event()
        self.lock = threading.Lock()
        self.buffer: list[tuple[int, dict[str, float]]] = []
        self.first: tuple[int, float] | None = None  # (iteration, time) of this run's first report
        self.replaced = False
        self.last_flush = time.monotonic()
        self.last_iteration = start_iteration  # the last progress stored, to count new iterations

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.manager.stopping

    def report(self, iteration: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        with self.lock:
            if self.first is None:
                self.first = (iteration, now)
            self.buffer.append((iteration, dict(metrics)))
            self.manager.metrics.iterations.inc(max(0, iteration - self.last_iteration))
            self.last_iteration = iteration
            due = (now - self.last_flush >= self.manager.settings.metrics_flush_s
                   or "eval/loss" in metrics or iteration >= self.total)
        if due:
            self.flush()

    def eta_s(self) -> float | None:
        if self.first is None or self.last_iteration <= self.first[0]:
            return None
        rate = (self.last_iteration - self.first[0]) / max(time.monotonic() - self.first[1], 1e-9)
        return max(0.0, (self.total - self.last_iteration) / rate)

    def flush(self) -> None:
        with self.lock:
            points, self.buffer = self.buffer, []
            replace_from = None
            if not self.replaced and self.first is not None:
                # A resumed run starts at its checkpoint: drop what the interrupted run reported after it.
                replace_from, self.replaced = self.first[0], True
            self.last_flush = time.monotonic()
            eta = self.eta_s()
        if not points and replace_from is None:
            return
        with self.manager.session_factory() as session:
            jobs.record_progress(session=session, job_id=self.job_id, points=points, eta_s=eta,
                                 replace_from=replace_from)
            # A cancel requested through another process reaches us here, at most one flush late.
            if jobs.is_cancel_requested(session=session, job_id=self.job_id):
                self.cancel.set()


class JobManager:
    """Runs queued jobs on ``settings.max_concurrent_jobs`` threads.

    >>> manager = JobManager(settings=settings, session_factory=factory)   # runner: Ray
    >>> manager.start()            # recovers interrupted jobs, starts the threads
    >>> manager.submit(job.id)     # after the job row is committed as queued
    >>> manager.cancel(job.id)     # after jobs.request_cancel
    >>> manager.stop()             # running jobs checkpoint and stay queued for the next start
    """

    def __init__(self, *, settings: Settings, session_factory: sessionmaker[Session], run_fn: RunFn | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.run_fn = run_fn
        self.metrics = metrics or ServiceMetrics()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending: set[str] = set()
        self._running: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- public API ------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def started(self) -> bool:
        return bool(self._threads) and not self.stopping

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def running_jobs(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("the job manager is already started")
        if self.run_fn is None:
            from workers.distributed import run_training

            self.run_fn = run_training
        with self.session_factory() as session:
            queued = jobs.recover_jobs(session=session, max_attempts=self.settings.max_job_attempts)
        for job_id in queued:
            self.submit(job_id)
        for n in range(self.settings.max_concurrent_jobs):
            thread = threading.Thread(target=self._work, name=f"maml-jobs-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("job manager started: %d slot(s), %d job(s) queued", len(self._threads), len(queued))

    def submit(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._pending or job_id in self._running:
                return
            self._pending.add(job_id)
        self._queue.put(job_id)

    def cancel(self, job_id: str) -> None:
        """Stop a running job (its runner returns within an iteration); drop a queued one."""
        with self._lock:
            self._pending.discard(job_id)
            run = self._running.get(job_id)
        if run is not None:
            run.cancel.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking jobs, ask running ones to stop, wait for them up to ``timeout`` seconds."""
        if not self._threads:
            return
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + (self.settings.stop_timeout_s if timeout is None else timeout)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                # Its job stays "running" in the database; the next start requeues it.
                logger.warning("job thread %s did not stop in time; its job resumes on the next start", thread.name)
        self._threads = []
        logger.info("job manager stopped")

    # -- the worker threads ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None or self.stopping:
                return
            with self._lock:
                if job_id not in self._pending:  # cancelled while queued
                    continue
                self._pending.discard(job_id)
            try:
                self._run(job_id)
            except Exception:  # bookkeeping failed (database down?): the job is recovered on restart
                logger.exception("job %s: the manager failed to record its run", job_id)

    def _run(self, job_id: str) -> None:
        with self.session_factory() as session:
            job = jobs.claim_job(session=session, job_id=job_id)
        if job is None:
            return
        run = _Run(self, job_id, job.total, job.iteration)
        with self._lock:
            self._running[job_id] = run
        if job.cancel_requested:
            run.cancel.set()
        logger.info("job %s (%s): started, attempt %d", job_id, job.name, job.attempts)
        try:
            outcome, fields = self._execute(job, run)
        finally:
            with self._lock:
                self._running.pop(job_id, None)
        with self.session_factory() as session:
            if outcome == "succeeded":
                try:
                    model = registry.register_model(session=session, job=job, export_dir=fields.pop("export_dir"),
                                                    storage=self.settings.storage_path)
                    fields["model_id"] = model.id
                except Exception as exc:
                    session.rollback()
                    logger.exception("job %s: registering its model failed", job_id)
                    outcome, fields = "failed", {"error": f"registering the model failed: {describe_error(exc)}"}
            jobs.finish_job(session=session, job_id=job_id, status=outcome, **fields)
        if outcome != "queued":
            self.metrics.jobs_finished.labels(outcome).inc()
        logger.info("job %s: %s%s", job_id, outcome, f" ({fields['error']})" if fields.get("error") else "")

    def _execute(self, job: Job, run: _Run) -> tuple[str, dict[str, Any]]:
        """Run the job; its outcome (a status) and the fields to store with it."""
        settings = self.settings
        if self.run_fn is None:
            raise RuntimeError("the job manager runs jobs only after start()")
        try:
            spec = JobSpec.model_validate(job.spec)
            result = self.run_fn(
                spec, run_dir=settings.storage_path / "jobs" / job.id, reporter=run.report,
                should_stop=run.should_stop, data_root=settings.data_root, cache_dir=settings.cache_path,
                allowed_modules=settings.model_allowlist, report_every=settings.report_every,
                checkpoint_dir=settings.job_checkpoint_dir(job.id))
        except Exception as exc:
            self._flush_quietly(run)
            if self.stopping and not run.cancel.is_set():
                # Most likely the shutdown itself broke the run: resume it on the next start (bounded by
                # max_job_attempts, so a genuine error still ends as failed).
                logger.warning("job %s: %s during shutdown; requeued", job.id, describe_error(exc))
                return "queued", {}
            logger.warning("job %s failed: %s", job.id, describe_error(exc), exc_info=exc)
            return "failed", {"error": describe_error(exc)}
        self._flush_quietly(run)
        final = {"iteration": result.iteration, "metrics": {**result.metrics, **result.eval_metrics}}
        if result.cancelled:
            return ("cancelled", final) if run.cancel.is_set() else ("queued", {})
        if result.model_dir is None:
            return "failed", {"error": "RuntimeError: the runner returned no exported model", **final}
        return "succeeded", {"export_dir": Path(result.model_dir), **final}

    @staticmethod
    def _flush_quietly(run: _Run) -> None:
        try:
            run.flush()
        except Exception:
            logger.exception("job %s: could not write its last metrics", run.job_id)
