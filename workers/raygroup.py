"""Worker groups: the one place that starts, calls and closes the processes a run computes on.

A run's workers are instances of one plain class (``ShardWorker`` for supervised meta-batches,
``RolloutWorker`` for meta-RL rollouts), built as ``cls(spec, rank, world, **context)``.
``WorkerGroup`` makes them Ray actors with the job's resources; ``LocalGroup`` builds one in this
process. Both answer ``share(value)`` (what every worker reads: through the object store once)
and ``call(method, *args)`` with one result per worker, in rank order, so a training step is
written once for both.

Failures are typed (``workers.errors``): a worker that died is ``WorkerLost`` (the run restarts
the group from its last checkpoint), a non-finite loss stays ``NonFiniteLossError``, anything
else raised in a worker is ``WorkerError`` with its cause. A group the cluster cannot place fails
after ``start_timeout_s`` naming what it asked for and what the cluster has; a cancel
(``should_stop``) ends that wait early.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.errors import NonFiniteLossError, WorkerError, WorkerLost

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process: the cluster at ``address``, else a new local cluster sized
    to this machine (``RAY_ADDRESS`` is read by the entry points: ``Settings.ray_address``,
    ``python -m workers train``).

    Ray 2.60 turns on token authentication for local clusters and generates the token itself; to
    join a cluster that uses token auth, ``ray.init`` reads ``RAY_AUTH_TOKEN`` from the environment.
    """
    import ray

    if ray.is_initialized():
        return
    if threading.current_thread() is not threading.main_thread():
        # Ray starts a local cluster's GCS, raylet and agents with PR_SET_PDEATHSIG = SIGKILL (fate
        # sharing), and Linux sends that signal when the *thread* that started them ends, not the
        # process: started from a job's or a request's thread, the whole cluster was killed,
        # silently, when that thread exited (the raylet deaths of issue 12). They are started from
        # a thread that lives as long as the process.
        _on_keeper_thread(lambda: _init(address, num_cpus=num_cpus))
        return
    _init(address, num_cpus=num_cpus)


_keeper_calls: queue.Queue[tuple[Callable[[], None], queue.Queue[BaseException | None]]] = queue.Queue()
_keeper_lock = threading.Lock()
_keeper: threading.Thread | None = None


def _keep() -> None:
    while True:  # never returns: the processes it started die with the process, not before
        call, answer = _keeper_calls.get()
        try:
            call()
        except BaseException as exc:
            answer.put(exc)
        else:
            answer.put(None)


def _on_keeper_thread(call: Callable[[], None]) -> None:
    """Run ``call`` on the process's keeper thread (started once, never ending) and wait for it."""
    global _keeper
    with _keeper_lock:
        if _keeper is None:
            _keeper = threading.Thread(target=_keep, name="maml-ray-keeper", daemon=True)
            _keeper.start()
    answer: queue.Queue[BaseException | None] = queue.Queue()
    _keeper_calls.put((call, answer))
    error = answer.get()
    if error is not None:
        raise error


