"""The N-way K-shot core shared by the image families (Omniglot, image folders).

A family supplies its classes per split (how many examples each has, and how to read some of
them as uint8 pixels); :class:`EpisodeFamily` draws the episodes. The order of the draws below is
the sampling contract: ``ways`` distinct classes, then for each class in turn ``shots + queries``
distinct examples, the first ``shots`` of them the support set. Changing it changes every task.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from workers.spec import ImageFolderTask, OmniglotTask
from workers.tasks.base import LossName, Split, Task, task_rng, to_tensor

SPLIT_SEED = 0  # the class splits are a fixed shuffle: the same data splits the same way everywhere


def square_pixels(img: Image.Image, image_size: int, mode: str) -> np.ndarray:
    """``img`` converted to ``mode`` ("L" or "RGB") and resized to S x S with LANCZOS, as uint8.

    (S, S) for "L", (S, S, 3) for "RGB". A transparent background becomes white, not black: it is
    flattened onto white before the alpha channel is dropped.
    """
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    img = img.convert(mode)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def shuffled_parts(n: int, sizes: Sequence[int]) -> list[np.ndarray]:
    """0..n-1 shuffled with ``default_rng(SPLIT_SEED)``, cut into parts of ``sizes`` plus the rest.

    Each part is sorted, so a split lists its classes in the data's own order.
    """
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes))]


class EpisodeFamily:
    """N-way K-shot classification tasks; label k is the k-th of the task's randomly drawn classes.

    Subclasses call ``__init__`` with their spec and implement :meth:`class_sizes` and
    :meth:`load_examples`.
    """

    loss: LossName = "cross_entropy"
    input_shape: tuple[int, ...]  # (C, S, S)
    output_dim: int

    def __init__(self, spec: OmniglotTask | ImageFolderTask, input_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.spec = spec
        self.dtype = dtype
        self.input_shape = input_shape
        self.output_dim = spec.ways

    def class_sizes(self, split: Split) -> Sequence[int]:
        """How many examples each class of ``split`` has; a class is named by its position here."""
        raise NotImplementedError

    def load_examples(self, split: Split, c: int, items: np.ndarray) -> np.ndarray:
        """The examples ``items`` of class ``c`` of ``split``, in that order: (len(items), C, S, S) uint8."""
        raise NotImplementedError

    def sample(self, seed: int, iteration: int, index: int, split: Split = "train") -> Task:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split: unknown split '{split}' (expected train, val or test)")
        spec = self.spec
        rng = task_rng(seed, split, iteration, index)
        sizes = self.class_sizes(split)
        chosen = rng.choice(len(sizes), size=spec.ways, replace=False)
        n = spec.shots + spec.queries
        pixels = np.empty((spec.ways, n, *self.input_shape), dtype=np.uint8)
        for k, c in enumerate(chosen):
            items = rng.choice(sizes[c], size=n, replace=False)  # the first `shots` are the support set
            pixels[k] = self.load_examples(split, int(c), items)
        x = to_tensor(pixels, self.dtype)  # (ways, shots+queries, C, S, S)
        labels = torch.arange(spec.ways)
        return Task(
            x[:, :spec.shots].reshape(-1, *self.input_shape),  # (ways*shots, C, S, S), class-major
            labels.repeat_interleave(spec.shots),  # (ways*shots,) int64
            x[:, spec.shots:].reshape(-1, *self.input_shape),  # (ways*queries, C, S, S)
            labels.repeat_interleave(spec.queries),  # (ways*queries,)
        )
