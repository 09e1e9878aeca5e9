"""MAML (Finn, Abbeel and Levine, ICML 2017) and first-order MAML, for one task.

The meta-gradient of the query loss after ``k`` SGD steps on the support set,

    g = d/dtheta L_query(theta_k),  theta_{i+1} = theta_i - alpha * grad L_support(theta_i),

differentiates through every inner step (second order: the product of (I - alpha H_i) factors).
First-order MAML drops those Jacobians and returns grad L_query(theta_k): it is a flag,
``first_order=True``, not a second implementation.

On CPU, a model of conv/BatchNorm/ReLU/max-pool blocks and a linear head (the paper's Conv4) takes
the same steps with the query passes through hand-written kernels (``workers.fast``, checked
against this loop in float64 by tests/test_engine_fast.py); any other model runs the plain autograd
loop, ``maml_task_autograd``.

Example::

    params, buffers = split_state(model)
    grads, metrics = maml_task(model, params, buffers, task, inner_steps=1, inner_lr=0.4,
                               loss="cross_entropy")
"""

from __future__ import annotations

import torch
from torch import nn

from workers.fast import fused_net, maml_shard
from workers.inner import Forward, InnerOptimizer, Params, adapt_steps, check_finite, evaluate, loss_function
from workers.tasks.base import LossName, Task


def maml_task(
    model: nn.Module,
    params: Params,
    buffers: Params,
    task: Task,
    *,
    inner_steps: int,
    inner_lr: float,
    loss: LossName,
    first_order: bool = False,
    before: bool = True,
) -> tuple[Params, dict[str, float]]:
    """One task's MAML meta-gradient (keyed like ``params``) and its metrics.

    ``before=False`` skips the query pass at the meta-parameters: ``meta/loss_before`` and
    ``meta/accuracy_before`` are then absent, and the meta-gradient is the same.
    """
    if fused_net(model, task.x_query.device) is not None:
        fast = maml_shard(model, params, buffers, [task], inner_steps=inner_steps, inner_lr=inner_lr, loss=loss,
                          first_order=first_order, query="fused", before=before)
        if fast is not None:
            return fast.grads, fast.metrics
    return maml_task_autograd(model, params, buffers, task, inner_steps=inner_steps, inner_lr=inner_lr, loss=loss,
                              first_order=first_order, before=before)


def maml_task_autograd(
    model: nn.Module,
    params: Params,
    buffers: Params,
    task: Task,
    *,
    inner_steps: int,
    inner_lr: float,
    loss: LossName,
    first_order: bool = False,
    before: bool = True,
) -> tuple[Params, dict[str, float]]:
    """``maml_task`` with plain autograd through ``functional_call``: any ``nn.Module``."""
    loss_fn = loss_function(loss)
    classification = loss == "cross_entropy"
    forward = Forward(model, buffers)
    theta = {n: p.detach().requires_grad_() for n, p in params.items()}

    if before:
        query_loss_before, query_acc_before = evaluate(forward, theta, task.x_query, task.y_query, loss_fn,
                                                       classification)
    adapted, support_loss_before = adapt_steps(
        forward, theta, task.x_support, task.y_support, loss_fn,
        steps=inner_steps, optimizer=InnerOptimizer("sgd", inner_lr), create_graph=not first_order,
    )
    out = forward(adapted, task.x_query)
    query_loss = loss_fn(out, task.y_query)
    check_finite(query_loss.detach(), "query loss", "after adaptation")
    # Second order: differentiate through the inner steps back to theta. First order: the adapted
    # parameters are detached leaves, and the gradient there is FOMAML's meta-gradient.
    wrt = tuple(adapted.values()) if first_order else tuple(theta.values())
    grads = torch.autograd.grad(query_loss, wrt)
    metrics = {"inner/loss_before": support_loss_before}
    if before:
        metrics["meta/loss_before"] = query_loss_before
    metrics["meta/loss"] = query_loss.item()
    if classification:
        if before:
            metrics["meta/accuracy_before"] = query_acc_before
        metrics["meta/accuracy"] = (out.argmax(-1) == task.y_query).float().mean().item()
    return dict(zip(params.keys(), grads, strict=True)), metrics
