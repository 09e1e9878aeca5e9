"""Hand-written forward and backward of [conv, BatchNorm, ReLU, 2x2 max-pool] x L + linear head.

The query pass of MAML is differentiated once only: the gradient at the adapted parameters, which
the second-order path then pushes back through the inner steps with ordinary autograd. So its
backward need not be differentiable, and can be written by hand for fewer passes over the large
first-layer activations (75 x 64 x 28 x 28 for Omniglot 5-way, 15 queries) than the stock kernels
make: max-pooling as three maxima of strided NHWC views with 0/1 masks (no index tensor), the
BatchNorm statistics as plain sums, and a first convolution with few input taps as a matrix
product with precomputed patches (``Patches``). benchmarks/speed.py measures the result.

Same function, reordered so that the large passes shrink (exact up to ties, see below):

    maxpool(relu(gamma * xhat + beta)) == relu(|gamma| * maxpool(s * xhat) + beta),  s = sign(gamma)

because relu and x -> |gamma| x + beta are non-decreasing, so they commute with max. The sign is
folded into the convolution (conv(x, s W, s b) = s conv(x, W, b)), so pooling runs on the
centred convolution output, and the BatchNorm affine and the ReLU run on the pooled, 4x smaller
tensor. Max-pool ties go to the first element in the window, as in PyTorch; the reordering can only
pick a different element of a window when two values differ by less than the rounding of
``gamma * xhat + beta`` (both choices are then subgradients of the same function).

The backward is the textbook BatchNorm backward written on the pooled tensor, with the two
per-channel sums it needs taken over the pooled tensor too:

    dz = unpool(g * |gamma| * rstd) - rstd * S1 / M - zc * rstd^2 * S2 / M
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.fast.plan import Activation, BatchNorm, Conv, Flatten, Linear, MaxPool, Plan
from workers.inner import Params
from workers.tasks.base import LossName


@dataclass(frozen=True)
class Block:
    conv: Conv
    bn: BatchNorm


@dataclass(frozen=True)
class FusedNet:
    """A plan of the form [Conv2d, BatchNorm2d(affine), ReLU, MaxPool2d(2)] x L, flatten, Linear."""

    blocks: tuple[Block, ...]
    head: Linear

    @staticmethod
    def of(plan: Plan) -> FusedNet | None:
        layers = list(plan.layers)
        blocks: list[Block] = []
        while len(layers) >= 4 and isinstance(layers[0], Conv):
            conv, bn, act, pool = layers[:4]
            if not (isinstance(conv, Conv) and isinstance(bn, BatchNorm) and bn.weight is not None
                    and act == Activation("relu") and pool == MaxPool((2, 2), (2, 2), (0, 0), (1, 1), False)):
                return None
            blocks.append(Block(conv, bn))
            layers = layers[4:]
        if not blocks or len(layers) != 2 or not isinstance(layers[0], Flatten) or not isinstance(layers[1], Linear):
            return None
        return FusedNet(tuple(blocks), layers[1])


def _sign(gamma: torch.Tensor) -> torch.Tensor:
    return 1 - 2 * (gamma < 0).to(gamma.dtype)  # +-1, and +1 where gamma == 0


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """An NHWC tensor as the channels-last NCHW view that conv2d takes (no copy)."""
    return t.permute(0, 3, 1, 2)


def _windows(t: torch.Tensor, h2: int, w2: int) -> list[torch.Tensor]:
    """The four (n, h2, w2, ...) strided views of NHWC ``t`` at 2x2-window offsets a, b, c, d."""
    t6 = t[:, : 2 * h2, : 2 * w2].unflatten(1, (h2, 2)).unflatten(3, (w2, 2))
    return [t6[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]


def _pool(z: list[torch.Tensor], masks: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Max of the four window elements ``z`` (a, b, c, d; strided views or contiguous tensors).

    With channels innermost each strided view reads runs of C contiguous values, where an NCHW
    max_pool2d reads every other element. The backward's choices come back as 0/1 float masks.
    """
    a, b, c, d = z
    top, bottom = torch.maximum(a, b), torch.maximum(c, d)
    u = torch.maximum(top, bottom)
    if not masks:
        return u, ()
    # Ties keep the earlier element, in PyTorch's scan order a, b, c, d. Written straight into
    # float tensors (a bool result and a conversion take twice as long).
    right_top, right_bottom, lower = (torch.empty_like(u) for _ in range(3))
    torch.gt(b, a, out=right_top)
    torch.gt(d, c, out=right_bottom)
    torch.gt(bottom, top, out=lower)
    return u, (right_top, right_bottom, lower)


