"""Runs, what jobs and sweeps share: the data access of their run state, and the queue that runs them.

A run is a row with the :class:`service.db.RunState` columns (a ``Job`` or a ``Sweep``). Its life:
``queued -> running -> succeeded | failed | cancelled``, or back to ``queued`` when the service stops
under it. :class:`RunQueue` drives runs on a bounded pool of threads and turns their outcome into
that state:

* a success registers the exported model and sets ``model_id``; an exception marks the run
  ``failed`` with its type and message; a cancel (here, or through another process by the
  database flag) stops it and marks it ``cancelled``;
* a shutdown stops running runs resumably and leaves them ``queued``; :func:`recover_runs` settles
  what a crash left ``running`` and the rest resumes. No run is lost or left running.

Any number of queues (service replicas) may share one table: a running run is owned through a
lease (``lease_owner``, ``lease_expires_at``) that its queue renews every quarter of
``settings.lease_ttl_s``. Every transition is a conditional UPDATE (claim only what is queued,
recover only what is running with an expired lease, finish only what this queue still owns), so no
run is ever driven by two queues; when a replica dies, another requeues its runs once their lease
has expired and resumes them from their checkpoints.
Data access functions are keyword-only and take the session and the table; a ``scope`` of None is
the admin (every tenant), otherwise the caller's tenant: another tenant's run is simply not found.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import TERMINAL_STATUSES, Model, RunState, utcnow
from service.errors import Conflict, NotFound
from workers.errors import TrainingError

logger = logging.getLogger(__name__)
MAX_ERROR_CHARS = 4000
R = TypeVar("R", bound=RunState)
Outcome = tuple[str, dict[str, Any]]  # a status, and the fields to store with it


def describe_error(exc: BaseException) -> str:
    """The cause of a failure as one line: type, message, iteration, and the underlying cause."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TrainingError) and f"iteration {exc.iteration}" not in text:
        text += f" (at iteration {exc.iteration})"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f"; caused by {type(cause).__name__}: {cause}"
    return text[:MAX_ERROR_CHARS]


# ------------------------------------------------------------------------------------- data access


def get_run(*, session: Session, table: type[R], run_id: str, scope: str | None) -> R:
    row = session.get(table, run_id)
    if row is None or (scope is not None and row.tenant != scope):
        raise NotFound(table.kind, run_id)
    return row


def list_runs(*, session: Session, table: type[R], scope: str | None, status: str | None = None,
              limit: int = 100, offset: int = 0) -> tuple[list[R], int]:
    """A page of runs, newest first, and how many match in all."""
    where = [] if scope is None else [table.tenant == scope]
    if status is not None:
        where.append(table.status == status)
    count = session.scalar(select(func.count()).select_from(table).where(*where)) or 0
    rows = session.scalars(select(table).where(*where).order_by(table.created_at.desc(), table.id.desc())
                           .limit(limit).offset(offset))
    return list(rows.all()), count


def request_cancel(*, session: Session, table: type[R], run_id: str, scope: str | None) -> R:
    """Cancel a queued run at once; flag a running one (its queue stops it). Finished: Conflict."""
    row = get_run(session=session, table=table, run_id=run_id, scope=scope)
    if row.status in TERMINAL_STATUSES:
        raise Conflict(f"{table.kind} '{run_id}' is already {row.status}")
    changed = session.execute(update(table).where(table.id == run_id, table.status == "queued")
                              .values(status="cancelled", cancel_requested=True, finished_at=utcnow()))
    if changed.rowcount == 0:  # type: ignore[attr-defined]  # running (or claimed meanwhile)
        session.execute(update(table).where(table.id == run_id).values(cancel_requested=True))
    session.commit()
    session.refresh(row)
    return row


def is_cancel_requested(*, session: Session, table: type[RunState], run_id: str) -> bool:
    return bool(session.scalar(select(table.cancel_requested).where(table.id == run_id)))


def count_running(*, session: Session, table: type[RunState]) -> int:
    return session.scalar(select(func.count()).select_from(table).where(table.status == "running")) or 0


