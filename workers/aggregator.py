"""The parameter aggregator: combine per-task meta-gradients, then take the meta-optimizer step.

Shards (one per worker) contribute a *sum* of their tasks' meta-gradients and a task count; the
mean is the total sum over the total count, so splitting a meta-batch never changes the result
beyond floating-point summation order. In one process :func:`mean` combines the shards; in a Ray
worker group :func:`allreduce_mean` does the same between the workers, a collective all-reduce of
one flat vector (``torch.distributed``: gloo on CPU, NCCL on GPU), after which every worker takes
the same meta-optimizer step on its own copy of the parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from workers.inner import Params


class GradientSum:
    """A running sum of per-task meta-gradients and metrics."""

    def __init__(self) -> None:
        self.grads: Params = {}
        self.metrics: dict[str, float] = {}
        self.count = 0

    def add(self, grads: Mapping[str, torch.Tensor], metrics: Mapping[str, float]) -> None:
        for k, g in grads.items():
            if k in self.grads:
                self.grads[k].add_(g)
            else:
                self.grads[k] = g.detach().clone()
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + float(v)
        self.count += 1


def mean(sums: Iterable[GradientSum]) -> tuple[Params, dict[str, float], int]:
    """The mean meta-gradient and metrics over every task of every shard."""
    sums = list(sums)
    total = sum(s.count for s in sums)
    if total == 0:
        raise ValueError("meta_batch_size: no tasks to aggregate")
    grads: Params = {}
    metrics: dict[str, float] = {}
    for s in sums:
        for k, g in s.grads.items():
            grads[k] = grads[k] + g if k in grads else g.clone()
        for k, v in s.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v
    return ({k: g / total for k, g in grads.items()}, {k: v / total for k, v in metrics.items()}, total)


def allreduce_mean(flat: torch.Tensor, metrics: Mapping[str, float], count: int,
                   error: BaseException | None = None) -> tuple[torch.Tensor, dict[str, float], int]:
    """:func:`mean` between the workers of the process group: each passes its shard's flat
    gradient sum (zeros for a shard without tasks), metric sums, task count and the error its
    computation raised, if any; every worker gets the same mean. An error on any worker is raised
    on every worker (the first by rank), so none waits for a collective that will not come.
    """
    import torch.distributed as dist

    shards: list = [(dict(metrics), count, error)]
    if dist.is_initialized():
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, (dict(metrics), count, error))
    errors = [e for _, _, e in shards if e is not None]
    if errors:
        raise errors[0]
    total = sum(c for _, c, _ in shards)
    if total == 0:
        raise ValueError("meta_batch_size: no tasks to aggregate")
    if dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    summed: dict[str, float] = {}
    for shard_metrics, _, _ in shards:
        for k, v in shard_metrics.items():
            summed[k] = summed.get(k, 0.0) + v
    return flat / total, {k: v / total for k, v in summed.items()}, total


def flatten(grads: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """One flat vector in ``names`` order: what an all-reduce or an object-store transfer carries."""
    return torch.cat([grads[n].reshape(-1) for n in names])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Params:
    out: Params = {}
    offset = 0
    for n, p in like.items():
        out[n] = vector[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    if offset != vector.numel():
        raise ValueError(f"flat gradient has {vector.numel()} values, the parameters {offset}")
    return out


def apply_meta_update(parameters: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                      mean_grads: Mapping[str, torch.Tensor]) -> None:
    """Write the mean meta-gradient into ``.grad`` and step the meta-optimizer."""
    for n, p in parameters.items():
        p.grad = mean_grads[n].to(dtype=p.dtype, device=p.device).clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