def _split(g: torch.Tensor, masks: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """(g_top, g_b, g_bottom, g_d): g split between the rows of each window, and the right-hand
    elements' shares; the left-hand ones are g_top - g_b and g_bottom - g_d."""
    right_top, right_bottom, lower = masks
    g_bottom = g * lower
    g_top = g - g_bottom
    return g_top, g_top * right_top, g_bottom, g_bottom * right_bottom


@dataclass
class Patches:
    """A first layer's input as centred patches, in 2x2-window order: the convolution becomes one
    matrix product whose output comes out as the four window elements, contiguous.

    For few input taps (a 1-channel 3x3 convolution has 9) a direct convolution kernel is
    memory-bound in a poor layout; ``patches @ W^T`` is one matrix product. Centring the patches
    removes the per-channel mean of the output (the bias and the mean cancel in BatchNorm), and
    var_c = w_c^T Cov w_c needs no pass over the output. The same patches serve the "before" pass
    and the adapted pass.
    """

    cols: torch.Tensor  # (4, n*h2*w2, taps): centred patches at window offsets a, b, c, d
    cov: torch.Tensor  # (taps, taps), over every output position (cropped ones included)
    shape: tuple[int, int, int, int]  # n, h2, w2, output positions (n*ho*wo)

    @staticmethod
    def of(x: torch.Tensor, kernel: tuple[int, int], conv: Conv) -> Patches:
        """``x``: NHWC."""
        n = x.shape[0]
        ho = (x.shape[1] + 2 * conv.padding[0] - conv.dilation[0] * (kernel[0] - 1) - 1) // conv.stride[0] + 1
        wo = (x.shape[2] + 2 * conv.padding[1] - conv.dilation[1] * (kernel[1] - 1) - 1) // conv.stride[1] + 1
        cols = F.unfold(_nchw(x), kernel, conv.dilation, conv.padding, conv.stride)  # (n, taps, L)
        cols = cols.transpose(1, 2).reshape(n, ho, wo, -1)
        cols = cols - cols.mean((0, 1, 2))
        flat = cols.reshape(-1, cols.shape[3])
        cov = (flat.t() @ flat) / flat.shape[0]
        h2, w2 = ho // 2, wo // 2
        windows = torch.stack(_windows(cols, h2, w2)).reshape(4, n * h2 * w2, -1)
        return Patches(windows, cov, (n, h2, w2, n * ho * wo))


PATCH_TAPS = 32  # a first convolution with at most this many input taps (channels x kernel) runs as patches


@dataclass
class _Saved:
    x: torch.Tensor | None  # NHWC input of the block (None for patches: they are the input)
    patches: Patches | None
    wf: torch.Tensor  # sign-folded weight
    s: torch.Tensor
    zc: torch.Tensor | None  # NHWC centred conv output (not needed for the patches' backward)
    rstd: torch.Tensor
    u: torch.Tensor  # pooled zc
    a: torch.Tensor  # |gamma| * rstd
    masks: tuple[torch.Tensor, ...]
    y: torch.Tensor


def _block_forward(blk: Block, p: Params, x: torch.Tensor | Patches, save: bool
                   ) -> tuple[torch.Tensor, _Saved | None]:
    """x: NHWC, or the first layer's patches; y: NHWC."""
    gamma, beta = p[blk.bn.weight], p[blk.bn.bias]  # type: ignore[index]
    s = _sign(gamma)
    wf = p[blk.conv.weight] * s.view(-1, 1, 1, 1)
    c = wf.shape[0]
    zc: torch.Tensor | None = None
    if isinstance(x, Patches):
        # s * (conv(x, W, b) - its mean), as the four window elements (4, n*h2*w2, C)
        n, h2, w2_, _ = x.shape
        w2 = wf.reshape(c, -1)
        z = torch.matmul(x.cols, w2.t())
        var = ((w2 @ x.cov) * w2).sum(1)
        z = z.view(4, n, h2, w2_, c)
        u, masks = _pool(list(z), True) if save else (z.amax(0), ())
    else:
        conv = blk.conv
        bf = p[conv.bias] * s if conv.bias else None
        zf = F.conv2d(_nchw(x), wf.contiguous(memory_format=torch.channels_last), bf, conv.stride, conv.padding,
                      conv.dilation).permute(0, 2, 3, 1)
        zf = zf if zf.is_contiguous() else zf.contiguous()
        m = zf.numel() // c
        zc = zf.sub_(zf.view(-1, c).sum(0) / m)
        var = zc.view(-1, c).square().sum(0) / m
        u, masks = _pool(_windows(zc, zc.shape[1] // 2, zc.shape[2] // 2), save)  # (n, H/2, W/2, C)
    rstd = (var + blk.bn.eps).rsqrt_()
    a = gamma.abs() * rstd
    y = torch.addcmul(beta, u, a).relu_()
    if not save:
        return y, None
    if isinstance(x, Patches):
        return y, _Saved(None, x, wf, s, None, rstd, u, a, masks, y)
    return y, _Saved(x, None, wf, s, zc, rstd, u, a, masks, y)


def _block_backward(blk: Block, sv: _Saved, gy: torch.Tensor, grads: Params) -> torch.Tensor | None:
    """gy, the input gradient returned: NHWC (None after patches). Writes the block's parameter
    gradients into ``grads``."""
    c = sv.wf.shape[0]
    gpre = torch.ops.aten.threshold_backward(gy, sv.y, 0)  # ReLU
    dbeta = gpre.reshape(-1, c).sum(0)
    t = (gpre * sv.u).reshape(-1, c).sum(0)
    gabs = sv.a / sv.rstd  # |gamma|
    grads[blk.bn.weight] = sv.s * sv.rstd * t  # type: ignore[index]
    grads[blk.bn.bias] = dbeta  # type: ignore[index]
    conv = blk.conv
    if sv.patches is not None:
        # dz = unpool(gpre * a) + k2 * zc + k1, and dW = dz^T cols. The k1 term vanishes on centred
        # patches, and (k2 zc)^T cols = diag(k2) W (cols^T cols): nothing full-size is formed.
        pt = sv.patches
        m = pt.shape[3]
        k2 = -sv.rstd.square() * gabs * sv.rstd * t / m  # -rstd^2 * S2 / M, S2 = sum(g |gamma| * xhat)
        w2 = sv.wf.reshape(c, -1)
        ca, cb, cc, cd = pt.cols
        # sum over window elements k of (gpre at k)^T cols_k, as one product over the four of them,
        # written (taps, 4P) @ (4P, C) so that the BLAS kernel's output has C columns, not taps
        # (the (C, 4P) @ (4P, taps) form makes a poor kernel choice): g_top pairs with a, g_b
        # with b - a, g_bottom with c, g_d with d - c.
        right_top, right_bottom, lower = sv.masks
        g = torch.empty((4, *gpre.shape), dtype=gpre.dtype, device=gpre.device)
        torch.mul(gpre, lower, out=g[2])
        torch.sub(gpre, g[2], out=g[0])
        torch.mul(g[0], right_top, out=g[1])
        torch.mul(g[2], right_bottom, out=g[3])
        cols = torch.stack([ca, cb - ca, cc, cd - cc])  # (4, P, taps)
        gwf = (cols.view(-1, cols.shape[2]).t() @ g.view(-1, c)).t() * sv.a.view(c, 1)  # (C, taps)
        gwf += k2.view(c, 1) * (w2 @ pt.cov) * m
        if conv.bias:  # sum(dz) = sum(gpre * a) + M k1: zero up to rounding (BatchNorm cancels the bias)
            grads[conv.bias] = (sv.a * dbeta - sv.rstd * gabs * dbeta) * sv.s
        grads[conv.weight] = gwf.view_as(sv.wf) * sv.s.view(-1, 1, 1, 1)
        return None
    assert sv.zc is not None and sv.x is not None
    n, h, w, _ = sv.zc.shape
    m = n * h * w
    k1 = -sv.rstd * gabs * dbeta / m  # -rstd * S1 / M,      S1 = sum(g * |gamma|)
    k2 = -sv.rstd.square() * gabs * sv.rstd * t / m
    gz = torch.addcmul(k1, sv.zc, k2)
    # gz[argmax of each window] += gpre * a
    g_top, g_b, g_bottom, g_d = _split(gpre * sv.a, sv.masks)
    za, zb, zc_, zd = _windows(gz, gy.shape[1], gy.shape[2])
    za += g_top - g_b
    zb += g_b
    zc_ += g_bottom - g_d
    zd += g_d
    gxc, gwf, gbf = torch.ops.aten.convolution_backward(
        _nchw(gz), _nchw(sv.x), sv.wf.contiguous(memory_format=torch.channels_last),
        [c] if conv.bias else None, conv.stride, conv.padding, conv.dilation,
        False, [0, 0], 1, [True, True, conv.bias is not None])
    grads[conv.weight] = gwf.contiguous() * sv.s.view(-1, 1, 1, 1)
    if conv.bias:
        grads[conv.bias] = gbf * sv.s
    gx = gxc.permute(0, 2, 3, 1)
    return gx if gx.is_contiguous() else gx.contiguous()


Prepared = torch.Tensor | Patches  # NHWC input of the first block, or its patches


def prepare(net: FusedNet, p: Params, x: torch.Tensor) -> Prepared:
    """(n, C, H, W) ``x`` as the first block takes it; reusable by every pass on the same ``x``."""
    h = x.permute(0, 2, 3, 1)  # NHWC throughout: channels innermost
    h = h if h.is_contiguous() else h.contiguous()
    conv = net.blocks[0].conv
    w = p[conv.weight]
    if w[0].numel() <= PATCH_TAPS:
        return Patches.of(h, (w.shape[2], w.shape[3]), conv)
    return h


def _forward(net: FusedNet, p: Params, x: Prepared, saved: list[_Saved] | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, the last block's NHWC output, its features); each block's activations go to ``saved``."""
    h: Prepared = x
    for blk in net.blocks:
        h, sv = _block_forward(blk, p, h, saved is not None)
        if saved is not None and sv is not None:
            saved.append(sv)
    assert isinstance(h, torch.Tensor)
    feat = _nchw(h).flatten(1)  # (n, features), in x.flatten(1)'s (C, H, W) order
    wh = p[net.head.weight]  # (out, features)
    out = torch.addmm(p[net.head.bias], feat, wh.t()) if net.head.bias else feat @ wh.t()
    return out, h, feat


@torch.no_grad()
def logits(net: FusedNet, p: Params, x: torch.Tensor) -> torch.Tensor:
    """The network's outputs for (n, C, H, W) ``x`` (batch statistics of ``x``, as in training)."""
    return _forward(net, p, prepare(net, p, x), None)[0]


@torch.no_grad()
def run(net: FusedNet, p: Params, x: Prepared, y: torch.Tensor, loss: LossName, *,
        grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, Params | None]:
    """One task: (mean loss, accuracy or None, gradients of the loss w.r.t. ``p`` or None).

    ``p`` maps parameter names to this task's tensors; ``x`` is ``prepare(net, p, inputs)``;
    y (n,) labels or (n, out) targets. Nothing is recorded for autograd.
    """
    saved: list[_Saved] = []
    out, h, feat = _forward(net, p, x, saved if grad else None)
    wh = p[net.head.weight]  # (out, features)
    n = out.shape[0]
    if loss == "cross_entropy":
        logp = torch.log_softmax(out, 1)
        value = -logp.gather(1, y.view(-1, 1)).mean()
        acc = (out.argmax(1) == y).float().mean()  # float32, as the per-task loop reports it
    else:
        diff = out - y
        value, acc = diff.square().mean(), None
    if not grad:
        return value, acc, None
    if loss == "cross_entropy":
        g_out = logp.exp_()
        g_out[torch.arange(n), y] -= 1
        g_out /= n
    else:
        g_out = diff * (2 / diff.numel())
    grads: Params = {net.head.weight: g_out.t() @ feat}
    if net.head.bias:
        grads[net.head.bias] = g_out.sum(0)
    g = (g_out @ wh).view(_nchw(h).shape).permute(0, 2, 3, 1).contiguous()
    for i in range(len(net.blocks) - 1, -1, -1):
        g = _block_backward(net.blocks[i], saved[i], g, grads)  # type: ignore[assignment]
        saved[i] = None  # type: ignore[call-overload]  # free activations as we go
    return value, acc, grads