def claim_run(*, session: Session, table: type[R], run_id: str, owner: str = "", ttl_s: float = 0.0,
              max_running: int | None = None) -> R | None:
    """queued -> running with ``owner``'s lease, atomically; None if the run is no longer queued
    (cancelled, or claimed by another driver meanwhile), or if ``max_running`` runs are running."""
    now = utcnow()
    where = [table.id == run_id, table.status == "queued"]
    if max_running is not None:  # the service-wide limit, checked in the same statement
        running = select(func.count()).select_from(table).where(table.status == "running").scalar_subquery()
        where.append(running < max_running)
    changed = session.execute(
        update(table).where(*where)
        .values(status="running", attempts=table.attempts + 1, started_at=now, error=None, lease_owner=owner or None,
                lease_expires_at=now + timedelta(seconds=ttl_s) if owner else None, **dict.fromkeys(table.run_only)))
    session.commit()
    if changed.rowcount == 0:  # type: ignore[attr-defined]
        return None
    return session.get(table, run_id, populate_existing=True)


def fail_queued(*, session: Session, table: type[RunState], run_id: str, error: str) -> bool:
    """queued -> failed (a driver that cannot start); False if the run is no longer queued."""
    changed = session.execute(update(table).where(table.id == run_id, table.status == "queued")
                              .values(status="failed", error=error[:MAX_ERROR_CHARS], finished_at=utcnow()))
    session.commit()
    return changed.rowcount > 0  # type: ignore[attr-defined]


def renew_leases(*, session: Session, table: type[RunState], owner: str, run_ids: list[str],
                 ttl_s: float) -> set[str]:
    """Extend ``owner``'s leases of ``run_ids``; the ids it still owns (a lost one is another's now)."""
    if not run_ids:
        return set()
    session.execute(update(table).where(table.id.in_(run_ids), table.lease_owner == owner,
                                        table.status == "running")
                    .values(lease_expires_at=utcnow() + timedelta(seconds=ttl_s)))
    session.commit()
    return set(session.scalars(select(table.id).where(table.id.in_(run_ids), table.lease_owner == owner,
                                                      table.status == "running")).all())


def finish_run(*, session: Session, table: type[RunState], run_id: str, status: str, error: str | None = None,
               owner: str | None = None, commit: bool = True, **fields: Any) -> bool:
    """A run ended: a terminal status, or back to queued (a shutdown, to resume on the next start).
    ``fields`` (e.g. ``model_id``) are stored unless None. With ``owner``, only while that queue
    still holds the lease: False (and nothing written) when another has taken the run over."""
    values: dict[str, Any] = {"status": status, "error": error, "lease_owner": None, "lease_expires_at": None,
                              **dict.fromkeys(table.run_only)}
    if status in TERMINAL_STATUSES:
        values["finished_at"] = utcnow()
    values.update((name, value) for name, value in fields.items() if value is not None)
    where = [table.id == run_id] + ([table.lease_owner == owner] if owner is not None else [])
    changed = session.execute(update(table).where(*where).values(**values))
    if commit:
        session.commit()
    return changed.rowcount > 0  # type: ignore[attr-defined]


