"""Adaptation and meta-test evaluation: adapt on a support set, measure on the query set.

The meta-test protocol of the MAML paper: adapt each held-out task with ``steps`` gradient steps
(10 at test for Omniglot), report the mean query accuracy (or MSE) and its 95% confidence interval
(1.96 standard errors) over ``tasks`` tasks (600 in the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from workers.errors import Stopped
from workers.fast import fused
from workers.fast.batched import fused_net
from workers.inner import (
    Forward,
    InnerOptimizer,
    InnerState,
    LossFn,
    OptimizerName,
    Params,
    adapt_steps,
    evaluate,
    loss_function,
)
from workers.mamlpp import MetaOptions, is_learned
from workers.mamlpp import adapt as adapt_learned
from workers.tasks.base import LossName, Task, TaskFamily

# The most numbers one adaptation answer may hold beyond its predictions (the predictions after
# every step, or an RL answer's trajectories): about 2 MB of JSON.
MAX_ANSWER_NUMBERS = 100_000


def adapt(
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    loss: LossName,
    optimizer: OptimizerName = "sgd",
    batch_size: int | None = None,
    fast: bool = True,
    should_stop: Callable[[], bool] | None = None,
    meta: MetaOptions | None = None,
    on_step: OnStep | None = None,
) -> tuple[Params, float, float]:
    """Adapt ``params`` to (x, y). Returns the adapted parameters and the loss before and after.

    ``meta``: a model trained with learned inner-loop pieces (learned learning rates, the head
    only, per-step BatchNorm; ``workers.mamlpp``) adapts with them: ``params`` then holds the
    learned pieces too, and the result is the model's parameters for the forward pass after
    ``steps`` steps (``lr`` is ``meta.lr`` there; ``optimizer`` and ``batch_size`` must be the defaults).

    The steps are ``workers.inner.adapt_steps`` (SGD or Adam, mini-batches of ``batch_size``), the
    inner loop of training. Full-batch SGD on a conv/BatchNorm/ReLU/max-pool stack with a linear
    head (Conv4) takes the hand-written CPU kernels of ``workers.fast.fused`` for its gradients
    (the same gradients, checked in float64 against autograd); ``fast=False`` forces autograd,
    which takes any module. Both losses are on the whole of (x, y). ``should_stop()`` is asked
    between two steps: :class:`workers.errors.Stopped` when it says so (a time limit).

    ``on_step(k, params_k, loss_k)``, if given, is called for k = 0, 1, ..., ``steps`` with the
    parameters for the forward pass after k steps (detached) and the loss on all of (x, y) there:
    the same loop, observed, so ``params_k`` is what ``adapt(..., steps=k)`` returns.
    """
    if meta is not None and meta.learned_inner:
        if optimizer != "sgd" or batch_size is not None:
            raise ValueError("optimizer: learned inner loops take full-batch SGD steps")
        return adapt_learned(model, params, buffers, x, y, steps=steps, options=meta, loss=loss,
                             should_stop=should_stop, on_step=on_step)
    params = {k: v for k, v in params.items() if not is_learned(k)}
    opt = InnerOptimizer(optimizer, lr)
    if fast and steps > 0 and optimizer == "sgd" and batch_size is None:
        net = fused_net(model, x.device)
        if net is not None:
            return _adapt_fused(net, params, x, y, steps=steps, optimizer=opt, loss=loss, should_stop=should_stop,
                                on_step=on_step)
    loss_fn = loss_function(loss)
    forward = Forward(model, buffers)
    if steps == 0:
        before, _ = evaluate(forward, params, x, y, loss_fn, classification=False)
        if on_step is not None:
            on_step(0, dict(params), before)
        return dict(params), before, before
    if on_step is not None:
        opt = _Observed(optimizer, lr, _observer(on_step, forward, x, y, loss_fn, full_batch=batch_size is None))
    adapted, before = adapt_steps(forward, params, x, y, loss_fn, steps=steps, optimizer=opt, batch_size=batch_size,
                                  should_stop=should_stop)
    adapted = {k: v.detach() for k, v in adapted.items()}
    if batch_size is not None:  # the first step's loss was on a mini-batch: the loss before is on all of x
        before, _ = evaluate(forward, params, x, y, loss_fn, classification=False)
    after, _ = evaluate(forward, adapted, x, y, loss_fn, classification=False)
    if on_step is not None:
        on_step(steps, adapted, after)
    return adapted, before, after


# on_step(k, params after k steps, loss on the whole support set there)
OnStep = Callable[[int, Params, float], None]


@dataclass(frozen=True)
class _Observed(InnerOptimizer):
    """``InnerOptimizer`` that shows ``observe`` the parameters (and their loss) before each step:
    ``adapt_steps`` itself runs, so every-step answers come from the one loop."""

    observe: Callable[[InnerState, Params, torch.Tensor], None] | None = None

    def step(self, state: InnerState, params: Params, grads: Sequence[torch.Tensor],
             loss: torch.Tensor) -> tuple[Params, InnerState]:
        if self.observe is not None:
            self.observe(state, params, loss)
        return super().step(state, params, grads, loss)


def _observer(on_step: OnStep, forward: Forward, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *,
              full_batch: bool) -> Callable[[InnerState, Params, torch.Tensor], None]:
    def observe(state: InnerState, params: Params, loss: torch.Tensor) -> None:
        current = {k: v.detach() for k, v in params.items()}
        # A full-batch step's loss is the support loss; a mini-batch's is not: evaluate on all of x.
        value = loss.item() if full_batch else evaluate(forward, current, x, y, loss_fn, classification=False)[0]
        on_step(state.step, current, value)
    return observe


def predict(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    """The outputs for ``x`` with ``params`` (no graph): the hand-written kernels where they apply.
    ``params`` may carry the statistics that normalise a query pass, running or the support set's
    (``workers.mamlpp.adapt``'s result)."""
    net = fused_net(model, x.device)
    if net is not None:
        return fused.logits(net, params, x)
    with torch.no_grad():
        return Forward(model, buffers)(params, x)


def _adapt_fused(net: fused.FusedNet, params: Params, x: torch.Tensor, y: torch.Tensor, *, steps: int,
                 optimizer: InnerOptimizer, loss: LossName, should_stop: Callable[[], bool] | None = None,
                 on_step: OnStep | None = None) -> tuple[Params, float, float]:
    """``adapt``'s steps with the hand-written forward and backward for the gradients (no autograd graph)."""
    p = {k: v.detach() for k, v in params.items()}
    prepared = fused.prepare(net, p, x)  # the input as the first block takes it, once for every step
    state = optimizer.init(p)
    for step in range(steps):
        if step and should_stop is not None and should_stop():
            raise Stopped(step)
        value, _, grads = fused.run(net, p, prepared, y, loss, grad=True)
        assert grads is not None
        if on_step is not None:
            on_step(step, p, value.item())
        p, state = optimizer.step(state, p, [grads[k] for k in p], value)
    assert state.loss_before is not None
    after = fused.run(net, p, prepared, y, loss, grad=False)[0].item()
    if on_step is not None:
        on_step(steps, p, after)
    return p, state.loss_before.item(), after


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, 1.96 * math.sqrt(var / n)


def meta_test(
    model: nn.Module,
    params: Params,
    buffers: Params,
    family: TaskFamily,
    *,
    seed: int,
    num_tasks: int,
    steps: int,
    lr: float,
    optimizer: Literal["sgd", "adam"] = "sgd",
    batch_size: int | None = None,
    split: Literal["train", "val", "test"] = "test",
    device: torch.device | None = None,
    meta: MetaOptions | None = None,
) -> dict[str, float]:
    """Adapt on each of ``num_tasks`` held-out tasks; query metrics before and after, with CIs.

    The tasks are those of iteration 0 of ``split``, the same at every evaluation, so that a
    learning curve compares like with like.
    """
    loss_fn = loss_function(family.loss)
    classification = family.loss == "cross_entropy"
    forward = Forward(model, buffers)
    loss_before, loss_after, acc_before, acc_after = [], [], [], []
    for index in range(num_tasks):
        task = family.sample(seed, 0, index, split)
        if device is not None:
            task = Task(*(t.to(device) for t in task))
        # before adapting: what 0 steps give (with learned pieces, the query normalisation they ask for)
        start, _, _ = adapt(model, params, buffers, task.x_support, task.y_support, steps=0, lr=lr,
                            loss=family.loss, optimizer=optimizer, batch_size=batch_size, meta=meta)
        lb, ab = evaluate(forward, start, task.x_query, task.y_query, loss_fn, classification)
        adapted, _, _ = adapt(model, params, buffers, task.x_support, task.y_support, steps=steps, lr=lr,
                              loss=family.loss, optimizer=optimizer, batch_size=batch_size, meta=meta)
        la, aa = evaluate(forward, adapted, task.x_query, task.y_query, loss_fn, classification)
        loss_before.append(lb)
        loss_after.append(la)
        acc_before.append(ab)
        acc_after.append(aa)
    out: dict[str, float] = {}
    out["eval/loss"], out["eval/loss_ci95"] = mean_ci95(loss_after)
    out["eval/loss_before"], _ = mean_ci95(loss_before)
    if classification:
        out["eval/accuracy"], out["eval/accuracy_ci95"] = mean_ci95(acc_after)
        out["eval/accuracy_before"], _ = mean_ci95(acc_before)
    out["eval/tasks"] = float(num_tasks)
    out["eval/steps"] = float(steps)
    return out
