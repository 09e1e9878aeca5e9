"""Sinusoid regression (Finn et al., 2017, section 5.1): y = A sin(x - phase)."""

from __future__ import annotations

import numpy as np
import torch

from workers.spec import SinusoidTask
from workers.tasks.base import LossName, Split, Task, task_rng


class SinusoidFamily:
    loss: LossName = "mse"
    input_shape: tuple[int, ...] = (1,)
    output_dim: int = 1

    def __init__(self, spec: SinusoidTask, dtype: torch.dtype = torch.float32) -> None:
        self.spec = spec
        self.dtype = dtype

    def draw(self, rng: np.random.Generator) -> tuple[float, float]:
        """Draw one task's (amplitude, phase)."""
        return float(rng.uniform(*self.spec.amplitude)), float(rng.uniform(*self.spec.phase))

    def points(self, amplitude: float, phase: float, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, 1)
        y = amplitude * np.sin(x - phase)
        return torch.as_tensor(x, dtype=self.dtype), torch.as_tensor(y, dtype=self.dtype)

    def sample(self, seed: int, iteration: int, index: int, split: Split = "train") -> Task:
        rng = task_rng(seed, split, iteration, index)
        amplitude, phase = self.draw(rng)
        n = self.spec.shots + self.spec.queries
        x = rng.uniform(*self.spec.x_range, size=n)
        xs, ys = self.points(amplitude, phase, x)
        k = self.spec.shots
        # (shots, 1), (shots, 1), (queries, 1), (queries, 1)
        return Task(xs[:k], ys[:k], xs[k:], ys[k:])
