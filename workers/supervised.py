"""Supervised meta-learning as a program of the training loop: regression and few-shot classification.

At every meta-iteration the driver shares the current parameters with the worker group once; each
``ShardWorker`` samples its own deterministic shard of the meta-batch (task indices
``rank::world``) and returns the *sum* of its tasks' meta-gradients as one flat vector; the
parameter aggregator (``workers.aggregator``) averages the shards and takes the meta-optimizer
step. Every shard is a pure function of (spec, parameters, iteration), so 1 or n workers give the
same parameters up to float summation order. The loop around it is ``workers.run.Trainer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.aggregator import GradientSum, allreduce_mean, apply_meta_update, flatten, mean, unflatten
from workers.engine import shard_meta_gradient
from workers.errors import NonFiniteLossError, TrainingError, WorkerError
from workers.evaluation import meta_test
from workers.inner import Params
from workers.mamlpp import MetaOptions, attach_for, lr_factor, schedule, stats_buffers, update_running_stats
from workers.models import build_model
from workers.raygroup import Worker
from workers.spec import JobSpec
from workers.tasks import TaskFamily, build_task_family
from workers.tasks.base import Task, shard_indices


def torch_dtype(spec: JobSpec) -> torch.dtype:
    return torch.float64 if spec.dtype == "float64" else torch.float32


def build(spec: JobSpec, *, data_root: Path | None = None, cache_dir: Path | None = None,
          allowed_modules: Iterable[str] | None = None) -> tuple[TaskFamily, nn.Module]:
    """The task family and the freshly initialised model of a spec (initialisation seeded), with the
    learned inner-loop pieces its options ask for (``workers.mamlpp.attach``)."""
    dtype = torch_dtype(spec)
    family = build_task_family(spec.task, data_root=data_root, cache_dir=cache_dir, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, input_shape=family.input_shape, output_dim=family.output_dim,
                            allowed_modules=allowed_modules)
    return family, attach_for(model, spec).to(dtype)


def engine_kwargs(spec: JobSpec, loss: str, iteration: int | None = None) -> dict:
    """The engine's arguments for ``spec`` at meta-iteration ``iteration``: derivative-order annealing
    and the multi-step loss weights depend on it (``workers.mamlpp.schedule``)."""
    algorithm, meta = schedule(spec, iteration or 0) if iteration is not None else (spec.algorithm, None)
    return dict(algorithm=algorithm, inner_steps=spec.inner.steps, inner_lr=spec.inner.lr, loss=loss,
                inner_optimizer=spec.inner.optimizer, inner_batch_size=spec.inner.batch_size, meta=meta)


def sample_shard(family: TaskFamily, spec: JobSpec, iteration: int, shard: int, num_shards: int,
                 device: torch.device | None = None) -> list[Task]:
    tasks = [family.sample(spec.seed, iteration, i, "train")
             for i in shard_indices(spec.outer.meta_batch_size, shard, num_shards)]
    if device is not None and device.type != "cpu":
        tasks = [Task(*(t.to(device, non_blocking=True) for t in task)) for task in tasks]
    return tasks


def make_optimizer(spec: JobSpec, params: Iterable[nn.Parameter]) -> tuple[torch.optim.Optimizer,
                                                                          torch.optim.lr_scheduler.LRScheduler]:
    params = list(params)
    if spec.outer.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=spec.outer.lr)
    else:
        opt = torch.optim.SGD(params, lr=spec.outer.lr)
    total, kind, lr, lr_min = spec.outer.iterations, spec.meta_lr_schedule, spec.outer.lr, spec.outer.lr_min
    # constant; linear to zero (Reptile's outer step size); cosine to lr_min (MAML++)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(kind, it, total, lr, lr_min))
    return opt, lr_schedule


def averaged(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a meta-iteration averages over the meta-batch, by name (for its shapes): a gradient for
    every parameter, and the batch statistics of per-step BatchNorm running statistics, if any."""
    return {**dict(model.named_parameters()), **stats_buffers(model)}


def meta_update(model: nn.Module, parameters: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                means: Params) -> None:
    """The meta-optimizer step with the mean gradients, and the running statistics' update."""
    apply_meta_update(parameters, optimizer, means)
    update_running_stats(model, means)


