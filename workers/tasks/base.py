"""Task families: seeded, reproducible, splittable.

A task is drawn by a pure function of (seed, split, iteration, index): a meta-batch can be split
across any number of workers, and a resumed run samples exactly the tasks it would have seen.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

import numpy as np
import torch

Split = Literal["train", "val", "test"]
LossName = Literal["mse", "cross_entropy"]
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


class Task(NamedTuple):
    """One task's data. Regression: x (n, *input_shape), y (n, out). Classification: y (n,) int64."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


class TaskFamily(Protocol):
    loss: LossName
    input_shape: tuple[int, ...]  # one example, without the batch dimension
    output_dim: int  # regression outputs, or classes (ways) per task

    def sample(self, seed: int, iteration: int, index: int, split: Split = "train") -> Task: ...


def task_rng(seed: int, split: Split, iteration: int, index: int) -> np.random.Generator:
    """An independent generator for one task, a pure function of its coordinates."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, _SPLIT_IDS[split], iteration, index])))


def shard_indices(meta_batch_size: int, shard: int, num_shards: int) -> range:
    """The task indices of one shard of a meta-batch (round-robin, so shards differ by at most one)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    return range(shard, meta_batch_size, num_shards)


def to_tensor(pixels: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels to [0, 1] floats; the one conversion shared by training and inference."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(dtype).div_(255)
