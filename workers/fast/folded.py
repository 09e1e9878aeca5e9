"""Many tasks in one pass: every task's parameters at once, tasks folded into channels.

A shard of ``B`` tasks, each with its own copy of the parameters (``(B, *shape)`` tensors), runs
as one network: images as ``(n, B*C, H, W)`` with grouped convolutions (``groups=B``), BatchNorm
over that layout (its per-channel statistics are then per task, as the paper's per-task batch
statistics require), and linear layers as batched matrix products on ``(B, n, features)``.

Only standard autograd ops are used, with no ``torch.func.vmap``: their first and second
derivatives are PyTorch's own, so second-order MAML through this path is exact. (Under ``vmap``,
stock BatchNorm gives second-order meta-gradients about 1% off.) The float64 tests in
``tests/test_engine_fast.py`` check it against the per-task loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.fast.fused import PATCH_TAPS
from workers.fast.plan import Activation, BatchNorm, Conv, Flatten, Linear, MaxPool, Plan
from workers.inner import Params
from workers.tasks.base import LossName


class UnsupportedInput(ValueError):
    """The plan cannot run these inputs batched (the caller falls back to the per-task loop)."""


def expand_params(params: Params, tasks: int) -> Params:
    """Every task starts from the same parameters: ``(B, *shape)`` views of ``params``."""
    return {n: p.unsqueeze(0).expand(tasks, *p.shape) for n, p in params.items()}


def forward(plan: Plan, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Per-task outputs ``(B, n, out)`` of per-task parameters ``(B, *shape)`` on inputs ``(B, n, *in)``."""
    B, n = x.shape[:2]
    layers = list(plan.layers)
    i = 0
    # Two layouts: "image" (n, B*C, H, W), tasks folded into channels; "rows" (B, n, features).
    if isinstance(layers[0], Conv):
        if x.dim() != 5:
            raise UnsupportedInput(f"a convolution needs (tasks, n, C, H, W) inputs, got {tuple(x.shape)}")
        image = True
        if _is_block(layers[:4]) and params[layers[0].weight][0, 0].numel() <= PATCH_TAPS:
            h = _patch_block(x, layers[0], layers[1], params)  # type: ignore[arg-type]
            i = 4
        else:
            h = x.transpose(0, 1).reshape(n, B * x.shape[2], *x.shape[3:])
    else:
        h, image = x, False
    while i < len(layers):
        layer = layers[i]
        i += 1
        if image and _is_block(layers[i - 1:i + 3]):
            # conv, BatchNorm, ReLU, 2x2 max-pool, reordered (module docstring of workers.fast.fused)
            h = _block(h, layers[i - 1], layers[i], params, B)  # type: ignore[arg-type]
            i += 3
            continue
        if isinstance(layer, Conv):
            if not image:
                raise UnsupportedInput("a convolution after flattening")
            w = params[layer.weight]  # (B, out, in, kh, kw)
            b = params[layer.bias].reshape(-1) if layer.bias else None
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b, layer.stride, layer.padding, layer.dilation, groups=B)
        elif isinstance(layer, BatchNorm):
            gamma = params[layer.weight].reshape(-1) if layer.weight else None
            beta = params[layer.bias].reshape(-1) if layer.bias else None
            if image:
                h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=layer.eps)
            else:  # (B, n, f) -> (n, B*f): one column per (task, feature), statistics over n
                if h.dim() != 3:
                    raise UnsupportedInput("BatchNorm1d on more than one feature dimension")
                f = h.shape[2]
                h = F.batch_norm(h.transpose(0, 1).reshape(n, B * f), None, None, gamma, beta, training=True,
                                 eps=layer.eps).reshape(n, B, f).transpose(0, 1)
        elif isinstance(layer, Activation):
            h = torch.relu(h) if layer.kind == "relu" else torch.tanh(h)
        elif isinstance(layer, MaxPool):
            if not image:
                raise UnsupportedInput("max-pooling after flattening")
            h = F.max_pool2d(h, layer.kernel, layer.stride, layer.padding, layer.dilation, layer.ceil_mode)
        elif isinstance(layer, Flatten):
            # (n, B*C, H, W) -> (B, n, C*H*W), the order of x.flatten(1) within each task
            h = h.reshape(n, B, -1).transpose(0, 1) if image else h.reshape(B, n, -1)
            image = False
        elif isinstance(layer, Linear):
            if image or h.dim() != 3:
                raise UnsupportedInput("a linear layer on more than one feature dimension")
            w = params[layer.weight].transpose(1, 2)  # (B, in, out)
            h = torch.baddbmm(params[layer.bias].unsqueeze(1), h, w) if layer.bias else torch.bmm(h, w)
    if image:
        raise UnsupportedInput("the model's output is not (n, features) per task")
    return h


