"""The reconciler: the one process of a replica that joins Ray (``python -m service.reconciler``).

A Ray driver process dies with the raylet it is connected to (Ray ends it: "The connection to the
plasma store is failed. Terminate the process"). So with ``MAML_RAY_PROCESS=child`` (the default)
the API process never joins Ray: :class:`service.supervisor.RayChild` runs this module as a child
process, restarts it when it ends, and reads its heartbeat for ``/readyz``. This process:

* joins the cluster at ``MAML_RAY_ADDRESS``, or starts the embedded one (which then lives and
  dies with it: a restart brings a fresh cluster);
* runs the job and sweep queues with drivers on Ray (:mod:`service.drivers`): it requeues runs
  whose driver's lease expired and launches drivers for queued runs, every
  ``MAML_RECONCILE_INTERVAL_S``;
* writes a heartbeat file every second, with the state of its Ray cluster; when the GCS stops
  answering for ``RAY_UNRESPONSIVE_S`` (15 s), or no task has run for ``RAY_TASK_UNRESPONSIVE_S``
  (60 s: a task may wait for a worker process to start), or, embedded, its GCS or raylet process
  has exited, it exits, so that it is restarted with a fresh cluster;
* on SIGTERM, or when the API process that started it is gone (``kill -9``), stops its queues
  (drivers on the embedded cluster are interrupted resumably, those on an external one go on)
  and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from service.config import Settings
from service.db import make_engine, make_session_factory
from service.manager import JobManager, SweepManager

logger = logging.getLogger("service.reconciler")
HEARTBEAT_S = 1.0
RAY_UNRESPONSIVE_S = 15.0  # the GCS has not answered for this long: exit, to be restarted
# A task on the cluster has not run for this long: exit too. Longer, because a task may wait for a
# worker process to start, and on a loaded machine that takes a while (18 s was seen here under
# 64 clients). An embedded raylet's death is seen at once, from its process's exit.
RAY_TASK_UNRESPONSIVE_S = 60.0


def write_heartbeat(path: Path, state: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**state, "pid": os.getpid(), "time": time.time()}))
    tmp.replace(path)


def _ping() -> int:
    return 1


def _dead_embedded_processes() -> list[str]:
    """The embedded cluster's GCS or raylet that have exited ("raylet (exit -9)"), seen from the
    process that started them; empty for an external cluster, or if Ray's (private) node handle is
    not there, when the probes alone decide."""
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        if node is None or not node.head:
            return []
        return [f"{kind} (exit {proc.returncode})" for kind, proc in node.dead_processes()
                if kind in ("raylet", "gcs_server")]
    except Exception:  # a private API: never let it take the reconciler down
        return []


def run(settings: Settings, heartbeat: Path, stop: threading.Event) -> None:
    """Reconcile until ``stop`` is set; exit the process (3) when the Ray cluster stops answering."""
    import ray

    from workers.raygroup import ensure_ray

    settings = settings.model_copy(update={"drivers": "ray", "ray_process": "api"})  # this process launches
    ensure_ray(settings.ray_address, num_cpus=settings.ray_num_cpus)
    engine = make_engine(settings)
    factory = make_session_factory(engine)
    queues = [JobManager(settings=settings, session_factory=factory),
              SweepManager(settings=settings, session_factory=factory)]
    for queue in queues:
        queue.start()
    answered = {"at": time.monotonic(), "task": time.monotonic(), "cpus": 0.0}
    ping = ray.remote(num_cpus=0, max_retries=0)(_ping)

    def probe() -> None:
        """The cluster answers: its GCS (the resources, every second) and a task runs (one at a
        time: a new ping only once the last one has answered, so that slow answers never pile up)."""
        pending = None
        while not stop.is_set():
            try:
                cpus = ray.cluster_resources().get("CPU", 0.0)
                answered.update(at=time.monotonic(), cpus=cpus)
                if pending is None:
                    pending = ping.remote()
                ready, _ = ray.wait([pending], timeout=HEARTBEAT_S)
                if ready:
                    ray.get(pending)
                    pending = None
                    answered["task"] = time.monotonic()
            except Exception as exc:
                pending = None
                logger.warning("the Ray cluster does not answer: %s: %s", type(exc).__name__, exc)
            stop.wait(HEARTBEAT_S)

    threading.Thread(target=probe, name="maml-ray-probe", daemon=True).start()
    parent = os.getppid()
    try:
        while not stop.wait(HEARTBEAT_S):
            if os.getppid() != parent:  # the API process is gone (kill -9): stop as on SIGTERM
                logger.warning("the API process %d is gone; stopping", parent)
                break
            silent = time.monotonic() - answered["at"]
            no_task = time.monotonic() - answered["task"]
            write_heartbeat(heartbeat, {"ray": silent < RAY_UNRESPONSIVE_S / 3, "ray_cpus": answered["cpus"],
                                        "ray_silent_s": round(silent, 1), "ray_task_silent_s": round(no_task, 1)})
            dead = _dead_embedded_processes()
            if dead:
                logger.error("the embedded Ray cluster lost its %s: exiting to be restarted", ", ".join(dead))
                logging.shutdown()
                os._exit(3)
            if silent > RAY_UNRESPONSIVE_S or no_task > RAY_TASK_UNRESPONSIVE_S:
                # Stopping the queues or Ray would wait on the dead cluster: leave at once (the
                # supervisor kills what is left of it); the runs' leases expire and they are requeued.
                logger.error("the Ray cluster has not answered for %.0fs (no task has run for %.0fs): exiting to "
                             "be restarted", silent, no_task)
                logging.shutdown()
                os._exit(3)
    finally:
        for queue in queues:
            queue.stop()
        engine.dispose()
        ray.shutdown()  # the embedded cluster ends here; an external one only loses this driver


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=Path, required=True, help="the replica's settings (JSON)")
    parser.add_argument("--heartbeat", type=Path, required=True, help="file to write the heartbeat to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.model_validate_json(args.settings.read_text())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run(settings, args.heartbeat, stop)
    logger.info("reconciler stopped")


if __name__ == "__main__":
    main()
