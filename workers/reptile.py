"""Reptile (Nichol, Achiam and Schulman, 2018), for one task.

Train on the task for ``k`` steps (SGD, or Adam with beta1 = 0 as in the paper) from phi to
phi_adapted; the meta-update direction is ``phi - phi_adapted``, which an outer SGD step with
step size epsilon turns into phi + epsilon (phi_adapted - phi). The outer step may anneal linearly
(``OuterSpec.anneal``); that lives in the training loop, not here. The inner steps are
``workers.inner.adapt_steps``, the loop MAML and adaptation take too.

Example::

    direction, metrics = reptile_task(model, params, buffers, task, inner_steps=5, inner_lr=1e-3,
                                      loss="cross_entropy", optimizer="adam")
"""

from __future__ import annotations

import torch
from torch import nn

from workers.inner import (
    Forward,
    InnerOptimizer,
    OptimizerName,
    Params,
    adapt_steps,
    check_finite,
    evaluate,
    loss_function,
)
from workers.tasks.base import LossName, Task


def reptile_task(
    model: nn.Module,
    params: Params,
    buffers: Params,
    task: Task,
    *,
    inner_steps: int,
    inner_lr: float,
    loss: LossName,
    optimizer: OptimizerName = "sgd",
    batch_size: int | None = None,
    before: bool = True,
) -> tuple[Params, dict[str, float]]:
    """(phi - phi_adapted) for one task and its metrics.

    Mini-batches (``batch_size``) cycle through a fixed permutation of the support set, so the
    result is a pure function of the inputs. ``before=False`` skips the query pass at phi
    (``meta/loss_before`` and ``meta/accuracy_before`` are then absent).
    """
    loss_fn = loss_function(loss)
    classification = loss == "cross_entropy"
    forward = Forward(model, buffers)
    phi = {n: p.detach() for n, p in params.items()}
    if before:
        query_loss_before, query_acc_before = evaluate(forward, phi, task.x_query, task.y_query, loss_fn,
                                                       classification)
    adapted, support_loss_before = adapt_steps(
        forward, phi, task.x_support, task.y_support, loss_fn,
        steps=inner_steps, optimizer=InnerOptimizer(optimizer, inner_lr), batch_size=batch_size,
    )
    adapted = {k: v.detach() for k, v in adapted.items()}
    query_loss, query_acc = evaluate(forward, adapted, task.x_query, task.y_query, loss_fn, classification)
    check_finite(torch.tensor(query_loss), "query loss", "after adaptation")
    metrics = {"inner/loss_before": support_loss_before}
    if before:
        metrics["meta/loss_before"] = query_loss_before
    metrics["meta/loss"] = query_loss
    if classification:
        if before:
            metrics["meta/accuracy_before"] = query_acc_before
        metrics["meta/accuracy"] = query_acc
    return {k: phi[k] - adapted[k] for k in phi}, metrics
