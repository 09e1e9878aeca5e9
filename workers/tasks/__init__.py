"""Task families: sinusoid regression, Omniglot, and image folders (MiniImagenet or user data)."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.errors import DatasetError
from workers.spec import ImageFolderTask, OmniglotTask, SinusoidTask
from workers.tasks.base import Task, TaskFamily

__all__ = ["DatasetError", "Task", "TaskFamily", "build_task_family", "check_task"]


def build_task_family(
    spec_task: SinusoidTask | OmniglotTask | ImageFolderTask,
    *,
    data_root: Path | None = None,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> TaskFamily:
    """The task family of a job's ``task`` spec.

    ``data_root`` (Omniglot only, when ``task.path`` is unset) holds the two zips, directly or in an
    ``omniglot/`` sub-folder; ``cache_dir`` keeps Omniglot decoded between processes (without it the
    zips are decoded in every process). Both come from the caller's settings (the service's
    ``Settings``, or the options of ``python -m workers``): nothing here reads the environment.
    Raises :class:`DatasetError` naming the spec field when the data is missing or too small for the spec.
    """
    if isinstance(spec_task, SinusoidTask):
        from workers.tasks.sinusoid import SinusoidFamily

        return SinusoidFamily(spec_task, dtype)
    if isinstance(spec_task, OmniglotTask):
        from workers.tasks.omniglot import OmniglotFamily

        return OmniglotFamily(spec_task, data_root=data_root, cache_dir=cache_dir, dtype=dtype)
    if isinstance(spec_task, ImageFolderTask):
        from workers.tasks.image_folder import ImageFolderFamily

        return ImageFolderFamily(spec_task, dtype=dtype)
    raise ValueError(f"task.family: unknown task family {getattr(spec_task, 'family', spec_task)!r}")


def check_task(
    spec_task: SinusoidTask | OmniglotTask | ImageFolderTask,
    *,
    data_root: Path | None = None,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[tuple[int, ...], int]:
    """What :func:`build_task_family` checks, and the family's ``(input_shape, output_dim)``, with no
    dataset decoded: Omniglot is checked from its zips' listings (building it decodes 32,000
    drawings per image size); the other families are cheap to build and are built."""
    if isinstance(spec_task, OmniglotTask):
        from workers.tasks import omniglot

        omniglot.check(spec_task, data_root)
        return (1, spec_task.image_size, spec_task.image_size), spec_task.ways
    family = build_task_family(spec_task, data_root=data_root, cache_dir=cache_dir, dtype=dtype)
    return family.input_shape, family.output_dim
