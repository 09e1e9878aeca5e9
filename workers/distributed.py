"""Meta-training on Ray: shard workers compute meta-gradients, the aggregator steps.

The driver is the ordinary training loop (``workers.training.Trainer``) with a ``RayExecutor``:
at every meta-iteration it puts the current parameters in the object store once, each
``ShardWorker`` actor samples its own deterministic shard of the meta-batch (task indices
``rank::world``) and returns the *sum* of its tasks' meta-gradients as one flat vector, and the
parameter aggregator (``workers.aggregator``) averages them and takes the meta-optimizer step in
the driver. Every shard is a pure function of (spec, parameters, iteration), so 1 or n workers
give the same parameters up to float summation order.

A worker that dies (killed, out of memory, node lost) surfaces as ``WorkerLost``; ``run_training``
then tears the group down, starts a new one and resumes from the last checkpoint, at most
``max_restarts`` times. An error raised inside a worker's computation (a non-finite loss, bad
data) is not retried: it reaches the caller with its cause.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from workers.aggregator import GradientSum, flatten, unflatten
from workers.checkpoint import Location
from workers.engine import shard_meta_gradient
from workers.errors import NonFiniteLossError, WorkerError, WorkerLost
from workers.inner import Params
from workers.spec import JobSpec
from workers.training import Reporter, Trainer, TrainResult, build, engine_kwargs, sample_shard

__all__ = ["RayExecutor", "ShardWorker", "WorkerError", "WorkerLost", "ensure_ray", "run_training"]

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process: an existing cluster when an address is given
    (``address`` or ``RAY_ADDRESS``), else a local cluster sized to this machine.

    Ray 2.60 turns on token authentication for local clusters and generates the token itself; to
    join a cluster that uses token auth, export ``RAY_AUTH_TOKEN`` (or ``RAY_AUTH_TOKEN_PATH``) as
    the Ray docs describe: ``ray.init`` reads them from the environment.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Workers import this package; in a local cluster they share our interpreter and path.
    path = os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        logger.info("starting an embedded local Ray cluster with %d CPUs", cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env,
                 logging_level=logging.WARNING, configure_logging=True)


class ShardWorker:
    """One worker of a job: builds the task family and model once, then computes shards.

    A plain class, made remote only where the executor creates it, with the job's resources.
    """

    def __init__(self, spec_json: dict[str, Any], rank: int, world: int, *, data_root: str | None,
                 cache_dir: str | None, allowed_modules: list[str] | None, threads: int) -> None:
        torch.set_num_threads(threads)
        self.spec = JobSpec.model_validate(spec_json)
        self.rank, self.world = rank, world
        self.device = torch.device("cuda" if torch.cuda.is_available() and
                                   self.spec.resources.gpus_per_worker > 0 else "cpu")
        self.family, self.model = build(self.spec, data_root=Path(data_root) if data_root else None,
                                        cache_dir=Path(cache_dir) if cache_dir else None,
                                        allowed_modules=allowed_modules)
        self.model.to(self.device)
        self.kwargs = engine_kwargs(self.spec, self.family.loss)
        self.names = [n for n, _ in self.model.named_parameters()]

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_bytes(self) -> int:
        """This worker process's resident-memory high-water mark."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def compute(self, state: tuple[Params, Params], iteration: int) -> tuple[torch.Tensor, dict[str, float], int]:
        params, buffers = ({k: v.to(self.device) for k, v in d.items()} for d in state)
        tasks = sample_shard(self.family, self.spec, iteration, self.rank, self.world, self.device)
        total = shard_meta_gradient(self.model, params, buffers, tasks, **self.kwargs)
        flat = flatten(total.grads, self.names).cpu() if total.count else torch.zeros(0)
        return flat, total.metrics, total.count


def _resources(res: dict[str, float]) -> str:
    return f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def gather(refs: list) -> list:
    """``ray.get`` with failures typed: a dead worker is WorkerLost (restartable), a non-finite loss
    stays NonFiniteLossError, anything else raised in a worker is WorkerError with its cause."""
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
        raise WorkerError(f"{type(cause).__name__}: {cause}") from exc
    except RayActorError as exc:
        raise WorkerLost(f"a worker died: {exc}") from exc


