"""The parameter aggregator: combine per-task meta-gradients, then take the meta-optimizer step.

Shards (one per worker) send a *sum* of their tasks' meta-gradients and a task count; the mean is
the total sum over the total count, so splitting a meta-batch never changes the result beyond
floating-point summation order. The same functions serve one process and a Ray cluster.
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
