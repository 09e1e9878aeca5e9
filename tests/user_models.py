"""A user model factory for tests: a module with parameters *and* buffers."""

import torch
from torch import nn


class ScaledNet(nn.Module):
    def __init__(self, width: int = 8, scale: float = 2.0) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))
        self.fc1 = nn.Linear(1, width)
        self.bn = nn.BatchNorm1d(width)  # running statistics on: the engine must not leak them across tasks
        self.fc2 = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x) * self.scale)))


def make_model(width: int = 8, scale: float = 2.0) -> nn.Module:
    return ScaledNet(width, scale)


class Broken(nn.Module):
    """Fails inside the workers: NaN outputs, or an exception, on demand."""

    def __init__(self, mode: str = "nan") -> None:
        super().__init__()
        self.fc = nn.Linear(1, 1)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "raise":
            raise RuntimeError("corrupt shard: labels do not match inputs")
        return self.fc(x) * float("nan")


def make_broken(mode: str = "nan") -> nn.Module:
    return Broken(mode)


class Countdown(nn.Module):
    """An MLP whose outputs turn NaN after ``calls`` forward passes: a divergence at a known iteration."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 1)
        self.left = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.left -= 1
        out = self.fc(x)
        return out if self.left >= 0 else out * float("nan")


def make_countdown(calls: int) -> nn.Module:
    return Countdown(calls)