class RayExecutor:
    """Fans a meta-iteration out to ``spec.resources.workers`` ShardWorker actors.

    The group waits at most ``start_timeout_s`` for the cluster to place it (an autoscaler may be
    adding nodes); past that it fails with ``WorkerError`` naming what was asked and what the
    cluster has, instead of waiting forever for GPUs that are not there. ``should_stop()`` (a
    cancel) ends the wait early; the training loop then sees the cancel before its first iteration.
    """

    def __init__(self, spec: JobSpec, *, data_root: Path | None, cache_dir: Path | None,
                 allowed_modules: Iterable[str] | None, start_timeout_s: float = 600.0,
                 should_stop: Callable[[], bool] | None = None) -> None:
        res = spec.resources
        world = res.workers
        remote = ray.remote(ShardWorker)
        self.workers = []
        try:
            for rank in range(world):
                self.workers.append(remote.options(
                    num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, max_restarts=0,
                ).remote(spec.model_dump(mode="json"), rank, world,
                         data_root=str(data_root) if data_root else None,
                         cache_dir=str(cache_dir) if cache_dir else None,
                         allowed_modules=list(allowed_modules) if allowed_modules is not None else None,
                         threads=res.threads_per_worker))
            refs = [w.pid.remote() for w in self.workers]
            deadline = time.monotonic() + start_timeout_s
            while len(ray.wait(refs, num_returns=len(refs), timeout=min(1.0, start_timeout_s))[0]) < len(refs):
                if should_stop is not None and should_stop():
                    self.pids: list[int] = []
                    return
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"the worker group did not start in {start_timeout_s:.0f} s: the job asks for {world} "
                        f"worker(s) x {res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU; the Ray cluster has "
                        f"{_resources(ray.cluster_resources())} in all, {_resources(ray.available_resources())} free")
            self.pids = gather(refs)
        except BaseException:
            self.close()  # never leave half a worker group holding the cluster's resources
            raise

    def compute(self, params: Params, buffers: Params, iteration: int) -> list[GradientSum]:
        state = ray.put(({k: v.cpu() for k, v in params.items()}, {k: v.cpu() for k, v in buffers.items()}))
        results = gather([w.compute.remote(state, iteration) for w in self.workers])
        sums = []
        for flat, metrics, count in results:
            s = GradientSum()
            if count:
                s.grads = {k: v.to(next(iter(params.values())).device) for k, v in unflatten(flat, params).items()}
            s.metrics, s.count = metrics, count
            sums.append(s)
        return sums

    def close(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        self.workers = []


def run_training(
    spec: JobSpec,
    *,
    run_dir: Path,
    reporter: Reporter,
    should_stop: Callable[[], bool],
    data_root: Path | None = None,
    cache_dir: Path | None = None,
    allowed_modules: Iterable[str] | None = None,
    report_every: int = 1,
    max_restarts: int = 3,
    on_workers: Callable[[list[int]], None] | None = None,
    checkpoint_dir: Location | None = None,
    worker_start_timeout_s: float = 600.0,
) -> TrainResult:
    """Run a job on Ray to its end, resuming from ``run_dir/checkpoints`` when a checkpoint is there.

    Restarts the worker group from the last checkpoint when a worker dies (``max_restarts``
    times). ``on_workers(pids)`` is told the worker processes of each group, for observability.
    ``checkpoint_dir`` (a path or a URI such as ``s3://bucket/job``) replaces ``run_dir/checkpoints``.
    A group the cluster cannot place within ``worker_start_timeout_s`` fails the job (``WorkerError``).
    """
    ensure_ray()
    if spec.is_rl:  # meta-RL: rollouts on Ray workers, TRPO in the driver (workers/rl)
        from workers.rl.config import describe_export, from_job_spec
        from workers.rl.trainer import run_rl_training

        result = run_rl_training(from_job_spec(spec), run_dir=run_dir, reporter=reporter, should_stop=should_stop,
                                 use_ray=True, report_every=report_every, max_restarts=max_restarts,
                                 checkpoint_dir=checkpoint_dir)
        if result.model_dir is not None:
            describe_export(Path(result.model_dir), spec)
        return result
    restarts = 0
    while True:
        executors: list[RayExecutor] = []

        def factory(s: JobSpec, family: Any, model: Any, executors: list[RayExecutor] = executors) -> RayExecutor:
            ex = RayExecutor(s, data_root=data_root, cache_dir=cache_dir, allowed_modules=allowed_modules,
                             start_timeout_s=worker_start_timeout_s, should_stop=should_stop)
            executors.append(ex)
            if on_workers is not None:
                on_workers(ex.pids)
            return ex

        start = time.perf_counter()
        trainer = Trainer(spec, run_dir=run_dir, data_root=data_root, cache_dir=cache_dir, reporter=reporter,
                          should_stop=should_stop, executor_factory=factory, allowed_modules=allowed_modules,
                          report_every=report_every, checkpoint_dir=checkpoint_dir)
        logger.info("%s: %d workers ready in %.1fs at iteration %d", spec.name, spec.resources.workers,
                    time.perf_counter() - start, trainer.iteration)
        try:
            return trainer.run()
        except WorkerLost as exc:
            restarts += 1
            if restarts > max_restarts:
                raise WorkerError(f"worker group lost {restarts} times; last: {exc}") from exc
            logger.warning("%s: %s; restarting the worker group from the last checkpoint (%d/%d)",
                           spec.name, exc, restarts, max_restarts)
        finally:
            for ex in executors:
                ex.close()