def _is_block(layers: list) -> bool:
    return (len(layers) == 4 and isinstance(layers[0], Conv) and isinstance(layers[1], BatchNorm)
            and layers[1].weight is not None and layers[2] == Activation("relu")
            and layers[3] == MaxPool((2, 2), (2, 2), (0, 0), (1, 1), False))


def _block(h: torch.Tensor, conv: Conv, bn: BatchNorm, params: Params, B: int) -> torch.Tensor:
    """maxpool(relu(BatchNorm(conv(h)))) as relu(|gamma| rstd * maxpool(s conv(h) - mean) + beta).

    The same function (s = sign(gamma) folded into the convolution makes BatchNorm's scale
    positive, so it and the ReLU commute with the max), with the normalisation and the ReLU on the
    pooled tensor: the derivatives of every order then make fewer passes over the full-size one.
    """
    gamma, beta = params[bn.weight].reshape(-1), params[bn.bias].reshape(-1)  # type: ignore[index]
    s = (1 - 2 * (gamma < 0).to(gamma.dtype)).detach()
    w = params[conv.weight]
    w = w.reshape(-1, *w.shape[2:]) * s.view(-1, 1, 1, 1)
    b = params[conv.bias].reshape(-1) * s if conv.bias else None
    z = F.conv2d(h, w, b, conv.stride, conv.padding, conv.dilation, groups=B)
    zc = z - z.mean((0, 2, 3), keepdim=True)
    scale = (gamma * s) * torch.rsqrt(zc.square().mean((0, 2, 3)) + bn.eps)  # |gamma| / std
    u = F.max_pool2d(zc, 2)
    return torch.relu(torch.addcmul(beta.view(1, -1, 1, 1), u, scale.view(1, -1, 1, 1)))


def _patch_block(x: torch.Tensor, conv: Conv, bn: BatchNorm, params: Params) -> torch.Tensor:
    """``_block`` for a first convolution with few input taps, as ``workers.fast.fused`` runs it.

    x: (B, n, C, H, W) -> folded (n, B*C', H/2, W/2). The convolution is a batched product with
    each task's centred patches, so its output is centred exactly (the bias and the mean cancel in
    BatchNorm) and its variance is w^T Cov(patches) w: no per-channel statistics pass, and no pass
    of their derivatives, over the largest activation.
    """
    B, n = x.shape[:2]
    w = params[conv.weight]  # (B, C', C, kh, kw)
    c = w.shape[1]
    gamma, beta = params[bn.weight], params[bn.bias]  # type: ignore[index]  # (B, C')
    s = (1 - 2 * (gamma < 0).to(gamma.dtype)).detach()
    cols = F.unfold(x.reshape(B * n, *x.shape[2:]), w.shape[3:], conv.dilation, conv.padding, conv.stride)
    taps, positions = cols.shape[1], cols.shape[2]
    ho = (x.shape[3] + 2 * conv.padding[0] - conv.dilation[0] * (w.shape[3] - 1) - 1) // conv.stride[0] + 1
    wo = positions // ho
    cols = cols.view(B, n, taps, positions).transpose(2, 3).reshape(B, n * positions, taps)
    cols = cols - cols.mean(1, keepdim=True)  # constant: x carries no gradient
    cov = cols.transpose(1, 2) @ cols / (n * positions)  # (B, taps, taps)
    w2 = w.reshape(B, c, taps) * s.unsqueeze(-1)
    zc = torch.bmm(cols, w2.transpose(1, 2))  # (B, n*L, C'): s * (conv(x) - its mean)
    scale = (gamma * s) * torch.rsqrt(((w2 @ cov) * w2).sum(-1) + bn.eps)  # |gamma| / std, (B, C')
    u = F.max_pool2d(zc.view(B * n, ho, wo, c).permute(0, 3, 1, 2), 2)  # channels-last (B*n, C', H/2, W/2)
    u = u.view(B, n, c, *u.shape[2:])
    y = torch.relu(torch.addcmul(beta.view(B, 1, c, 1, 1), u, scale.view(B, 1, c, 1, 1)))
    return y.transpose(0, 1).reshape(n, B * c, *u.shape[3:])


def task_losses(out: torch.Tensor, y: torch.Tensor, loss: LossName) -> torch.Tensor:
    """``(B,)``: each task's mean loss, as ``F.cross_entropy`` / ``F.mse_loss`` give it for that task."""
    B, n = out.shape[:2]
    if loss == "cross_entropy":
        return F.cross_entropy(out.reshape(B * n, -1), y.reshape(B * n), reduction="none").view(B, n).mean(1)
    return (out - y).square().reshape(B, -1).mean(1)


def task_accuracies(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == y).float().mean(1)  # float32, as the per-task loop reports it
