"""The meta-training loop: sample a meta-batch, compute meta-gradients, aggregate, step.

One loop serves every deployment. Where the per-task meta-gradients are computed is an
*executor*: ``LocalExecutor`` runs them in this process; ``workers.distributed.RayExecutor``
shards them over Ray workers. The loop owns the parameters, the meta-optimizer (the aggregator's
step), evaluation, checkpoints and metrics, so a resumed or distributed run is the same run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from workers.aggregator import GradientSum, apply_meta_update, mean
from workers.checkpoint import Checkpoint, Location, latest_checkpoint, save_checkpoint, save_export
from workers.engine import shard_meta_gradient
from workers.errors import NonFiniteLossError, TrainingError, WorkerError, WorkerLost
from workers.evaluation import meta_test
from workers.inner import Params
from workers.models import build_model
from workers.spec import JobSpec
from workers.tasks import TaskFamily, build_task_family
from workers.tasks.base import Task, shard_indices

logger = logging.getLogger(__name__)
Reporter = Callable[[int, dict[str, float]], None]


def torch_dtype(spec: JobSpec) -> torch.dtype:
    return torch.float64 if spec.dtype == "float64" else torch.float32


def build(spec: JobSpec, *, data_root: Path | None = None, cache_dir: Path | None = None,
          allowed_modules: Iterable[str] | None = None) -> tuple[TaskFamily, nn.Module]:
    """The task family and the freshly initialised model of a spec (initialisation seeded)."""
    dtype = torch_dtype(spec)
    family = build_task_family(spec.task, data_root=data_root, cache_dir=cache_dir, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, input_shape=family.input_shape, output_dim=family.output_dim,
                            allowed_modules=allowed_modules)
    return family, model.to(dtype)


def engine_kwargs(spec: JobSpec, loss: str) -> dict:
    return dict(algorithm=spec.algorithm, inner_steps=spec.inner.steps, inner_lr=spec.inner.lr, loss=loss,
                inner_optimizer=spec.inner.optimizer, inner_batch_size=spec.inner.batch_size)


def sample_shard(family: TaskFamily, spec: JobSpec, iteration: int, shard: int, num_shards: int,
                 device: torch.device | None = None) -> list[Task]:
    tasks = [family.sample(spec.seed, iteration, i, "train")
             for i in shard_indices(spec.outer.meta_batch_size, shard, num_shards)]
    if device is not None and device.type != "cpu":
        tasks = [Task(*(t.to(device, non_blocking=True) for t in task)) for task in tasks]
    return tasks


class Executor(Protocol):
    def compute(self, params: Params, buffers: Params, iteration: int) -> list[GradientSum]: ...
    def close(self) -> None: ...


class LocalExecutor:
    """Computes the whole meta-batch in this process (optionally as ``num_shards`` shards)."""

    def __init__(self, spec: JobSpec, family: TaskFamily, model: nn.Module, *, num_shards: int = 1,
                 device: torch.device | None = None) -> None:
        self.spec, self.family, self.model, self.num_shards, self.device = spec, family, model, num_shards, device
        self.kwargs = engine_kwargs(spec, family.loss)

    def compute(self, params: Params, buffers: Params, iteration: int) -> list[GradientSum]:
        return [
            shard_meta_gradient(self.model, params, buffers,
                                sample_shard(self.family, self.spec, iteration, s, self.num_shards, self.device),
                                **self.kwargs)
            for s in range(self.num_shards)
        ]

    def close(self) -> None:
        pass


def make_optimizer(spec: JobSpec, params: Iterable[nn.Parameter]) -> tuple[torch.optim.Optimizer,
                                                                          torch.optim.lr_scheduler.LRScheduler]:
    params = list(params)
    if spec.outer.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=spec.outer.lr)
    else:
        opt = torch.optim.SGD(params, lr=spec.outer.lr)
    total = spec.outer.iterations
    # Reptile anneals its outer step size linearly to zero; otherwise the factor stays 1.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: max(0.0, 1.0 - it / total) if spec.outer.anneal else 1.0)
    return opt, schedule


@dataclass
class TrainResult:
    iteration: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]
    model_dir: Path | None
    cancelled: bool = False
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)


class Trainer:
    """Meta-train a spec to completion, resuming from ``run_dir/checkpoints`` when one is there.

    ``checkpoint_dir`` puts the checkpoints elsewhere: a path or a URI such as ``s3://bucket/job``
    (``workers.checkpoint``); the trained model is still exported under ``run_dir``.

    ``reporter(iteration, metrics)`` receives a flat dict with namespaced keys after every
    ``report_every`` iterations and after every evaluation; ``should_stop()`` is polled every
    iteration (cancellation), after which a checkpoint is written and the result is marked cancelled.
    """

    def __init__(
        self,
        spec: JobSpec,
        *,
        run_dir: Path,
        data_root: Path | None = None,
        cache_dir: Path | None = None,
        reporter: Reporter | None = None,
        should_stop: Callable[[], bool] | None = None,
        executor_factory: Callable[[JobSpec, TaskFamily, nn.Module], Executor] | None = None,
        allowed_modules: Iterable[str] | None = None,
        report_every: int = 1,
        device: torch.device | None = None,
        checkpoint_dir: Location | None = None,
    ) -> None:
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.checkpoint_dir: Location = checkpoint_dir or self.run_dir / "checkpoints"
        self.reporter = reporter or log_reporter(spec)
        self.should_stop = should_stop or (lambda: False)
        self.report_every = report_every
        self.device = device or torch.device("cpu")
        self.family, self.model = build(spec, data_root=data_root, cache_dir=cache_dir,
                                        allowed_modules=allowed_modules)
        self.model.to(self.device)
        factory = executor_factory or (lambda s, f, m: LocalExecutor(s, f, m, device=self.device))
        self.executor = factory(spec, self.family, self.model)
        self.parameters = dict(self.model.named_parameters())
        self.optimizer, self.schedule = make_optimizer(spec, self.parameters.values())
        self.iteration = 0
        self.last_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self._resume()

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.checkpoint_dir)
        if ckpt is None:
            return
        self.model.load_state_dict({k: v.to(self.device) for k, v in ckpt.model.items()}, strict=True)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.schedule.last_epoch = ckpt.iteration
        for group, base in zip(self.optimizer.param_groups, self.schedule.base_lrs, strict=True):
            group["lr"] = base * self.schedule.lr_lambdas[0](ckpt.iteration)
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state)
        self.iteration = ckpt.iteration
        self.last_metrics = dict(ckpt.metrics)
        logger.info("resumed %s from %s at iteration %d", self.spec.name, ckpt.path, ckpt.iteration)

    def checkpoint(self) -> Path | str:
        return save_checkpoint(self.checkpoint_dir, Checkpoint(
            iteration=self.iteration,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            spec=self.spec.model_dump(mode="json"),
            rng_state=torch.get_rng_state(),
            metrics=self.last_metrics,
        ), keep=self.spec.checkpoint.keep)

    def evaluate(self) -> dict[str, float]:
        params = {k: v.detach() for k, v in self.parameters.items()}
        buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        return meta_test(self.model, params, buffers, self.family, seed=self.spec.seed,
                         num_tasks=self.spec.eval.tasks, steps=self.spec.eval.steps, lr=self.spec.inner.lr,
                         optimizer=self.spec.inner.optimizer, batch_size=self.spec.inner.batch_size,
                         device=self.device)

    def step(self) -> dict[str, float]:
        """One meta-iteration: fan out, aggregate, meta-update. Returns its metrics."""
        start = time.perf_counter()
        params = {k: v.detach() for k, v in self.parameters.items()}
        buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        try:
            sums = self.executor.compute(params, buffers, self.iteration)
        except NonFiniteLossError as exc:
            raise TrainingError(f"non-finite loss at iteration {self.iteration}: {exc}", self.iteration) from exc
        except WorkerLost:
            raise  # the caller may restart the worker group from the last checkpoint
        except WorkerError as exc:
            raise TrainingError(f"worker error at iteration {self.iteration}: {exc}", self.iteration) from exc
        grads, metrics, count = mean(sums)
        if not all(torch.isfinite(g).all() for g in grads.values()):
            raise TrainingError(f"non-finite meta-gradient at iteration {self.iteration}", self.iteration)
        apply_meta_update(self.parameters, self.optimizer, grads)
        self.schedule.step()
        self.iteration += 1
        elapsed = time.perf_counter() - start
        metrics["perf/tasks_per_s"] = count / elapsed
        metrics["perf/iteration_s"] = elapsed
        metrics["meta/lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def run(self) -> TrainResult:
        spec = self.spec
        history: list[tuple[int, dict[str, float]]] = []
        try:
            while self.iteration < spec.outer.iterations:
                if self.should_stop():
                    self.checkpoint()
                    return TrainResult(self.iteration, self.last_metrics, self.eval_metrics, None, True, history)
                metrics = self.step()
                self.last_metrics = metrics
                it = self.iteration
                if it % spec.eval.every == 0 or it == spec.outer.iterations:
                    self.eval_metrics = self.evaluate()
                    metrics = {**metrics, **self.eval_metrics}
                    self.last_metrics = metrics
                if it % self.report_every == 0 or "eval/loss" in metrics or it == spec.outer.iterations:
                    self.reporter(it, metrics)
                    history.append((it, metrics))
                if it % spec.checkpoint.every == 0 or it == spec.outer.iterations:
                    self.checkpoint()
        finally:
            self.executor.close()
        if not self.eval_metrics:
            self.eval_metrics = self.evaluate()
        model_dir = self.export(self.run_dir / "model")
        return TrainResult(self.iteration, self.last_metrics, self.eval_metrics, model_dir, False, history)

    def export(self, directory: Path) -> Path:
        """The trained model: ``model.safetensors`` plus ``model.json`` (spec, shapes, metrics)."""
        return save_export(directory, self.model.state_dict(), {
            "spec": self.spec.model_dump(mode="json"),
            "iteration": self.iteration,
            "input_shape": list(self.family.input_shape),
            "output_dim": self.family.output_dim,
            "loss": self.family.loss,
            "eval_metrics": self.eval_metrics,
        })


def log_reporter(spec: JobSpec) -> Reporter:
    """Default reporter: a progress line at most every 5 s (and at evaluations) on the logger."""
    state = {"last": 0.0, "start": time.monotonic()}

    def report(iteration: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if now - state["last"] < 5 and "eval/loss" not in metrics and iteration != spec.outer.iterations:
            return
        state["last"] = now
        rate = iteration / max(now - state["start"], 1e-9)
        eta = (spec.outer.iterations - iteration) / max(rate, 1e-9)
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("meta/loss", "meta/acc", "eval/"))}
        logger.info("%s %d/%d (eta %.0fs) %s", spec.name, iteration, spec.outer.iterations, eta, shown)

    return report
