"""maml-service workers: the meta-learning engine and what runs on Ray workers.

>>> from workers import meta_gradient
>>> grads, metrics = meta_gradient(model, tasks, algorithm="maml", inner_steps=1, inner_lr=0.4,
...                                loss="cross_entropy")
"""

from workers.engine import meta_gradient, shard_meta_gradient, task_meta_gradient
from workers.spec import JobSpec

__all__ = ["JobSpec", "meta_gradient", "shard_meta_gradient", "task_meta_gradient"]
