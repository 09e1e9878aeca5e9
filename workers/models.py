"""Models: the paper's sinusoid MLP, the Conv4 of Omniglot and MiniImagenet, and user factories.

BatchNorm follows the MAML paper: batch statistics in every pass, never running averages
(``track_running_stats=False``), so a forward pass is a pure function of (parameters, inputs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from workers.errors import ModelError
from workers.spec import ModelSpec


class MLP(nn.Module):
    """The sinusoid regressor: in -> 40 -> 40 -> out with ReLU (Finn et al., 2017)."""

    def __init__(self, in_features: int = 1, hidden: Iterable[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # (batch, in) -> (batch, out)


def _conv_block(in_channels: int, filters: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, filters, kernel_size=3, padding=1),
        nn.BatchNorm2d(filters, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """4 x [conv 3x3, BatchNorm, ReLU, 2x2 max-pool] and a linear head (Vinyals et al.; MAML paper).

    Omniglot: 64 filters on 28x28 grey images (64 x 1 x 1 features).
    MiniImagenet: 32 filters on 84x84 RGB images (32 x 5 x 5 features).
    """

    def __init__(self, in_channels: int = 1, ways: int = 5, filters: int = 64, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, filters),
            _conv_block(filters, filters),
            _conv_block(filters, filters),
            _conv_block(filters, filters),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ModelError("task.image_size", f"{image_size} is too small for 4 pooling layers (need >= 16)")
        self.head = nn.Linear(filters * side * side, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, channels, H, W) -> (batch, ways)
        return self.head(self.features(x).flatten(1))


def load_factory(path: str, allowed_modules: Iterable[str] | None = None):
    """Resolve 'package.module:fn'. Only modules under an allow-listed prefix are imported."""
    module_name, _, attr = path.partition(":")
    if allowed_modules is not None:
        allowed = [m for m in allowed_modules if m]
        if not any(module_name == m or module_name.startswith(m + ".") for m in allowed):
            raise ModelError(
                "model.factory", f"module '{module_name}' is not in the server's allow-list "
                f"({', '.join(allowed) or 'empty'}); set MAML_MODEL_ALLOWLIST to permit it"
            )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError("model.factory", f"cannot import module '{module_name}': {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelError("model.factory", f"'{module_name}' has no callable '{attr}'")
    return fn


def build_model(
    spec: ModelSpec,
    *,
    input_shape: tuple[int, ...],
    output_dim: int,
    allowed_modules: Iterable[str] | None = None,
) -> nn.Module:
    """Build the model of a spec for a task family's input shape and output size (without the
    learned inner-loop pieces: ``workers.mamlpp.attach`` adds those)."""
    model = _build_model(spec, input_shape=input_shape, output_dim=output_dim, allowed_modules=allowed_modules)
    if spec.per_step_bn and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
                                    for m in model.modules()):
        raise ModelError("model.per_step_bn", "the model has no BatchNorm layer with weights")
    for field, used in (("model.per_step_bn_stats", spec.per_step_bn_stats),
                        ("model.query_bn", spec.query_bn != "batch")):
        if used and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ModelError(field, "the model has no BatchNorm layer")
    return model


def _build_model(spec: ModelSpec, *, input_shape: tuple[int, ...], output_dim: int,
                 allowed_modules: Iterable[str] | None) -> nn.Module:
    if spec.factory is not None:
        fn = load_factory(spec.factory, allowed_modules)
        try:
            model = fn(**spec.kwargs)
        except TypeError as exc:
            raise ModelError("model.kwargs", f"{spec.factory} refused them: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ModelError("model.factory", f"{spec.factory} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if spec.name == "mlp":
        in_features = 1
        for d in input_shape:
            in_features *= d
        return MLP(in_features, spec.hidden, output_dim)
    if spec.name == "conv4":
        if len(input_shape) != 3:
            raise ModelError("model.name", f"conv4 needs image inputs (C, H, W), the task gives {input_shape}")
        channels, height, _ = input_shape
        filters = spec.filters or (64 if channels == 1 else 32)
        return Conv4(channels, output_dim, filters, height)
    raise ModelError("model.name", f"unknown model '{spec.name}'")


def parameter_count(make: Callable[[], nn.Module]) -> int:
    """The parameters of the model ``make()`` builds, built on PyTorch's meta device: shapes only, no
    memory, however large the model (a tenant's spec is sized before anything is allocated)."""
    with torch.device("meta"):
        model = make()
    return sum(p.numel() for p in model.parameters())