def _init(address: str | None, *, num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():  # another thread was first
        return
    # Workers import this package: they run from our source tree, ahead of the PYTHONPATH they
    # inherit (Ray expands ${PYTHONPATH} on the node).
    root = Path(__file__).resolve().parents[1]
    runtime_env = {"env_vars": {"PYTHONPATH": f"{root}{os.pathsep}${{PYTHONPATH}}"}}
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        logger.info("starting an embedded Ray cluster with %s CPUs", num_cpus or "all")
        # address="local": a cluster of our own, never one a `ray start` left on this machine
        # (ray.init() without an address would join that, or fail on its stale address file).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 runtime_env=runtime_env, logging_level=logging.WARNING, configure_logging=True)


def gather(refs: list) -> list:
    """``ray.get`` with failures typed: a dead worker is WorkerLost (restartable), a non-finite loss
    stays NonFiniteLossError, anything else raised in a worker is WorkerError with its cause."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    try:
        return ray.get(refs)
    except (ActorDiedError, ActorUnavailableError) as exc:
        raise WorkerLost(f"a worker died: {exc}") from exc
    except RayTaskError as exc:
        cause = exc.cause if exc.cause is not None else exc
        if isinstance(cause, RayActorError):
            raise WorkerLost(f"a worker died: {cause}") from exc
        if isinstance(cause, NonFiniteLossError):
            raise NonFiniteLossError(str(cause)) from exc
        if isinstance(cause, WorkerError):  # already says what failed (a peer's error, all-reduced)
            raise WorkerError(str(cause)) from exc
        raise WorkerError(f"{type(cause).__name__}: {cause}") from exc
    except RayActorError as exc:
        raise WorkerLost(f"a worker died: {exc}") from exc


def _resources(res: dict[str, float]) -> str:
    return f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


class LocalGroup:
    """One worker in this process (rank 0 of 1): the same interface as ``WorkerGroup``."""

    collective = False

    def __init__(self, worker: Any) -> None:
        self.workers = [worker]
        self.pids = [os.getpid()]

    def share(self, value: Any) -> Any:
        return value

    def call(self, method: str, *args: Any) -> list:
        return [getattr(w, method)(*args) for w in self.workers]

    def first(self, method: str, *args: Any) -> Any:
        return getattr(self.workers[0], method)(*args)

    def close(self) -> None:
        self.workers = []


class WorkerGroup:
    """``world`` Ray actors of ``cls``, each with ``cpus`` CPUs and ``gpus`` GPUs.

    Waits at most ``start_timeout_s`` for the cluster to place the group (an autoscaler may be
    adding nodes); ``should_stop()`` ends the wait early, leaving an empty group (the training
    loop then sees the cancel before its first iteration). Never leaves half a group holding the
    cluster's resources.
    """

    def __init__(self, cls: type, spec: Any, *, world: int, cpus: float, gpus: float,
                 start_timeout_s: float = 600.0, should_stop: Callable[[], bool] | None = None,
                 collective: bool = False, **context: Any) -> None:
        import ray

        remote = ray.remote(cls)
        self.workers: list = []
        self.pids: list[int] = []
        self.collective = collective
        try:
            for rank in range(world):
                self.workers.append(remote.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
                                    .remote(spec, rank, world, **context))
            refs = [w.pid.remote() for w in self.workers]
            deadline = time.monotonic() + start_timeout_s
            while len(ray.wait(refs, num_returns=len(refs), timeout=min(1.0, start_timeout_s))[0]) < len(refs):
                if should_stop is not None and should_stop():
                    self.close()
                    return
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"the worker group did not start in {start_timeout_s:.0f} s: the job asks for {world} "
                        f"worker(s) x {cpus:g} CPU, {gpus:g} GPU; the Ray cluster has "
                        f"{_resources(ray.cluster_resources())} in all, {_resources(ray.available_resources())} free")
            self.pids = gather(refs)
            if collective and world > 1:
                # One torch.distributed process group over the workers, rendezvous at rank 0.
                address, port = gather([self.workers[0].rendezvous.remote()])[0]
                backend = "nccl" if gpus > 0 else "gloo"
                gather([w.join.remote(address, port, backend) for w in self.workers])
        except BaseException:
            self.close()
            raise

    def share(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def call(self, method: str, *args: Any) -> list:
        """``method(*args)`` on every worker, results in rank order."""
        return gather([getattr(w, method).remote(*args) for w in self.workers])

    def first(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on rank 0 only."""
        return gather([getattr(self.workers[0], method).remote(*args)])[0]

    def close(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        self.workers = []


class Worker:
    """Base of the classes a group runs (``rank`` of ``world``): observability, and joining the
    group's collective (``torch.distributed``) process group."""

    rank: int
    world: int

    def rendezvous(self) -> tuple[str, int]:
        """Where the process group meets (rank 0): this node's address and a free port."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, address: str, port: int, backend: str) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.world, timeout=timedelta(minutes=10))

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_bytes(self) -> int:
        """This worker process's resident-memory high-water mark."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
