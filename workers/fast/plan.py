"""A model as a flat list of layers, when it is built only of layers the fast paths understand.

The batched paths need to know what a model computes in order to run many tasks at once (one set
of parameters per task). They do not trace ``forward``: they recognise a small set of module types
whose ``forward`` is known exactly (``nn.Sequential`` of standard layers, and this project's
``Conv4`` and ``MLP``) and give up (``plan_of`` returns ``None``) on anything else, so that the
caller falls back to the per-task loop, which works for any ``nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules import module as module_globals

from workers.models import MLP, Conv4


@dataclass(frozen=True)
class Conv:
    """``nn.Conv2d`` with ``groups=1`` and zero padding; ``weight``/``bias`` are parameter names."""

    weight: str
    bias: str | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


@dataclass(frozen=True)
class BatchNorm:
    """Batch statistics in every pass (no running averages), as in the MAML paper."""

    weight: str | None  # None when affine=False
    bias: str | None
    eps: float


@dataclass(frozen=True)
class Activation:
    kind: str  # "relu" | "tanh"


@dataclass(frozen=True)
class MaxPool:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool


@dataclass(frozen=True)
class Flatten:
    """``x.flatten(1)``: (batch, *features) -> (batch, features)."""


@dataclass(frozen=True)
class Linear:
    weight: str
    bias: str | None
    out_features: int


Layer = Conv | BatchNorm | Activation | MaxPool | Flatten | Linear


@dataclass(frozen=True)
class Plan:
    """The layers of a model in order, and the parameter names they use (in ``named_parameters`` order)."""

    layers: tuple[Layer, ...]
    param_names: tuple[str, ...]

    @property
    def out_features(self) -> int | None:
        """Outputs per example when the model ends with a linear layer (else unknown)."""
        last = [layer for layer in self.layers if isinstance(layer, Linear)]
        return last[-1].out_features if last and isinstance(self.layers[-1], Linear) else None


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_forward_hooks_with_kwargs", None))


_KNOWN = (nn.Sequential, Conv4, MLP, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Tanh, nn.MaxPool2d,
          nn.Flatten, nn.Linear, nn.Identity)


def _walk(m: nn.Module, prefix: str) -> list[Layer] | None:
    """The layers of ``m`` (parameter names under ``prefix``), or None if any part is unknown."""
    if _has_hooks(m):
        return None
    if type(m) not in _KNOWN:  # exact types only: a subclass may override forward
        return None
    p = f"{prefix}." if prefix else ""

    def bias_name(present: bool) -> str | None:
        return p + "bias" if present else None
    if isinstance(m, nn.Sequential):
        out: list[Layer] = []
        # _modules, not named_children(): a module listed twice runs twice (its second parameter names
        # are then missing from named_parameters, and plan_of gives up).
        for name, child in m._modules.items():
            if child is None:
                continue
            sub = _walk(child, p + name)
            if sub is None:
                return None
            out += sub
        return out
    if isinstance(m, Conv4):  # forward: head(features(x).flatten(1))
        feats, head = _walk(m.features, p + "features"), _walk(m.head, p + "head")
        return None if feats is None or head is None else [*feats, Flatten(), *head]
    if isinstance(m, MLP):  # forward: net(x.flatten(1))
        net = _walk(m.net, p + "net")
        return None if net is None else [Flatten(), *net]
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        return [Conv(p + "weight", bias_name(m.bias is not None), _pair(m.stride), _pair(m.padding),
                     _pair(m.dilation))]
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        # Batch statistics are used when running statistics are off, or in training mode.
        if m.track_running_stats and not m.training:
            return None
        return [BatchNorm(p + "weight" if m.affine else None, bias_name(m.affine), float(m.eps))]
    if isinstance(m, nn.ReLU):
        return [Activation("relu")]
    if isinstance(m, nn.Tanh):
        return [Activation("tanh")]
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            return None
        return [MaxPool(_pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size),
                        _pair(m.padding), _pair(m.dilation), bool(m.ceil_mode))]
    if isinstance(m, nn.Flatten):
        return [Flatten()] if (m.start_dim, m.end_dim) == (1, -1) else None
    if isinstance(m, nn.Linear):
        return [Linear(p + "weight", bias_name(m.bias is not None), m.out_features)]
    if isinstance(m, nn.Identity):
        return []
    return None


def plan_of(model: nn.Module) -> Plan | None:
    """The model's plan, or None when a fast path cannot know exactly what ``model`` computes."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return None
    layers = _walk(model, "")
    if layers is None:
        return None
    names = tuple(n for n, _ in model.named_parameters())
    used = {n for layer in layers if isinstance(layer, Conv | BatchNorm | Linear)
            for n in (layer.weight, layer.bias) if n is not None}
    if used != set(names):  # a parameter the plan does not account for: not ours to reason about
        return None
    return Plan(tuple(layers), names)