def recover_runs(*, session: Session, table: type[R], max_attempts: int,
                 detail: Callable[[R], str] = lambda row: "") -> list[str]:
    """Settle runs whose driver is gone (running, with no lease or an expired one); return the
    queue, oldest first.

    Such a run whose cancel was requested is cancelled; one started ``max_attempts`` times already
    is failed with the reason (it keeps taking the service down, or keeps being killed), plus
    ``detail(row)``; the rest are requeued, and resume (from a checkpoint, from Tune's state).
    """
    kind, now = table.kind, utcnow()
    orphaned = (table.status == "running", or_(table.lease_expires_at.is_(None), table.lease_expires_at < now))
    for row in session.scalars(select(table).where(*orphaned)).all():
        values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
        if row.cancel_requested:
            values.update(status="cancelled", finished_at=now)
            message = "cancelled (cancel requested before its driver stopped)"
        elif row.attempts >= max_attempts:
            values.update(status="failed", finished_at=now, error=(
                f"Interrupted: the service stopped while the {kind} was running, {row.attempts} times "
                f"(limit MAML_MAX_{kind.upper()}_ATTEMPTS={max_attempts}){detail(row)}"))
            message = f"failed after {row.attempts} interrupted attempts"
        else:
            values.update(status="queued", **dict.fromkeys(table.run_only))
            message = "interrupted, requeued to resume"
        # Conditional, so that of two queues recovering at once only one moves the run.
        changed = session.execute(update(table).where(table.id == row.id, *orphaned).values(**values))
        if changed.rowcount:  # type: ignore[attr-defined]
            logger.info("%s %s: %s", kind, row.id, message)
    session.commit()
    queued = select(table.id).where(table.status == "queued").order_by(table.created_at)
    return list(session.scalars(queued).all())


# ------------------------------------------------------------------------------------------- queue