def device_for(spec: JobSpec) -> torch.device:
    return torch.device("cuda" if spec.resources.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")


class ShardWorker(Worker):
    """One worker of a job: builds the task family and model once, then computes shards.

    In a Ray group (``train_step``) it holds its own copy of the parameters and meta-optimizer:
    its shard's meta-gradients are all-reduced with the other workers' and every worker takes the
    same step, so only the iteration number travels from the driver. In process (``compute``) it
    returns its shard's sum for the driver to aggregate. ``built`` hands an in-process worker the
    driver's own family and model instead of a second copy.
    """

    def __init__(self, spec: JobSpec, rank: int, world: int, *, data_root: str | None = None,
                 cache_dir: str | None = None, allowed_modules: list[str] | None = None, threads: int | None = None,
                 built: tuple[TaskFamily, nn.Module] | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.spec = spec
        self.rank, self.world = rank, world
        self.device = device_for(self.spec)
        self.family, self.model = built or build(self.spec, data_root=Path(data_root) if data_root else None,
                                                 cache_dir=Path(cache_dir) if cache_dir else None,
                                                 allowed_modules=allowed_modules)
        self.model.to(self.device)
        self.loss = self.family.loss
        self.parameters = dict(self.model.named_parameters())
        self.averaged = averaged(self.model)
        self.names = list(self.averaged)

    def load(self, model: dict[str, torch.Tensor], optimizer: dict[str, Any], iteration: int) -> None:
        """The driver's state (a fresh or a resumed run) before the first ``train_step``; only a
        worker of a collective group steps, so only it has a meta-optimizer."""
        self.model.load_state_dict({k: v.to(self.device) for k, v in model.items()}, strict=True)
        self.optimizer, self.schedule = make_optimizer(self.spec, self.parameters.values())
        self.optimizer.load_state_dict(optimizer)
        self.schedule.last_epoch = iteration

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The parameters and optimizer state, for the driver's checkpoints, evaluations and export."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}, self.optimizer.state_dict()

    def train_step(self, iteration: int, before: bool) -> tuple[dict[str, float], int]:
        """One meta-iteration of the group: this shard's meta-gradients, the all-reduce with the other
        workers' (``aggregator.allreduce_mean``) and the same meta-optimizer step on every worker."""
        params = {k: v.detach() for k, v in self.parameters.items()}
        buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        flat = torch.zeros(sum(p.numel() for p in self.averaged.values()), dtype=torch_dtype(self.spec),
                           device=self.device)
        metrics: dict[str, float] = {}
        count, error = 0, None
        try:
            tasks = sample_shard(self.family, self.spec, iteration, self.rank, self.world, self.device)
            total = shard_meta_gradient(self.model, params, buffers, tasks, before=before,
                                        **engine_kwargs(self.spec, self.loss, iteration))
            if total.count:
                flat = flatten(total.grads, self.names)
            metrics, count = total.metrics, total.count
        except NonFiniteLossError as exc:  # every worker must reach the all-reduce: the error goes with it
            error = exc
        except Exception as exc:
            error = WorkerError(f"{type(exc).__name__}: {exc}")
        mean_flat, metrics, count = allreduce_mean(flat, metrics, count, error)
        grads = unflatten(mean_flat, self.averaged)
        if not all(torch.isfinite(g).all() for g in grads.values()):
            raise NonFiniteLossError("non-finite meta-gradient")
        meta_update(self.model, self.parameters, self.optimizer, grads)
        self.schedule.step()
        metrics["meta/lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics, count

    def compute(self, state: tuple[Params, Params], iteration: int,
                before: bool = True) -> tuple[torch.Tensor, dict[str, float], int]:
        params, buffers = ({k: v.to(self.device) for k, v in d.items()} for d in state)
        tasks = sample_shard(self.family, self.spec, iteration, self.rank, self.world, self.device)
        total = shard_meta_gradient(self.model, params, buffers, tasks, before=before,
                                    **engine_kwargs(self.spec, self.loss, iteration))
        flat = flatten(total.grads, self.names).cpu() if total.count else torch.zeros(0)
        return flat, total.metrics, total.count


class SupervisedProgram:
    """What the training loop runs for a supervised spec: the model, the meta-optimizer and its
    schedule, one meta-iteration over the worker group, the meta-test evaluation and the export."""

    worker_cls = ShardWorker
    diverged = "non-finite loss"  # how the loop names a NonFiniteLossError
    collective = True  # its Ray workers all-reduce their meta-gradients and step themselves

    def __init__(self, spec: JobSpec, *, data_root: Path | None = None, cache_dir: Path | None = None,
                 allowed_modules: Iterable[str] | None = None, device: torch.device | None = None) -> None:
        self.spec = spec
        self.device = device or torch.device("cpu")
        self.family, self.module = build(spec, data_root=data_root, cache_dir=cache_dir,
                                         allowed_modules=allowed_modules)
        self.module.to(self.device)
        self.parameters = dict(self.module.named_parameters())
        self.averaged = averaged(self.module)
        self.optimizer, self.schedule = make_optimizer(spec, self.parameters.values())
        self.stale = False  # the workers of a collective group are ahead of the driver's copy
        self.worker_context = dict(data_root=str(data_root) if data_root else None,
                                   cache_dir=str(cache_dir) if cache_dir else None,
                                   allowed_modules=list(allowed_modules) if allowed_modules is not None else None,
                                   threads=spec.resources.threads_per_worker)

    def local_worker(self) -> ShardWorker:
        return ShardWorker(self.spec, 0, 1, built=(self.family, self.module))

    def state(self) -> tuple[Params, Params]:
        return ({k: v.detach() for k, v in self.parameters.items()},
                {k: v.detach() for k, v in self.module.named_buffers()})

    def attach(self, group: Any) -> None:
        """A Ray group starts from the driver's parameters and optimizer state (a resume's too)."""
        self.stale = False
        if group.collective:
            model = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
            group.call("load", group.share(model), self.optimizer.state_dict(), self.schedule.last_epoch)

    def sync(self, group: Any) -> None:
        """The workers' parameters and optimizer state back in the driver (before a checkpoint, an
        evaluation or the export): only then does anything but the iteration number travel."""
        if self.stale and group.collective:
            model, optimizer = group.first("state")
            self.module.load_state_dict({k: v.to(self.device) for k, v in model.items()}, strict=True)
            self.optimizer.load_state_dict(optimizer)
            self.stale = False

    def step(self, group: Any, iteration: int, *, before: bool) -> tuple[dict[str, float], int]:
        """One meta-iteration: fan out, aggregate, meta-update. Its metrics and the tasks it saw.

        A Ray group all-reduces and steps on the workers; in process the driver aggregates."""
        if group.collective:
            metrics, count = group.call("train_step", iteration, before)[0]  # the same on every worker
            self.stale = True
            return metrics, count
        params, buffers = self.state()
        shared = group.share(({k: v.cpu() for k, v in params.items()}, {k: v.cpu() for k, v in buffers.items()}))
        sums = []
        for flat, metrics, count in group.call("compute", shared, iteration, before):
            s = GradientSum()
            if count:
                s.grads = {k: v.to(self.device) for k, v in unflatten(flat, self.averaged).items()}
            s.metrics, s.count = metrics, count
            sums.append(s)
        grads, metrics, count = mean(sums)
        if not all(torch.isfinite(g).all() for g in grads.values()):
            raise TrainingError(f"non-finite meta-gradient at iteration {iteration}", iteration)
        meta_update(self.module, self.parameters, self.optimizer, grads)
        self.schedule.step()
        metrics["meta/lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics, count

    def resume(self, iteration: int) -> None:
        self.schedule.last_epoch = iteration  # the optimizer state already holds the annealed lr

    def evaluate(self) -> dict[str, float]:
        params, buffers = self.state()
        spec = self.spec
        return meta_test(self.module, params, buffers, self.family, seed=spec.seed, num_tasks=spec.eval.tasks,
                         steps=spec.eval.steps, lr=spec.inner.lr, optimizer=spec.inner.optimizer,
                         batch_size=spec.inner.batch_size, device=self.device,
                         meta=MetaOptions.of(spec) if spec.meta_options_used else None)

    def export_info(self) -> dict[str, Any]:
        return {"input_shape": list(self.family.input_shape), "output_dim": self.family.output_dim,
                "loss": self.family.loss}
