"""Task families: sinusoid regression, Omniglot, and image folders (MiniImagenet or user data)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from workers.errors import DatasetError
from workers.spec import ImageFolderTask, OmniglotTask, SinusoidTask
from workers.tasks.base import Task, TaskFamily

__all__ = ["DatasetError", "Task", "TaskFamily", "build_task_family", "default_cache_dir",
           "default_data_root"]

# The shared data folder beside the repository: <repo>/../shared/data/omniglot.
_SHARED_OMNIGLOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot"


def default_cache_dir() -> Path:
    """``MAML_CACHE_DIR``, else ``~/.cache/maml-service``."""
    return Path(os.environ.get("MAML_CACHE_DIR") or Path.home() / ".cache" / "maml-service").expanduser()


def default_data_root() -> Path | None:
    """``MAML_DATA_ROOT``, else ``../shared/data/omniglot`` beside the repository if it exists."""
    if os.environ.get("MAML_DATA_ROOT"):
        return Path(os.environ["MAML_DATA_ROOT"]).expanduser()
    return _SHARED_OMNIGLOT if _SHARED_OMNIGLOT.is_dir() else None


def build_task_family(
    spec_task: SinusoidTask | OmniglotTask | ImageFolderTask,
    *,
    data_root: Path | None = None,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> TaskFamily:
    """The task family of a job's ``task`` spec.

    ``data_root`` (Omniglot only, when ``task.path`` is unset) holds the two zips, directly or in an
    ``omniglot/`` sub-folder. Raises :class:`DatasetError` naming the spec field when the data is
    missing or too small for the spec.
    """
    if isinstance(spec_task, SinusoidTask):
        from workers.tasks.sinusoid import SinusoidFamily

        return SinusoidFamily(spec_task, dtype)
    if isinstance(spec_task, OmniglotTask):
        from workers.tasks.omniglot import OmniglotFamily

        return OmniglotFamily(
            spec_task,
            data_root=data_root if data_root is not None else default_data_root(),
            cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
            dtype=dtype,
        )
    if isinstance(spec_task, ImageFolderTask):
        from workers.tasks.image_folder import ImageFolderFamily

        return ImageFolderFamily(spec_task, dtype=dtype)
    raise ValueError(f"task.family: unknown task family {getattr(spec_task, 'family', spec_task)!r}")
