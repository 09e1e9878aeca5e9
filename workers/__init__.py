"""maml-service workers: the meta-learning engine and what runs on Ray workers.

>>> from workers import meta_gradient
>>> grads, metrics = meta_gradient(model, tasks, algorithm="maml", inner_steps=1, inner_lr=0.4,
...                                loss="cross_entropy")

The engine is imported on first use, so ``import workers.spec`` (the control plane's job
validation) loads neither torch nor Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = ["JobSpec", "meta_gradient", "shard_meta_gradient", "task_meta_gradient"]


def __getattr__(name: str) -> Any:
    if name == "JobSpec":
        from workers.spec import JobSpec

        return JobSpec
    if name in ("meta_gradient", "shard_meta_gradient", "task_meta_gradient"):
        from workers import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
