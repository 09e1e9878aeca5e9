"""N-way K-shot classification from a folder of images (MiniImagenet and any user data set).

Two layouts at ``task.path``:
  * the MiniImagenet split format (Ravi and Larochelle, 2017): ``images/`` plus ``train.csv``,
    ``val.csv`` and ``test.csv``, each with the header ``filename,label``; a csv's labels are the
    classes of that split.
  * class folders, ``<path>/<class>/<image>``: the sorted class names are shuffled with
    ``numpy.random.default_rng(0)``, then 64% go to train, 16% to val and the rest to test
    (MiniImagenet's 64/16/20), at least one class each to val and test.

Images are decoded lazily with :func:`preprocess_image` (RGB or grey per ``channels``, resized to
S x S with LANCZOS, [0, 1], no mean/std normalisation) and kept in a small LRU cache of uint8 arrays.
The service uses the same function for uploaded images.
"""

from __future__ import annotations

import csv
import functools
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from workers.errors import DatasetError
from workers.spec import ImageFolderTask
from workers.tasks.base import Split, to_tensor
from workers.tasks.episodes import EpisodeFamily, shuffled_parts, square_pixels

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                            ".pgm"})
CSV_SPLITS = ("train", "val", "test")
FOLDER_FRACTIONS = (0.64, 0.16)  # train, val; test gets the rest


class ImageClass(NamedTuple):
    label: str
    files: tuple[Path, ...]


# ---------------------------------------------------------------------------------------------- pixels


def preprocess_array(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """An image as training sees it: (C, S, S) uint8."""
    if img.format == "JPEG":
        # Decode a large JPEG at a reduced scale (still at least S x S): several times faster. Only
        # takes effect on a freshly opened image, which is how both training and the service call us.
        img.draft("RGB" if channels == 3 else "L", (image_size, image_size))
    pixels = square_pixels(img, image_size, "RGB" if channels == 3 else "L")  # (S, S, 3) or (S, S)
    return pixels.transpose(2, 0, 1).copy() if channels == 3 else pixels[None].copy()


def preprocess_image(img: Image.Image, image_size: int, channels: int = 3,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (C, S, S) tensor in [0, 1]: exactly what the model saw in training."""
    return to_tensor(preprocess_array(img, image_size, channels), dtype)


# ------------------------------------------------------------------------------------------------ index


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def read_csv_splits(root: Path) -> dict[str, list[ImageClass]]:
    """The MiniImagenet format: images/ and one ``filename,label`` csv per split."""
    images = root / "images"
    missing = [f"{name}.csv" for name in CSV_SPLITS if not (root / f"{name}.csv").is_file()]
    if missing:
        raise DatasetError("task.path", f"{root} has images/ but not {', '.join(missing)} (the MiniImagenet "
                           f"format needs {', '.join(f'{s}.csv' for s in CSV_SPLITS)})")
    present = set(os.listdir(images))
    splits: dict[str, list[ImageClass]] = {}
    for name in CSV_SPLITS:
        path = root / f"{name}.csv"
        by_label: dict[str, list[Path]] = {}
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            if header[:2] != ["filename", "label"]:
                raise DatasetError("task.path", f"{path}: the header must be 'filename,label', not "
                                   f"{','.join(header)!r}")
            for row_number, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2:
                    raise DatasetError("task.path", f"{path}, line {row_number}: expected filename,label")
                filename, label = row[0].strip(), row[1].strip()
                if filename not in present and not (images / filename).is_file():
                    raise DatasetError("task.path", f"{path}, line {row_number}: image {filename} is not "
                                       f"in {images}")
                by_label.setdefault(label, []).append(images / filename)
        splits[name] = [ImageClass(label, tuple(files)) for label, files in sorted(by_label.items())]
    return splits


def read_class_folders(root: Path) -> dict[str, list[ImageClass]]:
    """Class sub-folders, split by class: see the module docstring."""
    classes = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            files = sorted(f.name for f in os.scandir(entry.path) if f.is_file() and _is_image(f.name))
            classes.append(ImageClass(entry.name, tuple(Path(entry.path) / f for f in files)))
    if not classes:
        raise DatasetError("task.path", f"{root} holds no class folders (and no images/ with "
                           "train/val/test.csv)")
    n = len(classes)
    n_val = max(1, round(n * FOLDER_FRACTIONS[1]))
    n_test = max(1, n - round(n * FOLDER_FRACTIONS[0]) - n_val)
    n_train = max(0, n - n_val - n_test)
    train, val, test = shuffled_parts(n, [n_train, n_val])
    return {"train": [classes[i] for i in train], "val": [classes[i] for i in val],
            "test": [classes[i] for i in test]}


def read_splits(path: str) -> dict[str, list[ImageClass]]:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError("task.path", f"{root} is not a folder (resolved to {root.absolute()}); set the "
                           "task's `path` field to a folder of class folders, or of images/ plus "
                           "train.csv, val.csv and test.csv")
    if (root / "images").is_dir() and any((root / f"{name}.csv").is_file() for name in CSV_SPLITS):
        return read_csv_splits(root)
    return read_class_folders(root)


# ----------------------------------------------------------------------------------------------- family


class ImageFolderFamily(EpisodeFamily):
    """N-way K-shot tasks from image files; a class is an :class:`ImageClass` of ``splits``."""

    spec: ImageFolderTask

    def __init__(self, spec: ImageFolderTask, *, dtype: torch.dtype = torch.float32,
                 cache_images: int = 2048) -> None:
        super().__init__(spec, (spec.channels, spec.image_size, spec.image_size), dtype)
        self.cache_images = cache_images
        self.splits = read_splits(spec.path)
        need = spec.shots + spec.queries
        for name, classes in self.splits.items():
            if len(classes) < spec.ways:
                counts = ", ".join(f"{n}: {len(c)}" for n, c in self.splits.items())
                raise DatasetError("task.ways", f"{spec.ways}-way tasks need {spec.ways} classes in every "
                                   f"split, but '{name}' has {len(classes)} (classes per split: {counts})")
            for image_class in classes:
                if len(image_class.files) < need:
                    raise DatasetError("task.shots", f"class '{image_class.label}' ({name} split) has "
                                       f"{len(image_class.files)} images, fewer than shots + queries "
                                       f"= {need}")
        self._init_cache()

    def _init_cache(self) -> None:
        self._pixels = functools.lru_cache(maxsize=self.cache_images)(self._decode)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_pixels"]  # an lru_cache does not pickle; a copy starts with an empty one
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def _decode(self, file: Path) -> np.ndarray:
        try:
            with Image.open(file) as img:
                return preprocess_array(img, self.spec.image_size, self.spec.channels)
        except (OSError, ValueError) as exc:
            raise DatasetError("task.path", f"cannot read image {file}: {exc}") from exc

    def class_sizes(self, split: Split) -> list[int]:
        return [len(image_class.files) for image_class in self.splits[split]]

    def load_examples(self, split: Split, c: int, items: np.ndarray) -> np.ndarray:
        files = self.splits[split][c].files
        return np.stack([self._pixels(files[i]) for i in items])  # (len(items), C, S, S)
