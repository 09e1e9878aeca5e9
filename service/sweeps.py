"""Sweeps: the submission policy, data access, and the manager that runs them on Ray Tune.

A sweep is a ``workers.sweep_spec.SweepSpec`` (a base job, a search space, a scheduler). The manager
drives ``workers.sweep.run_sweep`` on a bounded pool of threads and turns it into database state:

* ``on_trial_update`` writes the trial snapshot (at once when a trial's status changes, otherwise
  at most every ``metrics_flush_s``); ``should_stop`` reads the cancel flag, so a cancel through
  any process reaches the sweep within a second;
* a sweep that ends with a completed trial registers that best trial's model and is
  ``succeeded``; one with no completed trial is ``failed`` with the trials' errors; a cancel ends
  it ``cancelled``. A failing trial is only shown failed: the sweep goes on;
* a shutdown interrupts the sweep resumably (Tune's state stays on disk, see
  ``run_sweep(should_interrupt=...)``) and leaves it ``queued``; on the next start
  :func:`recover_sweeps` requeues what a crash left ``running``, and the manager continues every
  sweep that has Tune state with ``resume=True``. A resume that fails marks the sweep failed with
  the reason. No sweep is lost or left running.

Tune's state and the trials' checkpoints live in ``storage/sweeps/<id>``. Data access functions
are keyword-only and take the session; ``scope`` None is the admin (every tenant).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import jobs, registry
from service.config import Settings
from service.db import TERMINAL_STATUSES, Sweep, utcnow
from service.errors import Conflict, InvalidInput, NotFound
from service.manager import describe_error
from service.schemas import finite_metrics
from workers.sweep import EXPERIMENT_DIR, SweepInterrupted, run_sweep
from workers.sweep_spec import SweepSpec, TrialInfo, apply_config

logger = logging.getLogger(__name__)
_MAX_ERROR_CHARS = 4000
# Space paths whose values the server's policy looks at (model factories, dataset paths).
_POLICY_SECTIONS = ("model", "task")


# ------------------------------------------------------------------------------------------ policy


def check_sweep(sweep: SweepSpec, settings: Settings) -> SweepSpec:
    """Apply the job policy (:func:`service.jobs.check_spec`) to the base and to every value the
    space can give a ``model``/``task`` field; returns the sweep with dataset paths made absolute.

    Raises InvalidInput naming the field: ``base.model.factory``, or ``space.model`` with the value
    and the policy's reason.
    """
    try:
        base = jobs.check_spec(sweep.base, settings)
    except InvalidInput as exc:
        raise InvalidInput(f"base.{exc.field}", exc.reason) from exc
    space: dict[str, Any] = {}
    for path, domain in sweep.space.items():
        space[path] = domain.model_dump()
        if path.split(".")[0] not in _POLICY_SECTIONS:
            continue
        checked = [_checked_value(base, path, value, settings) for value in domain.value]
        if domain.kind in ("choice", "grid"):
            space[path] = {domain.kind: checked}
    data = sweep.model_dump(mode="json")
    data.update(base=base.model_dump(mode="json"), space=space)
    return SweepSpec.model_validate(data)


def _checked_value(base: Any, path: str, value: Any, settings: Settings) -> Any:
    """``value`` at ``path`` after the policy: as given, but a dataset path made absolute (the
    SweepSpec already checked that the value makes a valid spec)."""
    try:
        checked = jobs.check_spec(apply_config(base, {path: value}), settings)
    except InvalidInput as exc:
        raise InvalidInput(f"space.{path}",
                           f"{json.dumps(value, default=str)} is refused: {exc.field}: {exc.reason}") from exc
    resolved = getattr(checked.task, "path", None)
    if path == "task.path":
        return resolved
    if path == "task" and isinstance(value, dict) and value.get("path") is not None:
        return {**value, "path": resolved}
    return value


# ------------------------------------------------------------------------------------- data access


def _scoped(statement: Any, scope: str | None) -> Any:
    return statement if scope is None else statement.where(Sweep.tenant == scope)


def create_sweep(*, session: Session, tenant: str, spec: SweepSpec) -> Sweep:
    sweep = Sweep(tenant=tenant, name=spec.name, spec=spec.model_dump(mode="json"), status="queued", trials=[],
                  attempts=0, cancel_requested=False)
    session.add(sweep)
    session.commit()
    return sweep


def get_sweep(*, session: Session, sweep_id: str, scope: str | None) -> Sweep:
    sweep = session.get(Sweep, sweep_id)
    if sweep is None or (scope is not None and sweep.tenant != scope):
        raise NotFound("sweep", sweep_id)
    return sweep


def list_sweeps(*, session: Session, scope: str | None, status: str | None = None, limit: int = 100,
                offset: int = 0) -> tuple[list[Sweep], int]:
    """A page of sweeps, newest first, and how many match in all."""
    where = _scoped(select(Sweep), scope)
    counted = _scoped(select(func.count()).select_from(Sweep), scope)
    if status is not None:
        where, counted = where.where(Sweep.status == status), counted.where(Sweep.status == status)
    count = session.scalar(counted) or 0
    rows = session.scalars(where.order_by(Sweep.created_at.desc(), Sweep.id.desc()).limit(limit).offset(offset))
    return list(rows.all()), count


def request_cancel(*, session: Session, sweep_id: str, scope: str | None) -> Sweep:
    """Cancel a queued sweep at once; flag a running one (the manager stops it). Finished: Conflict."""
    sweep = get_sweep(session=session, sweep_id=sweep_id, scope=scope)
    if sweep.status in TERMINAL_STATUSES:
        raise Conflict(f"sweep '{sweep_id}' is already {sweep.status}")
    changed = session.execute(update(Sweep).where(Sweep.id == sweep_id, Sweep.status == "queued")
                              .values(status="cancelled", cancel_requested=True, finished_at=utcnow()))
    if changed.rowcount == 0:  # type: ignore[attr-defined]  # running (or claimed meanwhile)
        session.execute(update(Sweep).where(Sweep.id == sweep_id).values(cancel_requested=True))
    session.commit()
    session.refresh(sweep)
    return sweep


def is_cancel_requested(*, session: Session, sweep_id: str) -> bool:
    return bool(session.scalar(select(Sweep.cancel_requested).where(Sweep.id == sweep_id)))


def claim_sweep(*, session: Session, sweep_id: str) -> Sweep | None:
    """queued -> running, atomically; None if the sweep is no longer queued (cancelled meanwhile)."""
    changed = session.execute(update(Sweep).where(Sweep.id == sweep_id, Sweep.status == "queued")
                              .values(status="running", attempts=Sweep.attempts + 1, started_at=utcnow(), error=None))
    session.commit()
    if changed.rowcount == 0:  # type: ignore[attr-defined]
        return None
    return session.get(Sweep, sweep_id, populate_existing=True)


def trial_rows(trials: list[TrialInfo]) -> list[dict[str, Any]]:
    """Trials as stored: JSON, with non-finite metrics as null."""
    rows = []
    for trial in trials:
        row = trial.model_dump(mode="json")
        row["metrics"] = finite_metrics(trial.metrics)
        rows.append(row)
    return rows


def record_trials(*, session: Session, sweep_id: str, trials: list[dict[str, Any]]) -> None:
    session.execute(update(Sweep).where(Sweep.id == sweep_id).values(trials=trials))
    session.commit()


def finish_sweep(*, session: Session, sweep_id: str, status: str, error: str | None = None,
                 trials: list[dict[str, Any]] | None = None, best_trial_id: str | None = None,
                 model_id: str | None = None) -> None:
    """A run ended: a terminal status, or back to queued (a shutdown, to resume on the next start)."""
    values: dict[str, Any] = {"status": status, "error": error}
    if status in TERMINAL_STATUSES:
        values["finished_at"] = utcnow()
    if trials is not None:
        values["trials"] = trials
    if best_trial_id is not None:
        values["best_trial_id"] = best_trial_id
    if model_id is not None:
        values["model_id"] = model_id
    session.execute(update(Sweep).where(Sweep.id == sweep_id).values(**values))
    session.commit()


def recover_sweeps(*, session: Session, max_attempts: int) -> list[str]:
    """After a restart: settle sweeps a previous process left running; return the queue, oldest first.

    A running sweep whose cancel was requested is cancelled; one started ``max_attempts`` times
    already is failed with the reason; the rest are requeued, and the manager resumes them from
    Tune's state.
    """
    for sweep in session.scalars(select(Sweep).where(Sweep.status == "running")).all():
        if sweep.cancel_requested:
            sweep.status, sweep.finished_at = "cancelled", utcnow()
            logger.info("sweep %s: cancelled (cancel requested before the restart)", sweep.id)
        elif sweep.attempts >= max_attempts:
            sweep.status, sweep.finished_at = "failed", utcnow()
            sweep.error = (f"Interrupted: the service stopped while the sweep was running, {sweep.attempts} times "
                           f"(limit MAML_MAX_SWEEP_ATTEMPTS={max_attempts})")
            logger.warning("sweep %s: failed after %d interrupted attempts", sweep.id, sweep.attempts)
        else:
            sweep.status = "queued"
            logger.info("sweep %s: interrupted, requeued to resume from Tune's state", sweep.id)
    session.commit()
    return list(session.scalars(select(Sweep.id).where(Sweep.status == "queued").order_by(Sweep.created_at)).all())


def _no_best(trials: list[TrialInfo]) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items()) or "no trials"
    errors = sorted({t.error for t in trials if t.error})
    text = f"no trial completed ({summary})"
    if errors:
        text += "; errors: " + "; ".join(errors[:3])
    return text[:_MAX_ERROR_CHARS]


# ---------------------------------------------------------------------------------------- manager


class _SweepRun:
    """One running sweep: its cancel flag and its latest, not yet written, trial snapshot."""

    def __init__(self, manager: SweepManager, sweep_id: str) -> None:
        self.manager, self.sweep_id = manager, sweep_id
        self.cancel = threading.Event()
        self.lock = threading.Lock()
        self.pending: list[TrialInfo] | None = None
        self.written: list[tuple[str, str]] = []  # (trial id, status) as last written
        self.last_write = float("-inf")

    def update(self, trials: list[TrialInfo]) -> None:
        """``run_sweep``'s on_trial_update: write status changes at once, progress throttled."""
        with self.lock:
            self.pending = trials
        self.flush()

    def should_stop(self) -> bool:
        """``run_sweep``'s should_stop (asked every half second): a good moment for throttled writes too."""
        if not self.cancel.is_set():
            self.flush()
        return self.cancel.is_set()

    def flush(self, *, force: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            trials = self.pending
            statuses: list[tuple[str, str]] = ([(t.trial_id, t.status) for t in trials] if trials is not None
                                               else self.written)
            due = trials is not None and (force or statuses != self.written
                                          or now - self.last_write >= self.manager.settings.metrics_flush_s)
            if due:
                self.pending, self.written, self.last_write = None, statuses, now
        with self.manager.session_factory() as session:
            if due and trials is not None:
                record_trials(session=session, sweep_id=self.sweep_id, trials=trial_rows(trials))
            if is_cancel_requested(session=session, sweep_id=self.sweep_id):  # from any process
                self.cancel.set()

    def flush_quietly(self) -> None:
        try:
            self.flush(force=True)
        except Exception:
            logger.exception("sweep %s: could not write its trials", self.sweep_id)


class SweepManager:
    """Runs queued sweeps on ``settings.max_concurrent_sweeps`` threads, on the service's Ray cluster.

    >>> manager = SweepManager(settings=settings, session_factory=factory)
    >>> manager.start()              # recovers interrupted sweeps, starts the threads (Ray on first use)
    >>> manager.submit(sweep.id)     # after the sweep row is committed as queued
    >>> manager.cancel(sweep.id)     # after sweeps.request_cancel
    >>> manager.stop()               # running sweeps are interrupted resumably and stay queued
    """

    def __init__(self, *, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending: set[str] = set()
        self._running: dict[str, _SweepRun] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def started(self) -> bool:
        return bool(self._threads) and not self.stopping

    @property
    def running_sweeps(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def storage_dir(self, sweep_id: str) -> Path:
        return self.settings.storage_path / "sweeps" / sweep_id

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("the sweep manager is already started")
        with self.session_factory() as session:
            queued = recover_sweeps(session=session, max_attempts=self.settings.max_sweep_attempts)
        for sweep_id in queued:
            self.submit(sweep_id)
        for n in range(self.settings.max_concurrent_sweeps):
            thread = threading.Thread(target=self._work, name=f"maml-sweeps-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("sweep manager started: %d slot(s), %d sweep(s) queued", len(self._threads), len(queued))

    def submit(self, sweep_id: str) -> None:
        with self._lock:
            if sweep_id in self._pending or sweep_id in self._running:
                return
            self._pending.add(sweep_id)
        self._queue.put(sweep_id)

    def cancel(self, sweep_id: str) -> None:
        """Stop a running sweep (its trials end within a second or so); drop a queued one."""
        with self._lock:
            self._pending.discard(sweep_id)
            run = self._running.get(sweep_id)
        if run is not None:
            run.cancel.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking sweeps, interrupt running ones (resumably), wait up to ``timeout`` seconds."""
        if not self._threads:
            return
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + (self.settings.stop_timeout_s if timeout is None else timeout)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                # Its sweep stays "running" in the database; the next start resumes it.
                logger.warning("sweep thread %s did not stop in time; its sweep resumes on the next start",
                               thread.name)
        self._threads = []
        logger.info("sweep manager stopped")

    # -- the worker threads ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            sweep_id = self._queue.get()
            if sweep_id is None or self.stopping:
                return
            with self._lock:
                if sweep_id not in self._pending:  # cancelled while queued
                    continue
                self._pending.discard(sweep_id)
            try:
                self._run(sweep_id)
            except Exception:  # bookkeeping failed (database down?): the sweep is recovered on restart
                logger.exception("sweep %s: the manager failed to record its run", sweep_id)

    def _run(self, sweep_id: str) -> None:
        with self.session_factory() as session:
            sweep = claim_sweep(session=session, sweep_id=sweep_id)
        if sweep is None:
            return
        run = _SweepRun(self, sweep_id)
        with self._lock:
            self._running[sweep_id] = run
        if sweep.cancel_requested:
            run.cancel.set()
        logger.info("sweep %s (%s): started, attempt %d", sweep_id, sweep.name, sweep.attempts)
        try:
            outcome, fields = self._execute(sweep, run)
        finally:
            with self._lock:
                self._running.pop(sweep_id, None)
        with self.session_factory() as session:
            export_dir = fields.pop("export_dir", None)
            if outcome == "succeeded":
                try:
                    model = registry.register_export(session=session, tenant=sweep.tenant, name=sweep.name,
                                                     export_dir=export_dir, storage=self.settings.storage_path,
                                                     sweep_id=sweep_id)
                    fields["model_id"] = model.id
                except Exception as exc:
                    session.rollback()
                    logger.exception("sweep %s: registering its best model failed", sweep_id)
                    outcome = "failed"
                    fields["error"] = f"registering the best model failed: {describe_error(exc)}"
            finish_sweep(session=session, sweep_id=sweep_id, status=outcome, **fields)
        logger.info("sweep %s: %s%s", sweep_id, outcome, f" ({fields['error']})" if fields.get("error") else "")

    def _execute(self, sweep: Sweep, run: _SweepRun) -> tuple[str, dict[str, Any]]:
        """Run the sweep; its outcome (a status) and the fields to store with it."""
        settings = self.settings
        storage_dir = self.storage_dir(sweep.id)
        resume = (storage_dir / EXPERIMENT_DIR).exists()  # a restart: continue from Tune's state
        try:
            spec = SweepSpec.model_validate(sweep.spec)
            from workers.distributed import ensure_ray

            ensure_ray(settings.ray_address, num_cpus=settings.ray_num_cpus)  # no-op when the job backend did
            result = run_sweep(
                spec, storage_dir=storage_dir, on_trial_update=run.update, should_stop=run.should_stop,
                should_interrupt=lambda: self.stopping, resume=resume, data_root=settings.data_root,
                cache_dir=settings.cache_path, allowed_modules=settings.model_allowlist)
        except SweepInterrupted:
            run.flush_quietly()
            logger.info("sweep %s: interrupted by the shutdown; it resumes on the next start", sweep.id)
            return "queued", {}
        except Exception as exc:
            run.flush_quietly()
            if self.stopping and not run.cancel.is_set():
                # Most likely the shutdown itself broke the run: resume it on the next start (bounded by
                # max_sweep_attempts, so a genuine error still ends as failed).
                logger.warning("sweep %s: %s during shutdown; requeued", sweep.id, describe_error(exc))
                return "queued", {}
            error = describe_error(exc)
            if resume:
                error = f"resuming the sweep failed: {error}"[:_MAX_ERROR_CHARS]
            logger.warning("sweep %s failed: %s", sweep.id, error, exc_info=exc)
            return "failed", {"error": error}
        trials = trial_rows(result.trials)
        if result.cancelled:
            return "cancelled", {"trials": trials}
        if result.best is None or result.best_model_dir is None:
            return "failed", {"trials": trials, "error": _no_best(result.trials)}
        return "succeeded", {"trials": trials, "best_trial_id": result.best.trial_id,
                             "export_dir": result.best_model_dir}
