"""Faster schedules of the same MAML maths: batched tasks, and hand-written CPU query kernels.

Nothing here changes what is computed, only how: every path is checked in float64 against the
per-task loop of ``workers.maml`` (``tests/test_engine_fast.py``). Each entry point returns
``None`` when it does not apply, and the caller then takes the per-task loop, which handles any
``nn.Module``.

* ``maml_shard``: a shard of tasks at once (tasks folded into channels, grouped convolutions).
  The query pass is batched too on CUDA (``query="folded"``); on CPU it runs per task through the
  hand-written kernels of ``workers.fast.fused`` when the model is a conv/BatchNorm/ReLU/max-pool
  stack with a linear head (``query="fused"``).
* ``shard_meta_gradient``: ``maml_shard`` behind the signature of ``workers.engine.shard_meta_gradient``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from workers.aggregator import GradientSum
from workers.fast.batched import QueryPath, fused_net, maml_shard
from workers.inner import Params
from workers.tasks.base import Task

__all__ = ["QueryPath", "fused_net", "maml_shard", "shard_meta_gradient"]


def shard_meta_gradient(model: nn.Module, params: Params, buffers: Params, tasks: Sequence[Task], *,
                        algorithm: str, inner_steps: int, inner_lr: float, loss, query: QueryPath = "auto",
                        before: bool = True, meta=None, **_reptile_options) -> GradientSum | None:
    """``workers.engine.shard_meta_gradient`` for plain MAML and first-order MAML, batched; else None
    (Reptile, and any MAML++ / Meta-SGD / ANIL option: ``meta.general``)."""
    if algorithm not in ("maml", "fomaml") or (meta is not None and meta.general):
        return None
    return maml_shard(model, params, buffers, tasks, inner_steps=inner_steps, inner_lr=inner_lr, loss=loss,
                      first_order=algorithm == "fomaml", query=query, before=before)
