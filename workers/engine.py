"""The engine's entry points: one task's meta-gradient, a shard of a meta-batch, the public API."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from workers.aggregator import GradientSum, mean
from workers.inner import OptimizerName, Params, split_state
from workers.maml import maml_task
from workers.mamlpp import MetaOptions
from workers.mamlpp import task_meta_gradient as general_task_meta_gradient
from workers.reptile import reptile_task
from workers.tasks.base import LossName, Task

ALGORITHMS = ("maml", "fomaml", "reptile")


def task_meta_gradient(
    model: nn.Module,
    params: Params,
    buffers: Params,
    task: Task,
    *,
    algorithm: str,
    inner_steps: int,
    inner_lr: float,
    loss: LossName,
    inner_optimizer: OptimizerName = "sgd",
    inner_batch_size: int | None = None,
    before: bool = True,
    meta: MetaOptions | None = None,
) -> tuple[Params, dict[str, float]]:
    """One task's meta-gradient and metrics, for any of the three algorithms.

    ``before=False`` skips the query pass at the meta-parameters: the meta-gradient is the same,
    and ``meta/loss_before`` and ``meta/accuracy_before`` are absent from the metrics (for
    iterations that do not report them). ``inner/loss_before`` stays: the first inner step gives it.
    ``meta``: the MAML++ / Meta-SGD / ANIL options (``workers.mamlpp``); when any is on, MAML and
    first-order MAML take that module's general loop (the learned pieces are in ``params``).
    """
    if algorithm in ("maml", "fomaml") and meta is not None and meta.general:
        return general_task_meta_gradient(model, params, buffers, task, options=meta, loss=loss,
                                          first_order=algorithm == "fomaml", before=before)
    if algorithm in ("maml", "fomaml"):
        return maml_task(model, params, buffers, task, inner_steps=inner_steps, inner_lr=inner_lr,
                         loss=loss, first_order=algorithm == "fomaml", before=before)
    if algorithm == "reptile":
        return reptile_task(model, params, buffers, task, inner_steps=inner_steps, inner_lr=inner_lr,
                            loss=loss, optimizer=inner_optimizer, batch_size=inner_batch_size, before=before)
    raise ValueError(f"algorithm: unknown algorithm '{algorithm}' (expected one of {', '.join(ALGORITHMS)})")


def shard_meta_gradient(model: nn.Module, params: Params, buffers: Params, tasks: Sequence[Task],
                        **kwargs) -> GradientSum:
    """The summed meta-gradients and metrics of a shard of tasks (one worker's share).

    ``kwargs`` are those of ``task_meta_gradient`` (``before=False`` included).

    MAML and first-order MAML on a model the batched path recognises (conv/BatchNorm/ReLU/max-pool
    blocks and a linear head, e.g. Conv4) take it: the shard's tasks at once, the same maths
    (checked in float64 in tests/test_engine_fast.py); anything else takes the per-task loop. The
    MAML++ / Meta-SGD / ANIL options (``meta.general``) always take the per-task loop of
    ``workers.mamlpp``: the batched path implements none of them.
    """
    from workers.fast import shard_meta_gradient as batched_shard_meta_gradient

    meta = kwargs.get("meta")
    if meta is None or not meta.general:
        fast = batched_shard_meta_gradient(model, params, buffers, tasks, **kwargs)
        if fast is not None:
            return fast
    total = GradientSum()
    for task in tasks:
        grads, metrics = task_meta_gradient(model, params, buffers, task, **kwargs)
        total.add(grads, metrics)
    return total


def meta_gradient(
    model: nn.Module,
    tasks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    algorithm: str = "maml",
    inner_steps: int = 1,
    inner_lr: float = 0.4,
    loss: LossName = "cross_entropy",
    inner_optimizer: OptimizerName = "sgd",
    inner_batch_size: int | None = None,
    before: bool = True,
    meta: MetaOptions | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The mean meta-gradient of ``model`` over ``tasks``, and the mean metrics.

    ``tasks`` holds ``(x_support, y_support, x_query, y_query)`` tuples. The result maps every
    parameter name of ``model`` to a tensor of its shape: for MAML and first-order MAML the mean
    meta-gradient, for Reptile the mean of (phi - phi_adapted). Either is what the outer optimizer
    consumes (set it as ``.grad`` and step). The model itself is not modified. ``before=False``
    skips the pre-adaptation query pass (no ``meta/loss_before``, ``meta/accuracy_before``).
    ``meta``: the MAML++ / Meta-SGD / ANIL options (``workers.mamlpp``; the learned pieces are
    parameters of ``model``, added by ``workers.mamlpp.attach``, and get their meta-gradients too).

    >>> grads, metrics = meta_gradient(model, tasks, algorithm="maml", inner_steps=1, inner_lr=0.4,
    ...                                loss="cross_entropy")
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: unknown algorithm '{algorithm}' (expected one of {', '.join(ALGORITHMS)})")
    if not tasks:
        raise ValueError("tasks: need at least one task")
    params, buffers = split_state(model)
    total = shard_meta_gradient(
        model, params, buffers, [Task(*t) for t in tasks], algorithm=algorithm, inner_steps=inner_steps,
        inner_lr=inner_lr, loss=loss, inner_optimizer=inner_optimizer, inner_batch_size=inner_batch_size,
        before=before, meta=meta,
    )
    grads, metrics, _ = mean([total])
    return grads, metrics
