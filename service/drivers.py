"""Run drivers on the Ray cluster: one detached, named actor per job or sweep being driven.

With ``settings.drivers == "ray"`` (the default when the service joins a Ray cluster through
``MAML_RAY_ADDRESS``) an API replica trains nothing itself. Every quarter of the lease time, and
at once after a submit, its queue (:class:`service.runs.RunQueue`) calls
:meth:`Launcher.reconcile`:

1. for each queued run, oldest first, up to the service-wide limit (``MAML_MAX_CONCURRENT_JOBS``,
   ``..._SWEEPS``), it makes sure an actor named ``maml-<kind>-<run id>`` exists in the ``maml``
   namespace and asks it to drive the run. The actor is *detached*: it outlives the replica that
   made it, so a replica that stops or is killed interrupts no training;
2. the actor builds the same queue class in its own process, over the same database and storage,
   and calls :meth:`RunQueue.drive`, which claims the run (a conditional UPDATE, so of two
   replicas' launches one drives), holds its lease, trains, writes the reports and the outcome,
   and registers the model;
3. when its drive ends, the replica that launched it kills the actor; any replica kills the
   actors of runs that have ended (their launcher may be gone). A driver that cannot start (an
   import error on the cluster, no room for it) fails its run after three tries, with the cause.

A driver that dies while running stops renewing its lease, so any replica's maintenance requeues
the run once the lease expires and a new driver resumes it from its last checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import runs
from service.config import Settings
from service.db import TERMINAL_STATUSES, make_engine, make_session_factory

if TYPE_CHECKING:
    from service.runs import RunQueue

logger = logging.getLogger(__name__)
NAMESPACE = "maml"
LAUNCH_TRIES = 3  # a driver that fails to start this many times fails its run
GC_EVERY_S = 5.0  # how often the actors of ended runs are looked for (a call to the GCS)
# A driver launched this long ago whose run is still queued is waiting for room on the cluster (its
# CPUs): it holds none of the service's run slots, so the runs queued behind it are launched.
PLACEMENT_GRACE_S = 10.0


def actor_name(kind: str, run_id: str) -> str:
    return f"maml-{kind}-{run_id}"


class RunDriver:
    """The body of a driver actor: a never-started queue of ``queue_cls`` that drives one run at a
    time in this process (the actor has threads to spare for :meth:`cancel` and :meth:`interrupt`)."""

    def __init__(self, queue_cls: type[RunQueue[Any]], settings: Settings) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.engine = make_engine(settings)
        self.queue = queue_cls.for_driver(settings=settings, session_factory=make_session_factory(self.engine))
        self._lock = threading.Lock()

    def drive(self, run_id: str) -> str | None:
        with self._lock:
            return self.queue.drive(run_id)

    def cancel(self, run_id: str) -> None:
        self.queue.cancel(run_id)

    def interrupt(self) -> None:
        """Stop resumably: the run checkpoints and goes back to queued (the embedded cluster is ending)."""
        self.queue.stop(timeout=0)


class Launcher:
    """A replica's side of the drivers of one kind of run (see the module's docstring)."""

    def __init__(self, queue_cls: type[RunQueue[Any]], settings: Settings) -> None:
        import ray

        from workers.raygroup import ensure_ray

        ensure_ray(settings.ray_address, num_cpus=settings.ray_num_cpus)
        self.queue_cls, self.settings = queue_cls, settings
        self.table, self.kind = queue_cls.table, queue_cls.table.kind
        self._actor_cls = ray.remote(RunDriver)
        self._drives: dict[Any, tuple[str, Any, float]] = {}  # a drive's ObjectRef -> (run id, actor, launched at)
        self._cpus: dict[str, float] = {}  # run id -> the CPUs its driver asked for
        self._launched: dict[str, float] = {}  # run id -> when this replica last launched its driver
        self._failed_starts: Counter[str] = Counter()
        self._last_gc = float("-inf")
        self._lock = threading.Lock()

    def _actor(self, run_id: str, cpus: float) -> Any:
        return self._actor_cls.options(
            name=actor_name(self.kind, run_id), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
            num_cpus=cpus, max_concurrency=4, max_restarts=0,
        ).remote(self.queue_cls, self.settings)

    def reconcile(self, session: Session, queued: list[str], limit: int) -> None:
        """Collect the drives that ended, kill the drivers of ended runs, and launch drivers for
        ``queued`` (oldest first) while fewer than ``limit`` runs are running."""
        self._collect(session)
        if time.monotonic() - self._last_gc >= GC_EVERY_S:
            self._last_gc = time.monotonic()
            self._collect_garbage(session)
        free = limit - runs.count_running(session=session, table=self.table)
        now = time.monotonic()
        with self._lock:
            unplaced = {run_id for run_id, _, launched in self._drives.values() if now - launched >= PLACEMENT_GRACE_S}
        launch = []
        for run_id in queued:
            if run_id in unplaced:
                continue  # no room for it yet: it must not hold up the runs behind it
            if free <= 0:
                break
            free -= 1
            if now - self._launched.get(run_id, float("-inf")) >= self.settings.lease_ttl_s:
                launch.append(run_id)  # (not if launched a moment ago and not claimed yet)
        specs = dict(session.execute(select(self.table.id, self.table.spec).where(self.table.id.in_(launch))).all())
        for run_id in launch:
            if run_id not in specs:  # deleted meanwhile
                continue
            self._launched[run_id] = now
            self._cpus[run_id] = cpus = self.queue_cls.driver_cpus(specs[run_id], self.settings)
            actor = self._actor(run_id, cpus)
            with self._lock:
                self._drives[actor.drive.remote(run_id)] = (run_id, actor, now)
            logger.info("%s %s: driver launched on the Ray cluster", self.kind, run_id)

    def _collect(self, session: Session) -> None:
        import ray
        from ray.exceptions import RayActorError

        with self._lock:
            refs = list(self._drives)
        if not refs:
            return
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=0)
        self._unplaced(session, waiting)
        for ref in ready:
            with self._lock:
                run_id, actor, _ = self._drives.pop(ref)
                self._cpus.pop(run_id, None)
            try:
                outcome = ray.get(ref)
            except RayActorError as exc:  # the driver died: before its claim (it never started) or after
                self._launched.pop(run_id, None)
                self._driver_died(session, run_id, exc)
            except Exception:
                self._launched.pop(run_id, None)
                logger.exception("%s %s: its driver failed to record the run", self.kind, run_id)
            else:
                # Not claimed (another driver holds it, or the service's limit was reached when it
                # tried): launched again after a lease's time at the earliest, not at once.
                if outcome is not None:
                    self._launched.pop(run_id, None)
                logger.info("%s %s: its driver ended (%s)", self.kind, run_id, outcome or "not claimed")
            ray.kill(actor, no_restart=True)

    def _unplaced(self, session: Session, waiting: list[Any]) -> None:
        """Fail the queued runs whose driver the cluster has not started within the workers' start-up
        timeout (``MAML_WORKER_START_TIMEOUT_S``): no room for its ``MAML_DRIVER_CPUS``."""
        import ray

        timeout = self.settings.worker_start_timeout_s
        for ref in waiting:
            with self._lock:
                run_id, actor, launched = self._drives[ref]
            if time.monotonic() - launched < timeout:
                continue
            status = session.scalar(select(self.table.status).where(self.table.id == run_id))
            if status == "queued" and runs.fail_queued(session=session, table=self.table, run_id=run_id, error=(
                    f"the {self.kind}'s driver was not started by the Ray cluster within {timeout:g}s "
                    f"(MAML_WORKER_START_TIMEOUT_S); it asks for {self._cpus.get(run_id, 0):g} CPUs "
                    f"(MAML_DRIVER_CPUS, or the job's resources.cpus_per_worker when its one worker trains in "
                    f"the driver), the cluster has {ray.cluster_resources().get('CPU', 0):g}")):
                logger.warning("%s %s: its driver could not be placed; failed", self.kind, run_id)
                with self._lock:
                    self._drives.pop(ref, None)
                    self._cpus.pop(run_id, None)
                ray.kill(actor, no_restart=True)

    def _driver_died(self, session: Session, run_id: str, exc: Exception) -> None:
        status = session.scalar(select(self.table.status).where(self.table.id == run_id))
        if status != "queued":  # it had claimed the run: its lease expires and the run is requeued
            logger.warning("%s %s: its driver died: %s", self.kind, run_id, exc)
            return
        self._failed_starts[run_id] += 1
        tries = self._failed_starts[run_id]
        logger.warning("%s %s: its driver failed to start (%d/%d): %s", self.kind, run_id, tries, LAUNCH_TRIES, exc)
        if tries >= LAUNCH_TRIES:
            runs.fail_queued(session=session, table=self.table, run_id=run_id, error=(
                f"the {self.kind}'s driver could not start on the Ray cluster ({tries} tries): "
                f"{runs.describe_error(exc)}"))
            del self._failed_starts[run_id]

    def _named_drivers(self) -> list[str]:
        """The run ids of this kind's driver actors on the cluster."""
        import ray

        prefix = actor_name(self.kind, "")
        return [entry["name"][len(prefix):] for entry in ray.util.list_named_actors(all_namespaces=True)
                if entry.get("namespace") == NAMESPACE and entry["name"].startswith(prefix)]

    def _collect_garbage(self, session: Session) -> None:
        """Kill the drivers of runs that have ended (or were deleted): their launcher may be gone."""
        import ray

        run_ids = self._named_drivers()
        if not run_ids:
            return
        live = dict(session.execute(select(self.table.id, self.table.status).where(self.table.id.in_(run_ids))).all())
        for run_id in run_ids:
            if live.get(run_id, "deleted") in (*TERMINAL_STATUSES, "deleted"):
                try:
                    ray.kill(ray.get_actor(actor_name(self.kind, run_id), namespace=NAMESPACE), no_restart=True)
                except ValueError:  # gone meanwhile
                    continue
                logger.info("%s %s: ended; its driver is removed", self.kind, run_id)

    def cancel(self, run_id: str) -> None:
        """Tell the run's driver at once (the driver also reads the flag, within a quarter of the lease)."""
        import ray

        try:
            ray.get_actor(actor_name(self.kind, run_id), namespace=NAMESPACE).cancel.remote(run_id)
        except ValueError:  # no driver: queued (cancelled in the database already) or ended
            pass

    def interrupt_all(self, timeout: float) -> None:
        """Stop every driver of this kind resumably and wait up to ``timeout`` s for their runs to
        be requeued: the embedded cluster ends with this process."""
        import ray

        for run_id in self._named_drivers():
            try:
                ray.get_actor(actor_name(self.kind, run_id), namespace=NAMESPACE).interrupt.remote()
            except ValueError:
                continue
        with self._lock:
            refs = list(self._drives)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        # Then none is left holding its CPUs: those whose drive has ended, and those that did not stop in
        # time (their runs are requeued when their leases expire).
        for run_id in self._named_drivers():
            try:
                ray.kill(ray.get_actor(actor_name(self.kind, run_id), namespace=NAMESPACE), no_restart=True)
            except ValueError:
                continue