class RunQueue(Generic[R]):
    """Drives the queued rows of ``table``, each to its end, where ``settings.drivers`` says:

    * ``process``: on ``slots`` threads of this process (the embedded default);
    * ``ray``: each in a detached actor of its own on the Ray cluster (:mod:`service.drivers`), so
      that stopping or killing this process interrupts no training. ``slots`` is then the limit
      for the whole service, checked in the claim.

    A subclass says how to run one (:meth:`execute`) and how to register the model of a success
    (:meth:`register`):

    >>> manager.start()            # recovers interrupted runs, starts the threads
    >>> manager.submit(run_id)     # after the row is committed as queued
    >>> manager.cancel(run_id)     # after runs.request_cancel
    >>> manager.stop()             # drivers in this process stop resumably (their runs stay queued)

    :meth:`drive` runs one run wherever it is called (a queue thread, a driver actor): it claims
    the run with a lease in its own name, renews it every quarter of ``settings.lease_ttl_s``
    (stopping, without writing an outcome, if the lease was lost), and reads the cancel flag at
    the same pace. A maintenance thread requeues runs whose driver is gone, and starts drivers for
    queued runs, another replica's included.
    """

    table: type[R]
    model_label = "the model"  # what a failed registration names

    def __init__(self, *, settings: Settings, session_factory: sessionmaker[Session], slots: int,
                 max_attempts: int) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.slots, self.max_attempts = slots, max_attempts
        self.placement = settings.driver_placement
        # Drivers on Ray launched by this replica's reconciler process (service.reconciler), not here:
        # this queue only answers for the API (submits and cancels go through the database).
        self.passive = self.placement == "ray" and settings.ray_process == "child"
        self._passive_started = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending: set[str] = set()
        self._running: dict[str, threading.Event] = {}  # run id -> its cancel flag
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()  # a submit: dispatch now rather than at the next round
        self._threads: list[threading.Thread] = []
        self._drivers: Any = None  # service.drivers.Launcher, with placement "ray"
        # This queue's name on its leases: unique per process and start.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    @classmethod
    def for_driver(cls, *, settings: Settings, session_factory: sessionmaker[Session]) -> RunQueue[R]:
        """The queue a driver actor drives one run with (never started)."""
        return cls(settings=settings, session_factory=session_factory)  # type: ignore[call-arg]

    @classmethod
    def driver_cpus(cls, spec: dict[str, Any], settings: Settings) -> float:
        """The CPUs the driver actor of a run of this spec reserves on Ray."""
        return settings.driver_cpus

    # -- what a subclass provides ----------------------------------------------------------------

    def execute(self, row: R, cancel: threading.Event) -> Outcome:
        """Run ``row`` until it ends, ``cancel`` is set or the queue is :attr:`stopping`; a success
        gives ``export_dir``, the model to register."""
        raise NotImplementedError

    def register(self, session: Session, row: R, export_dir: Path) -> Model:
        """Add the exported model to the registry (the caller commits)."""
        raise NotImplementedError

    def interrupted_detail(self, row: R) -> str:
        """Said after the reason of a run failed for too many interrupted attempts."""
        return ""

    def ended(self, outcome: str) -> None:
        """Called after each run's outcome is stored."""

    # -- public API ------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def started(self) -> bool:
        return (bool(self._threads) or self._passive_started) and not self.stopping

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def start(self) -> None:
        kind = self.table.kind
        if self._threads:
            raise RuntimeError(f"the {kind} manager is already started")
        if self.passive:
            self._passive_started = True
            logger.info("%s manager started: the reconciler process launches the drivers", kind)
            return
        with self.session_factory() as session:
            queued = recover_runs(session=session, table=self.table, max_attempts=self.max_attempts,
                                  detail=self.interrupted_detail)
        if self.placement == "ray":
            from service.drivers import Launcher

            self._drivers = Launcher(type(self), self.settings)
        else:
            for run_id in queued:
                self.submit(run_id)
            for n in range(self.slots):
                thread = threading.Thread(target=self._work, name=f"maml-{kind}s-{n}", daemon=True)
                thread.start()
                self._threads.append(thread)
        thread = threading.Thread(target=self._maintain, name=f"maml-{kind}s-leases", daemon=True)
        thread.start()
        self._threads.append(thread)
        logger.info("%s manager started: drivers in %s, %d slot(s), %d %s(s) queued", kind,
                    "this process" if self.placement == "process" else "the Ray cluster", self.slots, len(queued),
                    kind)

    def submit(self, run_id: str) -> None:
        if self.passive:  # the reconciler finds it queued within MAML_RECONCILE_INTERVAL_S
            return
        if self._drivers is not None:
            self._wake.set()
            return
        with self._lock:
            if run_id in self._pending or run_id in self._running:
                return
            self._pending.add(run_id)
        self._queue.put(run_id)

    def cancel(self, run_id: str) -> None:
        """Stop a running run (soon: within an iteration, a second or so); drop a queued one."""
        with self._lock:
            self._pending.discard(run_id)
            cancel = self._running.get(run_id)
        if cancel is not None:
            cancel.set()
        if self._drivers is not None:  # faster than the driver's next look at the flag
            self._drivers.cancel(run_id)

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking runs, ask the runs driven in this process to stop (resumably), wait for them
        up to ``timeout`` seconds. Drivers on an external Ray cluster go on; those on the embedded
        cluster, which ends with this process, are interrupted too."""
        self._stopping.set()
        if not self._threads:
            return
        self._wake.set()
        for _ in range(self.slots):
            self._queue.put(None)
        wait = self.settings.stop_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        if self._drivers is not None and not self.settings.ray_address:
            self._drivers.interrupt_all(wait)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                # Its run stays "running" in the database; the next start requeues it.
                logger.warning("thread %s did not stop in time; its %s resumes on the next start", thread.name,
                               self.table.kind)
        self._threads = []
        logger.info("%s manager stopped", self.table.kind)

    def failed(self, row: R, exc: Exception, cancel: threading.Event, *, prefix: str = "") -> Outcome:
        """The outcome of a run that raised: failed with the cause, or requeued if the shutdown broke it."""
        if self.stopping and not cancel.is_set():
            # Most likely the shutdown itself broke the run: resume it on the next start (bounded by
            # max_attempts, so a genuine error still ends as failed).
            logger.warning("%s %s: %s during shutdown; requeued", self.table.kind, row.id, describe_error(exc))
            return "queued", {}
        error = (prefix + describe_error(exc))[:MAX_ERROR_CHARS]
        logger.warning("%s %s failed: %s", self.table.kind, row.id, error, exc_info=exc)
        return "failed", {"error": error}

    # -- the threads -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            run_id = self._queue.get()
            if run_id is None or self.stopping:
                return
            with self._lock:
                if run_id not in self._pending:  # cancelled while queued
                    continue
                self._pending.discard(run_id)
            try:
                self.drive(run_id)
            except Exception:  # bookkeeping failed (database down?): the run is recovered on restart
                logger.exception("%s %s: the manager failed to record its run", self.table.kind, run_id)

    def _maintain(self) -> None:
        """Every ``reconcile_interval_s`` (and at once after a submit, for drivers on Ray): requeue
        runs whose driver is gone, and take on queued runs (another replica's too)."""
        period = min(self.settings.reconcile_interval_s, self.settings.lease_ttl_s / 4)
        while not self.stopping:
            try:
                with self.session_factory() as session:
                    queued = recover_runs(session=session, table=self.table, max_attempts=self.max_attempts,
                                          detail=self.interrupted_detail)
                    if self._drivers is not None:
                        self._drivers.reconcile(session, queued, self.slots)
            except Exception:  # the database or the cluster is unreachable for now: try again next round
                logger.exception("%s queue: maintenance failed", self.table.kind)
                queued = []
            if self._drivers is None:
                for run_id in queued:
                    self.submit(run_id)
            self._wake.wait(period)
            self._wake.clear()

    def _keep_lease(self, run_id: str, cancel: threading.Event, done: threading.Event) -> None:
        """While ``run_id`` is driven here: renew its lease, stop it if the lease was lost, and read its
        cancel flag (a cancel through any replica reaches a run within a quarter of the lease time,
        even between two reports)."""
        ttl = self.settings.lease_ttl_s
        while not done.wait(ttl / 4):
            try:
                with self.session_factory() as session:
                    if not renew_leases(session=session, table=self.table, owner=self.owner, run_ids=[run_id],
                                        ttl_s=ttl):
                        logger.warning("%s %s: lease lost to another driver; stopping here", self.table.kind, run_id)
                        cancel.set()
                        return
                    if is_cancel_requested(session=session, table=self.table, run_id=run_id):
                        cancel.set()
            except Exception:  # the database is unreachable for now: try again at the next round
                logger.exception("%s %s: renewing its lease failed", self.table.kind, run_id)

    def drive(self, run_id: str) -> str | None:
        """Claim ``run_id`` if it is queued (and, for drivers on Ray, if fewer than ``slots`` runs are
        running), run it to its end here and store its outcome; the outcome, or None if not claimed."""
        kind = self.table.kind
        if self.stopping:
            return None
        with self.session_factory() as session:
            limit = self.slots if self.placement == "ray" else None  # on Ray: for the whole service
            row = claim_run(session=session, table=self.table, run_id=run_id, owner=self.owner,
                            ttl_s=self.settings.lease_ttl_s, max_running=limit)
        if row is None:
            return None
        cancel, done = threading.Event(), threading.Event()
        if row.cancel_requested:
            cancel.set()
        with self._lock:
            self._running[run_id] = cancel
        keeper = threading.Thread(target=self._keep_lease, args=(run_id, cancel, done), daemon=True,
                                  name=f"maml-{kind}-{run_id[:8]}-lease")
        keeper.start()
        logger.info("%s %s (%s): started, attempt %d", kind, run_id, row.name, row.attempts)
        try:
            outcome, fields = self.execute(row, cancel)
        finally:
            done.set()
            keeper.join()
            with self._lock:
                self._running.pop(run_id, None)
        with self.session_factory() as session:
            export_dir = fields.pop("export_dir", None)
            if outcome == "succeeded":
                try:
                    fields["model_id"] = self.register(session, row, export_dir).id
                except Exception as exc:
                    session.rollback()
                    logger.exception("%s %s: registering %s failed", kind, run_id, self.model_label)
                    outcome = "failed"
                    fields["error"] = f"registering {self.model_label} failed: {describe_error(exc)}"
            # The model row and the outcome commit together, and only while this driver owns the run.
            if not finish_run(session=session, table=self.table, run_id=run_id, status=outcome, owner=self.owner,
                              commit=False, **fields):
                session.rollback()
                logger.warning("%s %s: its lease was taken over; its outcome here (%s) is dropped", kind, run_id,
                               outcome)
                return None
            session.commit()
        self.ended(outcome)
        logger.info("%s %s: %s%s", kind, run_id, outcome, f" ({fields['error']})" if fields.get("error") else "")
        return outcome
