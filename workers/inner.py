"""The inner loop, shared by every algorithm: functional forward passes and SGD adaptation.

Parameters travel as ``dict[name, Tensor]`` and the model is called with
``torch.func.functional_call``, so any ``nn.Module`` works and no module state is mutated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from workers.errors import NonFiniteLossError
from workers.tasks.base import LossName

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def sgd_adapt(
    forward: Forward,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
    create_graph: bool,
) -> tuple[Params, float]:
    """``steps`` SGD steps on (x, y). Returns the adapted parameters and the loss before adapting.

    With ``create_graph=True`` the result stays differentiable with respect to ``params`` (the
    second-order MAML path). Otherwise each step's result is detached, so that a later
    ``autograd.grad`` with respect to the adapted parameters is the first-order MAML gradient.
    """
    loss_before = float("nan")
    for step in range(steps):
        loss = loss_fn(forward(params, x), y)
        if step == 0:
            loss_before = loss.item()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"inner loss is {loss.item()} at inner step {step}")
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)
        if create_graph:
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
        else:
            params = {
                n: (p.detach() - lr * g).requires_grad_() for (n, p), g in zip(params.items(), grads, strict=True)
            }
    return params, loss_before


def evaluate(forward: Forward, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
             classification: bool) -> tuple[float, float]:
    """(loss, accuracy) without building a graph; accuracy is NaN for regression."""
    with torch.no_grad():
        out = forward(params, x)
        return loss_fn(out, y).item(), (accuracy(out, y) if classification else float("nan"))
