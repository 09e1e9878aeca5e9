"""Reptile (Nichol, Achiam and Schulman, 2018), for one task.

Train on the task for ``k`` steps (SGD, or Adam with beta1 = 0 as in the paper) from phi to
phi_adapted; the meta-update direction is ``phi - phi_adapted``, which an outer SGD step with
step size epsilon turns into phi + epsilon (phi_adapted - phi). The outer step may anneal linearly
(``OuterSpec.anneal``); that lives in the training loop, not here.

Example::

    direction, metrics = reptile_task(model, params, buffers, task, inner_steps=5, inner_lr=1e-3,
                                      loss="cross_entropy", optimizer="adam")
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from workers.errors import NonFiniteLossError
from workers.inner import Forward, Params, evaluate, loss_function
from workers.tasks.base import LossName, Task

ADAM_BETAS = (0.0, 0.999)  # Reptile paper, appendix: Adam with beta1 = 0
ADAM_EPS = 1e-8


def reptile_task(
    model: nn.Module,
    params: Params,
    buffers: Params,
    task: Task,
    *,
    inner_steps: int,
    inner_lr: float,
    loss: LossName,
    optimizer: Literal["sgd", "adam"] = "sgd",
    batch_size: int | None = None,
) -> tuple[Params, dict[str, float]]:
    """(phi - phi_adapted) for one task and its metrics.

    Mini-batches (``batch_size``) cycle through a fixed permutation of the support set, so the
    result is a pure function of the inputs.
    """
    loss_fn = loss_function(loss)
    classification = loss == "cross_entropy"
    forward = Forward(model, buffers)
    phi = {n: p.detach() for n, p in params.items()}
    query_loss_before, query_acc_before = evaluate(forward, phi, task.x_query, task.y_query, loss_fn, classification)

    n = task.x_support.shape[0]
    bs = min(batch_size or n, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n)) if bs < n else torch.arange(n)
    beta1, beta2 = ADAM_BETAS
    m = {k: torch.zeros_like(v) for k, v in phi.items()}
    v2 = {k: torch.zeros_like(v) for k, v in phi.items()}

    current = {k: v.clone().requires_grad_() for k, v in phi.items()}
    support_loss_before = float("nan")
    for step in range(inner_steps):
        start = (step * bs) % n
        idx = order[start:start + bs] if start + bs <= n else torch.cat([order[start:], order[:start + bs - n]])
        loss_value = loss_fn(forward(current, task.x_support[idx]), task.y_support[idx])
        if step == 0:
            support_loss_before = loss_value.item()
        if not torch.isfinite(loss_value):
            raise NonFiniteLossError(f"inner loss is {loss_value.item()} at inner step {step}")
        grads = torch.autograd.grad(loss_value, tuple(current.values()))
        with torch.no_grad():
            updated = {}
            for (k, p), g in zip(current.items(), grads, strict=True):
                if optimizer == "adam":
                    m[k].mul_(beta1).add_(g, alpha=1 - beta1)
                    v2[k].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    # The bias corrections in torch.optim.Adam's order of operations.
                    denom = v2[k].sqrt() / (1 - beta2 ** (step + 1)) ** 0.5 + ADAM_EPS
                    updated[k] = p - (inner_lr / (1 - beta1 ** (step + 1))) * m[k] / denom
                else:
                    updated[k] = p - inner_lr * g
        current = {k: v.requires_grad_() for k, v in updated.items()}

    adapted = {k: v.detach() for k, v in current.items()}
    query_loss, query_acc = evaluate(forward, adapted, task.x_query, task.y_query, loss_fn, classification)
    if not torch.isfinite(torch.tensor(query_loss)):
        raise NonFiniteLossError(f"query loss is {query_loss} after adaptation")
    metrics = {
        "inner/loss_before": support_loss_before,
        "meta/loss_before": query_loss_before,
        "meta/loss": query_loss,
    }
    if classification:
        metrics["meta/accuracy_before"] = query_acc_before
        metrics["meta/accuracy"] = query_acc
    return {k: phi[k] - adapted[k] for k in phi}, metrics
