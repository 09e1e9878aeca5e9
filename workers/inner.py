"""The inner loop, shared by every algorithm: functional forward passes, the step rules, adaptation.

Parameters travel as ``dict[name, Tensor]`` and the model is called with
``torch.func.functional_call``, so any ``nn.Module`` works and no module state is mutated.

The step rules (SGD, and Adam with beta1 = 0 as in the Reptile paper) are defined once, in
``InnerOptimizer``: the update, the non-finite check and the loss before adapting. ``adapt_steps``
is the one adaptation loop over them (MAML's inner loop, Reptile, ``workers.evaluation.adapt``);
the fast paths of ``workers.fast``, which compute their gradients on their own schedule, take their
steps through the same ``InnerOptimizer``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from workers.errors import NonFiniteLossError, Stopped
from workers.tasks.base import LossName

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerName = Literal["sgd", "adam"]

ADAM_BETAS = (0.0, 0.999)  # Reptile paper, appendix: Adam with beta1 = 0
ADAM_EPS = 1e-8


def loss_function(name: LossName) -> LossFn:
    if name == "mse":
        return F.mse_loss
    if name == "cross_entropy":
        return F.cross_entropy
    raise ValueError(f"loss: unknown loss '{name}' (expected 'mse' or 'cross_entropy')")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def split_state(model: nn.Module) -> tuple[Params, Params]:
    """Detached copies of a module's parameters and buffers, keyed by their names."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    return params, buffers


class Forward:
    """``Forward(model, buffers)(params, x)`` runs the model with the given parameters.

    Buffers are cloned per instance so that a module which updates them in place (BatchNorm with
    running statistics in train mode) never leaks state from one task into the next.
    """

    def __init__(self, model: nn.Module, buffers: Params) -> None:
        self.model = model
        self.buffers = {n: b.clone() for n, b in buffers.items()}

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (params, self.buffers), (x,), strict=False)


def check_finite(values: torch.Tensor, what: str, when: str) -> None:
    """Raise ``NonFiniteLossError`` if a loss (0-d), or any task's loss (``(tasks,)``), is not finite."""
    if values.dim() == 0:
        if not bool(torch.isfinite(values)):
            raise NonFiniteLossError(f"{what} is {values.item()} {when}")
        return
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).nonzero()[0, 0])
        raise NonFiniteLossError(f"{what} is {values[bad].item()} {when} (task {bad} of the shard)")


class InnerState(NamedTuple):
    """What an inner loop carries from one step to the next."""

    step: int  # steps taken so far
    loss_before: torch.Tensor | None  # the first step's loss (detached): the loss before adapting
    m: Params  # Adam's first moments (empty for SGD)
    v: Params  # Adam's second moments (empty for SGD)


@dataclass(frozen=True)
class InnerOptimizer:
    """The inner step rule, with explicit state: ``state = opt.init(params)``, then once per step
    ``params, state = opt.step(state, params, grads, loss)``.

    ``sgd``: p - lr g. ``adam``: ``torch.optim.Adam`` with betas ``ADAM_BETAS`` (beta1 = 0, as in
    the Reptile paper), its bias corrections in the same order of operations. The update is written
    without in-place operations, so it is differentiable when run with grad mode on (second-order
    MAML's SGD steps); with grad mode off it records nothing. Parameters may carry a leading task
    dimension (``(tasks, *shape)``, the batched path): the losses are then ``(tasks,)``.
    """

    kind: OptimizerName
    lr: float

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adam"):
            raise ValueError(f"optimizer: unknown inner optimizer '{self.kind}' (expected 'sgd' or 'adam')")

    def init(self, params: Params) -> InnerState:
        if self.kind == "adam":
            zeros = {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()}
            return InnerState(0, None, zeros, dict(zeros))
        return InnerState(0, None, {}, {})

    def step(self, state: InnerState, params: Params, grads: Sequence[torch.Tensor],
             loss: torch.Tensor) -> tuple[Params, InnerState]:
        """One step from ``params`` with ``grads`` (in ``params`` order), taken at ``loss``.

        Raises ``NonFiniteLossError`` when ``loss`` is not finite; the loss of the first step is
        kept as ``state.loss_before``.
        """
        t = state.step
        loss = loss.detach()
        check_finite(loss, "inner loss", f"at inner step {t}")
        loss_before = loss if t == 0 else state.loss_before
        if self.kind == "sgd":
            new = {k: p - self.lr * g for (k, p), g in zip(params.items(), grads, strict=True)}
            return new, InnerState(t + 1, loss_before, state.m, state.v)
        beta1, beta2 = ADAM_BETAS
        bias1, bias2 = 1 - beta1 ** (t + 1), 1 - beta2 ** (t + 1)
        new, m, v = {}, {}, {}
        for (k, p), g in zip(params.items(), grads, strict=True):
            m[k] = state.m[k].mul(beta1).add(g, alpha=1 - beta1)
            v[k] = state.v[k].mul(beta2).addcmul(g, g, value=1 - beta2)
            denom = v[k].sqrt() / bias2 ** 0.5 + ADAM_EPS
            new[k] = p - (self.lr / bias1) * m[k] / denom
        return new, InnerState(t + 1, loss_before, m, v)


def minibatches(n: int, batch_size: int | None, steps: int) -> list[torch.Tensor | None]:
    """Each step's support indices: None for the whole set, else ``batch_size`` indices cycling
    through a fixed permutation of ``range(n)`` (seeded by ``n``: the result is a pure function of
    the inputs)."""
    bs = min(batch_size or n, n)
    if bs == n:
        return [None] * steps
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    out: list[torch.Tensor | None] = []
    for step in range(steps):
        start = (step * bs) % n
        out.append(order[start:start + bs] if start + bs <= n
                   else torch.cat([order[start:], order[:start + bs - n]]))
    return out


def adapt_steps(
    forward: Forward,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    steps: int,
    optimizer: InnerOptimizer,
    batch_size: int | None = None,
    create_graph: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Params, float]:
    """``steps`` steps of ``optimizer`` on (x, y), on mini-batches of ``batch_size`` if given.

    Returns the adapted parameters and the loss before adapting (the first step's loss, on its
    mini-batch; NaN for 0 steps). With ``create_graph=True`` the result stays differentiable with
    respect to ``params`` (second-order MAML). Otherwise each step's result is a fresh leaf that
    requires grad, so that ``autograd.grad`` with respect to the adapted parameters is the
    first-order MAML gradient. ``should_stop()`` is asked before every step after the first
    (:class:`workers.errors.Stopped` when it says so).
    """
    state = optimizer.init(params)
    current = params if create_graph else {k: p.detach().requires_grad_() for k, p in params.items()}
    for step, idx in enumerate(minibatches(x.shape[0], batch_size, steps)):
        if step and should_stop is not None and should_stop():
            raise Stopped(step)
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        loss = loss_fn(forward(current, xb), yb)
        grads = torch.autograd.grad(loss, tuple(current.values()), create_graph=create_graph)
        with torch.set_grad_enabled(create_graph):
            current, state = optimizer.step(state, current, grads, loss)
        if not create_graph:
            current = {k: p.requires_grad_() for k, p in current.items()}
    before = math.nan if state.loss_before is None else state.loss_before.item()
    return current, before


def evaluate(forward: Forward, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
             classification: bool) -> tuple[float, float]:
    """(loss, accuracy) without building a graph; accuracy is NaN for regression."""
    with torch.no_grad():
        out = forward(params, x)
        return loss_fn(out, y).item(), (accuracy(out, y) if classification else float("nan"))
